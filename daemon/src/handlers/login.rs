//! `login.start` / `login.finish`: Anthropic OAuth authorization code with PKCE, run by the
//! daemon so the verifier never leaves it.

use super::{ok, parse, Ctx, Reply};
use crate::config::{AuthKind, Provider};
use crate::oauth::anthropic::AnthropicOAuth;
use llmd_proto::methods::{LoginFinishParams, LoginFinishResult, LoginStartResult, ProfileParams};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;

fn oauth_of(
    ctx: &Ctx,
    name: &str,
) -> Result<(std::sync::Arc<crate::profile::Profile>, AnthropicOAuth), RpcError> {
    let profile = ctx.daemon.profile(name)?;
    let c = &profile.config;
    if c.provider != Provider::Anthropic || !matches!(c.auth, AuthKind::Oauth | AuthKind::ClaudeCli)
    {
        return Err(RpcError::invalid_params(format!(
            "`profile`: `{name}` is `{}`/`{}`; login works for anthropic oauth and claude-cli profiles",
            c.provider, c.auth
        )));
    }
    let oauth = AnthropicOAuth::from_profile(c);
    Ok((profile, oauth))
}

/// Makes a PKCE verifier and state and returns the URL to open.
pub fn start(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: ProfileParams = parse(params)?;
    let (_, oauth) = oauth_of(ctx, &p.profile)?;
    let pending = oauth.start_login().map_err(RpcError::internal)?;
    let url = pending.url.clone();
    if let Ok(mut logins) = ctx.daemon.pending_logins.lock() {
        logins.insert(p.profile.clone(), pending);
    }
    ok(&LoginStartResult { url })
}

/// Exchanges the pasted code, stores the tokens and hands them to the login task.
pub async fn finish(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: LoginFinishParams = parse(params)?;
    let (profile, oauth) = oauth_of(ctx, &p.profile)?;
    let pending = ctx
        .daemon
        .pending_logins
        .lock()
        .ok()
        .and_then(|l| l.get(&p.profile).cloned());
    let Some(pending) = pending else {
        return Err(RpcError::invalid_params(format!(
            "no login in progress for `{}`: run `llmctl login {}` again",
            p.profile, p.profile
        )));
    };
    let tokens = oauth
        .finish_login(&ctx.daemon.http, &pending, &p.code)
        .await
        .map_err(|e| RpcError::new(ErrorKind::Upstream, e))?;
    // The login task writes the tokens (under Claude Code's locks for a shared login) so
    // nothing else writes that file at the same time.
    let login = profile
        .login()
        .ok_or_else(|| RpcError::internal("profile has no login task"))?;
    login
        .install(tokens.clone())
        .await
        .map_err(|e| RpcError::internal(format!("cannot store the new login: {e}")))?;
    if let Ok(mut l) = ctx.daemon.pending_logins.lock() {
        l.remove(&p.profile);
    }
    tracing::info!(profile = %p.profile, "login completed");
    ok(&LoginFinishResult {
        expires_at: tokens.expires_at,
    })
}
