//! Gateway errors in the shape of the API the client speaks, so that its SDK raises its
//! usual exception (`AuthenticationError`, `PermissionDeniedError`, …).

use crate::config::Provider;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which error body a client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"type":"error","error":{"type":…,"message":…}}`
    Anthropic,
    /// `{"error":{"message":…,"type":…,"code":…}}`
    OpenAi,
    /// `{"error":{"code":401,"message":…,"status":"UNAUTHENTICATED"}}`
    Gemini,
}

impl Shape {
    /// The native shape of `provider` (MiniMax's own API is OpenAI-like).
    pub fn of(provider: Provider) -> Shape {
        match provider {
            Provider::Anthropic => Shape::Anthropic,
            Provider::Gemini => Shape::Gemini,
            Provider::OpenaiCompat | Provider::Minimax => Shape::OpenAi,
        }
    }
}

/// An error answer of the gateway itself (not one passed through from the provider).
#[derive(Debug)]
pub struct GatewayError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// Body shape.
    pub shape: Shape,
}

impl GatewayError {
    /// An error with `status`.
    pub fn new(status: StatusCode, shape: Shape, message: impl Into<String>) -> Self {
        GatewayError {
            status,
            message: message.into(),
            shape,
        }
    }

    /// The body, as JSON.
    pub fn body(&self) -> serde_json::Value {
        let s = self.status.as_u16();
        match self.shape {
            Shape::Anthropic => {
                let kind = match s {
                    400 | 413 | 422 => "invalid_request_error",
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    429 => "rate_limit_error",
                    529 | 503 => "overloaded_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
            Shape::OpenAi => {
                let (kind, code) = match s {
                    401 => ("invalid_request_error", Some("invalid_api_key")),
                    403 => ("permission_error", None),
                    404 => ("invalid_request_error", Some("not_found")),
                    429 => ("rate_limit_exceeded", Some("rate_limit_exceeded")),
                    400 | 413 | 422 => ("invalid_request_error", None),
                    _ => ("server_error", None),
                };
                json!({"error": {"message": self.message, "type": kind, "param": null, "code": code}})
            }
            Shape::Gemini => {
                let status = match s {
                    400 | 413 => "INVALID_ARGUMENT",
                    401 => "UNAUTHENTICATED",
                    403 => "PERMISSION_DENIED",
                    404 => "NOT_FOUND",
                    429 => "RESOURCE_EXHAUSTED",
                    503 => "UNAVAILABLE",
                    _ => "INTERNAL",
                };
                json!({"error": {"code": s, "message": self.message, "status": status}})
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}
