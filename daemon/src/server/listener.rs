//! Binding the socket safely: a private folder, a 0600 socket, no second daemon, and
//! stale socket files reclaimed.

use crate::fsutil;
use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::Path;

/// Binds `path`. Errors are complete sentences for the user.
pub fn bind(path: &Path) -> Result<Listener, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| format!("socket path {} has no folder", path.display()))?;
    if let Some(why) = shared_folder(dir) {
        // Never suggest tightening a folder others rely on (`chmod 700 /tmp` breaks every
        // other user and service): point at a private folder of its own instead.
        let uid = fsutil::current_uid();
        return Err(format!(
            "refusing to put the socket directly in {} ({why}); use a private folder of its own, \
             e.g. --socket {}/llmd-{uid}/llmd.sock (llmd creates it with mode 0700)",
            dir.display(),
            dir.display()
        ));
    }
    fsutil::ensure_private_dir(dir).map_err(|e| format!("refusing to use socket folder: {e}"))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(live) => {
                let pid = peer_pid(&live)
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                return Err(format!(
                    "another llmd{pid} is already serving on {}; stop it first or pass --socket",
                    path.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
            }
            Err(e) => {
                return Err(format!(
                    "cannot check existing socket {}: {e}",
                    path.display()
                ))
            }
        },
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; move it away or choose another path",
                path.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    }
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| format!("bad socket path {}: {e}", path.display()))?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .create_tokio()
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // The folder is private already; this only makes the socket's own mode exact.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set mode of {}: {e}", path.display()))?;
    Ok(listener)
}

/// Why `dir` is a folder shared with others (sticky, or writable by group/others while not
/// ours), if it is one.
fn shared_folder(dir: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o1000 != 0 {
        return Some(format!("a shared folder, mode {mode:04o}"));
    }
    if meta.uid() != fsutil::current_uid() && mode & 0o022 != 0 {
        return Some(format!("a folder other users can write, mode {mode:04o}"));
    }
    None
}

fn peer_pid(s: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid fd, a correctly sized out-buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// The listening socket passed by systemd (`LISTEN_PID`/`LISTEN_FDS`, first fd is 3), if
/// any, with its address as `getsockname` reports it. The socket file then belongs to
/// systemd: llmd neither checks its folder, nor binds, chmods or removes it.
pub fn from_systemd() -> Result<Option<(Listener, SocketAddr)>, String> {
    use interprocess::local_socket::traits::tokio::Listener as _;
    use std::os::fd::{FromRawFd, OwnedFd};
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    // Children (none today) must not inherit the activation variables.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if !pid_matches || count < 1 {
        return Ok(None);
    }
    if count > 1 {
        tracing::warn!(count, "systemd passed several sockets; using the first");
    }
    const FIRST_FD: i32 = 3;
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd 3 is ours by the socket-activation protocol; the out-buffer is an int.
    let rc = unsafe {
        libc::getsockopt(
            FIRST_FD,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return Err("LISTEN_FDS is set but fd 3 is not a listening socket".into());
    }
    // SAFETY: as above; nothing else in this process owns fd 3.
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST_FD) };
    // SAFETY: plain fcntl on an fd we own.
    unsafe { libc::fcntl(FIRST_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    let addr = std_listener
        .local_addr()
        .map_err(|e| format!("LISTEN_FDS is set but fd 3 is not a Unix socket: {e}"))?;
    let uds = interprocess::os::unix::uds_local_socket::tokio::Listener::try_from(OwnedFd::from(
        std_listener,
    ))
    .map_err(|e| format!("cannot use the socket passed by systemd: {e}"))?;
    let mut listener = Listener::from(uds);
    // A listener made from an fd never unlinks on drop; this only states that it must not.
    listener.do_not_reclaim_name_on_drop();
    Ok(Some((listener, addr)))
}

/// How a socket address reads in logs and status lines: the path, or `@name` for an
/// abstract socket.
pub fn describe(addr: &SocketAddr) -> String {
    use std::os::linux::net::SocketAddrExt;
    match (addr.as_pathname(), addr.as_abstract_name()) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
        (None, None) => "(unnamed socket)".into(),
    }
}
