//! `subscribe`: forward `event` notifications to this connection (one subscription per
//! connection; the latest call's filter applies).

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{event_kinds, names, Empty, Event, SubscribeParams};
use llmd_proto::{encode_line, Notification, RpcError};
use serde_json::value::RawValue;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

/// Starts forwarding the chosen event kinds until the connection closes or subscribes
/// again.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: SubscribeParams = parse(params)?;
    for kind in &p.events {
        if ![
            event_kinds::TOKEN_ROTATED,
            event_kinds::PROFILE_STATE,
            event_kinds::PROFILE_QUOTA,
        ]
        .contains(&kind.as_str())
        {
            return Err(RpcError::invalid_params(format!(
                "unknown event kind `{kind}` in `events` (known: token.rotated, profile.state, profile.quota)"
            )));
        }
    }
    let rx = ctx.daemon.events.subscribe();
    let conn = ctx.conn.clone();
    // One subscription per connection: a second `subscribe` replaces the first, so events
    // are never delivered twice and repeated calls hold nothing more.
    let ended = CancellationToken::new();
    conn.replace_subscription(ended.clone());
    let stop = conn.closing.clone();
    tokio::spawn(async move {
        forward(rx, &p.events, &stop, &ended, |e| {
            conn.send(encode_line(&Notification::new(names::EVENT, e)))
        })
        .await
    });
    ok(&Empty {})
}

/// Passes the events of `kinds` (all when empty) to `send` until it refuses one, `stop` or
/// `ended` fires, or the bus closes. A subscriber that fell behind the bus is told with an
/// `events.lost` event, whatever its filter: a client that caches tokens must then drop
/// them all, since a skipped `token.rotated` could have been about any profile.
async fn forward(
    mut rx: broadcast::Receiver<Event>,
    kinds: &[String],
    stop: &CancellationToken,
    ended: &CancellationToken,
    send: impl Fn(&Event) -> bool,
) {
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => break,
            _ = ended.cancelled() => break,
        };
        let sent = match event {
            Ok(e) if kinds.is_empty() || kinds.contains(&e.kind) => send(&e),
            Ok(_) => true,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "subscriber too slow; events dropped");
                send(&Event {
                    kind: event_kinds::EVENTS_LOST.into(),
                    profile: String::new(),
                    expires_at: None,
                    state: None,
                    error: None,
                    skipped: Some(n),
                    quota: None,
                })
            }
            Err(RecvError::Closed) => break,
        };
        if !sent {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn rotated(profile: &str) -> Event {
        Event {
            kind: event_kinds::TOKEN_ROTATED.into(),
            profile: profile.into(),
            expires_at: Some(1),
            state: None,
            error: None,
            skipped: None,
            quota: None,
        }
    }

    /// A subscriber more than the bus's capacity behind learns that it lost events, even
    /// with a filter that names no such kind, and then gets the newest events in order.
    #[tokio::test]
    async fn a_lagging_subscriber_is_told_it_lost_events() {
        let (bus, rx) = broadcast::channel(4);
        for i in 0..10 {
            bus.send(rotated(&format!("p{i}"))).ok();
        }
        drop(bus);
        let got = Mutex::new(Vec::new());
        let (stop, ended) = (CancellationToken::new(), CancellationToken::new());
        let kinds = vec![event_kinds::TOKEN_ROTATED.to_string()];
        forward(rx, &kinds, &stop, &ended, |e| {
            got.lock()
                .unwrap()
                .push((e.kind.clone(), e.profile.clone(), e.skipped));
            true
        })
        .await;
        let got = got.into_inner().unwrap();
        assert_eq!(
            got[0],
            (event_kinds::EVENTS_LOST.to_string(), String::new(), Some(6))
        );
        let rest: Vec<&str> = got[1..].iter().map(|g| g.1.as_str()).collect();
        assert_eq!(rest, ["p6", "p7", "p8", "p9"]);
    }

    /// The filter holds for ordinary events, and a refused send ends the subscription.
    #[tokio::test]
    async fn the_filter_applies_and_a_refused_send_ends_it() {
        let (bus, rx) = broadcast::channel(16);
        let mut state = rotated("a");
        state.kind = event_kinds::PROFILE_STATE.into();
        bus.send(state).ok();
        bus.send(rotated("b")).ok();
        bus.send(rotated("c")).ok();
        let got = Mutex::new(Vec::new());
        let (stop, ended) = (CancellationToken::new(), CancellationToken::new());
        let kinds = vec![event_kinds::TOKEN_ROTATED.to_string()];
        forward(rx, &kinds, &stop, &ended, |e| {
            got.lock().unwrap().push(e.profile.clone());
            false
        })
        .await;
        assert_eq!(got.into_inner().unwrap(), ["b"]);
    }
}
