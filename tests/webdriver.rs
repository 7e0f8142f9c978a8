//! A minimal W3C WebDriver client over HTTP for the browser tests: Debian's chromium
//! driven by chromedriver (installed by `.ci/run`; a browser that downloads itself cannot
//! work on this machine). Enough for navigate, find, click, text, script and screenshot.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::free_port;

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with the flags this machine needs.
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; .ci/run installs it)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync",
                     "--window-size=1400,900", format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"))
    }

    /// A WebDriver command: its value, or the error object the driver answered.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = self.http.request(method.clone(), &url);
        let req = if method == reqwest::Method::GET {
            req
        } else {
            req.json(&body)
        };
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            return Err(v["value"].clone());
        }
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// Runs a script in the page and returns its value.
    pub async fn script(&self, js: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": js, "args": []}),
        )
        .await
    }

    /// Polls `js` (an expression) until it is truthy.
    pub async fn wait_until(&self, what: &str, js: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.script(&format!("return ({js});")).await;
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element a CSS selector finds. The console redraws its rows as the state
    /// changes: an element replaced between finding and clicking is found again.
    pub async fn click(&self, css: &str) {
        for _ in 0..10 {
            let e = self
                .call(
                    reqwest::Method::POST,
                    "/element",
                    json!({"using": "css selector", "value": css}),
                )
                .await;
            let id = e
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .unwrap()
                .to_string();
            match self
                .try_call(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    json!({}),
                )
                .await
            {
                Ok(_) => return,
                Err(e) if e["error"] == "stale element reference" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("webdriver click on {css}: {e}"),
            }
        }
        panic!("{css} was replaced ten times in a row; never clicked");
    }

    pub async fn windows(&self) -> Vec<String> {
        let v = self
            .call(reqwest::Method::GET, "/window/handles", Value::Null)
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    }

    pub async fn switch_to(&self, handle: &str) {
        self.call(reqwest::Method::POST, "/window", json!({"handle": handle}))
            .await;
    }

    /// A PNG of the current page.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}
