//! The usage ledger (DESIGN.md, "Usage ledger"): one row per request that passes through
//! llmd, in a SQLite file in the state folder, written by a thread of its own so that no
//! request ever waits for the disk. [`recorder`] is the request side (a bounded queue and
//! the in-memory `token` counters), [`ledger`] the SQLite side (schema, writes, queries).

pub mod ledger;
pub mod recorder;

pub use recorder::{Outcome, Recorder, Request};

/// The ledger's file in the state folder.
pub const FILE_NAME: &str = "usage.sqlite";
