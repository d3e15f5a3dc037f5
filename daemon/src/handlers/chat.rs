//! `chat` and `embed`: completions (streamed or whole) and embeddings through the
//! profile's provider.

use super::{ok, parse, Ctx, Reply};
use crate::chat;
use crate::chat::Mode;
use crate::pool::{self, Pool};
use crate::profile::Profile;
use crate::providers::DeltaSink;
use crate::server::connection::Conn;
use crate::state::Target;
use crate::sync::lock;
use crate::usage::{self, Outcome};
use llmd_proto::chat::{
    ChatDelta, ChatParams, ChatResponse, Delta, EmbedParams, EmbedResult, Usage,
};
use llmd_proto::methods::names;
use llmd_proto::{encode_line, Id, Notification, RpcError};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Instant;

/// Streams deltas to the connection as `chat.delta` notifications.
struct ConnSink {
    conn: Arc<Conn>,
    id: Id,
}

impl DeltaSink for ConnSink {
    fn send(&self, delta: Delta) -> bool {
        let note = ChatDelta {
            id: self.id.clone(),
            delta,
        };
        !self.conn.gone.is_cancelled()
            && self
                .conn
                .send(encode_line(&Notification::new(names::CHAT_DELTA, &note)))
    }

    fn ready(&self) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(self.conn.wait_for_room())
    }
}

/// Runs a chat request; with `stream: true`, deltas go out first.
pub async fn chat(ctx: &Ctx, id: Option<&Id>, params: Option<&RawValue>) -> Reply {
    let v: serde_json::Value = parse(params)?;
    if let Some(req) = v.get("request") {
        llmd_proto::chat::check_request_blocks(req)
            .map_err(|e| RpcError::invalid_params(format!("`request.{}", &e[1..])))?;
    }
    let p: ChatParams = super::parse_value(v)?;
    let target = ctx.daemon.target(&p.profile)?;
    let sink = match (p.stream, id) {
        (true, Some(id)) => Some(ConnSink {
            conn: ctx.conn.clone(),
            id: id.clone(),
        }),
        (true, None) => {
            return Err(RpcError::invalid_params(
                "`stream` needs a request `id` to tag the deltas with",
            ))
        }
        (false, _) => None,
    };
    let default_model = match &target {
        Target::Profile(profile) => profile.config.default_model.clone(),
        Target::Pool(_) => None,
    };
    let started = Instant::now();
    let result = chat_on(ctx, target, &p, sink.as_ref().map(|s| s as &dyn DeltaSink)).await;
    let asked = p.request.model.as_deref().or(default_model.as_deref());
    record(ctx, &p.profile, names::CHAT, started, asked, &result);
    ok(&result?)
}

/// The chat on a profile, or on the member of a pool that answers.
async fn chat_on(
    ctx: &Ctx,
    target: Target,
    p: &ChatParams,
    sink: Option<&dyn DeltaSink>,
) -> Result<ChatResponse, RpcError> {
    let pool = match target {
        Target::Profile(profile) => {
            return chat::execute(&ctx.daemon, &profile, &p.request, sink).await
        }
        Target::Pool(pool) => pool,
    };
    let agent = agent_of(ctx);
    let tracked = sink.map(chat::TrackedSink::new);
    let sink = tracked.as_ref().map(|t| t as &dyn DeltaSink);
    let mut last = None;
    for i in pool.plan(agent.as_deref()) {
        let member = &pool.members[i];
        match chat::execute_as(&ctx.daemon, member, &p.request, sink, Mode::PoolMember).await {
            Ok(resp) => return Ok(answered(&pool, i, agent.as_deref(), resp)),
            // Once a delta went out the answer is this member's, whatever happens.
            Err(e) if tracked.as_ref().is_some_and(|t| t.started()) || !pool::moves_on(&e) => {
                return Err(e)
            }
            Err(e) => {
                tracing::info!(pool = %pool.name, member = %member.name, error = %e.message, "pool member failed; trying the next");
                last = Some(e);
            }
        }
    }
    let fallback = pool.fallback().or(last.is_none().then_some(0));
    let Some((i, member)) = fallback.and_then(|i| Some((i, pool.members.get(i)?))) else {
        return Err(last.unwrap_or_else(|| RpcError::internal("empty pool")));
    };
    let resp = chat::execute_as(&ctx.daemon, member, &p.request, sink, Mode::Alone).await?;
    Ok(answered(&pool, i, agent.as_deref(), resp))
}

/// Queues the ledger row of a `chat` or `embed` call (with the pool member that answered).
fn record<T: Answered>(
    ctx: &Ctx,
    profile: &str,
    method: &'static str,
    started: Instant,
    asked: Option<&str>,
    result: &Result<T, RpcError>,
) {
    let agent = lock(&ctx.conn.client).clone();
    let (usage, model, member, kind) = match result {
        Ok(r) => (r.usage(), r.model().or(asked), r.member(), None),
        Err(e) => (Usage::default(), asked, None, Some(e.kind())),
    };
    ctx.daemon.usage.record(&usage::Request {
        profile,
        member,
        agent: agent.as_deref(),
        method,
        model,
        usage,
        outcome: kind.map_or(Outcome::Ok, |k| Outcome::Failed(k.as_str())),
        latency: started.elapsed(),
    });
}

/// What the ledger reads from an answer.
trait Answered {
    fn usage(&self) -> Usage;
    fn model(&self) -> Option<&str>;
    fn member(&self) -> Option<&str>;
}

impl Answered for ChatResponse {
    fn usage(&self) -> Usage {
        self.usage
    }
    fn model(&self) -> Option<&str> {
        Some(&self.model)
    }
    fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }
}

impl Answered for EmbedResult {
    fn usage(&self) -> Usage {
        self.usage
    }
    fn model(&self) -> Option<&str> {
        None
    }
    fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }
}

/// The agent a pool keeps sticky: the connection's `hello` name.
fn agent_of(ctx: &Ctx) -> Option<Arc<str>> {
    crate::sync::lock(&ctx.conn.agent).clone()
}

fn answered(pool: &Pool, i: usize, agent: Option<&str>, mut resp: ChatResponse) -> ChatResponse {
    pool.served(i, agent);
    resp.member = Some(pool.members[i].name.clone());
    resp
}

/// Embeds texts with the profile's provider.
pub async fn embed(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: EmbedParams = parse(params)?;
    if p.input.is_empty() {
        return Err(RpcError::invalid_params("`input` is empty"));
    }
    let target = ctx.daemon.target(&p.profile)?;
    let started = Instant::now();
    let result = embed_on(ctx, target, &p).await;
    record(
        ctx,
        &p.profile,
        names::EMBED,
        started,
        p.model.as_deref(),
        &result,
    );
    ok(&result?)
}

/// The embedding on a profile, or on the member of a pool that answers.
async fn embed_on(ctx: &Ctx, target: Target, p: &EmbedParams) -> Result<EmbedResult, RpcError> {
    let pool = match target {
        Target::Profile(profile) => return embed_one(ctx, &profile, p).await,
        Target::Pool(pool) => pool,
    };
    let agent = agent_of(ctx);
    let mut last = None;
    let plan = pool.plan(agent.as_deref());
    let tries = plan.iter().copied().chain(pool.fallback());
    for i in tries {
        let member = &pool.members[i];
        match embed_one(ctx, member, p).await {
            Ok(mut r) => {
                pool.served(i, agent.as_deref());
                r.member = Some(member.name.clone());
                return Ok(r);
            }
            Err(e) if !pool::moves_on(&e) => return Err(e),
            Err(e) => {
                if e.kind() == llmd_proto::ErrorKind::RateLimited {
                    member.limiter.pause(std::time::Duration::from_secs(30));
                }
                last = Some(e);
            }
        }
    }
    match (last, pool.members.first()) {
        (Some(e), _) => Err(e),
        (None, Some(first)) => embed_one(ctx, first, p).await,
        (None, None) => Err(RpcError::internal("empty pool")),
    }
}

async fn embed_one(ctx: &Ctx, profile: &Profile, p: &EmbedParams) -> Result<EmbedResult, RpcError> {
    if profile.config.provider == crate::config::Provider::Anthropic {
        // Known before any request: the caller picked the wrong profile, not a provider failure.
        return Err(RpcError::invalid_params(format!(
            "`profile`: `{}` is an Anthropic profile and Anthropic has no embeddings API; \
             use an openai-compat, gemini or minimax profile",
            p.profile
        )));
    }
    let token = profile.token(60, crate::refresh::Force::No).await?;
    let timeouts = crate::providers::Timeouts::from(&profile.config.timeouts);
    let secrets = chat::known_secrets(&token);
    let http = ctx
        .daemon
        .provider_http
        .get(timeouts.connect)
        .map_err(|e| chat::to_rpc(e, &secrets))?;
    let result = crate::providers::embed(
        profile.config.provider,
        &http,
        profile.base_url(),
        &token.headers,
        p.model.as_deref(),
        &p.input,
        timeouts,
    )
    .await
    .map_err(|e| {
        chat::observe_error(profile, &e);
        chat::to_rpc(e, &secrets)
    })?;
    Ok(result)
}
