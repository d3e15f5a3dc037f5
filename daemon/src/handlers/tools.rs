//! `tools.register`, `tools.list`, `tools.remove`.

use super::{ok, parse, Ctx, Reply};
use llmd_proto::chat::{ToolDef, ToolList, ToolName};
use llmd_proto::methods::Empty;
use llmd_proto::RpcError;
use serde_json::value::RawValue;

/// Compiles and registers a tool (replacing one of the same name).
pub fn register(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let def: ToolDef = parse(params)?;
    let name = def.name.clone();
    ctx.daemon
        .tools
        .register(def)
        .map_err(|e| RpcError::invalid_params(format!("tool `{name}`: {e}")))?;
    ok(&Empty {})
}

/// Lists registered tools.
pub fn list(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let _: Empty = parse(params)?;
    ok(&ToolList {
        tools: ctx.daemon.tools.list(),
    })
}

/// Removes a tool.
pub fn remove(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: ToolName = parse(params)?;
    if !ctx.daemon.tools.remove(&p.name) {
        return Err(RpcError::invalid_params(format!(
            "`name`: no tool `{}` is registered",
            p.name
        )));
    }
    ok(&Empty {})
}
