//! Credentials: what each auth kind stores, where, and which headers it produces.
//!
//! Static kinds (`api_key`, `setup_token`) are read once per load. OAuth logins live in a
//! file ([`bundle`] or Claude Code's [`claude_cli`] file) that the refresh engine
//! (`crate::refresh`) owns; this module only reads and writes those files.

pub mod api_key;
pub mod bundle;
pub mod claude_cli;
pub mod claude_lock;
pub mod setup_token;
pub mod store;

use crate::config::{AuthKind, Provider};
use crate::secret::Secret;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `anthropic-beta` value that OAuth access tokens need.
pub const ANTHROPIC_OAUTH_BETA: &str = "oauth-2025-04-20";

/// An OAuth token pair as held in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Access token.
    pub access: Secret,
    /// Refresh token, if the login has one.
    pub refresh: Option<Secret>,
    /// Unix seconds; `None` when unknown.
    pub expires_at: Option<i64>,
    /// Scopes recorded with the login.
    pub scopes: Vec<String>,
}

/// The file an OAuth login lives in.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// llmd's own bundle file.
    Bundle(bundle::BundleFile),
    /// Claude Code's `.credentials.json`.
    ClaudeCli(claude_cli::CredentialsFile),
}

/// Result of a compare-and-swap write.
#[derive(Debug)]
pub enum CasOutcome {
    /// The file held the expected refresh token and now holds the new tokens.
    Written,
    /// Someone else changed the file first; it holds these tokens and was left alone.
    Conflict(Tokens),
}

impl Source {
    /// The file path (the symlink itself when it is one).
    pub fn path(&self) -> PathBuf {
        match self {
            Source::Bundle(b) => b.path.clone(),
            Source::ClaudeCli(c) => c.path.clone(),
        }
    }

    /// Reads the tokens; `Ok(None)` when the file does not exist.
    pub fn read(&self) -> Result<Option<Tokens>, String> {
        match self {
            Source::Bundle(b) => b.read(),
            Source::ClaudeCli(c) => c.read(),
        }
    }

    /// Reads, retrying a few times when the file does not parse: a writer that does not
    /// rename may be half-way through.
    pub async fn read_settled(&self) -> Result<Option<Tokens>, String> {
        let mut last = String::new();
        for attempt in 0..6 {
            match self.read() {
                Ok(t) => return Ok(t),
                // Only a file that ends early can be a write in progress; any other error
                // (permissions, wrong shape) will not fix itself in a second.
                Err(e) if self.truncated() => last = e,
                Err(e) => return Err(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
        }
        Err(last)
    }

    /// True when the file's JSON stops before its end (or the file is empty).
    fn truncated(&self) -> bool {
        std::fs::read(self.path()).is_ok_and(|bytes| {
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err_and(|e| e.is_eof())
        })
    }

    /// Writes `new` only if the file still holds `expected` as its refresh token (or has
    /// no tokens at all), keeping every other field.
    pub fn write_cas(&self, new: &Tokens, expected: Option<&Secret>) -> Result<CasOutcome, String> {
        // Unreadable is not the same as absent: never overwrite what we could not check.
        let current = self
            .read()
            .map_err(|e| format!("cannot check the login file before writing: {e}"))?;
        if let (Some(cur), Some(exp)) = (&current, expected) {
            if cur.refresh.as_ref() != Some(exp) && cur != new {
                return Ok(CasOutcome::Conflict(cur.clone()));
            }
        }
        match self {
            Source::Bundle(b) => b.write(new),
            Source::ClaudeCli(c) => c.write(new),
        }
        .map(|()| CasOutcome::Written)
    }
}

/// Latest expiry accepted from a file (year 9999); larger values are clamped so that
/// arithmetic on them cannot overflow.
const MAX_EXPIRY: i64 = 253_402_300_799;

/// An `expires_at` from a file, clamped to a sane range.
pub fn clamp_expiry(unix_secs: i64) -> i64 {
    unix_secs.clamp(0, MAX_EXPIRY)
}

/// A JSON error described without quoting the file's content (which may be a token).
pub fn json_problem(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Eof => "ends early (being written?)".into(),
        serde_json::error::Category::Syntax => format!(
            "is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
        serde_json::error::Category::Data => "is not a JSON object".into(),
        serde_json::error::Category::Io => "cannot be read".into(),
    }
}

/// The headers a provider request needs for `token`.
pub fn auth_headers(
    provider: Provider,
    auth: AuthKind,
    token: &str,
    group_id: Option<&str>,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut h = BTreeMap::new();
    for (k, v) in extra {
        h.insert(k.to_ascii_lowercase(), v.clone());
    }
    match (provider, auth) {
        (Provider::Anthropic, AuthKind::ApiKey) => {
            h.insert("x-api-key".into(), token.into());
        }
        (Provider::Anthropic, _) => {
            h.insert("authorization".into(), format!("Bearer {token}"));
            let beta = match h.get("anthropic-beta") {
                Some(b) if !b.split(',').any(|x| x.trim() == ANTHROPIC_OAUTH_BETA) => {
                    format!("{ANTHROPIC_OAUTH_BETA},{b}")
                }
                Some(b) => b.clone(),
                None => ANTHROPIC_OAUTH_BETA.into(),
            };
            h.insert("anthropic-beta".into(), beta);
        }
        (Provider::Gemini, _) => {
            h.insert("x-goog-api-key".into(), token.into());
        }
        (Provider::OpenaiCompat, _) => {
            h.insert("authorization".into(), format!("Bearer {token}"));
        }
        (Provider::Minimax, _) => {
            h.insert("authorization".into(), format!("Bearer {token}"));
            if let Some(g) = group_id {
                h.insert("x-minimax-group-id".into(), g.into());
            }
        }
    }
    h
}

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(p: Provider, a: AuthKind, g: Option<&str>) -> Vec<(String, String)> {
        auth_headers(p, a, "T", g, &BTreeMap::new())
            .into_iter()
            .collect()
    }

    #[test]
    fn headers_per_provider_and_kind() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            h(Provider::Anthropic, AuthKind::ApiKey, None),
            vec![s("x-api-key", "T")]
        );
        for kind in [AuthKind::SetupToken, AuthKind::Oauth, AuthKind::ClaudeCli] {
            assert_eq!(
                h(Provider::Anthropic, kind, None),
                vec![
                    s("anthropic-beta", ANTHROPIC_OAUTH_BETA),
                    s("authorization", "Bearer T")
                ]
            );
        }
        assert_eq!(
            h(Provider::OpenaiCompat, AuthKind::ApiKey, None),
            vec![s("authorization", "Bearer T")]
        );
        assert_eq!(
            h(Provider::Gemini, AuthKind::ApiKey, None),
            vec![s("x-goog-api-key", "T")]
        );
        assert_eq!(
            h(Provider::Minimax, AuthKind::Oauth, Some("g1")),
            vec![
                s("authorization", "Bearer T"),
                s("x-minimax-group-id", "g1")
            ]
        );
    }

    #[test]
    fn extra_beta_is_merged_not_replaced() {
        let extra = [(
            "anthropic-beta".to_string(),
            "files-api-2025-04-14".to_string(),
        )]
        .into();
        let h = auth_headers(Provider::Anthropic, AuthKind::Oauth, "T", None, &extra);
        assert_eq!(h["anthropic-beta"], "oauth-2025-04-20,files-api-2025-04-14");
    }
}
