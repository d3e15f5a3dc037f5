//! A scripted HTTP/1.1 server on 127.0.0.1 for provider faults the fake providers do not
//! model: answers that never come, bodies that never end, streams cut mid-line, and
//! error bodies that echo the caller's key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One step of an answer.
#[derive(Debug, Clone)]
pub enum Act {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Hold the connection open without sending anything more (until the test ends).
    Stall,
    /// Close the connection.
    Close,
}

/// A request the stub read.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request line and headers.
    pub head: String,
    /// Body.
    pub body: Vec<u8>,
}

impl Seen {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

type Script = dyn Fn(usize, &Seen) -> Vec<Act> + Send + Sync;

/// A running stub.
#[derive(Clone)]
pub struct Stub {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub host: String,
    count: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stub {
    /// Serves every connection (numbered from 0) with what `script` says.
    pub async fn start(script: impl Fn(usize, &Seen) -> Vec<Act> + Send + Sync + 'static) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub");
        let addr = listener.local_addr().expect("stub address");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let (c, s) = (count.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let (script, s) = (script.clone(), s.clone());
                tokio::spawn(async move { serve(sock, n, &*script, &s).await });
            }
        });
        Stub {
            base: format!("http://{addr}"),
            host: addr.to_string(),
            count,
            seen,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Requests read so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    n: usize,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut tmp = [0u8; 8192];
        let Ok(k) = sock.read(&mut tmp).await else {
            return;
        };
        if k == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..k]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 1 << 20 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut req = Seen {
        head,
        body: Vec::new(),
    };
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut tmp = [0u8; 8192];
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(k) => buf.extend_from_slice(&tmp[..k]),
        }
    }
    req.body = buf[head_end..head_end + len].to_vec();
    let acts = script(n, &req);
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(req);
    for act in acts {
        match act {
            Act::Send(b) => {
                if sock.write_all(&b).await.is_err() {
                    return;
                }
                let _ = sock.flush().await;
            }
            Act::Stall => {
                // Held until the peer leaves (or the test's runtime ends).
                let mut tmp = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(3600), async {
                    while matches!(sock.read(&mut tmp).await, Ok(k) if k > 0) {}
                })
                .await;
                return;
            }
            Act::Close => return,
        }
    }
}

/// Response head of a close-delimited answer.
pub fn head(status: u16, content_type: &str) -> Act {
    Act::Send(
        format!("HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n")
            .into_bytes(),
    )
}

/// A whole JSON answer with its length.
pub fn json_answer(status: u16, body: &str) -> Act {
    Act::Send(
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// The opening events of an Anthropic stream (no content yet).
pub fn anthropic_start() -> String {
    concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"model\":\"stub\",\"usage\":{\"input_tokens\":1,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    )
    .to_owned()
}

/// One Anthropic text delta event.
pub fn anthropic_delta(text: &str) -> String {
    format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{}}}}}\n\n",
        serde_json::Value::String(text.to_owned())
    )
}

/// The closing events of an Anthropic stream.
pub fn anthropic_end() -> String {
    concat!(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    )
    .to_owned()
}

/// A complete Anthropic stream whose text is `pieces` joined.
pub fn anthropic_stream(pieces: &[&str]) -> Vec<u8> {
    let mut s = anthropic_start();
    for p in pieces {
        s.push_str(&anthropic_delta(p));
    }
    s.push_str(&anthropic_end());
    s.into_bytes()
}

/// A complete non-streaming Anthropic answer.
pub fn anthropic_json(text: &str) -> String {
    serde_json::json!({
        "id": "m1", "type": "message", "role": "assistant", "model": "stub",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1}
    })
    .to_string()
}
