//! Issue 9: llmd stays bounded under stalled providers and hostile local clients. Each test
//! reproduces one finding against the real binary.

use llmd_tests::raw::Raw;
use llmd_tests::stub::{self, Act, Stub};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "sk-ant-api03-hostile-secret-key";

/// One api-key Anthropic profile `stub` pointed at `base`, one request at a time, with
/// short timeouts, plus `extra` appended to the config.
fn stub_daemon(base: &str, extra: &str) -> Daemon {
    Daemon::builder()
        .config(&format!(
            r#"
[daemon]
idle_timeout_secs = 5
{extra}

[profiles.stub]
provider = "anthropic"
auth = "api-key"
api_key_env = "T_KEY"
base_url = "{base}"
default_model = "m"

[profiles.stub.rate_limit]
max_concurrent = 1

[profiles.stub.timeouts]
first_byte_secs = 1
stream_idle_secs = 1
total_secs = 2
"#
        ))
        .env("T_KEY", KEY)
        .start()
}

fn chat_params(stream: bool) -> Value {
    json!({"profile": "stub", "stream": stream,
           "request": {"messages": [{"role": "user", "content": "hi"}]}})
}

/// Reads lines until the answer to `id`, returning it and the notifications before it.
async fn answer(raw: &mut Raw, id: i64) -> (Value, Vec<Value>) {
    let mut notes = Vec::new();
    loop {
        let v = raw
            .recv()
            .await
            .expect("connection closed before the answer");
        if v.get("id") == Some(&json!(id)) {
            return (v, notes);
        }
        notes.push(v);
    }
}

fn in_flight(status: &Value) -> u64 {
    status["result"]["profiles"][0]["limits"]["in_flight"]
        .as_u64()
        .unwrap_or(99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_times_out_and_frees_its_slot() {
    let stub = Stub::start(|_, _| vec![Act::Stall]).await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    let e = raw.call(1, "chat", chat_params(false)).await;
    let data = &e["error"]["data"];
    assert_eq!(data["kind"], "upstream", "{e}");
    assert_eq!(data["host"], stub.host.as_str(), "{e}");
    assert_eq!(data["timeout"], "first_byte_secs", "{e}");
    assert_eq!(data["timeout_ms"], 1000, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&stub.host) && msg.contains("1s"), "{msg}");
    assert!(!msg.contains(KEY) && !msg.contains("/v1/messages"), "{msg}");
    // The only slot is free again: status says so and the next call gets its own answer.
    let s = raw.call(2, "status", json!({})).await;
    assert_eq!(in_flight(&s), 0, "{s}");
    let e = raw.call(3, "chat", chat_params(true)).await;
    assert_eq!(e["error"]["data"]["timeout"], "first_byte_secs", "{e}");
    // A stalled call is not retried (that would hold the caller several timeouts).
    assert_eq!(stub.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_after_the_headers_hit_the_idle_and_total_timeouts() {
    let stub = Stub::start(|_, req| {
        let streaming = String::from_utf8_lossy(&req.body).contains("\"stream\":true");
        if streaming {
            vec![
                stub::head(200, "text/event-stream"),
                Act::Send(stub::anthropic_start().into_bytes()),
                Act::Send(stub::anthropic_delta("partial").into_bytes()),
                Act::Stall,
            ]
        } else {
            vec![
                Act::Send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"id\":"
                        .to_vec(),
                ),
                Act::Stall,
            ]
        }
    })
    .await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": chat_params(true)})
        )
        .as_bytes(),
    )
    .await;
    let (e, deltas) = answer(&mut raw, 1).await;
    assert_eq!(deltas.len(), 1, "the delta before the stall arrives");
    assert_eq!(e["error"]["data"]["timeout"], "stream_idle_secs", "{e}");
    assert_eq!(e["error"]["data"]["host"], stub.host.as_str());
    let e = raw.call(2, "chat", chat_params(false)).await;
    assert_eq!(e["error"]["data"]["timeout"], "total_secs", "{e}");
    let s = raw.call(3, "status", json!({})).await;
    assert_eq!(in_flight(&s), 0, "{s}");
}

const GATEWAY: &str = "[gateway]\nlisten = \"127.0.0.1:0\"\n";

/// One Messages request to profile `stub` through the daemon's gateway.
async fn gateway_post(d: &Daemon, stream: bool) -> reqwest::Response {
    let k: llmd_proto::methods::GatewayKeyResult = d
        .client()
        .await
        .call(
            "gateway.key",
            &llmd_proto::methods::GatewayKeyParams::default(),
        )
        .await
        .expect("gateway.key");
    let base = k.base_url.expect("the gateway listens on TCP");
    reqwest::Client::new()
        .post(format!("{base}/p/stub/v1/messages"))
        .header("x-api-key", &k.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "m", "max_tokens": 10, "stream": stream,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("the gateway answers")
}

/// An error answer whose body stalls, through the gateway: what came is passed back once
/// the provider was silent for `stream_idle_secs`, and the slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_error_body_through_the_gateway_is_cut() {
    let stub = Stub::start(|_, _| {
        vec![
            Act::Send(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"type\":\"error\""
                    .to_vec(),
            ),
            Act::Stall,
        ]
    })
    .await;
    let d = stub_daemon(&stub.base, GATEWAY);
    let resp = tokio::time::timeout(Duration::from_secs(20), gateway_post(&d, false))
        .await
        .expect("the gateway answered within the deadline");
    assert_eq!(resp.status(), 400);
    let body = resp.text().await.unwrap_or_default();
    assert!(body.contains("\"type\":\"error\""), "{body}");
    let s = Raw::connect(&d.socket)
        .await
        .call(1, "status", json!({}))
        .await;
    assert_eq!(in_flight(&s), 0, "{s}");
}

/// The same stall through the HTTP gateway, after the answer has started: the body is cut
/// once the provider was silent for `stream_idle_secs`, and the profile's only slot is free
/// again (it was held until the client gave up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_mid_answer_through_the_gateway_cuts_it_and_frees_the_slot() {
    let stub = Stub::start(|_, _| {
        vec![
            stub::head(200, "text/event-stream"),
            Act::Send(stub::anthropic_start().into_bytes()),
            Act::Send(stub::anthropic_delta("partial").into_bytes()),
            Act::Stall,
        ]
    })
    .await;
    let d = stub_daemon(&stub.base, GATEWAY);
    let mut resp = gateway_post(&d, true).await;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match resp.chunk().await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stalled answer was cut within the deadline");
    assert!(end.is_err(), "a cut answer must not look complete");
    assert!(String::from_utf8_lossy(&got).contains("partial"));
    let s = Raw::connect(&d.socket)
        .await
        .call(1, "status", json!({}))
        .await;
    assert_eq!(in_flight(&s), 0, "{s}");
    assert!(d.logs().contains("went silent mid-answer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_error_names_host_and_cause() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let d = stub_daemon(&base, "");
    let mut raw = Raw::connect(&d.socket).await;
    let e = raw.call(1, "chat", chat_params(false)).await;
    let data = &e["error"]["data"];
    assert_eq!(data["host"], format!("127.0.0.1:{port}"), "{e}");
    let cause = data["cause"].as_str().unwrap_or_default();
    assert!(cause.to_lowercase().contains("refused"), "{e}");
    assert!(
        d.logs().contains("provider call failed") && d.logs().contains("refused"),
        "the daemon log has the cause too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_that_echoes_the_key_is_scrubbed() {
    let stub = Stub::start(|_, req| {
        let key = req.header("x-api-key").unwrap_or_default();
        let body = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": format!("key {key} is not allowed; header was x-api-key: {key}")}});
        vec![stub::json_answer(400, &body.to_string())]
    })
    .await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    let e = raw.call(1, "chat", chat_params(false)).await;
    let text = e.to_string();
    assert!(!text.contains(KEY), "the key came back to the client");
    assert_eq!(e["error"]["data"]["status"], 400);
    let body = e["error"]["data"]["body"].as_str().unwrap();
    assert!(
        body.contains("<redacted>") && body.contains("is not allowed"),
        "the body was not scrubbed as expected"
    );
    assert!(!d.logs().contains(KEY), "the key reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_that_never_ends_is_cut_at_its_cap() {
    let stub = Stub::start(|_, _| {
        vec![
            stub::head(500, "text/plain"),
            Act::Send(vec![b'x'; 16 * 1024]),
            Act::Stall,
        ]
    })
    .await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    let e = raw.call(1, "chat", chat_params(false)).await;
    let body = e["error"]["data"]["body"].as_str().unwrap_or_default();
    assert_eq!(body.len(), 2048, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_before_any_delta_is_retried() {
    let stub = Stub::start(|n, _| {
        if n == 0 {
            // Cut in the middle of the first event: nothing reached the client.
            vec![
                stub::head(200, "text/event-stream"),
                Act::Send(b"event: message_start\ndata: {\"type\":\"mess".to_vec()),
                Act::Close,
            ]
        } else {
            vec![
                stub::head(200, "text/event-stream"),
                Act::Send(stub::anthropic_stream(&["Hello", " world"])),
                Act::Close,
            ]
        }
    })
    .await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": chat_params(true)})
        )
        .as_bytes(),
    )
    .await;
    let (r, deltas) = answer(&mut raw, 1).await;
    assert_eq!(r["result"]["content"][0]["text"], "Hello world", "{r}");
    assert_eq!(deltas.len(), 4, "two texts, block stop, usage: {deltas:?}");
    assert_eq!(stub.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_a_delta_is_reported_as_ended_early() {
    let stub = Stub::start(|_, _| {
        vec![
            stub::head(200, "text/event-stream"),
            Act::Send(stub::anthropic_start().into_bytes()),
            Act::Send(stub::anthropic_delta("half").into_bytes()),
            Act::Close,
        ]
    })
    .await;
    let d = stub_daemon(&stub.base, "");
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": chat_params(true)})
        )
        .as_bytes(),
    )
    .await;
    let (e, _) = answer(&mut raw, 1).await;
    assert_eq!(e["error"]["data"]["cause"], "stream ended early", "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("stream ended early"));
    // Something reached the client, so nothing was retried.
    assert_eq!(stub.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_honest_stream_reader_gets_its_whole_answer() {
    // Far more deltas than the queue (4) and the socket buffers hold.
    const N: usize = 4000;
    let piece = "y".repeat(200);
    let stub = Stub::start(move |_, _| {
        let pieces: Vec<&str> = (0..N).map(|_| piece.as_str()).collect();
        vec![
            stub::head(200, "text/event-stream"),
            Act::Send(stub::anthropic_stream(&pieces)),
            Act::Close,
        ]
    })
    .await;
    let d = stub_daemon(&stub.base, "max_queued_responses = 4");
    let mut raw = Raw::connect(&d.socket).await;
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": chat_params(true)})
        )
        .as_bytes(),
    )
    .await;
    // Read slowly: a pause every 500 lines, well inside the idle timeout each time.
    let mut deltas = 0;
    loop {
        let v = raw.recv().await.expect("disconnected mid-answer");
        if v.get("id") == Some(&json!(1)) {
            assert!(v.get("result").is_some(), "{v}");
            break;
        }
        deltas += 1;
        if deltas % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(deltas, N + 2, "text deltas, block stop and usage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_a_byte_are_closed() {
    let d = Daemon::builder()
        .config("[daemon]\nidle_timeout_secs = 1\nmax_connections = 4\n")
        .start();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(Raw::connect(&d.socket).await);
    }
    for s in &mut silent {
        // EOF within the read deadline (a panic on timeout otherwise). The daemon's own
        // start-up probe may still hold a slot, so one of these may be refused first.
        while let Some(v) = s.recv().await {
            assert_eq!(v["error"]["data"]["kind"], "busy", "{v}");
        }
    }
    // Their slots are free again.
    let mut fresh = Raw::connect(&d.socket).await;
    let s = fresh.call(1, "status", json!({})).await;
    assert!(s.get("result").is_some(), "{s}");
}

fn ant_daemon(fake: &llmd_tests::fake_providers::FakeProviders, daemon: &str) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[daemon]\n{daemon}\n\n[profiles.ant]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"T_KEY\"\nbase_url = \"{}\"\ndefault_model = \"m\"\n",
            fake.anthropic_base()
        ))
        .env("T_KEY", KEY)
        .start()
}

/// A `chat` line for profile `ant`, a notification when `id` is `None`.
fn ant_chat(id: Option<i64>) -> String {
    let mut v = json!({"jsonrpc": "2.0", "method": "chat", "params": chat_params_ant()});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    format!("{v}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_null_ids_and_batches_each_get_an_answer() {
    let fake = llmd_tests::fake_providers::FakeProviders::start().await;
    fake.set_latency(Duration::from_millis(800));
    let d = ant_daemon(&fake, "");
    // Ten requests sharing id 5: one runs, nine are refused, and each gets an answer.
    let mut raw = Raw::connect(&d.socket).await;
    let lines: String = (0..10).map(|_| ant_chat(Some(5))).collect();
    raw.send(lines.as_bytes()).await;
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(raw.recv().await.expect("an answer per request"));
    }
    assert!(answers.iter().all(|a| a["id"] == 5));
    let refused = answers
        .iter()
        .filter(|a| a["error"]["data"]["kind"] == "invalid_request")
        .count();
    let ok = answers.iter().filter(|a| a.get("result").is_some()).count();
    assert_eq!((refused, ok), (9, 1), "{answers:?}");

    // `id: null` is a request: it is answered, with a null id.
    raw.send(b"{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"hello\",\"params\":{\"client\":\"t\",\"version\":\"1\"}}\n")
        .await;
    let v = raw.recv().await.unwrap();
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["result"]["server"], "llmd", "{v}");

    // A batch gets one clear invalid_request.
    raw.send(b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}]\n")
        .await;
    let v = raw.recv().await.unwrap();
    assert_eq!(v["error"]["data"]["kind"], "invalid_request", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("batch"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_notifications_count_in_flight_and_stop_on_hangup() {
    let fake = llmd_tests::fake_providers::FakeProviders::start().await;
    fake.set_latency(Duration::from_secs(30));
    // Two queued answers: eight requests in flight per connection.
    let d = ant_daemon(&fake, "max_queued_responses = 2");
    let mut raw = Raw::connect(&d.socket).await;
    let notes: String = (0..8).map(|_| ant_chat(None)).collect();
    raw.send(notes.as_bytes()).await;
    assert!(fake.wait_for_requests(8, Duration::from_secs(10)).await);
    let v = raw.call(9, "chat", chat_params_ant()).await;
    assert_eq!(v["error"]["data"]["kind"], "busy", "{v}");
    // Hanging up stops every one of those provider calls.
    drop(raw);
    assert!(
        fake.wait_for_aborted(8, Duration::from_secs(10)).await,
        "provider calls outlived their client"
    );
}

fn chat_params_ant() -> Value {
    json!({"profile": "ant", "request": {"messages": [{"role": "user", "content": "hi"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_names_are_printable_short_and_cannot_forge_log_lines() {
    let d = Daemon::start("");
    let mut raw = Raw::connect(&d.socket).await;
    let evil = format!(
        "agent\nFORGED INFO llmd: all is well \x1b[31mred{}",
        "z".repeat(2 << 20)
    );
    let v = raw
        .call(1, "hello", json!({"client": evil, "version": "1\r\n2"}))
        .await;
    assert!(v.get("result").is_some(), "{v}");
    // The span of every later request carries the name into the log.
    let s = raw.call(2, "status", json!({})).await;
    let agents = s["result"]["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    let name = agents[0].as_str().unwrap();
    assert!(name.chars().count() <= 64 + 1 + 32, "{} chars", name.len());
    assert!(!name.chars().any(char::is_control), "{name:?}");
    let v = raw.call(3, "no\nFORGED method\x1b[2J", json!({})).await;
    assert_eq!(v["error"]["data"]["kind"], "method_not_found");
    let logs = d.logs();
    assert!(
        !logs.lines().any(|l| l.starts_with("FORGED")),
        "a client forged a log line"
    );
    assert!(!logs.contains('\x1b'), "an escape sequence reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_capped_in_number_and_size_and_survive_a_restart() {
    let mut d = Daemon::start("[daemon]\nmax_tools = 2\nmax_tool_bytes = 2048\n");
    let mut raw = Raw::connect(&d.socket).await;
    let tool = |name: &str, pad: usize| {
        json!({"name": name, "description": "d".repeat(pad),
               "input_schema": {"type": "object"}})
    };
    for (i, n) in ["one", "two"].iter().enumerate() {
        let v = raw.call(i as i64, "tools.register", tool(n, 10)).await;
        assert!(v.get("result").is_some(), "{v}");
    }
    let v = raw.call(3, "tools.register", tool("three", 10)).await;
    assert_eq!(v["error"]["data"]["kind"], "busy", "{v}");
    assert_eq!(v["error"]["data"]["max_tools"], 2);
    let v = raw.call(4, "tools.register", tool("one", 4096)).await;
    assert_eq!(v["error"]["data"]["kind"], "invalid_params", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tool_bytes"));
    // Params stay strict although `ToolDef` is lenient as a result.
    let v = raw
        .call(
            5,
            "tools.register",
            json!({"name": "x", "input_schema": {"type": "object"}, "colour": 1}),
        )
        .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("colour"),
        "{v}"
    );

    let file = d.home.join("state/llmd/tools.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(raw);
    d.restart();
    let mut raw = Raw::connect(&d.socket).await;
    let v = raw.call(6, "tools.list", json!({})).await;
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_subscribe_replaces_the_first() {
    use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
    let fake = FakeOAuth::start(3600).await;
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let d = Daemon::builder()
        .config(&format!(
            "[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": far})
                .to_string(),
            0o600,
        )
        .start();
    let mut raw = Raw::connect(&d.socket).await;
    for id in 1..=3 {
        let v = raw
            .call(id, "subscribe", json!({"events": ["token.rotated"]}))
            .await;
        assert!(v.get("result").is_some(), "{v}");
    }
    let c = d.client().await;
    c.refresh("work").await.unwrap();
    let first = raw.recv().await.unwrap();
    assert_eq!(first["method"], "event", "{first}");
    // Everything already sent arrives before the answer to a later request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, before) = answer_after_send(&mut raw, 9, "status").await;
    assert!(
        before.iter().all(|v| v["method"] != "event"),
        "an event was delivered more than once: {before:?}"
    );
}

async fn answer_after_send(raw: &mut Raw, id: i64, method: &str) -> (Value, Vec<Value>) {
    raw.send(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": id, "method": method})
        )
        .as_bytes(),
    )
    .await;
    answer(raw, id).await
}
