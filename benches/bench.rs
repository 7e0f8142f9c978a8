//! tokenrelay against the physical limit (no proxy) and nginx, side by side in one run.
//!
//! Run with `scripts/bench.sh` (it installs nginx and oha, raises the file limit and builds
//! in release mode). This binary starts a fast fake upstream and token endpoint in-process,
//! nginx and tokenrelay as processes, drives them with `oha` (open loop, latency
//! correction) and its own clients, prints one table and writes `docs/benchmarks.md`.
//! Figures are from a shared, noisy machine: compare the ratios, measured side by side.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

#[path = "support/peers.rs"]
mod peers;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const SMALL: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}"#;
/// The same answer with OpenAI-style usage (`/v1/usage/...`).
const SMALL_USAGE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;

/// The fake upstream: a small JSON answer, or an SSE stream whose first event is sent at
/// once and the rest every 100 ms (`/v1/sse?events=N`).
async fn upstream(req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    // Drain the request body so the connection can be reused.
    let _ = req.into_body().collect().await;
    if path.ends_with("/sse") {
        let events: usize = query
            .strip_prefix("events=")
            .and_then(|n| n.parse().ok())
            .unwrap_or(3);
        let stream = futures_util::stream::unfold(0, move |i| async move {
            if i == events {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let frame = Frame::data(Bytes::from(format!("data: {{\"i\":{i}}}\n\n")));
            Some((Ok::<_, Infallible>(frame), i + 1))
        });
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap());
    }
    let body = if path.contains("/usage/") {
        SMALL_USAGE
    } else {
        SMALL
    };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        .unwrap())
}

/// The fake token endpoint: counts calls, answers after 50 ms (so a storm overlaps it).
async fn token_endpoint(
    calls: Arc<AtomicUsize>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let _ = req.into_body().collect().await;
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let body = json!({"access_token": format!("bench-access-{n}"), "expires_in": 3600, "token_type": "Bearer"});
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap())
}

async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(handler))
                    .await;
            });
        }
    });
    addr
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_creds(dir: &Path, n: usize, expires_at_ms: i64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let doc = json!({"access_token": format!("bench-{i}"), "refresh_token": format!("rt-{i}"), "expiry_date": expires_at_ms});
        std::fs::write(dir.join(format!("c{i:03}.json")), doc.to_string()).unwrap();
    }
}

/// Starts tokenrelay (release build) with `n` credentials expiring at `expires_at_ms`.
fn tokenrelay(
    bin: &Path,
    work: &Path,
    name: &str,
    upstream: SocketAddr,
    token: SocketAddr,
    n: usize,
    expires_at_ms: i64,
) -> (Proc, u16, u16) {
    let creds = work.join(format!("{name}-creds"));
    write_creds(&creds, n, expires_at_ms);
    tokenrelay_with(bin, work, name, upstream, token, &creds, "")
}

/// Starts tokenrelay over the credentials in `creds`, with `extra` TOML (e.g. `[store]`).
fn tokenrelay_with(
    bin: &Path,
    work: &Path,
    name: &str,
    upstream: SocketAddr,
    token: SocketAddr,
    creds: &Path,
    extra: &str,
) -> (Proc, u16, u16) {
    let provider = format!(
        "[refresh]\nmin_validity = \"60s\"\n{extra}\n[providers.bench]\nupstream = \"http://{upstream}\"\ntoken_url = \"http://{token}/token\"\nclient_id = \"bench\"\ncredentials = [\"{}\"]\n",
        creds.display()
    );
    spawn_tokenrelay(bin, work, name, &provider)
}

/// Starts tokenrelay with a pool of `n` static API keys (an `api_keys_file`), with
/// declared limits (`[providers.bench.limits]`, high enough never to refuse: every request
/// is counted) when `limits`.
fn tokenrelay_keys(
    bin: &Path,
    work: &Path,
    name: &str,
    upstream: SocketAddr,
    n: usize,
    limits: bool,
) -> (Proc, u16) {
    let keys = work.join(format!("{name}-keys.txt"));
    let lines: String = (0..n).map(|i| format!("bench-key-{i:04}\n")).collect();
    std::fs::write(&keys, lines).unwrap();
    let mut provider = format!(
        "[providers.bench]\nupstream = \"http://{upstream}\"\napi_keys_file = \"{}\"\n",
        keys.display()
    );
    if limits {
        provider.push_str(
            "[providers.bench.limits]\n\"bench-model\" = { rpm = 1000000000, rpd = 1000000000, tpm = 1000000000000 }\n\"*\" = { rpm = 1000000000, rpd = 1000000000 }\n",
        );
    }
    let (p, port, _) = spawn_tokenrelay(bin, work, name, &provider);
    (p, port)
}

/// Writes `{name}.toml` (listeners on free ports, then `rest`) and starts the release
/// binary on it; returns once both ports answer.
fn spawn_tokenrelay(bin: &Path, work: &Path, name: &str, rest: &str) -> (Proc, u16, u16) {
    spawn_tokenrelay_logged(bin, work, name, rest, "warn")
}

/// `spawn_tokenrelay` at log level `log` (its log goes to `{name}.log`).
fn spawn_tokenrelay_logged(
    bin: &Path,
    work: &Path,
    name: &str,
    rest: &str,
    log: &str,
) -> (Proc, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nmax_connections = 20000\n{rest}"),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("TOKENRELAY_LOG", log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("{name}.log"))).unwrap())
        .spawn()
        .expect("tokenrelay binary");
    wait_port(port);
    wait_port(admin);
    (Proc(child), port, admin)
}

fn nginx(work: &Path, upstream: SocketAddr) -> (Proc, u16) {
    nginx_with(work, "nginx", upstream, None, false)
}

/// nginx proxying to `upstream` with keep-alive: over HTTPS verified against `ca` when
/// given (nginx speaks HTTP/1.1 to upstreams), with an access log file when `log`.
fn nginx_with(
    work: &Path,
    name: &str,
    upstream: SocketAddr,
    ca: Option<&Path>,
    log: bool,
) -> (Proc, u16) {
    let port = free_port();
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    let access_log = if log {
        format!("access_log {}/access.log;", dir.display())
    } else {
        "access_log off;".to_string()
    };
    let (scheme, tls) = match ca {
        Some(ca) => (
            "https",
            format!(
                "proxy_ssl_trusted_certificate {};\n      proxy_ssl_verify on;\n      proxy_ssl_name localhost;\n      proxy_ssl_server_name on;\n      proxy_ssl_session_reuse on;",
                ca.display()
            ),
        ),
        None => ("http", String::new()),
    };
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes auto;
daemon off;
pid {pid};
error_log {dir}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  {access_log}
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream fake {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass {scheme}://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token";
      proxy_buffering off;
      {tls}
    }}
  }}
}}
"#,
            pid = dir.join("nginx.pid").display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (scripts/bench.sh installs it)");
    wait_port(port);
    (Proc(child), port)
}

/// The processes of nginx `master` (its workers are its children).
fn nginx_pids(master: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    std::iter::once(master)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

/// A CA and a certificate for localhost / 127.0.0.1 (`scripts/test-ca.sh`, openssl).
fn make_certs(root: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new(root.join("scripts/test-ca.sh"))
        .arg(dir)
        .status()
        .expect("scripts/test-ca.sh (needs openssl)")
        .success();
    assert!(ok, "scripts/test-ca.sh failed");
}

/// The fake upstream over TLS, offering `alpn` (HTTP/2 is detected from the preface).
async fn serve_tls(certs: &Path, alpn: &[&[u8]]) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(certs.join("leaf.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(certs.join("leaf.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(upstream))
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy, Default)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    rps: f64,
}

/// One oha run: `rate` requests/s open loop (with latency correction) or, with `None`, as
/// fast as possible. Latencies in milliseconds.
fn oha(url: &str, rate: Option<u32>, secs: u32, connections: u32) -> Latency {
    oha_req(
        url,
        rate,
        secs,
        connections,
        r#"{"model":"bench","messages":[]}"#,
        None,
    )
}

/// `oha` with a body of its own and, when given, a client key.
fn oha_req(
    url: &str,
    rate: Option<u32>,
    secs: u32,
    connections: u32,
    body: &str,
    key: Option<&str>,
) -> Latency {
    let mut cmd = Command::new("oha");
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{secs}s"),
        "-c",
        &connections.to_string(),
    ]);
    cmd.args([
        "-m",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("authorization: Bearer {k}")]);
    }
    if let Some(q) = rate {
        cmd.args(["-q", &q.to_string(), "--latency-correction"]);
    }
    if url.starts_with("https:") {
        // The direct path to the HTTPS fake upstream (its CA is the test CA).
        cmd.arg("--insecure");
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("oha (scripts/bench.sh installs it)");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert!(
        ok > 0 && ok == total,
        "{url}: non-200 answers: {}",
        v["statusCodeDistribution"]
    );
    Latency {
        p50: ms("p50"),
        p99: ms("p99"),
        p999: ms("p99.9"),
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
    }
}

/// Time from sending a request to the first SSE event, over `n` sequential requests on a
/// kept-alive connection: (median, p99) in milliseconds.
async fn first_event(url: &str, n: usize) -> (f64, f64) {
    first_event_as(url, n, None).await
}

/// `first_event` with a client key, when given.
async fn first_event_as(url: &str, n: usize, key: Option<&str>) -> (f64, f64) {
    let client = reqwest::Client::new();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let mut req = client.post(url).body("{}");
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let mut r = req.send().await.unwrap();
        let first = r.chunk().await.unwrap().expect("an event");
        assert!(first.starts_with(b"data:"));
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        while r.chunk().await.unwrap().is_some() {}
    }
    samples.sort_by(f64::total_cmp);
    (samples[n / 2], samples[(n * 99 / 100).min(n - 1)])
}

/// RSS of `pids` (MB) with `n` SSE streams open through `url`, after one second.
fn rss_with_streams(rt: &tokio::runtime::Runtime, url: &str, pids: &[u32], n: usize) -> f64 {
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut open = Vec::new();
        for _ in 0..n {
            let c = client.clone();
            let u = url.to_string();
            open.push(tokio::spawn(async move {
                let mut r = c.post(u).body("{}").send().await.unwrap();
                r.chunk().await.unwrap();
                r
            }));
        }
        let mut streams = Vec::new();
        for o in open {
            streams.push(o.await.unwrap());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = pids.iter().map(|p| rss_mb(*p)).sum();
        drop(streams);
        rss
    })
}

/// One path's figures at 1,000/s and at saturation.
struct Measured {
    name: String,
    at_rate: Latency,
    rps: f64,
}

fn measure(name: &str, url: &str, secs: u32) -> Measured {
    let _ = oha(url, Some(500), 1, 8);
    let at_rate = oha(url, Some(1000), secs, 64);
    let rps = oha(url, None, secs, 64).rps;
    eprintln!(
        "{name}: p50 {:.3} ms p99 {:.3} ms at 1000/s, saturation {rps:.0} req/s",
        at_rate.p50, at_rate.p99
    );
    Measured {
        name: name.to_string(),
        at_rate,
        rps,
    }
}

/// What real deployments do: HTTPS upstreams (HTTP/1.1 and HTTP/2), access logs on, and
/// memory per open stream for nginx and tokenrelay. Returns its part of the report.
#[allow(clippy::too_many_arguments)]
fn deployments(
    root: &Path,
    bin: &Path,
    work: &Path,
    fakes: &tokio::runtime::Runtime,
    rt: &tokio::runtime::Runtime,
    up: SocketAddr,
    secs: u32,
    main: ((u32, u16), (u32, u16)),
) -> String {
    let ((tr_pid, tr_port), (ng_master, ng_port)) = main;
    let mut s = String::new();
    let certs = work.join("certs");
    make_certs(root, &certs);
    let ca = certs.join("ca.pem");
    let (tls_h2, tls_h1) = fakes.block_on(async {
        (
            serve_tls(&certs, &[b"h2", b"http/1.1"]).await,
            serve_tls(&certs, &[b"http/1.1"]).await,
        )
    });
    let keyed = |upstream: &str| {
        format!(
            "upstream_ca = \"{}\"\n[providers.bench]\nupstream = \"{upstream}\"\napi_keys = [\"bench-key\"]\n",
            ca.display()
        )
    };
    let (_ng_tls, ng_tls_port) = nginx_with(work, "nginx-tls", tls_h1, Some(&ca), false);
    let (_t1, t1_port, _) = spawn_tokenrelay(
        bin,
        work,
        "tls-h1",
        &keyed(&format!("https://localhost:{}", tls_h1.port())),
    );
    let (_t2, t2_port, _) = spawn_tokenrelay(
        bin,
        work,
        "tls-h2",
        &keyed(&format!("https://localhost:{}", tls_h2.port())),
    );
    let path = "/v1/chat/completions";
    let https = [
        measure(
            "direct (HTTPS)",
            &format!("https://localhost:{}{path}", tls_h1.port()),
            secs,
        ),
        measure(
            "nginx → HTTPS, HTTP/1.1 keep-alive",
            &format!("http://127.0.0.1:{ng_tls_port}{path}"),
            secs,
        ),
        measure(
            "tokenrelay → HTTPS, HTTP/1.1",
            &format!("http://127.0.0.1:{t1_port}/bench{path}"),
            secs,
        ),
        measure(
            "tokenrelay → HTTPS, HTTP/2",
            &format!("http://127.0.0.1:{t2_port}/bench{path}"),
            secs,
        ),
    ];
    let _ = writeln!(
        s,
        "## HTTPS upstream
"
    );
    let _ = writeln!(s, "The fake upstream behind TLS (a P-256 certificate from a throwaway CA, trusted through `server.upstream_ca` and nginx's `proxy_ssl_trusted_certificate`). nginx speaks HTTP/1.1 with keep-alive to upstreams (it has no HTTP/2 to upstreams); tokenrelay is measured against an upstream that offers only HTTP/1.1 and one that offers HTTP/2 (one multiplexed connection per proxy thread).\n");
    let _ = writeln!(
        s,
        "| path | p50 at 1000/s | p99 at 1000/s | added p50 | added p99 | saturation req/s | vs nginx |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for m in &https {
        let d = &https[0];
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2}× |",
            m.name,
            m.at_rate.p50,
            m.at_rate.p99,
            m.at_rate.p50 - d.at_rate.p50,
            m.at_rate.p99 - d.at_rate.p99,
            m.rps,
            ratio(m.rps, https[1].rps)
        );
    }
    let _ = writeln!(s, "\nThe direct row's tail is oha's own TLS client under load (its decryption shares the cores): an added p99 against it may be negative and says nothing; compare the proxies' p99 with each other.");

    // Per-request access logs: nginx `access_log` to a file, tokenrelay at `info` (one
    // line per request) to a file; next to both without.
    let (_ng_log, ng_log_port) = nginx_with(work, "nginx-log", up, None, true);
    let plain =
        format!("[providers.bench]\nupstream = \"http://{up}\"\napi_keys = [\"bench-key\"]\n");
    let (_t_quiet, t_quiet_port, _) = spawn_tokenrelay(bin, work, "quiet", &plain);
    let (_t_log, t_log_port, _) = spawn_tokenrelay_logged(bin, work, "logged", &plain, "info");
    let logs = [
        measure(
            "nginx, access_log off",
            &format!("http://127.0.0.1:{ng_port}{path}"),
            secs,
        ),
        measure(
            "nginx, access_log to a file",
            &format!("http://127.0.0.1:{ng_log_port}{path}"),
            secs,
        ),
        measure(
            "tokenrelay, log level warn",
            &format!("http://127.0.0.1:{t_quiet_port}/bench{path}"),
            secs,
        ),
        measure(
            "tokenrelay, log level info (a line per request) to a file",
            &format!("http://127.0.0.1:{t_log_port}/bench{path}"),
            secs,
        ),
    ];
    let _ = writeln!(s, "\n## Access logs\n");
    let _ = writeln!(
        s,
        "| path | p50 at 1000/s | p99 at 1000/s | saturation req/s | vs nginx with its log |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for m in &logs {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.0} | {:.2}× |",
            m.name,
            m.at_rate.p50,
            m.at_rate.p99,
            m.rps,
            ratio(m.rps, logs[1].rps)
        );
    }

    // Memory per open stream, both proxies, with 1,000 and with 10,000 streams (long
    // enough to outlast the opening of all of them).
    let ng_pids = nginx_pids(ng_master);
    let mut rows = Vec::new();
    for n in [1000usize, 10_000] {
        let events = if n > 1000 { 600 } else { 100 };
        let ng_idle: f64 = ng_pids.iter().map(|p| rss_mb(*p)).sum();
        let ng_streams = rss_with_streams(
            rt,
            &format!("http://127.0.0.1:{ng_port}/v1/sse?events={events}"),
            &ng_pids,
            n,
        );
        std::thread::sleep(Duration::from_secs(3));
        let tr_idle = rss_mb(tr_pid);
        let tr_streams = rss_with_streams(
            rt,
            &format!("http://127.0.0.1:{tr_port}/bench/v1/sse?events={events}"),
            &[tr_pid],
            n,
        );
        std::thread::sleep(Duration::from_secs(3));
        eprintln!("{n} streams: nginx {ng_idle:.1} → {ng_streams:.1} MB, tokenrelay {tr_idle:.1} → {tr_streams:.1} MB");
        rows.push(("nginx", n, ng_idle, ng_streams));
        rows.push(("tokenrelay", n, tr_idle, tr_streams));
    }
    let _ = writeln!(s, "\n## Memory per open stream\n");
    let _ = writeln!(s, "Concurrent SSE streams held open through each proxy (nginx: master and workers summed), measured one second after the last stream opened.\n");
    let _ = writeln!(
        s,
        "| proxy | streams | RSS before (MB) | RSS with the streams (MB) | per stream (KB) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (name, n, before, during) in rows {
        let _ = writeln!(
            s,
            "| {name} | {n} | {before:.1} | {during:.1} | {:.1} |",
            (during - before) * 1024.0 / n as f64
        );
    }
    s.push('\n');
    s
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 3 } else { 10 };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/tokenrelay");
    assert!(bin.is_file(), "build it first: cargo build --release");
    let work = tempfile::tempdir().unwrap();
    let work = work.path().to_path_buf();

    // The fakes get their own runtime and one thread, like a separate upstream host.
    let fakes = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (up, tok) = fakes.block_on(async {
        let c = Arc::clone(&calls);
        (
            serve(upstream).await,
            serve(move |r| token_endpoint(Arc::clone(&c), r)).await,
        )
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    if std::env::args().any(|a| a == "--usage") {
        // Only the accounting rows, printed.
        let rows = accounting(&bin, &work, &rt, up, secs, quick);
        let mut s = String::new();
        accounting_rows(&mut s, &rows);
        println!("{s}");
        return;
    }
    if std::env::args().any(|a| a == "--keys") {
        // Only the key-pool rows (1 key, 1,000 keys, 1,000 keys with limits), printed.
        let keys = key_pools(&bin, &work, up, secs);
        let mut s = String::new();
        key_rows(&mut s, &keys);
        println!("{s}");
        return;
    }
    let (tr, tr_port, _) = tokenrelay(&bin, &work, "main", up, tok, 1, now + 3_600_000);
    let (nginx_proc, ng_port) = nginx(&work, up);
    if std::env::args().any(|a| a == "--serve") {
        // For profiling: print where things are and keep them up.
        println!(
            "upstream http://{up} tokenrelay http://127.0.0.1:{tr_port}/bench pid {} nginx http://127.0.0.1:{ng_port} master pid {}",
            tr.0.id(),
            nginx_proc.0.id()
        );
        std::thread::sleep(Duration::from_secs(1800));
        return;
    }
    let paths = [
        ("direct", format!("http://{up}")),
        ("nginx", format!("http://127.0.0.1:{ng_port}")),
        ("tokenrelay", format!("http://127.0.0.1:{tr_port}/bench")),
    ];
    // Warm up every path (connections, caches).
    for (_, base) in &paths {
        let _ = oha(&format!("{base}/v1/chat/completions"), Some(500), 1, 8);
    }

    let rates: &[u32] = if quick { &[1000] } else { &[1000, 4000] };
    let mut fixed: Vec<(u32, [Latency; 3])> = Vec::new();
    for &rate in rates {
        let mut row = [Latency::default(); 3];
        for (i, (name, base)) in paths.iter().enumerate() {
            row[i] = oha(&format!("{base}/v1/chat/completions"), Some(rate), secs, 64);
            eprintln!(
                "{rate} req/s {name}: p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms",
                row[i].p50, row[i].p99, row[i].p999
            );
        }
        fixed.push((rate, row));
    }
    let mut max = [0.0f64; 3];
    for (i, (name, base)) in paths.iter().enumerate() {
        max[i] = oha(&format!("{base}/v1/chat/completions"), None, secs, 64).rps;
        eprintln!("saturation {name}: {:.0} req/s", max[i]);
    }
    // The proxy users would otherwise pick, at a rate its one worker sustains.
    let peer_rate = 50;
    let litellm = peers::litellm(root, &work, up);
    let mut peer_paths = vec![
        ("direct", format!("http://{up}/v1/chat/completions")),
        (
            "nginx",
            format!("http://127.0.0.1:{ng_port}/v1/chat/completions"),
        ),
    ];
    if let Some((_, port)) = &litellm {
        peer_paths.push((
            "LiteLLM proxy (1 worker)",
            format!("http://127.0.0.1:{port}/v1/chat/completions"),
        ));
    }
    peer_paths.push((
        "tokenrelay",
        format!("http://127.0.0.1:{tr_port}/bench/v1/chat/completions"),
    ));
    let peer_rows = peers::compare(&peer_paths, peer_rate, secs);
    drop(litellm);
    let keys = key_pools(&bin, &work, up, secs);
    let usage = accounting(&bin, &work, &rt, up, secs, quick);
    // Fleet mode: the request path with the Redis store (no Redis call per request) next
    // to the file store, then a refresh storm on three replicas sharing one credential.
    let redis_port = free_port();
    let _redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/bench.sh installs it)"),
    );
    wait_port(redis_port);
    let store = format!("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{redis_port}\"");
    let mut stores = Vec::new();
    for (label, extra) in [("file", String::new()), ("redis", store.clone())] {
        let creds = work.join(format!("store-{label}-creds"));
        write_creds(&creds, 1, now + 3_600_000);
        let (p, port, _) = tokenrelay_with(
            &bin,
            &work,
            &format!("store-{label}"),
            up,
            tok,
            &creds,
            &extra,
        );
        let url = format!("http://127.0.0.1:{port}/bench/v1/chat/completions");
        let _ = oha(&url, Some(500), 1, 8);
        let at_rate = oha(&url, Some(1000), secs, 64);
        let sat = oha(&url, None, secs, 64).rps;
        eprintln!(
            "{label} store: p50 {:.3} ms p99 {:.3} ms at 1000/s, saturation {sat:.0} req/s",
            at_rate.p50, at_rate.p99
        );
        stores.push((label, at_rate, sat));
        drop(p);
    }
    let fleet_creds = work.join("fleet-creds");
    let soon_fleet = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 30_000;
    write_creds(&fleet_creds, 1, soon_fleet);
    let replicas: Vec<(Proc, u16, u16)> = (0..3)
        .map(|i| {
            tokenrelay_with(
                &bin,
                &work,
                &format!("fleet{i}"),
                up,
                tok,
                &fleet_creds,
                &store,
            )
        })
        .collect();
    let before_fleet = calls.load(Ordering::SeqCst);
    let fleet_n = if quick { 600 } else { 3000 };
    let fleet_ok = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..fleet_n * 3)
            .map(|i| {
                let c = client.clone();
                let u = format!(
                    "http://127.0.0.1:{}/bench/v1/chat/completions",
                    replicas[i % 3].1
                );
                tokio::spawn(async move {
                    c.post(u)
                        .body("{}")
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false)
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        ok
    });
    let fleet_calls = calls.load(Ordering::SeqCst) - before_fleet;
    eprintln!(
        "fleet storm: {fleet_calls} token-endpoint calls for 3 replicas, {fleet_ok}/{} ok",
        fleet_n * 3
    );
    drop(replicas);
    let fleet = (stores, fleet_calls, fleet_ok, fleet_n * 3);
    let mut sse = [(0.0, 0.0); 3];
    for (i, (name, base)) in paths.iter().enumerate() {
        sse[i] = rt.block_on(first_event(
            &format!("{base}/v1/sse?events=2"),
            if quick { 50 } else { 200 },
        ));
        eprintln!(
            "SSE first event {name}: median {:.3} ms p99 {:.3} ms",
            sse[i].0, sse[i].1
        );
    }

    // Memory: idle with 100 credentials, then with 1,000 streams open.
    let (idle, idle_port, _) = tokenrelay(&bin, &work, "idle", up, tok, 100, now + 3_600_000);
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = rss_mb(idle.0.id());
    let rss_streams = rss_with_streams(
        &rt,
        &format!("http://127.0.0.1:{idle_port}/bench/v1/sse?events=100"),
        &[idle.0.id()],
        1000,
    );
    eprintln!("RSS: idle {rss_idle:.1} MB, 1000 streams {rss_streams:.1} MB");
    drop(idle);

    // Refresh storm: 10,000 concurrent requests on a token too close to expiry to attach
    // (30 s left, min_validity 60 s): every request needs the inline refresh, and the
    // background refresh (due halfway, in 15 s) has not run yet.
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 30_000;
    let (storm, storm_port, _) = tokenrelay(&bin, &work, "storm", up, tok, 1, soon);
    let before = calls.load(Ordering::SeqCst);
    let storm_n = 10_000;
    let (storm_p99, storm_ok) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{storm_port}/bench/v1/chat/completions");
        let tasks: Vec<_> = (0..storm_n)
            .map(|_| {
                let c = client.clone();
                let u = url.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let ok = c
                        .post(u)
                        .body("{}")
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false);
                    (started.elapsed().as_secs_f64() * 1000.0, ok)
                })
            })
            .collect();
        let mut lat = Vec::new();
        let mut ok = 0;
        for t in tasks {
            let (l, o) = t.await.unwrap();
            lat.push(l);
            ok += usize::from(o);
        }
        lat.sort_by(f64::total_cmp);
        (lat[lat.len() * 99 / 100], ok)
    });
    let storm_calls = calls.load(Ordering::SeqCst) - before;
    eprintln!(
        "storm: {storm_calls} token-endpoint calls, {storm_ok}/{storm_n} ok, p99 {storm_p99:.1} ms"
    );
    drop(storm);
    let real = peers::section(&peer_rows, peer_rate)
        + &deployments(
            root,
            &bin,
            &work,
            &fakes,
            &rt,
            up,
            secs,
            ((tr.0.id(), tr_port), (nginx_proc.0.id(), ng_port)),
        );
    drop(tr);

    let report = report(
        &fixed,
        &max,
        &keys,
        &usage,
        &fleet,
        &sse,
        rss_idle,
        rss_streams,
        storm_calls,
        storm_ok,
        storm_n,
        storm_p99,
        quick,
        &real,
    );
    println!("{report}");
    if !quick {
        let docs = root.join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("benchmarks.md"), report).unwrap();
        eprintln!("written to docs/benchmarks.md");
    }
}

/// One accounting row: what was on, latency at 1,000/s, saturation (best of two rounds),
/// SSE first event (median, p99).
type UsageRow = (&'static str, Latency, f64, (f64, f64));

/// Accounting side by side, one key each: answers not metered (the request names no
/// model: nothing is scanned or counted), usage metered (every answer scanned, counted in
/// metrics and the ledger, written to SQLite every second), and metered with three named
/// clients whose limits (rpm, tpm, a day and a month budget) are checked and spent on
/// every request. Saturation rounds alternate between the three so that machine noise
/// falls on all of them.
fn accounting(
    bin: &Path,
    work: &Path,
    rt: &tokio::runtime::Runtime,
    up: SocketAddr,
    secs: u32,
    quick: bool,
) -> Vec<UsageRow> {
    const CLIENTS: &str = r#"
[[clients]]
name = "bot-a"
key = "ck-bench-a"
rpm = 100000000
tpm = 100000000000
tokens_per_day = 100000000000
tokens_per_month = 100000000000
[[clients]]
name = "bot-b"
key = "ck-bench-b"
rpm = 100000000
[[clients]]
name = "bot-c"
key = "ck-bench-c"
tokens_per_day = 100000000000
"#;
    let configs: [(&'static str, &str, Option<&str>, &str); 3] = [
        (
            "not metered (no model named)",
            r#"{"messages":[]}"#,
            None,
            "",
        ),
        (
            "usage metered",
            r#"{"model":"bench","messages":[]}"#,
            None,
            "",
        ),
        (
            "usage metered, 3 clients with limits",
            r#"{"model":"bench","messages":[]}"#,
            Some("ck-bench-a"),
            CLIENTS,
        ),
    ];
    let procs: Vec<(Proc, u16)> = configs
        .iter()
        .enumerate()
        .map(|(i, (_, _, _, clients))| {
            let name = format!("usage{i}");
            let rest = format!(
                "[usage]\npath = \"{}\"\n{clients}\n[providers.bench]\nupstream = \"http://{up}\"\napi_keys = [\"bench-key\"]\n",
                work.join(format!("{name}.db")).display()
            );
            let (p, port, _) = spawn_tokenrelay(bin, work, &name, &rest);
            (p, port)
        })
        .collect();
    let url = |port: u16| format!("http://127.0.0.1:{port}/bench/v1/usage/chat/completions");
    let mut rows = Vec::new();
    for ((label, body, key, _), (_, port)) in configs.iter().zip(&procs) {
        let _ = oha_req(&url(*port), Some(500), 1, 8, body, *key);
        let at_rate = oha_req(&url(*port), Some(1000), secs, 64, body, *key);
        rows.push((*label, at_rate, 0.0, (0.0, 0.0)));
    }
    for _round in 0..2 {
        for (i, ((_, body, key, _), (_, port))) in configs.iter().zip(&procs).enumerate() {
            let sat = oha_req(&url(*port), None, secs, 64, body, *key).rps;
            rows[i].2 = f64::max(rows[i].2, sat);
        }
    }
    // SSE: the model in the path makes the stream metered.
    for (i, (_, port)) in procs.iter().enumerate() {
        let path = if i == 0 {
            "v1/sse?events=2".to_string()
        } else {
            "v1/models/bench:stream/sse?events=2".to_string()
        };
        let n = if quick { 50 } else { 200 };
        rows[i].3 = rt.block_on(first_event_as(
            &format!("http://127.0.0.1:{port}/bench/{path}"),
            n,
            configs[i].2,
        ));
    }
    for (label, l, sat, sse) in &rows {
        eprintln!(
            "{label}: p50 {:.3} ms p99 {:.3} ms at 1000/s, saturation {sat:.0} req/s, SSE first event median {:.3} ms p99 {:.3} ms",
            l.p50, l.p99, sse.0, sse.1
        );
    }
    rows
}

fn accounting_rows(s: &mut String, rows: &[UsageRow]) {
    let _ = writeln!(
        s,
        "\n## Accounting: usage metered and clients held to limits, against neither\n"
    );
    let _ = writeln!(
        s,
        "| configuration | p50 at 1000/s (ms) | p99 at 1000/s (ms) | saturation req/s | vs not metered | SSE first event median / p99 (ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let base = rows.first().map_or(f64::NAN, |r| r.2);
    for (label, l, sat, sse) in rows {
        let _ = writeln!(
            s,
            "| {label} | {:.3} | {:.3} | {sat:.0} | {:.2}× | {:.3} / {:.3} |",
            l.p50,
            l.p99,
            ratio(*sat, base),
            sse.0,
            sse.1
        );
    }
}

/// One key-pool row: what was configured, latency at 1,000/s, saturation, RSS.
type KeyRow = (&'static str, Latency, f64, f64);

/// Key pools side by side: one key, 1,000 keys (selection is an index into a snapshot;
/// nothing should grow with the pool), and 1,000 keys with declared limits (every request
/// counted against its key's minute and day windows before it is sent).
fn key_pools(bin: &Path, work: &Path, up: SocketAddr, secs: u32) -> Vec<KeyRow> {
    let mut rows = Vec::new();
    for (label, n, limits) in [
        ("1 key", 1usize, false),
        ("1,000 keys", 1000, false),
        ("1,000 keys, limits declared", 1000, true),
    ] {
        let name = format!("keys{n}{}", if limits { "l" } else { "" });
        let (p, port) = tokenrelay_keys(bin, work, &name, up, n, limits);
        let url = format!("http://127.0.0.1:{port}/bench/v1/chat/completions");
        let _ = oha(&url, Some(500), 1, 8);
        let at_rate = oha(&url, Some(1000), secs, 64);
        let sat = oha(&url, None, secs, 64).rps;
        let rss = rss_mb(p.0.id());
        eprintln!(
            "{label}: p50 {:.3} ms p99 {:.3} ms at 1000/s, saturation {sat:.0} req/s, RSS {rss:.1} MB",
            at_rate.p50, at_rate.p99
        );
        rows.push((label, at_rate, sat, rss));
    }
    rows
}

fn key_rows(s: &mut String, keys: &[KeyRow]) {
    let _ = writeln!(
        s,
        "\n## API key pools: 1 key vs 1,000 keys, and 1,000 keys with declared limits\n"
    );
    let _ = writeln!(
        s,
        "| pool | p50 at 1000/s (ms) | p99 at 1000/s (ms) | saturation req/s | RSS MB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (label, l, sat, rss) in keys {
        let _ = writeln!(
            s,
            "| {label} | {:.3} | {:.3} | {sat:.0} | {rss:.1} |",
            l.p50, l.p99
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    fixed: &[(u32, [Latency; 3])],
    max: &[f64; 3],
    keys: &[KeyRow],
    usage: &[UsageRow],
    fleet: &(Vec<(&str, Latency, f64)>, usize, usize, usize),
    sse: &[(f64, f64); 3],
    rss_idle: f64,
    rss_streams: f64,
    storm_calls: usize,
    storm_ok: usize,
    storm_n: usize,
    storm_p99: f64,
    quick: bool,
    real: &str,
) -> String {
    let mut s = String::new();
    let machine = machine();
    let _ = writeln!(s, "# tokenrelay benchmarks\n");
    let _ = writeln!(
        s,
        "Measured by `scripts/bench.sh`{} on {machine}, {}. The fake upstream, nginx, tokenrelay and the load generator (oha, open loop with latency correction, 64 connections) share the machine's cores, so absolute figures are noisy: compare the ratios, measured side by side in one run. \"Added\" is the latency over direct (no proxy).\n",
        if quick { " --quick" } else { "" },
        date()
    );
    let _ = writeln!(s, "## Latency at fixed request rates (ms)\n");
    let _ = writeln!(
        s,
        "| rate | path | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (rate, row) in fixed {
        for (i, name) in ["direct", "nginx", "tokenrelay"].iter().enumerate() {
            let l = row[i];
            let d = row[0];
            let _ = writeln!(
                s,
                "| {rate}/s | {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                l.p50,
                l.p99,
                l.p999,
                l.p50 - d.p50,
                l.p99 - d.p99,
                l.p999 - d.p999
            );
        }
        let (n, t, d) = (row[1], row[2], row[0]);
        let _ = writeln!(
            s,
            "| {rate}/s | **tokenrelay/nginx added** | | | | {:.2}× | {:.2}× | {:.2}× |",
            ratio(t.p50 - d.p50, n.p50 - d.p50),
            ratio(t.p99 - d.p99, n.p99 - d.p99),
            ratio(t.p999 - d.p999, n.p999 - d.p999)
        );
    }
    let _ = writeln!(s, "\n## Throughput at saturation\n");
    let _ = writeln!(s, "| path | req/s | tokenrelay/this |");
    let _ = writeln!(s, "|---|---|---|");
    for (i, name) in ["direct", "nginx", "tokenrelay"].iter().enumerate() {
        let _ = writeln!(s, "| {name} | {:.0} | {:.2} |", max[i], max[2] / max[i]);
    }
    key_rows(&mut s, keys);
    accounting_rows(&mut s, usage);
    let _ = writeln!(s, "\n## Fleet mode\n");
    let _ = writeln!(
        s,
        "| store | p50 at 1000/s (ms) | p99 at 1000/s (ms) | saturation req/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for (label, l, sat) in &fleet.0 {
        let _ = writeln!(s, "| {label} | {:.3} | {:.3} | {sat:.0} |", l.p50, l.p99);
    }
    let _ = writeln!(s, "\nRefresh storm on 3 replicas sharing one credential through Redis ({} concurrent requests, a token that must be refreshed): {} token-endpoint calls (target 1), {}/{} answered 200.", fleet.3, fleet.1, fleet.2, fleet.3);
    let _ = writeln!(s, "\n## SSE: time to first event (ms)\n");
    let _ = writeln!(s, "| path | median | p99 | added median |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (i, name) in ["direct", "nginx", "tokenrelay"].iter().enumerate() {
        let _ = writeln!(
            s,
            "| {name} | {:.3} | {:.3} | {:.3} |",
            sse[i].0,
            sse[i].1,
            sse[i].0 - sse[0].0
        );
    }
    let _ = writeln!(s, "\n## Memory and refresh storm\n");
    let _ = writeln!(s, "| measure | value | target |");
    let _ = writeln!(s, "|---|---|---|");
    let _ = writeln!(
        s,
        "| RSS idle, 100 credentials | {rss_idle:.1} MB | ≤ 30 MB |"
    );
    let _ = writeln!(
        s,
        "| RSS with 1,000 concurrent streams | {rss_streams:.1} MB | |"
    );
    let _ = writeln!(s, "| refresh storm: {storm_n} concurrent requests on a token that must be refreshed → token-endpoint calls | {storm_calls} | 1 |");
    let _ = writeln!(
        s,
        "| refresh storm: requests answered 200 | {storm_ok}/{storm_n} | all |"
    );
    let _ = writeln!(s, "| refresh storm: p99 latency | {storm_p99:.1} ms | |\n");
    s.push_str(real);
    // Prose from profiling by hand (perf, strace, callgrind via scripts/profile.sh): kept
    // beside this file so it can be corrected without touching the measurements.
    s.push_str(include_str!("profile.md"));
    let _ = writeln!(s, "\nReproduce: `scripts/bench.sh` (add `--quick` for a 3-second smoke run that does not rewrite this file).");
    s
}

fn ratio(a: f64, b: f64) -> f64 {
    if b.abs() < 1e-9 {
        f64::NAN
    } else {
        a / b
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu})")
}

fn date() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
