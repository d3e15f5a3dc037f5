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

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// A lock whose mtime is older than this is abandoned (proper-lockfile's `stale: 1e4`).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// How often a held lock's mtime is refreshed (proper-lockfile: stale / 2).
const TOUCH_EVERY: Duration = Duration::from_secs(5);

/// Why the locks could not be taken. Without them llmd does not refresh.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Somebody else (Claude Code) holds a lock and kept it past our wait.
    #[error("Claude Code holds {} (waited {}s)", path.display(), waited.as_secs())]
    Busy {
        /// The lock folder.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The lock that keeps Claude Code out cannot be made here (missing or read-only
    /// folder), so a refresh could race with Claude Code's.
    #[error("cannot hold Claude Code's lock {}: {reason}", path.display())]
    Unavailable {
        /// The lock folder.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// Any other file system error.
    #[error("cannot create lock {}: {source}", path.display())]
    Io {
        /// The lock folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The lock folders for one Claude Code config folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaudeLocks {
    /// Acquired in this order, released in reverse. The first must be held; the second
    /// (the legacy `~/.claude.lock`) may be skipped where it cannot exist.
    paths: Vec<PathBuf>,
    /// Longest wait for a lock held by somebody else.
    wait: Duration,
    /// Where llmd notes the lock folders it holds, so that after a crash it can tell its
    /// own abandoned locks from Claude Code's and need not wait for them to go stale.
    record: Option<PathBuf>,
}

/// One held lock folder as noted in the record: the folder's identity, so that a folder
/// of the same name made later by Claude Code is never mistaken for ours.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct HeldLock {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Birth time in nanoseconds where the file system records one.
    born_ns: Option<u128>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: u32,
    locks: Vec<HeldLock>,
}

fn identity(path: &Path) -> Option<HeldLock> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let born_ns = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    Some(HeldLock {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        born_ns,
    })
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
            record: None,
        }
    }

    /// Notes held locks in `record` (a file in llmd's state folder).
    pub fn with_record(mut self, record: PathBuf) -> Self {
        self.record = Some(record);
        self
    }

    /// The lock folders.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Removes lock folders that a previous llmd process held when it died: the record
    /// names them, its process is gone, and each folder is still the very one it made.
    /// Returns how many were removed. Folders of a live process or of anyone else stay.
    pub fn reclaim_own(&self) -> usize {
        let Some(record_path) = &self.record else {
            return 0;
        };
        let Ok(Some(bytes)) = crate::fsutil::read_regular_capped(record_path) else {
            return 0;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
            let _ = std::fs::remove_file(record_path);
            return 0;
        };
        if crate::fsutil::other_process_alive(record.pid) {
            return 0;
        }
        let mut removed = 0;
        // Release in reverse order, as a live holder would.
        for held in record.locks.iter().rev() {
            if identity(&held.path).as_ref() == Some(held)
                && std::fs::remove_dir(&held.path).is_ok()
            {
                tracing::info!(lock = %held.path.display(), "removed a Claude Code lock left by an earlier llmd");
                removed += 1;
            }
        }
        let _ = std::fs::remove_file(record_path);
        removed
    }

    /// Takes every lock, waiting (1–2 s jitter between tries) while a live holder has one.
    /// Gives up after the configured wait with an error that names the lock.
    pub async fn acquire(&self) -> Result<LockGuard, LockError> {
        let deadline = Instant::now() + self.wait;
        'attempt: loop {
            let mut held = LockGuard {
                paths: Vec::new(),
                toucher: None,
                record: None,
            };
            for (i, path) in self.paths.iter().enumerate() {
                match take(path) {
                    Taken::Yes => held.paths.push(path.clone()),
                    Taken::Unavailable(_) if i > 0 => {}
                    Taken::Unavailable(reason) => {
                        return Err(LockError::Unavailable {
                            path: path.clone(),
                            reason,
                        })
                    }
                    Taken::Busy => {
                        // Like Claude Code: release what we hold, wait, start over.
                        drop(held);
                        if Instant::now() >= deadline {
                            return Err(LockError::Busy {
                                path: path.clone(),
                                waited: self.wait,
                            });
                        }
                        let jitter = Duration::from_millis(1000 + rand::random::<u64>() % 1000);
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(jitter.min(left).max(Duration::from_millis(50))).await;
                        continue 'attempt;
                    }
                    Taken::Failed(source) => {
                        return Err(LockError::Io {
                            path: path.clone(),
                            source,
                        })
                    }
                }
            }
            if let Some(record_path) = &self.record {
                let record = Record {
                    pid: std::process::id(),
                    locks: held.paths.iter().filter_map(|p| identity(p)).collect(),
                };
                // Best effort: without the record a crash only costs the stale wait.
                if let Ok(bytes) = serde_json::to_vec(&record) {
                    if let Some(dir) = record_path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    if std::fs::write(record_path, bytes).is_ok() {
                        held.record = Some(record_path.clone());
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
            return Ok(held);
        }
    }
}

enum Taken {
    Yes,
    Busy,
    /// The lock cannot exist there (missing or read-only folder), so nobody else can hold
    /// it either.
    Unavailable(&'static str),
    Failed(std::io::Error),
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Taken::Unavailable("its folder does not exist")
            }
            // Under systemd's ProtectSystem=strict the home folder is read-only, so the legacy
            // `~/.claude.lock` cannot be made by anyone in this sandbox; Claude Code takes
            // `.oauth_refresh.lock` first, which still keeps the two refreshes apart.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                tracing::debug!(lock = %path.display(), "lock folder is on a read-only file system");
                return Taken::Unavailable("the file system is read-only");
            }
            Err(e) => return Taken::Failed(e),
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
    record: Option<PathBuf>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(t) = self.toucher.take() {
            t.abort();
        }
        for p in self.paths.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
        if let Some(r) = self.record.take() {
            let _ = std::fs::remove_file(r);
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
        let e = locks.acquire().await.unwrap_err().to_string();
        assert!(e.contains(".oauth_refresh.lock"), "{e}");
        drop(g);
        assert!(!dir.join(".oauth_refresh.lock").exists());
        assert!(!home.path().join(".claude.lock").exists());
        // The second lock busy: the first is released again while waiting, as Claude Code does.
        std::fs::create_dir(home.path().join(".claude.lock")).unwrap();
        let e = locks.acquire().await.unwrap_err().to_string();
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

    #[tokio::test]
    async fn own_abandoned_locks_are_reclaimed_and_others_are_not() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".claude");
        std::fs::create_dir(&dir).unwrap();
        let record = home.path().join("state").join("held.json");
        let locks =
            ClaudeLocks::for_dir(&dir, Duration::from_millis(200)).with_record(record.clone());
        let g = locks.acquire().await.unwrap();
        assert!(record.is_file());
        // A crash: the guard never runs, and the record names a dead process.
        std::mem::forget(g);
        let text = std::fs::read_to_string(&record).unwrap();
        let dead = text.replacen(
            &format!("\"pid\":{}", std::process::id()),
            "\"pid\":999999999",
            1,
        );
        std::fs::write(&record, dead).unwrap();
        assert_eq!(locks.reclaim_own(), 2);
        assert!(!dir.join(".oauth_refresh.lock").exists());
        assert!(!record.exists());
        locks.acquire().await.unwrap();

        // A folder of the same name made by someone else is never taken for ours.
        let g = locks.acquire().await.unwrap();
        std::mem::forget(g);
        let text = std::fs::read_to_string(&record).unwrap();
        std::fs::write(
            &record,
            text.replacen(
                &format!("\"pid\":{}", std::process::id()),
                "\"pid\":999999999",
                1,
            ),
        )
        .unwrap();
        for p in locks.paths().iter().rev() {
            std::fs::remove_dir(p).unwrap();
        }
        // Claude Code takes the lock anew (a new folder, maybe on a reused inode).
        std::fs::create_dir(dir.join(".oauth_refresh.lock")).unwrap();
        let same = identity(&dir.join(".oauth_refresh.lock")).unwrap();
        let recorded: Record = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        if recorded.locks[0] != same {
            assert_eq!(locks.reclaim_own(), 0);
            assert!(
                dir.join(".oauth_refresh.lock").exists(),
                "Claude Code's lock stays"
            );
        }
    }

    #[tokio::test]
    async fn no_refresh_without_the_main_lock() {
        let home = tempfile::tempdir().unwrap();
        let locks = ClaudeLocks::for_dir(&home.path().join("absent"), Duration::from_millis(100));
        assert!(matches!(
            locks.acquire().await,
            Err(LockError::Unavailable { .. })
        ));
    }
}
