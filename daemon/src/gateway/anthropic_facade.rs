//! `/v1/messages` in Anthropic's format for profiles whose provider speaks another API
//! (OpenAI-compatible, Gemini, MiniMax): the request is translated to the neutral chat
//! shape and run by `crate::chat`, and the answer (or its deltas) translated back, so an
//! Anthropic-only client such as Claude Code can use those profiles.

use super::errors::{GatewayError, Shape};
use super::translate::{self, sse, Encoder};
use super::usage::Meter;
use super::Gateway;
use crate::chat;
use crate::profile::Profile;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use llmd_proto::chat::{
    Block, CacheTtl, ChatRequest, ChatResponse, Content, Delta, Message, Role, StopReason,
    Thinking, ToolChoice, ToolDef, ToolMode, ToolRef, Usage,
};
use llmd_proto::RpcError;
use serde_json::{json, Value};
use std::sync::Arc;

fn cache_of(b: &Value) -> Option<CacheTtl> {
    let c = b.get("cache_control")?;
    Some(match c.get("ttl").and_then(Value::as_str) {
        Some("1h") => CacheTtl::OneHour,
        _ => CacheTtl::FiveMinutes,
    })
}

fn content(v: &Value, at: &str) -> Result<Content, String> {
    match v {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(items) => items
            .iter()
            .map(|b| block(b, at))
            .collect::<Result<Vec<_>, _>>()
            .map(Content::Blocks),
        _ => Err(format!("`{at}.content` must be a string or an array")),
    }
}

fn block(b: &Value, at: &str) -> Result<Block, String> {
    let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok(match b.get("type").and_then(Value::as_str) {
        Some("text") => Block::Text {
            text: s("text"),
            cache: cache_of(b),
        },
        Some("image") => {
            let src = b.get("source").unwrap_or(&Value::Null);
            if src.get("type").and_then(Value::as_str) != Some("base64") {
                return Err(format!(
                    "`{at}`: images must be base64 sources on this profile"
                ));
            }
            Block::Image {
                media_type: src
                    .get("media_type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                data: src
                    .get("data")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }
        }
        Some("tool_use") => Block::ToolUse {
            id: s("id"),
            name: s("name"),
            input: b.get("input").cloned().unwrap_or_else(|| json!({})),
            validation_errors: None,
        },
        Some("tool_result") => Block::ToolResult {
            tool_use_id: s("tool_use_id"),
            content: match b.get("content") {
                None | Some(Value::Null) => Content::Text(String::new()),
                Some(c) => content(c, at)?,
            },
            is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        },
        Some("thinking") => Block::Thinking {
            text: s("thinking"),
            signature: b
                .get("signature")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        other => {
            return Err(format!(
                "`{at}`: block type {other:?} is not supported on this profile"
            ))
        }
    })
}

/// Translates an Anthropic Messages body into the neutral request; the bool is `stream`.
pub fn to_neutral(v: &Value) -> Result<(ChatRequest, bool), String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "the body is not a JSON object".to_string())?;
    let mut req = ChatRequest {
        model: obj
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        max_tokens: obj
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map(|n| n.min(u64::from(u32::MAX)) as u32),
        temperature: obj
            .get("temperature")
            .and_then(Value::as_f64)
            .map(|t| t as f32),
        stop: obj
            .get("stop_sequences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        ..ChatRequest::default()
    };
    if let Some(sys) = obj.get("system") {
        req.system = Some(content(sys, "system")?);
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| "`messages` must be an array".to_string())?;
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => return Err(format!("`{at}.role`: {other:?} is not supported")),
        };
        req.messages.push(Message {
            role,
            content: content(m.get("content").unwrap_or(&Value::Null), &at)?,
        });
    }
    for (i, t) in obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if t.get("type")
            .and_then(Value::as_str)
            .is_some_and(|ty| ty != "custom")
        {
            return Err(format!(
                "`tools[{i}]`: server tools are not available on this profile"
            ));
        }
        req.tools.push(ToolRef::Inline(ToolDef {
            name: t
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("`tools[{i}].name` is missing"))?
                .to_owned(),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            input_schema: t
                .get("input_schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"})),
        }));
    }
    req.tool_choice = match obj.get("tool_choice") {
        Some(c) => match c.get("type").and_then(Value::as_str) {
            Some("auto") => Some(ToolChoice::Mode(ToolMode::Auto)),
            Some("any") => Some(ToolChoice::Mode(ToolMode::Any)),
            Some("none") => Some(ToolChoice::Mode(ToolMode::None)),
            Some("tool") => c
                .get("name")
                .and_then(Value::as_str)
                .map(|n| ToolChoice::Named { name: n.to_owned() }),
            _ => None,
        },
        None => None,
    };
    if let Some(t) = obj.get("thinking") {
        if t.get("type").and_then(Value::as_str) == Some("enabled") {
            let budget = t
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(1024);
            req.thinking = Some(Thinking {
                budget_tokens: budget.min(u64::from(u32::MAX)) as u32,
            });
        }
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok((req, stream))
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndTurn | StopReason::Other => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ToolUse => "tool_use",
        StopReason::StopSequence => "stop_sequence",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
           "cache_read_input_tokens": u.cache_read_tokens,
           "cache_creation_input_tokens": u.cache_write_tokens})
}

/// The whole answer as an Anthropic `message`.
pub fn message(resp: &ChatResponse) -> Value {
    let content: Vec<Value> = resp
        .content
        .iter()
        .filter_map(|b| match b {
            Block::Text { text, .. } => Some(json!({"type": "text", "text": text})),
            Block::ToolUse { id, name, input, .. } => {
                Some(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
            }
            Block::Thinking { text, signature } => Some(
                json!({"type": "thinking", "thinking": text, "signature": signature.clone().unwrap_or_default()}),
            ),
            _ => None,
        })
        .collect();
    json!({
        "id": resp.id, "type": "message", "role": "assistant", "model": resp.model,
        "content": content, "stop_reason": stop_reason(resp.stop_reason), "stop_sequence": null,
        "usage": usage_json(&resp.usage),
    })
}

/// The Anthropic error for a failed neutral call.
pub fn error_response(e: &RpcError) -> Response {
    let (status, msg) = translate::failure(e);
    GatewayError::new(status, Shape::Anthropic, msg).into_response()
}

/// Serves a translated `/v1/messages` on `profile`.
pub async fn handle(
    gw: Arc<Gateway>,
    profile: Arc<Profile>,
    body: Bytes,
    meter: Meter,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("the body is not JSON: {e}"))
        .and_then(|v| to_neutral(&v));
    let (req, stream) = match parsed {
        Ok(p) => p,
        Err(msg) => {
            return GatewayError::new(StatusCode::BAD_REQUEST, Shape::Anthropic, msg)
                .into_response()
        }
    };
    if !stream {
        let result = chat::execute(&gw.daemon, &profile, &req, None).await;
        translate::record(&meter, &profile, &req, &result);
        return match result {
            Ok(resp) => super::json_response(StatusCode::OK, &message(&resp)),
            Err(e) => error_response(&e),
        };
    }
    let model = req
        .model
        .clone()
        .or_else(|| profile.config.default_model.clone())
        .unwrap_or_default();
    translate::stream(
        gw,
        profile,
        req,
        meter,
        MessageEncoder::new(model),
        error_response,
    )
    .await
}

/// What kind of block is open in the outgoing stream.
#[derive(PartialEq)]
enum Open {
    Text,
    Thinking,
    Tool,
}

/// Turns deltas into Anthropic's `message_start` … `message_stop` events.
struct MessageEncoder {
    model: String,
    started: bool,
    /// The open block and its outgoing index.
    open: Option<(Open, usize)>,
    next: usize,
    output_tokens: u64,
}

impl MessageEncoder {
    fn new(model: String) -> Self {
        MessageEncoder {
            model,
            started: false,
            open: None,
            next: 0,
            output_tokens: 0,
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            let id = format!("msg_llmd{:x}", rand::random::<u64>());
            out.extend(sse(
                Some("message_start"),
                &json!({"type": "message_start", "message": {
                    "id": id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ));
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, i)) = self.open.take() {
            out.extend(sse(
                Some("content_block_stop"),
                &json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }

    /// Opens a block of `kind` unless one is open already; returns its index.
    fn open(&mut self, kind: Open, start: Value, out: &mut Vec<u8>) -> usize {
        if let Some((k, i)) = &self.open {
            if *k == kind && kind != Open::Tool {
                return *i;
            }
        }
        self.close(out);
        let i = self.next;
        self.next += 1;
        out.extend(sse(
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": i, "content_block": start}),
        ));
        self.open = Some((kind, i));
        i
    }

    fn block_delta(i: usize, delta: Value) -> Vec<u8> {
        sse(
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": i, "delta": delta}),
        )
    }
}

impl Encoder for MessageEncoder {
    fn delta(&mut self, d: Delta) -> Vec<u8> {
        let mut out = Vec::new();
        if matches!(d, Delta::Usage(_) | Delta::BlockStop { .. }) && !self.started {
            if let Delta::Usage(u) = d {
                self.output_tokens = u.output_tokens;
            }
            return out;
        }
        self.start(&mut out);
        match d {
            Delta::Text { text } => {
                let i = self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                out.extend(Self::block_delta(
                    i,
                    json!({"type": "text_delta", "text": text}),
                ));
            }
            Delta::Thinking { text } => {
                let i = self.open(
                    Open::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    &mut out,
                );
                out.extend(Self::block_delta(
                    i,
                    json!({"type": "thinking_delta", "thinking": text}),
                ));
            }
            Delta::ToolUseStart { id, name, .. } => {
                self.open(
                    Open::Tool,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    &mut out,
                );
            }
            Delta::ToolInput { partial_json, .. } => {
                if let Some((Open::Tool, i)) = &self.open {
                    out.extend(Self::block_delta(
                        *i,
                        json!({"type": "input_json_delta", "partial_json": partial_json}),
                    ));
                }
            }
            Delta::BlockStop { .. } => self.close(&mut out),
            Delta::Usage(u) => self.output_tokens = u.output_tokens,
            Delta::Unknown => {}
        }
        out
    }

    fn finish(&mut self, resp: &ChatResponse) -> Vec<u8> {
        let mut out = Vec::new();
        self.start(&mut out);
        self.close(&mut out);
        out.extend(sse(
            Some("message_delta"),
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(resp.stop_reason), "stop_sequence": null},
                    "usage": usage_json(&resp.usage)}),
        ));
        out.extend(sse(Some("message_stop"), &json!({"type": "message_stop"})));
        out
    }

    fn error_event(&self, e: &RpcError) -> Vec<u8> {
        sse(
            Some("error"),
            &json!({"type": "error", "error": {"type": "api_error", "message": format!("llmd: {}", e.message)}}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_request_becomes_neutral() {
        let (req, stream) = to_neutral(&json!({
            "model": "m", "max_tokens": 10, "stream": true,
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}
            ],
            "tools": [{"name": "get", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get"},
            "thinking": {"type": "enabled", "budget_tokens": 2048}
        }))
        .unwrap();
        assert!(stream);
        assert_eq!(req.messages.len(), 3);
        assert!(
            matches!(&req.system, Some(Content::Blocks(b)) if matches!(b[0], Block::Text { cache: Some(CacheTtl::FiveMinutes), .. }))
        );
        assert_eq!(
            req.tool_choice,
            Some(ToolChoice::Named { name: "get".into() })
        );
        assert_eq!(
            req.thinking,
            Some(Thinking {
                budget_tokens: 2048
            })
        );
    }

    #[test]
    fn deltas_become_well_formed_events() {
        let mut e = MessageEncoder::new("m".into());
        let mut all = Vec::new();
        for d in [
            Delta::Text { text: "He".into() },
            Delta::Text { text: "llo".into() },
            Delta::BlockStop { index: 0 },
            Delta::ToolUseStart {
                index: 1,
                id: "t".into(),
                name: "get".into(),
            },
            Delta::ToolInput {
                index: 1,
                partial_json: "{}".into(),
            },
            Delta::BlockStop { index: 1 },
        ] {
            all.extend(e.delta(d));
        }
        let text = String::from_utf8(all).unwrap();
        let kinds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop"
            ]
        );
    }
}
