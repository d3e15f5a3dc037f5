//! Anthropic Messages API: `POST {base}/v1/messages`, JSON or SSE.

use super::sse::SseStream;
use super::{json_body, merge_options, post, Call, ProviderError};
use llmd_proto::chat::{
    Block, CacheTtl, ChatResponse, Content, Delta, StopReason, ToolChoice, ToolMode, Usage,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// API version header value.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the request names none (the API requires one).
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// One call, streaming when the caller gave a sink.
pub async fn chat(call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    let body = request_body(call);
    let url = format!("{}/v1/messages", call.base_url.trim_end_matches('/'));
    let mut headers = call.headers.clone();
    headers.insert("anthropic-version".into(), API_VERSION.into());
    let call = Call {
        headers: &headers,
        ..*call
    };
    let resp = post(&call, &url, &body).await?;
    match call.stream {
        None => parse_response(&json_body(resp, "Anthropic").await?),
        Some(sink) => stream(SseStream::new(resp, &call), sink).await,
    }
}

fn cache_control(c: Option<CacheTtl>) -> Option<Value> {
    c.map(|ttl| match ttl {
        CacheTtl::FiveMinutes => json!({"type": "ephemeral"}),
        CacheTtl::OneHour => json!({"type": "ephemeral", "ttl": "1h"}),
    })
}

fn block_json(b: &Block) -> Value {
    match b {
        Block::Text { text, cache } => {
            let mut v = json!({"type": "text", "text": text});
            if let Some(cc) = cache_control(*cache) {
                v["cache_control"] = cc;
            }
            v
        }
        Block::Image { media_type, data } => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
        Block::ToolUse {
            id, name, input, ..
        } => json!({"type": "tool_use", "id": id, "name": name, "input": input}),
        Block::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => {
            let content = match content {
                Content::Text(t) => Value::String(t.clone()),
                Content::Blocks(bs) => Value::Array(bs.iter().map(block_json).collect()),
            };
            json!({"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": is_error})
        }
        Block::Thinking { text, signature } => {
            json!({"type": "thinking", "thinking": text, "signature": signature.clone().unwrap_or_default()})
        }
        // Refused in requests before any provider sees them (`chat::check_request`).
        Block::Unknown => json!({"type": "text", "text": ""}),
    }
}

/// The request body for `call` (without `stream` when not streaming).
pub fn request_body(call: &Call<'_>) -> Value {
    let r = call.request;
    let mut body = Map::new();
    body.insert("model".into(), call.model.into());
    let budget = r.thinking.map(|t| t.budget_tokens).unwrap_or(0);
    let max = r
        .max_tokens
        .unwrap_or_else(|| DEFAULT_MAX_TOKENS.max(budget + 1024));
    body.insert("max_tokens".into(), max.into());
    if let Some(system) = &r.system {
        body.insert(
            "system".into(),
            Value::Array(system.blocks().iter().map(block_json).collect()),
        );
    }
    let messages: Vec<Value> = r
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content.blocks().iter().map(block_json).collect::<Vec<_>>()}))
        .collect();
    body.insert("messages".into(), messages.into());
    if let Some(t) = r.temperature {
        body.insert("temperature".into(), super::f32_json(t));
    }
    if !r.stop.is_empty() {
        body.insert("stop_sequences".into(), r.stop.clone().into());
    }
    if !call.tools.is_empty() {
        let tools: Vec<Value> = call
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.input_schema}))
            .collect();
        body.insert("tools".into(), tools.into());
    }
    if let Some(choice) = &r.tool_choice {
        let c = match choice {
            ToolChoice::Mode(ToolMode::Auto) => json!({"type": "auto"}),
            ToolChoice::Mode(ToolMode::Any) => json!({"type": "any"}),
            ToolChoice::Mode(ToolMode::None) => json!({"type": "none"}),
            ToolChoice::Named { name } => json!({"type": "tool", "name": name}),
        };
        body.insert("tool_choice".into(), c);
    }
    if let Some(t) = r.thinking {
        body.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": t.budget_tokens}),
        );
    }
    if call.stream.is_some() {
        body.insert("stream".into(), true.into());
    }
    let mut body = Value::Object(body);
    merge_options(&mut body, r.provider_options.as_ref());
    body
}

fn stop_reason(s: Option<&str>) -> StopReason {
    match s {
        Some("end_turn") => StopReason::EndTurn,
        Some("max_tokens") => StopReason::MaxTokens,
        Some("tool_use") => StopReason::ToolUse,
        Some("stop_sequence") => StopReason::StopSequence,
        _ => StopReason::Other,
    }
}

fn usage(u: &Value, into: &mut Usage) {
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    if let Some(v) = n("input_tokens") {
        into.input_tokens = v;
    }
    if let Some(v) = n("output_tokens") {
        into.output_tokens = v;
    }
    if let Some(v) = n("cache_read_input_tokens") {
        into.cache_read_tokens = v;
    }
    if let Some(v) = n("cache_creation_input_tokens") {
        into.cache_write_tokens = v;
    }
}

fn content_block(v: &Value) -> Result<Option<Block>, ProviderError> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok(match v.get("type").and_then(Value::as_str) {
        Some("text") => Some(Block::Text {
            text: s("text").unwrap_or_default(),
            cache: None,
        }),
        Some("tool_use") => Some(Block::ToolUse {
            id: s("id").ok_or_else(|| ProviderError::Protocol("tool_use without id".into()))?,
            name: s("name")
                .ok_or_else(|| ProviderError::Protocol("tool_use without name".into()))?,
            input: v.get("input").cloned().unwrap_or_else(|| json!({})),
            validation_errors: None,
        }),
        Some("thinking") => Some(Block::Thinking {
            text: s("thinking").unwrap_or_default(),
            signature: s("signature"),
        }),
        // Server-side blocks (redacted thinking, server tools) have no neutral shape.
        _ => None,
    })
}

/// Maps a non-streaming Messages API answer.
pub fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::Protocol("Anthropic answer has no `content` array".into()))?;
    let mut blocks = Vec::new();
    for b in content {
        if let Some(b) = content_block(b)? {
            blocks.push(b);
        }
    }
    let mut u = Usage::default();
    if let Some(x) = v.get("usage") {
        usage(x, &mut u);
    }
    Ok(ChatResponse {
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        content: blocks,
        stop_reason: stop_reason(v.get("stop_reason").and_then(Value::as_str)),
        usage: u,
        member: None,
    })
}

/// Consumes the SSE stream, forwarding deltas and assembling the final answer.
pub async fn stream(
    mut events: SseStream<'_>,
    sink: &dyn super::DeltaSink,
) -> Result<ChatResponse, ProviderError> {
    let mut resp = ChatResponse {
        id: String::new(),
        model: String::new(),
        content: Vec::new(),
        stop_reason: StopReason::Other,
        usage: Usage::default(),
        member: None,
    };
    // Provider index -> (neutral index, block, accumulated tool JSON). Blocks without a
    // neutral shape are skipped, so neutral indexes count only the blocks we report.
    let mut open: BTreeMap<usize, (usize, Block, String)> = BTreeMap::new();
    let mut next_index = 0usize;
    let mut done: BTreeMap<usize, Block> = BTreeMap::new();
    let mut stopped = false;
    while let Some(ev) = events.next().await? {
        if ev.data.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data)
            .map_err(|e| ProviderError::Protocol(format!("malformed `{}` event: {e}", ev.event)))?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(ev.event.as_str())
            .to_owned();
        let index = v.get("index").and_then(Value::as_u64).map(|i| i as usize);
        let forward = |d: Delta| {
            if sink.send(d) {
                Ok(())
            } else {
                Err(ProviderError::Cancelled)
            }
        };
        match kind.as_str() {
            "message_start" => {
                let m = v.get("message").cloned().unwrap_or_default();
                resp.id = m
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                resp.model = m
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if let Some(u) = m.get("usage") {
                    usage(u, &mut resp.usage);
                }
            }
            "content_block_start" => {
                let i = index.ok_or_else(|| {
                    ProviderError::Protocol("content_block_start without index".into())
                })?;
                let cb = v.get("content_block").cloned().unwrap_or_default();
                if let Some(block) = content_block(&cb)? {
                    let n = next_index;
                    next_index += 1;
                    match &block {
                        Block::ToolUse { id, name, .. } => forward(Delta::ToolUseStart {
                            index: n,
                            id: id.clone(),
                            name: name.clone(),
                        })?,
                        // Text that arrives with the start is content like any delta.
                        Block::Text { text, .. } if !text.is_empty() => {
                            forward(Delta::Text { text: text.clone() })?
                        }
                        Block::Thinking { text, .. } if !text.is_empty() => {
                            forward(Delta::Thinking { text: text.clone() })?
                        }
                        _ => {}
                    }
                    open.insert(i, (n, block, String::new()));
                }
            }
            "content_block_delta" => {
                let i = index.ok_or_else(|| {
                    ProviderError::Protocol("content_block_delta without index".into())
                })?;
                let d = v.get("delta").cloned().unwrap_or_default();
                let Some((n, block, json_acc)) = open.get_mut(&i) else {
                    // A delta for a block type we do not model.
                    continue;
                };
                let text = |k: &str| {
                    d.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                match (d.get("type").and_then(Value::as_str), block) {
                    (Some("text_delta"), Block::Text { text: t, .. }) => {
                        let piece = text("text");
                        t.push_str(&piece);
                        forward(Delta::Text { text: piece })?;
                    }
                    (Some("thinking_delta"), Block::Thinking { text: t, .. }) => {
                        let piece = text("thinking");
                        t.push_str(&piece);
                        forward(Delta::Thinking { text: piece })?;
                    }
                    (Some("signature_delta"), Block::Thinking { signature, .. }) => {
                        signature
                            .get_or_insert_with(String::new)
                            .push_str(&text("signature"));
                    }
                    (Some("input_json_delta"), Block::ToolUse { .. }) => {
                        let piece = text("partial_json");
                        json_acc.push_str(&piece);
                        forward(Delta::ToolInput {
                            index: *n,
                            partial_json: piece,
                        })?;
                    }
                    (t, _) => {
                        return Err(ProviderError::Protocol(format!(
                            "unexpected delta {t:?} for block {i}"
                        )));
                    }
                }
            }
            "content_block_stop" => {
                let i = index.ok_or_else(|| {
                    ProviderError::Protocol("content_block_stop without index".into())
                })?;
                if let Some((n, mut block, json_acc)) = open.remove(&i) {
                    if let Block::ToolUse { input, .. } = &mut block {
                        if !json_acc.trim().is_empty() {
                            *input = serde_json::from_str(&json_acc).map_err(|e| {
                                ProviderError::Protocol(format!(
                                    "tool call arguments of block {i} are not JSON: {e}"
                                ))
                            })?;
                        }
                    }
                    done.insert(n, block);
                    forward(Delta::BlockStop { index: n })?;
                }
            }
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    resp.stop_reason = stop_reason(Some(r));
                }
                if let Some(u) = v.get("usage") {
                    usage(u, &mut resp.usage);
                }
                forward(Delta::Usage(resp.usage))?;
            }
            "message_stop" => {
                stopped = true;
                break;
            }
            "ping" => {}
            "error" => {
                let e = v.get("error").cloned().unwrap_or_default();
                return Err(ProviderError::Stream {
                    kind: e
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_owned(),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            other => tracing::debug!(event = other, "ignoring unknown Anthropic stream event"),
        }
    }
    if !stopped {
        return Err(ProviderError::EndedEarly("no message_stop".into()));
    }
    resp.content = done.into_values().collect();
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{cut, serve_once, Collect};
    use llmd_proto::chat::{ChatRequest, ToolDef};

    fn req(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    fn headers() -> BTreeMap<String, String> {
        [("x-api-key".to_string(), "sk-ant-test".to_string())].into()
    }

    fn weather() -> ToolDef {
        ToolDef {
            name: "get_weather".into(),
            description: "weather".into(),
            input_schema: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    #[test]
    fn request_body_maps_every_neutral_field() {
        let r = req(json!({
            "system": [{"type": "text", "text": "sys", "cache": "1h"}],
            "temperature": 0.3, "stop": ["END"], "thinking": {"budget_tokens": 2048},
            "tool_choice": {"name": "get_weather"},
            "provider_options": {"top_k": 3, "max_tokens": 99},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi", "cache": "5m"},
                    {"type": "image", "media_type": "image/png", "data": "AAAA"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "cold", "is_error": true}]}
            ]
        }));
        let h = headers();
        let tools = [weather()];
        let http = reqwest::Client::new();
        let call = Call {
            http: &http,
            base_url: "http://x",
            model: "claude-x",
            headers: &h,
            request: &r,
            tools: &tools,
            stream: None,
            observe: None,
            timeouts: crate::providers::Timeouts::default(),
        };
        let b = request_body(&call);
        assert_eq!(b["model"], "claude-x");
        assert_eq!(b["max_tokens"], 99, "provider_options override last");
        assert_eq!(b["top_k"], 3);
        assert_eq!(b["temperature"], json!(0.3));
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(
            b["system"][0]["cache_control"],
            json!({"type": "ephemeral", "ttl": "1h"})
        );
        assert_eq!(
            b["messages"][0]["content"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
        assert_eq!(
            b["messages"][0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(
            b["messages"][1]["content"][0],
            json!({"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}})
        );
        assert_eq!(b["messages"][2]["content"][0]["is_error"], true);
        assert_eq!(
            b["tool_choice"],
            json!({"type": "tool", "name": "get_weather"})
        );
        assert_eq!(
            b["thinking"],
            json!({"type": "enabled", "budget_tokens": 2048})
        );
        assert_eq!(b["tools"][0]["name"], "get_weather");
        assert!(b.get("stream").is_none());
    }

    #[test]
    fn parses_a_documented_answer() {
        let r = parse_response(&json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
        }))
        .unwrap();
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 10,
                output_tokens: 5,
                cache_read_tokens: 3,
                cache_write_tokens: 2
            }
        );
        assert!(matches!(&r.content[1], Block::ToolUse { input, .. } if input["city"] == "Paris"));
        assert!(parse_response(&json!({"id": "x"})).is_err());
    }

    fn transcript() -> String {
        let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        [
            ev("message_start", json!({"type": "message_start", "message": {"id": "msg_s", "model": "claude-x", "usage": {"input_tokens": 9, "output_tokens": 1}}})),
            ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}}})),
            ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})),
            ev("ping", json!({"type": "ping"})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking, café "}})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "☕"}})),
            ev("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
            ev("content_block_start", json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "ty\": \"Par"}})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "is\"}"}})),
            ev("content_block_stop", json!({"type": "content_block_stop", "index": 2})),
            ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 22}})),
            ev("message_stop", json!({"type": "message_stop"})),
        ]
        .concat()
    }

    async fn run(pieces: Vec<Vec<u8>>, sink: &Collect) -> Result<ChatResponse, ProviderError> {
        let (base, seen) = serve_once(200, "text/event-stream", pieces).await;
        let r = req(json!({"messages": [{"role": "user", "content": "weather?"}]}));
        let h = headers();
        let tools = [weather()];
        let http = reqwest::Client::new();
        let call = Call {
            http: &http,
            base_url: &base,
            model: "claude-x",
            headers: &h,
            request: &r,
            tools: &tools,
            stream: Some(sink),
            observe: None,
            timeouts: crate::providers::Timeouts::default(),
        };
        let out = chat(&call).await;
        let _ = seen.await;
        out
    }

    #[tokio::test]
    async fn streams_split_anywhere_with_indexes_matching_content() {
        let text = transcript();
        for size in [1, 3, 17, 4096] {
            let sink = Collect::default();
            let r = run(cut(&text, size), &sink)
                .await
                .unwrap_or_else(|e| panic!("split {size}: {e}"));
            assert_eq!(
                r.content.len(),
                2,
                "the server tool block has no neutral shape"
            );
            assert_eq!(
                r.content[0],
                Block::Text {
                    text: "Checking, café ☕".into(),
                    cache: None
                }
            );
            assert!(
                matches!(&r.content[1], Block::ToolUse { id, input, .. } if id == "toolu_9" && input["city"] == "Paris")
            );
            assert_eq!(r.usage.output_tokens, 22);
            let deltas = sink.deltas.lock().unwrap().clone();
            assert!(
                deltas.contains(&Delta::ToolUseStart {
                    index: 1,
                    id: "toolu_9".into(),
                    name: "get_weather".into()
                }),
                "{deltas:?}"
            );
            assert!(deltas.contains(&Delta::BlockStop { index: 0 }));
            assert!(deltas.contains(&Delta::BlockStop { index: 1 }));
            let joined: String = deltas
                .iter()
                .filter_map(|d| match d {
                    Delta::ToolInput {
                        index: 1,
                        partial_json,
                    } => Some(partial_json.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(joined, "{\"city\": \"Paris\"}");
        }
    }

    #[tokio::test]
    async fn stream_errors_and_cuts_are_errors() {
        let cut_short = transcript()
            .split("event: message_delta")
            .next()
            .unwrap()
            .to_owned();
        let e = run(cut(&cut_short, 64), &Collect::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProviderError::EndedEarly(ref m) if m.contains("message_stop")),
            "{e}"
        );
        let overloaded = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let e = run(cut(overloaded, 64), &Collect::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProviderError::Stream { ref kind, .. } if kind == "overloaded_error"),
            "{e}"
        );
        let garbage = "event: content_block_delta\ndata: {not json\n\n";
        let e = run(cut(garbage, 64), &Collect::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Protocol(_)), "{e}");
        let bad_args = transcript().replace("is\\\"}", "is\\\"");
        let e = run(cut(&bad_args, 4096), &Collect::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProviderError::Protocol(ref m) if m.contains("not JSON")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_listener_that_went_away_cancels_the_stream() {
        let sink = Collect {
            limit: Some(2),
            ..Default::default()
        };
        let e = run(cut(&transcript(), 4096), &sink).await.unwrap_err();
        assert!(matches!(e, ProviderError::Cancelled));
    }
}
