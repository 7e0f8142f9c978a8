//! Fleet mode against a real `redis-server` (started per test on a free port, nothing
//! saved): replicas of tokenrelay share one rotating credential, adopt each other's
//! refreshes by pub/sub or by polling alone, honour each other's 429s, survive Redis
//! restarting empty, and a stale lease holder can neither renew nor release a lease it lost.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

pub struct Redis {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    pub fn start() -> Redis {
        Redis::on(free_port())
    }

    fn on(port: u16) -> Redis {
        Redis::spawn(
            tempfile::tempdir().unwrap(),
            port,
            &["--port", &port.to_string()],
        )
    }

    /// A `redis-server` on 127.0.0.1 in `dir` (nothing saved) with `args`, once `port`
    /// accepts connections.
    fn spawn(dir: tempfile::TempDir, port: u16, args: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (.ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port, dir }
    }

    /// Kills it (SIGKILL) and starts an empty one on the same port.
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        *self = Redis::on(self.port);
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// `n` in-process replicas of one tokenrelay configuration sharing `redis`, with one
/// rotating Qwen credential file, against one strict-rotation token endpoint.
struct Fleet {
    apps: Vec<TestApp>,
    tokens: FakeTokenEndpoint,
    _redis_port: u16,
}

async fn fleet(n: usize, redis: &Redis, lifetime: u64, extra: &str) -> Fleet {
    let first = spawn_app(Flavor::Qwen)
        .cred("shared.json", json!({"access_token": "stale", "refresh_token": "rt-0", "expiry_date": now_ms() - 1000}))
        .refresh_token("rt-0")
        .toml(&format!("[refresh]\nlead_time = \"1s\"\nmin_validity = \"500ms\"\ntimeout = \"3s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n{extra}", redis.port))
        .start()
        .await;
    first.tokens.set_lifetime(lifetime);
    let tokens = first.tokens.clone();
    let cred = first.cred_path("shared.json");
    let mut apps = vec![first];
    for _ in 1..n {
        let mut t = TestApp::empty().await;
        let up = apps[0].upstream.url.clone();
        t.launch(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[refresh]\nlead_time = \"1s\"\nmin_validity = \"500ms\"\ntimeout = \"3s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n{extra}\n[providers.qwen]\nupstream = \"{up}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]",
            redis.port,
            tokens.url,
            cred.display()
        ))
        .await;
        // These replicas' requests go to the first one's fake upstream, which accepts the
        // tokens the shared token endpoint issues.
        apps.push(t);
    }
    Fleet {
        apps,
        tokens,
        _redis_port: redis.port,
    }
}

/// Waits until the first two replicas hold the same fresh token in memory.
async fn both_on_one_token(f: &Fleet) {
    wait_for(
        "both replicas on the refreshed token",
        Duration::from_secs(5),
        || async {
            let (a, b) = (
                f.apps[0].credential("shared").await,
                f.apps[1].credential("shared").await,
            );
            a["state"] == "ready" && b["state"] == "ready" && a["expires_at"] == b["expires_at"]
        },
    )
    .await;
}

/// The status of a POST of `body` to `path` on `t` (0 if nothing answered).
async fn post_status(t: &TestApp, path: &str, body: &Value) -> u16 {
    t.http
        .post(format!("{}{path}", t.proxy))
        .json(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn chat(t: &TestApp) -> u16 {
    let body = json!({"model": "qwen3-coder-plus", "messages": []});
    post_status(t, "/qwen/v1/chat/completions", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_rotating_credential_with_one_redemption_per_expiry() {
    // 3 tokenrelay processes × 50 clients in a loop (a request every 50 ms each), tokens
    // living 3 s, one strict-rotation token endpoint (an old refresh token is refused).
    // TOKENRELAY_SOAK_SECS sets how long (default 60 s, at most 600).
    use crate::process::Proc;
    let redis = Redis::start();
    let valid = ValidTokens::default();
    let tokens = FakeTokenEndpoint::start(Flavor::Qwen, valid.clone()).await;
    let upstream = FakeUpstream::start(Flavor::Qwen, valid).await;
    tokens.allow_refresh_token("rt-0");
    tokens.allow_client(QWEN_CLIENT);
    tokens.set_lifetime(3);
    let dir = tempfile::tempdir().unwrap();
    let cred = write_cred(
        dir.path(),
        "shared.json",
        &json!({"access_token": "stale", "refresh_token": "rt-0", "expiry_date": now_ms() - 1000}),
    );
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[refresh]\nlead_time = \"1s\"\nmin_validity = \"500ms\"\ntimeout = \"3s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]\n",
            redis.port,
            upstream.url,
            tokens.url,
            cred.display()
        ),
    )
    .unwrap();
    let replicas: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(&config, &dir.path().join(format!("r{i}.log"))))
        .collect();
    // A client keeps idle connections for less than tokenrelay's header_read_timeout (10 s,
    // which also closes an idle keep-alive connection): otherwise a reuse racing that close
    // fails in the client, whatever the proxy does.
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let secs: u64 = std::env::var("TOKENRELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
        .clamp(6, 600);
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for r in &replicas {
        for _ in 0..50 {
            let http = http.clone();
            let url = format!("{}/qwen/v1/chat/completions", r.proxy);
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut bad) = (0u32, Vec::new());
                while Instant::now() < stop {
                    let sent = http
                        .post(&url)
                        .json(&json!({"model": "m", "messages": []}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => ok += 1,
                        // What went wrong, for the assertion's message.
                        Ok(r) => bad.push(format!(
                            "{}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => bad.push(format!("no answer: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (ok, bad)
            }));
        }
    }
    let (mut ok, mut failures) = (0, Vec::new());
    for t in tasks {
        let (o, b) = t.await.unwrap();
        ok += o;
        failures.extend(b);
    }
    let bad = failures.len();
    let calls = tokens.calls();
    let refused = tokens.state.refused.load(Ordering::SeqCst);
    eprintln!("{secs} s, 3 processes: {ok} ok, {bad} failed, {calls} token-endpoint calls, {refused} refused");
    assert_eq!(refused, 0, "no replica spent a rotated-away refresh token");
    assert!(failures.is_empty(), "every request served: {failures:?}");
    // Tokens live 3 s and are refreshed ~1 s ahead: about one redemption per 2 s for the
    // whole fleet, not one per replica.
    let per_expiry = (secs as f64 / 2.0).ceil() as usize + 2;
    assert!(
        calls >= 2 && calls <= per_expiry,
        "{calls} redemptions in {secs} s (at most {per_expiry} for one per expiry)"
    );
    for r in &replicas {
        let v: Value = get_json(&http, format!("{}/admin/credentials", r.admin)).await;
        let c = &v["credentials"][0];
        assert_eq!(c["store"]["kind"], "redis", "{v}");
        assert!(c["store"]["version"].as_u64().unwrap() >= 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_adopted_by_polling_alone_without_pubsub() {
    let redis = Redis::start();
    let f = fleet(2, &redis, 3600, "pubsub = false\npoll_interval = \"300ms\"").await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    // (Generous: a refresh B started at start-up may hold its gate for refresh.timeout
    // while A holds the lease, and the suite runs on 2 busy cores.)
    wait_for(
        "both replicas on one version",
        Duration::from_secs(15),
        || async {
            let a = f.apps[0].credential("shared").await;
            let b = f.apps[1].credential("shared").await;
            a["store"]["version"] == b["store"]["version"] && a["expires_at"] == b["expires_at"]
        },
    )
    .await;
    // A forced refresh on one replica reaches the other within the poll period.
    let before = f.apps[1].credential("shared").await["expires_at"].clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_eq!(status, 200);
    let started = Instant::now();
    wait_for(
        "the other replica to adopt",
        Duration::from_secs(10),
        || async { f.apps[1].credential("shared").await["expires_at"] != before },
    )
    .await;
    eprintln!("adopted after {:?} with polling only", started.elapsed());
    assert_eq!(
        f.tokens.calls(),
        2,
        "the other replica did not refresh itself"
    );
    assert_eq!(f.tokens.state.refused.load(Ordering::SeqCst), 0);
    assert_eq!(chat(&f.apps[1]).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_replica_is_honoured_by_the_others() {
    let redis = Redis::start();
    let f = fleet(2, &redis, 3600, "").await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    // The upstream rate-limits; replica 0 sees it.
    let r = f.apps[0]
        .http
        .post(format!("{}/qwen/status/429", f.apps[0].proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    wait_for(
        "the peer to cool down too",
        Duration::from_secs(5),
        || async { f.apps[1].credential("shared").await["state"] == "cooling_down" },
    )
    .await;
    let seen = f.apps[0].upstream.seen().len();
    assert_eq!(
        chat(&f.apps[1]).await,
        429,
        "the peer does not spend a request on the cooled credential"
    );
    assert_eq!(f.apps[0].upstream.seen().len(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_gets_the_records_back_and_requests_keep_working() {
    let mut redis = Redis::start();
    let f = fleet(2, &redis, 3600, "poll_interval = \"300ms\"").await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    // Both replicas hold the refreshed token in memory (not only in Redis).
    both_on_one_token(&f).await;
    redis.restart_empty();
    assert_eq!(redis.cli(&["EXISTS", "tokenrelay:{qwen/shared}:rec"]), "0");
    // Requests never wait on Redis: served from memory meanwhile.
    for app in &f.apps {
        assert_eq!(chat(app).await, 200);
    }
    wait_for(
        "the record re-asserted",
        Duration::from_secs(10),
        || async {
            redis
                .cli(&["HGET", "tokenrelay:{qwen/shared}:rec", "v"])
                .parse::<u64>()
                .unwrap_or(0)
                >= 2
        },
    )
    .await;
    let doc: Value =
        serde_json::from_str(&redis.cli(&["HGET", "tokenrelay:{qwen/shared}:rec", "doc"])).unwrap();
    let rt = doc["refresh_token"].as_str().unwrap();
    assert!(
        rt.starts_with("refresh-"),
        "the rotated refresh token came back, not the file's: {rt}"
    );
    let (_, ready) = f.apps[0].admin_json("/readyz").await;
    assert_eq!(ready["store"]["up"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_bounds_latency_and_marks_the_store_down() {
    paused_redis(
        |r| unsafe {
            libc::kill(r.child.id() as i32, libc::SIGSTOP);
        },
        |r| unsafe {
            libc::kill(r.child.id() as i32, libc::SIGCONT);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_paused_redis_bounds_latency_and_marks_the_store_down() {
    // The server answers connections but holds every command (a failover's pause); it
    // resumes by itself after the timeout.
    paused_redis(
        |r| assert_eq!(r.cli(&["CLIENT", "PAUSE", "4000", "ALL"]), "OK"),
        |r| assert_eq!(r.cli(&["CLIENT", "UNPAUSE"]), "OK"),
    )
    .await;
}

/// Requests keep being served from memory, a manual refresh gives up in bounded time with
/// a clear error, the store is reported down, and everything is back once Redis is.
async fn paused_redis(pause: impl Fn(&Redis), resume: impl Fn(&Redis)) {
    let redis = Redis::start();
    let f = fleet(
        1,
        &redis,
        3600,
        "op_timeout = \"500ms\"\npoll_interval = \"200ms\"",
    )
    .await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    let calls = f.tokens.calls();
    pause(&redis);
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(chat(&f.apps[0]).await, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "requests never wait on Redis: {:?}",
        started.elapsed()
    );
    // A rotating credential is not refreshed without its lease: refused, not stuck.
    let started = Instant::now();
    let (status, body) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the refresh gave up in {:?}",
        started.elapsed()
    );
    assert_ne!(status, 200, "{body}");
    assert!(
        body.to_string().contains("fleet store is unreachable"),
        "{body}"
    );
    assert_eq!(
        f.tokens.calls(),
        calls,
        "no refresh token spent without the lease"
    );
    wait_for("store down", Duration::from_secs(5), || async {
        f.apps[0].metrics().await.contains("tokenrelay_store_up 0")
    })
    .await;
    let (_, ready) = f.apps[0].admin_json("/readyz").await;
    assert_eq!(ready["store"]["up"], false, "{ready}");
    assert!(ready["store"]["message"]
        .as_str()
        .unwrap()
        .contains("rotating credentials do not refresh"));
    assert_eq!(chat(&f.apps[0]).await, 200);
    resume(&redis);
    wait_for("store up", Duration::from_secs(5), || async {
        f.apps[0].metrics().await.contains("tokenrelay_store_up 1")
    })
    .await;
    let (status, body) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_stale_release_or_renew_after_a_takeover_is_a_no_op() {
    use tokenrelay::store::redis::{
        release_if_held, renew_if_held, Fleet as RedisFleet, RedisConfig,
    };
    struct NoMetrics;
    impl tokenrelay::store::redis::FleetMetrics for NoMetrics {
        fn operation(&self, _: &str, _: bool) {}
        fn up(&self, _: bool) {}
    }
    let redis = Redis::start();
    let fleet = RedisFleet::new(
        RedisConfig {
            url: format!("redis://127.0.0.1:{}", redis.port).into(),
            key_prefix: "t".into(),
            lease: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            pubsub: false,
            op_timeout: Duration::from_secs(1),
            limit_timeout: Duration::from_millis(100),
            encryption_key: None,
            previous_keys: Vec::new(),
            tls_ca: None,
        },
        Arc::new(NoMetrics),
    )
    .unwrap();
    let key = "t:{p/c}:lease";
    assert_eq!(redis.cli(&["SET", key, "1:a:x", "PX", "100"]), "OK");
    std::thread::sleep(Duration::from_millis(200));
    // B takes over after A's lease expired.
    assert_eq!(redis.cli(&["SET", key, "2:b:y", "NX", "PX", "5000"]), "OK");
    assert!(
        !renew_if_held(&fleet, key, "1:a:x", 5000).unwrap(),
        "A cannot renew B's lease"
    );
    assert!(
        !release_if_held(&fleet, key, "1:a:x").unwrap(),
        "A cannot release B's lease"
    );
    assert_eq!(redis.cli(&["GET", key]), "2:b:y");
    assert!(renew_if_held(&fleet, key, "2:b:y", 5000).unwrap());
    assert!(release_if_held(&fleet, key, "2:b:y").unwrap());
    assert_eq!(redis.cli(&["EXISTS", key]), "0");
}

/// Holder A redeems the refresh token, then stalls (SIGSTOP) past its lease before it
/// commits. Replica B takes the lease, finds A's uncommitted attempt at the current version
/// and waits instead of spending the same refresh token; A continues, its late commit (a
/// compare-and-set on the version, not fenced by the lease) lands, and B adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stalled_past_its_lease_after_redeeming_still_commits_and_peers_adopt_it() {
    let redis = Redis::start();
    let (a, b, tokens, _up, _dir) = two_processes(
        &redis,
        "8s",
        ("TOKENRELAY_TEST_PAUSE_BEFORE_COMMIT_MS", "1500"),
    )
    .await;
    let http = reqwest::Client::new();
    let a_refresh = force(&http, &a.admin);
    wait_for("A to redeem", Duration::from_secs(5), || async {
        tokens.calls() == 1
    })
    .await;
    a.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(1600)).await; // A's 1 s lease is gone
    let b_refresh = force(&http, &b.admin);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        tokens.calls(),
        1,
        "B waits on A's uncommitted attempt instead of redeeming"
    );
    a.signal(libc::SIGCONT);
    assert_eq!(a_refresh.await.unwrap(), 200);
    assert_eq!(b_refresh.await.unwrap(), 200);
    assert_eq!(
        tokens.state.refused.load(Ordering::SeqCst),
        0,
        "no refresh token was spent twice:\n{}",
        b.logs()
    );
    let v: u64 = redis
        .cli(&["HGET", "tokenrelay:{qwen/shared}:rec", "v"])
        .parse()
        .unwrap();
    assert!(v >= 2, "A's late commit landed (version {v})");
    let b_view = get_json(&http, format!("{}/admin/credentials", b.admin)).await;
    assert_eq!(b_view["credentials"][0]["state"], "ready", "{b_view}");
}

/// Starts replica A (with a test pause `hook`) and replica B on one credential file and one
/// Redis with a 1 s lease and `grace`; returns them with the fakes.
async fn two_processes(
    redis: &Redis,
    grace: &str,
    hook: (&str, &str),
) -> (
    crate::process::Proc,
    crate::process::Proc,
    FakeTokenEndpoint,
    FakeUpstream,
    tempfile::TempDir,
) {
    use crate::process::Proc;
    let valid = ValidTokens::default();
    let tokens = FakeTokenEndpoint::start(Flavor::Qwen, valid.clone()).await;
    let upstream = FakeUpstream::start(Flavor::Qwen, valid).await;
    tokens.allow_refresh_token("rt-0");
    tokens.allow_client(QWEN_CLIENT);
    let dir = tempfile::tempdir().unwrap();
    let cred = write_cred(dir.path(), "shared.json", &qwen_cred("a0", "rt-0"));
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[refresh]\ntimeout = \"3s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\nlease = \"1s\"\ngrace = \"{grace}\"\npoll_interval = \"300ms\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]\n",
            redis.port,
            upstream.url,
            tokens.url,
            cred.display()
        ),
    )
    .unwrap();
    let mut a_cmd = std::process::Command::new(crate::process::BIN);
    a_cmd.arg("--config").arg(&config).env(hook.0, hook.1);
    let a = Proc::spawn_cmd(a_cmd, &dir.path().join("a.log"));
    let b = Proc::spawn(&config, &dir.path().join("b.log"));
    (a, b, tokens, upstream, dir)
}

fn force(http: &reqwest::Client, admin: &str) -> tokio::task::JoinHandle<u16> {
    let (http, url) = (
        http.clone(),
        format!("{admin}/admin/credentials/qwen/shared/refresh"),
    );
    tokio::spawn(async move {
        http.post(url)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

/// The holder dies holding the lease before it went to the token endpoint: no attempt was
/// marked, so once the lease expires the next replica refreshes at once; one redemption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_before_the_token_call_leaves_nothing_spent() {
    let redis = Redis::start();
    let (mut a, b, tokens, _up, _dir) = two_processes(
        &redis,
        "5s",
        ("TOKENRELAY_TEST_PAUSE_BEFORE_REDEEM_MS", "3000"),
    )
    .await;
    let http = reqwest::Client::new();
    let _a_refresh = force(&http, &a.admin);
    wait_for("A to hold the lease", Duration::from_secs(5), || async {
        redis.cli(&["EXISTS", "tokenrelay:{qwen/shared}:lease"]) == "1"
    })
    .await;
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let started = Instant::now();
    assert_eq!(force(&http, &b.admin).await.unwrap(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "no grace wait without an attempt: {:?}",
        started.elapsed()
    );
    assert_eq!(tokens.calls(), 1, "one redemption, by B");
    assert_eq!(tokens.state.refused.load(Ordering::SeqCst), 0);
}

/// The holder dies after the token endpoint answered and before it committed: the new
/// refresh token died with it. The successor sees the uncommitted attempt and waits
/// `grace` before spending the old refresh token again; against a strictly rotating server
/// that refresh is refused and the credential says it needs re-authentication (the known
/// limit: README "When Redis fails" and ARCHITECTURE's fleet table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_between_answer_and_commit_makes_the_successor_wait_grace() {
    let redis = Redis::start();
    let (mut a, b, tokens, _up, _dir) = two_processes(
        &redis,
        "2s",
        ("TOKENRELAY_TEST_PAUSE_BEFORE_COMMIT_MS", "5000"),
    )
    .await;
    let http = reqwest::Client::new();
    let _a_refresh = force(&http, &a.admin);
    wait_for("A to redeem", Duration::from_secs(5), || async {
        tokens.calls() == 1
    })
    .await;
    a.child.kill().unwrap();
    let _ = a.child.wait();
    tokio::time::sleep(Duration::from_millis(1100)).await; // A's lease expires
    let started = Instant::now();
    let status = force(&http, &b.admin).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "B waited grace first: {:?}",
        started.elapsed()
    );
    assert_eq!(status, 502, "the refresh token A spent is refused");
    assert_eq!(tokens.state.refused.load(Ordering::SeqCst), 1);
    let v: Value = get_json(&http, format!("{}/admin/credentials", b.admin)).await;
    assert_eq!(v["credentials"][0]["state"], "needs_reauth", "{v}");
}

/// A TCP relay in front of Redis that can cut one replica's subscriber connection: while
/// `cut` is set, it drops every connection (open or new) whose client sent SUBSCRIBE.
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

async fn relay(to: u16) -> Relay {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (c, d) = (Arc::clone(&cut), Arc::clone(&dropped));
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let (cut, dropped) = (Arc::clone(&c), Arc::clone(&d));
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let mut subscriber = false;
                let (mut a, mut b) = ([0u8; 16 << 10], [0u8; 16 << 10]);
                loop {
                    if subscriber && cut.load(Ordering::SeqCst) {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    tokio::select! {
                        n = client.read(&mut a) => {
                            let Ok(n) = n else { return };
                            if n == 0 { return }
                            if a[..n].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE")) {
                                subscriber = true;
                                if cut.load(Ordering::SeqCst) {
                                    dropped.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                            }
                            if server.write_all(&a[..n]).await.is_err() { return }
                        }
                        n = server.read(&mut b) => {
                            let Ok(n) = n else { return };
                            if n == 0 { return }
                            if client.write_all(&b[..n]).await.is_err() { return }
                        }
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            });
        }
    });
    Relay { port, cut, dropped }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_subscriber_connection_cut_a_replica_adopts_by_polling() {
    let redis = Redis::start();
    let relay = relay(redis.port).await;
    // Replica 0 talks to Redis directly, replica 1 through the relay.
    let mut f = fleet(1, &redis, 3600, "poll_interval = \"300ms\"").await;
    let mut b = TestApp::empty().await;
    b.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\npoll_interval = \"300ms\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]",
        relay.port,
        f.apps[0].upstream.url,
        f.tokens.url,
        f.apps[0].cred_path("shared.json").display()
    ))
    .await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    wait_for(
        "B on the refreshed token",
        Duration::from_secs(5),
        || async {
            b.credential("shared").await["expires_at"]
                == f.apps[0].credential("shared").await["expires_at"]
        },
    )
    .await;
    relay.cut.store(true, Ordering::SeqCst);
    wait_for("the subscriber cut", Duration::from_secs(5), || async {
        relay.dropped.load(Ordering::SeqCst) >= 1
    })
    .await;
    let before = b.credential("shared").await["expires_at"].clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_eq!(status, 200);
    let started = Instant::now();
    wait_for("B to adopt by polling", Duration::from_secs(3), || async {
        b.credential("shared").await["expires_at"] != before
    })
    .await;
    eprintln!(
        "adopted {:?} after the refresh, subscriber cut",
        started.elapsed()
    );
    assert_eq!(f.tokens.state.refused.load(Ordering::SeqCst), 0);
    assert_eq!(chat(&b).await, 200);
    f.apps.push(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_found_dead_by_one_replica_is_dead_for_all() {
    let redis = Redis::start();
    let f = fleet(2, &redis, 3600, "poll_interval = \"300ms\"").await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    both_on_one_token(&f).await;
    let doc: Value =
        serde_json::from_str(&redis.cli(&["HGET", "tokenrelay:{qwen/shared}:rec", "doc"])).unwrap();
    f.tokens.revoke(doc["refresh_token"].as_str().unwrap());
    let (status, _) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_ne!(status, 200);
    let calls = f.tokens.calls();
    wait_for("the peer to know", Duration::from_secs(5), || async {
        f.apps[1].credential("shared").await["state"] == "needs_reauth"
    })
    .await;
    let peer = f.apps[1].credential("shared").await;
    assert!(
        peer["last_error"]
            .as_str()
            .unwrap()
            .contains("another replica"),
        "{peer}"
    );
    assert_eq!(
        f.tokens.calls(),
        calls,
        "the peer spent no call to learn it"
    );
}

/// The `[store]` table of the key-pool replicas.
fn key_store(redis: &Redis) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\npoll_interval = \"300ms\"",
        redis.port
    )
}

/// Two replicas sharing a pool of Gemini API keys (no records: keys are configuration).
async fn key_fleet(redis: &Redis, up: &crate::keys::KeyUpstream, keys: &str) -> Vec<TestApp> {
    let store = key_store(redis);
    let mut apps = Vec::new();
    for _ in 0..2 {
        apps.push(crate::keys::relay("gemini", &up.url, keys, &store).await);
    }
    apps
}

async fn generate(t: &TestApp, model: &str) -> u16 {
    let path = format!("/gemini/v1beta/models/{model}:generateContent");
    post_status(t, &path, &crate::keys::gemini_body()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_on_one_replica_leaves_every_rotation_and_comes_back_everywhere() {
    use crate::keys::{Key, KeyUpstream};
    let redis = Redis::start();
    let up = KeyUpstream::start(
        false,
        &[("AIza-good", Key::Good), ("AIza-dead", Key::Invalid)],
    )
    .await;
    let apps = key_fleet(
        &redis,
        &up,
        "api_keys = [{ key = \"AIza-good\", id = \"good\" }, { key = \"AIza-dead\", id = \"dead\" }]",
    )
    .await;
    let (a, b) = (&apps[0], &apps[1]);
    // Replica A meets the dead key (round robin reaches it within two requests).
    for _ in 0..2 {
        assert_eq!(generate(a, "gemini-2.5-flash").await, 200);
    }
    assert_eq!(up.hits_for("AIza-dead"), 1);
    assert_eq!(a.credential("dead").await["state"], "invalid");
    // Replica B takes it out of rotation without sending it anything.
    wait_for("the peer's verdict", Duration::from_secs(5), || async {
        b.credential("dead").await["state"] == "invalid"
    })
    .await;
    let c = b.credential("dead").await;
    let err = c["last_error"].as_str().unwrap();
    assert!(
        err.contains("API_KEY_INVALID") && err.contains("another replica"),
        "{err}"
    );
    for _ in 0..10 {
        assert_eq!(generate(b, "gemini-2.5-flash").await, 200);
    }
    assert_eq!(up.hits_for("AIza-dead"), 1, "B never tried the dead key");
    let state = redis.cli(&["HGET", "tokenrelay:{gemini/dead}:state", "invalid"]);
    assert!(
        !state.contains("AIza"),
        "the verdict names a fingerprint, never the key: {state}"
    );
    // An operator brings it back on B (the key was re-enabled): A takes it back too.
    let (status, _) = b.admin_post("/admin/credentials/gemini/dead/refresh").await;
    assert_eq!(status, 200);
    wait_for("A brings it back", Duration::from_secs(5), || async {
        a.credential("dead").await["state"] == "ready"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_lost_with_redis_is_written_back_and_a_replaced_key_is_not_judged_by_it() {
    use crate::keys::{Key, KeyUpstream};
    let mut redis = Redis::start();
    let up = KeyUpstream::start(
        false,
        &[("AIza-good", Key::Good), ("AIza-dead", Key::Invalid)],
    )
    .await;
    let keys = "api_keys = [{ key = \"AIza-good\", id = \"good\" }, { key = \"AIza-dead\", id = \"dead\" }]";
    let apps = key_fleet(&redis, &up, keys).await;
    for _ in 0..2 {
        assert_eq!(generate(&apps[0], "gemini-2.5-flash").await, 200);
    }
    assert_eq!(apps[0].credential("dead").await["state"], "invalid");
    redis.restart_empty();
    wait_for(
        "the verdict written back",
        Duration::from_secs(10),
        || async {
            redis
                .cli(&["HGET", "tokenrelay:{gemini/dead}:state", "invalid"])
                .starts_with('k')
        },
    )
    .await;
    wait_for("the peer's verdict", Duration::from_secs(5), || async {
        apps[1].credential("dead").await["state"] == "invalid"
    })
    .await;
    // A third replica where the operator put a new key under the same id: the verdict was
    // about the old key.
    let fresh =
        KeyUpstream::start(false, &[("AIza-good", Key::Good), ("AIza-new", Key::Good)]).await;
    let store = key_store(&redis);
    let c = crate::keys::relay(
        "gemini",
        &fresh.url,
        "api_keys = [{ key = \"AIza-good\", id = \"good\" }, { key = \"AIza-new\", id = \"dead\" }]",
        &store,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(c.credential("dead").await["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_model_quota_seen_by_one_replica_is_honoured_by_the_other() {
    use crate::keys::{Key, KeyUpstream};
    let redis = Redis::start();
    let up = KeyUpstream::start(false, &[("AIza-one", Key::QuotaFor("gemini-2.5-pro"))]).await;
    let apps = key_fleet(
        &redis,
        &up,
        "api_keys = [{ key = \"AIza-one\", id = \"one\" }]",
    )
    .await;
    assert_eq!(generate(&apps[0], "gemini-2.5-pro").await, 429);
    wait_for(
        "the peer cools the model",
        Duration::from_secs(5),
        || async {
            apps[1].credential("one").await["model_cooldowns"][0]["model"] == "gemini-2.5-pro"
        },
    )
    .await;
    // The reason travels with it: a per-day quota, on the peer too.
    let peer = apps[1].credential("one").await;
    assert_eq!(peer["cooldowns"][0]["reason"], "per_day", "{peer}");
    let hits = up.hits().len();
    assert_eq!(generate(&apps[1], "gemini-2.5-pro").await, 429);
    assert_eq!(up.hits().len(), hits, "the peer did not spend a request");
    assert_eq!(
        generate(&apps[1], "gemini-2.5-flash").await,
        200,
        "other models serve"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_peers_token_after_redis_returns_clears_the_failures_it_fixes() {
    let redis = Redis::start();
    let f = fleet(
        2,
        &redis,
        3600,
        "op_timeout = \"300ms\"\npoll_interval = \"200ms\"",
    )
    .await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    both_on_one_token(&f).await;
    // Redis stops answering: replica B's refresh fails (it is not refreshed without Redis).
    unsafe {
        libc::kill(redis.child.id() as i32, libc::SIGSTOP);
    }
    let (status, body) = f.apps[1]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_ne!(status, 200, "{body}");
    let b = f.apps[1].credential("shared").await;
    assert_eq!(b["state"], "backoff", "{b}");
    let error = b["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("the fleet store is unreachable") && !error.contains("refresh lock"),
        "one message, not two run together: {error}"
    );
    unsafe {
        libc::kill(redis.child.id() as i32, libc::SIGCONT);
    }
    // Redis is back; replica A refreshes; B adopts A's token and with it its health.
    wait_for("the store back on A", Duration::from_secs(5), || async {
        f.apps[0].admin_json("/readyz").await.1["store"]["up"] == true
    })
    .await;
    let (status, body) = f.apps[0]
        .admin_post("/admin/credentials/qwen/shared/refresh")
        .await;
    assert_eq!(status, 200, "{body}");
    let a_expiry = f.apps[0].credential("shared").await["expires_at"].clone();
    wait_for("B adopts A's token", Duration::from_secs(5), || async {
        f.apps[1].credential("shared").await["expires_at"] == a_expiry
    })
    .await;
    let b = f.apps[1].credential("shared").await;
    assert_eq!(b["state"], "ready", "{b}");
    assert_eq!(b["last_error"], Value::Null, "{b}");
    assert_eq!(b["consecutive_failures"], 0, "{b}");
}

/// Three replicas with one declared limit, as configured on a real Redis.
async fn limited_fleet(redis: &Redis, up: &crate::keys::KeyUpstream) -> Vec<TestApp> {
    let store = format!("{}\nlimit_timeout = \"2s\"", key_store(redis));
    let keys = r#"api_keys = [{ key = "AIza-a", id = "a", project = "p1" }, { key = "AIza-b", id = "b", project = "p1" }]
[providers.gemini.limits]
"gemini-2.5-pro" = { rpm = 5 }"#;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(crate::keys::relay("gemini", &up.url, keys, &store).await);
    }
    apps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_declared_limit_through_redis() {
    use crate::keys::{Key, KeyUpstream};
    let redis = Redis::start();
    let up = KeyUpstream::start(false, &[("AIza-a", Key::Good), ("AIza-b", Key::Good)]).await;
    let apps = limited_fleet(&redis, &up).await;
    for app in &apps {
        // The counting connection opens in the background at start-up.
        wait_for(
            "limits counted in Redis",
            Duration::from_secs(5),
            || async { app.admin_json("/readyz").await.1["store"]["limits_shared"] == true },
        )
        .await;
    }
    loop {
        // Start early in a minute, so that the window does not turn mid-burst.
        let second = (now_ms() / 1000) % 60;
        if second < 45 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let minute = now_ms() / 60_000;
    // 3 replicas × 6 concurrent requests for one project's model limited to 5 a minute.
    let mut all = Vec::new();
    for app in &apps {
        for _ in 0..6 {
            all.push(generate(app, "gemini-2.5-pro"));
        }
    }
    let statuses = futures_util::future::join_all(all).await;
    assert_eq!(now_ms() / 60_000, minute, "the minute turned mid-burst");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 13);
    assert_eq!(up.hits().len(), 5, "the fleet sent the limit, not 3× it");
    // Another model is not limited.
    assert_eq!(generate(&apps[2], "gemini-2.5-flash").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_one_client_limit_and_share_its_usage_through_redis() {
    use crate::usage::generate_as;
    let redis = Redis::start();
    let up = crate::usage::usage_upstream().await;
    // Each answer reports 52 tokens (12 prompt, 34 completion, 6 thoughts).
    let top = format!(
        r#"{}
limit_timeout = "2s"
[[clients]]
name = "bot"
key = "ck-bot"
rpm = 4
[[clients]]
name = "saver"
key = "ck-saver"
tokens_per_day = 100"#,
        key_store(&redis)
    );
    let keys = r#"api_keys = [{ key = "AIza-a", id = "a" }]"#;
    let apps = [
        crate::keys::relay("gemini", &up.url, keys, &top).await,
        crate::keys::relay("gemini", &up.url, keys, &top).await,
    ];
    for app in &apps {
        wait_for(
            "limits counted in Redis",
            Duration::from_secs(5),
            || async { app.admin_json("/readyz").await.1["store"]["limits_shared"] == true },
        )
        .await;
    }
    // No store.encryption_key: /readyz says the records are not sealed.
    let (_, ready) = apps[0].admin_json("/readyz").await;
    assert_eq!(ready["store"]["sealed"], false, "{ready}");
    crate::quota::early_in_a_minute(15).await;
    let minute = now_ms() / 60_000;
    let burst = apps
        .iter()
        .flat_map(|app| (0..4).map(move |_| generate_as(app, "ck-bot", "gemini-2.5-flash")));
    let answers = futures_util::future::join_all(burst).await;
    assert_eq!(now_ms() / 60_000, minute, "the minute turned mid-burst");
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert!(answers
        .iter()
        .filter(|a| a.status == 429)
        .all(|a| a.body["error"]["reason"] == "client_rate_limited"));
    // A day's budget spent on one replica is spent on the other.
    for _ in 0..2 {
        assert_eq!(
            generate_as(&apps[0], "ck-saver", "gemini-2.5-flash")
                .await
                .status,
            200
        );
    }
    wait_for("the tokens reach Redis", Duration::from_secs(5), || async {
        let keys = redis.cli(&["--scan", "--pattern", "*client/saver*:d:*"]);
        keys.lines()
            .next()
            .is_some_and(|k| redis.cli(&["GET", k]) == "104")
    })
    .await;
    let r = generate_as(&apps[1], "ck-saver", "gemini-2.5-flash").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["reason"], "client_budget_exhausted");
    assert_eq!(up.hits().len(), 6, "refusals never reached the upstream");
    // Usage history is the fleet's: either replica answers for both.
    wait_for(
        "both replicas' usage in Redis",
        Duration::from_secs(5),
        || async {
            let (_, usage) = apps[1].admin_json("/admin/usage?by=client&since=1h").await;
            usage["store"] == "redis" && usage["total"]["answers"] == 6
        },
    )
    .await;
    let (_, usage) = apps[0].admin_json("/admin/usage?by=client&since=1h").await;
    let rows = usage["rows"].as_array().unwrap();
    let tokens = |c: &str| {
        rows.iter()
            .find(|r| r["client"] == c)
            .map(|r| r["tokens"].clone())
    };
    assert_eq!(tokens("bot"), Some(json!(208)), "{usage}");
    assert_eq!(tokens("saver"), Some(json!(104)), "{usage}");
    // The windows shown are the fleet's: replica B never served "saver".
    let (_, on_b) = apps[1].admin_json("/admin/usage").await;
    let saver = on_b["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "saver")
        .cloned()
        .unwrap();
    assert_eq!(saver["counted_by"], "fleet", "{saver}");
    assert_eq!(saver["spent"]["tokens_today"], 104, "{saver}");
    // Usage went in batches applied once (their markers are in Redis).
    assert!(!redis
        .cli(&["--scan", "--pattern", "*:use:{use}:batch:*"])
        .is_empty());
}

/// Every value in Redis, as text (hashes field by field).
fn everything(redis: &Redis) -> String {
    let mut all = String::new();
    for key in redis.cli(&["--scan"]).lines() {
        let value = match redis.cli(&["TYPE", key]).as_str() {
            "hash" => redis.cli(&["HGETALL", key]),
            "string" => redis.cli(&["GET", key]),
            _ => continue,
        };
        all.push_str(key);
        all.push('\n');
        all.push_str(&value);
        all.push('\n');
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_records_hold_no_token_rotate_to_a_new_key_and_refuse_a_wrong_one_clearly() {
    use base64::Engine as _;
    let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    let (k1, k2, k3) = (b64(1), b64(2), b64(3));
    let redis = Redis::start();
    let f = fleet(2, &redis, 3600, &format!("encryption_key = \"{k1}\"")).await;
    assert_eq!(chat(&f.apps[0]).await, 200);
    both_on_one_token(&f).await;
    let (_, ready) = f.apps[0].admin_json("/readyz").await;
    assert_eq!(ready["store"]["sealed"], true, "{ready}");
    // After a refresh, nothing in Redis reads as a token.
    let all = everything(&redis);
    assert!(all.contains("tr1."), "{all}");
    for secret in ["rt-", "refresh_token", "access_token", "stale"] {
        assert!(!all.contains(secret), "{secret} readable in Redis: {all}");
    }
    let rec_key = redis
        .cli(&["--scan", "--pattern", "*qwen/shared*:rec"])
        .lines()
        .next()
        .unwrap()
        .to_string();
    let doc = |r: &Redis| r.cli(&["HGET", &rec_key, "doc"]);
    let sealed_k1 = doc(&redis);
    let id1 = sealed_k1.split('.').nth(1).unwrap().to_string();
    let cred = f.apps[0].cred_path("shared.json");
    let (up, token_url) = (f.apps[0].upstream.url.clone(), f.tokens.url.clone());
    let mut f = f;
    for a in &mut f.apps {
        a.app.take().unwrap().shutdown().await;
    }
    let toml = |extra: String| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n{extra}\n[providers.qwen]\nupstream = \"{up}\"\ntoken_url = \"{token_url}\"\ncredentials = [\"{}\"]",
            redis.port,
            cred.display()
        )
    };
    let refused = |extra: String| {
        let config = TestApp::config(&toml(extra));
        async move {
            match tokenrelay::App::start(config).await {
                Ok(_) => panic!("started with a key that does not open the record"),
                Err(e) => format!("{e:#}"),
            }
        }
    };
    // A wrong key: start-up says what is wrong and what to do; Redis is unchanged.
    let error = refused(format!("encryption_key = \"{k3}\"")).await;
    assert!(
        error.contains(&id1) && error.contains("previous_keys") && error.contains("qwen/shared"),
        "{error}"
    );
    assert_eq!(doc(&redis), sealed_k1, "nothing overwritten");
    // No key at all, with the credential file changed (which would import it): refused,
    // and the sealed record is not replaced by the file.
    let original = std::fs::read(&cred).unwrap();
    let mut changed: serde_json::Value = serde_json::from_slice(&original).unwrap();
    changed["note"] = json!("edited");
    std::fs::write(&cred, serde_json::to_vec(&changed).unwrap()).unwrap();
    let error = refused(String::new()).await;
    assert!(error.contains("no store.encryption_key"), "{error}");
    assert_eq!(doc(&redis), sealed_k1, "not imported over a sealed record");
    std::fs::write(&cred, &original).unwrap();
    // A record moved to another name (here: under another key prefix) does not open.
    let moved_key = rec_key.replacen("tokenrelay:", "moved:", 1);
    let fields = redis.cli(&["HGETALL", &rec_key]);
    let mut args = vec!["HSET", moved_key.as_str()];
    args.extend(fields.lines());
    redis.cli(&args);
    let error = refused(format!("key_prefix = \"moved\"\nencryption_key = \"{k1}\"")).await;
    assert!(error.contains("does not open"), "{error}");
    let version = redis.cli(&["HGET", &rec_key, "v"]);
    let mut rotated = TestApp::empty().await;
    // Rotation: the new key with the old one as previous: read, and sealed again.
    rotated
        .launch(&toml(format!(
            "encryption_key = \"{k2}\"\nprevious_keys = [\"{k1}\"]"
        )))
        .await;
    let c = rotated.credential("shared").await;
    assert_eq!(c["state"], "ready", "{c}");
    let resealed = doc(&redis);
    assert!(
        resealed.starts_with("tr1.") && !resealed.contains(&id1),
        "{resealed}"
    );
    // Sealed again in place: the same version (a refresh in flight on a peer, its attempt
    // marker and the verdicts, all keyed by version, are untouched).
    assert_eq!(redis.cli(&["HGET", &rec_key, "v"]), version);
    assert_eq!(chat(&rotated).await, 200);
}

/// A `redis-server` speaking only TLS (a throwaway CA from `scripts/test-ca.sh`), whose
/// default user is off and whose one ACL user is `tr` / `s3cret`.
struct TlsRedis {
    server: Redis,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let made = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-ca.sh"))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(made.success());
        let port = free_port();
        let file = |n: &str| dir.path().join(n).display().to_string();
        let (cert, key, ca) = (file("leaf.pem"), file("leaf.key"), file("ca.pem"));
        let tls_port = port.to_string();
        let args = [
            "--port",
            "0",
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "tr",
            "on",
            ">s3cret",
            "~*",
            "&*",
            "+@all",
        ];
        TlsRedis {
            server: Redis::spawn(dir, port, &args),
        }
    }

    fn ca(&self) -> String {
        self.server.dir.path().join("ca.pem").display().to_string()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &self.server.port.to_string(),
                "--tls",
                "--cacert",
                &self.ca(),
            ])
            .args(["--user", "tr", "--pass", "s3cret", "--no-auth-warning"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// `tokenrelay check` on `config` (the real binary): its exit code and what it printed.
fn check(dir: &std::path::Path, config: &str) -> (i32, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
        .args(["check", "--config", &path.display().to_string()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_an_acl_user_and_a_private_ca_works_and_check_says_what_is_wrong() {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let redis = TlsRedis::start();
    let store = |url: &str, ca: bool| {
        format!(
            "[store]\nkind = \"redis\"\nurl = \"{url}\"\n{}encryption_key = \"{key}\"\n",
            if ca {
                format!("tls_ca = \"{}\"\n", redis.ca())
            } else {
                String::new()
            }
        )
    };
    let good = format!("rediss://tr:s3cret@127.0.0.1:{}", redis.server.port);
    let t = spawn_app(Flavor::Qwen)
        .cred("shared.json", json!({"access_token": "stale", "refresh_token": "rt-0", "expiry_date": now_ms() - 1000}))
        .refresh_token("rt-0")
        .toml(&store(&good, true))
        .start()
        .await;
    assert_eq!(chat(&t).await, 200);
    let (_, ready) = t.admin_json("/readyz").await;
    assert_eq!(ready["store"]["up"], true, "{ready}");
    let doc = redis.cli(&["HGET", "tokenrelay:{qwen/shared}:rec", "doc"]);
    assert!(doc.starts_with("tr1."), "sealed over TLS: {doc}");
    let creds = t.cred_path("shared.json");
    let provider = format!(
        "[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]\n",
        t.upstream.url,
        t.tokens.url,
        creds.display()
    );
    // check: reachable, sealed, every record opens.
    let (code, out) = check(t.dir.path(), &format!("{}{provider}", store(&good, true)));
    assert!(out.contains("fleet store: reachable"), "{out}");
    assert!(out.contains("records: sealed with key"), "{out}");
    assert!(!out.contains("CANNOT OPEN"), "{out}");
    assert_eq!(code, 0, "{out}");
    // Without the CA: the server's certificate is not trusted, and check says where to look.
    let (code, out) = check(t.dir.path(), &format!("{}{provider}", store(&good, false)));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("NOT REACHABLE") && out.contains("tls_ca"),
        "{out}"
    );
    // A wrong ACL password: refused, said clearly, and the password is not printed.
    let wrong = format!("rediss://tr:n0pe-wrong@127.0.0.1:{}", redis.server.port);
    let (code, out) = check(t.dir.path(), &format!("{}{provider}", store(&wrong, true)));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("user or password"), "{out}");
    assert!(
        !out.contains("n0pe-wrong") && !out.contains("s3cret"),
        "{out}"
    );
}
