//! `credentials.set`: store an API key or setup-token (0600 under the state dir).

use super::{ok, parse, Ctx, Reply};
use crate::config::AuthKind;
use crate::credentials::{setup_token, store};
use crate::secret::Secret;
use llmd_proto::methods::{CredentialsSetParams, Empty};
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
                return Err(RpcError::invalid_params(format!(
                    "`api_key`: profile `{}` uses auth `{auth}`, not api-key",
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
                    "`setup_token`: profile `{}` uses auth `{auth}`, not setup-token",
                    p.profile
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
    let path = store::write(&state_dir, &p.profile, kind, &secret).map_err(RpcError::internal)?;
    tracing::info!(profile = %p.profile, file = %path.display(), "credential stored");
    ctx.daemon.rebuild_profile(&p.profile);
    ok(&Empty {})
}
