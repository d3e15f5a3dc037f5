//! One handler per method. Each takes its params raw, parses its own shape and returns a
//! serialized result, so the connection code knows nothing about methods.

pub mod chat;
pub mod credentials;
pub mod gateway;
pub mod hello;
pub mod login;
pub mod reload;
pub mod status;
pub mod subscribe;
pub mod token;
pub mod tools;
pub mod usage;

use crate::server::connection::Conn;
use crate::server::Dispatcher;
use crate::state::Daemon;
use futures_util::future::BoxFuture;
use llmd_proto::methods::names;
use llmd_proto::{ErrorKind, Id, RpcError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::Arc;

/// What a handler may use.
pub struct Ctx {
    /// Shared daemon state.
    pub daemon: Arc<Daemon>,
    /// The calling connection.
    pub conn: Arc<Conn>,
}

/// A handler's answer.
pub type Reply = Result<Box<RawValue>, RpcError>;

/// The handlers, as the server's [`Dispatcher`].
pub struct Handlers {
    daemon: Arc<Daemon>,
}

impl Handlers {
    /// Handlers working on `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Arc<Handlers> {
        Arc::new(Handlers { daemon })
    }
}

impl Dispatcher for Handlers {
    fn ready(
        &self,
        conn: &Conn,
        method: &str,
        params: Option<&RawValue>,
        answer: &mut dyn FnMut(Result<&str, &RpcError>),
    ) -> bool {
        match method {
            names::TOKEN => token::ready(&self.daemon, conn, params, answer),
            _ => false,
        }
    }

    fn call<'a>(
        &'a self,
        conn: &'a Arc<Conn>,
        id: Option<&'a Id>,
        method: &'a str,
        params: Option<&'a RawValue>,
    ) -> BoxFuture<'a, Reply> {
        Box::pin(async move {
            let ctx = Ctx {
                daemon: self.daemon.clone(),
                conn: conn.clone(),
            };
            dispatch(&ctx, id, method, params).await
        })
    }
}

/// Runs the handler of `method`.
pub async fn dispatch(
    ctx: &Ctx,
    id: Option<&Id>,
    method: &str,
    params: Option<&RawValue>,
) -> Reply {
    match method {
        names::HELLO => hello::handle(ctx, params),
        names::STATUS => status::handle(ctx, params),
        names::TOKEN => token::token(ctx, params).await,
        names::REFRESH => token::refresh(ctx, params).await,
        names::RELOAD => reload::handle(ctx, params).await,
        names::SUBSCRIBE => subscribe::handle(ctx, params),
        names::CREDENTIALS_SET => credentials::set(ctx, params),
        names::CREDENTIALS_REMOVE => credentials::remove(ctx, params).await,
        names::LOGIN_START => login::start(ctx, params).await,
        names::LOGIN_FINISH => login::finish(ctx, params).await,
        names::CHAT => chat::chat(ctx, id, params).await,
        names::EMBED => chat::embed(ctx, params).await,
        names::TOOLS_REGISTER => tools::register(ctx, params),
        names::TOOLS_LIST => tools::list(ctx, params),
        names::TOOLS_REMOVE => tools::remove(ctx, params),
        names::GATEWAY_KEY => gateway::key(ctx, params),
        names::USAGE => usage::handle(ctx, params).await,
        other => Err(RpcError::new(
            ErrorKind::MethodNotFound,
            format!("no method `{other}`"),
        )),
    }
}

/// Parses params into `T`; absent params count as `{}`. The error names the field.
pub fn parse<T: DeserializeOwned>(params: Option<&RawValue>) -> Result<T, RpcError> {
    parse_borrowed(params)
}

/// [`parse`] into a type that may borrow from the params.
pub fn parse_borrowed<'a, T: serde::Deserialize<'a>>(
    params: Option<&'a RawValue>,
) -> Result<T, RpcError> {
    let text = params.map_or("{}", RawValue::get);
    serde_json::from_str(text).map_err(invalid_params)
}

fn invalid_params(e: serde_json::Error) -> RpcError {
    let msg = e.to_string();
    // serde's messages carry " at line 1 column N", which means nothing to a caller.
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    RpcError::invalid_params(format!("invalid params: {msg}"))
}

/// Like [`parse`], from a value already read (when a handler looked at the raw shape first).
pub fn parse_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, RpcError> {
    serde_json::from_value(v).map_err(invalid_params)
}

/// Serializes a result.
pub fn ok<T: Serialize>(value: &T) -> Reply {
    serde_json::value::to_raw_value(value)
        .map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
}
