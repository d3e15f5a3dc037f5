//! Async client for the llmd credential daemon.
//!
//! One [`Client`] holds one connection and multiplexes any number of concurrent calls
//! over it: a reader task routes each response to its caller by id. When the daemon
//! restarts, the next call connects again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), llmd_client::Error> {
//! let client = llmd_client::Client::connect().await?;
//! let tok = client.token("claude", None).await?;
//! println!("{} header(s)", tok.headers.len());
//! # Ok(()) }
//! ```

mod chat;
mod connection;
mod error;
mod token_cache;

pub use chat::{ChatEvent, ChatStream};
pub use connection::Notification;
pub use error::Error;
pub use llmd_proto as proto;
pub use token_cache::TokenCache;

use connection::Connection;
use llmd_proto::methods::{
    names, CredentialsSetParams, Empty, Event, HelloParams, HelloResult, LoginFinishParams,
    LoginFinishResult, LoginStartResult, ProfileParams, ReloadResult, StatusResult,
    SubscribeParams, TokenParams, TokenResult, UsageBy, UsageParams, UsageResult,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, Mutex};

/// A connection to llmd, shared by concurrent callers.
#[derive(Clone)]
pub struct Client {
    path: PathBuf,
    conn: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl Client {
    /// Connects to the default socket (`$LLMD_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/llmd/llmd.sock`, else `/tmp/llmd-$UID/llmd.sock`).
    pub async fn connect() -> Result<Client, Error> {
        Self::connect_to(llmd_proto::paths::resolve_socket_path(None, None)).await
    }

    /// Connects to the socket at `path`.
    pub async fn connect_to(path: impl Into<PathBuf>) -> Result<Client, Error> {
        let path = path.into();
        let conn = Connection::open(&path).await?;
        Ok(Client {
            path,
            conn: Arc::new(Mutex::new(Some(Arc::new(conn)))),
        })
    }

    /// A [`TokenCache`] that uses this client's connection (see [`TokenCache::new`]).
    pub fn token_cache(&self, min_valid_secs: u64) -> TokenCache {
        TokenCache::new(self.clone(), min_valid_secs)
    }

    /// The socket path this client uses.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, Error> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let fresh = Arc::new(Connection::open(&self.path).await?);
        *slot = Some(fresh.clone());
        Ok(fresh)
    }

    /// Calls `method` with `params` and decodes the result. A connection that died since
    /// the last call (daemon restarted) is replaced once.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<R, Error> {
        let params =
            serde_json::value::to_raw_value(params).map_err(|e| Error::Protocol(e.to_string()))?;
        let conn = self.connection().await?;
        let raw = match conn.call(method, &params).await {
            Err(Error::Disconnected) if !conn.was_used() => {
                // The daemon went away before this request reached it: safe to resend.
                self.connection().await?.call(method, &params).await?
            }
            other => other?,
        };
        serde_json::from_str(raw.get())
            .map_err(|e| Error::Protocol(format!("unexpected `{method}` result: {e}")))
    }

    /// Names this agent to the daemon.
    pub async fn hello(&self, client: &str, version: &str) -> Result<HelloResult, Error> {
        self.call(
            names::HELLO,
            &HelloParams {
                client: client.into(),
                version: version.into(),
            },
        )
        .await
    }

    /// Daemon and profile state.
    pub async fn status(&self) -> Result<StatusResult, Error> {
        self.call(names::STATUS, &Empty {}).await
    }

    /// What the usage ledger holds since `since` (`24h`, `7d`, `YYYY-MM-DD`; default
    /// `24h`), grouped `by`.
    pub async fn usage(&self, since: Option<&str>, by: UsageBy) -> Result<UsageResult, Error> {
        let params = UsageParams {
            since: since.map(str::to_owned),
            by,
        };
        self.call(names::USAGE, &params).await
    }

    /// A token valid for at least `min_valid_secs`, with its provider headers.
    pub async fn token(
        &self,
        profile: &str,
        min_valid_secs: Option<u64>,
    ) -> Result<TokenResult, Error> {
        self.call(
            names::TOKEN,
            &TokenParams {
                profile: profile.into(),
                min_valid_secs,
            },
        )
        .await
    }

    /// Forces a refresh and returns the new token.
    pub async fn refresh(&self, profile: &str) -> Result<TokenResult, Error> {
        self.call(
            names::REFRESH,
            &ProfileParams {
                profile: profile.into(),
            },
        )
        .await
    }

    /// Re-reads config and credential files.
    pub async fn reload(&self) -> Result<ReloadResult, Error> {
        self.call(names::RELOAD, &Empty {}).await
    }

    /// Stores an API key for a profile.
    pub async fn set_api_key(&self, profile: &str, key: &str) -> Result<(), Error> {
        let p = CredentialsSetParams {
            profile: profile.into(),
            api_key: Some(key.into()),
            setup_token: None,
        };
        self.call::<_, Empty>(names::CREDENTIALS_SET, &p)
            .await
            .map(|_| ())
    }

    /// Stores an Anthropic setup-token for a profile.
    pub async fn set_setup_token(&self, profile: &str, token: &str) -> Result<(), Error> {
        let p = CredentialsSetParams {
            profile: profile.into(),
            api_key: None,
            setup_token: Some(token.into()),
        };
        self.call::<_, Empty>(names::CREDENTIALS_SET, &p)
            .await
            .map(|_| ())
    }

    /// Starts an OAuth login; returns the URL to open.
    pub async fn login_start(&self, profile: &str) -> Result<LoginStartResult, Error> {
        self.call(
            names::LOGIN_START,
            &ProfileParams {
                profile: profile.into(),
            },
        )
        .await
    }

    /// Finishes an OAuth login with the code the page showed.
    pub async fn login_finish(
        &self,
        profile: &str,
        code: &str,
    ) -> Result<LoginFinishResult, Error> {
        self.call(
            names::LOGIN_FINISH,
            &LoginFinishParams {
                profile: profile.into(),
                code: code.into(),
            },
        )
        .await
    }

    /// Subscribes to events (empty = all kinds). Events arrive until the connection ends.
    pub async fn subscribe(&self, kinds: &[&str]) -> Result<mpsc::UnboundedReceiver<Event>, Error> {
        let conn = self.connection().await?;
        let mut notes = conn.notifications();
        let params = SubscribeParams {
            events: kinds.iter().map(|k| k.to_string()).collect(),
        };
        let params =
            serde_json::value::to_raw_value(&params).map_err(|e| Error::Protocol(e.to_string()))?;
        conn.call(names::SUBSCRIBE, &params).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // The subscription lives on this connection: keep it open while events are read.
            let _conn = conn;
            while let Some(n) = notes.recv().await {
                if n.method == names::EVENT {
                    if let Ok(e) = serde_json::from_str::<Event>(n.params.get()) {
                        if tx.send(e).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}
