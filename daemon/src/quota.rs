//! Quotas (DESIGN.md, "Quotas"): the latest rate-limit state each provider reports for a
//! profile, read from every answer, and the `profile.quota` events of `[usage] warn_at`.
//!
//! Sources:
//! - Anthropic subscription logins: `anthropic-ratelimit-unified-status` and, per window
//!   (`5h`, `7d`), `anthropic-ratelimit-unified-<w>-utilization` (a share, 0.0 to 1.0),
//!   `-<w>-reset` (Unix seconds) and `-<w>-status`.
//! - Anthropic API keys: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
//!   {limit,remaining,reset}` (resets as RFC 3339 instants).
//! - OpenAI-style servers: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets
//!   as durations such as `6m0s`).
//! - Gemini: a 429 `RESOURCE_EXHAUSTED` body whose `QuotaFailure` names the quota that ran
//!   out (its window is then full until the `RetryInfo` delay ends).
//!
//! A window whose reset time has passed counts as unused until a new answer says otherwise.
//! The state sits behind a std mutex that is never held across an await; events go out after
//! it is released.

use crate::ratelimit::parse_reset;
use llmd_proto::methods::{event_kinds, Event, Quota, QuotaCrossing, QuotaWindow};
use reqwest::header::HeaderMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// `(window, utilization, reset, status)` headers of the unified windows of Anthropic
/// subscription logins, in display order.
const UNIFIED: [(&str, &str, &str, &str); 2] = [
    (
        "5h",
        "anthropic-ratelimit-unified-5h-utilization",
        "anthropic-ratelimit-unified-5h-reset",
        "anthropic-ratelimit-unified-5h-status",
    ),
    (
        "7d",
        "anthropic-ratelimit-unified-7d-utilization",
        "anthropic-ratelimit-unified-7d-reset",
        "anthropic-ratelimit-unified-7d-status",
    ),
];

/// `(window, limit, remaining, reset)` header names of the per-minute limits.
const LIMIT_HEADERS: &[(&str, &str, &str, &str)] = &[
    (
        "requests",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ),
    (
        "tokens",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        "input_tokens",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        "output_tokens",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ),
    (
        "requests",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ),
    (
        "tokens",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ),
];

/// Longest Gemini quota id kept (they are short names; a hostile body must not grow state).
const MAX_QUOTA_ID: usize = 128;
/// Most windows kept per profile.
const MAX_WINDOWS: usize = 16;

/// What one answer said: windows and the overall status.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reading {
    /// Anthropic's `anthropic-ratelimit-unified-status`.
    pub status: Option<String>,
    /// The windows it reported.
    pub windows: Vec<QuotaWindow>,
}

impl Reading {
    /// Reads the quota headers of one answer; `now` is the wall clock resets are measured from.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Reading {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let mut r = Reading {
            status: text("anthropic-ratelimit-unified-status").map(short),
            windows: Vec::new(),
        };
        for (w, util_h, reset_h, status_h) in UNIFIED {
            let util = text(util_h)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|u| u.is_finite());
            let Some(util) = util else { continue };
            r.windows.push(QuotaWindow {
                name: w.to_owned(),
                utilization: util.clamp(0.0, 1.0),
                resets_at: text(reset_h).and_then(|v| v.parse::<i64>().ok()),
                status: text(status_h).map(short),
                ..QuotaWindow::default()
            });
        }
        let unix_now = unix(now);
        for &(name, limit_h, remaining_h, reset_h) in LIMIT_HEADERS {
            let count = |h: &str| text(h).and_then(|v| v.parse::<u64>().ok());
            let (Some(limit), Some(remaining)) = (count(limit_h), count(remaining_h)) else {
                continue;
            };
            if limit == 0 || r.windows.iter().any(|w| w.name == name) {
                continue;
            }
            let used = limit.saturating_sub(remaining.min(limit)) as f64 / limit as f64;
            r.windows.push(QuotaWindow {
                name: name.to_owned(),
                utilization: used,
                resets_at: text(reset_h)
                    .and_then(|v| parse_reset(v, now))
                    .map(|d| unix_now + d.as_secs() as i64),
                limit: Some(limit),
                remaining: Some(remaining.min(limit)),
                status: None,
            });
        }
        r
    }

    /// Reads a Gemini error body: a `RESOURCE_EXHAUSTED` with `QuotaFailure` details fills
    /// the named quotas until the `RetryInfo` delay ends. Anything else reads as nothing.
    pub fn from_gemini_error(body: &str, now: SystemTime) -> Reading {
        let mut r = Reading::default();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
            return r;
        };
        let err = &v["error"];
        if err["status"].as_str() != Some("RESOURCE_EXHAUSTED") {
            return r;
        }
        let details = err["details"].as_array().map_or(&[][..], Vec::as_slice);
        let retry = details
            .iter()
            .find(|d| {
                d["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("RetryInfo"))
            })
            .and_then(|d| d["retryDelay"].as_str())
            .and_then(|d| parse_reset(d, now));
        let resets_at = retry.map(|d| unix(now) + d.as_secs() as i64);
        for d in details.iter().filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("QuotaFailure"))
        }) {
            for v in d["violations"].as_array().into_iter().flatten() {
                let Some(id) = v["quotaId"]
                    .as_str()
                    .or_else(|| v["quotaMetric"].as_str())
                    .filter(|id| !id.is_empty() && id.len() <= MAX_QUOTA_ID)
                else {
                    continue;
                };
                if r.windows.iter().any(|w| w.name == id) || r.windows.len() >= MAX_WINDOWS {
                    continue;
                }
                r.windows.push(QuotaWindow {
                    name: id.to_owned(),
                    utilization: 1.0,
                    resets_at,
                    limit: v["quotaValue"].as_str().and_then(|q| q.parse().ok()),
                    remaining: Some(0),
                    status: Some("exhausted".into()),
                });
            }
        }
        r
    }
}

/// One profile's quota state, shared by every request of the profile.
#[derive(Debug)]
pub struct QuotaTracker {
    profile: String,
    events: broadcast::Sender<Event>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    quota: Option<Quota>,
    warn_at: Vec<f64>,
}

impl QuotaTracker {
    /// An empty tracker of `profile`, firing `profile.quota` on `events` at `warn_at`.
    pub fn new(profile: &str, events: broadcast::Sender<Event>, warn_at: &[f64]) -> Self {
        QuotaTracker {
            profile: profile.to_owned(),
            events,
            state: Mutex::new(State {
                quota: None,
                warn_at: warn_at.to_vec(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every unlock leaves the state whole, so a panic elsewhere must not wedge it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a reloaded `[usage] warn_at`.
    pub fn set_warn_at(&self, warn_at: &[f64]) {
        self.lock().warn_at = warn_at.to_vec();
    }

    /// Reads one answer's headers (a no-op when they carry no quota headers).
    pub fn observe(&self, headers: &HeaderMap) {
        let now = SystemTime::now();
        self.apply(Reading::from_headers(headers, now), now);
    }

    /// Reads a Gemini error body.
    pub fn observe_gemini_error(&self, body: &str) {
        let now = SystemTime::now();
        self.apply(Reading::from_gemini_error(body, now), now);
    }

    /// Merges `r` into the state and fires an event per threshold crossed upward.
    pub fn apply(&self, r: Reading, now: SystemTime) {
        if r.windows.is_empty() && r.status.is_none() {
            return;
        }
        let unix_now = unix(now);
        let crossings = {
            let mut st = self.lock();
            let warn_at = st.warn_at.clone();
            let q = st.quota.get_or_insert_with(Quota::default);
            q.updated_at = unix_now;
            if r.status.is_some() {
                q.status = r.status;
            }
            let mut crossings = Vec::new();
            for w in r.windows {
                let before = q
                    .windows
                    .iter()
                    .find(|o| o.name == w.name)
                    .map_or(0.0, |o| current(o, unix_now));
                for &t in &warn_at {
                    if before < t && w.utilization >= t {
                        crossings.push(QuotaCrossing {
                            threshold: t,
                            window: w.name.clone(),
                            utilization: w.utilization,
                            resets_at: w.resets_at,
                        });
                    }
                }
                match q.windows.iter().position(|o| o.name == w.name) {
                    Some(i) => q.windows[i] = w,
                    None if q.windows.len() < MAX_WINDOWS => q.windows.push(w),
                    None => {}
                }
            }
            q.windows.sort_by_key(|w| order(&w.name));
            crossings
        };
        for c in crossings {
            tracing::warn!(profile = %self.profile, window = %c.window, threshold = c.threshold, utilization = c.utilization, "quota threshold crossed");
            let _ = self.events.send(Event {
                kind: event_kinds::PROFILE_QUOTA.into(),
                profile: self.profile.clone(),
                expires_at: None,
                state: None,
                error: None,
                skipped: None,
                quota: Some(c),
            });
        }
    }

    /// The state for `status`.
    pub fn snapshot(&self) -> Option<Quota> {
        self.lock().quota.clone()
    }

    /// The highest share used of any window that has not reset yet (0 when none is known),
    /// and whether the provider says the login is refused outright.
    pub fn level(&self, now: SystemTime) -> (f64, bool) {
        let unix_now = unix(now);
        let st = self.lock();
        let Some(q) = &st.quota else {
            return (0.0, false);
        };
        let level = q
            .windows
            .iter()
            .map(|w| current(w, unix_now))
            .fold(0.0, f64::max);
        // A rejected login stays rejected only until its windows reset.
        let rejected = q.status.as_deref() == Some("rejected")
            && q.windows
                .iter()
                .all(|w| w.resets_at.is_none_or(|r| r > unix_now));
        (level, rejected)
    }
}

/// A window's share used now: nothing once its reset time has passed.
fn current(w: &QuotaWindow, unix_now: i64) -> f64 {
    match w.resets_at {
        Some(r) if r <= unix_now => 0.0,
        _ => w.utilization,
    }
}

fn order(name: &str) -> (usize, String) {
    let known = [
        "5h",
        "7d",
        "requests",
        "tokens",
        "input_tokens",
        "output_tokens",
    ];
    (
        known.iter().position(|k| *k == name).unwrap_or(known.len()),
        name.to_owned(),
    )
}

fn short(v: &str) -> String {
    v.chars().take(32).collect()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn unified_headers_give_both_windows_and_the_status() {
        let r = Reading::from_headers(
            &headers(&[
                ("anthropic-ratelimit-unified-status", "allowed_warning"),
                ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
                ("anthropic-ratelimit-unified-5h-reset", "1700004200"),
                ("anthropic-ratelimit-unified-5h-status", "allowed"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.18"),
                ("anthropic-ratelimit-unified-7d-reset", "1700500000"),
            ]),
            at(1_700_000_000),
        );
        assert_eq!(r.status.as_deref(), Some("allowed_warning"));
        assert_eq!(r.windows.len(), 2);
        assert_eq!(r.windows[0].name, "5h");
        assert!((r.windows[0].utilization - 0.42).abs() < 1e-9);
        assert_eq!(r.windows[0].resets_at, Some(1_700_004_200));
        assert_eq!(r.windows[0].status.as_deref(), Some("allowed"));
        assert_eq!(r.windows[1].name, "7d");
        assert_eq!(r.windows[1].resets_at, Some(1_700_500_000));
    }

    #[test]
    fn limit_headers_give_shares_used_and_resets() {
        let r = Reading::from_headers(
            &headers(&[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "10"),
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:14:20Z"),
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "250"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ]),
            at(1_700_000_000),
        );
        let req = r.windows.iter().find(|w| w.name == "requests").unwrap();
        assert!((req.utilization - 0.8).abs() < 1e-9);
        assert_eq!((req.limit, req.remaining), (Some(50), Some(10)));
        assert_eq!(req.resets_at, Some(1_700_000_060));
        let tok = r.windows.iter().find(|w| w.name == "tokens").unwrap();
        assert!((tok.utilization - 0.75).abs() < 1e-9);
        assert_eq!(tok.resets_at, Some(1_700_000_360));
    }

    #[test]
    fn junk_headers_read_as_nothing() {
        let r = Reading::from_headers(
            &headers(&[
                ("anthropic-ratelimit-unified-5h-utilization", "lots"),
                ("anthropic-ratelimit-unified-7d-utilization", "NaN"),
                ("x-ratelimit-limit-requests", "0"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-limit-tokens", "-1"),
                ("x-ratelimit-remaining-tokens", "5"),
            ]),
            at(0),
        );
        assert_eq!(r, Reading::default());
    }

    #[test]
    fn gemini_quota_failure_fills_the_named_quota() {
        let body = r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[
            {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"50"}]},
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"32s"}]}}"#;
        let r = Reading::from_gemini_error(body, at(1000));
        assert_eq!(r.windows.len(), 1);
        let w = &r.windows[0];
        assert_eq!(w.name, "GenerateRequestsPerDayPerProjectPerModel-FreeTier");
        assert_eq!(w.utilization, 1.0);
        assert_eq!(w.resets_at, Some(1032));
        assert_eq!(w.limit, Some(50));
        assert!(
            Reading::from_gemini_error("{\"error\":{\"status\":\"UNAVAILABLE\"}}", at(0))
                .windows
                .is_empty()
        );
        assert!(Reading::from_gemini_error("not json", at(0))
            .windows
            .is_empty());
    }

    fn unified(u5: f64) -> Reading {
        Reading {
            status: None,
            windows: vec![QuotaWindow {
                name: "5h".into(),
                utilization: u5,
                resets_at: Some(10_000),
                ..QuotaWindow::default()
            }],
        }
    }

    #[test]
    fn each_threshold_fires_once_per_upward_crossing() {
        let (tx, mut rx) = broadcast::channel(16);
        let t = QuotaTracker::new("work", tx, &[0.8, 0.95]);
        let mut fired = |r: Reading| {
            t.apply(r, at(1000));
            let mut v = Vec::new();
            while let Ok(e) = rx.try_recv() {
                assert_eq!(e.kind, "profile.quota");
                v.push(e.quota.unwrap().threshold);
            }
            v
        };
        assert!(fired(unified(0.5)).is_empty());
        assert_eq!(fired(unified(0.85)), vec![0.8]);
        assert!(fired(unified(0.9)).is_empty(), "still above: no repeat");
        assert_eq!(fired(unified(0.97)), vec![0.95]);
        assert!(fired(unified(0.99)).is_empty());
        assert!(fired(unified(0.1)).is_empty(), "falling fires nothing");
        assert_eq!(
            fired(unified(0.96)),
            vec![0.8, 0.95],
            "a new crossing fires again"
        );
    }

    #[test]
    fn a_window_past_its_reset_counts_as_unused() {
        let (tx, _rx) = broadcast::channel(16);
        let t = QuotaTracker::new("work", tx, &[0.95]);
        t.apply(unified(0.97), at(1000));
        assert_eq!(t.level(at(1000)), (0.97, false));
        assert_eq!(t.level(at(10_000)).0, 0.0);
    }
}
