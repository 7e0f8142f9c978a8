//! DashScope (Alibaba Cloud Model Studio) in its OpenAI-compatible mode: API keys only,
//! sent as `Authorization: Bearer`, to a host that depends on the key's region.
//!
//! Hosts, from Model Studio's "Base URL overview"
//! (https://www.alibabacloud.com/help/en/model-studio/base-url) and the Coding Plan page
//! (https://help.aliyun.com/zh/model-studio/other-tools-coding-plan): keys are per region
//! and per billing plan; a key sent to another region's host is refused with 401.

use serde_json::Value;

use super::{QuotaWindow, Violation};

/// `region` → the upstream. Clients use `…/dashscope/v1`; the path after the provider is
/// appended, so `/dashscope/v1/chat/completions` → `{upstream}/v1/chat/completions`.
pub const REGIONS: [(&str, &str); 5] = [
    (
        "intl",
        "https://dashscope-intl.aliyuncs.com/compatible-mode",
    ),
    ("us", "https://dashscope-us.aliyuncs.com/compatible-mode"),
    ("cn", "https://dashscope.aliyuncs.com/compatible-mode"),
    (
        "hk",
        "https://cn-hongkong.dashscope.aliyuncs.com/compatible-mode",
    ),
    ("coding", "https://coding.dashscope.aliyuncs.com"),
];

pub const DEFAULT_REGION: &str = "intl";

pub fn upstream_for(region: &str) -> Option<&'static str> {
    REGIONS.iter().find(|(r, _)| *r == region).map(|(_, u)| *u)
}

/// DashScope's OpenAI-style error code for a dead key.
pub fn is_dead_key_code(code: &str) -> bool {
    code == "invalid_api_key"
}

/// DashScope's error code: `error.code` in OpenAI-compatible mode, `code` in its native
/// API (`{"code":"Throttling.RateQuota","message":…,"request_id":…}`).
pub fn error_code(body: &Value) -> Option<&str> {
    body["error"]["code"]
        .as_str()
        .or_else(|| body["code"].as_str())
}

/// Rate limits that turn within a minute (Model Studio: RPM/TPM, per-second and burst
/// limits, per model and root account; "the service typically resumes within one
/// minute"): the native `Throttling…` codes and the compatible mode's `limit_…`.
const MINUTE_CODES: [&str; 6] = [
    "Throttling",
    "Throttling.RateQuota",
    "Throttling.BurstRate",
    "Throttling.AllocationQuota",
    "limit_requests",
    "limit_burst_rate",
];

/// A quota that is spent until an operator acts: the model's free quota with "use free
/// tier only" on (403).
const SPENT_CODES: [&str; 1] = ["AllocationQuota.FreeTierOnly"];
/// OpenAI's generic "quota exceeded" (a plan's allowance, a balance): no window is
/// named, so its hint (else `pool.default_cooldown`) decides.
const UNNAMED_CODES: [&str; 1] = ["insufficient_quota"];

/// The quota code of a DashScope rate-limit or spent-quota answer.
pub fn quota_code(body: &Value) -> Option<&str> {
    error_code(body).filter(|c| {
        MINUTE_CODES.contains(c) || SPENT_CODES.contains(c) || UNNAMED_CODES.contains(c)
    })
}

/// What a DashScope quota answer names: its window from the code (the model is the
/// request's; quotas are per model).
pub fn quota_violation(body: &Value) -> Option<Violation> {
    let code = quota_code(body)?;
    Some(Violation {
        model: None,
        window: if UNNAMED_CODES.contains(&code) {
            QuotaWindow::Other
        } else {
            QuotaWindow::Minute
        },
        per_project: false,
        zero: SPENT_CODES.contains(&code),
    })
}

/// An account-level refusal: `Arrearage` (overdue payment) refuses every request of every
/// key of the account until it is paid.
pub fn account_refusal(body: &Value) -> Option<(String, String)> {
    (error_code(body)? == "Arrearage").then(|| {
        (
            "Arrearage".to_string(),
            "the Alibaba Cloud account has an overdue payment: top it up in the Billing console, then reload or refresh this credential".to_string(),
        )
    })
}

pub fn key_hint() -> String {
    "replace the key in providers.dashscope.api_keys (Model Studio console → API keys); keys work only in their own region and plan, so check providers.dashscope.region".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::fixture;

    #[test]
    fn rate_limits_spent_quotas_and_arrears_are_told_by_their_codes() {
        for f in [
            "dashscope_429_limit_requests.json",
            "dashscope_429_throttling_allocation_quota.json",
        ] {
            let v = quota_violation(&fixture(f)).unwrap_or_else(|| panic!("{f}"));
            assert_eq!((v.window, v.zero), (QuotaWindow::Minute, false), "{f}");
        }
        assert!(
            quota_violation(&fixture("dashscope_403_free_tier_only.json")).is_some_and(|v| v.zero)
        );
        let unnamed = quota_violation(&fixture("qwen_403_insufficient_quota.json")).unwrap();
        assert_eq!((unnamed.window, unnamed.zero), (QuotaWindow::Other, false));
        assert!(quota_violation(&fixture("dashscope_401_invalid_api_key.json")).is_none());
        assert_eq!(
            account_refusal(&fixture("dashscope_400_arrearage.json"))
                .unwrap()
                .0,
            "Arrearage"
        );
        assert!(account_refusal(&fixture("dashscope_429_limit_requests.json")).is_none());
    }
}
