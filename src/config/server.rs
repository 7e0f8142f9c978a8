//! `[server]`: the listeners, who may use them (client keys, the admin token, the browser
//! rules' `allowed_hosts` and `allowed_origins`), limits and upstream connection settings.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use super::raw::RawServer;
use super::values::{expand_tilde, parse_size};
use super::{ConfigError, Validator};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub client_keys: Vec<SecretString>,
    pub admin_token: Option<SecretString>,
    pub allow_unauthenticated: bool,
    pub max_request_body: usize,
    /// Bodies larger than `max_request_body` up to this stream upstream unbuffered (uploads)
    /// and are sent once.
    pub max_upload_body: u64,
    /// Extra roots to trust for upstream TLS (a private CA, a test upstream), beside the
    /// web PKI roots.
    pub upstream_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub upstream_connect_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// The longest an idle upstream connection is kept for reuse (the upstream's own
    /// `Keep-Alive: timeout=` shortens it).
    pub upstream_keepalive: Duration,
    pub shutdown_grace: Duration,
    /// Open connections per listener; accepting pauses at the cap.
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Proxy threads: single-threaded runtimes that each serve the connections handed to
    /// them, with their own upstream connection pool.
    pub proxy_threads: usize,
    /// More names the listeners answer to (exact, or `*.suffix`); see `proxy::browser`.
    pub allowed_hosts: Vec<String>,
    /// Web origins whose pages may call tokenrelay (CORS); none by default.
    pub allowed_origins: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.addr(
            "server.listen",
            "TOKENRELAY_LISTEN",
            raw.listen,
            "127.0.0.1:8080",
        )?;
        let admin_listen = self.addr(
            "server.admin_listen",
            "TOKENRELAY_ADMIN_LISTEN",
            raw.admin_listen,
            "127.0.0.1:9090",
        )?;
        let client_keys = raw
            .client_keys
            .iter()
            .enumerate()
            .map(|(i, k)| self.secret(&format!("server.client_keys[{i}]"), k))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_token = match raw.admin_token.as_deref() {
            None | Some("") => None,
            Some(t) => Some(self.secret("server.admin_token", t)?),
        };
        if !listen.ip().is_loopback() && client_keys.is_empty() && !raw.allow_unauthenticated {
            return Err(self.err(
                "server.listen",
                format!("{listen} is reachable from other hosts but `server.client_keys` is empty: anyone could spend your credentials. Set `server.client_keys`, or set `server.allow_unauthenticated = true` if a network policy protects the port"),
            ));
        }
        if !admin_listen.ip().is_loopback() && admin_token.is_none() && !raw.allow_unauthenticated {
            return Err(self.err(
                "server.admin_listen",
                format!("{admin_listen} is reachable from other hosts but `server.admin_token` is empty. Set `server.admin_token`, or set `server.allow_unauthenticated = true` if a network policy protects the port"),
            ));
        }
        for (i, h) in raw.allowed_hosts.iter().enumerate() {
            validate_host_rule(h).map_err(|p| self.err(format!("server.allowed_hosts[{i}]"), p))?;
        }
        for (i, o) in raw.allowed_origins.iter().enumerate() {
            validate_origin(o).map_err(|p| self.err(format!("server.allowed_origins[{i}]"), p))?;
        }
        let max_request_body = match raw.max_request_body.as_deref() {
            None => 32 << 20,
            Some(s) => parse_size(s).map_err(|p| self.err("server.max_request_body", p))?,
        };
        let max_upload_body = match raw.max_upload_body.as_deref() {
            None => 2 << 30,
            Some(s) => parse_size(s).map_err(|p| self.err("server.max_upload_body", p))? as u64,
        };
        let upstream_ca = match raw.upstream_ca.as_deref() {
            None | Some("") => Vec::new(),
            Some(spec) => {
                use rustls_pki_types::pem::PemObject;
                let path =
                    expand_tilde(spec, self.env).map_err(|p| self.err("server.upstream_ca", p))?;
                let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&path)
                    .map_err(|e| {
                        self.err(
                            "server.upstream_ca",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        self.err(
                            "server.upstream_ca",
                            format!("{}: not PEM certificates: {e}", path.display()),
                        )
                    })?;
                if certs.is_empty() {
                    return Err(self.err(
                        "server.upstream_ca",
                        format!("{} holds no CERTIFICATE block", path.display()),
                    ));
                }
                certs
            }
        };
        Ok(ServerConfig {
            upstream_ca,
            max_upload_body,
            listen,
            admin_listen,
            client_keys,
            admin_token,
            allow_unauthenticated: raw.allow_unauthenticated,
            max_request_body,
            upstream_connect_timeout: self.duration(
                "server.upstream_connect_timeout",
                raw.upstream_connect_timeout,
                "10s",
            )?,
            upstream_idle_timeout: self.duration(
                "server.upstream_idle_timeout",
                raw.upstream_idle_timeout,
                "5m",
            )?,
            upstream_keepalive: self.duration(
                "server.upstream_keepalive",
                raw.upstream_keepalive,
                "30s",
            )?,
            shutdown_grace: self.duration("server.shutdown_grace", raw.shutdown_grace, "30s")?,
            max_connections: match raw.max_connections {
                Some(0) => return Err(self.err("server.max_connections", "must be at least 1")),
                n => n.unwrap_or(4096),
            },
            max_header_bytes: match raw.max_header_bytes.as_deref() {
                None => 64 << 10,
                Some(s) => {
                    match parse_size(s).map_err(|p| self.err("server.max_header_bytes", p))? {
                        n if n < 8192 => {
                            return Err(self.err("server.max_header_bytes", "must be at least 8KiB"))
                        }
                        n => n,
                    }
                }
            },
            max_headers: match raw.max_headers {
                Some(0) => return Err(self.err("server.max_headers", "must be at least 1")),
                n => n.unwrap_or(100),
            },
            proxy_threads: match raw.proxy_threads {
                Some(0) => return Err(self.err("server.proxy_threads", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout,
                "10s",
            )?,
            allowed_hosts: raw.allowed_hosts,
            allowed_origins: raw.allowed_origins,
        })
    }
}

/// Validates an `allowed_hosts` entry: a host name or IP literal without port or
/// scheme, optionally `*.` followed by a suffix.
pub fn validate_host_rule(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && !name.contains('*')
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        })
        && (name.starts_with('[') || !name.contains(':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{h:?} is not a host name: give a name like \"tokenrelay\" or \"*.svc.cluster.local\", without scheme or port"
        ))
    }
}

/// Validates an `allowed_origins` entry: `scheme://host[:port]`, nothing else.
pub fn validate_origin(o: &str) -> Result<(), String> {
    let Ok(url) = url::Url::parse(o) else {
        return Err(format!(
            "{o:?} is not an origin: write it as the browser sends it, e.g. \"http://localhost:3000\""
        ));
    };
    let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
    if !matches!(url.scheme(), "http" | "https")
        || url.host().is_none()
        || !url.username().is_empty()
        || !bare
        || o.trim_end_matches('/').ends_with('/')
    {
        return Err(format!(
            "{o:?} is not an origin: only scheme://host[:port], e.g. \"http://localhost:3000\" (\"*\" is not allowed: it would let every web page spend the pool)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_are_validated() {
        assert!(validate_host_rule("tokenrelay").is_ok());
        assert!(validate_host_rule("*.svc.cluster.local").is_ok());
        assert!(validate_host_rule("[::1]").is_ok());
        for bad in ["", "*", "a:80", "http://x", "*.*.x", "a b"] {
            assert!(validate_host_rule(bad).is_err(), "{bad}");
        }
        assert!(validate_origin("http://localhost:3000").is_ok());
        assert!(validate_origin("https://chat.example.com").is_ok());
        for bad in ["*", "localhost:3000", "http://x/path", "ftp://x", "null"] {
            assert!(validate_origin(bad).is_err(), "{bad}");
        }
    }
}
