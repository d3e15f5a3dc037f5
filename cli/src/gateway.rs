//! `llmctl gateway key` and `llmctl env --gateway`: the HTTP gateway's key and the
//! environment that points SDKs and tools at a profile through it. Self-contained so it
//! can move with the rest of llmctl.

use clap::Subcommand;
use llmd_client::proto::methods::{names, GatewayKeyParams, GatewayKeyResult};
use llmd_client::Client;

/// `llmctl gateway …`
#[derive(Subcommand)]
pub enum GatewayCmd {
    /// Print the gateway key (or an agent's own key, counted separately in `status`).
    Key {
        /// Issue the named key of this agent.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
    },
}

async fn key(client: &Client, agent: Option<String>) -> Result<GatewayKeyResult, String> {
    client
        .call(names::GATEWAY_KEY, &GatewayKeyParams { agent })
        .await
        .map_err(|e| e.to_string())
}

/// Runs `llmctl gateway …`.
pub async fn run(client: &Client, cmd: GatewayCmd) -> Result<(), String> {
    match cmd {
        GatewayCmd::Key { agent } => {
            println!("{}", key(client, agent).await?.key);
            Ok(())
        }
    }
}

/// Single-quotes a value for POSIX shells.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

/// The `export` lines for `profile` of `provider` through the gateway at `base`.
pub fn exports(base: &str, profile: &str, provider: &str, key: &str) -> Vec<String> {
    let root = format!("{base}/p/{profile}");
    let mut vars: Vec<(&str, String)> = Vec::new();
    match provider {
        "anthropic" => {
            vars.push(("ANTHROPIC_BASE_URL", root.clone()));
            vars.push(("ANTHROPIC_API_KEY", key.into()));
        }
        "gemini" => {
            vars.push(("GOOGLE_GEMINI_BASE_URL", root.clone()));
            vars.push(("GEMINI_API_KEY", key.into()));
        }
        _ => {}
    }
    // Every profile answers OpenAI's chat completions (translated when needed).
    vars.push(("OPENAI_BASE_URL", format!("{root}/v1")));
    vars.push(("OPENAI_API_BASE", format!("{root}/v1")));
    vars.push(("OPENAI_API_KEY", key.into()));
    vars.into_iter()
        .map(|(k, v)| format!("export {k}={}", quote(&v)))
        .collect()
}

/// Runs `llmctl env --gateway PROFILE`.
pub async fn env(client: &Client, profile: &str, agent: Option<String>) -> Result<(), String> {
    let status = client.status().await.map_err(|e| e.to_string())?;
    let p = status
        .profiles
        .iter()
        .find(|p| p.name == profile)
        .ok_or_else(|| format!("no profile `{profile}`"))?;
    let k = key(client, agent).await?;
    let base = k.base_url.ok_or(
        "the gateway has no TCP listener (`[gateway] listen`); SDKs need an http:// base URL",
    )?;
    for line in exports(&base, profile, &p.provider, &k.key) {
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_per_provider() {
        let e = exports("http://127.0.0.1:8765", "work", "anthropic", "k'1");
        assert_eq!(
            e[0],
            "export ANTHROPIC_BASE_URL='http://127.0.0.1:8765/p/work'"
        );
        assert_eq!(e[1], "export ANTHROPIC_API_KEY='k'\\''1'");
        assert!(e.contains(&"export OPENAI_BASE_URL='http://127.0.0.1:8765/p/work/v1'".to_string()));
        let e = exports("http://h", "ds", "openai-compat", "k");
        assert!(!e.iter().any(|l| l.contains("ANTHROPIC")));
    }
}
