//! The parsers of untrusted bytes tokenrelay still owns on the request path (HTTP framing
//! is hyper's): the upstream's `Keep-Alive` and `Retry-After` headers, an error answer's
//! JSON as it is judged (quota, refusal, `RetryInfo`), the model named by a request's path
//! or body, and an upload session in a path. None may panic, on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay::common::{keep_alive, retry_after};
use tokenrelay::providers::{self, ProviderKind};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = keep_alive::timeout(&text);
    let _ = retry_after::parse(&text);
    let _ = retry_after::google_retry_delay(data);
    let _ = providers::request_model(&text, data);
    let _ = tokenrelay::proxy::rewrite::session_key(&text);
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = providers::quota_models(&body);
        let _ = retry_after::google_retry_delay_of(&body);
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
        }
    }
});
