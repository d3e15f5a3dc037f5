//! `llmctl doctor`: everything a new user would check by hand, in one list.

use crate::place::{self, Origin};
use llmd_client::proto::methods::StatusResult;
use llmd_client::Client;
use serde::Serialize;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Broken.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub check: String,
    /// The outcome.
    pub level: Level,
    /// What was found, and the fix when broken.
    pub detail: String,
}

fn add(out: &mut Vec<Check>, check: impl Into<String>, level: Level, detail: impl Into<String>) {
    out.push(Check {
        check: check.into(),
        level,
        detail: detail.into(),
    });
}

/// Runs every check; `net` adds a TCP connect to each provider host.
pub async fn run(socket: &Path, origin: Origin, config: Option<PathBuf>, net: bool) -> Vec<Check> {
    let mut out = Vec::new();
    add(
        &mut out,
        "socket path",
        Level::Ok,
        format!("{} (from {})", socket.display(), origin.describe()),
    );
    check_socket_files(&mut out, socket);
    let cfg = place::config_path(config.clone());
    match place::config_socket(&cfg) {
        Ok(_) if cfg.exists() => add(
            &mut out,
            "config",
            Level::Ok,
            format!("{} found and parses", cfg.display()),
        ),
        Ok(_) => add(
            &mut out,
            "config",
            Level::Ok,
            format!(
                "{} does not exist: llmd runs on its embedded default",
                cfg.display()
            ),
        ),
        Err(e) => add(&mut out, "config", Level::Fail, e),
    }
    check_config_with_llmd(&mut out, &cfg);
    let status = match Client::connect_to(socket).await {
        Ok(c) => {
            let _ = c.hello("llmctl-doctor", env!("CARGO_PKG_VERSION")).await;
            match c.status().await {
                Ok(s) => Some(s),
                Err(e) => {
                    add(&mut out, "daemon", Level::Fail, e.to_string());
                    None
                }
            }
        }
        Err(e) => {
            add(&mut out, "daemon", Level::Fail, e.to_string());
            None
        }
    };
    if let Some(s) = &status {
        check_daemon(&mut out, s, &cfg);
        if net {
            check_net(&mut out, s).await;
        }
    }
    out
}

fn check_socket_files(out: &mut Vec<Check>, socket: &Path) {
    let uid = unsafe { libc::getuid() };
    if let Some(dir) = socket.parent() {
        match std::fs::metadata(dir) {
            Ok(m) => {
                let mode = m.permissions().mode() & 0o7777;
                if m.uid() != uid {
                    add(
                        out,
                        "socket folder",
                        Level::Fail,
                        format!("{} belongs to uid {}, not you", dir.display(), m.uid()),
                    );
                } else if mode & 0o077 != 0 {
                    add(
                        out,
                        "socket folder",
                        Level::Fail,
                        format!(
                            "{} has mode {mode:04o}; llmd wants 0700 (`chmod 700 {}`)",
                            dir.display(),
                            dir.display()
                        ),
                    );
                } else {
                    add(
                        out,
                        "socket folder",
                        Level::Ok,
                        format!("{} mode {mode:04o}, yours", dir.display()),
                    );
                }
            }
            Err(e) => add(
                out,
                "socket folder",
                Level::Fail,
                format!("{}: {e} (is llmd started?)", dir.display()),
            ),
        }
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            let level = if mode & 0o077 != 0 {
                Level::Warn
            } else {
                Level::Ok
            };
            add(out, "socket file", level, format!("mode {mode:04o}"));
        }
        Err(e) => add(
            out,
            "socket file",
            Level::Fail,
            format!("{}: {e}", socket.display()),
        ),
    }
}

/// Runs `llmd --check-config` when llmd is installed, for the checks only llmd knows.
fn check_config_with_llmd(out: &mut Vec<Check>, cfg: &Path) {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("llmd")))
        .filter(|p| p.is_file());
    let llmd = beside.or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("llmd"))
                .find(|p| p.is_file())
        })
    });
    let Some(llmd) = llmd else {
        return;
    };
    let mut cmd = std::process::Command::new(llmd);
    cmd.arg("--check-config");
    if cfg.exists() {
        cmd.arg("--config").arg(cfg);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => add(
            out,
            "llmd --check-config",
            Level::Ok,
            "ok in this shell's environment",
        ),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err
                .lines()
                .last()
                .unwrap_or("failed")
                .trim_start_matches("llmd: ");
            // Missing keys in this shell may be set in the daemon's environment (systemd):
            // the daemon's own view below is what counts.
            let level = if last.contains("parses, but") {
                Level::Warn
            } else {
                Level::Fail
            };
            add(out, "llmd --check-config", level, last.to_owned());
        }
        Err(e) => add(
            out,
            "llmd --check-config",
            Level::Warn,
            format!("cannot run llmd: {e}"),
        ),
    }
}

fn check_daemon(out: &mut Vec<Check>, s: &StatusResult, cfg: &Path) {
    add(
        out,
        "daemon",
        Level::Ok,
        format!(
            "llmd {} answering, {} profile(s)",
            s.version,
            s.profiles.len()
        ),
    );
    if let Some(c) = &s.config {
        let same = c == "embedded default" || Path::new(c) == cfg;
        let level = if same { Level::Ok } else { Level::Warn };
        add(out, "daemon config", level, format!("the daemon reads {c}"));
    }
    let keys = if s.env_keys.is_empty() {
        "none".to_owned()
    } else {
        s.env_keys.join(", ")
    };
    add(
        out,
        "daemon environment",
        Level::Ok,
        format!("key variables the daemon sees: {keys}"),
    );
    for p in &s.profiles {
        let name = format!("profile {}", p.name);
        let Some(src) = &p.source else {
            add(
                out,
                name,
                Level::Warn,
                "the daemon does not report credential sources (older llmd)",
            );
            continue;
        };
        let what = format!("{} {}", src.kind, src.location);
        if !src.present {
            add(
                out,
                name,
                Level::Fail,
                format!(
                    "{what} is not set or empty; {}",
                    fix_for(&p.name, &p.auth, &src.kind)
                ),
            );
            continue;
        }
        if let Some(mode) = src.mode.filter(|m| m & 0o077 != 0) {
            add(
                out,
                name,
                Level::Warn,
                format!(
                    "{what} has mode {mode:04o}; run `chmod 600 {}`",
                    src.location
                ),
            );
            continue;
        }
        let mut detail = format!("{what} present");
        if !src.shadowed.is_empty() {
            detail += &format!(" (and wins over {})", src.shadowed.join(", "));
        }
        let level = match p.state {
            llmd_client::proto::methods::ProfileState::Ok
            | llmd_client::proto::methods::ProfileState::Refreshing => Level::Ok,
            _ => Level::Fail,
        };
        if level == Level::Fail {
            detail += &format!(
                "; state {}: {}",
                p.state,
                p.last_error.as_deref().unwrap_or("")
            );
        }
        add(out, name, level, detail);
    }
}

fn fix_for(name: &str, auth: &str, kind: &str) -> String {
    match (auth, kind) {
        ("oauth" | "claude-cli", _) => format!("run `llmctl login {name}`"),
        ("setup-token", _) => {
            format!("run `claude setup-token` and `llmctl set-key {name} --setup-token`")
        }
        (_, "env") => format!(
            "set it in llmd's environment (see README, systemd) or run `llmctl set-key {name}`"
        ),
        _ => format!("run `llmctl set-key {name}`"),
    }
}

/// `host:port` of an http(s) URL.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default)),
    }
}

async fn check_net(out: &mut Vec<Check>, s: &StatusResult) {
    let mut seen = std::collections::BTreeSet::new();
    for p in &s.profiles {
        let Some((host, port)) = p.base_url.as_deref().and_then(host_port) else {
            continue;
        };
        if !seen.insert((host.clone(), port)) {
            continue;
        }
        let name = format!("reach {host}:{port}");
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => add(
                out,
                name,
                Level::Ok,
                format!("TCP connect works (profile {})", p.name),
            ),
            Ok(Err(e)) => add(
                out,
                name,
                Level::Fail,
                format!(
                    "{e} (profile {}; behind a proxy? llmd honours HTTPS_PROXY)",
                    p.name
                ),
            ),
            Err(_) => add(
                out,
                name,
                Level::Fail,
                format!("no answer within 5 s (profile {})", p.name),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(
            host_port("https://api.anthropic.com"),
            Some(("api.anthropic.com".into(), 443))
        );
        assert_eq!(
            host_port("http://127.0.0.1:8080/v1"),
            Some(("127.0.0.1".into(), 8080))
        );
        assert_eq!(host_port("http://[::1]:9/x"), Some(("::1".into(), 9)));
        assert_eq!(host_port("ftp://x"), None);
    }
}
