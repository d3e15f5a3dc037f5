//! Error codes and kinds of DESIGN.md ("Errors use JSON-RPC codes and carry `data.kind`").

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// What went wrong, as named in `data.kind`; each maps to one JSON-RPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not JSON.
    ParseError,
    /// Not a JSON-RPC request.
    InvalidRequest,
    /// A line over the size limit; the connection is closed after it.
    FrameTooLarge,
    /// No such method.
    MethodNotFound,
    /// Params missing or of the wrong shape; the message names the field.
    InvalidParams,
    /// A bug or an unexpected local failure.
    Internal,
    /// No profile of that name is configured.
    UnknownProfile,
    /// The login is dead; `llmctl login <profile>` fixes it.
    NeedsLogin,
    /// A transient refresh failure left no valid token; see `data.retry_after_ms`.
    RefreshFailed,
    /// The provider answered with an error; see `data.status` and `data.body`.
    Upstream,
    /// A rate limit applies; see `data.retry_after_ms`.
    RateLimited,
    /// A connection or queue limit was reached.
    Busy,
    /// The peer may not use this daemon.
    PermissionDenied,
    /// The request was cancelled.
    Cancelled,
    /// No key or token is configured or found for the profile (not a dead login).
    MissingCredential,
    /// A kind this version does not know (a newer llmd); the code still tells the class.
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The JSON-RPC error code of this kind.
    pub fn code(self) -> i64 {
        match self {
            ErrorKind::ParseError => -32700,
            ErrorKind::InvalidRequest | ErrorKind::FrameTooLarge => -32600,
            ErrorKind::MethodNotFound => -32601,
            ErrorKind::InvalidParams => -32602,
            ErrorKind::Internal => -32603,
            ErrorKind::UnknownProfile => -32001,
            ErrorKind::NeedsLogin => -32002,
            ErrorKind::RefreshFailed => -32003,
            ErrorKind::Upstream => -32004,
            ErrorKind::RateLimited => -32005,
            ErrorKind::Busy => -32006,
            ErrorKind::PermissionDenied => -32007,
            ErrorKind::Cancelled => -32008,
            ErrorKind::MissingCredential => -32009,
            ErrorKind::Unknown => -32603,
        }
    }

    /// The `data.kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ParseError => "parse_error",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::MethodNotFound => "method_not_found",
            ErrorKind::InvalidParams => "invalid_params",
            ErrorKind::Internal => "internal",
            ErrorKind::UnknownProfile => "unknown_profile",
            ErrorKind::NeedsLogin => "needs_login",
            ErrorKind::RefreshFailed => "refresh_failed",
            ErrorKind::Upstream => "upstream",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Busy => "busy",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::MissingCredential => "missing_credential",
            ErrorKind::Unknown => "unknown",
        }
    }

    /// The kind named by a `data.kind` string, if it is one of ours.
    pub fn from_kind_str(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_owned()))
            .ok()
            .filter(|k| *k != ErrorKind::Unknown)
    }

    /// The most likely kind for a bare JSON-RPC code (when `data.kind` is absent).
    pub fn from_code(code: i64) -> Self {
        match code {
            -32700 => ErrorKind::ParseError,
            -32600 => ErrorKind::InvalidRequest,
            -32601 => ErrorKind::MethodNotFound,
            -32602 => ErrorKind::InvalidParams,
            -32001 => ErrorKind::UnknownProfile,
            -32002 => ErrorKind::NeedsLogin,
            -32003 => ErrorKind::RefreshFailed,
            -32004 => ErrorKind::Upstream,
            -32005 => ErrorKind::RateLimited,
            -32006 => ErrorKind::Busy,
            -32007 => ErrorKind::PermissionDenied,
            -32008 => ErrorKind::Cancelled,
            -32009 => ErrorKind::MissingCredential,
            _ => ErrorKind::Internal,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON-RPC error object: `{code, message, data:{kind, ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// JSON-RPC error code.
    pub code: i64,
    /// Human-readable message; never contains a secret.
    pub message: String,
    /// `{kind, ...}` plus kind-specific fields such as `retry_after_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error of `kind` with `message` and `data = {kind}`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut data = Map::new();
        data.insert("kind".into(), Value::String(kind.as_str().into()));
        RpcError {
            code: kind.code(),
            message: message.into(),
            data: Some(Value::Object(data)),
        }
    }

    /// Adds a field to `data` (e.g. `retry_after_ms`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Some(Value::Object(map)) = &mut self.data {
            map.insert(key.to_owned(), value.into());
        }
        self
    }

    /// The kind from `data.kind`, falling back to the code.
    pub fn kind(&self) -> ErrorKind {
        self.data
            .as_ref()
            .and_then(|d| d.get("kind"))
            .and_then(Value::as_str)
            .and_then(ErrorKind::from_kind_str)
            .unwrap_or_else(|| ErrorKind::from_code(self.code))
    }

    /// A field of `data`, if present.
    pub fn data_field(&self, key: &str) -> Option<&Value> {
        self.data.as_ref().and_then(|d| d.get(key))
    }

    /// Shorthand for an `invalid_params` error.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParams, message)
    }

    /// Shorthand for an `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// `unknown_profile` naming the profile.
    pub fn unknown_profile(name: &str) -> Self {
        Self::new(
            ErrorKind::UnknownProfile,
            format!("unknown profile `{name}`: see `llmctl status` for the configured profiles"),
        )
        .with("profile", name)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind())
    }
}

impl std::error::Error for RpcError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_design() {
        let table = [
            (ErrorKind::ParseError, -32700, "parse_error"),
            (ErrorKind::InvalidRequest, -32600, "invalid_request"),
            (ErrorKind::FrameTooLarge, -32600, "frame_too_large"),
            (ErrorKind::MethodNotFound, -32601, "method_not_found"),
            (ErrorKind::InvalidParams, -32602, "invalid_params"),
            (ErrorKind::Internal, -32603, "internal"),
            (ErrorKind::UnknownProfile, -32001, "unknown_profile"),
            (ErrorKind::NeedsLogin, -32002, "needs_login"),
            (ErrorKind::RefreshFailed, -32003, "refresh_failed"),
            (ErrorKind::Upstream, -32004, "upstream"),
            (ErrorKind::RateLimited, -32005, "rate_limited"),
            (ErrorKind::Busy, -32006, "busy"),
            (ErrorKind::PermissionDenied, -32007, "permission_denied"),
            (ErrorKind::Cancelled, -32008, "cancelled"),
            (ErrorKind::MissingCredential, -32009, "missing_credential"),
        ];
        for (kind, code, name) in table {
            assert_eq!(kind.code(), code);
            assert_eq!(kind.as_str(), name);
            assert_eq!(ErrorKind::from_kind_str(name), Some(kind));
            let err = RpcError::new(kind, "x");
            assert_eq!(err.kind(), kind);
            let json = serde_json::to_value(&err).unwrap();
            assert_eq!(json["code"], code);
            assert_eq!(json["data"]["kind"], name);
        }
    }
}
