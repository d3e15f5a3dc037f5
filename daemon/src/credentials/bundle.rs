//! llmd's own OAuth bundle file:
//! `{access_token, refresh_token, expires_at (unix s), account_email?, obtained_at?, source?,
//! scopes?, region?}`. Unknown fields are kept on rewrite.

use super::{unix_now, FileError, Tokens};
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
    pub fn read(&self) -> Result<Option<Tokens>, FileError> {
        Ok(self.read_object()?.map(|(t, _)| t))
    }

    /// Reads the bundle and also returns the whole JSON object.
    pub fn read_object(&self) -> Result<Option<(Tokens, JsonObject)>, FileError> {
        match self.read_parsed()? {
            Some((Some(t), obj, _)) => Ok(Some((t, obj))),
            Some((None, _, _)) => Err(FileError::MissingField {
                path: self.path.clone(),
                field: "access_token",
            }),
            None => Ok(None),
        }
    }

    /// The tokens (or `None` without an `access_token`), the object and the file size.
    pub(super) fn read_parsed(&self) -> Result<Option<super::Parsed>, FileError> {
        let p = &self.path;
        let Some((obj, len)) = super::read_json_object(p)? else {
            return Ok(None);
        };
        if fsutil::is_exposed(p) {
            return Err(FileError::Exposed(p.clone()));
        }
        let access = obj
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let tokens = access.map(|access| Tokens {
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
        });
        Ok(Some((tokens, obj, len)))
    }

    /// Writes `tokens`, keeping the other fields of the current file.
    pub fn write(&self, tokens: &Tokens) -> Result<(), FileError> {
        super::Source::Bundle(self.clone())
            .write(tokens, super::Allow::Any)
            .map(|_| ())
    }

    /// Writes a whole JSON object (0600, atomic, into a 0700 folder when llmd creates it).
    pub fn write_object(&self, obj: &Map<String, Value>) -> Result<(), FileError> {
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                fsutil::ensure_private_dir(dir).map_err(FileError::Folder)?;
            }
        }
        let mut bytes = serde_json::to_vec_pretty(obj).unwrap_or_default();
        bytes.push(b'\n');
        fsutil::write_secret_atomic(&self.path, &bytes).map_err(|source| FileError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// The bundle `obj` with `tokens` put in, as the bytes of the file.
pub(crate) fn render(mut obj: JsonObject, tokens: &Tokens) -> Vec<u8> {
    obj.insert(
        "access_token".into(),
        Value::String(tokens.access.expose().into()),
    );
    if let Some(r) = &tokens.refresh {
        obj.insert("refresh_token".into(), Value::String(r.expose().into()));
    }
    match tokens.expires_at {
        Some(e) => obj.insert("expires_at".into(), e.into()),
        None => obj.shift_remove("expires_at"),
    };
    obj.insert("obtained_at".into(), unix_now().into());
    if !tokens.scopes.is_empty() {
        obj.insert("scopes".into(), tokens.scopes.clone().into());
    }
    obj.entry("source").or_insert_with(|| "llmd".into());
    // Serializing a map of strings and numbers cannot fail.
    let mut bytes = serde_json::to_vec_pretty(&obj).unwrap_or_default();
    bytes.push(b'\n');
    bytes
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
        assert!(b.read().unwrap_err().to_string().contains("chmod 600"));
    }
}
