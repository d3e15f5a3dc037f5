//! The `token` fast path (answered by the connection's reader, written by it when the socket
//! is free): pipelined requests all get exactly one well-formed answer each, mixed with
//! answers of requests that wait, and an id still in flight is refused there too.

use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth, Mode};
use llmd_tests::raw::Raw;
use llmd_tests::Daemon;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn daemon(fake: &FakeOAuth) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 60\nrefresh_timeout_secs = 5\nforced_refresh_interval_secs = 0\n\n\
             [profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n\n\
             [profiles.key]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"HOT_KEY\"\n",
            fake.anthropic_url()
        ))
        .env("HOT_KEY", "sk-ant-api03-hot-path")
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 1000}).to_string(),
            0o600,
        )
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_token_calls_each_get_one_whole_answer() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(200);
    let d = daemon(&fake);
    let mut raw = Raw::connect(&d.socket).await;
    // One write: 300 answers given at once, and every 50th one waiting for a refresh (the
    // login's token has 1,000 s left, these ask for 2,000 s), answered later by its task.
    let mut batch = String::new();
    for id in 0..300 {
        let params = match id % 50 {
            0 => json!({"profile": "work", "min_valid_secs": 2000}),
            1 => json!({"profile": "nope"}),
            n if n % 2 == 0 => json!({"profile": "key"}),
            _ => json!({"profile": "work"}),
        };
        batch.push_str(
            &json!({"jsonrpc": "2.0", "id": id, "method": "token", "params": params}).to_string(),
        );
        batch.push('\n');
    }
    raw.send(batch.as_bytes()).await;
    let mut seen = BTreeMap::new();
    for _ in 0..300 {
        let v = raw.recv().await.expect("an answer");
        let id = v["id"].as_i64().expect("numeric id");
        assert!(seen.insert(id, v).is_none(), "two answers for id {id}");
    }
    for (id, v) in &seen {
        match id % 50 {
            0 => assert_eq!(v["result"]["token"], access_of(1), "{v}"),
            1 => assert_eq!(v["error"]["data"]["kind"], "unknown_profile", "{v}"),
            n if n % 2 == 0 => assert_eq!(v["result"]["token"], "sk-ant-api03-hot-path"),
            _ => {
                let t = v["result"]["token"].as_str().expect("a token");
                assert!(t == access_of(0) || t == access_of(1), "{v}");
            }
        }
    }
    assert_eq!(fake.refresh_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_still_in_flight_is_refused_on_the_fast_path_too() {
    let fake = FakeOAuth::start(3600).await;
    fake.set_mode(Mode::Hang);
    let d = daemon(&fake);
    let mut raw = Raw::connect(&d.socket).await;
    // Waits for a refresh that does not come back before the refresh timeout.
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 7, "method": "token", "params": {"profile": "work", "min_valid_secs": 2000}})
        )
        .as_bytes(),
    )
    .await;
    // Same id, a token that is ready at once.
    let v = raw.call(7, "token", json!({"profile": "key"})).await;
    assert_eq!(v["id"], 7);
    assert_eq!(v["error"]["data"]["kind"], "invalid_request", "{v}");
    assert!(v.get("result").is_none());
    // A fresh id is answered at once while the first still waits.
    let v = raw.call(8, "token", json!({"profile": "key"})).await;
    assert_eq!(v["result"]["token"], "sk-ant-api03-hot-path");
}

/// Readers on the fast path and a login task publishing new tokens, at once, many times.
/// The reader once held the login's snapshot while it took it again to build a new answer;
/// with the login task's write waiting between the two, the daemon deadlocked for good
/// (found by shared_login.rs hanging in CI). Every call here must be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_readers_and_rotations_never_deadlock() {
    const ROTATIONS: usize = 400;
    let fake = FakeOAuth::start(3600).await;
    let d = daemon(&fake);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..6 {
        let c = d.client().await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::timeout(Duration::from_secs(10), c.token("work", None))
                    .await
                    .expect("the daemon stopped answering `token`")
                    .expect("a token");
                n += 1;
            }
            n
        }));
    }
    let c = d.client().await;
    for i in 0..ROTATIONS {
        let t = tokio::time::timeout(Duration::from_secs(10), c.refresh("work"))
            .await
            .unwrap_or_else(|_| panic!("the daemon stopped answering `refresh` after {i}"))
            .expect("a refresh");
        assert_eq!(t.token, access_of(i as u64 + 1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for r in readers {
        served += r.await.expect("a reader");
    }
    assert!(served > 0);
    assert_eq!(fake.invalid_grants(), 0);
}
