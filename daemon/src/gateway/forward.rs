//! Native pass-through: the client's body goes to the profile's provider as sent, with
//! the client's auth replaced by the profile's, under the profile's shared limits and the
//! retry rules of `crate::chat`. Answers come back unchanged; streams event by event.

use super::errors::{GatewayError, Shape};
use super::usage::{Meter, Seen, SseScanner};
use super::Gateway;
use crate::chat::{Failure, Retries};
use crate::config::Provider;
use crate::profile::Profile;
use crate::providers;
use crate::ratelimit::Permit;
use crate::refresh::Force;
use crate::usage::Outcome;
use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use llmd_proto::{ErrorKind, RpcError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Most of a JSON answer kept on the side to read its usage at the end; a larger one
/// still passes, with the estimate left standing.
pub const MAX_USAGE_SCAN_BYTES: usize = 16 << 20;
/// Most of an error answer kept when passing it on.
const MAX_ERROR_ANSWER: usize = 1 << 20;
/// Most bytes of already-arrived chunks joined into one write to the client.
const MAX_JOINED: usize = 64 << 10;
/// A token handed to a provider call must outlive a slow request (as in `chat`).
const MIN_TOKEN_VALIDITY_SECS: u64 = 60;

/// Client headers never forwarded: the client's auth (replaced by the profile's),
/// hop-by-hop headers, and what would reveal or change the client's context upstream.
const DROPPED: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "user-agent",
    // The gateway reads usage from the answer, so it must come uncompressed.
    "accept-encoding",
    "cookie",
    "origin",
    "referer",
];

/// Answer headers not passed back.
const DROPPED_BACK: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "trailer",
    "upgrade",
    "set-cookie",
];

/// The provider URL for `rest` (the path under `/p/<profile>/`), or `None` when it is
/// not one of the provider's API paths.
pub fn upstream_url(profile: &Profile, rest: &str, query: Option<&str>) -> Option<String> {
    let safe = !rest.is_empty()
        && !rest.contains('\\')
        && rest.split('/').all(|seg| {
            let lower = seg.to_ascii_lowercase();
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !lower.contains("%2e")
                && !lower.contains("%2f")
        });
    if !safe {
        return None;
    }
    let under = match profile.config.provider {
        Provider::Anthropic => {
            let ok = matches!(
                rest,
                "v1/messages" | "v1/messages/count_tokens" | "v1/models"
            ) || rest.starts_with("v1/models/");
            ok.then_some(rest)?
        }
        // The profile's base URL ends in `/v1` (OpenAI) or `/v1beta` (Gemini).
        Provider::OpenaiCompat => rest.strip_prefix("v1/")?,
        Provider::Gemini => {
            let r = rest.strip_prefix("v1beta/")?;
            (r == "models" || r.starts_with("models/")).then_some(r)?
        }
        Provider::Minimax => {
            (rest.starts_with("v1/") || rest.starts_with("anthropic/v1/")).then_some(rest)?
        }
    };
    let mut url = format!("{}/{under}", profile.base_url().trim_end_matches('/'));
    // Gemini's `key` parameter carried the gateway key; the profile's goes in a header.
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("key="))
        .collect();
    if !kept.is_empty() {
        url.push('?');
        url.push_str(&kept.join("&"));
    }
    Some(url)
}

/// The parts of a request body the limiter needs; everything else is skipped unparsed.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Hints {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(rename = "generationConfig")]
    generation_config: Option<GenerationHints>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct GenerationHints {
    #[serde(rename = "maxOutputTokens")]
    max_output_tokens: Option<u64>,
}

/// The limiter's estimate for a body: about four bytes per prompt token plus the output
/// budget (as `crate::chat::estimate_tokens`); the answer's usage corrects it.
pub fn estimate(body: &[u8]) -> u64 {
    let h: Hints = serde_json::from_slice(body).unwrap_or_default();
    let out = h
        .max_tokens
        .or(h.max_completion_tokens)
        .or(h.generation_config.and_then(|g| g.max_output_tokens))
        .unwrap_or(1024);
    body.len() as u64 / 4 + out
}

/// The request headers sent upstream: the client's, minus [`DROPPED`] and whatever the
/// profile sets, plus the profile's (auth, `extra_headers`). `anthropic-beta` values of
/// both are merged, the profile's first.
fn upstream_headers(
    client: &HeaderMap,
    profile: &std::collections::BTreeMap<String, String>,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + profile.len());
    for (k, v) in client {
        let n = k.as_str();
        if DROPPED.contains(&n) || (profile.contains_key(n) && n != "anthropic-beta") {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    for (k, v) in profile {
        let (Ok(name), Ok(mut value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            continue;
        };
        if k == "anthropic-beta" {
            let mut all: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).collect();
            for c in client.get_all("anthropic-beta") {
                for b in c.to_str().unwrap_or("").split(',').map(str::trim) {
                    if !b.is_empty() && !all.iter().any(|x| x == b) {
                        all.push(b.to_owned());
                    }
                }
            }
            match HeaderValue::from_str(&all.join(",")) {
                Ok(merged) => value = merged,
                Err(_) => continue,
            }
            out.remove("anthropic-beta");
        }
        value.set_sensitive(true);
        out.insert(name, value);
    }
    out
}

/// Maps a local failure (no token, refresh failed) to the client's error shape.
pub fn rpc_error(shape: Shape, e: RpcError) -> Response {
    let status = match e.kind() {
        ErrorKind::NeedsLogin => StatusCode::UNAUTHORIZED,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::InvalidParams => StatusCode::BAD_REQUEST,
        ErrorKind::RefreshFailed | ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Cancelled => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    GatewayError::new(status, shape, format!("llmd: {}", e.message)).into_response()
}

/// Forwards one request to `url` for `profile`.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    gw: &Gateway,
    profile: &Arc<Profile>,
    parts: &Parts,
    url: String,
    body: Bytes,
    shape: Shape,
    mode: crate::chat::Mode,
    meter: &Meter,
) -> Response {
    let estimate = estimate(&body);
    let mut retries = Retries::default();
    // The profile's provider timeouts, as for `chat`: connect, first byte, and the longest
    // silence before the first chunk and between chunks after it.
    let timeouts = providers::Timeouts::from(&profile.config.timeouts);
    let http = match gw.daemon.provider_http.get(timeouts.connect) {
        Ok(h) => h,
        Err(e) => return rpc_error(shape, crate::chat::to_rpc(e, &[])),
    };
    let idle = Idle {
        after: timeouts.stream_idle,
        profile: profile.name.clone(),
    };
    let timed_out = |what: &str, after: std::time::Duration| {
        GatewayError::new(
            StatusCode::GATEWAY_TIMEOUT,
            shape,
            format!(
                "llmd: the provider sent no {what} within {}s ({} timeout of profile `{}`)",
                after.as_secs(),
                if what == "answer" {
                    "first_byte_secs"
                } else {
                    "stream_idle_secs"
                },
                profile.name
            ),
        )
        .into_response()
    };
    loop {
        let permit = profile.limiter.acquire(estimate).await;
        let token = match profile.token(MIN_TOKEN_VALIDITY_SECS, Force::No).await {
            Ok(t) => t,
            Err(e) => return rpc_error(shape, e),
        };
        let request = http
            .request(parts.method.clone(), &url)
            .headers(upstream_headers(&parts.headers, &token.headers))
            .body(body.clone())
            .send();
        let Ok(sent) = tokio::time::timeout(timeouts.first_byte, request).await else {
            return timed_out("answer", timeouts.first_byte);
        };
        let (failure, answer) = match sent {
            Ok(resp) => {
                profile.limiter.observe(resp.headers());
                profile.quota.observe(resp.headers());
                let status = resp.status();
                if status.is_success() {
                    let headers = resp.headers().clone();
                    let mut body = resp.bytes_stream().boxed();
                    // The first chunk is awaited here: headers and first event then reach
                    // the client in one write, and a stream that fails before its first
                    // byte (or opens with an overload error event) can still be retried.
                    let Ok(next) = tokio::time::timeout(timeouts.stream_idle, body.next()).await
                    else {
                        return timed_out("first chunk", timeouts.stream_idle);
                    };
                    let (failure, first) = match next {
                        Some(Ok(first)) if opens_with_overload(&first) => (
                            Failure {
                                overload_event: true,
                                ..Failure::default()
                            },
                            Some(first),
                        ),
                        Some(Ok(first)) => {
                            return answer(status, &headers, body, Some(first), permit, idle, meter)
                        }
                        None => return answer(status, &headers, body, None, permit, idle, meter),
                        Some(Err(_)) => (
                            Failure {
                                network: true,
                                ..Failure::default()
                            },
                            None,
                        ),
                    };
                    match retries.next(profile, &failure) {
                        Some(step) => {
                            drop(permit);
                            if let Err(e) = step.run(profile, &token.token).await {
                                return rpc_error(shape, e);
                            }
                            continue;
                        }
                        // Out of retries: the client gets what the provider sent.
                        None => return answer(status, &headers, body, first, permit, idle, meter),
                    }
                }
                let headers = resp.headers().clone();
                // Read under `stream_idle_secs`: an error body that never ends must not
                // hold the request (and its slot) for good. What came is kept.
                let bytes = providers::read_capped(resp, MAX_ERROR_ANSWER, timeouts.stream_idle)
                    .await
                    .unwrap_or_else(|partial| partial);
                // An error body may echo the request, the profile's real key among it.
                let secrets = crate::chat::known_secrets(&token);
                let text = crate::secret::scrub_known(
                    &String::from_utf8_lossy(&bytes),
                    secrets.iter().map(String::as_str),
                );
                if status.as_u16() == 429
                    && profile.config.provider == crate::config::Provider::Gemini
                {
                    profile.quota.observe_gemini_error(&text);
                }
                let bytes = Bytes::from(text.into_bytes());
                let failure = Failure {
                    status: status.as_u16(),
                    retry_after: providers::retry_after(&headers),
                    ..Failure::default()
                };
                (failure, pass_back(status, &headers, Body::from(bytes)))
            }
            Err(e) => (
                Failure {
                    network: true,
                    ..Failure::default()
                },
                GatewayError::new(
                    StatusCode::BAD_GATEWAY,
                    shape,
                    format!(
                        "llmd: cannot reach the provider: {}",
                        providers::describe(&e)
                    ),
                )
                .into_response(),
            ),
        };
        drop(permit);
        if failure.status == 429 && mode == crate::chat::Mode::PoolMember {
            // The pool moves to its next member; this one waits out its pause.
            profile
                .limiter
                .pause(failure.retry_after.unwrap_or(POOL_MEMBER_PAUSE));
            return answer;
        }
        match retries.next(profile, &failure) {
            Some(step) => {
                if let Err(e) = step.run(profile, &token.token).await {
                    return rpc_error(shape, e);
                }
            }
            None => return answer,
        }
    }
}

/// How long a pool member is paused after a 429 that names no `retry-after`.
const POOL_MEMBER_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// True for a stream whose first event is an error that means "busy" (Anthropic's
/// `overloaded_error`, …): retried like a 529, as nothing has reached the client yet.
fn opens_with_overload(first: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&first[..first.len().min(4096)]);
    let Some(event) = text.split("\n\n").next() else {
        return false;
    };
    if !event.lines().any(|l| l.trim() == "event: error") {
        return false;
    }
    event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .any(|v| {
            v.pointer("/error/type")
                .and_then(serde_json::Value::as_str)
                .is_some_and(crate::chat::is_overload_kind)
        })
}

/// The longest silence of the provider once an answer has started (`stream_idle_secs`).
struct Idle {
    after: std::time::Duration,
    profile: String,
}

/// A successful answer goes through as it arrives (an SSE stream event by event, any
/// other body chunk by chunk), read on the way for its usage, which settles the permit.
fn answer(
    status: StatusCode,
    headers: &HeaderMap,
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    first: Option<Bytes>,
    permit: Permit,
    idle: Idle,
    meter: &Meter,
) -> Response {
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let reader = if sse {
        Reader::Sse(SseScanner::default())
    } else {
        Reader::Json(Some(Vec::new()))
    };
    let pass = Pass {
        inner,
        reader,
        permit: Some(permit),
        held: None,
        first,
        silence: Box::pin(tokio::time::sleep(idle.after)),
        idle,
        meter: Some(meter.clone()),
    };
    pass_back(status, headers, Body::from_stream(pass))
}

fn pass_back(status: StatusCode, headers: &HeaderMap, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (k, v) in headers {
        if !DROPPED_BACK.contains(&k.as_str()) {
            h.append(k.clone(), v.clone());
        }
    }
    r
}

/// How a passing answer is read for its usage.
enum Reader {
    /// SSE: event by event.
    Sse(SseScanner),
    /// JSON (or Gemini's streamed JSON array): kept, up to [`MAX_USAGE_SCAN_BYTES`], and
    /// parsed at the end; `None` once it outgrew that.
    Json(Option<Vec<u8>>),
}

impl Reader {
    fn feed(&mut self, b: &[u8]) {
        match self {
            Reader::Sse(s) => s.feed(b),
            Reader::Json(kept) => {
                if kept
                    .as_ref()
                    .is_some_and(|k| k.len() + b.len() > MAX_USAGE_SCAN_BYTES)
                {
                    *kept = None;
                }
                if let Some(k) = kept {
                    k.extend_from_slice(b);
                }
            }
        }
    }

    /// The usage read; a JSON body only counts when it arrived whole.
    fn seen(&self, complete: bool) -> Seen {
        match self {
            Reader::Sse(s) => s.seen.clone(),
            Reader::Json(Some(buf)) if complete => {
                let mut seen = Seen::default();
                match serde_json::from_slice::<serde_json::Value>(buf) {
                    Ok(serde_json::Value::Array(items)) => items.iter().for_each(|v| seen.read(v)),
                    Ok(v) => seen.read(&v),
                    Err(_) => {}
                }
                seen
            }
            Reader::Json(_) => Seen::default(),
        }
    }
}

/// The upstream answer on its way to the client: read for usage as it passes, holding
/// the request's concurrency slot until it ends. Dropped when the client hangs up, which
/// drops (and so aborts) the upstream response.
struct Pass {
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    reader: Reader,
    permit: Option<Permit>,
    held: Option<Held>,
    /// The chunk read before the answer started, sent first.
    first: Option<Bytes>,
    /// Fires when the provider has been silent for `idle.after`: the answer then ends with
    /// an error (the client sees a cut body) and the slot is given back, instead of both
    /// being held by a stalled provider for good.
    silence: Pin<Box<tokio::time::Sleep>>,
    idle: Idle,
    /// Records the request in the ledger when the answer ends (or is cut).
    meter: Option<Meter>,
}

impl Pass {
    fn settle(&mut self, complete: bool) {
        let seen = self.reader.seen(complete);
        if let Some(p) = self.permit.take() {
            match seen.total() {
                Some(t) => p.settle(t),
                None => drop(p),
            }
        }
        if let Some(m) = self.meter.take() {
            let outcome = if complete {
                Outcome::Ok
            } else {
                Outcome::Failed("cut_off")
            };
            m.record(outcome, &seen);
        }
    }
}

/// What comes after the chunks already handed on.
enum Held {
    End,
    Fail(std::io::Error),
}

impl Stream for Pass {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let io = |e: reqwest::Error| std::io::Error::other(providers::describe(&e));
        match self.held.take() {
            Some(Held::End) => {
                self.settle(true);
                return Poll::Ready(None);
            }
            Some(Held::Fail(e)) => {
                self.settle(false);
                return Poll::Ready(Some(Err(e)));
            }
            None => {}
        }
        let first = match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(b))),
            None => self.inner.poll_next_unpin(cx),
        };
        let first = match first {
            Poll::Ready(Some(Ok(b))) => {
                let next = tokio::time::Instant::now() + self.idle.after;
                self.silence.as_mut().reset(next);
                b
            }
            Poll::Ready(Some(Err(e))) => {
                self.settle(false);
                return Poll::Ready(Some(Err(io(e))));
            }
            Poll::Ready(None) => {
                self.settle(true);
                return Poll::Ready(None);
            }
            Poll::Pending => {
                if self.silence.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::warn!(profile = %self.idle.profile, after_secs = self.idle.after.as_secs(), "the provider went silent mid-answer; the gateway answer is cut");
                self.settle(false);
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the provider sent nothing for {}s (stream_idle_secs of profile `{}`)",
                        self.idle.after.as_secs(),
                        self.idle.profile
                    ),
                ))));
            }
        };
        self.reader.feed(&first);
        // Chunks that are already here go out as one: a burst of events costs one write
        // to the client instead of one per event. Nothing waits for more to arrive.
        let mut joined: Option<BytesMut> = None;
        while joined.as_ref().map_or(first.len(), BytesMut::len) < MAX_JOINED {
            match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    self.reader.feed(&b);
                    joined
                        .get_or_insert_with(|| BytesMut::from(&first[..]))
                        .extend_from_slice(&b);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.held = Some(Held::Fail(io(e)));
                    break;
                }
                Poll::Ready(None) => {
                    self.held = Some(Held::End);
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(joined.map_or(first, BytesMut::freeze))))
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.settle(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_auth_is_replaced_and_betas_merged() {
        let mut client = HeaderMap::new();
        client.insert("x-api-key", "llmd-gw-secret".parse().unwrap());
        client.insert("authorization", "Bearer llmd-gw-secret".parse().unwrap());
        client.insert(
            "anthropic-beta",
            "files-api-2025-04-14, oauth-2025-04-20".parse().unwrap(),
        );
        client.insert("anthropic-version", "2023-06-01".parse().unwrap());
        client.insert("user-agent", "sdk/1".parse().unwrap());
        let profile = [
            ("authorization".to_string(), "Bearer real".to_string()),
            ("anthropic-beta".to_string(), "oauth-2025-04-20".to_string()),
        ]
        .into();
        let h = upstream_headers(&client, &profile);
        assert_eq!(h.get("authorization").unwrap(), "Bearer real");
        assert!(h.get("x-api-key").is_none());
        assert!(h.get("user-agent").is_none());
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(
            h.get("anthropic-beta").unwrap(),
            "oauth-2025-04-20,files-api-2025-04-14"
        );
    }

    #[test]
    fn json_usage_is_read_at_the_end_within_bounds() {
        let mut r = Reader::Json(Some(Vec::new()));
        r.feed(br#"[{"usageMetadata": {"totalTokenCount": 5}},"#);
        r.feed(br#"{"usageMetadata": {"totalTokenCount": 9}}]"#);
        assert_eq!(r.seen(false).total(), None, "a cut answer proves nothing");
        assert_eq!(r.seen(true).total(), Some(9));
        let mut r = Reader::Json(Some(Vec::new()));
        r.feed(br#"{"usage": {"input_tokens": 1, "output_tokens": 2}}"#);
        r.feed(&vec![b' '; MAX_USAGE_SCAN_BYTES]);
        assert!(matches!(r, Reader::Json(None)));
        assert_eq!(r.seen(true).total(), None);
    }

    #[test]
    fn overload_error_events_are_recognised() {
        let busy = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        assert!(opens_with_overload(busy));
        let bad = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\"}}\n\n";
        assert!(!opens_with_overload(bad));
        assert!(!opens_with_overload(b"event: message_start\ndata: {}\n\n"));
    }

    #[test]
    fn estimate_reads_each_providers_budget() {
        assert_eq!(estimate(br#"{"max_tokens": 100}"#), 4 + 100);
        assert_eq!(
            estimate(br#"{"generationConfig": {"maxOutputTokens": 8}}"#),
            11 + 8
        );
        assert_eq!(estimate(b"not json"), 2 + 1024);
    }
}
