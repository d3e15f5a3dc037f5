//! `status`: version, uptime, connections and every profile's state.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{Empty, StatusResult};
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;

/// Answers with the daemon's and every profile's state.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let _: Empty = parse(params)?;
    let d = &ctx.daemon;
    let reg = d.registry();
    ok(&StatusResult {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: llmd_proto::PROTOCOL_VERSION,
        uptime_secs: d.started.elapsed().as_secs(),
        connections: d.connections.load(Ordering::Relaxed),
        agents: d
            .agents
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default(),
        profiles: reg.profiles.values().map(|p| p.status()).collect(),
        gateway: d.gateway.get().map(|g| g.status()),
    })
}
