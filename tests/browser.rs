//! No web page can use tokenrelay: DNS rebinding (a foreign Host) and cross-site requests
//! (a foreign Origin) are refused on both listeners before anything is forwarded.

use serde_json::Value;

use crate::helpers::*;

async fn app(extra: &str) -> TestApp {
    spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .refresh_token("rt-a")
        .toml(extra)
        .start()
        .await
}

fn port(base: &str) -> &str {
    base.rsplit(':').next().unwrap()
}

async fn reason(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["reason"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn a_rebound_host_is_refused_on_both_listeners_and_nothing_is_forwarded() {
    let t = app("").await;
    let proxy_host = format!("attacker.example:{}", port(&t.proxy));
    let admin_host = format!("attacker.example:{}", port(&t.admin));

    let resp = t
        .http
        .get(format!("{}/qwen/v1/models", t.proxy))
        .header("host", &proxy_host)
        .header("origin", format!("http://{proxy_host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (421, "forbidden_host".into()));

    let resp = t
        .http
        .post(format!("{}/admin/refresh", t.admin))
        .header("host", &admin_host)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 421);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("server.allowed_hosts"));

    let resp = t
        .http
        .get(format!("{}/admin/credentials", t.admin))
        .header("host", &admin_host)
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (421, "forbidden_host".into()));
    assert!(t.upstream.seen().is_empty(), "nothing reached the upstream");
    assert_eq!(t.tokens.calls(), 0, "no refresh was forced");

    // The same requests under the listener's own names are served.
    for host in [
        format!("127.0.0.1:{}", port(&t.proxy)),
        format!("localhost:{}", port(&t.proxy)),
    ] {
        let resp = t
            .http
            .get(format!("{}/qwen/v1/models", t.proxy))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = t
        .http
        .get(format!("{}/admin/credentials", t.admin))
        .header("host", format!("localhost:{}", port(&t.admin)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(t.upstream.seen().len(), 2);
}

#[tokio::test]
async fn an_allowed_hosts_entry_is_admitted() {
    let t = app("allowed_hosts = [\"tokenrelay\", \"*.svc.cluster.local\"]").await;
    for host in ["tokenrelay:8080", "tr.default.svc.cluster.local"] {
        let resp = t
            .http
            .get(format!("{}/qwen/v1/models", t.proxy))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
        let resp = t
            .http
            .get(format!("{}/readyz", t.admin))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
    }
    let resp = t
        .http
        .get(format!("{}/qwen/v1/models", t.proxy))
        .header("host", "other:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
}

#[tokio::test]
async fn cross_origin_posts_are_refused_and_same_origin_admin_posts_need_the_custom_header() {
    let t = app("").await;
    let evil = "http://evil.example";
    let resp = t
        .http
        .post(format!("{}/qwen/v1/chat/completions", t.proxy))
        .header("origin", evil)
        .header("content-type", "text/plain")
        .body("{\"model\":\"m\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (403, "forbidden_origin".into()));
    let resp = t
        .http
        .post(format!("{}/admin/refresh", t.admin))
        .header("origin", evil)
        .header("x-tokenrelay", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (403, "forbidden_origin".into()));
    // A no-cors GET (an <img> or <script> tag) carries only Sec-Fetch-Site.
    let resp = t
        .http
        .get(format!("{}/qwen/v1/models", t.proxy))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (403, "forbidden_origin".into()));
    assert!(t.upstream.seen().is_empty());
    assert_eq!(t.tokens.calls(), 0);

    // The operator page: same origin as the admin listener.
    let own = t.admin.clone();
    let resp = t
        .http
        .post(format!("{}/admin/refresh", t.admin))
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(reason(resp).await, (403, "forbidden_origin".into()));
    let resp = t
        .http
        .post(format!("{}/admin/refresh", t.admin))
        .header("origin", &own)
        .header("x-tokenrelay", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(t.tokens.calls(), 1, "the same-origin refresh ran");
    // Scripts and the CLI send no Origin and need no header.
    let (status, _) = t.admin_post("/admin/refresh").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn preflights_are_answered_locally_and_allowed_origins_get_cors_headers() {
    let t = app("allowed_origins = [\"http://localhost:3000\"]").await;
    let preflight = |origin: &'static str| {
        t.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/qwen/v1/chat/completions", t.proxy),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, authorization",
            )
            .send()
    };
    let resp = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );
    let resp = preflight("http://evil.example").await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(
        t.upstream.seen().is_empty(),
        "preflights are never forwarded"
    );

    let resp = t
        .http
        .post(format!("{}/qwen/v1/chat/completions", t.proxy))
        .header("origin", "http://localhost:3000")
        .json(&serde_json::json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(t.upstream.seen().len(), 1);
}

#[test]
fn bad_allowed_hosts_and_origins_are_config_errors_naming_the_key() {
    for (toml, key) in [
        (
            "[server]\nallowed_hosts = [\"http://x\"]",
            "server.allowed_hosts[0]",
        ),
        (
            "[server]\nallowed_origins = [\"*\"]",
            "server.allowed_origins[0]",
        ),
        (
            "[server]\nallowed_origins = [\"http://ok:1\", \"localhost:3000\"]",
            "server.allowed_origins[1]",
        ),
    ] {
        let err = tokenrelay::Config::from_toml(toml, "t.toml", &|_| None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
}
