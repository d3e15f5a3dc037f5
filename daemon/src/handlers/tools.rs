//! `tools.register`, `tools.list`, `tools.remove`.

use super::{ok, parse, Ctx, Reply};
use crate::tools::{RegisterError, ToolLimits};
use llmd_proto::chat::{ToolDef, ToolList, ToolName};
use llmd_proto::methods::Empty;
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;

/// Compiles and registers a tool (replacing one of the same name), within the
/// `max_tools` and `max_tool_bytes` limits.
pub fn register(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let size = params.map_or(0, |p| p.get().len());
    let v: serde_json::Value = parse(params)?;
    // `ToolDef` is lenient (it is also a result); params stay strict.
    llmd_proto::chat::check_tool_fields(&v).map_err(RpcError::invalid_params)?;
    let def: ToolDef = super::parse_value(v)?;
    let name = crate::logging::clean_name(&def.name, crate::tools::MAX_NAME_LEN);
    let cfg = &ctx.daemon.registry().config.daemon;
    let limits = ToolLimits {
        max_tools: cfg.max_tools,
        max_tool_bytes: cfg.max_tool_bytes,
    };
    match ctx.daemon.tools.register(def, size, limits) {
        Ok(()) => ok(&Empty {}),
        Err(RegisterError::Invalid(e)) => Err(RpcError::invalid_params(format!("tool `{name}`: {e}"))
            .with("max_tool_bytes", limits.max_tool_bytes as u64)),
        Err(RegisterError::Full(max)) => Err(RpcError::new(
            ErrorKind::Busy,
            format!("{max} tools are registered, the most llmd keeps (`max_tools`); remove some with tools.remove"),
        )
        .with("max_tools", max as u64)),
    }
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
