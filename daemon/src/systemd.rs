//! The service manager's side of llmd: the `sd_notify` protocol spoken directly (a Unix
//! datagram to `$NOTIFY_SOCKET`) for readiness, reload, stop and watchdog messages, and the
//! watchdog task, which pings only after a real round trip over the daemon's own socket.
//!
//! Everything here is inert when llmd does not run under systemd: no `NOTIFY_SOCKET`, no
//! messages; no `WATCHDOG_USEC`, no watchdog task. Signals are handled here too, because
//! each step they cause (reload, stop) is one systemd wants to hear about.

use crate::state::Daemon;
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// What systemd handed llmd through the environment.
#[derive(Debug)]
pub struct Manager {
    /// Where state changes go.
    pub notifier: Arc<Notifier>,
    /// How often to ping the watchdog (half of `WATCHDOG_USEC`), when one watches llmd.
    pub watchdog_every: Option<Duration>,
}

impl Manager {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and removes them so that no
    /// child process can speak for llmd. Call it before any other thread exists: it edits
    /// the environment.
    pub fn from_env() -> Manager {
        let notify = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let notifier = match notify {
            Some(name) if !name.is_empty() => match Notifier::connect(&name) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(socket = %name.to_string_lossy(), error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from llmd");
                    Notifier::disabled()
                }
            },
            _ => Notifier::disabled(),
        };
        let watchdog_every = watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id());
        if watchdog_every.is_some() && !notifier.is_enabled() {
            tracing::warn!("WATCHDOG_USEC is set without NOTIFY_SOCKET; no watchdog pings");
        }
        Manager {
            watchdog_every: watchdog_every.filter(|_| notifier.is_enabled()),
            notifier: Arc::new(notifier),
        }
    }

    /// Starts the watchdog task when systemd asked for one: it probes the daemon's socket at
    /// `address` and pings while that works, until `shutdown`.
    pub fn start_watchdog(&self, address: Option<&SocketAddr>, shutdown: CancellationToken) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        // A probe slower than this would leave too little of the interval for the ping.
        let timeout = every * 3 / 4;
        match address.and_then(|a| Probe::for_listener(a, timeout)) {
            Some(probe) => {
                tracing::debug!(
                    every_ms = every.as_millis() as u64,
                    "pinging the systemd watchdog"
                );
                tokio::spawn(run_watchdog(self.notifier.clone(), probe, every, shutdown));
            }
            None => tracing::warn!(
                "the watchdog is on but the socket has no address to probe; no watchdog pings"
            ),
        }
    }
}

/// The status line while serving.
pub fn serving_status(profiles: usize, socket: &str) -> String {
    let noun = if profiles == 1 { "profile" } else { "profiles" };
    format!("Serving {profiles} {noun} on {socket}")
}

/// SIGTERM, SIGINT and SIGHUP streams, created before the socket is bound so that a
/// signal sent as soon as the socket answers is queued, not fatal (the default action).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching the signals.
    pub fn catch() -> Result<Signals, String> {
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| format!("cannot handle SIGTERM: {e}"))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| format!("cannot handle SIGINT: {e}"))?,
            hup: signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?,
        })
    }
}

/// Runs the daemon's life cycle on signals and tells systemd each step: SIGHUP reloads
/// (`RELOADING=1`, then `READY=1` with the outcome, also when the new config is refused),
/// SIGTERM and SIGINT stop (`STOPPING=1`, then the daemon's shutdown starts).
pub fn handle_signals(
    signals: Signals,
    daemon: Arc<Daemon>,
    notifier: Arc<Notifier>,
    socket: String,
    grace: Duration,
) -> Result<(), String> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => {
                    notifier.reloading();
                    let status = match daemon.reload().await {
                        Ok(names) => format!("{}; configuration reloaded", serving_status(names.len(), &socket)),
                        Err(e) => {
                            tracing::error!(error = %e, "reload failed; keeping the running configuration");
                            format!("Reload failed, running configuration kept: {e}")
                        }
                    };
                    notifier.ready(&status);
                }
            }
        }
        notifier.stopping(
            &format!(
                "Stopping: finishing requests in flight (up to {}s)",
                grace.as_secs()
            ),
            grace,
        );
        daemon.shutdown.cancel();
    });
    Ok(())
}

/// The ping interval for the watchdog: half of `WATCHDOG_USEC`, when the watchdog is meant
/// for process `me` (`WATCHDOG_PID` unset or equal). Anything malformed means no watchdog.
pub fn watchdog_period(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Sends state changes to the service manager; a disabled one sends nothing.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier that sends nothing (not run by systemd).
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier for the `NOTIFY_SOCKET` value `name`: a socket path, or an abstract
    /// socket name when it starts with `@`.
    pub fn connect(name: &OsStr) -> io::Result<Notifier> {
        let addr = notify_address(name)?;
        let sock = UnixDatagram::unbound()?;
        // A manager that does not read must never stall the runtime thread that notifies.
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some((sock, addr)),
        })
    }

    /// True when messages go somewhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message: `KEY=value` assignments separated by newlines. A failure is
    /// logged and otherwise ignored: systemd's view is advisory, serving is not.
    pub fn send(&self, message: &str) -> bool {
        let Some((sock, addr)) = &self.target else {
            return false;
        };
        match sock.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot notify systemd");
                false
            }
        }
    }

    /// `READY=1` with a status line: llmd serves (after start or a reload).
    pub fn ready(&self, status: &str) -> bool {
        self.send(&format!("READY=1\nSTATUS={}", status_line(status)))
    }

    /// `RELOADING=1` with the monotonic timestamp systemd uses to order reloads.
    pub fn reloading(&self) -> bool {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=Reloading configuration",
            monotonic_usec()
        ))
    }

    /// `STOPPING=1`; the stop timeout is extended to cover the grace period in case it is
    /// configured longer than the unit's own `TimeoutStopSec=`.
    pub fn stopping(&self, status: &str, grace: Duration) -> bool {
        let extend = grace.saturating_add(Duration::from_secs(5)).as_micros();
        self.send(&format!(
            "STOPPING=1\nSTATUS={}\nEXTEND_TIMEOUT_USEC={extend}",
            status_line(status)
        ))
    }

    /// `WATCHDOG=1`: llmd is alive.
    pub fn watchdog(&self) -> bool {
        self.send("WATCHDOG=1")
    }
}

fn notify_address(name: &OsStr) -> io::Result<SocketAddr> {
    let bytes = name.as_bytes();
    match bytes.split_first() {
        Some((b'@', abstract_name)) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)
        }
        Some((b'/', _)) => SocketAddr::from_pathname(Path::new(name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@…)",
        )),
    }
}

/// One line, as the protocol separates assignments by newlines; long enough for a reason.
fn status_line(status: &str) -> String {
    let mut line: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 1024 {
        let mut cut = 1024;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The daemon's own socket as a client reaches it, for the watchdog's round trip.
#[derive(Debug, Clone)]
pub struct Probe {
    /// A socket path, or NUL followed by an abstract name (as tokio spells those).
    address: PathBuf,
    timeout: Duration,
}

const PROBE_ID: &str = "llmd-watchdog";

impl Probe {
    /// A probe of the socket at `address` that gives up after `timeout`.
    pub fn new(address: PathBuf, timeout: Duration) -> Probe {
        Probe { address, timeout }
    }

    /// The probe for a socket address as `getsockname` reports it; none for an unnamed one.
    pub fn for_listener(addr: &SocketAddr, timeout: Duration) -> Option<Probe> {
        use std::os::linux::net::SocketAddrExt;
        let address = match (addr.as_pathname(), addr.as_abstract_name()) {
            (Some(path), _) => path.to_path_buf(),
            (None, Some(name)) => {
                let mut bytes = vec![0u8];
                bytes.extend_from_slice(name);
                PathBuf::from(OsString::from_vec(bytes))
            }
            (None, None) => return None,
        };
        Some(Probe::new(address, timeout))
    }

    /// Where the probe connects.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// One `status` request over a new connection, answered in time. A `busy` answer
    /// counts too: the accept loop itself answered, the daemon is only full.
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, round_trip(&self.address)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

async fn round_trip(address: &Path) -> Result<(), String> {
    let stream = tokio::net::UnixStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (rx, mut tx) = stream.into_split();
    let request = format!("{{\"jsonrpc\":\"2.0\",\"id\":\"{PROBE_ID}\",\"method\":\"status\"}}\n");
    tx.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut line = Vec::new();
    BufReader::new(rx.take(1 << 20))
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let answer: Value =
        serde_json::from_slice(&line).map_err(|_| "the answer is not a JSON line".to_string())?;
    let ours = answer.get("id").and_then(Value::as_str) == Some(PROBE_ID)
        && answer.get("result").is_some();
    let busy = answer.pointer("/error/data/kind").and_then(Value::as_str) == Some("busy");
    if ours || busy {
        Ok(())
    } else {
        Err("unexpected answer to status".into())
    }
}

/// Pings the watchdog every `every` for as long as `probe` gets answers, and stops at
/// shutdown. A daemon that stops answering its socket stops pinging, so systemd restarts
/// it; a daemon that answers again resumes.
pub async fn run_watchdog(
    notifier: Arc<Notifier>,
    probe: Probe,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let result = tokio::select! {
            r = probe.check() => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => {
                if failing {
                    tracing::info!("llmd answers its socket again; watchdog pings resumed");
                    failing = false;
                }
                notifier.watchdog();
            }
            Err(why) => {
                if !failing {
                    tracing::warn!(socket = %probe.address().display(), reason = %why, "llmd does not answer its own socket; withholding watchdog pings");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use tokio::net::UnixListener;

    #[test]
    fn watchdog_period_is_half_the_interval_and_only_for_us() {
        let half = Some(Duration::from_millis(200));
        assert_eq!(watchdog_period(Some("400000"), None, 42), half);
        assert_eq!(watchdog_period(Some("400000"), Some("42"), 42), half);
        assert_eq!(watchdog_period(Some("400000"), Some("43"), 42), None);
        assert_eq!(watchdog_period(Some("400000"), Some("x"), 42), None);
        assert_eq!(watchdog_period(Some("0"), None, 42), None);
        assert_eq!(watchdog_period(Some("soon"), None, 42), None);
        assert_eq!(watchdog_period(None, Some("42"), 42), None);
    }

    #[test]
    fn messages_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        assert!(n.ready("Serving\nwith a newline"));
        let mut buf = [0u8; 2048];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=Serving with a newline");

        let name = format!("llmd-unit-{}-{}", std::process::id(), rand::random::<u32>());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        assert!(n.watchdog());
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(Notifier::connect(OsStr::new("relative/path")).is_err());
        assert!(!Notifier::disabled().ready("x"));
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let before = monotonic_usec();
        assert!(Notifier::connect(path.as_os_str()).unwrap().reloading());
        let after = monotonic_usec();
        let mut buf = [0u8; 2048];
        let len = rx.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
    }

    #[test]
    fn long_status_is_cut_on_a_char_boundary() {
        let s = status_line(&"é".repeat(1000));
        assert!(s.len() <= 1024 + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }

    #[tokio::test]
    async fn probe_needs_a_real_answer() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody there.
        let probe = Probe::new(dir.path().join("none"), Duration::from_millis(300));
        assert!(probe.check().await.is_err());

        // Accepts but never answers, as a hung daemon would.
        let hung_path = dir.path().join("hung");
        let hung = UnixListener::bind(&hung_path).unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                kept.push(s);
            }
        });
        let probe = Probe::new(hung_path, Duration::from_millis(300));
        let e = probe.check().await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");

        // Answers the status request.
        let ok_path = dir.path().join("ok");
        let ok = UnixListener::bind(&ok_path).unwrap();
        let answering = tokio::spawn(async move {
            while let Ok((s, _)) = ok.accept().await {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(req["method"], "status");
                let answer = serde_json::json!({"jsonrpc": "2.0", "id": req["id"], "result": {}});
                w.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
            }
        });
        let probe = Probe::new(ok_path, Duration::from_secs(5));
        probe.check().await.unwrap();
        held.abort();
        answering.abort();
    }

    #[tokio::test]
    async fn watchdog_pings_only_while_the_probe_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let notify_path = dir.path().join("notify");
        let rx = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
        let notifier = Arc::new(Notifier::connect(notify_path.as_os_str()).unwrap());

        // A socket that accepts and stays silent: no ping may be sent, ever.
        let hung_path = dir.path().join("hung");
        let hung = UnixListener::bind(&hung_path).unwrap();
        let accepted = Arc::new(tokio::sync::Notify::new());
        let seen = accepted.clone();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                kept.push(s);
                seen.notify_one();
            }
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_watchdog(
            notifier.clone(),
            Probe::new(hung_path, Duration::from_millis(50)),
            Duration::from_millis(20),
            shutdown.clone(),
        ));
        // Three probes reached the silent socket; each one must have ended without a ping.
        for _ in 0..3 {
            accepted.notified().await;
        }
        shutdown.cancel();
        task.await.unwrap();
        let mut buf = [0u8; 64];
        assert!(
            rx.try_recv(&mut buf).is_err(),
            "a hung daemon must not ping the watchdog"
        );
        held.abort();
    }
}
