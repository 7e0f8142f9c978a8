//! The rules of DESIGN.md's "On the wire", each pinned against an upstream that breaks
//! it on purpose: raw sockets that send what no well-behaved server would (bytes after a
//! bodyless answer, a body longer than its length, an answer nobody asked for, closes
//! without notice, early answers), an HTTP/2 upstream that sends `GOAWAY` under load, and
//! clients that each send unique ids and must get back only their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

/// A request as the hostile upstream read it.
pub struct Req {
    pub method: String,
    pub path: String,
    pub head: String,
    /// The body, when the script reads it.
    pub body: Vec<u8>,
    /// How many requests this connection carried before this one.
    pub before: usize,
}

impl Req {
    /// The last path segment: the client's unique id.
    fn id(&self) -> &str {
        let p = self.path.split('?').next().unwrap_or("");
        p.rsplit('/').next().unwrap_or("")
    }
}

/// What the hostile upstream does with one request.
pub struct Script {
    /// Written in order, each after its pause.
    pub pieces: Vec<(Duration, Vec<u8>)>,
    pub then: Then,
    /// Whether the request body is read before answering (false: an early answer).
    pub read_body: bool,
    /// Whether it sends bytes after the answer: the connection must not carry another
    /// request.
    pub taints: bool,
}

pub enum Then {
    /// Wait for the next request (and close after `idle` of silence, if set).
    Keep,
    /// Close at once, whatever the answer said.
    Close,
    /// Stop writing, read and drop whatever the client still sends for a while, then
    /// close (a decent server's lingering close after an early answer).
    Linger,
}

impl Script {
    /// `pieces` after the request is read, then the connection kept.
    pub fn written(pieces: Vec<(Duration, Vec<u8>)>) -> Script {
        Script {
            pieces,
            then: Then::Keep,
            read_body: true,
            taints: false,
        }
    }

    /// `bytes` at once.
    pub fn answer(bytes: Vec<u8>) -> Script {
        Script::written(vec![(Duration::ZERO, bytes)])
    }

    /// Answered before the request body is read.
    fn early(mut self) -> Script {
        self.read_body = false;
        self
    }

    pub fn then(mut self, then: Then) -> Script {
        self.then = then;
        self
    }

    /// `more` after the answer: in the same write, or `later`.
    fn followed_by(mut self, more: Vec<u8>, later: Option<Duration>) -> Script {
        self.taints = true;
        match later {
            None => self.pieces[0].1.extend_from_slice(&more),
            Some(d) => self.pieces.push((d, more)),
        }
        self
    }
}

/// What the hostile upstream saw.
#[derive(Default)]
pub struct Seen {
    pub accepted: AtomicUsize,
    /// How many times each POST id arrived.
    pub posts: Mutex<HashMap<String, usize>>,
    pub heads: Mutex<Vec<String>>,
    /// Requests that arrived on a connection after it sent bytes nobody asked for.
    pub reused_after_stray: AtomicUsize,
}

/// A 200 with a JSON body naming `id`, well framed.
fn answer(id: &str) -> Vec<u8> {
    answer_with(id, "")
}

fn answer_with(id: &str, extra_headers: &str) -> Vec<u8> {
    let body = format!("{{\"id\":\"{id}\"}}");
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const STRAY: &str = "stray-answer-nobody-asked-for";

/// A raw HTTP/1.1 upstream that answers each request with `script(request)`; with
/// `idle_close`, it closes a connection that stayed silent that long (as upstreams and
/// load balancers do with their keep-alive timeout).
pub async fn hostile_upstream(
    script: fn(&Req) -> Script,
    idle_close: Option<Duration>,
) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let stats = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            stats.accepted.fetch_add(1, SeqCst);
            tokio::spawn(serve_hostile(s, script, idle_close, Arc::clone(&stats)));
        }
    });
    (url, seen)
}

async fn serve_hostile(
    mut s: TcpStream,
    script: fn(&Req) -> Script,
    idle_close: Option<Duration>,
    seen: Arc<Seen>,
) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut tainted = false;
    let mut before = 0;
    loop {
        let end = loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let read = s.read(&mut buf);
            let n = match idle_close {
                Some(idle) if got.is_empty() => match tokio::time::timeout(idle, read).await {
                    Ok(r) => r,
                    Err(_) => return,
                },
                _ => read.await,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&got[..end]).to_string();
        got.drain(..end + 4);
        let mut line = head.split(' ');
        let method = line.next().unwrap_or("").to_string();
        let path = line.next().unwrap_or("").to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        seen.heads.lock().unwrap().push(head.clone());
        if tainted {
            seen.reused_after_stray.fetch_add(1, SeqCst);
        }
        let mut req = Req {
            method,
            path,
            head,
            body: Vec::new(),
            before,
        };
        before += 1;
        let peek = script(&req);
        let chunked = req
            .head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        if peek.read_body {
            // A chunked body is read to its last chunk (and kept whole, framing included).
            let whole = |got: &[u8]| match chunked {
                true => got
                    .windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .map(|i| i + 5),
                false => (got.len() >= length).then_some(length),
            };
            let end = loop {
                if let Some(end) = whole(&got) {
                    break end;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            };
            req.body = got.drain(..end).collect();
            if req.method == "POST" {
                *seen
                    .posts
                    .lock()
                    .unwrap()
                    .entry(req.id().to_string())
                    .or_default() += 1;
            }
        }
        let Script {
            pieces,
            then,
            taints,
            ..
        } = script(&req);
        tainted |= taints;
        for (pause, bytes) in pieces {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if s.write_all(&bytes).await.is_err() {
                return;
            }
        }
        match then {
            Then::Keep => {}
            Then::Close => return,
            Then::Linger => {
                let _ = s.shutdown().await;
                let drain = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                return;
            }
        }
    }
}

/// tokenrelay with one proxy thread (one connection pool) and DashScope `keys` in front
/// of `upstream`, plus `server` lines.
async fn relay(upstream: &str, keys: &str, server: &str) -> TestApp {
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nproxy_threads = 1\n{server}\n[providers.dashscope]\nupstream = \"{upstream}\"\napi_keys = [{keys}]"
    ))
    .await;
    t
}

/// GETs `/dashscope/v1/{path}`; the status and body.
async fn get(t: &TestApp, path: &str) -> (u16, String) {
    get_from(&t.http, &t.proxy, path).await
}

/// GETs `{proxy}/dashscope/v1/{path}` (from a task that holds its own client handle).
async fn get_from(http: &reqwest::Client, proxy: &str, path: &str) -> (u16, String) {
    let r = http
        .get(format!("{proxy}/dashscope/v1/{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Whether `body` is the echo of `id`, and nobody else's.
fn is_own(body: &str, id: &str) -> bool {
    body == format!("{{\"id\":\"{id}\"}}")
}

/// Echoes each id; `/v1/bodyless/{kind}/{when}/{id}` answers HEAD, 204 or 304 and then
/// sends a whole stray answer, in the same write or 20 ms later.
fn bodyless_then_bytes(r: &Req) -> Script {
    let parts: Vec<&str> = r.path.split('/').collect();
    let later = (parts.get(4) == Some(&"later")).then_some(Duration::from_millis(20));
    let head = match parts.get(3) {
        Some(&"head") => b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n".to_vec(),
        Some(&"204") => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        Some(&"304") => b"HTTP/1.1 304 Not Modified\r\n\r\n".to_vec(),
        _ => return Script::answer(answer(r.id())),
    };
    Script::answer(head).followed_by(answer(STRAY), later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_bodyless_answer_never_reach_another_client() {
    let (upstream, seen) = hostile_upstream(bodyless_then_bytes, None).await;
    let t = relay(&upstream, "\"sk-one\"", "").await;
    let mut tasks = Vec::new();
    for (c, (kind, when)) in ["head", "204", "304"]
        .into_iter()
        .flat_map(|k| [(k, "now"), (k, "later")])
        .enumerate()
    {
        let (proxy, http) = (t.proxy.clone(), t.http.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..8 {
                let url = format!("{proxy}/dashscope/v1/bodyless/{kind}/{when}/x");
                let r = if kind == "head" {
                    http.head(url).send().await.unwrap()
                } else {
                    http.get(url).send().await.unwrap()
                };
                assert!([200, 204, 304].contains(&r.status().as_u16()));
                let body = r.text().await.unwrap();
                assert!(!body.contains(STRAY), "{kind} {when}: {body}");
                // Right after it, and once the stray bytes are there.
                for pause in [0, 30] {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let id = format!("c{c}-r{round}-p{pause}");
                    let (_, body) = get_from(&http, &proxy, &format!("echo/{id}")).await;
                    assert!(is_own(&body, &id), "{kind} {when}: {id} got {body}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(seen.reused_after_stray.load(SeqCst), 0);
}

/// Echoes each id; `/v1/long/{when}/{id}` sends more bytes than its `Content-Length`,
/// `/v1/twice/{when}/{id}` a second whole answer, in the same write or 20 ms later.
fn overlong_or_twice(r: &Req) -> Script {
    let parts: Vec<&str> = r.path.split('/').collect();
    let later = (parts.get(4) == Some(&"later")).then_some(Duration::from_millis(20));
    let more = match parts.get(3) {
        Some(&"long") => format!("{{\"id\":\"{STRAY}\"}}").into_bytes(),
        Some(&"twice") => answer(STRAY),
        _ => return Script::answer(answer(r.id())),
    };
    Script::answer(answer(r.id())).followed_by(more, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_its_length_or_an_unasked_answer_ends_its_connection() {
    let (upstream, seen) = hostile_upstream(overlong_or_twice, None).await;
    let t = relay(&upstream, "\"sk-one\"", "").await;
    // In the same write: clients at once, each right after the other on one pool.
    let mut tasks = Vec::new();
    for c in 0..4 {
        let (proxy, http) = (t.proxy.clone(), t.http.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                for kind in ["long", "twice"] {
                    let id = format!("{kind}-c{c}-r{round}");
                    let (_, body) = get_from(&http, &proxy, &format!("{kind}/now/{id}")).await;
                    assert!(is_own(&body, &id), "{id} got {body}");
                    let id = format!("echo-{id}");
                    let (_, body) = get_from(&http, &proxy, &format!("echo/{id}")).await;
                    assert!(is_own(&body, &id), "{id} got {body}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // 20 ms later, while the connection is idle: the reaper or the checkout sees them.
    for round in 0..6 {
        for kind in ["long", "twice"] {
            let id = format!("{kind}-later-{round}");
            let (_, body) = get(&t, &format!("{kind}/later/{id}")).await;
            assert!(is_own(&body, &id), "{body}");
            tokio::time::sleep(Duration::from_millis(60)).await;
            let id = format!("echo-{id}");
            let (_, body) = get(&t, &format!("echo/{id}")).await;
            assert!(is_own(&body, &id), "{id} got {body}");
        }
    }
    assert_eq!(
        seen.reused_after_stray.load(SeqCst),
        0,
        "no connection that carried stray bytes took another request"
    );
}

/// Picks a misbehaviour from the id's hash: well behaved, a close without notice, bytes
/// after the body, a second answer, `Connection: close`, a chunked body in pieces.
fn at_random(r: &Req) -> Script {
    let id = r.id();
    let pick = id
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 6;
    let own = answer(id);
    match pick {
        0 => Script::answer(own),
        1 => Script::answer(own).then(Then::Close),
        2 => Script::answer(own).followed_by(b"garbage after the body".to_vec(), None),
        3 => Script::answer(own).followed_by(answer(STRAY), None),
        4 => Script::answer(answer_with(id, "connection: close\r\n")).then(Then::Close),
        _ => {
            let body = format!("{{\"id\":\"{id}\"}}");
            let (a, b) = body.split_at(body.len() / 2);
            Script::written(vec![
                (
                    Duration::ZERO,
                    format!(
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n",
                        a.len()
                    )
                    .into_bytes(),
                ),
                (
                    Duration::from_millis(2),
                    format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len()).into_bytes(),
                ),
            ])
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_through_a_misbehaving_upstream_gives_every_client_only_its_own_answers() {
    let (upstream, seen) = hostile_upstream(at_random, None).await;
    let t = relay(&upstream, "\"sk-one\", \"sk-two\"", "").await;
    // TOKENRELAY_SOAK_SECS shortens or lengthens it (requests per client: 30 per second).
    let per_client: usize = std::env::var("TOKENRELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(300, |s| (s * 30).clamp(30, 3000));
    let clients = 8;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (proxy, http) = (t.proxy.clone(), t.http.clone());
        tasks.push(tokio::spawn(async move {
            let mut post_failures = Vec::new();
            for i in 0..per_client {
                let id = format!("c{c}-{i}");
                let url = format!("{proxy}/dashscope/v1/soak/{id}");
                let post = i % 2 == 1;
                let r = if post {
                    http.post(url).body(format!("{{\"id\":\"{id}\"}}")).send()
                } else {
                    http.get(url).send()
                }
                .await
                .unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert!(
                    !body.contains(STRAY) && !body.contains("garbage"),
                    "{id}: {body}"
                );
                if status == 200 {
                    assert!(is_own(&body, &id), "{id} got {body}");
                } else {
                    // Only a POST on a connection the upstream closed as it went out, on
                    // both keys, may end without an answer: never sent twice to one key.
                    assert!(post && status == 502, "{id}: {status} {body}");
                    post_failures.push(id);
                }
            }
            post_failures
        }));
    }
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.unwrap());
    }
    let posts = seen.posts.lock().unwrap();
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "POSTs received twice: {twice:?}");
    assert_eq!(seen.reused_after_stray.load(SeqCst), 0);
    println!(
        "soak: {} requests, {} connections, {} POSTs without an answer",
        clients * per_client,
        seen.accepted.load(SeqCst),
        failed.len()
    );
    assert!(
        failed.len() * 100 <= clients * per_client,
        "more than 1% of POSTs unanswered: {failed:?}"
    );
}

/// Echoes each id and says `Keep-Alive: timeout=1`.
fn announced_keepalive(r: &Req) -> Script {
    Script::answer(answer_with(r.id(), "keep-alive: timeout=1\r\n"))
}

fn plain_echo(r: &Req) -> Script {
    Script::answer(answer(r.id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spaced_at_the_upstreams_idle_timeout_are_all_answered_once() {
    let idle = Some(Duration::from_secs(1));
    let (announced, seen_announced) = hostile_upstream(announced_keepalive, idle).await;
    let (silent, seen_silent) = hostile_upstream(plain_echo, idle).await;
    let a = relay(&announced, "\"sk-one\"", "").await;
    let b = relay(&silent, "\"sk-one\"", "").await;
    // The upstream that says its timeout: GETs and POSTs, each once, all answered.
    let told = async {
        for i in 0..8 {
            let id = format!("told-{i}");
            let url = format!("{}/dashscope/v1/ka/{id}", a.proxy);
            let r = if i % 2 == 0 {
                a.http.post(url).body("{}").send().await.unwrap()
            } else {
                a.http.get(url).send().await.unwrap()
            };
            assert_eq!(r.status(), 200, "{id}");
            assert!(is_own(&r.text().await.unwrap(), &id));
            // Idle 0.7 s: within the upstream's second, past its timeout less the margin.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    };
    // The one that does not: GETs go again on a new connection when the race is lost.
    let untold = async {
        for i in 0..8 {
            let id = format!("untold-{i}");
            let (status, body) = get(&b, &format!("ka/{id}")).await;
            assert_eq!(status, 200, "{id}: {body}");
            assert!(is_own(&body, &id));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::join!(told, untold);
    let posts = seen_announced.posts.lock().unwrap();
    assert_eq!(posts.len(), 4);
    assert!(posts.values().all(|n| *n == 1), "{posts:?}");
    assert_eq!(
        seen_announced.accepted.load(SeqCst),
        8,
        "a connection idle past the upstream's Keep-Alive: timeout (less a margin) is not reused"
    );
    println!(
        "keep-alive: announced {} connections, silent {} connections",
        seen_announced.accepted.load(SeqCst),
        seen_silent.accepted.load(SeqCst)
    );
}

/// Answers the first request on each connection; closes the connection on any later one
/// after reading it, without a byte of answer: the keep-alive race, every time.
fn closes_reused(r: &Req) -> Script {
    if r.before == 0 {
        return Script::answer(answer(r.id()));
    }
    Script::written(Vec::new()).then(Then::Close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_under_a_request_resends_only_what_is_safe() {
    let (upstream, seen) = hostile_upstream(closes_reused, None).await;
    let t = relay(&upstream, "\"sk-one\"", "").await;
    // A GET goes again on a new connection: answered.
    for id in ["get-1", "get-2", "get-3"] {
        let (status, body) = get(&t, &format!("race/{id}")).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert!(is_own(&body, id));
    }
    // A POST may have reached the upstream: never sent twice to the same credential.
    let r = t
        .http
        .post(format!("{}/dashscope/v1/race/post-1", t.proxy))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "upstream_unreachable", "{e}");
    assert_eq!(seen.posts.lock().unwrap().get("post-1"), Some(&1));
    // With a second key, the POST is served by it (once per key at most).
    let two = relay(&upstream, "\"sk-one\", \"sk-two\"", "").await;
    let (status, _) = get(&two, "race/warm").await;
    assert_eq!(status, 200);
    let r = two
        .http
        .post(format!("{}/dashscope/v1/race/post-2", two.proxy))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(is_own(&r.text().await.unwrap(), "post-2"));
    let posts = seen.posts.lock().unwrap();
    assert!(posts.get("post-2").is_some_and(|n| *n <= 2), "{posts:?}");
}

/// tokenrelay's sockets to `port` in `state` (hex, as in /proc/net/tcp: 01 established,
/// 08 close-wait).
fn sockets_to(port: u16, state: &str) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols
                .get(2)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            remote_port == Some(port) && cols.get(3) == Some(&state)
        })
        .count()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

async fn burst(t: &TestApp, n: usize) {
    let requests = (0..n).map(|i| {
        let (proxy, http) = (t.proxy.clone(), t.http.clone());
        async move {
            let id = format!("burst-{i}");
            let (_, body) = get_from(&http, &proxy, &format!("burst/{id}")).await;
            assert!(is_own(&body, &id), "{id} got {body}");
        }
    });
    futures_util::future::join_all(requests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reaped_after_a_burst() {
    // An upstream that closes connections idle for 300 ms: none left in CLOSE_WAIT.
    let (closing, _) = hostile_upstream(plain_echo, Some(Duration::from_millis(300))).await;
    let a = relay(&closing, "\"sk-one\"", "").await;
    // One that never closes, and tokenrelay keeps idle connections 1 s.
    let (keeping, _) = hostile_upstream(plain_echo, None).await;
    let b = relay(&keeping, "\"sk-one\"", "upstream_keepalive = \"1s\"").await;
    tokio::join!(burst(&a, 200), burst(&b, 200));
    let opened = sockets_to(port_of(&keeping), "01");
    assert!(opened > 1, "the burst opened connections: {opened}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sockets_to(port_of(&closing), "08"),
        0,
        "connections the upstream closed are not left in CLOSE_WAIT"
    );
    assert_eq!(
        sockets_to(port_of(&keeping), "01"),
        0,
        "connections idle past server.upstream_keepalive are closed"
    );
    // And the pools still serve.
    burst(&a, 5).await;
    burst(&b, 5).await;
}

/// `Bearer sk-dead` gets an early 401 (dead key) and `/v1/big/413` an early 413, both
/// before the body is read and with a lingering close; everything else is read whole and
/// answered with its length.
fn early_answers(r: &Req) -> Script {
    let early = |status: &str, body: &str| {
        Script::answer(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
        .then(Then::Linger)
        .early()
    };
    if r.head.to_ascii_lowercase().contains("bearer sk-dead") {
        return early(
            "401 Unauthorized",
            r#"{"error":{"code":"invalid_api_key","message":"invalid access token or token expired","type":"invalid_request_error"}}"#,
        );
    }
    if r.path.ends_with("/413") {
        return early(
            "413 Payload Too Large",
            r#"{"error":{"message":"too large for this upstream"}}"#,
        );
    }
    Script::answer(answer(&r.body.len().to_string()))
}

/// Sends a request head and then `body` in pieces from another task (ignoring write
/// errors, as a client that reads while it writes does) and reads the answer's status
/// line and body.
async fn raw_exchange(addr: &str, head: String, body: Vec<Vec<u8>>) -> (u16, String) {
    let s = TcpStream::connect(addr.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in body {
            if wr.write_all(&piece).await.is_err() {
                return;
            }
        }
        // Dropping the write half would send a FIN, which a server may take as goodbye.
        std::future::pending::<()>().await;
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => break,
                Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // Interim answers (100 Continue) come first; the final one follows.
            while got.starts_with(b"HTTP/1.1 1") {
                match got.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(end) => drop(got.drain(..end + 4)),
                    None => break,
                }
            }
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an answer within 20 s");
    writer.abort();
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_reach_the_client_and_oversized_bodies_are_413() {
    let (upstream, _) = hostile_upstream(early_answers, None).await;
    let twenty_mb = vec![b'x'; 20 << 20];
    // A buffered 20 MB POST answered 413 early: the upstream's answer.
    let t = relay(&upstream, "\"sk-one\"", "").await;
    let started = std::time::Instant::now();
    let r = t
        .http
        .post(format!("{}/dashscope/v1/big/413", t.proxy))
        .body(twenty_mb.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("too large for this upstream"));
    // An early 401 on the first key: the second key serves it, at once.
    let two = relay(&upstream, "\"sk-dead\", \"sk-live\"", "").await;
    let r = two
        .http
        .post(format!("{}/dashscope/v1/big/ok", two.proxy))
        .body(twenty_mb.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(is_own(&r.text().await.unwrap(), &(20 << 20).to_string()));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // A streamed upload (over max_request_body) answered early: the upstream's 413.
    let small = relay(
        &upstream,
        "\"sk-one\"",
        "max_request_body = \"1MiB\"\nmax_upload_body = \"64MiB\"",
    )
    .await;
    let head = format!(
        "POST /dashscope/v1/big/413 HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n",
        small.proxy.trim_start_matches("http://"),
        20 << 20
    );
    let pieces = twenty_mb.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    let (status, body) = raw_exchange(&small.proxy, head, pieces).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("too large for this upstream"), "{body}");
    // A chunked upload past max_upload_body: tokenrelay's own 413, never a 502.
    let capped = relay(
        &upstream,
        "\"sk-one\"",
        "max_request_body = \"1MiB\"\nmax_upload_body = \"2MiB\"",
    )
    .await;
    let head = format!(
        "POST /dashscope/v1/big/chunked HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        capped.proxy.trim_start_matches("http://")
    );
    let chunk = [
        format!("{:x}\r\n", 256 << 10).into_bytes(),
        vec![b'y'; 256 << 10],
        b"\r\n".to_vec(),
    ]
    .concat();
    let (status, body) = raw_exchange(&capped.proxy, head, vec![chunk; 16]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request_too_large"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_line_is_origin_form_and_expect_is_not_forwarded() {
    let (upstream, seen) = hostile_upstream(plain_echo, None).await;
    let t = relay(&upstream, "\"sk-one\"", "").await;
    let r = t
        .http
        .get(format!("{}/dashscope?alt=sse", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let head = format!(
        "POST /dashscope/v1/expect/e1 HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
        t.proxy.trim_start_matches("http://")
    );
    let (status, body) = raw_exchange(&t.proxy, head, vec![b"{}".to_vec()]).await;
    assert_eq!(status, 200, "{body}");
    // An empty POST says so (hyper alone would send no length; some front ends want one).
    let r = t
        .http
        .post(format!("{}/dashscope/v1/empty/e2", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let heads = seen.heads.lock().unwrap();
    assert!(
        heads[2]
            .to_ascii_lowercase()
            .contains("content-length: 0\r\n"),
        "{}",
        heads[2]
    );
    assert!(
        heads[0].starts_with("GET /?alt=sse HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        !heads[1].to_ascii_lowercase().contains("expect:"),
        "{}",
        heads[1]
    );
}

/// A server connection that, once dropped, keeps reading (and dropping) what the client
/// still sends for a second before it closes, as a server should after GOAWAY (RFC 9113
/// §6.8): closing at once would reset the connection and lose answers the client has not
/// read yet.
struct Linger<T: tokio::io::AsyncRead + Unpin + Send + 'static>(Option<T>);

impl<T: tokio::io::AsyncRead + Unpin + Send + 'static> Drop for Linger<T> {
    fn drop(&mut self) {
        if let Some(mut io) = self.0.take() {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                let drain = async { while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            });
        }
    }
}

impl<T> tokio::io::AsyncRead for Linger<T>
where
    T: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl<T> tokio::io::AsyncWrite for Linger<T>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_write(cx, b),
            None => std::task::Poll::Ready(Ok(0)),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

/// Serves HTTP/2 on `tls` with the h2 crate: every 10th stream is refused
/// (`REFUSED_STREAM`), and after its 25th stream the connection shuts down gracefully:
/// `GOAWAY`, a ping, then `GOAWAY` naming the last stream it took, which refuses the
/// streams in flight above it; it answers the ones it took and lingers before it closes.
async fn refusing_h2(tls: tokio_rustls::server::TlsStream<TcpStream>, served: Arc<AtomicUsize>) {
    let Ok(mut conn) = h2::server::handshake(Linger(Some(tls))).await else {
        return;
    };
    let mut n = 0;
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        n += 1;
        if n % 10 == 0 {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        if n == 25 {
            conn.graceful_shutdown();
        }
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let id = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            let body = bytes::Bytes::from(format!("{{\"id\":\"{id}\"}}"));
            if let Ok(mut stream) = respond.send_response(http::Response::new(()), false) {
                if stream.send_data(body, true).is_ok() {
                    served.fetch_add(1, SeqCst);
                }
            }
        });
    }
    // The streams it took are answered before the connection closes.
    let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_refuses_streams_and_sends_goaway_under_load_loses_no_request() {
    let certs = tempfile::tempdir().unwrap();
    crate::tls::make_certs(certs.path());
    let acceptor = crate::tls::acceptor(certs.path(), &[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (count, done) = (Arc::clone(&accepted), Arc::clone(&served));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            let (acceptor, done) = (acceptor.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    refusing_h2(tls, done).await;
                }
            });
        }
    });
    let ca = certs.path().join("ca.pem");
    let t = relay(
        &upstream,
        "\"sk-one\"",
        &format!("upstream_ca = \"{}\"", ca.display()),
    )
    .await;
    let (clients, each) = (64, 20);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (proxy, http) = (t.proxy.clone(), t.http.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let id = format!("h2-c{c}-{i}");
                let r = http
                    .post(format!("{proxy}/dashscope/v1/h2/{id}"))
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let body = r.text().await.unwrap();
                assert_eq!(status, 200, "{id}: {body}");
                assert!(is_own(&body, &id), "{id} got {body}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        served.load(SeqCst),
        clients * each,
        "each request served once"
    );
    assert!(
        accepted.load(SeqCst) >= 4,
        "refused streams went again on new connections: {}",
        accepted.load(SeqCst)
    );
}
