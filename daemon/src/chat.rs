//! Running one chat request for a profile: tools resolved, the profile's shared limits
//! respected, auth from the credential store, and the retry rules of DESIGN.md
//! ("Rate limits and retries") applied around the provider call.

use crate::config::AuthKind;
use crate::profile::Profile;
use crate::providers::{self, Call, DeltaSink, ProviderError};
use crate::refresh::Force;
use crate::secret::Secret;
use crate::state::Daemon;
use crate::tools::Tool;
use llmd_proto::chat::{Block, ChatRequest, ChatResponse, Content, ToolDef};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Retries of 429 and 529/overloaded answers.
const MAX_OVERLOAD_RETRIES: u32 = 4;
/// Retries of other 5xx answers and network failures.
const MAX_SERVER_RETRIES: u32 = 3;
/// Anthropic accepts at most this many cache breakpoints.
const MAX_CACHE_BREAKPOINTS: usize = 4;
/// A token handed to a provider call must outlive a slow request.
const MIN_TOKEN_VALIDITY_SECS: u64 = 60;

/// Forwards deltas and remembers whether any reached the client, after which nothing may
/// be retried.
pub struct TrackedSink<'a> {
    inner: &'a dyn DeltaSink,
    started: AtomicBool,
}

impl<'a> TrackedSink<'a> {
    /// Wraps a sink.
    pub fn new(inner: &'a dyn DeltaSink) -> Self {
        TrackedSink {
            inner,
            started: AtomicBool::new(false),
        }
    }

    /// True once a delta was forwarded: from then on the request is committed.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }
}

impl DeltaSink for TrackedSink<'_> {
    fn send(&self, delta: llmd_proto::chat::Delta) -> bool {
        self.started.store(true, Ordering::Relaxed);
        self.inner.send(delta)
    }

    fn ready(&self) -> futures_util::future::BoxFuture<'_, bool> {
        self.inner.ready()
    }
}

/// How a 429 is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The profile serves alone: a 429 pauses it and the request waits and retries.
    Alone,
    /// A pool member with others to move to: a 429 pauses it and fails at once, so the
    /// pool can try the next member.
    PoolMember,
}

/// How long a pool member is paused after a 429 that names no `retry-after`.
const POOL_MEMBER_PAUSE: Duration = Duration::from_secs(30);

/// Runs `req` on `profile`, streaming deltas to `sink` when given.
pub async fn execute(
    daemon: &Daemon,
    profile: &Profile,
    req: &ChatRequest,
    sink: Option<&dyn DeltaSink>,
) -> Result<ChatResponse, RpcError> {
    execute_as(daemon, profile, req, sink, Mode::Alone).await
}

/// [`execute`], with the 429 rule of `mode`.
pub async fn execute_as(
    daemon: &Daemon,
    profile: &Profile,
    req: &ChatRequest,
    sink: Option<&dyn DeltaSink>,
    mode: Mode,
) -> Result<ChatResponse, RpcError> {
    let tools = daemon
        .tools
        .resolve(&req.tools)
        .map_err(|e| RpcError::invalid_params(format!("`request.tools`: {e}")))?;
    check_request(req)?;
    let model = req
        .model
        .clone()
        .or_else(|| profile.config.default_model.clone())
        .ok_or_else(|| {
            RpcError::invalid_params(format!(
                "`request.model` is missing and profile `{}` has no `default_model`: \
                 name one (`llmctl chat {} -m MODEL`, or `model` in the request) or set \
                 `default_model` under [profiles.{}] in the config",
                profile.name, profile.name, profile.name
            ))
        })?;
    let defs: Vec<ToolDef> = tools.iter().map(|t| t.def.clone()).collect();
    let estimate = estimate_tokens(req);
    let tracked = sink.map(TrackedSink::new);
    let observe = |h: &reqwest::header::HeaderMap| {
        profile.limiter.observe(h);
        profile.quota.observe(h);
    };
    let mut retries = Retries::default();
    let timeouts = providers::Timeouts::from(&profile.config.timeouts);
    let http = daemon
        .provider_http
        .get(timeouts.connect)
        .map_err(|e| to_rpc(e, &[]))?;
    loop {
        let permit = profile.limiter.acquire(estimate).await;
        let token = profile.token(MIN_TOKEN_VALIDITY_SECS, Force::No).await?;
        let call = Call {
            http: &http,
            base_url: profile.base_url(),
            model: &model,
            headers: &token.headers,
            request: req,
            tools: &defs,
            stream: tracked.as_ref().map(|t| t as &dyn DeltaSink),
            observe: Some(&observe),
            timeouts,
        };
        let secrets = known_secrets(&token);
        let err = match providers::chat(profile.config.provider, &call).await {
            Ok(mut resp) => {
                let u = resp.usage;
                permit.settle(
                    u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens,
                );
                validate_tool_calls(&mut resp, &tools);
                return Ok(resp);
            }
            Err(e) => e,
        };
        // The slot is free again at once, whatever happens next (a retry waits its turn).
        drop(permit);
        log_failure(&profile.name, &err, &secrets);
        observe_error(profile, &err);
        if tracked.as_ref().is_some_and(|t| t.started()) {
            return Err(to_rpc(err, &secrets));
        }
        let status = match &err {
            ProviderError::Http { status, .. } => *status,
            _ => 0,
        };
        if status == 429 && mode == Mode::PoolMember {
            profile
                .limiter
                .pause(err.retry_after().unwrap_or(POOL_MEMBER_PAUSE));
            return Err(to_rpc(err, &secrets));
        }
        let failure = Failure {
            status,
            overload_event: matches!(&err, ProviderError::Stream { kind, .. } if is_overload_kind(kind)),
            // A stalled provider (first byte, idle, total) is not retried: that would hold
            // the caller several timeouts long. A refused or cut connection is worth another try.
            network: is_retryable_network(&err),
            retry_after: err.retry_after(),
        };
        match retries.next(profile, &failure) {
            Some(step) => step.run(profile, &token.token).await?,
            None => return Err(to_rpc(err, &secrets)),
        }
    }
}

/// Feeds a provider's error body to the quota tracker (Gemini names exhausted quotas there).
pub fn observe_error(profile: &Profile, err: &ProviderError) {
    if let ProviderError::Http {
        status: 429, body, ..
    } = err
    {
        if profile.config.provider == crate::config::Provider::Gemini {
            profile.quota.observe_gemini_error(body);
        }
    }
}

/// A failure before any answer that is worth another attempt: a refused or cut connection,
/// a connect timeout; not a provider that stalled after accepting the request.
pub fn is_retryable_network(err: &ProviderError) -> bool {
    matches!(
        err,
        ProviderError::Network { .. }
            | ProviderError::EndedEarly(_)
            | ProviderError::Timeout {
                stage: providers::Stage::Connect,
                ..
            }
    )
}

/// One failed attempt, as the retry rules see it.
#[derive(Debug, Clone, Default)]
pub struct Failure {
    /// HTTP status; 0 when there was none.
    pub status: u16,
    /// A stream error event that means "busy" (see [`is_overload_kind`]).
    pub overload_event: bool,
    /// Connection failure or timeout before an answer.
    pub network: bool,
    /// The answer's `retry-after`.
    pub retry_after: Option<Duration>,
}

/// The retry budget of one request (DESIGN.md, "Rate limits and retries"), shared by
/// `chat` and the HTTP gateway so both follow the same rules.
#[derive(Debug, Default)]
pub struct Retries {
    overloads: u32,
    server_errors: u32,
    refreshed: bool,
}

/// What to do before the next attempt.
#[derive(Debug)]
pub enum Step {
    /// Force a refresh of the token that got the 401.
    Refresh,
    /// A 429: pause the whole profile this long.
    Pause(Duration),
    /// Wait this long (this request only).
    Sleep(Duration),
}

impl Retries {
    /// The next step after `f`, or `None` when the failure is final.
    pub fn next(&mut self, profile: &Profile, f: &Failure) -> Option<Step> {
        let overloaded = f.status == 429 || f.status == 529 || f.overload_event;
        if f.status == 401
            && !self.refreshed
            && matches!(
                profile.config.auth,
                AuthKind::Oauth | AuthKind::ClaudeCli | AuthKind::Upstream
            )
        {
            tracing::info!(profile = %profile.name, "provider answered 401; forcing a refresh and retrying once");
            self.refreshed = true;
            return Some(Step::Refresh);
        }
        if overloaded && self.overloads < MAX_OVERLOAD_RETRIES {
            self.overloads += 1;
            let wait = f.retry_after.unwrap_or_else(|| backoff(self.overloads));
            tracing::warn!(profile = %profile.name, status = f.status, wait_ms = wait.as_millis() as u64, "provider overloaded; waiting");
            // After a 429 everyone on this profile waits, not just this request.
            return Some(if f.status == 429 {
                Step::Pause(wait)
            } else {
                Step::Sleep(wait)
            });
        }
        let transient = (500..600).contains(&f.status) || f.network;
        if transient && !overloaded && self.server_errors < MAX_SERVER_RETRIES {
            self.server_errors += 1;
            return Some(Step::Sleep(backoff(self.server_errors)));
        }
        None
    }
}

impl Step {
    /// Carries the step out; `used` is the token of the failed attempt.
    pub async fn run(self, profile: &Profile, used: &str) -> Result<(), RpcError> {
        match self {
            Step::Refresh => {
                // Only a token that is still current and not brand new is worth replacing:
                // another request may have refreshed already, or the 401 is not about it.
                let used = Secret::new(used);
                profile.token(0, Force::IfStale { used }).await?;
            }
            Step::Pause(wait) => profile.limiter.pause(wait),
            Step::Sleep(wait) => tokio::time::sleep(wait).await,
        }
        Ok(())
    }
}

/// Everything secret in one call: the token and every header value sent (auth headers
/// and the profile's extra headers).
pub fn known_secrets(token: &llmd_proto::methods::TokenResult) -> Vec<String> {
    let mut v = vec![token.token.clone()];
    v.extend(token.headers.values().cloned());
    v
}

/// Logs a failed provider call with its host and cause, scrubbed of secrets.
fn log_failure(profile: &str, err: &ProviderError, secrets: &[String]) {
    if matches!(err, ProviderError::Cancelled) {
        return;
    }
    let clean = |t: &str| crate::secret::scrub_known(t, secrets.iter().map(String::as_str));
    let msg = clean(&err.to_string());
    let body = match err {
        ProviderError::Http { body, .. } => clean(body),
        _ => String::new(),
    };
    tracing::warn!(profile, error = %msg, body = %body.escape_debug(), "provider call failed");
}

/// Stream error types that mean "busy, try again" on each provider (Anthropic
/// `overloaded_error`/`rate_limit_error`, Gemini `UNAVAILABLE`/`RESOURCE_EXHAUSTED`, OpenAI
/// `server_error`/`rate_limit_exceeded`). Only retried before any delta reached the client.
pub fn is_overload_kind(kind: &str) -> bool {
    matches!(
        kind,
        "overloaded_error"
            | "rate_limit_error"
            | "api_error"
            | "UNAVAILABLE"
            | "RESOURCE_EXHAUSTED"
            | "server_error"
            | "rate_limit_exceeded"
    )
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(6));
    base + Duration::from_millis(rand::random::<u64>() % (base.as_millis() as u64 / 2 + 1))
}

fn check_request(req: &ChatRequest) -> Result<(), RpcError> {
    if req.messages.is_empty() {
        return Err(RpcError::invalid_params("`request.messages` is empty"));
    }
    // Results are lenient (an unknown block type decodes); params are strict.
    let unknown = |c: &Content| {
        match c {
        Content::Text(_) => false,
        Content::Blocks(bs) => bs.iter().any(|b| match b {
            Block::Unknown => true,
            Block::ToolResult { content, .. } => {
                matches!(content, Content::Blocks(inner) if inner.iter().any(|b| matches!(b, Block::Unknown)))
            }
            _ => false,
        }),
    }
    };
    if req.system.as_ref().is_some_and(unknown) || req.messages.iter().any(|m| unknown(&m.content))
    {
        return Err(RpcError::invalid_params(
            "`request`: unknown content block type (known: text, image, tool_use, tool_result, thinking)",
        ));
    }
    let count = |c: &Content| match c {
        Content::Text(_) => 0,
        Content::Blocks(bs) => bs
            .iter()
            .filter(|b| matches!(b, Block::Text { cache: Some(_), .. }))
            .count(),
    };
    let marks = req.system.as_ref().map_or(0, count)
        + req
            .messages
            .iter()
            .map(|m| count(&m.content))
            .sum::<usize>();
    if marks > MAX_CACHE_BREAKPOINTS {
        return Err(RpcError::invalid_params(format!(
            "`request`: {marks} cache breakpoints, at most {MAX_CACHE_BREAKPOINTS} are allowed"
        )));
    }
    Ok(())
}

/// A rough token count for the limiter: about four bytes per token of prompt, plus the
/// output budget. The answer's usage corrects it.
pub fn estimate_tokens(req: &ChatRequest) -> u64 {
    let text = serde_json::to_string(&req.messages).map_or(0, |s| s.len()) as u64
        + req.system.as_ref().map_or(0, |s| s.text().len()) as u64;
    text / 4 + u64::from(req.max_tokens.unwrap_or(1024))
}

/// Checks every tool call against its tool's schema and reports failures on the block.
fn validate_tool_calls(resp: &mut ChatResponse, tools: &[Arc<Tool>]) {
    for block in &mut resp.content {
        if let Block::ToolUse {
            name,
            input,
            validation_errors,
            ..
        } = block
        {
            let errors = match tools.iter().find(|t| t.def.name == *name) {
                Some(tool) => tool.validate(input),
                None => vec![format!(
                    "the model called `{name}`, which the request did not offer"
                )],
            };
            if !errors.is_empty() {
                *validation_errors = Some(errors);
            }
        }
    }
}

/// Maps a provider failure to the protocol's error. `data` carries `host`, `cause` (the
/// error's source chain) and `body` (the start of the provider's error body), each scrubbed
/// of `secrets` and of every other secret llmd holds.
pub fn to_rpc(err: ProviderError, secrets: &[String]) -> RpcError {
    let clean = |t: &str| crate::secret::scrub_known(t, secrets.iter().map(String::as_str));
    let message = clean(&err.to_string());
    let with_host = |e: RpcError, host: &str| {
        if host.is_empty() {
            e
        } else {
            e.with("host", host)
        }
    };
    match err {
        ProviderError::Http {
            status,
            body,
            headers,
            host,
        } => {
            let retry = providers::retry_after(&headers);
            let kind = if status == 429 {
                ErrorKind::RateLimited
            } else {
                ErrorKind::Upstream
            };
            let mut e = RpcError::new(kind, message)
                .with("status", status)
                .with("body", Value::String(clean(&body)));
            if let Some(r) = retry {
                e = e.with("retry_after_ms", r.as_millis() as u64);
            }
            with_host(e, &host)
        }
        ProviderError::Network { host, cause } => with_host(
            RpcError::new(ErrorKind::Upstream, message)
                .with("status", 0)
                .with("cause", clean(&cause)),
            &host,
        ),
        ProviderError::Timeout { host, stage, after } => with_host(
            RpcError::new(ErrorKind::Upstream, message)
                .with("status", 0)
                .with("cause", "timeout")
                .with("timeout", stage.key())
                .with("timeout_ms", after.as_millis() as u64),
            &host,
        ),
        ProviderError::EndedEarly(_) => {
            RpcError::new(ErrorKind::Upstream, message).with("cause", "stream ended early")
        }
        ProviderError::Protocol(_) => RpcError::new(ErrorKind::Upstream, message),
        ProviderError::Stream { kind, .. } => {
            RpcError::new(ErrorKind::Upstream, message).with("error_type", kind)
        }
        ProviderError::Cancelled => RpcError::new(ErrorKind::Cancelled, "cancelled"),
    }
}
