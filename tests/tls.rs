//! An HTTPS upstream with a private CA (`server.upstream_ca`), as real deployments have:
//! tokenrelay verifies it and speaks HTTP/2 when the upstream offers it by ALPN.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use crate::helpers::*;

/// A CA and a certificate for 127.0.0.1/localhost signed by it (`scripts/test-ca.sh`).
pub fn make_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-ca.sh");
    let out = Command::new(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/test-ca.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTPS server offering h2 and http/1.1; answers the HTTP version and the bearer.
async fn https_upstream(dir: &Path) -> String {
    https_upstream_with(dir, &[b"h2", b"http/1.1"], Arc::default()).await
}

/// A TLS acceptor with the leaf certificate `make_certs` wrote into `dir`, offering `alpn`.
pub fn acceptor(dir: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS server offering `alpn`, counting the connections it accepts in `accepted`.
async fn https_upstream_with(
    dir: &Path,
    alpn: &[&[u8]],
    accepted: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    let acceptor = acceptor(dir, alpn);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = json!({"version": format!("{:?}", req.version()),
                        "authorization": req.headers().get("authorization").and_then(|v| v.to_str().ok())});
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body.to_string())),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_verified_and_spoken_to_over_http2() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let upstream = https_upstream(certs.path()).await;
    let launch = |ca: Option<&Path>| {
        let upstream = upstream.clone();
        let ca = ca
            .map(|p| format!("upstream_ca = \"{}\"\n", p.display()))
            .unwrap_or_default();
        async move {
            let mut t = TestApp::empty().await;
            t.launch(&format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{ca}[providers.dashscope]\nupstream = \"{upstream}\"\napi_keys = [\"sk-tls\"]"
            ))
            .await;
            t
        }
    };
    let trusted = launch(Some(&certs.path().join("ca.pem"))).await;
    for _ in 0..3 {
        let resp = trusted
            .http
            .get(format!("{}/dashscope/v1/models", trusted.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v["version"], "HTTP/2.0",
            "HTTP/2 where the upstream offers it"
        );
        assert_eq!(v["authorization"], "Bearer sk-tls");
    }
    // Without the CA the certificate is refused: no request goes out unverified.
    let untrusted = launch(None).await;
    let resp = untrusted
        .http
        .get(format!("{}/dashscope/v1/models", untrusted.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    // A file that holds no certificate is a config error naming the key.
    let bad = certs.path().join("leaf.key");
    let err = tokenrelay::Config::from_toml(
        &format!("[server]\nupstream_ca = \"{}\"", bad.display()),
        "t.toml",
        &|_| None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("server.upstream_ca"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_http1_upstream_is_spoken_to_over_one_reused_connection() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = https_upstream_with(certs.path(), &[b"http/1.1"], Arc::clone(&accepted)).await;
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nproxy_threads = 1\nupstream_ca = \"{}\"\n[providers.dashscope]\nupstream = \"{upstream}\"\napi_keys = [\"sk-tls\"]",
        certs.path().join("ca.pem").display()
    ))
    .await;
    for _ in 0..10 {
        let resp = t
            .http
            .get(format!("{}/dashscope/v1/models", t.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["authorization"], "Bearer sk-tls");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "ten sequential requests, one pooled TLS connection"
    );
}
