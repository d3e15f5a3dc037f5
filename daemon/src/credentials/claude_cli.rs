//! Claude Code's login file, `<claude dir>/.credentials.json`:
//! `{"claudeAiOauth": {accessToken, refreshToken, expiresAt (ms), scopes, subscriptionType, …}, …}`.
//! llmd rewrites only the token fields and keeps every other field as it found it.

use super::{bundle::scopes_of, FileError, Tokens};
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
    pub fn read(&self) -> Result<Option<Tokens>, FileError> {
        Ok(self.read_parsed()?.and_then(|(t, _, _)| t))
    }

    /// The tokens (if any), the whole object and the file size.
    pub(super) fn read_parsed(&self) -> Result<Option<super::Parsed>, FileError> {
        let Some((root, len)) = super::read_json_object(&self.path)? else {
            return Ok(None);
        };
        let tokens = root
            .get(OAUTH_KEY)
            .and_then(Value::as_object)
            .and_then(tokens_of);
        Ok(Some((tokens, root, len)))
    }
}

fn tokens_of(oauth: &Map<String, Value>) -> Option<Tokens> {
    // Claude Code blanks the tokens when its refresh token is rejected: no login.
    let access = oauth
        .get("accessToken")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())?;
    Some(Tokens {
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
    })
}

/// `root` with the tokens put into `claudeAiOauth`, every other field and the key order
/// kept, as the bytes of the file.
pub(super) fn render(mut root: Map<String, Value>, tokens: &Tokens) -> Vec<u8> {
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
    // Claude Code writes this file compactly; so do we, to keep diffs minimal. Serializing
    // a parsed JSON object cannot fail.
    serde_json::to_vec(&root).unwrap_or_default()
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
        let src = super::super::Source::ClaudeCli(f.clone());
        src.write(
            &Tokens {
                access: Secret::new("a2"),
                refresh: Some(Secret::new("r2")),
                expires_at: Some(1_800_000_000),
                scopes: t.scopes,
            },
            super::super::Allow::Any,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&f.path).unwrap()).unwrap();
        assert_eq!(v["claudeAiOauth"]["accessToken"], "a2");
        assert_eq!(v["claudeAiOauth"]["refreshToken"], "r2");
        assert_eq!(v["claudeAiOauth"]["expiresAt"], 1_800_000_000_000i64);
        assert_eq!(v["claudeAiOauth"]["subscriptionType"], "max");
        assert_eq!(v["claudeAiOauth"]["rateLimitTier"], "x");
        assert_eq!(v["mcpOAuth"]["k"]["v"], 1);
        assert_eq!(crate::fsutil::mode_of(&f.path), Some(0o600));
        // Only the token fields changed, and every key kept its place.
        let text = std::fs::read_to_string(&f.path).unwrap();
        assert!(
            text.starts_with(r#"{"claudeAiOauth":{"accessToken":"a2","refreshToken":"r2","expiresAt":1800000000000,"scopes":["user:inference"],"subscriptionType":"max","rateLimitTier":"x"},"mcpOAuth""#),
            "{text}"
        );
    }

    #[test]
    fn key_order_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = CredentialsFile::in_dir(dir.path());
        let before = r#"{"zeta":1,"claudeAiOauth":{"subscriptionType":"pro","refreshToken":"r1","accessToken":"a1","expiresAt":5000},"alpha":2}"#;
        std::fs::write(&f.path, before).unwrap();
        let src = super::super::Source::ClaudeCli(f.clone());
        let mut t = f.read().unwrap().unwrap();
        t.access = Secret::new("a2");
        t.refresh = Some(Secret::new("r2"));
        src.write(&t, super::super::Allow::Any).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f.path).unwrap(),
            r#"{"zeta":1,"claudeAiOauth":{"subscriptionType":"pro","refreshToken":"r2","accessToken":"a2","expiresAt":5000},"alpha":2}"#
        );
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
