//! `/v1/chat/completions` in OpenAI's format for profiles whose provider speaks another
//! API: the request is translated to the neutral chat shape and run by `crate::chat`
//! (limits, retries, refresh), and the answer (or its deltas) translated back.

use super::errors::{GatewayError, Shape};
use super::translate::{self, Encoder};
use super::usage::Meter;
use super::Gateway;
use crate::chat;
use crate::profile::Profile;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use llmd_proto::chat::{
    Block, ChatRequest, ChatResponse, Content, Delta, Message, Role, StopReason, ToolChoice,
    ToolDef, ToolMode, ToolRef, Usage,
};
use llmd_proto::RpcError;
use serde_json::{json, Value};
use std::sync::Arc;

/// What the OpenAI request asked for besides the chat itself.
#[derive(Debug, Default, PartialEq)]
pub struct Options {
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

fn bad(msg: impl Into<String>) -> String {
    msg.into()
}

/// Translates an OpenAI chat completions body into the neutral request.
pub fn to_neutral(v: &Value) -> Result<(ChatRequest, Options), String> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the body is not a JSON object"))?;
    let mut req = ChatRequest {
        model: obj
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        ..ChatRequest::default()
    };
    let num = |k: &str| obj.get(k).and_then(Value::as_u64);
    req.max_tokens = num("max_completion_tokens")
        .or_else(|| num("max_tokens"))
        .map(|n| n.min(u64::from(u32::MAX)) as u32);
    req.temperature = obj
        .get("temperature")
        .and_then(Value::as_f64)
        .map(|t| t as f32);
    req.stop = match obj.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    let mut system: Vec<String> = Vec::new();
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`messages` must be an array"))?;
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => system.push(text_of(content)),
            "user" => push(&mut req.messages, Role::User, parts(content, i)?),
            "assistant" => {
                let mut blocks = parts(content, i)?;
                for c in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = c.get("function").unwrap_or(&Value::Null);
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    blocks.push(Block::ToolUse {
                        id: c.get("id").and_then(Value::as_str).unwrap_or("").to_owned(),
                        name: f
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        input: serde_json::from_str(if args.trim().is_empty() {
                            "{}"
                        } else {
                            args
                        })
                        .map_err(|_| {
                            bad(format!(
                                "`messages[{i}].tool_calls`: `arguments` is not JSON"
                            ))
                        })?,
                        validation_errors: None,
                    });
                }
                push(&mut req.messages, Role::Assistant, blocks);
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad(format!(
                            "`messages[{i}]`: a tool message needs `tool_call_id`"
                        ))
                    })?;
                let block = Block::ToolResult {
                    tool_use_id: id.to_owned(),
                    content: Content::Text(text_of(content)),
                    is_error: false,
                };
                push(&mut req.messages, Role::User, vec![block]);
            }
            other => {
                return Err(bad(format!(
                    "`messages[{i}].role`: `{other}` is not supported"
                )))
            }
        }
    }
    if !system.is_empty() {
        req.system = Some(Content::Text(system.join("\n\n")));
    }
    for (i, t) in obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = t
            .get("function")
            .ok_or_else(|| bad(format!("`tools[{i}]`: only `function` tools are supported")))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("`tools[{i}].function.name` is missing")))?;
        req.tools.push(ToolRef::Inline(ToolDef {
            name: name.to_owned(),
            description: f
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            input_schema: f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"})),
        }));
    }
    req.tool_choice = match obj.get("tool_choice") {
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(ToolChoice::Mode(ToolMode::Auto)),
            "none" => Some(ToolChoice::Mode(ToolMode::None)),
            "required" => Some(ToolChoice::Mode(ToolMode::Any)),
            other => return Err(bad(format!("`tool_choice`: `{other}` is not supported"))),
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| ToolChoice::Named {
                name: name.to_owned(),
            }),
        _ => None,
    };
    let opts = Options {
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    Ok((req, opts))
}

/// Appends blocks as a turn, joining them to the previous turn of the same role (tool
/// results and the user's next words are one turn in the neutral shape).
fn push(messages: &mut Vec<Message>, role: Role, blocks: Vec<Block>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut().filter(|m| m.role == role) {
        let mut all = last.content.blocks();
        all.extend(blocks);
        last.content = Content::Blocks(all);
        return;
    }
    messages.push(Message {
        role,
        content: Content::Blocks(blocks),
    });
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The blocks of a message's `content`: a string, or text and `image_url` parts (as
/// base64 `data:` URLs: the neutral shape carries images inline).
fn parts(v: &Value, i: usize) -> Result<Vec<Block>, String> {
    let text = |t: &str| Block::Text {
        text: t.to_owned(),
        cache: None,
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![text(s)]),
        Value::Array(a) => a
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(text(p.get("text").and_then(Value::as_str).unwrap_or(""))),
                Some("image_url") => {
                    let url = p
                        .pointer("/image_url/url")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let (media_type, data) = url
                        .strip_prefix("data:")
                        .and_then(|r| r.split_once(";base64,"))
                        .ok_or_else(|| {
                            bad(format!(
                                "`messages[{i}]`: images must be base64 `data:` URLs on this profile"
                            ))
                        })?;
                    Ok(Block::Image {
                        media_type: media_type.to_owned(),
                        data: data.to_owned(),
                    })
                }
                other => Err(bad(format!(
                    "`messages[{i}].content`: part type {other:?} is not supported"
                ))),
            })
            .collect(),
        _ => Err(bad(format!("`messages[{i}].content` must be a string or an array"))),
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndTurn | StopReason::StopSequence | StopReason::Other => "stop",
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
    }
}

fn usage_json(u: &Usage) -> Value {
    let prompt = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens},
    })
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole answer in OpenAI's `chat.completion` shape.
pub fn completion(resp: &ChatResponse) -> Value {
    let text: String = resp
        .content
        .iter()
        .filter_map(|b| match b {
            Block::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let calls: Vec<Value> = resp
        .content
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse {
                id, name, input, ..
            } => Some(json!({
                "id": id, "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            _ => None,
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": format!("chatcmpl-{}", resp.id),
        "object": "chat.completion",
        "created": created(),
        "model": resp.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(resp.stop_reason), "logprobs": null}],
        "usage": usage_json(&resp.usage),
    })
}

/// The OpenAI error for a failed neutral call: the provider's status passes through.
pub fn error_response(e: &RpcError) -> Response {
    let (status, msg) = translate::failure(e);
    GatewayError::new(status, Shape::OpenAi, msg).into_response()
}

/// Serves a translated `/v1/chat/completions` on `profile`.
pub async fn handle(
    gw: Arc<Gateway>,
    profile: Arc<Profile>,
    body: Bytes,
    meter: Meter,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("the body is not JSON: {e}"))
        .and_then(|v| to_neutral(&v));
    let (req, opts) = match parsed {
        Ok(p) => p,
        Err(msg) => {
            return GatewayError::new(StatusCode::BAD_REQUEST, Shape::OpenAi, msg).into_response()
        }
    };
    if !opts.stream {
        // Dropped with the request when the client hangs up, which aborts the upstream call.
        let result = chat::execute(&gw.daemon, &profile, &req, None).await;
        translate::record(&meter, &profile, &req, &result);
        return match result {
            Ok(resp) => super::json_response(StatusCode::OK, &completion(&resp)),
            Err(e) => error_response(&e),
        };
    }
    let enc = ChunkEncoder {
        include_usage: opts.include_usage,
        ..ChunkEncoder::default()
    };
    translate::stream(gw, profile, req, meter, enc, error_response).await
}

/// Turns deltas into `chat.completion.chunk` events.
#[derive(Default)]
struct ChunkEncoder {
    include_usage: bool,
    started: bool,
    /// Neutral content index of each tool call, in OpenAI `tool_calls` index order.
    tools: Vec<usize>,
    id: String,
}

fn event(v: &Value) -> Vec<u8> {
    translate::sse(None, v)
}

impl ChunkEncoder {
    fn chunk(id: &str, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created(), "model": "",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    }

    fn id(&mut self) -> String {
        if self.id.is_empty() {
            self.id = format!("chatcmpl-llmd{:x}", rand::random::<u64>());
        }
        self.id.clone()
    }
}

impl Encoder for ChunkEncoder {
    fn delta(&mut self, delta: Delta) -> Vec<u8> {
        let id = self.id();
        let delta = match delta {
            Delta::Text { text } => json!({"content": text}),
            Delta::Thinking { text } => json!({"reasoning_content": text}),
            Delta::ToolUseStart { index, id, name } => {
                self.tools.push(index);
                json!({"tool_calls": [{"index": self.tools.len() - 1, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]})
            }
            Delta::ToolInput {
                index,
                partial_json,
            } => match self.tools.iter().position(|&i| i == index) {
                Some(i) => {
                    json!({"tool_calls": [{"index": i, "function": {"arguments": partial_json}}]})
                }
                None => return Vec::new(),
            },
            // A delta kind of a newer proto has nothing to say in OpenAI's format.
            Delta::BlockStop { .. } | Delta::Usage(_) | Delta::Unknown => return Vec::new(),
        };
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.extend(event(&Self::chunk(
                &id,
                json!({"role": "assistant", "content": ""}),
                None,
            )));
        }
        out.extend(event(&Self::chunk(&id, delta, None)));
        out
    }

    /// The finish reason, the usage when asked, `[DONE]`.
    fn finish(&mut self, resp: &ChatResponse) -> Vec<u8> {
        let id = self.id();
        let mut out = Vec::new();
        if !self.started {
            // No delta came (an empty answer): the role chunk still opens the stream.
            out.extend(event(&Self::chunk(
                &id,
                json!({"role": "assistant", "content": ""}),
                None,
            )));
        }
        let mut last = Self::chunk(&id, json!({}), Some(finish_reason(resp.stop_reason)));
        last["model"] = Value::String(resp.model.clone());
        out.extend(event(&last));
        if self.include_usage {
            out.extend(event(&json!({
                "id": id, "object": "chat.completion.chunk", "created": created(),
                "model": resp.model, "choices": [], "usage": usage_json(&resp.usage),
            })));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    /// Too late for a status: OpenAI's SDKs raise on an `error` event.
    fn error_event(&self, e: &RpcError) -> Vec<u8> {
        event(
            &json!({"error": {"message": format!("llmd: {}", e.message), "type": "server_error", "code": null}}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_request_becomes_neutral() {
        let (req, opts) = to_neutral(&json!({
            "model": "m", "max_tokens": 50, "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "user", "content": "and?"}
            ],
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
            "tool_choice": "required"
        }))
        .unwrap();
        assert_eq!(
            opts,
            Options {
                stream: true,
                include_usage: true
            }
        );
        assert_eq!(req.system, Some(Content::Text("be brief".into())));
        assert_eq!(req.max_tokens, Some(50));
        assert_eq!(
            req.messages.len(),
            3,
            "tool result and next user text are one turn"
        );
        assert!(
            matches!(&req.messages[1].content.blocks()[0], Block::ToolUse { input, .. } if input == &json!({"a": 1}))
        );
        let last = req.messages[2].content.blocks();
        assert!(matches!(&last[0], Block::ToolResult { tool_use_id, .. } if tool_use_id == "c1"));
        assert!(
            matches!(&req.messages[0].content.blocks()[1], Block::Image { media_type, .. } if media_type == "image/png")
        );
        assert_eq!(req.tool_choice, Some(ToolChoice::Mode(ToolMode::Any)));
    }

    #[test]
    fn remote_images_and_bad_arguments_are_refused() {
        let e = to_neutral(&json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}))
        .unwrap_err();
        assert!(e.contains("data:"), "{e}");
        let e = to_neutral(&json!({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{"}}]}]}))
        .unwrap_err();
        assert!(e.contains("arguments"), "{e}");
    }
}
