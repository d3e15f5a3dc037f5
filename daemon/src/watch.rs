//! Watches login files through their parent folders (other programs replace them by
//! rename, which a watch on the file itself would miss) and tells the owning login task.

use crate::fsutil;
use crate::refresh::Command;
use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// A login file and the task to tell when it changes.
pub type Target = (PathBuf, mpsc::UnboundedSender<Command>);

/// Handle of the watcher task.
pub struct Watcher {
    targets: mpsc::UnboundedSender<Vec<Target>>,
}

impl Watcher {
    /// Starts the watcher task. Without inotify, files are still read on reload.
    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            if let Err(e) = run(rx).await {
                tracing::warn!(error = %e, "file watching unavailable; credential files are re-read only on reload");
            }
        });
        Watcher { targets: tx }
    }

    /// Replaces the set of watched files.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let _ = self.targets.send(targets);
    }
}

struct Entry {
    dir: PathBuf,
    name: OsString,
    tell: mpsc::UnboundedSender<Command>,
}

/// How often folders that do not exist (yet, or any more) are tried again.
const MISSING_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The watch set: which folders are watched for which files.
struct Watches {
    watches: inotify::Watches,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    targets: Vec<Target>,
    entries: Vec<Entry>,
    /// Folders that did not exist (Claude Code not installed, a folder removed and not yet
    /// made again): tried again every [`MISSING_RETRY`], so a login made later is picked up
    /// without a reload.
    missing: Vec<PathBuf>,
}

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

impl Watches {
    /// Recomputes the entries from the targets: each file's folder and, for a symlink, the
    /// folder of its current final target (which changes when the link is re-pointed).
    /// Returns the folders that were watched anew.
    fn rebuild(&mut self) -> Vec<PathBuf> {
        let mut entries = Vec::new();
        for (path, tell) in &self.targets {
            let mut files = vec![path.clone()];
            if let Ok(t) = fsutil::write_target(path) {
                if &t != path {
                    files.push(t);
                }
            }
            for file in files {
                let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
                    continue;
                };
                entries.push(Entry {
                    dir: dir.to_path_buf(),
                    name: name.to_owned(),
                    tell: tell.clone(),
                });
            }
        }
        let wanted: Vec<PathBuf> = {
            let mut d: Vec<PathBuf> = entries.iter().map(|e| e.dir.clone()).collect();
            d.sort();
            d.dedup();
            d
        };
        let stale: Vec<WatchDescriptor> = self
            .by_wd
            .iter()
            .filter(|(_, d)| !wanted.contains(d))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in stale {
            let _ = self.watches.remove(wd.clone());
            self.by_wd.remove(&wd);
        }
        self.missing.retain(|m| wanted.contains(m));
        let mut added = Vec::new();
        for dir in wanted {
            if self.by_wd.values().any(|d| *d == dir) || self.missing.contains(&dir) {
                continue;
            }
            match self.watches.add(&dir, mask()) {
                Ok(wd) => {
                    self.by_wd.insert(wd, dir.clone());
                    added.push(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.missing.push(dir),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder"),
            }
        }
        self.entries = entries;
        added
    }

    fn tell_dir(&self, dir: &PathBuf) {
        for e in self.entries.iter().filter(|e| &e.dir == dir) {
            let _ = e.tell.send(Command::SourceChanged);
        }
    }
}

async fn run(mut updates: mpsc::UnboundedReceiver<Vec<Target>>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut stream = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
    let mut w = Watches {
        watches: stream.watches(),
        by_wd: HashMap::new(),
        targets: Vec::new(),
        entries: Vec::new(),
        missing: Vec::new(),
    };
    let mut retry = tokio::time::interval(MISSING_RETRY);
    loop {
        tokio::select! {
            update = updates.recv() => {
                let Some(targets) = update else { return Ok(()) };
                w.targets = targets;
                w.rebuild();
            }
            _ = retry.tick(), if !w.missing.is_empty() => {
                w.missing.clear();
                for dir in w.rebuild() {
                    w.tell_dir(&dir);
                }
            }
            event = stream.next() => {
                let Some(event) = event else { return Ok(()) };
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        // One bad read must not end watching for good.
                        tracing::warn!(error = %e, "reading file events failed");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        continue;
                    }
                };
                if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                    for e in &w.entries {
                        let _ = e.tell.send(Command::SourceChanged);
                    }
                    continue;
                }
                if event.mask.contains(inotify::EventMask::IGNORED) {
                    // The folder itself was removed: watch for it to come back.
                    if let Some(dir) = w.by_wd.remove(&event.wd) {
                        w.tell_dir(&dir);
                        w.rebuild();
                    }
                    continue;
                }
                let (Some(dir), Some(name)) = (w.by_wd.get(&event.wd).cloned(), event.name) else { continue };
                let hit = w.entries.iter().any(|e| e.dir == dir && e.name == name);
                if hit {
                    // A symlink may have been re-pointed: follow it to its new target.
                    for added in w.rebuild() {
                        w.tell_dir(&added);
                    }
                    for e in w.entries.iter().filter(|e| e.dir == dir && e.name == name) {
                        let _ = e.tell.send(Command::SourceChanged);
                    }
                }
            }
        }
    }
}
