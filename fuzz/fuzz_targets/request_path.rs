//! The parsers of untrusted bytes tokenrelay still owns on the request path (HTTP framing
//! is hyper's): the upstream's `Keep-Alive` and `Retry-After` headers, an error answer's
//! JSON as it is judged (quota violations and the cool-downs decided from them, refusal,
//! `RetryInfo`, the project it names), the model named by a request's path or body, and an
//! upload session in a path. None may panic, on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay::common::{keep_alive, retry_after};
use tokenrelay::providers::{self, ProviderKind};
use tokenrelay::quota;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = keep_alive::timeout(&text);
    let _ = retry_after::parse(&text);
    let _ = retry_after::google_retry_delay(data);
    let _ = providers::request_model(&text, data);
    let _ = tokenrelay::proxy::rewrite::session_key(&text);
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) {
        let hint = retry_after::google_retry_delay_of(&body);
        let _ = providers::answer_project(&body);
        let status = data.first().map_or(400, |b| 400 + u16::from(*b % 30));
        for kind in [
            ProviderKind::Gemini,
            ProviderKind::Vertex,
            ProviderKind::Qwen,
            ProviderKind::Dashscope,
            ProviderKind::Custom,
        ] {
            for static_key in [false, true] {
                let _ = kind.refusal(status, &body, static_key);
            }
            if kind.is_quota_answer(status, &body) {
                let violations = kind.quota_violations(&body);
                // Any clock: the windows must hold for dates far from now too.
                let now_ms = i64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]))
                    % 8_000_000_000_000;
                let decided = quota::decide(
                    &violations,
                    quota::Hints {
                        retry_info: hint,
                        retry_after: retry_after::parse(&text),
                    },
                    Some("m"),
                    kind.quota_per_model(),
                    now_ms,
                    quota::Bounds {
                        default_cooldown: std::time::Duration::from_secs(60),
                        max_cooldown: std::time::Duration::from_secs(3600),
                    },
                );
                for d in decided {
                    // A cool-down is at most a day long (per day) or max_cooldown.
                    assert!(d.length <= std::time::Duration::from_secs(25 * 3600), "{d:?}");
                }
            }
        }
    }
});
