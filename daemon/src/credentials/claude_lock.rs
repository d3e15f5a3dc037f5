//! Claude Code's refresh locks, taken by llmd around its own refresh of a `claude-cli`
//! login so that llmd and Claude Code never refresh the same login at once.
//!
//! Claude Code 2.1.x guards a refresh with two lock folders (mkdir is atomic, so the
//! folder's existence is the lock):
//! - `<claude dir>/.oauth_refresh.lock/`, with an owner file inside;
//! - `<claude dir>.lock/` (`~/.claude.lock` by default), a proper-lockfile lock whose
//!   mtime the holder keeps fresh; one whose mtime is older than the stale limit is
//!   treated as abandoned.
//!
//! A held lock makes the other side wait with 1–2 s of jitter between tries and then
//! re-read the credentials file, adopting what the holder wrote.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// A lock whose mtime is older than this is abandoned (proper-lockfile's default stale).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// How often a held lock's mtime is refreshed.
const TOUCH_EVERY: Duration = Duration::from_secs(5);
/// Name of the owner file inside `.oauth_refresh.lock`.
const OWNER_FILE: &str = "owner";

/// The lock folders for one Claude Code config folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaudeLocks {
    /// Acquired in this order, released in reverse.
    paths: Vec<PathBuf>,
    /// Longest wait for a lock held by somebody else.
    wait: Duration,
}

impl ClaudeLocks {
    /// Locks of the Claude Code config folder `dir`.
    pub fn for_dir(dir: &Path, wait: Duration) -> Self {
        let mut paths = vec![dir.join(".oauth_refresh.lock")];
        let mut legacy = dir.as_os_str().to_owned();
        legacy.push(".lock");
        paths.push(PathBuf::from(legacy));
        ClaudeLocks { paths, wait }
    }

    /// The lock folders.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Takes every lock, waiting (with jitter) while a live holder has one. Gives up after
    /// the configured wait with a message that names the lock.
    pub async fn acquire(&self) -> Result<LockGuard, String> {
        let deadline = Instant::now() + self.wait;
        let mut held = LockGuard {
            paths: Vec::new(),
            toucher: None,
        };
        for path in &self.paths {
            loop {
                match std::fs::create_dir(path) {
                    Ok(()) => {
                        if path.ends_with(".oauth_refresh.lock") {
                            let owner =
                                format!("{{\"pid\":{},\"owner\":\"llmd\"}}\n", std::process::id());
                            let _ = std::fs::write(path.join(OWNER_FILE), owner);
                        }
                        held.paths.push(path.clone());
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if is_stale(path) {
                            tracing::warn!(lock = %path.display(), "removing abandoned Claude Code lock");
                            let _ = std::fs::remove_dir_all(path);
                            continue;
                        }
                        if Instant::now() >= deadline {
                            return Err(format!(
                                "Claude Code holds {} (waited {}s)",
                                path.display(),
                                self.wait.as_secs()
                            ));
                        }
                        let jitter = Duration::from_millis(1000 + rand::random::<u64>() % 1000);
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(jitter.min(left).max(Duration::from_millis(50))).await;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // The parent folder is missing: nobody else can hold this lock.
                        break;
                    }
                    Err(e) => return Err(format!("cannot create lock {}: {e}", path.display())),
                }
            }
        }
        let touched = held.paths.clone();
        held.toucher = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(TOUCH_EVERY).await;
                for p in &touched {
                    touch(p);
                }
            }
        }));
        Ok(held)
    }
}

fn is_stale(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > STALE_AFTER)
}

fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Held locks; dropping releases them.
#[derive(Debug)]
pub struct LockGuard {
    paths: Vec<PathBuf>,
    toucher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(t) = self.toucher.take() {
            t.abort();
        }
        for p in self.paths.iter().rev() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acquire_release_and_stale() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".claude");
        std::fs::create_dir(&dir).unwrap();
        let locks = ClaudeLocks::for_dir(&dir, Duration::from_millis(300));
        assert_eq!(locks.paths()[1], home.path().join(".claude.lock"));
        let g = locks.acquire().await.unwrap();
        assert!(dir.join(".oauth_refresh.lock/owner").exists());
        assert!(home.path().join(".claude.lock").is_dir());
        // A second taker times out while the first holds the locks.
        let e = locks.acquire().await.unwrap_err();
        assert!(e.contains(".oauth_refresh.lock"), "{e}");
        drop(g);
        assert!(!dir.join(".oauth_refresh.lock").exists());
        assert!(!home.path().join(".claude.lock").exists());
        // An abandoned lock is taken over.
        std::fs::create_dir(dir.join(".oauth_refresh.lock")).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::open(dir.join(".oauth_refresh.lock"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let g = locks.acquire().await.unwrap();
        drop(g);
    }
}
