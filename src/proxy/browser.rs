//! Browser safety for both listeners: no web page may use tokenrelay, whether by DNS
//! rebinding (a page whose name re-binds to 127.0.0.1 is same-origin with the answers) or
//! by a cross-site request (a "simple" POST needs no preflight).
//!
//! Rules, checked before routing and before anything is forwarded:
//! - **Host**: on a loopback listener (and on any listener once `server.allowed_hosts` is
//!   set) the `Host` (HTTP/2 `:authority`) must be one of the listener's own names:
//!   `localhost`, `127.0.0.1`, `[::1]`, the listen address, or an `allowed_hosts` entry
//!   (exact, or `*.suffix`), with any port. A non-loopback listener without
//!   `allowed_hosts` is not checked: pod IPs change, and kubelet probes and Prometheus
//!   send them (that listener already needs `client_keys` / `admin_token`).
//! - **Origin**: a request carrying `Origin`, or `Sec-Fetch-Site: cross-site|same-site`,
//!   is refused unless the origin is in `server.allowed_origins` (or, on the admin
//!   listener, is the listener's own origin: the operator page). SDKs and curl send
//!   neither header and are unaffected.
//! - **Preflights** (`OPTIONS` with `Access-Control-Request-Method`) are answered here and
//!   never forwarded; only configured origins are allowed.
//! - **Admin POSTs from a browser** (they always carry `Origin`) must also carry
//!   `X-Tokenrelay: 1`, which no cross-site page can send without a preflight.
//!
//! This module never reads a body and never logs a header value beyond the host name.

use std::net::SocketAddr;

use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::error::{ProxyError, Reason};

/// The header the operator page sends on every admin POST.
pub static CSRF_HEADER: HeaderName = HeaderName::from_static("x-tokenrelay");
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
static SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");

/// Which listener a guard protects: they differ in what same-origin may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Proxy,
    Admin,
}

/// The Host and Origin rules of one listener.
#[derive(Debug, Clone)]
pub struct BrowserGuard {
    listener: Listener,
    /// `None`: Host is not checked (a non-loopback listener without `allowed_hosts`).
    own_hosts: Option<Vec<HostRule>>,
    /// Exact origins (`scheme://host[:port]`, lower case, no trailing slash).
    allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Exact(String),
    /// `*.example.com` admits `a.example.com` and `b.a.example.com`, not `example.com`.
    Suffix(String),
}

/// What the guard decided about a request.
pub enum Verdict {
    /// Serve it; add CORS headers for this allowed origin to the answer.
    Pass(Option<HeaderValue>),
    /// Answer this instead (a refusal, or a preflight answered locally).
    Answer(Response),
}

impl BrowserGuard {
    /// The guard for a listener bound to `addr`. `allowed_hosts` entries are validated by
    /// the config (`config::validate_host_rule`); `allowed_origins` by `config::validate_origin`.
    pub fn new(
        listener: Listener,
        addr: SocketAddr,
        allowed_hosts: &[String],
        allowed_origins: &[String],
    ) -> BrowserGuard {
        let check = addr.ip().is_loopback() || !allowed_hosts.is_empty();
        let own_hosts = check.then(|| {
            let mut rules: Vec<HostRule> = ["localhost", "127.0.0.1", "[::1]"]
                .into_iter()
                .map(|h| HostRule::Exact(h.to_string()))
                .collect();
            let ip = match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            };
            rules.push(HostRule::Exact(ip));
            for h in allowed_hosts {
                let h = h.to_ascii_lowercase();
                rules.push(match h.strip_prefix("*.") {
                    Some(suffix) => HostRule::Suffix(format!(".{suffix}")),
                    None => HostRule::Exact(h),
                });
            }
            rules
        });
        BrowserGuard {
            listener,
            own_hosts,
            allowed_origins: allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Decides about one request from its method, URI and headers.
    pub fn check(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Verdict {
        // HTTP/1.1 carries the name in Host; HTTP/2 in :authority (the URI's authority).
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        if let (Some(rules), Some(host)) = (&self.own_hosts, host) {
            if !host_allowed(rules, host) {
                return Verdict::Answer(self.refuse_host(host));
            }
        }
        let origin = headers.get(header::ORIGIN);
        let Some(origin) = origin else {
            // No Origin: a non-browser client, a same-origin GET, or a navigation. Only a
            // browser's own word that the request is from another site refuses it.
            let site = headers.get(&SEC_FETCH_SITE).map(HeaderValue::as_bytes);
            // A top-level navigation to the operator page (a link, Google's redirect back to
            // the login callback) shows the page; it cannot read an answer. Only `/ui` GETs.
            let navigation = self.listener == Listener::Admin
                && method == Method::GET
                && uri.path().starts_with("/ui")
                && headers.get(&SEC_FETCH_MODE).map(HeaderValue::as_bytes) == Some(b"navigate");
            if !navigation && matches!(site, Some(b"cross-site" | b"same-site")) {
                return Verdict::Answer(refuse_origin(
                    "a cross-site browser request (Sec-Fetch-Site)",
                ));
            }
            return Verdict::Pass(None);
        };
        let origin_str = origin.to_str().unwrap_or("").trim_end_matches('/');
        let configured = self
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin_str));
        let same_origin =
            self.listener == Listener::Admin && host.is_some_and(|h| same_authority(origin_str, h));
        if !configured && !same_origin {
            return Verdict::Answer(refuse_origin(&format!(
                "requests from the web origin {:?}",
                truncate(origin_str)
            )));
        }
        if method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Verdict::Answer(preflight(origin, headers));
        }
        if self.listener == Listener::Admin
            && method != Method::GET
            && method != Method::HEAD
            && headers.get(&CSRF_HEADER).map(HeaderValue::as_bytes) != Some(b"1")
        {
            return Verdict::Answer(
                ProxyError::new(
                    Reason::ForbiddenOrigin,
                    "browser requests that change state must carry `X-Tokenrelay: 1` (the operator page sends it); scripts and the CLI send no Origin and need none",
                )
                .into_response(),
            );
        }
        Verdict::Pass(configured.then(|| origin.clone()))
    }

    fn refuse_host(&self, host: &str) -> Response {
        ProxyError::new(
            Reason::ForbiddenHost,
            format!(
                "the Host {:?} is not one of this listener's names (localhost, 127.0.0.1, [::1], its listen address): a web page may be trying to reach tokenrelay through DNS rebinding. If you reach it by another name (a compose service, an ingress), add that name to server.allowed_hosts",
                truncate(host)
            ),
        )
        .into_response()
    }
}

/// Adds the CORS headers for an allowed origin to an answer.
pub fn allow_origin(resp: &mut Response, origin: HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("origin"));
}

/// The local answer to an allowed origin's preflight.
fn preflight(origin: &HeaderValue, headers: &HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}

fn refuse_origin(what: &str) -> Response {
    ProxyError::new(
        Reason::ForbiddenOrigin,
        format!("{what} are refused: a web page must not spend the pool. To let a browser app use tokenrelay, add its origin (e.g. \"http://localhost:3000\") to server.allowed_origins"),
    )
    .into_response()
}

/// Whether `host` (`name[:port]`) names this listener; the port is not compared (a
/// port-forward or `ssh -L` changes it, and rebinding is about the name).
fn host_allowed(rules: &[HostRule], host: &str) -> bool {
    let name = host_name(host).to_ascii_lowercase();
    rules.iter().any(|r| match r {
        HostRule::Exact(e) => *e == name,
        HostRule::Suffix(s) => name.len() > s.len() && name.ends_with(s.as_str()),
    })
}

/// The name part of `name[:port]`, `[v6]:port` keeping its brackets.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `origin` (`scheme://authority`) has the authority `host` (the Host header).
fn same_authority(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |a: &str| {
        a.strip_suffix(default_port)
            .unwrap_or(a)
            .to_ascii_lowercase()
    };
    strip(authority) == strip(host)
}

/// Names in refusals come from the client: keep them short.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(listener: Listener, addr: &str, hosts: &[&str], origins: &[&str]) -> BrowserGuard {
        let hosts: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
        let origins: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
        BrowserGuard::new(listener, addr.parse().unwrap(), &hosts, &origins)
    }

    fn verdict(g: &BrowserGuard, method: Method, headers: &[(&str, &str)]) -> Option<StatusCode> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        match g.check(&method, &"/x".parse().unwrap(), &h) {
            Verdict::Pass(_) => None,
            Verdict::Answer(r) => Some(r.status()),
        }
    }

    #[test]
    fn loopback_names_pass_with_any_port_and_others_are_refused() {
        let g = guard(Listener::Proxy, "127.0.0.1:8080", &[], &[]);
        for ok in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "127.0.0.1",
        ] {
            assert_eq!(verdict(&g, Method::GET, &[("host", ok)]), None, "{ok}");
        }
        for bad in [
            "attacker.example:8080",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
        ] {
            assert_eq!(
                verdict(&g, Method::GET, &[("host", bad)]),
                Some(StatusCode::MISDIRECTED_REQUEST),
                "{bad}"
            );
        }
    }

    #[test]
    fn allowed_hosts_admit_exact_names_and_suffixes() {
        let g = guard(
            Listener::Admin,
            "127.0.0.1:9090",
            &["tokenrelay", "*.svc.local"],
            &[],
        );
        assert_eq!(
            verdict(&g, Method::GET, &[("host", "tokenrelay:9090")]),
            None
        );
        assert_eq!(verdict(&g, Method::GET, &[("host", "a.b.svc.local")]), None);
        assert!(verdict(&g, Method::GET, &[("host", "svc.local")]).is_some());
        assert!(verdict(&g, Method::GET, &[("host", "evilsvc.local")]).is_some());
    }

    #[test]
    fn a_non_loopback_listener_checks_host_only_with_allowed_hosts() {
        let open = guard(Listener::Admin, "0.0.0.0:9090", &[], &[]);
        assert_eq!(
            verdict(&open, Method::GET, &[("host", "10.1.2.3:9090")]),
            None
        );
        let named = guard(Listener::Admin, "0.0.0.0:9090", &["tokenrelay"], &[]);
        assert!(verdict(&named, Method::GET, &[("host", "10.1.2.3:9090")]).is_some());
    }

    #[test]
    fn origins_are_refused_unless_configured_or_the_admin_listener_itself() {
        let p = guard(
            Listener::Proxy,
            "127.0.0.1:8080",
            &[],
            &["http://localhost:3000"],
        );
        let host = ("host", "127.0.0.1:8080");
        assert_eq!(
            verdict(&p, Method::POST, &[host, ("origin", "http://evil.example")]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            verdict(
                &p,
                Method::POST,
                &[host, ("origin", "http://localhost:3000")]
            ),
            None
        );
        assert_eq!(
            verdict(&p, Method::GET, &[host, ("sec-fetch-site", "cross-site")]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            verdict(&p, Method::GET, &[host, ("sec-fetch-site", "none")]),
            None
        );
        // The proxy has no page of its own: same-origin is not a pass there.
        assert!(verdict(
            &p,
            Method::POST,
            &[host, ("origin", "http://127.0.0.1:8080")]
        )
        .is_some());

        let a = guard(Listener::Admin, "127.0.0.1:9090", &[], &[]);
        let host = ("host", "127.0.0.1:9090");
        let same = ("origin", "http://127.0.0.1:9090");
        assert_eq!(verdict(&a, Method::GET, &[host, same]), None);
        assert_eq!(
            verdict(&a, Method::POST, &[host, same]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            verdict(&a, Method::POST, &[host, same, ("x-tokenrelay", "1")]),
            None
        );
        assert!(verdict(
            &a,
            Method::POST,
            &[
                host,
                ("origin", "http://127.0.0.1:9091"),
                ("x-tokenrelay", "1")
            ]
        )
        .is_some());
    }

    #[test]
    fn preflights_are_answered_locally_for_configured_origins_only() {
        let p = guard(
            Listener::Proxy,
            "127.0.0.1:8080",
            &[],
            &["http://localhost:3000"],
        );
        let pre = [
            ("host", "127.0.0.1:8080"),
            ("access-control-request-method", "POST"),
        ];
        let mut ok = pre.to_vec();
        ok.push(("origin", "http://localhost:3000"));
        assert_eq!(
            verdict(&p, Method::OPTIONS, &ok),
            Some(StatusCode::NO_CONTENT)
        );
        let mut bad = pre.to_vec();
        bad.push(("origin", "http://evil.example"));
        assert_eq!(
            verdict(&p, Method::OPTIONS, &bad),
            Some(StatusCode::FORBIDDEN)
        );
    }
}
