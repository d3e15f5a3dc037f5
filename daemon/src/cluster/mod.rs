//! Cluster mode (DESIGN.md, "Cluster"): several llmd instances share `cluster = true`
//! logins through an etcd cluster. Per shared login one instance owns the refresh, by
//! holding an etcd lease on the login's owner key; it writes each new token pair into etcd
//! with a compare-and-swap on the revision it read (the fence), and every other instance
//! adopts what the watch delivers and never calls the token endpoint.
//!
//! The login task of `refresh.rs` stays the one place that refreshes: its token endpoint
//! is wrapped in a [`Gate`] that hands every refresh to the login's cluster task
//! ([`login`]), which either runs it (owner, lease valid, etcd revision current) or answers
//! with the cluster's newer tokens or a refusal.

pub mod login;
pub mod seal;

use crate::config::ClusterConfig;
use crate::credentials::Tokens;
use crate::oauth::{RefreshError, RefreshFuture, TokenEndpoint};
use llmd_proto::methods::ClusterStatus;
use seal::Sealer;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Refresh requests queued per login; the login task sends one at a time.
const REQUEST_QUEUE: usize = 4;

/// A refresh handed to the cluster task.
pub struct Request {
    /// The tokens the login task holds.
    pub current: Tokens,
    /// The real token endpoint (a reload may change it).
    pub endpoint: Arc<dyn TokenEndpoint>,
    /// The outcome.
    pub reply: oneshot::Sender<Result<Tokens, RefreshError>>,
}

/// This instance's part for one login, as the cluster task sees it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// `owner`, `follower` or `disconnected`.
    pub role: &'static str,
    /// Current owner's instance name.
    pub owner: Option<String>,
    /// When this instance's lease runs out, while it owns the login.
    pub lease_until: Option<Instant>,
    /// Revision of the login's value last seen.
    pub revision: i64,
    /// Why it is not in sync.
    pub error: Option<String>,
}

impl Status {
    /// The `status` form.
    pub fn to_proto(&self) -> ClusterStatus {
        ClusterStatus {
            role: self.role.into(),
            owner: self.owner.clone(),
            lease_remaining_ms: self
                .lease_until
                .map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64),
            revision: self.revision,
            error: self.error.clone(),
        }
    }
}

/// The token endpoint of a shared login: every refresh goes through the cluster task.
#[derive(Debug)]
pub struct Gate {
    inner: Arc<dyn TokenEndpoint>,
    requests: mpsc::Sender<Request>,
}

impl TokenEndpoint for Gate {
    fn refresh(&self, current: &Tokens) -> RefreshFuture {
        let requests = self.requests.clone();
        let req_current = current.clone();
        let endpoint = self.inner.clone();
        Box::pin(async move {
            let stopped =
                || RefreshError::transient("the cluster task of this login is not running");
            let (reply, rx) = oneshot::channel();
            requests
                .send(Request {
                    current: req_current,
                    endpoint,
                    reply,
                })
                .await
                .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        })
    }
}

/// Connection settings and secrets read once from `[cluster]`.
#[derive(Clone)]
pub struct Settings {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// This instance's name.
    pub name: String,
    /// Lease TTL, seconds.
    pub lease_secs: u64,
    /// Seals values.
    pub sealer: Sealer,
    /// User and password.
    pub user: Option<(String, crate::secret::Secret)>,
    /// TLS, when configured.
    pub tls: Option<etcd_client::TlsOptions>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why `[cluster]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The seal key.
    #[error(transparent)]
    Seal(#[from] seal::SealError),
    /// A TLS or password file.
    #[error("cannot read {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        why: String,
    },
}

impl Settings {
    /// Reads the seal key, password and TLS files of `[cluster]`.
    pub fn load(cfg: &ClusterConfig) -> Result<Settings, SetupError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| SetupError::File {
                path: p.display().to_string(),
                why: e.to_string(),
            })
        };
        let sealer = Sealer::from_file(&cfg.seal_key_file)?;
        let user = match (&cfg.username, &cfg.password_file) {
            (Some(u), Some(p)) => {
                let pw = String::from_utf8_lossy(&read(p)?).trim().to_owned();
                Some((u.clone(), crate::secret::Secret::new(pw)))
            }
            _ => None,
        };
        let mut tls = None;
        if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
                t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
            }
            tls = Some(t);
        }
        let user_name = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty() && !u.contains('/'))
            .unwrap_or_else(|| unsafe { libc::getuid() }.to_string());
        Ok(Settings {
            endpoints: cfg.etcd.clone(),
            prefix: cfg
                .prefix
                .clone()
                .unwrap_or_else(|| format!("/llmd/{user_name}/")),
            name: cfg.name.clone().unwrap_or_else(default_name),
            lease_secs: cfg.lease_secs,
            sealer,
            user,
            tls,
        })
    }

    /// The client options: bounded connects and calls, and no answers from a member that
    /// lost its leader (it may be on the minority side of a partition). HTTP/2 pings no
    /// more often than etcd's default `--grpc-keepalive-min-time` (5 s) allows, or the
    /// server drops the connection; a dead link shows in the lease keep-alive first anyway.
    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some((u, p)) = &self.user {
            o = o.with_user(u.clone(), p.expose().to_owned());
        }
        if let Some(t) = &self.tls {
            o = o.with_tls(t.clone());
        }
        o
    }
}

fn default_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the length is bounded below.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "llmd".into()
    };
    format!("{host}:{}", std::process::id())
}

/// One per daemon: the cluster settings and, per shared login file, the channel to its
/// cluster task (kept across reloads, so a reconfigured login keeps its gate).
#[derive(Debug)]
pub struct Hub {
    settings: Settings,
    links: Mutex<HashMap<PathBuf, Link>>,
}

#[derive(Debug)]
struct Link {
    requests: mpsc::Sender<Request>,
    /// Taken when the task starts.
    pending: Option<(mpsc::Receiver<Request>, watch::Sender<Status>)>,
    status: watch::Receiver<Status>,
}

impl Hub {
    /// A hub for `[cluster]`.
    pub fn new(settings: Settings) -> Hub {
        Hub {
            settings,
            links: Mutex::new(HashMap::new()),
        }
    }

    fn with_link<R>(&self, file: &std::path::Path, f: impl FnOnce(&mut Link) -> R) -> R {
        let mut links = crate::sync::lock(&self.links);
        let link = links.entry(file.to_path_buf()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
            let (stx, srx) = watch::channel(Status {
                role: "disconnected",
                error: Some("connecting to etcd".into()),
                ..Status::default()
            });
            Link {
                requests: tx,
                pending: Some((rx, stx)),
                status: srx,
            }
        });
        f(link)
    }

    /// The endpoint the login task of `file` uses: `inner` behind the cluster gate.
    pub fn gate(&self, file: &std::path::Path, inner: Arc<dyn TokenEndpoint>) -> Arc<Gate> {
        let requests = self.with_link(file, |l| l.requests.clone());
        Arc::new(Gate { inner, requests })
    }

    /// The status of the login of `file`.
    pub fn status(&self, file: &std::path::Path) -> watch::Receiver<Status> {
        self.with_link(file, |l| l.status.clone())
    }

    /// Starts the cluster task of a shared login once (later calls do nothing).
    pub fn start(
        &self,
        profile: &str,
        file: &std::path::Path,
        handle: &crate::refresh::LoginHandle,
        source: crate::credentials::Source,
    ) {
        let Some((requests, status)) = self.with_link(file, |l| l.pending.take()) else {
            return;
        };
        login::spawn(login::Spec {
            profile: profile.to_owned(),
            settings: self.settings.clone(),
            handle: handle.clone(),
            source,
            requests,
            status,
        });
    }
}
