//! The operator side: deploy files that agree with each other and with tokenrelay's own
//! config parser, alert rules that pass promtool's unit tests, metrics that pass
//! `promtool check metrics`, and a real Prometheus scraping a real tokenrelay.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokenrelay::proxy::browser::{BrowserGuard, Listener, Verdict};

use crate::helpers::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed (.ci/run installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_and_prometheus_config_pass_promtool() {
    run(
        "promtool",
        &["check", "config", "deploy/prometheus/prometheus.yml"],
    );
    run(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
    );
    let out = run(
        "promtool",
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

fn facts() -> Value {
    serde_json::from_str(&run("python3", &["scripts/check_deploy.py"])).unwrap()
}

#[test]
fn deploy_files_agree_with_each_other_and_with_the_config_parser() {
    let f = facts();
    let env = |k: &str| match k {
        "TOKENRELAY_CLIENT_KEY" | "TOKENRELAY_ADMIN_TOKEN" => Some("x".to_string()),
        "HOME" => Some("/nonexistent-home".into()),
        _ => None,
    };
    // The container's config: listens where the image and compose publish.
    let docker =
        tokenrelay::Config::from_file(Path::new(f["docker_config"].as_str().unwrap()), &env)
            .unwrap();
    let ports = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u16)
            .collect::<BTreeSet<_>>()
    };
    let served = BTreeSet::from([
        docker.server.listen.port(),
        docker.server.admin_listen.port(),
    ]);
    assert_eq!(served, ports(&f["compose_container_ports"]));
    assert_eq!(served, ports(&f["docker_expose"]));
    assert_eq!(
        BTreeSet::from([docker.server.admin_listen.port()]),
        ports(&f["prometheus_target_ports"])
    );
    assert!(!docker.server.client_keys.is_empty() && docker.server.admin_token.is_some());

    // The sidecar's config, with the Secret's files where the pod mounts them.
    let secret = tempfile::tempdir().unwrap();
    let mounts = &f["k8s_mounts"];
    let toml = f["k8s_config_toml"].as_str().unwrap();
    let creds = mounts["credentials"].as_str().unwrap();
    write_cred(secret.path(), "oauth_creds.json", &qwen_cred("a", "r"));
    let toml = toml.replace(
        &format!("{creds}/"),
        &format!("{}/", secret.path().display()),
    );
    let k8s = tokenrelay::Config::from_toml(&toml, "configmap.yaml", &env).unwrap();
    assert!(
        k8s.server.listen.ip().is_loopback(),
        "the sidecar's proxy stays inside the pod"
    );
    assert_eq!(
        k8s.server.admin_listen.port() as u64,
        f["k8s_admin_port"].as_u64().unwrap()
    );
    assert_eq!(
        k8s.server.admin_listen.port() as u64,
        f["k8s_scrape_port"].as_u64().unwrap()
    );
    for url in f["k8s_app_urls"].as_array().unwrap() {
        assert!(
            url.as_str()
                .unwrap()
                .starts_with(&format!("http://{}/", k8s.server.listen)),
            "{url}"
        );
    }
    assert_eq!(
        k8s.refresh.state_dir.as_deref(),
        Some(Path::new(mounts["state"].as_str().unwrap()))
    );
    assert_eq!(f["k8s_probe_paths"], json!(["/healthz", "/readyz"]));

    // Probes and scrapes pass the Host rule, judged by tokenrelay's own guard.
    let admitted = |config: &tokenrelay::Config, host: &str| {
        let guard = BrowserGuard::new(
            Listener::Admin,
            config.server.admin_listen,
            &config.server.allowed_hosts,
            &config.server.allowed_origins,
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().unwrap());
        let uri: http::Uri = "/readyz".parse().unwrap();
        matches!(
            guard.check(&http::Method::GET, &uri, &headers),
            Verdict::Pass(_)
        )
    };
    let mut k8s_hosts: Vec<&str> = f["k8s_probe_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    k8s_hosts.push(f["k8s_scrape_host"].as_str().unwrap());
    for host in k8s_hosts {
        assert!(admitted(&k8s, host), "kubernetes probe or scrape as {host}");
    }
    for host in f["compose_scrape_hosts"].as_array().unwrap() {
        let host = host.as_str().unwrap();
        assert!(admitted(&docker, host), "compose scrape as {host}");
    }
}

/// Every metric the dashboard and the alert rules use exists in a real scrape.
#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_that_exist() {
    let f = facts();
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        // The limit gauges exist for declared limits.
        .provider_keys("[providers.qwen.limits]\n\"*\" = { rpm = 1000 }")
        .start()
        .await;
    assert_eq!(t.post("/qwen/v1/x", json!({})).await.status(), 200);
    let scrape = t.metrics().await;
    for key in ["grafana_metrics", "alert_metrics"] {
        for m in f[key].as_array().unwrap() {
            let m = m.as_str().unwrap();
            assert!(
                scrape.contains(&format!("\n{m}{{")) || scrape.contains(&format!("\n{m} ")),
                "{key}: {m} is not exported"
            );
        }
    }
}

#[tokio::test]
async fn a_scrape_passes_promtool_check_metrics() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-a"))
        .cred("b.json", expired_qwen("rt-dead"))
        .refresh_token("rt-a")
        .provider_keys(
            "[providers.qwen.limits]\n\"qwen-max\" = { rpm = 10, rpd = 100, tpm = 5000 }",
        )
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(t.post("/qwen/v1/x", json!({})).await.status(), 200);
    }
    let scrape = t.metrics().await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (.ci/run installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Prometheus, configured from deploy/prometheus/prometheus.yml (target and
/// interval rewritten for 127.0.0.1), scrapes tokenrelay and loads the alert rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_tokenrelay() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        .start()
        .await;
    let admin = t.admin.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml"))
        .unwrap()
        .replace("tokenrelay:9090", &admin)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert!(
        config.contains(&admin),
        "the deploy file names its target as tokenrelay:9090"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    std::fs::copy(
        root().join("deploy/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let port = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (.ci/run installs Debian's prometheus package)");
    let query = |q: &str| {
        let http = t.http.clone();
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        let q = q.to_string();
        async move {
            let r = http.get(url).query(&[("query", q)]).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            v["data"]["result"].as_array().cloned()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = None;
    while Instant::now() < deadline {
        if let Some(r) = query("up{job=\"tokenrelay\"}").await {
            if let Some(v) = r.first() {
                up = v["value"][1].as_str().map(String::from);
                if up.as_deref() == Some("1") {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let logs = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    assert_eq!(
        up.as_deref(),
        Some("1"),
        "prometheus never scraped tokenrelay:\n{}",
        logs()
    );
    let usable = query("tokenrelay_credential_usable").await.unwrap();
    assert_eq!(usable[0]["metric"]["credential"], "a");
    assert_eq!(usable[0]["value"][1], "1");
    let built = query("tokenrelay_build_info").await.unwrap();
    assert_eq!(built.len(), 1);
    let rules: Value = get_json(&t.http, format!("http://127.0.0.1:{port}/api/v1/rules")).await;
    assert_eq!(
        rules["data"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .len(),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml")
        )
        .unwrap()
        .matches("- alert:")
        .count(),
        "every rule of alerts.yml loaded"
    );
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}

/// The fleet examples: their configs parse with tokenrelay's own parser (Redis store,
/// secrets from the environment), the compose file's replicas and Prometheus agree, and
/// the Prometheus config passes promtool with the alert rules beside it.
#[test]
fn fleet_deploy_files_parse_and_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fleet");
    let env = |k: &str| match k {
        "TOKENRELAY_CLIENT_KEY" | "TOKENRELAY_ADMIN_TOKEN" => Some("x".to_string()),
        "TOKENRELAY_REDIS_URL" => Some("rediss://tokenrelay:pw@redis:6380".to_string()),
        "TOKENRELAY_STORE_KEY" => Some("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string()),
        _ => None,
    };
    let compose = tokenrelay::Config::from_file(&root.join("config.toml"), &env).unwrap();
    let sealed = |c: &tokenrelay::Config| matches!(&c.store, tokenrelay::config::StoreConfig::Redis(r) if r.encryption_key.is_some());
    assert!(sealed(&compose), "the compose fleet seals its records");
    assert!(matches!(
        compose.store,
        tokenrelay::config::StoreConfig::Redis(_)
    ));
    let k8s_text = std::fs::read_to_string(root.join("kubernetes.yaml")).unwrap();
    let toml: String = k8s_text
        .split("config.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let toml = toml.replace(
        "/credentials/oauth_creds.json",
        "/nonexistent/oauth_creds.json",
    );
    let toml = toml.replace(
        "credentials = [\"/nonexistent/oauth_creds.json\"]",
        "credentials = [{ path = \"/nonexistent/oauth_creds.json\", optional = true }]",
    );
    // The Redis CA is a mounted file: here, a stand-in where the manifest mounts it.
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, "stand-in").unwrap();
    assert!(k8s_text.contains("mountPath: /var/run/tokenrelay/redis-ca"));
    let toml = toml.replace(
        "/var/run/tokenrelay/redis-ca/ca.pem",
        &ca.display().to_string(),
    );
    let k8s = tokenrelay::Config::from_toml(&toml, "kubernetes.yaml", &env).unwrap();
    assert!(sealed(&k8s), "the Kubernetes fleet seals its records");
    assert!(matches!(
        &k8s.store,
        tokenrelay::config::StoreConfig::Redis(r) if r.tls_ca.as_deref() == Some(ca.as_path())
    ));
    assert!(k8s.server.listen.ip().is_loopback());
    // promtool, with the rules where the compose file mounts them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("prometheus.yml"),
        dir.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        root.join("../prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let compose_text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let prom = std::fs::read_to_string(root.join("prometheus.yml")).unwrap();
    for replica in ["tokenrelay-a", "tokenrelay-b"] {
        assert!(compose_text.contains(&format!("  {replica}:")));
        assert!(prom.contains(&format!("{replica}:{}", compose.server.admin_listen.port())));
    }
}

/// Every Kubernetes manifest is valid against the Kubernetes API schemas, offline
/// (`kubernetes-validate`, which carries them; `.ci/run` installs it), strictly: an unknown
/// or misplaced field fails. The Prometheus Operator's kinds (PodMonitor, PrometheusRule)
/// have no schema there; `scripts/check_deploy.py` and promtool check those.
#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/ci/venv/bin/kubernetes-validate");
    assert!(
        bin.is_file(),
        "{} is missing: run .ci/run (it installs kubernetes-validate)",
        bin.display()
    );
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(root.join("deploy/fleet/kubernetes.yaml"));
    files.sort();
    let out = Command::new(&bin)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
    for kind in ["deployment/", "configmap/", "secret/"] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind}: {text}"
        );
    }
    for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(
            line.contains("monitoring.coreos.com"),
            "only the Prometheus Operator's kinds may lack a schema: {line}"
        );
    }
}
