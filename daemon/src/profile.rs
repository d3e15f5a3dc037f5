//! A configured profile: its settings plus the credential behind it.

use crate::config::{self, AuthKind, ProfileConfig, Provider};
use crate::credentials::claude_lock::ClaudeLocks;
use crate::credentials::{
    self, api_key, bundle::BundleFile, claude_cli::CredentialsFile, setup_token, store, Source,
};
use crate::oauth::{anthropic::AnthropicOAuth, minimax::MinimaxOAuth, HttpEndpoint, Upstream};
use crate::quota::QuotaTracker;
use crate::ratelimit::RateLimiter;
use crate::refresh::{Force, LoginHandle, LoginSpec, Settings};
use crate::secret::Secret;
use arc_swap::ArcSwapOption;
use llmd_proto::methods::{
    CredentialSource, Event, Limits, ProfileState, ProfileStatus, TokenResult,
};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
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
    Static(Result<Secret, credentials::KeyError>),
    /// An OAuth login with its refresh task.
    Login(LoginHandle),
    /// A profile of another llmd (`auth = "upstream"`).
    Follower(crate::follower::Follower),
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
    /// The provider's latest quota report.
    pub quota: Arc<QuotaTracker>,
    /// The serialized `token` answer of the last token served, shared by every connection
    /// without a lock (replaced only when the token changes).
    answer: ArcSwapOption<Answer>,
    /// The cluster state of a shared login.
    cluster: Option<tokio::sync::watch::Receiver<crate::cluster::Status>>,
}

/// A serialized `token`/`refresh` result and the token it was built from.
pub struct Answer {
    token: Secret,
    expires_at: Option<i64>,
    /// The result object, JSON.
    pub json: Box<str>,
}

impl Answer {
    /// Whether this answer carries `token` with this expiry (else it is out of date).
    fn is_for(&self, token: &Secret, expires_at: Option<i64>) -> bool {
        self.token == *token && self.expires_at == expires_at
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Shared services a profile needs when it is built.
pub struct Env<'a> {
    /// Stored keys and bundles.
    pub state_dir: &'a Path,
    /// `[daemon] refresh_margin_secs`.
    pub margin: Duration,
    /// `[daemon] refresh_timeout_secs`.
    pub timeout: Duration,
    /// `[daemon] forced_refresh_interval_secs`.
    pub forced_interval: Duration,
    /// HTTP client.
    pub http: &'a reqwest::Client,
    /// Event bus.
    pub events: &'a broadcast::Sender<Event>,
    /// `[usage] warn_at`.
    pub warn_at: &'a [f64],
    /// `[cluster]`, when configured.
    pub cluster: Option<&'a crate::cluster::Hub>,
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
        let mut cluster = None;
        let credential = match cfg.auth {
            AuthKind::Upstream => {
                Credential::Follower(crate::follower::Follower::spawn(crate::follower::Spec {
                    profile: name.to_owned(),
                    socket: cfg.upstream_socket.clone().unwrap_or_default(),
                    upstream_profile: cfg
                        .upstream_profile
                        .clone()
                        .unwrap_or_else(|| name.to_owned()),
                    mirror: cfg.mirror_claude_config_dir.clone(),
                    events: env.events.clone(),
                }))
            }
            AuthKind::ApiKey => Credential::Static(api_key::load(name, cfg, env.state_dir)),
            AuthKind::SetupToken => Credential::Static(load_setup_token(name, cfg, env.state_dir)),
            AuthKind::Oauth | AuthKind::ClaudeCli => {
                let key = LoginKey::of(name, cfg, env);
                let file = key.file();
                let shared = key.cluster.then(|| key.source.clone());
                // One task per login file, whatever the profiles or reloads: a reused task
                // takes the new settings instead of a second task being started.
                let handle = match logins.iter_mut().find(|(k, _)| k.file() == file) {
                    Some((k, h)) => {
                        if k.claimed && *k != key {
                            tracing::warn!(
                                profile = name,
                                file = %file.display(),
                                "two profiles use one login file with different OAuth settings; the first profile's settings are used"
                            );
                        } else {
                            // Always: margin and timeout come from `[daemon]`, which the
                            // key of the previous generation was computed with anew.
                            h.reconfigure(key.settings(env));
                            *k = LoginKey {
                                claimed: true,
                                ..key
                            };
                        }
                        h.source_changed();
                        h.clone()
                    }
                    None => {
                        let h = LoginHandle::spawn(LoginSpec {
                            profile: name.to_owned(),
                            source: key.source.clone(),
                            settings: key.settings(env),
                            events: env.events.clone(),
                        });
                        logins.push((
                            LoginKey {
                                claimed: true,
                                ..key
                            },
                            h.clone(),
                        ));
                        h
                    }
                };
                if let (Some(source), Some(hub)) = (shared, env.cluster) {
                    hub.start(name, &file, &handle, source);
                    cluster = Some(hub.status(&file));
                }
                Credential::Login(handle)
            }
        };
        Profile {
            name: name.to_owned(),
            config: cfg.clone(),
            credential,
            limiter: Arc::new(RateLimiter::new(cfg.rate_limit.as_ref())),
            quota: Arc::new(QuotaTracker::new(name, env.events.clone(), env.warn_at)),
            answer: ArcSwapOption::empty(),
            cluster,
        }
    }

    /// The credential's state, without building the whole `status` line.
    pub fn health(&self) -> ProfileState {
        match &self.credential {
            Credential::Static(Ok(_)) => ProfileState::Ok,
            Credential::Static(Err(_)) => ProfileState::Missing,
            Credential::Login(h) => h.snapshot().state,
            Credential::Follower(f) => f.status().0,
        }
    }

    /// The identity of this profile's login task, for OAuth profiles.
    pub fn login_key(&self, env: &Env<'_>) -> Option<LoginKey> {
        self.config
            .auth
            .is_login()
            .then(|| LoginKey::of(&self.name, &self.config, env))
    }

    /// The `token`/`refresh` answer, serialized (after a refresh if one is needed).
    pub async fn token_answer(
        &self,
        min_valid: u64,
        force: Force,
    ) -> Result<Box<RawValue>, RpcError> {
        if let Credential::Follower(f) = &self.credential {
            let c = self.follow(f, min_valid, &force).await?;
            return crate::handlers::ok(&self.follower_answer(c));
        }
        let (token, expires_at) = self.secret(min_valid, force).await?;
        let answer = self.answer(&token, expires_at, || self.login_scopes())?;
        RawValue::from_string(answer.json.to_string())
            .map_err(|e| RpcError::internal(e.to_string()))
    }

    /// The `token` answer when it needs no waiting: a key (or why there is none), or a
    /// login whose token stays valid `min_valid` more seconds, handed to `f`. `None`: the
    /// login task must be asked (a refresh is due). The JSON is built once per token and
    /// shared; `f` reads it under the shared answer's read guard, without a clone.
    pub fn ready_answer<R>(
        &self,
        min_valid: u64,
        f: impl FnOnce(Result<&str, &RpcError>) -> R,
    ) -> Option<R> {
        let (token, e, scopes) = match &self.credential {
            Credential::Static(Ok(k)) => {
                let shared = self.answer.load();
                if let Some(a) = shared.as_ref().filter(|a| a.is_for(k, None)) {
                    return Some(f(Ok(&a.json)));
                }
                (k.clone(), None, Vec::new())
            }
            Credential::Static(Err(why)) => return Some(f(Err(&self.missing(why)))),
            Credential::Login(h) => {
                // The snapshot is a read guard on the login's `watch`, which blocks the
                // login task's next publish: held only to compare with the shared answer.
                // A new token is copied out and the answer built without it (that build
                // reads Claude Code's file); a second borrow under it would deadlock.
                let shared = self.answer.load();
                let new = {
                    let snap = h.snapshot();
                    let (t, e) = snap.valid_token(min_valid)?;
                    let current = shared.as_ref().is_some_and(|a| a.is_for(t, e));
                    (!current).then(|| (t.clone(), e, snap.scopes.clone()))
                };
                match new {
                    // Compared equal under the snapshot: the shared answer is current.
                    None => return shared.as_ref().map(|a| f(Ok(&a.json))),
                    Some(new) => new,
                }
            }
            // A follower's answer comes from its upstream: the slow path.
            Credential::Follower(_) => return None,
        };
        Some(match self.answer(&token, e, || scopes) {
            Ok(a) => f(Ok(&a.json)),
            Err(err) => f(Err(&err)),
        })
    }

    /// The shared answer for `token`, built (with `scopes`, what a follower's mirror
    /// needs) only when the token changed.
    fn answer(
        &self,
        token: &Secret,
        expires_at: Option<i64>,
        scopes: impl FnOnce() -> Vec<String>,
    ) -> Result<Arc<Answer>, RpcError> {
        if let Some(a) = self.shared_answer(token, expires_at) {
            return Ok(a);
        }
        let mut answer = self.answer_for(token, expires_at);
        if let Credential::Login(_) = &self.credential {
            answer.scopes = scopes();
            if self.config.auth == AuthKind::ClaudeCli {
                answer.subscription_type = subscription_type(&config::claude_dir(&self.config));
            }
        }
        let json = serde_json::to_string(&answer).map_err(|e| RpcError::internal(e.to_string()))?;
        let a = Arc::new(Answer {
            token: token.clone(),
            expires_at,
            json: json.into_boxed_str(),
        });
        self.answer.store(Some(a.clone()));
        Ok(a)
    }

    /// The answer already built for this token, if it is the current one.
    fn shared_answer(&self, token: &Secret, expires_at: Option<i64>) -> Option<Arc<Answer>> {
        let a = self.answer.load();
        let a = a.as_ref()?;
        a.is_for(token, expires_at).then(|| a.clone())
    }

    /// The login's scopes (none for other credentials); takes the snapshot briefly.
    fn login_scopes(&self) -> Vec<String> {
        match &self.credential {
            Credential::Login(h) => h.snapshot().scopes.clone(),
            _ => Vec::new(),
        }
    }

    fn missing(&self, why: &credentials::KeyError) -> RpcError {
        // Nothing is configured or found: not a dead login, so not `needs_login`.
        RpcError::new(
            ErrorKind::MissingCredential,
            format!("profile `{}`: {why}", self.name),
        )
        .with("profile", self.name.as_str())
    }

    /// A token valid for `min_valid` seconds, with the headers the provider needs.
    pub async fn token(&self, min_valid: u64, force: Force) -> Result<TokenResult, RpcError> {
        if let Credential::Follower(f) = &self.credential {
            let c = self.follow(f, min_valid, &force).await?;
            return Ok(self.follower_answer(c));
        }
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
            provider: Some(self.config.provider.as_str().to_owned()),
            scopes: Vec::new(),
            subscription_type: None,
            member: None,
        }
    }

    /// A follower's token, refused when the upstream serves another provider than the
    /// profile is configured for (its chat would speak the wrong API).
    async fn follow(
        &self,
        f: &crate::follower::Follower,
        min_valid: u64,
        force: &Force,
    ) -> Result<crate::follower::Current, RpcError> {
        let stale = match force {
            Force::IfStale { used } => Some(used),
            _ => None,
        };
        let c = f.token(min_valid, stale).await?;
        match c.provider.as_deref() {
            Some(p) if p != self.config.provider.as_str() => Err(RpcError::new(
                ErrorKind::MissingCredential,
                format!(
                    "profile `{}` is configured as provider `{}`, but its upstream profile is `{p}`; set `provider = \"{p}\"`",
                    self.name, self.config.provider
                ),
            )
            .with("profile", self.name.as_str())),
            _ => Ok(c),
        }
    }

    fn follower_answer(&self, c: crate::follower::Current) -> TokenResult {
        TokenResult {
            profile: self.name.clone(),
            kind: c.kind,
            token: c.token.expose().to_owned(),
            expires_at: c.expires_at,
            headers: c.headers,
            provider: c.provider,
            scopes: c.scopes,
            subscription_type: c.subscription_type,
            member: None,
        }
    }

    async fn secret(
        &self,
        min_valid: u64,
        force: Force,
    ) -> Result<(Secret, Option<i64>), RpcError> {
        Ok(match &self.credential {
            Credential::Static(Ok(k)) => (k.clone(), None),
            Credential::Static(Err(why)) => return Err(self.missing(why)),
            Credential::Login(h) => h.token(min_valid, force).await?,
            Credential::Follower(f) => {
                let c = self.follow(f, min_valid, &force).await?;
                (c.token, c.expires_at)
            }
        })
    }

    /// Headers for a request with `token`.
    pub fn headers(&self, token: &str) -> BTreeMap<String, String> {
        if let Credential::Follower(f) = &self.credential {
            return f.headers(token);
        }
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
            upstream: None,
            quota: self.quota.snapshot(),
            cluster: None,
        };
        match &self.credential {
            Credential::Static(Ok(_)) => {}
            Credential::Static(Err(e)) => {
                s.state = ProfileState::Missing;
                s.last_error = Some(e.to_string());
            }
            Credential::Login(h) => {
                let snap = h.snapshot();
                s.state = snap.state;
                s.expires_at = snap.expires_at;
                s.last_refresh_at = snap.last_refresh_at;
                s.refresh_count = snap.refresh_count;
                s.last_error = snap.last_error.clone();
                drop(snap);
                s.cluster = self.cluster.as_ref().map(|c| c.borrow().to_proto());
            }
            Credential::Follower(f) => {
                let (state, expires_at, last, count, error, upstream) = f.status();
                s.state = state;
                s.expires_at = expires_at;
                s.last_refresh_at = last;
                s.refresh_count = count;
                s.last_error = error;
                s.upstream = Some(upstream);
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
            Credential::Static(_) | Credential::Follower(_) => None,
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
        AuthKind::Upstream => {
            // A socket, not a file: present when something is there (a forward may be down).
            let path = cfg.upstream_socket.as_deref().unwrap_or(Path::new(""));
            vec![CredentialSource {
                kind: "upstream".into(),
                location: path.display().to_string(),
                present: std::fs::symlink_metadata(path).is_ok(),
                ..Default::default()
            }]
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

/// `subscriptionType` of a Claude Code login file, for the `token` answer a follower mirrors.
fn subscription_type(dir: &Path) -> Option<String> {
    let path = CredentialsFile::in_dir(dir).path;
    let bytes = crate::fsutil::read_regular_capped(&path).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(
        v.get("claudeAiOauth")?
            .get("subscriptionType")?
            .as_str()?
            .to_owned(),
    )
}

fn load_setup_token(
    name: &str,
    cfg: &ProfileConfig,
    state_dir: &Path,
) -> Result<Secret, credentials::KeyError> {
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
        _ => Err(credentials::KeyError::Missing {
            what: "setup-token",
            hint: format!("set {var} in llmd's environment, or run `claude setup-token` and store its output with `llmctl set-key {name} --setup-token`"),
        }),
    }
}

/// Everything that defines how a login is refreshed. One task serves each login file
/// ([`LoginKey::file`]); the rest are its settings.
#[derive(Debug, Clone)]
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
    /// Shared through `[cluster]`.
    pub cluster: bool,
    /// Set once a profile of the config being installed uses it (so a second profile
    /// with other settings on the same file is noticed).
    claimed: bool,
}

impl PartialEq for LoginKey {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.source,
            &self.upstream,
            &self.locks,
            self.margin,
            self.timeout,
            self.cluster,
        ) == (
            &o.source,
            &o.upstream,
            &o.locks,
            o.margin,
            o.timeout,
            o.cluster,
        )
    }
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
            cluster: cfg.cluster && env.cluster.is_some(),
            claimed: false,
        }
    }

    /// The file the login task owns: the final target when the path is a symlink, so two
    /// paths to one file share one task.
    pub fn file(&self) -> std::path::PathBuf {
        let p = self.source.path();
        crate::fsutil::write_target(&p).unwrap_or(p)
    }

    /// The login's unclaimed form, for keys carried over from the previous generation.
    pub fn unclaimed(self) -> LoginKey {
        LoginKey {
            claimed: false,
            ..self
        }
    }

    fn settings(&self, env: &Env<'_>) -> Settings {
        let mut endpoint: Arc<dyn crate::oauth::TokenEndpoint> = Arc::new(HttpEndpoint {
            upstream: self.upstream.clone(),
            http: env.http.clone(),
        });
        if let (true, Some(hub)) = (self.cluster, env.cluster) {
            // Only the cluster owner may spend the refresh token.
            endpoint = hub.gate(&self.file(), endpoint);
        }
        Settings {
            endpoint,
            locks: self.locks.clone(),
            margin: self.margin,
            timeout: self.timeout,
            forced_interval: env.forced_interval,
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
            // Named after the folder, so every profile on one Claude Code folder notes its
            // held locks in the same place.
            let record = state_dir.join("claude-locks").join(format!(
                "{}.json",
                credentials::tag_of(Some(&Secret::new(dir.to_string_lossy())))
            ));
            let locks = ClaudeLocks::for_dir(&dir, CLAUDE_LOCK_WAIT).with_record(record);
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

#[cfg(test)]
mod answer_tests {
    use super::*;

    fn key_profile(key: &str) -> Profile {
        let config: ProfileConfig =
            toml::from_str("provider = \"anthropic\"\nauth = \"api-key\"\n").unwrap();
        Profile {
            name: "k".into(),
            limiter: Arc::new(RateLimiter::new(None)),
            quota: Arc::new(QuotaTracker::new("k", broadcast::channel(1).0, &[])),
            credential: Credential::Static(Ok(Secret::new(key))),
            config,
            answer: ArcSwapOption::empty(),
            cluster: None,
        }
    }

    #[test]
    fn the_token_answer_is_built_once_and_shared() {
        let p = key_profile("sk-ant-api03-one");
        let at = |r: Result<&str, &RpcError>| r.unwrap().as_ptr();
        let a = p.ready_answer(0, at).unwrap();
        let b = p.ready_answer(3600, at).unwrap();
        assert_eq!(a, b, "the same serialized answer, not a copy");
        let shared = p.answer.load();
        let json = &shared.as_ref().expect("kept").json;
        assert_eq!(json.as_ptr(), a);
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["token"], "sk-ant-api03-one");
        assert_eq!(v["headers"]["x-api-key"], "sk-ant-api03-one");
        assert!(v["expires_at"].is_null());
    }

    #[test]
    fn a_new_token_gets_a_new_answer() {
        let p = key_profile("sk-ant-api03-one");
        let a = p
            .answer(&Secret::new("sk-ant-api03-one"), None, Vec::new)
            .unwrap();
        let b = p
            .answer(&Secret::new("sk-ant-api03-two"), None, Vec::new)
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(b.json.contains("sk-ant-api03-two") && !b.json.contains("-one"));
        let c = p
            .answer(&Secret::new("sk-ant-api03-two"), Some(5), Vec::new)
            .unwrap();
        assert!(
            c.json.contains("\"expires_at\":5"),
            "a new expiry is a new answer"
        );
    }

    #[test]
    fn a_missing_key_is_answered_at_once() {
        let mut p = key_profile("x");
        p.credential = Credential::Static(Err(credentials::KeyError::Missing {
            what: "API key",
            hint: "set LLMD_NOPE".into(),
        }));
        let e = p.ready_answer(0, |r| r.unwrap_err().clone()).unwrap();
        assert_eq!(e.code, RpcError::new(ErrorKind::MissingCredential, "").code);
    }
}
