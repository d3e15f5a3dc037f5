//! Where the socket lives, so the daemon and every client agree on it.

use std::ffi::OsString;
use std::path::PathBuf;

/// Environment variable that overrides the socket path.
pub const SOCKET_ENV: &str = "LLMD_SOCKET";

/// The socket path when nothing overrides it: `$XDG_RUNTIME_DIR/llmd/llmd.sock`, or
/// `/tmp/llmd-$UID/llmd.sock` without a runtime dir.
pub fn default_socket_path() -> PathBuf {
    default_socket_path_from(std::env::var_os("XDG_RUNTIME_DIR"))
}

fn default_socket_path_from(runtime_dir: Option<OsString>) -> PathBuf {
    match runtime_dir.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("llmd").join("llmd.sock"),
        None => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/llmd-{uid}")).join("llmd.sock")
        }
    }
}

/// Resolves the socket path: an explicit path (a `--socket` flag) wins, then
/// `LLMD_SOCKET`, then the daemon config's `[daemon] socket`, then the default.
pub fn resolve_socket_path(explicit: Option<PathBuf>, from_config: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| {
            std::env::var_os(SOCKET_ENV)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .or(from_config)
        .unwrap_or_else(default_socket_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_or_tmp() {
        assert_eq!(
            default_socket_path_from(Some("/run/user/5".into())),
            PathBuf::from("/run/user/5/llmd/llmd.sock")
        );
        let uid = unsafe { libc::getuid() };
        assert_eq!(
            default_socket_path_from(None),
            PathBuf::from(format!("/tmp/llmd-{uid}/llmd.sock"))
        );
        assert_eq!(
            default_socket_path_from(Some("".into())),
            default_socket_path_from(None)
        );
    }

    #[test]
    fn explicit_wins() {
        let p = resolve_socket_path(Some("/a".into()), Some("/b".into()));
        assert_eq!(p, PathBuf::from("/a"));
    }
}
