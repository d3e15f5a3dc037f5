//! systemd integration, against the real binaries and systemd's own tools: the unit files,
//! socket activation, the notify protocol (ready, reload, stop, watchdog), journald
//! logging, the graceful stop and peer credentials on a socket llmd did not create.

use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth, Mode};
use llmd_tests::raw::Raw;
use llmd_tests::{bin_path, daemon::tool_path, Daemon};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd");

const ONE_KEY: &str = r#"
[profiles.a]
provider = "openai-compat"
auth = "api-key"
api_key_env = "T_KEY_A"
"#;

const TWO_KEYS: &str = r#"
[profiles.a]
provider = "openai-compat"
auth = "api-key"
api_key_env = "T_KEY_A"

[profiles.b]
provider = "gemini"
auth = "api-key"
api_key_env = "T_KEY_B"
"#;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config_path(d: &Daemon) -> PathBuf {
    d.home.join("config/llmd/config.toml")
}

/// One notify message, as `KEY=value` lines.
#[derive(Debug, Clone)]
struct Message {
    text: String,
    fields: BTreeMap<String, String>,
}

impl Message {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// The service manager's end of `NOTIFY_SOCKET`, bound by the test.
struct NotifySocket {
    sock: UnixDatagram,
    env_value: String,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    /// A socket at a path.
    fn at_path() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            env_value: path.to_string_lossy().into_owned(),
            _dir: Some(dir),
        }
    }

    /// A socket in the abstract namespace (`@name`).
    fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "llmd-test-notify-{}-{}",
            std::process::id(),
            monotonic_usec()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        std_sock.set_nonblocking(true).unwrap();
        NotifySocket {
            sock: UnixDatagram::from_std(std_sock).unwrap(),
            env_value: format!("@{name}"),
            _dir: None,
        }
    }

    async fn recv(&self) -> Message {
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(20), self.sock.recv(&mut buf))
            .await
            .expect("timed out waiting for a notify message")
            .unwrap();
        let text = String::from_utf8(buf[..n].to_vec()).expect("notify messages are UTF-8");
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Message { text, fields }
    }

    /// The next message that is not a bare watchdog ping.
    async fn next_state(&self) -> Message {
        loop {
            let m = self.recv().await;
            if m.text != "WATCHDOG=1" {
                return m;
            }
        }
    }
}

fn notified(builder: llmd_tests::DaemonBuilder, notify: &NotifySocket) -> Daemon {
    builder.env("NOTIFY_SOCKET", &notify.env_value).start()
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_word() {
    let analyze = tool_path("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let llmd = bin_path("llmd");
    for name in ["llmd.service", "llmd.socket"] {
        let text = std::fs::read_to_string(Path::new(UNITS).join(name)).unwrap();
        // The units name the installed binary; verify wants an existing one.
        let text = text.replace(
            "ExecStart=%h/.cargo/bin/llmd",
            &format!("ExecStart={}", llmd.display()),
        );
        std::fs::write(units.join(name), text).unwrap();
    }
    let out = Command::new(analyze)
        .args(["verify", "--user", "./llmd.service", "./llmd.socket"])
        .current_dir(&units)
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.is_empty(),
        "systemd-analyze verify ({}) said:\n{said}",
        out.status
    );
}

/// `Key=value` assignments of a unit file, every value of repeated keys kept.
fn unit_settings(name: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(Path::new(UNITS).join(name))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn units_declare_notify_reload_watchdog_and_hardening() {
    let service = unit_settings("llmd.service");
    let has = |k: &str, v: &str| service.iter().any(|(a, b)| a == k && b == v);
    for (k, v) in [
        ("Type", "notify"),
        ("ExecStart", "%h/.cargo/bin/llmd"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30"),
        ("UMask", "0077"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert!(has(k, v), "llmd.service lacks {k}={v}");
    }
    let writable: Vec<&str> = service
        .iter()
        .filter(|(k, _)| k == "ReadWritePaths")
        .flat_map(|(_, v)| v.split_whitespace())
        .collect();
    for path in ["%S/llmd", "%t/llmd", "-%h/.claude"] {
        assert!(writable.contains(&path), "ReadWritePaths lacks {path}");
    }
    let socket = unit_settings("llmd.socket");
    for (k, v) in [
        ("ListenStream", "%t/llmd/llmd.sock"),
        ("SocketMode", "0600"),
        ("DirectoryMode", "0700"),
        ("WantedBy", "sockets.target"),
    ] {
        assert!(
            socket.iter().any(|(a, b)| a == k && b == v),
            "llmd.socket lacks {k}={v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_reload_and_stopping() {
    let notify = NotifySocket::at_path();
    let mut d = notified(
        Daemon::builder()
            .config(ONE_KEY)
            .env("T_KEY_A", "key-a")
            .env("T_KEY_B", "key-b"),
        &notify,
    );
    let ready = notify.next_state().await;
    assert_eq!(ready.get("READY"), Some("1"), "{ready:?}");
    let status = ready.get("STATUS").expect("READY comes with a STATUS");
    assert!(
        status.contains("Serving 1 profile") && status.contains(&*d.socket.to_string_lossy()),
        "{status}"
    );

    std::fs::write(config_path(&d), TWO_KEYS).unwrap();
    let before = monotonic_usec();
    d.signal(libc::SIGHUP);
    let reloading = notify.next_state().await;
    let after = monotonic_usec();
    assert_eq!(reloading.get("RELOADING"), Some("1"), "{reloading:?}");
    let usec: u64 = reloading
        .get("MONOTONIC_USEC")
        .expect("RELOADING comes with MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC {usec} is not CLOCK_MONOTONIC at the reload ({before}..{after})"
    );
    let ready = notify.next_state().await;
    assert_eq!(ready.get("READY"), Some("1"), "{ready:?}");
    assert!(
        ready.get("STATUS").unwrap().contains("Serving 2 profiles"),
        "{ready:?}"
    );
    assert_eq!(
        d.client().await.token("b", None).await.unwrap().token,
        "key-b"
    );

    d.signal(libc::SIGTERM);
    let stopping = notify.next_state().await;
    assert_eq!(stopping.get("STOPPING"), Some("1"), "{stopping:?}");
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("llmd exits after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_in_the_abstract_namespace() {
    let notify = NotifySocket::abstract_name();
    let mut d = notified(
        Daemon::builder().config(ONE_KEY).env("T_KEY_A", "key-a"),
        &notify,
    );
    let ready = notify.next_state().await;
    assert_eq!(ready.get("READY"), Some("1"), "{ready:?}");
    d.signal(libc::SIGTERM);
    assert_eq!(notify.next_state().await.get("STOPPING"), Some("1"));
    assert!(d.wait_exit(Duration::from_secs(20)).unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_config_on_sighup_keeps_serving_and_says_why() {
    let notify = NotifySocket::at_path();
    let d = notified(
        Daemon::builder().config(ONE_KEY).env("T_KEY_A", "key-a"),
        &notify,
    );
    assert_eq!(notify.next_state().await.get("READY"), Some("1"));
    std::fs::write(config_path(&d), "[profiles.a\nprovider = ").unwrap();
    d.signal(libc::SIGHUP);
    let reloading = notify.next_state().await;
    assert_eq!(reloading.get("RELOADING"), Some("1"), "{reloading:?}");
    assert!(reloading.get("MONOTONIC_USEC").is_some(), "{reloading:?}");
    let ready = notify.next_state().await;
    assert_eq!(
        ready.get("READY"),
        Some("1"),
        "READY=1 must follow even a failed reload: {ready:?}"
    );
    let status = ready.get("STATUS").unwrap();
    assert!(
        status.contains("Reload failed") && status.contains("config.toml:1"),
        "{status}"
    );
    let c = d.client().await;
    assert_eq!(c.token("a", None).await.unwrap().token, "key-a");
    let names: Vec<String> = c
        .status()
        .await
        .unwrap()
        .profiles
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a"]);
    let logs = d.logs();
    assert!(
        logs.contains("reload failed; keeping the running configuration")
            && logs.contains("config.toml:1"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_only_while_the_socket_answers() {
    let notify = NotifySocket::at_path();
    let d = notified(
        Daemon::builder()
            .config(ONE_KEY)
            .env("T_KEY_A", "key-a")
            .env("WATCHDOG_USEC", "400000"),
        &notify,
    );
    let mut pings = 0;
    let mut ready = false;
    while pings < 3 {
        let m = notify.recv().await;
        if m.text == "WATCHDOG=1" {
            pings += 1;
        } else {
            assert_eq!(m.get("READY"), Some("1"), "{m:?}");
            ready = true;
        }
    }
    assert!(ready, "READY=1 comes with the first pings");

    // Unreachable at its path, llmd is as good as hung to its clients: no more pings.
    let moved = d.socket.with_extension("moved");
    std::fs::rename(&d.socket, &moved).unwrap();
    wait_for("pings to be withheld", Duration::from_secs(20), || {
        d.logs().contains("withholding watchdog pings")
    })
    .await;
    let mut buf = [0u8; 256];
    while notify.sock.try_recv(&mut buf).is_ok() {} // pings from before
    std::fs::rename(&moved, &d.socket).unwrap();
    assert_eq!(notify.recv().await.text, "WATCHDOG=1");
    assert!(d.logs().contains("watchdog pings resumed"), "{}", d.logs());
    assert_eq!(
        d.client().await.token("a", None).await.unwrap().token,
        "key-a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_and_leaves_the_socket_file_alone() {
    let notify = NotifySocket::at_path();
    let mut d = notified(
        Daemon::builder()
            .config(ONE_KEY)
            .env("T_KEY_A", "key-a")
            .env("WATCHDOG_USEC", "400000")
            .socket_activated(0o700),
        &notify,
    );
    let inode = std::fs::symlink_metadata(&d.socket).unwrap().ino();
    let out = d.llmctl(&["status"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai-compat"));
    assert_eq!(notify.next_state().await.get("READY"), Some("1"));
    // The watchdog probes the socket systemd passed, found through the fd alone.
    while notify.recv().await.text != "WATCHDOG=1" {}
    assert!(
        d.logs().contains("using the socket passed by systemd"),
        "{}",
        d.logs()
    );
    d.signal(libc::SIGTERM);
    assert_eq!(notify.next_state().await.get("STOPPING"), Some("1"));
    let status = d.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    let meta = std::fs::symlink_metadata(&d.socket).expect("the socket file stays");
    assert_eq!(meta.ino(), inode, "the socket file is systemd's, untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused_on_a_world_writable_activated_socket() {
    if !is_root() {
        eprintln!("needs root to connect as another uid; skipping");
        return;
    }
    // A 0777 socket in a 0755 folder, as `SocketMode=0777` would make it: llmd would refuse
    // that folder for a socket of its own, but must serve on one that systemd passes, and
    // then peer credentials are what keeps other users out.
    let mut d = Daemon::builder()
        .config(ONE_KEY)
        .env("T_KEY_A", "key-a")
        .socket_activated(0o755)
        .no_wait()
        .start();
    wait_for(
        "systemd-socket-activate to bind",
        Duration::from_secs(20),
        || d.socket.exists(),
    )
    .await;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    d.wait_ready(); // the first connection starts llmd
    assert_eq!(
        d.client().await.token("a", None).await.unwrap().token,
        "key-a"
    );
    let mode = std::fs::symlink_metadata(&d.socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o777, "llmd must not chmod a socket systemd made");
    for dir in [d.home.clone(), d.home.join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = r#"
import os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&d.socket)
        .output()
        .expect("python3 is needed to connect as another uid");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, then EOF: {text:?}");
    let e: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(e["error"]["code"], -32007, "{e}");
    assert_eq!(e["error"]["data"]["kind"], "permission_denied", "{e}");
    assert!(d.logs().contains("refused connection from another user"));
    assert_eq!(
        d.client().await.token("a", None).await.unwrap().token,
        "key-a"
    );
}

fn oauth_daemon(fake: &FakeOAuth, daemon_section: &str) -> llmd_tests::DaemonBuilder {
    let bundle = json!({
        "access_token": access_of(0),
        "refresh_token": refresh_of(0),
        // Valid for an hour: nothing refreshes until the test asks.
        "expires_at": now() + 3600,
    })
    .to_string();
    Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 60\n{daemon_section}\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file("state/llmd/oauth/work.json", &bundle, 0o600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_zero() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_secs(2);
    let notify = NotifySocket::at_path();
    let mut d = notified(
        oauth_daemon(&fake, "shutdown_grace_secs = 60\nrefresh_timeout_secs = 30"),
        &notify,
    );
    assert_eq!(notify.next_state().await.get("READY"), Some("1"));
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"token\",\"params\":{\"profile\":\"work\",\"min_valid_secs\":7200}}\n")
        .await;
    wait_for(
        "the refresh to reach the token endpoint",
        Duration::from_secs(20),
        || !fake.state().requests.is_empty(),
    )
    .await;
    d.signal(libc::SIGTERM);
    assert_eq!(notify.next_state().await.get("STOPPING"), Some("1"));
    // No longer accepting: the socket file went with the listener.
    wait_for("the socket to close", Duration::from_secs(20), || {
        !d.socket.exists()
    })
    .await;
    assert!(std::os::unix::net::UnixStream::connect(&d.socket).is_err());
    let answer = raw.recv().await.expect("the request in flight is answered");
    assert_eq!(answer["id"], 7);
    assert_eq!(answer["result"]["token"], access_of(1), "{answer}");
    assert!(raw.recv().await.is_none(), "then the connection is closed");
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("llmd exits once the request is done");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_requests_past_the_grace_period_and_exits_zero() {
    let fake = FakeOAuth::start(3600).await;
    fake.set_mode(Mode::Hang);
    let mut d = oauth_daemon(
        &fake,
        "shutdown_grace_secs = 1\nrefresh_timeout_secs = 3600",
    )
    .start();
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(b"{\"jsonrpc\":\"2.0\",\"id\":8,\"method\":\"token\",\"params\":{\"profile\":\"work\",\"min_valid_secs\":7200}}\n")
        .await;
    wait_for(
        "the refresh to hang at the token endpoint",
        Duration::from_secs(20),
        || fake.refresh_calls() > 0,
    )
    .await;
    d.signal(libc::SIGTERM);
    // Nothing but the grace period can end this request: upstream hangs for an hour and
    // the refresh timeout is as long.
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("llmd exits when the grace period is over");
    assert!(status.success(), "{status}");
    match raw.recv().await {
        None => {}
        Some(v) => assert!(
            v.get("result").is_none(),
            "a cut request has no result: {v}"
        ),
    }
    let logs = d.logs();
    assert!(
        logs.contains("grace period over; cancelling requests still in flight"),
        "{logs}"
    );
}

/// One journald native-protocol datagram: `KEY=value\n`, or `KEY\n` + u64 LE length +
/// value + `\n` for values that may hold anything.
fn parse_journal_entry(mut buf: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !buf.is_empty() {
        let nl = buf.iter().position(|&b| b == b'\n').expect("field ends");
        let line = &buf[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            buf = &buf[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &buf[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&rest[8..8 + len]).into_owned();
            assert_eq!(rest[8 + len], b'\n', "value of {key} ends with a newline");
            fields.insert(key, value);
            buf = &rest[8 + len + 1..];
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_gets_structured_fields_when_stderr_is_the_journal() {
    if !is_root() {
        eprintln!("needs root for a private mount namespace; skipping");
        return;
    }
    let unshare = tool_path("unshare");
    let probe = Command::new(&unshare)
        .args(["-m", "true"])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "this test runs llmd in a private mount namespace (unshare -m), which failed: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // journald's socket is a fixed path; inside llmd's own mount namespace that path is
    // this test's socket.
    let fake_run = tempfile::tempdir().unwrap();
    let journal_dir = fake_run.path().join("systemd/journal");
    std::fs::create_dir_all(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    let fake_run_path = fake_run.path().to_string_lossy().into_owned();
    let secret = "sk-journal-secret-value";
    let d = Daemon::builder()
        .config(ONE_KEY)
        .env("T_KEY_A", "key-a")
        .wrapped(&[
            &unshare.to_string_lossy(),
            "-m",
            "/bin/sh",
            "-c",
            "mount --bind \"$0\" /run && exec \"$1\"",
            &fake_run_path,
        ])
        .journal_stream()
        .start();
    let mut raw = Raw::connect(&d.socket).await;
    let hello = raw
        .call(
            1,
            "hello",
            json!({"client": "journal-agent", "version": "9"}),
        )
        .await;
    assert!(hello["result"].is_object(), "{hello}");
    let stored = raw
        .call(
            2,
            "credentials.set",
            json!({"profile": "a", "api_key": secret}),
        )
        .await;
    assert!(stored["result"].is_object(), "{stored}");

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    let stored_entry = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, journal.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no `credential stored` entry; got {entries:#?}"))
            .unwrap();
        if n == 0 {
            continue; // tracing-journald's connectivity check
        }
        let raw_entry = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            !raw_entry.contains(secret),
            "secret in the journal: {raw_entry}"
        );
        let e = parse_journal_entry(&buf[..n]);
        let done = e.get("MESSAGE").map(String::as_str) == Some("credential stored");
        entries.push(e.clone());
        if done {
            break e;
        }
    };
    let serving = entries
        .iter()
        .find(|e| e.get("MESSAGE").is_some_and(|m| m.contains("serving")))
        .unwrap_or_else(|| panic!("no start-up entry in {entries:#?}"));
    assert_eq!(serving["SYSLOG_IDENTIFIER"], "llmd");
    assert_eq!(serving["PRIORITY"], "5", "info is journald's notice");
    assert_eq!(serving["LLMD_SOCKET"], d.socket.to_string_lossy());
    assert!(serving["LLMD_PROFILES"].contains("\"a\""), "{serving:?}");
    assert_eq!(stored_entry["LLMD_PROFILE"], "a", "{stored_entry:?}");
    assert_eq!(
        stored_entry.get("LLMD_METHOD").map(String::as_str),
        Some("credentials.set"),
        "the request span's fields come through: {stored_entry:?}"
    );
    assert!(
        stored_entry
            .get("LLMD_AGENT")
            .is_some_and(|a| a.starts_with("journal-agent")),
        "{stored_entry:?}"
    );
    // Nothing went to stderr: the journal took it all.
    assert!(!d.logs().contains("credential stored"), "{}", d.logs());
}
