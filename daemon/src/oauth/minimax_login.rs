//! MiniMax login: a user-code flow with PKCE, as MiniMax's own clients run it.
//!
//! 1. Form `POST {region}/oauth/code` with `response_type=code`, `client_id`,
//!    `scope=group_id profile model.completion`, `code_challenge`,
//!    `code_challenge_method=S256` and `state`. The answer carries `user_code`,
//!    `verification_uri`, `expired_in` (when the code dies; an absolute time in
//!    milliseconds), `interval` (milliseconds between polls) and `state`, which must echo ours.
//! 2. The user opens `verification_uri` and approves `user_code`.
//! 3. Form `POST {region}/oauth/token` with
//!    `grant_type=urn:ietf:params:oauth:grant-type:user_code`, `client_id`, `user_code` and
//!    `code_verifier`, every `interval`, until the answer has `status: "success"` and tokens
//!    (`access_token`, `refresh_token`, `expired_in`); `status: "error"` ends the login, any
//!    other status means "not approved yet".

use super::minimax::{DEFAULT_CLIENT_ID, DEFAULT_REGION};
use super::pkce::{random_urlsafe, Pkce};
use crate::config::ProfileConfig;
use crate::credentials::{unix_now, Tokens};
use crate::secret::Secret;
use llmd_proto::{ErrorKind, RpcError};
use serde_json::Value;
use std::time::Duration;

/// Scopes MiniMax's login asks for.
pub const SCOPE: &str = "group_id profile model.completion";
/// The grant type of the token poll.
pub const USER_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:user_code";
/// Poll interval when the server names none.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Slowest poll: "pending" answers back off up to this.
const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Longest a login waits for approval, whatever the server says.
const MAX_WAIT_SECS: i64 = 15 * 60;
/// Longest one HTTP exchange may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from either endpoint.
const MAX_BODY: usize = 64 * 1024;

/// Endpoints and client of one MiniMax login.
#[derive(Debug, Clone, PartialEq)]
pub struct MinimaxLogin {
    /// `{region}/oauth/code` (or the profile's `authorize_url`).
    pub code_endpoint: String,
    /// `{region}/oauth/token` (or the profile's `token_endpoint`).
    pub token_endpoint: String,
    /// OAuth client id.
    pub client_id: String,
}

/// A user code waiting for the user's approval.
#[derive(Debug, Clone)]
pub struct PendingUserCode {
    /// What the user enters on the page.
    pub user_code: String,
    /// The page to open.
    pub verification_uri: String,
    /// Unix seconds after which polling stops.
    pub expires_at: i64,
    /// Time between polls.
    pub interval: Duration,
    verifier: Secret,
}

impl MinimaxLogin {
    /// From a profile: `region` (default `https://api.minimax.io`; `https://api.minimaxi.com`
    /// in mainland China), with `authorize_url`/`token_endpoint`/`client_id` overrides.
    pub fn from_profile(p: &ProfileConfig) -> Self {
        let region = p
            .region
            .as_deref()
            .unwrap_or(DEFAULT_REGION)
            .trim_end_matches('/');
        MinimaxLogin {
            code_endpoint: p
                .authorize_url
                .clone()
                .unwrap_or_else(|| format!("{region}/oauth/code")),
            token_endpoint: p
                .token_endpoint
                .clone()
                .unwrap_or_else(|| format!("{region}/oauth/token")),
            client_id: p
                .client_id
                .clone()
                .unwrap_or_else(|| DEFAULT_CLIENT_ID.into()),
        }
    }

    /// Asks for a user code.
    pub async fn start(&self, http: &reqwest::Client) -> Result<PendingUserCode, RpcError> {
        let pkce = Pkce::generate();
        let state = random_urlsafe(16);
        let form = [
            ("response_type", "code"),
            ("client_id", self.client_id.as_str()),
            ("scope", SCOPE),
            ("code_challenge", pkce.challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("state", state.as_str()),
        ];
        let (status, json) = post_form(http, &self.code_endpoint, &form, "code endpoint").await?;
        if !status.is_success() {
            return Err(upstream(format!(
                "MiniMax code endpoint answered HTTP {}{}",
                status.as_u16(),
                status_msg(json.as_ref())
            )));
        }
        let json = json.ok_or_else(|| upstream("MiniMax code endpoint answered no JSON"))?;
        let field = |k: &str| {
            json.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (Some(user_code), Some(verification_uri)) =
            (field("user_code"), field("verification_uri"))
        else {
            return Err(upstream(
                "MiniMax code endpoint answered without user_code or verification_uri",
            ));
        };
        if field("state").as_deref() != Some(state.as_str()) {
            return Err(upstream(
                "MiniMax code endpoint answered for another login attempt (state mismatch)",
            ));
        }
        let now = unix_now();
        let expires_at = json
            .get("expired_in")
            .and_then(as_i64)
            .map(|n| to_unix_secs(n, now))
            .unwrap_or(now + MAX_WAIT_SECS)
            .min(now + MAX_WAIT_SECS);
        let interval = json
            .get("interval")
            .and_then(as_i64)
            .filter(|n| *n > 0)
            // MiniMax sends milliseconds; a small number can only be seconds (RFC 8628).
            .map(|n| {
                if n < 100 {
                    Duration::from_secs(n as u64)
                } else {
                    Duration::from_millis(n as u64)
                }
            })
            .unwrap_or(DEFAULT_INTERVAL)
            .min(MAX_INTERVAL);
        Ok(PendingUserCode {
            user_code,
            verification_uri,
            expires_at,
            interval,
            verifier: Secret::new(pkce.verifier),
        })
    }

    /// Polls the token endpoint until the user approves, the code expires, or the server
    /// refuses.
    pub async fn poll(
        &self,
        http: &reqwest::Client,
        pending: &PendingUserCode,
    ) -> Result<Tokens, RpcError> {
        let mut interval = pending.interval;
        loop {
            let form = [
                ("grant_type", USER_CODE_GRANT),
                ("client_id", self.client_id.as_str()),
                ("user_code", pending.user_code.as_str()),
                ("code_verifier", pending.verifier.expose()),
            ];
            let (status, json) =
                post_form(http, &self.token_endpoint, &form, "token endpoint").await?;
            if !status.is_success() {
                return Err(upstream(format!(
                    "MiniMax token endpoint answered HTTP {}{}",
                    status.as_u16(),
                    status_msg(json.as_ref())
                )));
            }
            let json = json.ok_or_else(|| upstream("MiniMax token endpoint answered no JSON"))?;
            match json.get("status").and_then(Value::as_str) {
                Some("success") => return tokens_of(&json),
                Some("error") => {
                    return Err(upstream(format!(
                        "MiniMax refused the login{}",
                        status_msg(Some(&json))
                    )))
                }
                _ => {}
            }
            if unix_now() + interval.as_secs() as i64 >= pending.expires_at {
                return Err(RpcError::new(
                    ErrorKind::NeedsLogin,
                    "the MiniMax user code expired before it was approved: run the login again",
                ));
            }
            tokio::time::sleep(interval).await;
            interval = interval.mul_f64(1.5).min(MAX_INTERVAL);
        }
    }
}

fn tokens_of(json: &Value) -> Result<Tokens, RpcError> {
    let text = |k: &str| {
        json.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
    };
    let Some(access) = text("access_token") else {
        return Err(upstream(
            "MiniMax approved the login but sent no access_token",
        ));
    };
    let now = unix_now();
    Ok(Tokens {
        access,
        refresh: text("refresh_token"),
        expires_at: json
            .get("expired_in")
            .and_then(as_i64)
            .map(|n| to_unix_secs(n, now)),
        scopes: SCOPE.split(' ').map(str::to_owned).collect(),
    })
}

/// A lifetime field that may hold milliseconds since the epoch, seconds since the epoch, or
/// seconds from now.
fn to_unix_secs(n: i64, now: i64) -> i64 {
    match n {
        n if n > 100_000_000_000 => n / 1000,
        n if n > 1_000_000_000 => n,
        n => now + n,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_f64().map(|f| f as i64))
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// ` (MESSAGE)` from MiniMax's `base_resp.status_msg`, short and without control characters.
fn status_msg(json: Option<&Value>) -> String {
    json.and_then(|j| j.pointer("/base_resp/status_msg"))
        .and_then(Value::as_str)
        .map(|m| {
            let m: String = m.chars().filter(|c| !c.is_control()).take(200).collect();
            format!(" ({m})")
        })
        .unwrap_or_default()
}

fn upstream(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Upstream, msg)
}

async fn post_form(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
    what: &str,
) -> Result<(reqwest::StatusCode, Option<Value>), RpcError> {
    let resp = http
        .post(url)
        .header("accept", "application/json")
        .timeout(REQUEST_TIMEOUT)
        .form(form)
        .send()
        .await
        .map_err(|e| {
            let cause = if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                "request failed".to_owned()
            };
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            upstream(format!("MiniMax {what} unreachable: {cause}")).with("host", host)
        })?;
    let status = resp.status();
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|_| upstream(format!("MiniMax {what} answer cut short")))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(upstream(format!(
                "MiniMax {what} answer is larger than {MAX_BODY} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, serde_json::from_slice(&body).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_in_any_unit() {
        assert_eq!(to_unix_secs(1_800_000_000_000, 0), 1_800_000_000);
        assert_eq!(to_unix_secs(1_800_000_000, 0), 1_800_000_000);
        assert_eq!(to_unix_secs(3600, 100), 3700);
    }

    #[test]
    fn region_and_overrides() {
        let mut p = ProfileConfig::new(
            crate::config::Provider::Minimax,
            crate::config::AuthKind::Oauth,
        );
        let l = MinimaxLogin::from_profile(&p);
        assert_eq!(l.code_endpoint, "https://api.minimax.io/oauth/code");
        assert_eq!(l.token_endpoint, "https://api.minimax.io/oauth/token");
        p.region = Some("https://api.minimaxi.com/".into());
        let l = MinimaxLogin::from_profile(&p);
        assert_eq!(l.code_endpoint, "https://api.minimaxi.com/oauth/code");
    }
}
