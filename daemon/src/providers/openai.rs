//! OpenAI-compatible chat completions (OpenAI, DeepSeek, vLLM, Ollama, LM Studio):
//! `POST {base}/chat/completions`, JSON or SSE `data:` lines ending `data: [DONE]`.
//! MiniMax's OpenAI-style endpoint reuses this mapping through [`Dialect`].

use super::sse::SseStream;
use super::{forward, json_body, merge_options, post, Call, DeltaSink, ProviderError};
use llmd_proto::chat::{
    Block, ChatRequest, ChatResponse, Content, Delta, EmbedResult, Role, StopReason, ToolChoice,
    ToolMode, Usage,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Embedding model when the request names none.
pub const DEFAULT_EMBED_MODEL: &str = "text-embedding-3-small";

/// What differs between servers that speak this wire format.
pub struct Dialect {
    /// Provider name used in error messages.
    pub who: &'static str,
    /// Whether a stream must end with `data: [DONE]` (MiniMax may just close it).
    pub requires_done: bool,
    /// Inspects every JSON answer and stream chunk for errors hidden in a 200.
    pub check: fn(&Value) -> Result<(), ProviderError>,
}

/// Plain OpenAI-compatible servers: errors come as HTTP statuses or `error` objects.
pub const OPENAI: Dialect = Dialect {
    who: "OpenAI-compatible",
    requires_done: true,
    check: |_| Ok(()),
};

/// One call, streaming when the caller gave a sink.
pub async fn chat(call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    let url = format!("{}/chat/completions", call.base_url.trim_end_matches('/'));
    chat_at(call, &url, &OPENAI).await
}

/// One call against `url` with the OpenAI mapping and `dialect`'s quirks.
pub(crate) async fn chat_at(
    call: &Call<'_>,
    url: &str,
    dialect: &Dialect,
) -> Result<ChatResponse, ProviderError> {
    let body = request_body(call);
    let resp = post(call, url, &body).await?;
    match call.stream {
        None => {
            let v = json_body(resp, dialect.who).await?;
            (dialect.check)(&v)?;
            parse_response(&v, dialect.who)
        }
        Some(sink) => {
            if is_json(&resp) {
                // Some servers answer a stream request that failed with a plain JSON body.
                let v = json_body(resp, dialect.who).await?;
                (dialect.check)(&v)?;
                if let Some(e) = error_object(&v) {
                    return Err(e);
                }
                return Err(ProviderError::Protocol(format!(
                    "{} answered a stream request with a JSON body",
                    dialect.who
                )));
            }
            stream(SseStream::new(resp, call), sink, dialect).await
        }
    }
}

fn is_json(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"))
}

/// Text blocks joined for places that take one string (system prompt, tool results).
fn joined_text(c: &Content) -> String {
    match c {
        Content::Text(t) => t.clone(),
        Content::Blocks(bs) => bs
            .iter()
            .filter_map(|b| match b {
                Block::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn image_part(media_type: &str, data: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": format!("data:{media_type};base64,{data}")}})
}

/// A user turn: tool results become `tool` messages first (they must directly follow the
/// assistant's `tool_calls`), then the rest as one `user` message.
fn push_user(content: &Content, out: &mut Vec<Value>) {
    let blocks = match content {
        Content::Text(t) => {
            out.push(json!({"role": "user", "content": t}));
            return;
        }
        Content::Blocks(bs) => bs,
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for b in blocks {
        match b {
            Block::Text { text, .. } => texts.push(text.clone()),
            Block::Image { media_type, data } => images.push(image_part(media_type, data)),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let mut text = joined_text(content);
                if *is_error {
                    // The format has no error flag; the model has to read it.
                    text = format!("Error: {text}");
                }
                out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": text}));
                // `tool` messages carry text only; images the tool returned go to the user turn.
                if let Content::Blocks(inner) = content {
                    for ib in inner {
                        if let Block::Image { media_type, data } = ib {
                            images.push(image_part(media_type, data));
                        }
                    }
                }
            }
            // Neither side of a conversation sends these as the user.
            Block::ToolUse { .. } | Block::Thinking { .. } | Block::Unknown => {}
        }
    }
    if images.is_empty() {
        if !texts.is_empty() {
            // A plain string is what every compatible server accepts.
            out.push(json!({"role": "user", "content": texts.join("\n")}));
        }
    } else {
        let mut parts: Vec<Value> = texts
            .into_iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect();
        parts.extend(images);
        out.push(json!({"role": "user", "content": parts}));
    }
}

/// An assistant turn: text as `content`, tool calls as `tool_calls` with string arguments.
/// Thinking is not sent back: DeepSeek rejects `reasoning_content` in requests.
fn assistant_message(content: &Content) -> Value {
    let blocks = content.blocks();
    let text: Vec<&str> = blocks
        .iter()
        .filter_map(|b| match b {
            Block::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let calls: Vec<Value> = blocks
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse {
                id, name, input, ..
            } => Some(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            _ => None,
        })
        .collect();
    let mut m = json!({"role": "assistant"});
    m["content"] = if text.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        Value::String(text.join("\n"))
    };
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    m
}

/// The chat messages of `r`, system prompt first.
fn messages(r: &ChatRequest) -> Vec<Value> {
    let mut out = Vec::with_capacity(r.messages.len() + 1);
    if let Some(system) = &r.system {
        out.push(json!({"role": "system", "content": joined_text(system)}));
    }
    for m in &r.messages {
        match m.role {
            Role::User => push_user(&m.content, &mut out),
            Role::Assistant => out.push(assistant_message(&m.content)),
        }
    }
    out
}

/// `reasoning_effort` for a thinking budget.
fn reasoning_effort(budget_tokens: u32) -> &'static str {
    match budget_tokens {
        0..4096 => "low",
        4096..16384 => "medium",
        _ => "high",
    }
}

/// The request body for `call` (with `stream` only when streaming).
pub fn request_body(call: &Call<'_>) -> Value {
    let r = call.request;
    let mut body = Map::new();
    body.insert("model".into(), call.model.into());
    body.insert("messages".into(), messages(r).into());
    if let Some(max) = r.max_tokens {
        body.insert("max_tokens".into(), max.into());
    }
    if let Some(t) = r.temperature {
        body.insert("temperature".into(), super::f32_json(t));
    }
    if !r.stop.is_empty() {
        body.insert("stop".into(), r.stop.clone().into());
    }
    if !call.tools.is_empty() {
        let tools: Vec<Value> = call
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.input_schema,
                }})
            })
            .collect();
        body.insert("tools".into(), tools.into());
    }
    if let Some(choice) = &r.tool_choice {
        let c = match choice {
            ToolChoice::Mode(ToolMode::Auto) => json!("auto"),
            ToolChoice::Mode(ToolMode::None) => json!("none"),
            ToolChoice::Mode(ToolMode::Any) => json!("required"),
            ToolChoice::Named { name } => json!({"type": "function", "function": {"name": name}}),
        };
        body.insert("tool_choice".into(), c);
    }
    if let Some(t) = r.thinking {
        body.insert(
            "reasoning_effort".into(),
            reasoning_effort(t.budget_tokens).into(),
        );
    }
    if call.stream.is_some() {
        body.insert("stream".into(), true.into());
        // Without this the stream carries no token counts at all.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut body = Value::Object(body);
    merge_options(&mut body, r.provider_options.as_ref());
    body
}

/// An `error` object in a 200 answer or a stream chunk.
fn error_object(v: &Value) -> Option<ProviderError> {
    let e = v.get("error").filter(|e| !e.is_null())?;
    let s = |k: &str| match e.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Some(ProviderError::Stream {
        kind: s("type")
            .or_else(|| s("code"))
            .unwrap_or_else(|| "error".into()),
        message: s("message").unwrap_or_else(|| e.to_string()),
    })
}

/// `finish_reason` mapped; some servers say `stop` even when they called tools, and what
/// the caller needs to know then is that results are expected.
fn stop_reason(finish: Option<&str>, has_tool_calls: bool) -> StopReason {
    match finish {
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        Some("stop") if has_tool_calls => StopReason::ToolUse,
        Some("stop") => StopReason::EndTurn,
        Some("length") => StopReason::MaxTokens,
        _ => StopReason::Other,
    }
}

fn usage(u: &Value) -> Usage {
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
    let prompt = n("/prompt_tokens").unwrap_or(0);
    // DeepSeek reports cache hits under its own name.
    let cached = n("/prompt_tokens_details/cached_tokens")
        .or_else(|| n("/prompt_cache_hit_tokens"))
        .unwrap_or(0);
    Usage {
        input_tokens: prompt.saturating_sub(cached),
        output_tokens: n("/completion_tokens").unwrap_or(0),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
    }
}

/// Parses tool-call arguments: a JSON string (an object from a few servers); empty means none.
fn parse_arguments(args: Option<&Value>, name: &str) -> Result<Value, ProviderError> {
    match args {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(json!({})),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
            ProviderError::Protocol(format!("arguments of tool call `{name}` are not JSON: {e}"))
        }),
        Some(v) => Ok(v.clone()),
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Maps a non-streaming chat completion.
pub fn parse_response(v: &Value, who: &str) -> Result<ChatResponse, ProviderError> {
    if let Some(e) = error_object(v) {
        return Err(e);
    }
    let choice = v
        .pointer("/choices/0")
        .ok_or_else(|| ProviderError::Protocol(format!("{who} answer has no choices")))?;
    let msg = choice
        .get("message")
        .ok_or_else(|| ProviderError::Protocol(format!("{who} answer has no message")))?;
    let mut content = Vec::new();
    if let Some(r) = str_at(msg, "/reasoning_content").filter(|s| !s.is_empty()) {
        content.push(Block::Thinking {
            text: r.to_owned(),
            signature: None,
        });
    }
    let text = match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        // A few servers answer with content parts.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| str_at(p, "/text"))
            .collect::<String>(),
        _ => String::new(),
    };
    if !text.is_empty() {
        content.push(Block::Text { text, cache: None });
    }
    let calls = msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (n, tc) in calls.iter().enumerate() {
        let name = str_at(tc, "/function/name").ok_or_else(|| {
            ProviderError::Protocol(format!("{who} tool call {n} has no function name"))
        })?;
        content.push(Block::ToolUse {
            id: str_at(tc, "/id")
                .filter(|s| !s.is_empty())
                .map_or_else(|| format!("call_{n}"), str::to_owned),
            name: name.to_owned(),
            input: parse_arguments(tc.pointer("/function/arguments"), name)?,
            validation_errors: None,
        });
    }
    Ok(ChatResponse {
        id: str_at(v, "/id").unwrap_or_default().to_owned(),
        model: str_at(v, "/model").unwrap_or_default().to_owned(),
        content,
        stop_reason: stop_reason(str_at(choice, "/finish_reason"), !calls.is_empty()),
        usage: v.get("usage").map(usage).unwrap_or_default(),
        member: None,
    })
}

/// A content block being assembled from stream deltas.
enum Slot {
    Thinking(String),
    Text(String),
    Tool {
        id: String,
        name: String,
        args: String,
    },
}

/// Stream assembly: neutral block indexes are given in order of first appearance, so the
/// deltas' indexes are the positions in the final `content`.
#[derive(Default)]
struct Assembly {
    slots: Vec<Slot>,
    text: Option<usize>,
    thinking: Option<usize>,
    /// Provider tool-call index -> slot.
    tools: BTreeMap<u64, usize>,
}

impl Assembly {
    /// Appends to the (single) text or thinking block, opening it on first use.
    fn push_text(&mut self, thinking: bool, piece: &str) {
        let slot = if thinking {
            &mut self.thinking
        } else {
            &mut self.text
        };
        let i = *slot.get_or_insert(self.slots.len());
        if i == self.slots.len() {
            self.slots.push(if thinking {
                Slot::Thinking(String::new())
            } else {
                Slot::Text(String::new())
            });
        }
        if let Some(Slot::Thinking(s) | Slot::Text(s)) = self.slots.get_mut(i) {
            s.push_str(piece);
        }
    }

    /// One element of `delta.tool_calls`.
    fn tool_delta(
        &mut self,
        tc: &Value,
        position: usize,
        sink: &dyn DeltaSink,
    ) -> Result<(), ProviderError> {
        let key = tc
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(position as u64);
        let fragment = str_at(tc, "/function/arguments").unwrap_or_default();
        let index = match self.tools.get(&key) {
            Some(&i) => i,
            None => {
                let name = str_at(tc, "/function/name")
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        ProviderError::Protocol(format!(
                            "tool call {key} starts without a function name"
                        ))
                    })?;
                let id = str_at(tc, "/id")
                    .filter(|s| !s.is_empty())
                    .map_or_else(|| format!("call_{}", self.tools.len()), str::to_owned);
                let i = self.slots.len();
                self.slots.push(Slot::Tool {
                    id: id.clone(),
                    name: name.to_owned(),
                    args: String::new(),
                });
                self.tools.insert(key, i);
                forward(
                    sink,
                    Delta::ToolUseStart {
                        index: i,
                        id,
                        name: name.to_owned(),
                    },
                )?;
                i
            }
        };
        if !fragment.is_empty() {
            if let Some(Slot::Tool { args, .. }) = self.slots.get_mut(index) {
                args.push_str(fragment);
            }
            forward(
                sink,
                Delta::ToolInput {
                    index,
                    partial_json: fragment.to_owned(),
                },
            )?;
        }
        Ok(())
    }

    /// Turns the slots into blocks, closing each one for the listener.
    fn finish(&mut self, sink: &dyn DeltaSink) -> Result<Vec<Block>, ProviderError> {
        let mut blocks = Vec::with_capacity(self.slots.len());
        for (index, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            blocks.push(match slot {
                Slot::Thinking(text) => Block::Thinking {
                    text,
                    signature: None,
                },
                Slot::Text(text) => Block::Text { text, cache: None },
                Slot::Tool { id, name, args } => {
                    let input = parse_arguments(Some(&Value::String(args)), &name)?;
                    Block::ToolUse {
                        id,
                        name,
                        input,
                        validation_errors: None,
                    }
                }
            });
            forward(sink, Delta::BlockStop { index })?;
        }
        Ok(blocks)
    }
}

/// Consumes the SSE stream, forwarding deltas and assembling the final answer.
pub async fn stream(
    mut events: SseStream<'_>,
    sink: &dyn DeltaSink,
    dialect: &Dialect,
) -> Result<ChatResponse, ProviderError> {
    let mut resp = ChatResponse {
        id: String::new(),
        model: String::new(),
        content: Vec::new(),
        stop_reason: StopReason::Other,
        usage: Usage::default(),
        member: None,
    };
    let mut asm = Assembly::default();
    let (mut finished, mut done) = (false, false);
    while let Some(ev) = events.next().await? {
        let data = ev.data.trim();
        if data.is_empty() {
            continue;
        }
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            ProviderError::Protocol(format!("malformed {} stream chunk: {e}", dialect.who))
        })?;
        (dialect.check)(&v)?;
        if let Some(e) = error_object(&v) {
            return Err(e);
        }
        if resp.id.is_empty() {
            resp.id = str_at(&v, "/id").unwrap_or_default().to_owned();
        }
        if resp.model.is_empty() {
            resp.model = str_at(&v, "/model").unwrap_or_default().to_owned();
        }
        let choices = v
            .get("choices")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for choice in choices {
            if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 || finished {
                continue;
            }
            // Only `delta` counts: MiniMax repeats the whole answer as `message` at the end.
            let delta = choice.get("delta").cloned().unwrap_or_default();
            if let Some(r) = str_at(&delta, "/reasoning_content").filter(|s| !s.is_empty()) {
                asm.push_text(true, r);
                forward(sink, Delta::Thinking { text: r.to_owned() })?;
            }
            if let Some(t) = str_at(&delta, "/content").filter(|s| !s.is_empty()) {
                asm.push_text(false, t);
                forward(sink, Delta::Text { text: t.to_owned() })?;
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (position, tc) in calls.iter().enumerate() {
                    asm.tool_delta(tc, position, sink)?;
                }
            }
            if let Some(reason) = str_at(choice, "/finish_reason") {
                resp.stop_reason = stop_reason(Some(reason), !asm.tools.is_empty());
                resp.content = asm.finish(sink)?;
                finished = true;
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            resp.usage = usage(u);
            forward(sink, Delta::Usage(resp.usage))?;
        }
    }
    if !finished {
        return Err(ProviderError::EndedEarly(format!(
            "{} sent no finish_reason",
            dialect.who
        )));
    }
    if dialect.requires_done && !done {
        return Err(ProviderError::EndedEarly(format!(
            "{} sent no [DONE]",
            dialect.who
        )));
    }
    Ok(resp)
}

/// `POST {base}/embeddings` with `{model, input}`.
pub async fn embed(call: &Call<'_>, input: &[String]) -> Result<EmbedResult, ProviderError> {
    let url = format!("{}/embeddings", call.base_url.trim_end_matches('/'));
    let body = json!({"model": call.model, "input": input});
    let v = json_body(post(call, &url, &body).await?, OPENAI.who).await?;
    parse_embeddings(&v)
}

/// Maps an embeddings answer, ordered by each item's `index`.
pub(crate) fn parse_embeddings(v: &Value) -> Result<EmbedResult, ProviderError> {
    if let Some(e) = error_object(v) {
        return Err(e);
    }
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::Protocol("embeddings answer has no `data` array".into()))?;
    let mut items = Vec::with_capacity(data.len());
    for (n, d) in data.iter().enumerate() {
        let index = d.get("index").and_then(Value::as_u64).unwrap_or(n as u64);
        items.push((index, vector(d.get("embedding"))?));
    }
    items.sort_by_key(|(i, _)| *i);
    Ok(EmbedResult {
        embeddings: items.into_iter().map(|(_, e)| e).collect(),
        usage: Usage {
            input_tokens: v
                .pointer("/usage/prompt_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            ..Usage::default()
        },
        member: None,
    })
}

/// A JSON array of numbers as a vector.
pub(crate) fn vector(v: Option<&Value>) -> Result<Vec<f32>, ProviderError> {
    let arr = v
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::Protocol("embedding is not an array of numbers".into()))?;
    arr.iter()
        .map(|x| {
            x.as_f64().map(|f| f as f32).ok_or_else(|| {
                ProviderError::Protocol("embedding is not an array of numbers".into())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{
        assert_deltas_match, cut, serve_once, weather_tool, Collect, Fixture,
    };

    fn conversation() -> Value {
        json!({
            "system": [{"type": "text", "text": "Be brief.", "cache": "1h"}, {"type": "text", "text": "Use metric."}],
            "max_tokens": 500, "temperature": 0.5, "stop": ["END"],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather here?", "cache": "5m"},
                    {"type": "image", "media_type": "image/png", "data": "iVBORw0K"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "text": "need the tool", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Oslo"}}
                ]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Thanks"},
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "no data"}], "is_error": true}
                ]}
            ],
            "tool_choice": {"name": "get_weather"},
            "thinking": {"budget_tokens": 8000},
            "provider_options": {"temperature": 0.9, "seed": 7}
        })
    }

    #[test]
    fn request_body_maps_every_neutral_field() {
        let fx = Fixture::new(conversation(), vec![weather_tool()]);
        let body = request_body(&fx.call("http://x", None));
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "Be brief.\nUse metric."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}
                ]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "Error: no data"},
                {"role": "user", "content": "Thanks"}
            ])
        );
        assert_eq!(body["model"], "test-model");
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "function": {
                "name": "get_weather", "description": "Weather of a city",
                "parameters": weather_tool().input_schema
            }}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        assert_eq!(body["reasoning_effort"], "medium");
        assert_eq!(body["max_tokens"], 500);
        assert_eq!(body["stop"], json!(["END"]));
        // provider_options win over mapped fields and add their own.
        assert_eq!(body["temperature"], 0.9);
        assert_eq!(body["seed"], 7);
        assert!(body.get("stream").is_none() && body.get("stream_options").is_none());
        let text = body.to_string();
        assert!(
            !text.contains("cache") && !text.contains("need the tool"),
            "{text}"
        );
    }

    #[test]
    fn tool_choice_and_reasoning_effort_mappings() {
        for (choice, want) in [
            (json!("auto"), json!("auto")),
            (json!("none"), json!("none")),
            (json!("any"), json!("required")),
        ] {
            let fx = Fixture::new(
                json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": choice}),
                vec![],
            );
            assert_eq!(
                request_body(&fx.call("http://x", None))["tool_choice"],
                want
            );
        }
        for (budget, want) in [
            (1024, "low"),
            (4095, "low"),
            (4096, "medium"),
            (16383, "medium"),
            (16384, "high"),
            (64000, "high"),
        ] {
            assert_eq!(reasoning_effort(budget), want, "budget {budget}");
        }
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let body = request_body(&fx.call("http://x", None));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        for absent in [
            "tools",
            "tool_choice",
            "reasoning_effort",
            "max_tokens",
            "temperature",
            "stop",
        ] {
            assert!(body.get(absent).is_none(), "{absent} should be absent");
        }
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}),
            vec![],
        );
        // Written as given, not as the widened f32 (0.699999988079071).
        assert_eq!(
            request_body(&fx.call("http://x", None))["temperature"].to_string(),
            "0.7"
        );
        let sink = Collect::default();
        let body = request_body(&fx.call("http://x", Some(&sink)));
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn assistant_turn_with_only_tool_calls_has_null_content() {
        let fx = Fixture::new(
            json!({"messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "c", "content": [
                        {"type": "text", "text": "see picture"},
                        {"type": "image", "media_type": "image/jpeg", "data": "/9j/"}
                    ]}
                ]}
            ]}),
            vec![],
        );
        let body = request_body(&fx.call("http://x", None));
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(
            body["messages"][1]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert_eq!(
            body["messages"][2],
            json!({"role": "tool", "tool_call_id": "c", "content": "see picture"})
        );
        // The tool's image still reaches the model, in the user turn that follows.
        assert_eq!(
            body["messages"][3],
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]})
        );
    }

    #[test]
    fn parses_a_text_answer() {
        // The API reference's example answer.
        let v = json!({
            "id": "chatcmpl-123", "object": "chat.completion", "created": 1677652288,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "\n\nHello there, how may I assist you today?"},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                      "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 0}}
        });
        let r = parse_response(&v, "OpenAI").unwrap();
        assert_eq!(
            (r.id.as_str(), r.model.as_str()),
            ("chatcmpl-123", "gpt-4o-mini")
        );
        assert_eq!(
            r.content,
            vec![Block::Text {
                text: "\n\nHello there, how may I assist you today?".into(),
                cache: None
            }]
        );
        assert_eq!(r.stop_reason, StopReason::EndTurn);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 5,
                output_tokens: 12,
                cache_read_tokens: 4,
                cache_write_tokens: 0
            }
        );
    }

    #[test]
    fn parses_tool_calls_and_reasoning() {
        let v = json!({
            "id": "x", "model": "deepseek-reasoner",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null, "reasoning_content": "The user wants weather.",
                "tool_calls": [
                    {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                    {"type": "function", "function": {"name": "noop", "arguments": ""}}
                ]}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
        });
        let r = parse_response(&v, "OpenAI").unwrap();
        assert_eq!(
            r.content,
            vec![
                Block::Thinking {
                    text: "The user wants weather.".into(),
                    signature: None
                },
                Block::ToolUse {
                    id: "call_abc".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Paris"}),
                    validation_errors: None
                },
                Block::ToolUse {
                    id: "call_1".into(),
                    name: "noop".into(),
                    input: json!({}),
                    validation_errors: None
                },
            ]
        );
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!((r.usage.input_tokens, r.usage.cache_read_tokens), (36, 64));
    }

    #[test]
    fn unparseable_arguments_are_a_protocol_error() {
        let v = json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "}}]}}]});
        match parse_response(&v, "OpenAI") {
            Err(ProviderError::Protocol(m)) => assert!(m.contains("get_weather"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finish_reasons_and_error_bodies() {
        let answer = |reason: &str| json!({"choices": [{"index": 0, "finish_reason": reason, "message": {"role": "assistant", "content": "x"}}]});
        for (reason, want) in [
            ("stop", StopReason::EndTurn),
            ("length", StopReason::MaxTokens),
            ("tool_calls", StopReason::ToolUse),
            ("content_filter", StopReason::Other),
        ] {
            assert_eq!(
                parse_response(&answer(reason), "OpenAI")
                    .unwrap()
                    .stop_reason,
                want
            );
        }
        let err = json!({"error": {"message": "The server is overloaded", "type": "server_error", "code": null}});
        assert!(matches!(
            parse_response(&err, "OpenAI"),
            Err(ProviderError::Stream { kind, message }) if kind == "server_error" && message.contains("overloaded")
        ));
        assert!(matches!(
            parse_response(&json!({"choices": []}), "OpenAI"),
            Err(ProviderError::Protocol(_))
        ));
    }

    /// One `data:` line of a chat.completion.chunk.
    fn chunk(delta: Value, finish: Option<&str>) -> String {
        let c = json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "system_fingerprint": "fp", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    }

    fn tool_transcript() -> String {
        let mut t = String::new();
        t += &chunk(json!({"role": "assistant", "content": ""}), None);
        t += &chunk(json!({"content": "Checking "}), None);
        t += &chunk(json!({"content": "both, café ☕"}), None);
        t += &chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
            None,
        );
        t += &chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}),
            None,
        );
        t += &chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Pa"}}]}),
            None,
        );
        t += &chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "ris\"}"}}]}),
            None,
        );
        t += &chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":"}}]}),
            None,
        );
        t += &chunk(
            json!({"tool_calls": [{"index": 1, "function": {"arguments": " \"Oslo\"}"}}]}),
            None,
        );
        t += &chunk(json!({}), Some("tool_calls"));
        t += "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":30,\"total_tokens\":80,\"prompt_tokens_details\":{\"cached_tokens\":20}}}\n\n";
        t += "data: [DONE]\n\n";
        t
    }

    async fn stream_through(
        transcript: &str,
        size: usize,
        fx: &Fixture,
        sink: &Collect,
    ) -> (
        Result<ChatResponse, ProviderError>,
        crate::providers::test_support::Seen,
    ) {
        let (base, seen) = serve_once(200, "text/event-stream", cut(transcript, size)).await;
        let base = format!("{base}/v1");
        let r = chat(&fx.call(&base, Some(sink))).await;
        (r, seen.await.unwrap())
    }

    #[tokio::test]
    async fn streams_text_and_tool_calls_split_anywhere() {
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "weather in Paris and Oslo?"}]}),
            vec![weather_tool()],
        );
        let transcript = tool_transcript();
        for size in [1, 2, 7, 31, 4096] {
            let sink = Collect::default();
            let (r, seen) = stream_through(&transcript, size, &fx, &sink).await;
            let r = r.unwrap_or_else(|e| panic!("split {size}: {e}"));
            assert_eq!(seen.path, "/v1/chat/completions");
            assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
            assert_eq!(seen.body["stream"], true);
            assert_eq!(
                r.content,
                vec![
                    Block::Text {
                        text: "Checking both, café ☕".into(),
                        cache: None
                    },
                    Block::ToolUse {
                        id: "call_a".into(),
                        name: "get_weather".into(),
                        input: json!({"city": "Paris"}),
                        validation_errors: None
                    },
                    Block::ToolUse {
                        id: "call_b".into(),
                        name: "get_weather".into(),
                        input: json!({"city": "Oslo"}),
                        validation_errors: None
                    },
                ],
                "split {size}"
            );
            assert_eq!(r.stop_reason, StopReason::ToolUse);
            assert_eq!((r.id.as_str(), r.model.as_str()), ("chatcmpl-9", "gpt-4o"));
            assert_eq!(
                r.usage,
                Usage {
                    input_tokens: 30,
                    output_tokens: 30,
                    cache_read_tokens: 20,
                    cache_write_tokens: 0
                }
            );
            let deltas = sink.take();
            assert_deltas_match(&deltas, &r.content);
            assert_eq!(
                deltas[..4],
                [
                    Delta::Text {
                        text: "Checking ".into()
                    },
                    Delta::Text {
                        text: "both, café ☕".into()
                    },
                    Delta::ToolUseStart {
                        index: 1,
                        id: "call_a".into(),
                        name: "get_weather".into()
                    },
                    Delta::ToolInput {
                        index: 1,
                        partial_json: "{\"ci".into()
                    },
                ]
            );
            assert_eq!(
                deltas[deltas.len() - 4..],
                [
                    Delta::BlockStop { index: 0 },
                    Delta::BlockStop { index: 1 },
                    Delta::BlockStop { index: 2 },
                    Delta::Usage(r.usage),
                ]
            );
        }
    }

    #[tokio::test]
    async fn streams_deepseek_reasoning_as_thinking() {
        let mut t = String::new();
        t += &chunk(
            json!({"role": "assistant", "content": null, "reasoning_content": "Hmm, "}),
            None,
        );
        t += &chunk(
            json!({"content": null, "reasoning_content": "two plus two."}),
            None,
        );
        t += &chunk(json!({"content": "4", "reasoning_content": null}), None);
        t += &chunk(json!({"content": ""}), Some("stop"));
        t += "data: [DONE]\n\n";
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "2+2?"}]}),
            vec![],
        );
        let sink = Collect::default();
        let (r, _) = stream_through(&t, 3, &fx, &sink).await;
        let r = r.unwrap();
        assert_eq!(
            r.content,
            vec![
                Block::Thinking {
                    text: "Hmm, two plus two.".into(),
                    signature: None
                },
                Block::Text {
                    text: "4".into(),
                    cache: None
                },
            ]
        );
        assert_eq!(r.stop_reason, StopReason::EndTurn);
        let deltas = sink.take();
        assert_deltas_match(&deltas, &r.content);
        assert_eq!(
            deltas[0],
            Delta::Thinking {
                text: "Hmm, ".into()
            }
        );
    }

    #[tokio::test]
    async fn broken_streams_are_errors() {
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let text = chunk(json!({"content": "Hi"}), None);
        let finished = format!("{text}{}", chunk(json!({}), Some("stop")));
        let cases: Vec<(String, &str)> = vec![
            (format!("{text}data: {{\"error\": {{\"message\": \"overloaded\", \"type\": \"overloaded_error\"}}}}\n\n"), "stream"),
            (format!("{text}data: {{\"choices\": [{{\"delta\": \n\n"), "malformed"),
            (format!("{text}data: [DONE]\n\n"), "finish_reason"),
            (finished, "[DONE]"),
        ];
        for (transcript, want) in cases {
            let sink = Collect::default();
            let (r, _) = stream_through(&transcript, 5, &fx, &sink).await;
            match (r, want) {
                (Err(ProviderError::Stream { kind, message }), "stream") => {
                    assert_eq!(
                        (kind.as_str(), message.as_str()),
                        ("overloaded_error", "overloaded")
                    );
                }
                (Err(ProviderError::Protocol(m) | ProviderError::EndedEarly(m)), want)
                    if want != "stream" =>
                {
                    assert!(m.contains(want), "{m} should mention {want}");
                }
                (other, _) => panic!("{want}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn unparseable_streamed_arguments_are_an_error() {
        let mut t = String::new();
        t += &chunk(
            json!({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "get_weather", "arguments": "{\"city\""}}]}),
            None,
        );
        t += &chunk(json!({}), Some("tool_calls"));
        t += "data: [DONE]\n\n";
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![weather_tool()],
        );
        let sink = Collect::default();
        let (r, _) = stream_through(&t, 4, &fx, &sink).await;
        assert!(matches!(r, Err(ProviderError::Protocol(m)) if m.contains("get_weather")));
        // The broken block is never reported as complete.
        assert!(!sink.take().contains(&Delta::BlockStop { index: 0 }));
    }

    #[tokio::test]
    async fn a_listener_that_went_away_cancels_the_stream() {
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let sink = Collect {
            limit: Some(1),
            ..Collect::default()
        };
        let (r, _) = stream_through(&tool_transcript(), 64, &fx, &sink).await;
        assert!(matches!(r, Err(ProviderError::Cancelled)), "{r:?}");
        assert_eq!(sink.take().len(), 1);
    }

    #[tokio::test]
    async fn http_errors_keep_status_body_and_retry_after() {
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        let (base, _seen) = serve_once(429, "application/json", vec![body.to_vec()]).await;
        let e = chat(&fx.call(&base, None)).await.unwrap_err();
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(7)));
        match e {
            ProviderError::Http { status, body, .. } => {
                assert_eq!(status, 429);
                assert!(body.contains("rate_limit_exceeded"));
                assert!(!body.contains("sk-test-secret"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_json_answer_to_a_stream_request_surfaces_its_error() {
        let fx = Fixture::new(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let body = br#"{"error":{"message":"model not found","type":"invalid_request_error"}}"#;
        let (base, _seen) = serve_once(200, "application/json", vec![body.to_vec()]).await;
        let sink = Collect::default();
        let r = chat(&fx.call(&base, Some(&sink))).await;
        assert!(
            matches!(&r, Err(ProviderError::Stream { kind, .. }) if kind == "invalid_request_error"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn non_streaming_call_posts_and_parses() {
        let fx = Fixture::new(conversation(), vec![weather_tool()]);
        let answer = json!({"id": "c1", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Sunny."}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}});
        let (base, seen) = serve_once(200, "application/json", cut(&answer.to_string(), 10)).await;
        let r = chat(&fx.call(&format!("{base}/v1/"), None)).await.unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.body, request_body(&fx.call("x", None)));
        assert_eq!(
            r.content,
            vec![Block::Text {
                text: "Sunny.".into(),
                cache: None
            }]
        );
    }

    #[tokio::test]
    async fn embeddings_come_back_in_input_order() {
        let answer = json!({"object": "list", "model": "text-embedding-3-small",
            "data": [
                {"object": "embedding", "index": 1, "embedding": [0.5, -1.0]},
                {"object": "embedding", "index": 0, "embedding": [0.25, 2.0]}
            ],
            "usage": {"prompt_tokens": 8, "total_tokens": 8}});
        let (base, seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let fx = Fixture::new(json!({"messages": []}), vec![]);
        let input = vec!["first".to_owned(), "second".to_owned()];
        let r = crate::providers::embed(
            crate::config::Provider::OpenaiCompat,
            &fx.http,
            &format!("{base}/v1"),
            &fx.headers,
            None,
            &input,
            crate::providers::Timeouts::default(),
        )
        .await
        .unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(seen.path, "/v1/embeddings");
        assert_eq!(
            seen.body,
            json!({"model": "text-embedding-3-small", "input": ["first", "second"]})
        );
        assert_eq!(r.embeddings, vec![vec![0.25, 2.0], vec![0.5, -1.0]]);
        assert_eq!(r.usage.input_tokens, 8);
        assert!(matches!(
            parse_embeddings(&json!({"data": [{"embedding": ["x"]}]})),
            Err(ProviderError::Protocol(_))
        ));
    }
}
