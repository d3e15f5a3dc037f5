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
use crate::fsutil::{self, PreparedWrite, ReadError};
use crate::secret::Secret;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// `anthropic-beta` value that OAuth access tokens need.
pub const ANTHROPIC_OAUTH_BETA: &str = "oauth-2025-04-20";

/// Room reserved in a prepared write beyond the current file's size: a token pair
/// grows the file by far less.
const WRITE_HEADROOM: u64 = 4096;

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

/// Why a login file could not be read or written. Texts name the file but never quote
/// its contents, which may be tokens.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not a regular file, too large, or an I/O error.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A bundle readable by group or others is refused.
    #[error("bundle {} is readable by group/others; run `chmod 600 {}`", .0.display(), .0.display())]
    Exposed(PathBuf),
    /// Not JSON, or not the expected shape.
    #[error("{}: {problem}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong, without quoting the file.
        problem: String,
        /// The JSON stops early: possibly a write in progress.
        truncated: bool,
    },
    /// A required field is absent.
    #[error("{} has no `{field}`", path.display())]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
    /// The folder could not be created or is not private.
    #[error("{0}")]
    Folder(String),
    /// Preparing or committing the replacement failed (full disk, read-only, permission).
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl FileError {
    /// True when the file ends early: a writer that does not rename may be half-way.
    pub fn is_truncated(&self) -> bool {
        matches!(
            self,
            FileError::Json {
                truncated: true,
                ..
            }
        )
    }

    fn json(path: &std::path::Path, e: &serde_json::Error) -> FileError {
        FileError::Json {
            path: path.to_path_buf(),
            problem: json_problem(e),
            truncated: e.is_eof(),
        }
    }
}

/// Why a static credential (an API key or setup-token) is not there or not usable. Texts
/// never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Nothing configured is set: no stored key, no key file, an empty variable.
    #[error("no {what}: {hint}")]
    Missing {
        /// "API key" or "setup-token".
        what: &'static str,
        /// How to provide one.
        hint: String,
    },
    /// A key file or stored key that cannot be read (bounded, regular files only).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A key file that holds nothing but white space.
    #[error("key file {} is empty", .0.display())]
    Empty(PathBuf),
    /// A setup-token of the wrong shape.
    #[error("{0}")]
    Invalid(String),
    /// The key store's folder could not be made or is not private.
    #[error("{0}")]
    Folder(String),
    /// Storing failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
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
    /// The file now holds the new tokens. `filled` is when they first reached the file
    /// system (from then on they survive a kill of the process).
    Written {
        /// When the contents were in the temp file.
        filled: Instant,
    },
    /// Another program wrote the file first; it holds these tokens and was left alone.
    Conflict(Tokens),
}

/// Which file states a compare-and-swap write may replace.
#[derive(Debug, Clone, Copy)]
pub enum Allow<'a> {
    /// Whatever the file holds (a new login).
    Any,
    /// A file without tokens, or one whose refresh token is one of these (tokens this
    /// daemon held itself, spent or current): anything else is another program's write.
    Own(&'a [Secret]),
}

/// A replacement of a login file made ready before a refresh: the temp file, and the
/// file's object the new tokens go into.
#[derive(Debug)]
pub struct Prepared {
    write: PreparedWrite,
    base: Map<String, Value>,
    claude: bool,
    filled: Option<Instant>,
}

impl Prepared {
    /// Writes `new` into the temp file at once, so that from now on a kill of the process
    /// cannot lose them (a restarted llmd recovers the temp file). Returns when.
    pub fn fill(&mut self, new: &Tokens) -> std::io::Result<Instant> {
        let bytes = if self.claude {
            claude_cli::render(self.base.clone(), new)
        } else {
            bundle::render(self.base.clone(), new)
        };
        self.write.fill(&bytes)?;
        let at = Instant::now();
        self.filled = Some(at);
        Ok(at)
    }
}

/// A login file parsed whole: its tokens (if any), the JSON object they came from, and the
/// file's size.
pub(crate) type Parsed = (Option<Tokens>, Map<String, Value>, u64);

/// A JSON object file and its size.
type ObjectFile = (Map<String, Value>, u64);

impl Source {
    /// The file path (the symlink itself when it is one).
    pub fn path(&self) -> PathBuf {
        match self {
            Source::Bundle(b) => b.path.clone(),
            Source::ClaudeCli(c) => c.path.clone(),
        }
    }

    /// Reads the tokens; `Ok(None)` when the file does not exist. Bounded and never
    /// blocking on a FIFO, so it may run on the runtime at load time; the login task runs
    /// it on the blocking pool.
    pub fn read(&self) -> Result<Option<Tokens>, FileError> {
        Ok(self.read_parsed()?.and_then(|(t, _, _)| t))
    }

    fn read_parsed(&self) -> Result<Option<Parsed>, FileError> {
        match self {
            Source::Bundle(b) => b.read_parsed(),
            Source::ClaudeCli(c) => c.read_parsed(),
        }
    }

    /// [`Source::read`] off the runtime's worker threads, retrying a few times when the
    /// file ends early: a writer that does not rename may be half-way through.
    pub async fn read_settled(&self) -> Result<Option<Tokens>, FileError> {
        let mut attempt = 0;
        loop {
            let source = self.clone();
            let read = tokio::task::spawn_blocking(move || source.read())
                .await
                .map_err(|e| FileError::Folder(format!("read task failed: {e}")))?;
            match read {
                Err(e) if e.is_truncated() && attempt < 5 => {}
                other => return other,
            }
            tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
            attempt += 1;
        }
    }

    /// Checks, before a refresh, that its result can be saved: the file (if any) is
    /// readable and well-formed, and its folder takes a new file of the needed size. The
    /// temp file made here is the one [`Prepared::fill`] and [`Source::commit`] use.
    pub fn prepare(&self, expected: Option<&Secret>) -> Result<Prepared, FileError> {
        let (base, size) = match self.read_parsed()? {
            Some((_, obj, len)) => (obj, len),
            None => (Map::new(), 0),
        };
        let path = self.path();
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                fsutil::ensure_private_dir(dir).map_err(FileError::Folder)?;
            }
        }
        let write = PreparedWrite::create(&path, &tag_of(expected), size + WRITE_HEADROOM)
            .map_err(|source| FileError::Write { path, source })?;
        Ok(Prepared {
            write,
            base,
            claude: matches!(self, Source::ClaudeCli(_)),
            filled: None,
        })
    }

    /// Writes `new` through `prepared` unless another program changed the file (see
    /// [`Allow`]), keeping every other field.
    pub fn commit(
        &self,
        mut prepared: Prepared,
        new: &Tokens,
        allow: Allow<'_>,
    ) -> Result<CasOutcome, FileError> {
        // Unreadable is not the same as absent: never overwrite what we could not check.
        let (current, obj) = match self.read_parsed()? {
            Some((t, obj, _)) => (t, obj),
            None => (None, Map::new()),
        };
        if let (Some(cur), Allow::Own(own)) = (&current, allow) {
            let ours = cur.refresh.as_ref().is_none_or(|r| own.contains(r));
            if !ours && cur != new {
                return Ok(CasOutcome::Conflict(cur.clone()));
            }
        }
        let path = self.path();
        let io = |source| FileError::Write {
            path: path.clone(),
            source,
        };
        // Filled from the file as it was at `prepare`; other fields changed since (Claude
        // Code keeps more than the login in its file) are taken over.
        let filled = match prepared.filled {
            Some(at) if prepared.base == obj => at,
            _ => {
                prepared.base = obj;
                prepared.fill(new).map_err(io)?
            }
        };
        prepared.write.commit().map_err(io)?;
        Ok(CasOutcome::Written { filled })
    }

    /// [`Source::prepare`] and [`Source::commit`] in one step.
    pub fn write(&self, new: &Tokens, allow: Allow<'_>) -> Result<CasOutcome, FileError> {
        let expected = match allow {
            Allow::Own(own) => own.last(),
            Allow::Any => None,
        };
        let prepared = self.prepare(expected)?;
        self.commit(prepared, new, allow)
    }

    /// Puts back what a crashed llmd had written but not yet renamed: a leftover temp file
    /// made to replace the file's current state is the newer login. Other leftovers are
    /// removed. Returns true when the file was replaced. Temp files of a running process
    /// are left alone.
    pub fn recover_leftovers(&self) -> Result<bool, FileError> {
        let left = fsutil::leftovers(&self.path());
        if left.is_empty() {
            return Ok(false);
        }
        // A broken main file: leave everything as it is for the user to look at.
        let current = self.read()?;
        let want = tag_of(current.as_ref().and_then(|t| t.refresh.as_ref()));
        let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
        for l in left {
            if fsutil::other_process_alive(l.pid) {
                continue;
            }
            let successor = l.tag == want && self.parse_leftover(&l.path, current.as_ref());
            let mtime = std::fs::metadata(&l.path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if successor && best.as_ref().is_none_or(|(t, _)| mtime > *t) {
                if let Some((_, old)) = best.replace((mtime, l.path)) {
                    let _ = std::fs::remove_file(old);
                }
            } else {
                let _ = std::fs::remove_file(&l.path);
            }
        }
        let Some((_, tmp)) = best else {
            return Ok(false);
        };
        let path = self.path();
        let io = |source| FileError::Write {
            path: path.clone(),
            source,
        };
        let target = fsutil::write_target(&path).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &target).map_err(io)?;
        if let Some(dir) = target.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(true)
    }

    /// True when the temp file at `tmp` parses as this kind of file and holds tokens that
    /// differ from `current`.
    fn parse_leftover(&self, tmp: &std::path::Path, current: Option<&Tokens>) -> bool {
        let probe = match self {
            Source::Bundle(_) => Source::Bundle(bundle::BundleFile {
                path: tmp.to_path_buf(),
            }),
            Source::ClaudeCli(_) => Source::ClaudeCli(claude_cli::CredentialsFile {
                path: tmp.to_path_buf(),
            }),
        };
        matches!(probe.read(), Ok(Some(t)) if Some(&t) != current && t.refresh.is_some())
    }
}

/// The name tag of a write meant to replace a file whose refresh token is `expected`: a
/// short hash, so a restarted llmd can match a leftover temp file to the state it was
/// meant to follow without the name revealing the token.
pub fn tag_of(expected: Option<&Secret>) -> String {
    match expected {
        Some(r) => {
            let d = Sha256::digest(r.expose().as_bytes());
            d[..8].iter().map(|b| format!("{b:02x}")).collect()
        }
        None => "none".into(),
    }
}

/// Latest expiry accepted from a file (year 9999); larger values are clamped so that
/// arithmetic on them cannot overflow.
const MAX_EXPIRY: i64 = 253_402_300_799;

/// An `expires_at` from a file, clamped to a sane range.
pub fn clamp_expiry(unix_secs: i64) -> i64 {
    unix_secs.clamp(0, MAX_EXPIRY)
}

/// Reads and parses a JSON object file (bounded, regular files only).
fn read_json_object(path: &std::path::Path) -> Result<Option<ObjectFile>, FileError> {
    let Some(bytes) = fsutil::read_regular_capped(path)? else {
        return Ok(None);
    };
    let obj = serde_json::from_slice(&bytes).map_err(|e| FileError::json(path, &e))?;
    Ok(Some((obj, bytes.len() as u64)))
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
