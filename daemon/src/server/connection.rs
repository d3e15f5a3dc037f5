//! One client connection: a reader that decodes lines, answers what needs no waiting at
//! once and starts a task for the rest, and a writer that sends whatever is queued, in
//! completion order, coalesced into few writes. Methods are the [`Dispatcher`]'s business.

use super::{Dispatcher, Sockets};
use crate::state::Daemon;
use crate::sync::lock;
use futures_util::FutureExt;
use interprocess::local_socket::tokio::Stream;
use llmd_proto::methods::{names, CancelParams, Empty};
use llmd_proto::{encode_line, ErrorKind, Id, LineDecoder, RequestRef, Response, RpcError};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

/// Per-connection state shared by the request tasks.
pub struct Conn {
    /// Connection id (for the agent list of `status`).
    pub id: u64,
    /// The server's connection bookkeeping (open connections, agent names).
    pub sockets: Arc<Sockets>,
    /// Agent name from `hello` (`client/version`).
    pub agent: Mutex<Option<Arc<str>>>,
    /// The `client` of `hello` alone: the agent the usage ledger records.
    pub client: Mutex<Option<Arc<str>>>,
    out: mpsc::Sender<Vec<u8>>,
    /// Lines queued and not yet written by the writer task.
    queued: Arc<AtomicUsize>,
    /// The socket, for the lines written without the writer task.
    stream: Arc<Stream>,
    /// Cancelled when the connection is dropped for good (write error, slow reader).
    pub gone: CancellationToken,
    /// Cancelled when no more requests will be read; subscriptions end then.
    pub closing: CancellationToken,
    inflight: InFlight,
    /// Ends the current subscription; a later `subscribe` replaces it.
    pub subscription: Mutex<Option<CancellationToken>>,
    /// How long a stream waits for room in this connection's queue.
    pub write_timeout: Duration,
    next_anon: std::sync::atomic::AtomicU64,
    /// Who may write to the socket now: the writer task or the reader (answers it gave at
    /// once, written without a hand-over when nothing else is being written).
    turn: Arc<Turn>,
    /// Woken by the writer each time it took lines off the queue.
    room: Arc<tokio::sync::Notify>,
    /// What the peer's uid may call.
    pub access: crate::access::Access,
}

/// One writer at a time on the socket, so lines never interleave.
#[derive(Default)]
struct Turn {
    busy: AtomicBool,
    /// Someone waits in [`Turn::take`]: only then does giving the turn back wake anyone
    /// (`notify_waiters` takes a mutex, and the reader gives the turn back at every answer).
    wanted: AtomicBool,
    free: tokio::sync::Notify,
}

impl Turn {
    fn try_take(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }

    async fn take(&self) {
        loop {
            let freed = self.free.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Said before trying: a holder that gives back after this try failed sees it.
            self.wanted.store(true, Ordering::SeqCst);
            if self.try_take() {
                return;
            }
            freed.await;
        }
    }

    fn give_back(&self) {
        self.busy.store(false, Ordering::SeqCst);
        if self.wanted.swap(false, Ordering::SeqCst) {
            self.free.notify_waiters();
        }
    }
}

/// The connection's requests that run as tasks, by slot.
#[derive(Default)]
struct InFlight {
    tasks: Mutex<HashMap<Slot, AbortHandle>>,
    /// `tasks.len()`, stored under the lock at every change: the reader, which alone adds
    /// tasks, checks an id against an empty map without taking the lock.
    len: AtomicUsize,
}

impl InFlight {
    fn remove(&self, slot: &Slot) -> Option<AbortHandle> {
        let mut tasks = lock(&self.tasks);
        let h = tasks.remove(slot);
        self.len.store(tasks.len(), Ordering::Release);
        h
    }

    fn take_all(&self) -> Vec<AbortHandle> {
        let mut tasks = lock(&self.tasks);
        self.len.store(0, Ordering::Release);
        tasks.drain().map(|(_, h)| h).collect()
    }

    /// Whether request `id` is running as a task.
    fn contains(&self, id: &Id) -> bool {
        self.len.load(Ordering::Acquire) > 0
            && lock(&self.tasks).contains_key(&Slot::Id(id.clone()))
    }
}

/// What an in-flight task is filed under: its id, or a private number for a notification
/// (which has no id but must still count and be cancelled on hang-up).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    Id(Id),
    Anon(u64),
}

/// Waits until `out` has `want` free slots, without taking any: a waiter that held slots
/// (as `reserve_many` does while it waits for the rest) would make every other line of the
/// connection find the queue full, and its client be dropped as "not reading".
async fn room_for(out: &mpsc::Sender<Vec<u8>>, room: &tokio::sync::Notify, want: usize) -> bool {
    loop {
        let freed = room.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if out.is_closed() {
            return false;
        }
        if out.capacity() >= want {
            return true;
        }
        freed.await;
    }
}

/// Free queue slots a stream waits for before it reads more from the provider: enough for
/// the deltas one event can produce.
const STREAM_HEADROOM: usize = 32;

impl Conn {
    /// Sends a line to the client: written at once when nothing is queued and nobody is
    /// writing (no hand-over to the writer task, whose wake-up is most of the cost of an
    /// answer), else queued behind what is. A client that lets its queue fill up is
    /// disconnected rather than allowed to hold memory or slow anyone down.
    pub fn send(&self, mut line: Vec<u8>) -> bool {
        match self.write_now(&line) {
            None => self.enqueue(line),
            Some(Err(())) => false,
            Some(Ok(n)) if n == line.len() => {
                self.turn.give_back();
                true
            }
            Some(Ok(n)) => {
                // Queued while the turn is still held, so it goes before any line sent after.
                line.drain(..n);
                let ok = self.enqueue(line);
                self.turn.give_back();
                ok
            }
        }
    }

    /// When nobody is writing and nothing is queued: takes the turn and writes what the
    /// socket takes of `line` now, without waiting. `Some(Ok(n))`: `n` bytes went out and
    /// the turn is held (give it back once the rest is settled). `Some(Err(()))`: the
    /// connection failed (the turn is given back). `None`: someone else writes first.
    fn write_now(&self, line: &[u8]) -> Option<Result<usize, ()>> {
        if self.queued.load(Ordering::Acquire) != 0 || !self.turn.try_take() {
            return None;
        }
        // Checked again with the turn held: a line queued before it was taken must go
        // first (a stream's deltas keep their order).
        if self.queued.load(Ordering::Acquire) != 0 {
            self.turn.give_back();
            return None;
        }
        let Stream::UdSocket(uds) = &*self.stream;
        match uds.inner().try_write(line) {
            Ok(n) => Some(Ok(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(Ok(0)),
            Err(_) => {
                self.turn.give_back();
                self.gone.cancel();
                Some(Err(()))
            }
        }
    }

    fn enqueue(&self, line: Vec<u8>) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.out.try_send(line) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                if !self.gone.is_cancelled() {
                    tracing::warn!("client is not reading its answers; closing the connection");
                    self.gone.cancel();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// Waits (at most the write timeout) until the queue has room for a few lines: how a
    /// stream's slow reader slows the provider read instead of being disconnected. False
    /// when the client went away or stayed full that long (it is then disconnected).
    pub async fn wait_for_room(&self) -> bool {
        if self.gone.is_cancelled() {
            return false;
        }
        let want = STREAM_HEADROOM.min(self.out.max_capacity());
        if self.out.capacity() >= want {
            return true;
        }
        let wait = room_for(&self.out, &self.room, want);
        let ok = tokio::select! {
            r = tokio::time::timeout(self.write_timeout, wait) => r.unwrap_or(false),
            _ = self.gone.cancelled() => false,
        };
        if !ok && !self.gone.is_cancelled() {
            tracing::warn!("client stopped reading its stream; closing the connection");
            self.gone.cancel();
        }
        ok
    }

    /// Names this connection's agent: `client` for the usage ledger, `client/version`
    /// for logs and `status`.
    pub fn set_agent(&self, client: &str, version: &str) {
        let name = format!("{client}/{version}");
        self.sockets.set_agent(self.id, name.clone());
        *lock(&self.agent) = Some(name.into());
        *lock(&self.client) = Some(client.into());
    }

    /// Makes `token` the connection's one subscription, ending the one before.
    pub fn replace_subscription(&self, token: CancellationToken) {
        if let Some(old) = lock(&self.subscription).replace(token) {
            old.cancel();
        }
    }

    /// Sends a response.
    pub fn respond(&self, id: Option<&Id>, result: Result<Box<RawValue>, RpcError>) {
        let line = match &result {
            Ok(raw) => encode_line(&Response::ok(id, raw)),
            Err(e) => encode_line(&Response::err(id, e)),
        };
        self.send(line);
    }

    /// Aborts the in-flight request `id`; true if there was one.
    pub fn cancel(&self, id: &Id) -> bool {
        let handle = self.inflight.remove(&Slot::Id(id.clone()));
        match handle {
            Some(h) => {
                h.abort();
                true
            }
            None => false,
        }
    }

    fn abort_all(&self) {
        for h in self.inflight.take_all() {
            h.abort();
        }
    }
}

/// Serves one connection until the client leaves, misbehaves or the daemon stops.
pub async fn serve(
    daemon: Arc<Daemon>,
    dispatcher: Arc<dyn Dispatcher>,
    sockets: Arc<Sockets>,
    conn_id: u64,
    stream: Stream,
    access: crate::access::Access,
) {
    // `&Stream` reads and writes, so sharing it replaces splitting.
    let stream = Arc::new(stream);
    let Stream::UdSocket(uds) = &*stream;
    let uds = uds.inner();
    let cfg = daemon.registry().config.daemon.clone();
    let (out, queue) = mpsc::channel(cfg.max_queued_responses);
    let conn = Arc::new(Conn {
        id: conn_id,
        sockets,
        agent: Mutex::new(None),
        client: Mutex::new(None),
        out,
        queued: Arc::new(AtomicUsize::new(0)),
        stream: stream.clone(),
        gone: CancellationToken::new(),
        closing: CancellationToken::new(),
        inflight: InFlight::default(),
        subscription: Mutex::new(None),
        write_timeout: Duration::from_secs(cfg.idle_timeout_secs.max(1)),
        next_anon: std::sync::atomic::AtomicU64::new(0),
        turn: Arc::new(Turn::default()),
        room: Arc::new(tokio::sync::Notify::new()),
        access,
    });
    let idle = Duration::from_secs(cfg.idle_timeout_secs.max(1));
    let writer = tokio::spawn(write_loop(
        stream.clone(),
        queue,
        conn.gone.clone(),
        idle,
        conn.turn.clone(),
        conn.room.clone(),
        conn.queued.clone(),
    ));
    let max_in_flight = cfg.max_queued_responses.saturating_mul(4);
    // When the current unfinished line began: the idle limit counts from there, so a
    // trickle of bytes cannot keep a half line (and its buffer) alive forever.
    // A connection that has not sent a byte yet counts as idle from its start, so silent
    // connections cannot hold every slot of `max_connections`.
    let mut partial_since: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut got_bytes = false;
    let mut decoder = LineDecoder::new(cfg.max_frame_bytes);
    // Answers given at once, sent together after each read: one queue entry (and one
    // write) for all the requests a read brought.
    let mut ready = Vec::new();
    // Made once, not per read: registering a fresh waiter on each token at every read
    // showed in the profile of 64 busy connections.
    let (gone, shutdown) = (conn.gone.clone(), daemon.shutdown.clone());
    let gone = gone.cancelled();
    let shutdown = shutdown.cancelled();
    tokio::pin!(gone, shutdown);
    let mut armed = None;
    'read: loop {
        loop {
            match decoder.decode() {
                Ok(Some(line)) => dispatch(&dispatcher, &conn, line, max_in_flight, &mut ready),
                Ok(None) => break,
                Err(too_large) => {
                    let e = RpcError::new(
                        ErrorKind::FrameTooLarge,
                        format!("{too_large}; closing the connection"),
                    )
                    .with("max_frame_bytes", too_large.max as u64);
                    conn.respond(None, Err(e));
                    conn.abort_all();
                    break 'read;
                }
            }
        }
        if !ready.is_empty() && !write_ready(&conn, &mut ready, idle).await {
            conn.abort_all();
            break 'read;
        }
        partial_since = match (decoder.has_partial_line(), partial_since) {
            (false, since) if !got_bytes => since,
            (false, _) => None,
            (true, None) => Some(tokio::time::Instant::now()),
            (true, since) => since,
        };
        let deadline = partial_since.map(|since| since + idle);
        let read = read_some(uds, decoder.buffer());
        let n = match wait_for_read(read, deadline, gone.as_mut(), shutdown.as_mut(), &mut armed)
            .await
        {
            Woke::Read(n) => n,
            Woke::Idle => {
                if got_bytes {
                    tracing::debug!("closing connection idle mid-line");
                } else {
                    tracing::debug!("closing connection that sent nothing");
                }
                conn.abort_all();
                break 'read;
            }
            Woke::Gone => {
                conn.abort_all();
                break 'read;
            }
            Woke::Shutdown => break 'read,
        };
        match n {
            Ok(0) => {
                hangup_watch(&stream, &conn);
                break 'read;
            }
            Err(_) => {
                conn.abort_all();
                break 'read;
            }
            Ok(_) => got_bytes = true,
        }
    }
    if !ready.is_empty() {
        conn.send(ready);
    }
    conn.closing.cancel();
    drop(conn);
    let _ = writer.await;
}

/// After EOF the client may only have shut its sending side (answers still wanted) or be
/// gone entirely. A gone peer makes the socket report write-closed: then in-flight
/// requests are aborted so their upstream calls stop too.
fn hangup_watch(stream: &Arc<Stream>, conn: &Arc<Conn>) {
    let stream = stream.clone();
    let conn = Arc::downgrade(conn);
    tokio::spawn(async move {
        loop {
            let Some(c) = conn.upgrade() else { return };
            let gone = c.gone.clone();
            drop(c);
            let Stream::UdSocket(uds) = &*stream;
            let ready = tokio::select! {
                r = uds.inner().ready(tokio::io::Interest::WRITABLE) => r,
                _ = gone.cancelled() => return,
            };
            match ready {
                Ok(r) if r.is_write_closed() || r.is_error() => {
                    if let Some(c) = conn.upgrade() {
                        c.gone.cancel();
                        c.abort_all();
                    }
                    return;
                }
                Ok(_) => {
                    // Writable and open: the client is still there. Look again later; a
                    // sleep keeps this from spinning on a level-triggered ready state.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => return,
            }
        }
    });
}

/// Reads what the socket has into `buf`. A read that leaves part of the buffer free
/// drained the socket, so its readiness is cleared at once, as tokio's own `AsyncRead`
/// does: without that, every request costs one more `recv` that fails with `EAGAIN`
/// (interprocess's `AsyncRead for &Stream` has no such shortcut).
async fn read_some(s: &tokio::net::UnixStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use bytes::BufMut;
    loop {
        let space = buf.chunk_mut().len();
        let mut short = None;
        // `try_io` clears the readiness it saw before the closure ran when the closure
        // says `WouldBlock`: data that came after the read set a newer readiness, which
        // stays.
        let r = s.try_io(tokio::io::Interest::READABLE, || {
            let n = s.try_read_buf(buf)?;
            if n > 0 && n < space {
                short = Some(n);
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(n) = short {
                    return Ok(n);
                }
            }
            Err(e) => return Err(e),
        }
        // The stream's own reader slot, not a `readable()` waiter: no list entry to add
        // and remove at every wait.
        std::future::poll_fn(|cx| s.poll_read_ready(cx)).await?;
    }
}

/// Why the reader stopped waiting.
enum Woke {
    Read(std::io::Result<usize>),
    /// The idle deadline passed.
    Idle,
    /// The connection is being dropped.
    Gone,
    /// The daemon is stopping.
    Shutdown,
}

/// Waits for `read`, the idle `deadline` or a cancellation. The cancellations are polled
/// only when they are not yet registered with this task's waker, or when the task was
/// woken and the read is still not ready: polling a registered `CancellationToken` wait
/// takes two mutexes, and doing so at every request was most of the reader's own cost.
/// A cancellation always wakes the task, so it is never missed: the next poll sees it.
async fn wait_for_read<R: Future<Output = std::io::Result<usize>>>(
    read: R,
    deadline: Option<tokio::time::Instant>,
    mut gone: Pin<&mut WaitForCancellationFuture<'_>>,
    mut shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    armed: &mut Option<Waker>,
) -> Woke {
    let mut read = std::pin::pin!(read);
    let mut idle = std::pin::pin!(deadline.map(tokio::time::sleep_until));
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(n) = read.as_mut().poll(cx) {
            return Poll::Ready(Woke::Read(n));
        }
        if let Some(idle) = idle.as_mut().as_pin_mut() {
            if idle.poll(cx).is_ready() {
                return Poll::Ready(Woke::Idle);
            }
        }
        let registered = armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if std::mem::replace(&mut woken, true) || !registered {
            if gone.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Gone);
            }
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Shutdown);
            }
            if !registered {
                *armed = Some(cx.waker().clone());
            }
        }
        Poll::Pending
    })
    .await
}

/// Appends a success line answering `id` with a shared result, without parsing it again.
fn ready_line(out: &mut Vec<u8>, id: Option<&Id>, json: &str) {
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    if serde_json::to_writer(&mut *out, &id).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(br#","result":"#);
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// `cancel` is the connection's own business: it stops a request of this connection.
fn cancel(conn: &Conn, params: Option<&RawValue>) -> Result<Box<RawValue>, RpcError> {
    let p: CancelParams =
        serde_json::from_str(params.map_or("{}", RawValue::get)).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            RpcError::invalid_params(format!("invalid params: {msg}"))
        })?;
    if conn.cancel(&p.id) {
        conn.respond(
            Some(&p.id),
            Err(RpcError::new(
                ErrorKind::Cancelled,
                "cancelled by the client",
            )),
        );
    }
    serde_json::value::to_raw_value(&Empty {})
        .map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
}

fn dispatch(
    dispatcher: &Arc<dyn Dispatcher>,
    conn: &Arc<Conn>,
    line: &[u8],
    max_in_flight: usize,
    ready: &mut Vec<u8>,
) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        // Batches are not supported: one request per line does the same without an
        // unbounded answer. JSON-RPC 2.0 lets a server answer one error object then.
        let e = RpcError::new(
            ErrorKind::InvalidRequest,
            "batches (JSON arrays) are not supported; send one request object per line",
        );
        conn.respond(None, Err(e));
        return;
    }
    let req = match RequestRef::parse(line) {
        Ok(r) => r,
        Err((id, e)) => {
            conn.respond(id.as_ref(), Err(e));
            return;
        }
    };
    if let Err(e) = crate::access::check(conn.access, &req.method) {
        conn.respond(req.id.as_ref(), Err(e));
        return;
    }
    if req.method == names::CANCEL {
        let result = cancel(conn, req.params);
        if req.id.is_some() {
            conn.respond(req.id.as_ref(), result);
        }
        return;
    }
    // A request with the id of one still in flight gets the error of the task path.
    let clash = req.id.as_ref().is_some_and(|id| conn.inflight.contains(id));
    if !clash {
        let id = req.id.as_ref();
        let answered = dispatcher.ready(conn, &req.method, req.params, &mut |answer| match (
            id, answer,
        ) {
            (None, _) => {}
            (Some(id), Ok(json)) => ready_line(ready, Some(id), json),
            (Some(id), Err(e)) => {
                ready.extend_from_slice(&encode_line(&Response::err(Some(id), e)))
            }
        });
        if answered {
            return;
        }
    }
    let req = req.to_owned();
    let dispatcher = dispatcher.clone();
    let task_conn = conn.clone();
    // Every log line of the request carries its method and agent (journald fields). The
    // agent name is shared, not copied; with info logs off the span is not built at all.
    let span = if tracing::enabled!(tracing::Level::INFO) {
        let agent = lock(&conn.agent).clone();
        tracing::info_span!("request", method = %crate::logging::clean(&req.method), agent = agent.as_deref().unwrap_or("-"))
    } else {
        tracing::Span::none()
    };
    let mut inflight = lock(&conn.inflight.tasks);
    if inflight.len() >= max_in_flight {
        drop(inflight);
        let e = RpcError::new(
            ErrorKind::Busy,
            format!("{max_in_flight} requests already in flight on this connection; wait for some answers"),
        );
        conn.respond(req.id.as_ref(), Err(e));
        return;
    }
    let slot = match &req.id {
        Some(id) => Slot::Id(id.clone()),
        None => Slot::Anon(conn.next_anon.fetch_add(1, Ordering::Relaxed)),
    };
    if inflight.contains_key(&slot) {
        drop(inflight);
        let e = RpcError::new(
            ErrorKind::InvalidRequest,
            "a request with this id is still in flight on this connection; use a fresh id",
        );
        conn.respond(req.id.as_ref(), Err(e));
        return;
    }
    let task_slot = slot.clone();
    let task = tokio::spawn(
        async move {
            // A panicking handler (a bug) must still answer, or the caller waits forever.
            let work = dispatcher.call(
                &task_conn,
                req.id.as_ref(),
                &req.method,
                req.params.as_deref(),
            );
            let result = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(method = %req.method, "request handler panicked");
                    Err(RpcError::internal(
                        "internal error while handling the request",
                    ))
                }
            };
            // `cancel` removes the entry and answers itself: then this answer is dropped,
            // so each id gets exactly one response.
            if task_conn.inflight.remove(&task_slot).is_none() {
                return;
            }
            if let Some(id) = &req.id {
                if let Err(e) = &result {
                    tracing::debug!(code = e.code, error = %e.message, "request failed");
                }
                task_conn.respond(Some(id), result);
            }
        }
        .instrument(span),
    );
    inflight.insert(slot, task.abort_handle());
    conn.inflight.len.store(inflight.len(), Ordering::Release);
}

/// Sends the answers the reader gave at once: itself when the socket is free (no hand-over
/// to the writer task), else through the queue. False when the connection is gone.
async fn write_ready(conn: &Arc<Conn>, ready: &mut Vec<u8>, write_timeout: Duration) -> bool {
    // Most answers fit the socket's buffer: one non-blocking write then needs no timer
    // and no waiter. Only what is left waits, under the write timeout, holding up the
    // reader (a client that sends faster than it reads is slowed, not queued for).
    let written = match conn.write_now(ready) {
        None => {
            conn.send(std::mem::take(ready));
            return !conn.gone.is_cancelled();
        }
        Some(Err(())) => {
            ready.clear();
            return false;
        }
        Some(Ok(n)) => n,
    };
    if written == ready.len() {
        conn.turn.give_back();
        ready.clear();
        return true;
    }
    ready.drain(..written);
    let mut tx: &Stream = &conn.stream;
    let write = tokio::time::timeout(write_timeout, tx.write_all(ready));
    let ok = tokio::select! {
        r = write => matches!(r, Ok(Ok(()))),
        _ = conn.gone.cancelled() => false,
    };
    conn.turn.give_back();
    ready.clear();
    if !ok && !conn.gone.is_cancelled() {
        conn.gone.cancel();
    }
    ok
}

async fn write_loop(
    stream: Arc<Stream>,
    mut queue: mpsc::Receiver<Vec<u8>>,
    gone: CancellationToken,
    write_timeout: Duration,
    turn: Arc<Turn>,
    room: Arc<tokio::sync::Notify>,
    queued: Arc<AtomicUsize>,
) {
    let mut tx: &Stream = &stream;
    let mut batch = Vec::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            m = queue.recv() => m,
            _ = gone.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.clear();
        batch.extend_from_slice(&first);
        let mut lines = 1;
        // Coalesce whatever else is ready into one write.
        while batch.len() < 64 * 1024 {
            match queue.try_recv() {
                Ok(more) => {
                    batch.extend_from_slice(&more);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        room.notify_waiters();
        // A client that stops reading is dropped once a write has been stuck this long.
        let write = tokio::time::timeout(write_timeout, async {
            turn.take().await;
            let r = tx.write_all(&batch).await;
            turn.give_back();
            r
        });
        let ok = tokio::select! {
            r = write => matches!(r, Ok(Ok(()))),
            _ = gone.cancelled() => false,
        };
        // Written (or dropped with the connection): lines sent from now on may go direct.
        queued.fetch_sub(lines, Ordering::AcqRel);
        if !ok {
            gone.cancel();
            break;
        }
    }
    let _ = tx.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clearing the readiness after a short read never loses data that came after it:
    /// a ping-pong of many small lines, each sent only after the last was read, and bursts
    /// written while the reader is between reads, all arrive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_reads_never_lose_what_comes_after_them() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (back_tx, mut back_rx) = mpsc::channel::<()>(1);
        let writer = tokio::spawn(async move {
            for i in 0..2000u32 {
                let line = format!("{i}\n");
                b.write_all(line.as_bytes()).await.unwrap();
                if i % 7 == 0 {
                    // A second line right behind the first, while the reader may be mid-read.
                    b.write_all(b"x\n").await.unwrap();
                }
                if back_rx.recv().await.is_none() {
                    return;
                }
            }
        });
        let mut buf = Vec::with_capacity(8192);
        for i in 0..2000u32 {
            let want = if i % 7 == 0 {
                format!("{i}\nx\n")
            } else {
                format!("{i}\n")
            };
            while buf.len() < want.len() {
                let n = tokio::time::timeout(Duration::from_secs(10), read_some(&a, &mut buf))
                    .await
                    .expect("the line arrives")
                    .unwrap();
                assert!(n > 0);
            }
            assert_eq!(buf, want.as_bytes());
            buf.clear();
            back_tx.send(()).await.unwrap();
        }
        drop(back_tx);
        writer.await.unwrap();
    }

    /// A cancellation that comes while the reader is busy (its wait registered, but not
    /// being polled) still ends the next wait, although that wait's first poll skips the
    /// cancellations.
    #[tokio::test]
    async fn a_cancellation_while_the_reader_is_busy_ends_its_next_wait() {
        let (gone_t, stop_t) = (CancellationToken::new(), CancellationToken::new());
        let (gone, shutdown) = (gone_t.cancelled(), stop_t.cancelled());
        tokio::pin!(gone, shutdown);
        let mut armed = None;
        // Pending once (waking the task at once), then ready: the first wait registers.
        let read = async {
            tokio::task::yield_now().await;
            Ok(1)
        };
        let woke = wait_for_read(read, None, gone.as_mut(), shutdown.as_mut(), &mut armed).await;
        assert!(matches!(woke, Woke::Read(Ok(1))));
        assert!(armed.is_some(), "the cancellations are registered");
        // Busy answering: the connection is dropped meanwhile.
        gone_t.cancel();
        let never = std::future::pending::<std::io::Result<usize>>();
        let woke = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_read(never, None, gone.as_mut(), shutdown.as_mut(), &mut armed),
        )
        .await
        .expect("the cancellation ends the wait");
        assert!(matches!(woke, Woke::Gone));
    }

    /// A stream waiting for room takes none of it: other lines still get the free slots
    /// (with `reserve_many`, the waiter held them and the next line found the queue full).
    #[tokio::test]
    async fn waiting_for_room_leaves_the_free_slots_to_others() {
        let (out, mut queue) = mpsc::channel::<Vec<u8>>(4);
        let room = Arc::new(tokio::sync::Notify::new());
        out.try_send(b"a".to_vec()).unwrap();
        out.try_send(b"b".to_vec()).unwrap();
        let waiter = tokio::spawn({
            let (out, room) = (out.clone(), room.clone());
            async move { room_for(&out, &room, 4).await }
        });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        out.try_send(b"c".to_vec())
            .expect("a free slot is there for another line");
        // The writer drains the queue and says so: the waiter goes on.
        while queue.try_recv().is_ok() {}
        room.notify_waiters();
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic"));
    }
}
