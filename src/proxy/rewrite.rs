//! Answers that point at the upstream are pointed back through tokenrelay: an absolute
//! URL header (`x-goog-upload-url`, `Location`, …) on the upstream's own origin becomes
//! `{the client's tokenrelay origin}/{provider}/…`, so the next leg of a resumable upload
//! (or a redirect) comes back through the pool instead of going to the upstream with no
//! credential. An upload session is pinned to the credential that started it.

use http::header::{HeaderMap, HeaderValue};
use http::HeaderName;

/// Google's resumable upload: the URL of the session the next legs go to.
pub static UPLOAD_URL: HeaderName = HeaderName::from_static("x-goog-upload-url");

/// Where a request came in and went out, for pointing URLs back.
pub struct Origins<'a> {
    /// The Host the client reached tokenrelay by (`http://` is added only when a URL is
    /// rewritten: most answers have none).
    pub client_host: &'a str,
    pub provider: &'a str,
    /// The upstream base the request went to (scheme, host, port and base path).
    pub upstream: &'a str,
}

impl Origins<'_> {
    /// `url` pointed back through tokenrelay, when it lies under the upstream base.
    fn back(&self, url: &str) -> Option<String> {
        let base = self.upstream.trim_end_matches('/');
        let rest = url.strip_prefix(base)?;
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
            return None;
        }
        Some(format!("{}{rest}", self.prefix()))
    }

    /// `http://{Host}/{provider}`: what an upstream URL's base becomes.
    fn prefix(&self) -> String {
        format!("http://{}/{}", self.client_host, self.provider)
    }
}

/// Rewrites every absolute URL header under the upstream base. Returns the path and query
/// (after `/{provider}`) of a new upload session, to pin it to the credential.
pub fn point_back(headers: &mut HeaderMap, origins: &Origins) -> Option<String> {
    let mut session = None;
    let upstream = origins.upstream.as_bytes();
    let scheme_end = upstream.iter().position(|b| *b == b':').unwrap_or(0);
    for (name, value) in headers.iter_mut() {
        let v = value.as_bytes();
        // Cheap first: only values that start like the upstream's scheme and host.
        if v.len() < upstream.len()
            || !v[..scheme_end].eq_ignore_ascii_case(&upstream[..scheme_end])
        {
            continue;
        }
        let Ok(url) = value.to_str() else { continue };
        let Some(back) = origins.back(url) else {
            continue;
        };
        if let Ok(new) = HeaderValue::from_str(&back) {
            if name == UPLOAD_URL {
                session = back.strip_prefix(&origins.prefix()).map(str::to_string);
            }
            *value = new;
        }
    }
    session
}

/// The key of an upload session for a request: its `upload_id` (Google's resumable
/// uploads) or, failing that, nothing (ordinary requests are not pinned).
pub fn session_key(path_and_query: &str) -> Option<String> {
    let (path, query) = path_and_query.split_once('?')?;
    let id = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "upload_id")
        .map(|(_, v)| v.into_owned())?;
    Some(format!("{path}?upload_id={id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_point_back_through_the_provider_and_others_stay() {
        let origins = Origins {
            client_host: "127.0.0.1:8080",
            provider: "gemini",
            upstream: "https://generativelanguage.googleapis.com",
        };
        let mut h = HeaderMap::new();
        h.insert(
            &UPLOAD_URL,
            HeaderValue::from_static("https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable"),
        );
        h.insert(
            "location",
            HeaderValue::from_static("https://elsewhere.example/x"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let session = point_back(&mut h, &origins);
        assert_eq!(
            h[&UPLOAD_URL],
            "http://127.0.0.1:8080/gemini/upload/v1beta/files?upload_id=AB-c_1&upload_protocol=resumable"
        );
        assert_eq!(h["location"], "https://elsewhere.example/x");
        assert_eq!(
            session.as_deref().and_then(session_key).as_deref(),
            Some("/upload/v1beta/files?upload_id=AB-c_1")
        );
    }

    #[test]
    fn a_base_path_is_kept_and_lookalike_hosts_are_not_rewritten() {
        let origins = Origins {
            client_host: "localhost:8080",
            provider: "ds",
            upstream: "https://dashscope-intl.aliyuncs.com/compatible-mode",
        };
        assert_eq!(
            origins
                .back("https://dashscope-intl.aliyuncs.com/compatible-mode/v1/files/1")
                .as_deref(),
            Some("http://localhost:8080/ds/v1/files/1")
        );
        assert_eq!(
            origins.back("https://dashscope-intl.aliyuncs.com/api/v1"),
            None
        );
        assert_eq!(
            origins.back("https://dashscope-intl.aliyuncs.com/compatible-modex"),
            None
        );
    }
}
