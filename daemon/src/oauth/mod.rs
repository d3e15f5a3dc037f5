//! OAuth token endpoints: the upstream half of a refresh, and the login code exchange.

pub mod anthropic;
pub mod minimax;
pub mod minimax_login;
pub mod pkce;

use crate::credentials::{unix_now, Tokens};
use crate::secret::Secret;
use futures_util::StreamExt;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Why a refresh did not produce tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshError {
    /// The refresh token is spent or revoked (`invalid_grant`, `refresh_token_reused`).
    Dead(String),
    /// Worth retrying later (5xx, 429, timeout, bad JSON, network).
    Transient {
        /// What happened, free of secrets.
        why: String,
        /// The endpoint's `retry-after`, when it gave one.
        retry_after: Option<Duration>,
    },
}

impl RefreshError {
    /// A transient failure without a `retry-after`.
    pub fn transient(why: impl Into<String>) -> Self {
        RefreshError::Transient {
            why: why.into(),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::Dead(m) | RefreshError::Transient { why: m, .. } => f.write_str(m),
        }
    }
}

/// Longest wait for a token endpoint's whole answer. A refresh whose answer is slower
/// than `refresh_timeout_secs` goes on in the background up to this long, because the
/// endpoint may already have rotated the login and its answer is then the only copy.
pub const TOKEN_ENDPOINT_HARD_LIMIT: Duration = Duration::from_secs(120);
/// Largest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;
/// Longest `retry-after` honoured (an endpoint asking for more is asked again then).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The token endpoint of one login.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// Anthropic (JSON body).
    Anthropic(anthropic::AnthropicOAuth),
    /// MiniMax (form body, `expired_in`).
    Minimax(minimax::MinimaxOAuth),
}

impl Upstream {
    /// Exchanges the refresh token in `current` for new tokens.
    pub async fn refresh(
        &self,
        http: &reqwest::Client,
        current: &Tokens,
    ) -> Result<Tokens, RefreshError> {
        let Some(rt) = &current.refresh else {
            return Err(RefreshError::Dead("the login has no refresh token".into()));
        };
        match self {
            Upstream::Anthropic(a) => a.refresh(http, rt, &current.scopes).await,
            Upstream::Minimax(m) => m.refresh(http, rt, &current.scopes).await,
        }
    }
}

/// The future of one refresh call.
pub type RefreshFuture = Pin<Box<dyn Future<Output = Result<Tokens, RefreshError>> + Send>>;

/// Whoever exchanges a refresh token for new tokens. The daemon's is [`HttpEndpoint`];
/// the refresh engine's unit tests put a scripted one in its place.
pub trait TokenEndpoint: Send + Sync + std::fmt::Debug {
    /// Starts exchanging the refresh token in `current`. The future owns what it needs,
    /// so it can be left running in the background past a caller's deadline.
    fn refresh(&self, current: &Tokens) -> RefreshFuture;
}

/// A real token endpoint over HTTP.
#[derive(Debug, Clone)]
pub struct HttpEndpoint {
    /// Which endpoint and client.
    pub upstream: Upstream,
    /// The daemon's HTTP client.
    pub http: reqwest::Client,
}

impl TokenEndpoint for HttpEndpoint {
    fn refresh(&self, current: &Tokens) -> RefreshFuture {
        let this = self.clone();
        let current = current.clone();
        Box::pin(async move { this.upstream.refresh(&this.http, &current).await })
    }
}

/// Turns a token endpoint's answer into tokens or a classified error. Error texts carry
/// the status and the OAuth `error` code only: bodies may echo secrets.
pub(crate) async fn parse_token_response(
    resp: Result<reqwest::Response, reqwest::Error>,
    old_refresh: Option<&Secret>,
    old_scopes: &[String],
    lifetime_field: &str,
) -> Result<Tokens, RefreshError> {
    let resp = resp.map_err(|e| {
        RefreshError::transient(format!("token endpoint unreachable: {}", describe(&e)))
    })?;
    let status = resp.status();
    let retry_after = crate::providers::retry_after(resp.headers()).map(|d| d.min(MAX_RETRY_AFTER));
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RefreshError::transient(format!("token endpoint answer cut short: {}", describe(&e)))
        })?;
        if body.len() + chunk.len() > MAX_TOKEN_ANSWER {
            return Err(RefreshError::transient(format!(
                "token endpoint answered {} with more than {MAX_TOKEN_ANSWER} bytes",
                status.as_u16()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let code = json.as_ref().and_then(|j| j.get("error")).map(|e| match e {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned(),
        _ => "error".to_owned(),
    });
    let text = String::from_utf8_lossy(&body);
    let dead = text.contains("invalid_grant") || text.contains("refresh_token_reused");
    if !status.is_success() {
        let what = format!(
            "token endpoint answered {}{}",
            status.as_u16(),
            code.map(|c| format!(" ({})", error_code(&c)))
                .unwrap_or_default()
        );
        return Err(if dead && status.is_client_error() {
            RefreshError::Dead(what)
        } else if status.is_client_error() && status.as_u16() != 429 {
            // Retried, but a 4xx rarely fixes itself: say where to look.
            RefreshError::Transient {
                why: format!("{what}; check the profile's token_endpoint, client_id and scopes"),
                retry_after,
            }
        } else {
            RefreshError::Transient {
                why: what,
                retry_after,
            }
        });
    }
    let Some(json) = json else {
        return Err(RefreshError::transient(format!(
            "token endpoint answered {} with a body that is not JSON",
            status.as_u16()
        )));
    };
    let access = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let Some(access) = access else {
        if dead {
            return Err(RefreshError::Dead(
                "token endpoint rejected the refresh token".into(),
            ));
        }
        return Err(RefreshError::transient(
            "token endpoint answer has no access_token",
        ));
    };
    let lifetime = json.get(lifetime_field).and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    });
    let now = unix_now();
    let expires_at = lifetime.map(|n| match n {
        // Some servers put an absolute time in the lifetime field: milliseconds, then seconds.
        n if n > 100_000_000_000 => n / 1000,
        n if n > 1_000_000_000 => n,
        n => now + n,
    });
    let scopes = match json.get("scope") {
        Some(v) => crate::credentials::bundle::scopes_of(Some(v)),
        None => old_scopes.to_vec(),
    };
    Ok(Tokens {
        access: Secret::new(access),
        refresh: json
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .or_else(|| old_refresh.cloned()),
        expires_at,
        scopes,
    })
}

/// An OAuth `error` code as it may be shown: codes are short identifiers, and anything
/// else (an endpoint that echoes the request, the refresh token among it) is not repeated.
fn error_code(s: &str) -> &str {
    let plain = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if plain {
        s
    } else {
        "unreadable error code"
    }
}

/// A transport error, naming the host but never the URL's path or query, with its
/// causes (connection refused, DNS, TLS, timeout).
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let host = e
        .url()
        .and_then(|u| u.host_str().map(|h| h.to_owned()))
        .unwrap_or_else(|| "the token endpoint".into());
    if e.is_timeout() {
        return format!("{host}: timed out");
    }
    let mut msg = if e.is_connect() {
        format!("{host}: cannot connect")
    } else {
        format!("{host}: request failed")
    };
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_that_are_not_identifiers_are_not_repeated() {
        assert_eq!(error_code("invalid_grant"), "invalid_grant");
        assert_eq!(
            error_code("bad refresh token sk-ant-ort01-SECRET"),
            "unreadable error code"
        );
        assert_eq!(error_code(&"x".repeat(65)), "unreadable error code");
    }
}
