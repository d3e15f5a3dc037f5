//! Small synchronization helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning: every mutex in the daemon guards plain data that
/// stays consistent even if a holder panicked, and a panic must not take the daemon down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
