//! Sealing of the values kept in etcd: XChaCha20-Poly1305 under the shared `seal_key_file`
//! secret, with the etcd key name as associated data, so etcd only ever holds ciphertext
//! and a value moved to another key (another login) fails to open.

use crate::credentials::Tokens;
use crate::secret::Secret;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Format tag of a sealed value: bumped if the layout ever changes.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
/// Largest sealed value opened; a login is a few kilobytes at most.
const MAX_SEALED: usize = 64 * 1024;

/// Why the seal key or a sealed value cannot be used. Never quotes key or value bytes.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read.
    #[error("cannot read seal_key_file {path}: {why}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        why: String,
    },
    /// The key file is readable by group or others.
    #[error("seal_key_file {0} is readable by group/others; run `chmod 600 {0}`")]
    Exposed(String),
    /// Neither 32 raw bytes nor 64 hex characters.
    #[error("seal_key_file {0} must hold 32 raw bytes or 64 hex characters")]
    BadKey(String),
    /// The value is not a sealed login, or was sealed with another key or for another key name.
    #[error(
        "the value in etcd at {0} cannot be opened (another seal key, another login, or tampered)"
    )]
    Open(String),
}

/// The shared sealing secret.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// The plaintext layout: what a login is made of.
#[derive(Serialize, Deserialize)]
struct Plain {
    access: String,
    refresh: Option<String>,
    expires_at: Option<i64>,
    #[serde(default)]
    scopes: Vec<String>,
}

impl Sealer {
    /// Reads the key file (0600, 32 raw bytes or 64 hex characters).
    pub fn from_file(path: &Path) -> Result<Sealer, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read = |e: std::io::Error| SealError::Read {
            path: shown.clone(),
            why: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(SealError::Exposed(shown));
        }
        if meta.len() > 1024 {
            return Err(SealError::BadKey(shown));
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let key = parse_key(&bytes).ok_or(SealError::BadKey(shown))?;
        Ok(Sealer::new(&key))
    }

    /// A sealer for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Seals `tokens` for the etcd key `name`: version, random nonce, ciphertext.
    pub fn seal(&self, name: &str, tokens: &Tokens) -> Vec<u8> {
        let plain = Plain {
            access: tokens.access.expose().to_owned(),
            refresh: tokens.refresh.as_ref().map(|r| r.expose().to_owned()),
            expires_at: tokens.expires_at,
            scopes: tokens.scopes.clone(),
        };
        let msg = Secret::new(serde_json::to_string(&plain).unwrap_or_default());
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: msg.expose().as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            // Encryption fails only for messages beyond 256 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value read from the etcd key `name`.
    pub fn open(&self, name: &str, value: &[u8]) -> Result<Tokens, SealError> {
        let bad = || SealError::Open(name.to_owned());
        if value.len() > MAX_SEALED || value.len() < 1 + NONCE_LEN || value[0] != VERSION {
            return Err(bad());
        }
        let (nonce, body) = value[1..].split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        let plain: Plain = serde_json::from_slice(&plain).map_err(|_| bad())?;
        Ok(Tokens {
            access: Secret::new(plain.access),
            refresh: plain.refresh.map(Secret::new),
            expires_at: plain.expires_at,
            scopes: plain.scopes,
        })
    }
}

/// 32 raw bytes, or 64 hex characters (surrounding whitespace ignored).
fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Some(raw);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            access: Secret::new("sk-ant-oat-planted-access"),
            refresh: Some(Secret::new("sk-ant-ort-planted-refresh")),
            expires_at: Some(1_900_000_000),
            scopes: vec!["user:inference".into()],
        }
    }

    #[test]
    fn a_sealed_login_opens_under_its_own_key_name_only() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal("/llmd/u/login/a", &tokens());
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("planted"), "ciphertext holds the token");
        assert_eq!(s.open("/llmd/u/login/a", &sealed).ok(), Some(tokens()));
        assert!(matches!(
            s.open("/llmd/u/login/b", &sealed),
            Err(SealError::Open(_))
        ));
        assert!(Sealer::new(&[8; 32])
            .open("/llmd/u/login/a", &sealed)
            .is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(s.open("/llmd/u/login/a", &tampered).is_err());
        assert!(s.open("/llmd/u/login/a", b"x").is_err());
    }

    #[test]
    fn keys_are_raw_or_hex() {
        assert_eq!(parse_key(&[1; 32]), Some([1; 32]));
        let hex = "ab".repeat(32) + "\n";
        assert_eq!(parse_key(hex.as_bytes()), Some([0xab; 32]));
        assert_eq!(parse_key(b"short"), None);
        assert_eq!(parse_key("zz".repeat(32).as_bytes()), None);
    }
}
