//! The socket side: accept loop, peer checks, connection limit.

pub mod connection;
pub mod listener;

use crate::fsutil::current_uid;
use crate::state::Daemon;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::traits::StreamCommon;
use llmd_proto::{encode_line, ErrorKind, Response, RpcError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

/// Accepts connections until shutdown; then stops accepting (the listener is closed at
/// once), lets the open connections finish what they are doing for up to `grace`, and cuts
/// whatever is still running after that.
pub async fn run(daemon: Arc<Daemon>, listener: Listener, grace: Duration) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => admit(&daemon, stream, &mut conns).await,
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

async fn admit(daemon: &Arc<Daemon>, stream: Stream, conns: &mut JoinSet<()>) {
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
    let max = daemon.registry().config.daemon.max_connections as u64;
    let open = daemon.connections.fetch_add(1, Ordering::SeqCst);
    if open >= max {
        daemon.connections.fetch_sub(1, Ordering::SeqCst);
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
    }
    let d = daemon.clone();
    conns.spawn(async move {
        connection::serve(d.clone(), stream, access).await;
        d.connections.fetch_sub(1, Ordering::SeqCst);
    });
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
