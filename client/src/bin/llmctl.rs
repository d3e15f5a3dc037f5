//! `llmctl`: command-line client of llmd.

use clap::{CommandFactory, Parser, Subcommand};
use llmd_client::proto::chat::{
    Block, ChatRequest, Content, Delta, Message, Role, ToolDef, ToolList, ToolName, ToolRef,
};
use llmd_client::proto::methods::{names, Empty, ProfileState, ProfileStatus};
use llmd_client::{ChatEvent, Client, Error};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Command-line client of the llmd credential daemon.
#[derive(Parser)]
#[command(name = "llmctl", version, about)]
struct Cli {
    /// Socket path (default: $LLMD_SOCKET, else $XDG_RUNTIME_DIR/llmd/llmd.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the daemon's profiles and their state.
    Status {
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Print a profile's bare token (for apiKeyHelper or scripts).
    Token {
        /// Profile name.
        profile: String,
        /// The token must stay valid at least this many seconds.
        #[arg(long, value_name = "SECS")]
        min_valid: Option<u64>,
    },
    /// Print the auth headers a request to the profile's provider needs.
    Headers {
        /// Profile name.
        profile: String,
        /// Print JSON instead of `name: value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Force a refresh of a login and print the new expiry.
    Refresh {
        /// Profile name.
        profile: String,
    },
    /// Make the daemon re-read its config and credential files.
    Reload,
    /// Log in to an OAuth profile: open the URL, paste the code shown.
    Login {
        /// Profile name.
        profile: String,
    },
    /// Store an API key (or with --setup-token, a setup-token) read from stdin.
    SetKey {
        /// Profile name.
        profile: String,
        /// The secret is an Anthropic setup-token (`claude setup-token`).
        #[arg(long)]
        setup_token: bool,
    },
    /// Follow token and state events until interrupted.
    Events,
    /// Send a chat request and stream the reply.
    Chat {
        /// Profile name.
        profile: String,
        /// Model (default: the profile's default_model).
        #[arg(short = 'm', long)]
        model: Option<String>,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// A tool definition file ({name, description, input_schema}); repeatable.
        #[arg(long = "tool", value_name = "FILE.json")]
        tools: Vec<PathBuf>,
        /// Output token limit.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Print the whole response as JSON instead of streaming text.
        #[arg(long)]
        json: bool,
        /// The prompt (read from stdin when absent).
        prompt: Option<String>,
    },
    /// Manage the daemon's tool registry.
    Tools {
        #[command(subcommand)]
        cmd: ToolsCmd,
    },
    /// Measure round trips to the daemon.
    Ping {
        /// Number of round trips.
        #[arg(short = 'n', default_value_t = 10)]
        count: u32,
    },
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ToolsCmd {
    /// Register a tool from a JSON file ({name, description, input_schema}).
    Add {
        /// Definition file.
        file: PathBuf,
    },
    /// List registered tools.
    List,
    /// Remove a tool.
    Rm {
        /// Tool name.
        name: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("llmctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(socket: Option<PathBuf>) -> Result<Client, String> {
    let path = llmd_client::proto::paths::resolve_socket_path(socket, None);
    Client::connect_to(path).await.map_err(|e| e.to_string())
}

fn describe(e: Error) -> String {
    e.to_string()
}

async fn run(cli: Cli) -> Result<(), String> {
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(shell, &mut Cli::command(), "llmctl", &mut std::io::stdout());
        return Ok(());
    }
    let client = connect(cli.socket).await?;
    match cli.cmd {
        Cmd::Status { json } => {
            let s = client.status().await.map_err(describe)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "llmd {} (protocol {}), up {}, {} connection(s)",
                    s.version,
                    s.protocol,
                    human(s.uptime_secs as i64),
                    s.connections
                );
                print!("{}", status_table(&s.profiles, now()));
            }
        }
        Cmd::Token { profile, min_valid } => {
            let t = client.token(&profile, min_valid).await.map_err(describe)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", t.token).map_err(|e| e.to_string())?;
        }
        Cmd::Headers { profile, json } => {
            let t = client.token(&profile, None).await.map_err(describe)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&t.headers).map_err(|e| e.to_string())?
                );
            } else {
                for (k, v) in &t.headers {
                    println!("{k}: {v}");
                }
            }
        }
        Cmd::Refresh { profile } => {
            let t = client.refresh(&profile).await.map_err(describe)?;
            println!("{}: refreshed, {}", profile, expiry(t.expires_at, now()));
        }
        Cmd::Reload => {
            let r = client.reload().await.map_err(describe)?;
            println!("reloaded: {}", r.profiles.join(", "));
        }
        Cmd::Login { profile } => {
            let start = client.login_start(&profile).await.map_err(describe)?;
            eprintln!(
                "Open this URL in a browser, log in, and paste the code it shows:\n\n{}\n",
                start.url
            );
            eprint!("Code: ");
            let _ = std::io::stderr().flush();
            let mut code = String::new();
            std::io::stdin()
                .read_line(&mut code)
                .map_err(|e| format!("cannot read the code: {e}"))?;
            let done = client
                .login_finish(&profile, code.trim())
                .await
                .map_err(describe)?;
            println!("{profile}: logged in, {}", expiry(done.expires_at, now()));
        }
        Cmd::SetKey {
            profile,
            setup_token,
        } => {
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "Paste the {} and press Enter, then Ctrl-D:",
                    if setup_token {
                        "setup-token"
                    } else {
                        "API key"
                    }
                );
            }
            let mut secret = String::new();
            std::io::stdin()
                .read_to_string(&mut secret)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(
                    "nothing on stdin: pipe the secret in, e.g. `llmctl set-key NAME < keyfile`"
                        .into(),
                );
            }
            if setup_token {
                client
                    .set_setup_token(&profile, secret)
                    .await
                    .map_err(describe)?;
            } else {
                client
                    .set_api_key(&profile, secret)
                    .await
                    .map_err(describe)?;
            }
            println!("{profile}: stored");
        }
        Cmd::Events => {
            let mut rx = client.subscribe(&[]).await.map_err(describe)?;
            while let Some(e) = rx.recv().await {
                println!("{}", serde_json::to_string(&e).map_err(|e| e.to_string())?);
            }
            return Err("llmd closed the connection".into());
        }
        Cmd::Ping { count } => {
            let count = count.max(1);
            let mut times = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let t = Instant::now();
                client
                    .hello("llmctl", env!("CARGO_PKG_VERSION"))
                    .await
                    .map_err(describe)?;
                times.push(t.elapsed());
            }
            times.sort();
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
            println!(
                "{} round trips: min {} median {} p99 {}",
                count,
                micros(times[0]),
                micros(pct(0.5)),
                micros(pct(0.99))
            );
        }
        Cmd::Chat {
            profile,
            model,
            system,
            tools,
            max_tokens,
            json,
            prompt,
        } => {
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .map_err(|e| format!("cannot read the prompt from stdin: {e}"))?;
                    text
                }
            };
            if prompt.trim().is_empty() {
                return Err("empty prompt: pass it as an argument or on stdin".into());
            }
            let mut defs = Vec::new();
            for file in &tools {
                defs.push(ToolRef::Inline(read_tool(file)?));
            }
            let request = ChatRequest {
                model,
                system: system.map(Content::Text),
                max_tokens,
                messages: vec![Message {
                    role: Role::User,
                    content: Content::Text(prompt),
                }],
                tools: defs,
                ..Default::default()
            };
            if json {
                let resp = client.chat(&profile, request).await.map_err(describe)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resp).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            stream_chat(&client, &profile, request).await?;
        }
        Cmd::Tools { cmd } => match cmd {
            ToolsCmd::Add { file } => {
                let def = read_tool(&file)?;
                let name = def.name.clone();
                client
                    .call::<_, Empty>(names::TOOLS_REGISTER, &def)
                    .await
                    .map_err(describe)?;
                println!("registered {name}");
            }
            ToolsCmd::List => {
                let list: ToolList = client
                    .call(names::TOOLS_LIST, &Empty {})
                    .await
                    .map_err(describe)?;
                for t in list.tools {
                    println!("{}\t{}", t.name, t.description);
                }
            }
            ToolsCmd::Rm { name } => {
                client
                    .call::<_, Empty>(names::TOOLS_REMOVE, &ToolName { name: name.clone() })
                    .await
                    .map_err(describe)?;
                println!("removed {name}");
            }
        },
        Cmd::Completions { .. } => {}
    }
    Ok(())
}

fn read_tool(file: &std::path::Path) -> Result<ToolDef, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a tool definition ({{name, description, input_schema}}): {e}",
            file.display()
        )
    })
}

/// Prints text as it arrives, tool calls as `[tool_use NAME {json}]`, reasoning on stderr.
async fn stream_chat(client: &Client, profile: &str, request: ChatRequest) -> Result<(), String> {
    let mut stream = client
        .chat_stream(profile, request)
        .await
        .map_err(describe)?;
    let mut out = std::io::stdout();
    let mut in_tool = std::collections::BTreeSet::new();
    while let Some(event) = stream.next_event().await {
        match event.map_err(describe)? {
            ChatEvent::Delta(Delta::Text { text }) => {
                let _ = write!(out, "{text}");
                let _ = out.flush();
            }
            ChatEvent::Delta(Delta::Thinking { text }) => eprint!("{text}"),
            ChatEvent::Delta(Delta::ToolUseStart { index, name, .. }) => {
                in_tool.insert(index);
                let _ = write!(out, "\n[tool_use {name} ");
                let _ = out.flush();
            }
            ChatEvent::Delta(Delta::ToolInput { partial_json, .. }) => {
                let _ = write!(out, "{partial_json}");
                let _ = out.flush();
            }
            ChatEvent::Delta(Delta::BlockStop { index }) => {
                if in_tool.remove(&index) {
                    let _ = write!(out, "]");
                }
            }
            ChatEvent::Delta(Delta::Usage(_) | Delta::Unknown) => {}
            ChatEvent::Done(resp) => {
                let _ = writeln!(out);
                for block in &resp.content {
                    if let Block::ToolUse {
                        name,
                        validation_errors: Some(errs),
                        ..
                    } = block
                    {
                        for e in errs {
                            eprintln!("llmctl: tool call `{name}` does not match its schema: {e}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn micros(d: Duration) -> String {
    format!("{}µs", d.as_micros())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `4h12m`, `3m05s`, `2d3h`.
fn human(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn expiry(expires_at: Option<i64>, now: i64) -> String {
    match expires_at {
        None => "does not expire".into(),
        Some(e) if e <= now => format!("expired {} ago", human(now - e)),
        Some(e) => format!("expires in {}", human(e - now)),
    }
}

fn state_text(p: &ProfileStatus, now: i64) -> String {
    match p.state {
        ProfileState::NeedsLogin => format!("needs login: run llmctl login {}", p.name),
        ProfileState::Missing if p.auth == "oauth" || p.auth == "claude-cli" => {
            format!("not logged in: run llmctl login {}", p.name)
        }
        ProfileState::Missing => match &p.last_error {
            Some(e) => format!("missing: {e}"),
            None => "missing".into(),
        },
        ProfileState::Error => format!("error: {}", p.last_error.as_deref().unwrap_or("unknown")),
        ProfileState::Refreshing => "refreshing".into(),
        ProfileState::Unknown => "unknown state (a newer llmd?)".into(),
        ProfileState::Ok => match p.expires_at {
            None => "ok".into(),
            Some(_) => expiry(p.expires_at, now),
        },
    }
}

/// `; 3 queued, 2 in flight, paused 4s` when the profile has chat traffic to report.
fn traffic_text(p: &ProfileStatus) -> String {
    let Some(l) = &p.limits else {
        return String::new();
    };
    let mut parts = Vec::new();
    if l.queued > 0 {
        parts.push(format!("{} queued", l.queued));
    }
    if l.in_flight > 0 {
        parts.push(format!("{} in flight", l.in_flight));
    }
    if let Some(ms) = l.paused_for_ms.filter(|ms| *ms > 0) {
        parts.push(format!("paused {}", human((ms as i64 + 999) / 1000)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; {}", parts.join(", "))
    }
}

fn status_table(profiles: &[ProfileStatus], now: i64) -> String {
    if profiles.is_empty() {
        return "no profiles configured: set ANTHROPIC_API_KEY (or another provider key) or write ~/.config/llmd/config.toml\n".into();
    }
    let rows: Vec<[String; 4]> = profiles
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.provider.clone(),
                p.auth.clone(),
                state_text(p, now) + &traffic_text(p),
            ]
        })
        .collect();
    let head = ["PROFILE", "PROVIDER", "AUTH", "STATE"];
    let w: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!(
        "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
        head[0],
        head[1],
        head[2],
        head[3],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2]
    );
    for r in rows {
        out += &format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, state: ProfileState, exp: Option<i64>) -> ProfileStatus {
        ProfileStatus {
            name: name.into(),
            provider: "anthropic".into(),
            auth: "oauth".into(),
            state,
            expires_at: exp,
            last_refresh_at: None,
            refresh_count: 0,
            last_error: None,
            limits: None,
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(4 * 3600 + 12 * 60 + 5), "4h12m");
        assert_eq!(human(185), "3m05s");
        assert_eq!(human(2 * 86_400 + 3 * 3600), "2d3h");
        assert_eq!(human(-5), "0s");
    }

    #[test]
    fn table_shows_expiry_and_login_hint() {
        let t = status_table(
            &[
                st("work", ProfileState::Ok, Some(1000 + 4 * 3600 + 12 * 60)),
                st("claude", ProfileState::NeedsLogin, None),
            ],
            1000,
        );
        assert!(t.contains("expires in 4h12m"), "{t}");
        assert!(t.contains("needs login: run llmctl login claude"), "{t}");
        assert!(t.starts_with("PROFILE"));
    }

    #[test]
    fn table_shows_queue_and_pause() {
        let mut p = st("oa", ProfileState::Ok, None);
        p.limits = Some(llmd_client::proto::methods::Limits {
            queued: 3,
            in_flight: 2,
            paused_for_ms: Some(4500),
            ..Default::default()
        });
        let t = status_table(&[p], 0);
        assert!(t.contains("ok; 3 queued, 2 in flight, paused 5s"), "{t}");
    }
}
