//! The gateway's overhead over a direct call to the same fake provider (BENCHMARKS.md,
//! "Gateway"): non-streaming latency p50/p99, time to first event and time per event of
//! a stream, each direct (reqwest to the fake) and through llmd's gateway, interleaved.
//!
//! `cargo build --release --workspace --bins && target/release/llmd-bench-gateway [N]`

use futures_util::StreamExt;
use llmd_proto::methods::{GatewayKeyParams, GatewayKeyResult};
use llmd_tests::fake_providers::{FakeProviders, Reply};
use llmd_tests::Daemon;
use serde_json::json;
use std::time::{Duration, Instant};

/// Text of each streamed answer: the fake cuts it into 6-character deltas.
const STREAM_TEXT_CHARS: usize = 600;

struct Target {
    url: String,
    key_header: (&'static str, String),
}

/// One request: time to the first chunk, total time, events, and the gaps between the
/// arrivals of successive events.
async fn once(
    http: &reqwest::Client,
    t: &Target,
    stream: bool,
) -> Result<(Duration, Duration, usize, Vec<f64>), String> {
    let body = json!({"model": "claude-x", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]});
    let start = Instant::now();
    let resp = http
        .post(&t.url)
        .header(t.key_header.0, &t.key_header.1)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut first = None;
    let mut events = 0;
    let mut gaps = Vec::new();
    let mut last = start;
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let now = Instant::now();
        first.get_or_insert_with(|| start.elapsed());
        let n = chunk.windows(2).filter(|w| w == b"\n\n").count();
        if events > 0 && n > 0 {
            // Events that came in one read share the gap.
            let g = us(now - last) / n as f64;
            gaps.extend(std::iter::repeat_n(g, n));
        }
        if n > 0 {
            last = now;
        }
        events += n;
    }
    let total = start.elapsed();
    Ok((first.unwrap_or(total), total, events, gaps))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\n[profiles.an]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\nbase_url = \"{}\"\n",
        fake.anthropic_base()
    );
    let d = Daemon::builder()
        .config(&cfg)
        .env("BENCH_KEY", "bench-key")
        .env("LLMD_LOG", "warn")
        .start();
    let k: GatewayKeyResult = match d
        .client()
        .await
        .call("gateway.key", &GatewayKeyParams::default())
        .await
    {
        Ok(k) => k,
        Err(e) => {
            eprintln!("gateway.key: {e}");
            std::process::exit(1);
        }
    };
    let Some(base) = k.base_url else {
        eprintln!("the gateway has no TCP listener");
        std::process::exit(1);
    };
    let direct = Target {
        url: format!("{}/v1/messages", fake.anthropic_base()),
        key_header: ("x-api-key", "bench-key".into()),
    };
    let gateway = Target {
        url: format!("{base}/p/an/v1/messages"),
        key_header: ("x-api-key", k.key.clone()),
    };
    let http = reqwest::Client::new();
    let long = "x".repeat(STREAM_TEXT_CHARS);
    let mut fails = 0usize;
    // Warm-up: connections, caches, the daemon's first token.
    for _ in 0..200 {
        for t in [&direct, &gateway] {
            fails += usize::from(once(&http, t, false).await.is_err());
        }
    }
    let (mut dl, mut gl) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        for (t, v) in [(&direct, &mut dl), (&gateway, &mut gl)] {
            match once(&http, t, false).await {
                Ok((_, total, _, _)) => v.push(us(total)),
                Err(_) => fails += 1,
            }
        }
    }
    let streams = (n / 4).max(50);
    let (mut dfirst, mut gfirst, mut dper, mut gper) = (vec![], vec![], vec![], vec![]);
    let mut events_seen = 0;
    for _ in 0..streams {
        for (t, first, per) in [
            (&direct, &mut dfirst, &mut dper),
            (&gateway, &mut gfirst, &mut gper),
        ] {
            fake.reply(Reply::text(&long));
            match once(&http, t, true).await {
                Ok((f, _, events, gaps)) if events > 1 => {
                    first.push(us(f));
                    per.extend(gaps);
                    events_seen = events;
                }
                _ => fails += 1,
            }
        }
        // The fake keeps every request; forget them so memory stays flat.
        fake.reset();
    }
    let row = |name: &str, d: &mut Vec<f64>, g: &mut Vec<f64>, p: f64| {
        let (a, b) = (pct(d, p), pct(g, p));
        println!("| {name} | {a:.0} µs | {b:.0} µs | {:+.0} µs |", b - a);
    };
    println!("{n} non-streaming requests and {streams} streams ({events_seen} events each) per path, interleaved; {fails} failures");
    println!();
    println!("| measure | direct | gateway | overhead |");
    println!("|---|---|---|---|");
    row("non-streaming p50", &mut dl.clone(), &mut gl.clone(), 0.5);
    row("non-streaming p99", &mut dl, &mut gl, 0.99);
    row(
        "time to first event p50",
        &mut dfirst.clone(),
        &mut gfirst.clone(),
        0.5,
    );
    row("time to first event p99", &mut dfirst, &mut gfirst, 0.99);
    for (name, p) in [("per event p50", 0.5), ("per event p99", 0.99)] {
        let (a, b) = (pct(&mut dper, p), pct(&mut gper, p));
        println!("| {name} | {a:.1} µs | {b:.1} µs | {:+.1} µs |", b - a);
    }
    drop(d);
}
