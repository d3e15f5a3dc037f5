//! `hello`: the agent names itself; the daemon answers with its version.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{HelloParams, HelloResult};
use serde_json::value::RawValue;

/// Records the agent's name for logs and answers with server and protocol versions.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: HelloParams = parse(params)?;
    tracing::debug!(agent = %p.client, agent_version = %p.version, "hello");
    let name = format!("{}/{}", p.client, p.version);
    if let Ok(mut agents) = ctx.daemon.agents.lock() {
        agents.insert(ctx.conn.id, name.clone());
    }
    if let Ok(mut a) = ctx.conn.agent.lock() {
        *a = Some(name.into());
    }
    ok(&HelloResult {
        server: "llmd".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: llmd_proto::PROTOCOL_VERSION,
    })
}
