//! A custom provider: an OAuth server and upstream the operator names. Nothing is
//! preset; the token endpoint is the only thing tokenrelay can point a user at.

use url::Url;

pub fn reauth_hint(token_url: &Url) -> String {
    format!("obtain a new refresh token from {token_url} and replace the credential file")
}
