//! Wire types and line codec of the llmd protocol.
//!
//! JSON-RPC 2.0, one JSON object per `\n`-terminated line, over a Unix socket. This crate
//! holds the shapes both sides agree on and nothing that decides how to do I/O.

pub mod chat;
pub mod codec;
pub mod error;
pub mod jsonrpc;
pub mod methods;
pub mod paths;

pub use codec::{encode_line, FrameTooLarge, LineDecoder};
pub use error::{ErrorKind, RpcError};
pub use jsonrpc::{Id, Incoming, Notification, Request, RequestRef, Response};

/// Protocol version spoken by this crate; `hello` reports it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default largest line either side accepts (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
