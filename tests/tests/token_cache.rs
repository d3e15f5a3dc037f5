//! The client's token cache against the real daemon: served without a round trip, one
//! request for concurrent misses, dropped by `token.rotated` / `profile.state` events and by
//! a lost connection, and never an answer the daemon replaced before the event was read.
//!
//! A line relay between the cache and the daemon counts the `token` requests that really
//! leave the client, and can hold back `token` answers to reorder them behind an event.

use llmd_client::{Client, TokenCache};
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::Daemon;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(10);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn bundle(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({"access_token": access, "refresh_token": refresh, "expires_at": expires_at}).to_string()
}

/// A daemon with one `oauth` profile `work` (bundle given) and one api-key profile `key`;
/// forced refreshes are not rate-limited.
fn daemon(fake: &FakeOAuth, bundle_json: &str) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 60\nrefresh_timeout_secs = 5\nforced_refresh_interval_secs = 0\n\n\
             [profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n\n\
             [profiles.key]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"CACHE_KEY\"\n",
            fake.anthropic_url()
        ))
        .env("CACHE_KEY", "sk-ant-api03-cache-env")
        .file("state/llmd/oauth/work.json", bundle_json, 0o600)
        .start()
}

/// What the relay saw and holds.
#[derive(Default)]
struct Seen {
    token_requests: AtomicU64,
    events: AtomicU64,
    /// While set, `token` answers are held back instead of forwarded.
    hold: AtomicBool,
    /// While set, empty results (the answer to `subscribe`) are held back.
    hold_empty: AtomicBool,
    held: Mutex<Vec<String>>,
    /// Lines to send to the client on the next `release`, as if the daemon had sent them.
    inject: Mutex<Vec<String>>,
    /// Woken when an answer was held or an event was forwarded.
    changed: Notify,
    /// Forward what is held.
    release: Notify,
}

impl Seen {
    async fn wait(&self, what: &str, f: impl Fn(&Seen) -> bool) {
        tokio::time::timeout(WAIT, async {
            loop {
                let woken = self.changed.notified();
                if f(self) {
                    return;
                }
                woken.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
}

/// A relay on its own socket: each connection is forwarded line by line to the daemon.
struct Relay {
    path: PathBuf,
    seen: Arc<Seen>,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(daemon_socket: &Path) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Seen::default());
        let target = daemon_socket.to_path_buf();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = UnixStream::connect(&target).await.unwrap();
                tokio::spawn(relay(client, upstream, s.clone()));
            }
        });
        Relay {
            path,
            seen,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        Client::connect_to(&self.path).await.unwrap()
    }
}

async fn relay(client: UnixStream, upstream: UnixStream, seen: Arc<Seen>) {
    let (cr, mut cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let up_seen = seen.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(cr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("\"method\":\"token\"") {
                up_seen.token_requests.fetch_add(1, Ordering::SeqCst);
            }
            if uw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(ur).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                let is_token_answer = line.contains("\"result\"") && line.contains("\"token\":\"");
                let is_empty_answer = line.contains("\"result\":{}");
                if (is_token_answer && seen.hold.load(Ordering::SeqCst))
                    || (is_empty_answer && seen.hold_empty.load(Ordering::SeqCst))
                {
                    seen.held.lock().unwrap().push(line);
                    seen.changed.notify_waiters();
                    continue;
                }
                if cw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
                if line.contains("\"method\":\"event\"") {
                    seen.events.fetch_add(1, Ordering::SeqCst);
                    seen.changed.notify_waiters();
                }
            }
            _ = seen.release.notified() => {
                let mut held: Vec<String> = std::mem::take(&mut *seen.held.lock().unwrap());
                held.append(&mut seen.inject.lock().unwrap());
                for line in held {
                    if cw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_needs_no_round_trip() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    let first = cache.token("work").await.unwrap();
    assert_eq!(first.token, access_of(0));
    let key = cache.token("key").await.unwrap();
    assert_eq!(key.token, "sk-ant-api03-cache-env");
    for _ in 0..100 {
        assert!(Arc::ptr_eq(&cache.token("work").await.unwrap(), &first));
        assert!(Arc::ptr_eq(&cache.token("key").await.unwrap(), &key));
    }
    assert_eq!(relay.seen.token_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_too_close_to_expiry_is_asked_for_again() {
    let fake = FakeOAuth::start(3600).await;
    // Valid for ~200 s: good for a cache that needs 100 s, not for one that needs 300 s
    // (the daemon refreshes for that one).
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 200));
    let relay = Relay::start(&d.socket);
    let relaxed = relay.client().await.token_cache(100);
    assert_eq!(relaxed.token("work").await.unwrap().token, access_of(0));
    assert_eq!(relaxed.token("work").await.unwrap().token, access_of(0));
    assert_eq!(relay.seen.token_requests.load(Ordering::SeqCst), 1);
    let strict = relay.client().await.token_cache(300);
    let t = strict.token("work").await.unwrap();
    assert_eq!(t.token, access_of(1));
    // The refresh it caused announces itself on the cache's own subscription, a connection
    // of its own, so the event may come before the answer (the cache then asks once more)
    // or after it (it then drops the new token too, and the next call asks once more).
    // Either way only the new token is served, for at most one request more.
    let asked = relay.seen.token_requests.load(Ordering::SeqCst);
    assert!((2..=3).contains(&asked), "{asked} requests");
    for _ in 0..3 {
        assert_eq!(strict.token("work").await.unwrap().token, access_of(1));
    }
    let now_asked = relay.seen.token_requests.load(Ordering::SeqCst);
    assert!(now_asked <= asked + 1, "{now_asked} requests after {asked}");
}

async fn two_hundred_at_once(cache: &TokenCache) -> Arc<llmd_client::proto::methods::TokenResult> {
    let calls = (0..200).map(|_| {
        let c = cache.clone();
        async move { c.token("work").await }
    });
    let results = futures_util::future::join_all(calls).await;
    let first = results[0].as_ref().unwrap().clone();
    for r in &results {
        assert!(Arc::ptr_eq(r.as_ref().unwrap(), &first));
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_request() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    assert_eq!(two_hundred_at_once(&cache).await.token, access_of(0));
    assert_eq!(relay.seen.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_at_expiry_share_the_refresh() {
    let fake = FakeOAuth::start(3600).await;
    // Expired: the request waits for a slow refresh, so all callers miss together.
    fake.state().delay = Duration::from_millis(300);
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() - 5));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    assert_eq!(two_hundred_at_once(&cache).await.token, access_of(1));
    // One request, and one shared retry if the rotation's event overtook its answer.
    let asked = relay.seen.token_requests.load(Ordering::SeqCst);
    assert!((1..=2).contains(&asked), "{asked} requests");
    assert_eq!(fake.refresh_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_event_drops_the_token_before_anyone_can_get_it_again() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let client = d.client().await;
    let cache = client.token_cache(60);
    assert_eq!(cache.token("work").await.unwrap().token, access_of(0));
    // Listeners on the cache's connection hear an event only after the cache handled it.
    let mut events = client.subscribe(&["token.rotated"]).await.unwrap();
    let other = d.client().await;
    for generation in 1..=5 {
        let fresh = other.refresh("work").await.unwrap();
        assert_eq!(fresh.token, access_of(generation));
        // The connection carries the cache's subscription too: every event comes twice, and
        // copies of the last rotation's may still be queued.
        loop {
            let ev = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("token.rotated event")
                .unwrap();
            if ev.kind == "token.rotated" && ev.expires_at == fresh.expires_at {
                assert_eq!(ev.profile, "work");
                break;
            }
        }
        assert!(cache.cached("work").is_none(), "dropped by the event");
        assert_eq!(cache.token("work").await.unwrap().token, fresh.token);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_state_event_drops_the_token() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let client = d.client().await;
    let cache = client.token_cache(60);
    assert_eq!(
        cache.token("key").await.unwrap().token,
        "sk-ant-api03-cache-env"
    );
    let mut events = client.subscribe(&["profile.state"]).await.unwrap();
    d.client()
        .await
        .set_api_key("key", "sk-ant-api03-cache-stored")
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("profile.state event")
            .unwrap();
        if ev.kind == "profile.state" && ev.profile == "key" {
            break;
        }
    }
    assert_eq!(
        cache.token("key").await.unwrap().token,
        "sk-ant-api03-cache-stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_overtaken_by_its_rotation_event_is_not_served() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    // Subscribe (and cache the key) before the race is staged.
    cache.token("key").await.unwrap();
    relay.seen.hold.store(true, Ordering::SeqCst);
    let asking = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token("work").await }
    });
    relay
        .seen
        .wait("the old answer to be held", |s| {
            s.held.lock().unwrap().len() == 1
        })
        .await;
    // The daemon replaces the token while that answer is on its way: the event reaches the
    // client first, then the stale answer.
    let events_before = relay.seen.events.load(Ordering::SeqCst);
    let fresh = d.client().await.refresh("work").await.unwrap();
    assert_eq!(fresh.token, access_of(1));
    relay
        .seen
        .wait("the rotation event", |s| {
            s.events.load(Ordering::SeqCst) > events_before
        })
        .await;
    relay.seen.hold.store(false, Ordering::SeqCst);
    relay.seen.release.notify_one();
    let got = tokio::time::timeout(WAIT, asking)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(got.token, access_of(1), "the replaced token was served");
    assert_eq!(cache.token("work").await.unwrap().token, access_of(1));
    // The stale answer was dropped and asked for again.
    assert_eq!(relay.seen.token_requests.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_drops_the_cache() {
    let fake = FakeOAuth::start(3600).await;
    let mut d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let cache = d.client().await.token_cache(60);
    assert_eq!(cache.token("work").await.unwrap().token, access_of(0));
    assert!(cache.cached("work").is_some());
    // Events sent while no connection exists are never seen: nothing from before may stay.
    d.restart();
    tokio::time::timeout(WAIT, async {
        while cache.cached("work").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the cache is dropped with its connection");
    assert_eq!(cache.token("work").await.unwrap().token, access_of(0));
    assert!(cache.cached("work").is_some());
}

/// The daemon tells a subscriber that fell behind its event bus with `events.lost`
/// (daemon/src/handlers/subscribe.rs, unit-tested there): a skipped `token.rotated` may have
/// been about any profile, so every cached token goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_drop_every_cached_token() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    cache.token("key").await.unwrap();
    cache.token("work").await.unwrap();
    assert!(cache.cached("key").is_some() && cache.cached("work").is_some());
    relay.seen.inject.lock().unwrap().push(
        r#"{"jsonrpc":"2.0","method":"event","params":{"kind":"events.lost","profile":"","skipped":3}}"#
            .to_string(),
    );
    relay.seen.release.notify_one();
    tokio::time::timeout(WAIT, async {
        while cache.cached("key").is_some() || cache.cached("work").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("events.lost drops every cached token");
    assert_eq!(cache.token("work").await.unwrap().token, access_of(0));
    assert_eq!(relay.seen.token_requests.load(Ordering::SeqCst), 3);
}

/// A caller that gives up while the cache is subscribing (its own timeout) must not leave
/// the subscription half done for everyone: the fetch it started goes on by itself, and
/// other profiles' misses are answered. (It was a future only its callers polled, parked
/// holding the subscribe lock, and every later miss of any profile waited on it for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_while_subscribing_blocks_nobody() {
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake, &bundle(&access_of(0), &refresh_of(0), now() + 3600));
    let relay = Relay::start(&d.socket);
    let cache = relay.client().await.token_cache(60);
    relay.seen.hold_empty.store(true, Ordering::SeqCst);
    let gave_up = tokio::time::timeout(Duration::from_millis(300), cache.token("work")).await;
    assert!(gave_up.is_err(), "the subscribe answer was held back");
    assert_eq!(relay.seen.held.lock().unwrap().len(), 1);
    relay.seen.hold_empty.store(false, Ordering::SeqCst);
    relay.seen.release.notify_one();
    let key = tokio::time::timeout(WAIT, cache.token("key"))
        .await
        .expect("another profile's miss is answered")
        .unwrap();
    assert_eq!(key.token, "sk-ant-api03-cache-env");
    let work = tokio::time::timeout(WAIT, cache.token("work"))
        .await
        .expect("the abandoned profile is answered too")
        .unwrap();
    assert_eq!(work.token, access_of(0));
}
