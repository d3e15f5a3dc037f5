//! `reload`: read the config and credential files again.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::methods::{Empty, ReloadResult};
use llmd_proto::RpcError;
use serde_json::value::RawValue;

/// Reloads; a bad config keeps the running one and the error says why.
pub async fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let _: Empty = parse(params)?;
    match ctx.daemon.reload().await {
        Ok(profiles) => ok(&ReloadResult { profiles }),
        Err(why) => {
            tracing::error!(error = %why, "reload failed; keeping the running configuration");
            Err(RpcError::invalid_params(format!(
                "reload failed, running configuration kept: {why}"
            )))
        }
    }
}
