//! Static API keys: from the key store, a 0600 file, or an environment variable.

use super::{store, KeyError};
use crate::config::ProfileConfig;
use crate::fsutil;
use crate::secret::Secret;
use std::path::Path;

/// Finds the key for a profile. Order: a key stored with `credentials.set`, then
/// `api_key_file`, then `api_key_env` (or the provider's standard variable).
/// `Err` explains what is missing or wrong, without the key.
pub fn load(name: &str, cfg: &ProfileConfig, state_dir: &Path) -> Result<Secret, KeyError> {
    if let Some(key) = store::read(state_dir, name, store::Kind::ApiKey)? {
        return Ok(key);
    }
    if let Some(path) = &cfg.api_key_file {
        return read_key_file(path);
    }
    let var = cfg
        .api_key_env
        .as_deref()
        .unwrap_or_else(|| cfg.provider.default_key_env());
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim())),
        _ => Err(KeyError::Missing {
            what: "API key",
            hint: format!("set {var} in llmd's environment or run `llmctl set-key {name}`"),
        }),
    }
}

/// Reads a key file. One that group or others can read still works, with a warning: the
/// key is already exposed, and refusing it would only break the user's agents.
pub fn read_key_file(path: &Path) -> Result<Secret, KeyError> {
    if fsutil::is_exposed(path) {
        tracing::warn!(
            file = %path.display(),
            "key file is readable by group/others; run `chmod 600` on it"
        );
    }
    let bytes = fsutil::read_regular_capped(path)?.ok_or_else(|| crate::fsutil::ReadError::Io {
        path: path.to_path_buf(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let key = text.trim();
    if key.is_empty() {
        return Err(KeyError::Empty(path.to_path_buf()));
    }
    Ok(Secret::new(key))
}
