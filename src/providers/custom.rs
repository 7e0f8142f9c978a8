//! A custom provider: an OAuth server and upstream the operator names. Nothing is
//! preset; the token endpoint is the only thing tokenrelay can point a user at.

use url::Url;

pub fn reauth_hint(token_url: Option<&Url>) -> String {
    match token_url {
        Some(url) => {
            format!("obtain a new refresh token from {url} and replace the credential file")
        }
        None => "add an API key to this provider's api_keys".to_string(),
    }
}
