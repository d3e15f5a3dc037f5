//! The usage ledger end to end: the real llmd binary, its SQLite file in the state folder,
//! and the fake providers. Rows must carry the right agent and token counts, survive a
//! restart (SIGTERM drains the queue), lose nothing in a burst, and expire.

use futures_util::StreamExt;
use llmd_client::ChatEvent;
use llmd_proto::chat::{ChatRequest, EmbedParams, EmbedResult};
use llmd_proto::methods::{GatewayKeyParams, GatewayKeyResult, UsageBy, UsageResult, UsageRow};
use llmd_tests::fake_providers::{FakeProviders, INPUT_TOKENS, OUTPUT_TOKENS};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

fn ask(text: &str) -> ChatRequest {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": text}]})).unwrap()
}

fn config(fake: &FakeProviders, extra: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"

[profiles.an]
provider = "anthropic"
auth = "api-key"
api_key_env = "TEST_KEY"
base_url = "{a}"
default_model = "claude-x"

[profiles.oa]
provider = "openai-compat"
auth = "api-key"
api_key_env = "TEST_KEY"
base_url = "{o}"
default_model = "gpt-x"
{extra}
"#,
        a = fake.anthropic_base(),
        o = fake.openai_base(),
    )
}

fn start(fake: &FakeProviders, extra: &str) -> Daemon {
    Daemon::builder()
        .config(&config(fake, extra))
        .env("TEST_KEY", "test-key")
        .start()
}

fn ledger_path(d: &Daemon) -> PathBuf {
    d.home.join("state/llmd/usage.sqlite")
}

async fn usage(d: &Daemon, since: &str, by: UsageBy) -> UsageResult {
    d.client()
        .await
        .usage(Some(since), by)
        .await
        .expect("usage")
}

fn row<'a>(r: &'a UsageResult, key: &str) -> &'a UsageRow {
    r.rows
        .iter()
        .find(|row| row.key == key)
        .unwrap_or_else(|| panic!("no row `{key}` in {:?}", r.rows))
}

/// A gateway client with the named key of `agent`.
async fn gateway(d: &Daemon, agent: &str) -> (String, String) {
    let k: GatewayKeyResult = d
        .client()
        .await
        .call(
            "gateway.key",
            &GatewayKeyParams {
                agent: Some(agent.into()),
            },
        )
        .await
        .expect("gateway.key");
    (k.base_url.expect("TCP gateway"), k.key)
}

async fn post(base: &str, key: &str, rest: &str, body: &Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/p/an/{rest}"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    assert!(r.status().is_success(), "{}", r.status());
    r.text().await.expect("whole body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_embed_and_gateway_land_with_agent_and_tokens_and_survive_a_restart() {
    let fake = FakeProviders::start().await;
    let mut d = start(&fake, "");
    {
        let c = d.client().await;
        c.hello("agent-a", "1.0").await.unwrap();
        c.chat("an", ask("hi")).await.expect("chat");
        let mut s = c.chat_stream("an", ask("hi")).await.expect("stream");
        let mut done = false;
        while let Some(ev) = s.next().await {
            done |= matches!(ev.expect("delta"), ChatEvent::Done(_));
        }
        assert!(done);
        let e: EmbedResult = c
            .call(
                "embed",
                &EmbedParams {
                    profile: "oa".into(),
                    model: None,
                    input: vec!["one two".into(), "three four five".into()],
                },
            )
            .await
            .expect("embed");
        assert_eq!(e.usage.input_tokens, 5);
    }
    let (base, key) = gateway(&d, "bot").await;
    let body = |stream| {
        json!({"model": "claude-x", "max_tokens": 100, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    // Passed through as JSON and as SSE, and translated from OpenAI's shape.
    post(&base, &key, "v1/messages", &body(false)).await;
    let sse = post(&base, &key, "v1/messages", &body(true)).await;
    assert!(sse.contains("message_stop"), "{sse}");
    post(&base, &key, "v1/chat/completions", &body(false)).await;

    // No `usage` call before the stop: only SIGTERM's drain can have written the rows.
    d.restart();
    let r = usage(&d, "1h", UsageBy::Agent).await;
    let a = row(&r, "agent-a");
    assert_eq!(a.totals.requests, 3, "{r:?}");
    assert_eq!(a.totals.input_tokens, 2 * INPUT_TOKENS + 5);
    assert_eq!(a.totals.output_tokens, 2 * OUTPUT_TOKENS);
    let b = row(&r, "bot");
    assert_eq!(b.totals.requests, 3, "{r:?}");
    assert_eq!(b.totals.input_tokens, 3 * INPUT_TOKENS);
    assert_eq!(b.totals.output_tokens, 3 * OUTPUT_TOKENS);
    assert_eq!(r.totals.requests, 6);
    assert_eq!(r.totals.errors, 0);
    assert_eq!(r.dropped, 0);
    assert_eq!(r.bucket, "hour");
    assert_eq!(
        r.buckets.iter().map(|b| b.requests).sum::<u64>(),
        6,
        "{:?}",
        r.buckets
    );
    let by_profile = usage(&d, "1h", UsageBy::Profile).await;
    assert_eq!(row(&by_profile, "an").totals.requests, 5);
    assert_eq!(row(&by_profile, "oa").totals.requests, 1);
    let by_model = usage(&d, "1h", UsageBy::Model).await;
    assert_eq!(
        row(&by_model, "claude-x").totals.requests,
        5,
        "{by_model:?}"
    );
    let mode = std::fs::metadata(ledger_path(&d))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_requests_loses_no_row() {
    let fake = FakeProviders::start().await;
    let d = start(&fake, "");
    let mut tasks = Vec::new();
    for conn in 0..10 {
        let c = d.client().await;
        c.hello(&format!("burst-{conn}"), "1").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let calls = (0..100).map(|_| c.chat("oa", ask("hi")));
            for r in futures_util::future::join_all(calls).await {
                r.expect("chat");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = usage(&d, "1h", UsageBy::Agent).await;
    assert_eq!(r.totals.requests, 1000, "{r:?}");
    assert_eq!(r.dropped, 0);
    assert_eq!(r.rows.len(), 10);
    assert!(r.rows.iter().all(|row| row.totals.requests == 100), "{r:?}");
    assert_eq!(r.totals.input_tokens, 1000 * INPUT_TOKENS);
}

async fn burst(d: &Daemon, agent: &str, n: usize) {
    let c = d.client().await;
    c.hello(agent, "1").await.unwrap();
    for _ in 0..n {
        c.token("an", None).await.expect("token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_calls_are_counted_per_profile_and_agent_not_recorded() {
    let fake = FakeProviders::start().await;
    let mut d = start(&fake, "");
    burst(&d, "tok-a", 20).await;
    burst(&d, "tok-b", 5).await;
    // The counters are in memory: the stop must write them.
    d.restart();
    burst(&d, "tok-a", 30).await;
    let r = usage(&d, "1h", UsageBy::Agent).await;
    assert_eq!(r.totals.requests, 0, "token calls are no rows: {r:?}");
    let calls: Vec<_> = r
        .token_calls
        .iter()
        .map(|c| (c.profile.as_str(), c.agent.as_str(), c.calls))
        .collect();
    assert_eq!(calls, [("an", "tok-a", 50), ("an", "tok-b", 5)]);
    let conn = rusqlite::Connection::open(ledger_path(&d)).unwrap();
    let counter_rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM token_calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(counter_rows, 2, "one row per profile, agent and day");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_older_than_keep_days_are_deleted_at_start() {
    let fake = FakeProviders::start().await;
    let mut d = start(&fake, "\n[usage]\nkeep_days = 30\n");
    d.client().await.chat("an", ask("hi")).await.unwrap();
    d.stop();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    {
        let conn = rusqlite::Connection::open(ledger_path(&d)).unwrap();
        for (days, profile) in [(40, "old"), (10, "recent")] {
            conn.execute(
                "INSERT INTO requests (at_ms, profile, method, input_tokens, output_tokens, \
                 cache_read_tokens, cache_write_tokens, status, latency_ms) \
                 VALUES (?1, ?2, 'chat', 1, 1, 0, 0, 'ok', 1)",
                rusqlite::params![now_ms - days * 86_400_000, profile],
            )
            .unwrap();
        }
    }
    d.restart();
    let r = usage(&d, "2000-01-01", UsageBy::Profile).await;
    let keys: Vec<_> = r.rows.iter().map(|r| r.key.as_str()).collect();
    assert!(keys.contains(&"recent") && keys.contains(&"an"), "{keys:?}");
    assert!(
        !keys.contains(&"old"),
        "the 40-day-old row is gone: {keys:?}"
    );
    assert_eq!(r.bucket, "day");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_ledger_records_nothing() {
    let fake = FakeProviders::start().await;
    let d = start(&fake, "\n[usage]\nenabled = false\n");
    let c = d.client().await;
    c.chat("an", ask("hi")).await.unwrap();
    c.token("an", None).await.unwrap();
    let r = usage(&d, "1h", UsageBy::Profile).await;
    assert!(!r.enabled);
    assert_eq!(r.totals.requests, 0);
    assert!(r.token_calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmctl_usage_prints_a_table_with_a_chart_json_and_csv() {
    let fake = FakeProviders::start().await;
    let d = start(&fake, "");
    let c = d.client().await;
    c.hello("writer", "2").await.unwrap();
    for _ in 0..3 {
        c.chat("an", ask("hi")).await.unwrap();
    }
    let out = d.llmctl(&["usage", "--by", "agent"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("AGENT"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("writer "))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<_> = line.split_whitespace().collect();
    assert_eq!(cols[1], "3", "{line}");
    assert_eq!(cols[3], (3 * INPUT_TOKENS).to_string(), "{line}");
    assert!(table.lines().any(|l| l.starts_with("TOTAL")), "{table}");
    assert!(table.contains("Tokens per hour"), "{table}");
    assert!(table.contains('█'), "a bar: {table}");

    let out = d.llmctl(&["usage", "--since", "7d", "--by", "agent", "--csv"]);
    assert!(out.status.success(), "{out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "agent,requests,errors,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens"
        )
    );
    assert_eq!(
        lines.next(),
        Some(format!("writer,3,0,{},{},0,0", 3 * INPUT_TOKENS, 3 * OUTPUT_TOKENS).as_str())
    );
    assert_eq!(lines.next(), None);

    let out = d.llmctl(&["usage", "--since", "7d", "--by", "day", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: UsageResult = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v.by, UsageBy::Day);
    assert_eq!(v.bucket, "day");
    assert_eq!(v.rows.len(), 1);
    assert_eq!(v.totals.requests, 3);

    let out = d.llmctl(&["usage", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`since`"), "{err}");
}
