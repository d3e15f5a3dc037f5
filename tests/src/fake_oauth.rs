//! A fake OAuth token endpoint on 127.0.0.1 that behaves like the real ones where it
//! matters: short-lived access tokens, single-use rotating refresh tokens, and a 400
//! `invalid_grant` for a refresh token that was already used.
//!
//! Anthropic's shape: `POST /v1/oauth/token` with a JSON body, answer with `expires_in`.
//! MiniMax's shape: `POST /oauth/token` form-encoded, answer with `expired_in`; its login
//! is a user-code flow with PKCE: `POST /oauth/code` hands out a `user_code`, and
//! `grant_type=urn:ietf:params:oauth:grant-type:user_code` polls answer `pending` until the
//! user approved, then `status: "success"` with tokens.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the endpoint answers the next refresh requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rotate and answer 200.
    Normal,
    /// 500 with a JSON error.
    ServerError,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Never answer (until the client gives up).
    Hang,
    /// 400 `invalid_grant` for everything.
    Revoked,
    /// 429 with `retry-after: 30`.
    TooMany,
}

/// What the endpoint knows and counts.
#[derive(Debug)]
pub struct Inner {
    /// The one refresh token that is currently valid.
    pub valid_refresh: String,
    /// Generation counter; tokens are `…-{gen}`.
    pub generation: u64,
    /// Lifetime of issued access tokens.
    pub lifetime_secs: i64,
    /// Current mode.
    pub mode: Mode,
    /// Delay before each answer.
    pub delay: Duration,
    /// Refresh requests received (any outcome).
    pub refresh_calls: u64,
    /// Successful rotations.
    pub rotations: u64,
    /// Requests that got `invalid_grant`.
    pub invalid_grants: u64,
    /// Authorization codes accepted by the `authorization_code` grant.
    pub codes: HashMap<String, ()>,
    /// Every request body, parsed (JSON or form as an object), with the user-agent.
    pub requests: Vec<(Value, String)>,
    /// Delay after a refresh was decided (the login already rotated) and before the answer
    /// is sent: an authority that is slow to answer, not slow to rotate.
    pub answer_delay: Duration,
    /// Woken each time a refresh answer leaves the handler.
    pub answered: Arc<tokio::sync::Notify>,
    /// MiniMax user codes handed out: code -> (PKCE challenge, polls left before approval).
    pub user_codes: HashMap<String, (String, u32)>,
    /// How many polls of a new user code answer "pending" before it counts as approved.
    pub polls_before_approval: u32,
    /// Expiry (unix milliseconds) of every access token issued by a refresh, so a test can
    /// check that a token it was served was valid then.
    pub expiry_ms_of: HashMap<String, i64>,
}

/// A running fake token endpoint.
#[derive(Clone)]
pub struct FakeOAuth {
    /// Shared state.
    pub inner: Arc<Mutex<Inner>>,
    /// Bound address.
    pub addr: SocketAddr,
}

/// Access token of a generation.
pub fn access_of(generation: u64) -> String {
    format!("sk-ant-oat01-fakeaccess-{generation:06}")
}

/// Refresh token of a generation.
pub fn refresh_of(generation: u64) -> String {
    format!("sk-ant-ort01-fakerefresh-{generation:06}")
}

impl FakeOAuth {
    /// Starts the endpoint; the valid refresh token is [`refresh_of`]`(0)`.
    pub async fn start(lifetime_secs: i64) -> FakeOAuth {
        let inner = Arc::new(Mutex::new(Inner {
            valid_refresh: refresh_of(0),
            generation: 0,
            lifetime_secs,
            mode: Mode::Normal,
            delay: Duration::ZERO,
            refresh_calls: 0,
            rotations: 0,
            invalid_grants: 0,
            codes: HashMap::new(),
            requests: Vec::new(),
            answer_delay: Duration::ZERO,
            answered: Arc::new(tokio::sync::Notify::new()),
            user_codes: HashMap::new(),
            polls_before_approval: 1,
            expiry_ms_of: HashMap::new(),
        }));
        let app = Router::new()
            .route("/v1/oauth/token", post(token_json))
            .route("/oauth/token", post(token_form))
            .route("/oauth/code", post(user_code_form))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake oauth");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOAuth { inner, addr }
    }

    /// Anthropic-style endpoint URL.
    pub fn anthropic_url(&self) -> String {
        format!("http://{}/v1/oauth/token", self.addr)
    }

    /// MiniMax region base (the endpoint is `{region}/oauth/token`).
    pub fn region(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Locks the state.
    pub fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the mode.
    pub fn set_mode(&self, m: Mode) {
        self.state().mode = m;
    }

    /// Refresh calls so far.
    pub fn refresh_calls(&self) -> u64 {
        self.state().refresh_calls
    }

    /// `invalid_grant` answers so far.
    pub fn invalid_grants(&self) -> u64 {
        self.state().invalid_grants
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Accept `code` once for the authorization-code grant.
    pub fn allow_code(&self, code: &str) {
        self.state().codes.insert(code.into(), ());
    }

    /// Rotates without a request, as if another client had refreshed (returns the new
    /// generation's tokens).
    pub fn rotate_out_of_band(&self) -> (String, String, u64) {
        let mut s = self.state();
        s.generation += 1;
        s.valid_refresh = refresh_of(s.generation);
        s.rotations += 1;
        (
            access_of(s.generation),
            refresh_of(s.generation),
            s.generation,
        )
    }
}

async fn token_json(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    answer(inner, headers, parsed, "expires_in").await
}

async fn token_form(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut obj = serde_json::Map::new();
    for pair in String::from_utf8_lossy(&body).split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        obj.insert(decode(k), Value::String(decode(v)));
    }
    answer(inner, headers, Value::Object(obj), "expired_in").await
}

fn form_of(body: &[u8]) -> Value {
    let mut obj = serde_json::Map::new();
    for pair in String::from_utf8_lossy(body).split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        obj.insert(decode(k), Value::String(decode(v)));
    }
    Value::Object(obj)
}

/// MiniMax's `/oauth/code`: checks the PKCE request and hands out a user code.
async fn user_code_form(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> Response {
    let form = form_of(&body);
    let f = |k: &str| form.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut s = inner.lock().unwrap_or_else(|p| p.into_inner());
    s.requests.push((form.clone(), String::new()));
    let ok = f("response_type") == "code"
        && f("client_id") == "78257093-7e40-4613-99e0-527b14b39113"
        && f("scope") == "group_id profile model.completion"
        && f("code_challenge_method") == "S256"
        && f("code_challenge").len() >= 43
        && !f("state").is_empty();
    if !ok {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"base_resp": {"status_code": 1004, "status_msg": "bad code request"}}),
            ),
        )
            .into_response();
    }
    let user_code = format!("MMCODE-{}", s.user_codes.len() + 1);
    let polls = s.polls_before_approval;
    s.user_codes
        .insert(user_code.clone(), (f("code_challenge"), polls));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    (
        StatusCode::OK,
        axum::Json(json!({
            "user_code": user_code,
            "verification_uri": format!("https://fake-minimax.invalid/oauth/authorize?user_code={user_code}"),
            "expired_in": now_ms + 600_000,
            "interval": 100,
            "state": f("state"),
        })),
    )
        .into_response()
}

/// The user-code grant: "pending" until the code's polls run out, then tokens, once.
fn user_code_grant(s: &mut Inner, body: &Value) -> Response {
    use base64::Engine;
    use sha2::Digest;
    let f = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let code = f("user_code");
    let Some((challenge, polls)) = s.user_codes.get_mut(&code) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"base_resp": {"status_code": 1004, "status_msg": "unknown user code"}}),
            ),
        )
            .into_response();
    };
    let verified = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(f("code_verifier").as_bytes()));
    if verified != *challenge || f("client_id") != "78257093-7e40-4613-99e0-527b14b39113" {
        return (StatusCode::OK, axum::Json(json!({"status": "error"}))).into_response();
    }
    if *polls > 0 {
        *polls -= 1;
        return (StatusCode::OK, axum::Json(json!({"status": "pending"}))).into_response();
    }
    s.user_codes.remove(&code);
    s.generation += 1;
    s.valid_refresh = refresh_of(s.generation);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    (
        StatusCode::OK,
        axum::Json(json!({
            "status": "success",
            "token_type": "Bearer",
            "access_token": access_of(s.generation),
            "refresh_token": refresh_of(s.generation),
            "expired_in": now_ms + s.lifetime_secs * 1000,
            "resource_url": "https://api.minimax.io",
        })),
    )
        .into_response()
}

fn decode(s: &str) -> String {
    let bytes = s.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn answer(
    inner: Arc<Mutex<Inner>>,
    headers: HeaderMap,
    body: Value,
    lifetime_field: &str,
) -> Response {
    let ua = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (mode, delay) = {
        let mut s = inner.lock().unwrap_or_else(|p| p.into_inner());
        s.requests.push((body.clone(), ua));
        (s.mode, s.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if mode == Mode::Hang && body.get("grant_type").and_then(Value::as_str) == Some("refresh_token")
    {
        inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh_calls += 1;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    }
    let (resp, answer_delay, answered) = {
        let mut s = inner.lock().unwrap_or_else(|p| p.into_inner());
        let resp = decide(&mut s, &body, mode, lifetime_field);
        (resp, s.answer_delay, s.answered.clone())
    };
    if !answer_delay.is_zero() {
        tokio::time::sleep(answer_delay).await;
    }
    answered.notify_waiters();
    resp
}

fn decide(s: &mut Inner, body: &Value, mode: Mode, lifetime_field: &str) -> Response {
    let grant = body.get("grant_type").and_then(Value::as_str).unwrap_or("");
    if grant == "urn:ietf:params:oauth:grant-type:user_code" {
        return user_code_grant(s, body);
    }
    if grant == "authorization_code" {
        let code = body.get("code").and_then(Value::as_str).unwrap_or("");
        if s.codes.remove(code).is_none() {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "invalid_grant", "error_description": "bad code"})),
            )
                .into_response();
        }
        s.generation += 1;
        s.valid_refresh = refresh_of(s.generation);
        return issue(s.generation, s.lifetime_secs, lifetime_field);
    }
    s.refresh_calls += 1;
    match mode {
        Mode::ServerError => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": {"type": "api_error", "message": "internal"}})),
            )
                .into_response()
        }
        Mode::Garbage => return (StatusCode::OK, "<html>not json</html>").into_response(),
        Mode::Revoked => {
            s.invalid_grants += 1;
            return invalid_grant();
        }
        Mode::TooMany => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "30")],
                axum::Json(json!({"error": "rate_limited"})),
            )
                .into_response()
        }
        Mode::Normal | Mode::Hang => {}
    }
    let presented = body
        .get("refresh_token")
        .and_then(Value::as_str)
        .unwrap_or("");
    if grant != "refresh_token" || presented != s.valid_refresh {
        s.invalid_grants += 1;
        return invalid_grant();
    }
    s.generation += 1;
    s.rotations += 1;
    s.valid_refresh = refresh_of(s.generation);
    let expiry = unix_now_ms() + s.lifetime_secs * 1000;
    s.expiry_ms_of.insert(access_of(s.generation), expiry);
    issue(s.generation, s.lifetime_secs, lifetime_field)
}

fn invalid_grant() -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": "Refresh token not found or invalid"})))
        .into_response()
}

fn issue(generation: u64, lifetime: i64, lifetime_field: &str) -> Response {
    let mut body = json!({
        "token_type": "Bearer",
        "access_token": access_of(generation),
        "refresh_token": refresh_of(generation),
        "scope": "user:inference user:profile",
    });
    body[lifetime_field] = lifetime.into();
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Minimal HTTP/1.1 JSON POST over a fresh loopback connection (what a second OAuth client,
/// such as a Claude Code stand-in, sends). Returns the status and the body.
pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect fake oauth");
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The refresh tokens presented to the `refresh_token` grant, in order.
pub fn presented_refresh_tokens(inner: &Inner) -> Vec<String> {
    inner
        .requests
        .iter()
        .filter(|(b, _)| b.get("grant_type").and_then(Value::as_str) == Some("refresh_token"))
        .filter_map(|(b, _)| {
            b.get("refresh_token")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}
