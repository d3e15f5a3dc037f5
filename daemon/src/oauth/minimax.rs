//! MiniMax OAuth refresh: form-encoded to `{region}/oauth/token`; the lifetime field of the
//! answer is `expired_in`.

use super::{parse_token_response, RefreshError};
use crate::config::ProfileConfig;
use crate::credentials::Tokens;
use crate::secret::Secret;

/// MiniMax's OAuth client id.
pub const DEFAULT_CLIENT_ID: &str = "78257093-7e40-4613-99e0-527b14b39113";
/// Default region base.
pub const DEFAULT_REGION: &str = "https://api.minimax.io";

/// Endpoint and client of one MiniMax login.
#[derive(Debug, Clone, PartialEq)]
pub struct MinimaxOAuth {
    /// Token endpoint.
    pub token_endpoint: String,
    /// OAuth client id.
    pub client_id: String,
}

impl MinimaxOAuth {
    /// From a profile: `token_endpoint`, else `{region}/oauth/token` (region from the
    /// profile, else the bundle's `region`, else the default).
    pub fn from_profile(p: &ProfileConfig, bundle_region: Option<&str>) -> Self {
        let region = p
            .region
            .as_deref()
            .or(bundle_region)
            .unwrap_or(DEFAULT_REGION);
        MinimaxOAuth {
            token_endpoint: p
                .token_endpoint
                .clone()
                .unwrap_or_else(|| format!("{}/oauth/token", region.trim_end_matches('/'))),
            client_id: p
                .client_id
                .clone()
                .unwrap_or_else(|| DEFAULT_CLIENT_ID.into()),
        }
    }

    /// `grant_type=refresh_token&client_id=…&refresh_token=…`
    pub async fn refresh(
        &self,
        http: &reqwest::Client,
        rt: &Secret,
        scopes: &[String],
    ) -> Result<Tokens, RefreshError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", self.client_id.as_str()),
            ("refresh_token", rt.expose()),
        ];
        let resp = http
            .post(&self.token_endpoint)
            .timeout(super::TOKEN_ENDPOINT_HARD_LIMIT)
            .form(&form)
            .send()
            .await;
        parse_token_response(resp, Some(rt), scopes, "expired_in").await
    }
}
