//! One socket connection: a writer guarded by a lock (whole lines only) and a reader task
//! that routes responses to waiting callers by id, `chat.delta` notifications to the
//! stream of the request they name, and other notifications to listeners.

use crate::error::Error;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use llmd_proto::methods::names;
use llmd_proto::{Id, Incoming, LineDecoder};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

type Answer = Result<Box<RawValue>, Error>;

/// A notification from the daemon (`event`, `chat.delta`).
#[derive(Debug)]
pub struct Notification {
    /// Method name.
    pub method: String,
    /// Raw params.
    pub params: Box<RawValue>,
}

/// Called by the reader task with each notification (method, params) as it is read, before
/// any later line is routed: what a hook does is done before the caller of any answer that
/// followed the notification on the socket gets that answer.
pub(crate) type Hook = Box<dyn Fn(&str, &RawValue) + Send + Sync>;

/// What the reader task routes to.
#[derive(Default)]
struct Routes {
    pending: Mutex<HashMap<i64, oneshot::Sender<Answer>>>,
    streams: Mutex<HashMap<i64, mpsc::UnboundedSender<Box<RawValue>>>>,
    listeners: Mutex<Vec<mpsc::UnboundedSender<Notification>>>,
    hooks: Mutex<Vec<Hook>>,
}

pub(crate) struct Connection {
    stream: Arc<Stream>,
    write_lock: tokio::sync::Mutex<()>,
    routes: Arc<Routes>,
    alive: Arc<AtomicBool>,
    /// A request line was left half-written; nothing more may be sent here.
    broken: AtomicBool,
    used: AtomicBool,
    next_id: AtomicI64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    pub(crate) async fn open(path: &Path) -> Result<Connection, Error> {
        let name = path
            .to_fs_name::<GenericFilePath>()
            .map_err(|e| Error::Socket {
                path: path.into(),
                source: e,
            })?;
        let stream = Stream::connect(name).await.map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => Error::NotRunning {
                path: path.into(),
                source: e,
            },
            _ => Error::Socket {
                path: path.into(),
                source: e,
            },
        })?;
        let stream = Arc::new(stream);
        let routes = Arc::new(Routes::default());
        let alive = Arc::new(AtomicBool::new(true));
        let reader = tokio::spawn(read_loop(stream.clone(), routes.clone(), alive.clone()));
        Ok(Connection {
            stream,
            write_lock: tokio::sync::Mutex::new(()),
            routes,
            alive,
            broken: AtomicBool::new(false),
            used: AtomicBool::new(false),
            next_id: AtomicI64::new(1),
            reader,
        })
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.broken.load(Ordering::Acquire)
    }

    /// True once the daemon has answered anything on this connection.
    pub(crate) fn was_used(&self) -> bool {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn notifications(&self) -> mpsc::UnboundedReceiver<Notification> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes.listeners).push(tx);
        rx
    }

    /// Runs `hook` on every notification read from now on (see [`Hook`]).
    pub(crate) fn add_hook(&self, hook: Hook) {
        lock(&self.routes.hooks).push(hook);
    }

    pub(crate) async fn call(&self, method: &str, params: &RawValue) -> Answer {
        let (id, rx) = self.start(method, params, None).await?;
        // If the caller gives up (timeout, drop), forget the request so the routing table
        // does not grow and a stray error is not matched to it.
        let _forget = Forget {
            routes: &self.routes,
            id,
        };
        self.finish(rx).await
    }

    /// Waits for the answer of a started request.
    pub(crate) async fn finish(&self, rx: oneshot::Receiver<Answer>) -> Answer {
        let result = rx.await.map_err(|_| Error::Disconnected)?;
        if result.is_ok() || matches!(result, Err(Error::Rpc(_))) {
            self.used.store(true, Ordering::Release);
        }
        result
    }

    /// Sends a request without waiting for its answer; `chat.delta` notifications naming
    /// its id go to `notes`.
    pub(crate) async fn start(
        &self,
        method: &str,
        params: &RawValue,
        notes: Option<mpsc::UnboundedSender<Box<RawValue>>>,
    ) -> Result<(i64, oneshot::Receiver<Answer>), Error> {
        if !self.is_alive() {
            return Err(Error::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.routes.pending).insert(id, tx);
        if let Some(n) = notes {
            lock(&self.routes.streams).insert(id, n);
        }
        let mut line = Vec::with_capacity(64 + params.get().len());
        line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
        line.extend_from_slice(id.to_string().as_bytes());
        line.extend_from_slice(b",\"method\":");
        serde_json::to_writer(&mut line, method).map_err(|e| Error::Protocol(e.to_string()))?;
        line.extend_from_slice(b",\"params\":");
        line.extend_from_slice(params.get().as_bytes());
        line.extend_from_slice(b"}\n");
        let _guard = self.write_lock.lock().await;
        let mut w: &Stream = &self.stream;
        // A write abandoned half-way (the caller's future dropped) would leave half a line
        // that the next request gets glued to: such a connection is retired and the next
        // call opens a fresh one.
        let mut unfinished = Unfinished {
            broken: &self.broken,
            done: false,
        };
        let written = w.write_all(&line).await;
        unfinished.done = true;
        if written.is_err() {
            lock(&self.routes.pending).remove(&id);
            self.end_stream(id);
            self.alive.store(false, Ordering::Release);
            return Err(Error::Disconnected);
        }
        Ok((id, rx))
    }

    /// Stops routing notifications for `id`.
    pub(crate) fn end_stream(&self, id: i64) {
        lock(&self.routes.streams).remove(&id);
    }
}

/// Marks the connection broken if a write is abandoned before it completes.
struct Unfinished<'a> {
    broken: &'a AtomicBool,
    done: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.broken.store(true, Ordering::Release);
        }
    }
}

/// Removes a request's routes when its caller stops waiting.
struct Forget<'a> {
    routes: &'a Routes,
    id: i64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.routes.pending).remove(&self.id);
        lock(&self.routes.streams).remove(&self.id);
    }
}

async fn read_loop(stream: Arc<Stream>, routes: Arc<Routes>, alive: Arc<AtomicBool>) {
    let mut r: &Stream = &stream;
    // Answers can be as large as the daemon allows requests to be.
    let mut dec = LineDecoder::new(llmd_proto::DEFAULT_MAX_FRAME_BYTES * 4);
    'outer: loop {
        loop {
            match dec.decode() {
                Ok(Some(line)) => route(line, &routes),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
        match r.read_buf(dec.buffer()).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    alive.store(false, Ordering::Release);
    for (_, tx) in lock(&routes.pending).drain() {
        let _ = tx.send(Err(Error::Disconnected));
    }
    lock(&routes.streams).clear();
    lock(&routes.listeners).clear();
    lock(&routes.hooks).clear();
}

fn route(line: &[u8], routes: &Routes) {
    let Ok(msg) = serde_json::from_slice::<Incoming>(line) else {
        return;
    };
    if let Some(method) = msg.method {
        let params = msg
            .params
            .unwrap_or_else(|| RawValue::from_string("null".into()).unwrap_or_default());
        if method == names::CHAT_DELTA {
            #[derive(serde::Deserialize)]
            struct Tagged {
                id: Id,
            }
            if let Ok(Tagged { id: Id::Num(id) }) = serde_json::from_str::<Tagged>(params.get()) {
                if let Some(tx) = lock(&routes.streams).get(&id) {
                    let _ = tx.send(params);
                    return;
                }
            }
        }
        for h in lock(&routes.hooks).iter() {
            h(&method, &params);
        }
        let mut ls = lock(&routes.listeners);
        ls.retain(|l| !l.is_closed());
        for l in ls.iter() {
            let _ = l.send(Notification {
                method: method.clone(),
                params: params.clone(),
            });
        }
        return;
    }
    let Some(Id::Num(id)) = msg.id else {
        // An error the daemon could not attribute (id null): with exactly one waiter it is
        // that caller's, and it must not be lost.
        if let Some(err) = msg.error {
            let mut p = lock(&routes.pending);
            if p.len() == 1 {
                let key = p.keys().next().copied().unwrap_or(0);
                if let Some(tx) = p.remove(&key) {
                    let _ = tx.send(Err(Error::Rpc(err)));
                }
            }
        }
        return;
    };
    lock(&routes.streams).remove(&id);
    let Some(tx) = lock(&routes.pending).remove(&id) else {
        return;
    };
    let answer = match (msg.result, msg.error) {
        (_, Some(e)) => Err(Error::Rpc(e)),
        (Some(r), None) => Ok(r),
        (None, None) => Err(Error::Protocol("response without result or error".into())),
    };
    let _ = tx.send(answer);
}
