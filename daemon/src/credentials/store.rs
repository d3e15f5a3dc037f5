//! Secrets stored by `credentials.set` under `<state_dir>/keys/`, one 0600 file each.

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
pub fn read(state_dir: &Path, profile: &str, kind: Kind) -> Result<Option<Secret>, String> {
    let p = path(state_dir, profile, kind);
    match std::fs::read_to_string(&p) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(Secret::new(text.trim()))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Stores a secret atomically with mode 0600 in a 0700 folder.
pub fn write(
    state_dir: &Path,
    profile: &str,
    kind: Kind,
    secret: &Secret,
) -> Result<PathBuf, String> {
    let p = path(state_dir, profile, kind);
    if let Some(dir) = p.parent() {
        fsutil::ensure_private_dir(dir)?;
    }
    fsutil::write_secret_atomic(&p, format!("{}\n", secret.expose()).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    Ok(p)
}
