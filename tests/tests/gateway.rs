//! The HTTP gateway end to end: the real llmd binary, HTTP clients on 127.0.0.1, and the
//! fake providers behind it. The fakes must see the profile's key, never the gateway key.

use futures_util::StreamExt;
use llmd_proto::methods::{GatewayKeyParams, GatewayKeyResult, StatusResult};
use llmd_tests::fake_providers::{Failure, FakeProviders, USE_TOOL};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SETUP_TOKEN_PREFIX: &str = "sk-ant-oat01-gw";

fn setup_token() -> String {
    format!("{SETUP_TOKEN_PREFIX}{}", "x".repeat(90))
}

/// One profile per provider (all api-key, key `test-key`), two setup-token profiles (one
/// with `gateway = true`), and the gateway on a free port.
fn config(fake: &FakeProviders, gateway_extra: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
{gateway_extra}

[profiles.an]
provider = "anthropic"
auth = "api-key"
api_key_env = "TEST_KEY"
base_url = "{a}"
default_model = "claude-x"

[profiles.oa]
provider = "openai-compat"
auth = "api-key"
api_key_env = "TEST_KEY"
base_url = "{o}"
default_model = "gpt-x"

[profiles.gm]
provider = "gemini"
auth = "api-key"
api_key_env = "TEST_KEY"
base_url = "{g}"
default_model = "gemini-x"

[profiles.sub]
provider = "anthropic"
auth = "setup-token"
base_url = "{a}"

[profiles.subok]
provider = "anthropic"
auth = "setup-token"
base_url = "{a}"
gateway = true
default_model = "claude-x"
[profiles.subok.rate_limit]
max_concurrent = 4
"#,
        a = fake.anthropic_base(),
        o = fake.openai_base(),
        g = fake.gemini_base(),
    )
}

struct Gw {
    d: Daemon,
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Gw {
    async fn start(fake: &FakeProviders, gateway_extra: &str) -> Gw {
        let d = Daemon::builder()
            .config(&config(fake, gateway_extra))
            .env("TEST_KEY", "test-key")
            .env("CLAUDE_CODE_OAUTH_TOKEN", &setup_token())
            .start();
        let c = d.client().await;
        let k: GatewayKeyResult = c
            .call("gateway.key", &GatewayKeyParams::default())
            .await
            .expect("gateway.key");
        let base = k.base_url.expect("the gateway listens on TCP");
        Gw {
            d,
            base,
            key: k.key,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, profile: &str, rest: &str) -> String {
        format!("{}/p/{profile}/{rest}", self.base)
    }

    async fn post(&self, profile: &str, rest: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(profile, rest))
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    async fn status(&self) -> StatusResult {
        self.d.client().await.status().await.expect("status")
    }
}

fn messages_body(text: &str, stream: bool) -> Value {
    json!({"model": "claude-x", "max_tokens": 100, "stream": stream,
           "messages": [{"role": "user", "content": text}]})
}

fn assert_no_gateway_key(fake: &FakeProviders, key: &str) {
    for r in fake.requests() {
        for (k, v) in &r.headers {
            assert!(
                !v.contains(key),
                "the provider saw the gateway key in `{k}`"
            );
        }
        assert!(
            !r.path.contains(key),
            "the provider saw the gateway key in the URL"
        );
    }
}

/// One raw HTTP/1.1 request, for headers an HTTP client library would not send.
async fn raw_request(base: &str, head: &str, body: &str) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{head}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_go_through_with_the_profiles_key() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let r = gw
        .post("an", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "Hello from anthropic");
    let seen = fake.last_request();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("test-key"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen
        .header("user-agent")
        .is_some_and(|u| u.starts_with("llmd/")));
    assert_no_gateway_key(&fake, &gw.key);
    let st = gw.status().await;
    let g = st.gateway.expect("status shows the gateway");
    assert_eq!(g.listen.as_deref(), Some(gw.base.as_str()));
    assert_eq!(g.requests_by_agent.get("(main key)"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_key_gets_401_in_the_providers_shape() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let cases = [
        ("an", "v1/messages", "x-api-key"),
        ("oa", "v1/chat/completions", "authorization"),
        (
            "gm",
            "v1beta/models/gemini-x:generateContent",
            "x-goog-api-key",
        ),
    ];
    for (profile, rest, header) in cases {
        for key in [None, Some("llmd-gw-wrong")] {
            let mut req = gw.http.post(gw.url(profile, rest)).json(&json!({}));
            if let Some(k) = key {
                let v = if header == "authorization" {
                    format!("Bearer {k}")
                } else {
                    k.to_string()
                };
                req = req.header(header, v);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{profile} with {key:?}");
            let v: Value = r.json().await.unwrap();
            match profile {
                "an" => {
                    assert_eq!(v["type"], "error");
                    assert_eq!(v["error"]["type"], "authentication_error");
                }
                "oa" => assert_eq!(v["error"]["code"], "invalid_api_key"),
                _ => assert_eq!(v["error"]["status"], "UNAUTHENTICATED"),
            }
        }
    }
    // Gemini's `key` query parameter works too, and never reaches the provider.
    let r = gw
        .http
        .post(format!(
            "{}?key={}",
            gw.url("gm", "v1beta/models/gemini-x:generateContent"),
            gw.key
        ))
        .json(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        fake.request_count(),
        1,
        "only the authenticated request arrived"
    );
    let seen = fake.last_request();
    assert_eq!(seen.header("x-goog-api-key"), Some("test-key"));
    assert_eq!(seen.path, "/v1beta/models/gemini-x:generateContent");
    assert_no_gateway_key(&fake, &gw.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_host_and_origin_are_refused() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "allowed_origins = [\"http://localhost:5173\"]").await;
    let port = gw.base.rsplit(':').next().unwrap().to_string();
    let body = messages_body("hi", false).to_string();
    let head = |host: &str, extra: &str| {
        format!(
            "POST /p/an/v1/messages HTTP/1.1\r\nhost: {host}\r\nx-api-key: {}\r\nanthropic-version: 2023-06-01\r\n{extra}",
            gw.key
        )
    };
    let (status, text) =
        raw_request(&gw.base, &head(&format!("evil.example:{port}"), ""), &body).await;
    assert_eq!(status, 421, "{text}");
    assert!(text.contains("\"type\":\"error\""), "{text}");
    let (status, _) = raw_request(
        &gw.base,
        &head(
            &format!("127.0.0.1:{}", port.parse::<u16>().unwrap() + 1),
            "",
        ),
        &body,
    )
    .await;
    assert_eq!(status, 421, "another port is another origin");
    let (status, text) = raw_request(
        &gw.base,
        &head(
            &format!("localhost:{port}"),
            "origin: https://evil.example\r\n",
        ),
        &body,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("Origin"), "{text}");
    assert_eq!(fake.request_count(), 0);
    let (status, text) = raw_request(
        &gw.base,
        &head(
            &format!("localhost:{port}"),
            "origin: http://localhost:5173\r\n",
        ),
        &body,
    )
    .await;
    assert_eq!(status, 200, "a configured origin is served: {text}");
    let (status, _) = raw_request(&gw.base, &head(&format!("localhost:{port}"), ""), &body).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_logins_need_gateway_true() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let r = gw
        .post("sub", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("gateway = true") && msg.contains("[profiles.sub]"),
        "{msg}"
    );
    assert_eq!(fake.request_count(), 0);

    let r = gw
        .http
        .post(gw.url("subok", "v1/messages"))
        .header("authorization", format!("Bearer {}", gw.key))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "files-api-2025-04-14")
        .json(&messages_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = fake.last_request();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {}", setup_token()).as_str())
    );
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("oauth-2025-04-20,files-api-2025-04-14"),
        "the client's betas are merged with the OAuth beta"
    );
    assert_no_gateway_key(&fake, &gw.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_cap_are_refused() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "max_body_bytes = 4096").await;
    let big = messages_body(&"x".repeat(8192), false);
    let r = gw.post("an", "v1/messages", &big).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(fake.request_count(), 0);
    let r = gw
        .post("an", "v1/messages", &messages_body("small", false))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_traversal_are_not_forwarded() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let port = gw.base.rsplit(':').next().unwrap().to_string();
    // Raw requests: an HTTP client library would resolve the dot segments itself.
    for rest in [
        "v1/../v1/messages",
        "v1/%2e%2e/admin",
        "admin",
        "v1/complete",
        "v1//messages",
    ] {
        let head = format!(
            "POST /p/an/{rest} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nx-api-key: {}\r\n",
            gw.key
        );
        let (status, text) = raw_request(&gw.base, &head, "{}").await;
        assert_eq!(status, 404, "{rest}: {text}");
    }
    let r = gw.post("nope", "v1/messages", &json!({})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_and_embeddings_go_through_natively() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let r = gw
        .http
        .post(gw.url("oa", "v1/chat/completions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gpt-x", "messages": [{"role": "user", "content": USE_TOOL}], "tools": tools}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let seen = fake.last_request();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header("authorization"), Some("Bearer test-key"));
    let r = gw
        .http
        .post(gw.url("oa", "v1/embeddings"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "e", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_no_gateway_key(&fake, &gw.key);
}

/// Reads SSE events (`data:` payloads) from a streaming response as they come.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    fn new(r: reqwest::Response) -> Events {
        Events {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                if let Some(d) = ev.lines().find_map(|l| l.strip_prefix("data:")) {
                    return Some(d.trim().to_string());
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("an event in time")?
                .ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_event_by_event_and_a_hang_up_cancels_upstream() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    // Paced so that the stream is still running upstream when the first event arrives.
    fake.set_event_delay(Duration::from_millis(300));
    let r = gw
        .post("an", "v1/messages", &messages_body("hi", true))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut ev = Events::new(r);
    let first = ev.next().await.expect("first event");
    assert!(first.contains("message_start"), "{first}");
    assert_eq!(
        fake.completed(),
        0,
        "the first event came before the stream ended"
    );
    drop(ev);
    assert!(
        fake.wait_for_aborted(1, Duration::from_secs(10)).await,
        "the upstream stream was aborted after the client hung up"
    );

    // The translated route cancels too.
    fake.reset();
    fake.set_event_delay(Duration::from_millis(300));
    let r = gw
        .http
        .post(gw.url("gm", "v1/chat/completions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gemini-x", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ev = Events::new(r);
    let first = ev.next().await.expect("first chunk");
    assert!(first.contains("chat.completion.chunk"), "{first}");
    drop(ev);
    assert!(fake.wait_for_aborted(1, Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_profile_for_gateway_and_socket_clients() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    fake.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 2,
        },
    );
    let via_gateway = {
        let (http, url, key) = (
            gw.http.clone(),
            gw.url("subok", "v1/messages"),
            gw.key.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .header("x-api-key", key)
                .json(&messages_body("hi", false))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let limits = |st: StatusResult| {
        let p = st.profiles.into_iter().find(|p| p.name == "subok").unwrap();
        p.limits.unwrap()
    };
    // The 429 pauses the profile's shared limiter (the gateway's retry waits on it)...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = limits(gw.status().await);
        if l.queued == 1 && l.paused_for_ms.is_some_and(|ms| ms > 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 429 should pause the profile: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and a socket `chat` started now queues behind it.
    let c = gw.d.client().await;
    let via_socket = tokio::spawn(async move {
        let req = serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]}))
            .unwrap();
        c.chat("subok", req).await.map(|_| ())
    });
    loop {
        let l = limits(gw.status().await);
        if l.queued == 2 {
            assert!(l.paused_for_ms.is_some_and(|ms| ms > 0), "{l:?}");
            assert_eq!(fake.request_count(), 1, "nobody passed the pause");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline && l.paused_for_ms.is_some(),
            "the socket client should wait on the paused profile: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        via_gateway.await.unwrap().unwrap(),
        200,
        "the gateway retried after the pause"
    );
    via_socket
        .await
        .unwrap()
        .expect("the socket chat ran after the pause");
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_route_is_translated_for_other_providers() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "w",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    for profile in ["an", "gm"] {
        let r = gw
            .http
            .post(gw.url(profile, "v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&json!({"messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": USE_TOOL}], "tools": tools}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{profile}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        // The tool result goes back as a `tool` message.
        let r = gw
            .http
            .post(gw.url(profile, "v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&json!({"stream": true, "stream_options": {"include_usage": true}, "tools": tools, "messages": [
                {"role": "user", "content": USE_TOOL},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut ev = Events::new(r);
        let (mut text, mut done, mut usage) = (String::new(), false, false);
        while let Some(e) = ev.next().await {
            if e == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(&e).unwrap();
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                text.push_str(t);
            }
            usage |= v
                .get("usage")
                .is_some_and(|u| u["total_tokens"].as_u64() > Some(0));
        }
        assert!(done && usage, "{profile}: [DONE] and usage arrive");
        assert_eq!(text, "The tool said: sunny", "{profile}");
    }
    let seen = fake.last_request();
    assert_eq!(seen.header("x-goog-api-key"), Some("test-key"));
    assert_no_gateway_key(&fake, &gw.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_pass_through_after_the_retries() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    fake.fail_next(1, Failure::Status(400));
    let r = gw
        .post("an", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "the provider's own body: {v}");
    assert_eq!(fake.request_count(), 1, "a 400 is not retried");
    fake.reset();
    fake.fail_next(1, Failure::Status(500));
    let r = gw
        .post("an", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 200, "a 500 before the first byte is retried");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_agent_keys_are_counted_in_status() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let k: GatewayKeyResult =
        gw.d.client()
            .await
            .call(
                "gateway.key",
                &GatewayKeyParams {
                    agent: Some("aider".into()),
                },
            )
            .await
            .unwrap();
    assert_ne!(k.key, gw.key);
    let r = gw
        .http
        .post(gw.url("an", "v1/messages"))
        .header("x-api-key", &k.key)
        .json(&messages_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let g = gw.status().await.gateway.unwrap();
    assert_eq!(g.requests_by_agent.get("aider"), Some(&1));
    assert_eq!(fake.last_request().header("x-api-key"), Some("test-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_prints_the_key_the_exports_and_where_it_listens() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let out = gw.d.llmctl(&["gateway", "key"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), gw.key);
    let key_file = gw.d.home.join("state/llmd/gateway/key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = gw.d.llmctl(&["env", "--gateway", "an"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("export ANTHROPIC_BASE_URL='{}/p/an'", gw.base)),
        "{text}"
    );
    assert!(
        text.contains(&format!("export ANTHROPIC_API_KEY='{}'", gw.key)),
        "{text}"
    );
    assert!(
        text.contains(&format!("export OPENAI_BASE_URL='{}/p/an/v1'", gw.base)),
        "{text}"
    );
    let out = gw.d.llmctl(&["env", "--gateway", "an", "--agent", "aider"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&gw.key) && text.contains("llmd-gw-aider."),
        "{text}"
    );
    let out = gw.d.llmctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("gateway: {}", gw.base)), "{text}");
    assert!(!gw.d.logs().contains(&gw.key), "the key is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_before_the_answer_cancels_upstream() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    fake.set_latency(Duration::from_secs(30));
    let addr = gw.base.trim_start_matches("http://").to_string();
    let body = messages_body("hi", false).to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST /p/an/v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        gw.key,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert!(fake.wait_for_requests(1, Duration::from_secs(10)).await);
    drop(s);
    assert!(
        fake.wait_for_aborted(1, Duration::from_secs(10)).await,
        "the upstream request was dropped with the client's connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_401_on_a_login_forces_one_refresh_and_one_retry() {
    use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
    let oauth = FakeOAuth::start(3600).await;
    let fake = FakeProviders::start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ngateway = true\ntoken_endpoint = \"{}\"\nbase_url = \"{}\"\n",
        oauth.anthropic_url(),
        fake.anthropic_base()
    );
    let bundle = json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now + 3600});
    let d = Daemon::builder()
        .config(&cfg)
        .file("state/llmd/oauth/work.json", &bundle.to_string(), 0o600)
        .start();
    let k: GatewayKeyResult = d
        .client()
        .await
        .call("gateway.key", &GatewayKeyParams::default())
        .await
        .unwrap();
    fake.fail_next(1, Failure::Status(401));
    let r = reqwest::Client::new()
        .post(format!("{}/p/work/v1/messages", k.base_url.unwrap()))
        .header("x-api-key", &k.key)
        .json(&messages_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(oauth.refresh_calls(), 1, "one forced refresh");
    let reqs = fake.chat_requests();
    assert_eq!(reqs.len(), 2, "one retry");
    assert_eq!(
        reqs[1].header("authorization"),
        Some(format!("Bearer {}", access_of(1)).as_str())
    );
    assert_no_gateway_key(&fake, &k.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_and_gemini_streams_go_through_natively() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[profiles.mm]\nprovider = \"minimax\"\nauth = \"api-key\"\napi_key_env = \"TEST_KEY\"\ngroup_id = \"g1\"\nbase_url = \"{}\"\n\n[profiles.gm]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_key_env = \"TEST_KEY\"\nbase_url = \"{}\"\n",
        fake.minimax_base(),
        fake.gemini_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("TEST_KEY", "test-key")
        .start();
    let k: GatewayKeyResult = d
        .client()
        .await
        .call("gateway.key", &GatewayKeyParams::default())
        .await
        .unwrap();
    let base = k.base_url.unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/p/mm/v1/text/chatcompletion_v2"))
        .bearer_auth(&k.key)
        .json(&json!({"model": "MiniMax-M1", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = fake.last_request();
    assert_eq!(seen.header("authorization"), Some("Bearer test-key"));
    assert_eq!(seen.header("x-minimax-group-id"), Some("g1"));
    let r = http
        .post(format!(
            "{base}/p/gm/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
        ))
        .header("x-goog-api-key", &k.key)
        .json(&json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ev = Events::new(r);
    let mut text = String::new();
    while let Some(e) = ev.next().await {
        let v: Value = serde_json::from_str(&e).unwrap();
        if let Some(t) = v
            .pointer("/candidates/0/content/parts/0/text")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
    }
    assert_eq!(text, "Hello from gemini");
    assert_eq!(
        fake.last_request().path,
        "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    );
    assert_no_gateway_key(&fake, &k.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_the_same_routes_privately() {
    let fake = FakeProviders::start().await;
    let extra = "unix = \"{home}/run/llmd/gateway.sock\"";
    let gw = Gw::start(&fake, extra).await;
    let path = gw.d.home.join("run/llmd/gateway.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let body = messages_body("hi", false).to_string();
    let ask = |key: String| {
        let (path, body) = (path.clone(), body.clone());
        async move {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            let req = format!(
                "POST /p/an/v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let ok = ask(gw.key.clone()).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("Hello from anthropic"), "{ok}");
    let refused = ask("llmd-gw-wrong".into()).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let st = gw.status().await.gateway.unwrap();
    assert_eq!(st.unix.as_deref(), Some(path.to_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_estimates_are_corrected_by_the_usage_of_answers_and_streams() {
    use llmd_tests::fake_providers::{INPUT_TOKENS, OUTPUT_TOKENS};
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[profiles.an]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"TEST_KEY\"\nbase_url = \"{}\"\n[profiles.an.rate_limit]\ntokens_per_minute = 1000000\n",
        fake.anthropic_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("TEST_KEY", "test-key")
        .start();
    let c = d.client().await;
    let k: GatewayKeyResult = c
        .call("gateway.key", &GatewayKeyParams::default())
        .await
        .unwrap();
    let url = format!("{}/p/an/v1/messages", k.base_url.unwrap());
    let http = reqwest::Client::new();
    let remaining = || async {
        let st = d.client().await.status().await.unwrap();
        st.profiles[0].limits.clone().unwrap().remaining_tokens
    };
    // Each request budgets 50 000 output tokens; the answers report 12 + 7.
    let body = |stream: bool| {
        json!({"model": "claude-x", "max_tokens": 50000, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let r = http
        .post(&url)
        .header("x-api-key", &k.key)
        .json(&body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let per_answer = INPUT_TOKENS + OUTPUT_TOKENS;
    assert_eq!(
        remaining().await,
        Some(1_000_000 - per_answer),
        "settled from the JSON usage"
    );
    let r = http
        .post(&url)
        .header("x-api-key", &k.key)
        .json(&body(true))
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await.unwrap();
    assert_eq!(
        remaining().await,
        Some(1_000_000 - 2 * per_answer),
        "settled from the stream's message_start and message_delta usage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_route_is_translated_for_other_providers() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let tools = json!([{"name": "get_weather", "description": "w",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    for (profile, speaker) in [("gm", "gemini"), ("oa", "openai")] {
        let ask = json!({"role": "user", "content": USE_TOOL});
        let r = gw
            .post(
                profile,
                "v1/messages",
                &json!({"max_tokens": 100, "tools": tools, "messages": [ask]}),
            )
            .await;
        assert_eq!(r.status(), 200, "{profile}");
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["type"], "message");
        assert_eq!(m["stop_reason"], "tool_use", "{m}");
        let call = m["content"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "tool_use")
            .unwrap()
            .clone();
        assert_eq!(call["input"], json!({"city": "Paris"}));
        let r = gw
            .post(
                profile,
                "v1/messages",
                &json!({"max_tokens": 100, "stream": true, "tools": tools, "messages": [
                    ask, {"role": "assistant", "content": [call]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]}]}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let mut ev = Events::new(r);
        let (mut kinds, mut text) = (Vec::new(), String::new());
        while let Some(e) = ev.next().await {
            let v: Value = serde_json::from_str(&e).unwrap();
            kinds.push(v["type"].as_str().unwrap_or("").to_string());
            if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                text.push_str(t);
            }
        }
        assert_eq!(text, "The tool said: sunny", "{profile}");
        assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
        assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));
        let r = gw
            .post(profile, "v1/messages", &messages_body("hi", false))
            .await;
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["content"][0]["text"], format!("Hello from {speaker}"));
    }
    assert_no_gateway_key(&fake, &gw.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_true_takes_effect_on_reload() {
    let fake = FakeProviders::start().await;
    let gw = Gw::start(&fake, "").await;
    let r = gw
        .post("sub", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 403);
    let path = gw.d.home.join("config/llmd/config.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[profiles.sub]\nprovider = \"anthropic\"\nauth = \"setup-token\"\n",
        "[profiles.sub]\nprovider = \"anthropic\"\nauth = \"setup-token\"\ngateway = true\n",
    );
    std::fs::write(&path, text).unwrap();
    let out = gw.d.llmctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = gw
        .post("sub", "v1/messages", &messages_body("hi", false))
        .await;
    assert_eq!(r.status(), 200, "the reloaded profile is served");
    assert_eq!(
        fake.last_request().header("authorization"),
        Some(format!("Bearer {}", setup_token()).as_str())
    );
}
