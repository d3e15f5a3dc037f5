//! The socket side: accept loop, peer checks, connection limit, and the connections'
//! own bookkeeping ([`Sockets`]). It knows nothing of methods: it is given a
//! [`Dispatcher`] (the handlers) that answers requests.

pub mod connection;
pub mod listener;

use crate::fsutil::current_uid;
use crate::state::Daemon;
use connection::Conn;
use futures_util::future::BoxFuture;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::traits::StreamCommon;
use llmd_proto::{encode_line, ErrorKind, Id, Response, RpcError};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// What the server calls for each request.
pub trait Dispatcher: Send + Sync + 'static {
    /// Answers a request that needs no waiting by handing its result to `answer`, which
    /// the connection's reader writes straight into its output (no task, no span, no copy
    /// of a shared JSON text). False: run it with [`Dispatcher::call`].
    fn ready(
        &self,
        conn: &Conn,
        method: &str,
        params: Option<&RawValue>,
        answer: &mut dyn FnMut(Result<&str, &RpcError>),
    ) -> bool;

    /// Runs one request (in its own task) to its result.
    fn call<'a>(
        &'a self,
        conn: &'a Arc<Conn>,
        id: Option<&'a Id>,
        method: &'a str,
        params: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Result<Box<RawValue>, RpcError>>;
}

/// Open connections, agent names and connection ids.
pub struct Sockets {
    /// One permit per open connection, owned by its task: a task that ends in any way
    /// (also by a panic) gives its slot back.
    slots: Arc<Semaphore>,
    /// `max_connections` the semaphore was sized for.
    max: Mutex<usize>,
    agents: Mutex<BTreeMap<u64, String>>,
    next_id: AtomicU64,
}

impl Sockets {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Arc<Sockets> {
        Arc::new(Sockets {
            slots: Arc::new(Semaphore::new(max)),
            max: Mutex::new(max),
            agents: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Open connections.
    pub fn open(&self) -> u64 {
        let max = *crate::sync::lock(&self.max);
        max.saturating_sub(self.slots.available_permits()) as u64
    }

    /// Agents that named themselves (`client/version`), one per connection.
    pub fn agents(&self) -> Vec<String> {
        crate::sync::lock(&self.agents).values().cloned().collect()
    }

    /// Names connection `id`'s agent.
    pub fn set_agent(&self, id: u64, name: String) {
        crate::sync::lock(&self.agents).insert(id, name);
    }

    fn forget(&self, id: u64) {
        crate::sync::lock(&self.agents).remove(&id);
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A slot under the limit `max` (the config may have changed since the last call).
    fn admit(&self, max: usize) -> Option<OwnedSemaphorePermit> {
        {
            let mut cur = crate::sync::lock(&self.max);
            if max > *cur {
                self.slots.add_permits(max - *cur);
                *cur = max;
            } else if max < *cur {
                // Slots in use are taken back as they are freed, on later calls.
                *cur -= self.slots.forget_permits(*cur - max);
            }
        }
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// Accepts connections until shutdown; then stops accepting (the listener is closed at
/// once), lets the open connections finish what they are doing for up to `grace`, and cuts
/// whatever is still running after that.
pub async fn run(
    daemon: Arc<Daemon>,
    dispatcher: Arc<dyn Dispatcher>,
    listener: Listener,
    grace: Duration,
) {
    let sockets = Sockets::new(daemon.registry().config.daemon.max_connections);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => admit(&daemon, &dispatcher, &sockets, stream, &mut conns).await,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = daemon.shutdown.cancelled() => break,
        }
    }
    // A bound socket file goes with the listener; one passed by systemd stays its own.
    drop(listener);
    if conns.is_empty() {
        return;
    }
    tracing::info!(
        connections = conns.len(),
        grace_secs = grace.as_secs_f64(),
        "no longer accepting; waiting for requests in flight"
    );
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "grace period over; cancelling requests still in flight"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

async fn admit(
    daemon: &Arc<Daemon>,
    dispatcher: &Arc<dyn Dispatcher>,
    sockets: &Arc<Sockets>,
    stream: Stream,
    conns: &mut JoinSet<()>,
) {
    let euid = stream.peer_creds().ok().and_then(|c| c.euid());
    let me = current_uid();
    let allow = &daemon.registry().config.daemon.allow_uids;
    let access = crate::access::of_peer(euid, me, allow);
    if access == crate::access::Access::None {
        tracing::warn!(peer_uid = ?euid, "refused connection from another user");
        reject(
            stream,
            RpcError::new(
                ErrorKind::PermissionDenied,
                "this llmd serves only its own user",
            ),
        )
        .await;
        return;
    }
    let max = daemon.registry().config.daemon.max_connections;
    let Some(permit) = sockets.admit(max) else {
        tracing::warn!(max, "connection limit reached");
        reject(
            stream,
            RpcError::new(
                ErrorKind::Busy,
                format!("connection limit of {max} reached; try again later"),
            ),
        )
        .await;
        return;
    };
    let id = sockets.next_id();
    let (d, disp, socks) = (daemon.clone(), dispatcher.clone(), sockets.clone());
    conns.spawn(async move {
        // Both dropped with the task, however it ends (also by a panic).
        let _slot = permit;
        let _agent = ForgetAgent(socks.clone(), id);
        connection::serve(d, disp, socks, id, stream, access).await;
    });
}

/// Drops a connection's agent name when its task ends.
struct ForgetAgent(Arc<Sockets>, u64);

impl Drop for ForgetAgent {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

async fn reject(stream: Stream, err: RpcError) {
    let line = encode_line(&Response::err(None, &err));
    tokio::spawn(async move {
        let mut tx: &Stream = &stream;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = tx.write_all(&line).await;
            let _ = tx.shutdown().await;
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_connection_task_gives_its_slot_back() {
        let sockets = Sockets::new(1);
        let permit = sockets.admit(1).expect("a free slot");
        assert!(sockets.admit(1).is_none(), "the one slot is taken");
        assert_eq!(sockets.open(), 1);
        let task = tokio::spawn(async move {
            let _slot = permit;
            panic!("a bug in a connection task");
        });
        assert!(task.await.is_err());
        assert_eq!(sockets.open(), 0);
        assert!(sockets.admit(1).is_some(), "the slot came back");
    }

    #[tokio::test]
    async fn the_limit_follows_the_config() {
        let sockets = Sockets::new(1);
        let a = sockets.admit(1).unwrap();
        let b = sockets.admit(2).expect("raised to 2");
        assert!(sockets.admit(2).is_none());
        // Lowered to 1 while two are open: nobody new until both slots are back under it.
        assert!(sockets.admit(1).is_none());
        drop(a);
        assert!(sockets.admit(1).is_none(), "one open of a limit of 1");
        drop(b);
        let c = sockets.admit(1).expect("room again");
        assert_eq!(sockets.open(), 1);
        drop(c);
    }
}
