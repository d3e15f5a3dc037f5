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
/// Largest successful (non-streaming) answer body read; a bigger one is a protocol error.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// How long each stage of one provider call may take (from the profile's
/// `[timeouts]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connection set-up.
    pub connect: Duration,
    /// Until the answer's headers.
    pub first_byte: Duration,
    /// Between two stream chunks.
    pub stream_idle: Duration,
    /// Whole non-streaming call.
    pub total: Duration,
}

impl From<&crate::config::TimeoutConfig> for Timeouts {
    fn from(t: &crate::config::TimeoutConfig) -> Self {
        Timeouts {
            connect: Duration::from_secs(t.connect_secs),
            first_byte: Duration::from_secs(t.first_byte_secs),
            stream_idle: Duration::from_secs(t.stream_idle_secs),
            total: Duration::from_secs(t.total_secs),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        (&crate::config::TimeoutConfig::default()).into()
    }
}

/// Which stage of a call ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connection set-up.
    Connect,
    /// Waiting for the answer's headers.
    FirstByte,
    /// Silence between stream events.
    StreamIdle,
    /// The whole non-streaming call.
    Total,
}

impl Stage {
    /// The config key of this timeout.
    pub fn key(self) -> &'static str {
        match self {
            Stage::Connect => "connect_secs",
            Stage::FirstByte => "first_byte_secs",
            Stage::StreamIdle => "stream_idle_secs",
            Stage::Total => "total_secs",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Stage::Connect => "connecting",
            Stage::FirstByte => "waiting for the first byte of the answer",
            Stage::StreamIdle => "waiting for the next stream event",
            Stage::Total => "waiting for the whole answer",
        }
    }
}

/// HTTP clients for provider calls, one per connect timeout (reqwest sets that per
/// client). Built on first use; the default one is built at start so a broken TLS set-up
/// fails the start instead of every call.
pub struct HttpClients {
    by_connect: std::sync::Mutex<BTreeMap<Duration, reqwest::Client>>,
}

impl HttpClients {
    /// Builds the client of the default connect timeout; the error says why it could not.
    pub fn new() -> Result<HttpClients, String> {
        let connect = Timeouts::default().connect;
        let client = build_client(connect)?;
        Ok(HttpClients {
            by_connect: std::sync::Mutex::new(BTreeMap::from([(connect, client)])),
        })
    }

    /// The client for `connect`.
    pub fn get(&self, connect: Duration) -> Result<reqwest::Client, ProviderError> {
        let mut map = crate::sync::lock(&self.by_connect);
        if let Some(c) = map.get(&connect) {
            return Ok(c.clone());
        }
        let c = build_client(connect).map_err(|cause| ProviderError::Network {
            host: String::new(),
            cause,
        })?;
        map.insert(connect, c.clone());
        Ok(c)
    }
}

/// The provider HTTP client: llmd's user agent and the given connect timeout.
pub fn build_client(connect: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .user_agent(concat!("llmd/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// Receives stream deltas as they arrive. Returns false when nobody listens any more
/// (the client went away), which aborts the upstream request.
pub trait DeltaSink: Send + Sync {
    /// Forwards one delta.
    fn send(&self, delta: Delta) -> bool;

    /// Waits until the listener can take a few more deltas, so a slow reader slows the
    /// provider read down instead of overflowing its queue. False when it never will (it
    /// went away or stayed full past its deadline).
    fn ready(&self) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }
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
    /// Stage timeouts.
    pub timeouts: Timeouts,
}

impl Call<'_> {
    /// `host[:port]` of the base URL, for errors (never the path or query).
    pub fn host(&self) -> String {
        host_of(self.base_url)
    }
}

/// `host[:port]` of `url`, or `provider` when it does not parse.
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => "provider".into(),
        },
        Err(_) => "provider".into(),
    }
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
        /// Response headers (rate-limit signals, `retry-after`); boxed to keep the error
        /// small on the happy path's `Result`s.
        headers: Box<HeaderMap>,
        /// `host[:port]` called.
        host: String,
    },
    /// Connection failure before an answer, or a stream that broke.
    Network {
        /// `host[:port]` called.
        host: String,
        /// The error and its sources (connection refused, DNS, TLS), URL removed.
        cause: String,
    },
    /// A stage of the call ran over its timeout.
    Timeout {
        /// `host[:port]` called.
        host: String,
        /// Which timeout fired.
        stage: Stage,
        /// Its length.
        after: Duration,
    },
    /// The stream stopped before the provider's end marker.
    EndedEarly(String),
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
            ProviderError::Http { status, host, .. } => {
                write!(f, "provider {host} answered HTTP {status}")
            }
            ProviderError::Network { host, cause } => {
                write!(f, "cannot reach the provider {host}: {cause}")
            }
            ProviderError::Timeout { host, stage, after } => write!(
                f,
                "provider {host} timed out {} ({} = {}s)",
                stage.describe(),
                stage.key(),
                after.as_secs()
            ),
            ProviderError::EndedEarly(m) => write!(f, "stream ended early: {m}"),
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
    let work = async {
        match provider {
            Provider::Anthropic => anthropic::chat(call).await,
            Provider::OpenaiCompat => openai::chat(call).await,
            Provider::Gemini => gemini::chat(call).await,
            Provider::Minimax => minimax::chat(call).await,
        }
    };
    // A stream has its idle timeout instead: a long answer that keeps coming is fine.
    if call.stream.is_some() {
        return work.await;
    }
    let total = call.timeouts.total;
    tokio::time::timeout(total, work)
        .await
        .unwrap_or_else(|_| Err(call.timeout(Stage::Total, total)))
}

impl Call<'_> {
    fn timeout(&self, stage: Stage, after: Duration) -> ProviderError {
        ProviderError::Timeout {
            host: self.host(),
            stage,
            after,
        }
    }

    /// A reqwest failure as a typed error: timeouts name their stage.
    pub fn net_error(&self, e: &reqwest::Error) -> ProviderError {
        if e.is_timeout() && e.is_connect() {
            return self.timeout(Stage::Connect, self.timeouts.connect);
        }
        ProviderError::Network {
            host: self.host(),
            cause: describe(e),
        }
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
/// [`ProviderError::Http`] with the body cut to [`MAX_ERROR_BODY`]. Waits at most the
/// first-byte timeout for the answer's headers.
pub async fn post(
    call: &Call<'_>,
    url: &str,
    body: &Value,
) -> Result<reqwest::Response, ProviderError> {
    let mut req = call.http.post(url).json(body);
    for (k, v) in call.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    // The connect timeout lives in the client (and fires first when it is shorter); this
    // one covers the whole wait for the headers.
    let resp = match tokio::time::timeout(call.timeouts.first_byte, req.send()).await {
        Ok(r) => r.map_err(|e| call.net_error(&e))?,
        Err(_) => return Err(call.timeout(Stage::FirstByte, call.timeouts.first_byte)),
    };
    if let Some(observe) = call.observe {
        observe(resp.headers());
    }
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = Box::new(resp.headers().clone());
    // An error body that never ends must not hold the call: capped and under the idle
    // timeout, and what arrived by then is enough.
    let bytes = read_capped(resp, MAX_ERROR_BODY, call.timeouts.stream_idle)
        .await
        .unwrap_or_else(|partial| partial);
    Err(ProviderError::Http {
        status: status.as_u16(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        headers,
        host: call.host(),
    })
}

/// Reads at most `cap` bytes of a body, waiting at most `idle` for each chunk. `Err` holds
/// what was read when the body broke or stalled.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
    idle: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < cap {
        match tokio::time::timeout(idle, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let room = cap - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(Ok(None)) => return Ok(out),
            Ok(Err(_)) | Err(_) => return Err(out),
        }
    }
    Ok(out)
}

/// A reqwest error with its whole source chain (connection refused, DNS, TLS, timeout)
/// and without the URL, which may carry a key for some providers.
pub fn describe(e: &reqwest::Error) -> String {
    let mut msg = error_chain(e);
    if let Some(u) = e.url() {
        msg = msg.replace(u.as_str(), "<provider>");
        if let Some(q) = u.query() {
            msg = msg.replace(q, "<query>");
        }
    }
    msg
}

/// `e: source: source…`, each message once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// Parses a JSON body (at most [`MAX_BODY`] bytes), naming the provider on failure.
pub async fn json_body(resp: reqwest::Response, who: &str) -> Result<Value, ProviderError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ProviderError::Protocol(format!(
            "{who} answer is over {MAX_BODY} bytes"
        )));
    }
    let host = resp.url().host_str().unwrap_or("provider").to_owned();
    let mut resp = resp;
    let mut bytes = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if bytes.len() + c.len() > MAX_BODY {
                    return Err(ProviderError::Protocol(format!(
                        "{who} answer is over {MAX_BODY} bytes"
                    )));
                }
                bytes.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ProviderError::Network {
                    host,
                    cause: describe(&e),
                })
            }
        }
    }
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
    timeouts: Timeouts,
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
            member: None,
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
        timeouts,
    };
    let work = async {
        match provider {
            Provider::OpenaiCompat => openai::embed(&call, input).await,
            Provider::Gemini => gemini::embed(&call, input).await,
            Provider::Minimax => minimax::embed(&call, input).await,
            Provider::Anthropic => Err(no_api()),
        }
    };
    let result = tokio::time::timeout(timeouts.total, work)
        .await
        .unwrap_or_else(|_| Err(call.timeout(Stage::Total, timeouts.total)))?;
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
                timeouts: super::Timeouts::default(),
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
                Delta::Usage(_) | Delta::Unknown => {}
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
