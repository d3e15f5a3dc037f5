//! The variables `llmctl exec` sets: the ones each provider's own SDKs and CLIs read.

use llmd_client::proto::methods::{ProfileStatus, TokenResult};

/// Default bases; a profile on its default gets no base-URL variable.
const DEFAULT_BASES: [(&str, &str); 4] = [
    ("anthropic", "https://api.anthropic.com"),
    ("openai-compat", "https://api.openai.com/v1"),
    ("gemini", "https://generativelanguage.googleapis.com/v1beta"),
    ("minimax", "https://api.minimax.io"),
];

/// `(name, value)` pairs for a command that talks to `status`'s provider with `token`.
pub fn for_profile(status: &ProfileStatus, token: &TokenResult) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vec![("LLMD_PROFILE".into(), status.name.clone())];
    let custom_base = status.base_url.as_deref().filter(|b| {
        !DEFAULT_BASES
            .iter()
            .any(|(p, d)| *p == status.provider && b.trim_end_matches('/') == *d)
    });
    let mut set = |k: &str, val: &str| v.push((k.to_owned(), val.to_owned()));
    match status.provider.as_str() {
        "anthropic" => {
            if token.kind == "api-key" {
                set("ANTHROPIC_API_KEY", &token.token);
            } else {
                // A subscription token is a bearer token and needs the OAuth beta header,
                // which Claude Code and the SDKs take from ANTHROPIC_CUSTOM_HEADERS.
                set("ANTHROPIC_AUTH_TOKEN", &token.token);
                let extra: Vec<String> = token
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
                    .map(|(k, val)| format!("{k}: {val}"))
                    .collect();
                if !extra.is_empty() {
                    set("ANTHROPIC_CUSTOM_HEADERS", &extra.join("\n"));
                }
            }
            if let Some(b) = custom_base {
                set("ANTHROPIC_BASE_URL", b);
            }
        }
        "openai-compat" => {
            set("OPENAI_API_KEY", &token.token);
            if let Some(b) = custom_base {
                set("OPENAI_BASE_URL", b);
            }
        }
        "gemini" => {
            set("GEMINI_API_KEY", &token.token);
            if let Some(b) = custom_base {
                set("GOOGLE_GEMINI_BASE_URL", b);
            }
        }
        _ => {
            set("MINIMAX_API_KEY", &token.token);
            if let Some(b) = custom_base {
                set("MINIMAX_BASE_URL", b);
            }
        }
    }
    v
}
