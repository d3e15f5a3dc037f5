//! `auth = "upstream"` profiles: the tokens of a profile of another llmd, reached through
//! a forwarded or bind-mounted socket (DESIGN.md, "Followers"). A follower never calls a
//! token endpoint and never holds a refresh token: it keeps the upstream's current access
//! token, takes new ones on the upstream's events, and asks again when a caller needs more
//! validity than it holds.

use crate::credentials::claude_cli::CredentialsFile;
use crate::credentials::claude_lock::ClaudeLocks;
use crate::credentials::{unix_now, Allow, Source, Tokens};
use crate::secret::Secret;
use crate::sync::lock;
use llmd_client::Client;
use llmd_proto::methods::{event_kinds, Event, ProfileState, TokenResult, UpstreamStatus};
use llmd_proto::{ErrorKind, RpcError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The refresh token written into a mirrored `.credentials.json`: Claude Code sends it if
/// it ever refreshes from the mirror, and the token endpoint refuses it, so the real
/// login is never spent.
pub const MIRROR_REFRESH_TOKEN: &str = "llmd-mirror-not-a-refresh-token";
/// Longest wait for the upstream to connect or answer one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for Claude Code's lock folders before a mirror write is skipped.
const MIRROR_LOCK_WAIT: Duration = Duration::from_secs(30);
/// Largest mirrored file read to keep its other fields.
const MAX_MIRROR_BYTES: usize = 1 << 20;

/// The upstream's current token and what comes with it.
#[derive(Clone)]
pub struct Current {
    /// Access token.
    pub token: Secret,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// The upstream's auth kind.
    pub kind: String,
    /// The upstream's provider, when it says.
    pub provider: Option<String>,
    /// The headers the upstream computed for this token.
    pub headers: BTreeMap<String, String>,
    /// Scopes of the login.
    pub scopes: Vec<String>,
    /// Claude subscription type.
    pub subscription_type: Option<String>,
}

impl Current {
    fn remaining(&self) -> i64 {
        self.expires_at
            .map_or(i64::MAX, |e| e.saturating_sub(unix_now()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Connected,
    Disconnected,
}

impl Link {
    fn as_str(self) -> &'static str {
        match self {
            Link::Connecting => "connecting",
            Link::Connected => "connected",
            Link::Disconnected => "disconnected",
        }
    }
}

struct State {
    current: Option<Current>,
    link: Link,
    /// Why the upstream could not be used, free of secrets.
    last_error: Option<String>,
    /// An error the upstream itself answered (its login is dead, …).
    upstream_error: Option<RpcError>,
    rotations: u64,
    last_rotation_at: Option<i64>,
    published: Option<ProfileState>,
}

struct Inner {
    profile: String,
    socket: PathBuf,
    upstream_profile: String,
    state: Mutex<State>,
    client: tokio::sync::Mutex<Option<Client>>,
    events: broadcast::Sender<Event>,
    mirror: Option<watch::Sender<Option<Current>>>,
}

/// A follower profile's link to its upstream. Dropping it stops the link.
pub struct Follower {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("profile", &self.inner.profile)
            .field("socket", &self.inner.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a follower profile is built from.
pub struct Spec {
    /// This profile's name.
    pub profile: String,
    /// The upstream llmd's socket.
    pub socket: PathBuf,
    /// The upstream profile.
    pub upstream_profile: String,
    /// `mirror_claude_config_dir`.
    pub mirror: Option<PathBuf>,
    /// Event bus of this daemon.
    pub events: broadcast::Sender<Event>,
}

impl Follower {
    /// Starts following (needs a Tokio runtime).
    pub fn spawn(spec: Spec) -> Follower {
        let (mirror_tx, mirror_rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            profile: spec.profile,
            socket: spec.socket,
            upstream_profile: spec.upstream_profile,
            state: Mutex::new(State {
                current: None,
                link: Link::Connecting,
                last_error: None,
                upstream_error: None,
                rotations: 0,
                last_rotation_at: None,
                published: None,
            }),
            client: tokio::sync::Mutex::new(None),
            events: spec.events,
            mirror: spec.mirror.is_some().then_some(mirror_tx),
        });
        let mut tasks = vec![tokio::spawn(run(inner.clone())).abort_handle()];
        if let Some(dir) = spec.mirror {
            let name = inner.profile.clone();
            tasks.push(tokio::spawn(mirror_loop(name, dir, mirror_rx)).abort_handle());
        }
        Follower { inner, tasks }
    }

    /// A token valid for `min_valid` seconds: the one held when it is, else the upstream's.
    /// `stale` is a token a provider rejected: then the upstream is asked even if it looks
    /// valid. While the upstream cannot be reached, the held token is served until it
    /// expires.
    pub async fn token(&self, min_valid: u64, stale: Option<&Secret>) -> Result<Current, RpcError> {
        let held = lock(&self.inner.state).current.clone();
        if let Some(c) = &held {
            if c.remaining() >= min_valid as i64 && stale.is_none_or(|s| *s != c.token) {
                return Ok(c.clone());
            }
        }
        match self.inner.ask(min_valid).await {
            Ok(c) => Ok(c),
            Err(e) => match held {
                Some(c) if c.remaining() > 0 && e.kind() == ErrorKind::Upstream => Ok(c),
                _ => Err(e),
            },
        }
    }

    /// The headers the upstream gave for `token` (empty for a token it did not give).
    pub fn headers(&self, token: &str) -> BTreeMap<String, String> {
        match &lock(&self.inner.state).current {
            Some(c) if c.token.expose() == token => c.headers.clone(),
            _ => BTreeMap::new(),
        }
    }

    /// `state`, `expires_at`, `last_refresh_at` (last rotation taken), rotations,
    /// `last_error` and the upstream line of `status`.
    #[allow(clippy::type_complexity)]
    pub fn status(
        &self,
    ) -> (
        ProfileState,
        Option<i64>,
        Option<i64>,
        u64,
        Option<String>,
        UpstreamStatus,
    ) {
        let s = lock(&self.inner.state);
        (
            state_of(&s),
            s.current.as_ref().and_then(|c| c.expires_at),
            s.last_rotation_at,
            s.rotations,
            s.last_error.clone(),
            UpstreamStatus {
                socket: self.inner.socket.display().to_string(),
                profile: self.inner.upstream_profile.clone(),
                connection: s.link.as_str().into(),
            },
        )
    }
}

fn state_of(s: &State) -> ProfileState {
    match (&s.current, &s.upstream_error) {
        (Some(c), _) if c.remaining() > 0 => ProfileState::Ok,
        (_, Some(e)) if e.kind() == ErrorKind::NeedsLogin => ProfileState::NeedsLogin,
        (_, Some(e)) if e.kind() == ErrorKind::MissingCredential => ProfileState::Missing,
        _ if s.link == Link::Connecting && s.last_error.is_none() => ProfileState::Refreshing,
        _ => ProfileState::Error,
    }
}

impl Inner {
    fn unreachable(&self, why: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            ErrorKind::Upstream,
            format!(
                "profile `{}`: the upstream llmd at {} cannot be reached ({why}); it follows profile `{}` there",
                self.profile,
                self.socket.display(),
                self.upstream_profile
            ),
        )
        .with("profile", self.profile.as_str())
        .with("upstream_socket", self.socket.display().to_string())
    }

    /// A client of the upstream (connecting when there is none).
    async fn client(&self) -> Result<Client, RpcError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(CALL_TIMEOUT, Client::connect_to(&self.socket))
            .await
            .map_err(|_| self.unreachable("no answer within 10 s"))?
            .map_err(|e| self.unreachable(transport(&e)))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Asks the upstream for a token valid `min_valid` seconds and takes it.
    async fn ask(&self, min_valid: u64) -> Result<Current, RpcError> {
        let client = self.client().await?;
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            client.token(&self.upstream_profile, Some(min_valid)),
        )
        .await;
        let r = match answer {
            Err(_) => Err(self.unreachable("no answer within 10 s")),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(llmd_client::Error::Rpc(e))) => {
                let e = RpcError::new(
                    e.kind(),
                    format!(
                        "upstream llmd at {} (profile `{}`): {}",
                        self.socket.display(),
                        self.upstream_profile,
                        e.message
                    ),
                )
                .with("profile", self.profile.as_str());
                {
                    let mut s = lock(&self.state);
                    s.upstream_error = Some(e.clone());
                    s.last_error = Some(e.message.clone());
                }
                self.publish();
                return Err(e);
            }
            Ok(Err(e)) => Err(self.unreachable(transport(&e))),
        };
        match r {
            Ok(r) => Ok(self.adopt(r)),
            Err(e) => {
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    fn note_failure(&self, e: &RpcError) {
        let mut s = lock(&self.state);
        s.last_error = Some(e.message.clone());
        if s.link == Link::Connected {
            s.link = Link::Disconnected;
        }
        drop(s);
        self.publish();
    }

    /// Takes the upstream's answer as the current token; the new token is in place before
    /// `token.rotated` goes out.
    fn adopt(&self, r: TokenResult) -> Current {
        let c = Current {
            token: Secret::new(r.token),
            expires_at: r.expires_at,
            kind: r.kind,
            provider: r.provider,
            headers: r.headers,
            scopes: r.scopes,
            subscription_type: r.subscription_type,
        };
        let mut s = lock(&self.state);
        let rotated = s.current.as_ref().map(|o| &o.token) != Some(&c.token);
        s.current = Some(c.clone());
        s.upstream_error = None;
        s.last_error = None;
        if rotated {
            s.rotations += 1;
            s.last_rotation_at = Some(unix_now());
        }
        drop(s);
        if rotated {
            if let Some(m) = &self.mirror {
                m.send_replace(Some(c.clone()));
            }
            let _ = self.events.send(Event {
                kind: event_kinds::TOKEN_ROTATED.into(),
                profile: self.profile.clone(),
                expires_at: c.expires_at,
                state: None,
                error: None,
                skipped: None,
                quota: None,
            });
        }
        self.publish();
        c
    }

    fn set_link(&self, link: Link, error: Option<String>) {
        {
            let mut s = lock(&self.state);
            s.link = link;
            if error.is_some() {
                s.last_error = error;
            }
        }
        self.publish();
    }

    /// Sends `profile.state` when the state changed.
    fn publish(&self) {
        let mut s = lock(&self.state);
        let state = state_of(&s);
        if s.published == Some(state) || state == ProfileState::Refreshing {
            return;
        }
        s.published = Some(state);
        let error = (state != ProfileState::Ok)
            .then(|| s.last_error.clone())
            .flatten();
        drop(s);
        let _ = self.events.send(Event {
            kind: event_kinds::PROFILE_STATE.into(),
            profile: self.profile.clone(),
            expires_at: None,
            state: Some(state),
            error,
            skipped: None,
            quota: None,
        });
    }

    /// One connection to the upstream: subscribe, take the current token, then follow the
    /// events until the connection ends. Returns why it ended.
    async fn session(&self, backoff: &mut Duration) -> String {
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return e.message,
        };
        let subscribed = tokio::time::timeout(
            CALL_TIMEOUT,
            client.subscribe(&[event_kinds::TOKEN_ROTATED, event_kinds::PROFILE_STATE]),
        )
        .await;
        let mut events = match subscribed {
            Ok(Ok(rx)) => rx,
            Ok(Err(e)) => return self.unreachable(transport(&e)).message,
            Err(_) => return self.unreachable("no answer within 10 s").message,
        };
        if let Err(e) = self.ask(0).await {
            if e.kind() == ErrorKind::Upstream {
                return e.message;
            }
        }
        self.set_link(Link::Connected, None);
        *backoff = MIN_BACKOFF;
        loop {
            // Ask again once the held token expires: the upstream then refreshes it (or
            // says why it cannot), even if an event was missed.
            let wake = lock(&self.state)
                .current
                .as_ref()
                .map_or(30, |c| c.remaining().clamp(1, 30)) as u64;
            tokio::select! {
                ev = events.recv() => match ev {
                    None => return self.unreachable("the connection closed").message,
                    // events.lost: the upstream skipped events this link may need.
                    Some(e) if e.profile == self.upstream_profile
                        || e.kind == event_kinds::EVENTS_LOST => {
                        if let Err(e) = self.ask(0).await {
                            if e.kind() == ErrorKind::Upstream {
                                return e.message;
                            }
                        }
                    }
                    Some(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_secs(wake)) => {
                    if let Err(e) = self.ask(0).await {
                        if e.kind() == ErrorKind::Upstream {
                            return e.message;
                        }
                    }
                    self.publish();
                }
            }
        }
    }
}

fn transport(e: &llmd_client::Error) -> String {
    match e {
        llmd_client::Error::NotRunning { source, .. }
        | llmd_client::Error::Socket { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Keeps a link to the upstream, reconnecting with bounded backoff.
async fn run(inner: Arc<Inner>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let why = inner.session(&mut backoff).await;
        *inner.client.lock().await = None;
        tracing::warn!(profile = %inner.profile, socket = %inner.socket.display(), error = %why, "upstream llmd unreachable; reconnecting");
        inner.set_link(Link::Disconnected, Some(why));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        inner.set_link(Link::Connecting, None);
    }
}

/// Writes each new upstream token into the mirror folder's `.credentials.json`.
async fn mirror_loop(profile: String, dir: PathBuf, mut rx: watch::Receiver<Option<Current>>) {
    while rx.changed().await.is_ok() {
        let Some(c) = rx.borrow_and_update().clone() else {
            continue;
        };
        if let Err(e) = write_mirror(&dir, &c).await {
            tracing::warn!(profile = %profile, dir = %dir.display(), error = %e, "cannot write the mirrored Claude Code login");
        }
    }
}

/// One mirror write, under Claude Code's lock folders and by atomic replace, keeping every
/// other field of the file.
pub async fn write_mirror(dir: &Path, c: &Current) -> Result<(), String> {
    if !dir.exists() {
        crate::fsutil::ensure_private_dir(dir)?;
    }
    let locks = ClaudeLocks::for_dir(dir, MIRROR_LOCK_WAIT);
    let _held = locks.acquire().await.map_err(|e| e.to_string())?;
    let dir = dir.to_path_buf();
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        let file = CredentialsFile::in_dir(&dir);
        if let Some(sub) = &c.subscription_type {
            set_subscription_type(&file.path, sub)?;
        }
        let tokens = Tokens {
            access: c.token.clone(),
            refresh: Some(Secret::new(MIRROR_REFRESH_TOKEN)),
            expires_at: c.expires_at,
            scopes: c.scopes.clone(),
        };
        Source::ClaudeCli(file)
            .write(&tokens, Allow::Any)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("mirror task failed: {e}"))?
}

/// Records `subscriptionType` (which the token write leaves as it is) when it differs.
fn set_subscription_type(path: &Path, sub: &str) -> Result<(), String> {
    use serde_json::{Map, Value};
    let mut root: Map<String, Value> = match crate::fsutil::read_regular_capped(path) {
        // Never replace what could not be read: the token write refuses it too.
        Ok(Some(bytes)) if bytes.len() <= MAX_MIRROR_BYTES => serde_json::from_slice(&bytes)
            .map_err(|_| format!("{}: not a JSON object; left as it is", path.display()))?,
        Ok(Some(_)) => return Err(format!("{}: larger than 1 MiB", path.display())),
        Ok(None) => Map::new(),
        Err(e) => return Err(e.to_string()),
    };
    let oauth = root
        .entry("claudeAiOauth")
        .or_insert_with(|| Value::Object(Map::new()));
    if !oauth.is_object() {
        *oauth = Value::Object(Map::new());
    }
    if let Value::Object(o) = oauth {
        if o.get("subscriptionType").and_then(Value::as_str) == Some(sub) {
            return Ok(());
        }
        o.insert("subscriptionType".into(), Value::String(sub.into()));
    }
    let bytes = serde_json::to_vec(&root).map_err(|e| e.to_string())?;
    crate::fsutil::write_secret_atomic(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}
