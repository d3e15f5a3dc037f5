//! Newline-delimited frames with a size limit, independent of any I/O runtime.
//!
//! The caller reads bytes into [`LineDecoder::buffer`] and then takes whole lines out with
//! [`LineDecoder::decode`]. Lines are handed out as slices of the internal buffer so a
//! connection allocates nothing per request beyond what JSON parsing needs.

use serde::Serialize;

/// A line grew past the configured maximum before its `\n` arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line exceeds the maximum frame size of {max} bytes")]
pub struct FrameTooLarge {
    /// The limit that was exceeded.
    pub max: usize,
}

/// Splits a byte stream into `\n`-terminated frames of at most `max` bytes.
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    start: usize,
    scanned: usize,
    max: usize,
}

impl LineDecoder {
    /// A decoder that rejects lines longer than `max` bytes (excluding the newline).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(8 * 1024),
            start: 0,
            scanned: 0,
            max,
        }
    }

    /// The buffer to append freshly read bytes to. Already decoded lines are dropped first,
    /// so the buffer only ever holds the unfinished tail plus the new data.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8 * 1024);
        }
        &mut self.buf
    }

    /// The next complete line without its terminator (a trailing `\r` is dropped too), or
    /// `None` when more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<&[u8]>, FrameTooLarge> {
        let unscanned = &self.buf[self.scanned..];
        match unscanned.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let begin = self.start;
                let mut end = self.scanned + pos;
                self.start = end + 1;
                self.scanned = self.start;
                if end - begin > self.max {
                    return Err(FrameTooLarge { max: self.max });
                }
                if end > begin && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                Ok(Some(&self.buf[begin..end]))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max {
                    return Err(FrameTooLarge { max: self.max });
                }
                Ok(None)
            }
        }
    }

    /// True while part of a line has arrived without its newline.
    pub fn has_partial_line(&self) -> bool {
        self.buf.len() > self.start
    }
}

/// Serializes `msg` as one JSON line (with the trailing `\n`).
pub fn encode_line<T: Serialize + ?Sized>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Serializing our own types into a Vec cannot fail: no I/O, string keys only.
    if serde_json::to_writer(&mut out, msg).is_err() {
        out.clear();
        out.extend_from_slice(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"serialization failed","data":{"kind":"internal"}}}"#);
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut LineDecoder, bytes: &[u8]) {
        d.buffer().extend_from_slice(bytes);
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut d = LineDecoder::new(100);
        feed(&mut d, b"{\"a\":1}\n{\"b\"");
        assert_eq!(d.decode().unwrap(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(d.decode().unwrap(), None);
        assert!(d.has_partial_line());
        feed(&mut d, b":2}\r\n");
        assert_eq!(d.decode().unwrap(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(d.decode().unwrap(), None);
        assert!(!d.has_partial_line());
    }

    #[test]
    fn rejects_long_line_without_newline() {
        let mut d = LineDecoder::new(8);
        feed(&mut d, b"123456789");
        assert_eq!(d.decode(), Err(FrameTooLarge { max: 8 }));
    }

    #[test]
    fn rejects_long_complete_line_but_accepts_exact_limit() {
        let mut d = LineDecoder::new(4);
        feed(&mut d, b"1234\n12345\n");
        assert_eq!(d.decode().unwrap(), Some(&b"1234"[..]));
        assert_eq!(d.decode(), Err(FrameTooLarge { max: 4 }));
    }

    #[test]
    fn compacts_consumed_bytes() {
        let mut d = LineDecoder::new(16);
        for _ in 0..10_000 {
            feed(&mut d, b"abc\n");
            assert_eq!(d.decode().unwrap(), Some(&b"abc"[..]));
        }
        assert!(d.buffer().len() < 16);
    }

    #[test]
    fn encode_appends_newline() {
        assert_eq!(encode_line(&serde_json::json!({"a": 1})), b"{\"a\":1}\n");
    }
}
