//! Claude Code's login file, `<claude dir>/.credentials.json`:
//! `{"claudeAiOauth": {accessToken, refreshToken, expiresAt (ms), scopes, subscriptionType, …}, …}`.
//! llmd rewrites only the token fields and keeps every other field as it found it.

use super::{bundle::scopes_of, Tokens};
use crate::fsutil;
use crate::secret::Secret;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Key of the OAuth object in the file.
const OAUTH_KEY: &str = "claudeAiOauth";

/// The credentials file of one Claude Code config folder.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialsFile {
    /// `<claude dir>/.credentials.json`
    pub path: PathBuf,
}

impl CredentialsFile {
    /// The file inside a Claude Code config folder.
    pub fn in_dir(dir: &Path) -> Self {
        CredentialsFile {
            path: dir.join(".credentials.json"),
        }
    }

    /// Reads the tokens; `Ok(None)` when the file or its `claudeAiOauth` entry is absent.
    pub fn read(&self) -> Result<Option<Tokens>, String> {
        let Some(root) = self.read_root()? else {
            return Ok(None);
        };
        let Some(oauth) = root.get(OAUTH_KEY).and_then(Value::as_object) else {
            return Ok(None);
        };
        // Claude Code blanks the tokens when its refresh token is rejected: no login.
        let Some(access) = oauth
            .get("accessToken")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        Ok(Some(Tokens {
            access: Secret::new(access),
            refresh: oauth
                .get("refreshToken")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            expires_at: oauth
                .get("expiresAt")
                .and_then(Value::as_i64)
                .map(|ms| super::clamp_expiry(ms / 1000)),
            scopes: scopes_of(oauth.get("scopes")),
        }))
    }

    fn read_root(&self) -> Result<Option<Map<String, Value>>, String> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("{}: {}", self.path.display(), super::json_problem(&e)))
    }

    /// Writes the tokens into `claudeAiOauth`, keeping every other field; creates the file
    /// when it does not exist.
    pub fn write(&self, tokens: &Tokens) -> Result<(), String> {
        let mut root = self.read_root()?.unwrap_or_default();
        let oauth = root
            .entry(OAUTH_KEY)
            .or_insert_with(|| Value::Object(Map::new()));
        if !oauth.is_object() {
            *oauth = Value::Object(Map::new());
        }
        if let Value::Object(o) = oauth {
            o.insert(
                "accessToken".into(),
                Value::String(tokens.access.expose().into()),
            );
            if let Some(r) = &tokens.refresh {
                o.insert("refreshToken".into(), Value::String(r.expose().into()));
            }
            if let Some(e) = tokens.expires_at {
                o.insert("expiresAt".into(), (e * 1000).into());
            }
            if !tokens.scopes.is_empty() {
                o.insert("scopes".into(), tokens.scopes.clone().into());
            }
        }
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                fsutil::ensure_private_dir(dir)?;
            }
        }
        // Claude Code writes this file compactly; so do we, to keep diffs minimal.
        let bytes = serde_json::to_vec(&root).map_err(|e| e.to_string())?;
        fsutil::write_secret_atomic(&self.path, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_back_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let f = CredentialsFile::in_dir(dir.path());
        std::fs::write(
            &f.path,
            r#"{"claudeAiOauth":{"accessToken":"a1","refreshToken":"r1","expiresAt":1700000000000,"scopes":["user:inference"],"subscriptionType":"max","rateLimitTier":"x"},"mcpOAuth":{"k":{"v":1}}}"#,
        )
        .unwrap();
        let t = f.read().unwrap().unwrap();
        assert_eq!(t.expires_at, Some(1_700_000_000));
        assert_eq!(t.scopes, vec!["user:inference"]);
        f.write(&Tokens {
            access: Secret::new("a2"),
            refresh: Some(Secret::new("r2")),
            expires_at: Some(1_800_000_000),
            scopes: t.scopes,
        })
        .unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&f.path).unwrap()).unwrap();
        assert_eq!(v["claudeAiOauth"]["accessToken"], "a2");
        assert_eq!(v["claudeAiOauth"]["refreshToken"], "r2");
        assert_eq!(v["claudeAiOauth"]["expiresAt"], 1_800_000_000_000i64);
        assert_eq!(v["claudeAiOauth"]["subscriptionType"], "max");
        assert_eq!(v["claudeAiOauth"]["rateLimitTier"], "x");
        assert_eq!(v["mcpOAuth"]["k"]["v"], 1);
        assert_eq!(fsutil::mode_of(&f.path), Some(0o600));
    }

    #[test]
    fn absent_or_broken() {
        let dir = tempfile::tempdir().unwrap();
        let f = CredentialsFile::in_dir(dir.path());
        assert!(f.read().unwrap().is_none());
        std::fs::write(&f.path, "{\"claudeAiOauth\":").unwrap();
        assert!(f.read().is_err());
        std::fs::write(&f.path, "{}").unwrap();
        assert!(f.read().unwrap().is_none());
        std::fs::write(
            &f.path,
            r#"{"claudeAiOauth":{"accessToken":"","refreshToken":"","expiresAt":0}}"#,
        )
        .unwrap();
        assert!(
            f.read().unwrap().is_none(),
            "blanked by Claude Code after invalid_grant"
        );
    }
}
