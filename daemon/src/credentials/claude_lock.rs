//! Claude Code's refresh locks, taken by llmd around its own refresh of a `claude-cli`
//! login so that llmd and Claude Code never refresh the same login at once.
//!
//! Verified against the real CLI (v2.1.197, strace of `claude -p` refreshing an expired
//! login offline through a local proxy):
//! - it takes two proper-lockfile folder locks, in order: `<cfg>/.oauth_refresh.lock` and
//!   `<realpath(cfg)>.lock` (`~/.claude.lock` by default, `/x/cfg.lock` for
//!   `CLAUDE_CONFIG_DIR=/x/cfg`); when the second is busy it drops the first and retries;
//! - the folders are created with mkdir and removed with rmdir, with nothing inside: a
//!   file inside makes its stale-lock cleanup fail (ENOTEMPTY), so llmd writes none;
//! - the holder sets both folders' mtime to now every 5 s; a folder whose mtime is more
//!   than 10 s old is abandoned and removed by the next taker;
//! - a busy lock is retried 5 times with 1–2 s random waits, then Claude Code gives up
//!   without refreshing; before every try it re-reads `.credentials.json` and uses the
//!   tokens it finds there if the access token changed or is valid for more than 5 min.
//!
//! llmd follows the same protocol, waits longer (it is the designated refresher), and
//! refreshes at least 10 minutes ahead, so Claude Code always finds fresh tokens.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// A lock whose mtime is older than this is abandoned (proper-lockfile's `stale: 1e4`).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// How often a held lock's mtime is refreshed (proper-lockfile: stale / 2).
const TOUCH_EVERY: Duration = Duration::from_secs(5);

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
        let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut legacy = real.into_os_string();
        legacy.push(".lock");
        ClaudeLocks {
            paths: vec![dir.join(".oauth_refresh.lock"), PathBuf::from(legacy)],
            wait,
        }
    }

    /// The lock folders.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Takes every lock, waiting (1–2 s jitter between tries) while a live holder has one.
    /// Gives up after the configured wait with a message that names the lock.
    pub async fn acquire(&self) -> Result<LockGuard, String> {
        let deadline = Instant::now() + self.wait;
        'attempt: loop {
            let mut held = LockGuard {
                paths: Vec::new(),
                toucher: None,
            };
            for path in &self.paths {
                match take(path) {
                    Taken::Yes => held.paths.push(path.clone()),
                    Taken::Unavailable => {}
                    Taken::Busy => {
                        // Like Claude Code: release what we hold, wait, start over.
                        drop(held);
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
                        continue 'attempt;
                    }
                    Taken::Failed(e) => return Err(e),
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
            return Ok(held);
        }
    }
}

enum Taken {
    Yes,
    Busy,
    /// The lock cannot exist there (missing or read-only folder), so nobody else can hold
    /// it either.
    Unavailable,
    Failed(String),
}

fn take(path: &Path) -> Taken {
    for _ in 0..2 {
        match std::fs::create_dir(path) {
            Ok(()) => return Taken::Yes,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !is_stale(path) {
                    return Taken::Busy;
                }
                tracing::warn!(lock = %path.display(), "removing abandoned Claude Code lock");
                if std::fs::remove_dir(path).is_err() {
                    return Taken::Busy;
                }
            }
            // The parent folder is missing: nobody else can hold this lock either.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Taken::Unavailable,
            // Under systemd's ProtectSystem=strict the home folder is read-only, so the legacy
            // `~/.claude.lock` cannot be made by anyone in this sandbox; Claude Code takes
            // `.oauth_refresh.lock` first, which still keeps the two refreshes apart.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                tracing::debug!(lock = %path.display(), "lock folder is on a read-only file system; skipping it");
                return Taken::Unavailable;
            }
            Err(e) => return Taken::Failed(format!("cannot create lock {}: {e}", path.display())),
        }
    }
    Taken::Busy
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
            let _ = std::fs::remove_dir(p);
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
        assert!(dir.join(".oauth_refresh.lock").is_dir());
        assert_eq!(
            std::fs::read_dir(dir.join(".oauth_refresh.lock"))
                .unwrap()
                .count(),
            0,
            "nothing inside"
        );
        assert!(home.path().join(".claude.lock").is_dir());
        // A second taker times out while the first holds the locks.
        let e = locks.acquire().await.unwrap_err();
        assert!(e.contains(".oauth_refresh.lock"), "{e}");
        drop(g);
        assert!(!dir.join(".oauth_refresh.lock").exists());
        assert!(!home.path().join(".claude.lock").exists());
        // The second lock busy: the first is released again while waiting, as Claude Code does.
        std::fs::create_dir(home.path().join(".claude.lock")).unwrap();
        let e = locks.acquire().await.unwrap_err();
        assert!(e.contains(".claude.lock"), "{e}");
        assert!(
            !dir.join(".oauth_refresh.lock").exists(),
            "first lock released while waiting"
        );
        std::fs::remove_dir(home.path().join(".claude.lock")).unwrap();
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
