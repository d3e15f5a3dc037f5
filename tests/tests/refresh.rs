//! The credential engine: OAuth refresh rules, file watching, Claude Code interop, secrets.

use llmd_proto::methods::ProfileState;
use llmd_proto::ErrorKind;
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth, Mode};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn bundle(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({"access_token": access, "refresh_token": refresh, "expires_at": expires_at, "account_email": "dev@example.com"}).to_string()
}

fn claude_creds(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({
        "claudeAiOauth": {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": expires_at * 1000,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
            "rateLimitTier": "default_claude_max_20x"
        },
        "mcpOAuth": {"server-a": {"accessToken": "mcp-keep-me"}}
    })
    .to_string()
}

fn oauth_config(fake: &FakeOAuth, margin: u64) -> String {
    format!(
        "[daemon]\nrefresh_margin_secs = {margin}\nrefresh_timeout_secs = 2\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
        fake.anthropic_url()
    )
}

/// A daemon with one `oauth` profile `work` whose bundle holds `bundle_json`.
fn work_daemon(fake: &FakeOAuth, margin: u64, bundle_json: &str) -> Daemon {
    Daemon::builder()
        .config(&oauth_config(fake, margin))
        .file("state/llmd/oauth/work.json", bundle_json, 0o600)
        .start()
}

/// A daemon with one `claude-cli` profile `claude` whose credentials file holds `creds`.
fn claude_daemon(fake: &FakeOAuth, creds: &str) -> Daemon {
    Daemon::builder()
        .config(&claude_config(fake, 60))
        .file(".claude/.credentials.json", creds, 0o600)
        .start()
}

fn claude_config(fake: &FakeOAuth, margin: u64) -> String {
    format!(
        "[daemon]\nrefresh_margin_secs = {margin}\nrefresh_timeout_secs = 2\n\n[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\ntoken_endpoint = \"{}\"\n",
        fake.anthropic_url()
    )
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `profile` serves once it equals `want` (polling for up to about 3 s), else the last
/// token seen, for changes the daemon picks up asynchronously.
async fn served_eventually(c: &llmd_client::Client, profile: &str, want: &str) -> String {
    let mut last = String::new();
    for _ in 0..150 {
        if let Ok(t) = c.token(profile, None).await {
            last = t.token;
            if last == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// No token, refresh token or key may appear in the daemon's logs.
fn assert_no_secrets(d: &Daemon) {
    let logs = d.logs();
    for needle in [
        "fakeaccess",
        "fakerefresh",
        "sk-ant-api03",
        "mcp-keep-me",
        "sk-ant-oat01-setup",
    ] {
        assert!(
            !logs.contains(needle),
            "secret `{needle}` leaked into the logs:\n{logs}"
        );
    }
}

/// Replaces a file the way Claude Code does: write a temp file, rename over the target.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-writer");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_callers_at_expiry_cause_one_refresh() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(300);
    let d = work_daemon(&fake, 60, &bundle(&access_of(0), &refresh_of(0), now() - 5));
    let clients = [
        d.client().await,
        d.client().await,
        d.client().await,
        d.client().await,
    ];
    let calls = (0..500).map(|i| {
        let c = clients[i % 4].clone();
        async move { c.token("work", None).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for r in &results {
        let t = r.as_ref().expect("every caller gets a token");
        assert_eq!(t.token, access_of(1));
        assert_eq!(
            t.headers["authorization"],
            format!("Bearer {}", access_of(1))
        );
        assert_eq!(t.headers["anthropic-beta"], "oauth-2025-04-20");
    }
    assert_eq!(fake.refresh_calls(), 1, "exactly one upstream refresh");
    assert_eq!(fake.invalid_grants(), 0);
    // Persisted, private, with the other fields kept.
    let path = d.home.join("state/llmd/oauth/work.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["refresh_token"], refresh_of(1));
    assert_eq!(v["account_email"], "dev@example.com");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let body = &fake.state().requests[0];
    assert_eq!(body.0["grant_type"], "refresh_token");
    assert_eq!(body.0["client_id"], "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
    assert!(body.1.starts_with("llmd/"), "user-agent {}", body.1);
    assert_no_secrets(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_refresh_happens_before_expiry_without_callers_waiting() {
    let fake = FakeOAuth::start(3600).await;
    let old_expiry = now() + 6;
    let d = work_daemon(&fake, 3, &bundle(&access_of(0), &refresh_of(0), old_expiry));
    let c = d.client().await;
    // Still valid: answered from the current token, no upstream call.
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(0));
    assert_eq!(fake.refresh_calls(), 0);
    wait_for("proactive refresh", Duration::from_secs(10), || {
        fake.refresh_calls() == 1
    })
    .await;
    // The upstream call was seen; the daemon may still be writing the result.
    let mut s = c.status().await.unwrap();
    for _ in 0..100 {
        if s.profiles[0].refresh_count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = c.status().await.unwrap();
    }
    let p = &s.profiles[0];
    assert_eq!(p.refresh_count, 1);
    assert!(
        p.last_refresh_at.unwrap() < old_expiry,
        "refreshed before the old token expired"
    );
    assert_eq!(p.state, ProfileState::Ok);
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(1));
    assert_eq!(fake.refresh_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_keep_the_old_token_and_retry() {
    for mode in [Mode::ServerError, Mode::Garbage, Mode::Hang] {
        let fake = FakeOAuth::start(3600).await;
        fake.set_mode(mode);
        // Valid for 100 s but inside the 300 s margin: refresh starts at once and fails.
        let d = Daemon::builder()
            .config(&oauth_config(&fake, 300))
            .file(
                "state/llmd/oauth/work.json",
                &bundle(&access_of(0), &refresh_of(0), now() + 100),
                0o600,
            )
            .start();
        let c = d.client().await;
        // A hanging endpoint may still rotate the login: its answer is awaited in the
        // background (10 s here), and no second request is sent meanwhile.
        let attempts = if mode == Mode::Hang { 1 } else { 2 };
        wait_for("failed attempts", Duration::from_secs(15), || {
            fake.refresh_calls() >= attempts
        })
        .await;
        if mode == Mode::Hang {
            wait_for("the caller's deadline", Duration::from_secs(5), || {
                d.logs().contains("still waiting for its answer")
            })
            .await;
            assert_eq!(fake.refresh_calls(), 1);
        }
        for _ in 0..20 {
            assert_eq!(
                c.token("work", None).await.unwrap().token,
                access_of(0),
                "{mode:?}: old token still served"
            );
        }
        let s = c.status().await.unwrap();
        assert!(
            s.profiles[0].last_error.is_some(),
            "{mode:?}: error visible in status"
        );
        fake.set_mode(Mode::Normal);
        wait_for("recovery", Duration::from_secs(30), || {
            fake.generation() == 1
        })
        .await;
        assert_eq!(
            served_eventually(&c, "work", &access_of(1)).await,
            access_of(1),
            "{mode:?}"
        );
        assert_eq!(fake.invalid_grants(), 0);
        assert_no_secrets(&d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_failed_only_when_no_valid_token_is_left() {
    let fake = FakeOAuth::start(3600).await;
    fake.set_mode(Mode::ServerError);
    let d = work_daemon(&fake, 60, &bundle(&access_of(0), &refresh_of(0), now() - 1));
    let c = d.client().await;
    let e = c.token("work", None).await.unwrap_err();
    let e = e.rpc().expect("rpc error");
    assert_eq!(e.kind(), ErrorKind::RefreshFailed);
    assert_eq!(e.code, -32003);
    assert!(
        e.data_field("retry_after_ms")
            .and_then(Value::as_u64)
            .is_some(),
        "{e:?}"
    );
    assert!(e.message.contains("500"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_means_needs_login_and_no_more_upstream_calls() {
    let fake = FakeOAuth::start(3600).await;
    let d = work_daemon(
        &fake,
        60,
        &bundle(&access_of(0), &refresh_of(77), now() + 3600),
    );
    let c = d.client().await;
    let mut events = d
        .client()
        .await
        .subscribe(&["profile.state"])
        .await
        .unwrap();
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(0));
    let e = c.refresh("work").await.unwrap_err();
    let e = e.rpc().unwrap().clone();
    assert_eq!(e.kind(), ErrorKind::NeedsLogin);
    assert_eq!(e.code, -32002);
    assert!(e.message.contains("llmctl login work"), "{}", e.message);
    let calls = fake.refresh_calls();
    assert_eq!(calls, 1);
    // The access token still works until it expires, though the login needs attention.
    for _ in 0..10 {
        assert_eq!(c.token("work", None).await.unwrap().token, access_of(0));
    }
    let s = c.status().await.unwrap();
    assert_eq!(s.profiles[0].state, ProfileState::NeedsLogin);
    let e = c.token("work", Some(365 * 86_400)).await.unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::NeedsLogin);
    assert!(c.refresh("work").await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.refresh_calls(),
        calls,
        "no upstream call after invalid_grant"
    );
    let s = c.status().await.unwrap();
    assert_eq!(s.profiles[0].state, ProfileState::NeedsLogin);
    let ev = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ev = events.recv().await.expect("event");
            if ev.state == Some(ProfileState::NeedsLogin) {
                return ev;
            }
        }
    })
    .await
    .expect("needs_login event");
    assert_eq!(ev.profile, "work");
    let out = d.llmctl(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("needs login: run llmctl login work"));
    // New credentials (another program logged in) end the dead state without a refresh.
    let (access, refresh, _) = fake.rotate_out_of_band();
    replace_file(
        &d.home.join("state/llmd/oauth/work.json"),
        &bundle(&access, &refresh, now() + 3600),
    );
    assert_eq!(served_eventually(&c, "work", &access).await, access);
    assert_eq!(fake.refresh_calls(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_after_someone_else_refreshed_adopts_their_tokens() {
    // The file changes between our read and the upstream answer: re-read first.
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(400);
    let d = work_daemon(
        &fake,
        60,
        &bundle(&access_of(0), &refresh_of(0), now() + 3600),
    );
    let c = d.client().await;
    let path = d.home.join("state/llmd/oauth/work.json");
    let forced = tokio::spawn({
        let c = c.clone();
        async move { c.refresh("work").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another program refreshed with the same refresh token and wrote its result.
    let (access, refresh, _) = fake.rotate_out_of_band();
    std::fs::write(&path, bundle(&access, &refresh, now() + 3600)).unwrap();
    let t = forced.await.unwrap().unwrap();
    assert_eq!(t.token, access);
    assert_eq!(fake.invalid_grants(), 1);
    let s = c.status().await.unwrap();
    assert_eq!(s.profiles[0].state, ProfileState::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_written_by_another_process_are_adopted_without_upstream_call() {
    let fake = FakeOAuth::start(3600).await;
    let d = claude_daemon(
        &fake,
        &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
    );
    let c = d.client().await;
    let mut rotated = d
        .client()
        .await
        .subscribe(&["token.rotated"])
        .await
        .unwrap();
    assert_eq!(c.token("claude", None).await.unwrap().token, access_of(0));
    let (access, refresh, _) = fake.rotate_out_of_band();
    replace_file(
        &d.home.join(".claude/.credentials.json"),
        &claude_creds(&access, &refresh, now() + 7200),
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), rotated.recv())
        .await
        .expect("token.rotated event")
        .unwrap();
    assert_eq!(ev.profile, "claude");
    assert_eq!(ev.expires_at.map(|e| e > now() + 3600), Some(true));
    assert_eq!(c.token("claude", None).await.unwrap().token, access);
    assert_eq!(fake.refresh_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_cli_write_back_keeps_unknown_fields_and_mode() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&claude_config(&fake, 60))
        .env("CLAUDE_CONFIG_DIR", "{home}/cc")
        .file(
            "cc/.credentials.json",
            &claude_creds(&access_of(0), &refresh_of(0), now() - 10),
            0o600,
        )
        .start();
    let c = d.client().await;
    let t = c.token("claude", None).await.unwrap();
    assert_eq!(t.token, access_of(1));
    assert_eq!(t.kind, "claude-cli");
    let path = d.home.join("cc/.credentials.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let o = &v["claudeAiOauth"];
    assert_eq!(o["accessToken"], access_of(1));
    assert_eq!(o["refreshToken"], refresh_of(1));
    let exp_ms = o["expiresAt"].as_i64().unwrap();
    assert!(
        (exp_ms / 1000 - (now() + 3600)).abs() < 30,
        "expiresAt in ms"
    );
    assert_eq!(o["subscriptionType"], "max");
    assert_eq!(o["rateLimitTier"], "default_claude_max_20x");
    assert_eq!(o["scopes"], json!(["user:inference", "user:profile"]));
    assert_eq!(v["mcpOAuth"]["server-a"]["accessToken"], "mcp-keep-me");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The scopes the login recorded went to the token endpoint.
    assert_eq!(
        fake.state().requests[0].0["scope"],
        "user:inference user:profile"
    );
    // Our own write-back came back through the watcher without being taken for news.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !d.logs()
            .contains("adopted tokens written by another program"),
        "{}",
        d.logs()
    );
    // The locks were released.
    assert!(!d.home.join("cc/.oauth_refresh.lock").exists());
    assert!(!d.home.join("cc.lock").exists());
    assert_no_secrets(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_claude_lock_makes_the_daemon_wait_then_adopt() {
    let fake = FakeOAuth::start(3600).await;
    // Claude Code holds its refresh lock when the daemon starts with an expired token.
    let d = Daemon::builder()
        .config(&claude_config(&fake, 60))
        .file(".claude/.oauth_refresh.lock/owner", "{\"pid\":1}", 0o600)
        .file(
            ".claude/.credentials.json",
            &claude_creds(&access_of(0), &refresh_of(0), now() - 10),
            0o600,
        )
        .start();
    let c = d.client().await;
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.token("claude", None).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "the daemon must wait for the lock holder"
    );
    assert_eq!(fake.refresh_calls(), 0);
    // The holder refreshes, writes its tokens and releases the lock.
    let (access, refresh, _) = fake.rotate_out_of_band();
    replace_file(
        &d.home.join(".claude/.credentials.json"),
        &claude_creds(&access, &refresh, now() + 3600),
    );
    std::fs::remove_dir_all(d.home.join(".claude/.oauth_refresh.lock")).unwrap();
    let t = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(t.token, access);
    assert_eq!(
        fake.refresh_calls(),
        0,
        "adopted the holder's tokens instead of refreshing"
    );
    assert_eq!(fake.invalid_grants(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_credentials_file_stays_a_symlink() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&claude_config(&fake, 60))
        .file(
            "dotfiles/claude-creds.json",
            &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
            0o600,
        )
        .file(".claude/placeholder", "", 0o600)
        .no_wait()
        .start();
    let mut d = d;
    d.stop();
    let link = d.home.join(".claude/.credentials.json");
    std::os::unix::fs::symlink("../dotfiles/claude-creds.json", &link).unwrap();
    std::fs::write(
        d.home.join("dotfiles/claude-creds.json"),
        claude_creds(&access_of(0), &refresh_of(0), now() - 10),
    )
    .unwrap();
    d.restart();
    let t = d.client().await.token("claude", None).await.unwrap();
    assert_eq!(t.token, access_of(1));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let v: Value =
        serde_json::from_slice(&std::fs::read(d.home.join("dotfiles/claude-creds.json")).unwrap())
            .unwrap();
    assert_eq!(v["claudeAiOauth"]["refreshToken"], refresh_of(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_join_the_one_in_flight() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(500);
    let d = work_daemon(
        &fake,
        60,
        &bundle(&access_of(0), &refresh_of(0), now() + 3600),
    );
    let c = d.client().await;
    let calls = (0..20).map(|_| {
        let c = c.clone();
        async move { c.refresh("work").await.unwrap().token }
    });
    let tokens = futures_util::future::join_all(calls).await;
    assert!(tokens.iter().all(|t| *t == access_of(1)), "{tokens:?}");
    assert_eq!(fake.refresh_calls(), 1);
    // Asked again at once while the new token is valid: refused, not another rotation.
    let e = c.refresh("work").await.unwrap_err();
    let e = e.rpc().unwrap().clone();
    assert_eq!(e.kind(), ErrorKind::RateLimited, "{}", e.message);
    let ms = e.data_field("retry_after_ms").and_then(|v| v.as_u64());
    assert!(ms.is_some_and(|ms| ms > 0 && ms <= 5000), "{e:?}");
    for _ in 0..50 {
        let _ = c.refresh("work").await;
    }
    assert_eq!(
        fake.refresh_calls(),
        1,
        "a refresh loop rotates the login once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_oauth_refreshes_form_encoded_with_expired_in() {
    let fake = FakeOAuth::start(1800).await;
    let cfg = format!(
        "[profiles.mm]\nprovider = \"minimax\"\nauth = \"oauth\"\ngroup_id = \"g-1\"\nregion = \"{}\"\n",
        fake.region()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .file(
            "state/llmd/oauth/mm.json",
            &bundle("mm-old-access", &refresh_of(0), now() - 1),
            0o600,
        )
        .start();
    let t = d.client().await.token("mm", None).await.unwrap();
    assert_eq!(t.token, access_of(1));
    assert!((t.expires_at.unwrap() - (now() + 1800)).abs() < 30);
    assert_eq!(
        t.headers["authorization"],
        format!("Bearer {}", access_of(1))
    );
    assert_eq!(t.headers["x-minimax-group-id"], "g-1");
    let req = fake.state().requests[0].0.clone();
    assert_eq!(
        req,
        json!({"grant_type": "refresh_token", "client_id": "78257093-7e40-4613-99e0-527b14b39113", "refresh_token": refresh_of(0)})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_bundle_is_refused() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&oauth_config(&fake, 60))
        .file(
            "state/llmd/oauth/work.json",
            &bundle(&access_of(0), &refresh_of(0), now() + 3600),
            0o644,
        )
        .start();
    let c = d.client().await;
    assert!(c.token("work", None).await.is_err());
    let s = c.status().await.unwrap();
    assert!(
        s.profiles[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("chmod 600"),
        "{:?}",
        s.profiles[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_key_and_setup_token_come_from_stdin_and_are_stored_private() {
    let d = Daemon::builder()
        .config("[profiles.k]\nprovider = \"openai-compat\"\nauth = \"api-key\"\n\n[profiles.st]\nprovider = \"anthropic\"\nauth = \"setup-token\"\n")
        .start();
    let c = d.client().await;
    assert_eq!(
        c.token("k", None).await.unwrap_err().rpc().unwrap().kind(),
        ErrorKind::MissingCredential,
        "a key that was never there is not a dead login"
    );
    let out = d.llmctl_stdin(&["set-key", "k"], "sk-stored-key\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.token("k", None).await.unwrap().token, "sk-stored-key");
    let key_file = d.home.join("state/llmd/keys/k.key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bad = d.llmctl_stdin(&["set-key", "st", "--setup-token"], "sk-ant-api03-nope");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must start with `sk-ant-oat01-`"));
    let setup = format!("sk-ant-oat01-setup{}", "x".repeat(90));
    let out = d.llmctl_stdin(&["set-key", "st", "--setup-token"], &setup);
    assert!(out.status.success(), "{out:?}");
    let t = c.token("st", None).await.unwrap();
    assert_eq!(t.kind, "setup-token");
    assert_eq!(t.headers["authorization"], format!("Bearer {setup}"));
    assert_eq!(t.headers["anthropic-beta"], "oauth-2025-04-20");
    assert_no_secrets(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_pkce_stores_the_bundle() {
    use base64::Engine;
    use sha2::Digest;
    let fake = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nauthorize_url = \"http://127.0.0.1:1/authorize\"\n",
        fake.anthropic_url()
    );
    let d = Daemon::start(&cfg);
    let c = d.client().await;
    let start = c.login_start("work").await.unwrap();
    let url = reqwest_free_query(&start.url);
    assert!(start.url.starts_with("http://127.0.0.1:1/authorize?"));
    assert_eq!(url["code"], "true");
    assert_eq!(url["response_type"], "code");
    assert_eq!(url["code_challenge_method"], "S256");
    assert_eq!(url["scope"], "user:profile user:inference");
    assert_eq!(
        url["redirect_uri"],
        "https://platform.claude.com/oauth/code/callback"
    );
    fake.allow_code("the-code");
    // A code from another attempt is refused before any upstream call.
    let e = c
        .login_finish("work", "the-code#wrong-state")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("state mismatch"), "{e}");
    let done = c
        .login_finish("work", &format!("the-code#{}", url["state"]))
        .await
        .unwrap();
    assert!(done.expires_at.unwrap() > now() + 3000);
    let req = fake.state().requests.last().unwrap().0.clone();
    assert_eq!(req["grant_type"], "authorization_code");
    assert_eq!(req["state"], url["state"]);
    let verifier = req["code_verifier"].as_str().unwrap();
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    assert_eq!(challenge, url["code_challenge"]);
    assert_eq!(
        served_eventually(&c, "work", &access_of(1)).await,
        access_of(1)
    );
    let bundle = d.home.join("state/llmd/oauth/work.json");
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_no_secrets(&d);
}

fn reqwest_free_query(url: &str) -> std::collections::HashMap<String, String> {
    let q = url.split_once('?').map(|x| x.1).unwrap_or("");
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() + 1 && i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_sighup_keep_the_old_config_when_the_new_one_is_broken() {
    let d = Daemon::builder()
        .config("[profiles.a]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"KA\"\n")
        .env("KA", "key-a")
        .env("KB", "key-b")
        .start();
    let c = d.client().await;
    let cfg = d.home.join("config/llmd/config.toml");
    std::fs::write(
        &cfg,
        "[profiles.b]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_key_env = \"KB\"\n",
    )
    .unwrap();
    let r = c.reload().await.unwrap();
    assert_eq!(r.profiles, ["b"]);
    assert_eq!(
        c.token("b", None).await.unwrap().headers["x-goog-api-key"],
        "key-b"
    );
    std::fs::write(
        &cfg,
        "[profiles.c]\nprovider = \"gemini\"\nauth = \"api-key\"\nbogus = 1\n",
    )
    .unwrap();
    let e = c.reload().await.unwrap_err();
    assert!(
        e.to_string().contains("bogus") && e.to_string().contains("config.toml:4"),
        "{e}"
    );
    assert_eq!(c.token("b", None).await.unwrap().token, "key-b");
    d.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.token("b", None).await.unwrap().token, "key-b");
    assert!(d
        .logs()
        .contains("reload failed; keeping the running configuration"));
    std::fs::write(
        &cfg,
        "[profiles.a]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"KA\"\n",
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let mut ok = false;
    for _ in 0..100 {
        if c.token("a", None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "SIGHUP reloaded the fixed config");
    assert_eq!(d.llmctl(&["reload"]).stdout, b"reloaded: a\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_login_reads_the_code_from_stdin_and_events_follow_rotations() {
    let fake = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nauthorize_url = \"http://127.0.0.1:1/oauth/authorize\"\n",
        fake.anthropic_url()
    );
    let d = Daemon::start(&cfg);
    let out = d.llmctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("run llmctl login work"),
        "{out:?}"
    );
    // `llmctl events` runs in the background and prints the rotation caused by the login.
    let mut events = std::process::Command::new(llmd_tests::bin_path("llmctl"))
        .env("LLMD_SOCKET", &d.socket)
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The state comes from the authorize URL printed on stderr; the user pastes code#state.
    let mut login = std::process::Command::new(llmd_tests::bin_path("llmctl"))
        .env("LLMD_SOCKET", &d.socket)
        .args(["login", "work"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = login.stderr.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut acc = String::new();
        while !acc.contains("Code: ") {
            let n = stderr.read(&mut buf).unwrap();
            assert!(n > 0, "llmctl login ended early: {acc}");
            acc.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        acc
    })
    .await
    .unwrap();
    let state = url
        .split("state=")
        .nth(1)
        .unwrap()
        .split(|c: char| c == '&' || c.is_whitespace())
        .next()
        .unwrap()
        .to_owned();
    fake.allow_code("pasted-code");
    {
        use std::io::Write;
        let mut stdin = login.stdin.take().unwrap();
        writeln!(stdin, "pasted-code#{state}").unwrap();
    }
    let out = login.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("work: logged in, expires in"),
        "{out:?}"
    );
    let mut token = String::new();
    for _ in 0..100 {
        let out = d.llmctl(&["token", "work"]);
        if out.status.success() {
            token = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(token, format!("{}\n", access_of(1)));
    let status = String::from_utf8_lossy(&d.llmctl(&["status"]).stdout).into_owned();
    assert!(
        status.contains("expires in 59m") || status.contains("expires in 1h"),
        "{status}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(events.id() as i32, libc::SIGTERM) };
    let _ = events.wait();
    let mut printed = String::new();
    use std::io::Read;
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert!(
        printed.contains("\"kind\":\"token.rotated\"") && printed.contains("\"profile\":\"work\""),
        "{printed}"
    );
    assert!(!printed.contains("fakeaccess"), "events carry no token");
    assert_no_secrets(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_written_file_is_retried_not_adopted_broken() {
    use std::io::Write;
    let fake = FakeOAuth::start(3600).await;
    let d = claude_daemon(
        &fake,
        &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
    );
    let c = d.client().await;
    assert_eq!(c.token("claude", None).await.unwrap().token, access_of(0));
    // A writer that does not rename: the first half lands (and is closed) before the rest.
    let (access, refresh, _) = fake.rotate_out_of_band();
    let full = claude_creds(&access, &refresh, now() + 7200);
    let (head, tail) = full.split_at(full.len() / 2);
    let path = d.home.join(".claude/.credentials.json");
    std::fs::write(&path, head).unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    // Meanwhile the old token is still served.
    assert_eq!(c.token("claude", None).await.unwrap().token, access_of(0));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(tail.as_bytes())
        .unwrap();
    assert_eq!(served_eventually(&c, "claude", &access).await, access);
    assert_eq!(fake.refresh_calls(), 0);
    let s = c.status().await.unwrap();
    assert_eq!(s.profiles[0].state, ProfileState::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_file_has_one_refresher_across_profiles_and_reloads() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(200);
    let profiles = |model: &str| {
        format!(
            "[daemon]\nforced_refresh_interval_secs = 0\n\n[profiles.a]\nprovider = \"anthropic\"\nauth = \"oauth\"\nbundle = \"{{home}}/shared.json\"\ntoken_endpoint = \"{url}\"\ndefault_model = \"{model}\"\n\n[profiles.b]\nprovider = \"anthropic\"\nauth = \"oauth\"\nbundle = \"{{home}}/shared.json\"\ntoken_endpoint = \"{url}\"\n",
            url = fake.anthropic_url()
        )
    };
    let d = Daemon::builder()
        .config(&profiles("m1"))
        .file(
            "shared.json",
            &bundle(&access_of(0), &refresh_of(0), now() + 3600),
            0o600,
        )
        .start();
    let c = d.client().await;
    let (a, b) = tokio::join!(c.refresh("a"), c.refresh("b"));
    assert_eq!(a.unwrap().token, access_of(1));
    assert_eq!(b.unwrap().token, access_of(1));
    assert_eq!(
        fake.refresh_calls(),
        1,
        "both profiles share one login task"
    );
    // A reload that changes something unrelated to the login keeps the same task.
    std::fs::write(
        d.home.join("config/llmd/config.toml"),
        profiles("m2").replace("{home}", &d.home.to_string_lossy()),
    )
    .unwrap();
    c.reload().await.unwrap();
    let s = c.status().await.unwrap();
    assert!(
        s.profiles.iter().all(|p| p.refresh_count == 1),
        "{:?}",
        s.profiles
    );
    let (a, b) = tokio::join!(c.refresh("a"), c.refresh("b"));
    assert_eq!(a.unwrap().token, access_of(2));
    assert_eq!(b.unwrap().token, access_of(2));
    assert_eq!(fake.refresh_calls(), 2);
    assert_eq!(fake.invalid_grants(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_waits_for_its_tokens_to_be_written() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(1500);
    let mut d = work_daemon(&fake, 60, &bundle(&access_of(0), &refresh_of(0), now() - 5));
    // The expired token is refreshed at once; stop while the endpoint is still answering.
    wait_for("the refresh to start", Duration::from_secs(10), || {
        !fake.state().requests.is_empty()
    })
    .await;
    assert!(d.stop().unwrap().success());
    let v: Value =
        serde_json::from_slice(&std::fs::read(d.home.join("state/llmd/oauth/work.json")).unwrap())
            .unwrap();
    assert_eq!(
        v["refresh_token"],
        refresh_of(1),
        "the rotated refresh token reached the disk before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_folder_created_later_is_watched() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder().config(&claude_config(&fake, 60)).start();
    let mut events = d
        .client()
        .await
        .subscribe(&["token.rotated"])
        .await
        .unwrap();
    // Claude Code is installed and logged in after llmd started: no folder existed.
    let dir = d.home.join(".claude");
    std::fs::create_dir(&dir).unwrap();
    replace_file(
        &dir.join(".credentials.json"),
        &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
    );
    let ev = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("the new login is noticed without anyone asking for a token")
        .unwrap();
    assert_eq!(ev.profile, "claude");
    assert_eq!(fake.refresh_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_claude_code_file_is_used_with_a_warning() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&claude_config(&fake, 60))
        .file(
            ".claude/.credentials.json",
            &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
            0o644,
        )
        .start();
    assert_eq!(
        d.client().await.token("claude", None).await.unwrap().token,
        access_of(0)
    );
    assert!(
        d.logs().contains("readable by group/others"),
        "{}",
        d.logs()
    );
    assert_no_secrets(&d);
}
