//! The request side of the ledger: [`Recorder::record`] queues a row without waiting
//! (a full queue drops it and counts the drop), `token` calls only bump an in-memory
//! counter, and one writer thread turns the queue into batched transactions.

use super::ledger::{Ledger, LedgerError, Row, TokenCount};
use crate::sync::lock;
use llmd_proto::chat::Usage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rows the queue holds: a burst far larger than any agent fleet makes fits (each row is a
/// few hundred bytes), and the writer empties it a transaction at a time. The queue is a
/// list that grows with what it holds, bounded by a count: `sync_channel(QUEUE_ROWS)`
/// allocates and touches every slot up front, 12 MiB of an idle daemon's memory.
pub const QUEUE_ROWS: usize = 65_536;
/// Rows written per transaction at most.
const BATCH_ROWS: usize = 4_096;
/// How long the writer waits for more rows before it commits the ones it has: long enough
/// that a burst of requests is written after it, not while it competes for the CPU.
const GATHER: Duration = Duration::from_millis(200);
/// How often the `token` counters are written.
const COUNTER_FLUSH: Duration = Duration::from_secs(10);
/// How often old rows are deleted.
const EXPIRE_EVERY: Duration = Duration::from_secs(3_600);

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Answered.
    Ok,
    /// Failed with this error kind (`rate_limited`, `upstream_error`, …).
    Failed(&'a str),
    /// The gateway passed on this HTTP status (not 2xx).
    Http(u16),
}

/// One request to record; borrowed, so the caller allocates nothing when the ledger is off.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Profile named by the caller.
    pub profile: &'a str,
    /// The pool member that answered (pooled profiles).
    pub member: Option<&'a str>,
    /// `hello` name or named gateway key.
    pub agent: Option<&'a str>,
    /// `chat`, `embed` or `gateway`.
    pub method: &'static str,
    /// Model.
    pub model: Option<&'a str>,
    /// Tokens the provider reported.
    pub usage: Usage,
    /// How it ended.
    pub outcome: Outcome<'a>,
    /// From its start to its last byte.
    pub latency: Duration,
}

enum Msg {
    Row(Row),
    /// Write everything queued before this, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// `token` calls by profile and agent since the last flush. A call finds its counter
/// with two map look-ups by `&str` and bumps it: nothing is allocated after the first
/// call of a profile and agent. The counters are sharded by thread: `token` is on every
/// agent's hot path, and one map under one lock would be a lock all connections share.
#[derive(Default)]
struct TokenCounters {
    shards: [Shard; SHARDS],
}

/// One shard on its own cache lines: shards side by side would share a line, and the
/// threads that bump them would take it from each other at every call.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<rustc_hash::FxHashMap<Arc<str>, ByAgent>>);

/// Counter shards; a runtime thread keeps to one, so they are not contended.
const SHARDS: usize = 8;

/// This thread's shard, handed out round-robin on its first count.
fn shard_of_thread() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Calls by agent name.
type ByAgent = rustc_hash::FxHashMap<Arc<str>, u64>;

impl TokenCounters {
    fn bump(&self, profile: &str, agent: &str) {
        let mut map = lock(&self.shards[shard_of_thread()].0);
        if let Some(n) = map.get_mut(profile).and_then(|a| a.get_mut(agent)) {
            *n += 1;
            return;
        }
        *map.entry(Arc::from(profile))
            .or_default()
            .entry(Arc::from(agent))
            .or_insert(0) += 1;
    }

    /// Takes the counts, leaving zeroed counters in place (so they are not built again).
    fn take(&self) -> Vec<TokenCount> {
        let mut sum: HashMap<(Arc<str>, Arc<str>), u64> = HashMap::new();
        for shard in &self.shards {
            for (profile, agents) in lock(&shard.0).iter_mut() {
                for (agent, n) in agents.iter_mut().filter(|(_, n)| **n > 0) {
                    *sum.entry((profile.clone(), agent.clone())).or_insert(0) += std::mem::take(n);
                }
            }
        }
        sum.into_iter()
            .map(|((profile, agent), calls)| TokenCount {
                profile: profile.to_string(),
                agent: agent.to_string(),
                calls,
            })
            .collect()
    }

    /// Puts counts back after a failed write.
    fn give_back(&self, counts: Vec<TokenCount>) {
        let mut map = lock(&self.shards[shard_of_thread()].0);
        for c in counts {
            *map.entry(Arc::from(c.profile.as_str()))
                .or_default()
                .entry(Arc::from(c.agent.as_str()))
                .or_insert(0) += c.calls;
        }
    }
}

/// What the request side and the writer share.
struct Shared {
    counters: TokenCounters,
    enabled: AtomicBool,
    keep_days: AtomicU32,
    dropped: AtomicU64,
    /// Rows sent and not yet taken by the writer.
    queued: AtomicUsize,
    /// The most rows `queued` may reach.
    max_queued: usize,
}

/// The ledger's request side, owned by the daemon.
pub struct Recorder {
    path: PathBuf,
    tx: Option<Sender<Msg>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The writer thread, woken for a flush or a stop (rows do not wake it: it gathers
    /// them while it sleeps).
    writer_thread: Option<std::thread::Thread>,
    /// Why the ledger is not open, for the `usage` method.
    error: Option<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Recorder {
    /// Opens the ledger in `state_dir` and starts its writer. A ledger that cannot be
    /// opened leaves llmd serving, with a warning, recording nothing.
    pub fn start(state_dir: &Path, cfg: &crate::config::UsageConfig) -> Recorder {
        let path = state_dir.join(super::FILE_NAME);
        let shared = Arc::new(Shared {
            counters: TokenCounters::default(),
            enabled: AtomicBool::new(cfg.enabled),
            keep_days: AtomicU32::new(cfg.keep_days),
            dropped: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            max_queued: QUEUE_ROWS,
        });
        let opened = crate::fsutil::ensure_private_dir(state_dir)
            .map_err(|e| e.to_string())
            .and_then(|()| Ledger::open(&path).map_err(|e| e.to_string()));
        let ledger = match opened {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "usage ledger unavailable; requests are not recorded");
                return Recorder {
                    path,
                    tx: None,
                    shared,
                    writer: Mutex::new(None),
                    writer_thread: None,
                    error: Some(e),
                };
            }
        };
        let (tx, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("llmd-usage".into())
            .spawn(move || write_loop(ledger, rx, &thread_shared));
        let (tx, writer, error) = match writer {
            Ok(h) => (Some(tx), Some(h), None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the usage ledger's writer");
                (
                    None,
                    None,
                    Some(format!("cannot start the ledger's writer: {e}")),
                )
            }
        };
        Recorder {
            path,
            tx,
            shared,
            writer_thread: writer.as_ref().map(|h| h.thread().clone()),
            writer: Mutex::new(writer),
            error,
        }
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why nothing is recorded, when the ledger could not be opened.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether new requests are recorded (`[usage] enabled`).
    pub fn enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// Rows lost to a full queue since the start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Applies a reloaded `[usage]`.
    pub fn configure(&self, cfg: &crate::config::UsageConfig) {
        self.shared.enabled.store(cfg.enabled, Ordering::Relaxed);
        self.shared
            .keep_days
            .store(cfg.keep_days, Ordering::Relaxed);
    }

    /// Queues one request's row; never waits. A full queue drops the row, counts it
    /// (`usage` shows the count) and logs the first drop of each thousand.
    pub fn record(&self, r: &Request<'_>) {
        let Some(tx) = self.tx.as_ref().filter(|_| self.enabled()) else {
            return;
        };
        let status = match r.outcome {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Failed(kind) => kind.to_owned(),
            Outcome::Http(code) => format!("http_{code}"),
        };
        let row = Row {
            at_ms: now_ms(),
            profile: r.profile.to_owned(),
            member: r.member.map(str::to_owned),
            agent: r.agent.map(str::to_owned),
            method: r.method,
            model: r.model.map(str::to_owned),
            input_tokens: r.usage.input_tokens,
            output_tokens: r.usage.output_tokens,
            cache_read_tokens: r.usage.cache_read_tokens,
            cache_write_tokens: r.usage.cache_write_tokens,
            status,
            latency_ms: u64::try_from(r.latency.as_millis()).unwrap_or(u64::MAX),
        };
        let queued = &self.shared.queued;
        if queued.fetch_add(1, Ordering::Relaxed) >= self.shared.max_queued {
            queued.fetch_sub(1, Ordering::Relaxed);
            let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(
                    dropped = n + 1,
                    "usage ledger queue full; a request was not recorded"
                );
            }
            return;
        }
        if tx.send(Msg::Row(row)).is_err() {
            queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether `token` calls are counted (the ledger is open and enabled).
    pub fn counting(&self) -> bool {
        self.tx.is_some() && self.enabled()
    }

    /// Counts one `token` call (written in aggregate, one row per profile, agent and day).
    pub fn count_token(&self, profile: &str, agent: Option<&str>) {
        if self.tx.is_some() && self.enabled() {
            self.shared.counters.bump(profile, agent.unwrap_or("-"));
        }
    }

    fn wake_writer(&self) {
        if let Some(t) = &self.writer_thread {
            t.unpark();
        }
    }

    /// Waits (at most `limit`) until everything recorded so far is in the file.
    pub async fn flush(&self, limit: Duration) -> bool {
        let Some(tx) = self.tx.clone() else {
            return false;
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        if tx.send(Msg::Flush(ack)).is_err() {
            return false;
        }
        self.wake_writer();
        matches!(tokio::time::timeout(limit, done).await, Ok(Ok(())))
    }

    /// Writes what is queued and the counters, then stops the writer; waits at most
    /// `limit`. Rows recorded after this are dropped silently.
    pub async fn close(&self, limit: Duration) {
        let Some(tx) = self.tx.clone() else { return };
        let handle = lock(&self.writer).take();
        let thread = self.writer_thread.clone();
        let stop = tokio::task::spawn_blocking(move || {
            let _ = tx.send(Msg::Stop);
            if let Some(t) = &thread {
                t.unpark();
            }
            if let Some(h) = handle {
                let _ = h.join();
            }
        });
        if tokio::time::timeout(limit, stop).await.is_err() {
            tracing::warn!("the usage ledger was still writing at exit");
        }
    }
}

fn write_loop(mut ledger: Ledger, rx: mpsc::Receiver<Msg>, shared: &Shared) {
    let mut rows = Vec::with_capacity(BATCH_ROWS);
    let mut acks = Vec::new();
    let mut last_counts = std::time::Instant::now();
    let mut last_expire: Option<std::time::Instant> = None;
    loop {
        if last_expire.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
            match ledger.expire(shared.keep_days.load(Ordering::Relaxed), now_ms()) {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "usage ledger: old rows deleted"),
                Err(e) => tracing::warn!(error = %e, "usage ledger: cannot delete old rows"),
            }
            last_expire = Some(std::time::Instant::now());
        }
        let wait = COUNTER_FLUSH.saturating_sub(last_counts.elapsed());
        let mut stop = false;
        let mut counters_due = false;
        match rx.recv_timeout(wait) {
            Ok(Msg::Row(r)) => rows.push(r),
            Ok(Msg::Flush(ack)) => acks.push(ack),
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => stop = true,
            Err(RecvTimeoutError::Timeout) => counters_due = true,
        }
        // Rows arriving in the next moment join this transaction: one commit per burst
        // instead of one per request. The writer sleeps meanwhile rather than waiting on
        // the queue, so a request's row does not wake a thread (on a busy machine each wake
        // is a context switch on the cores that serve the requests). A flush or stop
        // wakes it at once.
        let gather_until = std::time::Instant::now() + GATHER;
        while !stop && acks.is_empty() && !rows.is_empty() && rows.len() < BATCH_ROWS {
            match rx.try_recv() {
                Ok(Msg::Row(r)) => rows.push(r),
                Ok(Msg::Flush(ack)) => acks.push(ack),
                Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => stop = true,
                Err(TryRecvError::Empty) => {
                    let left = gather_until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::park_timeout(left);
                }
            }
        }
        if stop {
            // Rows sent before `Stop` (or by requests still finishing) are written too.
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Row(r) => rows.push(r),
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Stop => {}
                }
            }
        }
        // Taken off the queue: room for as many new rows.
        shared.queued.fetch_sub(rows.len(), Ordering::Relaxed);
        let counts = if counters_due || stop || !acks.is_empty() {
            last_counts = std::time::Instant::now();
            shared.counters.take()
        } else {
            Vec::new()
        };
        if !rows.is_empty() || !counts.is_empty() {
            if let Err(e) = write(&mut ledger, &rows, &counts) {
                tracing::warn!(error = %e, rows = rows.len(), "usage ledger: write failed; rows lost");
                shared
                    .dropped
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                shared.counters.give_back(counts);
            }
            rows.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if stop {
            return;
        }
    }
}

fn write(ledger: &mut Ledger, rows: &[Row], counts: &[TokenCount]) -> Result<(), LedgerError> {
    ledger.write(rows, counts, now_ms().div_euclid(86_400_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request<'static> {
        Request {
            profile: "p",
            member: None,
            agent: Some("a"),
            method: "chat",
            model: None,
            usage: Usage::default(),
            outcome: Outcome::Ok,
            latency: Duration::ZERO,
        }
    }

    /// A recorder whose queue holds `max_queued` rows, and the queue's other end.
    fn recorder(max_queued: usize) -> (Recorder, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel();
        let r = Recorder {
            path: PathBuf::new(),
            tx: Some(tx),
            shared: Arc::new(Shared {
                counters: TokenCounters::default(),
                enabled: AtomicBool::new(true),
                keep_days: AtomicU32::new(90),
                dropped: AtomicU64::new(0),
                queued: AtomicUsize::new(0),
                max_queued,
            }),
            writer: Mutex::new(None),
            writer_thread: None,
            error: None,
        };
        (r, rx)
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (r, rx) = recorder(2);
        for _ in 0..5 {
            r.record(&request());
        }
        assert_eq!(r.dropped(), 3);
        assert_eq!(rx.try_iter().count(), 2);
    }

    /// The bound counts what the writer has not taken yet: once it wrote the rows, as
    /// many new ones fit again. An idle recorder holds no preallocated queue.
    #[tokio::test]
    async fn rows_the_writer_took_make_room_for_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("usage.sqlite")).unwrap();
        let (r, rx) = recorder(2);
        let shared = r.shared.clone();
        let writer = std::thread::spawn(move || write_loop(ledger, rx, &shared));
        for _ in 0..2 {
            r.record(&request());
        }
        assert!(r.flush(Duration::from_secs(10)).await);
        assert_eq!(r.shared.queued.load(Ordering::Relaxed), 0);
        for _ in 0..2 {
            r.record(&request());
        }
        assert_eq!(r.dropped(), 0, "the written rows left room");
        r.record(&request());
        assert_eq!(r.dropped(), 1, "still bounded");
        assert!(r.flush(Duration::from_secs(10)).await);
        drop(r);
        writer.join().unwrap();
    }

    /// Counts made on several threads (several shards) come out as one count each.
    #[test]
    fn token_counts_of_all_threads_add_up() {
        let (r, _rx) = recorder(1);
        let r = Arc::new(r);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        r.count_token("p", Some("a"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let counts = r.shared.counters.take();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].calls, 400);
    }

    #[test]
    fn token_counts_add_up_and_reset_without_losing_their_slots() {
        let (r, _rx) = recorder(1);
        for _ in 0..3 {
            r.count_token("p", Some("a"));
        }
        r.count_token("p", None);
        let mut counts = r.shared.counters.take();
        counts.sort_by(|a, b| a.agent.cmp(&b.agent));
        let got: Vec<_> = counts.iter().map(|c| (c.agent.as_str(), c.calls)).collect();
        assert_eq!(got, [("-", 1), ("a", 3)]);
        assert!(
            r.shared.counters.take().is_empty(),
            "taken counts are zeroed"
        );
        r.shared.counters.give_back(counts);
        assert_eq!(
            r.shared.counters.take().len(),
            2,
            "a failed write keeps them"
        );
    }

    #[test]
    fn a_disabled_recorder_queues_nothing() {
        let (r, rx) = recorder(8);
        r.configure(&crate::config::UsageConfig {
            enabled: false,
            ..Default::default()
        });
        r.record(&request());
        r.count_token("p", None);
        assert_eq!(rx.try_iter().count(), 0);
        assert!(r.shared.counters.take().is_empty());
    }
}
