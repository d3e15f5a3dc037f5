//! Typed params and results of each method in DESIGN.md.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Method names.
pub mod names {
    /// `hello`
    pub const HELLO: &str = "hello";
    /// `status`
    pub const STATUS: &str = "status";
    /// `token`
    pub const TOKEN: &str = "token";
    /// `refresh`
    pub const REFRESH: &str = "refresh";
    /// `reload`
    pub const RELOAD: &str = "reload";
    /// `cancel`
    pub const CANCEL: &str = "cancel";
    /// `subscribe`
    pub const SUBSCRIBE: &str = "subscribe";
    /// `credentials.set`
    pub const CREDENTIALS_SET: &str = "credentials.set";
    /// `login.start`
    pub const LOGIN_START: &str = "login.start";
    /// `login.finish`
    pub const LOGIN_FINISH: &str = "login.finish";
    /// `credentials.remove`
    pub const CREDENTIALS_REMOVE: &str = "credentials.remove";
    /// Notification carrying an [`super::Event`].
    pub const EVENT: &str = "event";
    /// `chat`
    pub const CHAT: &str = "chat";
    /// Notification carrying a [`crate::chat::ChatDelta`].
    pub const CHAT_DELTA: &str = "chat.delta";
    /// `embed`
    pub const EMBED: &str = "embed";
    /// `tools.register`
    pub const TOOLS_REGISTER: &str = "tools.register";
    /// `tools.list`
    pub const TOOLS_LIST: &str = "tools.list";
    /// `tools.remove`
    pub const TOOLS_REMOVE: &str = "tools.remove";
    /// `gateway.key`
    pub const GATEWAY_KEY: &str = "gateway.key";
    /// `usage`
    pub const USAGE: &str = "usage";
}

/// `hello` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    /// Agent name, shown in logs and status.
    pub client: String,
    /// Agent version.
    pub version: String,
}

/// `hello` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloResult {
    /// Always `llmd`.
    pub server: String,
    /// Daemon version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
}

/// State of one profile's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileState {
    /// A usable credential is held.
    Ok,
    /// A refresh is running.
    Refreshing,
    /// The login is dead; `llmctl login <profile>` is needed.
    NeedsLogin,
    /// The last attempt failed and no valid token is left.
    Error,
    /// No credential is configured or found.
    Missing,
    /// A state this version does not know (a newer llmd).
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ProfileState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProfileState::Ok => "ok",
            ProfileState::Refreshing => "refreshing",
            ProfileState::NeedsLogin => "needs_login",
            ProfileState::Error => "error",
            ProfileState::Missing => "missing",
            ProfileState::Unknown => "unknown",
        })
    }
}

/// One entry of `status.profiles`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// Profile name.
    pub name: String,
    /// `anthropic`, `openai-compat`, `gemini` or `minimax`.
    pub provider: String,
    /// `api-key`, `setup-token`, `oauth` or `claude-cli`.
    pub auth: String,
    /// Credential state.
    pub state: ProfileState,
    /// Unix seconds; null for keys that do not expire.
    pub expires_at: Option<i64>,
    /// Unix seconds of the last successful refresh by this daemon.
    pub last_refresh_at: Option<i64>,
    /// Successful refreshes by this daemon since it started.
    pub refresh_count: u64,
    /// Last error, free of secrets.
    pub last_error: Option<String>,
    /// Shared rate-limit state of the profile's chat traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Where the credential comes from (the source that wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CredentialSource>,
    /// The provider base URL requests go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The model used when a request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
    /// For `auth = "upstream"` profiles: the upstream llmd it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStatus>,
    /// For `cluster = true` profiles: this instance's part in the etcd cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// The provider's latest rate-limit and quota report for this profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

/// The latest quota state a provider reported for one profile (DESIGN.md, "Quotas").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    /// Anthropic's overall unified status (`allowed`, `allowed_warning`, `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Every window reported, in a stable order (`5h`, `7d`, then the others).
    #[serde(default)]
    pub windows: Vec<QuotaWindow>,
    /// Unix seconds of the answer the state was read from.
    pub updated_at: i64,
}

/// One limit window of a [`Quota`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaWindow {
    /// `5h`, `7d` (Anthropic unified), `requests`, `tokens`, `input_tokens`,
    /// `output_tokens` (per-minute limits), or a Gemini quota id.
    pub name: String,
    /// Share used, 0.0 to 1.0.
    pub utilization: f64,
    /// Unix seconds when the window resets, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<i64>,
    /// The window's limit, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// What is left of it, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// The provider's word for the window (`allowed`, `rejected`, …), when it sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// One pool of `status.pools`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name (what clients pass as `profile`).
    pub name: String,
    /// `fill-first`, `round-robin` or `least-used`.
    pub strategy: String,
    /// How long an agent keeps its member, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_secs: Option<u64>,
    /// Every member, in config order.
    pub members: Vec<PoolMemberStatus>,
}

/// One member of a [`PoolStatus`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolMemberStatus {
    /// The member profile.
    pub name: String,
    /// True when the pool would pick it now.
    pub available: bool,
    /// Why it is skipped: `paused`, `over_quota`, `needs_login`, `no_credential`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Requests this pool sent to it since start.
    pub served: u64,
}

/// A shared login's cluster state (DESIGN.md, "Cluster").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// `owner` (this instance refreshes), `follower`, or `disconnected` (etcd unreachable).
    #[serde(default)]
    pub role: String,
    /// The instance that owns the login now, when known.
    #[serde(default)]
    pub owner: Option<String>,
    /// Milliseconds left on this instance's lease, when it owns the login.
    #[serde(default)]
    pub lease_remaining_ms: Option<u64>,
    /// etcd revision of the login's value last seen (0: none yet).
    #[serde(default)]
    pub revision: i64,
    /// Why the instance is not in sync, free of secrets.
    #[serde(default)]
    pub error: Option<String>,
}

/// Where a follower profile gets its tokens, and whether it reaches it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The upstream llmd's socket.
    #[serde(default)]
    pub socket: String,
    /// The upstream profile followed.
    #[serde(default)]
    pub profile: String,
    /// `connected`, `connecting` or `disconnected`.
    #[serde(default)]
    pub connection: String,
}

/// Where a profile's credential comes from. Precedence (first present wins): for api-key
/// and setup-token profiles a secret stored by `credentials.set`, then `api_key_file`,
/// then the environment variable; OAuth profiles read their bundle, claude-cli profiles
/// Claude Code's `.credentials.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialSource {
    /// `stored`, `file`, `env`, `bundle` or `claude-cli`.
    pub kind: String,
    /// The file path or the variable name.
    pub location: String,
    /// Whether the source currently holds something.
    pub present: bool,
    /// Permission bits of the file, for file sources that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Lower-precedence sources that are also set and lose to this one
    /// (e.g. `env ANTHROPIC_API_KEY` under a stored key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadowed: Vec<String>,
}

/// Queue and remaining budget of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests waiting for a slot.
    pub queued: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests left this minute, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_requests: Option<u64>,
    /// Tokens left this minute, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_tokens: Option<u64>,
    /// Milliseconds until a provider-imposed pause ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_for_ms: Option<u64>,
}

/// `status` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResult {
    /// Daemon version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Open client connections.
    pub connections: u64,
    /// Agents that named themselves with `hello` (`client/version`), one per connection.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Every configured profile.
    pub profiles: Vec<ProfileStatus>,
    /// Which providers' standard key variables are set in the daemon's environment
    /// (names only).
    #[serde(default)]
    pub env_keys: Vec<String>,
    /// The config file in use, or `embedded default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The folder holding stored keys and bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// The HTTP gateway, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    /// Every configured pool and its members' state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
}

/// Where the HTTP gateway listens and who used it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// `http://127.0.0.1:PORT`; profile `P` is under `/p/P`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Path of the gateway's Unix socket.
    #[serde(default)]
    pub unix: Option<String>,
    /// Requests since start by agent (named keys), `(main key)` for the main key.
    #[serde(default)]
    pub requests_by_agent: std::collections::BTreeMap<String, u64>,
}

/// `gateway.key` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayKeyParams {
    /// Issue the named key of this agent instead of the main key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// `gateway.key` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayKeyResult {
    /// The key to send (as `x-api-key`, `Authorization: Bearer`, …).
    pub key: String,
    /// `http://127.0.0.1:PORT`, when the gateway listens on TCP.
    #[serde(default)]
    pub base_url: Option<String>,
}

/// How `usage` groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageBy {
    /// One row per profile.
    #[default]
    Profile,
    /// One row per agent (`hello` name or named gateway key).
    Agent,
    /// One row per model.
    Model,
    /// One row per UTC day.
    Day,
    /// One row per pool member that answered (`pool/member`); the profile for requests
    /// that were not served by a pool.
    Member,
}

/// `usage` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Start of the window: `24h`, `7d`, `90m`, or a UTC date `YYYY-MM-DD`. Default `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Grouping of `rows`; default `profile`.
    #[serde(default)]
    pub by: UsageBy,
}

/// Request and token counts of a group of ledger rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Requests recorded.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens read from cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to cache.
    pub cache_write_tokens: u64,
}

/// One group of `usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The profile, agent, model or day (`YYYY-MM-DD`) of the group; `-` when unknown.
    pub key: String,
    /// Its counts.
    #[serde(flatten)]
    pub totals: UsageTotals,
}

/// One bar of the chart: an hour or a day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBucket {
    /// Start of the bucket, Unix seconds (UTC).
    pub start: u64,
    /// Requests in it.
    pub requests: u64,
    /// All tokens in it (input, output, cache read and write).
    pub tokens: u64,
}

/// `token` calls of one profile and agent (counted, not recorded one by one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCalls {
    /// Profile.
    pub profile: String,
    /// Agent; `-` for connections that sent no `hello`.
    pub agent: String,
    /// Calls in the window (whole days: the counters are kept per day).
    pub calls: u64,
}

/// `usage` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageResult {
    /// Start of the window, Unix seconds.
    pub since: u64,
    /// How `rows` are grouped.
    pub by: UsageBy,
    /// Groups, largest token count first (by day: oldest first).
    pub rows: Vec<UsageRow>,
    /// Sum of all rows.
    pub totals: UsageTotals,
    /// `hour` or `day`: the size of each bucket.
    pub bucket: String,
    /// Chart buckets, oldest first, empty ones included.
    pub buckets: Vec<UsageBucket>,
    /// `token` calls by profile and agent.
    pub token_calls: Vec<TokenCalls>,
    /// Records lost since the daemon started because the ledger's queue was full.
    pub dropped: u64,
    /// False when `[usage] enabled = false`: nothing new is being recorded.
    pub enabled: bool,
}

/// Why a `since` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`since` must be a duration like `24h`, `7d`, `90m` or a UTC date `YYYY-MM-DD`, not `{0}`")]
pub struct BadSince(pub String);

/// The start (Unix seconds) of the window `since` names, as seen at `now`.
pub fn parse_since(since: &str, now: u64) -> Result<u64, BadSince> {
    let bad = || BadSince(since.chars().take(40).collect());
    let s = since.trim();
    if let Some((y, rest)) = s.split_once('-') {
        let (m, d) = rest.split_once('-').ok_or_else(bad)?;
        let num = |t: &str| {
            t.parse::<i64>()
                .ok()
                .filter(|_| t.bytes().all(|b| b.is_ascii_digit()))
        };
        let (y, m, d) = (
            num(y).ok_or_else(bad)?,
            num(m).ok_or_else(bad)?,
            num(d).ok_or_else(bad)?,
        );
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return Err(bad());
        }
        let days = days_from_civil(y, m, d);
        return u64::try_from(days * 86_400).map_err(|_| bad());
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    Ok(now.saturating_sub(n.saturating_mul(secs)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC date `YYYY-MM-DD` of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Params naming one profile (`refresh`, `login.start`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileParams {
    /// Profile name.
    pub profile: String,
}

/// `token` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenParams {
    /// Profile name.
    pub profile: String,
    /// The token must stay valid at least this long; a refresh runs first otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_valid_secs: Option<u64>,
}

/// `token` and `refresh` result.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResult {
    /// Profile name.
    pub profile: String,
    /// Auth kind of the credential (`api-key`, `setup-token`, `oauth`, `claude-cli`).
    pub kind: String,
    /// The bare token or key.
    pub token: String,
    /// Unix seconds; null for keys that do not expire.
    pub expires_at: Option<i64>,
    /// Exactly the headers a request to the provider needs.
    pub headers: BTreeMap<String, String>,
    /// Provider of the profile (`anthropic`, …), so a follower llmd can mirror it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// OAuth scopes of the login, when it records them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Claude subscription type (`pro`, `max`, …), when the login records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_type: Option<String>,
    /// For a pool: the member profile whose token this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

impl fmt::Debug for TokenResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResult")
            .field("profile", &self.profile)
            .field("kind", &self.kind)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// `reload` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResult {
    /// Profiles configured after the reload.
    pub profiles: Vec<String>,
}

/// `cancel` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelParams {
    /// Id of the in-flight request of this connection to stop.
    pub id: crate::Id,
}

/// `subscribe` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Event kinds wanted (`token.rotated`, `profile.state`); empty means all.
    #[serde(default)]
    pub events: Vec<String>,
}

/// `credentials.set` params: exactly one of `api_key` and `setup_token`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSetParams {
    /// Profile name.
    pub profile: String,
    /// An API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// An Anthropic setup-token (`sk-ant-oat01-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_token: Option<String>,
}

impl fmt::Debug for CredentialsSetParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsSetParams")
            .field("profile", &self.profile)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field(
                "setup_token",
                &self.setup_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `login.start` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginStartResult {
    /// The URL the user opens in a browser.
    pub url: String,
    /// For a user-code login (MiniMax): the code the page asks for. The client then calls
    /// `login.finish` with this code and no paste: the daemon polls until approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// Unix seconds after which the user code is no longer accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `login.finish` params.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFinishParams {
    /// Profile name.
    pub profile: String,
    /// What the authorize page showed (`code#state`, or the bare code); for a user-code
    /// login, the `user_code` from `login.start`.
    #[serde(default)]
    pub code: String,
}

impl fmt::Debug for LoginFinishParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginFinishParams")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

/// `login.finish` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginFinishResult {
    /// Expiry of the new access token, unix seconds.
    pub expires_at: Option<i64>,
}

/// Kinds of [`Event`].
pub mod event_kinds {
    /// A login's access token changed (refresh, adoption from file, login).
    pub const TOKEN_ROTATED: &str = "token.rotated";
    /// A profile's state changed.
    pub const PROFILE_STATE: &str = "profile.state";
    /// This subscriber fell behind and events were skipped (`skipped` says how many):
    /// whatever it holds about any profile may be stale. Sent whatever the filter.
    pub const EVENTS_LOST: &str = "events.lost";
    /// A profile's quota window crossed a `[usage] warn_at` threshold upward.
    pub const PROFILE_QUOTA: &str = "profile.quota";
}

/// Payload of an `event` notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `token.rotated`, `profile.state` or `events.lost`.
    pub kind: String,
    /// Profile name (empty for events.lost).
    pub profile: String,
    /// New expiry (token.rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// New state (profile.state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ProfileState>,
    /// Why, for error states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many events were skipped (events.lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    /// The window that crossed a threshold (profile.quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaCrossing>,
}

/// What a `profile.quota` event reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaCrossing {
    /// The threshold crossed (one of `[usage] warn_at`).
    pub threshold: f64,
    /// The window, as in [`QuotaWindow::name`].
    pub window: String,
    /// Its utilization now.
    pub utilization: f64,
    /// When it resets, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<i64>,
}

/// `credentials.remove` result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CredentialsRemoveResult {
    /// Files llmd removed (stored key, setup-token, OAuth bundle).
    pub removed: Vec<String>,
}

/// An empty object result (`{}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {

    #[test]
    fn since_durations_and_dates() {
        let now = 1_800_000_000;
        assert_eq!(parse_since("24h", now), Ok(now - 86_400));
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400));
        assert_eq!(parse_since("2026-12-01", now), Ok(1_796_083_200));
        assert_eq!(civil_from_days(1_796_083_200 / 86_400), (2026, 12, 1));
        for bad in ["", "24", "h", "3y", "2026-13-01", "2026-1x-01", "-1d"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let t = TokenResult {
            profile: "p".into(),
            kind: "api-key".into(),
            token: "sk-secret".into(),
            expires_at: None,
            headers: [("x-api-key".to_string(), "sk-secret".to_string())].into(),
            provider: None,
            scopes: Vec::new(),
            subscription_type: None,
            member: None,
        };
        assert!(!format!("{t:?}").contains("sk-secret"));
        let c = CredentialsSetParams {
            profile: "p".into(),
            api_key: Some("sk-secret".into()),
            setup_token: None,
        };
        assert!(!format!("{c:?}").contains("sk-secret"));
        let l = LoginFinishParams {
            profile: "p".into(),
            code: "sk-secret".into(),
        };
        assert!(!format!("{l:?}").contains("sk-secret"));
    }

    #[test]
    fn unknown_param_fields_are_rejected() {
        let e = serde_json::from_str::<TokenParams>(r#"{"profile":"a","min_valid":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_valid"), "{e}");
    }
}
