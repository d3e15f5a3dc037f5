//! The refresh engine: one task per OAuth login owns its tokens and is the only code that
//! calls the token endpoint for it.
//!
//! Readers look at a `watch` snapshot and never wait while the token is valid for what
//! they need. Everything else (a token that is too old, a forced refresh, a changed file,
//! the proactive timer, a new login) goes through the login's command queue, which the
//! task handles one at a time, so at most one upstream refresh per login is ever in flight
//! and callers who queued behind a refresh are answered from its result instead of
//! starting another.

use crate::credentials::claude_lock::ClaudeLocks;
use crate::credentials::{unix_now, CasOutcome, Source, Tokens};
use crate::oauth::{RefreshError, Upstream};
use crate::secret::Secret;
use llmd_proto::methods::{event_kinds, Event, ProfileState};
use llmd_proto::{ErrorKind, RpcError};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// First retry delay after a transient failure; doubles up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries.
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A caller whose `min_valid_secs` exceeds what a fresh token offers may trigger a refresh
/// at most this often; otherwise a misconfigured agent would rotate the login per call.
const DEMAND_MIN_INTERVAL: Duration = Duration::from_secs(60);
/// A provider 401 forces a refresh only for a token older than this: a 401 right after a
/// refresh is not about the token.
const STALE_TOKEN_AGE: Duration = Duration::from_secs(60);
/// How often a refreshed token pair that could not be written is written again.
const PERSIST_RETRY: Duration = Duration::from_secs(5);
/// `min_valid_secs` above this is treated as this (ten years), so arithmetic cannot wrap.
const MAX_MIN_VALID: u64 = 10 * 365 * 86_400;

/// What readers see of a login.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Current access token.
    pub token: Option<Secret>,
    /// Its expiry, unix seconds.
    pub expires_at: Option<i64>,
    /// State for `status`.
    pub state: ProfileState,
    /// Last successful refresh by this daemon, unix seconds.
    pub last_refresh_at: Option<i64>,
    /// Successful refreshes by this daemon.
    pub refresh_count: u64,
    /// Last error, free of secrets.
    pub last_error: Option<String>,
}

/// Seconds a token expiring at `expires_at` stays valid (very large when it never does).
fn remaining(expires_at: Option<i64>) -> i64 {
    expires_at.map_or(i64::MAX, |e| e.saturating_sub(unix_now()))
}

impl Snapshot {
    /// The token if it is valid for at least `min_valid` more seconds.
    pub fn valid_token(&self, min_valid: u64) -> Option<(&Secret, Option<i64>)> {
        if matches!(self.state, ProfileState::NeedsLogin | ProfileState::Missing) {
            return None;
        }
        let token = self.token.as_ref()?;
        (remaining(self.expires_at) >= min_valid.min(MAX_MIN_VALID) as i64)
            .then_some((token, self.expires_at))
    }
}

/// When a caller wants a refresh even though the token is valid.
#[derive(Debug, Clone)]
pub enum Force {
    /// Only if the token is not valid for `min_valid` seconds.
    No,
    /// Always (an explicit `refresh`); joins a refresh that ended after the request.
    Always,
    /// Only if `used` is still the current token and was not just obtained (a provider
    /// answered 401 for it).
    IfStale {
        /// The token the provider rejected.
        used: Secret,
    },
}

/// A request to the login task.
#[derive(Debug)]
pub enum Command {
    /// A caller needs a token valid for `min_valid` seconds.
    Get {
        /// Seconds the token must stay valid.
        min_valid: u64,
        /// Whether to refresh a valid token.
        force: Force,
        /// When the caller asked; a refresh that ended later satisfies it.
        asked: Instant,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(Secret, Option<i64>), RpcError>>,
    },
    /// The login's file changed (or a reload asked for a re-read).
    SourceChanged,
    /// The task was replaced by a reload: stop, so two tasks never refresh one file.
    Retire,
    /// A new login (`login.finish`): write it under the locks and adopt it.
    Install {
        /// The tokens of the new login.
        tokens: Tokens,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Everything a login task needs.
pub struct LoginSpec {
    /// Profile name (for events, logs and errors).
    pub profile: String,
    /// Where the tokens live.
    pub source: Source,
    /// Who refreshes them.
    pub upstream: Upstream,
    /// Claude Code's locks, for `claude-cli` logins.
    pub locks: Option<ClaudeLocks>,
    /// Refresh this long before expiry.
    pub margin: Duration,
    /// Upper bound of one upstream call.
    pub timeout: Duration,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Event bus.
    pub events: broadcast::Sender<Event>,
}

/// The handle the rest of the daemon holds; dropping every handle stops the task.
#[derive(Clone, Debug)]
pub struct LoginHandle {
    snapshot: watch::Receiver<Snapshot>,
    commands: mpsc::UnboundedSender<Command>,
}

impl LoginHandle {
    /// Starts the task for a login, after reading its file once.
    pub fn spawn(spec: LoginSpec) -> Self {
        let path = spec.source.path();
        if crate::fsutil::is_exposed(&path) {
            // Bundles are refused when read; Claude Code's file is still used (the CLI owns
            // it), but the user should know.
            tracing::warn!(
                profile = %spec.profile,
                file = %path.display(),
                "login file is readable by group/others; run `chmod 600` on it"
            );
        }
        let initial = spec.source.read();
        let (tx, rx) = watch::channel(Snapshot {
            token: None,
            expires_at: None,
            state: ProfileState::Missing,
            last_refresh_at: None,
            refresh_count: 0,
            last_error: None,
        });
        let (ctx, crx) = mpsc::unbounded_channel();
        let mut task = LoginTask {
            spec,
            tokens: None,
            refreshed_at: None,
            spent: Vec::new(),
            unsaved: false,
            persist_at: None,
            dead: false,
            refreshing: false,
            refresh_at: None,
            retry_at: None,
            failures: 0,
            last_attempt_end: None,
            last_attempt_ok: true,
            last_refresh_at: None,
            refresh_count: 0,
            last_error: None,
            snapshot: tx,
            commands: crx,
            published_state: None,
        };
        match initial {
            Ok(Some(t)) => task.adopt(t, false),
            Ok(None) => task.last_error = Some(task.not_found()),
            Err(e) => task.last_error = Some(e),
        }
        task.publish();
        tokio::spawn(task.run());
        LoginHandle {
            snapshot: rx,
            commands: ctx,
        }
    }

    /// The current snapshot (never waits).
    pub fn snapshot(&self) -> watch::Ref<'_, Snapshot> {
        self.snapshot.borrow()
    }

    /// A token valid for `min_valid` seconds: from the snapshot when it is, else from the
    /// login task (joining any refresh in flight).
    pub async fn token(
        &self,
        min_valid: u64,
        force: Force,
    ) -> Result<(Secret, Option<i64>), RpcError> {
        if matches!(force, Force::No) {
            if let Some((t, e)) = self.snapshot.borrow().valid_token(min_valid) {
                return Ok((t.clone(), e));
            }
        }
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Get {
            min_valid,
            force,
            asked: Instant::now(),
            reply,
        };
        self.commands
            .send(cmd)
            .map_err(|_| RpcError::internal("login task stopped"))?;
        rx.await
            .map_err(|_| RpcError::internal("login task stopped"))?
    }

    /// Hands a new login to the task, which writes it (under Claude Code's locks for a
    /// shared login) and starts serving it.
    pub async fn install(&self, tokens: Tokens) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Install { tokens, reply })
            .map_err(|_| "login task stopped".to_owned())?;
        rx.await.map_err(|_| "login task stopped".to_owned())?
    }

    /// True when both handles lead to the same task.
    pub fn same_task(&self, other: &LoginHandle) -> bool {
        self.commands.same_channel(&other.commands)
    }

    /// Stops the task (its profile was reconfigured and a new task took over).
    pub fn retire(&self) {
        let _ = self.commands.send(Command::Retire);
    }

    /// Stops the task and waits until it has ended: a refresh in flight finishes (and its
    /// tokens are written) first.
    pub async fn stop(&self) {
        let mut rx = self.snapshot.clone();
        self.retire();
        while rx.changed().await.is_ok() {}
    }

    /// Tells the task its file changed.
    pub fn source_changed(&self) {
        let _ = self.commands.send(Command::SourceChanged);
    }

    /// A sender for the file watcher.
    pub fn command_sender(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }
}

struct LoginTask {
    spec: LoginSpec,
    tokens: Option<Tokens>,
    /// When this task obtained the current tokens by refreshing (`None` for tokens adopted
    /// from the file, whose age is unknown).
    refreshed_at: Option<Instant>,
    /// Refresh tokens this task already exchanged: a file still holding one of them is
    /// stale, never something to adopt.
    spent: Vec<Secret>,
    /// The current tokens are not on disk yet (the write failed).
    unsaved: bool,
    /// When to try writing unsaved tokens again.
    persist_at: Option<Instant>,
    /// The refresh token is known dead: no upstream calls until the tokens change.
    dead: bool,
    refreshing: bool,
    /// When the proactive refresh is due.
    refresh_at: Option<Instant>,
    /// When the next retry after a transient failure is due.
    retry_at: Option<Instant>,
    failures: u32,
    last_attempt_end: Option<Instant>,
    last_attempt_ok: bool,
    last_refresh_at: Option<i64>,
    refresh_count: u64,
    last_error: Option<String>,
    snapshot: watch::Sender<Snapshot>,
    commands: mpsc::UnboundedReceiver<Command>,
    published_state: Option<(ProfileState, Option<String>)>,
}

impl LoginTask {
    async fn run(mut self) {
        loop {
            let refresh_due = if self.dead || self.tokens.is_none() {
                None
            } else {
                self.retry_at.or(self.refresh_at)
            };
            let persist_due = if self.unsaved { self.persist_at } else { None };
            tokio::select! {
                // Nobody holds a handle any more: stop before doing anything else.
                biased;
                _ = self.snapshot.closed() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Get { min_valid, force, asked, reply }) => {
                        let answer = self.get(min_valid.min(MAX_MIN_VALID), force, asked).await;
                        let _ = reply.send(answer);
                    }
                    Some(Command::SourceChanged) => self.reread().await,
                    Some(Command::Install { tokens, reply }) => {
                        let _ = reply.send(self.install(tokens).await);
                    }
                    Some(Command::Retire) | None => break,
                },
                _ = sleep_until(persist_due) => self.persist_again().await,
                _ = sleep_until(refresh_due) => {
                    tracing::debug!(profile = %self.spec.profile, "proactive refresh");
                    self.refresh().await;
                }
            }
        }
        tracing::debug!(profile = %self.spec.profile, "login task stopped");
    }

    fn not_found(&self) -> String {
        format!("no login found at {}", self.spec.source.path().display())
    }

    fn current(&self, min_valid: u64) -> Option<(Secret, Option<i64>)> {
        let t = self.tokens.as_ref()?;
        if self.dead {
            return None;
        }
        (remaining(t.expires_at) >= min_valid as i64).then(|| (t.access.clone(), t.expires_at))
    }

    /// True while the token is inside the refresh margin (or expired).
    fn due(&self) -> bool {
        self.tokens
            .as_ref()
            .is_some_and(|t| remaining(t.expires_at) <= self.spec.margin.as_secs() as i64)
    }

    async fn get(
        &mut self,
        min_valid: u64,
        force: Force,
        asked: Instant,
    ) -> Result<(Secret, Option<i64>), RpcError> {
        if self.dead || self.tokens.is_none() {
            // The user or Claude Code may have logged in again since.
            self.reread().await;
            if self.dead {
                return Err(self.needs_login_error());
            }
            if self.tokens.is_none() {
                return Err(self.no_login_error());
            }
        }
        let joined = self.last_attempt_end.is_some_and(|end| end >= asked);
        let wanted = match &force {
            Force::Always => !joined,
            Force::IfStale { used } => {
                let is_current = self.tokens.as_ref().is_some_and(|t| &t.access == used);
                let fresh = self
                    .refreshed_at
                    .is_some_and(|t| t.elapsed() < STALE_TOKEN_AGE);
                !joined && is_current && !fresh
            }
            Force::No => {
                if let Some(t) = self.current(min_valid) {
                    return Ok(t);
                }
                let backing_off = self.retry_at.is_some_and(|r| r > Instant::now());
                let recently = self
                    .last_attempt_end
                    .is_some_and(|e| e.elapsed() < DEMAND_MIN_INTERVAL);
                !joined && !backing_off && (self.due() || !recently)
            }
        };
        if wanted {
            self.refresh().await;
        }
        if self.dead {
            return Err(self.needs_login_error());
        }
        if matches!(force, Force::Always) && !self.last_attempt_ok {
            return Err(self.refresh_failed_error());
        }
        self.current(0).ok_or_else(|| {
            if self.tokens.is_none() {
                self.no_login_error()
            } else {
                self.refresh_failed_error()
            }
        })
    }

    fn no_login_error(&self) -> RpcError {
        let p = &self.spec.profile;
        let why = self.last_error.clone().unwrap_or_else(|| self.not_found());
        RpcError::new(
            ErrorKind::NeedsLogin,
            format!("profile `{p}` has no usable login ({why}): run `llmctl login {p}`"),
        )
        .with("profile", p.as_str())
    }

    fn needs_login_error(&self) -> RpcError {
        let p = &self.spec.profile;
        let why = self
            .last_error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        RpcError::new(
            ErrorKind::NeedsLogin,
            format!("the login of profile `{p}` has expired or was revoked{why}: run `llmctl login {p}`"),
        )
        .with("profile", p.as_str())
    }

    fn refresh_failed_error(&self) -> RpcError {
        let retry_ms = self
            .retry_at
            .map(|r| r.saturating_duration_since(Instant::now()).as_millis() as u64)
            .unwrap_or(1000)
            .max(1);
        RpcError::new(
            ErrorKind::RefreshFailed,
            format!(
                "refreshing profile `{}` failed: {}",
                self.spec.profile,
                self.last_error.as_deref().unwrap_or("unknown error")
            ),
        )
        .with("retry_after_ms", retry_ms)
    }

    /// True for tokens on disk that this task has already moved past.
    fn is_stale(&self, on_disk: &Tokens) -> bool {
        on_disk
            .refresh
            .as_ref()
            .is_some_and(|r| self.spent.contains(r))
    }

    /// Re-reads the file and adopts what it holds when it differs.
    async fn reread(&mut self) {
        match self.spec.source.read_settled().await {
            Ok(Some(t)) if self.is_stale(&t) => {
                tracing::debug!(profile = %self.spec.profile, "login file holds tokens already refreshed; ignoring");
            }
            Ok(Some(t)) => {
                if self.tokens.as_ref() != Some(&t) {
                    tracing::info!(profile = %self.spec.profile, "adopted tokens written by another program");
                    self.adopt(t, false);
                    self.unsaved = false;
                    self.publish();
                }
            }
            Ok(None) => {
                if self.unsaved {
                    return;
                }
                if self.tokens.take().is_some() {
                    tracing::warn!(profile = %self.spec.profile, "login file removed");
                    self.last_error = Some(self.not_found());
                    self.publish();
                }
            }
            Err(e) => {
                tracing::warn!(profile = %self.spec.profile, error = %e, "cannot read login file; keeping current tokens");
                if self.tokens.is_none() && self.last_error.as_ref() != Some(&e) {
                    self.last_error = Some(e);
                    self.publish();
                }
            }
        }
    }

    /// Takes `t` as the current tokens and schedules the next proactive refresh.
    fn adopt(&mut self, t: Tokens, refreshed: bool) {
        let rotated = self.tokens.as_ref().map(|c| &c.access) != Some(&t.access);
        self.dead = false;
        self.retry_at = None;
        self.failures = 0;
        self.refreshed_at = refreshed.then(Instant::now);
        self.refresh_at = t.expires_at.map(|exp| {
            let remaining = exp.saturating_sub(unix_now()).clamp(0, i64::from(u32::MAX)) as u64;
            // Refresh `margin` ahead. A token we just got whose whole life is shorter than
            // the margin is refreshed half-way instead, so it cannot cause a refresh storm.
            let margin = self.spec.margin.as_secs();
            let lead = if refreshed {
                margin.min(remaining / 2)
            } else {
                margin.min(remaining)
            };
            let jitter_range = (lead / 10).min(30) * 1000;
            let jitter = if jitter_range > 0 {
                rand::random::<u64>() % jitter_range
            } else {
                0
            };
            let at = Instant::now()
                + Duration::from_secs(remaining - lead)
                    .saturating_sub(Duration::from_millis(jitter));
            // A server that hands out already-expired tokens must not make us spin.
            if refreshed {
                at.max(Instant::now() + Duration::from_secs(1))
            } else {
                at
            }
        });
        if refreshed {
            self.refresh_count += 1;
            self.last_refresh_at = Some(unix_now());
            self.last_error = None;
        } else if !self.refreshing {
            self.last_error = None;
        }
        let expires_at = t.expires_at;
        self.tokens = Some(t);
        if rotated {
            let _ = self.spec.events.send(Event {
                kind: event_kinds::TOKEN_ROTATED.into(),
                profile: self.spec.profile.clone(),
                expires_at,
                state: None,
                error: None,
            });
        }
    }

    /// Writes tokens off the runtime's worker threads (two fsyncs).
    async fn write(&self, tokens: &Tokens, expected: Option<Secret>) -> Result<CasOutcome, String> {
        let source = self.spec.source.clone();
        let tokens = tokens.clone();
        tokio::task::spawn_blocking(move || source.write_cas(&tokens, expected.as_ref()))
            .await
            .map_err(|e| format!("write task failed: {e}"))?
    }

    async fn persist_again(&mut self) {
        let Some(t) = self.tokens.clone() else {
            self.unsaved = false;
            return;
        };
        let expected = self.spent.last().cloned();
        match self.write(&t, expected).await {
            Ok(_) => {
                tracing::info!(profile = %self.spec.profile, "refreshed tokens written after an earlier failure");
                self.unsaved = false;
                self.last_error = None;
                self.publish();
            }
            Err(e) => {
                tracing::warn!(profile = %self.spec.profile, error = %e, "still cannot write refreshed tokens");
                self.persist_at = Some(Instant::now() + PERSIST_RETRY);
            }
        }
    }

    /// A new login from `login.finish`: written under the locks, then served.
    async fn install(&mut self, tokens: Tokens) -> Result<(), String> {
        let _guard = match &self.spec.locks {
            Some(locks) => Some(locks.acquire().await?),
            None => None,
        };
        self.write(&tokens, None).await?;
        self.adopt(tokens, false);
        self.unsaved = false;
        self.publish();
        Ok(())
    }

    /// One refresh attempt, under Claude Code's locks when the login is shared with it.
    async fn refresh(&mut self) {
        if self.dead {
            return;
        }
        self.refreshing = true;
        self.publish();
        let outcome = self.refresh_locked().await;
        self.refreshing = false;
        self.last_attempt_end = Some(Instant::now());
        self.last_attempt_ok = outcome.is_ok();
        match outcome {
            Ok(()) => {}
            Err(RefreshError::Dead(why)) => {
                tracing::warn!(profile = %self.spec.profile, reason = %why, "login is dead; waiting for a new login");
                self.dead = true;
                self.last_error = Some(why);
            }
            Err(RefreshError::Transient(why)) => {
                self.failures += 1;
                let exp = BACKOFF_BASE
                    .saturating_mul(1 << self.failures.min(10))
                    .min(BACKOFF_CAP);
                let jitter =
                    Duration::from_millis(rand::random::<u64>() % (exp.as_millis() as u64 / 5 + 1));
                self.retry_at = Some(Instant::now() + exp + jitter);
                tracing::warn!(profile = %self.spec.profile, reason = %why, retry_in_ms = (exp + jitter).as_millis() as u64, "refresh failed; will retry");
                self.last_error = Some(why);
            }
        }
        self.publish();
    }

    async fn refresh_locked(&mut self) -> Result<(), RefreshError> {
        let _guard = match &self.spec.locks {
            Some(locks) => Some(locks.acquire().await.map_err(RefreshError::Transient)?),
            None => None,
        };
        // Under the lock, the file is the truth: another program may have refreshed.
        match self.spec.source.read_settled().await {
            Ok(Some(on_disk))
                if !self.is_stale(&on_disk) && self.tokens.as_ref() != Some(&on_disk) =>
            {
                let newer = on_disk.refresh != self.tokens.as_ref().and_then(|t| t.refresh.clone());
                tracing::info!(profile = %self.spec.profile, "login file changed before refresh; adopting it");
                self.adopt(on_disk, false);
                if newer && !self.due() {
                    return Ok(());
                }
            }
            Ok(None) if self.tokens.is_none() => return Err(RefreshError::Dead(self.not_found())),
            _ => {}
        }
        let Some(current) = self.tokens.clone() else {
            return Err(RefreshError::Dead(self.not_found()));
        };
        let call = self.spec.upstream.refresh(&self.spec.http, &current);
        let new = match tokio::time::timeout(self.spec.timeout, call).await {
            Ok(Ok(t)) => t,
            Ok(Err(RefreshError::Dead(why))) => {
                // Someone may have refreshed with our refresh token meanwhile and written
                // the result: adopt it instead of giving up.
                if let Ok(Some(on_disk)) = self.spec.source.read_settled().await {
                    if on_disk.refresh.is_some()
                        && on_disk.refresh != current.refresh
                        && !self.is_stale(&on_disk)
                    {
                        tracing::info!(profile = %self.spec.profile, "refresh token was spent by another program; adopting its tokens");
                        self.adopt(on_disk, false);
                        return Ok(());
                    }
                }
                return Err(RefreshError::Dead(why));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(RefreshError::Transient(format!(
                    "token endpoint did not answer within {}s",
                    self.spec.timeout.as_secs()
                )))
            }
        };
        if let Some(r) = &current.refresh {
            if new.refresh.as_ref() != Some(r) {
                self.spent.push(r.clone());
                // Only the most recent ones can still be on disk somewhere.
                if self.spent.len() > 8 {
                    self.spent.remove(0);
                }
            }
        }
        // Persist before anyone sees the new token: a crash now must not lose the only
        // copy of a rotated refresh token.
        match self.write(&new, current.refresh.clone()).await {
            Ok(CasOutcome::Written) => {}
            Ok(CasOutcome::Conflict(on_disk)) => {
                tracing::warn!(profile = %self.spec.profile, "login file changed during refresh; keeping the file's tokens");
                self.adopt(on_disk, false);
                return Ok(());
            }
            Err(e) => {
                tracing::error!(profile = %self.spec.profile, error = %e, "cannot write refreshed tokens; serving them from memory and retrying the write");
                self.adopt(new, true);
                self.unsaved = true;
                self.persist_at = Some(Instant::now() + PERSIST_RETRY);
                self.last_error = Some(format!("refreshed tokens not saved yet: {e}"));
                return Ok(());
            }
        }
        tracing::info!(profile = %self.spec.profile, expires_at = new.expires_at, "refreshed");
        self.adopt(new, true);
        self.unsaved = false;
        Ok(())
    }

    fn publish(&mut self) {
        let state = if self.dead {
            ProfileState::NeedsLogin
        } else if self.refreshing {
            ProfileState::Refreshing
        } else {
            match &self.tokens {
                None => ProfileState::Missing,
                Some(t) if remaining(t.expires_at) <= 0 && self.last_error.is_some() => {
                    ProfileState::Error
                }
                Some(_) => ProfileState::Ok,
            }
        };
        let t = self.tokens.as_ref();
        self.snapshot.send_replace(Snapshot {
            token: t.map(|t| t.access.clone()),
            expires_at: t.and_then(|t| t.expires_at),
            state,
            last_refresh_at: self.last_refresh_at,
            refresh_count: self.refresh_count,
            last_error: self.last_error.clone(),
        });
        // `refreshing` is too short-lived to be worth an event.
        let visible = (state, self.last_error.clone());
        if state != ProfileState::Refreshing && self.published_state.as_ref() != Some(&visible) {
            let changed = self.published_state.as_ref().map(|(s, _)| *s) != Some(state);
            self.published_state = Some(visible);
            if changed {
                let _ = self.spec.events.send(Event {
                    kind: event_kinds::PROFILE_STATE.into(),
                    profile: self.spec.profile.clone(),
                    expires_at: None,
                    state: Some(state),
                    error: self.last_error.clone(),
                });
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
