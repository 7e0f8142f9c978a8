//! Errors tokenrelay answers itself, in one JSON shape both SDK families understand:
//! `{"error":{"code":503,"status":"UNAVAILABLE","type":"tokenrelay_error","reason":"…","message":"…"}}`.
//! The OpenAI SDK reads `error.message`/`type`/`code`; google-genai reads
//! `error.code`/`status`/`message`. Messages say what is wrong and what to do, and never
//! contain a secret.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoUsableCredential,
    TokenEndpointUnreachable,
    UpstreamUnreachable,
    AllCredentialsRateLimited,
    UnknownProvider,
    Unauthorized,
    RequestTooLarge,
    BadRequest,
    NotFound,
    DeadlineExceeded,
    ForbiddenHost,
    ForbiddenOrigin,
    ClientForbidden,
    ClientRateLimited,
    ClientBudgetExhausted,
    /// The usage store could not answer (admin API only).
    StoreUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoUsableCredential => "no_usable_credential",
            Reason::TokenEndpointUnreachable => "token_endpoint_unreachable",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::AllCredentialsRateLimited => "all_credentials_rate_limited",
            Reason::UnknownProvider => "unknown_provider",
            Reason::Unauthorized => "unauthorized",
            Reason::RequestTooLarge => "request_too_large",
            Reason::BadRequest => "bad_request",
            Reason::NotFound => "not_found",
            Reason::DeadlineExceeded => "deadline_exceeded",
            Reason::ForbiddenHost => "forbidden_host",
            Reason::ForbiddenOrigin => "forbidden_origin",
            Reason::ClientForbidden => "client_forbidden",
            Reason::ClientRateLimited => "client_rate_limited",
            Reason::ClientBudgetExhausted => "client_budget_exhausted",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::NoUsableCredential | Reason::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::TokenEndpointUnreachable | Reason::UpstreamUnreachable => {
                StatusCode::BAD_GATEWAY
            }
            Reason::AllCredentialsRateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::UnknownProvider | Reason::NotFound => StatusCode::NOT_FOUND,
            Reason::Unauthorized => StatusCode::UNAUTHORIZED,
            Reason::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Reason::ForbiddenHost => StatusCode::MISDIRECTED_REQUEST,
            Reason::ForbiddenOrigin | Reason::ClientForbidden => StatusCode::FORBIDDEN,
            Reason::ClientRateLimited | Reason::ClientBudgetExhausted => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The google.rpc canonical code name for the status.
    fn rpc_status(self) -> &'static str {
        match self {
            Reason::NoUsableCredential
            | Reason::StoreUnavailable
            | Reason::TokenEndpointUnreachable
            | Reason::UpstreamUnreachable => "UNAVAILABLE",
            Reason::AllCredentialsRateLimited
            | Reason::ClientRateLimited
            | Reason::ClientBudgetExhausted => "RESOURCE_EXHAUSTED",
            Reason::UnknownProvider | Reason::NotFound => "NOT_FOUND",
            Reason::Unauthorized => "UNAUTHENTICATED",
            Reason::RequestTooLarge | Reason::BadRequest => "INVALID_ARGUMENT",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::ForbiddenHost | Reason::ForbiddenOrigin | Reason::ClientForbidden => {
                "PERMISSION_DENIED"
            }
        }
    }
}

/// An answer tokenrelay makes itself instead of forwarding one.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub reason: Reason,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ProxyError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ProxyError {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.reason.status()
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.reason.status();
        let body = serde_json::json!({
            "error": {
                "code": status.as_u16(),
                "status": self.reason.rpc_status(),
                "type": "tokenrelay_error",
                "reason": self.reason.as_str(),
                "message": self.message,
            }
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(d) = self.retry_after {
            // Round up: a client that waits exactly this long finds a credential ready.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
