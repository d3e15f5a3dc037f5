//! `token` and `refresh`: a valid token with the provider's auth headers.

use super::{ok, parse, Ctx, Reply};
use crate::profile::Answer;
use crate::refresh::Force;
use crate::server::connection::Conn;
use crate::server::{Ready, SharedJson};
use crate::state::Daemon;
use crate::state::Target;
use crate::sync::lock;
use llmd_proto::methods::{ProfileParams, TokenParams};
use serde_json::value::RawValue;
use std::sync::Arc;

impl SharedJson for Answer {
    fn json(&self) -> &str {
        &self.json
    }
}

/// The `token` answer when it needs no waiting (see [`crate::profile::Profile::ready_answer`]);
/// bad params and unknown profiles are answered at once too.
pub fn ready(daemon: &Daemon, conn: &Conn, params: Option<&RawValue>) -> Option<Ready> {
    let p: TokenParams = match parse(params) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let profile = match daemon.target(&p.profile) {
        Ok(Target::Profile(p)) => p,
        // A pool picks a member per call: the slow path.
        Ok(Target::Pool(_)) => return None,
        Err(e) => return Some(Err(e)),
    };
    let answer = profile.ready_answer(p.min_valid_secs.unwrap_or(0))?;
    if answer.is_ok() {
        count(daemon, conn, &p.profile);
    }
    Some(answer.map(|a| a as Arc<dyn SharedJson>))
}

/// Counts a served `token` call for the ledger (a counter, not a row).
fn count(daemon: &Daemon, conn: &Conn, profile: &str) {
    let agent = lock(&conn.client);
    daemon.usage.count_token(profile, agent.as_deref());
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
