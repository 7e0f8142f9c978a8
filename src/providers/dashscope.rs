//! DashScope (Alibaba Cloud Model Studio) in its OpenAI-compatible mode: API keys only,
//! sent as `Authorization: Bearer`, to a host that depends on the key's region.
//!
//! Hosts, from Model Studio's "Base URL overview"
//! (https://www.alibabacloud.com/help/en/model-studio/base-url) and the Coding Plan page
//! (https://help.aliyun.com/zh/model-studio/other-tools-coding-plan): keys are per region
//! and per billing plan; a key sent to another region's host is refused with 401.

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

pub fn key_hint() -> String {
    "replace the key in providers.dashscope.api_keys (Model Studio console → API keys); keys work only in their own region and plan, so check providers.dashscope.region".to_string()
}
