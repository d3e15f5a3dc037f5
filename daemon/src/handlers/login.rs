//! `login.start` / `login.finish`, run by the daemon so the PKCE verifier never leaves it:
//! Anthropic's authorization code (the user pastes `code#state`), or MiniMax's user code
//! (the user approves a code on MiniMax's page and `login.finish` polls until then).

use super::{ok, parse, Ctx, Reply};
use crate::config::{AuthKind, Provider};
use crate::credentials::Tokens;
use crate::oauth::anthropic::AnthropicOAuth;
use crate::oauth::minimax_login::{MinimaxLogin, PendingUserCode};
use llmd_proto::methods::{LoginFinishParams, LoginFinishResult, LoginStartResult, ProfileParams};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Which login flow a profile uses.
enum Flow {
    Anthropic(AnthropicOAuth),
    Minimax(MinimaxLogin),
}

/// MiniMax user codes waiting for approval, by profile. One daemon per process, so a
/// process-wide table is the daemon's table.
fn pending_codes() -> &'static Mutex<HashMap<String, PendingUserCode>> {
    static PENDING: OnceLock<Mutex<HashMap<String, PendingUserCode>>> = OnceLock::new();
    PENDING.get_or_init(|| Mutex::new(HashMap::new()))
}

fn flow_of(ctx: &Ctx, name: &str) -> Result<(Arc<crate::profile::Profile>, Flow), RpcError> {
    let profile = ctx.daemon.profile(name)?;
    let c = &profile.config;
    let flow = match (c.provider, c.auth) {
        (Provider::Anthropic, AuthKind::Oauth | AuthKind::ClaudeCli) => {
            Flow::Anthropic(AnthropicOAuth::from_profile(c))
        }
        (Provider::Minimax, AuthKind::Oauth) => Flow::Minimax(MinimaxLogin::from_profile(c)),
        (_, AuthKind::ApiKey) => {
            return Err(RpcError::invalid_params(format!(
                "`profile`: `{name}` uses an API key, not a login: store one with `llmctl set-key {name}` \
                 or set {} in llmd's environment",
                c.api_key_env
                    .as_deref()
                    .unwrap_or_else(|| c.provider.default_key_env())
            )))
        }
        (_, AuthKind::SetupToken) => {
            return Err(RpcError::invalid_params(format!(
                "`profile`: `{name}` uses a setup-token, not a login: run `claude setup-token` and \
                 store its output with `llmctl set-key {name} --setup-token`"
            )))
        }
        _ => {
            return Err(RpcError::invalid_params(format!(
                "`profile`: `{name}` is `{}`/`{}`; login works for oauth and claude-cli profiles",
                c.provider, c.auth
            )))
        }
    };
    Ok((profile, flow))
}

/// Starts a login and returns the URL to open (and, for MiniMax, the code to approve).
pub async fn start(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: ProfileParams = parse(params)?;
    let (_, flow) = flow_of(ctx, &p.profile)?;
    match flow {
        Flow::Anthropic(oauth) => {
            let pending = oauth.start_login().map_err(RpcError::internal)?;
            let url = pending.url.clone();
            if let Ok(mut logins) = ctx.daemon.pending_logins.lock() {
                logins.insert(p.profile.clone(), pending);
            }
            ok(&LoginStartResult {
                url,
                user_code: None,
                expires_at: None,
            })
        }
        Flow::Minimax(login) => {
            let pending = login.start(&ctx.daemon.http).await?;
            let answer = LoginStartResult {
                url: pending.verification_uri.clone(),
                user_code: Some(pending.user_code.clone()),
                expires_at: Some(pending.expires_at),
            };
            if let Ok(mut codes) = pending_codes().lock() {
                codes.insert(p.profile.clone(), pending);
            }
            tracing::info!(profile = %p.profile, "MiniMax login started; waiting for approval");
            ok(&answer)
        }
    }
}

/// Exchanges the pasted code (Anthropic) or waits for approval (MiniMax), then hands the
/// tokens to the profile's login task, which owns the bundle and its refreshes.
pub async fn finish(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: LoginFinishParams = parse(params)?;
    let (profile, flow) = flow_of(ctx, &p.profile)?;
    let again = || {
        RpcError::invalid_params(format!(
            "no login in progress for `{}`: run `llmctl login {}` again",
            p.profile, p.profile
        ))
    };
    let tokens: Tokens = match flow {
        Flow::Anthropic(oauth) => {
            let pending = ctx
                .daemon
                .pending_logins
                .lock()
                .ok()
                .and_then(|l| l.get(&p.profile).cloned())
                .ok_or_else(again)?;
            let pasted = p.code.trim();
            // What the user pasted is checked here: a mistake on this side is not the
            // provider's failure.
            let (code, state) = pasted
                .split_once('#')
                .unwrap_or((pasted, pending.state.as_str()));
            if code.trim().is_empty() {
                return Err(RpcError::invalid_params(
                    "`code` is empty: paste the code the login page shows",
                ));
            }
            if state.trim() != pending.state {
                return Err(RpcError::invalid_params(
                    "`code` belongs to another login attempt (state mismatch): run the login again and paste the newest code",
                ));
            }
            oauth
                .finish_login(&ctx.daemon.http, &pending, pasted)
                .await
                .map_err(|e| RpcError::new(ErrorKind::Upstream, e))?
        }
        Flow::Minimax(login) => {
            let pending = pending_codes()
                .lock()
                .ok()
                .and_then(|c| c.get(&p.profile).cloned())
                .ok_or_else(again)?;
            if !p.code.trim().is_empty() && p.code.trim() != pending.user_code {
                return Err(RpcError::invalid_params(
                    "`code` is not the user code of the login in progress: run the login again",
                ));
            }
            let result = login.poll(&ctx.daemon.http, &pending).await;
            if let Ok(mut c) = pending_codes().lock() {
                c.remove(&p.profile);
            }
            result?
        }
    };
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
