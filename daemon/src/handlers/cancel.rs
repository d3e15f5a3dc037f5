//! `cancel`: stop an in-flight request of the same connection.

use super::{ok, parse, Reply};
use crate::server::connection::Conn;
use llmd_proto::methods::{CancelParams, Empty};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;

/// Aborts request `id`, answers it with `cancelled`, then answers `{}`.
pub fn handle(conn: &Conn, params: Option<&RawValue>) -> Reply {
    let p: CancelParams = parse(params)?;
    if conn.cancel(&p.id) {
        conn.respond(
            Some(&p.id),
            Err(RpcError::new(
                ErrorKind::Cancelled,
                "cancelled by the client",
            )),
        );
    }
    ok(&Empty {})
}
