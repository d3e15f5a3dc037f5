//! Tool registry (placeholder API; the real registry replaces the bodies).

use llmd_proto::chat::ToolDef;
use serde_json::Value;
use std::sync::Arc;

/// A compiled tool.
#[derive(Debug)]
pub struct Tool {
    /// Its definition.
    pub def: ToolDef,
}

impl Tool {
    /// Compiles the schema; the error says why it is invalid.
    pub fn compile(def: ToolDef) -> Result<Tool, String> {
        Ok(Tool { def })
    }

    /// Schema violations of `input`, empty when it is valid.
    pub fn validate(&self, _input: &Value) -> Vec<String> {
        Vec::new()
    }
}

/// Registered tools by name.
#[derive(Debug, Default)]
pub struct ToolRegistry {}

impl ToolRegistry {
    /// Registers (or replaces) a tool.
    pub fn register(&self, def: ToolDef) -> Result<(), String> {
        Tool::compile(def).map(|_| ())
    }

    /// Every registered tool, by name.
    pub fn list(&self) -> Vec<ToolDef> {
        Vec::new()
    }

    /// Removes a tool; false when there was none.
    pub fn remove(&self, _name: &str) -> bool {
        false
    }

    /// A registered tool.
    pub fn get(&self, _name: &str) -> Option<Arc<Tool>> {
        None
    }
}

/// The schema with the keywords Gemini rejects removed.
pub fn gemini_schema(schema: &Value) -> Value {
    schema.clone()
}
