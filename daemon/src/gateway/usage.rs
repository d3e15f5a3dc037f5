//! Token usage read from answers the gateway passes through unchanged, to correct the
//! rate limiter's estimate and fill the usage ledger: from a JSON body, or from a
//! stream's events as they pass. [`Meter`] records one gateway request in the ledger.

use crate::state::Daemon;
use crate::usage::{Outcome, Request};
use llmd_proto::chat::Usage;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

/// One gateway request on its way to the usage ledger: who asked, on which profile, since
/// when. Cloned into the passing answer, which records it when it ends.
#[derive(Clone)]
pub struct Meter {
    daemon: Arc<Daemon>,
    profile: Arc<str>,
    /// The pool member that serves the request, for a pool.
    member: Option<Arc<str>>,
    agent: Arc<str>,
    started: Instant,
}

impl Meter {
    /// A request of `agent` on `profile`, starting now.
    pub fn new(daemon: Arc<Daemon>, profile: &str, agent: &str) -> Meter {
        Meter {
            daemon,
            profile: profile.into(),
            member: None,
            agent: agent.into(),
            started: Instant::now(),
        }
    }

    /// The same request, served by pool member `member`.
    pub fn for_member(&self, member: &str) -> Meter {
        Meter {
            member: Some(member.into()),
            ..self.clone()
        }
    }

    /// Records the request as ended with `outcome`, with the usage and model `seen`.
    pub fn record(&self, outcome: Outcome<'_>, seen: &Seen) {
        self.record_usage(outcome, seen.usage(), seen.model.as_deref());
    }

    /// Records the request with usage and model known another way (translated routes).
    pub fn record_usage(&self, outcome: Outcome<'_>, usage: Usage, model: Option<&str>) {
        self.daemon.usage.record(&Request {
            profile: &self.profile,
            member: self.member.as_deref(),
            agent: Some(&self.agent),
            method: "gateway",
            model,
            usage,
            outcome,
            latency: self.started.elapsed(),
        });
    }
}

/// Longest SSE line scanned for usage; a longer one is passed on but not read.
const MAX_LINE: usize = 1 << 20;

/// Token counts seen so far (each the largest seen: streams repeat running totals).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    total: u64,
    any: bool,
    /// The model the answer names (`model`, `message.model`, Gemini's `modelVersion`).
    pub model: Option<String>,
}

impl Seen {
    /// Total tokens, when the answer reported any.
    pub fn total(&self) -> Option<u64> {
        self.any.then(|| {
            self.total
                .max(self.input + self.output + self.cache_read + self.cache_write)
        })
    }

    /// The counts, for the ledger. OpenAI counts cached tokens inside `prompt_tokens`, so
    /// only Anthropic's split reaches the cache columns.
    pub fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input,
            output_tokens: self.output,
            cache_read_tokens: self.cache_read,
            cache_write_tokens: self.cache_write,
        }
    }

    /// Reads the usage fields of Anthropic, OpenAI and Gemini answers (or stream events).
    pub fn read(&mut self, v: &Value) {
        let num = |o: &Value, k: &str| o.get(k).and_then(Value::as_u64);
        if self.model.is_none() {
            self.model = [
                v.get("model"),
                v.pointer("/message/model"),
                v.get("modelVersion"),
            ]
            .into_iter()
            .flatten()
            .find_map(Value::as_str)
            .map(|m| m.chars().take(200).collect());
        }
        for u in [v.get("usage"), v.pointer("/message/usage")]
            .into_iter()
            .flatten()
            .filter(|u| u.is_object())
        {
            self.any = true;
            let input = num(u, "input_tokens").or_else(|| num(u, "prompt_tokens"));
            let output = num(u, "output_tokens").or_else(|| num(u, "completion_tokens"));
            self.input = self.input.max(input.unwrap_or(0));
            self.output = self.output.max(output.unwrap_or(0));
            self.cache_read = self
                .cache_read
                .max(num(u, "cache_read_input_tokens").unwrap_or(0));
            self.cache_write = self
                .cache_write
                .max(num(u, "cache_creation_input_tokens").unwrap_or(0));
            self.total = self.total.max(num(u, "total_tokens").unwrap_or(0));
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            self.any = true;
            self.input = self.input.max(num(u, "promptTokenCount").unwrap_or(0));
            self.output = self.output.max(
                num(u, "candidatesTokenCount").unwrap_or(0)
                    + num(u, "thoughtsTokenCount").unwrap_or(0),
            );
            self.total = self.total.max(num(u, "totalTokenCount").unwrap_or(0));
        }
    }
}

/// Watches SSE bytes go by and reads the usage of the events that carry one.
#[derive(Debug, Default)]
pub struct SseScanner {
    line: Vec<u8>,
    skipping: bool,
    /// Usage so far.
    pub seen: Seen,
}

impl SseScanner {
    /// Feeds the next piece of the stream (cut anywhere).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if !self.skipping {
                self.line.extend_from_slice(&bytes[..nl]);
                let line = std::mem::take(&mut self.line);
                self.scan(&line);
                self.line = line;
            }
            self.line.clear();
            self.skipping = false;
            bytes = &bytes[nl + 1..];
        }
        if !self.skipping {
            if self.line.len() + bytes.len() > MAX_LINE {
                self.line.clear();
                self.skipping = true;
            } else {
                self.line.extend_from_slice(bytes);
            }
        }
    }

    fn scan(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        // Only events that mention usage are parsed: text deltas pass at no cost.
        if !contains(data, b"sage") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            self.seen.read(&v);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn anthropic_stream_usage_read_across_cuts() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n";
        for size in [1, 3, 17, text.len()] {
            let mut s = SseScanner::default();
            for piece in text.as_bytes().chunks(size) {
                s.feed(piece);
            }
            assert_eq!(s.seen.total(), Some(19), "cut {size}");
        }
    }

    #[test]
    fn json_usage_of_each_provider() {
        let mut s = Seen::default();
        s.read(&json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}));
        assert_eq!(s.total(), Some(7));
        let mut s = Seen::default();
        s.read(&json!({"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}));
        assert_eq!(s.total(), Some(7));
        let mut s = Seen::default();
        s.read(&json!({"data": []}));
        assert_eq!(s.total(), None);
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let mut s = SseScanner::default();
        s.feed(b"data: ");
        s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert!(s.line.len() <= MAX_LINE);
        s.feed(b"\ndata: {\"usage\":{\"input_tokens\":2,\"output_tokens\":3}}\n");
        assert_eq!(s.seen.total(), Some(5));
    }
}
