//! The HTTP gateway (DESIGN.md, "Gateway"): the providers' own APIs on loopback under
//! `/p/<profile>/…`, with the profile's credentials put on every request and the same
//! shared limits, retries and refresh-on-401 as `chat`.
//!
//! [`auth`] decides who may call, [`forward`] passes native requests through,
//! [`openai_facade`] answers `/v1/chat/completions` for the providers that do not speak
//! it, through the neutral chat shape and `crate::chat`.

pub mod anthropic_facade;
pub mod auth;
pub mod errors;
pub mod forward;
pub mod openai_facade;
pub mod translate;
pub mod usage;

use crate::chat::Mode;
use crate::config::{AuthKind, GatewayConfig, Provider};
use crate::state::Daemon;
use crate::sync::lock;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use errors::{GatewayError, Shape};
use llmd_proto::methods::GatewayStatus;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The running gateway, shared by its listeners.
pub struct Gateway {
    /// The daemon whose profiles it serves.
    pub daemon: Arc<Daemon>,
    /// Accepted keys.
    pub keys: auth::Keys,
    /// Bound TCP address.
    pub tcp: Option<SocketAddr>,
    /// Bound Unix socket.
    pub unix: Option<PathBuf>,
    origins: Vec<String>,
    max_body: usize,
    requests: Mutex<BTreeMap<String, u64>>,
}

/// What one listener adds to the shared gateway.
#[derive(Clone)]
struct Listener {
    gw: Arc<Gateway>,
    /// `Host` values accepted; `None` on the Unix socket, which no web page can reach.
    hosts: Option<Arc<Vec<String>>>,
}

impl Gateway {
    /// `http://ADDR` of the TCP listener.
    pub fn base_url(&self) -> Option<String> {
        self.tcp.map(|a| format!("http://{a}"))
    }

    /// The gateway's part of `status`.
    pub fn status(&self) -> GatewayStatus {
        GatewayStatus {
            listen: self.base_url(),
            unix: self.unix.as_ref().map(|p| p.display().to_string()),
            requests_by_agent: lock(&self.requests).clone(),
        }
    }
}

/// Binds the configured listeners and serves them until shutdown. A bind failure is a
/// start-up error.
pub async fn start(daemon: Arc<Daemon>, cfg: &GatewayConfig) -> Result<Arc<Gateway>, String> {
    let state_dir = daemon.registry().state_dir.clone();
    let keys = auth::Keys::load_or_create(&state_dir)?;
    let tcp = match &cfg.listen {
        Some(l) => {
            let l = tokio::net::TcpListener::bind(l.as_str())
                .await
                .map_err(|e| format!("gateway: cannot listen on {l}: {e}"))?;
            Some(l)
        }
        None => None,
    };
    let unix = match &cfg.unix {
        Some(p) => Some((bind_unix(p)?, p.clone())),
        None => None,
    };
    let tcp_addr = match &tcp {
        Some(l) => Some(
            l.local_addr()
                .map_err(|e| format!("gateway: no local address: {e}"))?,
        ),
        None => None,
    };
    let gw = Arc::new(Gateway {
        daemon: daemon.clone(),
        keys,
        tcp: tcp_addr,
        unix: unix.as_ref().map(|(_, p)| p.clone()),
        origins: cfg.allowed_origins.clone(),
        max_body: cfg.max_body_bytes,
        requests: Mutex::new(BTreeMap::new()),
    });
    if let (Some(l), Some(addr)) = (tcp, tcp_addr) {
        let app = router(Listener {
            gw: gw.clone(),
            hosts: Some(Arc::new(auth::allowed_hosts(&addr))),
        });
        let stop = daemon.shutdown.clone();
        // Without TCP_NODELAY each small stream event would wait for the previous one's
        // ACK (Nagle), a round trip per event.
        let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let serve = axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "gateway listener failed");
            }
        });
        tracing::info!(listen = %addr, "gateway listening");
    }
    if let Some((l, path)) = unix {
        let app = router(Listener {
            gw: gw.clone(),
            hosts: None,
        });
        let stop = daemon.shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "gateway socket failed");
            }
            let _ = std::fs::remove_file(&path);
        });
        tracing::info!(socket = %gw.unix.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "gateway listening");
    }
    Ok(gw)
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_private_dir(dir)?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(format!(
                "gateway: {} exists and is not a socket",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("gateway: cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("gateway: cannot chmod {}: {e}", path.display()))?;
    Ok(l)
}

fn router(l: Listener) -> Router {
    Router::new().fallback(handle).with_state(l)
}

/// The error shape for `rest` on a profile of `provider`: the chat routes speak their
/// own API's whatever the provider (they are translated for the others).
fn shape_for(provider: Option<Provider>, rest: &str) -> Shape {
    match provider {
        _ if rest == "v1/chat/completions" => Shape::OpenAi,
        _ if rest == "v1/messages" => Shape::Anthropic,
        Some(p) => Shape::of(p),
        None => Shape::OpenAi,
    }
}

async fn handle(State(l): State<Listener>, req: Request) -> Response {
    match serve(&l, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(l: &Listener, req: Request) -> Result<Response, GatewayError> {
    let gw = &l.gw;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let (name, rest) = path
        .strip_prefix("/p/")
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""));
    let reg = gw.daemon.registry();
    let pool = reg.pools.get(name).cloned();
    let profile = reg
        .profiles
        .get(name)
        .or_else(|| pool.as_ref().and_then(|p| p.members.first()))
        .cloned();
    drop(reg);
    let shape = shape_for(profile.as_ref().map(|p| p.config.provider), rest);
    let err = |status, msg: String| GatewayError::new(status, shape, msg);
    if let Some(hosts) = &l.hosts {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            tracing::warn!("gateway refused a request with a foreign Host header");
            return Err(err(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "the llmd gateway answers only to Host {}",
                    hosts.join(" or ")
                ),
            ));
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !gw.origins.iter().any(|o| o == origin) {
            tracing::warn!("gateway refused a request with an Origin header");
            return Err(err(
                StatusCode::FORBIDDEN,
                "requests from web pages (with an `Origin` header) are refused; list the origin in `[gateway] allowed_origins` to allow it".into(),
            ));
        }
    }
    let presented = auth::presented_key(req.headers(), query.as_deref());
    let Some(agent) = presented.and_then(|k| gw.keys.check(k)) else {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong llmd gateway key (see `llmctl gateway key`)".into(),
        ));
    };
    let meter = usage::Meter::new(gw.daemon.clone(), name, &agent);
    *lock(&gw.requests).entry(agent.clone()).or_insert(0) += 1;
    let Some(profile) = profile else {
        return Err(err(
            StatusCode::NOT_FOUND,
            if name.is_empty() {
                "gateway routes are /p/<profile>/…".into()
            } else {
                format!("no profile `{name}`")
            },
        ));
    };
    // A pool is served only by the members the gateway may use (checked per member).
    if pool.is_none() && !gateway_allowed(&profile) {
        return Err(err(
            StatusCode::FORBIDDEN,
            format!(
                "profile `{name}` is a subscription login (`{}`), which Anthropic's terms intend for Claude Code and Claude.ai; to serve it through the gateway anyway, set `gateway = true` in [profiles.{name}]",
                profile.config.auth
            ),
        ));
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, gw.max_body).await.map_err(|_| {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over {} bytes (`[gateway] max_body_bytes`)",
                gw.max_body
            ),
        )
    })?;
    if parts.method == axum::http::Method::POST {
        let provider = profile.config.provider;
        let facade = (rest == "v1/chat/completions" && provider != Provider::OpenaiCompat)
            || (rest == "v1/messages" && provider != Provider::Anthropic);
        if facade {
            // A translated request goes to the pool's first pick and does not move on.
            let (profile, meter) = match &pool {
                Some(pool) => match first_pick(pool, &agent) {
                    Some(m) => {
                        let meter = meter.for_member(&m.name);
                        (m, meter)
                    }
                    None => {
                        return Err(err(
                            StatusCode::FORBIDDEN,
                            format!("no member of pool `{name}` may be served through the gateway (subscription logins need `gateway = true`)"),
                        ))
                    }
                },
                None => (profile, meter),
            };
            return Ok(if rest == "v1/messages" {
                anthropic_facade::handle(gw.clone(), profile, body, meter).await
            } else {
                openai_facade::handle(gw.clone(), profile, body, meter).await
            });
        }
    }
    let Some(upstream) = forward::upstream_url(&profile, rest, query.as_deref()) else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!(
                "`/{rest}` is not a {} API path the gateway forwards",
                profile.config.provider
            ),
        ));
    };
    let Some(pool) = pool else {
        let resp = forward::forward(
            gw,
            &profile,
            &parts,
            upstream,
            body,
            shape,
            Mode::Alone,
            &meter,
        )
        .await;
        return Ok(record_failure(&meter, resp));
    };
    Ok(forward_pool(
        gw,
        &pool,
        &agent,
        &parts,
        rest,
        query.as_deref(),
        body,
        shape,
        &meter,
    )
    .await)
}

/// A success is recorded by its body when it ends; a failure ends here.
fn record_failure(meter: &usage::Meter, resp: Response) -> Response {
    if !resp.status().is_success() {
        meter.record(
            crate::usage::Outcome::Http(resp.status().as_u16()),
            &usage::Seen::default(),
        );
    }
    resp
}

/// The member a translated gateway request of `agent` goes to.
fn first_pick(pool: &crate::pool::Pool, agent: &str) -> Option<Arc<crate::profile::Profile>> {
    let pick = pool
        .plan(Some(agent))
        .into_iter()
        .chain(pool.fallback())
        .chain(0..pool.members.len())
        .filter_map(|i| pool.members.get(i))
        .find(|m| gateway_allowed(m))
        .cloned();
    if let Some(m) = &pick {
        if let Some(i) = pool.members.iter().position(|x| Arc::ptr_eq(x, m)) {
            pool.served(i, Some(agent));
        }
    }
    pick
}

/// Subscription logins are served through the gateway only with `gateway = true`.
fn gateway_allowed(profile: &crate::profile::Profile) -> bool {
    !matches!(
        profile.config.auth,
        AuthKind::Oauth | AuthKind::ClaudeCli | AuthKind::SetupToken | AuthKind::Upstream
    ) || profile.config.gateway
}

/// Forwards through a pool: members in the pool's order, moving on after a 429 or a 401
/// (nothing has reached the client then: a failed answer is never streamed).
#[allow(clippy::too_many_arguments)]
async fn forward_pool(
    gw: &Arc<Gateway>,
    pool: &crate::pool::Pool,
    agent: &str,
    parts: &axum::http::request::Parts,
    rest: &str,
    query: Option<&str>,
    body: axum::body::Bytes,
    shape: Shape,
    meter: &usage::Meter,
) -> Response {
    let plan = pool.plan(Some(agent));
    let fallback = pool.fallback();
    let tries: Vec<(usize, Mode)> = plan
        .iter()
        .map(|&i| (i, Mode::PoolMember))
        .chain(
            fallback
                .or(plan.is_empty().then_some(0))
                .map(|i| (i, Mode::Alone)),
        )
        .collect();
    let mut last = None;
    for (n, &(i, mode)) in tries.iter().enumerate() {
        let member = &pool.members[i];
        let Some(url) =
            forward::upstream_url(member, rest, query).filter(|_| gateway_allowed(member))
        else {
            continue;
        };
        let mode = if n + 1 == tries.len() {
            Mode::Alone
        } else {
            mode
        };
        let member_meter = meter.for_member(&member.name);
        let resp = forward::forward(
            gw,
            member,
            parts,
            url,
            body.clone(),
            shape,
            mode,
            &member_meter,
        )
        .await;
        let status = resp.status();
        if status.is_success() {
            pool.served(i, Some(agent));
            return resp;
        }
        if n + 1 < tries.len()
            && (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::UNAUTHORIZED)
        {
            tracing::info!(pool = %pool.name, member = %member.name, status = status.as_u16(), "pool member failed; trying the next");
            last = Some((resp, member_meter));
            continue;
        }
        return record_failure(&member_meter, resp);
    }
    if let Some((resp, member_meter)) = last {
        return record_failure(&member_meter, resp);
    }
    {
        GatewayError::new(
            StatusCode::NOT_FOUND,
            shape,
            format!("`/{rest}` is not an API path the gateway forwards"),
        )
        .into_response()
    }
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
