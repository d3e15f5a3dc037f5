//! `token` and `refresh`: a valid token with the provider's auth headers.

use super::{parse, Ctx, Reply};
use crate::refresh::Force;
use llmd_proto::methods::{ProfileParams, TokenParams};
use serde_json::value::RawValue;

/// A token valid for `min_valid_secs` (default 0), refreshing first only when needed.
pub async fn token(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: TokenParams = parse(params)?;
    let profile = ctx.daemon.profile(&p.profile)?;
    profile
        .token_answer(p.min_valid_secs.unwrap_or(0), Force::No)
        .await
}

/// Forces a refresh (joining one already running) and returns the new token.
pub async fn refresh(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: ProfileParams = parse(params)?;
    let profile = ctx.daemon.profile(&p.profile)?;
    if profile.config.auth == crate::config::AuthKind::Upstream {
        return Err(llmd_proto::RpcError::invalid_params(format!(
            "`profile`: `{}` follows another llmd (`auth = \"upstream\"`); only the upstream refreshes it",
            p.profile
        )));
    }
    if profile.login().is_none() {
        // Answering with the unchanged key would read as "refreshed".
        return Err(llmd_proto::RpcError::invalid_params(format!(
            "`profile`: `{}` uses {} `{}`, which does not expire: there is nothing to refresh",
            p.profile,
            if profile.config.auth == crate::config::AuthKind::SetupToken {
                "a setup-token"
            } else {
                "an API key"
            },
            profile.config.auth
        )));
    }
    profile.token_answer(0, Force::Always).await
}
