//! `GET /admin/usage?by=client,model,credential&since=…&until=…&step=…`: what was spent,
//! grouped and bucketed, from the ledger (which writes what is pending first), and each
//! named client's current windows against its limits.
//!
//! `since`/`until`: RFC 3339, unix seconds, or a duration ago (`24h`, `30d`); default the
//! last 24 hours. `step`: a duration of whole minutes (`5m`, `1h`, `1d`), buckets aligned
//! to UTC; without it, one total per group. `by`: any of client, provider, model,
//! credential (default client).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::admin::AdminState;
use crate::clock;
use crate::proxy::error::{ProxyError, Reason};
use crate::usage::ledger::{self, By, Sums};

/// At most this many buckets in one answer.
const MAX_BUCKETS: i64 = 10_000;

pub async fn usage(
    State(s): State<Arc<AdminState>>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let now_ms = clock::now_ms();
    let q = match parse(&params, now_ms / 1000) {
        Ok(q) => q,
        Err(problem) => return ProxyError::new(Reason::BadRequest, problem).into_response(),
    };
    let rows = match s.ledger.query(&q).await {
        Ok(r) => r,
        Err(e) => {
            return ProxyError::new(
                Reason::StoreUnavailable,
                format!("usage could not be read: {e}"),
            )
            .into_response()
        }
    };
    let mut total = Sums::default();
    for r in &rows {
        total.add(&r.sums);
    }
    let named: Vec<_> = s.reloader.clients.load().named().to_vec();
    // In a fleet, the fleet's counts (what limits hold to), asked all at once; else this
    // process's.
    let fleet = futures_util::future::join_all(named.iter().map(|c| c.fleet_windows(now_ms))).await;
    let mut clients = Vec::new();
    for (c, fleet) in named.iter().zip(fleet) {
        let (local, cfg) = c.windows(now_ms);
        let (spent, counted) = match fleet {
            Some(fleet) => (fleet, "fleet"),
            None => (local, "this process"),
        };
        clients.push(json!({
            "name": &*c.name,
            "limits": {
                "rpm": cfg.rpm, "tpm": cfg.tpm,
                "tokens_per_day": cfg.tokens_per_day, "tokens_per_month": cfg.tokens_per_month,
            },
            "spent": {
                "requests_in_minute": spent.requests_in_minute,
                "tokens_in_minute": spent.tokens_in_minute,
                "tokens_today": spent.tokens_in_day,
                "tokens_this_month": spent.tokens_in_month,
            },
            "counted_by": counted,
        }));
    }
    Json(json!({
        "store": s.ledger.kind(),
        "since": clock::rfc3339(q.since * 1000),
        "until": clock::rfc3339(q.until * 1000),
        "step_seconds": q.step,
        "resolution_seconds": q.span,
        "by": q.by.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "rows": rows,
        "total": total,
        "clients": clients,
    }))
    .into_response()
}

/// The query the parameters ask, or what is wrong with them.
pub fn parse(params: &[(String, String)], now_s: i64) -> Result<ledger::Query, String> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.trim());
    if let Some((unknown, _)) = params
        .iter()
        .find(|(n, _)| !matches!(n.as_str(), "by" | "since" | "until" | "step"))
    {
        return Err(format!(
            "unknown parameter {unknown:?}: use by, since, until and step"
        ));
    }
    let by = match get("by") {
        None | Some("") => vec![By::Client],
        Some(list) => list
            .split(',')
            .map(|b| {
                By::parse(b.trim()).ok_or_else(|| {
                    format!("by: {b:?} is not one of client, provider, model, credential")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    // Nothing is kept from before the oldest hour row, and nothing is counted after now.
    let oldest = now_s - ledger::KEEP_HOURS_S - 3600;
    let since = time("since", get("since"), now_s - 86_400, now_s)?.clamp(oldest, now_s);
    let until = time("until", get("until"), now_s, now_s)?.clamp(oldest, now_s + 86_400);
    if until <= since {
        return Err("until must be after since (and since not in the future)".into());
    }
    let step = match get("step") {
        None | Some("") => None,
        Some(s) => {
            let d = crate::config::parse_duration(s).map_err(|p| format!("step: {p}"))?;
            let secs = d.as_secs() as i64;
            if secs < 60 || secs % 60 != 0 {
                return Err(format!(
                    "step: {s:?} is not a whole number of minutes (use 1m, 5m, 1h, 1d)"
                ));
            }
            if (until - since) / secs > MAX_BUCKETS {
                return Err(format!(
                    "step: {s:?} makes more than {MAX_BUCKETS} buckets; use a larger step or a shorter range"
                ));
            }
            Some(secs)
        }
    };
    // Rows are whole buckets: the range starts where the first one read does.
    Ok(ledger::Query::new(since, until, step, by, now_s))
}

/// A point in time: RFC 3339, unix seconds, or a duration before now.
fn time(name: &str, v: Option<&str>, default: i64, now_s: i64) -> Result<i64, String> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(default);
    };
    if v == "now" {
        return Ok(now_s);
    }
    if let Ok(secs) = v.parse::<i64>() {
        return Ok(secs.clamp(0, 253_402_300_799)); // up to 9999-12-31
    }
    if let Ok(ts) = v.parse::<jiff::Timestamp>() {
        return Ok(ts.as_second());
    }
    match crate::config::parse_duration(v) {
        Ok(d) => Ok(now_s.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        Err(_) => Err(format!(
            "{name}: {v:?} is not a time: use RFC 3339 (2026-12-01T00:00:00Z), unix seconds, or a duration ago (24h, 30d)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_are_read_and_bad_ones_named() {
        let now = 1_800_000_000;
        let q = parse(&p(&[]), now).unwrap();
        assert_eq!(
            (q.since, q.until, q.step, q.by.clone()),
            (now - 86_400, now, None, vec![By::Client])
        );
        let q = parse(
            &p(&[
                ("by", "client,model"),
                ("since", "30d"),
                ("until", "2027-01-15T08:00:00Z"),
                ("step", "1d"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(q.since, now - 30 * 86_400);
        assert_eq!(q.until, 1_800_000_000);
        assert_eq!(q.step, Some(86_400));
        assert_eq!(q.by, vec![By::Client, By::Model]);
        for (bad, names) in [
            (p(&[("by", "user")]), "by"),
            (p(&[("since", "yesterday")]), "since"),
            (p(&[("step", "30s")]), "step"),
            (p(&[("step", "1m"), ("since", "3650d")]), "buckets"),
            (p(&[("since", "now")]), "until must be after"),
            (p(&[("from", "1h")]), "unknown parameter"),
        ] {
            let e = parse(&bad, now).unwrap_err();
            assert!(e.contains(names), "{e}");
        }
    }
}
