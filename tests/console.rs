//! The operator console: its assets and security headers, the login sessions behind it,
//! and — in a real Chromium — the page listing credentials, refreshing one, showing a
//! hint, and re-authenticating through a fake Google consent page.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::login::{auth_server, consent, CLIENT, SECRET};
use crate::webdriver::Browser;

/// tokenrelay with a ready credential and a revoked one, against the fake auth server.
async fn console_app(auth: &str) -> TestApp {
    let mut t = TestApp::empty().await;
    let creds = t.dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    write_cred(
        &creds,
        "good.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET,
        "refresh_token": "rt-good", "access_token": "at-good", "expires_at": (now_ms() / 1000 + 3000), "account": "good@example.com"}),
    );
    write_cred(
        &creds,
        "revoked.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET,
        "refresh_token": "rt-revoked", "account": "alice@example.com"}),
    );
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"http://127.0.0.1:9\"\nauthorize_url = \"{auth}/auth\"\ntoken_url = \"{auth}/token\"\ncredentials = [\"{}\"]",
        creds.display()
    ))
    .await;
    t
}

#[tokio::test]
async fn assets_carry_their_types_and_the_security_headers() {
    let (_auth, url) = auth_server().await;
    let t = console_app(&url).await;
    for (path, ty) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = t
            .http
            .get(format!("{}{path}", t.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ty),
            "{path}"
        );
        assert_eq!(h["content-security-policy"], "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
    }
    let page = t
        .http
        .get(format!("{}/ui", t.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "no inline script or style"
    );
    assert!(
        !page.contains("https://"),
        "no external fonts, scripts or CDNs"
    );
    let r = t
        .http
        .get(format!("{}/admin/credentials", t.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert!(v["server_time"].is_string());
    let good = v["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "good")
        .unwrap();
    assert_eq!(good["account"], "good@example.com");
    assert_eq!(good["login"], "gemini");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_session_completes_once_and_a_replayed_or_unknown_state_writes_nothing() {
    let (_auth, url) = auth_server().await;
    let t = console_app(&url).await;
    wait_for("needs_reauth", Duration::from_secs(5), || async {
        t.credential("revoked").await["state"] == "needs_reauth"
    })
    .await;
    let start = t
        .http
        .post(format!(
            "{}/admin/credentials/gemini/revoked/login",
            t.admin
        ))
        .header("origin", &t.admin)
        .header("x-tokenrelay", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 200);
    let s: Value = start.json().await.unwrap();
    let auth_url = s["authorization_url"].as_str().unwrap();
    assert!(
        auth_url.contains(&format!(
            "redirect_uri=http%3A%2F%2F127.0.0.1%3A{}%2Fui%2Foauth%2Fgoogle%2Fcallback",
            t.admin.rsplit(':').next().unwrap()
        )),
        "{auth_url}"
    );
    let session = s["session"].as_str().unwrap();
    let (_, pending) = t.admin_json(&format!("/admin/login/{session}")).await;
    assert_eq!(pending["status"], "pending");
    // A second login for the same credential waits for the first.
    let again = t
        .http
        .post(format!(
            "{}/admin/credentials/gemini/revoked/login",
            t.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);

    let unknown = t
        .http
        .get(format!(
            "{}/ui/oauth/google/callback?state=guess&code=c",
            t.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let callback = consent(auth_url).await;
    let r = t.http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let (_, done) = t.admin_json(&format!("/admin/login/{session}")).await;
    assert_eq!(done["status"], "done", "{done}");
    let file = read_json(&t.dir.path().join("creds/revoked.json"));
    assert_eq!(file["refresh_token"], "rt-login-0");
    wait_for("ready", Duration::from_secs(5), || async {
        t.credential("revoked").await["state"] == "ready"
    })
    .await;
    // The same redirect again: refused, nothing written.
    let replay = t.http.get(&callback).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert_eq!(
        read_json(&t.dir.path().join("creds/revoked.json"))["refresh_token"],
        "rt-login-0"
    );
}

#[tokio::test]
async fn logins_are_off_on_an_exposed_listener_without_a_token() {
    let (_auth, url) = auth_server().await;
    let mut t = TestApp::empty().await;
    let creds = t.dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    write_cred(
        &creds,
        "a.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET, "refresh_token": "r"}),
    );
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\nallow_unauthenticated = true\n[providers.gemini]\nupstream = \"http://127.0.0.1:9\"\nauthorize_url = \"{url}/auth\"\ntoken_url = \"{url}/token\"\ncredentials = [\"{}\"]",
        creds.display()
    ))
    .await;
    let r = t
        .http
        .post(format!(
            "{}/admin/credentials/gemini/a/login",
            t.admin.replace("0.0.0.0", "127.0.0.1")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_the_page_lists_refreshes_hints_and_re_authenticates() {
    let (auth, url) = auth_server().await;
    auth.refresh_tokens.lock().unwrap().push("rt-good".into());
    let t = console_app(&url).await;
    wait_for("needs_reauth", Duration::from_secs(5), || async {
        t.credential("revoked").await["state"] == "needs_reauth"
    })
    .await;
    let b = Browser::start().await;
    b.goto(&format!("{}/ui", t.admin)).await;
    b.wait_until(
        "rows",
        "document.querySelectorAll('#rows tr').length === 2",
        Duration::from_secs(10),
    )
    .await;
    let state = |id: &str| format!("document.querySelector('tr[data-id={id}]').dataset.state");
    assert_eq!(
        b.script(&format!("return {};", state("good"))).await,
        "ready"
    );
    assert_eq!(
        b.script(&format!("return {};", state("revoked"))).await,
        "needs_reauth"
    );
    // The countdown moves, computed against the server's clock.
    let expires = "document.querySelector('tr[data-id=good] [data-role=expires]').textContent";
    let first = b.script(&format!("return {expires};")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = b.script(&format!("return {expires};")).await;
    assert_ne!(first, second, "the countdown moves");
    assert!(first.as_str().unwrap().contains('m'), "{first}");
    // The revoked credential shows its hint.
    let hint = b
        .wait_until(
            "hint",
            "(document.querySelector('tr[data-id=revoked] [data-role=hint]') || {}).textContent",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        hint.as_str()
            .unwrap()
            .contains("tokenrelay login gemini gemini/revoked"),
        "{hint}"
    );
    // Refresh on a row calls the (fake) token endpoint; the row shows the new refresh.
    b.click("tr[data-id=good] button[data-action=refresh]")
        .await;
    b.wait_until("a refresh", "document.querySelector('tr[data-id=good] [data-role=last-refresh]').textContent !== 'never'", Duration::from_secs(10)).await;
    // The CSP holds: an inline script injected into the page does not run.
    b.script("const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s); return 0;").await;
    assert_eq!(
        b.script("return window.__inline === undefined;").await,
        true,
        "inline script blocked by the CSP"
    );
    b.script("window.scrollTo(0, 0); return 0;").await;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-before.png");
    std::fs::write(&out, b.screenshot().await).unwrap();
    // Re-authenticate: Google's (fake) consent page in a new tab, back to the admin listener.
    let main = b.windows().await[0].clone();
    b.click("tr[data-id=revoked] button[data-action=login]")
        .await;
    b.wait_until("the consent tab", "true", Duration::from_secs(1))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.windows().await.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no consent tab opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tabs = b.windows().await;
    let consent_tab = tabs.iter().find(|h| **h != main).unwrap().clone();
    b.switch_to(&consent_tab).await;
    b.wait_until(
        "the callback page",
        "document.body && document.body.textContent.includes('Signed in')",
        Duration::from_secs(10),
    )
    .await;
    b.switch_to(&main).await;
    b.wait_until(
        "the row to turn ready",
        &format!("{} === 'ready'", state("revoked")),
        Duration::from_secs(15),
    )
    .await;
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"));
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
}

/// A usage database with a month of history for three clients on two models and three
/// credentials (as if tokenrelay had been running), for the usage page.
fn seeded_usage(path: &std::path::Path) -> u64 {
    use tokenrelay::store::sqlite::UsageDb;
    use tokenrelay::usage::ledger::{Key, Sums};
    let db = UsageDb::open(Some(path)).unwrap();
    let now_s = now_ms() / 1000;
    let mut rows = Vec::new();
    let mut last_day = 0;
    let clients = [
        ("support-bot", 9),
        ("coding-agent", 5),
        ("nightly-evals", 2),
    ];
    // A row every 20 minutes for 30 days; more by day than by night (UTC), a quiet weekend.
    for i in 0..(30 * 72) {
        let minute = (now_s - i * 1200) / 60 * 60;
        let hour = (minute / 3600) % 24;
        let weekday = (minute / 86_400 + 4) % 7; // 1970-01-01 was a Thursday
        let busy = if (8..20).contains(&hour) { 3 } else { 1 } * if weekday >= 5 { 1 } else { 2 };
        for (n, (client, weight)) in clients.iter().enumerate() {
            let model = if (i + n as i64) % 3 == 0 {
                "gemini-2.5-pro"
            } else {
                "gemini-2.5-flash"
            };
            let prompt = (weight * busy * 140 + (i * 37 + n as i64 * 11) % 300) as u64;
            let completion = prompt / 3;
            let tokens = prompt + completion;
            if i < 72 {
                last_day += tokens;
            }
            rows.push((
                Key {
                    minute,
                    client: (*client).into(),
                    provider: "gemini".into(),
                    model: model.into(),
                    credential: ["team-a", "team-b", "adc"][(i as usize + n) % 3].into(),
                },
                Sums {
                    answers: 1,
                    unknown: 0,
                    prompt,
                    completion,
                    cached: prompt / 4,
                    thoughts: 0,
                    tokens,
                },
            ));
        }
    }
    db.add(&rows).unwrap();
    last_day
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_the_usage_page_charts_what_the_api_reports() {
    let mut t = TestApp::empty().await;
    let db = t.dir.path().join("usage.db");
    seeded_usage(&db);
    t.launch(&format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[usage]
path = "{}"
[[clients]]
name = "support-bot"
key = "ck-support"
tokens_per_day = 2000000
rpm = 600
[[clients]]
name = "coding-agent"
key = "ck-coding"
tokens_per_month = 40000000
[[clients]]
name = "nightly-evals"
key = "ck-evals"
tpm = 50000
[providers.gemini]
upstream = "http://127.0.0.1:9"
credentials = []
api_keys = [{{ key = "AIza-a", id = "team-a" }}, {{ key = "AIza-b", id = "team-b" }}]"#,
        db.display()
    ))
    .await;
    let (_, day) = t
        .admin_json("/admin/usage?by=client&since=24h&step=1h")
        .await;
    let (_, month) = t
        .admin_json("/admin/usage?by=client&since=30d&step=1d")
        .await;
    assert!(day["total"]["tokens"].as_u64().unwrap() > 0, "{day}");
    let b = Browser::start().await;
    b.goto(&format!("{}/ui/usage", t.admin)).await;
    b.wait_until(
        "the charts",
        "document.body.dataset.loaded === 'client'",
        Duration::from_secs(10),
    )
    .await;
    // Each chart adds up to what the API reports for its range, bar by bar.
    for (id, answer) in [("chart-day", &day), ("chart-month", &month)] {
        let drawn = b
            .script(&format!(
                "const s = document.querySelector('#{id} svg'); \
                 return [Number(s.dataset.total), [...s.querySelectorAll('rect')].reduce((a, r) => a + Number(r.dataset.tokens), 0)];"
            ))
            .await;
        let total = answer["total"]["tokens"].as_u64().unwrap();
        assert_eq!(drawn, json!([total, total]), "{id}");
    }
    let legend = b
        .script(
            "return [...document.querySelectorAll('#legend li')].map(l => l.textContent.trim());",
        )
        .await;
    assert_eq!(
        legend,
        json!(["support-bot", "coding-agent", "nightly-evals"]),
        "largest first"
    );
    let budget = b
        .script("return document.querySelector('tr[data-client=support-bot] td:nth-child(4)').textContent;")
        .await;
    assert!(
        budget.as_str().unwrap().trim().ends_with("/ 2,000,000"),
        "{budget}"
    );
    // Grouped by model instead.
    b.script("const s = document.getElementById('by'); s.value = 'model'; s.dispatchEvent(new Event('input')); return 0;")
        .await;
    b.wait_until(
        "the model charts",
        "document.body.dataset.loaded === 'model'",
        Duration::from_secs(10),
    )
    .await;
    let groups = b
        .script(
            "return [...document.querySelectorAll('#total-rows tr')].map(r => r.dataset.group);",
        )
        .await;
    assert_eq!(groups, json!(["gemini-2.5-flash", "gemini-2.5-pro"]));
    b.script("const s = document.getElementById('by'); s.value = 'client'; s.dispatchEvent(new Event('input')); window.scrollTo(0, 0); return 0;")
        .await;
    b.wait_until(
        "the client charts",
        "document.body.dataset.loaded === 'client'",
        Duration::from_secs(10),
    )
    .await;
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"));
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/usage.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
}
