//! llmd's own OAuth bundle file:
//! `{access_token, refresh_token, expires_at (unix s), account_email?, obtained_at?, source?,
//! scopes?, region?}`. Unknown fields are kept on rewrite.

use super::{unix_now, Tokens};
use crate::fsutil;
use crate::secret::Secret;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// A JSON object as read from a file.
pub type JsonObject = Map<String, Value>;

/// A bundle at `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleFile {
    /// File path.
    pub path: PathBuf,
}

impl BundleFile {
    /// Reads the bundle; refuses a file readable by group or others.
    pub fn read(&self) -> Result<Option<Tokens>, String> {
        Ok(self.read_object()?.map(|(t, _)| t))
    }

    /// Reads the bundle and also returns the whole JSON object.
    pub fn read_object(&self) -> Result<Option<(Tokens, JsonObject)>, String> {
        let p = &self.path;
        let text = match std::fs::read(p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read bundle {}: {e}", p.display())),
        };
        if fsutil::is_exposed(p) {
            return Err(format!(
                "bundle {} is readable by group/others; run `chmod 600 {}`",
                p.display(),
                p.display()
            ));
        }
        let obj: Map<String, Value> = serde_json::from_slice(&text)
            .map_err(|e| format!("bundle {}: {}", p.display(), super::json_problem(&e)))?;
        let access = obj
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let Some(access) = access else {
            return Err(format!("bundle {} has no `access_token`", p.display()));
        };
        let tokens = Tokens {
            access: Secret::new(access),
            refresh: obj
                .get("refresh_token")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            expires_at: obj
                .get("expires_at")
                .and_then(Value::as_i64)
                .map(super::clamp_expiry),
            scopes: scopes_of(obj.get("scopes")),
        };
        Ok(Some((tokens, obj)))
    }

    /// Writes `tokens`, keeping the other fields of the current file.
    pub fn write(&self, tokens: &Tokens) -> Result<(), String> {
        // A file that exists but cannot be read is not overwritten: it may hold fields
        // (region, account) that the rewrite would lose.
        let mut obj = match self.read_object()? {
            Some((_, obj)) => obj,
            None => Map::new(),
        };
        obj.insert(
            "access_token".into(),
            Value::String(tokens.access.expose().into()),
        );
        if let Some(r) = &tokens.refresh {
            obj.insert("refresh_token".into(), Value::String(r.expose().into()));
        }
        match tokens.expires_at {
            Some(e) => obj.insert("expires_at".into(), e.into()),
            None => obj.remove("expires_at"),
        };
        obj.insert("obtained_at".into(), unix_now().into());
        if !tokens.scopes.is_empty() {
            obj.insert("scopes".into(), tokens.scopes.clone().into());
        }
        obj.entry("source").or_insert_with(|| "llmd".into());
        self.write_object(&obj)
    }

    /// Writes a whole JSON object (0600, atomic, into a 0700 folder when llmd creates it).
    pub fn write_object(&self, obj: &Map<String, Value>) -> Result<(), String> {
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                fsutil::ensure_private_dir(dir)?;
            }
        }
        let mut bytes = serde_json::to_vec_pretty(obj).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        fsutil::write_secret_atomic(&self.path, &bytes)
            .map_err(|e| format!("cannot write bundle {}: {e}", self.path.display()))
    }
}

/// Scopes as a list, from either a JSON array or a space-separated string.
pub fn scopes_of(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_keeps_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let b = BundleFile {
            path: dir.path().join("p.json"),
        };
        std::fs::write(&b.path, r#"{"access_token":"a1","refresh_token":"r1","expires_at":100,"account_email":"x@y","custom":[1]}"#).unwrap();
        std::fs::set_permissions(&b.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = b.read().unwrap().unwrap();
        assert_eq!((t.access.expose(), t.expires_at), ("a1", Some(100)));
        let new = Tokens {
            access: Secret::new("a2"),
            refresh: Some(Secret::new("r2")),
            expires_at: Some(200),
            scopes: vec![],
        };
        b.write(&new).unwrap();
        let (t, obj) = b.read_object().unwrap().unwrap();
        assert_eq!(t.refresh.unwrap().expose(), "r2");
        assert_eq!(obj["account_email"], "x@y");
        assert_eq!(obj["custom"], serde_json::json!([1]));
        assert_eq!(fsutil::mode_of(&b.path), Some(0o600));
    }

    #[test]
    fn refuses_exposed_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let b = BundleFile {
            path: dir.path().join("p.json"),
        };
        std::fs::write(&b.path, r#"{"access_token":"a1"}"#).unwrap();
        std::fs::set_permissions(&b.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(b.read().unwrap_err().contains("chmod 600"));
    }
}
