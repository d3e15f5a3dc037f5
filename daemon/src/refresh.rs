//! The refresh engine: one task per OAuth login file owns its tokens and is the only code
//! that calls the token endpoint for it.
//!
//! Readers look at a `watch` snapshot and never wait while the token is valid for what
//! they need. Everything else (a token that is too old, a forced refresh, a changed file,
//! the proactive timer, a new login, new settings from a reload) goes through the login's
//! command queue, which the task handles one at a time.
//!
//! The invariants it keeps (docs/DESIGN.md, "OAuth refresh"):
//! - one refresh per login file, daemon-wide and across reloads: a task owns its file
//!   through [`owner_of`] for its whole life, and a reload reconfigures the running task
//!   instead of starting a second one;
//! - the token endpoint is called only when its result can be saved: the file is read and
//!   the replacement's temp file made and sized first ([`Source::prepare`]), and for a
//!   `claude-cli` login Claude Code's main lock is held;
//! - a file still holding a refresh token this task spent is its own unsaved state, never
//!   another program's write;
//! - an answer that arrives after the caller's deadline is still read and kept;
//! - new tokens are in a file before anyone is given them, and a crash between the write
//!   and the rename is repaired at the next start ([`Source::recover_leftovers`]).

use crate::credentials::claude_lock::{ClaudeLocks, LockError, LockGuard};
use crate::credentials::{unix_now, Allow, CasOutcome, FileError, Prepared, Source, Tokens};
use crate::oauth::{RefreshError, TokenEndpoint, TOKEN_ENDPOINT_HARD_LIMIT};
use crate::secret::Secret;
use llmd_proto::methods::{event_kinds, Event, ProfileState};
use llmd_proto::{ErrorKind, RpcError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// First retry delay after a transient failure; doubles up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries (unless the endpoint's `retry-after` asks for more).
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A caller whose `min_valid_secs` exceeds what a fresh token offers may trigger a refresh
/// at most this often; otherwise a misconfigured agent would rotate the login per call.
const DEMAND_MIN_INTERVAL: Duration = Duration::from_secs(60);
/// A provider 401 forces a refresh only for a token older than this: a 401 right after a
/// refresh is not about the token.
const STALE_TOKEN_AGE: Duration = Duration::from_secs(60);
/// How often a refreshed token pair that could not be written is written again.
const PERSIST_RETRY: Duration = Duration::from_secs(5);
/// Longest wait of a caller for the login task's answer: past the endpoint's hard limit and
/// a wait for Claude Code's locks, a task that still says nothing is stuck, and the caller
/// gets an error rather than waiting with it for good.
const ANSWER_WAIT: Duration = Duration::from_secs(240);
/// What a caller gets when the login task said nothing for [`ANSWER_WAIT`].
fn no_answer() -> RpcError {
    RpcError::new(
        ErrorKind::RefreshFailed,
        format!(
            "the login task gave no answer within {} s",
            ANSWER_WAIT.as_secs()
        ),
    )
}

/// `min_valid_secs` above this is treated as this (ten years), so arithmetic cannot wrap.
const MAX_MIN_VALID: u64 = 10 * 365 * 86_400;
/// Spent refresh tokens remembered per login.
const SPENT_KEPT: usize = 16;

/// The ownership lock of a login file: held by its login task for the task's whole life,
/// so a task that replaces another (a reload that dropped and re-added a profile) starts
/// only after its predecessor, and any refresh it had in flight, has ended.
pub fn owner_of(source: &Source) -> Arc<tokio::sync::Mutex<()>> {
    static OWNERS: OnceLock<std::sync::Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
        OnceLock::new();
    let path = source.path();
    let key = crate::fsutil::write_target(&path).unwrap_or(path);
    let mut owners = crate::sync::lock(OWNERS.get_or_init(Default::default));
    owners.retain(|_, w| w.strong_count() > 0);
    if let Some(m) = owners.get(&key).and_then(Weak::upgrade) {
        return m;
    }
    let m = Arc::new(tokio::sync::Mutex::new(()));
    owners.insert(key, Arc::downgrade(&m));
    m
}

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
    /// Scopes recorded with the current tokens (for the `token` answer a follower mirrors).
    pub scopes: Vec<String>,
}

/// Seconds a token expiring at `expires_at` stays valid (very large when it never does).
fn remaining(expires_at: Option<i64>) -> i64 {
    expires_at.map_or(i64::MAX, |e| e.saturating_sub(unix_now()))
}

impl Snapshot {
    /// The token if it is valid for at least `min_valid` more seconds. A login whose
    /// refresh token died still serves its access token until that expires.
    pub fn valid_token(&self, min_valid: u64) -> Option<(&Secret, Option<i64>)> {
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
    /// Always (an explicit `refresh`); joins a refresh that ended after the request, and is
    /// refused with `rate_limited` within [`Settings::forced_interval`] of the last one.
    Always,
    /// Only if `used` is still the current token and was not just obtained (a provider
    /// answered 401 for it).
    IfStale {
        /// The token the provider rejected.
        used: Secret,
    },
}

/// How a login is refreshed: what a reload may change on a running task.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Who exchanges the refresh token.
    pub endpoint: Arc<dyn TokenEndpoint>,
    /// Claude Code's locks, for `claude-cli` logins.
    pub locks: Option<ClaudeLocks>,
    /// Refresh this long before expiry.
    pub margin: Duration,
    /// How long a caller waits for the token endpoint. The answer itself is awaited
    /// longer, in the background ([`late_limit`]).
    pub timeout: Duration,
    /// Explicit refreshes while the token is valid are let through at most this often, so
    /// one client cannot rotate a login in a loop; zero means no limit.
    pub forced_interval: Duration,
}

/// How long a refresh's answer is awaited in the background once its caller has given up:
/// the endpoint may have rotated the login already, and then its answer is the only copy.
pub fn late_limit(timeout: Duration) -> Duration {
    (timeout * 4)
        .max(Duration::from_secs(10))
        .min(TOKEN_ENDPOINT_HARD_LIMIT)
}

/// Why a new login could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Claude Code's locks could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The file could not be written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The login task is gone (the daemon is stopping).
    #[error("login task stopped")]
    Stopped,
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
    /// A reload changed how the login is refreshed; applied between refreshes.
    Reconfigure(Settings),
    /// No profile uses the login any more: stop once a refresh in flight has ended.
    Retire,
    /// Retry now instead of after the backoff (this instance just became the cluster
    /// owner of the login, whose refreshes it was refused until then).
    Nudge,
    /// A new login (`login.finish`): write it under the locks and adopt it.
    Install {
        /// The tokens of the new login.
        tokens: Tokens,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), InstallError>>,
    },
}

/// Everything a login task needs.
pub struct LoginSpec {
    /// Profile name (for events, logs and errors).
    pub profile: String,
    /// Where the tokens live.
    pub source: Source,
    /// How it is refreshed.
    pub settings: Settings,
    /// Event bus.
    pub events: broadcast::Sender<Event>,
}

/// Where login tasks run, once the daemon has said (see [`run_logins_on`]).
static LOGIN_RUNTIME: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// Runs every login task started from now on (and the refreshes it spawns: the token
/// endpoint call, the file reads and writes) on `runtime` instead of the caller's. The
/// daemon gives them a thread of their own: on the runtime that serves the socket, each
/// step of a refresh waits its turn behind every request queued there, and in a stampede
/// those are the thousand requests waiting for that very refresh. Unset (unit tests under
/// a paused clock), login tasks run on the caller's runtime.
pub fn run_logins_on(runtime: tokio::runtime::Handle) {
    let _ = LOGIN_RUNTIME.set(runtime);
}

/// The handle the rest of the daemon holds; dropping every handle stops the task.
#[derive(Clone, Debug)]
pub struct LoginHandle {
    snapshot: watch::Receiver<Snapshot>,
    commands: mpsc::UnboundedSender<Command>,
}

impl LoginHandle {
    /// Starts the task for a login, after reading its file once (a bounded read of a
    /// regular file, which cannot block on a FIFO).
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
            scopes: Vec::new(),
        });
        let (ctx, crx) = mpsc::unbounded_channel();
        let owner = owner_of(&spec.source);
        let mut task = LoginTask {
            profile: spec.profile,
            source: spec.source,
            settings: spec.settings,
            events: spec.events,
            tokens: None,
            refreshed_at: None,
            spent: Vec::new(),
            unsaved: false,
            persist_at: None,
            dead: false,
            refreshing: false,
            late: None,
            refresh_at: None,
            retry_at: None,
            failures: 0,
            last_attempt_end: None,
            last_attempt_ok: true,
            last_forced: None,
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
            Err(e) => task.last_error = Some(e.to_string()),
        }
        task.publish();
        match LOGIN_RUNTIME.get() {
            Some(runtime) => drop(runtime.spawn(task.run(owner))),
            None => drop(tokio::spawn(task.run(owner))),
        }
        LoginHandle {
            snapshot: rx,
            commands: ctx,
        }
    }

    /// The current snapshot: a read guard on the login's `watch`. Hold it briefly and never
    /// take a second one while holding it: a publish waiting for the lock blocks new
    /// readers, so a nested borrow deadlocks the thread (and the login task) for good.
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
        let asked = Instant::now();
        let deadline = asked + ANSWER_WAIT;
        if matches!(force, Force::No) {
            let mut snapshot = self.snapshot.clone();
            loop {
                let refreshing = {
                    let snap = snapshot.borrow_and_update();
                    if let Some((t, e)) = snap.valid_token(min_valid) {
                        return Ok((t.clone(), e));
                    }
                    snap.state == ProfileState::Refreshing
                };
                if !refreshing {
                    break;
                }
                // A refresh is running: its result reaches every waiting caller at once
                // through the snapshot, instead of a command each that the login task
                // answers in turn after it. A caller it did not satisfy asks below, as
                // one that asked when this call began (so it joins, not repeats, it).
                match tokio::time::timeout_at(deadline, snapshot.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(RpcError::internal("login task stopped")),
                    Err(_) => return Err(no_answer()),
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Get {
            min_valid,
            force,
            asked,
            reply,
        };
        self.commands
            .send(cmd)
            .map_err(|_| RpcError::internal("login task stopped"))?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(answer) => answer.map_err(|_| RpcError::internal("login task stopped"))?,
            Err(_) => Err(no_answer()),
        }
    }

    /// Hands a new login to the task, which writes it (under Claude Code's locks for a
    /// shared login) and starts serving it.
    pub async fn install(&self, tokens: Tokens) -> Result<(), InstallError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Install { tokens, reply })
            .map_err(|_| InstallError::Stopped)?;
        rx.await.map_err(|_| InstallError::Stopped)?
    }

    /// Queues a new login like [`install`](Self::install) without waiting: installs queued
    /// one after another are applied in that order.
    pub fn queue_install(
        &self,
        tokens: Tokens,
    ) -> Result<oneshot::Receiver<Result<(), InstallError>>, InstallError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Install { tokens, reply })
            .map_err(|_| InstallError::Stopped)?;
        Ok(rx)
    }

    /// A receiver of the login's snapshots (it keeps the task alive while held).
    pub fn snapshot_receiver(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// Asks the task to retry a failed refresh now.
    pub fn nudge(&self) {
        let _ = self.commands.send(Command::Nudge);
    }

    /// True when both handles lead to the same task.
    pub fn same_task(&self, other: &LoginHandle) -> bool {
        self.commands.same_channel(&other.commands)
    }

    /// Applies new settings (after the refresh in flight, if any).
    pub fn reconfigure(&self, settings: Settings) {
        let _ = self.commands.send(Command::Reconfigure(settings));
    }

    /// Stops the task (no profile uses its login any more).
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

/// What the token endpoint answered, when its answer was complete, and the prepared write,
/// already filled with the new tokens when there are some.
struct Answer {
    result: Result<Tokens, RefreshError>,
    answered: Instant,
    prepared: Option<Prepared>,
}

/// A refresh whose answer came too late for its caller: still read to its end, and its
/// tokens kept, with Claude Code's locks held until then.
struct LateRefresh {
    call: JoinHandle<Answer>,
    current: Tokens,
    _guard: Option<LockGuard>,
}

struct LoginTask {
    profile: String,
    source: Source,
    settings: Settings,
    events: broadcast::Sender<Event>,
    tokens: Option<Tokens>,
    /// When this task obtained the current tokens by refreshing (`None` for tokens adopted
    /// from the file, whose age is unknown).
    refreshed_at: Option<Instant>,
    /// Refresh tokens this task already exchanged: a file still holding one of them is
    /// stale, never something to adopt, and the task's own to overwrite.
    spent: Vec<Secret>,
    /// The current tokens are not on disk yet (the write failed).
    unsaved: bool,
    /// When to try writing unsaved tokens again.
    persist_at: Option<Instant>,
    /// The refresh token is known dead: no upstream calls until the tokens change.
    dead: bool,
    refreshing: bool,
    late: Option<LateRefresh>,
    /// When the proactive refresh is due.
    refresh_at: Option<Instant>,
    /// When the next retry after a transient failure is due.
    retry_at: Option<Instant>,
    failures: u32,
    last_attempt_end: Option<Instant>,
    last_attempt_ok: bool,
    /// When the last explicit refresh was let through.
    last_forced: Option<Instant>,
    last_refresh_at: Option<i64>,
    refresh_count: u64,
    last_error: Option<String>,
    snapshot: watch::Sender<Snapshot>,
    commands: mpsc::UnboundedReceiver<Command>,
    published_state: Option<(ProfileState, Option<String>)>,
}

impl LoginTask {
    async fn run(mut self, owner: Arc<tokio::sync::Mutex<()>>) {
        // A predecessor on the same file finishes (and writes) first.
        let _owner = owner.lock_owned().await;
        self.recover().await;
        loop {
            let refresh_due = if self.dead || self.tokens.is_none() || self.late.is_some() {
                None
            } else {
                self.retry_at.or(self.refresh_at)
            };
            // A late refresh holds Claude Code's locks (this task's own, so never stale):
            // a retry that waited for them would stall the task for the lock wait. The
            // late answer's own write settles what is unsaved.
            let persist_due = if self.unsaved && self.late.is_none() {
                self.persist_at
            } else {
                None
            };
            tokio::select! {
                // Nobody holds a handle any more: stop before doing anything else.
                biased;
                _ = self.snapshot.closed() => break,
                answer = poll_late(&mut self.late) => self.finish_late(answer).await,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Get { min_valid, force, asked, reply }) => {
                        let answer = self.get(min_valid.min(MAX_MIN_VALID), force, asked).await;
                        let _ = reply.send(answer);
                    }
                    Some(Command::SourceChanged) => self.reread().await,
                    Some(Command::Reconfigure(settings)) => self.reconfigure(settings),
                    Some(Command::Install { tokens, reply }) => {
                        let _ = reply.send(self.install(tokens).await);
                    }
                    Some(Command::Nudge) => {
                        self.retry_at = None;
                        self.failures = 0;
                    }
                    Some(Command::Retire) | None => break,
                },
                _ = sleep_until(persist_due) => self.persist_again().await,
                _ = sleep_until(refresh_due) => {
                    tracing::debug!(profile = %self.profile, "proactive refresh");
                    self.refresh().await;
                }
            }
        }
        // A late answer may hold the only live refresh token: keep it before stopping.
        if self.late.is_some() {
            let answer = poll_late(&mut self.late).await;
            self.finish_late(answer).await;
        }
        tracing::debug!(profile = %self.profile, "login task stopped");
    }

    /// At start: removes Claude Code lock folders an earlier llmd died holding, and puts
    /// back tokens it had written but not yet renamed into place.
    async fn recover(&mut self) {
        if let Some(locks) = self.settings.locks.clone() {
            let _ = tokio::task::spawn_blocking(move || locks.reclaim_own()).await;
        }
        if crate::fsutil::leftovers(&self.source.path()).is_empty() {
            return;
        }
        let _guard = match &self.settings.locks {
            Some(locks) => match locks.acquire().await {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!(profile = %self.profile, error = %e, "cannot take Claude Code's lock to recover an interrupted write");
                    return;
                }
            },
            None => None,
        };
        let source = self.source.clone();
        match tokio::task::spawn_blocking(move || source.recover_leftovers()).await {
            Ok(Ok(true)) => {
                tracing::warn!(profile = %self.profile, "recovered refreshed tokens from a write interrupted by a crash");
                self.reread().await;
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(profile = %self.profile, error = %e, "cannot recover an interrupted write")
            }
            Err(e) => tracing::warn!(profile = %self.profile, error = %e, "recovery task failed"),
        }
    }

    fn reconfigure(&mut self, settings: Settings) {
        self.settings = settings;
        if let Some(t) = self.tokens.clone() {
            self.schedule(&t, self.refreshed_at.is_some());
        }
    }

    fn not_found(&self) -> String {
        format!("no login found at {}", self.source.path().display())
    }

    /// The current token if valid for `min_valid` seconds; also while the login is dead,
    /// since the access token works until it expires.
    fn current(&self, min_valid: u64) -> Option<(Secret, Option<i64>)> {
        let t = self.tokens.as_ref()?;
        (remaining(t.expires_at) >= min_valid as i64).then(|| (t.access.clone(), t.expires_at))
    }

    /// True while the token is inside the refresh margin (or expired).
    fn due(&self) -> bool {
        self.tokens
            .as_ref()
            .is_some_and(|t| remaining(t.expires_at) <= self.settings.margin.as_secs() as i64)
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
            if self.tokens.is_none() {
                return Err(self.no_login_error());
            }
            if self.dead {
                return match (&force, self.current(min_valid)) {
                    (Force::No, Some(t)) => Ok(t),
                    _ => Err(self.needs_login_error()),
                };
            }
        }
        let joined = self.last_attempt_end.is_some_and(|end| end >= asked);
        let wanted = match &force {
            Force::Always => {
                let valid = self.current(1).is_some();
                let recent = self
                    .last_forced
                    .filter(|_| self.last_attempt_ok)
                    .map(|at| at.elapsed())
                    .filter(|e| *e < self.settings.forced_interval);
                match recent {
                    Some(elapsed) if !joined && valid => {
                        return Err(self.forced_too_often(self.settings.forced_interval - elapsed))
                    }
                    _ => !joined,
                }
            }
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
            if matches!(force, Force::Always) {
                self.last_forced = Some(Instant::now());
            }
            self.refresh().await;
        }
        if self.dead {
            return match (&force, self.current(min_valid)) {
                (Force::No, Some(t)) => Ok(t),
                _ => Err(self.needs_login_error()),
            };
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

    fn forced_too_often(&self, wait: Duration) -> RpcError {
        RpcError::new(
            ErrorKind::RateLimited,
            format!(
                "profile `{}` was refreshed less than {}s ago and its token is valid; asked too often",
                self.profile,
                self.settings.forced_interval.as_secs()
            ),
        )
        .with("profile", self.profile.as_str())
        .with("retry_after_ms", wait.as_millis().max(1) as u64)
    }

    fn no_login_error(&self) -> RpcError {
        let p = &self.profile;
        let why = self.last_error.clone().unwrap_or_else(|| self.not_found());
        RpcError::new(
            ErrorKind::NeedsLogin,
            format!("profile `{p}` has no usable login ({why}): run `llmctl login {p}`"),
        )
        .with("profile", p.as_str())
    }

    fn needs_login_error(&self) -> RpcError {
        let p = &self.profile;
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
                self.profile,
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

    /// Refresh tokens whose presence in the file means the file holds this task's own
    /// state: everything it spent, and the current one.
    fn own_tokens(&self) -> Vec<Secret> {
        let mut own = self.spent.clone();
        if let Some(r) = self.tokens.as_ref().and_then(|t| t.refresh.clone()) {
            own.push(r);
        }
        own
    }

    /// Re-reads the file and adopts what it holds when it differs.
    async fn reread(&mut self) {
        match self.source.read_settled().await {
            Ok(Some(t)) if self.is_stale(&t) => {
                tracing::debug!(profile = %self.profile, "login file holds tokens already refreshed; ignoring");
            }
            Ok(Some(t)) => {
                if self.tokens.as_ref() != Some(&t) {
                    tracing::info!(profile = %self.profile, "adopted tokens written by another program");
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
                    tracing::warn!(profile = %self.profile, "login file removed");
                    self.last_error = Some(self.not_found());
                    self.publish();
                }
            }
            Err(e) => {
                let e = e.to_string();
                tracing::warn!(profile = %self.profile, error = %e, "cannot read login file; keeping current tokens");
                if self.tokens.is_none() && self.last_error.as_ref() != Some(&e) {
                    self.last_error = Some(e);
                    self.publish();
                }
            }
        }
    }

    /// When to refresh `t` proactively.
    fn schedule(&mut self, t: &Tokens, refreshed: bool) {
        self.refresh_at = t.expires_at.map(|exp| {
            let remaining = exp.saturating_sub(unix_now()).clamp(0, i64::from(u32::MAX)) as u64;
            // Refresh `margin` ahead. A token we just got whose whole life is shorter than
            // the margin is refreshed half-way instead, so it cannot cause a refresh storm.
            let margin = self.settings.margin.as_secs();
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
    }

    /// Takes `t` as the current tokens and schedules the next proactive refresh. The new
    /// token is published before `token.rotated` goes out, so a client that asks on the
    /// event gets the new token.
    fn adopt(&mut self, t: Tokens, refreshed: bool) {
        let rotated = self.tokens.as_ref().map(|c| &c.access) != Some(&t.access);
        self.dead = false;
        self.retry_at = None;
        self.failures = 0;
        self.refreshed_at = refreshed.then(Instant::now);
        self.schedule(&t, refreshed);
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
            self.publish();
            let _ = self.events.send(Event {
                kind: event_kinds::TOKEN_ROTATED.into(),
                profile: self.profile.clone(),
                expires_at,
                state: None,
                error: None,
                skipped: None,
                quota: None,
            });
        }
    }

    /// Writes tokens off the runtime's worker threads, replacing only the task's own state
    /// (or, for `Allow::Any`, whatever is there).
    async fn write(
        &self,
        tokens: &Tokens,
        prepared: Option<Prepared>,
        any: bool,
    ) -> Result<CasOutcome, FileError> {
        let source = self.source.clone();
        let tokens = tokens.clone();
        let own = self.own_tokens();
        tokio::task::spawn_blocking(move || {
            let allow = if any { Allow::Any } else { Allow::Own(&own) };
            match prepared {
                Some(p) => source.commit(p, &tokens, allow),
                None => source.write(&tokens, allow),
            }
        })
        .await
        .map_err(|e| FileError::Folder(format!("write task failed: {e}")))?
    }

    async fn persist_again(&mut self) {
        let Some(t) = self.tokens.clone() else {
            self.unsaved = false;
            return;
        };
        let _guard = match &self.settings.locks {
            Some(locks) => match locks.acquire().await {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!(profile = %self.profile, error = %e, "still cannot write refreshed tokens");
                    self.persist_at = Some(Instant::now() + PERSIST_RETRY);
                    return;
                }
            },
            None => None,
        };
        match self.write(&t, None, false).await {
            Ok(CasOutcome::Written { .. }) => {
                tracing::info!(profile = %self.profile, "refreshed tokens written after an earlier failure");
                self.unsaved = false;
                self.last_error = None;
                self.publish();
            }
            Ok(CasOutcome::Conflict(on_disk)) => {
                // Not one of our own states: another program logged in meanwhile.
                tracing::warn!(profile = %self.profile, "login file replaced by another program before our tokens could be written; adopting it");
                self.unsaved = false;
                self.adopt(on_disk, false);
                self.publish();
            }
            Err(e) => {
                tracing::warn!(profile = %self.profile, error = %e, "still cannot write refreshed tokens");
                self.last_error = Some(format!("refreshed tokens not saved yet: {e}"));
                self.persist_at = Some(Instant::now() + PERSIST_RETRY);
                self.publish();
            }
        }
    }

    /// A new login from `login.finish`: written under the locks, then served.
    async fn install(&mut self, tokens: Tokens) -> Result<(), InstallError> {
        // A refresh still awaited holds Claude Code's locks, which the write below needs:
        // finish it first (bounded by its late limit), so the new login is written last.
        if self.late.is_some() {
            let answer = poll_late(&mut self.late).await;
            self.finish_late(answer).await;
        }
        if let (Some(dir), Some(_)) = (self.source.path().parent(), &self.settings.locks) {
            if !dir.exists() {
                crate::fsutil::ensure_private_dir(dir).map_err(FileError::Folder)?;
            }
        }
        let _guard = match &self.settings.locks {
            Some(locks) => Some(locks.acquire().await?),
            None => None,
        };
        self.write(&tokens, None, true).await?;
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
        self.settle(outcome);
    }

    /// Records how an attempt ended and schedules what follows.
    fn settle(&mut self, outcome: Result<(), RefreshError>) {
        self.last_attempt_end = Some(Instant::now());
        self.last_attempt_ok = outcome.is_ok();
        match outcome {
            Ok(()) => {}
            Err(RefreshError::Dead(why)) => {
                tracing::warn!(profile = %self.profile, reason = %why, "login is dead; waiting for a new login");
                self.dead = true;
                self.last_error = Some(why);
            }
            Err(RefreshError::Transient { why, retry_after }) => {
                self.failures += 1;
                let exp = BACKOFF_BASE
                    .saturating_mul(1 << self.failures.min(10))
                    .min(BACKOFF_CAP);
                let jitter =
                    Duration::from_millis(rand::random::<u64>() % (exp.as_millis() as u64 / 5 + 1));
                let wait = (exp + jitter).max(retry_after.unwrap_or_default());
                self.retry_at = Some(Instant::now() + wait);
                tracing::warn!(profile = %self.profile, reason = %why, retry_in_ms = wait.as_millis() as u64, "refresh failed; will retry");
                self.last_error = Some(why);
            }
        }
        self.publish();
    }

    async fn refresh_locked(&mut self) -> Result<(), RefreshError> {
        if self.late.is_some() {
            return Err(RefreshError::transient(
                "the token endpoint has not answered the previous refresh yet",
            ));
        }
        let guard = match &self.settings.locks {
            Some(locks) => Some(
                locks
                    .acquire()
                    .await
                    .map_err(|e| RefreshError::transient(e.to_string()))?,
            ),
            None => None,
        };
        // Under the lock, the file is the truth: another program may have refreshed.
        match self.source.read_settled().await {
            Ok(Some(on_disk))
                if !self.is_stale(&on_disk) && self.tokens.as_ref() != Some(&on_disk) =>
            {
                let newer = on_disk.refresh != self.tokens.as_ref().and_then(|t| t.refresh.clone());
                if self.unsaved && !newer {
                    // Our own unsaved refresh is ahead of the file; nothing to adopt.
                } else {
                    tracing::info!(profile = %self.profile, "login file changed before refresh; adopting it");
                    self.adopt(on_disk, false);
                    self.unsaved = false;
                    if newer && !self.due() {
                        return Ok(());
                    }
                }
            }
            Ok(None) if self.tokens.is_none() => return Err(RefreshError::Dead(self.not_found())),
            _ => {}
        }
        let Some(current) = self.tokens.clone() else {
            return Err(RefreshError::Dead(self.not_found()));
        };
        if current.refresh.is_none() {
            return Err(RefreshError::Dead("the login has no refresh token".into()));
        }
        // Everything that could stop the result from being saved fails here, before the
        // token endpoint spends the refresh token.
        let source = self.source.clone();
        let expected = current.refresh.clone();
        let prepared = tokio::task::spawn_blocking(move || source.prepare(expected.as_ref()))
            .await
            .map_err(|e| RefreshError::transient(format!("write task failed: {e}")))?
            .map_err(|e| {
                RefreshError::transient(format!(
                    "not refreshing, because the result could not be saved: {e}"
                ))
            })?;
        let call = self.settings.endpoint.refresh(&current);
        let limit = late_limit(self.settings.timeout);
        let mut call = tokio::spawn(async move {
            let mut prepared = prepared;
            let result = match tokio::time::timeout(limit, call).await {
                Ok(r) => r,
                Err(_) => Err(RefreshError::transient(format!(
                    "token endpoint did not answer within {}s",
                    limit.as_secs()
                ))),
            };
            let answered = Instant::now();
            // Into the temp file right here, in the task that read the answer: a write of a
            // few hundred bytes to the page cache, which from then on survives a kill.
            // The fsync and rename follow in the login task.
            if let Ok(new) = &result {
                let _ = prepared.fill(new);
            }
            Answer {
                result,
                answered,
                prepared: Some(prepared),
            }
        });
        let answer = match tokio::time::timeout(self.settings.timeout, &mut call).await {
            Ok(joined) => joined.unwrap_or_else(|e| Answer {
                result: Err(RefreshError::transient(format!("refresh task failed: {e}"))),
                answered: Instant::now(),
                prepared: None,
            }),
            Err(_) => {
                let secs = self.settings.timeout.as_secs();
                tracing::warn!(profile = %self.profile, timeout_secs = secs, "token endpoint is slow; still waiting for its answer in the background");
                self.late = Some(LateRefresh {
                    call,
                    current,
                    _guard: guard,
                });
                return Err(RefreshError::transient(format!(
                    "token endpoint did not answer within {secs}s (refresh_timeout_secs); its answer is still awaited"
                )));
            }
        };
        let result = self.finish(current, answer).await;
        drop(guard);
        result
    }

    /// Handles the answer of a refresh whose caller stopped waiting.
    async fn finish_late(&mut self, answer: Answer) {
        let Some(late) = self.late.take() else { return };
        tracing::info!(profile = %self.profile, "the token endpoint answered a refresh late");
        let outcome = self.finish(late.current, answer).await;
        drop(late._guard);
        self.settle(outcome);
    }

    /// Saves and adopts what the token endpoint answered for `current`.
    async fn finish(&mut self, current: Tokens, answer: Answer) -> Result<(), RefreshError> {
        let Answer {
            result,
            answered,
            prepared,
        } = answer;
        let new = match result {
            Ok(t) => t,
            Err(RefreshError::Dead(why)) => {
                drop(prepared);
                // Someone may have refreshed with our refresh token meanwhile and written
                // the result: adopt it instead of giving up.
                if let Ok(Some(on_disk)) = self.source.read_settled().await {
                    if on_disk.refresh.is_some()
                        && on_disk.refresh != current.refresh
                        && !self.is_stale(&on_disk)
                    {
                        tracing::info!(profile = %self.profile, "refresh token was spent by another program; adopting its tokens");
                        self.adopt(on_disk, false);
                        return Ok(());
                    }
                }
                return Err(RefreshError::Dead(why));
            }
            Err(e) => return Err(e),
        };
        if let Some(r) = &current.refresh {
            if new.refresh.as_ref() != Some(r) && !self.spent.contains(r) {
                self.spent.push(r.clone());
                // Only the most recent ones can still be on disk somewhere.
                if self.spent.len() > SPENT_KEPT {
                    self.spent.remove(0);
                }
            }
        }
        // Persist before anyone sees the new token: a crash now must not lose the only
        // copy of a rotated refresh token.
        match self.write(&new, prepared, false).await {
            Ok(CasOutcome::Written { filled }) => {
                let in_memory_us = filled
                    .saturating_duration_since(answered.into_std())
                    .as_micros() as u64;
                tracing::info!(profile = %self.profile, expires_at = new.expires_at, in_memory_us, "refreshed");
            }
            Ok(CasOutcome::Conflict(on_disk)) => {
                tracing::warn!(profile = %self.profile, "login file changed during refresh; keeping the file's tokens");
                self.adopt(on_disk, false);
                return Ok(());
            }
            Err(e) => {
                tracing::error!(profile = %self.profile, error = %e, "cannot write refreshed tokens; serving them from memory and retrying the write");
                self.adopt(new, true);
                self.unsaved = true;
                self.persist_at = Some(Instant::now() + PERSIST_RETRY);
                self.last_error = Some(format!("refreshed tokens not saved yet: {e}"));
                return Ok(());
            }
        }
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
            scopes: t.map(|t| t.scopes.clone()).unwrap_or_default(),
        });
        // `refreshing` is too short-lived to be worth an event.
        let visible = (state, self.last_error.clone());
        if state != ProfileState::Refreshing && self.published_state.as_ref() != Some(&visible) {
            let changed = self.published_state.as_ref().map(|(s, _)| *s) != Some(state);
            self.published_state = Some(visible);
            if changed {
                let _ = self.events.send(Event {
                    kind: event_kinds::PROFILE_STATE.into(),
                    profile: self.profile.clone(),
                    expires_at: None,
                    state: Some(state),
                    error: self.last_error.clone(),
                    skipped: None,
                    quota: None,
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

/// The answer of a late refresh, once it is there (never, without one).
async fn poll_late(late: &mut Option<LateRefresh>) -> Answer {
    match late {
        Some(l) => match (&mut l.call).await {
            Ok(answer) => answer,
            Err(e) => Answer {
                result: Err(RefreshError::transient(format!("refresh task failed: {e}"))),
                answered: Instant::now(),
                prepared: None,
            },
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The engine's decision table, driven against a real bundle in a temp folder and a
    //! scripted token endpoint, under tokio's paused clock.
    use super::*;
    use crate::credentials::bundle::BundleFile;
    use crate::oauth::RefreshFuture;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};

    type Reply = oneshot::Sender<Result<Tokens, RefreshError>>;

    /// A token endpoint whose every call waits for the test to answer it.
    #[derive(Debug)]
    struct Gate {
        calls: mpsc::UnboundedSender<(Tokens, Reply)>,
        count: Arc<AtomicU64>,
    }

    impl TokenEndpoint for Gate {
        fn refresh(&self, current: &Tokens) -> RefreshFuture {
            let (tx, rx) = oneshot::channel();
            self.count.fetch_add(1, Ordering::SeqCst);
            let _ = self.calls.send((current.clone(), tx));
            Box::pin(async move {
                rx.await
                    .unwrap_or_else(|_| Err(RefreshError::transient("gate dropped")))
            })
        }
    }

    fn tokens(generation: u64, valid_for: i64) -> Tokens {
        Tokens {
            access: Secret::new(format!("access-{generation}")),
            refresh: Some(Secret::new(format!("refresh-{generation}"))),
            expires_at: Some(unix_now() + valid_for),
            scopes: vec![],
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        source: Source,
        handle: LoginHandle,
        calls: mpsc::UnboundedReceiver<(Tokens, Reply)>,
        count: Arc<AtomicU64>,
        endpoint: Arc<Gate>,
        bus: broadcast::Sender<Event>,
    }

    fn settings(endpoint: Arc<Gate>, timeout_secs: u64) -> Settings {
        Settings {
            endpoint,
            locks: None,
            margin: Duration::from_secs(60),
            timeout: Duration::from_secs(timeout_secs),
            forced_interval: Duration::from_secs(5),
        }
    }

    fn start(initial: &Tokens, timeout_secs: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::Bundle(BundleFile {
            path: dir.path().join("work.json"),
        });
        source.write(initial, Allow::Any).unwrap();
        let (tx, calls) = mpsc::unbounded_channel();
        let count = Arc::new(AtomicU64::new(0));
        let endpoint = Arc::new(Gate {
            calls: tx,
            count: count.clone(),
        });
        let (bus, _) = broadcast::channel(64);
        let handle = LoginHandle::spawn(LoginSpec {
            profile: "work".into(),
            source: source.clone(),
            settings: settings(endpoint.clone(), timeout_secs),
            events: bus.clone(),
        });
        Harness {
            _dir: dir,
            source,
            handle,
            calls,
            count,
            endpoint,
            bus,
        }
    }

    impl Harness {
        fn on_disk(&self) -> Tokens {
            self.source.read().unwrap().unwrap()
        }

        fn calls(&self) -> u64 {
            self.count.load(Ordering::SeqCst)
        }

        async fn next_call(&mut self) -> (Tokens, Reply) {
            tokio::time::timeout(Duration::from_secs(600), self.calls.recv())
                .await
                .expect("a refresh call")
                .expect("endpoint alive")
        }

        fn chmod(&self, mode: u32) {
            std::fs::set_permissions(self.source.path(), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }

        fn token(&self) -> impl Future<Output = Result<(Secret, Option<i64>), RpcError>> + 'static {
            let h = self.handle.clone();
            async move { h.token(0, Force::No).await }
        }

        fn forced(
            &self,
        ) -> impl Future<Output = Result<(Secret, Option<i64>), RpcError>> + 'static {
            let h = self.handle.clone();
            async move { h.token(0, Force::Always).await }
        }
    }

    use std::future::Future;

    fn access(r: &Result<(Secret, Option<i64>), RpcError>) -> String {
        match r {
            Ok((t, _)) => t.expose().to_owned(),
            Err(e) => format!("error: {}", e.message),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn serves_a_valid_token_without_calling_the_endpoint() {
        let h = start(&tokens(0, 3600), 30);
        for _ in 0..100 {
            assert_eq!(access(&h.token().await), "access-0");
        }
        assert_eq!(h.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_at_expiry_join_one_refresh_and_the_file_is_written_first() {
        let mut h = start(&tokens(0, -1), 30);
        let waiters: Vec<_> = (0..50).map(|_| tokio::spawn(h.token())).collect();
        let (current, reply) = h.next_call().await;
        assert_eq!(current.refresh, tokens(0, 0).refresh);
        reply.send(Ok(tokens(1, 3600))).unwrap();
        for w in waiters {
            let got = w.await.unwrap();
            assert_eq!(access(&got), "access-1");
        }
        assert_eq!(h.calls(), 1, "one upstream call for 50 callers");
        assert_eq!(h.on_disk().refresh, tokens(1, 0).refresh);
    }

    /// Callers that come while the refresh is at the endpoint wait for it through the
    /// snapshot; its result, a failure too, is theirs, and nobody starts another.
    #[tokio::test(start_paused = true)]
    async fn callers_during_a_refresh_share_its_result_even_a_failure() {
        for fails in [false, true] {
            let mut h = start(&tokens(0, -1), 30);
            let first = tokio::spawn(h.token());
            let (_, reply) = h.next_call().await;
            assert_eq!(h.handle.snapshot().state, ProfileState::Refreshing);
            let joiners: Vec<_> = (0..20).map(|_| tokio::spawn(h.token())).collect();
            tokio::task::yield_now().await;
            let answer = if fails {
                Err(RefreshError::Transient {
                    why: "busy".into(),
                    retry_after: None,
                })
            } else {
                Ok(tokens(1, 3600))
            };
            reply.send(answer).unwrap();
            for w in std::iter::once(first).chain(joiners) {
                let got = access(&w.await.unwrap());
                if fails {
                    assert!(got.starts_with("error:"), "{got}");
                } else {
                    assert_eq!(got, "access-1");
                }
            }
            assert_eq!(h.calls(), 1, "one upstream call (fails: {fails})");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn token_rotated_is_sent_after_the_new_token_is_served() {
        let mut h = start(&tokens(0, 3600), 30);
        let mut events = h.bus.subscribe();
        let forced = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        reply.send(Ok(tokens(1, 3600))).unwrap();
        loop {
            let e = events.recv().await.unwrap();
            if e.kind == event_kinds::TOKEN_ROTATED {
                break;
            }
        }
        // A client that asks on the event gets the new token, never the old one.
        assert_eq!(access(&h.token().await), "access-1");
        assert_eq!(access(&forced.await.unwrap()), "access-1");
    }

    #[tokio::test(start_paused = true)]
    async fn adopts_what_another_program_wrote() {
        let h = start(&tokens(0, 3600), 30);
        h.source.write(&tokens(7, 3600), Allow::Any).unwrap();
        h.handle.source_changed();
        let deadline = Instant::now() + Duration::from_secs(5);
        while access(&h.token().await) != "access-7" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(h.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_as_the_endpoint_asks() {
        let mut h = start(&tokens(0, 30), 30);
        // Inside the margin: the proactive refresh starts at once.
        let (_, reply) = h.next_call().await;
        reply
            .send(Err(RefreshError::Transient {
                why: "busy".into(),
                retry_after: Some(Duration::from_secs(40)),
            }))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(39)).await;
        assert_eq!(h.calls(), 1, "no retry before retry-after");
        assert_eq!(
            access(&h.token().await),
            "access-0",
            "old token still served"
        );
        let (_, reply) = h.next_call().await;
        assert!(Instant::now() >= Instant::now() - Duration::from_secs(1));
        reply.send(Ok(tokens(1, 3600))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(access(&h.token().await), "access-1");
        assert_eq!(h.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_refresh_when_the_result_could_not_be_saved() {
        let h = start(&tokens(0, 3600), 30);
        h.chmod(0o640);
        let got = h.forced().await;
        assert!(
            access(&got).contains("could not be saved"),
            "{}",
            access(&got)
        );
        assert_eq!(h.calls(), 0, "the refresh token was not spent");
        h.chmod(0o600);
        assert_eq!(h.on_disk().refresh, tokens(0, 0).refresh);
        assert!(crate::fsutil::leftovers(&h.source.path()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn own_unsaved_state_is_never_taken_for_another_writer() {
        let mut h = start(&tokens(0, 3600), 30);
        // The write fails after the endpoint rotated (the file became unreadable for
        // llmd's checks while the call was out).
        let first = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        h.chmod(0o640);
        reply.send(Ok(tokens(1, 3600))).unwrap();
        assert_eq!(
            access(&first.await.unwrap()),
            "access-1",
            "served from memory"
        );
        let snap = h.handle.snapshot().clone();
        assert!(snap.last_error.unwrap().contains("not saved yet"));
        // The disk heals; the file still holds R0, which llmd itself spent.
        h.chmod(0o600);
        h.handle.source_changed();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(access(&h.token().await), "access-1", "R0 is not re-adopted");
        // A second refresh before the retry: the new pair replaces R0 in the file.
        tokio::time::sleep(Duration::from_millis(5100)).await;
        // (the retry may have written R1 by now; either way R0 is gone)
        let second = tokio::spawn(h.forced());
        let (current, reply) = h.next_call().await;
        assert_eq!(
            current.refresh,
            tokens(1, 0).refresh,
            "refreshes with R1, not R0"
        );
        reply.send(Ok(tokens(2, 3600))).unwrap();
        assert_eq!(access(&second.await.unwrap()), "access-2");
        assert_eq!(h.on_disk().refresh, tokens(2, 0).refresh);
        assert!(h.handle.snapshot().last_error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_write_retry_writes_and_does_not_count_a_conflict_as_success() {
        let mut h = start(&tokens(0, 3600), 30);
        let first = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        h.chmod(0o640);
        reply.send(Ok(tokens(1, 3600))).unwrap();
        first.await.unwrap().unwrap();
        h.chmod(0o600);
        // The retry, 5 s later, finds R0 (its own spent token) and writes R1 over it.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(h.on_disk().refresh, tokens(1, 0).refresh);
        assert!(h.handle.snapshot().last_error.is_none());

        // Unsaved again, and this time another program logs in before the retry.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let again = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        h.chmod(0o640);
        reply.send(Ok(tokens(2, 3600))).unwrap();
        again.await.unwrap().unwrap();
        h.chmod(0o600);
        h.source.write(&tokens(9, 3600), Allow::Any).unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        // The conflict is resolved by adopting the other login, not by calling it written.
        assert_eq!(h.on_disk().refresh, tokens(9, 0).refresh);
        assert_eq!(access(&h.token().await), "access-9");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_is_kept_and_not_refreshed_again() {
        let mut h = start(&tokens(0, 3600), 3);
        let forced = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        // The caller gives up after 3 s...
        let got = forced.await.unwrap();
        assert!(access(&got).contains("still awaited"), "{}", access(&got));
        // ...while the endpoint, which has rotated, answers at 5 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        reply.send(Ok(tokens(1, 3600))).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(access(&h.token().await), "access-1");
        assert_eq!(h.on_disk().refresh, tokens(1, 0).refresh);
        assert_eq!(h.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_second_call_while_a_late_answer_is_awaited() {
        let mut h = start(&tokens(0, 3600), 3);
        let forced = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        forced.await.unwrap().unwrap_err();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let again = h.forced().await;
        assert!(again.is_err());
        assert_eq!(h.calls(), 1, "R0 is not presented twice");
        // The background wait is bounded too.
        drop(reply);
        tokio::time::sleep(late_limit(Duration::from_secs(3))).await;
        assert_eq!(access(&h.token().await), "access-0");
    }

    #[tokio::test(start_paused = true)]
    async fn dead_login_serves_its_access_token_until_expiry() {
        let mut h = start(&tokens(0, 250), 30);
        let (_, reply) = h.next_call().await;
        reply
            .send(Err(RefreshError::Dead("invalid_grant".into())))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.handle.snapshot().state, ProfileState::NeedsLogin);
        assert_eq!(access(&h.token().await), "access-0");
        let long = h.handle.token(3600, Force::No).await;
        assert_eq!(long.unwrap_err().kind(), ErrorKind::NeedsLogin);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(h.calls(), 1, "no more calls on a dead refresh token");
    }

    #[tokio::test(start_paused = true)]
    async fn forced_refreshes_are_rate_limited_while_the_token_is_valid() {
        let mut h = start(&tokens(0, 3600), 30);
        let first = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        reply.send(Ok(tokens(1, 3600))).unwrap();
        first.await.unwrap().unwrap();
        // (The paused clock stands still; a real caller always asks after the end.)
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..20 {
            let e = h.forced().await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::RateLimited);
        }
        assert_eq!(h.calls(), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let next = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        reply.send(Ok(tokens(2, 3600))).unwrap();
        assert_eq!(access(&next.await.unwrap()), "access-2");
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_during_a_refresh_does_not_start_a_second_one() {
        let mut h = start(&tokens(0, 3600), 30);
        let forced = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        h.handle.reconfigure(settings(h.endpoint.clone(), 10));
        h.handle.source_changed();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.calls(), 1);
        reply.send(Ok(tokens(1, 3600))).unwrap();
        assert_eq!(access(&forced.await.unwrap()), "access-1");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_task_waits_for_its_predecessor_on_the_same_file() {
        let mut h = start(&tokens(0, 3600), 30);
        let forced = tokio::spawn(h.forced());
        let (_, reply) = h.next_call().await;
        // A reload dropped and re-added the profile while the refresh is out.
        let successor = LoginHandle::spawn(LoginSpec {
            profile: "work".into(),
            source: h.source.clone(),
            settings: settings(h.endpoint.clone(), 30),
            events: h.bus.clone(),
        });
        h.handle.retire();
        let asked = {
            let s = successor.clone();
            tokio::spawn(async move { s.token(3600 * 2, Force::No).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.calls(), 1, "the successor does not refresh R0 alongside");
        reply.send(Ok(tokens(1, 7200))).unwrap();
        assert_eq!(access(&forced.await.unwrap()), "access-1");
        // The successor starts from the file its predecessor wrote.
        assert_eq!(access(&asked.await.unwrap()), "access-1");
        assert_eq!(h.calls(), 1);
    }

    #[test]
    fn a_crash_between_write_and_rename_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::Bundle(BundleFile {
            path: dir.path().join("work.json"),
        });
        source.write(&tokens(0, 3600), Allow::Any).unwrap();
        // What a kill after the temp file was filled leaves behind.
        let mut w = source.prepare(tokens(0, 0).refresh.as_ref()).unwrap();
        let mut next = tokens(1, 3600);
        next.scopes = vec!["a".into()];
        w.fill(&next).unwrap();
        std::mem::forget(w);
        // And an empty one from a kill right after prepare, and one for an older state.
        std::mem::forget(source.prepare(tokens(0, 0).refresh.as_ref()).unwrap());
        let mut old = source.prepare(Some(&Secret::new("refresh-older"))).unwrap();
        old.fill(&tokens(5, 3600)).unwrap();
        std::mem::forget(old);
        assert_eq!(crate::fsutil::leftovers(&source.path()).len(), 3);
        assert!(source.recover_leftovers().unwrap());
        assert_eq!(source.read().unwrap().unwrap().refresh, next.refresh);
        assert!(
            crate::fsutil::leftovers(&source.path()).is_empty(),
            "no secret-bearing temp file left"
        );
        assert_eq!(crate::fsutil::mode_of(&source.path()), Some(0o600));
    }

    /// A caller never waits for good on a login task that cannot answer (here: it waits
    /// for the ownership lock of its file, held elsewhere): it gets `refresh_failed`.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_login_task_answers_its_callers_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::Bundle(BundleFile {
            path: dir.path().join("stuck.json"),
        });
        source.write(&tokens(0, 3600), Allow::Any).unwrap();
        let held = owner_of(&source).lock_owned().await;
        let (tx, _calls) = mpsc::unbounded_channel();
        let endpoint = Arc::new(Gate {
            calls: tx,
            count: Arc::new(AtomicU64::new(0)),
        });
        let (bus, _) = broadcast::channel(64);
        let handle = LoginHandle::spawn(LoginSpec {
            profile: "stuck".into(),
            source: source.clone(),
            settings: settings(endpoint, 30),
            events: bus,
        });
        let e = tokio::time::timeout(ANSWER_WAIT * 2, handle.token(7200, Force::No))
            .await
            .expect("the caller got an answer")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RefreshFailed, "{e:?}");
        drop(held);
    }

    /// A new login handed over while a refresh answer is still awaited (holding Claude
    /// Code's locks) waits for that answer instead of for its own locks, and is written
    /// last. (It waited the whole lock wait, then failed with "Claude Code holds the
    /// locks".)
    #[tokio::test(start_paused = true)]
    async fn an_install_during_a_late_refresh_waits_for_it_and_wins() {
        let initial = tokens(0, 30);
        let mut h = start(&initial, 2);
        let claude = h._dir.path().join("claude");
        std::fs::create_dir(&claude).unwrap();
        let mut with_locks = settings(h.endpoint.clone(), 2);
        with_locks.locks = Some(ClaudeLocks::for_dir(&claude, Duration::from_secs(30)));
        h.handle.reconfigure(with_locks);
        let forced = tokio::spawn(h.forced());
        let (_current, reply) = h.next_call().await;
        // The caller gives up after the 2 s timeout; the answer is awaited late.
        assert!(forced.await.unwrap().is_err());
        let install = tokio::spawn({
            let handle = h.handle.clone();
            async move { handle.install(tokens(9, 3600)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!install.is_finished());
        reply.send(Ok(tokens(1, 3600))).unwrap();
        tokio::time::timeout(Duration::from_secs(20), install)
            .await
            .expect("the install was not held for the lock wait")
            .unwrap()
            .expect("installed");
        assert_eq!(h.on_disk().access.expose(), "access-9");
        assert_eq!(h.count.load(Ordering::SeqCst), 1);
    }
}
