//! Property tests of the wire layer: the line codec and request decoding never panic,
//! stay bounded and give a typed error for anything invalid; results stay decodable when a
//! newer llmd adds fields.

use llmd_proto::chat::{ChatResponse, StopReason};
use llmd_proto::{ErrorKind, Id, LineDecoder, Request};
use proptest::prelude::*;
use serde_json::{json, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("jsonrpc".to_owned()),
                        Just("id".to_owned()),
                        Just("method".to_owned()),
                        Just("params".to_owned()),
                        "[a-z]{1,5}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_line_codec_splits_like_lines_and_stays_bounded(
        lines in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..80), 0..8),
        chunk in 1usize..40,
        max in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for l in &lines {
            stream.extend_from_slice(l);
            stream.push(b'\n');
        }
        let mut dec = LineDecoder::new(max);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut failed = false;
        'feed: for piece in stream.chunks(chunk) {
            let buf = dec.buffer();
            buf.extend_from_slice(piece);
            // Never more than the unfinished line (at most `max`) plus one chunk.
            prop_assert!(buf.len() <= max + 1 + chunk, "{} > {}", buf.len(), max + 1 + chunk);
            loop {
                match dec.decode() {
                    Ok(Some(line)) => got.push(line.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert_eq!(e.max, max);
                        failed = true;
                        break 'feed;
                    }
                }
            }
        }
        let want: Vec<Vec<u8>> = lines
            .iter()
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .collect();
        let too_long = lines.iter().position(|l| l.len() > max);
        match too_long {
            Some(i) => {
                prop_assert!(failed);
                prop_assert_eq!(&got[..], &want[..i]);
            }
            None => {
                prop_assert!(!failed);
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn request_decoding_gives_a_request_or_a_typed_error(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), ".{0,8}", json_value()).prop_map(|(id, m, p)| {
            json!({"jsonrpc": "2.0", "id": id, "method": m, "params": p}).to_string().into_bytes()
        }),
    ]) {
        match Request::parse(&bytes) {
            Ok(req) => {
                // Whatever was accepted re-encodes and decodes to the same request.
                let again = Request::parse(&serde_json::to_vec(&req).unwrap_or_default());
                let again = again.map_err(|(_, e)| e.message);
                prop_assert!(again.is_ok(), "{:?}", again.err());
                prop_assert_eq!(again.ok().map(|r| (r.id, r.method)), Some((req.id, req.method)));
            }
            Err((id, e)) => {
                prop_assert!(matches!(e.kind(), ErrorKind::ParseError | ErrorKind::InvalidRequest), "{:?}", e);
                if e.kind() == ErrorKind::ParseError {
                    prop_assert!(id.is_none());
                }
            }
        }
    }

    #[test]
    fn results_with_unknown_fields_and_variants_still_decode(
        extra in prop::collection::vec(("[a-z_]{1,8}", json_value()), 0..4),
        reason in "[a-z_]{1,12}",
    ) {
        let mut resp = json!({
            "id": "m", "model": "x",
            "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t", "name": "n", "input": {}}],
            "stop_reason": reason,
            "usage": {"input_tokens": 1, "output_tokens": 2}
        });
        for (k, v) in &extra {
            if !["id", "model", "content", "stop_reason", "usage"].contains(&k.as_str()) {
                resp[k] = v.clone();
            }
            resp["content"][0][k.as_str()] = if k == "type" || k == "text" { resp["content"][0][k.as_str()].clone() } else { v.clone() };
            resp["usage"][k.as_str()] = if k.ends_with("tokens") { json!(0) } else { v.clone() };
        }
        let decoded = serde_json::from_value::<ChatResponse>(resp.clone());
        prop_assert!(decoded.is_ok(), "{resp}: {:?}", decoded.err());
        let known = ["end_turn", "max_tokens", "tool_use", "stop_sequence", "other"];
        if let Ok(r) = decoded {
            if !known.contains(&reason.as_str()) {
                prop_assert_eq!(r.stop_reason, StopReason::Other);
            }
        }
    }
}

#[test]
fn null_and_absent_ids_differ() {
    let r = Request::parse(br#"{"jsonrpc":"2.0","id":null,"method":"m"}"#).unwrap();
    assert_eq!(r.id, Some(Id::Null));
    let r = Request::parse(br#"{"jsonrpc":"2.0","method":"m"}"#).unwrap();
    assert_eq!(r.id, None);
}
