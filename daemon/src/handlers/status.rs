//! `status`: version, uptime, connections and every profile's state.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{Empty, StatusResult};
use serde_json::value::RawValue;

/// Answers with the daemon's and every profile's state.
pub fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let _: Empty = parse(params)?;
    let d = &ctx.daemon;
    let reg = d.registry();
    ok(&StatusResult {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: llmd_proto::PROTOCOL_VERSION,
        uptime_secs: d.started.elapsed().as_secs(),
        connections: ctx.conn.sockets.open(),
        agents: ctx.conn.sockets.agents(),
        profiles: reg
            .profiles
            .values()
            .map(|p| {
                let mut s = p.status();
                s.source = Some(crate::profile::credential_source(
                    &p.name,
                    &p.config,
                    &reg.state_dir,
                ));
                s
            })
            .collect(),
        env_keys: crate::config::Provider::ALL
            .iter()
            .map(|p| p.default_key_env())
            .chain(["CLAUDE_CODE_OAUTH_TOKEN"])
            .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
            .map(str::to_owned)
            .collect(),
        config: Some(reg.source.to_string()),
        state_dir: Some(reg.state_dir.display().to_string()),
        gateway: d.gateway.get().map(|g| g.status()),
        pools: reg.pools.values().map(|p| p.status()).collect(),
    })
}
