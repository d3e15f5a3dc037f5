//! Secrets stored by `credentials.set` under `<state_dir>/keys/`, one 0600 file each.

use super::KeyError;
use crate::fsutil;
use crate::secret::Secret;
use std::path::{Path, PathBuf};

/// What a stored file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An API key.
    ApiKey,
    /// An Anthropic setup-token.
    SetupToken,
}

/// Path of a profile's stored secret.
pub fn path(state_dir: &Path, profile: &str, kind: Kind) -> PathBuf {
    let ext = match kind {
        Kind::ApiKey => "key",
        Kind::SetupToken => "setup-token",
    };
    state_dir.join("keys").join(format!("{profile}.{ext}"))
}

/// Reads a stored secret, `None` when there is none.
pub fn read(state_dir: &Path, profile: &str, kind: Kind) -> Result<Option<Secret>, KeyError> {
    let p = path(state_dir, profile, kind);
    let Some(bytes) = fsutil::read_regular_capped(&p)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    Ok(Some(text.trim()).filter(|t| !t.is_empty()).map(Secret::new))
}

/// Stores a secret atomically with mode 0600 in a 0700 folder.
pub fn write(
    state_dir: &Path,
    profile: &str,
    kind: Kind,
    secret: &Secret,
) -> Result<PathBuf, KeyError> {
    let p = path(state_dir, profile, kind);
    if let Some(dir) = p.parent() {
        fsutil::ensure_private_dir(dir).map_err(KeyError::Folder)?;
    }
    fsutil::write_secret_atomic(&p, format!("{}\n", secret.expose()).as_bytes()).map_err(
        |source| KeyError::Write {
            path: p.clone(),
            source,
        },
    )?;
    Ok(p)
}
