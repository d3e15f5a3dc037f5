//! Shared per-profile rate limits (DESIGN.md, "Rate limits and retries").
//!
//! One [`RateLimiter`] per profile holds three local budgets from the profile's
//! `[rate_limit]` (requests per minute, tokens per minute, concurrent requests) and the
//! provider's own signals (`retry-after`, `anthropic-ratelimit-*`, `x-ratelimit-*`).
//!
//! Design:
//! - **Sliding 60 s window log, not token buckets.** Every grant is logged with its time and
//!   token estimate; a request may start when fewer than RPM grants and (with its estimate)
//!   at most TPM tokens fall in the last 60 s. The config says "per minute", and a window log
//!   guarantees exactly that for *every* 60 s interval, whereas a bucket of the same size lets
//!   up to twice the budget through in some minute (a full burst, then the refill). Staying
//!   under the provider's limit matters more than squeezing out the last request, and the
//!   log makes `settle` a precise correction of one entry. Its size is bounded by the grants
//!   of one minute.
//! - **Strict FIFO.** Waiters queue in arrival order and only the head may be granted, so a
//!   large request is never overtaken by small ones that happen to fit. A newcomer only skips
//!   the queue when the queue is empty.
//! - **No busy loop, no lost wakeup.** Each waiter has its own [`Notify`]; whatever can let
//!   the head go (a permit dropped, a settle, a cancelled head, a grant, a config change)
//!   notifies the head only, and the head alone sleeps until the instant the window frees
//!   enough (or a pause ends). `notify_one` stores a wakeup that arrives between unlocking
//!   and awaiting.
//! - **Never deadlock on a huge request.** One request estimated above the whole TPM budget
//!   goes through once no tokens are in the window; an RPM or concurrency limit of 0 is
//!   treated as 1.
//! - The state sits behind a std [`Mutex`] that is never held across an await.

use crate::config::RateLimitConfig;
use reqwest::header::HeaderMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Length of the sliding window the per-minute budgets apply to.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Longest pause taken from a provider header: a wrong or far-future reset must not freeze
/// the profile for hours; if the limit is really that long, the next 429 pauses again.
pub const MAX_OBSERVED_PAUSE: Duration = Duration::from_secs(15 * 60);

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
pub struct RateLimiter {
    inner: Arc<Inner>,
}

/// A granted slot; dropping it frees the concurrency slot.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    id: u64,
    estimate: u64,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    /// How often a queued waiter evaluated its turn, to prove waiting does not spin.
    #[cfg(test)]
    checks: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Limits {
    rpm: Option<u64>,
    tpm: Option<u64>,
    concurrent: Option<u64>,
}

impl Limits {
    fn from_config(cfg: Option<&RateLimitConfig>) -> Limits {
        let Some(cfg) = cfg else {
            return Limits::default();
        };
        Limits {
            rpm: cfg.requests_per_minute.map(|v| u64::from(v).max(1)),
            tpm: cfg.tokens_per_minute,
            concurrent: cfg.max_concurrent.map(|v| u64::from(v).max(1)),
        }
    }
}

/// One grant (or a late token correction) inside the window.
#[derive(Debug)]
struct Entry {
    at: Instant,
    id: u64,
    tokens: u64,
    /// False for the extra tokens of a request settled after its grant left the window.
    request: bool,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    wake: Arc<Notify>,
}

/// A provider-reported remaining value, trusted until its reset.
#[derive(Debug, Clone, Copy)]
struct Observed {
    value: u64,
    valid_until: Instant,
}

#[derive(Debug, Default)]
struct State {
    limits: Limits,
    /// Grants of the last [`WINDOW`], oldest first.
    window: VecDeque<Entry>,
    requests_in_window: u64,
    tokens_in_window: u64,
    in_flight: u64,
    queue: VecDeque<Waiter>,
    paused_until: Option<Instant>,
    seen_requests: Option<Observed>,
    seen_tokens: Option<Observed>,
    next_id: u64,
}

enum Verdict {
    Go,
    /// Blocked; re-check at this instant (None: only an event can unblock it).
    Wait(Option<Instant>),
}

impl State {
    fn prune(&mut self, now: Instant) {
        while let Some(e) = self.window.front() {
            if e.at + WINDOW > now {
                break;
            }
            self.tokens_in_window = self.tokens_in_window.saturating_sub(e.tokens);
            if e.request {
                self.requests_in_window = self.requests_in_window.saturating_sub(1);
            }
            self.window.pop_front();
        }
    }

    fn check(&mut self, now: Instant, tokens: u64) -> Verdict {
        self.prune(now);
        let mut blocked = false;
        let mut until: Option<Instant> = None;
        let mut wait_until = |t: Instant| until = Some(until.map_or(t, |u| u.max(t)));

        match self.paused_until {
            Some(p) if p > now => {
                blocked = true;
                wait_until(p);
            }
            Some(_) => self.paused_until = None,
            None => {}
        }
        if let Some(rpm) = self.limits.rpm {
            if self.requests_in_window >= rpm {
                blocked = true;
                // The grant that must age out is the (excess + 1)-th oldest request.
                let need = self.requests_in_window - rpm + 1;
                let mut seen = 0;
                for e in self.window.iter().filter(|e| e.request) {
                    seen += 1;
                    if seen == need {
                        wait_until(e.at + WINDOW);
                        break;
                    }
                }
            }
        }
        if let Some(tpm) = self.limits.tpm {
            let fits = |used: u64| used == 0 || used.saturating_add(tokens) <= tpm;
            if !fits(self.tokens_in_window) {
                blocked = true;
                let mut used = self.tokens_in_window;
                for e in &self.window {
                    used = used.saturating_sub(e.tokens);
                    if fits(used) {
                        wait_until(e.at + WINDOW);
                        break;
                    }
                }
            }
        }
        if let Some(max) = self.limits.concurrent {
            if self.in_flight >= max {
                blocked = true;
            }
        }
        if blocked {
            Verdict::Wait(until)
        } else {
            Verdict::Go
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn grant(&mut self, now: Instant, id: u64, tokens: u64) {
        self.window.push_back(Entry {
            at: now,
            id,
            tokens,
            request: true,
        });
        self.requests_in_window += 1;
        self.tokens_in_window = self.tokens_in_window.saturating_add(tokens);
        self.in_flight += 1;
    }

    fn wake_head(&self) {
        if let Some(w) = self.queue.front() {
            w.wake.notify_one();
        }
    }

    fn settle(&mut self, now: Instant, id: u64, estimate: u64, actual: u64) {
        self.prune(now);
        // From the back: the grant being settled is usually recent, and the window holds
        // every request of the last minute, so a scan from the front grows with traffic.
        if let Some(e) = self
            .window
            .iter_mut()
            .rev()
            .find(|e| e.id == id && e.request)
        {
            self.tokens_in_window = self
                .tokens_in_window
                .saturating_sub(e.tokens)
                .saturating_add(actual);
            e.tokens = actual;
        } else if actual > estimate {
            // The grant already left the window (a request longer than a minute): the
            // tokens the estimate missed are charged from now, as the provider saw them late.
            self.window.push_back(Entry {
                at: now,
                id,
                tokens: actual - estimate,
                request: false,
            });
            self.tokens_in_window = self.tokens_in_window.saturating_add(actual - estimate);
        }
        self.wake_head();
    }

    fn pause_until(&mut self, until: Instant) {
        // A shorter pause never cuts a longer one already in force.
        if self.paused_until.is_none_or(|p| p < until) {
            self.paused_until = Some(until);
        }
        self.wake_head();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a panic elsewhere must not wedge
        // every agent of the profile.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a waiter whose `acquire` future is dropped before it was granted.
struct QueueSlot<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.inner.lock();
        if let Some(pos) = st.queue.iter().position(|w| w.id == self.id) {
            st.queue.remove(pos);
            if pos == 0 {
                st.wake_head();
            }
        }
    }
}

impl RateLimiter {
    /// A limiter for a profile's `[rate_limit]` (no limits when `None`).
    pub fn new(cfg: Option<&RateLimitConfig>) -> Self {
        let limiter = RateLimiter::default();
        limiter.inner.lock().limits = Limits::from_config(cfg);
        limiter
    }

    /// Applies a reloaded `[rate_limit]` in place, keeping the queue, window and pauses.
    pub fn set_config(&self, cfg: Option<&RateLimitConfig>) {
        let mut st = self.inner.lock();
        st.limits = Limits::from_config(cfg);
        st.wake_head();
    }

    /// Waits (FIFO) until a request estimated at `estimated_tokens` may start.
    pub async fn acquire(&self, estimated_tokens: u64) -> Permit {
        let inner = &*self.inner;
        let (id, wake) = {
            let mut st = inner.lock();
            let now = Instant::now();
            let id = st.next_id();
            if st.queue.is_empty() {
                if let Verdict::Go = st.check(now, estimated_tokens) {
                    st.grant(now, id, estimated_tokens);
                    return self.permit(id, estimated_tokens);
                }
            }
            let wake = Arc::new(Notify::new());
            st.queue.push_back(Waiter {
                id,
                wake: wake.clone(),
            });
            (id, wake)
        };
        let mut slot = QueueSlot {
            inner,
            id,
            armed: true,
        };
        loop {
            #[cfg(test)]
            inner
                .checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let recheck_at = {
                let mut st = inner.lock();
                let now = Instant::now();
                let is_head = st.queue.front().is_some_and(|w| w.id == id);
                if !is_head {
                    // Only the departure of the waiters ahead can make us the head.
                    None
                } else {
                    match st.check(now, estimated_tokens) {
                        Verdict::Go => {
                            st.queue.pop_front();
                            st.grant(now, id, estimated_tokens);
                            slot.armed = false;
                            st.wake_head();
                            return self.permit(id, estimated_tokens);
                        }
                        Verdict::Wait(at) => at,
                    }
                }
            };
            match recheck_at {
                Some(at) => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => wake.notified().await,
            }
        }
    }

    fn permit(&self, id: u64, estimate: u64) -> Permit {
        Permit {
            inner: self.inner.clone(),
            id,
            estimate,
        }
    }

    /// Pauses the whole profile for `for_how_long` (after a 429).
    pub fn pause(&self, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        self.inner.lock().pause_until(until);
    }

    /// True while a provider-imposed pause is in force (a pool skips the profile then).
    pub fn is_paused(&self) -> bool {
        let now = Instant::now();
        self.inner.lock().paused_until.is_some_and(|p| p > now)
    }

    /// Reads provider signals (`anthropic-ratelimit-*`, `x-ratelimit-*`, `retry-after`).
    pub fn observe(&self, headers: &HeaderMap) {
        self.observe_at(headers, SystemTime::now());
    }

    /// As [`observe`](Self::observe), with the wall clock that absolute reset times are
    /// measured against.
    pub fn observe_at(&self, headers: &HeaderMap, wall_now: SystemTime) {
        let signals = Signals::read(headers, wall_now);
        let now = Instant::now();
        let mut st = self.inner.lock();
        let observed = |(value, reset): (u64, Option<Duration>)| Observed {
            value,
            valid_until: now + reset.unwrap_or(WINDOW).min(MAX_OBSERVED_PAUSE),
        };
        if let Some(r) = signals.requests {
            st.seen_requests = Some(observed(r));
        }
        if let Some(t) = signals.tokens {
            st.seen_tokens = Some(observed(t));
        }
        if let Some(p) = signals.pause {
            st.pause_until(now + p.min(MAX_OBSERVED_PAUSE));
        }
    }

    /// Current queue and budget.
    pub fn status(&self) -> LimitStatus {
        let now = Instant::now();
        let mut st = self.inner.lock();
        st.prune(now);
        let fresh = |o: Option<Observed>| o.filter(|o| o.valid_until > now).map(|o| o.value);
        let local_requests = st
            .limits
            .rpm
            .map(|r| r.saturating_sub(st.requests_in_window));
        let local_tokens = st.limits.tpm.map(|t| t.saturating_sub(st.tokens_in_window));
        LimitStatus {
            queued: st.queue.len() as u64,
            in_flight: st.in_flight,
            remaining_requests: min_opt(local_requests, fresh(st.seen_requests)),
            remaining_tokens: min_opt(local_tokens, fresh(st.seen_tokens)),
            paused_for_ms: st
                .paused_until
                .filter(|p| *p > now)
                .map(|p| (p - now).as_micros().div_ceil(1000) as u64),
        }
    }
}

impl Permit {
    /// Corrects the token estimate with the answer's real usage.
    pub fn settle(self, actual_tokens: u64) {
        let now = Instant::now();
        self.inner
            .lock()
            .settle(now, self.id, self.estimate, actual_tokens);
        // Dropping `self` here frees the concurrency slot.
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.wake_head();
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What one response's headers say.
#[derive(Debug, Default, PartialEq)]
struct Signals {
    /// Lowest remaining request count and its reset.
    requests: Option<(u64, Option<Duration>)>,
    /// Lowest remaining token count and its reset.
    tokens: Option<(u64, Option<Duration>)>,
    /// How long the profile must wait.
    pause: Option<Duration>,
}

/// `(remaining header, reset header, counts tokens)`. Anthropic's resets are RFC 3339
/// instants, OpenAI's are Go-style durations; [`parse_reset`] takes either from both.
const REMAINING_HEADERS: &[(&str, &str, bool)] = &[
    (
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        false,
    ),
    (
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
        true,
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
        true,
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
        true,
    ),
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        false,
    ),
    (
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        true,
    ),
];

impl Signals {
    fn read(headers: &HeaderMap, wall_now: SystemTime) -> Signals {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let mut s = Signals::default();
        let mut pause_for = |d: Duration| s.pause = Some(s.pause.map_or(d, |p: Duration| p.max(d)));

        if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
            if let Some(d) = secs_to_duration(ms / 1000.0) {
                pause_for(d);
            }
        } else if let Some(d) = text("retry-after").and_then(|v| parse_retry_after(v, wall_now)) {
            pause_for(d);
        }

        let mut requests: Option<(u64, Option<Duration>)> = None;
        let mut tokens: Option<(u64, Option<Duration>)> = None;
        for &(remaining_name, reset_name, is_tokens) in REMAINING_HEADERS {
            let Some(remaining) = text(remaining_name).and_then(parse_count) else {
                continue;
            };
            let reset = text(reset_name).and_then(|v| parse_reset(v, wall_now));
            if remaining == 0 {
                if let Some(d) = reset {
                    pause_for(d);
                }
            }
            let slot = if is_tokens {
                &mut tokens
            } else {
                &mut requests
            };
            if slot.is_none_or(|(v, _)| remaining < v) {
                *slot = Some((remaining, reset));
            }
        }
        s.requests = requests;
        s.tokens = tokens;
        s
    }
}

fn parse_count(v: &str) -> Option<u64> {
    v.parse::<u64>().ok().or_else(|| {
        // Some gateways send "0.0"; a negative or non-finite count means nothing.
        let f = v.parse::<f64>().ok()?;
        (f.is_finite() && f >= 0.0).then(|| f.floor() as u64)
    })
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

/// `retry-after`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn parse_retry_after(v: &str, wall_now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        return secs_to_duration(secs);
    }
    let at = parse_http_date(v)?;
    Some(at.duration_since(wall_now).unwrap_or(Duration::ZERO))
}

/// A reset as an RFC 3339 instant (Anthropic), a Go-style duration (OpenAI), plain seconds,
/// or unix seconds (some gateways): the time left until it.
pub fn parse_reset(v: &str, wall_now: SystemTime) -> Option<Duration> {
    if let Some(at) = parse_rfc3339(v) {
        return Some(at.duration_since(wall_now).unwrap_or(Duration::ZERO));
    }
    if let Ok(n) = v.parse::<f64>() {
        // Nobody resets a per-minute limit in 30 years: this is a unix timestamp.
        if n > 1e9 {
            let at = UNIX_EPOCH + secs_to_duration(n)?;
            return Some(at.duration_since(wall_now).unwrap_or(Duration::ZERO));
        }
        return secs_to_duration(n);
    }
    parse_go_duration(v)
}

/// A Go `time.Duration` string as OpenAI sends it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
fn parse_go_duration(v: &str) -> Option<Duration> {
    let mut rest = v;
    let mut total = 0.0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    secs_to_duration(total)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix time of a UTC-offset civil date `(y, m, d)` and time `(h, m, s)`.
fn unix_time(
    (y, mo, d): (i64, u32, u32),
    (h, mi, s): (u32, u32, u32),
    nanos: u32,
    offset_secs: i64,
) -> Option<SystemTime> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s) - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// `2024-05-01T12:00:30Z`, `2024-05-01T12:00:30.25+02:00` (RFC 3339 §5.6).
fn parse_rfc3339(v: &str) -> Option<SystemTime> {
    let b = v.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = v.get(r)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos = 0u32;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &v[start..i.min(start + 9)];
        nanos = digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32);
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let oh = i64::from(num(i + 1..i + 3)?);
            let om = i64::from(num(i + 4..i + 6)?);
            let off = oh * 3600 + om * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    unix_time((i64::from(y), mo, d), (h, mi, s), nanos, offset)
}

/// IMF-fixdate, the HTTP-date every current server sends: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(v: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = v.split_ascii_whitespace().collect();
    let [_weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mo = MONTHS.iter().position(|m| m == month)? as u32 + 1;
    let hms: Vec<u32> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, s] = hms.as_slice() else {
        return None;
    };
    unix_time(
        (year.parse().ok()?, mo, day.parse().ok()?),
        (*h, *mi, *s),
        0,
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn limiter(rpm: Option<u32>, tpm: Option<u64>, concurrent: Option<u32>) -> Arc<RateLimiter> {
        Arc::new(RateLimiter::new(Some(&RateLimitConfig {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent: concurrent,
        })))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Lets every spawned task run until it blocks, without moving the paused clock.
    async fn settle_tasks() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Awaits a spawned task. With the paused clock a limiter that forgets to wake a waiter
    /// makes this time out at once (virtual time) instead of hanging the test run.
    async fn done<T>(task: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(7 * 86_400), task)
            .await
            .expect("a waiter was never woken")
            .unwrap()
    }

    /// Spawns `acquire(tokens)` and returns when it was granted, relative to `t0`.
    fn spawn_acquire(
        lim: &Arc<RateLimiter>,
        t0: Instant,
        tokens: u64,
    ) -> tokio::task::JoinHandle<(Duration, Permit)> {
        let lim = lim.clone();
        tokio::spawn(async move {
            let p = lim.acquire(tokens).await;
            (t0.elapsed(), p)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let lim = RateLimiter::new(None);
        let t0 = Instant::now();
        let permits: Vec<Permit> =
            futures_util::future::join_all((0..100).map(|_| lim.acquire(1_000_000))).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let st = lim.status();
        assert_eq!(
            (
                st.in_flight,
                st.queued,
                st.remaining_requests,
                st.remaining_tokens
            ),
            (100, 0, None, None)
        );
        drop(permits);
        assert_eq!(lim.status().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rpm_holds_over_a_sliding_minute() {
        let lim = limiter(Some(5), None, None);
        let t0 = Instant::now();
        // Five requests spread over 40 s all start at once.
        for i in 0..5u64 {
            tokio::time::sleep_until(t0 + Duration::from_secs(10 * i)).await;
            drop(lim.acquire(1).await);
            assert_eq!(t0.elapsed(), Duration::from_secs(10 * i));
        }
        assert_eq!(lim.status().remaining_requests, Some(0));
        // The 6th waits until a minute after the 1st, the 7th a minute after the 2nd.
        let sixth = spawn_acquire(&lim, t0, 1);
        settle_tasks().await;
        let seventh = spawn_acquire(&lim, t0, 1);
        settle_tasks().await;
        assert_eq!(lim.status().queued, 2);
        assert_eq!(done(sixth).await.0, Duration::from_secs(60));
        assert_eq!(done(seventh).await.0, Duration::from_secs(70));
        assert_eq!(lim.status().remaining_requests, Some(0));
        tokio::time::sleep_until(t0 + Duration::from_secs(100)).await;
        // At 100 s the grants of 0..=40 s have left the window: 60 s and 70 s remain.
        assert_eq!(lim.status().remaining_requests, Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn tpm_holds_with_settle_corrections() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        // Estimated 600, really 100: the budget gets 500 back.
        lim.acquire(600).await.settle(100);
        assert_eq!(lim.status().remaining_tokens, Some(900));
        tokio::time::sleep_until(t0 + Duration::from_secs(10)).await;
        let b = lim.acquire(800).await; // 100 + 800 fits
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        // 900 + 150 does not fit; with the estimate, 800 + 150 would once the 100 leaves at 60 s...
        let c = spawn_acquire(&lim, t0, 150);
        settle_tasks().await;
        assert_eq!(lim.status().queued, 1);
        // ...but b really used 950, so c waits for b to leave the window too.
        b.settle(950);
        let (at, c) = done(c).await;
        assert_eq!(at, Duration::from_secs(70));
        // Dropping without settle keeps the estimate charged.
        drop(c);
        assert_eq!(lim.status().remaining_tokens, Some(850));
        let d = spawn_acquire(&lim, t0, 900);
        assert_eq!(done(d).await.0, Duration::from_secs(130));
    }

    #[tokio::test(start_paused = true)]
    async fn request_over_the_whole_budget_goes_once_the_window_is_empty() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        // Empty window: it goes at once, however big.
        lim.acquire(5000).await.settle(5000);
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(lim.status().remaining_tokens, Some(0));
        // Even a tiny one then waits for the big one to leave the window.
        tokio::time::sleep_until(t0 + Duration::from_secs(1)).await;
        let small = spawn_acquire(&lim, t0, 10);
        assert_eq!(done(small).await.0, Duration::from_secs(60));
        // A big one behind a small one waits until the small one leaves too.
        let big = spawn_acquire(&lim, t0, 5000);
        assert_eq!(done(big).await.0, Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn a_settle_that_frees_tokens_wakes_the_queue() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        let a = lim.acquire(900).await;
        let b = spawn_acquire(&lim, t0, 500);
        tokio::time::sleep_until(t0 + Duration::from_secs(5)).await;
        assert_eq!(lim.status().queued, 1);
        a.settle(200);
        assert_eq!(done(b).await.0, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn settle_after_the_grant_left_the_window_charges_the_excess_now() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        let a = lim.acquire(100).await;
        tokio::time::sleep_until(t0 + Duration::from_secs(90)).await;
        assert_eq!(lim.status().remaining_tokens, Some(1000));
        a.settle(700);
        assert_eq!(lim.status().remaining_tokens, Some(400));
        let b = spawn_acquire(&lim, t0, 500);
        assert_eq!(done(b).await.0, Duration::from_secs(150));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_holds_under_50_tasks() {
        let lim = limiter(None, None, Some(3));
        let t0 = Instant::now();
        let current = Arc::new(AtomicU64::new(0));
        let max_seen = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (lim, current, max_seen) = (lim.clone(), current.clone(), max_seen.clone());
                tokio::spawn(async move {
                    let permit = lim.acquire(1).await;
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    max_seen.fetch_max(now, Ordering::SeqCst);
                    assert!(lim.status().in_flight <= 3);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                })
            })
            .collect();
        for t in tasks {
            done(t).await;
        }
        assert_eq!(max_seen.load(Ordering::SeqCst), 3);
        // 50 one-second requests, three at a time: ceil(50 / 3) seconds, no slot left idle.
        assert_eq!(t0.elapsed(), Duration::from_secs(17));
        let st = lim.status();
        assert_eq!((st.in_flight, st.queued), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let lim = limiter(None, None, Some(1));
        let first = lim.acquire(1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (lim, order) = (lim.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = lim.acquire(1).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(p);
            }));
            settle_tasks().await;
        }
        assert_eq!(lim.status().queued, 20);
        drop(first);
        for t in tasks {
            done(t).await;
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_big_head_is_not_overtaken_by_small_requests() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        drop(lim.acquire(900).await);
        tokio::time::sleep_until(t0 + Duration::from_secs(1)).await;
        let big = spawn_acquire(&lim, t0, 800);
        settle_tasks().await;
        // 900 + 50 would fit, but the 800 is ahead of it.
        let small = spawn_acquire(&lim, t0, 50);
        settle_tasks().await;
        assert_eq!(lim.status().queued, 2);
        let (big_at, _big) = done(big).await;
        let (small_at, _small) = done(small).await;
        assert_eq!(big_at, Duration::from_secs(60));
        assert_eq!(small_at, Duration::from_secs(60));
        // And with a fresh arrival while the queue is non-empty, it still queues.
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        let _held = lim.acquire(900).await;
        let big = spawn_acquire(&lim, t0, 800);
        settle_tasks().await;
        let small = spawn_acquire(&lim, t0, 10);
        settle_tasks().await;
        assert!(
            !small.is_finished(),
            "a small request overtook the queued big one"
        );
        assert_eq!(done(big).await.0, Duration::from_secs(60));
        assert_eq!(done(small).await.0, Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_does_not_spin() {
        let lim = limiter(Some(1), None, Some(1));
        let t0 = Instant::now();
        let checks = || lim.inner.checks.load(Ordering::Relaxed);
        let held = lim.acquire(1).await;
        let waiters: Vec<_> = (0..20).map(|_| spawn_acquire(&lim, t0, 1)).collect();
        // An hour blocked: one evaluation each on arrival, and the head's once more when the
        // held request left the RPM window at 60 s; nothing more.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(checks(), 21);
        drop(held);
        // Now the RPM paces them one a minute. Each head evaluates when it becomes the head,
        // when the permit before it is dropped, and at its deadline: a handful, not a loop.
        for (i, w) in waiters.into_iter().enumerate() {
            let (at, _) = done(w).await;
            assert_eq!(at, Duration::from_secs(3600 + 60 * i as u64));
        }
        assert!(checks() <= 21 + 3 * 20, "{} checks", checks());
    }

    #[tokio::test(start_paused = true)]
    async fn pause_blocks_everyone_until_it_ends() {
        let lim = limiter(None, None, Some(1));
        let t0 = Instant::now();
        let held = lim.acquire(1).await;
        let queued: Vec<_> = (0..3).map(|_| spawn_acquire(&lim, t0, 1)).collect();
        settle_tasks().await;
        lim.pause(Duration::from_secs(30));
        assert_eq!(lim.status().paused_for_ms, Some(30_000));
        // The slot frees during the pause: nobody may use it before the pause ends.
        tokio::time::sleep_until(t0 + Duration::from_secs(5)).await;
        drop(held);
        // A newcomer arriving during the pause waits too, behind the queue.
        let late = spawn_acquire(&lim, t0, 1);
        settle_tasks().await;
        assert_eq!(lim.status().queued, 4);
        // A shorter pause does not shorten it.
        lim.pause(Duration::from_secs(1));
        assert_eq!(lim.status().paused_for_ms, Some(25_000));
        let mut times = Vec::new();
        for q in queued.into_iter().chain([late]) {
            let (at, p) = done(q).await;
            times.push(at);
            drop(p);
        }
        assert_eq!(times, vec![Duration::from_secs(30); 4]);
        assert_eq!(lim.status().paused_for_ms, None);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_applies_without_configured_limits() {
        let lim = Arc::new(RateLimiter::new(None));
        let t0 = Instant::now();
        lim.pause(Duration::from_millis(1500));
        let a = spawn_acquire(&lim, t0, 1);
        assert_eq!(done(a).await.0, Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leave_the_queue() {
        let lim = limiter(None, None, Some(1));
        let t0 = Instant::now();
        let held = lim.acquire(1).await;
        // The head gives up after a second (its future is dropped).
        let head = {
            let lim = lim.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(1), lim.acquire(1))
                    .await
                    .is_err()
            })
        };
        settle_tasks().await;
        let middle = spawn_acquire(&lim, t0, 1);
        settle_tasks().await;
        let last = spawn_acquire(&lim, t0, 1);
        settle_tasks().await;
        assert_eq!(lim.status().queued, 3);
        assert!(done(head).await, "the head should have timed out");
        assert_eq!(lim.status().queued, 2);
        // A waiter in the middle is aborted.
        middle.abort();
        assert!(middle.await.unwrap_err().is_cancelled());
        assert_eq!(lim.status().queued, 1);
        tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
        drop(held);
        let (at, p) = done(last).await;
        assert_eq!(at, Duration::from_secs(2));
        drop(p);
        let st = lim.status();
        assert_eq!((st.queued, st.in_flight), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_big_head_lets_the_next_go() {
        let lim = limiter(None, Some(1000), None);
        let t0 = Instant::now();
        let _held = lim.acquire(900).await;
        let big = spawn_acquire(&lim, t0, 800);
        settle_tasks().await;
        let small = spawn_acquire(&lim, t0, 50);
        settle_tasks().await;
        tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
        big.abort();
        assert_eq!(done(small).await.0, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn set_config_applies_to_waiters() {
        let lim = limiter(None, None, Some(1));
        let t0 = Instant::now();
        let _held = lim.acquire(1).await;
        let a = spawn_acquire(&lim, t0, 1);
        tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
        lim.set_config(Some(&RateLimitConfig {
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: Some(2),
        }));
        assert_eq!(done(a).await.0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_limits_do_not_deadlock() {
        let lim = limiter(Some(0), Some(0), Some(0));
        let t0 = Instant::now();
        let a = lim.acquire(10).await;
        drop(a);
        let b = spawn_acquire(&lim, t0, 10);
        assert_eq!(done(b).await.0, Duration::from_secs(60));
    }

    fn wall(s: &str) -> SystemTime {
        parse_rfc3339(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn anthropic_headers() {
        let now = wall("2025-06-01T12:00:00Z");
        let lim = limiter(None, None, None);
        // Budget left: recorded, no pause.
        lim.observe_at(
            &headers(&[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "49"),
                ("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:01Z"),
                ("anthropic-ratelimit-tokens-remaining", "39000"),
                ("anthropic-ratelimit-tokens-reset", "2025-06-01T12:00:30Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "30000"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2025-06-01T12:00:30Z",
                ),
                ("anthropic-ratelimit-output-tokens-remaining", "8000"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2025-06-01T12:00:30Z",
                ),
            ]),
            now,
        );
        let st = lim.status();
        assert_eq!(
            (st.remaining_requests, st.remaining_tokens, st.paused_for_ms),
            (Some(49), Some(8000), None)
        );
        // Observed values expire at their reset.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(lim.status().remaining_requests, None);

        // Output tokens exhausted: pause until their reset (with a +02:00 offset and fraction).
        let lim = limiter(None, None, None);
        lim.observe_at(
            &headers(&[
                ("anthropic-ratelimit-requests-remaining", "10"),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2025-06-01T14:00:20.5+02:00",
                ),
            ]),
            now,
        );
        assert_eq!(lim.status().paused_for_ms, Some(20_500));
        assert_eq!(lim.status().remaining_tokens, Some(0));

        // A 429 with retry-after.
        let lim = limiter(Some(100), None, None);
        lim.observe_at(
            &headers(&[
                ("retry-after", "7"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:05Z"),
            ]),
            now,
        );
        let st = lim.status();
        assert_eq!(
            (st.paused_for_ms, st.remaining_requests),
            (Some(7_000), Some(0))
        );
        let t0 = Instant::now();
        drop(lim.acquire(1).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn openai_headers() {
        let now = wall("2025-06-01T12:00:00Z");
        let lim = limiter(Some(100), Some(10_000), None);
        lim.observe_at(
            &headers(&[
                ("x-ratelimit-limit-requests", "60"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-remaining-tokens", "1234"),
                ("x-ratelimit-reset-tokens", "20ms"),
            ]),
            now,
        );
        let st = lim.status();
        assert_eq!(st.paused_for_ms, Some(360_000));
        assert_eq!(st.remaining_requests, Some(0));
        assert_eq!(st.remaining_tokens, Some(1234));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The provider's token count expired: the local budget shows again.
        assert_eq!(lim.status().remaining_tokens, Some(10_000));

        let lim = limiter(None, None, None);
        lim.observe_at(
            &headers(&[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1.5s"),
            ]),
            now,
        );
        assert_eq!(lim.status().paused_for_ms, Some(1_500));
        let lim = limiter(None, None, None);
        lim.observe_at(
            &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            now,
        );
        assert_eq!(lim.status().paused_for_ms, Some(250));
    }

    #[tokio::test(start_paused = true)]
    async fn odd_headers_are_ignored_or_bounded() {
        let now = wall("2025-06-01T12:00:00Z");
        let lim = limiter(None, None, None);
        lim.observe_at(
            &headers(&[
                ("retry-after", "soon"),
                ("x-ratelimit-remaining-requests", "lots"),
                ("x-ratelimit-reset-requests", "1s"),
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "2025-06-01T11:59:00Z"), // already past
            ]),
            now,
        );
        let st = lim.status();
        // A reset already past says nothing any more.
        assert_eq!(
            (st.paused_for_ms, st.remaining_requests, st.remaining_tokens),
            (None, None, None)
        );
        lim.observe_at(&headers(&[("retry-after", "86400")]), now);
        assert_eq!(
            lim.status().paused_for_ms,
            Some(MAX_OBSERVED_PAUSE.as_millis() as u64)
        );
        let lim = limiter(None, None, None);
        lim.observe_at(
            &headers(&[("retry-after", "Sun, 01 Jun 2025 12:00:42 GMT")]),
            now,
        );
        assert_eq!(lim.status().paused_for_ms, Some(42_000));
    }

    #[test]
    fn go_durations() {
        let ms = |v: &str| parse_go_duration(v).map(|d| d.as_millis());
        assert_eq!(ms("1s"), Some(1000));
        assert_eq!(ms("6m0s"), Some(360_000));
        assert_eq!(ms("20ms"), Some(20));
        assert_eq!(ms("1h2m3.5s"), Some(3_723_500));
        assert_eq!(ms("0s"), Some(0));
        assert_eq!(ms("1500us"), Some(1));
        for bad in ["", "s", "5", "5x", "-1s", "1s2", "1..2s"] {
            assert_eq!(ms(bad), None, "{bad}");
        }
        assert_eq!(
            parse_reset("2.5", UNIX_EPOCH).map(|d| d.as_millis()),
            Some(2500)
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        assert_eq!(
            parse_reset("1750000030", now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn timestamps() {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert_eq!(secs(wall("1970-01-01T00:00:00Z")), 0.0);
        assert_eq!(secs(wall("2000-03-01T00:00:00Z")), 951_868_800.0);
        assert_eq!(secs(wall("2024-02-29T23:59:59z")), 1_709_251_199.0);
        assert_eq!(
            secs(wall("2024-02-29T23:59:59-01:30")),
            1_709_251_199.0 + 5400.0
        );
        let frac = wall("2025-01-01T00:00:00.123456789Z")
            .duration_since(UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            (frac.as_secs(), frac.subsec_nanos()),
            (1_735_689_600, 123_456_789)
        );
        let frac = wall("2025-01-01T00:00:00.5Z")
            .duration_since(UNIX_EPOCH)
            .unwrap();
        assert_eq!(frac.subsec_nanos(), 500_000_000);
        for bad in [
            "2025-01-01",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00",
            "2025-01-01T00:00:00+0100",
            "2025-01-01T00:00:00.Z",
            "x025-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").map(secs),
            Some(784_111_777.0)
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }
}
