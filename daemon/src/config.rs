//! The TOML config of DESIGN.md ("Config"), parsed strictly, and the embedded default.

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// The whole config file. Deserialized by [`parse`] (a `[profiles.NAME]` table with a
/// `pool` key is a [`PoolConfig`], every other one a [`ProfileConfig`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `[daemon]`
    pub daemon: DaemonConfig,
    /// `[profiles.NAME]` that are not pools, ordered by name.
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// `[profiles.NAME]` with `pool = [...]`, ordered by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// `[gateway]`: the HTTP gateway; off when absent.
    pub gateway: Option<GatewayConfig>,
    /// `[cluster]`: share `cluster = true` logins through etcd; off when absent.
    pub cluster: Option<ClusterConfig>,
    /// `[usage]`: the usage ledger and quota warnings.
    pub usage: UsageConfig,
}

/// `[usage]`: what llmd records and watches of the traffic it carries (DESIGN.md, "Usage
/// ledger", "Quotas").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Record requests at all (off: nothing is written; `usage` shows what is there).
    pub enabled: bool,
    /// Rows older than this many days are deleted (0: kept forever).
    pub keep_days: u32,
    /// Quota shares (0 < x ≤ 1) whose upward crossing fires `profile.quota`; the highest
    /// is also where a pool stops picking a member.
    pub warn_at: Vec<f64>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            keep_days: 90,
            warn_at: vec![0.8, 0.95],
        }
    }
}

impl UsageConfig {
    /// The highest threshold: a pool member at or above it is skipped.
    pub fn skip_at(&self) -> f64 {
        self.warn_at.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// `[profiles.NAME]` with `pool = [...]`: one name serving from several member profiles.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Member profiles, in order (fill-first tries them in this order).
    pub pool: Vec<String>,
    /// How a member is picked.
    #[serde(default)]
    pub strategy: Strategy,
    /// An agent keeps its member this long (a warm prompt cache), when set.
    pub sticky_secs: Option<u64>,
}

/// How a pool picks a member among those available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The first available member in config order.
    #[default]
    FillFirst,
    /// Each request starts one member further than the previous one.
    RoundRobin,
    /// The member with the lowest reported quota use.
    LeastUsed,
}

impl Strategy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::FillFirst => "fill-first",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastUsed => "least-used",
        }
    }
}

const TOP_LEVEL: &[&str] = &["daemon", "profiles", "gateway", "usage", "cluster"];

/// Deserializes a [`Config`] knowing which profile tables are pools (found by a first,
/// untyped pass), so both kinds keep toml's exact error positions.
struct ConfigSeed<'a> {
    pools: &'a BTreeSet<String>,
}

impl<'de> DeserializeSeed<'de> for ConfigSeed<'_> {
    type Value = Config;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Config, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ConfigSeed<'_> {
    type Value = Config;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a config table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Config, A::Error> {
        let mut cfg = Config::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "daemon" => cfg.daemon = map.next_value()?,
                "gateway" => cfg.gateway = map.next_value()?,
                "usage" => cfg.usage = map.next_value()?,
                "cluster" => cfg.cluster = map.next_value()?,
                "profiles" => {
                    let (profiles, pools) =
                        map.next_value_seed(ProfilesSeed { pools: self.pools })?;
                    cfg.profiles = profiles;
                    cfg.pools = pools;
                }
                other => return Err(de::Error::unknown_field(other, TOP_LEVEL)),
            }
        }
        Ok(cfg)
    }
}

struct ProfilesSeed<'a> {
    pools: &'a BTreeSet<String>,
}

type ProfileMaps = (
    BTreeMap<String, ProfileConfig>,
    BTreeMap<String, PoolConfig>,
);

impl<'de> DeserializeSeed<'de> for ProfilesSeed<'_> {
    type Value = ProfileMaps;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ProfileMaps, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ProfilesSeed<'_> {
    type Value = ProfileMaps;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table of profiles")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ProfileMaps, A::Error> {
        let (mut profiles, mut pools) = (BTreeMap::new(), BTreeMap::new());
        while let Some(name) = map.next_key::<String>()? {
            if self.pools.contains(&name) {
                pools.insert(name, map.next_value::<PoolConfig>()?);
            } else {
                profiles.insert(name, map.next_value::<ProfileConfig>()?);
            }
        }
        Ok((profiles, pools))
    }
}

/// Names of the `[profiles.NAME]` tables holding a `pool` key; empty when the text does
/// not parse (the typed pass then reports why).
fn pool_names(text: &str) -> BTreeSet<String> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return BTreeSet::new();
    };
    let Some(toml::Value::Table(profiles)) = table.get("profiles") else {
        return BTreeSet::new();
    };
    profiles
        .iter()
        .filter(|(_, v)| v.as_table().is_some_and(|t| t.contains_key("pool")))
        .map(|(k, _)| k.clone())
        .collect()
}

/// `[cluster]`: several llmd instances share logins through an etcd cluster (DESIGN.md,
/// "Cluster").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://` or `https://`).
    pub etcd: Vec<String>,
    /// Key prefix; default `/llmd/<user>/`.
    pub prefix: Option<String>,
    /// This instance's name in `status` (default: host name and uid).
    pub name: Option<String>,
    /// TTL of the ownership lease.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// CA bundle for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client key (with `cert_file`).
    pub key_file: Option<PathBuf>,
    /// etcd user (with `password_file`).
    pub username: Option<String>,
    /// File holding the etcd user's password.
    pub password_file: Option<PathBuf>,
    /// 0600 file with the 32-byte secret (raw or 64 hex characters) every instance shares.
    pub seal_key_file: PathBuf,
}

fn default_lease_secs() -> u64 {
    10
}

/// `[gateway]`: the providers' own HTTP APIs on loopback (DESIGN.md, "Gateway").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `127.0.0.1:PORT` (or another loopback address); non-loopback is refused.
    pub listen: Option<String>,
    /// A Unix socket (0600, in the socket folder) serving the same routes.
    pub unix: Option<PathBuf>,
    /// `Origin` values accepted; requests with any other `Origin` are refused.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body.
    #[serde(default = "default_gateway_body")]
    pub max_body_bytes: usize,
}

fn default_gateway_body() -> usize {
    32 << 20
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Socket path.
    pub socket: Option<PathBuf>,
    /// Where stored keys and OAuth bundles live.
    pub state_dir: Option<PathBuf>,
    /// Refresh OAuth tokens this long before they expire.
    pub refresh_margin_secs: u64,
    /// Give up on one upstream refresh call after this long.
    pub refresh_timeout_secs: u64,
    /// Explicit `refresh` calls of one login while its token is valid are let through at
    /// most this often (0: no limit); others get `rate_limited`.
    pub forced_refresh_interval_secs: u64,
    /// Longest accepted request line.
    pub max_frame_bytes: usize,
    /// Concurrent client connections; more are answered `busy`.
    pub max_connections: usize,
    /// Responses queued for a client that does not read before it is disconnected.
    pub max_queued_responses: usize,
    /// A connection holding half a line this long is closed.
    pub idle_timeout_secs: u64,
    /// How long SIGTERM waits for in-flight requests.
    pub shutdown_grace_secs: u64,
    /// Registered tools kept at most; more are refused with `busy`.
    pub max_tools: usize,
    /// Largest accepted tool definition (its JSON), in bytes.
    pub max_tool_bytes: usize,
    /// Other uids admitted to the socket with the agent methods only (see `access.rs`).
    pub allow_uids: Vec<u32>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            state_dir: None,
            refresh_margin_secs: 300,
            refresh_timeout_secs: 30,
            forced_refresh_interval_secs: 5,
            max_frame_bytes: llmd_proto::DEFAULT_MAX_FRAME_BYTES,
            max_connections: 1024,
            max_queued_responses: 1024,
            idle_timeout_secs: 60,
            shutdown_grace_secs: 10,
            max_tools: 256,
            max_tool_bytes: 32 * 1024,
            allow_uids: Vec::new(),
        }
    }
}

/// Which API a profile talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Anthropic Messages API.
    Anthropic,
    /// Any OpenAI-format chat completions server.
    OpenaiCompat,
    /// Google Gemini.
    Gemini,
    /// MiniMax.
    Minimax,
}

impl Provider {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenaiCompat => "openai-compat",
            Provider::Gemini => "gemini",
            Provider::Minimax => "minimax",
        }
    }

    /// The environment variable read for an API key when the profile names none.
    /// Every provider, in the order `status` lists their key variables.
    pub const ALL: [Provider; 4] = [
        Provider::Anthropic,
        Provider::OpenaiCompat,
        Provider::Gemini,
        Provider::Minimax,
    ];

    /// The standard environment variable holding this provider's API key.
    pub fn default_key_env(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_API_KEY",
            Provider::OpenaiCompat => "OPENAI_API_KEY",
            Provider::Gemini => "GEMINI_API_KEY",
            Provider::Minimax => "MINIMAX_API_KEY",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a profile authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// A static API key.
    ApiKey,
    /// An Anthropic setup-token (long-lived OAuth access token).
    SetupToken,
    /// An OAuth login whose bundle llmd keeps.
    Oauth,
    /// Claude Code's own login in `.credentials.json`.
    ClaudeCli,
    /// The tokens of a profile of another llmd, reached through `upstream_socket`.
    Upstream,
}

impl AuthKind {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthKind::ApiKey => "api-key",
            AuthKind::SetupToken => "setup-token",
            AuthKind::Oauth => "oauth",
            AuthKind::ClaudeCli => "claude-cli",
            AuthKind::Upstream => "upstream",
        }
    }

    /// True for logins that llmd refreshes.
    pub fn is_login(self) -> bool {
        matches!(self, AuthKind::Oauth | AuthKind::ClaudeCli)
    }
}

impl fmt::Display for AuthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[profiles.NAME]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Provider API.
    pub provider: Provider,
    /// Auth kind.
    pub auth: AuthKind,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File (0600) holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// OAuth bundle path (default: `<state_dir>/oauth/<profile>.json`).
    pub bundle: Option<PathBuf>,
    /// OAuth token endpoint.
    pub token_endpoint: Option<String>,
    /// OAuth authorize URL (login).
    pub authorize_url: Option<String>,
    /// OAuth redirect URI (login).
    pub redirect_uri: Option<String>,
    /// OAuth scopes requested at login.
    pub scopes: Option<Vec<String>>,
    /// OAuth client id.
    pub client_id: Option<String>,
    /// API base URL.
    pub base_url: Option<String>,
    /// Model used when a request names none.
    pub default_model: Option<String>,
    /// Claude Code config folder (default `$CLAUDE_CONFIG_DIR` or `~/.claude`).
    pub claude_config_dir: Option<PathBuf>,
    /// MiniMax group id, sent as `X-MiniMax-Group-Id`.
    pub group_id: Option<String>,
    /// MiniMax OAuth region base (default `https://api.minimax.io`).
    pub region: Option<String>,
    /// Headers added to every provider request.
    #[serde(default)]
    pub extra_headers: BTreeMap<String, String>,
    /// Shared limits of this profile.
    pub rate_limit: Option<RateLimitConfig>,
    /// Serve a subscription login (`oauth`, `claude-cli`, `setup-token`) through the
    /// HTTP gateway too.
    #[serde(default)]
    pub gateway: bool,
    /// Provider call timeouts (`[profiles.NAME.timeouts]`).
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// `auth = "upstream"`: the upstream llmd's socket.
    pub upstream_socket: Option<PathBuf>,
    /// `auth = "upstream"`: the upstream profile (default: this profile's name).
    pub upstream_profile: Option<String>,
    /// `auth = "upstream"`: a Claude Code config folder whose `.credentials.json` mirrors
    /// the upstream login.
    pub mirror_claude_config_dir: Option<PathBuf>,
    /// Share this login with the other instances of `[cluster]`.
    #[serde(default)]
    pub cluster: bool,
}

/// `[profiles.NAME.timeouts]`: how long one provider call may take at each stage. A call
/// that runs over fails with `upstream`, naming the host and the timeout that fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// TCP and TLS connection set-up.
    pub connect_secs: u64,
    /// From sending the request until the answer's headers arrive.
    pub first_byte_secs: u64,
    /// Longest silence between two stream events.
    pub stream_idle_secs: u64,
    /// Whole non-streaming call, body included.
    pub total_secs: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect_secs: 10,
            first_byte_secs: 120,
            stream_idle_secs: 90,
            total_secs: 600,
        }
    }
}

/// `[profiles.NAME.rate_limit]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per minute.
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Concurrent requests.
    pub max_concurrent: Option<u32>,
}

impl ProfileConfig {
    /// A bare profile of `provider` with `auth` and nothing else set.
    pub fn new(provider: Provider, auth: AuthKind) -> Self {
        ProfileConfig {
            provider,
            auth,
            api_key_env: None,
            api_key_file: None,
            bundle: None,
            token_endpoint: None,
            authorize_url: None,
            redirect_uri: None,
            scopes: None,
            client_id: None,
            base_url: None,
            default_model: None,
            claude_config_dir: None,
            group_id: None,
            region: None,
            extra_headers: BTreeMap::new(),
            rate_limit: None,
            gateway: false,
            timeouts: TimeoutConfig::default(),
            upstream_socket: None,
            upstream_profile: None,
            mirror_claude_config_dir: None,
            cluster: false,
        }
    }
}

/// A config that could not be used; the message names the file, line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where the config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file that exists.
    File(PathBuf),
    /// No file: the embedded default.
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded => f.write_str("embedded default"),
        }
    }
}

/// The config path: an explicit one (flag or `LLMD_CONFIG`), else
/// `$XDG_CONFIG_HOME/llmd/config.toml`, else `~/.config/llmd/config.toml`.
pub fn config_path(explicit: Option<PathBuf>) -> (PathBuf, bool) {
    if let Some(p) = explicit.or_else(|| env_path("LLMD_CONFIG")) {
        return (p, true);
    }
    let base = env_path("XDG_CONFIG_HOME").unwrap_or_else(|| home_dir().join(".config"));
    (base.join("llmd").join("config.toml"), false)
}

/// The state folder: `[daemon] state_dir`, else `$XDG_STATE_HOME/llmd`, else
/// `~/.local/state/llmd`.
pub fn state_dir(cfg: &DaemonConfig) -> PathBuf {
    cfg.state_dir.clone().unwrap_or_else(|| {
        env_path("XDG_STATE_HOME")
            .unwrap_or_else(|| home_dir().join(".local").join("state"))
            .join("llmd")
    })
}

/// The user's home folder (`$HOME`, falling back to `/`).
pub fn home_dir() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}

/// Claude Code's config folder for a profile: its `claude_config_dir`, else
/// `$CLAUDE_CONFIG_DIR`, else `~/.claude`.
pub fn claude_dir(profile: &ProfileConfig) -> PathBuf {
    profile
        .claude_config_dir
        .clone()
        .or_else(|| env_path("CLAUDE_CONFIG_DIR"))
        .unwrap_or_else(|| home_dir().join(".claude"))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Loads the config from `path`; a missing file that was not asked for explicitly gives
/// the embedded default.
pub fn load(path: &Path, explicit: bool) -> Result<(Config, ConfigSource), ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((parse(&text, path)?, ConfigSource::File(path.to_path_buf()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok((embedded_default(), ConfigSource::Embedded))
        }
        Err(e) => Err(ConfigError(format!(
            "{}: cannot read config: {e}",
            path.display()
        ))),
    }
}

/// Parses and validates config text; errors name `path`, the line and the key.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let pools = pool_names(text);
    let seed = ConfigSeed { pools: &pools };
    let cfg: Config = seed
        .deserialize(toml::Deserializer::new(text))
        .map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError(format!(
                "{}:{line}:{col}: {}",
                path.display(),
                e.message().trim()
            ))
        })?;
    let mut cfg = cfg;
    expand_paths(&mut cfg)
        .and_then(|()| validate(&cfg))
        .map_err(|(profile, key, msg)| {
            let line = profile
                .as_deref()
                .filter(|p| *p != GATEWAY_TABLE && *p != USAGE_TABLE && *p != CLUSTER_TABLE)
                .and_then(|p| find_key_line(text, p, key))
                .unwrap_or(1);
            let name = match profile {
                Some(p) if p == GATEWAY_TABLE => format!("gateway.{key}"),
                Some(p) if p == USAGE_TABLE => format!("usage.{key}"),
                Some(p) if p == CLUSTER_TABLE => format!("cluster.{key}"),
                Some(p) => format!("profiles.{p}.{key}"),
                None => format!("daemon.{key}"),
            };
            ConfigError(format!("{}:{line}: `{name}`: {msg}", path.display()))
        })?;
    Ok(cfg)
}

type Invalid = (Option<String>, &'static str, String);

/// Expands `~` and `$VAR` in every path setting, as the README's examples assume.
fn expand_paths(cfg: &mut Config) -> Result<(), Invalid> {
    fn one(
        profile: Option<&str>,
        key: &'static str,
        slot: &mut Option<PathBuf>,
    ) -> Result<(), Invalid> {
        if let Some(p) = slot.as_ref() {
            let raw = p.to_string_lossy().into_owned();
            let expanded = llmd_proto::paths::expand_path(&raw)
                .map_err(|e| (profile.map(str::to_owned), key, e))?;
            if !expanded.is_absolute() {
                return Err((
                    profile.map(str::to_owned),
                    key,
                    format!("`{raw}` is not an absolute path (`~` and `$VAR` are expanded)"),
                ));
            }
            *slot = Some(expanded);
        }
        Ok(())
    }
    one(None, "socket", &mut cfg.daemon.socket)?;
    one(None, "state_dir", &mut cfg.daemon.state_dir)?;
    if let Some(c) = cfg.cluster.as_mut() {
        let mut seal = Some(std::mem::take(&mut c.seal_key_file));
        one(Some(CLUSTER_TABLE), "seal_key_file", &mut seal)?;
        c.seal_key_file = seal.unwrap_or_default();
        one(Some(CLUSTER_TABLE), "ca_file", &mut c.ca_file)?;
        one(Some(CLUSTER_TABLE), "cert_file", &mut c.cert_file)?;
        one(Some(CLUSTER_TABLE), "key_file", &mut c.key_file)?;
        one(Some(CLUSTER_TABLE), "password_file", &mut c.password_file)?;
    }
    for (name, p) in cfg.profiles.iter_mut() {
        one(Some(name), "api_key_file", &mut p.api_key_file)?;
        one(Some(name), "bundle", &mut p.bundle)?;
        one(Some(name), "claude_config_dir", &mut p.claude_config_dir)?;
        one(Some(name), "upstream_socket", &mut p.upstream_socket)?;
        one(
            Some(name),
            "mirror_claude_config_dir",
            &mut p.mirror_claude_config_dir,
        )?;
    }
    Ok(())
}

fn validate(cfg: &Config) -> Result<(), Invalid> {
    let d = &cfg.daemon;
    if d.max_frame_bytes < 1024 {
        return Err((None, "max_frame_bytes", "must be at least 1024".into()));
    }
    if d.max_connections == 0 {
        return Err((None, "max_connections", "must be at least 1".into()));
    }
    if d.max_queued_responses == 0 {
        return Err((None, "max_queued_responses", "must be at least 1".into()));
    }
    if d.max_tool_bytes < 1024 {
        return Err((None, "max_tool_bytes", "must be at least 1024".into()));
    }
    // `tools.list` carries every tool in one line, which a client must be able to read.
    if d.max_tools.saturating_mul(d.max_tool_bytes) > 64 * 1024 * 1024 {
        return Err((
            None,
            "max_tools",
            "`max_tools` × `max_tool_bytes` must stay within 64 MiB".into(),
        ));
    }
    if d.refresh_timeout_secs == 0 {
        return Err((None, "refresh_timeout_secs", "must be at least 1".into()));
    }
    if let Some(g) = &cfg.gateway {
        validate_gateway(g).map_err(|(key, msg)| (Some(GATEWAY_TABLE.into()), key, msg))?;
    }
    validate_usage(&cfg.usage).map_err(|msg| (Some(USAGE_TABLE.into()), "warn_at", msg))?;
    for (name, pool) in &cfg.pools {
        validate_pool(name, pool, cfg).map_err(|msg| (Some(name.clone()), "pool", msg))?;
    }
    if let Some(c) = &cfg.cluster {
        validate_cluster(c).map_err(|(key, msg)| (Some(CLUSTER_TABLE.into()), key, msg))?;
    }
    for (name, p) in &cfg.profiles {
        let bad = |key, msg: String| Err((Some(name.clone()), key, msg));
        let t = &p.timeouts;
        if [
            t.connect_secs,
            t.first_byte_secs,
            t.stream_idle_secs,
            t.total_secs,
        ]
        .contains(&0)
        {
            return bad("timeouts", "every timeout must be at least 1 second".into());
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(
                "provider",
                "profile names may use only letters, digits, `-`, `_` and `.`".into(),
            );
        }
        let allowed: &[AuthKind] = match p.provider {
            Provider::Anthropic => &[
                AuthKind::ApiKey,
                AuthKind::SetupToken,
                AuthKind::Oauth,
                AuthKind::ClaudeCli,
                AuthKind::Upstream,
            ],
            Provider::Minimax => &[AuthKind::ApiKey, AuthKind::Oauth, AuthKind::Upstream],
            Provider::OpenaiCompat | Provider::Gemini => &[AuthKind::ApiKey, AuthKind::Upstream],
        };
        if !allowed.contains(&p.auth) {
            let list: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
            return bad(
                "auth",
                format!(
                    "`{}` is not available for provider `{}` (use {})",
                    p.auth,
                    p.provider,
                    list.join(", ")
                ),
            );
        }
        if let Some(rl) = &p.rate_limit {
            let zero = [
                ("requests_per_minute", rl.requests_per_minute.map(u64::from)),
                ("tokens_per_minute", rl.tokens_per_minute),
                ("max_concurrent", rl.max_concurrent.map(u64::from)),
            ]
            .into_iter()
            .find(|(_, v)| *v == Some(0));
            if let Some((key, _)) = zero {
                return bad(
                    "rate_limit",
                    format!("`{key}` must be at least 1 (leave it out for no limit)"),
                );
            }
        }
        if p.api_key_env.is_some() && p.api_key_file.is_some() {
            return bad(
                "api_key_file",
                "set either `api_key_env` or `api_key_file`, not both".into(),
            );
        }
        if !matches!(p.auth, AuthKind::ApiKey | AuthKind::SetupToken) {
            let key = if p.api_key_env.is_some() {
                "api_key_env"
            } else {
                "api_key_file"
            };
            if p.api_key_env.is_some() || p.api_key_file.is_some() {
                return bad(
                    key,
                    format!(
                        "only api-key and setup-token profiles read a key, not `{}`",
                        p.auth
                    ),
                );
            }
        }
        if p.bundle.is_some() && p.auth != AuthKind::Oauth {
            return bad(
                "bundle",
                "only `auth = \"oauth\"` profiles use a bundle".into(),
            );
        }
        if p.claude_config_dir.is_some() && p.auth != AuthKind::ClaudeCli {
            return bad(
                "claude_config_dir",
                "only `auth = \"claude-cli\"` profiles use it".into(),
            );
        }
        validate_upstream(p).map_err(|(key, msg)| (Some(name.clone()), key, msg))?;
        if p.cluster && !p.auth.is_login() {
            return bad(
                "cluster",
                "only `oauth` and `claude-cli` logins can be shared".into(),
            );
        }
        if p.cluster && cfg.cluster.is_none() {
            return bad(
                "cluster",
                "`cluster = true` needs a `[cluster]` section with `etcd = [...]`".into(),
            );
        }
        for (key, url) in [
            ("base_url", &p.base_url),
            ("token_endpoint", &p.token_endpoint),
            ("authorize_url", &p.authorize_url),
            ("region", &p.region),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return bad(key, format!("`{u}` is not an http(s) URL"));
                }
            }
        }
        for (k, v) in &p.extra_headers {
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("extra_headers", format!("`{k}` is not a valid header name"));
            }
            if v.bytes().any(|b| b == b'\r' || b == b'\n') {
                return bad(
                    "extra_headers",
                    format!("value of `{k}` contains a line break"),
                );
            }
        }
    }
    Ok(())
}

/// The follower keys (DESIGN.md, "Followers").
fn validate_upstream(p: &ProfileConfig) -> Result<(), (&'static str, String)> {
    if p.auth == AuthKind::Upstream {
        if p.upstream_socket.is_none() {
            return Err((
                "auth",
                "`auth = \"upstream\"` needs `upstream_socket = \"PATH\"`".into(),
            ));
        }
        if let Some(n) = &p.upstream_profile {
            if n.is_empty() || n.len() > 256 {
                return Err(("upstream_profile", "must be a profile name".into()));
            }
        }
        if p.mirror_claude_config_dir.is_some() && p.provider != Provider::Anthropic {
            return Err((
                "mirror_claude_config_dir",
                "only anthropic profiles can be mirrored into Claude Code".into(),
            ));
        }
        return Ok(());
    }
    for (key, set) in [
        ("upstream_socket", p.upstream_socket.is_some()),
        ("upstream_profile", p.upstream_profile.is_some()),
        (
            "mirror_claude_config_dir",
            p.mirror_claude_config_dir.is_some(),
        ),
    ] {
        if set {
            return Err((key, "only `auth = \"upstream\"` profiles use it".into()));
        }
    }
    Ok(())
}

/// Marks a `[cluster]` error in [`Invalid`].
const CLUSTER_TABLE: &str = "\0cluster";

fn validate_cluster(c: &ClusterConfig) -> Result<(), (&'static str, String)> {
    if c.etcd.is_empty() {
        return Err(("etcd", "list at least one etcd endpoint".into()));
    }
    if let Some(u) = c
        .etcd
        .iter()
        .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
    {
        return Err(("etcd", format!("`{u}` is not an http(s) URL")));
    }
    if c.lease_secs < 2 || c.lease_secs > 3600 {
        return Err(("lease_secs", "must be between 2 and 3600".into()));
    }
    if c.cert_file.is_some() != c.key_file.is_some() {
        return Err(("cert_file", "set both `cert_file` and `key_file`".into()));
    }
    if c.username.is_some() != c.password_file.is_some() {
        return Err(("username", "set both `username` and `password_file`".into()));
    }
    if let Some(p) = &c.prefix {
        if !p.starts_with('/') || !p.ends_with('/') {
            return Err(("prefix", "must start and end with `/`".into()));
        }
    }
    Ok(())
}

/// Marks a `[gateway]` error in [`Invalid`] (whose first field otherwise names a profile).
const GATEWAY_TABLE: &str = "\0gateway";
/// Marks a `[usage]` error in [`Invalid`].
const USAGE_TABLE: &str = "\0usage";

fn validate_usage(u: &UsageConfig) -> Result<(), String> {
    if u.warn_at.iter().any(|t| !(*t > 0.0 && *t <= 1.0)) {
        return Err("every threshold must be above 0 and at most 1 (0.8 is 80%)".into());
    }
    Ok(())
}

/// DESIGN.md, "Pools": real members, one provider, no nesting.
fn validate_pool(name: &str, pool: &PoolConfig, cfg: &Config) -> Result<(), String> {
    if !valid_name(name) {
        return Err("profile names may use only letters, digits, `-`, `_` and `.`".into());
    }
    let Some(first) = pool.pool.first() else {
        return Err(format!("pool `{name}` is empty: list at least one profile"));
    };
    let mut seen = BTreeSet::new();
    for member in &pool.pool {
        if !seen.insert(member) {
            return Err(format!("pool `{name}` lists `{member}` twice"));
        }
        if cfg.pools.contains_key(member) {
            return Err(format!(
                "pool `{name}` lists `{member}`, which is a pool itself; pools cannot contain pools"
            ));
        }
        if !cfg.profiles.contains_key(member) {
            return Err(format!(
                "pool `{name}` lists `{member}`, which is not a configured profile"
            ));
        }
    }
    let provider = |m: &str| cfg.profiles.get(m).map(|p| p.provider);
    if let Some(other) = pool.pool.iter().find(|m| provider(m) != provider(first)) {
        let show = |m: &str| provider(m).map_or("?", Provider::as_str);
        return Err(format!(
            "pool `{name}` mixes providers: `{first}` is {} but `{other}` is {}; members must share a provider",
            show(first),
            show(other)
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn validate_gateway(g: &GatewayConfig) -> Result<(), (&'static str, String)> {
    if g.listen.is_none() && g.unix.is_none() {
        return Err((
            "listen",
            "set `listen = \"127.0.0.1:PORT\"` (or `unix`), or leave `[gateway]` out".into(),
        ));
    }
    if let Some(l) = &g.listen {
        let addr: std::net::SocketAddr = l
            .parse()
            .map_err(|_| ("listen", format!("`{l}` is not an IP:PORT address")))?;
        if !addr.ip().is_loopback() {
            return Err((
                "listen",
                format!(
                    "`{l}` is not a loopback address; the gateway binds only 127.0.0.0/8 or ::1"
                ),
            ));
        }
    }
    if let Some(u) = &g.unix {
        if !u.is_absolute() {
            return Err(("unix", format!("`{}` is not an absolute path", u.display())));
        }
    }
    if g.max_body_bytes < 1024 {
        return Err(("max_body_bytes", "must be at least 1024".into()));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// The line of `key` inside `[profiles.NAME]`, else of the table header.
fn find_key_line(text: &str, profile: &str, key: &str) -> Option<usize> {
    let header = format!("[profiles.{profile}]");
    let quoted = format!("[profiles.\"{profile}\"]");
    let mut in_table = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_table.is_some() {
                break;
            }
            if t == header || t == quoted {
                in_table = Some(i + 1);
            }
        } else if in_table.is_some() && t.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    in_table
}

/// The config used when no file exists: one api-key profile per provider whose standard
/// environment variable is set, and `claude` when Claude Code's login file exists.
pub fn embedded_default() -> Config {
    let mut profiles = BTreeMap::new();
    for (name, provider) in [
        ("anthropic", Provider::Anthropic),
        ("openai", Provider::OpenaiCompat),
        ("gemini", Provider::Gemini),
        ("minimax", Provider::Minimax),
    ] {
        if std::env::var_os(provider.default_key_env()).is_some_and(|v| !v.is_empty()) {
            profiles.insert(
                name.to_string(),
                ProfileConfig::new(provider, AuthKind::ApiKey),
            );
        }
    }
    let claude = ProfileConfig::new(Provider::Anthropic, AuthKind::ClaudeCli);
    if claude_dir(&claude).join(".credentials.json").exists() {
        profiles.insert("claude".to_string(), claude);
    }
    Config {
        profiles,
        ..Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/llmd.toml"))
    }

    #[test]
    fn cluster_settings_are_checked() {
        let ok = p("[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nseal_key_file = \"/k\"\n\n[profiles.w]\nprovider = \"anthropic\"\nauth = \"oauth\"\ncluster = true\n")
            .expect("valid");
        let c = ok.cluster.expect("cluster");
        assert_eq!(c.lease_secs, 10);
        assert!(ok.profiles["w"].cluster);
        let no_section =
            p("[profiles.w]\nprovider = \"anthropic\"\nauth = \"oauth\"\ncluster = true\n")
                .unwrap_err();
        assert!(no_section.0.contains("profiles.w.cluster"), "{no_section}");
        let not_login = p("[cluster]\netcd = [\"http://e:2379\"]\nseal_key_file = \"/k\"\n[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\ncluster = true\n")
            .unwrap_err();
        assert!(
            not_login.0.contains("only `oauth` and `claude-cli`"),
            "{not_login}"
        );
        for (bad, key) in [
            ("etcd = []\nseal_key_file = \"/k\"", "cluster.etcd"),
            (
                "etcd = [\"e:2379\"]\nseal_key_file = \"/k\"",
                "cluster.etcd",
            ),
            (
                "etcd = [\"http://e\"]\nseal_key_file = \"/k\"\nlease_secs = 1",
                "cluster.lease_secs",
            ),
            (
                "etcd = [\"http://e\"]\nseal_key_file = \"k\"",
                "cluster.seal_key_file",
            ),
            (
                "etcd = [\"http://e\"]\nseal_key_file = \"/k\"\ncert_file = \"/c\"",
                "cluster.cert_file",
            ),
            (
                "etcd = [\"http://e\"]\nseal_key_file = \"/k\"\nprefix = \"llmd\"",
                "cluster.prefix",
            ),
        ] {
            let e = p(&format!("[cluster]\n{bad}\n")).unwrap_err();
            assert!(e.0.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn full_example_parses() {
        let cfg = p(r#"
[daemon]
socket = "/run/user/1000/llmd/llmd.sock"
refresh_margin_secs = 300
max_frame_bytes = 16777216
max_connections = 1024

[profiles.claude]
provider = "anthropic"
auth = "claude-cli"
extra_headers = { "x-custom" = "v" }
[profiles.claude.rate_limit]
requests_per_minute = 50
tokens_per_minute = 400000
max_concurrent = 8

[profiles.ds]
provider = "openai-compat"
auth = "api-key"
api_key_env = "DEEPSEEK_API_KEY"
base_url = "https://api.deepseek.com/v1"
"#)
        .unwrap();
        assert_eq!(cfg.profiles["claude"].auth, AuthKind::ClaudeCli);
        assert_eq!(
            cfg.profiles["claude"]
                .rate_limit
                .as_ref()
                .unwrap()
                .max_concurrent,
            Some(8)
        );
        assert_eq!(cfg.profiles["ds"].provider, Provider::OpenaiCompat);
        assert_eq!(cfg.daemon.refresh_margin_secs, 300);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = p("[daemon]\nmax_connections = 4\n\n[profiles.a]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_kee_env = \"X\"\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("/etc/llmd.toml:7:"), "{e}");
        assert!(e.contains("api_kee_env"), "{e}");
    }

    #[test]
    fn bad_value_names_line() {
        let e = p("[daemon]\nmax_connections = \"many\"\n").unwrap_err().0;
        assert!(e.starts_with("/etc/llmd.toml:2:"), "{e}");
        let e = p("[profiles.x]\nprovider = \"cohere\"\nauth = \"api-key\"\n")
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("/etc/llmd.toml:2:") && e.contains("cohere"),
            "{e}"
        );
    }

    #[test]
    fn auth_not_available_for_provider() {
        let e = p("[profiles.g]\nprovider = \"gemini\"\nauth = \"oauth\"\n")
            .unwrap_err()
            .0;
        assert!(
            e.contains("/etc/llmd.toml:3:") && e.contains("profiles.g.auth"),
            "{e}"
        );
    }

    #[test]
    fn bad_urls_and_headers_rejected() {
        let e =
            p("[profiles.g]\nprovider = \"gemini\"\nauth = \"api-key\"\nbase_url = \"ftp://x\"\n")
                .unwrap_err()
                .0;
        assert!(
            e.contains("profiles.g.base_url") && e.contains(":4:"),
            "{e}"
        );
        let e = p("[profiles.g]\nprovider = \"gemini\"\nauth = \"api-key\"\nextra_headers = { \"a b\" = \"v\" }\n")
            .unwrap_err()
            .0;
        assert!(e.contains("extra_headers"), "{e}");
    }

    #[test]
    fn zero_rate_limits_rejected() {
        let e = p("[profiles.g]\nprovider = \"gemini\"\nauth = \"api-key\"\n[profiles.g.rate_limit]\nmax_concurrent = 0\n")
            .unwrap_err()
            .0;
        assert!(
            e.contains("max_concurrent") && e.contains("at least 1"),
            "{e}"
        );
    }

    #[test]
    fn gateway_listens_only_on_loopback() {
        let cfg = p("[gateway]\nlisten = \"127.0.0.1:8765\"\n").unwrap();
        assert_eq!(
            cfg.gateway.unwrap().listen.as_deref(),
            Some("127.0.0.1:8765")
        );
        for bad in ["0.0.0.0:8765", "192.168.1.2:80", "localhost:80"] {
            let e = p(&format!("[gateway]\nlisten = \"{bad}\"\n"))
                .unwrap_err()
                .0;
            assert!(e.contains("gateway.listen"), "{e}");
        }
        let cfg =
            p("[profiles.c]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\ngateway = true\n")
                .unwrap();
        assert!(cfg.profiles["c"].gateway);
    }

    #[test]
    fn follower_keys_are_checked() {
        let cfg = p("[daemon]\nallow_uids = [2000]\n\n[profiles.f]\nprovider = \"anthropic\"\nauth = \"upstream\"\nupstream_socket = \"~/llmd-host.sock\"\nmirror_claude_config_dir = \"~/.claude\"\n")
            .unwrap();
        let f = &cfg.profiles["f"];
        assert!(f.upstream_socket.as_ref().unwrap().is_absolute());
        assert!(f.mirror_claude_config_dir.as_ref().unwrap().is_absolute());
        assert_eq!(cfg.daemon.allow_uids, vec![2000]);
        let e = p("[profiles.f]\nprovider = \"anthropic\"\nauth = \"upstream\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("upstream_socket"), "{e}");
        let e = p("[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\nupstream_socket = \"/s\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("profiles.k.upstream_socket"), "{e}");
        let e = p("[profiles.g]\nprovider = \"gemini\"\nauth = \"upstream\"\nupstream_socket = \"/s\"\nmirror_claude_config_dir = \"/m\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("mirror_claude_config_dir"), "{e}");
    }

    const MEMBERS: &str = "[profiles.a]\nprovider = \"anthropic\"\nauth = \"api-key\"\n\n[profiles.b]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\n\n";

    #[test]
    fn pools_parse_with_their_strategy() {
        let cfg = p(&format!(
            "{MEMBERS}[profiles.team]\npool = [\"a\", \"b\"]\nstrategy = \"least-used\"\nsticky_secs = 300\n"
        ))
        .unwrap();
        let team = &cfg.pools["team"];
        assert_eq!(team.pool, ["a", "b"]);
        assert_eq!(team.strategy, Strategy::LeastUsed);
        assert_eq!(team.sticky_secs, Some(300));
        assert!(!cfg.profiles.contains_key("team"));
        let cfg = p(&format!("{MEMBERS}[profiles.team]\npool = [\"a\"]\n")).unwrap();
        assert_eq!(cfg.pools["team"].strategy, Strategy::FillFirst);
        assert_eq!(cfg.usage.warn_at, [0.8, 0.95]);
    }

    #[test]
    fn bad_pools_are_refused_naming_the_pool() {
        for (pool, want) in [
            ("pool = [\"a\", \"o\"]", "pool `team` mixes providers"),
            (
                "pool = [\"a\", \"nobody\"]",
                "`nobody`, which is not a configured profile",
            ),
            ("pool = []", "pool `team` is empty"),
            ("pool = [\"a\", \"a\"]", "lists `a` twice"),
            (
                "pool = [\"a\", \"inner\"]",
                "`inner`, which is a pool itself",
            ),
        ] {
            let e = p(&format!(
                "{MEMBERS}[profiles.inner]\npool = [\"b\"]\n\n[profiles.team]\n{pool}\n"
            ))
            .unwrap_err()
            .0;
            assert!(e.contains("profiles.team.pool") && e.contains(want), "{e}");
            assert!(e.contains(":17:"), "the line of `pool`: {e}");
        }
        let e = p(&format!(
            "{MEMBERS}[profiles.team]\npool = [\"a\"]\nprovider = \"anthropic\"\n"
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("provider"), "a pool takes only pool keys: {e}");
        let e = p(&format!(
            "{MEMBERS}[profiles.team]\npool = [\"a\"]\nstrategy = \"random\"\n"
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("random") && e.contains(":15:"), "{e}");
    }

    #[test]
    fn warn_at_must_be_shares() {
        let cfg = p("[usage]\nwarn_at = [0.5, 0.9]\n").unwrap();
        assert_eq!(cfg.usage.skip_at(), 0.9);
        for bad in ["[80.0]", "[0.0]", "[-0.1]"] {
            let e = p(&format!("[usage]\nwarn_at = {bad}\n")).unwrap_err().0;
            assert!(e.contains("usage.warn_at"), "{e}");
        }
        let e = p("[usage]\nwarn = [0.5]\n").unwrap_err().0;
        assert!(e.contains("warn"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
    }
}
