use llmd_proto::RpcError;
use std::path::PathBuf;

/// What can go wrong talking to llmd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing listens on the socket.
    #[error("llmd is not running on {path}: start it with `llmd` (or `systemctl --user start llmd.socket`), or point LLMD_SOCKET/--socket at the right socket ({source})")]
    NotRunning {
        /// Socket path tried.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The socket exists but may not be used.
    #[error("cannot use the llmd socket {path}: {source}")]
    Socket {
        /// Socket path tried.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The daemon closed the connection before answering.
    #[error("llmd closed the connection before answering")]
    Disconnected,
    /// The daemon answered with an error.
    #[error("{0}")]
    Rpc(#[from] RpcError),
    /// The daemon sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The daemon's error, if it answered with one.
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            Error::Rpc(e) => Some(e),
            _ => None,
        }
    }
}
