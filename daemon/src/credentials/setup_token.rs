//! Anthropic setup-tokens (`claude setup-token`): long-lived OAuth access tokens.

use super::KeyError;
use crate::secret::Secret;

/// Prefix every setup-token carries.
pub const PREFIX: &str = "sk-ant-oat01-";
/// Shortest plausible setup-token.
pub const MIN_LEN: usize = 80;

/// Checks the shape of a setup-token; the error never contains it.
pub fn validate(token: &str) -> Result<Secret, KeyError> {
    let t = token.trim();
    if !t.starts_with(PREFIX) {
        return Err(KeyError::Invalid(format!(
            "not a setup-token: it must start with `{PREFIX}` (run `claude setup-token`)"
        )));
    }
    if t.len() < MIN_LEN {
        return Err(KeyError::Invalid(format!(
            "setup-token too short: {} characters, expected at least {MIN_LEN}",
            t.len()
        )));
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(KeyError::Invalid(
            "setup-token contains characters other than letters, digits, `-` and `_`".into(),
        ));
    }
    Ok(Secret::new(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let good = format!("{PREFIX}{}", "a".repeat(90));
        assert!(validate(&good).is_ok());
        assert!(validate(&format!("  {good}\n")).is_ok());
        let e = validate("sk-ant-api03-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").unwrap_err().to_string();
        assert!(e.contains("must start with"), "{e}");
        assert!(!e.contains("api03"));
        assert!(validate(&format!("{PREFIX}short"))
            .unwrap_err()
            .to_string()
            .contains("too short"));
        assert!(validate(&format!("{PREFIX}{}", "a b".repeat(40))).is_err());
    }
}
