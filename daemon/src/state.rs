//! The daemon's shared state: the current config and profiles (swapped whole on reload),
//! the event bus, and counters for `status`.

use crate::config::{self, Config, ConfigSource};
use crate::oauth::anthropic::PendingLogin;
use crate::pool::Pool;
use crate::profile::{Env, Profile};
use crate::sync::lock;
use crate::tools::ToolRegistry;
use crate::watch::Watcher;
use arc_swap::ArcSwap;
use llmd_proto::methods::Event;
use llmd_proto::RpcError;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// One consistent generation of config and profiles.
#[derive(Debug)]
pub struct Registry {
    /// The parsed config.
    pub config: Config,
    /// Where it came from.
    pub source: ConfigSource,
    /// Resolved state folder.
    pub state_dir: PathBuf,
    /// Profiles by name.
    pub profiles: BTreeMap<String, Arc<Profile>>,
    /// Pools by name, over the profiles of this generation.
    pub pools: BTreeMap<String, Arc<Pool>>,
}

/// [`Target`] borrowed from a [`Registry`] (the hot path takes no reference count).
#[derive(Debug, Clone, Copy)]
pub enum TargetRef<'a> {
    /// One profile.
    Profile(&'a Arc<Profile>),
    /// A pool of profiles.
    Pool(&'a Arc<Pool>),
}

impl Registry {
    /// What `name` stands for in this generation, or `unknown_profile`.
    pub fn target(&self, name: &str) -> Result<TargetRef<'_>, RpcError> {
        if let Some(p) = self.profiles.get(name) {
            return Ok(TargetRef::Profile(p));
        }
        match self.pools.get(name) {
            Some(pool) => Ok(TargetRef::Pool(pool)),
            None => Err(RpcError::unknown_profile(name)),
        }
    }
}

/// What a profile name used by `chat`, `embed`, `token` or the gateway stands for.
#[derive(Debug, Clone)]
pub enum Target {
    /// One profile.
    Profile(Arc<Profile>),
    /// A pool of profiles.
    Pool(Arc<Pool>),
}

/// Everything the request handlers share.
pub struct Daemon {
    /// Start time, for `uptime_secs`.
    pub started: Instant,
    /// `token.rotated` / `profile.state` events.
    pub events: broadcast::Sender<Event>,
    /// HTTP client for token endpoints.
    pub http: reqwest::Client,
    /// HTTP clients for provider calls (one per connect timeout).
    pub provider_http: crate::providers::HttpClients,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// Logins between `login.start` and `login.finish`, by profile.
    pub pending_logins: Mutex<HashMap<String, PendingLogin>>,
    /// Registered tools.
    pub tools: ToolRegistry,
    /// The HTTP gateway, once started.
    pub gateway: std::sync::OnceLock<Arc<crate::gateway::Gateway>>,
    /// The usage ledger's request side.
    pub usage: crate::usage::Recorder,
    /// `[cluster]` as read at start (a reload does not reconnect).
    cluster: Option<Arc<crate::cluster::Hub>>,
    config_path: PathBuf,
    config_explicit: bool,
    /// Read by every request of every connection, replaced only by a reload: a lock-free
    /// swap keeps readers from ever contending on it (or on each other).
    registry: ArcSwap<Registry>,
    /// Serializes reloads and profile rebuilds so neither overwrites the other.
    install_lock: Mutex<()>,
    watcher: Watcher,
}

impl Daemon {
    /// Builds the daemon from a loaded config. Fails (with a sentence for the user) when
    /// the HTTP client cannot be built: a client without llmd's timeouts is no fallback.
    pub fn new(
        config: Config,
        source: ConfigSource,
        config_path: PathBuf,
        config_explicit: bool,
    ) -> Result<Arc<Daemon>, String> {
        let (events, _) = broadcast::channel(256);
        let http = crate::providers::build_client(Duration::from_secs(10))?;
        let provider_http = crate::providers::HttpClients::new()?;
        let state_dir = config::state_dir(&config.daemon);
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(crate::cluster::Hub::new(
                crate::cluster::Settings::load(c).map_err(|e| format!("[cluster]: {e}"))?,
            ))),
            None => None,
        };
        let empty = Registry {
            config: Config::default(),
            source: source.clone(),
            state_dir: state_dir.clone(),
            profiles: BTreeMap::new(),
            pools: BTreeMap::new(),
        };
        let daemon = Arc::new(Daemon {
            started: Instant::now(),
            events,
            http,
            provider_http,
            shutdown: CancellationToken::new(),
            pending_logins: Mutex::new(HashMap::new()),
            tools: ToolRegistry::load(state_dir.join("tools.json")),
            gateway: std::sync::OnceLock::new(),
            usage: crate::usage::Recorder::start(&state_dir, &config.usage),
            cluster,
            config_path,
            config_explicit,
            registry: ArcSwap::from_pointee(empty),
            install_lock: Mutex::new(()),
            watcher: Watcher::spawn(),
        });
        daemon.install(config, source, &BTreeMap::new());
        Ok(daemon)
    }

    /// The current generation.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    /// The registry, borrowed for a moment: no reference count is taken (the hot path
    /// reads it at every request, from every connection).
    pub fn current(&self) -> arc_swap::Guard<Arc<Registry>> {
        self.registry.load()
    }

    /// A profile by name, or `unknown_profile` (`invalid_params` for a pool, which the
    /// methods that serve pools look up with [`Daemon::target`] first).
    pub fn profile(&self, name: &str) -> Result<Arc<Profile>, RpcError> {
        let reg = self.registry.load();
        if let Some(p) = reg.profiles.get(name) {
            return Ok(p.clone());
        }
        if let Some(pool) = reg.pools.get(name) {
            let members: Vec<&str> = pool.members.iter().map(|m| m.name.as_str()).collect();
            return Err(RpcError::invalid_params(format!(
                "`profile`: `{name}` is a pool; name one of its members ({})",
                members.join(", ")
            )));
        }
        Err(RpcError::unknown_profile(name))
    }

    /// A profile or a pool by name, or `unknown_profile`.
    pub fn target(&self, name: &str) -> Result<Target, RpcError> {
        Ok(match self.registry.load().target(name)? {
            TargetRef::Profile(p) => Target::Profile(p.clone()),
            TargetRef::Pool(p) => Target::Pool(p.clone()),
        })
    }

    /// Reads the config file again. On error the running config stays and the message
    /// says why.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let (config, source) = self.load_settled().await?;
        let old = self.registry();
        let names = self.install(config, source, &old.profiles);
        tracing::info!(profiles = ?names, "configuration reloaded");
        Ok(names)
    }

    /// Reads the config for a reload. An editor that saves without renaming truncates
    /// the file and then writes it, so the file is read until two reads a moment apart
    /// agree, and an empty file is refused rather than taken as "no profiles".
    async fn load_settled(&self) -> Result<(Config, ConfigSource), String> {
        const SETTLE: Duration = Duration::from_millis(50);
        const ATTEMPTS: usize = 20;
        let read = |path: PathBuf| async move {
            tokio::task::spawn_blocking(move || std::fs::read(&path).ok())
                .await
                .ok()
                .flatten()
        };
        let path = self.config_path.clone();
        let mut last = read(path.clone()).await;
        for _ in 0..ATTEMPTS {
            tokio::time::sleep(SETTLE).await;
            let now = read(path.clone()).await;
            if now == last {
                break;
            }
            last = now;
        }
        if last
            .as_deref()
            .is_some_and(|b| b.iter().all(u8::is_ascii_whitespace))
        {
            return Err(format!(
                "{} is empty (being written?); keeping the running configuration",
                path.display()
            ));
        }
        let path2 = path.clone();
        let explicit = self.config_explicit;
        tokio::task::spawn_blocking(move || config::load(&path2, explicit))
            .await
            .map_err(|e| format!("reload task failed: {e}"))?
            .map_err(|e| e.0)
    }

    /// Stops every login task, waiting at most `limit` for refreshes in flight: an exit in
    /// the middle of a refresh could lose the only copy of a rotated refresh token.
    pub async fn stop_logins(&self, limit: Duration) {
        let reg = self.registry();
        let stops = reg
            .profiles
            .values()
            .filter_map(|p| p.login())
            .map(|h| h.stop());
        if tokio::time::timeout(limit, futures_util::future::join_all(stops))
            .await
            .is_err()
        {
            tracing::warn!("a refresh was still running at exit");
        }
    }

    /// Rebuilds one profile from the current config (after its stored credential changed).
    pub fn rebuild_profile(&self, name: &str) {
        let _one_at_a_time = lock(&self.install_lock);
        let reg = self.registry();
        let mut keep = reg.profiles.clone();
        keep.remove(name);
        self.install_locked(reg.config.clone(), reg.source.clone(), &keep);
    }

    fn install(
        &self,
        config: Config,
        source: ConfigSource,
        reuse: &BTreeMap<String, Arc<Profile>>,
    ) -> Vec<String> {
        let _one_at_a_time = lock(&self.install_lock);
        self.install_locked(config, source, reuse)
    }

    /// Makes `config` current and points the file watcher at the new set. Login tasks are
    /// kept across reloads (they re-read their files instead) and shared by profiles that
    /// use the same login, so one login never has two refreshers.
    fn install_locked(
        &self,
        config: Config,
        source: ConfigSource,
        reuse: &BTreeMap<String, Arc<Profile>>,
    ) -> Vec<String> {
        let state_dir = config::state_dir(&config.daemon);
        let env = Env {
            state_dir: &state_dir,
            margin: Duration::from_secs(config.daemon.refresh_margin_secs),
            timeout: Duration::from_secs(config.daemon.refresh_timeout_secs),
            forced_interval: Duration::from_secs(config.daemon.forced_refresh_interval_secs),
            http: &self.http,
            events: &self.events,
            warn_at: &config.usage.warn_at,
            cluster: self.cluster.as_deref(),
        };
        let mut logins: Vec<_> = self
            .registry()
            .profiles
            .values()
            .chain(reuse.values())
            .filter_map(|p| Some((p.login_key(&env)?, p.login()?.clone())))
            .collect();
        let before: Vec<_> = logins.iter().map(|(_, h)| h.clone()).collect();
        let mut profiles = BTreeMap::new();
        for (name, cfg) in &config.profiles {
            let mut fresh = Profile::build(name, cfg, &env, &mut logins);
            // Limits belong to the traffic, not to the credential: keep the running
            // limiter when its settings did not change.
            if let Some(old) = reuse
                .get(name)
                .filter(|p| p.config.rate_limit == cfg.rate_limit)
            {
                fresh.limiter = old.limiter.clone();
            }
            // The provider's last report stays true across a reload.
            if let Some(old) = reuse
                .get(name)
                .filter(|p| p.config.provider == cfg.provider)
            {
                old.quota.set_warn_at(&config.usage.warn_at);
                fresh.quota = old.quota.clone();
            }
            profiles.insert(name.clone(), Arc::new(fresh));
        }
        // Tasks no profile uses any more stop now, not when the last in-flight request
        // drops its handle: a replaced task must not refresh alongside its successor.
        for old in &before {
            if !profiles
                .values()
                .any(|p: &Arc<Profile>| p.login().is_some_and(|h| h.same_task(old)))
            {
                old.retire();
            }
        }
        let targets = profiles
            .values()
            .filter_map(|p| {
                Some((
                    p.login_source(&state_dir)?.path(),
                    p.login()?.command_sender(),
                ))
            })
            .collect();
        self.watcher.set_targets(targets);
        self.usage.configure(&config.usage);
        let skip_at = config.usage.skip_at();
        let pools = config
            .pools
            .iter()
            .map(|(name, cfg)| {
                // Validation guarantees every member exists.
                let members = cfg
                    .pool
                    .iter()
                    .filter_map(|m| profiles.get(m).cloned())
                    .collect();
                (
                    name.clone(),
                    Arc::new(Pool::new(name, cfg.clone(), members, skip_at)),
                )
            })
            .collect();
        let names = profiles
            .keys()
            .chain(config.pools.keys())
            .cloned()
            .collect();
        let reg = Arc::new(Registry {
            config,
            source,
            state_dir,
            profiles,
            pools,
        });
        self.registry.store(reg);
        names
    }
}
