//! Anthropic OAuth: refresh (JSON body) and the PKCE authorization-code login, with the
//! endpoints current Claude Code uses as defaults.

use super::pkce::{random_urlsafe, Pkce};
use super::{parse_token_response, RefreshError};
use crate::config::ProfileConfig;
use crate::credentials::Tokens;
use crate::secret::Secret;
use serde_json::json;

/// Token endpoint of current Claude Code (older builds used console.anthropic.com).
pub const DEFAULT_TOKEN_ENDPOINT: &str = "https://platform.claude.com/v1/oauth/token";
/// Claude Code's OAuth client id.
pub const DEFAULT_CLIENT_ID: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
/// Authorize page of current Claude Code.
pub const DEFAULT_AUTHORIZE_URL: &str = "https://claude.com/cai/oauth/authorize";
/// Redirect URI that shows the user `code#state`.
pub const DEFAULT_REDIRECT_URI: &str = "https://platform.claude.com/oauth/code/callback";
/// Longest wait for the code exchange of a login.
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Scopes asked for at login.
pub const DEFAULT_SCOPES: &str = "user:profile user:inference";

/// Endpoints and client of one Anthropic login.
#[derive(Debug, Clone, PartialEq)]
pub struct AnthropicOAuth {
    /// Token endpoint.
    pub token_endpoint: String,
    /// OAuth client id.
    pub client_id: String,
    /// Authorize page.
    pub authorize_url: String,
    /// Redirect URI.
    pub redirect_uri: String,
    /// Scopes asked for at login.
    pub scopes: Vec<String>,
}

impl AnthropicOAuth {
    /// From a profile's overrides, with Claude Code's defaults.
    pub fn from_profile(p: &ProfileConfig) -> Self {
        AnthropicOAuth {
            token_endpoint: p
                .token_endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_TOKEN_ENDPOINT.into()),
            client_id: p
                .client_id
                .clone()
                .unwrap_or_else(|| DEFAULT_CLIENT_ID.into()),
            authorize_url: p
                .authorize_url
                .clone()
                .unwrap_or_else(|| DEFAULT_AUTHORIZE_URL.into()),
            redirect_uri: p
                .redirect_uri
                .clone()
                .unwrap_or_else(|| DEFAULT_REDIRECT_URI.into()),
            scopes: p
                .scopes
                .clone()
                .unwrap_or_else(|| DEFAULT_SCOPES.split(' ').map(str::to_owned).collect()),
        }
    }

    /// `POST {grant_type:"refresh_token", refresh_token, client_id, scope?}`.
    pub async fn refresh(
        &self,
        http: &reqwest::Client,
        rt: &Secret,
        scopes: &[String],
    ) -> Result<Tokens, RefreshError> {
        let mut body = json!({
            "grant_type": "refresh_token",
            "refresh_token": rt.expose(),
            "client_id": self.client_id,
        });
        if !scopes.is_empty() {
            body["scope"] = scopes.join(" ").into();
        }
        let resp = http
            .post(&self.token_endpoint)
            .timeout(super::TOKEN_ENDPOINT_HARD_LIMIT)
            .json(&body)
            .send()
            .await;
        parse_token_response(resp, Some(rt), scopes, "expires_in").await
    }

    /// Starts a login: the URL to open and what the exchange will need.
    pub fn start_login(&self) -> Result<PendingLogin, String> {
        let pkce = Pkce::generate();
        let state = random_urlsafe(32);
        let scope = self.scopes.join(" ");
        let url = reqwest::Url::parse_with_params(
            &self.authorize_url,
            &[
                ("code", "true"),
                ("client_id", self.client_id.as_str()),
                ("response_type", "code"),
                ("redirect_uri", self.redirect_uri.as_str()),
                ("scope", scope.as_str()),
                ("code_challenge", pkce.challenge.as_str()),
                ("code_challenge_method", "S256"),
                ("state", state.as_str()),
            ],
        )
        .map_err(|e| format!("bad authorize_url: {e}"))?;
        Ok(PendingLogin {
            url: url.into(),
            verifier: Secret::new(pkce.verifier),
            state,
        })
    }

    /// Exchanges what the user pasted (`code#state` or the bare code) for tokens.
    pub async fn finish_login(
        &self,
        http: &reqwest::Client,
        pending: &PendingLogin,
        pasted: &str,
    ) -> Result<Tokens, String> {
        let pasted = pasted.trim();
        let (code, state) = match pasted.split_once('#') {
            Some((c, s)) => (c, s),
            None => (pasted, pending.state.as_str()),
        };
        if code.is_empty() {
            return Err("the pasted code is empty".into());
        }
        if state != pending.state {
            return Err("the pasted code belongs to another login attempt (state mismatch); run the login again".into());
        }
        let body = json!({
            "grant_type": "authorization_code",
            "code": code,
            "state": state,
            "redirect_uri": self.redirect_uri,
            "client_id": self.client_id,
            "code_verifier": pending.verifier.expose(),
        });
        let resp = http
            .post(&self.token_endpoint)
            .timeout(EXCHANGE_TIMEOUT)
            .json(&body)
            .send()
            .await;
        parse_token_response(resp, None, &self.scopes, "expires_in")
            .await
            .map_err(|e| format!("code exchange failed: {e}"))
    }
}

/// A login between `login.start` and `login.finish`.
#[derive(Debug, Clone)]
pub struct PendingLogin {
    /// The URL shown to the user.
    pub url: String,
    /// PKCE verifier.
    pub verifier: Secret,
    /// Random `state`.
    pub state: String,
}
