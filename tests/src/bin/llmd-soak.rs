//! Soak (issue 9, Deliver 5): the real `llmd` for a given time with 8 agents looping on
//! `token` and `chat` (streamed and not) against the fake providers, while the fake token
//! endpoint issues 3-second tokens with single-use rotating refresh tokens, a Claude Code
//! stand-in refreshes the same `claude-cli` login, the config is reloaded at random, and
//! one hostile client sends garbage without ever reading.
//!
//! `scripts/soak.sh SECS` builds and runs it. Exit status 0 only with zero `invalid_grant`
//! and zero failed agent calls; RSS and open-fd slopes are reported.

use llmd_client::ChatEvent;
use llmd_proto::chat::ChatRequest;
use llmd_tests::claude_code::{creds, rand_below, FakeClaudeCode};
use llmd_tests::fake_oauth::{access_of, refresh_of, FakeOAuth};
use llmd_tests::fake_providers::FakeProviders;
use llmd_tests::Daemon;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const AGENTS: usize = 8;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn config(fake_oauth: &FakeOAuth, providers: &FakeProviders, variant: u64) -> String {
    let base = providers.anthropic_base();
    // Reloads alternate between these; the profiles the agents use never change.
    let extra = match variant % 3 {
        0 => String::new(),
        1 => format!("\n[profiles.extra]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"SOAK_KEY\"\nbase_url = \"{}\"\n", providers.openai_base()),
        _ => "\n[profiles.ant.rate_limit]\nrequests_per_minute = 100000\n".into(),
    };
    format!(
        r#"[daemon]
idle_timeout_secs = 5

[profiles.claude]
provider = "anthropic"
auth = "claude-cli"
token_endpoint = "{}"
base_url = "{base}"
default_model = "soak-model"

[profiles.ant]
provider = "anthropic"
auth = "api-key"
api_key_env = "SOAK_KEY"
base_url = "{base}"
default_model = "soak-model"
{extra}"#,
        fake_oauth.anthropic_url()
    )
}

#[derive(Default)]
struct Counts {
    tokens: AtomicU64,
    chats: AtomicU64,
    streams: AtomicU64,
    failures: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    hostile_lines: AtomicU64,
    hostile_connections: AtomicU64,
}

/// `(VmRSS kB, open fds)` of `pid`.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// Least-squares slope of `ys` over `xs` (per unit of x).
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn request(i: u64) -> ChatRequest {
    serde_json::from_value(serde_json::json!({
        "messages": [{"role": "user", "content": format!("soak message {i}")}],
        "max_tokens": 64
    }))
    .unwrap_or_default()
}

async fn agent(
    c: llmd_client::Client,
    n: usize,
    deadline: Instant,
    counts: Arc<Counts>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let fail = |what: &str, e: String| {
        counts.failures.fetch_add(1, Ordering::Relaxed);
        let mut errs = errors.lock().unwrap_or_else(|p| p.into_inner());
        if errs.len() < 20 {
            errs.push(format!("agent {n} {what}: {e}"));
        }
    };
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let profile = if i % 2 == 0 { "claude" } else { "ant" };
        match c.token("claude", Some(1)).await {
            Ok(t) if t.expires_at.is_some_and(|e| e >= now()) => {
                counts.tokens.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => fail("token", "served an expired token".into()),
            Err(e) => fail("token", e.to_string()),
        }
        match c.chat(profile, request(i)).await {
            Ok(_) => {
                counts.chats.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => fail("chat", e.to_string()),
        }
        match c.chat_stream(profile, request(i)).await {
            Ok(mut s) => {
                let mut done = false;
                while let Some(ev) = s.next_event().await {
                    match ev {
                        Ok(ChatEvent::Done(_)) => done = true,
                        Ok(_) => {}
                        Err(e) => {
                            fail("stream", e.to_string());
                            done = true;
                            break;
                        }
                    }
                }
                if done {
                    counts.streams.fetch_add(1, Ordering::Relaxed);
                } else {
                    fail("stream", "ended without an answer".into());
                }
            }
            Err(e) => fail("stream", e.to_string()),
        }
    }
}

/// Garbage of every kind the hostile tests found, written without ever reading.
async fn hostile(socket: std::path::PathBuf, deadline: Instant, counts: Arc<Counts>) {
    let junk: Vec<Vec<u8>> = vec![
        b"{nope\n".to_vec(),
        b"[1,2,3]\n".to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"status\"}\n".repeat(10),
        b"{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"hello\",\"params\":{\"client\":\"x\\n\\u001b[31m\",\"version\":\"1\"}}\n".to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"subscribe\",\"params\":{}}\n".repeat(50),
        b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools.register\",\"params\":{\"name\":\"junk\",\"input_schema\":{\"type\":\"object\"}}}\n".to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"chat\",\"params\":{\"profile\":\"nope\"}}\n".to_vec(),
        vec![0xff; 4096],
        b"\n\n\n".to_vec(),
    ];
    while Instant::now() < deadline {
        let Ok(mut s) = tokio::net::UnixStream::connect(&socket).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        counts.hostile_connections.fetch_add(1, Ordering::Relaxed);
        // Half of the connections send nothing at all (they must be closed after
        // idle_timeout_secs); the rest send garbage until the daemon gives up on them.
        if rand_below(2) == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(s);
            continue;
        }
        loop {
            if Instant::now() >= deadline {
                return;
            }
            let line = &junk[rand_below(junk.len() as u64) as usize];
            let w = tokio::time::timeout(Duration::from_secs(2), s.write_all(line)).await;
            if !matches!(w, Ok(Ok(()))) {
                break;
            }
            counts.hostile_lines.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let oauth = FakeOAuth::start(3).await;
    let providers = FakeProviders::start().await;
    let d = Daemon::builder()
        .config(&config(&oauth, &providers, 0))
        .env("SOAK_KEY", "sk-ant-api03-soak")
        .env(
            "LLMD_LOG",
            &std::env::var("LLMD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .file(
            ".claude/.credentials.json",
            &creds(&access_of(0), &refresh_of(0), (now() + 3) * 1000),
            0o600,
        )
        .start();
    let Some(pid) = d.pid() else {
        eprintln!("soak: llmd did not start");
        return std::process::ExitCode::FAILURE;
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let counts = Arc::new(Counts::default());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..AGENTS {
        let c = d.client().await;
        tasks.push(tokio::spawn(agent(
            c,
            n,
            deadline,
            counts.clone(),
            errors.clone(),
        )));
    }
    let cc = Arc::new(FakeClaudeCode::new(d.home.join(".claude"), oauth.addr));
    {
        let cc = cc.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(700 + rand_below(800))).await;
                cc.refresh_once().await;
            }
        }));
    }
    {
        let (counts, path) = (counts.clone(), d.home.join("config/llmd/config.toml"));
        let (oauth, providers, c) = (oauth.clone(), providers.clone(), d.client().await);
        tasks.push(tokio::spawn(async move {
            let mut v = 0;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500 + rand_below(2500))).await;
                v += 1;
                let _ = std::fs::write(&path, config(&oauth, &providers, v));
                match c.reload().await {
                    Ok(_) => counts.reloads.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counts.reload_failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tasks.push(tokio::spawn(hostile(
        d.socket.clone(),
        deadline,
        counts.clone(),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some((rss, fds)) = sample(pid) {
                    samples.push((started.elapsed().as_secs_f64(), rss, fds));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    // The first tenth is warm-up (allocator pools, first connections).
    let steady: Vec<_> = samples.iter().skip(samples.len() / 10).collect();
    let xs: Vec<f64> = steady.iter().map(|s| s.0 / 60.0).collect();
    let rss_slope = slope(&xs, &steady.iter().map(|s| s.1 as f64).collect::<Vec<_>>());
    let fd_slope = slope(&xs, &steady.iter().map(|s| s.2 as f64).collect::<Vec<_>>());
    // The second half alone tells a plateau (allocator pools filling) from a leak.
    let late: Vec<_> = samples.iter().skip(samples.len() / 2).collect();
    let late_xs: Vec<f64> = late.iter().map(|s| s.0 / 60.0).collect();
    let rss_late = slope(
        &late_xs,
        &late.iter().map(|s| s.1 as f64).collect::<Vec<_>>(),
    );
    let fd_late = slope(
        &late_xs,
        &late.iter().map(|s| s.2 as f64).collect::<Vec<_>>(),
    );
    let mid = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let first = samples.first().copied().unwrap_or_default();
    let last = samples.last().copied().unwrap_or_default();
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let fd_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let logs = d.logs();
    let leaked = logs.contains("fakeaccess")
        || logs.contains("fakerefresh")
        || logs.contains("sk-ant-api03-soak");
    let daemon_invalid = oauth.invalid_grants();
    let cc_invalid = cc.invalid_grants.load(Ordering::Relaxed);
    let failures = counts.failures.load(Ordering::Relaxed);
    let alive = sample(pid).is_some();
    println!("soak: {secs} s, {AGENTS} agents");
    println!(
        "  agent calls: {} token, {} chat, {} chat (streamed), {failures} failed",
        counts.tokens.load(Ordering::Relaxed),
        counts.chats.load(Ordering::Relaxed),
        counts.streams.load(Ordering::Relaxed)
    );
    println!(
        "  login: {} rotations at the token endpoint, {} by the Claude Code stand-in ({} skipped, {} errors), invalid_grant: {daemon_invalid} at the endpoint, {cc_invalid} seen by the stand-in",
        oauth.state().rotations,
        cc.refreshes.load(Ordering::Relaxed),
        cc.skipped.load(Ordering::Relaxed),
        cc.errors.load(Ordering::Relaxed),
    );
    println!(
        "  reloads: {} ok, {} refused",
        counts.reloads.load(Ordering::Relaxed),
        counts.reload_failures.load(Ordering::Relaxed)
    );
    println!(
        "  hostile client: {} connections, {} garbage writes, never read",
        counts.hostile_connections.load(Ordering::Relaxed),
        counts.hostile_lines.load(Ordering::Relaxed)
    );
    println!(
        "  RSS: {} kB at start, {} kB halfway, {} kB at end, {rss_max} kB max; slope {rss_slope:+.1} kB/min (second half {rss_late:+.1})",
        first.1, mid.1, last.1
    );
    println!(
        "  open fds: {} at start, {} halfway, {} at end, {fd_max} max; slope {fd_slope:+.2} /min (second half {fd_late:+.2})",
        first.2, mid.2, last.2
    );
    for e in errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("  error: {e}");
    }
    let ok = daemon_invalid == 0 && cc_invalid == 0 && failures == 0 && alive && !leaked;
    if !alive {
        println!("  FAIL: llmd is gone");
    }
    if leaked {
        println!("  FAIL: a secret reached the log");
    }
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    drop(d);
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
