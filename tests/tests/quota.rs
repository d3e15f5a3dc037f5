//! Quotas: provider rate-limit state in `status` and `llmctl status`, and `profile.quota`
//! events at the `[usage] warn_at` thresholds.

use llmd_proto::chat::ChatRequest;
use llmd_tests::fake_providers::{Failure, FakeProviders};
use llmd_tests::Daemon;
use serde_json::json;
use std::time::Duration;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ask(text: &str) -> ChatRequest {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": text}]})).unwrap()
}

fn anthropic(fake: &FakeProviders, extra: &str) -> String {
    format!(
        "{extra}\n[profiles.work]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"claude-x\"\n",
        fake.anthropic_base()
    )
}

fn unified(fake: &FakeProviders, five_hour: &str, reset_in: i64) {
    let reset = (now() + reset_in).to_string();
    let week = (now() + 5 * 86_400).to_string();
    fake.set_headers(&[
        ("anthropic-ratelimit-unified-status", "allowed"),
        ("anthropic-ratelimit-unified-5h-utilization", five_hour),
        ("anthropic-ratelimit-unified-5h-reset", &reset),
        ("anthropic-ratelimit-unified-5h-status", "allowed"),
        ("anthropic-ratelimit-unified-7d-utilization", "0.18"),
        ("anthropic-ratelimit-unified-7d-reset", &week),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unified_headers_show_in_status_and_llmctl_status() {
    let fake = FakeProviders::start().await;
    let d = Daemon::builder()
        .config(&anthropic(&fake, ""))
        .env("K", "sk-ant-api03-k")
        .start();
    let c = d.client().await;
    let before = c.status().await.unwrap();
    assert!(before.profiles[0].quota.is_none(), "nothing reported yet");
    unified(&fake, "0.42", 4230);
    c.chat("work", ask("hi")).await.unwrap();
    let s = c.status().await.unwrap();
    let q = s.profiles[0].quota.as_ref().expect("quota after an answer");
    assert_eq!(q.status.as_deref(), Some("allowed"));
    let names: Vec<&str> = q.windows.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["5h", "7d"]);
    assert!((q.windows[0].utilization - 0.42).abs() < 1e-9);
    assert!(q.windows[0].resets_at.unwrap() > now());
    let out = d.llmctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("quota work: 5h 42%, resets in 1h10m; 7d 18%"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_events_fire_once_per_threshold_crossing() {
    let fake = FakeProviders::start().await;
    let d = Daemon::builder()
        .config(&anthropic(&fake, ""))
        .env("K", "sk-ant-api03-k")
        .start();
    let c = d.client().await;
    let mut events = d
        .client()
        .await
        .subscribe(&["profile.quota"])
        .await
        .unwrap();
    for level in ["0.5", "0.85", "0.9", "0.85", "0.97", "0.99"] {
        unified(&fake, level, 3600);
        c.chat("work", ask("hi")).await.unwrap();
    }
    // A last crossing marks the end: every event before it is in the list.
    fake.set_headers(&[("anthropic-ratelimit-unified-7d-utilization", "0.81")]);
    c.chat("work", ask("hi")).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("subscription open");
        assert_eq!(e.kind, "profile.quota");
        assert_eq!(e.profile, "work");
        let q = e.quota.expect("quota crossing");
        seen.push((q.window.clone(), q.threshold));
        if q.window == "7d" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            ("5h".to_string(), 0.8),
            ("5h".to_string(), 0.95),
            ("7d".to_string(), 0.8)
        ],
        "0.8 and 0.95 once each, however often the level stays above"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_at_comes_from_the_config() {
    let fake = FakeProviders::start().await;
    let d = Daemon::builder()
        .config(&anthropic(&fake, "[usage]\nwarn_at = [0.3]\n"))
        .env("K", "sk-ant-api03-k")
        .start();
    let c = d.client().await;
    let mut events = d
        .client()
        .await
        .subscribe(&["profile.quota"])
        .await
        .unwrap();
    unified(&fake, "0.35", 3600);
    c.chat("work", ask("hi")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    let q = e.quota.unwrap();
    assert_eq!((q.window.as_str(), q.threshold), ("5h", 0.3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_limits_and_gemini_quota_errors_show_in_status() {
    let fake = FakeProviders::start().await;
    let cfg = format!(
        "[profiles.oa]\nprovider = \"openai-compat\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"gpt\"\n\n[profiles.g]\nprovider = \"gemini\"\nauth = \"api-key\"\napi_key_env = \"K\"\nbase_url = \"{}\"\ndefault_model = \"gemini-x\"\n",
        fake.openai_base(),
        fake.gemini_base()
    );
    let d = Daemon::builder().config(&cfg).env("K", "k").start();
    let c = d.client().await;
    fake.set_headers(&[
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "25"),
        ("x-ratelimit-reset-requests", "30s"),
    ]);
    c.chat("oa", ask("hi")).await.unwrap();
    fake.set_headers(&[]);
    fake.fail_next(1, Failure::GeminiQuota);
    // The 429 is retried after its `retry-after`; the quota it named stays known.
    c.chat("g", ask("hi")).await.unwrap();
    let s = c.status().await.unwrap();
    let quota = |name: &str| {
        s.profiles
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.quota.clone())
            .unwrap_or_else(|| panic!("quota of {name}"))
    };
    let oa = quota("oa");
    assert_eq!(oa.windows[0].name, "requests");
    assert!((oa.windows[0].utilization - 0.75).abs() < 1e-9);
    assert_eq!(oa.windows[0].remaining, Some(25));
    let g = quota("g");
    assert_eq!(
        g.windows[0].name,
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    );
    assert_eq!(g.windows[0].utilization, 1.0);
}
