//! Answering the client: the upstream's answer streamed back as it arrives (hop-by-hop
//! headers dropped, absolute URLs on the upstream's origin pointed back through
//! tokenrelay, an upload session pinned, the serving credential named), or, when no
//! credential served, one error that says what each credential did and what to do.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::header::{HeaderName, HeaderValue};

use super::admit::HOP_BY_HOP;
use super::choose::Miss;
use super::error::{ProxyError, Reason};
use super::rewrite;
use crate::lifecycle::pool::{looked_at, ProviderPool};
use crate::lifecycle::{Credential, State as CredState};

static CREDENTIAL_HEADER: HeaderName = HeaderName::from_static("x-tokenrelay-credential");

/// Streams the upstream answer to the client as it arrives; absolute URLs on the
/// upstream's origin point back through tokenrelay, and a new upload session is pinned to
/// the credential.
pub(super) fn stream_back(
    mut resp: http::Response<Body>,
    credential: &str,
    rewrite: Option<(&rewrite::Origins, &ProviderPool)>,
) -> Response {
    let headers = resp.headers_mut();
    // Usually none is there: one look at each header instead of a removal per name.
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
    if let Some((origins, pool)) = rewrite {
        if let Some(session) = rewrite::point_back(headers, origins) {
            if let Some(key) = rewrite::session_key(&session) {
                pool.pin(key, credential);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(credential) {
        headers.insert(&CREDENTIAL_HEADER, v);
    }
    resp
}

/// The error when no credential served the request.
pub(super) fn exhausted(
    pool: &ProviderPool,
    misses: &[(Arc<Credential>, Miss)],
    model: Option<&str>,
) -> ProxyError {
    let provider = &pool.config;
    if misses.is_empty() {
        let looked: Vec<String> = looked_at(provider)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut msg = format!("provider {} has no credentials", provider.name);
        if !looked.is_empty() {
            let _ = write!(msg, " (looked at: {})", looked.join(", "));
        }
        let _ = write!(msg, "; to add one, {}", provider.reauth_hint());
        return ProxyError::new(Reason::NoUsableCredential, msg);
    }
    let mut lines = Vec::new();
    // Hints for the kinds of credential that need replacing, each once.
    let mut hints: Vec<String> = Vec::new();
    let mut hint = |c: &Credential| {
        let h = provider.hint_for(c.kind);
        if !hints.contains(&h) {
            hints.push(h);
        }
    };
    for (c, m) in misses {
        let why = match m {
            Miss::Skipped {
                state,
                detail,
                cooldown,
            } => {
                if *state == CredState::NeedsReauth {
                    hint(c);
                }
                match cooldown {
                    Some(d) if detail.is_empty() => {
                        format!("{} for {}s", state.as_str(), d.as_secs().max(1))
                    }
                    Some(d) => format!("{} for {}s ({detail})", state.as_str(), d.as_secs().max(1)),
                    None if detail.is_empty() => state.as_str().to_string(),
                    None => format!("{}: {detail}", state.as_str()),
                }
            }
            Miss::Refresh(e) => {
                let state = if e.is_permanent() {
                    hint(c);
                    "needs_reauth"
                } else {
                    "refresh failed"
                };
                format!("{state}: {e}")
            }
            Miss::Connect(e) => format!("upstream unreachable: {e}"),
            Miss::Rejected { refreshed: true } => {
                "upstream rejected its token (HTTP 401) even after a refresh".to_string()
            }
            Miss::Rejected { refreshed: false } => {
                "upstream rejected it (HTTP 401); it cannot be refreshed".to_string()
            }
            Miss::Invalid { reason, action } => {
                format!("refused by the upstream ({reason}), now out of rotation; to fix: {action}")
            }
            Miss::RateLimited {
                cooldown,
                model: Some(m),
            } => format!(
                "rate-limited by upstream for model {m}; cooling down for {}s",
                cooldown.as_secs().max(1)
            ),
            Miss::RateLimited {
                cooldown,
                model: None,
            } => format!(
                "rate-limited by upstream; cooling down for {}s",
                cooldown.as_secs().max(1)
            ),
        };
        lines.push(format!("{}/{}: {why}", provider.name, c.id));
    }
    let mut message = format!(
        "no credential of provider {} could serve this request: {}",
        provider.name,
        lines.join("; ")
    );
    if !hints.is_empty() {
        let _ = write!(message, ". To re-authenticate: {}", hints.join("; or "));
    }
    let all = |f: &dyn Fn(&Miss) -> bool| misses.iter().all(|(_, m)| f(m));
    let cooling = |m: &Miss| {
        matches!(
            m,
            Miss::RateLimited { .. }
                | Miss::Skipped {
                    state: CredState::CoolingDown,
                    ..
                }
        )
    };
    if all(&cooling) {
        let soonest = misses
            .iter()
            .filter_map(|(_, m)| match m {
                Miss::RateLimited { cooldown, .. } => Some(*cooldown),
                Miss::Skipped { cooldown, .. } => *cooldown,
                _ => None,
            })
            .min();
        if let Some(model) = model {
            let per_model = misses.iter().any(|(_, m)| {
                matches!(m, Miss::RateLimited { model: Some(_), .. })
                    || matches!(m, Miss::Skipped { detail, .. } if detail.starts_with("model "))
            });
            if per_model {
                let _ = write!(
                    message,
                    " (for model {model}; other models may still be served)"
                );
            }
        }
        return ProxyError {
            reason: Reason::AllCredentialsRateLimited,
            message,
            retry_after: soonest,
        };
    }
    if all(&|m| matches!(m, Miss::Connect(_))) {
        return ProxyError::new(Reason::UpstreamUnreachable, message);
    }
    let transient = |m: &Miss| match m {
        Miss::Refresh(e) => !e.is_permanent(),
        Miss::Skipped { state, .. } => matches!(state, CredState::Expired | CredState::Backoff),
        _ => false,
    };
    if all(&transient) {
        return ProxyError::new(Reason::TokenEndpointUnreachable, message);
    }
    ProxyError::new(Reason::NoUsableCredential, message)
}
