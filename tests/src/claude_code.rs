//! A stand-in for Claude Code's refresh path (the same protocol as the one in
//! `tests/tests/shared_login.rs`, shared here for the soak): take
//! `<cfg>/.oauth_refresh.lock` then `<cfg>.lock` (mkdir; if the second is busy, drop the
//! first and retry), re-read the file, refresh only if nobody else did, write by temp file
//! + rename, release. Failures are counted, never panics: the soak reports them.

use crate::fake_oauth::post_json;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Claude Code's client id, as the real CLI sends it.
const CLIENT_ID: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";

/// The stand-in for one Claude Code config folder.
pub struct FakeClaudeCode {
    /// The config folder (holds `.credentials.json`).
    pub dir: PathBuf,
    /// The token endpoint's address.
    pub endpoint: SocketAddr,
    /// Successful refreshes.
    pub refreshes: AtomicU64,
    /// Refreshes skipped because someone else refreshed first.
    pub skipped: AtomicU64,
    /// `invalid_grant` answers (a logged-out login).
    pub invalid_grants: AtomicU64,
    /// Other failures (unreadable file, endpoint errors).
    pub errors: AtomicU64,
}

/// A `.credentials.json` body.
pub fn creds(access: &str, refresh: &str, expires_at_ms: i64) -> String {
    json!({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh, "expiresAt": expires_at_ms,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "pro"}})
    .to_string()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A cheap pseudo-random number below `max` (no seed to manage).
pub fn rand_below(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (n.wrapping_mul(6364136223846793005) >> 17) % max.max(1)
}

impl FakeClaudeCode {
    /// A stand-in for `dir`, refreshing at `endpoint`.
    pub fn new(dir: PathBuf, endpoint: SocketAddr) -> FakeClaudeCode {
        FakeClaudeCode {
            dir,
            endpoint,
            refreshes: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            invalid_grants: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn locks(&self) -> [PathBuf; 2] {
        let mut legacy = self.dir.clone().into_os_string();
        legacy.push(".lock");
        [self.dir.join(".oauth_refresh.lock"), PathBuf::from(legacy)]
    }

    /// Access and refresh token in the file now.
    pub fn read(&self) -> Option<(String, String)> {
        let bytes = std::fs::read(self.dir.join(".credentials.json")).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        let o = &v["claudeAiOauth"];
        Some((
            o["accessToken"].as_str()?.to_owned(),
            o["refreshToken"].as_str()?.to_owned(),
        ))
    }

    async fn lock(&self) {
        let [a, b] = self.locks();
        loop {
            if std::fs::create_dir(&a).is_ok() {
                if std::fs::create_dir(&b).is_ok() {
                    return;
                }
                let _ = std::fs::remove_dir(&a);
            }
            tokio::time::sleep(Duration::from_millis(100 + rand_below(200))).await;
        }
    }

    fn unlock(&self) {
        let [a, b] = self.locks();
        let _ = std::fs::remove_dir(b);
        let _ = std::fs::remove_dir(a);
    }

    /// One forced refresh, as Claude Code does on a 401 or near expiry.
    pub async fn refresh_once(&self) {
        let Some((seen, _)) = self.read() else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.lock().await;
        self.refresh_locked(&seen).await;
        self.unlock();
    }

    async fn refresh_locked(&self, seen: &str) {
        let Some((access, refresh)) = self.read() else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if access != seen {
            // Someone refreshed while we waited: use theirs (Claude Code does the same).
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (status, body) = post_json(
            self.endpoint,
            "/v1/oauth/token",
            &json!({"grant_type": "refresh_token", "refresh_token": refresh, "client_id": CLIENT_ID}),
        )
        .await;
        if status != 200 {
            if body.to_string().contains("invalid_grant") {
                self.invalid_grants.fetch_add(1, Ordering::Relaxed);
            } else {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let (Some(a), Some(r), Some(exp)) = (
            body["access_token"].as_str(),
            body["refresh_token"].as_str(),
            body["expires_in"].as_i64(),
        ) else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let path = self.dir.join(".credentials.json");
        let tmp = self.dir.join(format!(
            ".credentials.json.tmp.{:08x}",
            rand_below(u32::MAX as u64)
        ));
        let written = std::fs::write(&tmp, creds(a, r, (now() + exp) * 1000))
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => {
                self.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
