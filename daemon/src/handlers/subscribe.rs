//! `subscribe`: forward `event` notifications to this connection (one subscription per
//! connection; the latest call's filter applies).

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{event_kinds, names, Empty, SubscribeParams};
use llmd_proto::{encode_line, Notification, RpcError};
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;

/// Starts forwarding the chosen event kinds until the connection closes or subscribes
/// again.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: SubscribeParams = parse(params)?;
    for kind in &p.events {
        if kind != event_kinds::TOKEN_ROTATED && kind != event_kinds::PROFILE_STATE {
            return Err(RpcError::invalid_params(format!(
                "unknown event kind `{kind}` in `events` (known: token.rotated, profile.state)"
            )));
        }
    }
    let mut rx = ctx.daemon.events.subscribe();
    let conn = ctx.conn.clone();
    // One subscription per connection: a second `subscribe` replaces the first, so events
    // are never delivered twice and repeated calls hold nothing more.
    let ended = tokio_util::sync::CancellationToken::new();
    conn.replace_subscription(ended.clone());
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = conn.closing.cancelled() => break,
                _ = ended.cancelled() => break,
            };
            match event {
                Ok(e) if p.events.is_empty() || p.events.contains(&e.kind) => {
                    if !conn.send(encode_line(&Notification::new(names::EVENT, &e))) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "subscriber too slow; events dropped")
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
    ok(&Empty {})
}
