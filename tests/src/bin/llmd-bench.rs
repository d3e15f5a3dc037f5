//! llmd's cost next to the floor and the direct call (BENCHMARKS.md): starts the real `llmd`
//! in temporary homes and measures, in one run,
//!
//! - `token` latency p50/p99 and calls/s at 1, 8, 64, 512 connections, next to a raw
//!   Unix-socket echo server (a child process of this benchmark) answering every line with a
//!   line of the same size as the token answer, and next to reading and parsing a
//!   `.credentials.json` file (what an agent does without llmd);
//! - the client crate's cached token path (ns per call) and how soon it drops a rotated token;
//! - `chat` through llmd against the same request sent with reqwest to the same fake provider
//!   on 127.0.0.1, at 1 and 64 concurrent: non-streaming p50/p99, streaming time to first
//!   delta and time per delta;
//! - a refresh stampede: 1,000 concurrent `token` calls that all need a refresh, against one
//!   refresh's latency, and the number of upstream calls;
//! - the daemon's RSS idle, with 1,000 idle connections and after a soak; start-up to a
//!   served `status`;
//! - the usage ledger on against off: a burst of 1,000 concurrent `chat` calls (wall time,
//!   p50/p99, rows recorded) and `token` at 1 and 64 connections.
//!
//! `cargo build --release --workspace --bins && target/release/llmd-bench all [--runs N]
//! [--secs S]` (or one section: `token`, `cache`, `chat`, `stampede`, `memory`, `startup`,
//! `ledger`).
//! The load generator is one process with two runtime threads; the daemon logs at
//! `LLMD_LOG` (default `info`, as in production). Every figure is the median of `--runs`
//! runs (default 3); llmd and its reference are measured alternately in the same run.

use futures_util::StreamExt;
use llmd_client::proto::chat::{ChatRequest, Delta};
use llmd_client::{ChatEvent, Client};
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::fake_providers::{FakeProviders, Reply};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const TOKEN_REQUEST: &[u8] =
    b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"token\",\"params\":{\"profile\":\"k\"}}\n";
const LONGEST_LINE: usize = 1 << 20;
/// Characters of each streamed answer: the fake's Anthropic stream cuts text into
/// 5-character deltas.
const STREAM_TEXT_CHARS: usize = 600;

struct Opts {
    runs: usize,
    secs: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("echo-server") {
        echo_server(&args[1..]);
        return;
    }
    if matches!(args.first().map(String::as_str), Some("load" | "load-echo")) {
        // For profiling: `llmd-bench load CONNS SECS` prints the daemon's pid, gives a
        // profiler a second to attach, then runs the `token` load.
        let conns = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(64);
        let secs = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10.0);
        raise_fd_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // `load-echo`: the same load against the echo floor, to profile the two alike.
        let echo = args[0] == "load-echo";
        rt.block_on(async {
            let (d, e);
            let socket = if echo {
                e = Echo::start(TOKEN_ANSWER_BYTES);
                eprintln!("echo pid {}", e.child.id());
                &e.path
            } else {
                d = key_daemon();
                eprintln!("daemon pid {}", d.pid().unwrap_or(0));
                &d.socket
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = hammer(socket, TOKEN_REQUEST, conns, secs).await;
            println!(
                "{conns} conn.: p50 {} p99 {} {}",
                fmt_us(s.p50),
                fmt_us(s.p99),
                fmt_rate(s.per_sec)
            );
        });
        return;
    }
    if args.first().map(String::as_str) == Some("load-chat") {
        // For profiling: `llmd-bench load-chat CONC SECS`, the chat section's load.
        let conc = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(64);
        let secs = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10.0);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(chat_load(conc, secs));
        return;
    }
    let mut opts = Opts { runs: 3, secs: 2.0 };
    let mut sections = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => opts.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
            "--secs" => opts.secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(2.0),
            "all" => sections.extend(
                [
                    "startup", "memory", "token", "cache", "stampede", "chat", "ledger",
                ]
                .map(String::from),
            ),
            s => sections.push(s.to_owned()),
        }
    }
    if sections.is_empty() {
        eprintln!(
            "usage: llmd-bench all|token|cache|chat|stampede|memory|startup|ledger [--runs N] [--secs S]"
        );
        std::process::exit(2);
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    print_machine(&opts);
    for s in sections {
        match s.as_str() {
            "startup" => startup(&opts),
            "memory" => rt.block_on(memory(&opts)),
            "token" => rt.block_on(token(&opts)),
            "cache" => rt.block_on(cache(&opts)),
            "stampede" => rt.block_on(stampede(&opts)),
            "chat" => rt.block_on(chat(&opts)),
            "ledger" => rt.block_on(ledger(&opts)),
            other => {
                eprintln!("unknown section `{other}`");
                std::process::exit(2);
            }
        }
    }
}

fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn print_machine(opts: &Opts) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# llmd-bench: {cpu}, {cores} cores, Linux {}, load average {} ; medians of {} runs, {} s per point",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        opts.runs,
        opts.secs
    );
}

// ---------------------------------------------------------------------------------------
// Figures

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Latencies in µs of one measurement.
#[derive(Default, Clone)]
struct Sample {
    p50: f64,
    p99: f64,
    per_sec: f64,
}

impl Sample {
    fn of(mut lat_us: Vec<f64>, elapsed: Duration) -> Sample {
        lat_us.sort_by(|a, b| a.total_cmp(b));
        Sample {
            p50: pct(&lat_us, 0.5),
            p99: pct(&lat_us, 0.99),
            per_sec: lat_us.len() as f64 / elapsed.as_secs_f64(),
        }
    }

    fn median_of(v: &[Sample]) -> Sample {
        Sample {
            p50: median(v.iter().map(|s| s.p50).collect()),
            p99: median(v.iter().map(|s| s.p99).collect()),
            per_sec: median(v.iter().map(|s| s.per_sec).collect()),
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fmt_us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0} µs")
    } else {
        format!("{v:.1} µs")
    }
}

fn fmt_rate(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k/s", v / 1000.0)
    } else {
        format!("{v:.0}/s")
    }
}

fn row(figure: &str, llmd: &str, reference: &str, ratio: &str, target: &str) {
    println!("| {figure} | {llmd} | {reference} | {ratio} | {target} |");
}

fn header(title: &str) {
    println!("\n## {title}\n");
    println!("| figure | llmd | reference | ratio | target |");
    println!("|---|---|---|---|---|");
}

// ---------------------------------------------------------------------------------------
// Raw line connections (the same load generator for llmd and the echo floor)

struct LineConn {
    s: UnixStream,
    buf: Vec<u8>,
}

impl LineConn {
    async fn connect(path: &Path) -> std::io::Result<LineConn> {
        Ok(LineConn {
            s: UnixStream::connect(path).await?,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `req` and reads one answer line; returns its length.
    async fn roundtrip(&mut self, req: &[u8]) -> std::io::Result<usize> {
        self.s.write_all(req).await?;
        self.read_line().await
    }

    async fn read_line(&mut self) -> std::io::Result<usize> {
        let mut scanned = 0;
        loop {
            if let Some(p) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + p;
                self.buf.drain(..=end);
                return Ok(end);
            }
            scanned = self.buf.len();
            if self.buf.len() > LONGEST_LINE {
                return Err(std::io::Error::other("answer line too long"));
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let n = self.read_line_keep().await?;
        let line = self.buf[..n].to_vec();
        self.buf.drain(..=n);
        Ok(line)
    }

    async fn read_line_keep(&mut self) -> std::io::Result<usize> {
        let mut scanned = 0;
        loop {
            if let Some(p) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                return Ok(scanned + p);
            }
            scanned = self.buf.len();
            if self.buf.len() > LONGEST_LINE || self.s.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// `conns` connections each sending `req` back to back for `secs`: latencies and rate.
async fn hammer(path: &Path, req: &'static [u8], conns: usize, secs: f64) -> Sample {
    let mut ready = Vec::with_capacity(conns);
    for _ in 0..conns {
        ready.push(LineConn::connect(path).await.expect("connect"));
    }
    // Warm up each connection (the daemon accepts lazily; the first call pays for that).
    for c in ready.iter_mut() {
        c.roundtrip(req).await.expect("warm-up call");
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = ready
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break;
                    }
                    if c.roundtrip(req).await.is_err() {
                        eprintln!("a connection failed");
                        break;
                    }
                    lat.push(us(t.elapsed()));
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    Sample::of(all, start.elapsed())
}

// ---------------------------------------------------------------------------------------
// The echo floor: a separate process, like the daemon

fn echo_server(args: &[String]) {
    let (Some(path), Some(size)) = (args.first(), args.get(1).and_then(|s| s.parse().ok())) else {
        eprintln!("echo-server <socket> <answer bytes>");
        std::process::exit(2);
    };
    let size: usize = size;
    // A JSON-RPC result line of exactly `size` bytes (newline included).
    let head = br#"{"jsonrpc":"2.0","id":1,"result":""#;
    let mut reply = head.to_vec();
    reply.resize(size.max(head.len() + 3) - 3, b'x');
    reply.extend_from_slice(b"\"}\n");
    let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(path).expect("bind echo socket");
        println!("ready");
        let _ = std::io::stdout().flush();
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut out = Vec::with_capacity(4096);
                let mut partial = 0usize;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            out.extend_from_slice(reply);
                            partial = 0;
                        } else {
                            partial += 1;
                        }
                    }
                    if partial > LONGEST_LINE {
                        return;
                    }
                    if !out.is_empty() {
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
            });
        }
    });
}

struct Echo {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Echo {
    fn start(answer_bytes: usize) -> Echo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("echo.sock");
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("echo-server")
            .arg(&path)
            .arg(answer_bytes.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the echo server");
        let mut line = String::new();
        let out = child.stdout.take().expect("echo stdout");
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        assert_eq!(line.trim(), "ready", "echo server did not start");
        Echo {
            child,
            path,
            _dir: dir,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Daemons

fn log_level() -> String {
    std::env::var("LLMD_LOG").unwrap_or_else(|_| "info".into())
}

fn key_daemon() -> Daemon {
    Daemon::builder()
        .config("[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\n")
        .env("BENCH_KEY", "sk-ant-api03-bench-0123456789abcdef0123456789abcdef")
        .env("LLMD_LOG", &log_level())
        .start()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ---------------------------------------------------------------------------------------
// Sections

fn startup(opts: &Opts) {
    header("Start-up");
    let mut times = Vec::new();
    for _ in 0..opts.runs.max(5) {
        let start = Instant::now();
        let d = Daemon::builder()
            .config("[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\n")
            .env("BENCH_KEY", "sk-ant-api03-bench")
            .env("LLMD_LOG", &log_level())
            .no_wait()
            .start();
        let deadline = start + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&d.socket) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let asked = s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"status\"}\n");
                let mut line = String::new();
                if asked.is_ok()
                    && std::io::BufReader::new(s)
                        .read_line(&mut line)
                        .is_ok_and(|n| n > 0)
                    && line.contains("\"result\"")
                {
                    times.push(us(start.elapsed()));
                    break;
                }
            }
            if Instant::now() > deadline {
                eprintln!("llmd did not serve `status` in 10 s");
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    row(
        "start-up to a served `status` (spawn → answer, polling every 0.2 ms)",
        &fmt_us(median(times.clone())),
        "",
        "",
        "≤ 20 ms",
    );
}

async fn open_idle(path: &Path, n: usize) -> Vec<UnixStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        match UnixStream::connect(path).await {
            Ok(s) => v.push(s),
            Err(e) => {
                eprintln!("connection {} failed: {e}", v.len());
                break;
            }
        }
    }
    v
}

async fn connections_served(c: &Client, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if c.status().await.is_ok_and(|s| s.connections >= want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the daemon did not report {want} connections");
}

async fn memory(opts: &Opts) {
    header("Memory (daemon RSS)");
    let (mut idle, mut loaded, mut soaked) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        let d = key_daemon();
        let pid = d.pid().expect("pid");
        let c = d.client().await;
        c.token("k", None).await.expect("token");
        tokio::time::sleep(Duration::from_millis(300)).await;
        idle.push(rss_kib(pid) as f64);
        let conns = open_idle(&d.socket, 1000).await;
        connections_served(&c, 1001).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        loaded.push(rss_kib(pid) as f64);
        drop(conns);
        hammer(&d.socket, TOKEN_REQUEST, 64, opts.secs * 2.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        soaked.push(rss_kib(pid) as f64);
    }
    let mib = |v: Vec<f64>| format!("{:.1} MiB", median(v) / 1024.0);
    row(
        "RSS idle (one token served)",
        &mib(idle),
        "",
        "",
        "≤ 10 MiB",
    );
    row(
        "RSS with 1,000 idle connections",
        &mib(loaded),
        "",
        "",
        "≤ 25 MiB",
    );
    row(
        &format!(
            "RSS after a soak ({} s of `token` at 64 connections, connections closed)",
            opts.secs * 2.0
        ),
        &mib(soaked),
        "",
        "",
        "",
    );
}

/// Reads and parses a Claude Code `.credentials.json` and takes the access token out, as an
/// agent without llmd does before each request.
fn read_credentials_file(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["claudeAiOauth"]["accessToken"]
        .as_str()
        .map(str::to_owned)
}

fn credentials_file_sample(secs: f64) -> Sample {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(".credentials.json");
    let body = json!({
        "claudeAiOauth": {
            "accessToken": access_of(0),
            "refreshToken": refresh_of(0),
            "expiresAt": (now_secs() + 3600) * 1000,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
            "rateLimitTier": "default_claude_max_20x"
        }
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&body).expect("json")).expect("write");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        let tok = read_credentials_file(&path);
        lat.push(us(t.elapsed()));
        assert!(tok.is_some());
    }
    Sample::of(lat, start.elapsed())
}

async fn token(opts: &Opts) {
    let d = key_daemon();
    let mut probe = LineConn::connect(&d.socket).await.expect("connect");
    let answer = probe.roundtrip(TOKEN_REQUEST).await.expect("token") + 1;
    drop(probe);
    let echo = Echo::start(answer);
    header(&format!(
        "`token` against the floor (a {}-byte request, a {answer}-byte answer line)",
        TOKEN_REQUEST.len()
    ));
    let mut results = Vec::new();
    for conns in [1usize, 8, 64, 512] {
        let (mut l, mut e) = (Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            e.push(hammer(&echo.path, TOKEN_REQUEST, conns, opts.secs).await);
            l.push(hammer(&d.socket, TOKEN_REQUEST, conns, opts.secs).await);
        }
        let (l, e) = (Sample::median_of(&l), Sample::median_of(&e));
        row(
            &format!("`token` p50 / p99, {conns} conn."),
            &format!("{} / {}", fmt_us(l.p50), fmt_us(l.p99)),
            &format!("echo {} / {}", fmt_us(e.p50), fmt_us(e.p99)),
            &format!("{:.2}× / {:.2}×", l.p50 / e.p50, l.p99 / e.p99),
            if conns == 1 { "p50 ≤ 1.5×" } else { "" },
        );
        row(
            &format!("`token` calls/s, {conns} conn."),
            &fmt_rate(l.per_sec),
            &format!("echo {}", fmt_rate(e.per_sec)),
            &format!("{:.2}×", l.per_sec / e.per_sec),
            if conns == 64 { "≥ 0.85×" } else { "" },
        );
        results.push((conns, l));
    }
    let f = Sample::median_of(
        &(0..opts.runs)
            .map(|_| credentials_file_sample(opts.secs))
            .collect::<Vec<_>>(),
    );
    let l1 = &results[0].1;
    row(
        "read + parse `.credentials.json` p50 / p99 (1 thread)",
        &format!("token 1 conn. {}", fmt_us(l1.p50)),
        &format!("file {} / {}", fmt_us(f.p50), fmt_us(f.p99)),
        &format!("{:.2}×", l1.p50 / f.p50),
        "",
    );
    row(
        "read + parse `.credentials.json` calls/s (1 thread)",
        &format!("token 1 conn. {}", fmt_rate(l1.per_sec)),
        &format!("file {}", fmt_rate(f.per_sec)),
        &format!("{:.2}×", l1.per_sec / f.per_sec),
        "",
    );
    // The client crate's own round trip, for comparison with the raw generator.
    let c = d.client().await;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < opts.secs {
        let t = Instant::now();
        c.token("k", None).await.expect("token");
        lat.push(us(t.elapsed()));
    }
    let s = Sample::of(lat, start.elapsed());
    row(
        "`llmd_client::Client::token` p50 / p99, 1 conn.",
        &format!("{} / {}", fmt_us(s.p50), fmt_us(s.p99)),
        &format!("raw {}", fmt_us(l1.p50)),
        &format!("{:.2}×", s.p50 / l1.p50),
        "",
    );
}

async fn cache(opts: &Opts) {
    header("Cached token (llmd_client::TokenCache)");
    let d = key_daemon();
    let cache = d.client().await.token_cache(60);
    cache.token("k").await.expect("first token");
    let mut per_call = Vec::new();
    for _ in 0..opts.runs {
        let n = 5_000_000u32;
        let start = Instant::now();
        for _ in 0..n {
            let t = cache.token("k").await.expect("cached");
            std::hint::black_box(&t);
        }
        per_call.push(start.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    let c = d.client().await;
    let mut lat = Vec::new();
    for _ in 0..20_000 {
        let t = Instant::now();
        c.token("k", None).await.expect("token");
        lat.push(us(t.elapsed()) * 1000.0);
    }
    let rt = Sample::of(lat, Duration::from_secs(1));
    let ns = median(per_call);
    row(
        "cached `token`, ns per call (1 task)",
        &format!("{ns:.0} ns"),
        &format!("round trip {:.0} ns", rt.p50),
        &format!("{:.4}×", ns / rt.p50),
        "≤ 100 ns",
    );
    // How long a rotated token stays in the cache after the rotation was answered.
    let fake = FakeOAuth::start(3600).await;
    let d = Daemon::builder()
        .config(&format!(
            "[daemon]\nforced_refresh_interval_secs = 0\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now_secs() + 3600}).to_string(),
            0o600,
        )
        .env("LLMD_LOG", &log_level())
        .start();
    let cache = d.client().await.token_cache(60);
    let other = d.client().await;
    let mut after = Vec::new();
    for _ in 0..20 {
        let old = cache.token("work").await.expect("token");
        other.refresh("work").await.expect("refresh");
        let answered = Instant::now();
        let deadline = answered + Duration::from_secs(1);
        while cache.cached("work").is_some_and(|t| Arc::ptr_eq(&t, &old))
            && Instant::now() < deadline
        {
            std::hint::spin_loop();
        }
        after.push(us(answered.elapsed()));
    }
    after.sort_by(|a, b| a.total_cmp(b));
    row(
        "rotated token dropped, after the `refresh` answer: p50 / max of 20",
        &format!(
            "{} / {}",
            fmt_us(pct(&after, 0.5)),
            fmt_us(pct(&after, 1.0))
        ),
        "",
        "",
        "≤ 1 ms",
    );
}

async fn stampede(opts: &Opts) {
    header("Refresh stampede: 1,000 concurrent `token` calls that all need a refresh");
    // Once against the fake answering at once (the refresh overlaps the burst's arrival),
    // once against a token endpoint with a network's latency, as a real one has: then
    // every call is in before the answer, and what is measured is llmd's fan-out.
    for endpoint_delay in [Duration::ZERO, STAMPEDE_ENDPOINT_DELAY] {
        stampede_with(opts, endpoint_delay).await;
    }
}

/// A token endpoint's latency over a network (Anthropic's answers in 100–300 ms).
const STAMPEDE_ENDPOINT_DELAY: Duration = Duration::from_millis(50);

async fn stampede_with(opts: &Opts, endpoint_delay: Duration) {
    let (mut single, mut all, mut upstream, mut floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut first, mut floor_first) = (Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        // One caller alone: one refresh's latency.
        let (_f, d) = stampede_daemon(endpoint_delay).await;
        let mut c = LineConn::connect(&d.socket).await.expect("connect");
        let t = Instant::now();
        c.roundtrip(STAMPEDE_REQUEST).await.expect("token");
        single.push(us(t.elapsed()));
        drop(d);
        // A thousand at once.
        let (fake, d) = stampede_daemon(endpoint_delay).await;
        let (f, a) = burst(&d.socket, 1000).await;
        first.push(f);
        all.push(a);
        upstream.push(fake.refresh_calls() as f64);
        // The same burst answered by the echo floor (no refresh, nothing to wait for).
        let echo = Echo::start(TOKEN_ANSWER_BYTES);
        let (f, a) = burst(&echo.path, 1000).await;
        floor_first.push(f);
        floor.push(a);
    }
    let (s, a, f) = (median(single), median(all), median(floor));
    let endpoint = if endpoint_delay.is_zero() {
        "endpoint answering at once".to_owned()
    } else {
        format!("endpoint answering in {} ms", endpoint_delay.as_millis())
    };
    row(
        &format!("{endpoint}: all 1,000 answered (from release to the last answer)"),
        &fmt_us(a),
        &format!("one refresh {}", fmt_us(s)),
        &format!("+{}", fmt_us(a - s)),
        "≤ one refresh + 5 ms",
    );
    row(
        &format!("{endpoint}: first of the 1,000 answered"),
        &fmt_us(median(first)),
        &format!("echo {}", fmt_us(median(floor_first))),
        "",
        "",
    );
    row(
        &format!("{endpoint}: the same burst of 1,000 against the echo floor"),
        "",
        &format!("echo {}", fmt_us(f)),
        &format!("llmd − refresh − floor: {}", fmt_us(a - s - f)),
        "",
    );
    row(
        &format!("{endpoint}: upstream refresh calls"),
        &format!("{}", median(upstream)),
        "",
        "",
        "exactly 1",
    );
}

/// `n` connections, each served once first, then all sending one stampede request at the
/// same moment: µs from the release to the first and to the last answer.
async fn burst(path: &Path, n: usize) -> (f64, f64) {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(LineConn::connect(path).await.expect("connect"));
    }
    for c in conns.iter_mut() {
        c.roundtrip(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"hello\",\"params\":{\"client\":\"bench\",\"version\":\"1\"}}\n")
            .await
            .expect("hello");
    }
    let go = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                let ok = c.line_after(STAMPEDE_REQUEST).await;
                (Instant::now(), ok)
            })
        })
        .collect();
    go.wait().await;
    let start = Instant::now();
    let (mut first, mut last) = (None::<Instant>, start);
    let mut failed = 0;
    for t in tasks {
        let (end, ok) = t.await.expect("task");
        last = last.max(end);
        first = Some(first.map_or(end, |f| f.min(end)));
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {n} burst calls got no result");
    }
    (us(first.unwrap_or(start) - start), us(last - start))
}

/// The `token` answer line of `key_daemon` (what `token` measures first), for the echo of `load-echo`.
const TOKEN_ANSWER_BYTES: usize = 248;

const STAMPEDE_REQUEST: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"token\",\"params\":{\"profile\":\"work\",\"min_valid_secs\":2000}}\n";

impl LineConn {
    /// Sends `req`; true when the answer is a result.
    async fn line_after(&mut self, req: &[u8]) -> bool {
        if self.s.write_all(req).await.is_err() {
            return false;
        }
        self.line()
            .await
            .is_ok_and(|l| l.windows(8).any(|w| w == b"\"result\""))
    }
}

/// A daemon whose login holds a token valid 1,000 s: callers asking for 2,000 s all need the
/// one refresh (the fake issues 3,600 s tokens).
async fn stampede_daemon(endpoint_delay: Duration) -> (FakeOAuth, Daemon) {
    let fake = FakeOAuth::start(3600).await;
    fake.state().delay = endpoint_delay;
    let d = Daemon::builder()
        .config(&format!(
            "[daemon]\nrefresh_margin_secs = 60\n\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\n",
            fake.anthropic_url()
        ))
        .file(
            "state/llmd/oauth/work.json",
            &json!({"access_token": access_of(0), "refresh_token": refresh_of(0), "expires_at": now_secs() + 1000}).to_string(),
            0o600,
        )
        .env("LLMD_LOG", &log_level())
        .start();
    (fake, d)
}

fn chat_request(text: &str) -> ChatRequest {
    serde_json::from_value(json!({
        "model": "claude-x",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}]
    }))
    .expect("chat request")
}

/// Sends the Anthropic request llmd would send, straight to the fake.
async fn direct(http: &reqwest::Client, url: &str, stream: bool) -> Result<Timing, String> {
    let body = json!({"model": "claude-x", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]});
    let start = Instant::now();
    let resp = http
        .post(url)
        .header("x-api-key", "sk-ant-api03-bench")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut t = Timing::default();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if stream {
            let n = chunk.windows(10).filter(|w| w == b"text_delta").count();
            t.deltas(n, start);
        }
    }
    t.total = start.elapsed();
    Ok(t)
}

/// When the deltas of one answer arrived.
#[derive(Default)]
struct Timing {
    first: Option<Duration>,
    last: Duration,
    count: usize,
    total: Duration,
}

impl Timing {
    fn deltas(&mut self, n: usize, start: Instant) {
        if n == 0 {
            return;
        }
        let at = start.elapsed();
        self.first.get_or_insert(at);
        self.last = at;
        self.count += n;
    }

    /// Time per delta after the first.
    fn per_delta(&self) -> Option<Duration> {
        let first = self.first?;
        (self.count > 1).then(|| (self.last - first) / (self.count as u32 - 1))
    }
}

async fn through_llmd(c: &Client, stream: bool) -> Result<Timing, String> {
    let start = Instant::now();
    let mut t = Timing::default();
    if !stream {
        c.chat("a", chat_request("hi"))
            .await
            .map_err(|e| e.to_string())?;
    } else {
        let mut s = c
            .chat_stream("a", chat_request("hi"))
            .await
            .map_err(|e| e.to_string())?;
        while let Some(ev) = s.next_event().await {
            match ev.map_err(|e| e.to_string())? {
                ChatEvent::Delta(Delta::Text { .. }) => t.deltas(1, start),
                ChatEvent::Delta(_) => {}
                ChatEvent::Done(_) => break,
            }
        }
    }
    t.total = start.elapsed();
    Ok(t)
}

#[derive(Default)]
struct ChatFigures {
    total: Vec<f64>,
    first: Vec<f64>,
    per_delta: Vec<f64>,
}

impl ChatFigures {
    fn add(&mut self, t: &Timing) {
        self.total.push(us(t.total));
        if let Some(f) = t.first {
            self.first.push(us(f));
        }
        if let Some(p) = t.per_delta() {
            self.per_delta.push(us(p));
        }
    }

    fn sorted(mut self) -> ChatFigures {
        for v in [&mut self.total, &mut self.first, &mut self.per_delta] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        self
    }
}

/// `conc` workers, each alternating a direct call and a call through llmd for `secs`.
async fn chat_round(
    fake: &FakeProviders,
    clients: &[Client],
    http: &reqwest::Client,
    url: &str,
    stream: bool,
    secs: f64,
) -> (ChatFigures, ChatFigures) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let text: String = "abcdefghij".repeat(STREAM_TEXT_CHARS / 10);
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let (c, http, url, fake, text) = (
                c.clone(),
                http.clone(),
                url.to_owned(),
                fake.clone(),
                text.clone(),
            );
            tokio::spawn(async move {
                let (mut d, mut l) = (ChatFigures::default(), ChatFigures::default());
                while Instant::now() < deadline {
                    fake.reply(Reply::text(&text));
                    match direct(&http, &url, stream).await {
                        Ok(t) => d.add(&t),
                        Err(e) => eprintln!("direct: {e}"),
                    }
                    fake.reply(Reply::text(&text));
                    match through_llmd(&c, stream).await {
                        Ok(t) => l.add(&t),
                        Err(e) => eprintln!("llmd: {e}"),
                    }
                }
                (d, l)
            })
        })
        .collect();
    let (mut d, mut l) = (ChatFigures::default(), ChatFigures::default());
    for t in tasks {
        let (a, b) = t.await.expect("chat task");
        d.total.extend(a.total);
        d.first.extend(a.first);
        d.per_delta.extend(a.per_delta);
        l.total.extend(b.total);
        l.first.extend(b.first);
        l.per_delta.extend(b.per_delta);
    }
    fake.reset();
    (d.sorted(), l.sorted())
}

async fn chat_load(conc: usize, secs: f64) {
    let fake = FakeProviders::start().await;
    let d = chat_daemon(&fake);
    eprintln!("daemon pid {}", d.pid().unwrap_or(0));
    let url = format!("{}/v1/messages", fake.anthropic_base());
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..conc {
        clients.push(d.client().await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (dr, lr) = chat_round(&fake, &clients, &http, &url, false, secs).await;
    println!(
        "{conc} concurrent: llmd p50 {} direct p50 {}",
        fmt_us(pct(&lr.total, 0.5)),
        fmt_us(pct(&dr.total, 0.5))
    );
}

fn chat_daemon(fake: &FakeProviders) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[profiles.a]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\nbase_url = \"{}\"\n",
            fake.anthropic_base()
        ))
        .env("BENCH_KEY", "sk-ant-api03-bench")
        .env("LLMD_LOG", &log_level())
        .start()
}

async fn chat(opts: &Opts) {
    header(
        "`chat` through llmd against the direct call (reqwest, same fake provider on 127.0.0.1)",
    );
    let fake = FakeProviders::start().await;
    let d = chat_daemon(&fake);
    let url = format!("{}/v1/messages", fake.anthropic_base());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("reqwest");
    for conc in [1usize, 64] {
        let mut clients = Vec::new();
        for _ in 0..conc {
            clients.push(d.client().await);
        }
        // Warm-up: connections to the fake from both sides.
        chat_round(&fake, &clients, &http, &url, false, 0.3).await;
        for stream in [false, true] {
            let mut rows: Vec<[f64; 8]> = Vec::new();
            for _ in 0..opts.runs {
                let (dr, lr) = chat_round(&fake, &clients, &http, &url, stream, opts.secs).await;
                rows.push([
                    pct(&lr.total, 0.5),
                    pct(&dr.total, 0.5),
                    pct(&lr.total, 0.99),
                    pct(&dr.total, 0.99),
                    pct(&lr.first, 0.5),
                    pct(&dr.first, 0.5),
                    pct(&lr.per_delta, 0.5),
                    pct(&dr.per_delta, 0.5),
                ]);
            }
            let m = |i: usize| median(rows.iter().map(|r| r[i]).collect());
            if !stream {
                row(
                    &format!("non-streaming p50, {conc} concurrent"),
                    &fmt_us(m(0)),
                    &format!("direct {}", fmt_us(m(1))),
                    &format!("+{}", fmt_us(m(0) - m(1))),
                    if conc == 1 {
                        "+≤ 100 µs"
                    } else {
                        "+≤ 0.5 ms"
                    },
                );
                row(
                    &format!("non-streaming p99, {conc} concurrent"),
                    &fmt_us(m(2)),
                    &format!("direct {}", fmt_us(m(3))),
                    &format!("+{}", fmt_us(m(2) - m(3))),
                    "",
                );
            } else {
                row(
                    &format!(
                        "streaming: time to first delta (p50), {conc} concurrent, {} deltas",
                        STREAM_TEXT_CHARS / 5
                    ),
                    &fmt_us(m(4)),
                    &format!("direct {}", fmt_us(m(5))),
                    &format!("+{}", fmt_us(m(4) - m(5))),
                    if conc == 1 { "+≤ 100 µs" } else { "" },
                );
                row(
                    &format!("streaming: time per delta (p50), {conc} concurrent"),
                    &fmt_us(m(6)),
                    &format!("direct {}", fmt_us(m(7))),
                    &format!("+{}", fmt_us(m(6) - m(7))),
                    if conc == 1 { "+≤ 10 µs" } else { "" },
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Usage ledger on against off

/// A chat profile `a` on the fake and a key profile `k`, with the ledger on or off.
fn ledger_daemon(fake: &FakeProviders, enabled: bool) -> Daemon {
    Daemon::builder()
        .config(&format!(
            "[usage]\nenabled = {enabled}\n\n\
             [profiles.a]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\nbase_url = \"{}\"\n\n\
             [profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\n",
            fake.anthropic_base()
        ))
        .env("BENCH_KEY", "sk-ant-api03-bench-0123456789abcdef0123456789abcdef")
        .env("LLMD_LOG", &log_level())
        .start()
}

/// `n` `chat` calls started at once, spread over `clients`: wall time and latencies.
async fn chat_burst(clients: &[Client], n: usize) -> (f64, Vec<f64>) {
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c = c.clone();
            let share = n / clients.len() + usize::from(i < n % clients.len());
            tokio::spawn(async move {
                let calls = (0..share).map(|_| {
                    let c = c.clone();
                    async move {
                        let t = Instant::now();
                        c.chat("a", chat_request("hi"))
                            .await
                            .map(|_| us(t.elapsed()))
                    }
                });
                futures_util::future::join_all(calls).await
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        for r in t.await.expect("burst task") {
            match r {
                Ok(l) => lat.push(l),
                Err(e) => eprintln!("chat: {e}"),
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    (us(start.elapsed()), lat)
}

async fn ledger(opts: &Opts) {
    header("Usage ledger on against off (`[usage] enabled = false`)");
    const BURST: usize = 1_000;
    const CONNS: usize = 64;
    let fake = FakeProviders::start().await;
    let on = ledger_daemon(&fake, true);
    let off = ledger_daemon(&fake, false);
    let mut clients = [Vec::new(), Vec::new()];
    for (d, cs) in [&on, &off].into_iter().zip(clients.iter_mut()) {
        for _ in 0..CONNS {
            cs.push(d.client().await);
        }
        // Warm-up: connections to the fake, and the ledger file's first pages.
        chat_burst(cs, 100).await;
    }
    let mut figures = [Vec::new(), Vec::new()];
    for _ in 0..opts.runs {
        for (cs, f) in clients.iter().zip(figures.iter_mut()) {
            let (wall, lat) = chat_burst(cs, BURST).await;
            f.push([wall, pct(&lat, 0.5), pct(&lat, 0.99)]);
        }
    }
    let m = |side: usize, i: usize| median(figures[side].iter().map(|r| r[i]).collect());
    for (i, what) in [(0, "wall time"), (1, "p50"), (2, "p99")] {
        row(
            &format!("{BURST} concurrent `chat` ({CONNS} conn.), {what}"),
            &format!("on {}", fmt_us(m(0, i))),
            &format!("off {}", fmt_us(m(1, i))),
            &format!("{:.2}×", m(0, i) / m(1, i)),
            "",
        );
    }
    let u = on
        .client()
        .await
        .usage(Some("1h"), Default::default())
        .await
        .expect("usage");
    let sent = (100 + BURST * opts.runs) as u64;
    row(
        "rows recorded / sent (ledger on)",
        &format!("{} / {sent}", u.totals.requests),
        &format!("dropped {}", u.dropped),
        "",
        "all, none dropped",
    );
    for conns in [1usize, 64] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            a.push(hammer(&on.socket, TOKEN_REQUEST, conns, opts.secs).await);
            b.push(hammer(&off.socket, TOKEN_REQUEST, conns, opts.secs).await);
        }
        let (a, b) = (Sample::median_of(&a), Sample::median_of(&b));
        row(
            &format!("`token` p50 / calls/s, {conns} conn."),
            &format!("on {} / {}", fmt_us(a.p50), fmt_rate(a.per_sec)),
            &format!("off {} / {}", fmt_us(b.p50), fmt_rate(b.per_sec)),
            &format!("{:.2}× / {:.2}×", a.p50 / b.p50, a.per_sec / b.per_sec),
            "",
        );
    }
}
