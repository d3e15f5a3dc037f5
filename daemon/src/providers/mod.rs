//! Provider clients: each maps the neutral chat request to its provider's wire format and
//! the answer (or its SSE stream) back. They get auth headers from the caller and never
//! read credentials themselves; retries, rate limits and auth refresh live in
//! `crate::chat`, not here.

pub mod anthropic;
pub mod gemini;
pub mod minimax;
pub mod openai;
pub mod sse;

use crate::config::Provider;
use llmd_proto::chat::{ChatRequest, ChatResponse, Delta, ToolDef};
use reqwest::header::HeaderMap;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Most of an error body kept for `data.body`.
pub const MAX_ERROR_BODY: usize = 2048;

/// Receives stream deltas as they arrive. Returns false when nobody listens any more
/// (the client went away), which aborts the upstream request.
pub trait DeltaSink: Send + Sync {
    /// Forwards one delta.
    fn send(&self, delta: Delta) -> bool;
}

/// Everything one provider call needs.
pub struct Call<'a> {
    /// HTTP client.
    pub http: &'a reqwest::Client,
    /// API base URL (no trailing slash).
    pub base_url: &'a str,
    /// Model to use.
    pub model: &'a str,
    /// Auth headers plus the profile's extra headers.
    pub headers: &'a BTreeMap<String, String>,
    /// The neutral request.
    pub request: &'a ChatRequest,
    /// Tool definitions resolved from `request.tools`.
    pub tools: &'a [ToolDef],
    /// Where deltas go when streaming.
    pub stream: Option<&'a dyn DeltaSink>,
    /// Sees the headers of every provider response (rate-limit signals), errors included.
    pub observe: Option<&'a (dyn Fn(&HeaderMap) + Sync)>,
}

/// Why a provider call failed.
#[derive(Debug)]
pub enum ProviderError {
    /// The provider answered with an error status.
    Http {
        /// HTTP status.
        status: u16,
        /// First [`MAX_ERROR_BODY`] bytes of the body.
        body: String,
        /// Response headers (rate-limit signals, `retry-after`).
        headers: HeaderMap,
    },
    /// Connection failure or timeout before an answer.
    Network(String),
    /// The answer broke the provider's wire format.
    Protocol(String),
    /// The stream carried an error event (e.g. Anthropic's `overloaded_error`).
    Stream {
        /// Provider's error type, e.g. `overloaded_error`.
        kind: String,
        /// Provider's message.
        message: String,
    },
    /// The client went away or cancelled.
    Cancelled,
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderError::Http { status, .. } => write!(f, "provider answered HTTP {status}"),
            ProviderError::Network(m) => write!(f, "cannot reach the provider: {m}"),
            ProviderError::Protocol(m) => write!(f, "bad answer from the provider: {m}"),
            ProviderError::Stream { kind, message } => {
                write!(f, "provider stream error {kind}: {message}")
            }
            ProviderError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl ProviderError {
    /// `retry-after` of an HTTP error (seconds or HTTP date), if present.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Http { headers, .. } => retry_after(headers),
            _ => None,
        }
    }
}

/// Longest wait a provider's `retry-after` can impose; a bigger value (or garbage such as
/// `inf`) must not freeze a profile for a day.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Parses `retry-after` (seconds; fractional allowed) or `retry-after-ms`, capped at
/// [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite())
    };
    let secs = match number("retry-after-ms") {
        Some(ms) => ms / 1000.0,
        None => number("retry-after")?,
    };
    Some(
        Duration::try_from_secs_f64(secs.max(0.0))
            .map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER)),
    )
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn hostile_values_are_bounded() {
        let h = |k: &str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
            m
        };
        assert_eq!(
            retry_after(&h("retry-after", "2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&h("retry-after-ms", "1500")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&h("retry-after", "86400")),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&h("retry-after", "1e400")), None);
        assert_eq!(retry_after(&h("retry-after", "inf")), None);
        assert_eq!(retry_after(&h("retry-after", "-3")), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&h("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
    }
}

/// Default API base of each provider.
pub fn default_base_url(p: Provider) -> &'static str {
    match p {
        Provider::Anthropic => "https://api.anthropic.com",
        Provider::OpenaiCompat => "https://api.openai.com/v1",
        Provider::Gemini => "https://generativelanguage.googleapis.com/v1beta",
        Provider::Minimax => "https://api.minimax.io",
    }
}

/// Runs one chat call against `provider`.
pub async fn chat(provider: Provider, call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    match provider {
        Provider::Anthropic => anthropic::chat(call).await,
        Provider::OpenaiCompat => openai::chat(call).await,
        Provider::Gemini => gemini::chat(call).await,
        Provider::Minimax => minimax::chat(call).await,
    }
}

/// Merges `provider_options` into a request body, last, so it can override anything.
pub fn merge_options(body: &mut Value, options: Option<&Map<String, Value>>) {
    if let (Value::Object(b), Some(opts)) = (body, options) {
        for (k, v) in opts {
            b.insert(k.clone(), v.clone());
        }
    }
}

/// Sends a JSON POST with the given headers; non-2xx statuses become
/// [`ProviderError::Http`] with the body cut to [`MAX_ERROR_BODY`].
pub async fn post(
    call: &Call<'_>,
    url: &str,
    body: &Value,
) -> Result<reqwest::Response, ProviderError> {
    let mut req = call.http.post(url).json(body);
    for (k, v) in call.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ProviderError::Network(describe(&e)))?;
    if let Some(observe) = call.observe {
        observe(resp.headers());
    }
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let cut = &bytes[..bytes.len().min(MAX_ERROR_BODY)];
    Err(ProviderError::Http {
        status: status.as_u16(),
        body: String::from_utf8_lossy(cut).into_owned(),
        headers,
    })
}

/// A reqwest error without the URL (which may carry a key for some providers).
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut msg = e.to_string();
    if let Some(u) = e.url() {
        msg = msg.replace(u.as_str(), "<provider>");
    }
    msg
}

/// Parses a JSON body, naming the provider on failure.
pub async fn json_body(resp: reqwest::Response, who: &str) -> Result<Value, ProviderError> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ProviderError::Network(describe(&e)))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ProviderError::Protocol(format!("{who} answer is not JSON: {e}")))
}

/// Forwards a delta, turning a vanished listener into [`ProviderError::Cancelled`] so the
/// caller stops reading (and thereby aborts) the upstream stream.
pub(crate) fn forward(sink: &dyn DeltaSink, delta: Delta) -> Result<(), ProviderError> {
    if sink.send(delta) {
        Ok(())
    } else {
        Err(ProviderError::Cancelled)
    }
}

/// An `f32` as the JSON number it was written as (`0.3`, not `0.30000001192092896`, which
/// is what widening the binary value to `f64` gives).
pub fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Embedding model used when the `embed` request names none (Anthropic has no API).
pub fn default_embed_model(p: Provider) -> Option<&'static str> {
    match p {
        Provider::Anthropic => None,
        Provider::OpenaiCompat => Some(openai::DEFAULT_EMBED_MODEL),
        Provider::Gemini => Some(gemini::DEFAULT_EMBED_MODEL),
        Provider::Minimax => Some(minimax::DEFAULT_EMBED_MODEL),
    }
}

/// Embeds `input` (one vector per text, in order) with `provider`'s embeddings API;
/// `model` falls back to [`default_embed_model`].
pub async fn embed(
    provider: Provider,
    http: &reqwest::Client,
    base_url: &str,
    headers: &BTreeMap<String, String>,
    model: Option<&str>,
    input: &[String],
) -> Result<llmd_proto::chat::EmbedResult, ProviderError> {
    let no_api = || {
        ProviderError::Protocol(
            "Anthropic has no embeddings API; use another profile for `embed`".into(),
        )
    };
    if provider == Provider::Anthropic {
        return Err(no_api());
    }
    let model = match model {
        Some(m) => m,
        None => default_embed_model(provider).ok_or_else(no_api)?,
    };
    if input.is_empty() {
        // Providers reject an empty batch; the answer to "nothing" needs no round trip.
        return Ok(llmd_proto::chat::EmbedResult {
            embeddings: Vec::new(),
            usage: Default::default(),
        });
    }
    // Embeddings reuse the chat plumbing (`post`), which only reads the HTTP parts of a call.
    let request = ChatRequest::default();
    let base_url = base_url.trim_end_matches('/');
    let call = Call {
        http,
        base_url,
        model,
        headers,
        request: &request,
        tools: &[],
        stream: None,
        observe: None,
    };
    let result = match provider {
        Provider::OpenaiCompat => openai::embed(&call, input).await?,
        Provider::Gemini => gemini::embed(&call, input).await?,
        Provider::Minimax => minimax::embed(&call, input).await?,
        Provider::Anthropic => return Err(no_api()),
    };
    if result.embeddings.len() != input.len() {
        return Err(ProviderError::Protocol(format!(
            "asked for {} embeddings, got {}",
            input.len(),
            result.embeddings.len()
        )));
    }
    Ok(result)
}

/// Test helpers shared by the provider modules: a one-shot HTTP server on 127.0.0.1 that
/// records the request and answers in chunks cut wherever the test says, and a sink that
/// keeps the deltas.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{Call, DeltaSink};
    use llmd_proto::chat::{ChatRequest, Delta, ToolDef};
    use serde_json::Value;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The request the server received.
    #[derive(Debug)]
    pub struct Seen {
        /// Request target (path and query).
        pub path: String,
        /// Headers, lowercase names.
        pub headers: BTreeMap<String, String>,
        /// Body parsed as JSON.
        pub body: Value,
    }

    /// Serves one request with `status`, `content_type` and `pieces` sent as separate
    /// HTTP chunks (with a pause between them, so they arrive as separate reads).
    pub async fn serve_once(
        status: u16,
        content_type: &str,
        pieces: Vec<Vec<u8>>,
    ) -> (String, tokio::task::JoinHandle<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let content_type = content_type.to_owned();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let head_end = loop {
                let mut tmp = [0u8; 4096];
                let n = sock.read(&mut tmp).await.unwrap();
                assert!(n > 0, "client closed before sending a request");
                buf.extend_from_slice(&tmp[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let path = lines.next().unwrap().split(' ').nth(1).unwrap().to_owned();
            let headers: BTreeMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .get("content-length")
                .map_or(0, |v| v.parse().unwrap());
            while buf.len() < head_end + len {
                let mut tmp = [0u8; 4096];
                let n = sock.read(&mut tmp).await.unwrap();
                assert!(n > 0, "client closed mid-body");
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nretry-after: 7\r\nconnection: close\r\n\r\n"
            );
            sock.write_all(head.as_bytes()).await.unwrap();
            // Pausing lets each piece arrive as its own read; byte-sized cuts just yield.
            let pause = Duration::from_millis(if pieces.len() > 100 { 0 } else { 2 });
            for p in pieces {
                let mut chunk = format!("{:x}\r\n", p.len()).into_bytes();
                chunk.extend_from_slice(&p);
                chunk.extend_from_slice(b"\r\n");
                // The client may hang up early (cancellation tests).
                if sock.write_all(&chunk).await.is_err() || sock.flush().await.is_err() {
                    break;
                }
                if pause.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(pause).await;
                }
            }
            let _ = sock.write_all(b"0\r\n\r\n").await;
            Seen {
                path,
                headers,
                body,
            }
        });
        (base, task)
    }

    /// `text` cut into pieces of `size` bytes (cutting through UTF-8 sequences too).
    pub fn cut(text: &str, size: usize) -> Vec<Vec<u8>> {
        text.as_bytes()
            .chunks(size.max(1))
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Keeps every delta; stops accepting after `limit` of them when set.
    #[derive(Default)]
    pub struct Collect {
        /// Deltas in arrival order.
        pub deltas: Mutex<Vec<Delta>>,
        /// Answer false once this many deltas arrived (a client that went away).
        pub limit: Option<usize>,
    }

    impl DeltaSink for Collect {
        fn send(&self, delta: Delta) -> bool {
            let mut d = self.deltas.lock().unwrap();
            if self.limit.is_some_and(|l| d.len() >= l) {
                return false;
            }
            d.push(delta);
            true
        }
    }

    impl Collect {
        /// The deltas so far.
        pub fn take(&self) -> Vec<Delta> {
            std::mem::take(&mut self.deltas.lock().unwrap())
        }
    }

    /// Owns what a [`Call`] borrows.
    pub struct Fixture {
        /// HTTP client.
        pub http: reqwest::Client,
        /// Auth headers.
        pub headers: BTreeMap<String, String>,
        /// The request.
        pub request: ChatRequest,
        /// Resolved tools.
        pub tools: Vec<ToolDef>,
        /// Model.
        pub model: String,
    }

    impl Fixture {
        /// A fixture for `request` (parsed from JSON) with `tools`.
        pub fn new(request: Value, tools: Vec<ToolDef>) -> Fixture {
            Fixture {
                http: reqwest::Client::new(),
                headers: BTreeMap::from([("authorization".into(), "Bearer sk-test-secret".into())]),
                request: serde_json::from_value(request).unwrap(),
                tools,
                model: "test-model".into(),
            }
        }

        /// A call against `base`, streaming into `sink` when given.
        pub fn call<'a>(&'a self, base: &'a str, sink: Option<&'a dyn DeltaSink>) -> Call<'a> {
            Call {
                http: &self.http,
                base_url: base,
                model: &self.model,
                headers: &self.headers,
                request: &self.request,
                tools: &self.tools,
                stream: sink,
                observe: None,
            }
        }
    }

    /// Checks that the deltas describe the same blocks as the final `content`: every
    /// block stopped exactly once, tool calls started at their index with the same id and
    /// name, and their argument fragments adding up to the final input; text and thinking
    /// deltas adding up to the text and thinking blocks.
    pub fn assert_deltas_match(deltas: &[Delta], content: &[llmd_proto::chat::Block]) {
        use llmd_proto::chat::Block;
        let mut stops: Vec<usize> = Vec::new();
        let mut args: BTreeMap<usize, String> = BTreeMap::new();
        let (mut text, mut thinking) = (String::new(), String::new());
        for d in deltas {
            match d {
                Delta::Text { text: t } => text.push_str(t),
                Delta::Thinking { text: t } => thinking.push_str(t),
                Delta::ToolUseStart { index, id, name } => {
                    assert!(
                        !stops.contains(index),
                        "block {index} started after its stop"
                    );
                    match &content[*index] {
                        Block::ToolUse { id: i, name: n, .. } => {
                            assert_eq!((i, n), (id, name), "tool block {index}");
                        }
                        other => panic!("tool_use_start {index} but content has {other:?}"),
                    }
                    assert!(
                        args.insert(*index, String::new()).is_none(),
                        "started twice"
                    );
                }
                Delta::ToolInput {
                    index,
                    partial_json,
                } => {
                    assert!(!stops.contains(index), "input for stopped block {index}");
                    args.get_mut(index)
                        .expect("input before start")
                        .push_str(partial_json);
                }
                Delta::BlockStop { index } => {
                    assert!(!stops.contains(index), "block {index} stopped twice");
                    stops.push(*index);
                }
                Delta::Usage(_) => {}
            }
        }
        let mut all: Vec<usize> = stops.clone();
        all.sort_unstable();
        let expected: Vec<usize> = content
            .iter()
            .enumerate()
            .filter(|(_, b)| !matches!(b, Block::Thinking { text, .. } if text.is_empty()))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(all, expected, "block stops vs content");
        for (index, json) in args {
            let Block::ToolUse { input, .. } = &content[index] else {
                unreachable!()
            };
            let streamed: Value = serde_json::from_str(&json).expect("streamed arguments are JSON");
            assert_eq!(&streamed, input, "arguments of block {index}");
        }
        let joined = |want_thinking: bool| -> String {
            content
                .iter()
                .filter_map(|b| match b {
                    Block::Text { text, .. } if !want_thinking => Some(text.as_str()),
                    Block::Thinking { text, .. } if want_thinking => Some(text.as_str()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(text, joined(false), "text deltas vs text blocks");
        assert_eq!(thinking, joined(true), "thinking deltas vs thinking blocks");
    }

    /// A tool with one required string property `city`.
    pub fn weather_tool() -> ToolDef {
        serde_json::from_value(serde_json::json!({
            "name": "get_weather",
            "description": "Weather of a city",
            "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false
            }
        }))
        .unwrap()
    }
}
