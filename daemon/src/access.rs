//! Who may call what (DESIGN.md, "Security"): the daemon's own user and root get every
//! method; uids listed in `[daemon] allow_uids` (a container running as another uid) get
//! only the agent methods, never those that change or reveal credentials.

use llmd_proto::methods::names;
use llmd_proto::{ErrorKind, RpcError};

/// What one connection may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every method (the daemon's own uid, root).
    Full,
    /// The agent methods only ([`AGENT_METHODS`]).
    Agent,
    /// Refused at connect.
    None,
}

/// The methods an `allow_uids` peer may call.
pub const AGENT_METHODS: &[&str] = &[
    names::HELLO,
    names::STATUS,
    names::TOKEN,
    names::SUBSCRIBE,
    names::CHAT,
    names::EMBED,
    names::CANCEL,
];

/// The access of a peer with effective uid `peer` to a daemon running as `me`.
pub fn of_peer(peer: Option<u32>, me: u32, allow_uids: &[u32]) -> Access {
    match peer {
        Some(u) if u == me || u == 0 => Access::Full,
        Some(u) if allow_uids.contains(&u) => Access::Agent,
        _ => Access::None,
    }
}

/// Refuses `method` unless `access` admits it.
pub fn check(access: Access, method: &str) -> Result<(), RpcError> {
    match access {
        Access::Full => Ok(()),
        Access::Agent if AGENT_METHODS.contains(&method) => Ok(()),
        _ => Err(RpcError::new(
            ErrorKind::PermissionDenied,
            format!(
                "`{}` is not available to a uid admitted by `allow_uids` (only {})",
                crate::logging::clean(method),
                AGENT_METHODS.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_uids_get_agent_methods_only() {
        assert_eq!(of_peer(Some(1000), 1000, &[]), Access::Full);
        assert_eq!(of_peer(Some(0), 1000, &[]), Access::Full);
        assert_eq!(of_peer(Some(2000), 1000, &[2000]), Access::Agent);
        assert_eq!(of_peer(Some(3000), 1000, &[2000]), Access::None);
        assert_eq!(of_peer(None, 1000, &[2000]), Access::None);
        assert!(check(Access::Agent, names::TOKEN).is_ok());
        for m in [
            names::CREDENTIALS_SET,
            names::CREDENTIALS_REMOVE,
            names::LOGIN_START,
            names::LOGIN_FINISH,
            names::RELOAD,
            names::REFRESH,
            names::TOOLS_REGISTER,
            names::GATEWAY_KEY,
        ] {
            let e = check(Access::Agent, m).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{m}");
        }
        assert!(check(Access::Full, names::CREDENTIALS_SET).is_ok());
    }
}
