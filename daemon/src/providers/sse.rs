//! Server-sent events: splits a byte stream into `event:`/`data:` records as they arrive.

use super::{describe, Call, DeltaSink, ProviderError, Stage};
use futures_util::StreamExt;
use std::time::Duration;

/// Largest event (or unfinished line) kept while parsing; a bigger one is a protocol
/// error rather than a reason to hold memory.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// One SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field (empty when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser over a response body.
pub struct SseStream<'a> {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    parser: Parser,
    idle: Duration,
    host: String,
    sink: Option<&'a dyn DeltaSink>,
}

impl<'a> SseStream<'a> {
    /// Wraps a streaming response of `call`: its idle timeout applies between chunks, and
    /// no more is read while its sink has no room.
    pub fn new(resp: reqwest::Response, call: &Call<'a>) -> Self {
        SseStream {
            body: resp.bytes_stream().boxed(),
            parser: Parser::default(),
            idle: call.timeouts.stream_idle,
            host: call.host(),
            sink: call.stream,
        }
    }

    /// A stream over bytes already in memory (property tests, replays), with the given
    /// idle timeout and no sink.
    pub fn from_chunks(chunks: Vec<Vec<u8>>, idle: Duration) -> SseStream<'static> {
        let items = chunks.into_iter().map(|c| Ok(bytes::Bytes::from(c)));
        SseStream {
            body: futures_util::stream::iter(items).boxed(),
            parser: Parser::default(),
            idle,
            host: "memory".into(),
            sink: None,
        }
    }

    /// The next event; `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, ProviderError> {
        loop {
            if let Some(sink) = self.sink {
                // Backpressure: the provider's socket is not read while the client lags.
                if !sink.ready().await {
                    return Err(ProviderError::Cancelled);
                }
            }
            if let Some(ev) = self.parser.next_event() {
                return Ok(Some(ev));
            }
            if self.parser.buffered() > MAX_EVENT_BYTES {
                return Err(ProviderError::Protocol(format!(
                    "stream event over {MAX_EVENT_BYTES} bytes"
                )));
            }
            let chunk = match tokio::time::timeout(self.idle, self.body.next()).await {
                Ok(c) => c,
                Err(_) => {
                    return Err(ProviderError::Timeout {
                        host: self.host.clone(),
                        stage: Stage::StreamIdle,
                        after: self.idle,
                    })
                }
            };
            match chunk {
                Some(Ok(chunk)) => self.parser.push(&chunk),
                Some(Err(e)) => {
                    return Err(ProviderError::Network {
                        host: self.host.clone(),
                        cause: format!("stream broke: {}", describe(&e)),
                    })
                }
                // Cut in the middle of a line: what is left is half an event.
                None if self.parser.mid_line() => {
                    return Err(ProviderError::EndedEarly(
                        "the connection closed in the middle of an event".into(),
                    ))
                }
                None => return Ok(self.parser.finish()),
            }
        }
    }
}

/// The byte-level parser (separate from I/O so it can be tested on any split).
#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    current: Event,
    has_data: bool,
}

impl Parser {
    /// Adds bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if the buffer holds one.
    pub fn next_event(&mut self) -> Option<Event> {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if self.has_data || !self.current.event.is_empty() {
                    self.has_data = false;
                    return Some(std::mem::take(&mut self.current));
                }
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (&*line, ""),
            };
            match field {
                "event" => self.current.event = value.to_owned(),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        None
    }

    /// Bytes held (unparsed lines plus the event being built).
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.current.data.len() + self.current.event.len()
    }

    /// True when the buffer ends in an unfinished line.
    pub fn mid_line(&self) -> bool {
        !self.buf.is_empty()
    }

    /// An event left without its blank line at the end of the stream.
    pub fn finish(&mut self) -> Option<Event> {
        if !self.buf.is_empty() {
            self.buf.push(b'\n');
        }
        self.buf.push(b'\n');
        self.next_event()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_across_arbitrary_splits() {
        let text = b"event: message_start\ndata: {\"a\":1}\n\n: ping comment\r\nevent: delta\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for split in 1..text.len() {
            let mut p = Parser::default();
            let mut got = Vec::new();
            for chunk in text.chunks(split) {
                p.push(chunk);
                while let Some(e) = p.next_event() {
                    got.push(e);
                }
            }
            assert_eq!(got.len(), 3, "split {split}");
            assert_eq!(
                got[0],
                Event {
                    event: "message_start".into(),
                    data: "{\"a\":1}".into()
                }
            );
            assert_eq!(
                got[1],
                Event {
                    event: "delta".into(),
                    data: "x\ny".into()
                }
            );
            assert_eq!(got[2].data, "[DONE]");
        }
    }

    #[test]
    fn last_event_without_blank_line() {
        let mut p = Parser::default();
        p.push(b"data: tail");
        assert!(p.next_event().is_none());
        assert_eq!(p.finish().unwrap().data, "tail");
    }
}
