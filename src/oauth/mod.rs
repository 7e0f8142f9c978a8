//! OAuth: the grants tokenrelay redeems (`grant`: refresh token, service-account JWT
//! bearer) and the classification of the token endpoint's answer.

pub mod grant;

pub use grant::*;
