//! A client-side token cache: one in-process lookup instead of a round trip per request.
//!
//! The cache keeps each profile's token until it is within `min_valid_secs` of expiry and
//! drops it as soon as an `event` for the profile (`token.rotated`, `profile.state`) is read
//! from its own subscription. The daemon publishes a new token before it announces it, so a
//! request sent after the event was read gets the new token; the cache makes sure nobody gets
//! an older one after that point:
//!
//! - the event is handled by the connection's reader as it is read, before any answer that
//!   followed it on the socket reaches its caller;
//! - every profile has a generation, bumped by each of its events; a fetch whose generation
//!   changed while it was in flight is thrown away and its callers ask again;
//! - tokens are fetched over the subscribed connection, so a token answered on it was answered
//!   while the subscription was live; if that connection dies the whole cache is dropped and
//!   the next miss subscribes again before it asks.
//!
//! Concurrent misses of one profile share one request.

use crate::connection::Connection;
use crate::{Client, Error};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use llmd_proto::methods::{event_kinds, names, Event, SubscribeParams, TokenParams, TokenResult};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

/// How many times one call asks again because the token rotated while it was asking.
const MAX_ATTEMPTS: u32 = 8;

type FetchResult = Result<Option<Arc<TokenResult>>, Arc<Error>>;
type Fetch = Shared<BoxFuture<'static, FetchResult>>;

/// Caches the tokens of any number of profiles; cheap to clone (clones share the cache).
///
/// ```no_run
/// # async fn demo() -> Result<(), llmd_client::Error> {
/// let client = llmd_client::Client::connect().await?;
/// let cache = client.token_cache(60);
/// let tok = cache.token("claude").await?; // a round trip the first time only
/// println!("{} header(s)", tok.headers.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Handle>,
}

/// Dropped with the last clone of the cache: drops the in-flight fetches, which hold the
/// cache themselves.
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.sub = None;
        st.drop_all();
    }
}

impl std::ops::Deref for Handle {
    type Target = Arc<Inner>;
    fn deref(&self) -> &Arc<Inner> {
        &self.0
    }
}

struct Inner {
    client: Client,
    min_valid_secs: u64,
    state: Mutex<State>,
    /// Serializes (re)subscribing, so concurrent misses do not subscribe twice.
    subscribing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The connection whose subscription is live; tokens are only cached while it is.
    sub: Option<Arc<Connection>>,
    entries: HashMap<String, Entry>,
    /// Source of generations: each new value is used once, so an entry dropped and created
    /// again never repeats a generation an in-flight fetch remembers.
    counter: u64,
}

struct Entry {
    gen: u64,
    token: Option<Arc<TokenResult>>,
    fetch: Option<Fetch>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether `t` stays valid `min_valid` more seconds (the daemon's own rule).
fn fresh(t: &TokenResult, min_valid: u64) -> bool {
    match t.expires_at {
        None => true,
        Some(e) => e.saturating_sub(now_secs()) >= min_valid.min(i64::MAX as u64) as i64,
    }
}

impl State {
    fn next_gen(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Forgets every token and in-flight fetch (the subscription ended, or an event could
    /// not be read).
    fn drop_all(&mut self) {
        self.entries.clear();
        self.counter += 1;
    }

    fn invalidate(&mut self, profile: &str) {
        let gen = self.next_gen();
        if let Some(e) = self.entries.get_mut(profile) {
            e.gen = gen;
            e.token = None;
            e.fetch = None;
        }
    }

    /// The subscribed connection, if it is still alive; a dead one drops the cache.
    fn live_sub(&mut self) -> Option<&Arc<Connection>> {
        if self.sub.as_ref().is_some_and(|c| !c.is_alive()) {
            self.sub = None;
            self.drop_all();
        }
        self.sub.as_ref()
    }
}

impl TokenCache {
    /// A cache that subscribes and asks over `client`'s connection, serving tokens that stay
    /// valid at least `min_valid_secs` more seconds. Any `event` read on that connection
    /// (also one of another subscription there) drops the token of its profile.
    pub fn new(client: Client, min_valid_secs: u64) -> TokenCache {
        TokenCache {
            inner: Arc::new(Handle(Arc::new(Inner {
                client,
                min_valid_secs,
                state: Mutex::new(State::default()),
                subscribing: tokio::sync::Mutex::new(()),
            }))),
        }
    }

    /// The profile's token: from the cache when it holds one valid for `min_valid_secs`,
    /// else from the daemon (one request for all concurrent callers of the profile).
    pub async fn token(&self, profile: &str) -> Result<Arc<TokenResult>, Error> {
        if let Some(t) = self.cached(profile) {
            return Ok(t);
        }
        for _ in 0..MAX_ATTEMPTS {
            let fetch = {
                let mut st = lock(&self.inner.state);
                st.live_sub();
                let State {
                    entries, counter, ..
                } = &mut *st;
                let entry = entries.entry(profile.to_owned()).or_insert_with(|| {
                    *counter += 1;
                    Entry {
                        gen: *counter,
                        token: None,
                        fetch: None,
                    }
                });
                if let Some(t) = &entry.token {
                    if fresh(t, self.inner.min_valid_secs) {
                        return Ok(t.clone());
                    }
                    entry.token = None;
                }
                match &entry.fetch {
                    Some(f) => f.clone(),
                    None => {
                        let f = fetch(Arc::clone(&self.inner), profile.to_owned(), entry.gen)
                            .boxed()
                            .shared();
                        entry.fetch = Some(f.clone());
                        f
                    }
                }
            };
            match fetch.await {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => continue,
                Err(e) => return Err(clone_error(&e)),
            }
        }
        Err(Error::Protocol(format!(
            "the token of `{profile}` was replaced {MAX_ATTEMPTS} times while it was being asked for"
        )))
    }

    /// The cached token of `profile` if there is a valid one, without asking the daemon.
    pub fn cached(&self, profile: &str) -> Option<Arc<TokenResult>> {
        let mut st = lock(&self.inner.state);
        st.live_sub()?;
        let t = st.entries.get(profile)?.token.as_ref()?;
        fresh(t, self.inner.min_valid_secs).then(|| t.clone())
    }

    /// Forgets every cached token.
    pub fn clear(&self) {
        lock(&self.inner.state).drop_all();
    }
}

/// One request for `profile`'s token, made for the entry at generation `gen`. `Ok(None)`:
/// the profile's token changed while it was asked for (or the subscription ended), so the
/// answer must not be used; ask again.
async fn fetch(inner: Arc<Inner>, profile: String, gen: u64) -> FetchResult {
    let answer = ask(&inner, &profile).await;
    let mut st = lock(&inner.state);
    let Some(entry) = st.entries.get_mut(&profile) else {
        return Ok(None);
    };
    if entry.gen != gen {
        return Ok(None);
    }
    entry.fetch = None;
    match answer {
        Ok(t) => {
            let t = Arc::new(t);
            entry.token = Some(t.clone());
            Ok(Some(t))
        }
        // The connection died under the request: the next attempt subscribes again.
        Err(Error::Disconnected) => Ok(None),
        Err(e) => Err(Arc::new(e)),
    }
}

/// Asks for the token over the subscribed connection, subscribing first if needed.
async fn ask(inner: &Arc<Inner>, profile: &str) -> Result<TokenResult, Error> {
    let conn = subscribed(inner).await?;
    let params = serde_json::value::to_raw_value(&TokenParams {
        profile: profile.to_owned(),
        min_valid_secs: Some(inner.min_valid_secs),
    })
    .map_err(|e| Error::Protocol(e.to_string()))?;
    let raw = conn.call(names::TOKEN, &params).await?;
    serde_json::from_str(raw.get())
        .map_err(|e| Error::Protocol(format!("unexpected `token` result: {e}")))
}

/// The live subscribed connection, subscribing on the client's connection if there is none.
async fn subscribed(inner: &Arc<Inner>) -> Result<Arc<Connection>, Error> {
    let _one = inner.subscribing.lock().await;
    if let Some(c) = lock(&inner.state).live_sub() {
        return Ok(c.clone());
    }
    let conn = inner.client.connection().await?;
    let weak: Weak<Inner> = Arc::downgrade(inner);
    conn.add_hook(Box::new(move |method, params| {
        if method == names::EVENT {
            on_event(&weak, params);
        }
    }));
    let params = serde_json::value::to_raw_value(&SubscribeParams { events: Vec::new() })
        .map_err(|e| Error::Protocol(e.to_string()))?;
    conn.call(names::SUBSCRIBE, &params).await?;
    // Whenever the last subscription ended, the cache was dropped with it (`live_sub`).
    lock(&inner.state).sub = Some(conn.clone());
    Ok(conn)
}

/// Runs on the connection's reader as the event is read.
fn on_event(inner: &Weak<Inner>, params: &RawValue) {
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let mut st = lock(&inner.state);
    match serde_json::from_str::<Event>(params.get()) {
        // A subscriber that fell behind may have missed a rotation of any profile.
        Ok(e) if e.kind == event_kinds::EVENTS_LOST => st.drop_all(),
        Ok(e) => st.invalidate(&e.profile),
        // An event that cannot be read may have been about any profile.
        Err(_) => st.drop_all(),
    }
}

/// A copy of a shared error for each caller that waited on it.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::NotRunning { path, source } => Error::NotRunning {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Socket { path, source } => Error::Socket {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Disconnected => Error::Disconnected,
        Error::Rpc(r) => Error::Rpc(r.clone()),
        Error::Protocol(m) => Error::Protocol(m.clone()),
    }
}
