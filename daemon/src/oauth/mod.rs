//! OAuth token endpoints: the upstream half of a refresh, and the login code exchange.

pub mod anthropic;
pub mod minimax;
pub mod minimax_login;
pub mod pkce;

use crate::credentials::{unix_now, Tokens};
use crate::secret::Secret;
use serde_json::Value;

/// Why a refresh did not produce tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshError {
    /// The refresh token is spent or revoked (`invalid_grant`, `refresh_token_reused`).
    Dead(String),
    /// Worth retrying later (5xx, timeout, bad JSON, network).
    Transient(String),
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::Dead(m) | RefreshError::Transient(m) => f.write_str(m),
        }
    }
}

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

/// Turns a token endpoint's answer into tokens or a classified error. Error texts carry
/// the status and the OAuth `error` code only: bodies may echo secrets.
pub(crate) async fn parse_token_response(
    resp: Result<reqwest::Response, reqwest::Error>,
    old_refresh: Option<&Secret>,
    old_scopes: &[String],
    lifetime_field: &str,
) -> Result<Tokens, RefreshError> {
    let resp = resp.map_err(|e| {
        RefreshError::Transient(format!("token endpoint unreachable: {}", without_url(&e)))
    })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| {
        RefreshError::Transient(format!(
            "token endpoint answer cut short: {}",
            without_url(&e)
        ))
    })?;
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
            code.map(|c| format!(" ({})", short(&c)))
                .unwrap_or_default()
        );
        return Err(if dead && status.is_client_error() {
            RefreshError::Dead(what)
        } else if status.is_client_error() && status.as_u16() != 429 {
            // Retried, but a 4xx rarely fixes itself: say where to look.
            RefreshError::Transient(format!(
                "{what}; check the profile's token_endpoint, client_id and scopes"
            ))
        } else {
            RefreshError::Transient(what)
        });
    }
    let Some(json) = json else {
        return Err(RefreshError::Transient(format!(
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
        return Err(RefreshError::Transient(
            "token endpoint answer has no access_token".into(),
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

fn short(s: &str) -> String {
    s.chars().take(80).filter(|c| !c.is_control()).collect()
}

fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "<token endpoint>");
    }
    if e.is_timeout() {
        return "timed out".into();
    }
    msg
}
