//! `hello`: the agent names itself; the daemon answers with its version.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{HelloParams, HelloResult};
use serde_json::value::RawValue;

/// Longest agent name kept (characters); the rest is cut.
pub const MAX_CLIENT_CHARS: usize = 64;
/// Longest agent version kept (characters).
pub const MAX_VERSION_CHARS: usize = 32;

/// Records the agent's name for logs and answers with server and protocol versions.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: HelloParams = parse(params)?;
    // Names end up in logs and `status`: printable and short, whatever the client sent.
    let client = crate::logging::clean_name(&p.client, MAX_CLIENT_CHARS);
    let version = crate::logging::clean_name(&p.version, MAX_VERSION_CHARS);
    tracing::debug!(agent = %client, agent_version = %version, "hello");
    ctx.conn.set_agent(&client, &version);
    ok(&HelloResult {
        server: "llmd".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: llmd_proto::PROTOCOL_VERSION,
    })
}
