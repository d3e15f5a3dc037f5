//! Raw line-level access to the socket, for tests of the wire format itself.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A raw connection: write bytes, read JSON lines.
pub struct Raw {
    /// Reader.
    pub r: BufReader<OwnedReadHalf>,
    /// Writer.
    pub w: OwnedWriteHalf,
}

impl Raw {
    /// Connects.
    pub async fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).await.expect("connect");
        let (r, w) = s.into_split();
        Raw {
            r: BufReader::new(r),
            w,
        }
    }

    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
    }

    /// Reads one line as JSON; `None` at EOF.
    pub async fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), self.r.read_line(&mut line))
            .await
            .expect("timed out waiting for a line")
            .ok()?;
        if n == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}")))
    }

    /// Like [`Raw::call`], but `None` when the daemon closed the connection first (e.g. it
    /// answered `busy` on connect).
    pub async fn try_call(&mut self, id: i64, method: &str, params: Value) -> Option<Value> {
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.w.write_all(format!("{req}\n").as_bytes()).await.ok()?;
        self.recv().await.filter(|v| v.get("result").is_some())
    }

    /// Sends a request and returns the next line.
    pub async fn call(&mut self, id: i64, method: &str, params: Value) -> Value {
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send(format!("{req}\n").as_bytes()).await;
        self.recv().await.expect("answer")
    }
}
