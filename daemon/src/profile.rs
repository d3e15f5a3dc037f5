//! A configured profile: its settings plus the credential behind it.

use crate::config::{self, AuthKind, ProfileConfig, Provider};
use crate::credentials::claude_lock::ClaudeLocks;
use crate::credentials::{
    self, api_key, bundle::BundleFile, claude_cli::CredentialsFile, setup_token, store, Source,
};
use crate::oauth::{anthropic::AnthropicOAuth, minimax::MinimaxOAuth, Upstream};
use crate::ratelimit::RateLimiter;
use crate::refresh::{Force, LoginHandle, LoginSpec};
use crate::secret::Secret;
use crate::sync::lock;
use llmd_proto::methods::{
    CredentialSource, Event, Limits, ProfileState, ProfileStatus, TokenResult,
};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// Longest wait for Claude Code's refresh lock.
const CLAUDE_LOCK_WAIT: Duration = Duration::from_secs(30);
/// Claude Code refreshes 5 minutes before expiry; llmd refreshes a shared login at least
/// this far ahead so that Claude Code never has a reason to refresh it itself.
const CLAUDE_MIN_MARGIN: Duration = Duration::from_secs(600);

/// What stands behind a profile.
#[derive(Debug)]
pub enum Credential {
    /// A key or setup-token read at load time (or why there is none).
    Static(Result<Secret, String>),
    /// An OAuth login with its refresh task.
    Login(LoginHandle),
}

/// One configured profile.
#[derive(Debug)]
pub struct Profile {
    /// Name clients use.
    pub name: String,
    /// Its config.
    pub config: ProfileConfig,
    /// Its credential.
    pub credential: Credential,
    /// Shared rate limits of its chat traffic.
    pub limiter: Arc<RateLimiter>,
    /// The serialized `token` answer of the last token served.
    answer: Mutex<Option<(Secret, Arc<str>)>>,
}

/// Shared services a profile needs when it is built.
pub struct Env<'a> {
    /// Stored keys and bundles.
    pub state_dir: &'a Path,
    /// `[daemon] refresh_margin_secs`.
    pub margin: Duration,
    /// `[daemon] refresh_timeout_secs`.
    pub timeout: Duration,
    /// HTTP client.
    pub http: &'a reqwest::Client,
    /// Event bus.
    pub events: &'a broadcast::Sender<Event>,
}

impl Profile {
    /// Builds a profile. An OAuth profile gets the running login task of `logins` whose
    /// key matches (so one login file always has exactly one task, across profiles and
    /// reloads), else a new task that is added to `logins`.
    pub fn build(
        name: &str,
        cfg: &ProfileConfig,
        env: &Env<'_>,
        logins: &mut Vec<(LoginKey, LoginHandle)>,
    ) -> Profile {
        let credential = match cfg.auth {
            AuthKind::ApiKey => Credential::Static(api_key::load(name, cfg, env.state_dir)),
            AuthKind::SetupToken => Credential::Static(load_setup_token(name, cfg, env.state_dir)),
            AuthKind::Oauth | AuthKind::ClaudeCli => {
                let key = LoginKey::of(name, cfg, env);
                let handle = match logins.iter().find(|(k, _)| *k == key) {
                    Some((_, h)) => {
                        h.source_changed();
                        h.clone()
                    }
                    None => {
                        if logins
                            .iter()
                            .any(|(k, _)| k.source.path() == key.source.path())
                        {
                            tracing::warn!(
                                profile = name,
                                file = %key.source.path().display(),
                                "two profiles use one login file with different OAuth settings; they will refresh it independently"
                            );
                        }
                        let h = LoginHandle::spawn(LoginSpec {
                            profile: name.to_owned(),
                            source: key.source.clone(),
                            upstream: key.upstream.clone(),
                            locks: key.locks.clone(),
                            margin: key.margin,
                            timeout: key.timeout,
                            http: env.http.clone(),
                            events: env.events.clone(),
                        });
                        logins.push((key, h.clone()));
                        h
                    }
                };
                Credential::Login(handle)
            }
        };
        Profile {
            name: name.to_owned(),
            config: cfg.clone(),
            credential,
            limiter: Arc::new(RateLimiter::new(cfg.rate_limit.as_ref())),
            answer: Mutex::new(None),
        }
    }

    /// The identity of this profile's login task, for OAuth profiles.
    pub fn login_key(&self, env: &Env<'_>) -> Option<LoginKey> {
        self.config
            .auth
            .is_login()
            .then(|| LoginKey::of(&self.name, &self.config, env))
    }

    /// The `token`/`refresh` answer, serialized. The JSON of the current token is built once
    /// per token and reused, so the hot path costs one copy instead of a header map and a
    /// serialization per call.
    pub async fn token_answer(
        &self,
        min_valid: u64,
        force: Force,
    ) -> Result<Box<RawValue>, RpcError> {
        let (token, expires_at) = self.secret(min_valid, force).await?;
        {
            let cached = lock(&self.answer);
            if let Some((t, json)) = cached.as_ref() {
                if *t == token {
                    return RawValue::from_string(json.to_string())
                        .map_err(|e| RpcError::internal(e.to_string()));
                }
            }
        }
        let answer = self.answer_for(&token, expires_at);
        let raw = serde_json::value::to_raw_value(&answer)
            .map_err(|e| RpcError::internal(e.to_string()))?;
        *lock(&self.answer) = Some((token, Arc::from(raw.get())));
        Ok(raw)
    }

    /// A token valid for `min_valid` seconds, with the headers the provider needs.
    pub async fn token(&self, min_valid: u64, force: Force) -> Result<TokenResult, RpcError> {
        let (token, expires_at) = self.secret(min_valid, force).await?;
        Ok(self.answer_for(&token, expires_at))
    }

    fn answer_for(&self, token: &Secret, expires_at: Option<i64>) -> TokenResult {
        TokenResult {
            profile: self.name.clone(),
            kind: self.config.auth.as_str().to_owned(),
            headers: self.headers(token.expose()),
            token: token.expose().to_owned(),
            expires_at,
        }
    }

    async fn secret(
        &self,
        min_valid: u64,
        force: Force,
    ) -> Result<(Secret, Option<i64>), RpcError> {
        Ok(match &self.credential {
            Credential::Static(Ok(k)) => (k.clone(), None),
            Credential::Static(Err(why)) => {
                // Nothing is configured or found: not a dead login, so not `needs_login`.
                return Err(RpcError::new(
                    ErrorKind::MissingCredential,
                    format!("profile `{}`: {why}", self.name),
                )
                .with("profile", self.name.as_str()));
            }
            Credential::Login(h) => h.token(min_valid, force).await?,
        })
    }

    /// Headers for a request with `token`.
    pub fn headers(&self, token: &str) -> BTreeMap<String, String> {
        credentials::auth_headers(
            self.config.provider,
            self.config.auth,
            token,
            self.config.group_id.as_deref(),
            &self.config.extra_headers,
        )
    }

    /// The profile's line in `status`.
    pub fn status(&self) -> ProfileStatus {
        let mut s = ProfileStatus {
            name: self.name.clone(),
            provider: self.config.provider.as_str().into(),
            auth: self.config.auth.as_str().into(),
            state: ProfileState::Ok,
            expires_at: None,
            last_refresh_at: None,
            refresh_count: 0,
            last_error: None,
            limits: None,
            source: None,
            base_url: Some(self.base_url().to_owned()),
            default_model: self.config.default_model.clone(),
        };
        match &self.credential {
            Credential::Static(Ok(_)) => {}
            Credential::Static(Err(e)) => {
                s.state = ProfileState::Missing;
                s.last_error = Some(e.clone());
            }
            Credential::Login(h) => {
                let snap = h.snapshot();
                s.state = snap.state;
                s.expires_at = snap.expires_at;
                s.last_refresh_at = snap.last_refresh_at;
                s.refresh_count = snap.refresh_count;
                s.last_error = snap.last_error.clone();
            }
        }
        let l = self.limiter.status();
        s.limits = Some(Limits {
            queued: l.queued,
            in_flight: l.in_flight,
            remaining_requests: l.remaining_requests,
            remaining_tokens: l.remaining_tokens,
            paused_for_ms: l.paused_for_ms,
        });
        s
    }

    /// The API base URL (the provider default unless the profile overrides it).
    pub fn base_url(&self) -> &str {
        self.config
            .base_url
            .as_deref()
            .unwrap_or_else(|| crate::providers::default_base_url(self.config.provider))
    }

    /// The login task, for OAuth profiles.
    pub fn login(&self) -> Option<&LoginHandle> {
        match &self.credential {
            Credential::Login(h) => Some(h),
            Credential::Static(_) => None,
        }
    }

    /// The file of an OAuth login.
    pub fn login_source(&self, state_dir: &Path) -> Option<Source> {
        self.config
            .auth
            .is_login()
            .then(|| login_source(&self.name, &self.config, state_dir).0)
    }
}

/// Where `name`'s credential comes from, in the order the loaders try them (see
/// [`api_key::load`] and `load_setup_token`): the first present source wins, and the ones
/// it shadows are named so `status` can say a stored key hides an environment variable.
pub fn credential_source(name: &str, cfg: &ProfileConfig, state_dir: &Path) -> CredentialSource {
    let file = |kind: &str, path: &Path| {
        let meta = std::fs::metadata(path).ok();
        CredentialSource {
            kind: kind.into(),
            location: path.display().to_string(),
            // Present means usable by this daemon: there, not empty, and readable.
            present: meta.as_ref().is_some_and(|m| m.is_file() && m.len() > 0)
                && std::fs::File::open(path).is_ok(),
            mode: meta.map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o7777
            }),
            shadowed: Vec::new(),
        }
    };
    let mut candidates = match cfg.auth {
        AuthKind::ApiKey | AuthKind::SetupToken => {
            let stored_kind = if cfg.auth == AuthKind::ApiKey {
                store::Kind::ApiKey
            } else {
                store::Kind::SetupToken
            };
            let mut v = vec![file("stored", &store::path(state_dir, name, stored_kind))];
            if let Some(p) = &cfg.api_key_file {
                v.push(file("file", p));
            } else {
                let var = cfg.api_key_env.as_deref().unwrap_or(match cfg.auth {
                    AuthKind::SetupToken => "CLAUDE_CODE_OAUTH_TOKEN",
                    _ => cfg.provider.default_key_env(),
                });
                v.push(CredentialSource {
                    kind: "env".into(),
                    location: var.into(),
                    present: std::env::var(var).is_ok_and(|v| !v.trim().is_empty()),
                    ..Default::default()
                });
            }
            v
        }
        AuthKind::Oauth | AuthKind::ClaudeCli => {
            let kind = if cfg.auth == AuthKind::Oauth {
                "bundle"
            } else {
                "claude-cli"
            };
            vec![file(kind, &login_source(name, cfg, state_dir).0.path())]
        }
    };
    let win = candidates.iter().position(|c| c.present).unwrap_or(
        // Nothing is present: name the source the user is most likely to fill.
        candidates.len() - 1,
    );
    let shadowed: Vec<String> = candidates[win + 1..]
        .iter()
        .filter(|c| c.present)
        .map(|c| format!("{} {}", c.kind, c.location))
        .collect();
    let mut chosen = candidates.swap_remove(win);
    chosen.shadowed = shadowed;
    chosen
}

fn load_setup_token(name: &str, cfg: &ProfileConfig, state_dir: &Path) -> Result<Secret, String> {
    if let Some(t) = store::read(state_dir, name, store::Kind::SetupToken)? {
        return setup_token::validate(t.expose());
    }
    if let Some(path) = &cfg.api_key_file {
        return setup_token::validate(api_key::read_key_file(path)?.expose());
    }
    let var = cfg
        .api_key_env
        .as_deref()
        .unwrap_or("CLAUDE_CODE_OAUTH_TOKEN");
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => setup_token::validate(&v),
        _ => Err(format!("no setup-token: set {var} in llmd's environment, or run `claude setup-token` and store its output with `llmctl set-key {name} --setup-token`")),
    }
}

/// Everything that defines a login task: profiles whose keys are equal share one task.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginKey {
    /// The login file.
    pub source: Source,
    /// Its token endpoint and client.
    pub upstream: Upstream,
    /// Claude Code's locks, for shared logins.
    pub locks: Option<ClaudeLocks>,
    /// Refresh margin.
    pub margin: Duration,
    /// Upstream timeout.
    pub timeout: Duration,
}

impl LoginKey {
    fn of(name: &str, cfg: &ProfileConfig, env: &Env<'_>) -> LoginKey {
        let (source, locks) = login_source(name, cfg, env.state_dir);
        let bundle_region = match &source {
            Source::Bundle(b) => b
                .read_object()
                .ok()
                .flatten()
                .and_then(|(_, o)| o.get("region").and_then(|r| r.as_str()).map(str::to_owned)),
            Source::ClaudeCli(_) => None,
        };
        let upstream = match cfg.provider {
            Provider::Minimax => {
                Upstream::Minimax(MinimaxOAuth::from_profile(cfg, bundle_region.as_deref()))
            }
            _ => Upstream::Anthropic(AnthropicOAuth::from_profile(cfg)),
        };
        let margin = if cfg.auth == AuthKind::ClaudeCli {
            env.margin.max(CLAUDE_MIN_MARGIN)
        } else {
            env.margin
        };
        LoginKey {
            source,
            upstream,
            locks,
            margin,
            timeout: env.timeout,
        }
    }
}

/// Where an OAuth profile's tokens live, and the locks that guard them.
fn login_source(
    name: &str,
    cfg: &ProfileConfig,
    state_dir: &Path,
) -> (Source, Option<ClaudeLocks>) {
    match cfg.auth {
        AuthKind::ClaudeCli => {
            let dir = config::claude_dir(cfg);
            let locks = ClaudeLocks::for_dir(&dir, CLAUDE_LOCK_WAIT);
            (
                Source::ClaudeCli(CredentialsFile::in_dir(&dir)),
                Some(locks),
            )
        }
        _ => {
            let path = cfg
                .bundle
                .clone()
                .unwrap_or_else(|| state_dir.join("oauth").join(format!("{name}.json")));
            (Source::Bundle(BundleFile { path }), None)
        }
    }
}
