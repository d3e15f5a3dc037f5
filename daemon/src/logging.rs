//! Log setup. Under systemd, when `JOURNAL_STREAM` names the file stderr is, events go to
//! journald with their span and event fields as journal fields (`LLMD_PROFILE=…`,
//! `LLMD_METHOD=…`, `LLMD_AGENT=…`); otherwise they are human-readable lines on stderr.
//! `LLMD_LOG` sets the filter (default `info`).

use std::io::Write;
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
    // Colours stay off: the escaping writer cannot tell llmd's own escapes from a client's.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(|| Escaping(std::io::stderr()))
        .with_ansi(false)
        .try_init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "stderr is the journal but journald's socket is not reachable; logging to stderr");
    }
}

/// `s` with control characters (newlines, ANSI escapes, …) written as `\u{..}` escapes, so
/// a value from a client cannot forge or colour log lines.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// A client-chosen name made printable (control characters become `?`), trimmed and cut to
/// `max` characters.
pub fn clean_name(s: &str, max: usize) -> String {
    let s: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(max)
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// Writes log lines with every control byte except the line's final newline (and tabs)
/// escaped: whatever a formatted field holds, one event stays one plain line.
pub struct Escaping<W: Write>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            if (b < 0x20 && b != b'\t') || b == 0x7f {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
            } else {
                out.push(b);
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn filter() -> EnvFilter {
    let mut f = EnvFilter::try_from_env("LLMD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // The etcd client's gRPC stack logs every HTTP/2 frame at debug: keep `LLMD_LOG=debug`
    // about llmd (a directive naming one of these crates still overrides this).
    for quiet in [
        "h2=info",
        "tower=info",
        "hyper=info",
        "hyper_util=info",
        "tonic=info",
    ] {
        if let Ok(d) = quiet.parse() {
            f = f.add_directive(d);
        }
    }
    f
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
    fn escaping_writer_keeps_one_event_on_one_line() {
        let mut w = Escaping(Vec::new());
        w.write_all(b"INFO agent=evil\nINFO forged \x1b[31mred\n")
            .unwrap();
        let out = String::from_utf8(w.0).unwrap();
        assert_eq!(out, "INFO agent=evil\\x0aINFO forged \\x1b[31mred\n");
        assert_eq!(clean_name("a\nb\x1b[0m", 64), "a?b?[0m");
        assert_eq!(clean_name(&"x".repeat(100), 64).len(), 64);
        assert_eq!(clean("m\n"), "m\\u{a}");
    }

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
