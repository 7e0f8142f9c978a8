//! The operator commands: `status`, `refresh` and `usage` talk to a running instance's
//! admin listener; `check` validates the configuration and credential files offline (in
//! fleet mode it also asks Redis whether it answers and whether every record opens).
//!
//! Output is for people (aligned tables, one line per credential); exit codes are for
//! scripts: 0 all good, 1 something needs attention, 2 could not run at all.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::Config;
use crate::lifecycle::pool;
use crate::lifecycle::{Credential, Refresher, State};
use crate::store::{CredentialStore, FileStore};
use crate::telemetry::metrics::Metrics;

/// The admin base URL: `--admin` if given, else the configuration's `admin_listen`.
fn admin_base(config: &Config, admin: Option<&str>) -> String {
    match admin {
        Some(a) if a.starts_with("http://") || a.starts_with("https://") => {
            a.trim_end_matches('/').to_string()
        }
        Some(a) => format!("http://{a}"),
        None => format!("http://{}", config.server.admin_listen),
    }
}

fn client(config: &Config) -> anyhow::Result<(reqwest::Client, Option<String>)> {
    let http = reqwest::Client::builder()
        .timeout(config.refresh.timeout + std::time::Duration::from_secs(5))
        .build()?;
    let token = config
        .server
        .admin_token
        .as_ref()
        .map(|t| t.expose_secret().to_string());
    Ok((http, token))
}

pub(crate) async fn call(
    config: &Config,
    admin: Option<&str>,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<(u16, Value)> {
    let base = admin_base(config, admin);
    let (http, token) = client(config)?;
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach tokenrelay's admin listener at {base} (is it running? use --admin HOST:PORT)"))?;
    let status = resp.status().as_u16();
    let body: Value = resp
        .json()
        .await
        .context("the admin listener sent something that is not JSON")?;
    Ok((status, body))
}

/// `tokenrelay status`: a table of every credential of a running instance.
pub async fn status(config: &Config, admin: Option<&str>) -> anyhow::Result<i32> {
    let (code, body) = call(config, admin, reqwest::Method::GET, "/admin/credentials").await?;
    if code != 200 {
        anyhow::bail!("admin listener answered HTTP {code}: {body}");
    }
    let creds = body["credentials"].as_array().cloned().unwrap_or_default();
    let rows: Vec<[String; 7]> = creds
        .iter()
        .map(|c| {
            [
                format!(
                    "{}/{}",
                    c["provider"].as_str().unwrap_or("?"),
                    c["id"].as_str().unwrap_or("?")
                ),
                // Fleet mode: the record's version and who wrote it last.
                match (
                    c["store"]["version"].as_u64(),
                    c["store"]["last_writer"].as_str(),
                ) {
                    (Some(v), Some(w)) => {
                        format!("{} (v{v} by {w})", c["state"].as_str().unwrap_or("?"))
                    }
                    (Some(v), None) => format!("{} (v{v})", c["state"].as_str().unwrap_or("?")),
                    _ => c["state"].as_str().unwrap_or("?").to_string(),
                },
                c["expires_in_seconds"]
                    .as_i64()
                    .map_or("-".into(), human_secs),
                c["last_refresh_at"].as_str().unwrap_or("never").to_string(),
                c["consecutive_failures"].as_u64().unwrap_or(0).to_string(),
                model_cooldowns(c),
                c["last_error"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "CREDENTIAL",
                "STATE",
                "EXPIRES IN",
                "LAST REFRESH",
                "FAILURES",
                "COOLING",
                "LAST ERROR"
            ],
            &rows
        )
    );
    // What fixes each credential that cannot serve: the same hint /readyz and errors give.
    for c in creds.iter().filter(|c| c["usable"] == false) {
        if let Some(hint) = c["hint"].as_str() {
            println!(
                "{}/{}: to fix: {hint}",
                c["provider"].as_str().unwrap_or("?"),
                c["id"].as_str().unwrap_or("?")
            );
        }
    }
    if creds.is_empty() {
        println!("(no credentials loaded; see GET /readyz for where tokenrelay looked)");
    }
    let attention = creds.iter().any(|c| c["usable"] == false);
    Ok(i32::from(attention))
}

/// Cool-downs as `gemini-2.5-pro 7h per_day/project, * 36s retry_after`, or `-`; one
/// that ended and waits for its probe shows `probe`.
fn model_cooldowns(c: &serde_json::Value) -> String {
    let list: Vec<String> = c["cooldowns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let left = match m["seconds"].as_i64().unwrap_or(0) {
                0 => "probe".to_string(),
                s => human_secs(s),
            };
            format!(
                "{} {left} {}/{}",
                m["model"].as_str().unwrap_or("*"),
                m["reason"].as_str().unwrap_or("?"),
                m["scope"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// `tokenrelay health`: whether a running instance answers `/healthz`.
pub async fn health(config: &Config, admin: Option<&str>) -> anyhow::Result<i32> {
    let base = admin_base(config, admin).replace("0.0.0.0", "127.0.0.1");
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let ok = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    println!("{}", if ok { "healthy" } else { "unhealthy" });
    Ok(i32::from(!ok))
}

/// `tokenrelay refresh [PROVIDER/ID]`: forces a refresh in a running instance.
pub async fn refresh(
    config: &Config,
    admin: Option<&str>,
    target: Option<&str>,
) -> anyhow::Result<i32> {
    let path = match target {
        None => "/admin/refresh".to_string(),
        Some(t) => {
            let (provider, id) = t.split_once('/').with_context(|| {
                format!("{t:?}: name a credential as PROVIDER/ID (see `tokenrelay status`)")
            })?;
            format!("/admin/credentials/{provider}/{id}/refresh")
        }
    };
    let (code, body) = call(config, admin, reqwest::Method::POST, &path).await?;
    if code == 404 || code == 401 {
        anyhow::bail!("{}", body["error"]["message"].as_str().unwrap_or("refused"));
    }
    let results = match body.get("results") {
        Some(r) => r.as_array().cloned().unwrap_or_default(),
        None => vec![body],
    };
    let mut failed = false;
    for r in &results {
        let name = format!(
            "{}/{}",
            r["provider"].as_str().unwrap_or("?"),
            r["id"].as_str().unwrap_or("?")
        );
        if r["ok"] == true {
            println!(
                "{name}: refreshed, expires {}",
                r["expires_at"].as_str().unwrap_or("?")
            );
        } else {
            failed = true;
            println!(
                "{name}: FAILED ({}): {}",
                r["state"].as_str().unwrap_or("?"),
                r["error"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(i32::from(failed))
}

/// `tokenrelay check`: validates the configuration (already parsed by the caller) and every
/// credential file, offline: for each, whether it can refresh and whether its file is
/// writable.
pub fn check(config: &Config) -> anyhow::Result<i32> {
    let refresher = Arc::new(Refresher::new(
        reqwest::Client::new(),
        config.refresh.clone(),
        Arc::new(Metrics::new()?),
    ));
    println!("configuration {}: ok", config.source);
    let mut rows = Vec::new();
    let mut problems = 0;
    for p in &config.providers {
        let provider = Arc::new(p.clone());
        let found = match pool::resolve(&provider) {
            Ok(f) => f,
            Err(e) => {
                problems += 1;
                rows.push([
                    provider.name.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("ERROR {e}"),
                ]);
                continue;
            }
        };
        let keys = match pool::api_keys(&provider) {
            Ok(k) => k,
            Err(e) => {
                problems += 1;
                rows.push([
                    format!("{}/-", provider.name),
                    "api_key".into(),
                    "-".into(),
                    "-".into(),
                    format!("ERROR {e}"),
                ]);
                Vec::new()
            }
        };
        if found.is_empty() && keys.is_empty() {
            problems += 1;
            rows.push([
                format!("{}/-", provider.name),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("no credentials; {}", provider.reauth_hint()),
            ]);
        }
        for f in found {
            let name = format!("{}/{}", provider.name, f.path.display());
            let store = Arc::new(FileStore::new(f.path.clone()));
            let writable = if store.writable() {
                "yes"
            } else {
                "no (read-only)"
            };
            let file = match store.load() {
                Ok(file) => file,
                Err(e) => {
                    problems += 1;
                    rows.push([
                        name,
                        "-".into(),
                        "-".into(),
                        writable.into(),
                        format!("ERROR {e}"),
                    ]);
                    continue;
                }
            };
            let shape = file.shape.as_str().to_string();
            let id = f.id.clone().unwrap_or_else(|| "check".into());
            let store_dyn: Arc<dyn CredentialStore> = store;
            match Credential::from_store(
                Arc::clone(&provider),
                id,
                store_dyn,
                file,
                Arc::clone(&refresher),
            ) {
                Ok(c) => {
                    let snap = c.snapshot();
                    let refresh = match (&snap.last_error, snap.state) {
                        (Some(e), _) => {
                            problems += 1;
                            format!("NO: {e}")
                        }
                        (None, State::NeedsReauth) => {
                            problems += 1;
                            "NO".into()
                        }
                        (None, _) => "yes".into(),
                    };
                    let expiry = snap
                        .expires_at_ms
                        .map_or("no token yet".into(), crate::clock::rfc3339);
                    rows.push([
                        name,
                        shape,
                        refresh,
                        writable.into(),
                        format!("token expires {expiry}"),
                    ]);
                }
                Err(e) => {
                    problems += 1;
                    rows.push([
                        name,
                        shape,
                        "-".into(),
                        writable.into(),
                        format!("ERROR {e}"),
                    ]);
                }
            }
        }
        for k in &keys {
            rows.push([
                format!("{}/{}", provider.name, k.id),
                "api_key".into(),
                "never expires".into(),
                "-".into(),
                String::new(),
            ]);
        }
    }
    print!(
        "{}",
        table(
            &["CREDENTIAL", "SHAPE", "CAN REFRESH", "WRITABLE", "NOTE"],
            &rows
        )
    );
    problems += check_store(config);
    if problems > 0 {
        println!("{problems} problem(s) found");
    }
    Ok(i32::from(problems > 0))
}

/// Fleet mode: whether the store answers (TLS, the ACL user), whether records are sealed,
/// and whether every record opens with the configured keys. The problems found.
fn check_store(config: &Config) -> usize {
    let crate::config::StoreConfig::Redis(cfg) = &config.store else {
        return 0;
    };
    struct Quiet;
    impl crate::store::redis::FleetMetrics for Quiet {
        fn operation(&self, _: &str, _: bool) {}
        fn up(&self, _: bool) {}
    }
    let fleet = match crate::store::redis::Fleet::new(cfg.clone(), Arc::new(Quiet)) {
        Ok(f) => f,
        Err(e) => {
            println!("fleet store: NO: {e}");
            return 1;
        }
    };
    if let Err(e) = fleet.ping() {
        println!("fleet store: NOT REACHABLE: {e}");
        return 1;
    }
    println!("fleet store: reachable");
    let mut problems = 0;
    match fleet.sealed_with() {
        Some(id) => println!("records: sealed with key {id}"),
        None => {
            problems += 1;
            println!("records: NOT SEALED (set store.encryption_key: openssl rand -base64 32)");
        }
    }
    match fleet.check_records() {
        Ok(records) => {
            let mut stale = 0;
            for (key, opened) in &records {
                match opened {
                    Ok(true) => {}
                    Ok(false) => stale += 1,
                    Err(e) => {
                        problems += 1;
                        println!("record {key}: CANNOT OPEN: {e}");
                    }
                }
            }
            println!(
                "{} record(s) read; {} to be sealed again with the current key (on their next read)",
                records.len(),
                if fleet.sealed_with().is_some() { stale } else { 0 }
            );
        }
        Err(e) => {
            problems += 1;
            println!("records: cannot list them: {e}");
        }
    }
    problems
}

fn human_secs(s: i64) -> String {
    if s < 0 {
        return format!("expired {} ago", human_secs(-s));
    }
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    grid(&header, &rows)
}

/// `table` with as many columns as the header has.
fn grid(header: &[String], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == n {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// `tokenrelay usage`: what was spent, grouped (`by`) over a range, and each named
/// client's windows against its limits.
pub async fn usage(
    config: &Config,
    admin: Option<&str>,
    by: &str,
    since: &str,
    until: Option<&str>,
    step: Option<&str>,
) -> anyhow::Result<i32> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("by", by).append_pair("since", since);
    if let Some(u) = until {
        query.append_pair("until", u);
    }
    if let Some(s) = step {
        query.append_pair("step", s);
    }
    let path = format!("/admin/usage?{}", query.finish());
    let (code, body) = call(config, admin, reqwest::Method::GET, &path).await?;
    if code != 200 {
        let message = body["error"]["message"].as_str().unwrap_or("");
        anyhow::bail!("admin listener answered HTTP {code}: {message}");
    }
    print!("{}", usage_table(&body));
    Ok(0)
}

/// The usage answer as tables: rows (with their bucket when stepped), a total, clients.
fn usage_table(body: &Value) -> String {
    let by: Vec<String> = body["by"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let stepped = body["step_seconds"].is_number();
    const KINDS: [&str; 7] = [
        "answers",
        "prompt",
        "completion",
        "cached",
        "thoughts",
        "tokens",
        "unknown",
    ];
    let mut header: Vec<String> = Vec::new();
    if stepped {
        header.push("START".into());
    }
    header.extend(by.iter().map(|b| b.to_uppercase()));
    header.extend(
        [
            "ANSWERS",
            "PROMPT",
            "COMPLETION",
            "CACHED",
            "THOUGHTS",
            "TOKENS",
            "NO USAGE",
        ]
        .map(String::from),
    );
    let cells = |r: &Value, head: Vec<String>| -> Vec<String> {
        let mut row = head;
        row.extend(
            KINDS
                .iter()
                .map(|k| r[*k].as_u64().unwrap_or(0).to_string()),
        );
        row
    };
    let mut rows: Vec<Vec<String>> = body["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let mut head = Vec::new();
                    if stepped {
                        head.push(r["start"].as_str().unwrap_or("?").to_string());
                    }
                    head.extend(by.iter().map(|b| r[b].as_str().unwrap_or("-").to_string()));
                    cells(r, head)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut total_head = vec!["TOTAL".to_string()];
    total_head.resize(header.len() - KINDS.len(), String::new());
    rows.push(cells(&body["total"], total_head));
    let mut out = format!(
        "usage from {} to {} ({}):\n",
        body["since"].as_str().unwrap_or("?"),
        body["until"].as_str().unwrap_or("?"),
        body["store"].as_str().unwrap_or("?")
    );
    out.push_str(&grid(&header, &rows));
    let clients = body["clients"].as_array().cloned().unwrap_or_default();
    if !clients.is_empty() {
        let spent = |c: &Value, s: &str, l: &str| match c["limits"][l].as_u64() {
            Some(limit) => format!("{} / {limit}", c["spent"][s].as_u64().unwrap_or(0)),
            None => c["spent"][s].as_u64().unwrap_or(0).to_string(),
        };
        let rows: Vec<[String; 5]> = clients
            .iter()
            .map(|c| {
                [
                    c["name"].as_str().unwrap_or("?").to_string(),
                    spent(c, "requests_in_minute", "rpm"),
                    spent(c, "tokens_in_minute", "tpm"),
                    spent(c, "tokens_today", "tokens_per_day"),
                    spent(c, "tokens_this_month", "tokens_per_month"),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "CLIENT",
                "REQUESTS THIS MINUTE",
                "TOKENS THIS MINUTE",
                "TOKENS TODAY (UTC)",
                "TOKENS THIS MONTH",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human_secs(42), "42s");
        assert_eq!(human_secs(3599), "59m");
        assert_eq!(human_secs(7260), "2h1m");
        assert_eq!(human_secs(-30), "expired 30s ago");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
