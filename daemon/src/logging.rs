//! Log setup. Under systemd, when `JOURNAL_STREAM` names the file stderr is, events go to
//! journald with their span and event fields as journal fields (`LLMD_PROFILE=…`,
//! `LLMD_METHOD=…`, `LLMD_AGENT=…`); otherwise they are human-readable lines on stderr.
//! `LLMD_LOG` sets the filter (default `info`).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Prefix of llmd's own journal fields, so they never collide with journald's.
pub const JOURNAL_FIELD_PREFIX: &str = "LLMD";

/// Installs the global subscriber: journald when stderr is the journal, else stderr.
pub fn init() {
    let mut journal_error = None;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal
                    .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into()))
                    .with_syslog_identifier("llmd".into());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(journal)
                    .try_init();
                return;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "stderr is the journal but journald's socket is not reachable; logging to stderr");
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("LLMD_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// True when `JOURNAL_STREAM` (`device:inode`, set by systemd) names the file that stderr
/// is; a stderr the user redirected elsewhere keeps plain lines.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
    else {
        return false;
    };
    journal_stream_matches(&value, meta.dev(), meta.ino())
}

/// True when `value` is `device:inode` of the given file.
pub fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_exact_file() {
        assert!(journal_stream_matches("2049:1234", 2049, 1234));
        assert!(!journal_stream_matches("2049:1235", 2049, 1234));
        assert!(!journal_stream_matches("2048:1234", 2049, 1234));
        assert!(!journal_stream_matches("2049", 2049, 1234));
        assert!(!journal_stream_matches("", 2049, 1234));
        assert!(!journal_stream_matches("a:b", 2049, 1234));
    }
}
