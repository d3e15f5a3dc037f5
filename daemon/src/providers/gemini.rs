//! Google Gemini: `POST {base}/models/{model}:generateContent`, or
//! `:streamGenerateContent?alt=sse` where every `data:` is a whole GenerateContentResponse
//! chunk.
//!
//! Thought signatures: Gemini attaches an opaque `thoughtSignature` to some parts and needs
//! it back on the same part in later turns (function calls fail without it on Gemini 3).
//! The neutral shape has no field for it, so a signature becomes a `thinking` block with
//! empty text placed right before the block of the part that carried it; on the way back
//! such a block puts its signature on the next part of the message.

use super::sse::SseStream;
use super::{forward, json_body, merge_options, post, Call, DeltaSink, ProviderError};
use llmd_proto::chat::{
    Block, ChatResponse, Content, Delta, EmbedResult, Message, Role, StopReason, ToolChoice,
    ToolMode, Usage,
};
use serde_json::{json, Map, Value};

/// Embedding model when the request names none.
pub const DEFAULT_EMBED_MODEL: &str = "text-embedding-004";

/// `models/gemini-x` and `gemini-x` name the same model; URLs want the bare name.
fn model_name(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// One call, streaming when the caller gave a sink.
pub async fn chat(call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    let body = request_body(call)?;
    let base = call.base_url.trim_end_matches('/');
    let model = model_name(call.model);
    let url = match call.stream {
        None => format!("{base}/models/{model}:generateContent"),
        Some(_) => format!("{base}/models/{model}:streamGenerateContent?alt=sse"),
    };
    let resp = post(call, &url, &body).await?;
    match call.stream {
        None => parse_response(&json_body(resp, "Gemini").await?, call.model),
        Some(sink) => stream(SseStream::new(resp, call), sink, call.model).await,
    }
}

fn text_of(c: &Content) -> String {
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

/// The function name of the latest `tool_use` with `id` before this message: Gemini
/// matches a function response by name, not by id.
fn tool_name<'a>(earlier: &'a [Message], id: &str) -> Option<&'a str> {
    earlier.iter().rev().find_map(|m| match &m.content {
        Content::Blocks(bs) => bs.iter().rev().find_map(|b| match b {
            Block::ToolUse { id: i, name, .. } if i == id => Some(name.as_str()),
            _ => None,
        }),
        Content::Text(_) => None,
    })
}

/// The parts of one message; `earlier` is the conversation before it.
fn parts(content: &Content, earlier: &[Message]) -> Result<Vec<Value>, ProviderError> {
    let mut out = Vec::new();
    let mut signature: Option<String> = None;
    for b in content.blocks() {
        let mut part = match b {
            Block::Text { text, .. } => json!({"text": text}),
            Block::Image { media_type, data } => {
                json!({"inlineData": {"mimeType": media_type, "data": data}})
            }
            Block::ToolUse { name, input, .. } => {
                json!({"functionCall": {"name": name, "args": input}})
            }
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let name = tool_name(earlier, &tool_use_id).ok_or_else(|| {
                    ProviderError::Protocol(format!(
                        "tool_result `{tool_use_id}` answers no earlier tool_use, and Gemini needs the function name"
                    ))
                })?;
                // Gemini reads an `error` key as a failed call.
                let key = if is_error { "error" } else { "content" };
                out.push(json!({"functionResponse": {"name": name, "response": {key: text_of(&content)}}}));
                if let Content::Blocks(inner) = &content {
                    for ib in inner {
                        if let Block::Image { media_type, data } = ib {
                            out.push(json!({"inlineData": {"mimeType": media_type, "data": data}}));
                        }
                    }
                }
                continue;
            }
            Block::Thinking { text, signature: s } if text.is_empty() => {
                signature = s.or(signature);
                continue;
            }
            Block::Thinking { text, signature: s } => {
                let mut p = json!({"text": text, "thought": true});
                if let Some(s) = s {
                    p["thoughtSignature"] = s.into();
                }
                p
            }
            // Refused in requests before any provider sees them (`chat::check_request`).
            Block::Unknown => continue,
        };
        if let Some(s) = signature.take() {
            part["thoughtSignature"] = s.into();
        }
        out.push(part);
    }
    if let Some(s) = signature {
        out.push(json!({"text": "", "thoughtSignature": s}));
    }
    Ok(out)
}

fn function_declaration(t: &llmd_proto::chat::ToolDef) -> Value {
    let mut d = json!({"name": t.name});
    if !t.description.is_empty() {
        d["description"] = t.description.clone().into();
    }
    let params = crate::tools::gemini_schema(&t.input_schema);
    // Gemini rejects an OBJECT without properties; a tool without arguments has none.
    let no_args = params.get("type").and_then(Value::as_str) == Some("object")
        && params
            .get("properties")
            .and_then(Value::as_object)
            .is_none_or(Map::is_empty);
    if !no_args {
        d["parameters"] = params;
    }
    d
}

/// The request body for `call`; fails when a tool result cannot be named.
pub fn request_body(call: &Call<'_>) -> Result<Value, ProviderError> {
    let r = call.request;
    let mut body = Map::new();
    if let Some(system) = &r.system {
        let parts: Vec<Value> = system
            .blocks()
            .iter()
            .filter_map(|b| match b {
                Block::Text { text, .. } => Some(json!({"text": text})),
                _ => None,
            })
            .collect();
        body.insert("systemInstruction".into(), json!({"parts": parts}));
    }
    let mut contents = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.iter().enumerate() {
        let p = parts(&m.content, &r.messages[..i])?;
        if p.is_empty() {
            // Gemini rejects a turn without parts.
            continue;
        }
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "model",
        };
        contents.push(json!({"role": role, "parts": p}));
    }
    body.insert("contents".into(), contents.into());
    if !call.tools.is_empty() {
        let decls: Vec<Value> = call.tools.iter().map(function_declaration).collect();
        body.insert("tools".into(), json!([{"functionDeclarations": decls}]));
    }
    if let Some(choice) = &r.tool_choice {
        let cfg = match choice {
            ToolChoice::Mode(ToolMode::Auto) => json!({"mode": "AUTO"}),
            ToolChoice::Mode(ToolMode::Any) => json!({"mode": "ANY"}),
            ToolChoice::Mode(ToolMode::None) => json!({"mode": "NONE"}),
            ToolChoice::Named { name } => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        body.insert("toolConfig".into(), json!({"functionCallingConfig": cfg}));
    }
    let mut gen = Map::new();
    if let Some(m) = r.max_tokens {
        gen.insert("maxOutputTokens".into(), m.into());
    }
    if let Some(t) = r.temperature {
        gen.insert("temperature".into(), super::f32_json(t));
    }
    if !r.stop.is_empty() {
        gen.insert("stopSequences".into(), r.stop.clone().into());
    }
    if let Some(t) = r.thinking {
        gen.insert(
            "thinkingConfig".into(),
            json!({"thinkingBudget": t.budget_tokens, "includeThoughts": true}),
        );
    }
    if !gen.is_empty() {
        body.insert("generationConfig".into(), gen.into());
    }
    let mut body = Value::Object(body);
    merge_options(&mut body, r.provider_options.as_ref());
    Ok(body)
}

/// An `error` object (in a 200 answer or a stream chunk).
fn error_object(v: &Value) -> Option<ProviderError> {
    let e = v.get("error").filter(|e| e.is_object())?;
    Some(ProviderError::Stream {
        kind: e
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| e.get("code").map(Value::to_string))
            .unwrap_or_else(|| "error".into()),
        message: e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

fn usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("cachedContentTokenCount");
    Usage {
        // `promptTokenCount` includes the cached part.
        input_tokens: n("promptTokenCount").saturating_sub(cached),
        // Thinking is billed as output, as it is with the other providers.
        output_tokens: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
    }
}

/// Discards deltas (the non-streaming path shares the stream assembly).
struct NoSink;

impl DeltaSink for NoSink {
    fn send(&self, _delta: Delta) -> bool {
        true
    }
}

/// Builds the answer from parts as they arrive, forwarding deltas. Consecutive text (or
/// thought) parts form one block; every function call is a block of its own.
struct Assembly<'a> {
    sink: &'a dyn DeltaSink,
    blocks: Vec<Block>,
    /// The text or thinking block still growing.
    open: Option<usize>,
    calls: usize,
}

impl<'a> Assembly<'a> {
    fn new(sink: &'a dyn DeltaSink) -> Self {
        Assembly {
            sink,
            blocks: Vec::new(),
            open: None,
            calls: 0,
        }
    }

    fn close(&mut self) -> Result<(), ProviderError> {
        match self.open.take() {
            Some(index) => forward(self.sink, Delta::BlockStop { index }),
            None => Ok(()),
        }
    }

    fn part(&mut self, p: &Value) -> Result<(), ProviderError> {
        if let Some(sig) = p
            .get("thoughtSignature")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            self.close()?;
            self.blocks.push(Block::Thinking {
                text: String::new(),
                signature: Some(sig.to_owned()),
            });
        }
        if let Some(fc) = p.get("functionCall") {
            self.close()?;
            let name = fc.get("name").and_then(Value::as_str).ok_or_else(|| {
                ProviderError::Protocol("Gemini functionCall without name".into())
            })?;
            let id = fc
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map_or_else(|| format!("call_{}", self.calls), str::to_owned);
            self.calls += 1;
            let input = fc
                .get("args")
                .filter(|a| !a.is_null())
                .cloned()
                .unwrap_or_else(|| json!({}));
            let index = self.blocks.len();
            let partial_json = input.to_string();
            self.blocks.push(Block::ToolUse {
                id: id.clone(),
                name: name.to_owned(),
                input,
                validation_errors: None,
            });
            forward(
                self.sink,
                Delta::ToolUseStart {
                    index,
                    id,
                    name: name.to_owned(),
                },
            )?;
            forward(
                self.sink,
                Delta::ToolInput {
                    index,
                    partial_json,
                },
            )?;
            return forward(self.sink, Delta::BlockStop { index });
        }
        let Some(text) = p
            .get("text")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        else {
            // Empty text, or parts we do not model (executable code, files).
            return Ok(());
        };
        let thought = p.get("thought").and_then(Value::as_bool) == Some(true);
        let grows = match self.open.and_then(|i| self.blocks.get_mut(i)) {
            Some(Block::Text { text: t, .. }) if !thought => Some(t),
            Some(Block::Thinking { text: t, .. }) if thought => Some(t),
            _ => None,
        };
        match grows {
            Some(t) => t.push_str(text),
            None => {
                self.close()?;
                self.open = Some(self.blocks.len());
                self.blocks.push(if thought {
                    Block::Thinking {
                        text: text.to_owned(),
                        signature: None,
                    }
                } else {
                    Block::Text {
                        text: text.to_owned(),
                        cache: None,
                    }
                });
            }
        }
        forward(
            self.sink,
            if thought {
                Delta::Thinking {
                    text: text.to_owned(),
                }
            } else {
                Delta::Text {
                    text: text.to_owned(),
                }
            },
        )
    }

    /// Takes in one GenerateContentResponse (whole answer or stream chunk); returns the
    /// finish reason when this chunk carries one.
    fn chunk(&mut self, v: &Value) -> Result<Option<StopReason>, ProviderError> {
        if let Some(e) = error_object(v) {
            return Err(e);
        }
        let Some(candidate) = v.pointer("/candidates/0") else {
            // A blocked prompt has no candidates, only the reason.
            if v.pointer("/promptFeedback/blockReason").is_some() {
                self.close()?;
                return Ok(Some(StopReason::Other));
            }
            return Ok(None);
        };
        let parts = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in parts {
            self.part(p)?;
        }
        let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) else {
            return Ok(None);
        };
        self.close()?;
        Ok(Some(match reason {
            "STOP" if self.calls > 0 => StopReason::ToolUse,
            "STOP" => StopReason::EndTurn,
            "MAX_TOKENS" => StopReason::MaxTokens,
            _ => StopReason::Other,
        }))
    }
}

fn str_or(v: &Value, key: &str, default: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_owned()
}

/// Maps a non-streaming GenerateContentResponse.
pub fn parse_response(v: &Value, model: &str) -> Result<ChatResponse, ProviderError> {
    if v.get("candidates").is_none() && v.get("promptFeedback").is_none() {
        if let Some(e) = error_object(v) {
            return Err(e);
        }
        return Err(ProviderError::Protocol(
            "Gemini answer has no candidates".into(),
        ));
    }
    let mut asm = Assembly::new(&NoSink);
    let stop = asm.chunk(v)?.unwrap_or(StopReason::Other);
    Ok(ChatResponse {
        id: str_or(v, "responseId", ""),
        model: str_or(v, "modelVersion", model),
        content: asm.blocks,
        stop_reason: stop,
        usage: v.get("usageMetadata").map(usage).unwrap_or_default(),
        member: None,
    })
}

/// Consumes the SSE stream, forwarding deltas and assembling the final answer.
pub async fn stream(
    mut events: SseStream<'_>,
    sink: &dyn DeltaSink,
    model: &str,
) -> Result<ChatResponse, ProviderError> {
    let mut asm = Assembly::new(sink);
    let (mut id, mut model_version) = (String::new(), String::new());
    let mut stop: Option<StopReason> = None;
    let mut u: Option<Usage> = None;
    while let Some(ev) = events.next().await? {
        if ev.data.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data)
            .map_err(|e| ProviderError::Protocol(format!("malformed Gemini stream chunk: {e}")))?;
        if id.is_empty() {
            id = str_or(&v, "responseId", "");
        }
        if model_version.is_empty() {
            model_version = str_or(&v, "modelVersion", "");
        }
        if let Some(m) = v.get("usageMetadata") {
            u = Some(usage(m));
        }
        if stop.is_some() {
            // Only usage may follow the finish.
            continue;
        }
        stop = asm.chunk(&v)?;
    }
    let Some(stop_reason) = stop else {
        return Err(ProviderError::EndedEarly(
            "Gemini sent no finishReason".into(),
        ));
    };
    if let Some(u) = u {
        forward(sink, Delta::Usage(u))?;
    }
    Ok(ChatResponse {
        id,
        model: if model_version.is_empty() {
            model.to_owned()
        } else {
            model_version
        },
        content: asm.blocks,
        stop_reason,
        usage: u.unwrap_or_default(),
        member: None,
    })
}

/// `POST {base}/models/{model}:batchEmbedContents`, one request per input text.
pub async fn embed(call: &Call<'_>, input: &[String]) -> Result<EmbedResult, ProviderError> {
    let model = model_name(call.model);
    let url = format!(
        "{}/models/{model}:batchEmbedContents",
        call.base_url.trim_end_matches('/')
    );
    let requests: Vec<Value> = input
        .iter()
        .map(|t| json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}}))
        .collect();
    let v = json_body(
        post(call, &url, &json!({"requests": requests})).await?,
        "Gemini",
    )
    .await?;
    parse_embeddings(&v)
}

fn parse_embeddings(v: &Value) -> Result<EmbedResult, ProviderError> {
    if let Some(e) = error_object(v) {
        return Err(e);
    }
    let items = v
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ProviderError::Protocol("Gemini embeddings answer has no `embeddings` array".into())
        })?;
    Ok(EmbedResult {
        embeddings: items
            .iter()
            .map(|e| super::openai::vector(e.get("values")))
            .collect::<Result<_, _>>()?,
        // batchEmbedContents reports no token counts.
        usage: Usage::default(),
        member: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{
        assert_deltas_match, cut, serve_once, weather_tool, Collect, Fixture, Seen,
    };
    use llmd_proto::chat::ToolDef;

    fn gemini_fixture(request: Value, tools: Vec<ToolDef>) -> Fixture {
        let mut fx = Fixture::new(request, tools);
        fx.headers = [("x-goog-api-key".to_owned(), "AIza-test-secret".to_owned())].into();
        fx.model = "gemini-2.5-flash".into();
        fx
    }

    fn conversation() -> Value {
        json!({
            "system": [{"type": "text", "text": "Be brief.", "cache": "5m"}, {"type": "text", "text": "Use metric."}],
            "max_tokens": 800, "temperature": 0.3, "stop": ["END"],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is on this picture, and the weather?"},
                    {"type": "image", "media_type": "image/png", "data": "iVBORw0K"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_0", "name": "lookup", "input": {"q": "x"}}
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "a cat"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "A cat. Now the weather."},
                    {"type": "thinking", "text": "", "signature": "c2lnLTE="},
                    {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_0", "content": [{"type": "text", "text": "station down"}], "is_error": true},
                    {"type": "text", "text": "Try again?"}
                ]}
            ],
            "tool_choice": {"name": "get_weather"},
            "thinking": {"budget_tokens": 2048},
            "provider_options": {"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]}
        })
    }

    #[test]
    fn request_body_maps_every_neutral_field() {
        let no_args = ToolDef {
            name: "now".into(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
        };
        let fx = gemini_fixture(conversation(), vec![weather_tool(), no_args]);
        let body = request_body(&fx.call("http://x", None)).unwrap();
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}, {"text": "Use metric."}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [
                    {"text": "What is on this picture, and the weather?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}}
                ]},
                {"role": "model", "parts": [{"functionCall": {"name": "lookup", "args": {"q": "x"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "lookup", "response": {"content": "a cat"}}}]},
                {"role": "model", "parts": [
                    {"text": "A cat. Now the weather."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLTE="}
                ]},
                // The id `call_0` was used twice: the latest call before the result names it.
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"error": "station down"}}},
                    {"text": "Try again?"}
                ]}
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"functionDeclarations": [
                {"name": "get_weather", "description": "Weather of a city",
                 "parameters": crate::tools::gemini_schema(&weather_tool().input_schema)},
                {"name": "now"}
            ]}])
        );
        assert_eq!(
            body["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 800, "temperature": 0.3, "stopSequences": ["END"],
                   "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": true}})
        );
        assert_eq!(body["safetySettings"][0]["threshold"], "BLOCK_NONE");
        assert!(!body.to_string().contains("cache"));
    }

    #[test]
    fn tool_choice_modes_and_options_override() {
        for (choice, mode) in [("auto", "AUTO"), ("any", "ANY"), ("none", "NONE")] {
            let fx = gemini_fixture(
                json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
                       "max_tokens": 10, "provider_options": {"generationConfig": {"candidateCount": 1}}}),
                vec![],
            );
            let body = request_body(&fx.call("http://x", None)).unwrap();
            assert_eq!(
                body["toolConfig"],
                json!({"functionCallingConfig": {"mode": mode}})
            );
            // Merging is shallow and last: the option replaces the mapped object.
            assert_eq!(body["generationConfig"], json!({"candidateCount": 1}));
        }
        let fx = gemini_fixture(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let body = request_body(&fx.call("http://x", None)).unwrap();
        assert_eq!(
            body,
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
    }

    #[test]
    fn a_tool_result_without_its_call_is_refused() {
        let fx = gemini_fixture(
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}),
            vec![],
        );
        match request_body(&fx.call("http://x", None)) {
            Err(ProviderError::Protocol(m)) => assert!(m.contains("nope"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_text_thoughts_calls_and_usage() {
        let v = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "Let me think about the weather.", "thought": true},
                {"text": "I'll check "},
                {"text": "both cities."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                {"functionCall": {"id": "fc-7", "name": "get_weather", "args": {"city": "Oslo"}}}
            ]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 30, "thoughtsTokenCount": 12,
                              "cachedContentTokenCount": 100, "totalTokenCount": 162},
            "modelVersion": "gemini-2.5-flash-001", "responseId": "resp-1"
        });
        let r = parse_response(&v, "gemini-2.5-flash").unwrap();
        assert_eq!(
            r.content,
            vec![
                Block::Thinking {
                    text: "Let me think about the weather.".into(),
                    signature: None
                },
                Block::Text {
                    text: "I'll check both cities.".into(),
                    cache: None
                },
                Block::Thinking {
                    text: String::new(),
                    signature: Some("c2ln".into())
                },
                Block::ToolUse {
                    id: "call_0".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Paris"}),
                    validation_errors: None
                },
                Block::ToolUse {
                    id: "fc-7".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Oslo"}),
                    validation_errors: None
                },
            ]
        );
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            (r.id.as_str(), r.model.as_str()),
            ("resp-1", "gemini-2.5-flash-001")
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 20,
                output_tokens: 42,
                cache_read_tokens: 100,
                cache_write_tokens: 0
            }
        );

        // Sending the answer back puts the signature on the call that carried it.
        let fx = gemini_fixture(
            json!({"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": r.content}]}),
            vec![],
        );
        let body = request_body(&fx.call("http://x", None)).unwrap();
        assert_eq!(
            body["contents"][1]["parts"],
            json!([
                {"text": "Let me think about the weather.", "thought": true},
                {"text": "I'll check both cities."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
            ])
        );
    }

    #[test]
    fn finish_reasons_blocks_and_errors() {
        let answer = |reason: &str| json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": reason}]});
        for (reason, want) in [
            ("STOP", StopReason::EndTurn),
            ("MAX_TOKENS", StopReason::MaxTokens),
            ("SAFETY", StopReason::Other),
            ("MALFORMED_FUNCTION_CALL", StopReason::Other),
        ] {
            assert_eq!(
                parse_response(&answer(reason), "m").unwrap().stop_reason,
                want,
                "{reason}"
            );
        }
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}});
        let r = parse_response(&blocked, "m").unwrap();
        assert_eq!(
            (r.content.len(), r.stop_reason, r.model.as_str()),
            (0, StopReason::Other, "m")
        );
        let err = json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}});
        assert!(
            matches!(parse_response(&err, "m"), Err(ProviderError::Stream { kind, .. }) if kind == "UNAVAILABLE")
        );
        assert!(matches!(
            parse_response(&json!({}), "m"),
            Err(ProviderError::Protocol(_))
        ));
    }

    fn data(v: Value) -> String {
        format!("data: {v}\r\n\r\n")
    }

    fn stream_transcript() -> String {
        let mut t = String::new();
        t += &data(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Planning… ", "thought": true}]}, "index": 0}], "modelVersion": "gemini-2.5-flash", "responseId": "r-9"}),
        );
        t += &data(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Sure, "}]}, "index": 0}], "modelVersion": "gemini-2.5-flash", "responseId": "r-9"}),
        );
        t += &data(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "checking Paris ☀"}]}, "index": 0}]}),
        );
        t += &data(
            json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "units": {"temp": "C"}}}, "thoughtSignature": "c2ln"}
        ]}, "index": 0}]}),
        );
        t += &data(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 9, "totalTokenCount": 49}}),
        );
        t
    }

    async fn stream_through(
        transcript: &str,
        size: usize,
        fx: &Fixture,
        sink: &Collect,
    ) -> (Result<ChatResponse, ProviderError>, Seen) {
        let (base, seen) = serve_once(200, "text/event-stream", cut(transcript, size)).await;
        let r = chat(&fx.call(&format!("{base}/v1beta"), Some(sink))).await;
        (r, seen.await.unwrap())
    }

    #[tokio::test]
    async fn streams_text_then_a_whole_function_call() {
        let fx = gemini_fixture(
            json!({"messages": [{"role": "user", "content": "weather?"}]}),
            vec![weather_tool()],
        );
        for size in [1, 3, 17, 4096] {
            let sink = Collect::default();
            let (r, seen) = stream_through(&stream_transcript(), size, &fx, &sink).await;
            let r = r.unwrap_or_else(|e| panic!("split {size}: {e}"));
            assert_eq!(
                seen.path,
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
            );
            assert_eq!(seen.headers["x-goog-api-key"], "AIza-test-secret");
            assert_eq!(
                r.content,
                vec![
                    Block::Thinking {
                        text: "Planning… ".into(),
                        signature: None
                    },
                    Block::Text {
                        text: "Sure, checking Paris ☀".into(),
                        cache: None
                    },
                    Block::Thinking {
                        text: String::new(),
                        signature: Some("c2ln".into())
                    },
                    Block::ToolUse {
                        id: "call_0".into(),
                        name: "get_weather".into(),
                        input: json!({"city": "Paris", "units": {"temp": "C"}}),
                        validation_errors: None
                    },
                ],
                "split {size}"
            );
            assert_eq!((r.stop_reason, r.id.as_str()), (StopReason::ToolUse, "r-9"));
            assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (40, 9));
            let deltas = sink.take();
            assert_deltas_match(&deltas, &r.content);
            assert_eq!(
                deltas,
                vec![
                    Delta::Thinking {
                        text: "Planning… ".into()
                    },
                    Delta::BlockStop { index: 0 },
                    Delta::Text {
                        text: "Sure, ".into()
                    },
                    Delta::Text {
                        text: "checking Paris ☀".into()
                    },
                    Delta::BlockStop { index: 1 },
                    Delta::ToolUseStart {
                        index: 3,
                        id: "call_0".into(),
                        name: "get_weather".into()
                    },
                    Delta::ToolInput {
                        index: 3,
                        partial_json: r#"{"city":"Paris","units":{"temp":"C"}}"#.into()
                    },
                    Delta::BlockStop { index: 3 },
                    Delta::Usage(r.usage),
                ]
            );
        }
    }

    #[tokio::test]
    async fn broken_streams_are_errors() {
        let fx = gemini_fixture(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let text = data(
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}}]}),
        );
        let sink = Collect::default();
        let (r, _) = stream_through(&text, 4, &fx, &sink).await;
        assert!(
            matches!(&r, Err(ProviderError::EndedEarly(m)) if m.contains("finishReason")),
            "{r:?}"
        );
        let err = format!(
            "{text}{}",
            data(
                json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}})
            )
        );
        let (r, _) = stream_through(&err, 4, &fx, &sink).await;
        assert!(
            matches!(&r, Err(ProviderError::Stream { kind, .. }) if kind == "RESOURCE_EXHAUSTED"),
            "{r:?}"
        );
        let bad = format!("{text}data: {{\"candidates\": [\n\n");
        let (r, _) = stream_through(&bad, 4, &fx, &sink).await;
        assert!(
            matches!(&r, Err(ProviderError::Protocol(m)) if m.contains("malformed")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn non_streaming_call_uses_generate_content() {
        let fx = gemini_fixture(
            json!({"model": "models/gemini-2.5-pro", "messages": [{"role": "user", "content": "hi"}]}),
            vec![],
        );
        let answer = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}, "finishReason": "STOP"}]});
        let (base, seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let mut fx = fx;
        fx.model = "models/gemini-2.5-pro".into();
        let r = chat(&fx.call(&format!("{base}/v1beta/"), None))
            .await
            .unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(seen.path, "/v1beta/models/gemini-2.5-pro:generateContent");
        assert_eq!(seen.body["contents"][0]["parts"][0]["text"], "hi");
        assert_eq!(
            r.content,
            vec![Block::Text {
                text: "Hello".into(),
                cache: None
            }]
        );
        assert_eq!(r.model, "models/gemini-2.5-pro");
    }

    #[tokio::test]
    async fn batch_embeddings() {
        let answer = json!({"embeddings": [{"values": [0.1, 0.2]}, {"values": [0.3, 0.4]}]});
        let (base, seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let fx = gemini_fixture(json!({"messages": []}), vec![]);
        let input = vec!["a".to_owned(), "b".to_owned()];
        let r = crate::providers::embed(
            crate::config::Provider::Gemini,
            &fx.http,
            &format!("{base}/v1beta"),
            &fx.headers,
            None,
            &input,
            crate::providers::Timeouts::default(),
        )
        .await
        .unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(
            seen.path,
            "/v1beta/models/text-embedding-004:batchEmbedContents"
        );
        assert_eq!(
            seen.body,
            json!({"requests": [
                {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a"}]}},
                {"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]}}
            ]})
        );
        assert_eq!(r.embeddings, vec![vec![0.1, 0.2], vec![0.3, 0.4]]);
    }

    #[tokio::test]
    async fn embedding_count_must_match_input() {
        let answer = json!({"embeddings": [{"values": [0.1]}]});
        let (base, _seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let fx = gemini_fixture(json!({"messages": []}), vec![]);
        let input = vec!["a".to_owned(), "b".to_owned()];
        let r = crate::providers::embed(
            crate::config::Provider::Gemini,
            &fx.http,
            &base,
            &fx.headers,
            Some("m"),
            &input,
            crate::providers::Timeouts::default(),
        )
        .await;
        assert!(matches!(r, Err(ProviderError::Protocol(m)) if m.contains("2 embeddings, got 1")));
    }
}
