//! Who may use the gateway: the gateway key (and named agent keys derived from it), the
//! `Host` check against DNS rebinding, and the `Origin` check against web pages.

use crate::fsutil;
use crate::secret::Secret;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Every gateway key starts with this, so that a leaked one is recognisable.
pub const KEY_PREFIX: &str = "llmd-gw-";
/// Longest agent name in a named key.
pub const MAX_AGENT_LEN: usize = 64;
/// Agent name counted for requests made with the main key.
pub const MAIN_AGENT: &str = "(main key)";

/// The gateway's keys: the main one from the state folder; named keys are derived from it
/// (`llmd-gw-<agent>.<mac>`), so issuing one needs no storage and revoking all of them
/// means deleting the key file.
pub struct Keys {
    main: Secret,
}

/// Path of the key file: in its own 0700 folder, so that a state folder someone made
/// with `mkdir` (0755) does not expose it.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("gateway").join("key")
}

impl Keys {
    /// Reads the key file, creating it (0600, in a 0700 folder) with a fresh random key
    /// on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<Keys, String> {
        let path = key_path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().starts_with(KEY_PREFIX) => {
                if fsutil::is_exposed(&path) {
                    return Err(format!(
                        "{} is readable by other users; `chmod 600` it (or delete it for a new key)",
                        path.display()
                    ));
                }
                return Ok(Keys {
                    main: Secret::new(text.trim()),
                });
            }
            Ok(_) => {
                return Err(format!(
                    "{} does not hold a gateway key; delete it to get a new one",
                    path.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if let Some(dir) = path.parent() {
            fsutil::ensure_private_dir(dir)?;
        }
        let bytes: [u8; 32] = rand::random();
        let key = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        fsutil::write_secret_atomic(&path, format!("{key}\n").as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), "created the gateway key");
        Ok(Keys {
            main: Secret::new(key),
        })
    }

    /// A key from a known value (tests).
    pub fn from_secret(main: Secret) -> Keys {
        Keys { main }
    }

    /// The main key, or the named key of `agent`.
    pub fn issue(&self, agent: Option<&str>) -> Result<Secret, String> {
        match agent {
            None => Ok(self.main.clone()),
            Some(a) => {
                check_agent(a)?;
                Ok(Secret::new(format!("{KEY_PREFIX}{a}.{}", self.mac(a))))
            }
        }
    }

    /// The agent a presented key belongs to ([`MAIN_AGENT`] for the main key), or `None`
    /// when the key is not one of ours.
    pub fn check(&self, presented: &str) -> Option<String> {
        if eq(presented.as_bytes(), self.main.expose().as_bytes()) {
            return Some(MAIN_AGENT.to_owned());
        }
        let rest = presented.strip_prefix(KEY_PREFIX)?;
        let (agent, mac) = rest.rsplit_once('.')?;
        check_agent(agent).ok()?;
        eq(mac.as_bytes(), self.mac(agent).as_bytes()).then(|| agent.to_owned())
    }

    fn mac(&self, agent: &str) -> String {
        // `new_from_slice` accepts keys of any length for HMAC.
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(self.main.expose().as_bytes()) else {
            return String::new();
        };
        m.update(b"llmd gateway agent key\0");
        m.update(agent.as_bytes());
        let out = m.finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&out[..24])
    }
}

fn check_agent(a: &str) -> Result<(), String> {
    if a.is_empty()
        || a.len() > MAX_AGENT_LEN
        || !a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "agent names use 1 to {MAX_AGENT_LEN} letters, digits, `-` or `_`"
        ));
    }
    Ok(())
}

/// Compares in time independent of where the inputs differ (hashing first makes the
/// lengths equal too).
fn eq(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// The key a client presented, in whichever place its SDK puts one: `x-api-key`
/// (Anthropic), `authorization: Bearer` (OpenAI), `x-goog-api-key` or the `key` query
/// parameter (Gemini).
pub fn presented_key<'a>(
    headers: &'a axum::http::HeaderMap,
    query: Option<&'a str>,
) -> Option<&'a str> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(k) = header("x-api-key").filter(|k| !k.is_empty()) {
        return Some(k);
    }
    if let Some(a) = header("authorization") {
        let (scheme, rest) = a.split_once(' ').unwrap_or((a, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Some(rest.trim());
        }
    }
    if let Some(k) = header("x-goog-api-key").filter(|k| !k.is_empty()) {
        return Some(k);
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .filter(|k| !k.is_empty())
}

/// The `Host` values a TCP listener on `addr` answers to: the address itself and
/// `localhost:PORT`. Anything else may be a DNS-rebinding page.
pub fn allowed_hosts(addr: &std::net::SocketAddr) -> Vec<String> {
    vec![addr.to_string(), format!("localhost:{}", addr.port())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_keys_check_and_forgeries_do_not() {
        let k = Keys::from_secret(Secret::new("llmd-gw-main"));
        assert_eq!(k.check("llmd-gw-main").as_deref(), Some(MAIN_AGENT));
        let aider = k.issue(Some("aider")).unwrap();
        assert_eq!(k.check(aider.expose()).as_deref(), Some("aider"));
        let forged = aider.expose().replace("aider", "other");
        assert_eq!(k.check(&forged), None);
        assert_eq!(k.check("llmd-gw-main "), None);
        assert_eq!(k.check(""), None);
        assert!(k.issue(Some("a.b")).is_err());
        let other = Keys::from_secret(Secret::new("llmd-gw-other"));
        assert_eq!(other.check(aider.expose()), None);
    }

    #[test]
    fn key_found_in_each_sdk_place() {
        use axum::http::HeaderMap;
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h, Some("alt=sse&key=K1")), Some("K1"));
        h.insert("x-goog-api-key", "K2".parse().unwrap());
        assert_eq!(presented_key(&h, None), Some("K2"));
        h.insert("authorization", "Bearer K3".parse().unwrap());
        assert_eq!(presented_key(&h, None), Some("K3"));
        h.insert("x-api-key", "K4".parse().unwrap());
        assert_eq!(presented_key(&h, None), Some("K4"));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = Keys::load_or_create(&state).unwrap();
        let b = Keys::load_or_create(&state).unwrap();
        assert_eq!(a.main, b.main);
        assert_eq!(fsutil::mode_of(&key_path(&state)), Some(0o600));
        assert!(a.main.expose().len() > 40);
    }
}
