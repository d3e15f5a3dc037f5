//! Placeholder until the openai client lands.

use super::{Call, ProviderError};
use llmd_proto::chat::ChatResponse;

/// One call.
pub async fn chat(_call: &Call<'_>) -> Result<ChatResponse, ProviderError> {
    Err(ProviderError::Protocol("provider not implemented yet".into()))
}
