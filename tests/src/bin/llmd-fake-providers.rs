//! The fake providers of the end-to-end tests as a standalone server, for tests in other
//! languages (tests/sdk): prints `FAKE_URL=http://127.0.0.1:PORT` and
//! `ADMIN_URL=http://127.0.0.1:PORT`, then serves until stdin closes.
//!
//! The admin server answers `GET /requests` with every recorded request (`path`,
//! `headers`, `body`) and `POST /reset` by forgetting them.

use axum::routing::{get, post};
use axum::{Json, Router};
use llmd_tests::fake_providers::FakeProviders;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() {
    let fake = FakeProviders::start().await;
    let admin = {
        let (f1, f2) = (fake.clone(), fake.clone());
        Router::new()
            .route(
                "/requests",
                get(move || {
                    let f = f1.clone();
                    async move {
                        let all: Vec<Value> = f
                            .requests()
                            .into_iter()
                            .map(|r| json!({"path": r.path, "headers": r.headers, "body": r.body}))
                            .collect();
                        Json(Value::Array(all))
                    }
                }),
            )
            .route(
                "/reset",
                post(move || {
                    let f = f2.clone();
                    async move {
                        f.reset();
                        "ok"
                    }
                }),
            )
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llmd-fake-providers: cannot bind: {e}");
            std::process::exit(1);
        }
    };
    let admin_url = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => {
            eprintln!("llmd-fake-providers: no address: {e}");
            std::process::exit(1);
        }
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, admin).await;
    });
    println!("FAKE_URL={}", fake.url());
    println!("ADMIN_URL={admin_url}");
    // Serve until whoever started us closes our stdin (or exits).
    let mut sink = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
}
