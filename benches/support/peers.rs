//! The proxy users would otherwise pick, on the same fake upstream as nginx and
//! tokenrelay: LiteLLM's proxy (`litellm[proxy]` in a venv scripts/bench.sh makes, one
//! worker, no database, an OpenAI-compatible model pointing at the fake upstream).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{oha, Latency, Proc};

/// LiteLLM's proxy on a free port, or `None` when its venv is missing (a `--quick` run
/// without scripts/bench.sh).
pub fn litellm(root: &Path, work: &Path, up: SocketAddr) -> Option<(Proc, u16)> {
    let bin = root.join("target/bench/litellm/bin/litellm");
    if !bin.is_file() {
        eprintln!("LiteLLM: {} missing, row skipped", bin.display());
        return None;
    }
    let port = super::free_port();
    let dir = work.join("litellm");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: http://{up}/v1\n      api_key: bench-key\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["--config"])
        .arg(&config)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--num_workers",
            "1",
        ])
        // No database and no master key (local benchmark); the model cost map from the
        // package, not the network.
        .env(
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
            "true",
        )
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("litellm.log")).unwrap())
        .spawn()
        .expect("litellm");
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "LiteLLM did not start: see its log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Some((proc, port))
}

/// One proxy's figures for the comparison: latency at `rate` and saturation.
pub struct Peer {
    pub name: &'static str,
    pub at_rate: Latency,
    pub rps: f64,
}

/// Measures `paths` (direct first) at `rate` and at saturation.
pub fn compare(paths: &[(&'static str, String)], rate: u32, secs: u32) -> Vec<Peer> {
    paths
        .iter()
        .map(|(name, url)| {
            let _ = oha(url, Some(rate.min(200)), 2, 8);
            let at_rate = oha(url, Some(rate), secs, 64);
            let rps = oha(url, None, secs, 64).rps;
            eprintln!(
                "{name}: p50 {:.3} ms p99 {:.3} ms at {rate}/s, saturation {rps:.0} req/s",
                at_rate.p50, at_rate.p99
            );
            Peer { name, at_rate, rps }
        })
        .collect()
}

/// The report's section for `peers` (direct first, tokenrelay last).
pub fn section(peers: &[Peer], rate: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## The proxy users would otherwise pick\n");
    let _ = writeln!(s, "LiteLLM's proxy (`litellm[proxy]` from PyPI, one worker, no database) in front of the same fake upstream as an OpenAI-compatible model, next to nginx and tokenrelay. Latency at {rate} requests/s (a rate LiteLLM's one worker sustains), then saturation; \"added\" is over direct.\n");
    let _ = writeln!(
        s,
        "| path | p50 at {rate}/s | p99 at {rate}/s | added p50 | added p99 | saturation req/s | tokenrelay/this |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let direct = &peers[0].at_rate;
    let ours = peers.last().map_or(f64::NAN, |p| p.rps);
    for p in peers {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2}× |",
            p.name,
            p.at_rate.p50,
            p.at_rate.p99,
            p.at_rate.p50 - direct.p50,
            p.at_rate.p99 - direct.p99,
            p.rps,
            super::ratio(ours, p.rps)
        );
    }
    s.push('\n');
    s
}
