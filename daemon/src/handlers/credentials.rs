//! `credentials.set`: store an API key or setup-token (0600 under the state dir).

use super::{ok, parse, Ctx, Reply};
use crate::config::AuthKind;
use crate::credentials::{setup_token, store};
use crate::secret::Secret;
use llmd_proto::methods::{
    event_kinds, CredentialsRemoveResult, CredentialsSetParams, Empty, Event, ProfileParams,
    ProfileState,
};
use llmd_proto::RpcError;
use serde_json::value::RawValue;

/// Stores the secret and reloads that profile.
pub fn set(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: CredentialsSetParams = parse(params)?;
    let profile = ctx.daemon.profile(&p.profile)?;
    let auth = profile.config.auth;
    let (kind, secret) = match (p.api_key, p.setup_token) {
        (Some(k), None) => {
            if auth != AuthKind::ApiKey {
                let hint = match auth {
                    AuthKind::SetupToken => {
                        format!("store it with `llmctl set-key {} --setup-token`", p.profile)
                    }
                    _ => format!("log in with `llmctl login {}`", p.profile),
                };
                return Err(RpcError::invalid_params(format!(
                    "`api_key`: profile `{}` uses auth `{auth}`, not api-key; {hint}",
                    p.profile
                )));
            }
            let k = k.trim();
            if k.is_empty() || k.chars().any(char::is_whitespace) {
                return Err(RpcError::invalid_params(
                    "`api_key` is empty or contains whitespace",
                ));
            }
            (store::Kind::ApiKey, Secret::new(k))
        }
        (None, Some(t)) => {
            if auth != AuthKind::SetupToken {
                return Err(RpcError::invalid_params(format!(
                    "`setup_token`: profile `{}` uses auth `{auth}`, not setup-token{}",
                    p.profile,
                    if auth == AuthKind::ApiKey {
                        format!("; store a key with `llmctl set-key {}`", p.profile)
                    } else {
                        String::new()
                    }
                )));
            }
            let t = setup_token::validate(&t)
                .map_err(|e| RpcError::invalid_params(format!("`setup_token`: {e}")))?;
            (store::Kind::SetupToken, t)
        }
        _ => {
            return Err(RpcError::invalid_params(
                "give exactly one of `api_key` and `setup_token`",
            ))
        }
    };
    let state_dir = ctx.daemon.registry().state_dir.clone();
    let path = store::write(&state_dir, &p.profile, kind, &secret)
        .map_err(|e| RpcError::internal(e.to_string()))?;
    tracing::info!(profile = %p.profile, file = %path.display(), "credential stored");
    ctx.daemon.rebuild_profile(&p.profile);
    announce(ctx, &p.profile);
    ok(&Empty {})
}

/// Removes what llmd stored for a profile: its stored key or setup-token and, for an
/// OAuth profile, the bundle llmd keeps. Claude Code's own login file is never touched.
pub async fn remove(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: ProfileParams = parse(params)?;
    let profile = ctx.daemon.profile(&p.profile)?;
    let state_dir = ctx.daemon.registry().state_dir.clone();
    let mut paths = vec![
        store::path(&state_dir, &p.profile, store::Kind::ApiKey),
        store::path(&state_dir, &p.profile, store::Kind::SetupToken),
    ];
    if profile.config.auth == AuthKind::Oauth {
        if let Some(src) = profile.login_source(&state_dir) {
            paths.push(src.path().to_path_buf());
        }
    }
    let mut removed = Vec::new();
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RpcError::internal(format!(
                    "cannot remove {}: {e}",
                    path.display()
                )))
            }
        }
    }
    tracing::info!(profile = %p.profile, files = removed.len(), "stored credentials removed");
    ctx.daemon.rebuild_profile(&p.profile);
    let rebuilt = ctx.daemon.profile(&p.profile)?;
    if let Some(login) = rebuilt.login() {
        // The login task re-reads its (now absent) file and drops the tokens it held; wait
        // (bounded) until it has, so a `token` right after the answer is not served the
        // removed login from memory.
        login.source_changed();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while login.snapshot().state == ProfileState::Ok && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    announce(ctx, &p.profile);
    ok(&CredentialsRemoveResult { removed })
}

/// Tells subscribers the profile's state after its credential changed.
fn announce(ctx: &Ctx, name: &str) {
    if let Ok(profile) = ctx.daemon.profile(name) {
        let st = profile.status();
        let _ = ctx.daemon.events.send(Event {
            kind: event_kinds::PROFILE_STATE.into(),
            profile: name.to_owned(),
            expires_at: st.expires_at,
            state: Some(st.state),
            error: st.last_error,
            skipped: None,
            quota: None,
        });
    }
}
