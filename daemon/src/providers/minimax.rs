//! MiniMax: OpenAI-style `POST {base}/v1/text/chatcompletion_v2`, whose errors may come as
//! a non-zero `base_resp.status_code` inside an HTTP 200, or the Anthropic-style API when
//! the profile's base URL ends in `/anthropic`.

use super::openai::{self, Dialect};
use super::{anthropic, json_body, post, Call, ProviderError, MAX_ERROR_BODY};
use llmd_proto::chat::{ChatResponse, EmbedResult, Usage};
use serde_json::{json, Value};

/// Embedding model when the request names none.
pub const DEFAULT_EMBED_MODEL: &str = "embo-01";

/// MiniMax streams may end without `[DONE]`, and hide errors in `base_resp`.
/// MiniMax's dialect of the OpenAI format.
pub const DIALECT: Dialect = Dialect {
    who: "MiniMax",
    requires_done: false,
    check: check_base_resp,
};

/// One call, streaming when the caller gave a sink.
pub async fn chat(call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    let base = call.base_url.trim_end_matches('/');
    if base.ends_with("/anthropic") {
        return anthropic::chat(call).await;
    }
    openai::chat_at(call, &format!("{base}/v1/text/chatcompletion_v2"), &DIALECT).await
}

/// Turns a non-zero `base_resp.status_code` into the error the retry logic understands:
/// rate limits as 429, bad keys as 401, anything else as a protocol error.
pub(crate) fn check_base_resp(v: &Value) -> Result<(), ProviderError> {
    let Some(base_resp) = v.get("base_resp").filter(|b| b.is_object()) else {
        return Ok(());
    };
    let code = base_resp
        .get("status_code")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if code == 0 {
        return Ok(());
    }
    let msg = base_resp
        .get("status_msg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let http = |status: u16| {
        let mut body = base_resp.to_string();
        if body.len() > MAX_ERROR_BODY {
            let mut cut = MAX_ERROR_BODY;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        ProviderError::Http {
            status,
            body,
            headers: Box::default(),
            host: String::new(),
        }
    };
    Err(match code {
        1002 | 1039 => http(429),
        1004 | 2049 => http(401),
        _ => ProviderError::Protocol(format!("MiniMax error {code}: {msg}")),
    })
}

/// `POST {base}/v1/embeddings` with `{model, texts, type:"db"}`.
pub async fn embed(call: &Call<'_>, input: &[String]) -> Result<EmbedResult, ProviderError> {
    let base = call.base_url.trim_end_matches('/');
    // Embeddings live at the API root even for profiles on the Anthropic-style endpoint.
    let base = base.strip_suffix("/anthropic").unwrap_or(base);
    let body = json!({"model": call.model, "texts": input, "type": "db"});
    let v = json_body(
        post(call, &format!("{base}/v1/embeddings"), &body).await?,
        "MiniMax",
    )
    .await?;
    parse_embeddings(&v)
}

fn parse_embeddings(v: &Value) -> Result<EmbedResult, ProviderError> {
    check_base_resp(v)?;
    let vectors = v.get("vectors").and_then(Value::as_array).ok_or_else(|| {
        ProviderError::Protocol("MiniMax embeddings answer has no `vectors` array".into())
    })?;
    Ok(EmbedResult {
        embeddings: vectors
            .iter()
            .map(|x| openai::vector(Some(x)))
            .collect::<Result<_, _>>()?,
        usage: Usage {
            input_tokens: v.get("total_tokens").and_then(Value::as_u64).unwrap_or(0),
            ..Usage::default()
        },
        member: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{
        assert_deltas_match, cut, serve_once, weather_tool, Collect, Fixture,
    };
    use llmd_proto::chat::{Block, Delta, StopReason};

    fn fixture() -> Fixture {
        let mut fx = Fixture::new(
            json!({"system": "Be brief.", "messages": [{"role": "user", "content": "weather in Paris?"}], "tool_choice": "any"}),
            vec![weather_tool()],
        );
        fx.headers.insert("x-minimax-group-id".into(), "g-1".into());
        fx.model = "MiniMax-M2".into();
        fx
    }

    #[test]
    fn base_resp_codes_map_to_retryable_statuses() {
        let with = |code: i64| json!({"id": "", "choices": null, "base_resp": {"status_code": code, "status_msg": "msg"}});
        for (code, status) in [(1002, 429), (1039, 429), (1004, 401), (2049, 401)] {
            match check_base_resp(&with(code)) {
                Err(ProviderError::Http {
                    status: s,
                    body,
                    headers,
                    ..
                }) => {
                    assert_eq!(s, status, "code {code}");
                    assert!(body.contains(&code.to_string()) && headers.is_empty());
                }
                other => panic!("code {code}: {other:?}"),
            }
        }
        assert!(
            matches!(check_base_resp(&with(1008)), Err(ProviderError::Protocol(m)) if m.contains("1008") && m.contains("msg"))
        );
        assert!(check_base_resp(&with(0)).is_ok());
        assert!(check_base_resp(&json!({"choices": []})).is_ok());
    }

    #[tokio::test]
    async fn an_error_inside_a_200_is_an_error() {
        let fx = fixture();
        let answer = json!({"id": "", "choices": null, "created": 0, "model": "", "object": "",
            "base_resp": {"status_code": 1004, "status_msg": "login fail: Please carry the API secret key in the 'Authorization' field"}});
        let (base, seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let e = chat(&fx.call(&base, None)).await.unwrap_err();
        assert!(
            matches!(e, ProviderError::Http { status: 401, .. }),
            "{e:?}"
        );
        let seen = seen.await.unwrap();
        assert_eq!(seen.path, "/v1/text/chatcompletion_v2");
        assert_eq!(seen.headers["x-minimax-group-id"], "g-1");
        // The OpenAI mapping, unchanged.
        assert_eq!(
            seen.body["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(seen.body["tool_choice"], "required");
        assert_eq!(seen.body["tools"][0]["function"]["name"], "get_weather");

        // The same error as the whole answer to a stream request.
        let rate =
            json!({"base_resp": {"status_code": 1002, "status_msg": "rate limit exceeded(RPM)"}});
        let (base, _) =
            serve_once(200, "application/json", vec![rate.to_string().into_bytes()]).await;
        let sink = Collect::default();
        let e = chat(&fx.call(&base, Some(&sink))).await.unwrap_err();
        assert!(
            matches!(e, ProviderError::Http { status: 429, .. }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn streams_without_done_and_ignores_the_repeated_message() {
        let chunk = |choice: Value, extra: Value| {
            let mut c = json!({"id": "mm-1", "object": "chat.completion.chunk", "created": 1, "model": "MiniMax-M2", "choices": [choice]});
            if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
                c.extend(extra);
            }
            format!("data: {c}\n\n")
        };
        let mut t = String::new();
        t += &chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": "Let me "}}),
            json!({}),
        );
        t += &chunk(
            json!({"index": 0, "delta": {"content": "check."}}),
            json!({}),
        );
        t += &chunk(
            json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_function_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": "}}]}}),
            json!({}),
        );
        t += &chunk(
            json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}),
            json!({}),
        );
        // MiniMax's last chunk repeats the whole message next to the finish reason.
        t += &chunk(
            json!({"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me check.",
                "tool_calls": [{"id": "call_function_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}),
            json!({"usage": {"total_tokens": 60, "prompt_tokens": 50, "completion_tokens": 10}, "base_resp": {"status_code": 0, "status_msg": ""}}),
        );
        let fx = fixture();
        for size in [1, 9, 4096] {
            let (base, _) = serve_once(200, "text/event-stream", cut(&t, size)).await;
            let sink = Collect::default();
            let r = chat(&fx.call(&base, Some(&sink)))
                .await
                .unwrap_or_else(|e| panic!("split {size}: {e}"));
            assert_eq!(
                r.content,
                vec![
                    Block::Text {
                        text: "Let me check.".into(),
                        cache: None
                    },
                    Block::ToolUse {
                        id: "call_function_1".into(),
                        name: "get_weather".into(),
                        input: json!({"city": "Paris"}),
                        validation_errors: None
                    },
                ]
            );
            assert_eq!(r.stop_reason, StopReason::ToolUse);
            assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (50, 10));
            let deltas = sink.take();
            assert_deltas_match(&deltas, &r.content);
            assert_eq!(deltas.last(), Some(&Delta::Usage(r.usage)));
        }
        // An error chunk mid-stream.
        let broken = format!(
            "{}data: {}\n\n",
            chunk(json!({"index": 0, "delta": {"content": "Hi"}}), json!({})),
            json!({"base_resp": {"status_code": 1039, "status_msg": "token limit"}})
        );
        let (base, _) = serve_once(200, "text/event-stream", cut(&broken, 7)).await;
        let e = chat(&fx.call(&base, Some(&Collect::default())))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProviderError::Http { status: 429, .. }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn an_anthropic_base_uses_the_anthropic_mapping() {
        let fx = fixture();
        let answer = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "MiniMax-M2",
            "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 1}});
        let (base, seen) = serve_once(
            200,
            "application/json",
            vec![answer.to_string().into_bytes()],
        )
        .await;
        let r = chat(&fx.call(&format!("{base}/anthropic/"), None))
            .await
            .unwrap();
        let seen = seen.await.unwrap();
        assert_eq!(seen.path, "/anthropic/v1/messages");
        assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
        assert_eq!(seen.body["tool_choice"], json!({"type": "any"}));
        assert_eq!(
            r.content,
            vec![Block::Text {
                text: "Hi".into(),
                cache: None
            }]
        );
    }

    #[tokio::test]
    async fn embeddings_use_texts_and_vectors() {
        let answer = json!({"vectors": [[0.5, 0.25], [1.0, 0.0]], "total_tokens": 6, "base_resp": {"status_code": 0, "status_msg": "success"}});
        let fx = fixture();
        let input = vec!["x".to_owned(), "y".to_owned()];
        for suffix in ["", "/anthropic"] {
            let (base, seen) = serve_once(
                200,
                "application/json",
                vec![answer.to_string().into_bytes()],
            )
            .await;
            let r = crate::providers::embed(
                crate::config::Provider::Minimax,
                &fx.http,
                &format!("{base}{suffix}"),
                &fx.headers,
                None,
                &input,
                crate::providers::Timeouts::default(),
            )
            .await
            .unwrap();
            let seen = seen.await.unwrap();
            assert_eq!(seen.path, "/v1/embeddings");
            assert_eq!(
                seen.body,
                json!({"model": "embo-01", "texts": ["x", "y"], "type": "db"})
            );
            assert_eq!(r.embeddings, vec![vec![0.5, 0.25], vec![1.0, 0.0]]);
            assert_eq!(r.usage.input_tokens, 6);
        }
        let limited = json!({"vectors": null, "base_resp": {"status_code": 1002, "status_msg": "rate limit"}});
        assert!(matches!(
            parse_embeddings(&limited),
            Err(ProviderError::Http { status: 429, .. })
        ));
    }

    #[tokio::test]
    async fn anthropic_profiles_have_no_embeddings() {
        let fx = fixture();
        let r = crate::providers::embed(
            crate::config::Provider::Anthropic,
            &fx.http,
            "http://127.0.0.1:9",
            &fx.headers,
            None,
            &["x".to_owned()],
            crate::providers::Timeouts::default(),
        )
        .await;
        assert!(
            matches!(r, Err(ProviderError::Protocol(m)) if m.contains("Anthropic has no embeddings"))
        );
    }
}
