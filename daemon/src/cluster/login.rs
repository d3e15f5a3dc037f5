//! The cluster task of one shared login: the etcd session (lease, ownership, watch), the
//! fenced writes, and adoption of other instances' tokens into the local login.
//!
//! Keys, under the prefix: `<profile>/login` holds the sealed token pair (no lease: it
//! outlives every owner); `<profile>/owner` holds the owner's instance name, attached to
//! its lease, so it disappears when the owner dies or is cut off for `lease_secs`.
//!
//! Rules:
//! - the token endpoint is called only while this instance holds the owner key, its lease
//!   is valid for a guard interval more, and a linearizable read has just shown that the
//!   login's revision is the one the tokens came from;
//! - new tokens go into etcd with `mod_revision == read revision` (the fence): an owner that
//!   was paused past its lease finds a newer revision and keeps the newer login;
//! - tokens from the watch are installed into the local login (under Claude Code's locks
//!   for `claude-cli`), and tokens that appear locally (Claude Code refreshed, `llmctl
//!   login`) go into etcd by the same compare-and-swap;
//! - without etcd nothing refreshes: the local token is served while it is valid.

use super::{Request, Settings, Status};
use crate::credentials::{Source, Tokens};
use crate::oauth::RefreshError;
use crate::refresh::LoginHandle;
use crate::secret::Secret;
use etcd_client::{
    Client, Compare, CompareOp, EventType, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Longest wait for one etcd call.
const CALL: Duration = Duration::from_secs(5);
/// Reconnect delays.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Superseded access tokens remembered, to tell an old local login from a new one.
const OLDER_KEPT: usize = 64;
/// A follower asks its login task to come back this soon.
const FOLLOWER_RETRY: Duration = Duration::from_secs(1);
/// An intent to spend a refresh token whose result never reached etcd is honoured this
/// many lease lengths (at least [`MIN_INTENT_WAIT`]) before a new owner spends it anyway.
const INTENT_LEASES: u64 = 6;
/// Shortest wait on another instance's unfinished refresh.
const MIN_INTENT_WAIT: Duration = Duration::from_secs(30);

/// What the task needs.
pub struct Spec {
    /// Profile name (the key name inside the prefix).
    pub profile: String,
    /// `[cluster]`.
    pub settings: Settings,
    /// The local login task.
    pub handle: LoginHandle,
    /// The local login file, read when the local tokens change.
    pub source: Source,
    /// Refreshes from the login task's gate.
    pub requests: mpsc::Receiver<Request>,
    /// Published state.
    pub status: watch::Sender<Status>,
}

/// Why a session ended. Texts are free of secrets.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {}s", CALL.as_secs())]
    Timeout,
    #[error("the lease ran out (paused, or etcd unreachable)")]
    LeaseLost,
    #[error("the watch of the login ended")]
    WatchEnded,
}

/// How a session ended without an error.
enum End {
    /// The login task is gone.
    Stop,
}

async fn call<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SessionError::Timeout),
    }
}

/// Starts the task.
pub fn spawn(spec: Spec) {
    let p = format!("{}{}/", spec.settings.prefix, spec.profile);
    let task = Task {
        login_key: format!("{p}login"),
        owner_key: format!("{p}owner"),
        spending_key: format!("{p}spending"),
        dir: p,
        spec,
        rev: 0,
        value: None,
        older: VecDeque::new(),
        unpushed: None,
        first_read: true,
        owner: None,
        lease: None,
    };
    tokio::spawn(task.run());
}

struct Task {
    spec: Spec,
    dir: String,
    login_key: String,
    owner_key: String,
    /// The owner's intent, written before it calls the token endpoint and deleted with the
    /// write of its result: a successor that finds it naming the refresh token etcd still
    /// holds knows that token was (perhaps) spent by a refresh whose result is not in etcd
    /// yet (its owner lost etcd between the call and the write), and waits for that owner
    /// instead of spending the token a second time (`invalid_grant`, or worse, a revoked
    /// login family).
    spending_key: String,
    /// `mod_revision` of the login key last seen (0: absent).
    rev: i64,
    /// The tokens at `rev`.
    value: Option<Tokens>,
    /// Access tokens of logins known to be superseded.
    older: VecDeque<Secret>,
    /// Tokens this owner got from the endpoint but could not write to etcd yet.
    unpushed: Option<Tokens>,
    first_read: bool,
    owner: Option<String>,
    /// This session's lease id and the watch of its expiry.
    lease: Option<(i64, watch::Receiver<Option<Instant>>)>,
}

impl Task {
    async fn run(mut self) {
        let mut snapshot = self.spec.handle.snapshot_receiver();
        let mut backoff = MIN_BACKOFF;
        loop {
            let why = match self.session(&mut snapshot).await {
                Ok(End::Stop) => break,
                Err(e) => e.to_string(),
            };
            tracing::warn!(profile = %self.spec.profile, error = %why, "cluster: not in sync with etcd; serving the current token while it is valid");
            self.lease = None;
            self.publish("disconnected", Some(why.clone()));
            let until = Instant::now() + backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    r = self.spec.requests.recv() => match r {
                        Some(r) => {
                            let _ = r.reply.send(Err(RefreshError::Transient {
                                why: format!("cluster: cannot reach etcd ({why}); not refreshing"),
                                retry_after: Some(FOLLOWER_RETRY),
                            }));
                        }
                        None => return,
                    },
                    c = snapshot.changed() => if c.is_err() { return },
                }
            }
        }
    }

    fn publish(&self, role: &'static str, error: Option<String>) {
        let lease_until = if role == "owner" {
            self.lease.as_ref().and_then(|(_, l)| *l.borrow())
        } else {
            None
        };
        self.spec.status.send_replace(Status {
            role,
            owner: self.owner.clone(),
            lease_until,
            revision: self.rev,
            error,
        });
    }

    /// True while this instance may call the token endpoint.
    fn is_owner(&self) -> bool {
        let guard = Duration::from_millis(self.spec.settings.lease_secs * 1000 / 3);
        self.owner.as_deref() == Some(self.spec.settings.name.as_str())
            && self
                .lease
                .as_ref()
                .and_then(|(_, l)| *l.borrow())
                .is_some_and(|until| until > Instant::now() + guard)
    }

    fn role(&self) -> &'static str {
        if self.is_owner() {
            "owner"
        } else {
            "follower"
        }
    }

    async fn session(
        &mut self,
        snapshot: &mut watch::Receiver<crate::refresh::Snapshot>,
    ) -> Result<End, SessionError> {
        let s = self.spec.settings.clone();
        let mut client = call(Client::connect(
            s.endpoints.clone(),
            Some(s.connect_options()),
        ))
        .await?;
        // Both keys and the revision to watch from, in one read.
        let resp = call(client.get(
            self.dir.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ))
        .await?;
        let header_rev = resp.header().map_or(0, |h| h.revision());
        let login = resp
            .kvs()
            .iter()
            .find(|kv| kv.key() == self.login_key.as_bytes())
            .cloned();
        self.owner = resp
            .kvs()
            .iter()
            .find(|kv| kv.key() == self.owner_key.as_bytes())
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let previous_rev = self.rev;
        self.apply(login.as_ref());
        if let Some(t) = self.unpushed.take() {
            // Our own refresh that etcd has not seen: still the newest unless someone
            // wrote since.
            if self.rev == previous_rev {
                self.push(&mut client, &t).await?;
            } else {
                tracing::warn!(profile = %self.spec.profile, "cluster: tokens refreshed while etcd was unreachable were superseded meanwhile");
            }
        }
        if self.first_read {
            self.first_read = false;
            let local = self.local_tokens().await;
            tracing::debug!(profile = %self.spec.profile, local = local.is_some(), cluster = self.value.is_some(), "cluster: first read");
            match (self.value.clone(), local) {
                // The cluster's login wins over what this host had when it started.
                (Some(v), Some(l)) if l != v => self.remember_older(l.access),
                (None, Some(l)) => {
                    self.push(&mut client, &l).await?;
                }
                _ => {}
            }
        }
        // The lease and its keep-alive task.
        let asked = Instant::now();
        let lease = call(client.lease_grant(s.lease_secs as i64, None)).await?;
        let (lease_id, ttl) = (lease.id(), lease.ttl().max(1) as u64);
        let (keeper, stream) = call(client.lease_keep_alive(lease_id)).await?;
        let (until_tx, until_rx) = watch::channel(Some(asked + Duration::from_secs(ttl)));
        let keepalive = AbortOnDrop(tokio::spawn(keep_alive(keeper, stream, ttl, until_tx)));
        self.lease = Some((lease_id, until_rx.clone()));
        let mut watch = call(
            client.watch(
                self.dir.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(header_rev + 1),
                ),
            ),
        )
        .await?;
        self.campaign(&mut client, lease_id).await?;
        self.publish(self.role(), None);
        let mut until_rx = until_rx;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let result = loop {
            tokio::select! {
                msg = call(watch.message()) => match msg {
                    Ok(Some(resp)) => {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let deleted = matches!(ev.event_type(), EventType::Delete);
                            if kv.key() == self.login_key.as_bytes() {
                                self.apply((!deleted).then_some(kv));
                            } else if kv.key() == self.owner_key.as_bytes() {
                                if deleted {
                                    self.owner = None;
                                    self.campaign(&mut client, lease_id).await?;
                                } else {
                                    self.owner = Some(String::from_utf8_lossy(kv.value()).into_owned());
                                }
                            }
                        }
                        if resp.canceled() {
                            break Err(SessionError::WatchEnded);
                        }
                        self.publish(self.role(), None);
                    }
                    Ok(None) => break Err(SessionError::WatchEnded),
                    // A quiet key: the watch has no progress to report.
                    Err(SessionError::Timeout) => {}
                    Err(e) => break Err(e),
                },
                r = self.spec.requests.recv() => match r {
                    Some(r) => {
                        let outcome = self.refresh(&mut client, r).await;
                        self.publish(self.role(), None);
                        if let Err(e) = outcome { break Err(e) }
                    }
                    None => break Ok(End::Stop),
                },
                c = snapshot.changed() => {
                    if c.is_err() { break Ok(End::Stop) }
                    let token = snapshot.borrow_and_update().token.clone();
                    if let Err(e) = self.local_changed(&mut client, token).await { break Err(e) }
                },
                c = until_rx.changed() => {
                    if c.is_err() || until_rx.borrow().is_none() { break Err(SessionError::LeaseLost) }
                },
                _ = tick.tick() => {
                    let was_owner = self.spec.status.borrow().role == "owner";
                    if let Some(until) = *until_rx.borrow() {
                        if until <= Instant::now() { break Err(SessionError::LeaseLost) }
                    }
                    let role = self.role();
                    if role == "owner" && !was_owner {
                        // Taking over: the login task may be backing off from earlier refusals.
                        self.spec.handle.nudge();
                    }
                    self.publish(role, None);
                }
            }
        };
        drop(keepalive);
        if matches!(result, Ok(End::Stop)) {
            // Hand over at once instead of after the lease runs out.
            let _ = tokio::time::timeout(CALL, client.lease_revoke(lease_id)).await;
        }
        result
    }

    /// Takes the owner key when it is free.
    async fn campaign(&mut self, client: &mut Client, lease_id: i64) -> Result<(), SessionError> {
        let name = self.spec.settings.name.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.owner_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.owner_key.as_str(),
                name.as_str(),
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else([TxnOp::get(self.owner_key.as_str(), None)]);
        let resp = call(client.txn(txn)).await?;
        if resp.succeeded() {
            tracing::info!(profile = %self.spec.profile, instance = %name, "cluster: this instance now owns the login's refresh");
            self.owner = Some(name);
            self.spec.handle.nudge();
        } else {
            self.owner = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
        }
        Ok(())
    }

    fn remember_older(&mut self, access: Secret) {
        if !self.older.contains(&access) {
            self.older.push_back(access);
            if self.older.len() > OLDER_KEPT {
                self.older.pop_front();
            }
        }
    }

    /// Takes the login's value at a newer revision and installs it locally.
    fn apply(&mut self, kv: Option<&KeyValue>) {
        let Some(kv) = kv else {
            self.rev = 0;
            return;
        };
        if kv.mod_revision() <= self.rev {
            return;
        }
        self.rev = kv.mod_revision();
        match self.spec.settings.sealer.open(&self.login_key, kv.value()) {
            Ok(t) => {
                if self.value.as_ref() == Some(&t) {
                    return;
                }
                if let Some(old) = self.value.replace(t.clone()) {
                    self.remember_older(old.access);
                }
                self.install_local(t);
            }
            Err(e) => {
                tracing::error!(profile = %self.spec.profile, error = %e, "cluster: ignoring a value that does not open");
                self.publish(self.role(), Some(e.to_string()));
            }
        }
    }

    /// Hands tokens from etcd to the local login task, in order, without waiting for it
    /// (it may be waiting for this task).
    fn install_local(&self, t: Tokens) {
        if self.spec.handle.snapshot().token.as_ref() == Some(&t.access) {
            return;
        }
        match self.spec.handle.queue_install(t) {
            Ok(done) => {
                let profile = self.spec.profile.clone();
                tokio::spawn(async move {
                    if let Ok(Err(e)) = done.await {
                        tracing::warn!(profile = %profile, error = %e, "cluster: cannot write the cluster's tokens locally");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(profile = %self.spec.profile, error = %e, "cluster: login task stopped")
            }
        }
    }

    async fn local_tokens(&self) -> Option<Tokens> {
        let source = self.spec.source.clone();
        tokio::task::spawn_blocking(move || source.read())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// The local login changed: tokens nobody in the cluster has seen (Claude Code
    /// refreshed on this host, or a new login) go into etcd.
    async fn local_changed(
        &mut self,
        client: &mut Client,
        token: Option<Secret>,
    ) -> Result<(), SessionError> {
        let Some(token) = token else { return Ok(()) };
        if self.value.as_ref().map(|v| &v.access) == Some(&token) || self.older.contains(&token) {
            return Ok(());
        }
        match self.local_tokens().await {
            Some(t) if t.access == token => {
                tracing::info!(profile = %self.spec.profile, "cluster: sharing tokens that appeared on this host");
                self.push(client, &t).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Writes `t` if the login is still at `self.rev`; otherwise takes the newer value.
    /// Returns whether `t` was written.
    async fn push(&mut self, client: &mut Client, t: &Tokens) -> Result<bool, SessionError> {
        let sealed = self.spec.settings.sealer.seal(&self.login_key, t);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.login_key.as_str(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then([
                TxnOp::put(self.login_key.as_str(), sealed, None),
                TxnOp::delete(self.spending_key.as_str(), None),
            ])
            .or_else([TxnOp::get(self.login_key.as_str(), None)]);
        let resp = call(client.txn(txn)).await?;
        if resp.succeeded() {
            self.rev = resp.header().map_or(self.rev, |h| h.revision());
            if let Some(old) = self.value.replace(t.clone()) {
                self.remember_older(old.access);
            }
            return Ok(true);
        }
        let newer = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        tracing::info!(profile = %self.spec.profile, "cluster: the login changed in etcd first; taking the newer value");
        self.apply(newer.as_ref());
        Ok(false)
    }

    /// A refresh asked for by the login task.
    async fn refresh(&mut self, client: &mut Client, req: Request) -> Result<(), SessionError> {
        let Request {
            current,
            endpoint,
            reply,
        } = req;
        // The linearizable read that fences the call: nobody wrote since our revision.
        let resp = call(client.get(self.login_key.as_str(), None)).await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(RefreshError::transient(format!(
                    "cluster: cannot reach etcd ({e}); not refreshing"
                ))));
                return Err(e);
            }
        };
        self.apply(resp.kvs().first());
        if let Some(v) = self.value.clone() {
            if v != current {
                if self.older.contains(&current.access) {
                    // The cluster is ahead of the login task: that is the "refresh".
                    let _ = reply.send(Ok(v));
                    return Ok(());
                }
                // Tokens only this host has: share them first.
                if !self.push(client, &current).await? {
                    let answer = self.value.clone().ok_or_else(|| {
                        RefreshError::transient("cluster: the login changed in etcd")
                    });
                    let _ = reply.send(answer);
                    return Ok(());
                }
            }
        } else if !self.push(client, &current).await? {
            let _ = reply.send(Err(RefreshError::transient(
                "cluster: the login changed in etcd",
            )));
            return Ok(());
        }
        if !self.is_owner() {
            let owner = self.owner.as_deref().unwrap_or("no instance yet");
            let _ = reply.send(Err(RefreshError::Transient {
                why: format!("cluster follower: {owner} refreshes this login"),
                retry_after: Some(FOLLOWER_RETRY),
            }));
            return Ok(());
        }
        if let Some(why) = self.spent_elsewhere(client, &current).await? {
            let _ = reply.send(Err(RefreshError::Transient {
                why,
                retry_after: Some(FOLLOWER_RETRY),
            }));
            return Ok(());
        }
        if !self.mark_spending(client, &current).await? {
            let _ = reply.send(Err(RefreshError::transient(
                "cluster: the login changed in etcd",
            )));
            return Ok(());
        }
        let limit = crate::refresh::late_limit(Duration::from_secs(30));
        let answer = match tokio::time::timeout(limit, endpoint.refresh(&current)).await {
            Ok(a) => a,
            Err(_) => Err(RefreshError::transient("token endpoint did not answer")),
        };
        let new = match answer {
            Ok(new) => new,
            Err(e) => {
                // A refused token is spent for everyone: nothing left to wait for. After
                // any other failure the token may or may not have been spent (a lost
                // answer), so the intent stays; this owner may still retry it.
                if matches!(e, RefreshError::Dead(_)) {
                    let _ = self.clear_spending(client).await;
                }
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        match self.push(client, &new).await {
            Ok(true) => {
                tracing::info!(profile = %self.spec.profile, revision = self.rev, "cluster: refreshed and shared");
                let _ = reply.send(Ok(new));
                Ok(())
            }
            Ok(false) => {
                // The fence: someone wrote a newer login while we refreshed (we were paused
                // past our lease). Keep theirs.
                tracing::warn!(profile = %self.spec.profile, "cluster: lost ownership during a refresh; keeping the newer login from etcd");
                let answer = self
                    .value
                    .clone()
                    .ok_or_else(|| RefreshError::transient("cluster: the login changed in etcd"));
                let _ = reply.send(answer);
                Ok(())
            }
            Err(e) => {
                // The only copy of the rotated login: serve it, and write it when etcd is back.
                self.unpushed = Some(new.clone());
                let _ = reply.send(Ok(new));
                Err(e)
            }
        }
    }
}

impl Task {
    /// Why this owner must not spend `current`'s refresh token now: another instance
    /// wrote an intent to spend exactly it, recently, and its result is not in etcd.
    async fn spent_elsewhere(
        &self,
        client: &mut Client,
        current: &Tokens,
    ) -> Result<Option<String>, SessionError> {
        let resp = call(client.get(self.spending_key.as_str(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let Some((who, at_ms, sealed)) = split_intent(kv.value()) else {
            return Ok(None);
        };
        if who == self.spec.settings.name {
            // Our own (an earlier call that never answered): the refresh engine's own
            // rules for late answers apply, as on a single host.
            return Ok(None);
        }
        let Ok(spending) = self.spec.settings.sealer.open(&self.spending_key, sealed) else {
            return Ok(None);
        };
        if spending.refresh != current.refresh {
            return Ok(None);
        }
        let wait = Duration::from_secs(self.spec.settings.lease_secs.saturating_mul(INTENT_LEASES))
            .max(MIN_INTENT_WAIT);
        let age = Duration::from_millis(unix_ms().saturating_sub(at_ms));
        if age >= wait {
            tracing::warn!(profile = %self.spec.profile, instance = %who, "cluster: an earlier owner never wrote the result of its refresh; refreshing anyway");
            return Ok(None);
        }
        Ok(Some(format!(
            "cluster: {who} refreshed this login {}s ago and has not written the result to etcd yet; waiting for it (at most {}s) rather than spending the same refresh token twice",
            age.as_secs(),
            wait.as_secs()
        )))
    }

    /// Writes this owner's intent to spend `current`'s refresh token, fenced like the
    /// write of the result. False: the login changed in etcd meanwhile.
    async fn mark_spending(
        &mut self,
        client: &mut Client,
        current: &Tokens,
    ) -> Result<bool, SessionError> {
        let mut value = format!("{}\n{}\n", self.spec.settings.name, unix_ms()).into_bytes();
        value.extend(self.spec.settings.sealer.seal(&self.spending_key, current));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.login_key.as_str(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then([TxnOp::put(self.spending_key.as_str(), value, None)]);
        Ok(call(client.txn(txn)).await?.succeeded())
    }

    /// Removes this owner's intent after a refresh that spent nothing.
    async fn clear_spending(&mut self, client: &mut Client) -> Result<(), SessionError> {
        call(client.delete(self.spending_key.as_str(), None)).await?;
        Ok(())
    }
}

/// `name \n unix_ms \n sealed tokens`.
fn split_intent(v: &[u8]) -> Option<(&str, u64, &[u8])> {
    let first = v.iter().position(|&b| b == b'\n')?;
    let (name, rest) = (&v[..first], &v[first + 1..]);
    let second = rest.iter().position(|&b| b == b'\n')?;
    let (at, sealed) = (&rest[..second], &rest[second + 1..]);
    let name = std::str::from_utf8(name).ok()?;
    let at = std::str::from_utf8(at).ok()?.parse().ok()?;
    Some((name, at, sealed))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Keeps the lease alive at a third of its TTL and publishes when it runs out (`None`
/// once it is lost).
async fn keep_alive(
    mut keeper: etcd_client::LeaseKeeper,
    mut stream: etcd_client::LeaseKeepAliveStream,
    ttl: u64,
    until: watch::Sender<Option<Instant>>,
) {
    let every = Duration::from_millis(ttl * 1000 / 3).max(Duration::from_millis(300));
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        if call(keeper.keep_alive()).await.is_err() {
            break;
        }
        match call(stream.message()).await {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                until.send_replace(Some(sent + Duration::from_secs(resp.ttl() as u64)));
            }
            _ => break,
        }
        // After a pause (SIGSTOP) the lease may have run out before the answer came.
        if until.borrow().is_some_and(|u| u <= Instant::now()) {
            break;
        }
    }
    until.send_replace(None);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_split_into_owner_time_and_sealed_tokens() {
        let v = b"node1\n1700000000123\n\x00\x01sealed\nbytes";
        let (who, at, sealed) = split_intent(v).unwrap();
        assert_eq!((who, at), ("node1", 1_700_000_000_123));
        assert_eq!(sealed, b"\x00\x01sealed\nbytes");
        assert!(split_intent(b"node1").is_none());
        assert!(split_intent(b"node1\nnot-a-number\nx").is_none());
        assert!(split_intent(b"\xff\xfe\n1\nx").is_none());
    }
}
