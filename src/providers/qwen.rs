//! Qwen (Qwen Code OAuth files): the public client, the rotating refresh token, and the
//! `resource_url` a credential carries as its own API base.

use url::Url;

pub const UPSTREAM: &str = "https://portal.qwen.ai";
pub const TOKEN_URL: &str = "https://chat.qwen.ai/api/v1/oauth2/token";
/// Qwen Code's public OAuth client (no secret).
pub const CLIENT_ID: &str = "f0304373b74a44d2b584a3fb70ca9e56";
pub const DEFAULT_CREDENTIALS: &str = "~/.qwen/oauth_creds.json";
/// Where existing deployments list Qwen Code files (comma-separated).
pub const ENV_CREDENTIALS: &str = "QWEN_CODE_OAUTH_CREDENTIALS";
/// Qwen Code's device-code endpoint (`tokenrelay login qwen`).
pub const DEVICE_URL: &str = "https://chat.qwen.ai/api/v1/oauth2/device/code";
/// The scope a Qwen login asks for.
pub const SCOPE: &str = "openid profile email model.completion";

/// Qwen closed its free OAuth tier on 2026-04-15; paid access is DashScope API keys.
pub fn reauth_hint() -> String {
    "Qwen's free OAuth tier ended on 2026-04-15, so signing in again with `qwen` no longer yields a working token: use DashScope API keys with the `dashscope` preset ([providers.dashscope] api_keys = [\"env:DASHSCOPE_API_KEY\"])".to_string()
}

/// The upstream base for a credential: its `resource_url` (scheme added when missing) or
/// the provider's `upstream`. A `resource_url` must be https without userinfo, unless the
/// provider's own upstream is http (local and test setups). Qwen's files carry it; any
/// provider whose token endpoint answers one gets the same rule.
pub fn resource_base(
    upstream: &Url,
    provider: &str,
    resource_url: Option<&str>,
) -> Result<Url, String> {
    let Some(r) = resource_url else {
        return Ok(upstream.clone());
    };
    let with_scheme = if r.contains("://") {
        r.to_string()
    } else {
        format!("https://{r}")
    };
    let url =
        Url::parse(&with_scheme).map_err(|e| format!("resource_url {r:?} is not a URL: {e}"))?;
    let scheme_ok =
        url.scheme() == "https" || (url.scheme() == "http" && upstream.scheme() == "http");
    if !scheme_ok {
        return Err(format!(
            "resource_url {r:?} must use https (http only when providers.{}.upstream is http)",
            provider
        ));
    }
    if url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "resource_url {r:?} must name a host and carry no user name or password"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "resource_url {r:?} must not carry a query or fragment"
        ));
    }
    Ok(url)
}
