//! The SQLite side of the ledger: opening (WAL, 0600), batched inserts, retention and the
//! queries behind the `usage` method. Only the writer thread writes; queries open their
//! own read connection, which WAL lets run beside the writer.

use llmd_proto::methods::{TokenCalls, UsageBucket, UsageBy, UsageRow, UsageTotals};
use rusqlite::{params, Connection, OpenFlags};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// Why the ledger could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file could not be created with mode 0600.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The ledger file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite refused.
    #[error("usage ledger: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// One request, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// When it ended, Unix milliseconds.
    pub at_ms: i64,
    /// Profile named by the caller.
    pub profile: String,
    /// The pool member that answered, for pooled profiles.
    pub member: Option<String>,
    /// `hello` name or named gateway key.
    pub agent: Option<String>,
    /// `chat`, `embed` or `gateway`.
    pub method: &'static str,
    /// Model that answered (or was asked for, when the request failed).
    pub model: Option<String>,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens read from cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to cache.
    pub cache_write_tokens: u64,
    /// `ok`, an error kind (`rate_limited`, …) or `http_NNN` for the gateway.
    pub status: String,
    /// From the request's start to its last byte.
    pub latency_ms: u64,
}

/// `token` calls of one profile and agent, counted since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCount {
    /// Profile.
    pub profile: String,
    /// Agent, `-` when none.
    pub agent: String,
    /// Calls.
    pub calls: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    at_ms INTEGER NOT NULL,
    profile TEXT NOT NULL,
    member TEXT,
    agent TEXT,
    method TEXT NOT NULL,
    model TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    status TEXT NOT NULL,
    latency_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);
CREATE TABLE IF NOT EXISTS token_calls (
    day INTEGER NOT NULL,
    profile TEXT NOT NULL,
    agent TEXT NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (day, profile, agent)
);
";

/// How long a reader or the writer waits for the other's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer's connection.
pub struct Ledger {
    conn: Connection,
}

fn sql_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Ledger {
    /// Opens (creating it 0600 when absent) the ledger at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        // Created here with 0600 so SQLite never makes it with the umask's mode; its
        // `-wal` and `-shm` files take the database file's mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| LedgerError::Create {
                path: path.display().to_string(),
                source,
            })?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with NORMAL is durable across a process crash (only a power cut can lose the
        // last commits), and skips an fsync per transaction.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Ledger { conn })
    }

    /// Stores `rows` and adds `counts` to the day `day`, in one transaction.
    pub fn write(
        &mut self,
        rows: &[Row],
        counts: &[TokenCount],
        day: i64,
    ) -> Result<(), LedgerError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO requests (at_ms, profile, member, agent, method, model, input_tokens, \
                 output_tokens, cache_read_tokens, cache_write_tokens, status, latency_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for r in rows {
                insert.execute(params![
                    r.at_ms,
                    r.profile,
                    r.member,
                    r.agent,
                    r.method,
                    r.model,
                    sql_u64(r.input_tokens),
                    sql_u64(r.output_tokens),
                    sql_u64(r.cache_read_tokens),
                    sql_u64(r.cache_write_tokens),
                    r.status,
                    sql_u64(r.latency_ms),
                ])?;
            }
            let mut add = tx.prepare_cached(
                "INSERT INTO token_calls (day, profile, agent, calls) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (day, profile, agent) DO UPDATE SET calls = calls + excluded.calls",
            )?;
            for c in counts {
                add.execute(params![day, c.profile, c.agent, sql_u64(c.calls)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes what is older than `keep_days` days before `now_ms` (0 keeps everything).
    /// Returns the request rows deleted.
    pub fn expire(&mut self, keep_days: u32, now_ms: i64) -> Result<usize, LedgerError> {
        if keep_days == 0 {
            return Ok(0);
        }
        let cutoff = now_ms - i64::from(keep_days) * 86_400_000;
        let n = self
            .conn
            .execute("DELETE FROM requests WHERE at_ms < ?1", [cutoff])?;
        self.conn.execute(
            "DELETE FROM token_calls WHERE day < ?1",
            [cutoff.div_euclid(86_400_000)],
        )?;
        Ok(n)
    }
}

/// What the `usage` method reads, apart from the daemon's own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Groups.
    pub rows: Vec<UsageRow>,
    /// Sum of the groups.
    pub totals: UsageTotals,
    /// Chart buckets.
    pub buckets: Vec<UsageBucket>,
    /// `token` calls.
    pub token_calls: Vec<TokenCalls>,
}

/// Most buckets a chart gets; an older start is moved up to the first bucket with data.
pub const MAX_BUCKETS: u64 = 400;

/// Reads the window from `since` (Unix seconds) to `now` of the ledger at `path`, grouped
/// `by`, with chart buckets `bucket_secs` long.
pub fn query(
    path: &Path,
    since: u64,
    now: u64,
    by: UsageBy,
    bucket_secs: u64,
) -> Result<Report, LedgerError> {
    if !path.exists() {
        return Ok(Report::default());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let since_ms = sql_u64(since.saturating_mul(1000));
    let key = match by {
        UsageBy::Profile => "profile",
        UsageBy::Agent => "COALESCE(agent, '-')",
        UsageBy::Model => "COALESCE(model, '-')",
        UsageBy::Day => "strftime('%Y-%m-%d', at_ms / 1000, 'unixepoch')",
        UsageBy::Member => {
            "CASE WHEN member IS NULL THEN profile ELSE profile || '/' || member END"
        }
    };
    let order = if by == UsageBy::Day {
        "1 ASC"
    } else {
        "SUM(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) DESC, 1 ASC"
    };
    let sql = format!(
        "SELECT {key}, COUNT(*), SUM(status <> 'ok'), SUM(input_tokens), SUM(output_tokens), \
         SUM(cache_read_tokens), SUM(cache_write_tokens) FROM requests WHERE at_ms >= ?1 \
         GROUP BY 1 ORDER BY {order}"
    );
    let mut report = Report::default();
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([since_ms], |r| {
        Ok(UsageRow {
            key: r.get::<_, Option<String>>(0)?.unwrap_or_else(|| "-".into()),
            totals: UsageTotals {
                requests: from_sql(r.get(1)?),
                errors: from_sql(r.get(2)?),
                input_tokens: from_sql(r.get(3)?),
                output_tokens: from_sql(r.get(4)?),
                cache_read_tokens: from_sql(r.get(5)?),
                cache_write_tokens: from_sql(r.get(6)?),
            },
        })
    })?;
    for row in rows {
        let row = row?;
        let t = &mut report.totals;
        t.requests += row.totals.requests;
        t.errors += row.totals.errors;
        t.input_tokens += row.totals.input_tokens;
        t.output_tokens += row.totals.output_tokens;
        t.cache_read_tokens += row.totals.cache_read_tokens;
        t.cache_write_tokens += row.totals.cache_write_tokens;
        report.rows.push(row);
    }
    let size = bucket_secs.max(1);
    let mut stmt = conn.prepare(
        "SELECT (at_ms / 1000 / ?2) * ?2, COUNT(*), \
         SUM(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) \
         FROM requests WHERE at_ms >= ?1 GROUP BY 1 ORDER BY 1",
    )?;
    let filled: Vec<UsageBucket> = stmt
        .query_map(params![since_ms, sql_u64(size)], |r| {
            Ok(UsageBucket {
                start: from_sql(r.get(0)?),
                requests: from_sql(r.get(1)?),
                tokens: from_sql(r.get(2)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    report.buckets = fill_buckets(&filled, since, now, size);
    let mut stmt = conn.prepare(
        "SELECT profile, agent, SUM(calls) FROM token_calls WHERE day >= ?1 \
         GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
    )?;
    report.token_calls = stmt
        .query_map([sql_u64(since / 86_400)], |r| {
            Ok(TokenCalls {
                profile: r.get(0)?,
                agent: r.get(1)?,
                calls: from_sql(r.get(2)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(report)
}

/// Every bucket from `since` to `now`, the empty ones too, at most [`MAX_BUCKETS`].
fn fill_buckets(filled: &[UsageBucket], since: u64, now: u64, size: u64) -> Vec<UsageBucket> {
    let mut start = since / size * size;
    let last = now / size * size;
    if last.saturating_sub(start) / size >= MAX_BUCKETS {
        let first_data = filled.first().map_or(last, |b| b.start);
        start = first_data.max(last.saturating_sub((MAX_BUCKETS - 1) * size));
    }
    let mut out = Vec::new();
    let mut data = filled.iter().filter(|b| b.start >= start).peekable();
    let mut t = start;
    while t <= last {
        match data.peek() {
            Some(b) if b.start == t => {
                out.push((*b).clone());
                data.next();
            }
            _ => out.push(UsageBucket {
                start: t,
                requests: 0,
                tokens: 0,
            }),
        }
        t += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at_ms: i64, profile: &str, agent: Option<&str>, input: u64) -> Row {
        Row {
            at_ms,
            profile: profile.into(),
            member: None,
            agent: agent.map(str::to_owned),
            method: "chat",
            model: Some("m".into()),
            input_tokens: input,
            output_tokens: 1,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            status: "ok".into(),
            latency_ms: 3,
        }
    }

    #[test]
    fn rows_group_expire_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.sqlite");
        let mut l = Ledger::open(&path).unwrap();
        let now_ms = 100 * 86_400_000;
        let counts = [TokenCount {
            profile: "p".into(),
            agent: "a".into(),
            calls: 5,
        }];
        l.write(
            &[
                row(now_ms - 1000, "p", Some("a"), 10),
                row(now_ms - 2000, "p", None, 20),
                row(now_ms - 50 * 86_400_000, "q", Some("a"), 1),
            ],
            &counts,
            99,
        )
        .unwrap();
        l.write(&[], &counts, 99).unwrap();
        assert_eq!(crate::fsutil::mode_of(&path), Some(0o600));
        let now = (now_ms / 1000) as u64;
        let r = query(&path, now - 86_400, now, UsageBy::Agent, 3600).unwrap();
        assert_eq!(r.totals.requests, 2);
        assert_eq!(r.rows[0].key, "-");
        assert_eq!(r.rows[0].totals.input_tokens, 20);
        assert_eq!(r.buckets.len(), 25);
        assert_eq!(r.buckets.iter().map(|b| b.requests).sum::<u64>(), 2);
        assert_eq!(r.token_calls[0].calls, 10);
        assert_eq!(l.expire(30, now_ms).unwrap(), 1);
        let r = query(&path, 0, now, UsageBy::Profile, 86_400).unwrap();
        assert_eq!(r.rows.len(), 1, "the 50-day-old row is gone");
        assert!(r.buckets.len() as u64 <= MAX_BUCKETS);
    }
}
