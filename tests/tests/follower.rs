//! Issue 13: a follower llmd serves the login of another llmd over a forwarded socket,
//! never calling a token endpoint and never holding the refresh token.

use llmd_client::Client;
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "llmd-mirror-not-a-refresh-token";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claude_creds(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({
        "claudeAiOauth": {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": expires_at * 1000,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
        },
    })
    .to_string()
}

/// An upstream llmd whose `claude` profile is Claude Code's login, refreshed on demand.
fn upstream(fake: &FakeOAuth) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_timeout_secs = 2\nforced_refresh_interval_secs = 0\n\n[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            ".claude/.credentials.json",
            &claude_creds(&access_of(0), &refresh_of(0), now() + 3600),
            0o600,
        )
        .start()
}

/// A follower of `socket`'s `claude` profile that mirrors it into `{home}/mirror`, where a
/// Claude Code file with fields of its own already is.
fn follower(socket: &Path) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"{}\"\nmirror_claude_config_dir = \"{{home}}/mirror\"\n",
            socket.display()
        ))
        .file(
            "mirror/.credentials.json",
            r#"{"claudeAiOauth":{"accessToken":"stale","refreshToken":"stale-r","expiresAt":1000,"rateLimitTier":"keep-me"},"mcpOAuth":{"srv":{"accessToken":"mcp-keep"}}}"#,
            0o600,
        )
        .start()
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits (bounded) until the follower's next `token.rotated` for `profile`.
async fn next_rotation(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<llmd_client::proto::methods::Event>,
    profile: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no token.rotated from the follower within 15 s")
            .expect("event stream ended");
        if ev.kind == "token.rotated" && ev.profile == profile {
            return;
        }
    }
}

/// Forces `rounds` refreshes on the upstream and checks after each that the follower's
/// agents get exactly the upstream's new token and the mirror tracks it.
async fn rotation_check(fake: &FakeOAuth, up: &Daemon, fol: &Daemon, rounds: u64) {
    let uc = up.client().await;
    let fc = fol.client().await;
    // The follower holds the upstream's current token before anything rotates.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let want = uc.token("claude", None).await.unwrap().token;
        let t = fc.token("claude", None).await;
        if t.as_ref().is_ok_and(|t| t.token == want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower never got the upstream token: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut events = fc.subscribe(&["token.rotated"]).await.unwrap();
    let calls_before = fake.refresh_calls();
    let mirror = fol.home.join("mirror/.credentials.json");
    for round in 1..=rounds {
        let fresh = uc.refresh("claude").await.unwrap();
        next_rotation(&mut events, "claude").await;
        // An event never announces a token that `token` does not return yet.
        let got = fc.token("claude", None).await.unwrap();
        assert_eq!(got.token, fresh.token, "round {round}");
        assert_eq!(got.token, uc.token("claude", None).await.unwrap().token);
        assert_eq!(got.kind, "claude-cli");
        assert_eq!(
            got.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {}", fresh.token).as_str())
        );
        assert_eq!(got.scopes, vec!["user:inference", "user:profile"]);
        assert_eq!(got.subscription_type.as_deref(), Some("max"));
        // The mirror is written right after the event; wait for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(15);
        let v = loop {
            if let Some(v) = read_json(&mirror) {
                if v["claudeAiOauth"]["accessToken"] == fresh.token.as_str() {
                    break v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "mirror never got round {round}'s token"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let o = &v["claudeAiOauth"];
        assert_eq!(o["refreshToken"], MARKER);
        assert_eq!(o["expiresAt"].as_i64(), fresh.expires_at.map(|e| e * 1000));
        assert_eq!(o["scopes"], json!(["user:inference", "user:profile"]));
        assert_eq!(o["subscriptionType"], "max");
        assert_eq!(o["rateLimitTier"], "keep-me");
        assert_eq!(v["mcpOAuth"]["srv"]["accessToken"], "mcp-keep");
        let text = std::fs::read_to_string(&mirror).unwrap();
        for g in 0..=fake.generation() {
            assert!(
                !text.contains(&refresh_of(g)),
                "mirror holds a real refresh token"
            );
        }
        let mode = std::fs::metadata(&mirror).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Only the upstream's forced refreshes reached the token endpoint.
    assert_eq!(fake.refresh_calls() - calls_before, rounds);
    assert_eq!(fake.invalid_grants(), 0);
    let logs = fol.logs();
    for g in 0..=fake.generation() {
        assert!(!logs.contains(&refresh_of(g)) && !logs.contains(&access_of(g)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_tracks_upstream_rotations_and_mirrors_them() {
    let fake = FakeOAuth::start(3600).await;
    let up = upstream(&fake);
    let fol = follower(&up.socket);
    rotation_check(&fake, &up, &fol, 5).await;
    // Claude Code refreshing from the mirror (the upstream gone too long) is refused and
    // does not spend the real login: the upstream still rotates, and the mirror follows.
    let (status, body) = llmd_tests::fake_oauth::post_json(
        fake.addr,
        "/v1/oauth/token",
        &json!({"grant_type": "refresh_token", "refresh_token": MARKER, "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("invalid_grant"));
    let fresh = up.client().await.refresh("claude").await.unwrap();
    let mirror = fol.home.join("mirror/.credentials.json");
    let deadline = Instant::now() + Duration::from_secs(15);
    while read_json(&mirror)
        .is_none_or(|v| v["claudeAiOauth"]["accessToken"] != fresh.token.as_str())
    {
        assert!(Instant::now() < deadline, "mirror not repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = fol.client().await.refresh("claude").await.unwrap_err();
    assert!(e.to_string().contains("only the upstream"), "{e}");
    let st = fol.client().await.status().await.unwrap();
    let p = &st.profiles[0];
    assert_eq!(p.auth, "upstream");
    let u = p.upstream.as_ref().expect("upstream in status");
    assert_eq!(u.socket, up.socket.display().to_string());
    assert_eq!(u.profile, "claude");
    assert_eq!(u.connection, "connected");
    let out = fol.llmctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "upstream {} (claude, connected)",
            up.socket.display()
        )),
        "{text}"
    );
    assert!(out.status.success(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gone_serves_until_expiry_then_errors_then_recovers() {
    // Short-lived tokens the upstream refreshes itself, 3 s before they expire.
    let fake = FakeOAuth::start(10).await;
    let mut up = Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 3\nrefresh_timeout_secs = 2\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 10}).to_string(),
            0o600,
        )
        .start();
    let fol = Daemon::start(&format!(
        "[profiles.remote]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"{}\"\nupstream_profile = \"work\"\n",
        up.socket.display()
    ));
    let fc = fol.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fc.token("remote", Some(2)).await.is_err() {
        assert!(Instant::now() < deadline, "follower never got a token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    up.stop();
    // Still valid: served while the upstream is gone.
    let held = fc.token("remote", None).await.expect("held token served");
    let expiry = held.expires_at.expect("expiry");
    assert!(held.token.starts_with("sk-ant-oat01-fakeaccess-"));
    // After its expiry: an error that names the socket.
    let wait = (expiry - now() + 1).clamp(0, 15) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let err = fc.token("remote", None).await.unwrap_err().to_string();
    assert!(err.contains(&up.socket.display().to_string()), "{err}");
    let st = fc.status().await.unwrap();
    assert_eq!(st.profiles[0].state.to_string(), "error");
    assert_eq!(
        st.profiles[0].upstream.as_ref().unwrap().connection,
        "disconnected"
    );
    // The upstream returns: the follower reconnects on its own and serves its token.
    let calls = fake.refresh_calls();
    up.restart();
    let uc = up.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = fc.token("remote", Some(1)).await {
            let current = uc.token("work", None).await.unwrap();
            if t.token == current.token {
                break;
            }
        }
        assert!(Instant::now() < deadline, "follower did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fake.refresh_calls() >= calls);
    assert_eq!(fake.invalid_grants(), 0);
    // The event link comes back too (after at most one reconnect delay).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = fc.status().await.unwrap();
        if st.profiles[0].upstream.as_ref().unwrap().connection == "connected" {
            assert_eq!(st.profiles[0].state.to_string(), "ok");
            break;
        }
        assert!(Instant::now() < deadline, "the follower never resubscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs llmctl as `uid` against `d`'s socket.
fn llmctl_as(d: &Daemon, uid: u32, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ])
    .arg(llmd_tests::bin_path("llmctl"))
    .args(args)
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("HOME", "/")
    .env("LLMD_SOCKET", &d.socket)
    .stdin(Stdio::null());
    c.output().expect("run setpriv")
}

#[test]
fn allow_uids_get_agent_methods_only() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    let d = Daemon::builder()
        .config("[daemon]\nallow_uids = [4242]\n\n[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"FOLLOWER_TEST_KEY\"\n")
        .env("FOLLOWER_TEST_KEY", "sk-ant-api03-allowuids")
        .start();
    if nix_uid() != 0 {
        eprintln!("skipped: switching uids needs root");
        return;
    }
    // Let other uids reach the socket at all (a container bind-mount would).
    for p in [
        d.home.clone(),
        d.home.join("run"),
        d.socket.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let out = llmctl_as(&d, 4242, &["token", "k"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sk-ant-api03-allowuids"
    );

    let mut set = Command::new("setpriv");
    set.args(["--reuid=4242", "--regid=4242", "--clear-groups"])
        .arg(llmd_tests::bin_path("llmctl"))
        .args(["set-key", "k"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LLMD_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = set.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"sk-ant-api03-replaced\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_uids"), "{err}");
    for args in [&["reload"][..], &["refresh", "k"][..]] {
        let out = llmctl_as(&d, 4242, args);
        assert!(!out.status.success(), "{args:?} was allowed");
    }
    // The key is unchanged.
    let out = d.llmctl(&["token", "k"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sk-ant-api03-allowuids"
    );

    let out = llmctl_as(&d, 4343, &["token", "k"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let logs = d.logs();
    assert!(
        logs.contains("refused connection from another user") && logs.contains("4343"),
        "{logs}"
    );
}

fn nix_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn sshd_path() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_through_a_real_ssh_forward() {
    let Some(sshd) = sshd_path() else {
        eprintln!("skipped: sshd is not installed (`apt-get install openssh-server`)");
        return;
    };
    if nix_uid() != 0 {
        eprintln!("skipped: the private sshd needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    let keygen = |path: &Path| {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "ssh-keygen failed");
    };
    keygen(&d.join("host_key"));
    keygen(&d.join("user_key"));
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let port = free_port();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\n",
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let _sshd = Kill(
        Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("sshd listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let fake = FakeOAuth::start(3600).await;
    let up = upstream(&fake);
    // "The remote machine" sees the upstream at this path, forwarded by ssh -R.
    let forwarded = d.join("llmd-host.sock");
    let _ssh = Kill(
        Command::new("ssh")
            .args(["-N", "-F", "/dev/null", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "StreamLocalBindUnlink=yes",
            ])
            .arg("-i")
            .arg(d.join("user_key"))
            .args(["-p", &port.to_string()])
            .arg("-R")
            .arg(format!("{}:{}", forwarded.display(), up.socket.display()))
            .arg("root@127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("ssh.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the forwarded socket", || forwarded.exists());
    assert!(Client::connect_to(&forwarded).await.is_ok());
    let fol = follower(&forwarded);
    rotation_check(&fake, &up, &fol, 3).await;
    let st = fol.client().await.status().await.unwrap();
    assert_eq!(
        st.profiles[0].upstream.as_ref().unwrap().socket,
        forwarded.display().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_on_a_follower_uses_the_upstream_token_and_local_limits() {
    let fake = FakeOAuth::start(3600).await;
    let providers = llmd_tests::fake_providers::FakeProviders::start().await;
    let up = upstream(&fake);
    let fol = Daemon::start(&format!(
        "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"{}\"\nbase_url = \"{}\"\ndefault_model = \"claude-x\"\n\n[profiles.claude.rate_limit]\nmax_concurrent = 1\n",
        up.socket.display(),
        providers.anthropic_base()
    ));
    let fc = fol.client().await;
    let ask: llmd_proto::chat::ChatRequest =
        serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        match fc.chat("claude", ask.clone()).await {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "chat never worked: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!r.content.is_empty());
    let req = providers.chat_requests().pop().expect("a provider request");
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {}", access_of(0)).as_str())
    );
    assert!(req
        .header("anthropic-beta")
        .is_some_and(|b| b.contains("oauth")));
    // A 401 makes the follower ask its upstream again, never a token endpoint.
    providers.fail_next(1, llmd_tests::fake_providers::Failure::Status(401));
    fc.chat("claude", ask.clone()).await.unwrap();
    assert_eq!(fake.refresh_calls(), 0);
    let st = fc.status().await.unwrap();
    assert!(st.profiles[0].limits.is_some(), "the follower's own limits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_login_rotating_by_itself_is_followed() {
    // 3-second tokens the upstream refreshes 1 s ahead: a rotation about every 2 s.
    let fake = FakeOAuth::start(3).await;
    let up = Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 1\nrefresh_timeout_secs = 2\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 3}).to_string(),
            0o600,
        )
        .start();
    let fol = Daemon::start(&format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"{}\"\n",
        up.socket.display()
    ));
    let fc = fol.client().await;
    let uc = up.client().await;
    let mut events = fc.subscribe(&["token.rotated"]).await.unwrap();
    let mut compared = 0;
    for _ in 0..6 {
        next_rotation(&mut events, "work").await;
        let before = fake.generation();
        let f = fc.token("work", None).await.unwrap();
        let u = uc.token("work", None).await.unwrap();
        assert!(
            f.expires_at.unwrap() >= now(),
            "the follower served an expired token"
        );
        // Equal unless the upstream rotated again between the two calls.
        if fake.generation() == before {
            assert_eq!(f.token, u.token);
            assert_eq!(f.token, access_of(before));
            compared += 1;
        }
        // An agent asking for more validity than the follower holds gets it from upstream.
        let long = fc.token("work", Some(2)).await.unwrap();
        assert!(long.expires_at.unwrap() - now() >= 1);
    }
    assert!(compared >= 3, "only {compared} rounds could be compared");
    // Every call the token endpoint saw was one of the upstream's refreshes.
    // (One more may be in flight on the upstream while it is counted.)
    let done = uc.status().await.unwrap().profiles[0].refresh_count;
    let calls = fake.refresh_calls();
    assert!(
        calls == done || calls == done + 1,
        "{calls} calls, {done} refreshes"
    );
    // The first rotation the follower saw may be the login read from file.
    assert!(done >= 5, "{done} refreshes");
    assert_eq!(fake.invalid_grants(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_passed_on_with_the_socket() {
    let fake = FakeOAuth::start(3600).await;
    let up = upstream(&fake);
    let fol = Daemon::start(&format!(
        "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"{}\"\nupstream_profile = \"nope\"\n\n[profiles.gem]\nprovider = \"gemini\"\nauth = \"upstream\"\nupstream_socket = \"{0}\"\nupstream_profile = \"claude\"\n",
        up.socket.display()
    ));
    let fc = fol.client().await;
    let e = fc.token("claude", None).await.unwrap_err();
    let llmd_client::Error::Rpc(e) = e else {
        panic!("{e}")
    };
    assert_eq!(e.kind(), llmd_proto::ErrorKind::UnknownProfile, "{e:?}");
    assert!(
        e.message.contains(&up.socket.display().to_string()),
        "{}",
        e.message
    );
    // The upstream is an anthropic profile; a gemini follower would speak the wrong API.
    let e = fc.token("gem", None).await.unwrap_err().to_string();
    assert!(e.contains("upstream profile is `anthropic`"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = fc.status().await.unwrap();
        let p = st.profiles.iter().find(|p| p.name == "claude").unwrap();
        if p.last_error.is_some() {
            assert_eq!(p.state.to_string(), "error");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.refresh_calls(), 0);
}
