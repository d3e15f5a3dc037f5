//! Chat and embeddings through the real daemon against the fake providers: every wire
//! format, tool-call round trips, streaming order and timing, schema validation and
//! Gemini's schema subset, retries, cancellation.

use llmd_client::ChatEvent;
use llmd_client::Client;
use llmd_proto::chat::{
    Block, ChatRequest, ChatResponse, Delta, EmbedParams, EmbedResult, StopReason,
};
use llmd_proto::ErrorKind;
use llmd_tests::fake_providers::{
    fake_embedding, Failure, FakeProviders, Reply, Wire, INPUT_TOKENS, OUTPUT_TOKENS, USE_TOOL,
    USE_TOOL_BADLY,
};
use llmd_tests::Daemon;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const ANT_KEY: &str = "sk-ant-api03-e2e-key";
const OAI_KEY: &str = "sk-openai-e2e-key";
const GEM_KEY: &str = "AIza-gemini-e2e-key";
const MM_KEY: &str = "mm-e2e-key";

/// Profile name, wire format the fake should see, and the model it should be asked for.
const PROFILES: [(&str, Wire, &str); 5] = [
    ("ant", Wire::Anthropic, "claude-e2e"),
    ("oai", Wire::OpenAi, "gpt-e2e"),
    ("gem", Wire::Gemini, "gemini-e2e"),
    ("mm", Wire::Minimax, "MiniMax-e2e"),
    ("mma", Wire::MinimaxAnthropic, "MiniMax-e2e"),
];

fn config(fake: &FakeProviders) -> String {
    format!(
        r#"
[profiles.ant]
provider = "anthropic"
auth = "api-key"
api_key_env = "E2E_ANT_KEY"
base_url = "{ant}"
default_model = "claude-e2e"

[profiles.oai]
provider = "openai-compat"
auth = "api-key"
api_key_env = "E2E_OAI_KEY"
base_url = "{oai}"
default_model = "gpt-e2e"

[profiles.gem]
provider = "gemini"
auth = "api-key"
api_key_env = "E2E_GEM_KEY"
base_url = "{gem}"
default_model = "gemini-e2e"

[profiles.mm]
provider = "minimax"
auth = "api-key"
api_key_env = "E2E_MM_KEY"
base_url = "{mm}"
default_model = "MiniMax-e2e"
group_id = "grp-e2e"

[profiles.mma]
provider = "minimax"
auth = "api-key"
api_key_env = "E2E_MM_KEY"
base_url = "{mma}"
default_model = "MiniMax-e2e"
"#,
        ant = fake.anthropic_base(),
        oai = fake.openai_base(),
        gem = fake.gemini_base(),
        mm = fake.minimax_base(),
        mma = fake.minimax_anthropic_base(),
    )
}

async fn setup() -> (FakeProviders, Daemon, Client) {
    let fake = FakeProviders::start().await;
    let d = Daemon::builder()
        .config(&config(&fake))
        .env("E2E_ANT_KEY", ANT_KEY)
        .env("E2E_OAI_KEY", OAI_KEY)
        .env("E2E_GEM_KEY", GEM_KEY)
        .env("E2E_MM_KEY", MM_KEY)
        .start();
    let c = d.client().await;
    (fake, d, c)
}

fn weather_tool() -> Value {
    json!({
        "name": "get_weather",
        "description": "Current weather of a city",
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
            "additionalProperties": false
        }
    })
}

fn request(v: Value) -> ChatRequest {
    serde_json::from_value(v).expect("valid chat request")
}

fn ask(text: &str) -> ChatRequest {
    request(json!({"messages": [{"role": "user", "content": text}], "tools": [weather_tool()]}))
}

fn text_of(r: &ChatResponse) -> String {
    r.content
        .iter()
        .filter_map(|b| match b {
            Block::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn tool_uses(r: &ChatResponse) -> Vec<(String, String, Value, Option<Vec<String>>)> {
    r.content
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse {
                id,
                name,
                input,
                validation_errors,
            } => Some((
                id.clone(),
                name.clone(),
                input.clone(),
                validation_errors.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// Where each wire format puts the model, and which auth header it needs.
fn check_request_basics(
    profile: &str,
    wire: Wire,
    model: &str,
    rec: &llmd_tests::fake_providers::Recorded,
) {
    assert_eq!(rec.wire, wire, "{profile}: wire");
    match wire {
        Wire::Anthropic => {
            assert_eq!(rec.path, "/v1/messages");
            assert_eq!(rec.header("x-api-key"), Some(ANT_KEY));
            assert_eq!(rec.header("anthropic-version"), Some("2023-06-01"));
        }
        Wire::OpenAi => {
            assert_eq!(rec.path, "/v1/chat/completions");
            assert_eq!(
                rec.header("authorization"),
                Some(format!("Bearer {OAI_KEY}").as_str())
            );
        }
        Wire::Gemini => {
            assert!(
                rec.path.starts_with(&format!("/v1beta/models/{model}:")),
                "{profile}: {}",
                rec.path
            );
            assert_eq!(rec.header("x-goog-api-key"), Some(GEM_KEY));
            assert_eq!(rec.header("authorization"), None);
        }
        Wire::Minimax => {
            assert_eq!(rec.path, "/v1/text/chatcompletion_v2");
            assert_eq!(
                rec.header("authorization"),
                Some(format!("Bearer {MM_KEY}").as_str())
            );
            assert_eq!(rec.header("x-minimax-group-id"), Some("grp-e2e"));
        }
        Wire::MinimaxAnthropic => {
            assert_eq!(rec.path, "/anthropic/v1/messages");
            assert_eq!(
                rec.header("authorization"),
                Some(format!("Bearer {MM_KEY}").as_str())
            );
        }
        Wire::Unknown => unreachable!(),
    }
    if wire != Wire::Gemini {
        assert_eq!(rec.body["model"], model, "{profile}: model");
    }
    let ua = rec.header("user-agent").unwrap_or_default();
    assert!(ua.starts_with("llmd/"), "{profile}: user-agent {ua}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wire_format_answers_text() {
    let (fake, _d, c) = setup().await;
    for (profile, wire, model) in PROFILES {
        let r = c
            .chat(
                profile,
                request(
                    json!({"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}),
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert_eq!(
            text_of(&r),
            format!("Hello from {}", wire.name()),
            "{profile}"
        );
        assert_eq!(r.stop_reason, StopReason::EndTurn, "{profile}");
        assert_eq!(
            (r.usage.input_tokens, r.usage.output_tokens),
            (INPUT_TOKENS, OUTPUT_TOKENS),
            "{profile}"
        );
        let rec = fake.last_request();
        check_request_basics(profile, wire, model, &rec);
        assert!(!rec.stream, "{profile}");
        assert_eq!(rec.last_turn_text(), "hi");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_on_every_wire_format() {
    let (fake, _d, c) = setup().await;
    for (profile, wire, model) in PROFILES {
        let first = c
            .chat(
                profile,
                ask(&format!("Weather in Paris? Please {USE_TOOL}.")),
            )
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert_eq!(first.stop_reason, StopReason::ToolUse, "{profile}");
        let calls = tool_uses(&first);
        assert_eq!(calls.len(), 1, "{profile}: {:?}", first.content);
        let (id, name, input, errors) = calls[0].clone();
        assert_eq!(
            (name.as_str(), &input, &errors),
            ("get_weather", &json!({"city": "Paris"}), &None),
            "{profile}"
        );
        let rec = fake.last_request();
        check_request_basics(profile, wire, model, &rec);
        assert_eq!(rec.tool_names(), ["get_weather"], "{profile}");

        let second = c
            .chat(
                profile,
                request(json!({
                    "messages": [
                        {"role": "user", "content": format!("Weather in Paris? Please {USE_TOOL}.")},
                        {"role": "assistant", "content": first.content},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "18C and sunny"}]}
                    ],
                    "tools": [weather_tool()]
                })),
            )
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert_eq!(
            text_of(&second),
            "The tool said: 18C and sunny",
            "{profile}"
        );
        assert_eq!(second.stop_reason, StopReason::EndTurn);
        // The result went out in the wire format's own shape, tied to its call.
        let body = fake.last_request().body;
        match wire {
            Wire::OpenAi | Wire::Minimax => {
                let msgs = body["messages"].as_array().unwrap();
                let call = &msgs[msgs.len() - 2];
                assert_eq!(call["tool_calls"][0]["id"], id.as_str(), "{profile}");
                assert_eq!(
                    call["tool_calls"][0]["function"]["arguments"],
                    r#"{"city":"Paris"}"#
                );
                assert_eq!(
                    msgs[msgs.len() - 1],
                    json!({"role": "tool", "tool_call_id": id, "content": "18C and sunny"}),
                    "{profile}"
                );
            }
            Wire::Gemini => {
                let contents = body["contents"].as_array().unwrap();
                assert_eq!(
                    contents[1]["parts"][0]["functionCall"],
                    json!({"name": "get_weather", "args": {"city": "Paris"}})
                );
                assert_eq!(
                    contents[2],
                    json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "18C and sunny"}}}]})
                );
            }
            Wire::Anthropic | Wire::MinimaxAnthropic => {
                assert_eq!(body["messages"][1]["content"][0]["id"], id.as_str());
                assert_eq!(
                    body["messages"][2]["content"][0]["tool_use_id"],
                    id.as_str()
                );
            }
            Wire::Unknown => unreachable!(),
        }
    }
}

struct Streamed {
    /// Deltas with their arrival time.
    deltas: Vec<(Instant, Delta)>,
    done: Option<(Instant, ChatResponse)>,
    error: Option<llmd_client::Error>,
}

async fn stream_all(c: &Client, profile: &str, req: ChatRequest) -> Streamed {
    let mut s = c.chat_stream(profile, req).await.expect("stream starts");
    let mut out = Streamed {
        deltas: Vec::new(),
        done: None,
        error: None,
    };
    while let Some(ev) = s.next_event().await {
        match ev {
            Ok(ChatEvent::Delta(d)) => out.deltas.push((Instant::now(), d)),
            Ok(ChatEvent::Done(r)) => out.done = Some((Instant::now(), r)),
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_arrive_in_order_while_the_provider_is_still_talking() {
    let (fake, _d, c) = setup().await;
    let gap = Duration::from_millis(40);
    fake.set_event_delay(gap);
    for (profile, wire, _) in PROFILES {
        fake.reply(
            Reply::text("Let me look that up for you.")
                .with_tool_call(None, json!({"city": "Paris", "days": [1, 2, 3]})),
        );
        let started = Instant::now();
        let s = stream_all(&c, profile, ask("weather?")).await;
        assert!(s.error.is_none(), "{profile}: {:?}", s.error);
        let (done_at, r) = s.done.expect("final answer");
        assert!(fake.last_request().stream, "{profile}");
        assert_eq!(text_of(&r), "Let me look that up for you.", "{profile}");
        let calls = tool_uses(&r);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].2, json!({"city": "Paris", "days": [1, 2, 3]}));

        // Order: text, then the tool call's start, its input fragments and its stop; every
        // index matching the final content.
        let deltas: Vec<&Delta> = s.deltas.iter().map(|(_, d)| d).collect();
        let pos = |want: &dyn Fn(&Delta) -> bool| {
            deltas.iter().position(|d| want(d)).unwrap_or(usize::MAX)
        };
        let tool_index = r
            .content
            .iter()
            .position(|b| matches!(b, Block::ToolUse { .. }))
            .unwrap();
        let first_text = pos(&|d| matches!(d, Delta::Text { .. }));
        let start =
            pos(&|d| matches!(d, Delta::ToolUseStart { index, .. } if *index == tool_index));
        let first_input =
            pos(&|d| matches!(d, Delta::ToolInput { index, .. } if *index == tool_index));
        let stop = pos(&|d| matches!(d, Delta::BlockStop { index } if *index == tool_index));
        assert!(
            first_text < start && start < first_input && first_input < stop && stop < deltas.len(),
            "{profile}: {deltas:?}"
        );
        let args: String = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::ToolInput {
                    index,
                    partial_json,
                } if *index == tool_index => Some(partial_json.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            calls[0].2,
            "{profile}"
        );
        let fragments = deltas
            .iter()
            .filter(|d| matches!(d, Delta::ToolInput { .. }))
            .count();
        if wire == Wire::Gemini {
            // Gemini sends a call whole.
            assert_eq!(fragments, 1, "{profile}");
        } else {
            assert!(
                fragments > 3,
                "{profile}: arguments should arrive in pieces, got {fragments}"
            );
        }
        let text: String = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, text_of(&r), "{profile}");
        assert!(
            s.deltas
                .iter()
                .filter(|(_, d)| matches!(d, Delta::Text { .. }))
                .count()
                > 1,
            "{profile}"
        );

        // Timing: the first text reached us long before the provider finished.
        let first_at = s.deltas[first_text].0;
        assert!(
            done_at.duration_since(first_at) >= gap * 4,
            "{profile}: first delta {:?} after start, done {:?} after start",
            first_at - started,
            done_at - started
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tool_arguments_are_reported_on_the_block() {
    let (_fake, _d, c) = setup().await;
    for (profile, _, _) in PROFILES {
        let r = c
            .chat(profile, ask(&format!("Please {USE_TOOL_BADLY}.")))
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        let calls = tool_uses(&r);
        assert_eq!(calls.len(), 1, "{profile}");
        let (_, name, input, errors) = &calls[0];
        assert_eq!(
            (name.as_str(), input),
            ("get_weather", &json!({"city": 5})),
            "{profile}"
        );
        let errors = errors.clone().unwrap_or_default();
        assert!(
            !errors.is_empty(),
            "{profile}: the bad arguments must be reported"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("city") || e.contains("string")),
            "{profile}: {errors:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_gets_the_schema_subset_it_accepts() {
    let (fake, _d, c) = setup().await;
    let tool = json!({
        "name": "book",
        "description": "Books a table",
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://example.com/book",
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "people": {"type": "integer", "minimum": 1, "maximum": 12},
                "when": {"type": "string", "format": "date-time"}
            },
            "required": ["name", "people"],
            "additionalProperties": false
        }
    });
    let req =
        request(json!({"messages": [{"role": "user", "content": "hi"}], "tools": [tool.clone()]}));
    c.chat("gem", req.clone()).await.unwrap();
    let gem = fake
        .last_request()
        .tool_schema("book")
        .expect("gemini got the tool");
    let text = gem.to_string();
    for dropped in ["$schema", "$id", "additionalProperties"] {
        assert!(
            !text.contains(dropped),
            "Gemini must not receive {dropped}: {text}"
        );
    }
    assert_eq!(
        gem["type"].as_str().map(str::to_ascii_lowercase).as_deref(),
        Some("object")
    );
    assert_eq!(
        gem["properties"]["people"]["type"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("integer")
    );
    assert_eq!(gem["required"], json!(["name", "people"]));
    // The other providers get the schema as registered.
    c.chat("oai", req).await.unwrap();
    assert_eq!(
        fake.last_request().tool_schema("book"),
        Some(tool["input_schema"].clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_minimax_errors_in_a_200_are_retried() {
    let (fake, _d, c) = setup().await;
    fake.fail_next(
        1,
        Failure::RateLimited {
            retry_after_secs: 1,
        },
    );
    let t0 = Instant::now();
    let r = c.chat("oai", ask("hi")).await.unwrap();
    assert_eq!(text_of(&r), "Hello from openai");
    assert_eq!(fake.chat_requests().len(), 2);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "retry-after was not honoured: {:?}",
        t0.elapsed()
    );

    fake.reset();
    fake.fail_next(1, Failure::MinimaxStatus(1002));
    let r = c.chat("mm", ask("hi")).await.unwrap();
    assert_eq!(text_of(&r), "Hello from minimax");
    assert_eq!(fake.chat_requests().len(), 2);

    // A bad key is not retried (API keys cannot be refreshed), and says so.
    fake.reset();
    fake.fail_next(1, Failure::MinimaxStatus(1004));
    let e = c.chat("mm", ask("hi")).await.unwrap_err();
    let rpc = e.rpc().expect("rpc error");
    assert_eq!(rpc.kind(), ErrorKind::Upstream);
    assert_eq!(rpc.data_field("status"), Some(&json!(401)));
    assert_eq!(fake.chat_requests().len(), 1);
    let msg = format!("{e} {:?}", rpc.data);
    assert!(!msg.contains(MM_KEY), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_after_its_first_delta_is_not_retried() {
    let (fake, _d, c) = setup().await;
    for failure in [Failure::StreamError, Failure::CutStream] {
        for (profile, _, _) in PROFILES {
            fake.reset();
            fake.fail_next(1, failure);
            let s = stream_all(&c, profile, ask("hi")).await;
            assert!(
                !s.deltas.is_empty(),
                "{profile} {failure:?}: some text came before the failure"
            );
            assert!(s.done.is_none(), "{profile} {failure:?}: {:?}", s.done);
            let e = s
                .error
                .unwrap_or_else(|| panic!("{profile} {failure:?}: no error"));
            assert_eq!(
                e.rpc().map(|r| r.kind()),
                Some(ErrorKind::Upstream),
                "{profile} {failure:?}: {e}"
            );
            assert_eq!(
                fake.chat_requests().len(),
                1,
                "{profile} {failure:?}: must not retry after output started"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_aborts_the_upstream_request() {
    let (fake, _d, c) = setup().await;
    fake.set_event_delay(Duration::from_millis(200));
    for (n, (profile, _, _)) in PROFILES.into_iter().enumerate() {
        fake.reply(Reply::text(&"word ".repeat(40)));
        let mut s = c.chat_stream(profile, ask("talk")).await.unwrap();
        loop {
            match s.next_event().await {
                Some(Ok(ChatEvent::Delta(Delta::Text { .. }))) => break,
                Some(Ok(_)) => continue,
                other => panic!("{profile}: {other:?}"),
            }
        }
        drop(s);
        assert!(
            fake.wait_for_aborted(n + 1, Duration::from_secs(5)).await,
            "{profile}: the daemon kept reading the provider's stream"
        );
    }
    assert_eq!(fake.completed(), 0);
    // The connection stays usable.
    fake.set_event_delay(Duration::ZERO);
    assert_eq!(
        text_of(&c.chat("oai", ask("hi")).await.unwrap()),
        "Hello from openai"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_on_every_provider_that_has_them() {
    let (fake, _d, c) = setup().await;
    let input = vec![
        "first text".to_owned(),
        "second, longer text".to_owned(),
        "ü".to_owned(),
    ];
    let want: Vec<Vec<f32>> = input.iter().map(|t| fake_embedding(t)).collect();
    let cases = [
        ("oai", "/v1/embeddings", "text-embedding-3-small"),
        (
            "gem",
            "/v1beta/models/text-embedding-004:batchEmbedContents",
            "text-embedding-004",
        ),
        ("mm", "/v1/embeddings", "embo-01"),
        ("mma", "/v1/embeddings", "embo-01"),
    ];
    for (profile, path, model) in cases {
        let r: EmbedResult = c
            .call(
                "embed",
                &EmbedParams {
                    profile: profile.into(),
                    model: None,
                    input: input.clone(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert_eq!(r.embeddings, want, "{profile}");
        let rec = fake.last_request();
        assert!(rec.embedding, "{profile}");
        assert_eq!(rec.path, path, "{profile}");
        let sent_model = match profile {
            "gem" => rec.body["requests"][0]["model"]
                .as_str()
                .map(|m| m.trim_start_matches("models/").to_owned()),
            _ => rec.body["model"].as_str().map(str::to_owned),
        };
        assert_eq!(sent_model.as_deref(), Some(model), "{profile}");
    }
    // An explicit model wins.
    let _: EmbedResult = c
        .call(
            "embed",
            &EmbedParams {
                profile: "oai".into(),
                model: Some("text-embedding-3-large".into()),
                input: vec!["x".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(fake.last_request().body["model"], "text-embedding-3-large");

    let before = fake.request_count();
    let e = c
        .call::<_, EmbedResult>(
            "embed",
            &EmbedParams {
                profile: "ant".into(),
                model: None,
                input: vec!["x".into()],
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Anthropic has no embeddings"), "{e}");
    assert_eq!(
        fake.request_count(),
        before,
        "nothing may be sent for Anthropic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_options_reach_each_wire_format() {
    let (fake, _d, c) = setup().await;
    let req = request(json!({
        "model": "special-model",
        "system": "Be brief.",
        "max_tokens": 321, "temperature": 0.25, "stop": ["STOP"],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image", "media_type": "image/png", "data": "iVBORw0KGgo="}
        ]}],
        "tools": [weather_tool()],
        "tool_choice": "any",
        "thinking": {"budget_tokens": 20000},
        "provider_options": {"x_extra": true}
    }));
    let mut seen: BTreeMap<&str, Value> = BTreeMap::new();
    for (profile, _, _) in PROFILES {
        c.chat(profile, req.clone())
            .await
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        let rec = fake.last_request();
        assert_eq!(
            rec.body["x_extra"], true,
            "{profile}: provider_options merged"
        );
        seen.insert(profile, rec.body);
        if profile == "gem" {
            assert!(
                rec.path
                    .starts_with("/v1beta/models/special-model:generateContent"),
                "{}",
                rec.path
            );
        }
    }
    let oai = &seen["oai"];
    assert_eq!(
        oai["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        oai["messages"][1]["content"][1],
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
    );
    assert_eq!(
        (oai["max_tokens"].clone(), oai["temperature"].clone()),
        (json!(321), json!(0.25))
    );
    assert_eq!(
        (oai["tool_choice"].clone(), oai["reasoning_effort"].clone()),
        (json!("required"), json!("high"))
    );
    assert_eq!(oai["stop"], json!(["STOP"]));
    assert_eq!(seen["mm"]["tool_choice"], "required");
    let gem = &seen["gem"];
    assert_eq!(
        gem["systemInstruction"],
        json!({"parts": [{"text": "Be brief."}]})
    );
    assert_eq!(
        gem["contents"][0]["parts"][1],
        json!({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})
    );
    assert_eq!(
        gem["generationConfig"],
        json!({"maxOutputTokens": 321, "temperature": 0.25, "stopSequences": ["STOP"],
               "thinkingConfig": {"thinkingBudget": 20000, "includeThoughts": true}})
    );
    assert_eq!(
        gem["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
    for p in ["ant", "mma"] {
        assert_eq!(seen[p]["tool_choice"], json!({"type": "any"}), "{p}");
        assert_eq!(
            seen[p]["thinking"],
            json!({"type": "enabled", "budget_tokens": 20000}),
            "{p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_the_provider_answers_aborts_the_request() {
    let (fake, _d, c) = setup().await;
    fake.set_latency(Duration::from_secs(3));
    let s = c.chat_stream("gem", ask("hi")).await.unwrap();
    assert!(fake.wait_for_requests(1, Duration::from_secs(5)).await);
    let t0 = Instant::now();
    drop(s);
    assert!(
        fake.wait_for_aborted(1, Duration::from_secs(2)).await,
        "the provider request outlived the cancel"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.completed(), 0);
}
