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
            ProviderError::Stream { kind, message } => write!(f, "provider stream error {kind}: {message}"),
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

/// Parses `retry-after` (seconds; fractional allowed) or `retry-after-ms`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers.get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    v.parse::<f64>().ok().map(|s| Duration::from_secs_f64(s.max(0.0)))
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
pub async fn post(call: &Call<'_>, url: &str, body: &Value) -> Result<reqwest::Response, ProviderError> {
    let mut req = call.http.post(url).json(body);
    for (k, v) in call.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await.map_err(|e| ProviderError::Network(describe(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let cut = &bytes[..bytes.len().min(MAX_ERROR_BODY)];
    Err(ProviderError::Http { status: status.as_u16(), body: String::from_utf8_lossy(cut).into_owned(), headers })
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
    let bytes = resp.bytes().await.map_err(|e| ProviderError::Network(describe(&e)))?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::Protocol(format!("{who} answer is not JSON: {e}")))
}
