//! Tool registry (DESIGN.md, "Tool registry"): tools compiled once, tool-call arguments
//! checked against their JSON Schema, and the schema subset Gemini accepts.

use llmd_proto::chat::{ToolDef, ToolRef};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Longest tool name every provider accepts.
pub const MAX_NAME_LEN: usize = 64;

/// Errors reported per validation; a model's broken call needs the first few, not thousands.
const MAX_ERRORS: usize = 20;

/// Longest single error message: messages quote the offending value, which can be huge.
const MAX_ERROR_CHARS: usize = 300;

/// A compiled tool.
#[derive(Debug)]
pub struct Tool {
    /// Its definition.
    pub def: ToolDef,
    validator: jsonschema::Validator,
    gemini: Value,
}

impl Tool {
    /// Compiles the schema; the error says why it is invalid.
    pub fn compile(def: ToolDef) -> Result<Tool, String> {
        check_name(&def.name)?;
        let name = &def.name;
        let Some(top) = def.input_schema.as_object() else {
            return Err(format!(
                "tool {name:?}: input_schema must be a JSON Schema object, not {}",
                json_kind(&def.input_schema)
            ));
        };
        match top.get("type") {
            Some(Value::String(t)) if t == "object" => {}
            Some(other) => {
                return Err(format!(
                    "tool {name:?}: input_schema must have \"type\": \"object\" at the top level \
                     (a tool's input is a JSON object), not \"type\": {other}"
                ))
            }
            None => {
                return Err(format!(
                    "tool {name:?}: input_schema must have \"type\": \"object\" at the top level \
                     (a tool's input is a JSON object)"
                ))
            }
        }
        // Draft 2020-12 unless the schema's `$schema` names another known draft. `offline`
        // because a schema from an agent must never make the daemon fetch a URL or read a
        // file (the crate is also built without its resolve-http/resolve-file features).
        let validator = jsonschema::options()
            .offline()
            .should_validate_formats(true)
            .build(&def.input_schema)
            .map_err(|e| {
                let at = e.instance_path().as_str();
                let at = if at.is_empty() {
                    String::new()
                } else {
                    format!(" at {at}")
                };
                format!(
                    "tool {name:?}: invalid input_schema{at}: {}",
                    truncate(e.to_string())
                )
            })?;
        let gemini = gemini_schema(&def.input_schema);
        Ok(Tool {
            def,
            validator,
            gemini,
        })
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The input schema as Gemini accepts it ([`gemini_schema`]), computed once.
    pub fn gemini_input_schema(&self) -> &Value {
        &self.gemini
    }

    /// Schema violations of `input`, empty when it is valid.
    ///
    /// Each names the JSON pointer of the offending value, e.g. `/city: 5 is not of type
    /// "string"` (`(root)` for the input itself).
    pub fn validate(&self, input: &Value) -> Vec<String> {
        let mut out = Vec::new();
        let mut more = 0usize;
        for e in self.validator.iter_errors(input) {
            if out.len() < MAX_ERRORS {
                let at = e.instance_path().as_str();
                let at = if at.is_empty() { "(root)" } else { at };
                out.push(truncate(format!("{at}: {e}")));
            } else {
                more += 1;
            }
        }
        if more > 0 {
            out.push(format!("... and {more} more"));
        }
        out
    }
}

/// `^[a-zA-Z0-9_-]{1,64}$`: the names Anthropic, OpenAI and Gemini all accept.
fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(format!(
            "tool name {name:?} is invalid: use 1 to {MAX_NAME_LEN} ASCII letters, digits, '_' or '-' \
             (the names every provider accepts)"
        ));
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(mut s: String) -> String {
    if let Some((cut, _)) = s.char_indices().nth(MAX_ERROR_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Registered tools by name; saved to a file (when it has one) so that "register once"
/// survives a restart.
#[derive(Debug, Default)]
pub struct ToolRegistry {
    tools: RwLock<BTreeMap<String, Arc<Tool>>>,
    file: Option<std::path::PathBuf>,
    /// Serializes saves so an older snapshot never replaces a newer one.
    saving: std::sync::Mutex<()>,
}

/// Why a tool was not registered.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The definition is invalid (name, schema, size).
    Invalid(String),
    /// The registry is full.
    Full(usize),
}

/// Caps of the registry (from `[daemon]`).
#[derive(Debug, Clone, Copy)]
pub struct ToolLimits {
    /// Tools kept at most.
    pub max_tools: usize,
    /// Largest definition, in bytes of JSON.
    pub max_tool_bytes: usize,
}

/// What the tools file holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    tools: Vec<ToolDef>,
}

impl ToolRegistry {
    // The maps stay consistent at every unlock, so a poisoned lock is still usable.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<Tool>>> {
        self.tools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<Tool>>> {
        self.tools.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A registry kept in `file` (0600, replaced atomically on every change), loaded from
    /// it now. A file that cannot be read or parsed is reported and set aside as `.bad`,
    /// and tools that no longer compile are skipped: a broken file must not stop the start.
    pub fn load(file: std::path::PathBuf) -> ToolRegistry {
        let mut tools = BTreeMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => {
                    for def in saved.tools {
                        let name = def.name.clone();
                        match Tool::compile(def) {
                            Ok(t) => {
                                tools.insert(name, Arc::new(t));
                            }
                            Err(e) => {
                                tracing::warn!(tool = %crate::logging::clean(&name), error = %e, "skipping a saved tool")
                            }
                        }
                    }
                }
                Err(e) => {
                    let bad = file.with_extension("json.bad");
                    tracing::warn!(file = %file.display(), error = %e, moved_to = %bad.display(), "tools file is not valid; starting without saved tools");
                    let _ = std::fs::rename(&file, &bad);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read the tools file")
            }
        }
        ToolRegistry {
            tools: RwLock::new(tools),
            file: Some(file),
            saving: std::sync::Mutex::new(()),
        }
    }

    /// Writes the current set to the file; a failure is logged (the tools still work
    /// until the daemon stops).
    fn save(&self) {
        let Some(file) = &self.file else { return };
        let _one = crate::sync::lock(&self.saving);
        let saved = Saved { tools: self.list() };
        let result = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = file.parent() {
                    crate::fsutil::ensure_private_dir(dir).map_err(std::io::Error::other)?;
                }
                crate::fsutil::write_secret_atomic(file, &bytes)
            });
        if let Err(e) = result {
            tracing::warn!(file = %file.display(), error = %e, "cannot save registered tools");
        }
    }

    /// Registers (or replaces) a tool. `size` is the definition's JSON length.
    pub fn register(
        &self,
        def: ToolDef,
        size: usize,
        limits: ToolLimits,
    ) -> Result<(), RegisterError> {
        if size > limits.max_tool_bytes {
            return Err(RegisterError::Invalid(format!(
                "the definition is {size} bytes; at most {} are accepted (`max_tool_bytes`)",
                limits.max_tool_bytes
            )));
        }
        // Compiled before taking the lock: a big schema must not stall readers.
        let tool = Arc::new(Tool::compile(def).map_err(RegisterError::Invalid)?);
        {
            let mut tools = self.write();
            if !tools.contains_key(&tool.def.name) && tools.len() >= limits.max_tools {
                return Err(RegisterError::Full(limits.max_tools));
            }
            tools.insert(tool.def.name.clone(), tool);
        }
        self.save();
        Ok(())
    }

    /// Number of registered tools.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Every registered tool, by name.
    pub fn list(&self) -> Vec<ToolDef> {
        self.read().values().map(|t| t.def.clone()).collect()
    }

    /// Removes a tool; false when there was none.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.write().remove(name).is_some();
        if removed {
            self.save();
        }
        removed
    }

    /// A registered tool.
    pub fn get(&self, name: &str) -> Option<Arc<Tool>> {
        self.read().get(name).cloned()
    }

    /// The tools of a chat request: registered names looked up, inline definitions compiled
    /// (they shadow a registered tool of the same name for this request only).
    pub fn resolve(&self, refs: &[ToolRef]) -> Result<Vec<Arc<Tool>>, String> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let name = match r {
                ToolRef::Named(name) => name,
                ToolRef::Inline(def) => &def.name,
            };
            if !seen.insert(name.as_str()) {
                return Err(format!(
                    "tool {name:?} appears more than once in the request"
                ));
            }
            let tool = match r {
                ToolRef::Named(name) => self.get(name).ok_or_else(|| {
                    format!("tool {name:?} is not registered (register it with tools.register or define it inline)")
                })?,
                ToolRef::Inline(def) => Arc::new(Tool::compile(def.clone())?),
            };
            out.push(tool);
        }
        Ok(out)
    }
}

/// The keywords kept for Gemini. Source of truth: the Gemini API reference for `Schema`
/// ("a select subset of an OpenAPI 3.0 schema object", ai.google.dev/api/caching#Schema) and
/// the function-calling guide (ai.google.dev/gemini-api/docs/function-calling). Everything
/// else is dropped, among others: `$schema`, `$id`, `$ref`/`$defs`/`definitions` (local refs
/// are inlined first), `additionalProperties`, `unevaluatedProperties`, `patternProperties`,
/// `const` (a string becomes a one-value `enum`), `examples`, `default`, `if`/`then`/`else`,
/// `not`, `dependentRequired`, `dependentSchemas`, `contains`, `minContains`/`maxContains`,
/// `prefixItems`, `exclusiveMinimum`/`exclusiveMaximum`, `$comment`, `readOnly`/`writeOnly`,
/// `contentEncoding`/`contentMediaType`, `multipleOf`, `uniqueItems`. `default` and `example`
/// appear in the v1beta reference but not everywhere Gemini is served, so they are dropped too.
pub const GEMINI_KEYWORDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "items",
    "anyOf",
    "propertyOrdering",
];

/// `format` values Gemini documents, per type; other formats are dropped.
fn gemini_format_ok(ty: Option<&str>, format: &str) -> bool {
    match ty {
        Some("string") => matches!(format, "enum" | "date-time"),
        Some("number") => matches!(format, "float" | "double"),
        Some("integer") => matches!(format, "int32" | "int64"),
        _ => false,
    }
}

/// Deeper than this, a schema is cut to its type (only reachable through `$ref` expansion).
const GEMINI_MAX_DEPTH: usize = 48;

/// `$ref`s inlined per schema at most: references that fan out (a → 2×b → 4×c …) would
/// otherwise blow up exponentially.
const GEMINI_MAX_INLINED: usize = 256;

/// The schema with the keywords Gemini rejects removed.
///
/// Also rewrites what has an OpenAPI 3.0 equivalent: `"type": [T, "null"]` and a `null`
/// branch of `anyOf` become `nullable: true`, `oneOf` becomes `anyOf`, `allOf` is merged,
/// local `$ref`s (`#/$defs/…`, `#/definitions/…`) are inlined (a recursive one is cut to
/// its type), a string `const` becomes a one-value `enum`, and a non-string `enum` (Gemini
/// enums are strings) is moved into the description.
pub fn gemini_schema(schema: &Value) -> Value {
    let mut cx = GeminiCx {
        root: schema,
        stack: Vec::new(),
        inlined: 0,
    };
    cx.clean(schema, 0)
}

struct GeminiCx<'a> {
    root: &'a Value,
    /// The `$ref`s being expanded, to cut recursion.
    stack: Vec<String>,
    inlined: usize,
}

/// A local `$ref` target: `#` or a JSON pointer fragment (percent-decoded).
fn local_ref<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let frag = r.strip_prefix('#')?;
    if frag.is_empty() {
        return Some(root);
    }
    root.pointer(&percent_decode(frag)?)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn type_only(schema: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for k in ["type", "description"] {
        if let Some(v) = schema.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

impl GeminiCx<'_> {
    fn clean(&mut self, node: &Value, depth: usize) -> Value {
        // Boolean schemas (`true`: anything) have no OpenAPI form; `{}` is the closest.
        let Some(obj) = node.as_object() else {
            return Value::Object(Map::new());
        };
        if depth > GEMINI_MAX_DEPTH {
            return type_only(obj);
        }
        if let Some(Value::String(r)) = obj.get("$ref") {
            let r = r.clone();
            let target = local_ref(self.root, &r).and_then(Value::as_object);
            let mut merged = obj.clone();
            merged.remove("$ref");
            let Some(target) = target else {
                // Remote or anchor refs cannot be inlined: keep what the siblings say.
                return self.clean_map(merged, depth);
            };
            if self.stack.contains(&r) || self.inlined >= GEMINI_MAX_INLINED {
                if let Value::Object(cut) = type_only(target) {
                    for (k, v) in cut {
                        merged.entry(k).or_insert(v);
                    }
                }
                return self.clean_map(merged, depth);
            }
            self.inlined += 1;
            // The referring schema's own keywords (say, a description) win over the target's.
            let mut full = target.clone();
            full.extend(merged);
            self.stack.push(r);
            let out = self.clean(&Value::Object(full), depth + 1);
            self.stack.pop();
            return out;
        }
        self.clean_map(obj.clone(), depth)
    }

    fn clean_map(&mut self, mut m: Map<String, Value>, depth: usize) -> Value {
        // allOf: merge the (cleaned) members into this schema; its own keywords win.
        if let Some(Value::Array(all)) = m.remove("allOf") {
            for member in all {
                if let Value::Object(member) = self.clean(&member, depth + 1) {
                    merge_into(&mut m, member);
                }
            }
        }
        // Gemini has no oneOf; anyOf is the closest (it cannot say "exactly one").
        if let Some(one) = m.remove("oneOf") {
            m.entry("anyOf").or_insert(one);
        }

        let mut out = Map::new();
        let mut nullable = matches!(m.get("nullable"), Some(Value::Bool(true)));

        match m.get("type") {
            Some(Value::String(t)) => {
                out.insert("type".into(), Value::String(t.clone()));
            }
            Some(Value::Array(types)) => {
                let mut types: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
                if types.len() > 1 && types.contains(&"null") {
                    nullable = true;
                    types.retain(|t| *t != "null");
                }
                match types.as_slice() {
                    [] => {}
                    [one] => {
                        out.insert("type".into(), Value::String(one.to_string()));
                    }
                    many => {
                        if !m.contains_key("anyOf") {
                            let branches = many
                                .iter()
                                .map(|t| serde_json::json!({ "type": t }))
                                .collect();
                            m.insert("anyOf".into(), Value::Array(branches));
                        }
                    }
                }
            }
            _ => {}
        }
        let ty = out.get("type").and_then(Value::as_str).map(str::to_string);

        if let Some(Value::Object(props)) = m.get("properties") {
            let props: Map<String, Value> = props
                .iter()
                .map(|(k, v)| (k.clone(), self.clean(v, depth + 1)))
                .collect();
            out.insert("properties".into(), Value::Object(props));
        }
        if let Some(items @ (Value::Object(_) | Value::Bool(true))) = m.get("items") {
            out.insert("items".into(), self.clean(items, depth + 1));
        }
        if let Some(Value::Array(any)) = m.get("anyOf") {
            let mut branches = Vec::new();
            for b in any {
                let b = self.clean(b, depth + 1);
                if b.get("type").and_then(Value::as_str) == Some("null")
                    && b.as_object().is_some_and(|o| o.len() == 1)
                {
                    nullable = true;
                } else {
                    branches.push(b);
                }
            }
            match branches.len() {
                0 => {}
                // `anyOf: [X, null]` is how generators spell an optional X: hoist X.
                1 if !out.contains_key("type") => {
                    if let Some(Value::Object(only)) = branches.pop() {
                        if only.get("nullable") == Some(&Value::Bool(true)) {
                            nullable = true;
                        }
                        for (k, v) in only {
                            if !m.contains_key(&k) || k == "type" {
                                out.entry(k).or_insert(v);
                            }
                        }
                    }
                }
                _ => {
                    out.insert("anyOf".into(), Value::Array(branches));
                }
            }
        }

        let mut extra_description = None;
        let mut enum_values: Option<Vec<Value>> = match m.get("enum") {
            Some(Value::Array(values)) => Some(values.clone()),
            _ => None,
        };
        if enum_values.is_none() {
            match m.get("const") {
                Some(Value::String(s)) => enum_values = Some(vec![Value::String(s.clone())]),
                Some(Value::Null) | None => {}
                Some(other) => extra_description = Some(format!("Must be {other}.")),
            }
        }
        if let Some(mut values) = enum_values {
            if values.iter().any(Value::is_null) {
                nullable = true;
                values.retain(|v| !v.is_null());
            }
            if values.iter().all(Value::is_string) {
                if !values.is_empty() {
                    out.insert("enum".into(), Value::Array(values));
                }
            } else {
                let list: Vec<String> = values.iter().map(Value::to_string).collect();
                extra_description = Some(format!("One of: {}.", list.join(", ")));
            }
        }

        for (k, v) in &m {
            match k.as_str() {
                "type" | "properties" | "items" | "anyOf" | "enum" | "nullable" | "required"
                | "format" => {}
                "title" | "description" | "pattern" if v.is_string() => {
                    out.insert(k.clone(), v.clone());
                }
                "propertyOrdering" if v.is_array() => {
                    out.insert(k.clone(), v.clone());
                }
                "minimum" | "maximum" if v.is_number() => {
                    out.insert(k.clone(), v.clone());
                }
                "maxItems" | "minItems" | "minProperties" | "maxProperties" | "minLength"
                | "maxLength"
                    if v.is_u64() =>
                {
                    out.insert(k.clone(), v.clone());
                }
                _ => {}
            }
        }
        if let Some(Value::String(f)) = m.get("format") {
            if gemini_format_ok(ty.as_deref(), f) {
                out.insert("format".into(), Value::String(f.clone()));
            }
        }
        // Gemini rejects a `required` name that is not among the properties.
        if let (Some(Value::Array(req)), Some(Value::Object(props))) =
            (m.get("required"), out.get("properties"))
        {
            let req: Vec<Value> = req
                .iter()
                .filter(|r| r.as_str().is_some_and(|r| props.contains_key(r)))
                .cloned()
                .collect();
            if !req.is_empty() {
                out.insert("required".into(), Value::Array(req));
            }
        }
        if let Some(extra) = extra_description {
            let text = match out.get("description").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => format!("{d} {extra}"),
                _ => extra,
            };
            out.insert("description".into(), Value::String(text));
        }
        if nullable {
            out.insert("nullable".into(), Value::Bool(true));
        }
        debug_assert!(out.keys().all(|k| GEMINI_KEYWORDS.contains(&k.as_str())));
        Value::Object(out)
    }
}

/// Merges an `allOf` member into the schema: properties and required are united, any other
/// keyword is taken only where the schema has none.
fn merge_into(m: &mut Map<String, Value>, member: Map<String, Value>) {
    for (k, v) in member {
        match (k.as_str(), m.get_mut(&k), v) {
            ("properties", Some(Value::Object(mine)), Value::Object(theirs)) => {
                for (p, s) in theirs {
                    mine.entry(p).or_insert(s);
                }
            }
            ("required", Some(Value::Array(mine)), Value::Array(theirs)) => {
                for r in theirs {
                    if !mine.contains(&r) {
                        mine.push(r);
                    }
                }
            }
            (_, Some(_), _) => {}
            (_, None, v) => {
                m.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(name: &str, schema: Value) -> ToolDef {
        ToolDef {
            name: name.into(),
            description: format!("the {name} tool"),
            input_schema: schema,
        }
    }

    fn weather() -> ToolDef {
        def(
            "get_weather",
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    "when": {"type": "string", "format": "date-time"},
                    "stops": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"qty": {"type": "integer", "minimum": 0}},
                        "required": ["qty"]
                    }}
                },
                "required": ["city"],
                "additionalProperties": false
            }),
        )
    }

    #[test]
    fn tools_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tool>();
        assert_send_sync::<ToolRegistry>();
    }

    #[test]
    fn valid_schemas_compile() {
        let t = Tool::compile(weather()).unwrap();
        assert_eq!(t.name(), "get_weather");
        for schema in [
            json!({"type": "object"}),
            json!({"type": "object", "properties": {}}),
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "$defs": {"p": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/p"}}}),
            // A draft-07 schema as many generators still emit, tuple `items` and all.
            json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                   "definitions": {"p": {"type": "string"}},
                   "properties": {"a": {"$ref": "#/definitions/p"}, "t": {"type": "array", "items": [{"type": "string"}]}}}),
        ] {
            Tool::compile(def("t", schema.clone())).unwrap_or_else(|e| panic!("{schema}: {e}"));
        }
        for name in ["a", "get-weather_2", &"x".repeat(64)] {
            Tool::compile(def(name, json!({"type": "object"}))).unwrap();
        }
    }

    #[test]
    fn invalid_schemas_are_rejected_with_the_reason() {
        let err = |name: &str, schema: Value| Tool::compile(def(name, schema)).unwrap_err();

        let e = err(
            "t",
            json!({"type": "object", "properties": {"city": {"type": "strin"}}}),
        );
        assert!(
            e.starts_with("tool \"t\": invalid input_schema at /properties/city/type: "),
            "{e}"
        );
        let e = err(
            "t",
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}),
        );
        assert!(
            e.contains("/properties/n/minimum") && e.contains("\"zero\""),
            "{e}"
        );
        let e = err("t", json!({"type": "object", "required": "city"}));
        assert!(
            e.contains("/required") && e.contains("\"city\" is not of type \"array\""),
            "{e}"
        );
        let e = err(
            "t",
            json!({"type": "object", "properties": {"p": {"type": "string", "pattern": "(unclosed"}}}),
        );
        assert!(
            e.contains("invalid input_schema") && e.contains("(unclosed"),
            "{e}"
        );
        // A remote $ref is refused without any fetch.
        let e = err(
            "t",
            json!({"type": "object", "properties": {"p": {"$ref": "https://example.invalid/s.json"}}}),
        );
        assert!(
            e.contains("invalid input_schema") && e.contains("example.invalid"),
            "{e}"
        );
        let e = err(
            "t",
            json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/missing"}}}),
        );
        assert!(
            e.contains("invalid input_schema") && e.contains("missing"),
            "{e}"
        );

        // The top level must be an object schema.
        let e = err("t", json!({"type": "string"}));
        assert_eq!(
            e,
            "tool \"t\": input_schema must have \"type\": \"object\" at the top level \
             (a tool's input is a JSON object), not \"type\": \"string\""
        );
        assert!(err("t", json!({"properties": {}})).contains("must have \"type\": \"object\""));
        assert!(err("t", json!({"type": ["object", "null"]}))
            .contains("not \"type\": [\"object\",\"null\"]"));
        assert_eq!(
            err("t", json!(true)),
            "tool \"t\": input_schema must be a JSON Schema object, not a boolean"
        );

        // Names.
        for bad in ["", "get weather", "wetter_ä", "a.b", &"x".repeat(65)] {
            let e = err(bad, json!({"type": "object"}));
            assert!(
                e.starts_with(&format!("tool name {bad:?} is invalid: use 1 to 64")),
                "{e}"
            );
        }
    }

    #[test]
    fn validation_errors_name_the_pointer() {
        let t = Tool::compile(weather()).unwrap();
        assert!(t.validate(&json!({"city": "Oslo"})).is_empty());
        assert!(t.validate(&json!({"city": "Oslo", "days": 3, "when": "2025-06-01T12:00:00Z", "stops": [{"qty": 0}]})).is_empty());

        assert_eq!(
            t.validate(&json!({"city": 5})),
            vec!["/city: 5 is not of type \"string\"".to_string()]
        );
        assert_eq!(
            t.validate(&json!({})),
            vec!["(root): \"city\" is a required property".to_string()]
        );
        assert_eq!(
            t.validate(&json!({"city": "Oslo", "stops": [{"qty": 1}, {"qty": -1}]})),
            vec!["/stops/1/qty: -1 is less than the minimum of 0".to_string()]
        );
        let mut errs = t.validate(&json!({"city": "", "days": 99, "when": "tomorrow", "extra": 1}));
        errs.sort();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].starts_with("(root): ") && errs[0].contains("'extra'"),
            "{errs:?}"
        );
        assert!(errs[1].starts_with("/city: \"\" "), "{errs:?}");
        assert_eq!(errs[2], "/days: 99 is greater than the maximum of 14");
        assert_eq!(errs[3], "/when: \"tomorrow\" is not a \"date-time\"");
        assert_eq!(
            t.validate(&json!("Oslo")),
            vec!["(root): \"Oslo\" is not of type \"object\"".to_string()]
        );
    }

    #[test]
    fn validation_errors_are_bounded() {
        let t = Tool::compile(def(
            "t",
            json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}}),
        ))
        .unwrap();
        let errs = t.validate(&json!({"xs": (0..50).collect::<Vec<_>>()}));
        assert_eq!(errs.len(), MAX_ERRORS + 1);
        assert_eq!(errs[0], "/xs/0: 0 is not of type \"string\"");
        assert_eq!(errs[MAX_ERRORS], "... and 30 more");
        let errs = t.validate(&json!({"xs": [{"big": "y".repeat(10_000)}]}));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("/xs/0: {\"big\":\"yyy") && errs[0].ends_with('…'),
            "{}",
            errs[0]
        );
        assert_eq!(errs[0].chars().count(), MAX_ERROR_CHARS + 1);
    }

    const LIM: ToolLimits = ToolLimits {
        max_tools: 100,
        max_tool_bytes: 1 << 20,
    };

    #[test]
    fn limits_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/tools.json");
        let reg = ToolRegistry::load(file.clone());
        let two = ToolLimits {
            max_tools: 2,
            max_tool_bytes: 100,
        };
        reg.register(def("a", json!({"type": "object"})), 10, two)
            .unwrap();
        reg.register(def("b", json!({"type": "object"})), 10, two)
            .unwrap();
        assert_eq!(
            reg.register(def("c", json!({"type": "object"})), 10, two),
            Err(RegisterError::Full(2))
        );
        // Replacing an existing tool is not an addition.
        reg.register(weather_named("b"), 10, two).unwrap();
        assert!(matches!(
            reg.register(def("a", json!({"type": "object"})), 101, two),
            Err(RegisterError::Invalid(m)) if m.contains("max_tool_bytes")
        ));
        assert!(reg.remove("a"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ToolRegistry::load(file.clone());
        let names: Vec<String> = again.list().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(again.get("b").unwrap().def, weather_named("b"));
        std::fs::write(&file, b"{not json").unwrap();
        assert!(ToolRegistry::load(file.clone()).is_empty());
        assert!(file.with_extension("json.bad").exists());
    }

    fn weather_named(name: &str) -> ToolDef {
        ToolDef {
            name: name.into(),
            ..weather()
        }
    }

    #[test]
    fn registry_register_list_get_remove() {
        let reg = ToolRegistry::default();
        assert!(reg.list().is_empty());
        reg.register(def("zeta", json!({"type": "object"})), 0, LIM)
            .unwrap();
        reg.register(weather(), 0, LIM).unwrap();
        reg.register(def("alpha", json!({"type": "object"})), 0, LIM)
            .unwrap();
        let names: Vec<String> = reg.list().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["alpha", "get_weather", "zeta"]);

        // Replacing: the new schema is the one that validates.
        assert!(reg
            .get("alpha")
            .unwrap()
            .validate(&json!({"n": "x"}))
            .is_empty());
        let strict = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        reg.register(def("alpha", strict.clone()), 0, LIM).unwrap();
        assert_eq!(reg.list().len(), 3);
        assert_eq!(reg.get("alpha").unwrap().def.input_schema, strict);
        assert_eq!(
            reg.get("alpha").unwrap().validate(&json!({"n": "x"})),
            ["/n: \"x\" is not of type \"integer\""]
        );

        // A bad re-registration keeps the old tool.
        assert!(reg
            .register(def("alpha", json!({"type": "nope"})), 0, LIM)
            .is_err());
        assert_eq!(reg.get("alpha").unwrap().def.input_schema, strict);

        assert!(reg.remove("zeta"));
        assert!(!reg.remove("zeta"));
        assert!(reg.get("zeta").is_none());
        assert_eq!(reg.list().len(), 2);
    }

    #[test]
    fn resolve_named_and_inline_tools() {
        let reg = ToolRegistry::default();
        reg.register(weather(), 0, LIM).unwrap();
        let inline = def(
            "lookup",
            json!({"type": "object", "properties": {"q": {"type": "string"}}}),
        );
        let tools = reg
            .resolve(&[
                ToolRef::Named("get_weather".into()),
                ToolRef::Inline(inline.clone()),
            ])
            .unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["get_weather", "lookup"]);
        assert!(Arc::ptr_eq(&tools[0], &reg.get("get_weather").unwrap()));
        assert_eq!(
            tools[1].validate(&json!({"q": 1})),
            ["/q: 1 is not of type \"string\""]
        );
        // Inline tools are not registered by being used.
        assert!(reg.get("lookup").is_none());
        // An inline tool may shadow a registered one.
        let shadow = def("get_weather", json!({"type": "object"}));
        assert!(reg.resolve(&[ToolRef::Inline(shadow)]).unwrap()[0]
            .validate(&json!({}))
            .is_empty());
        assert!(reg.resolve(&[]).unwrap().is_empty());

        let e = reg
            .resolve(&[
                ToolRef::Named("get_weather".into()),
                ToolRef::Named("nope".into()),
            ])
            .unwrap_err();
        assert!(e.starts_with("tool \"nope\" is not registered"), "{e}");
        let e = reg
            .resolve(&[
                ToolRef::Named("get_weather".into()),
                ToolRef::Inline(weather()),
            ])
            .unwrap_err();
        assert_eq!(
            e,
            "tool \"get_weather\" appears more than once in the request"
        );
        let e = reg
            .resolve(&[ToolRef::Inline(inline.clone()), ToolRef::Inline(inline)])
            .unwrap_err();
        assert_eq!(e, "tool \"lookup\" appears more than once in the request");
        let e = reg
            .resolve(&[ToolRef::Inline(def(
                "bad",
                json!({"type": "object", "minProperties": -1}),
            ))])
            .unwrap_err();
        assert!(
            e.starts_with("tool \"bad\": invalid input_schema at /minProperties"),
            "{e}"
        );
    }

    #[test]
    fn gemini_drops_every_unsupported_keyword_at_every_depth() {
        // The same junk at the top, in a property, in items, in anyOf branches and in a $def.
        fn junk(mut m: Value) -> Value {
            let extra = json!({
                "$comment": "c",
                "additionalProperties": false,
                "unevaluatedProperties": false,
                "patternProperties": {"^x": {"type": "string"}},
                "examples": [1],
                "example": 1,
                "default": 2,
                "if": {"type": "object"}, "then": {"type": "object"}, "else": {"type": "object"},
                "not": {"type": "null"},
                "dependentRequired": {"a": ["b"]},
                "dependentSchemas": {"a": {"type": "object"}},
                "contains": {"type": "string"},
                "minContains": 1, "maxContains": 2,
                "prefixItems": [{"type": "string"}],
                "exclusiveMinimum": 0, "exclusiveMaximum": 10,
                "readOnly": true, "writeOnly": false,
                "contentEncoding": "base64", "contentMediaType": "text/plain",
                "multipleOf": 2, "uniqueItems": true, "x-vendor": 1
            });
            if let (Value::Object(m), Value::Object(extra)) = (&mut m, extra) {
                for (k, v) in extra {
                    m.entry(k).or_insert(v);
                }
            }
            m
        }
        let schema = junk(json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://example.invalid/order",
            "type": "object",
            "title": "Order",
            "description": "An order",
            "$defs": {"Item": junk(json!({"type": "object", "properties": {"sku": {"type": "string", "const": "A1"}}}))},
            "definitions": {"Unused": {"type": "string"}},
            "properties": {
                "id": junk(json!({"type": "string", "format": "uuid", "pattern": "^[a-f0-9-]+$", "minLength": 36, "maxLength": 36})),
                "at": {"type": "string", "format": "date-time"},
                "qty": junk(json!({"type": "integer", "format": "int32", "minimum": 1, "maximum": 99})),
                "items": junk(json!({"type": "array", "minItems": 1, "maxItems": 5, "items": {"$ref": "#/$defs/Item"}})),
                "note": junk(json!({"anyOf": [junk(json!({"type": "string"})), junk(json!({"type": "integer"}))]})),
                "kind": {"type": "string", "enum": ["a", "b"], "format": "enum"}
            },
            "required": ["id", "items", "ghost"],
            "minProperties": 1,
            "maxProperties": 9,
            "propertyOrdering": ["id", "items"]
        }));
        let expected = json!({
            "type": "object",
            "title": "Order",
            "description": "An order",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-f0-9-]+$", "minLength": 36, "maxLength": 36},
                "at": {"type": "string", "format": "date-time"},
                "qty": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 99},
                "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
                    "type": "object", "properties": {"sku": {"type": "string", "enum": ["A1"]}}
                }},
                "note": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "kind": {"type": "string", "enum": ["a", "b"], "format": "enum"}
            },
            "required": ["id", "items"],
            "minProperties": 1,
            "maxProperties": 9,
            "propertyOrdering": ["id", "items"]
        });
        let cleaned = gemini_schema(&schema);
        assert_eq!(
            cleaned,
            expected,
            "{}",
            serde_json::to_string_pretty(&cleaned).unwrap()
        );
        // Cleaning is idempotent, and what the Tool caches is the same.
        assert_eq!(gemini_schema(&cleaned), expected);
        let tool = Tool::compile(def("order", schema)).unwrap();
        assert_eq!(tool.gemini_input_schema(), &expected);
    }

    #[test]
    fn gemini_nullable_forms() {
        let s = json!({"type": "object", "properties": {
            "a": {"type": ["string", "null"], "description": "maybe"},
            "b": {"type": ["null", "integer"], "minimum": 0},
            "c": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}], "description": "opt"},
            "d": {"enum": ["x", "y", null]},
            "e": {"type": ["string", "integer"]},
            "f": {"oneOf": [{"type": "string"}, {"type": "boolean"}]},
            "g": {"type": "integer", "enum": [1, 2, 3], "description": "Level."},
            "h": {"const": 7},
            "i": {"allOf": [{"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
                            {"properties": {"y": {"type": "number"}}, "required": ["y"]}]}
        }});
        assert_eq!(
            gemini_schema(&s)["properties"],
            json!({
                "a": {"type": "string", "nullable": true, "description": "maybe"},
                "b": {"type": "integer", "nullable": true, "minimum": 0},
                "c": {"type": "string", "maxLength": 3, "nullable": true, "description": "opt"},
                "d": {"enum": ["x", "y"], "nullable": true},
                "e": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "f": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
                "g": {"type": "integer", "description": "Level. One of: 1, 2, 3."},
                "h": {"description": "Must be 7."},
                "i": {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "number"}}, "required": ["x", "y"]}
            })
        );
    }

    #[test]
    fn gemini_inlines_local_refs_and_cuts_recursion() {
        let s = json!({
            "type": "object",
            "$defs": {
                "Node": {"type": "object", "description": "a tree node", "properties": {
                    "name": {"$ref": "#/$defs/Name"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}
                }},
                "Name": {"type": "string", "minLength": 1},
                "we~ird/key": {"type": "boolean"}
            },
            "properties": {
                "root": {"$ref": "#/$defs/Node", "description": "the root"},
                "flag": {"$ref": "#/$defs/we~0ird~1key"},
                "remote": {"$ref": "https://example.invalid/s.json", "description": "kept"},
                "anchor": {"$ref": "#thing"}
            }
        });
        assert_eq!(
            gemini_schema(&s)["properties"],
            json!({
                "root": {"type": "object", "description": "the root", "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "children": {"type": "array", "items": {"type": "object", "description": "a tree node"}}
                }},
                "flag": {"type": "boolean"},
                "remote": {"description": "kept"},
                "anchor": {}
            })
        );
        // Fan-out references stay bounded.
        let mut defs = Map::new();
        defs.insert("d0".into(), json!({"type": "string"}));
        for i in 1..40 {
            let prev = format!("#/$defs/d{}", i - 1);
            defs.insert(
                format!("d{i}"),
                json!({"type": "object", "properties": {"l": {"$ref": prev}, "r": {"$ref": prev}}}),
            );
        }
        let s =
            json!({"type": "object", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/d39"}}});
        let out = gemini_schema(&s);
        assert!(serde_json::to_string(&out).unwrap().len() < 1_000_000);
    }

    #[test]
    fn cleaned_schema_validates_simple_inputs_the_same() {
        let original = weather().input_schema;
        let cleaned = gemini_schema(&original);
        let a = jsonschema::validator_for(&original).unwrap();
        let b = jsonschema::validator_for(&cleaned).unwrap();
        for input in [
            json!({"city": "Oslo"}),
            json!({"city": "Oslo", "days": 3, "stops": [{"qty": 2}]}),
            json!({}),
            json!({"city": 5}),
            json!({"city": ""}),
            json!({"city": "Oslo", "days": 0}),
            json!({"city": "Oslo", "days": 15}),
            json!({"city": "Oslo", "stops": [{}]}),
            json!({"city": "Oslo", "stops": [{"qty": -1}]}),
            json!({"city": "Oslo", "stops": "none"}),
            json!([]),
        ] {
            assert_eq!(a.is_valid(&input), b.is_valid(&input), "{input}");
        }
        // With $refs inlined too.
        let original = json!({"type": "object", "$defs": {"n": {"type": "integer", "minimum": 0}},
                              "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                              "required": ["a"]});
        let cleaned = gemini_schema(&original);
        let a = jsonschema::validator_for(&original).unwrap();
        let b = jsonschema::validator_for(&cleaned).unwrap();
        for input in [
            json!({"a": 1}),
            json!({"a": -1}),
            json!({"a": 1, "b": [1, 2]}),
            json!({"a": 1, "b": [1, "x"]}),
            json!({"b": []}),
        ] {
            assert_eq!(a.is_valid(&input), b.is_valid(&input), "{input}");
        }
    }
}
