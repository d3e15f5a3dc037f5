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

/// Expands a leading `~` (or `~/`) to `$HOME` and every `$VAR` / `${VAR}` to its value,
/// as a shell would for a path setting. An unset or empty variable is an error that names
/// it: a path that silently lost a part would point somewhere unexpected.
pub fn expand_path(raw: &str) -> Result<PathBuf, String> {
    expand_with(raw, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

fn expand_with(raw: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    let mut out = String::with_capacity(raw.len());
    let rest = if raw == "~" || raw.starts_with("~/") {
        out.push_str(&var("HOME").ok_or("`~` needs HOME to be set")?);
        &raw[1..]
    } else {
        raw
    };
    let mut chars = rest.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let after = &rest[i + 1..];
        let (name, used) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("`${{` without a closing `}}` in `{raw}`"))?;
            (&inner[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            continue;
        }
        out.push_str(&var(name).ok_or_else(|| format!("`${name}` is not set"))?);
        for _ in 0..used {
            chars.next();
        }
    }
    Ok(PathBuf::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_home_and_variables() {
        let env = |n: &str| match n {
            "HOME" => Some("/home/u".to_string()),
            "XDG_RUNTIME_DIR" => Some("/run/user/5".to_string()),
            _ => None,
        };
        let x = |s| expand_with(s, &env);
        assert_eq!(
            x("~/.local/state/llmd").unwrap(),
            PathBuf::from("/home/u/.local/state/llmd")
        );
        assert_eq!(x("~").unwrap(), PathBuf::from("/home/u"));
        assert_eq!(
            x("$XDG_RUNTIME_DIR/llmd.sock").unwrap(),
            PathBuf::from("/run/user/5/llmd.sock")
        );
        assert_eq!(x("${HOME}x/y").unwrap(), PathBuf::from("/home/ux/y"));
        assert_eq!(x("/a/~b/$").unwrap(), PathBuf::from("/a/~b/$"));
        assert!(x("$NOPE/x").unwrap_err().contains("NOPE"));
        assert!(x("${HOME").is_err());
    }

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
