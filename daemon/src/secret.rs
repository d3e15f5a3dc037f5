//! A string that never prints itself.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

/// A token, key or refresh token. `Debug` and `Display` print `<redacted>`; the value is
/// reachable only through [`Secret::expose`], which makes every use easy to audit.
/// Clones share one allocation, so handing a token to many callers is cheap.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value. Every secret llmd holds is also known to [`scrub_known`]
    /// for as long as it is alive.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        let value = value.into();
        if value.len() >= MIN_SCRUB_LEN {
            remember(&value);
        }
        Secret(value)
    }

    /// The secret value. Call only where the value leaves for its legitimate use.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Shortest value [`scrub`] replaces: shorter strings (`true`, a version date) are not
/// secrets, and replacing them would garble the text.
pub const MIN_SCRUB_LEN: usize = 8;

/// Every live secret (weakly held: a dropped token is forgotten), pruned as it grows.
struct Known {
    list: Vec<Weak<str>>,
    prune_at: usize,
}

static KNOWN: Mutex<Known> = Mutex::new(Known {
    list: Vec::new(),
    prune_at: 64,
});

fn remember(value: &Arc<str>) {
    let mut k = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if k.list.len() >= k.prune_at {
        k.list.retain(|w| w.strong_count() > 0);
        k.prune_at = (k.list.len() * 2).max(64);
    }
    k.list.push(Arc::downgrade(value));
}

/// `text` with every secret llmd currently holds (keys, access and refresh tokens, stored
/// credentials: anything wrapped in a [`Secret`]) and every one of `extra` replaced by
/// `<redacted>`. For outside text that may echo any of them: provider error bodies, a
/// token endpoint's `error` string.
pub fn scrub_known<'a>(text: &str, extra: impl IntoIterator<Item = &'a str>) -> String {
    let live: Vec<Arc<str>> = {
        let k = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
        k.list.iter().filter_map(Weak::upgrade).collect()
    };
    let extra: Vec<&str> = extra.into_iter().collect();
    let all = live.iter().map(|s| &**s).chain(extra.iter().copied());
    scrub(text, all)
}

/// `text` with every occurrence of each known secret replaced by `<redacted>`. For header
/// values such as `Bearer sk-…` the bare token is matched as well. Use it on anything that
/// came from outside (a provider's error body, an endpoint's message) before it is passed
/// on or logged.
pub fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = text.to_owned();
    let mut all: Vec<&str> = Vec::new();
    for s in secrets {
        all.push(s);
        if let Some((scheme, rest)) = s.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("basic") {
                all.push(rest.trim());
            }
        }
    }
    // Longest first, so a token inside a longer header value is not cut in half.
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in all {
        if s.len() >= MIN_SCRUB_LEN && out.contains(s) {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_secret_is_scrubbed_and_dropped_ones_are_forgotten() {
        let held = Secret::new("rt-live-refresh-token-123");
        let gone = Secret::new("rt-dropped-refresh-token-456");
        drop(gone);
        let out = scrub_known(
            "a rt-live-refresh-token-123 b rt-dropped-refresh-token-456 c extra-secret-789",
            ["extra-secret-789"],
        );
        assert_eq!(
            out,
            "a <redacted> b rt-dropped-refresh-token-456 c <redacted>"
        );
        drop(held);
    }

    #[test]
    fn scrub_replaces_known_secrets_and_bare_bearer_tokens() {
        let body = r#"{"error":"bad key sk-ant-api03-abcdef","echo":"Bearer tok-123456789"}"#;
        let out = scrub(
            body,
            ["sk-ant-api03-abcdef", "Bearer tok-123456789", "short"],
        );
        assert!(!out.contains("sk-ant-api03-abcdef") && !out.contains("tok-123456789"));
        assert_eq!(out.matches("<redacted>").count(), 2);
        assert_eq!(scrub("keep short", ["short"]), "keep short");
    }

    #[test]
    fn never_formats_its_value() {
        let s = Secret::new("sk-ant-api03-abc");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "sk-ant-api03-abc");
    }
}
