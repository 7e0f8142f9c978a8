//! An HTTPS upstream with a private CA (`server.upstream_ca`), as real deployments have:
//! tokenrelay verifies it and speaks HTTP/2 when the upstream offers it by ALPN.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use crate::helpers::*;

/// A CA and a certificate for 127.0.0.1/localhost signed by it, made with openssl.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tokenrelay test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// An HTTPS server offering h2 and http/1.1; answers the HTTP version and the bearer.
async fn https_upstream(dir: &Path) -> String {
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
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
