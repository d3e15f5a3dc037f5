//! Never lose a login: the refresh engine under unwritable files, late answers, reloads,
//! stale watches and hostile login files, seen from outside the real binary.

use llmd_proto::methods::ProfileState;
use llmd_proto::ErrorKind;
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth, Mode};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn bundle(generation: u64, expires_at: i64) -> String {
    json!({"access_token": access_of(generation), "refresh_token": refresh_of(generation), "expires_at": expires_at, "account_email": "dev@example.com"}).to_string()
}

fn claude_creds(generation: u64, expires_at: i64) -> String {
    json!({"claudeAiOauth": {"accessToken": access_of(generation), "refreshToken": refresh_of(generation), "expiresAt": expires_at * 1000, "scopes": ["user:inference"], "subscriptionType": "max"}}).to_string()
}

fn oauth_profile(fake: &FakeOAuth, name: &str, bundle_path: &str) -> String {
    format!(
        "[profiles.{name}]\nprovider = \"anthropic\"\nauth = \"oauth\"\nbundle = \"{bundle_path}\"\ntoken_endpoint = \"{}\"\n",
        fake.anthropic_url()
    )
}

fn daemon_section(extra: &str) -> String {
    format!("[daemon]\nrefresh_margin_secs = 60\nrefresh_timeout_secs = 3\nforced_refresh_interval_secs = 0\n{extra}\n")
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn file_refresh(path: &Path) -> Option<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v.get("refresh_token")
        .or_else(|| v.get("claudeAiOauth").and_then(|o| o.get("refreshToken")))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Mounts a tmpfs of `kib` KiB at `dir` (root only); `None` with a message otherwise.
fn small_tmpfs(dir: &Path, kib: u32) -> Option<Unmount> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={kib}k,mode=700"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system at `dir` until a write fails.
fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_cannot_be_saved_is_not_refreshed() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&(daemon_section("") + &oauth_profile(&fake, "work", "{home}/work.json")))
        .file("work.json", &bundle(0, now() + 3600), 0o600)
        .start();
    let c = d.client().await;
    let path = d.home.join("work.json");
    chmod(&path, 0o640);
    for _ in 0..2 {
        let e = c.refresh("work").await.unwrap_err();
        let e = e.rpc().unwrap();
        assert_eq!(e.kind(), ErrorKind::RefreshFailed, "{}", e.message);
        assert!(e.message.contains("could not be saved"), "{}", e.message);
    }
    assert_eq!(fake.refresh_calls(), 0, "the refresh token was never spent");
    chmod(&path, 0o600);
    assert_eq!(c.refresh("work").await.unwrap().token, access_of(1));
    assert_eq!(file_refresh(&path).as_deref(), Some(refresh_of(1).as_str()));
    no_profile_needs_login(&c).await;
}

/// No profile needs a login: what a restart would see works.
async fn no_profile_needs_login(c: &llmd_client::Client) {
    let s = c.status().await.unwrap();
    assert!(
        s.profiles
            .iter()
            .all(|p| p.state != ProfileState::NeedsLogin),
        "{:?}",
        s.profiles
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_costs_the_login() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&(daemon_section("") + &oauth_profile(&fake, "work", "{home}/small/work.json")))
        .start();
    let small = d.home.join("small");
    let Some(_mount) = small_tmpfs(&small, 64) else {
        return;
    };
    let path = small.join("work.json");
    std::fs::write(&path, bundle(0, now() + 3600)).unwrap();
    chmod(&path, 0o600);
    let mut c = d.client().await;
    c.reload().await.unwrap();
    fill(&small);
    for _ in 0..3 {
        let e = c.refresh("work").await.unwrap_err();
        assert!(
            e.rpc().unwrap().message.contains("could not be saved"),
            "{e}"
        );
    }
    assert_eq!(fake.refresh_calls(), 0);
    // The disk heals: the next refresh rotates and the file holds the live pair.
    std::fs::remove_file(small.join("filler")).unwrap();
    assert_eq!(c.refresh("work").await.unwrap().token, access_of(1));
    assert_eq!(file_refresh(&path).as_deref(), Some(refresh_of(1).as_str()));
    assert_eq!(fake.invalid_grants(), 0);
    // And a restarted daemon refreshes from it without a login.
    drop(c);
    let mut d = d;
    d.restart();
    c = d.client().await;
    assert_eq!(c.refresh("work").await.unwrap().token, access_of(2));
    assert_eq!(fake.invalid_grants(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_claude_folder_is_not_refreshed() {
    let fake = FakeOAuth::start(3600).await;
    let config = daemon_section("")
        + &format!(
            "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\nclaude_config_dir = \"{{home}}/claude-ro\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        );
    let d = Daemon::builder()
        .config(&config)
        .file(
            "claude-src/.credentials.json",
            &claude_creds(0, now() + 3600),
            0o600,
        )
        .start();
    let ro = d.home.join("claude-ro");
    std::fs::create_dir_all(&ro).unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(d.home.join("claude-src"))
        .arg(&ro)
        .status();
    let remount = Command::new("mount")
        .args(["-o", "remount,ro,bind"])
        .arg(&ro)
        .status();
    if !(bind.is_ok_and(|s| s.success()) && remount.is_ok_and(|s| s.success())) {
        eprintln!("SKIPPED: cannot make a read-only bind mount here (needs root)");
        return;
    }
    let _mount = Unmount(ro.clone());
    let c = d.client().await;
    c.reload().await.unwrap();
    assert_eq!(c.token("claude", None).await.unwrap().token, access_of(0));
    let e = c.refresh("claude").await.unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::RefreshFailed, "{e}");
    assert_eq!(
        fake.refresh_calls(),
        0,
        "Claude Code's refresh token was not spent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_the_timeout_is_kept() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().answer_delay = Duration::from_secs(5);
    let d = Daemon::builder()
        .config(&(daemon_section("") + &oauth_profile(&fake, "work", "{home}/work.json")))
        .file("work.json", &bundle(0, now() + 3600), 0o600)
        .start();
    let c = d.client().await;
    let e = c.refresh("work").await.unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::RefreshFailed);
    assert_eq!(
        fake.generation(),
        1,
        "the authority rotated before answering"
    );
    wait_for(
        "the late answer to be written",
        Duration::from_secs(10),
        || file_refresh(&d.home.join("work.json")).as_deref() == Some(refresh_of(1).as_str()),
    )
    .await;
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(1));
    fake.state().answer_delay = Duration::ZERO;
    assert_eq!(c.refresh("work").await.unwrap().token, access_of(2));
    assert_eq!(fake.invalid_grants(), 0);
    assert_eq!(fake.refresh_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoints_retry_after_is_honoured() {
    let fake = FakeOAuth::start(3600).await;
    fake.set_mode(Mode::TooMany);
    let d = Daemon::builder()
        .config(&(daemon_section("") + &oauth_profile(&fake, "work", "{home}/work.json")))
        .file("work.json", &bundle(0, now() + 30), 0o600)
        .start();
    let c = d.client().await;
    wait_for("the first attempt", Duration::from_secs(5), || {
        fake.refresh_calls() >= 1
    })
    .await;
    // Without retry-after the backoff would have retried within about 1.2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.refresh_calls(), 1);
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_refresh_never_start_a_second_one() {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = Duration::from_millis(1500);
    let base = daemon_section("");
    let with = |client_id: &str| {
        format!(
            "{base}[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\nbundle = \"{{home}}/work.json\"\ntoken_endpoint = \"{}\"\nclient_id = \"{client_id}\"\n\n[profiles.key]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n",
            fake.anthropic_url()
        )
    };
    let without = format!("{base}[profiles.key]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n");
    let d = Daemon::builder()
        .config(&with("one"))
        .env("K", "sk-k")
        .file("work.json", &bundle(0, now() + 3600), 0o600)
        .start();
    let cfg = d.home.join("config/llmd/config.toml");
    let write = |text: &str| {
        std::fs::write(&cfg, text.replace("{home}", &d.home.to_string_lossy())).unwrap()
    };
    let c = d.client().await;
    let refreshing = {
        let c = c.clone();
        tokio::spawn(async move { c.refresh("work").await })
    };
    wait_for(
        "the refresh to reach the endpoint",
        Duration::from_secs(5),
        || !fake.state().requests.is_empty(),
    )
    .await;
    // Another client id, then the profile dropped and added again, all while R0 is out.
    write(&with("two"));
    c.reload().await.unwrap();
    write(&without);
    c.reload().await.unwrap();
    write(&with("three"));
    c.reload().await.unwrap();
    assert_eq!(refreshing.await.unwrap().unwrap().token, access_of(1));
    // The re-added profile needs a token valid for longer than the one it has: it is
    // served from R1, not by refreshing R0 again.
    let _ = c.token("work", Some(7200)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.invalid_grants(), 0, "R0 was presented once");
    assert_eq!(
        c.token("work", None).await.unwrap().token,
        access_of(fake.generation())
    );
    assert_eq!(
        file_refresh(&d.home.join("work.json")).as_deref(),
        Some(refresh_of(fake.generation()).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_config_on_reload_keeps_the_running_one() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&(daemon_section("") + &oauth_profile(&fake, "work", "{home}/work.json")))
        .file("work.json", &bundle(0, now() + 3600), 0o600)
        .start();
    let cfg = d.home.join("config/llmd/config.toml");
    let c = d.client().await;
    std::fs::write(&cfg, "").unwrap();
    let e = c.reload().await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert_eq!(c.token("work", None).await.unwrap().token, access_of(0));
    std::fs::write(&cfg, "\n  \n").unwrap();
    assert!(c.reload().await.is_err());
    assert_eq!(c.status().await.unwrap().profiles.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_margin_reaches_the_running_login() {
    let fake = FakeOAuth::start(3600).await;
    let profile = oauth_profile(&fake, "work", "{home}/work.json");
    let d = Daemon::builder()
        .config(&format!("[daemon]\nrefresh_margin_secs = 60\n{profile}"))
        .file("work.json", &bundle(0, now() + 200), 0o600)
        .start();
    let c = d.client().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.refresh_calls(), 0, "200 s left, 60 s margin");
    std::fs::write(
        d.home.join("config/llmd/config.toml"),
        format!("[daemon]\nrefresh_margin_secs = 300\n{profile}")
            .replace("{home}", &d.home.to_string_lossy()),
    )
    .unwrap();
    c.reload().await.unwrap();
    wait_for(
        "a refresh under the new margin",
        Duration::from_secs(10),
        || fake.generation() == 1,
    )
    .await;
}

fn claude_config(fake: &FakeOAuth, dir: &str) -> String {
    daemon_section("")
        + &format!(
            "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\nclaude_config_dir = \"{dir}\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        )
}

/// What another program does: write a temp file and rename it over the target.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-writer");
    std::fs::write(&tmp, contents).unwrap();
    chmod(&tmp, 0o600);
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_folder_removed_and_made_again_is_still_watched() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&claude_config(&fake, "{home}/.claude"))
        .file(
            ".claude/.credentials.json",
            &claude_creds(0, now() + 3600),
            0o600,
        )
        .start();
    let c = d.client().await;
    assert_eq!(c.token("claude", None).await.unwrap().token, access_of(0));
    let dir = d.home.join(".claude");
    std::fs::remove_dir_all(&dir).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir(&dir).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replace(
        &dir.join(".credentials.json"),
        &claude_creds(5, now() + 3600),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if c.token("claude", None).await.map(|t| t.token).ok() == Some(access_of(5)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new login was not picked up without a reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And later renames too.
    replace(
        &dir.join(".credentials.json"),
        &claude_creds(6, now() + 3600),
    );
    wait_tok(&c, "claude", &access_of(6)).await;
    assert_eq!(fake.refresh_calls(), 0);
}

async fn wait_tok(c: &llmd_client::Client, profile: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = c.token(profile, None).await.map(|t| t.token);
        if got.as_deref().ok() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repointed_credentials_symlink_is_followed() {
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&claude_config(&fake, "{home}/.claude"))
        .file("a/creds.json", &claude_creds(0, now() + 3600), 0o600)
        .file("b/creds.json", &claude_creds(3, now() + 3600), 0o600)
        .start();
    let link = d.home.join(".claude/.credentials.json");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(d.home.join("a/creds.json"), &link).unwrap();
    let c = d.client().await;
    c.reload().await.unwrap();
    wait_tok(&c, "claude", &access_of(0)).await;
    // Re-point the link (as `ln -sfn` does: a new link renamed over the old).
    let tmp = d.home.join(".claude/.newlink");
    std::os::unix::fs::symlink(d.home.join("b/creds.json"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    wait_tok(&c, "claude", &access_of(3)).await;
    // A change to the new target is seen.
    replace(&d.home.join("b/creds.json"), &claude_creds(4, now() + 3600));
    wait_tok(&c, "claude", &access_of(4)).await;
    // A deleted target is not served any more.
    std::fs::remove_file(d.home.join("b/creds.json")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.token("claude", None).await.is_ok() {
        assert!(Instant::now() < deadline, "a deleted login is still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_and_dev_zero_login_files_neither_freeze_nor_bloat_the_daemon() {
    let fake = FakeOAuth::start(3600).await;
    let config = daemon_section("")
        + &oauth_profile(&fake, "one", "{home}/one.json")
        + "\n"
        + &oauth_profile(&fake, "two", "{home}/two.json")
        + "\n"
        + &oauth_profile(&fake, "three", "{home}/three.json")
        + "\n[profiles.key]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n";
    let d = Daemon::builder()
        .config(&config)
        .env("K", "sk-k")
        .file("one.json", &bundle(0, now() + 3600), 0o600)
        .file("two.json", &bundle(0, now() + 3600), 0o600)
        .file("three.json", &bundle(0, now() + 3600), 0o600)
        .start();
    for name in ["one.json", "two.json"] {
        let p = d.home.join(name);
        std::fs::remove_file(&p).unwrap();
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    }
    std::fs::remove_file(d.home.join("three.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.home.join("three.json")).unwrap();
    let c = d.client().await;
    let deadline = Duration::from_secs(5);
    let _ = tokio::time::timeout(deadline, c.reload())
        .await
        .expect("reload answers");
    for p in ["one", "two", "three"] {
        let _ = tokio::time::timeout(deadline, c.token(p, Some(7200)))
            .await
            .expect("token answers");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = tokio::time::timeout(deadline, c.status())
        .await
        .expect("status answers")
        .unwrap();
    for p in s.profiles.iter().filter(|p| p.name != "key") {
        let err = p.last_error.clone().unwrap_or_default();
        assert!(err.contains("not a regular file"), "{}: {err}", p.name);
    }
    let k = tokio::time::timeout(deadline, c.token("key", None))
        .await
        .expect("api key answers");
    assert_eq!(k.unwrap().token, "sk-k");
    let rss = rss_kib(d.pid().unwrap());
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
}
