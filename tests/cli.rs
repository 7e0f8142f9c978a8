//! The operator commands, run as the real binary.

use std::process::Command;

use serde_json::Value;

use crate::helpers::*;
use crate::process::{write_config, Proc, BIN};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("HOME", "/nonexistent-home")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_refresh_talk_to_a_running_instance() {
    let t = spawn_app(Flavor::Qwen).refresh_token("rt-a").start().await;
    let dir = t.dir.path().join("c");
    std::fs::create_dir(&dir).unwrap();
    write_cred(&dir, "alice.json", &qwen_cred("secret-access", "rt-a"));
    write_cred(&dir, "bob.json", &expired_qwen("rt-revoked"));
    let config = write_config(
        t.dir.path(),
        "c.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &dir,
        "admin_token = \"adm\"",
    );
    let p = Proc::spawn(&config, &t.dir.path().join("c.log"));
    let admin = p.admin.trim_start_matches("http://").to_string();
    let cfg = config.to_str().unwrap();
    // bob's revoked token is found out by the background refresh at start.
    for _ in 0..100 {
        if run(&["status", "--config", cfg, "--admin", &admin])
            .1
            .contains("needs_reauth")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, out) = run(&["status", "--config", cfg, "--admin", &admin]);
    assert_eq!(code, 1, "a credential needs attention:\n{out}");
    assert!(out.starts_with("CREDENTIAL"), "{out}");
    let alice = out.lines().find(|l| l.starts_with("qwen/alice")).unwrap();
    assert!(alice.contains("ready") && alice.contains("59m"), "{alice}");
    let bob = out.lines().find(|l| l.starts_with("qwen/bob")).unwrap();
    assert!(
        bob.contains("needs_reauth") && bob.contains("invalid_request"),
        "{bob}"
    );
    assert!(
        !out.contains("secret-access") && !out.contains("rt-"),
        "{out}"
    );

    let (code, out) = run(&["refresh", "qwen/alice", "--config", cfg, "--admin", &admin]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("qwen/alice: refreshed"), "{out}");
    let (code, out) = run(&["refresh", "--config", cfg, "--admin", &admin]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("qwen/bob: FAILED"), "{out}");
    let (code, out) = run(&["health", "--config", cfg, "--admin", &admin]);
    assert_eq!((code, out.trim()), (0, "healthy"));
    let (code, out) = run(&["refresh", "qwen/nobody", "--config", cfg, "--admin", &admin]);
    assert_eq!(code, 2);
    assert!(out.contains("no credential qwen/nobody"), "{out}");
}

#[test]
fn status_says_when_nothing_is_running() {
    let (code, out) = run(&["status", "--admin", "127.0.0.1:9"]);
    assert_eq!(code, 2);
    assert!(
        out.contains("cannot reach tokenrelay's admin listener at http://127.0.0.1:9"),
        "{out}"
    );
    let (code, _) = run(&["health", "--admin", "127.0.0.1:9"]);
    assert_eq!(code, 1);
}

#[test]
fn check_reports_each_credential_offline() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("c");
    std::fs::create_dir(&creds).unwrap();
    write_cred(
        &creds,
        "adc.json",
        &serde_json::from_str::<Value>(include_str!(
            "fixtures/credentials/adc_authorized_user.json"
        ))
        .unwrap(),
    );
    write_cred(
        &creds,
        "oauth_creds.json",
        &serde_json::from_str::<Value>(include_str!(
            "fixtures/credentials/gemini_cli_oauth_creds.json"
        ))
        .unwrap(),
    );
    let config = write_config(
        dir.path(),
        "g.toml",
        "gemini",
        "https://generativelanguage.googleapis.com",
        "https://oauth2.googleapis.com/token",
        &creds,
        "",
    );
    let (code, out) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("configuration") && out.contains(": ok"),
        "{out}"
    );
    let adc = out.lines().find(|l| l.contains("adc.json")).unwrap();
    assert!(
        adc.contains("authorized_user") && adc.contains("yes"),
        "{adc}"
    );
    let cli = out
        .lines()
        .find(|l| l.contains("oauth_creds.json"))
        .unwrap();
    assert!(cli.contains("NO") && cli.contains("client_id"), "{cli}");

    // A broken file and a bad key are named too.
    std::fs::write(creds.join("broken.json"), "{\"access_token\": \"x\", ").unwrap();
    let (code, out) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("broken.json") && out.contains("truncated"),
        "{out}"
    );
    std::fs::write(dir.path().join("bad.toml"), "[server]\nlisen = 1").unwrap();
    let (code, out) = run(&[
        "check",
        "--config",
        dir.path().join("bad.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(out.contains("bad.toml") && out.contains("lisen"), "{out}");
}
