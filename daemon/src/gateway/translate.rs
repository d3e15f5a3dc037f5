//! Streaming for the translated routes: `crate::chat` runs the neutral request in a task
//! whose deltas an [`Encoder`] turns into the client's wire format. Nothing is sent
//! before the first event, so a failure up to then (after the retries) becomes an HTTP
//! error; the task is aborted when the client hangs up.

use super::usage::Meter;
use super::Gateway;
use crate::chat;
use crate::profile::Profile;
use crate::providers::DeltaSink;
use crate::sync::lock;
use crate::usage::Outcome;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use llmd_proto::chat::{ChatRequest, ChatResponse, Delta};
use llmd_proto::RpcError;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Events queued for a client that reads slower than the provider writes; a client
/// further behind is cut off (as a socket client over its queue would be).
const MAX_QUEUED_EVENTS: usize = 4096;
/// Most bytes of queued events joined into one write to the client.
const MAX_JOINED: usize = 64 << 10;

/// Turns neutral deltas into one wire format's stream events.
pub trait Encoder: Send + 'static {
    /// The events for one delta (empty when it has none).
    fn delta(&mut self, d: Delta) -> Vec<u8>;
    /// The closing events after a complete answer.
    fn finish(&mut self, resp: &ChatResponse) -> Vec<u8>;
    /// The event that reports a failure once the stream has started.
    fn error_event(&self, e: &RpcError) -> Vec<u8>;
}

enum Msg {
    Data(Bytes),
    /// The error, and its event for a stream that already started.
    Fail(RpcError, Bytes),
}

struct Sink<E> {
    tx: mpsc::Sender<Msg>,
    enc: Mutex<E>,
}

impl<E: Encoder> DeltaSink for Sink<E> {
    fn send(&self, d: Delta) -> bool {
        let bytes = lock(&self.enc).delta(d);
        // A client this far behind is cut off rather than buffered without bound.
        bytes.is_empty() || self.tx.try_send(Msg::Data(bytes.into())).is_ok()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records a translated request in the usage ledger.
pub fn record(
    meter: &Meter,
    profile: &Profile,
    req: &ChatRequest,
    result: &Result<ChatResponse, RpcError>,
) {
    let asked = req
        .model
        .as_deref()
        .or(profile.config.default_model.as_deref());
    match result {
        Ok(r) => meter.record_usage(Outcome::Ok, r.usage, Some(&r.model)),
        Err(e) => meter.record_usage(
            Outcome::Failed(e.kind().as_str()),
            llmd_proto::chat::Usage::default(),
            asked,
        ),
    }
}

/// Runs `req` on `profile` as a stream encoded by `enc`; `error_response` answers a
/// failure that comes before the first event.
pub async fn stream<E: Encoder>(
    gw: Arc<Gateway>,
    profile: Arc<Profile>,
    req: ChatRequest,
    meter: Meter,
    enc: E,
    error_response: fn(&RpcError) -> Response,
) -> Response {
    let (tx, mut rx) = mpsc::channel(MAX_QUEUED_EVENTS);
    let sink = Sink {
        tx: tx.clone(),
        enc: Mutex::new(enc),
    };
    let task = tokio::spawn(async move {
        let result = chat::execute(&gw.daemon, &profile, &req, Some(&sink)).await;
        record(&meter, &profile, &req, &result);
        let msg = match result {
            Ok(resp) => Msg::Data(lock(&sink.enc).finish(&resp).into()),
            Err(e) => {
                let ev = lock(&sink.enc).error_event(&e);
                Msg::Fail(e, ev.into())
            }
        };
        let _ = tx.send(msg).await;
    });
    let guard = AbortOnDrop(task);
    match rx.recv().await {
        Some(Msg::Data(first)) => {
            let mut r = Response::new(Body::from_stream(Events {
                rx,
                first: Some(first),
                _guard: guard,
                done: false,
            }));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        Some(Msg::Fail(e, _)) => error_response(&e),
        None => error_response(&RpcError::internal("the chat task ended without an answer")),
    }
}

/// The SSE body; dropping it (the client hung up) aborts the chat task.
struct Events {
    rx: mpsc::Receiver<Msg>,
    first: Option<Bytes>,
    _guard: AbortOnDrop,
    done: bool,
}

impl Stream for Events {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(b)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let mut out = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Msg::Data(b))) => b.to_vec(),
            Poll::Ready(Some(Msg::Fail(_, ev))) => {
                self.done = true;
                return Poll::Ready(Some(Ok(ev)));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        // Events already queued go out in one write (nothing waits for more).
        while out.len() < MAX_JOINED {
            match self.rx.try_recv() {
                Ok(Msg::Data(b)) => out.extend_from_slice(&b),
                Ok(Msg::Fail(_, ev)) => {
                    self.done = true;
                    out.extend_from_slice(&ev);
                    break;
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(out.into())))
    }
}

/// The status and message of a failed neutral call: the provider's own status passes
/// through, with its error body appended to the message.
pub fn failure(e: &RpcError) -> (StatusCode, String) {
    use llmd_proto::ErrorKind;
    use serde_json::Value;
    let upstream = e
        .data_field("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.is_client_error() || s.is_server_error());
    let status = match e.kind() {
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::InvalidParams => StatusCode::BAD_REQUEST,
        ErrorKind::NeedsLogin => StatusCode::UNAUTHORIZED,
        ErrorKind::RefreshFailed | ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Upstream => upstream.unwrap_or(StatusCode::BAD_GATEWAY),
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut msg = format!("llmd: {}", e.message);
    if let Some(body) = e.data_field("body").and_then(Value::as_str) {
        msg.push_str(": ");
        msg.push_str(body);
    }
    (status, msg)
}

/// One SSE event: `event: NAME` (when given) and `data: JSON`.
pub fn sse(name: Option<&str>, v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(n) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(n.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}
