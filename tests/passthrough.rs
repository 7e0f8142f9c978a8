//! Everything a client does goes through tokenrelay: resumable uploads (the upload URL
//! points back through tokenrelay, every leg with the pool's key, bodies streamed with
//! flat memory), WebSockets (the Live API), and Vertex AI's per-location hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::Proc;

/// A Gemini-like upstream for uploads: `start` answers an absolute `x-goog-upload-url` on
/// its own origin; the upload leg must come with the key that started it.
#[derive(Default)]
struct Uploads {
    base: Mutex<String>,
    /// upload_id → key that started it.
    sessions: Mutex<HashMap<String, String>>,
    /// (path and query, key) of every request.
    seen: Mutex<Vec<(String, String)>>,
    received: AtomicU64,
}

async fn uploads(State(u): State<Arc<Uploads>>, req: Request) -> Response {
    let key = req
        .headers()
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    u.seen.lock().unwrap().push((pq.clone(), key.clone()));
    if !key.starts_with("AIza-") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let command = req
        .headers()
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if command == "start" {
        let id = format!("up-{}", u.sessions.lock().unwrap().len() + 1);
        u.sessions.lock().unwrap().insert(id.clone(), key);
        let url = format!(
            "{}/upload/v1beta/files?upload_id={id}&upload_protocol=resumable",
            u.base.lock().unwrap()
        );
        return Response::builder()
            .header("x-goog-upload-url", url)
            .header("x-goog-upload-status", "active")
            .body(Body::empty())
            .unwrap();
    }
    let id = pq
        .split("upload_id=")
        .nth(1)
        .map(|r| r.split('&').next().unwrap_or(""))
        .unwrap_or("");
    if u.sessions.lock().unwrap().get(id) != Some(&key) {
        return (
            StatusCode::FORBIDDEN,
            "another key than the one that started the upload",
        )
            .into_response();
    }
    // Count the bytes as they arrive; nothing is kept.
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    u.received.store(n, Ordering::SeqCst);
    axum::Json(json!({"file": {"name": format!("files/{id}"), "sizeBytes": n.to_string(), "state": "ACTIVE"}}))
        .into_response()
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_upload_comes_back_through_the_pool_and_streams_with_flat_memory() {
    let state = Arc::new(Uploads::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    *state.base.lock().unwrap() = format!("http://{addr}");
    let app = Router::new()
        .fallback(uploads)
        .with_state(Arc::clone(&state));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_request_body = \"1MiB\"\n[providers.gemini]\nupstream = \"http://{addr}\"\ncredentials = []\napi_keys = [\"AIza-one\", \"AIza-two\"]\n"
        ),
    )
    .unwrap();
    let p = Proc::spawn(&config, &dir.path().join("log"));
    let http = reqwest::Client::new();
    let before = rss_kb(p.child.id());
    const SIZE: u64 = 50 << 20;
    let mut upload_kb = 0;
    for round in 0..2 {
        // Leg 1: start (small JSON), with the client's dummy key in both places.
        let start = http
            .post(format!("{}/gemini/upload/v1beta/files?key=dummy", p.proxy))
            .header("x-goog-api-key", "dummy")
            .header("x-goog-upload-protocol", "resumable")
            .header("x-goog-upload-command", "start")
            .header("x-goog-upload-header-content-length", SIZE.to_string())
            .json(&json!({"file": {"display_name": "big.bin"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 200);
        let url = start.headers()["x-goog-upload-url"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            url.starts_with(&format!(
                "{}/gemini/upload/v1beta/files?upload_id=up-",
                p.proxy
            )),
            "the next leg goes back through tokenrelay: {url}"
        );
        // Leg 2: 50 MB, streamed from a generator (never whole in memory on either side).
        let chunks = futures_util::stream::iter(
            (0..SIZE / (1 << 20)).map(|_| Ok::<_, std::io::Error>(vec![7u8; 1 << 20])),
        );
        let sampler = {
            let pid = p.child.id();
            tokio::spawn(async move {
                let mut peak = 0;
                for _ in 0..200 {
                    peak = peak.max(rss_kb(pid));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                peak
            })
        };
        let done = http
            .post(&url)
            .header("x-goog-api-key", "dummy")
            .header("x-goog-upload-command", "upload, finalize")
            .header("x-goog-upload-offset", "0")
            .header("content-length", SIZE.to_string())
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 200, "round {round}: {:?}", done.text().await);
        let file: Value = done.json().await.unwrap();
        assert_eq!(file["file"]["sizeBytes"], SIZE.to_string());
        assert_eq!(state.received.load(Ordering::SeqCst), SIZE);
        upload_kb = upload_kb.max(sampler.await.unwrap());
    }
    // Every leg reached the upstream with a pool key (the same one per upload, by the
    // fake's check), never the client's dummy, never `?key=`.
    let seen = state.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (pq, key) in &seen {
        assert!(key == "AIza-one" || key == "AIza-two", "{key}");
        assert!(!pq.contains("key=dummy"), "{pq}");
    }
    assert_ne!(seen[0].1, seen[2].1, "two uploads, two keys (round robin)");
    let after = rss_kb(p.child.id());
    eprintln!("tokenrelay RSS: {before} kB before, {upload_kb} kB peak during 50 MB uploads, {after} kB after");
    assert!(
        upload_kb < before + 16 * 1024,
        "RSS grew from {before} kB to {upload_kb} kB while streaming 50 MB"
    );
}

/// A WebSocket echo that checks the credential on the handshake, and closes itself when
/// told "bye".
async fn ws_echo(headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let key = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key != "AIza-live" {
        return (StatusCode::UNAUTHORIZED, "no key on the handshake").into_response();
    }
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            match msg {
                Message::Text(t) if t.as_str() == "bye" => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Message::Text(t) => {
                    let _ = socket
                        .send(Message::Text(format!("echo: {t}").into()))
                        .await;
                }
                Message::Binary(b) => {
                    let _ = socket.send(Message::Binary(b)).await;
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_spliced_with_the_pool_key_on_the_handshake() {
    use tokio_tungstenite::tungstenite::Message as W;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(axum::routing::get(ws_echo));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"http://{addr}\"\ncredentials = []\napi_keys = [\"AIza-live\"]"
    ))
    .await;
    let url = format!(
        "{}/gemini/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=dummy",
        t.proxy.replace("http://", "ws://")
    );
    // Client closes.
    let (mut ws, resp) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(W::Text("hello".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        W::Text("echo: hello".into())
    );
    ws.send(W::Binary(vec![0, 1, 2, 255].into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        W::Binary(vec![0, 1, 2, 255].into())
    );
    t.assert_metric("tokenrelay_upgrades_open{provider=\"gemini\"} 1")
        .await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    // Server closes.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(W::Text("bye".into())).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(W::Close(_)))));
    wait_for("both splices to end", Duration::from_secs(5), || async {
        t.metrics()
            .await
            .contains("tokenrelay_upgrades_open{provider=\"gemini\"} 0")
    })
    .await;
    t.assert_metric("tokenrelay_upgrade_duration_seconds_count{provider=\"gemini\"} 2")
        .await;
}

#[tokio::test]
async fn a_refused_websocket_handshake_reaches_the_client_as_it_is() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(axum::routing::get(ws_echo));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"http://{addr}\"\ncredentials = []\napi_keys = [\"AIza-wrong\"]"
    ))
    .await;
    let url = format!("{}/gemini/ws/x", t.proxy.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("expected the upstream's 401, got {other:?}"),
    }
}

/// A fake Vertex host: answers which host it is.
async fn vertex_host(State(name): State<&'static str>, req: Request) -> Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    axum::Json(json!({"host": name, "path": req.uri().path(), "authorization": auth}))
        .into_response()
}

#[tokio::test]
async fn vertex_locations_reach_their_own_hosts_and_others_are_refused() {
    // Two fake regional hosts on one port, at 127.0.0.1 and 127.0.0.2.
    let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let second = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 2], port)))
        .await
        .unwrap();
    for (l, name) in [(first, "us-central1"), (second, "europe-west4")] {
        let app = Router::new().fallback(vertex_host).with_state(name);
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    let mut t = TestApp::empty().await;
    let cred = write_cred(
        t.dir.path(),
        "adc.json",
        &json!({"access_token": "vertex-token", "refresh_token": "r", "expiry_date": now_ms() + 3_600_000}),
    );
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.vertex]\nupstream = \"http://{{location}}-aiplatform.test:{port}\"\nlocations = [\"us-central1\", \"europe-west4\"]\nclient_id = \"c\"\ncredentials = [\"{}\"]\n[providers.vertex.resolve]\n\"us-central1-aiplatform.test\" = \"127.0.0.1\"\n\"europe-west4-aiplatform.test\" = \"127.0.0.2\"",
        cred.display()
    ))
    .await;
    for location in ["us-central1", "europe-west4"] {
        let resp = t
            .http
            .post(format!(
                "{}/vertex/v1/projects/p/locations/{location}/publishers/google/models/gemini-2.5-flash:generateContent",
                t.proxy
            ))
            .json(&json!({"contents": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["host"], location);
        assert_eq!(v["authorization"], "Bearer vertex-token");
    }
    let resp = t
        .http
        .post(format!(
            "{}/vertex/v1/projects/p/locations/evil.example%2F/publishers/google/models/m:generateContent",
            t.proxy
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = t
        .http
        .post(format!(
            "{}/vertex/v1/projects/p/locations/asia-east1/publishers/google/models/m:generateContent",
            t.proxy
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        400,
        "a real location, but not an allowed one"
    );
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("providers.vertex.locations"));
}
