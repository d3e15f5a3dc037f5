//! Fake provider APIs on 127.0.0.1 for the end-to-end tests: Anthropic Messages, OpenAI
//! chat completions, Gemini `generateContent`, MiniMax `chatcompletion_v2` (and its
//! Anthropic-style endpoint), each as JSON and as SSE, plus their embeddings endpoints.
//!
//! What it answers, in this order:
//! 1. a failure queued with [`FakeProviders::fail_next`];
//! 2. a reply queued with [`FakeProviders::reply`];
//! 3. otherwise it reads the last turn of the request: a tool result is answered with the
//!    text `The tool said: <result>`; a message containing [`USE_TOOL_BADLY`] gets a call
//!    of the first offered tool with `{"city":5}`, one containing [`USE_TOOL`] the same
//!    call with `{"city":"Paris"}`; anything else gets `Hello from <provider>`.
//!
//! Every request is recorded (headers and body). Streams can be paced
//! ([`FakeProviders::set_event_delay`]), and responses the client stopped reading before
//! their end are counted ([`FakeProviders::aborted`]).
//!
//! ```no_run
//! # async fn demo() {
//! use llmd_tests::fake_providers::{FakeProviders, Failure, Reply};
//! let fake = FakeProviders::start().await;
//! fake.fail_next(1, Failure::RateLimited { retry_after_secs: 1 });
//! fake.reply(Reply::text("scripted"));
//! let config = format!("[profiles.oa]\nprovider = \"openai-compat\"\nauth = \"api-key\"\n\
//!     api_key_env = \"OA_KEY\"\nbase_url = \"{}\"\n", fake.openai_base());
//! # let _ = config;
//! // ... start llmd with `config`, chat, then:
//! assert_eq!(fake.last_request().header("authorization"), Some("Bearer test-key"));
//! # }
//! ```

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A message containing this gets a call of the first offered tool with valid arguments.
pub const USE_TOOL: &str = "use the tool";
/// A message containing this gets a call with arguments that break the weather schema
/// (`{"city": 5}`). Checked before [`USE_TOOL`], which it contains.
pub const USE_TOOL_BADLY: &str = "use the tool badly";
/// Prompt tokens every answer reports.
pub const INPUT_TOKENS: u64 = 12;
/// Output tokens every answer reports.
pub const OUTPUT_TOKENS: u64 = 7;

/// Which wire format a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /v1/chat/completions` or `/chat/completions`, and `/embeddings`.
    OpenAi,
    /// `POST /v1beta/models/{model}:{method}`.
    Gemini,
    /// `POST /v1/text/chatcompletion_v2`, and `/v1/embeddings` with `texts`.
    Minimax,
    /// `POST /anthropic/v1/messages` (MiniMax's Anthropic-style endpoint).
    MinimaxAnthropic,
    /// Anything else (answered 404).
    Unknown,
}

impl Wire {
    /// The provider name used in default answers (`Hello from openai`).
    pub fn name(self) -> &'static str {
        match self {
            Wire::Anthropic => "anthropic",
            Wire::OpenAi => "openai",
            Wire::Gemini => "gemini",
            Wire::Minimax => "minimax",
            Wire::MinimaxAnthropic => "minimax-anthropic",
            Wire::Unknown => "unknown",
        }
    }

    fn anthropic_style(self) -> bool {
        matches!(self, Wire::Anthropic | Wire::MinimaxAnthropic)
    }
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Wire format.
    pub wire: Wire,
    /// Path and query, e.g. `/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse`.
    pub path: String,
    /// Headers, names lowercase.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Null` when it was not JSON).
    pub body: Value,
    /// The client asked for a stream.
    pub stream: bool,
    /// An embeddings request.
    pub embedding: bool,
}

impl Recorded {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Names of the tools offered, in order, whatever the wire format.
    pub fn tool_names(&self) -> Vec<String> {
        tool_decls(self.wire, &self.body)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// The parameter schema of the offered tool `name`, in the wire format's place.
    pub fn tool_schema(&self, name: &str) -> Option<Value> {
        tool_decls(self.wire, &self.body)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, schema)| schema)
    }

    /// The text of the last turn (tool results included), whatever the wire format.
    pub fn last_turn_text(&self) -> String {
        match last_turn(self.wire, &self.body) {
            Turn::Text(t) | Turn::ToolResult(t) => t,
        }
    }
}

/// One tool call in a scripted reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Tool name; `None` calls the first tool the request offers.
    pub name: Option<String>,
    /// Arguments.
    pub input: Value,
}

/// A scripted answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Reasoning, sent first (Anthropic thinking, `reasoning_content`, Gemini thought).
    pub thinking: Option<String>,
    /// Text.
    pub text: Option<String>,
    /// Tool calls, after the text.
    pub tool_calls: Vec<ToolCall>,
}

impl Reply {
    /// Just this text.
    pub fn text(t: &str) -> Reply {
        Reply {
            text: Some(t.into()),
            ..Reply::default()
        }
    }

    /// A call of the first offered tool.
    pub fn tool_call(input: Value) -> Reply {
        Reply::default().with_tool_call(None, input)
    }

    /// A call of tool `name`.
    pub fn named_tool_call(name: &str, input: Value) -> Reply {
        Reply::default().with_tool_call(Some(name), input)
    }

    /// Adds text.
    pub fn with_text(mut self, t: &str) -> Reply {
        self.text = Some(t.into());
        self
    }

    /// Adds reasoning.
    pub fn with_thinking(mut self, t: &str) -> Reply {
        self.thinking = Some(t.into());
        self
    }

    /// Adds a tool call (`None`: the first offered tool).
    pub fn with_tool_call(mut self, name: Option<&str>, input: Value) -> Reply {
        self.tool_calls.push(ToolCall {
            name: name.map(str::to_owned),
            input,
        });
        self
    }
}

/// How to fail a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This HTTP status with the wire format's error body (401, 400, 500, …).
    Status(u16),
    /// 429 with `retry-after`.
    RateLimited {
        /// Seconds in `retry-after`.
        retry_after_secs: u64,
    },
    /// 529 with Anthropic's `overloaded_error` body.
    Overloaded,
    /// A 200 stream that carries some text and then the wire format's error event
    /// (non-streaming requests get a 500 instead).
    StreamError,
    /// A 200 stream that stops before its end (connection closed mid-answer).
    CutStream,
    /// HTTP 200 with MiniMax's `base_resp` error code.
    MinimaxStatus(i64),
    /// Gemini's 429 `RESOURCE_EXHAUSTED` naming a daily quota (`QuotaFailure`, `RetryInfo`).
    GeminiQuota,
}

struct Inner {
    requests: Vec<Recorded>,
    replies: VecDeque<Reply>,
    failures: VecDeque<Failure>,
    event_delay: Duration,
    latency: Duration,
    aborted: usize,
    completed: usize,
    seq: u64,
    /// Sent with every answer (rate-limit and quota headers).
    headers: Vec<(String, String)>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake of every provider.
#[derive(Clone)]
pub struct FakeProviders {
    shared: Shared,
    /// Bound address.
    pub addr: SocketAddr,
}

impl FakeProviders {
    /// Starts the fake on 127.0.0.1 with a free port.
    pub async fn start() -> FakeProviders {
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                requests: Vec::new(),
                replies: VecDeque::new(),
                failures: VecDeque::new(),
                event_delay: Duration::ZERO,
                latency: Duration::ZERO,
                aborted: 0,
                completed: 0,
                seq: 0,
                headers: Vec::new(),
            })),
            changed: Arc::new(Notify::new()),
        };
        let route = |wire: Wire| {
            post(
                move |State(s): State<Shared>,
                      uri: OriginalUri,
                      headers: HeaderMap,
                      body: Bytes| { handle(s, wire, uri, headers, body) },
            )
        };
        let app = Router::new()
            .route("/v1/messages", route(Wire::Anthropic))
            .route("/anthropic/v1/messages", route(Wire::MinimaxAnthropic))
            .route("/v1/chat/completions", route(Wire::OpenAi))
            .route("/chat/completions", route(Wire::OpenAi))
            .route("/embeddings", route(Wire::OpenAi))
            // OpenAI (`input`) or MiniMax (`texts`): told apart by the body.
            .route("/v1/embeddings", route(Wire::Unknown))
            .route("/v1beta/models/{call}", route(Wire::Gemini))
            .route("/v1/text/chatcompletion_v2", route(Wire::Minimax))
            .fallback(
                |State(s): State<Shared>, uri: OriginalUri, headers: HeaderMap, body: Bytes| {
                    handle(s, Wire::Unknown, uri, headers, body)
                },
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake providers");
        let addr = listener.local_addr().expect("fake providers address");
        // Real APIs answer without Nagle's delay; without this, small stream events sit
        // for a delayed ACK (tens of ms) now and then.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeProviders { shared, addr }
    }

    /// Sends these headers with every answer from now on (replacing earlier ones), as a
    /// provider sends its rate-limit state.
    pub fn set_headers(&self, headers: &[(&str, &str)]) -> &Self {
        self.shared.lock().headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url` for an `anthropic` profile.
    pub fn anthropic_base(&self) -> String {
        self.url()
    }

    /// `base_url` for an `openai-compat` profile (`…/v1`).
    pub fn openai_base(&self) -> String {
        format!("{}/v1", self.url())
    }

    /// `base_url` for a `gemini` profile (`…/v1beta`).
    pub fn gemini_base(&self) -> String {
        format!("{}/v1beta", self.url())
    }

    /// `base_url` for a `minimax` profile.
    pub fn minimax_base(&self) -> String {
        self.url()
    }

    /// `base_url` for a `minimax` profile on the Anthropic-style endpoint.
    pub fn minimax_anthropic_base(&self) -> String {
        format!("{}/anthropic", self.url())
    }

    /// Queues a scripted answer (used before the last-message rules).
    pub fn reply(&self, r: Reply) -> &Self {
        self.shared.lock().replies.push_back(r);
        self
    }

    /// Fails the next `n` requests (of any kind) with `f`.
    pub fn fail_next(&self, n: usize, f: Failure) -> &Self {
        self.shared
            .lock()
            .failures
            .extend(std::iter::repeat_n(f, n));
        self
    }

    /// Pause between stream events (not before the first).
    pub fn set_event_delay(&self, d: Duration) -> &Self {
        self.shared.lock().event_delay = d;
        self
    }

    /// Pause before any response starts.
    pub fn set_latency(&self, d: Duration) -> &Self {
        self.shared.lock().latency = d;
        self
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Chat requests so far (no embeddings).
    pub fn chat_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.embedding)
            .collect()
    }

    /// Number of requests so far.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// The latest request; panics when there was none.
    pub fn last_request(&self) -> Recorded {
        self.shared
            .lock()
            .requests
            .last()
            .cloned()
            .expect("the fake provider received no request")
    }

    /// Responses the client stopped reading before their end (or before they started).
    pub fn aborted(&self) -> usize {
        self.shared.lock().aborted
    }

    /// Responses delivered to their end.
    pub fn completed(&self) -> usize {
        self.shared.lock().completed
    }

    /// Forgets recorded requests, queued replies and failures, and resets the counters.
    pub fn reset(&self) {
        let mut s = self.shared.lock();
        s.requests.clear();
        s.replies.clear();
        s.failures.clear();
        s.aborted = 0;
        s.completed = 0;
        s.event_delay = Duration::ZERO;
        s.latency = Duration::ZERO;
    }

    /// Waits until `cond` holds (checked whenever the fake's state changes); false on
    /// timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&FakeProviders) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            if cond(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // A short cap as well, in case a change slipped between check and wait.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), changed).await;
        }
    }

    /// Waits until at least `n` responses were aborted by the client.
    pub async fn wait_for_aborted(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |f| f.aborted() >= n).await
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |f| f.request_count() >= n).await
    }
}

/// Counts a response as completed or aborted when it is dropped: axum drops the handler
/// future, or the body stream, when the client goes away.
struct Outcome {
    shared: Shared,
    done: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        {
            let mut s = self.shared.lock();
            if self.done {
                s.completed += 1;
            } else {
                s.aborted += 1;
            }
        }
        self.shared.changed.notify_waiters();
    }
}

/// What the request's last turn says.
enum Turn {
    Text(String),
    ToolResult(String),
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn last_turn(wire: Wire, body: &Value) -> Turn {
    if wire == Wire::Gemini {
        let parts = body
            .pointer("/contents")
            .and_then(Value::as_array)
            .and_then(|c| c.last())
            .and_then(|c| c.get("parts"))
            .cloned()
            .unwrap_or_default();
        let parts = parts.as_array().cloned().unwrap_or_default();
        if let Some(r) = parts.iter().find_map(|p| p.get("functionResponse")) {
            let resp = r.get("response").cloned().unwrap_or_default();
            let v = resp
                .get("content")
                .or_else(|| resp.get("error"))
                .cloned()
                .unwrap_or(resp);
            return Turn::ToolResult(text_of(&v));
        }
        return Turn::Text(text_of(&Value::Array(parts)));
    }
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    if wire.anthropic_style() {
        if let Some(blocks) = last.get("content").and_then(Value::as_array) {
            if let Some(r) = blocks
                .iter()
                .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            {
                return Turn::ToolResult(text_of(r.get("content").unwrap_or(&Value::Null)));
            }
        }
        return Turn::Text(text_of(last.get("content").unwrap_or(&Value::Null)));
    }
    let content = text_of(last.get("content").unwrap_or(&Value::Null));
    if last.get("role").and_then(Value::as_str) == Some("tool") {
        Turn::ToolResult(content)
    } else {
        Turn::Text(content)
    }
}

/// (name, parameter schema) of every offered tool.
fn tool_decls(wire: Wire, body: &Value) -> Vec<(String, Value)> {
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let pick = |t: &Value, name: &str, schema: &str| {
        Some((
            t.pointer(name)?.as_str()?.to_owned(),
            t.pointer(schema).cloned().unwrap_or(Value::Null),
        ))
    };
    match wire {
        Wire::Gemini => tools
            .iter()
            .filter_map(|t| t.get("functionDeclarations").and_then(Value::as_array))
            .flatten()
            .filter_map(|d| pick(d, "/name", "/parameters"))
            .collect(),
        w if w.anthropic_style() => tools
            .iter()
            .filter_map(|t| pick(t, "/name", "/input_schema"))
            .collect(),
        _ => tools
            .iter()
            .filter_map(|t| pick(t, "/function/name", "/function/parameters"))
            .collect(),
    }
}

/// A reply with tool names resolved.
struct Answer {
    thinking: Option<String>,
    text: Option<String>,
    calls: Vec<(String, Value)>,
}

impl Answer {
    fn stop_is_tool(&self) -> bool {
        !self.calls.is_empty()
    }
}

fn decide(scripted: Option<Reply>, wire: Wire, body: &Value) -> Answer {
    let tools = tool_decls(wire, body);
    let reply = scripted.unwrap_or_else(|| match last_turn(wire, body) {
        Turn::ToolResult(r) => Reply::text(&format!("The tool said: {r}")),
        Turn::Text(t) if t.contains(USE_TOOL) && tools.is_empty() => {
            Reply::text("You asked for a tool, but the request offers none.")
        }
        Turn::Text(t) if t.contains(USE_TOOL_BADLY) => Reply::tool_call(json!({"city": 5})),
        Turn::Text(t) if t.contains(USE_TOOL) => Reply::tool_call(json!({"city": "Paris"})),
        Turn::Text(_) => Reply::text(&format!("Hello from {}", wire.name())),
    });
    let first = tools
        .first()
        .map_or_else(|| "no_tool_offered".to_owned(), |(n, _)| n.clone());
    Answer {
        thinking: reply.thinking,
        text: reply.text,
        calls: reply
            .tool_calls
            .into_iter()
            .map(|c| (c.name.unwrap_or_else(|| first.clone()), c.input))
            .collect(),
    }
}

fn lower_headers(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn handle(
    shared: Shared,
    wire: Wire,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let extra = shared.lock().headers.clone();
    let mut resp = answer_request(shared, wire, uri, headers, body).await;
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

async fn answer_request(
    shared: Shared,
    wire: Wire,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let wire = match wire {
        Wire::Unknown if uri.path() == "/v1/embeddings" && body.get("texts").is_some() => {
            Wire::Minimax
        }
        Wire::Unknown if uri.path() == "/v1/embeddings" => Wire::OpenAi,
        w => w,
    };
    // Gemini names the model and method in the last path segment: `{model}:{method}`.
    let (gemini_model, gemini_method) = match wire {
        Wire::Gemini => {
            let last = uri.path().rsplit('/').next().unwrap_or_default();
            let (m, method) = last.split_once(':').unwrap_or((last, ""));
            (m.to_owned(), method.to_owned())
        }
        _ => (String::new(), String::new()),
    };
    let embedding = uri.path().ends_with("/embeddings") || gemini_method == "batchEmbedContents";
    let stream = if wire == Wire::Gemini {
        gemini_method == "streamGenerateContent"
    } else {
        body.get("stream").and_then(Value::as_bool) == Some(true)
    };
    let (seq, failure, scripted, latency, delay) = {
        let mut s = shared.lock();
        s.seq += 1;
        s.requests.push(Recorded {
            wire,
            path,
            headers: lower_headers(&headers),
            body: body.clone(),
            stream,
            embedding,
        });
        let failure = s.failures.pop_front();
        let scripted = if failure.is_none() && !embedding {
            s.replies.pop_front()
        } else {
            None
        };
        (s.seq, failure, scripted, s.latency, s.event_delay)
    };
    shared.changed.notify_waiters();
    let mut outcome = Outcome {
        shared: shared.clone(),
        done: false,
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if wire == Wire::Unknown {
        outcome.done = true;
        return (StatusCode::NOT_FOUND, "no such fake endpoint").into_response();
    }
    let model = if wire == Wire::Gemini {
        gemini_model
    } else {
        body.get("model")
            .and_then(Value::as_str)
            .unwrap_or("fake-model")
            .to_owned()
    };
    match failure {
        Some(Failure::StreamError | Failure::CutStream) if stream && !embedding => {}
        Some(f) => {
            outcome.done = true;
            return failure_response(wire, f);
        }
        None => {}
    }
    if embedding {
        outcome.done = true;
        return axum::Json(embeddings(wire, &body, &model)).into_response();
    }
    let answer = decide(scripted, wire, &body);
    if !stream {
        outcome.done = true;
        return axum::Json(match wire {
            Wire::Gemini => gemini_json(&answer, &model, seq),
            w if w.anthropic_style() => anthropic_json(&answer, &model, seq),
            w => openai_json(&answer, &model, seq, w == Wire::Minimax),
        })
        .into_response();
    }
    let mut events = match wire {
        Wire::Gemini => gemini_sse(&answer, &model, seq),
        w if w.anthropic_style() => anthropic_sse(&answer, &model, seq),
        w => openai_sse(&answer, &model, seq, w == Wire::Minimax),
    };
    // Failing streams keep their opening events and first piece of content.
    let keep = match wire {
        w if w.anthropic_style() => 4,
        Wire::Gemini => 1,
        _ => 2,
    };
    let cut = match failure {
        Some(Failure::StreamError) => {
            events.truncate(keep);
            events.push(stream_error(wire));
            false
        }
        Some(Failure::CutStream) => {
            events.truncate(keep);
            true
        }
        _ => false,
    };
    sse_response(outcome, events, delay, cut)
}

fn sse_response(outcome: Outcome, events: Vec<String>, delay: Duration, cut: bool) -> Response {
    struct Pacer {
        events: VecDeque<String>,
        delay: Duration,
        first: bool,
        cut: bool,
        outcome: Outcome,
    }
    let pacer = Pacer {
        events: events.into(),
        delay,
        first: true,
        cut,
        outcome,
    };
    let body = futures_util::stream::unfold(pacer, |mut p| async move {
        let Some(ev) = p.events.pop_front() else {
            // Dropping `p` here counts the response as complete.
            p.outcome.done = true;
            if std::mem::take(&mut p.cut) {
                // hyper drops what it has not flushed when a body fails; pausing lets it
                // flush, so the client really gets the first part before the cut.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let e = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "cut by the fake");
                return Some((Err(e), p));
            }
            return None;
        };
        if !p.first && !p.delay.is_zero() {
            tokio::time::sleep(p.delay).await;
        }
        p.first = false;
        Some((Ok(Bytes::from(ev)), p))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

fn failure_response(wire: Wire, f: Failure) -> Response {
    let (status, kind, message) = match f {
        Failure::Status(401) => (401, "authentication_error", "invalid x-api-key"),
        Failure::Status(403) => (403, "permission_error", "not allowed"),
        Failure::Status(400) => (400, "invalid_request_error", "bad request"),
        Failure::Status(s) if s >= 500 => (s, "api_error", "Internal server error"),
        Failure::Status(s) => (s, "error", "failed"),
        Failure::RateLimited { .. } => (429, "rate_limit_error", "Rate limited"),
        Failure::Overloaded => (529, "overloaded_error", "Overloaded"),
        Failure::StreamError | Failure::CutStream => (500, "api_error", "Internal server error"),
        Failure::GeminiQuota => {
            let body = json!({"error": {"code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        "quotaValue": "50"}]},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"}]}});
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return resp;
        }
        Failure::MinimaxStatus(code) => {
            let body = json!({"id": "", "choices": null, "created": 0, "model": "", "object": "",
                "base_resp": {"status_code": code, "status_msg": format!("fake MiniMax error {code}")}});
            return axum::Json(body).into_response();
        }
    };
    let body = match wire {
        Wire::Gemini => {
            let st = match status {
                401 => "UNAUTHENTICATED",
                429 => "RESOURCE_EXHAUSTED",
                s if s >= 500 => "UNAVAILABLE",
                _ => "INVALID_ARGUMENT",
            };
            json!({"error": {"code": status, "message": message, "status": st}})
        }
        w if w.anthropic_style() => {
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        _ => json!({"error": {"message": message, "type": kind, "code": status}}),
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(body)).into_response();
    if let Failure::RateLimited { retry_after_secs } = f {
        resp.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&retry_after_secs.to_string())
                .unwrap_or(HeaderValue::from_static("1")),
        );
    }
    resp
}

fn stream_error(wire: Wire) -> String {
    match wire {
        Wire::Gemini => data(
            &json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
        ),
        Wire::Minimax => {
            data(&json!({"base_resp": {"status_code": 1000, "status_msg": "unknown error"}}))
        }
        w if w.anthropic_style() => event(
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        _ => {
            data(&json!({"error": {"message": "The server had an error", "type": "server_error"}}))
        }
    }
}

/// Cuts `s` into pieces of about `n` characters (never inside a character).
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n.max(1)).map(|c| c.iter().collect()).collect()
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn event(name: &str, v: &Value) -> String {
    format!("event: {name}\ndata: {v}\n\n")
}

// ---- Anthropic ----

fn anthropic_json(a: &Answer, model: &str, seq: u64) -> Value {
    let mut content = Vec::new();
    if let Some(t) = &a.thinking {
        content.push(json!({"type": "thinking", "thinking": t, "signature": format!("sig-{seq}")}));
    }
    if let Some(t) = &a.text {
        content.push(json!({"type": "text", "text": t}));
    }
    for (i, (name, input)) in a.calls.iter().enumerate() {
        content.push(json!({"type": "tool_use", "id": format!("toolu_fake_{seq}_{i}"), "name": name, "input": input}));
    }
    json!({
        "id": format!("msg_fake_{seq}"), "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": if a.stop_is_tool() { "tool_use" } else { "end_turn" },
        "stop_sequence": null,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    })
}

fn anthropic_sse(a: &Answer, model: &str, seq: u64) -> Vec<String> {
    let mut ev = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": format!("msg_fake_{seq}"), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    let mut index = 0;
    let mut block = |ev: &mut Vec<String>, start: Value, deltas: Vec<Value>| {
        ev.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        for d in deltas {
            ev.push(event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": d}),
            ));
        }
        ev.push(event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    };
    if let Some(t) = &a.thinking {
        let mut d: Vec<Value> = pieces(t, 6)
            .into_iter()
            .map(|p| json!({"type": "thinking_delta", "thinking": p}))
            .collect();
        d.push(json!({"type": "signature_delta", "signature": format!("sig-{seq}")}));
        block(
            &mut ev,
            json!({"type": "thinking", "thinking": "", "signature": ""}),
            d,
        );
    }
    if let Some(t) = &a.text {
        let d = pieces(t, 5)
            .into_iter()
            .map(|p| json!({"type": "text_delta", "text": p}))
            .collect();
        block(&mut ev, json!({"type": "text", "text": ""}), d);
    }
    for (i, (name, input)) in a.calls.iter().enumerate() {
        // Like the real API: an empty first fragment, then the JSON in small pieces.
        let mut d = vec![json!({"type": "input_json_delta", "partial_json": ""})];
        d.extend(
            pieces(&input.to_string(), 4)
                .into_iter()
                .map(|p| json!({"type": "input_json_delta", "partial_json": p})),
        );
        block(
            &mut ev,
            json!({"type": "tool_use", "id": format!("toolu_fake_{seq}_{i}"), "name": name, "input": {}}),
            d,
        );
    }
    ev.push(event(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": if a.stop_is_tool() { "tool_use" } else { "end_turn" }, "stop_sequence": null},
            "usage": {"output_tokens": OUTPUT_TOKENS}}),
    ));
    ev.push(event("message_stop", &json!({"type": "message_stop"})));
    ev
}

// ---- OpenAI and MiniMax ----

fn openai_usage() -> Value {
    json!({"prompt_tokens": INPUT_TOKENS, "completion_tokens": OUTPUT_TOKENS,
           "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS, "prompt_tokens_details": {"cached_tokens": 0}})
}

fn openai_message(a: &Answer, seq: u64) -> Value {
    let mut m = json!({"role": "assistant", "content": a.text});
    if let Some(t) = &a.thinking {
        m["reasoning_content"] = t.clone().into();
    }
    if !a.calls.is_empty() {
        m["tool_calls"] = a
            .calls
            .iter()
            .enumerate()
            .map(|(i, (name, input))| {
                json!({"id": format!("call_fake_{seq}_{i}"), "type": "function",
                       "function": {"name": name, "arguments": input.to_string()}})
            })
            .collect();
    }
    m
}

fn finish_reason(a: &Answer) -> &'static str {
    if a.stop_is_tool() {
        "tool_calls"
    } else {
        "stop"
    }
}

fn openai_json(a: &Answer, model: &str, seq: u64, minimax: bool) -> Value {
    let mut v = json!({
        "id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion", "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": openai_message(a, seq), "finish_reason": finish_reason(a)}],
        "usage": openai_usage()
    });
    if minimax {
        v["base_resp"] = json!({"status_code": 0, "status_msg": ""});
    }
    v
}

fn openai_sse(a: &Answer, model: &str, seq: u64, minimax: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
               "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut ev = vec![data(&chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    if let Some(t) = &a.thinking {
        for p in pieces(t, 6) {
            ev.push(data(&chunk(json!({"reasoning_content": p}), None)));
        }
    }
    if let Some(t) = &a.text {
        for p in pieces(t, 5) {
            ev.push(data(&chunk(json!({"content": p}), None)));
        }
    }
    for (i, (name, input)) in a.calls.iter().enumerate() {
        ev.push(data(&chunk(
            json!({"tool_calls": [{"index": i, "id": format!("call_fake_{seq}_{i}"), "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            None,
        )));
        for p in pieces(&input.to_string(), 4) {
            ev.push(data(&chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": p}}]}),
                None,
            )));
        }
    }
    if minimax {
        // MiniMax repeats the whole message with the finish reason and ends without [DONE].
        let mut last = chunk(json!({}), Some(finish_reason(a)));
        last["choices"][0]["message"] = openai_message(a, seq);
        last["usage"] = openai_usage();
        last["base_resp"] = json!({"status_code": 0, "status_msg": ""});
        ev.push(data(&last));
    } else {
        ev.push(data(&chunk(json!({}), Some(finish_reason(a)))));
        ev.push(data(
            &json!({"id": format!("chatcmpl-fake-{seq}"), "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": model, "choices": [], "usage": openai_usage()}),
        ));
        ev.push("data: [DONE]\n\n".into());
    }
    ev
}

// ---- Gemini ----

fn gemini_usage() -> Value {
    json!({"promptTokenCount": INPUT_TOKENS, "candidatesTokenCount": OUTPUT_TOKENS,
           "totalTokenCount": INPUT_TOKENS + OUTPUT_TOKENS})
}

fn gemini_chunk(parts: Vec<Value>, finish: Option<&str>, model: &str, seq: u64) -> Value {
    let mut c = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(f) = finish {
        c["finishReason"] = f.into();
    }
    let mut v =
        json!({"candidates": [c], "modelVersion": model, "responseId": format!("fake-resp-{seq}")});
    if finish.is_some() {
        v["usageMetadata"] = gemini_usage();
    }
    v
}

fn gemini_parts(a: &Answer) -> Vec<Value> {
    let mut parts = Vec::new();
    if let Some(t) = &a.thinking {
        parts.push(json!({"text": t, "thought": true}));
    }
    if let Some(t) = &a.text {
        parts.push(json!({"text": t}));
    }
    for (name, input) in &a.calls {
        parts.push(json!({"functionCall": {"name": name, "args": input}}));
    }
    parts
}

fn gemini_json(a: &Answer, model: &str, seq: u64) -> Value {
    gemini_chunk(gemini_parts(a), Some("STOP"), model, seq)
}

fn gemini_sse(a: &Answer, model: &str, seq: u64) -> Vec<String> {
    let mut ev = Vec::new();
    if let Some(t) = &a.thinking {
        for p in pieces(t, 6) {
            ev.push(data(&gemini_chunk(
                vec![json!({"text": p, "thought": true})],
                None,
                model,
                seq,
            )));
        }
    }
    if let Some(t) = &a.text {
        for p in pieces(t, 5) {
            ev.push(data(&gemini_chunk(
                vec![json!({"text": p})],
                None,
                model,
                seq,
            )));
        }
    }
    for (name, input) in &a.calls {
        // Gemini sends a function call whole.
        ev.push(data(&gemini_chunk(
            vec![json!({"functionCall": {"name": name, "args": input}})],
            None,
            model,
            seq,
        )));
    }
    ev.push(data(&gemini_chunk(
        vec![json!({"text": ""})],
        Some("STOP"),
        model,
        seq,
    )));
    ev
}

// ---- Embeddings ----

/// The vector the fake returns for `text`: `[chars, bytes % 256, 0.5, -0.25]` (values
/// that survive any float conversion exactly).
pub fn fake_embedding(text: &str) -> Vec<f32> {
    let sum: u32 = text.bytes().map(u32::from).sum();
    vec![text.chars().count() as f32, (sum % 256) as f32, 0.5, -0.25]
}

fn embeddings(wire: Wire, body: &Value, model: &str) -> Value {
    let texts: Vec<String> = match wire {
        Wire::Gemini => body
            .get("requests")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .map(|r| text_of(r.pointer("/content/parts").unwrap_or(&Value::Null)))
                    .collect()
            })
            .unwrap_or_default(),
        Wire::Minimax => body
            .get("texts")
            .and_then(Value::as_array)
            .map(|t| t.iter().map(text_of).collect())
            .unwrap_or_default(),
        _ => match body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().map(text_of).collect(),
            _ => Vec::new(),
        },
    };
    let tokens: usize = texts
        .iter()
        .map(|t| t.split_whitespace().count().max(1))
        .sum();
    match wire {
        Wire::Gemini => {
            json!({"embeddings": texts.iter().map(|t| json!({"values": fake_embedding(t)})).collect::<Vec<_>>()})
        }
        Wire::Minimax => json!({
            "vectors": texts.iter().map(|t| fake_embedding(t)).collect::<Vec<_>>(),
            "total_tokens": tokens,
            "base_resp": {"status_code": 0, "status_msg": "success"}
        }),
        _ => json!({
            "object": "list", "model": model,
            // Out of order on purpose: clients must sort by `index`.
            "data": texts.iter().enumerate().rev()
                .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": fake_embedding(t)}))
                .collect::<Vec<_>>(),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
        }),
    }
}
