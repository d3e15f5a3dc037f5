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

async fn run(mut updates: mpsc::UnboundedReceiver<Vec<Target>>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut stream = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
    let mut watches = stream.watches();
    let mut by_wd: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    let mut entries: Vec<Entry> = Vec::new();
    // Folders that did not exist yet (Claude Code not installed, no login so far): tried
    // again now and then, so a login made later is still picked up without a reload.
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(10));
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM;
    loop {
        tokio::select! {
            update = updates.recv() => {
                let Some(targets) = update else { return Ok(()) };
                for wd in by_wd.keys() {
                    let _ = watches.remove(wd.clone());
                }
                by_wd.clear();
                entries.clear();
                missing.clear();
                for (path, tell) in targets {
                    // Watch the link's folder and, for a symlink, the target's folder too.
                    let mut files = vec![path.clone()];
                    if let Ok(t) = fsutil::write_target(&path) {
                        if t != path {
                            files.push(t);
                        }
                    }
                    for file in files {
                        let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else { continue };
                        if !by_wd.values().any(|d| d == dir) {
                            match watches.add(dir, mask) {
                                Ok(wd) => { by_wd.insert(wd, dir.to_path_buf()); }
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                    if !missing.iter().any(|m| m == dir) {
                                        missing.push(dir.to_path_buf());
                                    }
                                }
                                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder"),
                            }
                        }
                        entries.push(Entry { dir: dir.to_path_buf(), name: name.to_owned(), tell: tell.clone() });
                    }
                }
            }
            _ = retry.tick(), if !missing.is_empty() => {
                missing.retain(|dir| match watches.add(dir, mask) {
                    Ok(wd) => {
                        by_wd.insert(wd, dir.clone());
                        for e in entries.iter().filter(|e| &e.dir == dir) {
                            let _ = e.tell.send(Command::SourceChanged);
                        }
                        false
                    }
                    Err(_) => true,
                });
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
                    for e in &entries {
                        let _ = e.tell.send(Command::SourceChanged);
                    }
                    continue;
                }
                let (Some(dir), Some(name)) = (by_wd.get(&event.wd), event.name) else { continue };
                for e in entries.iter().filter(|e| &e.dir == dir && e.name == name) {
                    let _ = e.tell.send(Command::SourceChanged);
                }
            }
        }
    }
}
