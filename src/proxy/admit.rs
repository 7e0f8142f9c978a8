//! Admitting a request: the provider segment, the client key (header or `?key=`, compared
//! in constant time and removed), the path (no dot segments, even encoded), the Vertex AI
//! location, the headers that may go upstream, and the body (buffered for replay, streamed
//! for uploads, 413 past `server.max_upload_body` whatever its framing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};

use super::error::{ProxyError, Reason};
use super::ProxyState;
use crate::lifecycle::pool::{Pool, ProviderPool};
use crate::providers;
use crate::usage::clients::{Clients, Who};

static GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies still see.
pub(super) static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// A request that passed the checks every attempt relies on.
pub(super) struct Admitted {
    /// The upstream path and query: the client's, without its own key.
    pub path_and_query: String,
    /// The upstream base chosen by the path (Vertex AI's location), if the provider's
    /// upstream depends on it.
    pub location_base: Option<String>,
    pub body: RequestBody,
    /// Who sent it.
    pub who: Who,
}

/// Admits a request to `pool`: its client key, its path (no dot segments, an allowed
/// location) and its body (413 past `server.max_upload_body`). `rest` is the path after
/// the provider segment.
pub(super) async fn admit(
    s: &ProxyState,
    pool: &ProviderPool,
    parts: &Parts,
    rest: &str,
    body: Body,
    upgrade: bool,
) -> Result<Admitted, ProxyError> {
    let (who, query_key) = match client_key(&s.clients.load(), &parts.headers, parts.uri.query()) {
        ClientKey::Missing => {
            return Err(ProxyError::new(
                Reason::Unauthorized,
                "missing or wrong client key: send your [[clients]] key or one of server.client_keys as `Authorization: Bearer <key>`, `x-api-key`, `x-goog-api-key` or `?key=`",
            ))
        }
        ClientKey::InQuery(who) => (who, true),
        ClientKey::NotNeeded => (Who::Anyone, false),
        ClientKey::InHeader(who) => (who, false),
    };
    check_path(rest)?;
    let location_base = location_base(&pool.config, rest)?;
    // The client's own key never goes upstream, wherever it put it.
    let path_and_query = match parts.uri.query() {
        Some(q) if query_key || pool.config.kind.key_in_query() => match without_key_param(q) {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        },
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let body = if upgrade {
        RequestBody::Buffered(Bytes::new())
    } else {
        read_body(body, &parts.headers, s.max_request_body, s.max_upload_body).await?
    };
    Ok(Admitted {
        path_and_query,
        location_base,
        body,
        who,
    })
}

pub(super) fn provider_names(pool: &Pool) -> String {
    let names: Vec<_> = pool
        .providers
        .iter()
        .map(|p| p.config.name.as_str())
        .collect();
    names.join(", ")
}

/// `/{provider}/{rest}` → (provider, "/{rest}"). `rest` keeps its percent-encoding.
pub(super) fn split_path(path: &str) -> Option<(&str, &str)> {
    let trimmed = path.strip_prefix('/')?;
    let (provider, rest) = match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, ""),
    };
    (!provider.is_empty()).then_some((provider, rest))
}

/// Rejects dot segments, also percent-encoded or behind a backslash (URL parsers treat
/// `\\` as `/` in http URLs): once normalised they would move the request outside the
/// upstream's base.
fn check_path(rest: &str) -> Result<(), ProxyError> {
    let dot = |piece: &[u8]| piece == b"." || piece == b"..";
    // Segments split at `/` and at `\`, byte by byte (a request's path is short, and this
    // runs on every request).
    let plain = rest
        .as_bytes()
        .split(|b| *b == b'/' || *b == b'\\')
        .any(dot);
    // Decoded only when it could hide something (`%2e%2e`, `..%2f`, `%5c`).
    let hidden = rest.contains('%')
        && rest.split('/').any(|seg| {
            seg.contains(['%', '+'])
                && percent_decode_lower(seg)
                    .split(['/', '\\'])
                    .any(|p| dot(p.as_bytes()))
        });
    if plain || hidden {
        return Err(ProxyError::new(
            Reason::BadRequest,
            "the path may not contain '.' or '..' segments",
        ));
    }
    Ok(())
}

fn percent_decode_lower(seg: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", seg.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Whether and where the client presented a known key, and whose.
enum ClientKey {
    NotNeeded,
    InHeader(Who),
    /// In `?key=` (Google's convention): removed before the request goes upstream.
    InQuery(Who),
    Missing,
}

fn client_key(clients: &Clients, headers: &HeaderMap, query: Option<&str>) -> ClientKey {
    if !clients.required() {
        return ClientKey::NotNeeded;
    }
    let presented = [
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            }),
        headers.get(&X_API_KEY).and_then(|v| v.to_str().ok()),
        headers.get(&GOOG_API_KEY).and_then(|v| v.to_str().ok()),
    ];
    if let Some(who) = presented
        .into_iter()
        .flatten()
        .find_map(|p| clients.identify(p))
    {
        return ClientKey::InHeader(who);
    }
    let in_query = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| k == "key")
            .find_map(|(_, v)| clients.identify(&v))
    });
    match in_query {
        Some(who) => ClientKey::InQuery(who),
        None => ClientKey::Missing,
    }
}

/// The query without its `key` parameters (the client's key), other parameters kept as
/// sent. `None` when nothing is left.
fn without_key_param(query: &str) -> Option<String> {
    if !query
        .split('&')
        .any(|p| p == "key" || p.starts_with("key="))
    {
        return Some(query.to_string());
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| *p != "key" && !p.starts_with("key="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Reads the request body: buffered up to `limit` (replayable on another credential),
/// streamed beyond it up to `upload_limit`. A body over `upload_limit` is 413 whatever its
/// framing: at once when its `Content-Length` says so, else when it passes the limit
/// (`Upload::overrun` tells the attempt that its failure was the client's).
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    upload_limit: u64,
) -> Result<RequestBody, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > upload_limit) {
        return Err(too_large(upload_limit));
    }
    if declared.is_some_and(|n| n > limit as u64) {
        // An upload: streamed, never buffered whole.
        let (body, overrun) = capped(body, upload_limit);
        return Ok(RequestBody::Streamed(body, overrun));
    }
    // Unknown or small length: buffer up to the replay limit; beyond it, stream on.
    let mut body = body;
    let mut head = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(RequestBody::Buffered(Bytes::from(head))),
            Some(Err(e)) => {
                return Err(ProxyError::new(
                    Reason::BadRequest,
                    format!("could not read the request body: {e}"),
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    head.extend_from_slice(&data);
                }
                if head.len() as u64 > upload_limit {
                    return Err(too_large(upload_limit));
                }
                if head.len() > limit {
                    // What is left of the limit after the bytes already read.
                    let buffered = head.len() as u64;
                    let first = futures_util::stream::once(async move {
                        Ok::<_, axum::Error>(Bytes::from(head))
                    });
                    let (rest, overrun) = capped(body, upload_limit.saturating_sub(buffered));
                    let chained = first.chain(rest.into_data_stream());
                    return Ok(RequestBody::Streamed(Body::from_stream(chained), overrun));
                }
            }
        }
    }
}

pub(super) fn too_large(upload_limit: u64) -> ProxyError {
    ProxyError::new(
        Reason::RequestTooLarge,
        format!("the request body is larger than server.max_upload_body ({upload_limit} bytes)"),
    )
}

/// A streamed body that fails once it passes `limit` bytes, and the flag that says so.
fn capped(body: Body, limit: u64) -> (Body, Overrun) {
    let overrun = Overrun::default();
    let flag = Arc::clone(&overrun.0);
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let body = limited.map_err(move |e| {
        if e.is::<http_body_util::LengthLimitError>() {
            flag.store(true, Ordering::Relaxed);
        }
        axum::Error::new(e)
    });
    (Body::new(body), overrun)
}

/// Set when a streamed request body passed `server.max_upload_body`.
#[derive(Clone, Default)]
pub(super) struct Overrun(Arc<AtomicBool>);

impl Overrun {
    pub(super) fn happened(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body: buffered up to `server.max_request_body` (replayable on another
/// credential), or streamed upstream once (an upload, up to `server.max_upload_body`).
pub(super) enum RequestBody {
    Buffered(Bytes),
    Streamed(Body, Overrun),
}

/// The request headers to forward: everything but client credentials, `Host`,
/// `Content-Length` (recomputed) and hop-by-hop headers.
pub(super) fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let named_in_connection: Vec<HeaderName> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let dropped = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || [
                &header::HOST,
                &header::CONTENT_LENGTH,
                &header::AUTHORIZATION,
                &header::UPGRADE,
                // The body is read (buffered or streaming) before anything goes upstream;
                // the client already had its 100 Continue from tokenrelay.
                &header::EXPECT,
                &X_API_KEY,
                &GOOG_API_KEY,
            ]
            .contains(&name)
            || named_in_connection.contains(name)
    };
    // One pass (a copy, then a removal per name present, cost more: measured).
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if dropped(name) {
            continue;
        }
        if *name == header::ACCEPT_ENCODING {
            out.append(name, readable_encodings(value));
        } else {
            out.append(name, value.clone());
        }
    }
    out
}

/// `Accept-Encoding` narrowed to the codings tokenrelay can read usage through (`gzip`,
/// `deflate`, `identity`; `*` becomes `gzip, deflate`), so that no answer's usage is
/// unreadable because of its encoding: the client still gets a coding it asked for (or
/// none, which every client accepts).
fn readable_encodings(value: &HeaderValue) -> HeaderValue {
    // A client sends the same value on every request: the last answer is kept per thread.
    thread_local! {
        static LAST: std::cell::RefCell<Option<(HeaderValue, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    if let Some(hit) = LAST.with_borrow(|last| {
        last.as_ref()
            .filter(|(seen, _)| seen == value)
            .map(|(_, narrowed)| narrowed.clone())
    }) {
        return hit;
    }
    let narrowed = narrow_encodings(value);
    LAST.set(Some((value.clone(), narrowed.clone())));
    narrowed
}

fn narrow_encodings(value: &HeaderValue) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return HeaderValue::from_static("identity");
    };
    let readable = |coding: &str| {
        ["gzip", "x-gzip", "deflate", "identity"]
            .iter()
            .any(|r| coding.eq_ignore_ascii_case(r))
    };
    let all_readable = text
        .split(',')
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .all(|c| c.is_empty() || readable(c));
    if all_readable {
        return value.clone();
    }
    let listed: Vec<String> = text
        .split(',')
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    let mut kept: Vec<String> = Vec::new();
    for item in text.split(',') {
        let coding = item.split(';').next().unwrap_or("").trim();
        let params = item.find(';').map_or("", |i| &item[i..]);
        if readable(coding) {
            kept.push(item.trim().to_string());
        } else if coding == "*" {
            // `*` stands for what the client did not name: never for one it refused.
            for c in ["gzip", "deflate"] {
                if !listed.iter().any(|l| l == c) {
                    kept.push(format!("{c}{params}"));
                }
            }
        }
    }
    // Nothing acceptable left (every coding kept is refused with q=0): no coding at all.
    let refused = |item: &String| {
        item.split(';').skip(1).any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        })
    };
    if kept.iter().all(refused) {
        return HeaderValue::from_static("identity");
    }
    HeaderValue::from_str(&kept.join(", ")).unwrap_or(HeaderValue::from_static("identity"))
}

/// The upstream base when the provider's upstream has a `{location}` (Vertex AI): the
/// location the path names, if it is one of `locations`, else `global`.
fn location_base(
    provider: &crate::config::ProviderConfig,
    rest: &str,
) -> Result<Option<String>, ProxyError> {
    let Some(template) = &provider.upstream_template else {
        return Ok(None);
    };
    let location = providers::vertex::path_location(rest).unwrap_or("global");
    if !provider.locations.iter().any(|l| l == location) {
        return Err(ProxyError::new(
            Reason::BadRequest,
            format!(
                "location {location:?} is not in providers.{}.locations; add it there to use it",
                provider.name
            ),
        ));
    }
    Ok(Some(providers::vertex::base_for(template, location)))
}

/// The Host the client reached tokenrelay by (the Host rule has vetted it).
pub(super) fn client_host(parts: &Parts) -> &str {
    parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("127.0.0.1")
}

pub(super) fn upstream_uri(base: &str, path_and_query: &str) -> http::Uri {
    let mut uri = String::with_capacity(base.len() + path_and_query.len());
    uri.push_str(base);
    uri.push_str(path_and_query);
    // The base is a validated URL and the path and query came in as a valid request target.
    http::Uri::try_from(uri).unwrap_or_else(|_| http::Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn paths_split_at_the_provider() {
        assert_eq!(
            split_path("/qwen/v1/chat/completions"),
            Some(("qwen", "/v1/chat/completions"))
        );
        assert_eq!(split_path("/gemini"), Some(("gemini", "")));
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn dot_segments_are_refused_even_encoded() {
        assert!(check_path("/v1/../x").is_err());
        assert!(check_path("/v1/%2e%2E/x").is_err());
        assert!(check_path("/v1/%2E/x").is_err());
        assert!(check_path("/v1/..%2fx").is_err());
        assert!(check_path("/v1/..%5Cx").is_err());
        assert!(check_path("/v1/x\\..\\y").is_err());
        assert!(check_path("/v1/models/gemini-2.5:generate").is_ok());
    }

    #[test]
    fn client_credentials_and_hop_by_hop_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer dummy"),
            ("x-api-key", "k"),
            ("x-goog-api-key", "k"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("host", "evil.example"),
            ("content-type", "application/json"),
            ("proxy-authorization", "Basic x"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded_headers(&h);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn the_key_parameter_is_removed_and_the_rest_kept_as_sent() {
        assert_eq!(without_key_param("key=abc"), None);
        assert_eq!(
            without_key_param("alt=sse&key=abc").as_deref(),
            Some("alt=sse")
        );
        assert_eq!(
            without_key_param("key=a&alt=sse&key=b&x=%20").as_deref(),
            Some("alt=sse&x=%20")
        );
        assert_eq!(without_key_param("keys=1").as_deref(), Some("keys=1"));
    }

    #[test]
    fn accept_encoding_keeps_only_codings_whose_usage_can_be_read() {
        let narrowed = |v: &str| readable_encodings(&HeaderValue::from_str(v).unwrap());
        assert_eq!(narrowed("GZIP, Br"), "GZIP");
        assert_eq!(narrowed("GZIP, Br"), "GZIP", "the kept answer");
        assert_eq!(narrowed("gzip, deflate"), "gzip, deflate");
        assert_eq!(narrowed("gzip, deflate, br, zstd"), "gzip, deflate");
        assert_eq!(
            narrowed("br;q=1.0, gzip;q=0.8, *;q=0.1"),
            "gzip;q=0.8, deflate;q=0.1"
        );
        assert_eq!(narrowed("gzip;q=0, *"), "gzip;q=0, deflate");
        assert_eq!(narrowed("br, identity;q=0"), "identity");
        assert_eq!(narrowed("br"), "identity");
        assert_eq!(narrowed("zstd, identity;q=0.5"), "identity;q=0.5");
    }

    #[test]
    fn a_query_key_is_a_client_key() {
        let keys = Clients::new(&[], &[secrecy::SecretString::from("ck-secret".to_string())]);
        let none = HeaderMap::new();
        assert!(matches!(
            client_key(&keys, &none, Some("key=ck-secret")),
            ClientKey::InQuery(Who::Unnamed)
        ));
        assert!(matches!(
            client_key(&keys, &none, Some("key=wrong")),
            ClientKey::Missing
        ));
        assert!(matches!(
            client_key(&Clients::default(), &none, None),
            ClientKey::NotNeeded
        ));
    }
}
