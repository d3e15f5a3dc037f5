//! Socket server, protocol, API-key profiles and llmctl, against the real binaries.

use llmd_tests::raw::Raw;
use llmd_tests::Daemon;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const FOUR_PROVIDERS: &str = r#"
[profiles.ant]
provider = "anthropic"
auth = "api-key"
api_key_env = "T_ANT_KEY"

[profiles.oai]
provider = "openai-compat"
auth = "api-key"
api_key_env = "T_OAI_KEY"

[profiles.gem]
provider = "gemini"
auth = "api-key"
api_key_file = "{home}/gemini.key"

[profiles.mm]
provider = "minimax"
auth = "api-key"
api_key_env = "T_MM_KEY"
group_id = "grp-7"
"#;

/// The connection count once it reaches `want` (closed probes are noticed asynchronously),
/// or the last value seen after two seconds.
async fn connections_settle(c: &llmd_client::Client, want: u64) -> u64 {
    let mut n = 0;
    for _ in 0..100 {
        n = c.status().await.unwrap().connections;
        if n == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

fn four() -> Daemon {
    Daemon::builder()
        .config(FOUR_PROVIDERS)
        .env("T_ANT_KEY", "sk-ant-api03-testkey")
        .env("T_OAI_KEY", "sk-openai-testkey")
        .env("T_MM_KEY", "mm-testkey")
        .file("gemini.key", "AIza-gemini-testkey\n", 0o600)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_gets_its_exact_auth_headers() {
    let d = four();
    let c = d.client().await;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 4] = [
        (
            "ant",
            "sk-ant-api03-testkey",
            &[("x-api-key", "sk-ant-api03-testkey")],
        ),
        (
            "oai",
            "sk-openai-testkey",
            &[("authorization", "Bearer sk-openai-testkey")],
        ),
        (
            "gem",
            "AIza-gemini-testkey",
            &[("x-goog-api-key", "AIza-gemini-testkey")],
        ),
        (
            "mm",
            "mm-testkey",
            &[
                ("authorization", "Bearer mm-testkey"),
                ("x-minimax-group-id", "grp-7"),
            ],
        ),
    ];
    for (profile, token, headers) in cases {
        let t = c.token(profile, None).await.unwrap();
        assert_eq!(t.token, token);
        assert_eq!(t.kind, "api-key");
        assert_eq!(t.expires_at, None);
        let want: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let got: Vec<(String, String)> = t.headers.into_iter().collect();
        assert_eq!(got, want, "headers of {profile}");
    }
    let s = c.status().await.unwrap();
    let names: Vec<&str> = s.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ant", "gem", "mm", "oai"]);
    assert!(s
        .profiles
        .iter()
        .all(|p| p.state == llmd_proto::methods::ProfileState::Ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_and_folder_are_private() {
    let d = four();
    let dir_mode = std::fs::metadata(d.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    let sock_mode = std::fs::symlink_metadata(&d.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    assert_eq!(sock_mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_socket_folder_is_refused_with_a_fix() {
    let d = Daemon::builder().config("").no_wait().start();
    let mut d = d;
    d.stop();
    let folder = d.home.join("run").join("llmd");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = d.run_another(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("open to group/others") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(!d.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_daemon_is_refused_and_first_keeps_serving() {
    let d = four();
    let out = d.run_another(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already serving on") && err.contains(&*d.socket.to_string_lossy()),
        "{err}"
    );
    assert!(err.contains("pid"), "{err}");
    assert_eq!(
        d.client().await.token("ant", None).await.unwrap().token,
        "sk-ant-api03-testkey"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_file_is_reclaimed() {
    let mut d = four();
    d.stop();
    // A socket file nobody listens on, as a crashed daemon leaves behind.
    let l = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(l);
    assert!(d.socket.exists());
    d.restart();
    assert!(
        d.logs().contains("removing stale socket file"),
        "{}",
        d.logs()
    );
    assert_eq!(
        d.client().await.token("oai", None).await.unwrap().token,
        "sk-openai-testkey"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_removes_socket() {
    let mut d = four();
    let status = d.stop().unwrap();
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_then_valid_request_on_one_connection() {
    let d = four();
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(b"this is not json\n").await;
    let e = raw.recv().await.unwrap();
    assert_eq!(e["error"]["code"], -32700);
    assert_eq!(e["error"]["data"]["kind"], "parse_error");
    assert_eq!(e["id"], serde_json::Value::Null);
    raw.send(
        b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"token\",\"params\":{\"profile\":\"ant\"}}\n",
    )
    .await;
    let ok = raw.recv().await.unwrap();
    assert_eq!(ok["id"], 5);
    assert_eq!(ok["result"]["token"], "sk-ant-api03-testkey");
    assert_eq!(ok["result"]["headers"]["x-api-key"], "sk-ant-api03-testkey");
    // Not a request at all, but JSON: invalid_request, id echoed when readable.
    raw.send(b"{\"jsonrpc\":\"1.0\",\"id\":6,\"method\":\"hello\"}\n")
        .await;
    let e = raw.recv().await.unwrap();
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (json!(6), json!(-32600))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_name_the_problem() {
    let d = four();
    let mut raw = Raw::connect(&d.socket).await;
    let e = raw.call(1, "nosuch", json!({})).await;
    assert_eq!(e["error"]["code"], -32601);
    assert!(e["error"]["message"].as_str().unwrap().contains("nosuch"));
    let e = raw.call(2, "token", json!({"profil": "ant"})).await;
    assert_eq!(e["error"]["code"], -32602);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("profil"),
        "{e}"
    );
    let e = raw.call(3, "token", json!({"profile": "ghost"})).await;
    assert_eq!(e["error"]["code"], -32001);
    assert_eq!(e["error"]["data"]["kind"], "unknown_profile");
    assert!(e["error"]["message"].as_str().unwrap().contains("ghost"));
    let e = raw.call(4, "hello", json!({"client": "x"})).await;
    assert_eq!(e["error"]["code"], -32602);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("version"),
        "{e}"
    );
    let ok = raw
        .call(5, "hello", json!({"client": "x", "version": "1"}))
        .await;
    assert_eq!(
        ok["result"],
        json!({"server": "llmd", "version": env!("CARGO_PKG_VERSION"), "protocol": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_line_is_refused_and_connection_closed() {
    let d = Daemon::builder()
        .config("[daemon]\nmax_frame_bytes = 2048\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n")
        .env("K", "k1")
        .start();
    let mut raw = Raw::connect(&d.socket).await;
    let big = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"hello\",\"params\":{{\"client\":\"{}\",\"version\":\"1\"}}}}\n", "x".repeat(4096));
    raw.send(big.as_bytes()).await;
    let e = raw.recv().await.unwrap();
    assert_eq!(e["error"]["code"], -32600);
    assert_eq!(e["error"]["data"]["kind"], "frame_too_large");
    assert!(raw.recv().await.is_none(), "connection must be closed");
    // Other clients are unaffected.
    assert_eq!(d.client().await.token("o", None).await.unwrap().token, "k1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_requests_on_one_connection_match_by_id() {
    let d = four();
    // Raw: 100 requests written at once, answers matched by id.
    let mut raw = Raw::connect(&d.socket).await;
    let profiles = ["ant", "oai", "gem", "mm"];
    let mut batch = String::new();
    for i in 0..100 {
        let req = json!({"jsonrpc": "2.0", "id": format!("r{i}"), "method": "token", "params": {"profile": profiles[i % 4]}});
        batch.push_str(&format!("{req}\n"));
    }
    raw.send(batch.as_bytes()).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let r = raw.recv().await.unwrap();
        let id = r["id"].as_str().unwrap().to_owned();
        let i: usize = id[1..].parse().unwrap();
        assert_eq!(r["result"]["profile"], profiles[i % 4], "answer for {id}");
        assert!(seen.insert(id));
    }
    // Client crate: 100 concurrent calls multiplexed over its single connection.
    let c = d.client().await;
    let calls = (0..100).map(|i| {
        let c = c.clone();
        async move { (i, c.token(profiles[i % 4], None).await.unwrap()) }
    });
    for (i, t) in futures_util::future::join_all(calls).await {
        assert_eq!(t.profile, profiles[i % 4]);
    }
    assert_eq!(connections_settle(&c, 2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let d = four();
    let socket = d.socket.clone();
    let tasks = (0..200).map(|i| {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut raw = Raw::connect(&socket).await;
            let r = raw.call(i, "token", json!({"profile": "oai"})).await;
            assert_eq!(r["id"], i);
            assert_eq!(r["result"]["token"], "sk-openai-testkey");
            raw
        })
    });
    let conns: Vec<Raw> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(connections_settle(&d.client().await, 201).await, 201);
    drop(conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_busy() {
    let d = Daemon::builder()
        .config("[daemon]\nmax_connections = 2\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n")
        .env("K", "k1")
        .start();
    // The harness's readiness probe may still hold a slot for a moment: retry until in.
    async fn admitted(socket: &std::path::Path) -> Raw {
        for _ in 0..200 {
            let mut r = Raw::connect(socket).await;
            if r.try_call(1, "status", json!({})).await.is_some() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("never admitted");
    }
    let a = admitted(&d.socket).await;
    let _b = admitted(&d.socket).await;
    let mut c = Raw::connect(&d.socket).await;
    let e = c.recv().await.unwrap();
    assert_eq!(e["error"]["code"], -32006);
    assert_eq!(e["error"]["data"]["kind"], "busy");
    assert!(c.recv().await.is_none());
    drop(a);
    // The freed slot is usable again (the daemon notices the closed connection shortly).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = match llmd_client::Client::connect_to(&d.socket).await {
            Ok(c) => c.status().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_file_line_and_key() {
    let d = Daemon::builder()
        .config("[daemon]\nrefresh_margin_secs = 60\n\n[profiles.a]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_kee_env = \"X\"\n")
        .no_wait()
        .start();
    let mut d = d;
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("llmd should exit");
    assert!(!status.success());
    let log = d.logs();
    let path = d.home.join("config/llmd/config.toml");
    assert!(log.contains(&format!("{}:7:", path.display())), "{log}");
    assert!(log.contains("api_kee_env"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_serves_keys_from_environment() {
    let d = Daemon::builder()
        .env("OPENAI_API_KEY", "sk-from-env")
        .env("GEMINI_API_KEY", "gem-from-env")
        .start();
    let s = d.client().await.status().await.unwrap();
    let names: Vec<&str> = s.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["gemini", "openai"]);
    let out = d.llmctl(&["token", "openai"]);
    assert_eq!(out.stdout, b"sk-from-env\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_token_prints_exactly_the_token() {
    let d = four();
    let out = d.llmctl(&["token", "gem"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"AIza-gemini-testkey\n");
    assert!(out.stderr.is_empty());
    let out = d.llmctl(&["token", "ghost"]);
    assert_eq!(out.status.code(), Some(4), "exit 4: unknown profile");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown profile `ghost`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_status_headers_ping_and_completions() {
    let d = four();
    let out = d.llmctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PROFILE") && text.contains("gem") && text.contains("minimax"),
        "{text}"
    );
    let out = d.llmctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profiles"].as_array().unwrap().len(), 4);
    let out = d.llmctl(&["headers", "mm"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "authorization: Bearer mm-testkey\nx-minimax-group-id: grp-7\n"
    );
    let out = d.llmctl(&["headers", "ant", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"x-api-key": "sk-ant-api03-testkey"}));
    let out = d.llmctl(&["ping", "-n", "20"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("20 round trips: min ") && text.contains("median") && text.contains("p99"),
        "{text}"
    );
    let out = d.llmctl(&["completions", "bash"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("llmctl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_without_daemon_says_how_to_start_it() {
    let mut d = four();
    d.stop();
    let out = d.llmctl(&["status"]);
    assert_eq!(out.status.code(), Some(3), "exit 3: llmd not reachable");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("llmd is not running on") && err.contains("start it with"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_daemon_restart() {
    let mut d = four();
    let c = d.client().await;
    assert_eq!(
        c.token("ant", None).await.unwrap().token,
        "sk-ant-api03-testkey"
    );
    d.restart();
    // The old connection died with the old daemon; the next call reconnects.
    let mut last = None;
    for _ in 0..3 {
        match c.token("ant", None).await {
            Ok(t) => {
                last = Some(t.token);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(last.as_deref(), Some("sk-ant-api03-testkey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_stdlib_client_follows_the_design() {
    let d = four();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/llmd_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("mm")
        .env("LLMD_SOCKET", &d.socket)
        .output();
    let Ok(out) = out else {
        eprintln!("python3 not available; skipping");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["server"], "llmd");
    assert_eq!(v["headers"]["authorization"], "Bearer mm-testkey");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_written_line_past_idle_timeout_is_closed() {
    let d = Daemon::builder()
        .config("[daemon]\nidle_timeout_secs = 1\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n")
        .env("K", "k1")
        .start();
    let mut slow = Raw::connect(&d.socket).await;
    slow.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"meth").await;
    // Others are served meanwhile.
    let c = d.client().await;
    for _ in 0..10 {
        assert_eq!(c.token("o", None).await.unwrap().token, "k1");
    }
    let t0 = std::time::Instant::now();
    assert!(slow.recv().await.is_none(), "closed");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A connection that is idle between whole requests is not closed (one that never
    // sent a byte is: see hostile.rs).
    let mut idle = Raw::connect(&d.socket).await;
    assert!(idle.call(1, "status", json!({})).await["result"].is_object());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(idle.call(2, "status", json!({})).await["result"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_disconnected_without_hurting_others() {
    let d = Daemon::builder()
        .config("[daemon]\nmax_queued_responses = 8\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\n")
        .env("K", "k1")
        .start();
    let c = d.client().await;
    let hog = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (_r, mut w) = hog.into_split();
    let line = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\",\"params\":{}}\n".repeat(1000);
    // Keep writing and never read: the daemon must cut us off once our answers pile up.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for _ in 0..200 {
            if w.write_all(&line).await.is_err() {
                return true;
            }
        }
        false
    });
    let mut cut_off = false;
    for _ in 0..400 {
        assert_eq!(
            c.token("o", None).await.unwrap().token,
            "k1",
            "others keep being served"
        );
        if c.status().await.unwrap().connections == 1 {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(cut_off, "the non-reading client was disconnected");
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    assert!(d.logs().contains("not reading its answers"), "{}", d.logs());
}
