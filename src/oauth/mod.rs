//! OAuth: the grants tokenrelay redeems (`grant`: refresh token, service-account JWT
//! bearer) and the classification of the token endpoint's answer; the logins that make a
//! new credential (`login`: loopback + PKCE, device flow).

pub mod grant;
pub mod login;

pub use grant::*;
