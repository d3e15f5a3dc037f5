//! End-to-end test support: start the real `llmd` binary in a private temporary home,
//! talk to it over its real socket, and run fake providers on 127.0.0.1.

pub mod claude_code;
pub mod daemon;
pub mod etcd;
pub mod fake_oauth;
pub mod fake_providers;
pub mod fake_tls;
pub mod raw;
pub mod stub;

pub use daemon::{bin_path, Daemon, DaemonBuilder};
