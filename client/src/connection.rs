//! One socket connection: a writer guarded by a lock (whole lines only) and a reader task
//! that routes responses to waiting callers by id and notifications to listeners.

use crate::error::Error;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use llmd_proto::{Id, Incoming, LineDecoder};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

type Pending = Mutex<HashMap<i64, oneshot::Sender<Result<Box<RawValue>, Error>>>>;

/// A notification from the daemon (`event`, `chat.delta`).
#[derive(Debug)]
pub struct Notification {
    /// Method name.
    pub method: String,
    /// Raw params.
    pub params: Box<RawValue>,
}

pub(crate) struct Connection {
    stream: Arc<Stream>,
    write_lock: tokio::sync::Mutex<()>,
    pending: Arc<Pending>,
    listeners: Arc<Mutex<Vec<mpsc::UnboundedSender<Notification>>>>,
    alive: Arc<AtomicBool>,
    used: AtomicBool,
    next_id: AtomicI64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
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
        let pending: Arc<Pending> = Arc::default();
        let listeners: Arc<Mutex<Vec<mpsc::UnboundedSender<Notification>>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let reader = tokio::spawn(read_loop(
            stream.clone(),
            pending.clone(),
            listeners.clone(),
            alive.clone(),
        ));
        Ok(Connection {
            stream,
            write_lock: tokio::sync::Mutex::new(()),
            pending,
            listeners,
            alive,
            used: AtomicBool::new(false),
            next_id: AtomicI64::new(1),
            reader,
        })
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// True once the daemon has answered anything on this connection.
    pub(crate) fn was_used(&self) -> bool {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn notifications(&self) -> mpsc::UnboundedReceiver<Notification> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.listeners).push(tx);
        rx
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        params: &RawValue,
    ) -> Result<Box<RawValue>, Error> {
        if !self.is_alive() {
            return Err(Error::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = Vec::with_capacity(64 + params.get().len());
        line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
        line.extend_from_slice(id.to_string().as_bytes());
        line.extend_from_slice(b",\"method\":");
        serde_json::to_writer(&mut line, method).map_err(|e| Error::Protocol(e.to_string()))?;
        line.extend_from_slice(b",\"params\":");
        line.extend_from_slice(params.get().as_bytes());
        line.extend_from_slice(b"}\n");
        {
            let _guard = self.write_lock.lock().await;
            let mut w: &Stream = &self.stream;
            if w.write_all(&line).await.is_err() {
                lock(&self.pending).remove(&id);
                self.alive.store(false, Ordering::Release);
                return Err(Error::Disconnected);
            }
        }
        let result = rx.await.map_err(|_| Error::Disconnected)?;
        if result.is_ok() || matches!(result, Err(Error::Rpc(_))) {
            self.used.store(true, Ordering::Release);
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_loop(
    stream: Arc<Stream>,
    pending: Arc<Pending>,
    listeners: Arc<Mutex<Vec<mpsc::UnboundedSender<Notification>>>>,
    alive: Arc<AtomicBool>,
) {
    let mut r: &Stream = &stream;
    // Answers can be as large as the daemon allows requests to be.
    let mut dec = LineDecoder::new(llmd_proto::DEFAULT_MAX_FRAME_BYTES * 4);
    'outer: loop {
        loop {
            match dec.decode() {
                Ok(Some(line)) => route(line, &pending, &listeners),
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
    for (_, tx) in lock(&pending).drain() {
        let _ = tx.send(Err(Error::Disconnected));
    }
    lock(&listeners).clear();
}

fn route(
    line: &[u8],
    pending: &Pending,
    listeners: &Mutex<Vec<mpsc::UnboundedSender<Notification>>>,
) {
    let Ok(msg) = serde_json::from_slice::<Incoming>(line) else {
        return;
    };
    if let Some(method) = msg.method {
        let params = msg
            .params
            .unwrap_or_else(|| RawValue::from_string("null".into()).unwrap_or_default());
        let mut ls = lock(listeners);
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
        // An error about a line the daemon could not attribute (id null): nobody to give
        // it to but we must not lose it silently when there is exactly one waiter.
        if let Some(err) = msg.error {
            let mut p = lock(pending);
            if p.len() == 1 {
                let key = *p.keys().next().unwrap_or(&0);
                if let Some(tx) = p.remove(&key) {
                    let _ = tx.send(Err(Error::Rpc(err)));
                }
            }
        }
        return;
    };
    let Some(tx) = lock(pending).remove(&id) else {
        return;
    };
    let answer = match (msg.result, msg.error) {
        (_, Some(e)) => Err(Error::Rpc(e)),
        (Some(r), None) => Ok(r),
        (None, None) => Err(Error::Protocol("response without result or error".into())),
    };
    let _ = tx.send(answer);
}
