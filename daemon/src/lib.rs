//! llmd: a per-user daemon that owns LLM credentials, runs the one serialized refresh of
//! every OAuth login, and serves tokens to local agents over a Unix socket.
//!
//! Layout: [`server`] (listener, connections) calls [`handlers`] (one per method), which
//! use the shared [`state::Daemon`]. Credentials live in [`credentials`] (one module per
//! auth kind), token endpoints in [`oauth`], and the refresh rules in [`refresh`] alone.

pub mod access;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod follower;
pub mod fsutil;
pub mod gateway;
pub mod handlers;
pub mod logging;
pub mod oauth;
pub mod pool;
pub mod profile;
pub mod providers;
pub mod quota;
pub mod ratelimit;
pub mod refresh;
pub mod secret;
pub mod server;
pub mod state;
pub mod sync;
pub mod systemd;
pub mod tools;
pub mod usage;
pub mod watch;
