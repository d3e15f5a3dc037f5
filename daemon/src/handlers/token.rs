//! `token` and `refresh`: a valid token with the provider's auth headers.

use super::{ok, parse, parse_borrowed, Ctx, Reply};
use crate::refresh::Force;
use crate::server::connection::Conn;
use crate::state::{Daemon, Target, TargetRef};
use crate::sync::lock;
use llmd_proto::methods::{ProfileParams, TokenParams};
use llmd_proto::RpcError;
use serde_json::value::RawValue;

/// [`TokenParams`] borrowed from the request line: the fast path allocates no name.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenParamsRef<'a> {
    #[serde(borrow)]
    profile: std::borrow::Cow<'a, str>,
    #[serde(default)]
    min_valid_secs: Option<u64>,
}

/// Answers `token` at once when it needs no waiting (see
/// [`crate::profile::Profile::ready_answer`]); bad params and unknown profiles too. The
/// shared answer is written out under the registry's and the profile's read guards: no
/// reference count shared by every connection is touched.
pub fn ready(
    daemon: &Daemon,
    conn: &Conn,
    params: Option<&RawValue>,
    answer: &mut dyn FnMut(Result<&str, &RpcError>),
) -> bool {
    let p: TokenParamsRef<'_> = match parse_borrowed(params) {
        Ok(p) => p,
        Err(e) => {
            answer(Err(&e));
            return true;
        }
    };
    let registry = daemon.current();
    let profile = match registry.target(&p.profile) {
        Ok(TargetRef::Profile(profile)) => profile,
        // A pool picks a member per call: the slow path.
        Ok(TargetRef::Pool(_)) => return false,
        Err(e) => {
            answer(Err(&e));
            return true;
        }
    };
    let served = profile.ready_answer(p.min_valid_secs.unwrap_or(0), |r| {
        let ok = r.is_ok();
        answer(r);
        ok
    });
    match served {
        None => false,
        Some(ok) => {
            if ok {
                count(daemon, conn, &p.profile);
            }
            true
        }
    }
}

/// Counts a served `token` call for the ledger (a counter, not a row).
fn count(daemon: &Daemon, conn: &Conn, profile: &str) {
    if daemon.usage.counting() {
        let agent = lock(&conn.client);
        daemon.usage.count_token(profile, agent.as_deref());
    }
}

/// A token valid for `min_valid_secs` (default 0), refreshing first only when needed.
pub async fn token(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: TokenParams = parse(params)?;
    let min_valid = p.min_valid_secs.unwrap_or(0);
    let pool = match ctx.daemon.target(&p.profile)? {
        Target::Profile(profile) => {
            let answer = profile.token_answer(min_valid, Force::No).await?;
            count(&ctx.daemon, &ctx.conn, &p.profile);
            return Ok(answer);
        }
        Target::Pool(pool) => pool,
    };
    let agent = lock(&ctx.conn.agent).clone();
    let mut last = None;
    let plan = pool.plan(agent.as_deref());
    for i in plan.iter().copied().chain(pool.fallback()) {
        let member = &pool.members[i];
        match member.token(min_valid, Force::No).await {
            Ok(mut t) => {
                pool.served(i, agent.as_deref());
                t.profile = pool.name.clone();
                t.member = Some(member.name.clone());
                count(&ctx.daemon, &ctx.conn, &p.profile);
                return ok(&t);
            }
            Err(e) if !crate::pool::moves_on(&e) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    match (last, pool.members.first()) {
        (Some(e), _) => Err(e),
        // Nobody is available: the first member's own error says why.
        (None, Some(first)) => first.token_answer(min_valid, Force::No).await,
        (None, None) => Err(llmd_proto::RpcError::internal("empty pool")),
    }
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
