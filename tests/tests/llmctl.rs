//! A new user's first day with llmctl, against the real binaries: errors that say why,
//! every login reachable (MiniMax's user-code flow included), where keys come from, and
//! llmctl's manners (exit codes, --json, doctor, env, exec, embed, completion).

use llmd_proto::methods::{event_kinds, LoginFinishParams};
use llmd_proto::ErrorKind;
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::fake_providers::{Failure, FakeProviders};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};
use std::time::Duration;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn err(o: &Output) -> String {
    text(&o.stderr)
}

fn out(o: &Output) -> String {
    text(&o.stdout)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const KEYED: &str =
    "[profiles.p]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"T_KEY\"\n";

// Finding 1: the body the daemon sends is printed, and the exit code says "upstream".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_prints_the_provider_body() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.bad]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_KEY\"\nbase_url = \"{}\"\ndefault_model = \"gpt-x\"\n",
        fake.openai_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("T_KEY", "sk-wrong")
        .start();
    fake.fail_next(1, Failure::Status(401));
    let o = d.llmctl(&["chat", "bad", "hi"]);
    assert_eq!(o.status.code(), Some(6), "{}", err(&o));
    let e = err(&o);
    assert!(e.contains("HTTP 401"), "{e}");
    assert!(
        e.contains("provider said:") && e.contains("invalid x-api-key"),
        "{e}"
    );
}

// Finding 3: `[daemon] socket` (with `$HOME` expanded) is where a bare llmctl looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_finds_the_socket_from_the_config() {
    let cfg = format!("[daemon]\nsocket = \"$HOME/custom/llmd.sock\"\n{KEYED}");
    let d = Daemon::builder()
        .config(&cfg)
        .env("T_KEY", "sk-x")
        .no_wait()
        .start();
    let sock = d.home.join("custom/llmd.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket; log:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = d.llmctl_command().args(["token", "p"]).output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(o.stdout, b"sk-x\n");
    let o = d.llmctl_command().arg("env").output().unwrap();
    assert_eq!(
        out(&o),
        format!("export LLMD_SOCKET='{}'\n", sock.display())
    );
    // --socket still wins.
    let o = d
        .llmctl_command()
        .args(["--socket", "/nonexistent/llmd.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
}

// Findings 4 and 8 (set-key raises profile.state): a stored key says it wins, status shows
// each source, logout removes it after a confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_key_is_visible_and_removable() {
    let d = Daemon::builder()
        .config(KEYED)
        .env("T_KEY", "sk-good")
        .start();
    let o = d.llmctl(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["profiles"][0]["source"]["kind"], "env");
    assert_eq!(v["profiles"][0]["source"]["location"], "T_KEY");

    let c = d.client().await;
    let mut events = c.subscribe(&[event_kinds::PROFILE_STATE]).await.unwrap();
    let o = d.llmctl_stdin(&["set-key", "p"], "sk-typo\n");
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("wins over env T_KEY"), "{}", err(&o));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("profile.state after set-key")
        .expect("event");
    assert_eq!(ev.profile, "p");

    let o = d.llmctl(&["status"]);
    let t = out(&o);
    assert!(t.contains("SOURCE") && t.contains("stored"), "{t}");
    assert!(t.contains("overrides env T_KEY"), "{t}");
    assert!(t.contains("wins over api_key_file"), "{t}");
    assert_eq!(d.llmctl(&["token", "p"]).stdout, b"sk-typo\n");

    // Without a terminal and without --yes, logout refuses.
    let o = d.llmctl_stdin(&["logout", "p"], "");
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("--yes"));
    let o = d.llmctl(&["logout", "p", "--yes"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("removed"), "{}", out(&o));
    assert_eq!(d.llmctl(&["token", "p"]).stdout, b"sk-good\n");
}

// Finding 7: `~` in a path setting is the home folder, not a folder named `~`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tilde_in_state_dir_is_expanded() {
    let cfg = format!("[daemon]\nstate_dir = \"~/mystate\"\n{KEYED}");
    let d = Daemon::builder().config(&cfg).start();
    let o = d.llmctl_stdin(&["set-key", "p"], "sk-stored\n");
    assert!(o.status.success(), "{}", err(&o));
    assert!(d.home.join("mystate/keys/p.key").exists());
    // A relative path is refused with the key named.
    let bad = d.home.join("bad.toml");
    std::fs::write(&bad, "[daemon]\nstate_dir = \"rel/dir\"\n").unwrap();
    let o = d
        .llmd_command()
        .arg("--check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        err(&o).contains("daemon.state_dir") && err(&o).contains("absolute"),
        "{}",
        err(&o)
    );
}

// Finding 8: a missing key is its own kind (not needs_login) and exit code 5; status says
// a profile needs attention with exit 5 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_is_missing_credential() {
    let d = Daemon::builder().config(KEYED).start();
    let c = d.client().await;
    let e = c.token("p", None).await.unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::MissingCredential, "{e}");
    assert_eq!(e.rpc().unwrap().code, -32009);
    let o = d.llmctl(&["token", "p"]);
    assert_eq!(o.status.code(), Some(5), "{}", err(&o));
    let o = d.llmctl(&["status"]);
    assert_eq!(o.status.code(), Some(5));
    let o = d.llmctl_stdin(&["set-key", "p"], "sk-now\n");
    assert!(o.status.success());
    assert_eq!(d.llmctl(&["status"]).status.code(), Some(0));
    assert_eq!(d.llmctl(&["token", "ghost"]).status.code(), Some(4));
}

// Finding 8: the wrong labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mistakes_are_not_upstream_failures() {
    let oauth = FakeOAuth::start(3600).await;
    let cfg = format!(
        "{KEYED}[profiles.st]\nprovider = \"anthropic\"\nauth = \"setup-token\"\n\
         [profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
        oauth.anthropic_url()
    );
    let d = Daemon::builder().config(&cfg).env("T_KEY", "sk-k").start();
    let c = d.client().await;
    // The setup-token hint names --setup-token, in status and in the token error.
    let o = d.llmctl(&["token", "st"]);
    assert!(
        err(&o).contains("llmctl set-key st --setup-token"),
        "{}",
        err(&o)
    );
    assert!(out(&d.llmctl(&["status"])).contains("--setup-token"));
    // set-key on a setup-token profile names --setup-token.
    let o = d.llmctl_stdin(&["set-key", "st"], "sk-ant-oat01-xxxx\n");
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("--setup-token"), "{}", err(&o));
    // login on an API-key profile points at set-key.
    let o = d.llmctl_stdin(&["login", "p"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("llmctl set-key p"), "{}", err(&o));
    // refresh on an API-key profile is not "refreshed".
    let o = d.llmctl(&["refresh", "p"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("nothing to refresh"), "{}", err(&o));
    assert!(!out(&o).contains("refreshed"));
    // An empty pasted code and a state mismatch are the user's, not the provider's.
    c.login_start("work").await.unwrap();
    let e = c.login_finish("work", "  ").await.unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::InvalidParams, "{e}");
    let e = c
        .login_finish("work", "abc#not-the-state")
        .await
        .unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::InvalidParams, "{e}");
    assert!(e.to_string().contains("state mismatch"), "{e}");
    // embed on Anthropic is refused before any request.
    let o = d.llmctl(&["embed", "p", "hello"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("no embeddings API") && !err(&o).contains("(upstream)"));
    assert_eq!(oauth.state().requests.len(), 0);
}

// Finding 8: a corrupt Claude Code login file says why instead of "not logged in".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_login_file_is_not_shown_as_logged_out() {
    let cfg = "[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\n";
    let d = Daemon::builder()
        .config(cfg)
        .file(".claude/.credentials.json", "{ this is not json", 0o600)
        .start();
    let o = d.llmctl(&["status"]);
    let t = out(&o);
    assert!(!t.contains("not logged in"), "{t}");
    assert!(t.contains("Claude Code"), "{t}");
    assert_eq!(o.status.code(), Some(5));
}

// Finding 6: a shared folder like /tmp gets "use a private folder", never "chmod 700".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_socket_folder_gets_harmless_advice() {
    let d = Daemon::builder().config(KEYED).start();
    let shared = d.home.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let o = d
        .llmd_command()
        .arg("--socket")
        .arg(shared.join("llmd.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = err(&o);
    assert!(!e.contains("chmod"), "{e}");
    assert!(e.contains("private folder") && e.contains("llmd-"), "{e}");
}

// Finding 9: --check-config checks that every profile has a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_profiles_without_credentials() {
    let d = Daemon::builder().config(KEYED).start();
    let o = d.llmd_command().arg("--check-config").output().unwrap();
    assert!(!o.status.success());
    assert!(
        out(&o).contains("p: MISSING") && out(&o).contains("T_KEY"),
        "{}",
        out(&o)
    );
    assert!(
        err(&o).contains("1 of 1 profiles have no credential"),
        "{}",
        err(&o)
    );
    let o = d
        .llmd_command()
        .arg("--check-config")
        .env("T_KEY", "sk-x")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("ok (1 profiles)"));
}

// Finding 9: broken pipe, --help, hello, the Python example.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_manners() {
    let d = Daemon::builder().config(KEYED).env("T_KEY", "sk-x").start();
    // A reader that is already gone: llmctl must not panic.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let write_end: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fds[1]) };
    let o = d
        .llmctl_command()
        .args(["completions", "bash"])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!err(&o).contains("panicked"), "{}", err(&o));

    let o = d.llmctl(&["--help"]);
    let first = out(&o).lines().next().unwrap_or("").to_owned();
    assert!(
        first.contains("llmd") && first.contains("tokens"),
        "{first}"
    );
    assert!(out(&o).contains("Exit codes"));

    let o = d.llmctl(&["token", "p"]);
    assert!(o.status.success());
    assert!(
        d.logs().contains("llmctl"),
        "no hello from llmctl in the log"
    );
    assert!(d.logs().contains("agent=\"llmctl") || d.logs().contains("agent=llmctl"));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/llmd_client.py");
    if let Ok(o) = std::process::Command::new("python3").arg(script).output() {
        assert_eq!(o.status.code(), Some(2));
        assert!(
            err(&o).contains("Usage:") && !err(&o).contains("Traceback"),
            "{}",
            err(&o)
        );
    }
}

// Deliver 2: MiniMax's user-code login, end to end, into the bundle the refresh engine owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_login_with_a_user_code() {
    let oauth = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.mm]\nprovider = \"minimax\"\nauth = \"oauth\"\nregion = \"{}\"\n",
        oauth.region()
    );
    let d = Daemon::builder().config(&cfg).start();
    let o = d.llmctl(&["status"]);
    assert!(
        out(&o).contains("not logged in: run llmctl login mm"),
        "{}",
        out(&o)
    );
    let o = d.llmctl_stdin(&["login", "mm", "--no-browser"], "");
    assert!(o.status.success(), "{}\n{}", err(&o), d.logs());
    assert!(err(&o).contains("MMCODE-1"), "{}", err(&o));
    assert!(out(&o).contains("mm: logged in, expires in"), "{}", out(&o));
    assert_eq!(
        d.llmctl(&["token", "mm"]).stdout,
        format!("{}\n", access_of(1)).as_bytes()
    );
    let bundle: Value = serde_json::from_str(
        &std::fs::read_to_string(d.home.join("state/llmd/oauth/mm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(bundle["refresh_token"], refresh_of(1));
    // The requests had the shape MiniMax's clients send.
    let reqs: Vec<Value> = oauth
        .state()
        .requests
        .iter()
        .map(|(v, _)| v.clone())
        .collect();
    assert_eq!(reqs[0]["response_type"], "code");
    assert_eq!(reqs[0]["code_challenge_method"], "S256");
    assert_eq!(
        reqs[1]["grant_type"],
        "urn:ietf:params:oauth:grant-type:user_code"
    );
    assert_eq!(reqs[1]["user_code"], "MMCODE-1");
    assert!(reqs.len() >= 3, "one pending poll, then success");
    // And the refresh engine owns the new login.
    let c = d.client().await;
    let t = c.refresh("mm").await.unwrap();
    assert_eq!(t.token, access_of(2));
    // finish without start is a usage error.
    let e: llmd_client::Error = c
        .call::<_, Value>(
            llmd_proto::methods::names::LOGIN_FINISH,
            &LoginFinishParams {
                profile: "mm".into(),
                code: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.rpc().unwrap().kind(), ErrorKind::InvalidParams);
}

// Deliver 4: login offers the browser; --browser opens it without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_opens_the_browser() {
    let oauth = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
        oauth.anthropic_url()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .file(
            "browser.sh",
            "#!/bin/sh\nprintf '%s' \"$1\" > \"$HOME/opened\"\n",
            0o755,
        )
        .start();
    let browser = d.home.join("browser.sh");
    let mut child = d
        .llmctl_command()
        .env("LLMD_SOCKET", &d.socket)
        .env("BROWSER", &browser)
        .args(["login", "work", "--browser"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "the empty code is refused");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let opened = d.home.join("opened");
    while !opened.exists() {
        assert!(std::time::Instant::now() < deadline, "browser not started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let url = std::fs::read_to_string(&opened).unwrap_or_default();
        if url.contains("code_challenge") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "browser got {url}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Deliver 4: exec, embed, --json, doctor, completion, colour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_embed_doctor_and_completion() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "{KEYED}[profiles.oai]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_OAI\"\nbase_url = \"{}\"\n\
         [profiles.nokey]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_key_env = \"T_NONE\"\n",
        fake.openai_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("T_KEY", "sk-ant-x")
        .env("T_OAI", "sk-oai-x")
        .start();
    let o = d.llmctl(&[
        "exec",
        "p",
        "--",
        "sh",
        "-c",
        "test \"$ANTHROPIC_API_KEY\" = sk-ant-x && echo key-ok; test -z \"$ANTHROPIC_BASE_URL\" && echo default-base",
    ]);
    assert_eq!(out(&o), "key-ok\ndefault-base\n", "{}", err(&o));
    let o = d.llmctl(&[
        "exec",
        "oai",
        "--",
        "sh",
        "-c",
        "test \"$OPENAI_API_KEY\" = sk-oai-x && echo key-ok; echo \"$OPENAI_BASE_URL\"",
    ]);
    assert_eq!(
        out(&o),
        format!("key-ok\n{}\n", fake.openai_base()),
        "{}",
        err(&o)
    );

    let o = d.llmctl(&["embed", "oai", "-m", "emb", "alpha", "beta"]);
    assert!(o.status.success(), "{}", err(&o));
    let lines: Vec<Vec<f32>> = out(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        llmd_tests::fake_providers::fake_embedding("alpha")
    );

    for args in [
        vec!["token", "p", "--json"],
        vec!["reload", "--json"],
        vec!["tools", "list", "--json"],
        vec!["ping", "-n", "2", "--json"],
        vec!["env", "--json"],
    ] {
        let o = d.llmctl(&args);
        assert!(o.status.success(), "{args:?}: {}", err(&o));
        serde_json::from_slice::<Value>(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", out(&o)));
    }

    let o = d.llmctl(&["doctor", "--net"]);
    assert_eq!(o.status.code(), Some(1), "nokey fails");
    let t = out(&o);
    assert!(t.contains("socket folder") && t.contains("0700"), "{t}");
    assert!(
        t.contains("FAIL  profile nokey") && t.contains("env T_NONE"),
        "{t}"
    );
    assert!(t.contains("key variables the daemon sees"), "{t}");
    assert!(
        t.contains("reach 127.0.0.1") && t.contains("TCP connect works"),
        "{t}"
    );
    assert!(!t.contains('\x1b'), "no colour into a pipe");
    let o = d.llmctl(&["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["check"] == "profile p" && c["level"] == "ok"));

    let o = d
        .llmctl_command()
        .env("LLMD_SOCKET", &d.socket)
        .env("COMPLETE", "fish")
        .args(["--", "llmctl", "token", ""])
        .output()
        .unwrap();
    let t = out(&o);
    assert!(
        t.contains("nokey") && t.contains("oai") && t.contains("p\t"),
        "{t}"
    );
    let o = d.llmctl(&["completions", "zsh"]);
    assert!(out(&o).contains("COMPLETE=\"zsh\""), "{}", out(&o));
}

// Deliver 4: a missing model says how to give one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_model_says_how_to_name_one() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.oai]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_OAI\"\nbase_url = \"{}\"\n\
         [profiles.dm]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_OAI\"\nbase_url = \"{}\"\ndefault_model = \"gpt-default\"\n",
        fake.openai_base(),
        fake.openai_base()
    );
    let d = Daemon::builder().config(&cfg).env("T_OAI", "sk-o").start();
    let o = d.llmctl(&["chat", "oai", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("-m MODEL") && err(&o).contains("default_model"),
        "{}",
        err(&o)
    );
    let o = d.llmctl(&["chat", "dm", "hi"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(fake.last_request().body["model"], "gpt-default");
}

// Deliver 3: a removed OAuth bundle is gone and the profile asks for a login again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_removes_an_oauth_bundle() {
    let oauth = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
        oauth.anthropic_url()
    );
    let bundle = json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 3600});
    let d = Daemon::builder()
        .config(&cfg)
        .file("state/llmd/oauth/work.json", &bundle.to_string(), 0o600)
        .start();
    let c = d.client().await;
    c.token("work", None).await.unwrap();
    let o = d.llmctl(&["logout", "work", "--yes", "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["removed"][0]
        .as_str()
        .unwrap()
        .ends_with("oauth/work.json"));
    assert!(!d.home.join("state/llmd/oauth/work.json").exists());
    let o = d.llmctl(&["token", "work"]);
    assert_eq!(o.status.code(), Some(5), "the login is gone: {}", out(&o));
}

/// The `script` command (util-linux) runs a command on a pseudo-terminal; these tests are
/// skipped without it.
fn script_tool() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("script"))
        .find(|p| p.is_file())
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

// Deliver 4: colour on a terminal, none with NO_COLOR (and none into a pipe, above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let Some(script) = script_tool() else {
        eprintln!("`script` not installed; skipping");
        return;
    };
    let d = Daemon::builder().config(KEYED).env("T_KEY", "sk-x").start();
    let llmctl = llmd_tests::bin_path("llmctl");
    let cmd = shell_words(&[llmctl.to_str().unwrap(), "status"]);
    let run = |no_color: bool| {
        let mut c = std::process::Command::new(&script);
        c.env_clear();
        for (k, v) in d.llmctl_command().get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c.env("LLMD_SOCKET", &d.socket).env("TERM", "xterm");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        c.args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(false);
    assert!(out(&o).contains("\x1b[32m"), "{:?}", out(&o));
    let o = run(true);
    assert!(out(&o).contains("PROFILE"), "{:?}", out(&o));
    assert!(!out(&o).contains('\x1b'), "{:?}", out(&o));
}

/// Waits until the terminal of `script`'s child has echo turned off.
fn wait_for_echo_off(script_pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "echo never turned off"
        );
        let children =
            std::fs::read_to_string(format!("/proc/{script_pid}/task/{script_pid}/children"))
                .unwrap_or_default();
        for pid in children.split_whitespace() {
            let Ok(tty) = std::fs::File::open(format!("/proc/{pid}/fd/0")) else {
                continue;
            };
            use std::os::fd::AsRawFd;
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } == 0
                && t.c_lflag & libc::ECHO == 0
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// Finding 9: set-key does not echo the key typed on a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_key_on_a_terminal_hides_the_key() {
    use std::io::{Read, Write};
    let Some(script) = script_tool() else {
        eprintln!("`script` not installed; skipping");
        return;
    };
    let d = Daemon::builder().config(KEYED).start();
    let llmctl = llmd_tests::bin_path("llmctl");
    let cmd = shell_words(&[llmctl.to_str().unwrap(), "set-key", "p"]);
    let mut c = std::process::Command::new(&script);
    c.env_clear();
    for (k, v) in d.llmctl_command().get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    let mut child = c
        .env("LLMD_SOCKET", &d.socket)
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_echo_off(child.id());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"sk-typed-on-tty\r").unwrap();
    let mut output = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success(), "{output}");
    assert!(
        output.contains("input hidden") && output.contains("p: stored"),
        "{output}"
    );
    assert!(!output.contains("sk-typed"), "the key was echoed");
    assert_eq!(d.llmctl(&["token", "p"]).stdout, b"sk-typed-on-tty\n");
}

// Deliver 6: the daemon sends provider traffic through HTTP(S)_PROXY from its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_requests_go_through_the_proxy_from_the_environment() {
    // The fake provider doubles as the proxy: an absolute-form request to an unresolvable
    // host can only reach it through the proxy setting.
    let fake = FakeProviders::start().await;
    let base = fake.openai_base();
    let path = base
        .split_once("//")
        .unwrap()
        .1
        .split_once('/')
        .map_or("", |(_, p)| p);
    let cfg = format!(
        "[profiles.oai]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_OAI\"\nbase_url = \"http://provider.invalid/{path}\"\ndefault_model = \"m\"\n"
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("T_OAI", "sk-o")
        .env("HTTP_PROXY", &fake.url())
        .start();
    let o = d.llmctl(&["chat", "oai", "hi"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(fake.chat_requests().len(), 1);
}

// Finding 9 / Deliver 4: exec gives an OAuth login's token with the beta header it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_an_oauth_login_sets_the_beta_header() {
    let oauth = FakeOAuth::start(3600).await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nbase_url = \"http://127.0.0.1:9/\"\n",
        oauth.anthropic_url()
    );
    let bundle = json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 3600});
    let d = Daemon::builder()
        .config(&cfg)
        .file("state/llmd/oauth/work.json", &bundle.to_string(), 0o600)
        .start();
    let script = format!(
        "test \"$ANTHROPIC_AUTH_TOKEN\" = {} && echo token-ok; test -z \"$ANTHROPIC_API_KEY\" && echo no-key; printf '%s\\n' \"$ANTHROPIC_CUSTOM_HEADERS\" \"$ANTHROPIC_BASE_URL\" \"$LLMD_PROFILE\"",
        access_of(0)
    );
    let o = d.llmctl(&["exec", "work", "--", "sh", "-c", &script]);
    assert_eq!(
        out(&o),
        "token-ok\nno-key\nanthropic-beta: oauth-2025-04-20\nhttp://127.0.0.1:9/\nwork\n",
        "{}",
        err(&o)
    );
    let o = d.llmctl(&["exec", "work", "--", "/nonexistent/cmd"]);
    assert_eq!(o.status.code(), Some(127));
}

// Deliver 6: a provider whose certificate comes from a CA in the system's trust store (as a
// corporate TLS proxy's does) is reachable; the same CA outside it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_certificates_are_checked_against_the_system_roots() {
    let tls = llmd_tests::fake_tls::FakeTls::start().await;
    let cfg = format!(
        "[profiles.corp]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"T_OAI\"\nbase_url = \"{}\"\ndefault_model = \"m\"\n",
        tls.base_url()
    );
    // Without the CA: refused, and the error says it is the provider that failed.
    let d = Daemon::builder().config(&cfg).env("T_OAI", "sk-o").start();
    let o = d.llmctl(&["chat", "corp", "--json", "hi"]);
    assert_eq!(o.status.code(), Some(6), "{}", err(&o));
    drop(d);
    // With the CA in the system store (SSL_CERT_FILE is how rustls-native-certs finds it).
    let d = Daemon::builder()
        .config(&cfg)
        .env("T_OAI", "sk-o")
        .file("ca.pem", &tls.ca_pem, 0o644)
        .env("SSL_CERT_FILE", "{home}/ca.pem")
        .start();
    let o = d.llmctl(&["chat", "corp", "--json", "hi"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("tls ok"), "{}", out(&o));
}

// Findings 5 and 9 (docs): the service reads its keys from ~/.config/llmd/env, and the README
// gives a new user what the issue found missing.
#[test]
fn unit_and_readme_give_a_new_user_the_way_in() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let unit = std::fs::read_to_string(format!("{root}/systemd/llmd.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == "EnvironmentFile=-%E/llmd/env"),
        "the service has a keys file"
    );
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    for needle in [
        "~/.config/llmd/env",
        "systemctl --user edit llmd",
        "LLMD_LOG",
        "cargo install --locked --path daemon && cargo install --locked --path cli",
        "## Troubleshooting",
        "llmctl doctor",
        "Anthropic's terms",
        "HTTPS_PROXY",
        "llmctl exec work -- my-agent",
    ] {
        assert!(readme.contains(needle), "README lacks {needle:?}");
    }
    // The socat example is one line (a line break ends a request) with -t for streams.
    let socat: Vec<&str> = readme.lines().filter(|l| l.contains("socat -")).collect();
    assert!(!socat.is_empty());
    for l in socat {
        assert!(l.starts_with("echo '{") && l.contains("socat -t "), "{l}");
    }
    assert!(!readme.contains("ANTHROPIC_AUTH_TOKEN=$(llmctl token work) my-agent"));
    assert!(!readme.contains("-p llmd-client --bin llmctl"));
}
