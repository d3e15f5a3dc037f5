//! JSON-RPC 2.0 envelopes.

use crate::error::{ErrorKind, RpcError};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// A request id: a number, a string or null (JSON-RPC 2.0 allows all three; null is
/// discouraged but still a request that gets an answer).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Id {
    /// Numeric id.
    Num(i64),
    /// String id.
    Str(String),
    /// `"id": null`.
    Null,
}

/// Read by hand rather than `untagged`: an untagged enum buffers the value and tries each
/// variant in turn, and every request's id goes through this.
impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl<'de> de::Visitor<'de> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request id: an integer, a string or null")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id::Num(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                i64::try_from(v)
                    .map(Id::Num)
                    .map_err(|_| E::custom("a numeric request id must fit in 64 signed bits"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Id, E> {
                Ok(Id::Str(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Id, E> {
                Ok(Id::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Id, E> {
                Ok(Id::Null)
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Num(n) => write!(f, "{n}"),
            Id::Str(s) => write!(f, "{s:?}"),
            Id::Null => f.write_str("null"),
        }
    }
}

/// The literal `"2.0"`; anything else fails to deserialize.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct V2;

impl Serialize for V2 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("2.0")
    }
}

impl<'de> Deserialize<'de> for V2 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "2.0" {
            Ok(V2)
        } else {
            Err(de::Error::custom("`jsonrpc` must be \"2.0\""))
        }
    }
}

/// A request as sent by a client. `id` absent means a notification (no answer).
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Always `"2.0"`.
    pub jsonrpc: V2,
    /// Request id; responses echo it. Absent means a notification; `null` is
    /// `Some(Id::Null)`, a request answered with `"id": null`.
    #[serde(
        default,
        deserialize_with = "present_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<Id>,
    /// Method name.
    pub method: String,
    /// Method params, kept raw so each handler parses its own shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Box<RawValue>>,
}

/// A [`Request`] borrowed from the line it was read from: the server reads this first, so
/// a request answered at once allocates neither its method nor its params.
#[derive(Debug, Deserialize)]
pub struct RequestRef<'a> {
    /// Always `"2.0"`.
    pub jsonrpc: V2,
    /// As [`Request::id`].
    #[serde(default, deserialize_with = "present_id")]
    pub id: Option<Id>,
    /// Method name (owned only when it holds escapes).
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// Method params, raw.
    #[serde(borrow, default)]
    pub params: Option<&'a RawValue>,
}

impl RequestRef<'_> {
    /// The owned request, for work that outlives the line.
    pub fn to_owned(&self) -> Request {
        Request {
            jsonrpc: V2,
            id: self.id.clone(),
            method: self.method.clone().into_owned(),
            params: self.params.map(ToOwned::to_owned),
        }
    }
}

/// A present `id` field, null included (plain `Option` would read null as absent).
fn present_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Id>, D::Error> {
    Id::deserialize(d).map(Some)
}

impl Request {
    /// Parses one line. The error is ready to send back: `parse_error` for bytes that are
    /// not JSON, `invalid_request` for JSON that is not a request (with the id if one
    /// could be read).
    // The error is rare and goes straight back to the client; boxing it would cost every
    // caller a pattern change for nothing on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn parse(line: &[u8]) -> Result<Request, (Option<Id>, RpcError)> {
        RequestRef::parse(line).map(|r| r.to_owned())
    }
}

impl<'a> RequestRef<'a> {
    /// [`Request::parse`], borrowing from `line`.
    #[allow(clippy::result_large_err)]
    pub fn parse(line: &'a [u8]) -> Result<RequestRef<'a>, (Option<Id>, RpcError)> {
        match serde_json::from_slice::<RequestRef<'a>>(line) {
            Ok(req) => Ok(req),
            Err(e) => match e.classify() {
                serde_json::error::Category::Data => {
                    #[derive(Deserialize)]
                    struct IdOnly {
                        #[serde(default, deserialize_with = "present_id")]
                        id: Option<Id>,
                    }
                    let id = serde_json::from_slice::<IdOnly>(line)
                        .ok()
                        .and_then(|x| x.id);
                    Err((
                        id,
                        RpcError::new(
                            ErrorKind::InvalidRequest,
                            format!("not a JSON-RPC 2.0 request: {e}"),
                        ),
                    ))
                }
                _ => Err((
                    None,
                    RpcError::new(ErrorKind::ParseError, format!("invalid JSON: {e}")),
                )),
            },
        }
    }
}

/// A response: exactly one of `result` and `error` is set.
#[derive(Debug, Serialize)]
pub struct Response<'a> {
    /// Always `"2.0"`.
    pub jsonrpc: V2,
    /// The request's id (null when it could not be read).
    pub id: Option<&'a Id>,
    /// Success value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a RawValue>,
    /// Failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a RpcError>,
}

impl<'a> Response<'a> {
    /// A success response.
    pub fn ok(id: Option<&'a Id>, result: &'a RawValue) -> Self {
        Response {
            jsonrpc: V2,
            id,
            result: Some(result),
            error: None,
        }
    }

    /// An error response.
    pub fn err(id: Option<&'a Id>, error: &'a RpcError) -> Self {
        Response {
            jsonrpc: V2,
            id,
            result: None,
            error: Some(error),
        }
    }
}

/// A server-to-client notification (`event`, `chat.delta`).
#[derive(Debug, Serialize)]
pub struct Notification<'a, T: Serialize> {
    /// Always `"2.0"`.
    pub jsonrpc: V2,
    /// Notification name.
    pub method: &'a str,
    /// Payload.
    pub params: &'a T,
}

impl<'a, T: Serialize> Notification<'a, T> {
    /// A notification of `method` carrying `params`.
    pub fn new(method: &'a str, params: &'a T) -> Self {
        Notification {
            jsonrpc: V2,
            method,
            params,
        }
    }
}

/// Any line a client receives: a response (`id` plus `result` or `error`) or a
/// notification (`method` plus `params`).
#[derive(Debug, Deserialize)]
pub struct Incoming {
    /// Response id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Notification method.
    #[serde(default)]
    pub method: Option<String>,
    /// Notification params.
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    /// Response result.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// Response error.
    #[serde(default)]
    pub error: Option<RpcError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_distinguishes_garbage_from_bad_shape() {
        let (id, e) = Request::parse(b"{nope").unwrap_err();
        assert!(id.is_none());
        assert_eq!(e.kind(), ErrorKind::ParseError);
        let (id, e) = Request::parse(br#"{"jsonrpc":"1.0","id":7,"method":"x"}"#).unwrap_err();
        assert_eq!(id, Some(Id::Num(7)));
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        let (_, e) = Request::parse(br#"[1,2]"#).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        let req =
            Request::parse(br#"{"jsonrpc":"2.0","id":"a","method":"hello","params":{"x":1}}"#)
                .unwrap();
        assert_eq!(req.id, Some(Id::Str("a".into())));
        assert_eq!(req.params.unwrap().get(), r#"{"x":1}"#);
    }

    #[test]
    fn ids_are_integers_strings_or_null() {
        let id = |json: &str| serde_json::from_str::<Id>(json);
        assert_eq!(id("7").unwrap(), Id::Num(7));
        assert_eq!(id("-3").unwrap(), Id::Num(-3));
        assert_eq!(id(r#""a\"b""#).unwrap(), Id::Str("a\"b".into()));
        assert_eq!(id("null").unwrap(), Id::Null);
        for bad in ["1.5", "18446744073709551615", "true", "[1]", "{}"] {
            assert!(id(bad).is_err(), "{bad} is no id");
        }
        let (id, e) = Request::parse(br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#).unwrap_err();
        assert_eq!(id, None);
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        for id in [Id::Num(-1), Id::Str("x".into()), Id::Null] {
            let back: Id = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
            assert_eq!(back, id);
        }
    }

    #[test]
    fn response_shapes() {
        let raw = RawValue::from_string("{\"a\":1}".into()).unwrap();
        let id = Id::Num(3);
        let s = serde_json::to_string(&Response::ok(Some(&id), &raw)).unwrap();
        assert_eq!(s, r#"{"jsonrpc":"2.0","id":3,"result":{"a":1}}"#);
        let e = RpcError::new(ErrorKind::Busy, "full");
        let s = serde_json::to_string(&Response::err(None, &e)).unwrap();
        assert_eq!(
            s,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32006,"message":"full","data":{"kind":"busy"}}}"#
        );
    }
}
