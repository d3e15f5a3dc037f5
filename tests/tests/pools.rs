//! Pools: one profile name served from several members, moving on before the first byte.

use futures_util::StreamExt;
use llmd_client::{ChatEvent, Client};
use llmd_proto::chat::{ChatRequest, ChatResponse};
use llmd_proto::methods::{GatewayKeyParams, GatewayKeyResult, PoolStatus};
use llmd_tests::fake_oauth::{access_of, FakeOAuth};
use llmd_tests::fake_providers::{Failure, FakeProviders};
use llmd_tests::Daemon;
use serde_json::json;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ask(text: &str) -> ChatRequest {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": text}]})).unwrap()
}

/// An Anthropic api-key member `name` on `fake`, with key `sk-<name>`.
fn member(name: &str, fake: &FakeProviders) -> String {
    format!(
        "[profiles.{name}]\nprovider = \"anthropic\"\nauth = \"api-key\"\napi_key_env = \"KEY_{name}\"\nbase_url = \"{}\"\ndefault_model = \"claude-x\"\n\n",
        fake.anthropic_base()
    )
}

fn pool(members: &[&str], strategy: &str, extra: &str) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[profiles.team]\npool = [{}]\nstrategy = \"{strategy}\"\n{extra}\n",
        list.join(", ")
    )
}

fn start(cfg: &str, members: &[&str]) -> Daemon {
    let mut b = Daemon::builder().config(cfg);
    for m in members {
        b = b.env(&format!("KEY_{m}"), &format!("sk-ant-api03-{m}"));
    }
    b.start()
}

async fn member_of(c: &Client) -> String {
    let r: ChatResponse = c.chat("team", ask("hi")).await.expect("pool answers");
    r.member.expect("a pool names the member that answered")
}

async fn pool_status(c: &Client) -> PoolStatus {
    c.status().await.unwrap().pools.into_iter().next().unwrap()
}

fn skipped(p: &PoolStatus, name: &str) -> Option<String> {
    p.members
        .iter()
        .find(|m| m.name == name)
        .and_then(|m| m.skipped.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_moves_the_request_to_the_next_member() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    fa.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 600,
        },
    );
    assert_eq!(member_of(&c).await, "b");
    assert_eq!(fa.request_count(), 1, "a was asked once, not retried");
    assert_eq!(fb.request_count(), 1);
    // `a` is paused: the next request goes straight to `b`.
    assert_eq!(member_of(&c).await, "b");
    assert_eq!(fa.request_count(), 1);
    let p = pool_status(&c).await;
    assert_eq!(skipped(&p, "a").as_deref(), Some("paused"));
    assert_eq!(skipped(&p, "b"), None);
    // `token` skips it too, and names the member.
    let t = c.token("team", None).await.unwrap();
    assert_eq!(t.member.as_deref(), Some("b"));
    assert_eq!(t.token, "sk-ant-api03-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_login_is_skipped() {
    let oauth = FakeOAuth::start(3600).await;
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = format!(
        "[profiles.a]\nprovider = \"anthropic\"\nauth = \"oauth\"\ntoken_endpoint = \"{}\"\nbase_url = \"{}\"\ndefault_model = \"m\"\n\n",
        oauth.anthropic_url(),
        fa.anthropic_base()
    ) + &member("b", &fb)
        + &pool(&["a", "b"], "fill-first", "");
    let bundle =
        json!({"access_token": access_of(0), "refresh_token": "spent", "expires_at": now() - 5});
    let d = Daemon::builder()
        .config(&cfg)
        .env("KEY_b", "sk-ant-api03-b")
        .file("state/llmd/oauth/a.json", &bundle.to_string(), 0o600)
        .start();
    let c = d.client().await;
    assert_eq!(member_of(&c).await, "b");
    assert_eq!(fa.request_count(), 0, "nothing sent without a valid token");
    let t = c.token("team", None).await.unwrap();
    assert_eq!(t.member.as_deref(), Some("b"));
    assert_eq!(
        skipped(&pool_status(&c).await, "a").as_deref(),
        Some("needs_login")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_over_the_highest_threshold_is_skipped() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    let reset = (now() + 3600).to_string();
    fa.set_headers(&[
        ("anthropic-ratelimit-unified-5h-utilization", "0.97"),
        ("anthropic-ratelimit-unified-5h-reset", &reset),
    ]);
    assert_eq!(
        member_of(&c).await,
        "a",
        "fill-first uses a until it reports"
    );
    assert_eq!(member_of(&c).await, "b", "a is at 97%, over warn_at's 95%");
    assert_eq!(fa.request_count(), 1);
    assert_eq!(
        skipped(&pool_status(&c).await, "a").as_deref(),
        Some("over_quota")
    );
}

async fn stream(c: &Client) -> Result<ChatResponse, String> {
    let mut s = c.chat_stream("team", ask("hi")).await.unwrap();
    let mut deltas = 0;
    while let Some(ev) = s.next().await {
        match ev {
            Ok(ChatEvent::Delta(_)) => deltas += 1,
            Ok(ChatEvent::Done(r)) => return Ok(r),
            Err(e) => return Err(format!("{e} after {deltas} deltas")),
        }
    }
    Err("stream ended".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moves_on_only_before_its_first_byte() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    // Before the first byte: a 429 moves the stream to b.
    fa.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 1,
        },
    );
    let r = stream(&c).await.unwrap();
    assert_eq!(r.member.as_deref(), Some("b"));
    // After the first byte: the failure is the client's, and b is never asked.
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    fa.fail_next(1, Failure::StreamError);
    let e = stream(&c).await.unwrap_err();
    assert!(!e.contains("0 deltas"), "{e}");
    assert_eq!(fb.request_count(), 0, "nothing moves after the first byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_fill_first_pick_as_documented() {
    let fake = FakeProviders::start().await;
    let cfg = member("a", &fake)
        + &member("b", &fake)
        + &member("c", &fake)
        + &pool(&["a", "b", "c"], "round-robin", "");
    let d = start(&cfg, &["a", "b", "c"]);
    let c = d.client().await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(member_of(&c).await);
    }
    assert_eq!(seen, ["a", "b", "c", "a"]);
    let cfg = member("a", &fake) + &member("b", &fake) + &pool(&["b", "a"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    for _ in 0..3 {
        assert_eq!(member_of(&c).await, "b", "the pool's order, not the names'");
    }
    assert_eq!(pool_status(&c).await.members[0].served, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_used_picks_the_member_with_the_lowest_quota_use() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "least-used", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    let use_of = |f: &FakeProviders, u: &str| {
        let reset = (now() + 3600).to_string();
        f.set_headers(&[
            ("anthropic-ratelimit-unified-5h-utilization", u),
            ("anthropic-ratelimit-unified-5h-reset", &reset),
        ]);
    };
    use_of(&fa, "0.6");
    use_of(&fb, "0.3");
    // Each member reports once, asked directly.
    c.chat("a", ask("hi")).await.unwrap();
    c.chat("b", ask("hi")).await.unwrap();
    assert_eq!(member_of(&c).await, "b");
    use_of(&fb, "0.7");
    assert_eq!(member_of(&c).await, "b", "this answer reports b at 70%");
    assert_eq!(member_of(&c).await, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_agent_keeps_its_member() {
    let fake = FakeProviders::start().await;
    let cfg = member("a", &fake)
        + &member("b", &fake)
        + &member("c", &fake)
        + &pool(&["a", "b", "c"], "round-robin", "sticky_secs = 3600");
    let d = start(&cfg, &["a", "b", "c"]);
    let x = d.client().await;
    x.hello("agent-x", "1").await.unwrap();
    let y = d.client().await;
    y.hello("agent-y", "1").await.unwrap();
    let first = member_of(&x).await;
    let other = member_of(&y).await;
    assert_ne!(first, other, "round-robin still spreads new agents");
    for _ in 0..3 {
        assert_eq!(member_of(&x).await, first);
        assert_eq!(member_of(&y).await, other);
    }
    // An agent that never said `hello` is not stuck.
    let anon = d.client().await;
    let picks: std::collections::BTreeSet<String> = [
        member_of(&anon).await,
        member_of(&anon).await,
        member_of(&anon).await,
    ]
    .into();
    assert_eq!(picks.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_pool_and_moves_on_after_a_429() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = "[gateway]\nlisten = \"127.0.0.1:0\"\n\n".to_string()
        + &member("a", &fa)
        + &member("b", &fb)
        + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    let k: GatewayKeyResult = c
        .call("gateway.key", &GatewayKeyParams::default())
        .await
        .unwrap();
    fa.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 600,
        },
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/p/team/v1/messages", k.base_url.unwrap()))
        .header("x-api-key", &k.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(fa.request_count(), 1);
    assert_eq!(fb.request_count(), 1);
    assert_eq!(
        fb.last_request().header("x-api-key"),
        Some("sk-ant-api03-b")
    );
}

#[test]
fn a_pool_mixing_providers_is_refused_at_config_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.toml");
    std::fs::write(
        &path,
        "[profiles.a]\nprovider = \"anthropic\"\nauth = \"api-key\"\n\n[profiles.o]\nprovider = \"openai-compat\"\nauth = \"api-key\"\n\n[profiles.team]\npool = [\"a\", \"o\"]\n",
    )
    .unwrap();
    let o = std::process::Command::new(llmd_tests::daemon::bin_path("llmd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env("ANTHROPIC_API_KEY", "x")
        .env("OPENAI_API_KEY", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("profiles.team.pool") && err.contains("pool `team` mixes providers"),
        "{err}"
    );
}

/// The ledger records which member answered: chats on the first member, then moved from
/// it once it is rate-limited, grouped `by member`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_records_the_member_that_answered() {
    let (fa, fb) = (FakeProviders::start().await, FakeProviders::start().await);
    let cfg = member("a", &fa) + &member("b", &fb) + &pool(&["a", "b"], "fill-first", "");
    let d = start(&cfg, &["a", "b"]);
    let c = d.client().await;
    assert_eq!(member_of(&c).await, "a");
    fa.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 600,
        },
    );
    assert_eq!(member_of(&c).await, "b");
    assert_eq!(member_of(&c).await, "b");
    let u = c
        .usage(None, llmd_proto::methods::UsageBy::Member)
        .await
        .expect("usage");
    let mut rows: Vec<(String, u64)> = u
        .rows
        .iter()
        .map(|r| (r.key.clone(), r.totals.requests))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [("team/a".to_string(), 1), ("team/b".to_string(), 2)],
        "{u:?}"
    );
}
