//! `chat` and `embed`: completions (streamed or whole) and embeddings through the
//! profile's provider.

use super::{ok, parse, Ctx, Reply};
use crate::chat;
use crate::providers::DeltaSink;
use crate::server::connection::Conn;
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
    let profile = ctx.daemon.profile(&p.profile)?;
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
    let started = Instant::now();
    let result = chat::execute(
        &ctx.daemon,
        &profile,
        &p.request,
        sink.as_ref().map(|s| s as &dyn DeltaSink),
    )
    .await;
    let asked = p
        .request
        .model
        .as_deref()
        .or(profile.config.default_model.as_deref());
    record(ctx, &p.profile, names::CHAT, started, asked, &result);
    ok(&result?)
}

/// Queues the ledger row of a `chat` or `embed` call.
fn record<T: Answered>(
    ctx: &Ctx,
    profile: &str,
    method: &'static str,
    started: Instant,
    asked: Option<&str>,
    result: &Result<T, RpcError>,
) {
    let agent = lock(&ctx.conn.client).clone();
    let (usage, model, kind) = match result {
        Ok(r) => (r.usage(), r.model().or(asked), None),
        Err(e) => (Usage::default(), asked, Some(e.kind())),
    };
    ctx.daemon.usage.record(&usage::Request {
        profile,
        member: None,
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
}

impl Answered for ChatResponse {
    fn usage(&self) -> Usage {
        self.usage
    }
    fn model(&self) -> Option<&str> {
        Some(&self.model)
    }
}

impl Answered for EmbedResult {
    fn usage(&self) -> Usage {
        self.usage
    }
    fn model(&self) -> Option<&str> {
        None
    }
}

/// Embeds texts with the profile's provider.
pub async fn embed(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: EmbedParams = parse(params)?;
    if p.input.is_empty() {
        return Err(RpcError::invalid_params("`input` is empty"));
    }
    let profile = ctx.daemon.profile(&p.profile)?;
    if profile.config.provider == crate::config::Provider::Anthropic {
        // Known before any request: the caller picked the wrong profile, not a provider failure.
        return Err(RpcError::invalid_params(format!(
            "`profile`: `{}` is an Anthropic profile and Anthropic has no embeddings API; \
             use an openai-compat, gemini or minimax profile",
            p.profile
        )));
    }
    let started = Instant::now();
    let result = embed_on(ctx, &profile, &p).await;
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

async fn embed_on(
    ctx: &Ctx,
    profile: &crate::profile::Profile,
    p: &EmbedParams,
) -> Result<EmbedResult, RpcError> {
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
    .map_err(|e| chat::to_rpc(e, &secrets))?;
    Ok(result)
}
