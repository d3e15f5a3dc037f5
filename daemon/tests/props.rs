//! Property tests (issue 9, "fuzzing in `cargo test`"): config parsing, the credential
//! file parsers, the SSE parser, and each provider's request and response translation
//! (JSON answers and streams). Invariants: never a panic, a typed error for anything
//! invalid, and buffers bounded by the input. Case counts are fixed so the whole file
//! stays within a few seconds.

use llmd::config::{self, Provider};
use llmd::providers::sse::{Parser, SseStream};
use llmd::providers::{anthropic, gemini, minimax, openai, Call, DeltaSink, Timeouts};
use llmd_proto::chat::{ChatRequest, Delta, ToolDef};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Field names and string values of the four wire formats, so random JSON reaches deep
/// into the translators instead of failing at the first lookup.
const KEYS: &[&str] = &[
    "type",
    "text",
    "content",
    "choices",
    "delta",
    "message",
    "index",
    "id",
    "name",
    "input",
    "arguments",
    "tool_calls",
    "function",
    "finish_reason",
    "stop_reason",
    "usage",
    "candidates",
    "parts",
    "functionCall",
    "args",
    "finishReason",
    "usageMetadata",
    "error",
    "partial_json",
    "content_block",
    "thinking",
    "signature",
    "role",
    "model",
    "base_resp",
    "status_code",
    "status_msg",
    "input_tokens",
    "output_tokens",
    "reasoning_content",
    "promptTokenCount",
    "candidatesTokenCount",
    "thought",
    "thoughtSignature",
    "refusal",
    "cache_read_input_tokens",
    "prompt_tokens",
    "completion_tokens",
    "embeddings",
    "data",
    "embedding",
    "vectors",
    "values",
];
const WORDS: &[&str] = &[
    "text",
    "tool_use",
    "thinking",
    "redacted_thinking",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_start",
    "message_delta",
    "message_stop",
    "text_delta",
    "input_json_delta",
    "thinking_delta",
    "signature_delta",
    "stop",
    "tool_calls",
    "length",
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "end_turn",
    "max_tokens",
    "assistant",
    "user",
    "model",
    "function",
    "{",
    "}",
    "{\"a\":",
    "[DONE]",
    "overloaded_error",
    "",
    "é",
    "\u{0}",
    "🙂",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z]{1,6}",
    ]
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(str::to_owned),
        1 => ".{0,12}",
    ]
}

/// Random JSON shaped like the wire formats.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..1_000_000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn block() -> impl Strategy<Value = Value> {
    prop_oneof![
        word().prop_map(|t| json!({"type": "text", "text": t})),
        (
            word(),
            prop::option::of(prop::sample::select(&["5m", "1h"][..]))
        )
            .prop_map(|(t, c)| json!({"type": "text", "text": t, "cache": c})),
        word().prop_map(|d| json!({"type": "image", "media_type": "image/png", "data": d})),
        (word(), word(), json_value())
            .prop_map(|(id, n, i)| json!({"type": "tool_use", "id": id, "name": n, "input": i})),
        (word(), word(), any::<bool>()).prop_map(|(id, t, e)| {
            json!({"type": "tool_result", "tool_use_id": id, "content": t, "is_error": e})
        }),
        (word(), prop::option::of(word()))
            .prop_map(|(t, s)| json!({"type": "thinking", "text": t, "signature": s})),
    ]
}

fn content() -> impl Strategy<Value = Value> {
    prop_oneof![
        word().prop_map(Value::String),
        prop::collection::vec(block(), 0..4).prop_map(Value::Array),
    ]
}

/// Random requests that decode as `ChatRequest` (and some that do not).
fn request() -> impl Strategy<Value = Value> {
    let message = (prop::sample::select(&["user", "assistant"][..]), content())
        .prop_map(|(r, c)| json!({"role": r, "content": c}));
    (
        prop::collection::vec(message, 0..5),
        prop::option::of(content()),
        prop::option::of(1u32..100_000),
        prop::option::of(0.0f32..2.0),
        prop::option::of(prop::collection::vec(word(), 0..3)),
        prop::option::of(prop_oneof![
            Just(json!("auto")),
            Just(json!("any")),
            Just(json!("none")),
            word().prop_map(|n| json!({"name": n}))
        ]),
        prop::option::of(1u32..50_000),
    )
        .prop_map(|(messages, system, max, temp, stop, choice, budget)| {
            let mut r = json!({"messages": messages});
            let o = r.as_object_mut().expect("object");
            if let Some(s) = system {
                o.insert("system".into(), s);
            }
            if let Some(m) = max {
                o.insert("max_tokens".into(), json!(m));
            }
            if let Some(t) = temp {
                o.insert("temperature".into(), json!(t));
            }
            if let Some(s) = stop {
                o.insert("stop".into(), json!(s));
            }
            if let Some(c) = choice {
                o.insert("tool_choice".into(), c);
            }
            if let Some(b) = budget {
                o.insert("thinking".into(), json!({"budget_tokens": b}));
            }
            r
        })
}

/// Keeps deltas, at most a bounded number.
#[derive(Default)]
struct Sink(Mutex<Vec<Delta>>);

impl DeltaSink for Sink {
    fn send(&self, delta: Delta) -> bool {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() > 10_000 {
            return false;
        }
        d.push(delta);
        true
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

fn tool() -> ToolDef {
    serde_json::from_value(json!({"name": "get_weather", "description": "d",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}))
    .expect("tool")
}

/// SSE bytes for events `(name, data)`, cut into pieces at the given points.
fn sse(events: &[(String, Value)], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut text = Vec::new();
    for (name, data) in events {
        if !name.is_empty() {
            text.extend_from_slice(format!("event: {name}\n").as_bytes());
        }
        text.extend_from_slice(format!("data: {data}\n\n").as_bytes());
    }
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
    points.sort_unstable();
    for p in points {
        if p > at {
            pieces.push(text[at..p].to_vec());
            at = p;
        }
    }
    pieces.push(text[at..].to_vec());
    pieces
}

fn event() -> impl Strategy<Value = (String, Value)> {
    (
        prop_oneof![
            Just(String::new()),
            prop::sample::select(WORDS).prop_map(str::to_owned)
        ],
        json_value(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_parsing_never_panics(text in prop_oneof![
        ".{0,200}",
        prop::collection::vec((
            prop::sample::select(&["[daemon]", "[profiles.p]", "[profiles.p.rate_limit]", "[profiles.p.timeouts]", ""][..]),
            prop::sample::select(&["provider", "auth", "base_url", "max_frame_bytes", "idle_timeout_secs",
                "max_tools", "max_tool_bytes", "connect_secs", "total_secs", "first_byte_secs",
                "max_concurrent", "api_key_env", "token_endpoint", "extra_headers", "x"][..]),
            prop::sample::select(&["\"anthropic\"", "\"api-key\"", "\"oauth\"", "0", "1", "99999999999",
                "-1", "\"http://127.0.0.1:1\"", "\"ftp://x\"", "[]", "{}", "true", "\"\""][..]),
        ), 0..12).prop_map(|lines| lines.into_iter().map(|(s, k, v)| format!("{s}\n{k} = {v}\n")).collect::<String>()),
    ]) {
        match config::parse(&text, Path::new("/cfg/config.toml")) {
            Ok(cfg) => {
                for p in cfg.profiles.values() {
                    prop_assert!(p.timeouts.connect_secs >= 1 && p.timeouts.total_secs >= 1);
                }
            }
            Err(e) => prop_assert!(e.0.starts_with("/cfg/config.toml:"), "{}", e.0),
        }
    }

    #[test]
    fn credential_files_parse_or_fail_cleanly(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), json_value(), any::<i64>()).prop_map(|(a, r, e)| {
            json!({"access_token": a, "refresh_token": r, "expires_at": e,
                   "claudeAiOauth": {"accessToken": a, "refreshToken": r, "expiresAt": e}}).to_string().into_bytes()
        }),
    ]) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["bundle.json", ".credentials.json", "key"] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let bundle = llmd::credentials::bundle::BundleFile { path: dir.path().join("bundle.json") };
        let _ = bundle.read();
        let _ = llmd::credentials::claude_cli::CredentialsFile::in_dir(dir.path()).read();
        let _ = llmd::credentials::api_key::read_key_file(&dir.path().join("key"));
    }

    #[test]
    fn sse_parser_is_split_invariant_and_bounded(
        events in prop::collection::vec(event(), 0..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let whole: Vec<u8> = sse(&events, &[]).concat();
        let parse = |pieces: &[Vec<u8>]| {
            let mut p = Parser::default();
            let mut out = Vec::new();
            for piece in pieces {
                p.push(piece);
                while let Some(e) = p.next_event() {
                    out.push(e);
                }
                // Only an unfinished line (or event) stays buffered.
                assert!(p.buffered() <= whole.len() + garbage.len());
            }
            out.extend(p.finish());
            out
        };
        prop_assert_eq!(parse(std::slice::from_ref(&whole)), parse(&sse(&events, &cuts)));
        let mut noisy = whole.clone();
        noisy.extend_from_slice(&garbage);
        let _ = parse(&[noisy]);
    }

    #[test]
    fn every_provider_translates_any_request(req in request()) {
        let Ok(request) = serde_json::from_value::<ChatRequest>(req) else { return Ok(()) };
        let http = reqwest::Client::new();
        let headers = BTreeMap::new();
        let tools = [tool()];
        let call = Call {
            http: &http,
            base_url: "http://127.0.0.1:9",
            model: "m",
            headers: &headers,
            request: &request,
            tools: &tools,
            stream: None,
            observe: None,
            timeouts: Timeouts::default(),
        };
        let a = anthropic::request_body(&call);
        prop_assert!(a.is_object());
        let o = openai::request_body(&call);
        prop_assert!(o.is_object());
        if let Ok(g) = gemini::request_body(&call) {
            prop_assert!(g.is_object());
        }
    }

    #[test]
    fn every_provider_parses_any_json_answer(v in json_value()) {
        let _ = anthropic::parse_response(&v);
        let _ = openai::parse_response(&v, "OpenAI-compatible");
        let _ = gemini::parse_response(&v, "m");
        let _ = (minimax::DIALECT.check)(&v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_provider_survives_any_stream(
        events in prop::collection::vec(event(), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        let rt = runtime();
        let pieces = sse(&events, &cuts);
        let idle = Duration::from_secs(5);
        rt.block_on(async {
            let sink = Sink::default();
            let _ = anthropic::stream(SseStream::from_chunks(pieces.clone(), idle), &sink).await;
            let sink = Sink::default();
            let _ = openai::stream(SseStream::from_chunks(pieces.clone(), idle), &sink, &openai::OPENAI).await;
            let sink = Sink::default();
            let _ = openai::stream(SseStream::from_chunks(pieces.clone(), idle), &sink, &minimax::DIALECT).await;
            let sink = Sink::default();
            let _ = gemini::stream(SseStream::from_chunks(pieces, idle), &sink, "m").await;
        });
    }
}

#[test]
fn the_property_inputs_reach_real_answers() {
    // The generators are only useful if plausible input gets through; one known-good
    // stream per provider keeps them honest.
    let rt = runtime();
    let ev = |name: &str, v: Value| (name.to_owned(), v);
    let anthropic_events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "model": "x"}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ];
    let r = rt.block_on(anthropic::stream(
        SseStream::from_chunks(
            sse(&anthropic_events, &[7, 50, 200]),
            Duration::from_secs(5),
        ),
        &Sink::default(),
    ));
    assert!(r.is_ok(), "{r:?}");
    let _ = Provider::Anthropic;
}
