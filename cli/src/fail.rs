//! Exit codes and how a failure is shown.

use llmd_client::proto::{ErrorKind, RpcError};
use llmd_client::Error;
use serde_json::Value;

/// Documented exit codes (README "Exit codes").
pub mod code {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure.
    pub const FAILURE: u8 = 1;
    /// Bad command line or bad request (clap also exits 2).
    pub const USAGE: u8 = 2;
    /// llmd is not running or its socket cannot be used.
    pub const NOT_RUNNING: u8 = 3;
    /// No profile of that name.
    pub const UNKNOWN_PROFILE: u8 = 4;
    /// The profile needs a login or has no credential (also `status` when a profile needs
    /// attention).
    pub const NEEDS_LOGIN: u8 = 5;
    /// The provider or its token endpoint failed.
    pub const UPSTREAM: u8 = 6;
}

/// A failure: what to print and the exit code.
#[derive(Debug)]
pub struct Fail {
    /// Exit code.
    pub code: u8,
    /// First line, without the `llmctl: ` prefix.
    pub message: String,
    /// Further lines (`host: …`, `cause: …`, `provider said: …`).
    pub details: Vec<String>,
}

impl Fail {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Fail {
        Fail::new(code::USAGE, message)
    }

    /// Any other failure.
    pub fn other(message: impl Into<String>) -> Fail {
        Fail::new(code::FAILURE, message)
    }

    /// Prints the failure on stderr.
    pub fn print(&self) {
        eprintln!("llmctl: {}", self.message);
        for d in &self.details {
            eprintln!("  {d}");
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        match e {
            Error::Rpc(r) => from_rpc(&r),
            Error::NotRunning { .. } | Error::Socket { .. } | Error::Disconnected => {
                Fail::new(code::NOT_RUNNING, e.to_string())
            }
            Error::Protocol(_) => Fail::other(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail::other(e.to_string())
    }
}

impl From<serde_json::Error> for Fail {
    fn from(e: serde_json::Error) -> Fail {
        Fail::other(e.to_string())
    }
}

/// The exit code of a daemon error kind.
pub fn code_of(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::ParseError
        | ErrorKind::InvalidRequest
        | ErrorKind::FrameTooLarge
        | ErrorKind::MethodNotFound
        | ErrorKind::InvalidParams => code::USAGE,
        ErrorKind::UnknownProfile => code::UNKNOWN_PROFILE,
        ErrorKind::NeedsLogin | ErrorKind::MissingCredential => code::NEEDS_LOGIN,
        ErrorKind::Upstream | ErrorKind::RefreshFailed | ErrorKind::RateLimited => code::UPSTREAM,
        ErrorKind::PermissionDenied => code::NOT_RUNNING,
        ErrorKind::Internal | ErrorKind::Busy | ErrorKind::Cancelled | ErrorKind::Unknown => {
            code::FAILURE
        }
    }
}

/// The daemon's message plus what `data` says about the provider: the host, the cause
/// chain and the first part of the body.
pub fn from_rpc(e: &RpcError) -> Fail {
    let mut f = Fail::new(code_of(e.kind()), e.to_string());
    let Some(data) = e.data.as_ref() else {
        return f;
    };
    if let Some(host) = data.get("host").and_then(Value::as_str) {
        f.details.push(format!("host: {}", one_line(host, 200)));
    }
    match data.get("cause") {
        Some(Value::String(c)) => f.details.push(format!("cause: {}", one_line(c, 500))),
        Some(Value::Array(chain)) => {
            let parts: Vec<String> = chain
                .iter()
                .filter_map(Value::as_str)
                .map(|s| one_line(s, 200))
                .collect();
            if !parts.is_empty() {
                f.details.push(format!("cause: {}", parts.join(": ")));
            }
        }
        _ => {}
    }
    if let Some(body) = data.get("body") {
        let text = match body {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if !text.trim().is_empty() {
            f.details
                .push(format!("provider said: {}", one_line(&text, 500)));
        }
    }
    f
}

/// `s` on one line, without control characters, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_error_shows_host_cause_and_body() {
        let e = RpcError::new(ErrorKind::Upstream, "cannot reach the provider")
            .with("host", "api.example.com")
            .with(
                "cause",
                serde_json::json!(["error sending request", "connection refused"]),
            )
            .with("body", "{\"error\":\n\"Incorrect API key provided\"}");
        let f = from_rpc(&e);
        assert_eq!(f.code, code::UPSTREAM);
        assert_eq!(f.details[0], "host: api.example.com");
        assert_eq!(
            f.details[1],
            "cause: error sending request: connection refused"
        );
        assert!(
            f.details[2].contains("Incorrect API key provided"),
            "{:?}",
            f.details
        );
    }

    #[test]
    fn kinds_have_distinct_codes() {
        assert_eq!(code_of(ErrorKind::UnknownProfile), code::UNKNOWN_PROFILE);
        assert_eq!(code_of(ErrorKind::MissingCredential), code::NEEDS_LOGIN);
        assert_eq!(code_of(ErrorKind::InvalidParams), code::USAGE);
    }
}
