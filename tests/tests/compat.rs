//! Wire compatibility (issue 9, finding 8): this `llmd-client` talking to a newer daemon
//! that adds fields and variants to its results. A scripted server on a real Unix socket
//! plays the newer daemon.

use llmd_client::{ChatEvent, Client};
use llmd_proto::chat::{Block, ChatRequest, Delta, StopReason};
use llmd_proto::methods::ProfileState;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Serves one connection: every request gets `answer(method, id)` (lines to send).
async fn newer_daemon(
    answer: impl Fn(&str, &Value) -> Vec<Value> + Send + 'static,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("llmd.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(req) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let method = req["method"].as_str().unwrap_or_default().to_owned();
            for out in answer(&method, &req["id"]) {
                if w.write_all(format!("{out}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    });
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_client_reads_results_with_new_fields_and_variants() {
    let (_dir, path) = newer_daemon(|method, id| match method {
        "status" => vec![json!({"jsonrpc": "2.0", "id": id, "result": {
            "version": "9.0.0", "protocol": 1, "uptime_secs": 5, "connections": 1,
            "agents": [], "brand_new_top_field": {"x": 1},
            "profiles": [{"name": "p", "provider": "anthropic", "auth": "oauth",
                "state": "hibernating", "expires_at": null, "last_refresh_at": null,
                "refresh_count": 0, "last_error": null, "new_profile_field": true,
                "limits": {"queued": 0, "in_flight": 0, "new_limit": 3}}]
        }})],
        "chat" => vec![
            json!({"jsonrpc": "2.0", "method": "chat.delta", "params": {"id": id, "delta": {"type": "sparkle", "level": 9}}}),
            json!({"jsonrpc": "2.0", "method": "chat.delta", "params": {"id": id, "delta": {"type": "text", "text": "hi", "lang": "en"}}}),
            json!({"jsonrpc": "2.0", "id": id, "result": {
                "id": "m", "model": "x", "served_by": "newer",
                "content": [{"type": "text", "text": "hi", "citations": []}, {"type": "hologram", "data": 1}],
                "stop_reason": "out_of_coffee",
                "usage": {"input_tokens": 1, "output_tokens": 2, "reasoning_tokens": 7}
            }}),
        ],
        "token" => vec![json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": -32099, "message": "a newer error", "data": {"kind": "quota_melted"}}})],
        _ => vec![],
    })
    .await;
    let c = Client::connect_to(&path).await.expect("connect");
    let s = c.status().await.expect("status with new fields decodes");
    assert_eq!(s.profiles[0].state, ProfileState::Unknown);
    let req: ChatRequest =
        serde_json::from_value(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
    let mut stream = c.chat_stream("p", req).await.expect("stream");
    let mut deltas = Vec::new();
    let mut done = None;
    while let Some(ev) = stream.next_event().await {
        match ev.expect("every event decodes") {
            ChatEvent::Delta(d) => deltas.push(d),
            ChatEvent::Done(r) => done = Some(r),
        }
    }
    assert_eq!(deltas, [Delta::Unknown, Delta::Text { text: "hi".into() }]);
    let r = done.expect("the answer");
    assert_eq!(r.stop_reason, StopReason::Other);
    assert_eq!(r.content[1], Block::Unknown);
    let e = c.token("p", None).await.expect_err("an error");
    assert!(e.to_string().contains("a newer error"), "{e}");
}
