//! A string that never prints itself.

use std::fmt;
use std::sync::Arc;

/// A token, key or refresh token. `Debug` and `Display` print `<redacted>`; the value is
/// reachable only through [`Secret::expose`], which makes every use easy to audit.
/// Clones share one allocation, so handing a token to many callers is cheap.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
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
