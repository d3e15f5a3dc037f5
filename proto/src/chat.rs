//! The provider-neutral chat shapes of DESIGN.md ("Chat request"), shared by the daemon,
//! the client crate and any other language.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `chat` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatParams {
    /// Profile name.
    pub profile: String,
    /// The request.
    pub request: ChatRequest,
    /// Send `chat.delta` notifications while the answer arrives.
    #[serde(default)]
    pub stream: bool,
}

/// A chat request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Model; the profile's `default_model` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// System prompt: a string or text blocks (which may carry `cache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Content>,
    /// Output token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Tools: names of registered tools or inline definitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolRef>,
    /// How the model may use tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Extended reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Thinking>,
    /// Merged into the provider's request body as the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_options: Option<Map<String, Value>>,
}

/// A conversation turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What they say.
    pub content: Content,
}

/// Speaker of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user (also carries tool results).
    User,
    /// The model.
    Assistant,
}

/// Message content: plain text or blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Blocks.
    Blocks(Vec<Block>),
}

impl Content {
    /// The content as blocks (plain text becomes one text block).
    pub fn blocks(&self) -> Vec<Block> {
        match self {
            Content::Text(t) => vec![Block::Text {
                text: t.clone(),
                cache: None,
            }],
            Content::Blocks(b) => b.clone(),
        }
    }

    /// All text, concatenated.
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Blocks(b) => b
                .iter()
                .filter_map(|b| match b {
                    Block::Text { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// Prompt-cache lifetime of a breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheTtl {
    /// Five minutes.
    #[serde(rename = "5m")]
    FiveMinutes,
    /// One hour.
    #[serde(rename = "1h")]
    OneHour,
}

/// A content block. Lenient (results): unknown fields are ignored and an unknown block
/// type reads as [`Block::Unknown`], so a newer llmd does not break an older client; the
/// daemon refuses `Unknown` blocks in requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Text.
    Text {
        /// The text.
        text: String,
        /// Cache breakpoint after this block.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<CacheTtl>,
    },
    /// A base64 image.
    Image {
        /// e.g. `image/png`.
        media_type: String,
        /// Base64 data.
        data: String,
    },
    /// A tool call by the model.
    ToolUse {
        /// Call id.
        id: String,
        /// Tool name.
        name: String,
        /// Arguments.
        input: Value,
        /// Where `input` breaks the tool's schema (responses only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        validation_errors: Option<Vec<String>>,
    },
    /// The result of a tool call.
    ToolResult {
        /// The call answered.
        tool_use_id: String,
        /// Result content.
        content: Content,
        /// The tool failed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    /// Model reasoning (responses; send back unchanged in later turns).
    Thinking {
        /// Reasoning text.
        text: String,
        /// Provider signature that lets the reasoning be sent back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// A block type this version does not know.
    #[serde(other)]
    Unknown,
}

/// Fields each block type may carry in a request; `None` for an unknown type.
fn request_block_fields(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "text" => &["type", "text", "cache"],
        "image" => &["type", "media_type", "data"],
        "tool_use" => &["type", "id", "name", "input", "validation_errors"],
        "tool_result" => &["type", "tool_use_id", "content", "is_error"],
        "thinking" => &["type", "text", "signature"],
        _ => return None,
    })
}

/// Strictness for params: [`Block`] itself is lenient (so results from a newer llmd
/// decode), so a request's blocks are checked here, before decoding, for unknown types and
/// fields. The error names the block (`messages[2].content[1]`) and the field.
pub fn check_request_blocks(request: &Value) -> Result<(), String> {
    fn content(v: &Value, at: &str) -> Result<(), String> {
        let Some(blocks) = v.as_array() else {
            return Ok(());
        };
        for (i, b) in blocks.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let Some(obj) = b.as_object() else { continue };
            let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
            let Some(fields) = request_block_fields(kind) else {
                return Err(format!(
                    "`{at}`: unknown block type `{kind}` (known: text, image, tool_use, tool_result, thinking)"
                ));
            };
            if let Some(f) = obj.keys().find(|k| !fields.contains(&k.as_str())) {
                return Err(format!("`{at}`: unknown field `{f}` in a `{kind}` block"));
            }
            if let Some(inner) = obj.get("content") {
                content(inner, &format!("{at}.content"))?;
            }
        }
        Ok(())
    }
    if let Some(sys) = request.get("system") {
        content(sys, "system")?;
    }
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        for (i, t) in tools.iter().enumerate() {
            if t.is_object() {
                check_tool_fields(t).map_err(|e| format!("`tools[{i}]`: {e}"))?;
            }
        }
    }
    if let Some(msgs) = request.get("messages").and_then(Value::as_array) {
        for (i, m) in msgs.iter().enumerate() {
            if let Some(c) = m.get("content") {
                content(c, &format!("messages[{i}].content"))?;
            }
        }
    }
    Ok(())
}

/// A tool named by registration, or defined inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolRef {
    /// A registered tool.
    Named(String),
    /// An inline definition.
    Inline(ToolDef),
}

/// Strictness for params: [`ToolDef`] is lenient (it is also a `tools.list` result), so a
/// definition sent by a client is checked for unknown fields here.
pub fn check_tool_fields(def: &Value) -> Result<(), String> {
    if let Some(f) = def.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["name", "description", "input_schema"].contains(&k.as_str()))
    }) {
        return Err(format!(
            "invalid params: unknown field `{f}`, expected one of `name`, `description`, `input_schema`"
        ));
    }
    Ok(())
}

/// A tool definition. Lenient on decode (results); see [`check_tool_fields`] for params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    /// Name the model calls it by.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// JSON Schema (2020-12) of its input.
    pub input_schema: Value,
}

/// How the model may use tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `auto`, `any` or `none`.
    Mode(ToolMode),
    /// This tool must be called.
    Named {
        /// Tool name.
        name: String,
    },
}

/// Tool choice modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolMode {
    /// The model decides.
    Auto,
    /// Some tool must be called.
    Any,
    /// No tool may be called.
    None,
}

/// Extended reasoning request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thinking {
    /// Token budget for reasoning.
    pub budget_tokens: u32,
}

/// A chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// Provider's message id.
    pub id: String,
    /// Model that answered.
    pub model: String,
    /// Text, tool_use (and thinking) blocks.
    pub content: Vec<Block>,
    /// Why generation stopped.
    pub stop_reason: StopReason,
    /// Token accounting.
    pub usage: Usage,
    /// For a pool: the member profile that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Natural end.
    EndTurn,
    /// Hit `max_tokens`.
    MaxTokens,
    /// Wants a tool result.
    ToolUse,
    /// Hit a stop sequence.
    StopSequence,
    /// Anything else (safety, refusal, …), including reasons a newer llmd adds.
    #[serde(other)]
    Other,
}

/// Token accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (excluding cache reads and writes where the provider splits them).
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens read from cache.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Prompt tokens written to cache.
    #[serde(default)]
    pub cache_write_tokens: u64,
}

/// A streaming delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Delta {
    /// More text of the current text block.
    Text {
        /// The new text.
        text: String,
    },
    /// More reasoning text.
    Thinking {
        /// The new text.
        text: String,
    },
    /// A tool call starts at content index `index`.
    ToolUseStart {
        /// Content block index.
        index: usize,
        /// Call id.
        id: String,
        /// Tool name.
        name: String,
    },
    /// More of a tool call's JSON arguments.
    ToolInput {
        /// Content block index.
        index: usize,
        /// A fragment of the arguments' JSON text.
        partial_json: String,
    },
    /// Content block `index` is complete.
    BlockStop {
        /// Content block index.
        index: usize,
    },
    /// Token accounting so far.
    Usage(Usage),
    /// A delta type this version does not know (a newer llmd); skip it.
    #[serde(other)]
    Unknown,
}

/// Params of the `chat.delta` notification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatDelta {
    /// Id of the `chat` request this belongs to.
    pub id: crate::Id,
    /// The delta.
    pub delta: Delta,
}

/// `embed` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedParams {
    /// Profile name.
    pub profile: String,
    /// Embedding model; a provider default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Texts to embed.
    pub input: Vec<String>,
}

/// `embed` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedResult {
    /// One vector per input, in order.
    pub embeddings: Vec<Vec<f32>>,
    /// Token accounting (input tokens only).
    pub usage: Usage,
    /// For a pool: the member profile that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// `tools.remove` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolName {
    /// Tool name.
    pub name: String,
}

/// `tools.list` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolList {
    /// Registered tools, by name.
    pub tools: Vec<ToolDef>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn design_example_parses() {
        let r: ChatRequest = serde_json::from_value(json!({
            "model": "m", "system": "be brief", "max_tokens": 1024, "temperature": 0.2, "stop": ["END"],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"a": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "42", "is_error": false},
                    {"type": "text", "text": "and?", "cache": "5m"},
                    {"type": "image", "media_type": "image/png", "data": "iVBOR"}
                ]}
            ],
            "tools": ["registered", {"name": "inline", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"name": "inline"},
            "thinking": {"budget_tokens": 2048},
            "provider_options": {"top_k": 5}
        }))
        .unwrap();
        assert_eq!(r.tools[0], ToolRef::Named("registered".into()));
        assert!(matches!(r.tools[1], ToolRef::Inline(_)));
        assert_eq!(
            r.tool_choice,
            Some(ToolChoice::Named {
                name: "inline".into()
            })
        );
        let blocks = r.messages[2].content.blocks();
        assert!(matches!(
            blocks[1],
            Block::Text {
                cache: Some(CacheTtl::FiveMinutes),
                ..
            }
        ));
        let mode: ToolChoice = serde_json::from_value(json!("any")).unwrap();
        assert_eq!(mode, ToolChoice::Mode(ToolMode::Any));
    }

    #[test]
    fn unknown_block_fields_are_rejected_in_requests_only() {
        let typo = json!({"type": "text", "text": "x", "cahce": "5m"});
        let req = json!({"messages": [{"role": "user", "content": [typo.clone()]}]});
        let e = check_request_blocks(&req).unwrap_err();
        assert!(
            e.contains("cahce") && e.contains("messages[0].content[0]"),
            "{e}"
        );
        let nested = json!({"system": "s", "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "video"}]}]}]});
        assert!(check_request_blocks(&nested).unwrap_err().contains("video"));
        let fine = json!({"system": [{"type": "text", "text": "s", "cache": "1h"}],
            "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(check_request_blocks(&fine), Ok(()));
        // A result from a newer llmd still decodes.
        let b: Block = serde_json::from_value(typo).unwrap();
        assert!(matches!(b, Block::Text { .. }));
    }

    #[test]
    fn results_from_a_newer_llmd_decode() {
        let resp: ChatResponse = serde_json::from_value(json!({
            "id": "m", "model": "x", "new_top_field": 1,
            "content": [{"type": "text", "text": "a", "new_field": true}, {"type": "hologram", "x": 1}],
            "stop_reason": "out_of_coffee",
            "usage": {"input_tokens": 1, "output_tokens": 2, "new_count": 3}
        }))
        .unwrap();
        assert_eq!(resp.content[1], Block::Unknown);
        assert_eq!(resp.stop_reason, StopReason::Other);
        let d: ChatDelta =
            serde_json::from_value(json!({"id": 1, "delta": {"type": "sparkle", "n": 1}})).unwrap();
        assert_eq!(d.delta, Delta::Unknown);
    }

    #[test]
    fn delta_shapes() {
        let d = Delta::ToolInput {
            index: 1,
            partial_json: "{\"a\"".into(),
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"type": "tool_input", "index": 1, "partial_json": "{\"a\""})
        );
        let u = Delta::Usage(Usage {
            input_tokens: 3,
            output_tokens: 4,
            ..Default::default()
        });
        assert_eq!(serde_json::to_value(&u).unwrap()["type"], "usage");
    }
}
