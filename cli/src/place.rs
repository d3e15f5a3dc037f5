//! Finding the daemon the way the daemon finds itself: `--socket`, then `$LLMD_SOCKET`,
//! then `[daemon] socket` of the config file it reads, then the default path.

use llmd_client::proto::paths;
use std::path::{Path, PathBuf};

/// Where the socket path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--socket`.
    Flag,
    /// `$LLMD_SOCKET`.
    Env,
    /// `[daemon] socket` in the config.
    Config,
    /// The default path.
    Default,
}

impl Origin {
    /// How `doctor` names it.
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Flag => "--socket",
            Origin::Env => "$LLMD_SOCKET",
            Origin::Config => "[daemon] socket in the config",
            Origin::Default => "default",
        }
    }
}

/// The config file llmd reads: `--config`, `$LLMD_CONFIG`, `$XDG_CONFIG_HOME/llmd/config.toml`,
/// `~/.config/llmd/config.toml`.
pub fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    let env = |n: &str| {
        std::env::var_os(n)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    explicit.or_else(|| env("LLMD_CONFIG")).unwrap_or_else(|| {
        env("XDG_CONFIG_HOME")
            .unwrap_or_else(|| env("HOME").unwrap_or_else(|| "/".into()).join(".config"))
            .join("llmd")
            .join("config.toml")
    })
}

/// `[daemon] socket` of the config at `path`, expanded; `Err` when the file exists but
/// cannot be read or parsed.
pub fn config_socket(path: &Path) -> Result<Option<PathBuf>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("{}: {}", path.display(), e.message().trim()))?;
    let Some(raw) = value
        .get("daemon")
        .and_then(|d| d.get("socket"))
        .and_then(|s| s.as_str())
    else {
        return Ok(None);
    };
    paths::expand_path(raw)
        .map(Some)
        .map_err(|e| format!("{}: `daemon.socket`: {e}", path.display()))
}

/// The socket to use and where its path came from.
pub fn socket(flag: Option<PathBuf>, config: Option<PathBuf>) -> (PathBuf, Origin) {
    if let Some(p) = flag {
        return (p, Origin::Flag);
    }
    if let Some(p) = std::env::var_os(paths::SOCKET_ENV).filter(|s| !s.is_empty()) {
        return (PathBuf::from(p), Origin::Env);
    }
    // An unreadable config is `doctor`'s business; here it just leaves the default.
    if let Ok(Some(p)) = config_socket(&config_path(config)) {
        return (p, Origin::Config);
    }
    (paths::default_socket_path(), Origin::Default)
}
