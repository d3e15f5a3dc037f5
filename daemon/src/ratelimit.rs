//! Shared per-profile rate limits (placeholder API; the real limiter replaces the bodies).

use crate::config::RateLimitConfig;
use reqwest::header::HeaderMap;
use std::time::Duration;

/// Remaining budget and queue of one profile, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitStatus {
    /// Requests waiting for a slot.
    pub queued: u64,
    /// Requests holding a slot.
    pub in_flight: u64,
    /// Requests left in the current minute (None without an RPM limit or signal).
    pub remaining_requests: Option<u64>,
    /// Tokens left in the current minute (None without a TPM limit or signal).
    pub remaining_tokens: Option<u64>,
    /// Milliseconds until a provider-imposed pause ends.
    pub paused_for_ms: Option<u64>,
}

/// One profile's limiter, shared by every agent using the profile.
#[derive(Debug, Default)]
pub struct RateLimiter {}

/// A granted slot; dropping it frees the concurrency slot.
#[derive(Debug)]
pub struct Permit {}

impl RateLimiter {
    /// A limiter for a profile's `[rate_limit]` (no limits when `None`).
    pub fn new(_cfg: Option<&RateLimitConfig>) -> Self {
        RateLimiter {}
    }

    /// Waits (FIFO) until a request estimated at `estimated_tokens` may start.
    pub async fn acquire(&self, _estimated_tokens: u64) -> Permit {
        Permit {}
    }

    /// Pauses the whole profile for `for_how_long` (after a 429).
    pub fn pause(&self, _for_how_long: Duration) {}

    /// Reads provider signals (`anthropic-ratelimit-*`, `x-ratelimit-*`, `retry-after`).
    pub fn observe(&self, _headers: &HeaderMap) {}

    /// Current queue and budget.
    pub fn status(&self) -> LimitStatus {
        LimitStatus::default()
    }
}

impl Permit {
    /// Corrects the token estimate with the answer's real usage.
    pub fn settle(self, _actual_tokens: u64) {}
}
