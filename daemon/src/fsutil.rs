//! File helpers for secrets: private modes, atomic symlink-preserving replace.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The current user's uid.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Where a write to `path` must land so that a symlink at `path` survives: the final
/// target of the link chain, or `path` itself.
pub fn write_target(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&current)?;
                current = match current.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "too many levels of symlinks at {}",
        path.display()
    )))
}

/// Replaces the file at `path` with `contents`, mode 0600, atomically: a temp file in the
/// same folder, fsync, rename over the target, fsync the folder. A symlink at `path` is
/// followed, so the link stays and its target is replaced.
pub fn write_secret_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut w = PreparedWrite::create(path, "0", 0)?;
    w.fill(contents)?;
    w.commit()
}

/// Largest credential or key file llmd reads; anything bigger is refused, so a file
/// replaced by a link to `/dev/zero` or a huge file cannot exhaust memory.
pub const MAX_SECRET_FILE: u64 = 1 << 20;

/// Why a secret file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not a regular file (a FIFO, a device, a folder): reading it could block forever or
    /// never end.
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    /// Larger than [`MAX_SECRET_FILE`].
    #[error("{} is larger than {} bytes", .0.display(), MAX_SECRET_FILE)]
    TooLarge(PathBuf),
    /// The read itself failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Reads a regular file of at most [`MAX_SECRET_FILE`] bytes, following symlinks;
/// `Ok(None)` when it does not exist. The open does not block on a FIFO, and the size is
/// checked on the open file, so a swap between check and read cannot slip past the cap.
pub fn read_regular_capped(path: &Path) -> Result<Option<Vec<u8>>, ReadError> {
    use std::io::Read;
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(path.to_path_buf()));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(ReadError::TooLarge(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(ReadError::TooLarge(path.to_path_buf()));
    }
    Ok(Some(bytes))
}

/// Marker in the names of llmd's temp files: `.<name>.llmd-tmp-<pid>-<tag>-<random>`.
const TMP_MARK: &str = ".llmd-tmp-";

/// An atomic replace split in two, so that everything that can fail for lack of space or
/// permission fails *before* a token endpoint is asked for new tokens:
/// [`PreparedWrite::create`] makes the temp file next to the target and reserves its
/// space; [`PreparedWrite::fill`] writes the contents (from then on they survive a kill of
/// the process: a restarted llmd finds the temp file); [`PreparedWrite::commit`] makes them
/// durable (fsync, rename, fsync of the folder). Dropping it uncommitted removes the temp
/// file.
#[derive(Debug)]
pub struct PreparedWrite {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
    /// Length of what was written so far.
    filled_len: u64,
}

impl PreparedWrite {
    /// Creates the temp file for `path` (following a symlink to its final target). `tag`
    /// goes into the temp file's name, so that a restarted llmd can tell which file state
    /// the contents were meant to replace. `reserve` bytes are allocated up front.
    pub fn create(path: &Path, tag: &str, reserve: u64) -> io::Result<PreparedWrite> {
        let target = write_target(path)?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}{TMP_MARK}{}-{tag}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = PreparedWrite {
            file: Some(file),
            tmp,
            target,
            dir,
            committed: false,
            filled_len: 0,
        };
        if reserve > 0 {
            w.reserve(reserve)?;
        }
        Ok(w)
    }

    fn reserve(&mut self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let Some(f) = &self.file else { return Ok(()) };
        // KEEP_SIZE: the blocks are reserved but the file stays empty, so the fill after a
        // refresh is one write with no truncation on the way.
        // SAFETY: the descriptor is open for writing for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                0,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // File systems without fallocate: write zeros, which allocates as well.
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                let mut f = f;
                f.write_all(&vec![0u8; len as usize])?;
                f.set_len(0)
            }
            _ => Err(e),
        }
    }

    /// The file this write replaces (the final target of a symlink).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes the contents into the temp file (replacing anything written before).
    pub fn fill(&mut self, contents: &[u8]) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("write already committed"));
        };
        f.seek(SeekFrom::Start(0))?;
        f.write_all(contents)?;
        if self.filled_len > contents.len() as u64 {
            f.set_len(contents.len() as u64)?;
        }
        self.filled_len = contents.len() as u64;
        Ok(())
    }

    /// fsync, rename over the target, fsync the folder.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else {
            return Err(io::Error::other("write already committed"));
        };
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        File::open(&self.dir)?.sync_all()
    }
}

impl Drop for PreparedWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A temp file llmd left next to `path` (a crash between writing and renaming).
#[derive(Debug)]
pub struct Leftover {
    /// The temp file.
    pub path: PathBuf,
    /// The process that wrote it.
    pub pid: u32,
    /// The tag given to [`PreparedWrite::create`].
    pub tag: String,
}

/// llmd's temp files next to `path` (its final symlink target).
pub fn leftovers(path: &Path) -> Vec<Leftover> {
    let Ok(target) = write_target(path) else {
        return Vec::new();
    };
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}{TMP_MARK}", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(tag)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse() else { continue };
        out.push(Leftover {
            path: entry.path(),
            pid,
            tag: tag.to_owned(),
        });
    }
    out
}

/// True while a process with this pid exists (and is not this one).
pub fn other_process_alive(pid: u32) -> bool {
    if pid == std::process::id() || pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Creates `dir` (and parents) as 0700 if missing, then checks it is ours and closed to
/// group and others. The error says what to fix.
pub fn ensure_private_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    check_private_dir(dir)
}

/// Checks that `dir` is a folder owned by this user (or root running as root) with no
/// group/other permissions.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    let meta = fs::metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder", dir.display()));
    }
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(format!(
            "{} is owned by uid {}, not by you (uid {uid}); remove it or choose another path",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is open to group/others (mode {mode:03o}); run `chmod 700 {}`",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The permission bits of a file, if it can be inspected.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

/// True when group or others may read or write the file.
pub fn is_exposed(path: &Path) -> bool {
    mode_of(path).is_some_and(|m| m & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn atomic_write_is_private_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cred.json");
        fs::write(&p, "old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(mode_of(&p), Some(0o600));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn atomic_write_keeps_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real").join("c.json");
        fs::create_dir(real.parent().unwrap()).unwrap();
        fs::write(&real, "old").unwrap();
        let link = dir.path().join("link.json");
        symlink("real/c.json", &link).unwrap();
        write_secret_atomic(&link, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "new");
    }

    #[test]
    fn capped_read_refuses_fifos_devices_and_huge_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_regular_capped(&fifo),
            Err(ReadError::NotRegular(_))
        ));
        let zero = dir.path().join("zero");
        symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(
            read_regular_capped(&zero),
            Err(ReadError::NotRegular(_))
        ));
        let big = dir.path().join("big");
        fs::write(&big, vec![b' '; MAX_SECRET_FILE as usize + 1]).unwrap();
        assert!(matches!(
            read_regular_capped(&big),
            Err(ReadError::TooLarge(_))
        ));
        assert!(read_regular_capped(&dir.path().join("none"))
            .unwrap()
            .is_none());
        fs::write(&big, b"{}").unwrap();
        assert_eq!(read_regular_capped(&big).unwrap().unwrap(), b"{}");
    }

    #[test]
    fn prepared_write_leaves_a_findable_temp_file_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cred.json");
        fs::write(&p, "old").unwrap();
        let mut w = PreparedWrite::create(&p, "abc", 4096).unwrap();
        w.fill(b"newer contents").unwrap();
        w.fill(b"new").unwrap();
        let left = leftovers(&p);
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].pid, left[0].tag.as_str()),
            (std::process::id(), "abc")
        );
        assert_eq!(fs::read(&left[0].path).unwrap(), b"new");
        assert_eq!(mode_of(&left[0].path), Some(0o600));
        w.commit().unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        assert!(leftovers(&p).is_empty());
        // Dropped uncommitted: nothing stays behind.
        drop(PreparedWrite::create(&p, "x", 10).unwrap());
        assert!(leftovers(&p).is_empty());
    }

    #[test]
    fn private_dir_checks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode_of(&d), Some(0o700));
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_private_dir(&d).unwrap_err();
        assert!(e.contains("chmod 700"), "{e}");
    }
}
