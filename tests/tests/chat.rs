//! Chat through the daemon: auth in the loop, shared limits and retries, llmctl.

use llmd_proto::chat::{Block, ChatRequest};
use llmd_proto::ErrorKind;
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::fake_providers::{Failure, FakeProviders, USE_TOOL};
use llmd_tests::Daemon;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ask(text: &str) -> ChatRequest {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": text}]})).unwrap()
}

/// Watches the provider side: the most requests it ever had open at once.
fn watch_open_requests(fake: &FakeProviders) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let max_seen = Arc::new(AtomicUsize::new(0));
    let (fake, seen) = (fake.clone(), max_seen.clone());
    let watcher = tokio::spawn(async move {
        loop {
            let open = fake.request_count() - fake.completed() - fake.aborted();
            seen.fetch_max(open, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (max_seen, watcher)
}

fn text_of(blocks: &[Block]) -> String {
    blocks
        .iter()
        .filter_map(|b| match b {
            Block::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_401_forces_one_refresh_and_one_retry() {
    let oauth = FakeOAuth::start(3600).await;
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nbase_url = \"{}\"\ndefault_model = \"claude-x\"\n",
        oauth.anthropic_url(),
        fake.anthropic_base()
    );
    let bundle = json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now() + 3600});
    let d = Daemon::builder()
        .config(&cfg)
        .file("state/llmd/oauth/work.json", &bundle.to_string(), 0o600)
        .start();
    let c = d.client().await;
    fake.fail_next(1, Failure::Status(401));
    let r = c.chat("work", ask("hi")).await.unwrap();
    assert_eq!(text_of(&r.content), "Hello from anthropic");
    assert_eq!(oauth.refresh_calls(), 1, "one forced refresh");
    let reqs = fake.chat_requests();
    assert_eq!(reqs.len(), 2, "one retry");
    assert_eq!(
        reqs[0].header("authorization"),
        Some(format!("Bearer {}", access_of(0)).as_str())
    );
    assert_eq!(
        reqs[1].header("authorization"),
        Some(format!("Bearer {}", access_of(1)).as_str())
    );
    assert_eq!(reqs[1].header("anthropic-beta"), Some("oauth-2025-04-20"));
    assert_eq!(reqs[1].header("anthropic-version"), Some("2023-06-01"));
    assert!(reqs[1]
        .header("user-agent")
        .unwrap_or("")
        .starts_with("llmd/"));
    // 401s for a token this daemon just obtained are not about the token: answered as
    // upstream errors without another rotation of the login.
    fake.fail_next(2, Failure::Status(401));
    let e = c.chat("work", ask("hi")).await.unwrap_err();
    let e = e.rpc().unwrap();
    assert_eq!(e.kind(), ErrorKind::Upstream);
    assert_eq!(e.data_field("status"), Some(&json!(401)));
    assert_eq!(oauth.refresh_calls(), 1);
    let logs = d.logs();
    assert!(
        !logs.contains("fakeaccess") && !logs.contains("fakerefresh"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_login_surfaces_needs_login_from_chat() {
    let oauth = FakeOAuth::start(3600).await;
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nbase_url = \"{}\"\ndefault_model = \"m\"\n",
        oauth.anthropic_url(),
        fake.anthropic_base()
    );
    let bundle =
        json!({"access_token": access_of(0), "refresh_token": "spent", "expires_at": now() - 5});
    let d = Daemon::builder()
        .config(&cfg)
        .file("state/llmd/oauth/work.json", &bundle.to_string(), 0o600)
        .start();
    let e = d.client().await.chat("work", ask("hi")).await.unwrap_err();
    assert_eq!(e.rpc().unwrap().code, -32002);
    assert!(e.to_string().contains("llmctl login work"), "{e}");
    assert_eq!(
        fake.request_count(),
        0,
        "nothing sent without a valid token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_whole_profile_for_every_client() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.oa]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"gpt\"\n",
        fake.openai_base()
    );
    let d = Daemon::builder().config(&cfg).env("K", "k").start();
    fake.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 2,
        },
    );
    let first = d.client().await;
    let t0 = Instant::now();
    let a = tokio::spawn(async move { first.chat("oa", ask("one")).await });
    assert!(fake.wait_for_requests(1, Duration::from_secs(5)).await);
    // A different client (another agent) asks during the pause: it must wait too, not
    // hammer the provider.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = d.client().await;
    let b = tokio::spawn(async move { second.chat("oa", ask("two")).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        fake.request_count(),
        1,
        "nobody calls the provider during the pause"
    );
    let status = d.client().await.status().await.unwrap();
    let limits = status.profiles[0].limits.clone().unwrap();
    assert!(
        limits.paused_for_ms.unwrap_or(0) > 0,
        "status shows the pause: {limits:?}"
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "retry-after honoured"
    );
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_share_the_profile_limits() {
    let fake = FakeProviders::start().await;
    fake.set_latency(Duration::from_millis(50));
    let base = fake.openai_base();
    let cfg = format!(
        "[profiles.conc]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{base}\"\ndefault_model = \"gpt\"\n\
         [profiles.conc.rate_limit]\nmax_concurrent = 4\ntokens_per_minute = 1000000\n\n\
         [profiles.rpm]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{base}\"\ndefault_model = \"gpt\"\n\
         [profiles.rpm.rate_limit]\nrequests_per_minute = 40\n"
    );
    let d = Daemon::builder().config(&cfg).env("K", "k").start();
    let (max_seen, watcher) = watch_open_requests(&fake);
    // 50 agents, 4 at a time: all finish, never more than 4 upstream at once.
    let mut agents = Vec::new();
    for i in 0..50 {
        let c = d.client().await;
        agents.push(tokio::spawn(async move {
            c.chat("conc", ask(&format!("agent {i}"))).await
        }));
    }
    for a in agents {
        a.await.unwrap().expect("every agent finishes");
    }
    assert_eq!(fake.request_count(), 50);
    let most = max_seen.load(Ordering::Relaxed);
    assert!(
        (2..=4).contains(&most),
        "max_concurrent held and used: {most}"
    );
    // 50 agents against 40 requests per minute: 40 go now, 10 wait for the window.
    fake.reset();
    let mut agents = Vec::new();
    for i in 0..50 {
        let c = d.client().await;
        agents.push(tokio::spawn(async move {
            c.chat("rpm", ask(&format!("agent {i}"))).await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.completed() < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.request_count(),
        40,
        "requests_per_minute holds across agents"
    );
    let status = d.client().await.status().await.unwrap();
    let limits = status
        .profiles
        .iter()
        .find(|p| p.name == "rpm")
        .unwrap()
        .limits
        .clone()
        .unwrap();
    assert_eq!(limits.queued, 10, "{limits:?}");
    assert_eq!(limits.remaining_requests, Some(0), "{limits:?}");
    watcher.abort();
    for a in agents {
        a.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_chat_streams_text_and_tool_calls() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.ant]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"claude-x\"\n",
        fake.anthropic_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("K", "sk-ant-api03-k")
        .start();
    let out = d.llmctl(&["chat", "ant", "hello there"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello from anthropic\n"
    );
    let tool = d.home.join("weather.json");
    std::fs::write(
        &tool,
        json!({"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}).to_string(),
    )
    .unwrap();
    let out = d.llmctl_stdin(
        &[
            "chat",
            "ant",
            "--tool",
            tool.to_str().unwrap(),
            "--system",
            "be brief",
        ],
        USE_TOOL,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[tool_use get_weather {\"city\":\"Paris\"}]")
            || text.contains("[tool_use get_weather {\"city\": \"Paris\"}]"),
        "{text}"
    );
    let body = fake.last_request().body;
    assert_eq!(body["system"][0]["text"], "be brief");
    assert_eq!(body["tools"][0]["name"], "get_weather");
    let out = d.llmctl(&["chat", "ant", "--json", "hi"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stop_reason"], "end_turn");
    // The registry from llmctl.
    let out = d.llmctl(&["tools", "add", tool.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = d.llmctl(&["tools", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("get_weather\tweather"));
    let out = d.llmctl(&["tools", "rm", "get_weather"]);
    assert!(out.status.success());
    let out = d.llmctl(&["tools", "rm", "get_weather"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tool `get_weather`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_chat_streams_a_reply_and_a_tool_call_from_every_provider() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.ant]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"c\"\n\n\
         [profiles.oai]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"g\"\n\n\
         [profiles.gem]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"gm\"\n\n\
         [profiles.mm]\nprovider = \"minimax\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"mx\"\n",
        fake.anthropic_base(),
        fake.openai_base(),
        fake.gemini_base(),
        fake.minimax_base()
    );
    let d = Daemon::builder().config(&cfg).env("K", "k-test").start();
    let tool = d.home.join("weather.json");
    std::fs::write(
        &tool,
        json!({"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}).to_string(),
    )
    .unwrap();
    for (profile, name) in [
        ("ant", "anthropic"),
        ("oai", "openai"),
        ("gem", "gemini"),
        ("mm", "minimax"),
    ] {
        let out = d.llmctl(&["chat", profile, "hello"]);
        assert!(out.status.success(), "{profile}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("Hello from {name}\n"),
            "{profile}"
        );
        let out = d.llmctl(&["chat", profile, "--tool", tool.to_str().unwrap(), USE_TOOL]);
        let text = String::from_utf8_lossy(&out.stdout).replace(": ", ":");
        assert!(
            text.contains("[tool_use get_weather {\"city\":\"Paris\"}]"),
            "{profile}: {text}"
        );
        assert!(
            out.stderr.is_empty(),
            "{profile}: valid arguments, no complaint: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_aborts_the_upstream_request() {
    let fake = FakeProviders::start().await;
    fake.set_event_delay(Duration::from_millis(300));
    let cfg = format!(
        "[profiles.ant]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"c\"\n",
        fake.anthropic_base()
    );
    let d = Daemon::builder().config(&cfg).env("K", "k").start();
    let mut raw = llmd_tests::raw::Raw::connect(&d.socket).await;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": {"profile": "ant", "stream": true,
        "request": {"messages": [{"role": "user", "content": "hello"}]}}});
    raw.send(format!("{req}\n").as_bytes()).await;
    let first = raw.recv().await.unwrap();
    assert_eq!(first["method"], "chat.delta", "{first}");
    // The agent dies mid-stream: the daemon must stop talking to the provider too.
    drop(raw);
    assert!(
        fake.wait_for_aborted(1, Duration::from_secs(10)).await,
        "upstream request aborted"
    );
    assert_eq!(fake.completed(), 0);
    // Without a stream nothing is written until the answer: the hangup itself is noticed.
    fake.reset();
    fake.set_latency(Duration::from_secs(3));
    let mut raw = llmd_tests::raw::Raw::connect(&d.socket).await;
    let req = json!({"jsonrpc": "2.0", "id": 2, "method": "chat", "params": {"profile": "ant",
        "request": {"messages": [{"role": "user", "content": "hello"}]}}});
    raw.send(format!("{req}\n").as_bytes()).await;
    assert!(fake.wait_for_requests(1, Duration::from_secs(10)).await);
    drop(raw);
    assert!(
        fake.wait_for_aborted(1, Duration::from_secs(10)).await,
        "upstream request aborted after the hangup"
    );
    assert_eq!(fake.completed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_hold_with_estimates_corrected_by_usage() {
    let fake = FakeProviders::start().await;
    fake.set_latency(Duration::from_millis(300));
    // Each request is estimated at about its 1000-token output budget; the fake's answers
    // report 19 tokens, which frees the budget again as each one settles.
    let cfg = format!(
        "[profiles.tpm]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"gpt\"\n[profiles.tpm.rate_limit]\ntokens_per_minute = 2500\n",
        fake.openai_base()
    );
    let d = Daemon::builder().config(&cfg).env("K", "k").start();
    let (max_seen, watcher) = watch_open_requests(&fake);
    let t0 = Instant::now();
    let mut agents = Vec::new();
    for i in 0..6 {
        let c = d.client().await;
        let req: ChatRequest = serde_json::from_value(
            json!({"max_tokens": 1000, "messages": [{"role": "user", "content": format!("agent {i}")}]}),
        )
        .unwrap();
        agents.push(tokio::spawn(async move { c.chat("tpm", req).await }));
    }
    for a in agents {
        a.await
            .unwrap()
            .expect("every agent finishes once usage corrects the estimates");
    }
    watcher.abort();
    assert_eq!(fake.request_count(), 6);
    // Two 1000-token estimates fit in 2500 tokens per minute, three do not: six 300 ms
    // requests take at least three rounds. (Unlimited, they would all run at once.)
    assert!(
        t0.elapsed() >= Duration::from_millis(850),
        "{:?}",
        t0.elapsed()
    );
    let most = max_seen.load(Ordering::Relaxed);
    assert!(
        (2..=3).contains(&most),
        "at most two at a time (one may overlap its predecessor's last bytes): {most}"
    );
}
