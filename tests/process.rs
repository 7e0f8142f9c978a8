//! tokenrelay as a separate process (the real binary), for what needs one: several
//! processes sharing a file, SIGKILL, SIGHUP, a read-only mount namespace, the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenrelay");

pub struct Proc {
    pub child: Child,
    pub proxy: String,
    pub admin: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `tokenrelay --config <config>` and waits for it to log its addresses.
    pub fn spawn(config: &Path, log: &Path) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(config);
        Proc::spawn_cmd(cmd, log)
    }

    /// Starts tokenrelay in a private mount namespace where `dir` is mounted read-only
    /// (as a Kubernetes Secret volume is), even for root.
    pub fn spawn_read_only(config: &Path, dir: &Path, log: &Path) -> Proc {
        Proc::spawn_cmd(read_only_cmd(config, dir), log)
    }

    pub fn spawn_cmd(mut cmd: Command, log: &Path) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "TOKENRELAY_LOG") {
            cmd.env("TOKENRELAY_LOG", "info");
        }
        let logfile = std::fs::File::create(log).unwrap();
        let child = cmd
            .env("TOKENRELAY_LOG_FORMAT", "json")
            .env("HOME", "/nonexistent-home")
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn tokenrelay");
        // Owned by a `Proc` from here on, so a failed start still kills it (Drop).
        let mut proc = Proc {
            child,
            proxy: String::new(),
            admin: String::new(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = proc.logs();
            if let Some(line) = text.lines().find(|l| l.contains("tokenrelay listening")) {
                let v: Value = serde_json::from_str(line).expect("json log line");
                proc.proxy = format!("http://{}", v["proxy"].as_str().unwrap());
                proc.admin = format!("http://{}", v["admin"].as_str().unwrap());
                return proc;
            }
            assert!(
                Instant::now() < deadline,
                "tokenrelay did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config file for a process: one provider in front of the fakes.
/// `tokenrelay --config <config>` in a private mount namespace where `dir` is read-only;
/// more arguments may follow.
pub fn read_only_cmd(config: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.arg("-Urm")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "mount --bind -o ro '{0}' '{0}' && exec \"$0\" \"$@\"",
            dir.display()
        ))
        .arg(BIN)
        .arg("--config")
        .arg(config);
    cmd
}

pub fn write_config(
    dir: &Path,
    name: &str,
    provider: &str,
    upstream: &str,
    token_url: &str,
    creds: &Path,
    extra: &str,
) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n[providers.{provider}]\nupstream = \"{upstream}\"\ntoken_url = \"{token_url}\"\ncredentials = [\"{}\"]\n",
        creds.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}
