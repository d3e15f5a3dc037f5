//! Load benchmark of the token hot path: starts the real `llmd` in a temporary home and
//! hammers `token` from many concurrent clients over the real socket.
//!
//! `cargo build --release --workspace --bins && target/release/llmd-bench [clients] [secs]`
//! (the daemon logs at `LLMD_LOG`, default `info` as in production).

use llmd_tests::Daemon;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let d = Daemon::builder()
        .config("[profiles.k]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"BENCH_KEY\"\n")
        .env("BENCH_KEY", "sk-ant-api03-bench")
        .env("LLMD_LOG", &std::env::var("LLMD_LOG").unwrap_or_else(|_| "info".into()))
        .start();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = c.token("k", None).await;
                lat.push(t.elapsed());
                if r.is_err() {
                    eprintln!("error: {r:?}");
                    break;
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort();
    let n = all.len();
    let pct = |p: f64| all[((n - 1) as f64 * p) as usize];
    println!(
        "{clients} clients, {secs}s: {n} token calls, {:.0}/s, latency p50 {:?} p99 {:?} max {:?}",
        n as f64 / secs as f64,
        pct(0.5),
        pct(0.99),
        all[n - 1]
    );
}
