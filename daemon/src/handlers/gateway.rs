//! `gateway.key`: the HTTP gateway's key (or an agent's named key) for `llmctl`. The
//! socket admits only its owner (and root), so this hands the key to no one else.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{GatewayKeyParams, GatewayKeyResult};
use llmd_proto::RpcError;
use serde_json::value::RawValue;

/// Answers with the key and the gateway's base URL.
pub fn key(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: GatewayKeyParams = parse(params)?;
    let gw = ctx.daemon.gateway.get().ok_or_else(|| {
        RpcError::invalid_params(
            "the gateway is off: add `[gateway]` with `listen = \"127.0.0.1:PORT\"` to the config and restart llmd",
        )
    })?;
    let key = gw
        .keys
        .issue(p.agent.as_deref())
        .map_err(|e| RpcError::invalid_params(format!("`agent`: {e}")))?;
    ok(&GatewayKeyResult {
        key: key.expose().to_owned(),
        base_url: gw.base_url(),
    })
}
