//! `llmctl`: command-line client of llmd.

mod doctor;
mod envvars;
mod fail;
mod gateway;
mod place;
mod ui;
mod usage;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use fail::{code, Fail};
use llmd_client::proto::chat::{
    Block, ChatRequest, Content, Delta, EmbedParams, EmbedResult, Message, Role, ToolDef, ToolList,
    ToolName, ToolRef,
};
use llmd_client::proto::methods::{
    names, CredentialsRemoveResult, Empty, ProfileParams, ProfileState, ProfileStatus,
};
use llmd_client::{ChatEvent, Client};
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other failure
  2  usage error (bad arguments or request)
  3  llmd not reachable (not running, wrong socket)
  4  unknown profile
  5  needs login or has no credential (`status`: a profile needs attention)
  6  the provider or its token endpoint failed";

/// Get tokens, log in, store keys and chat through llmd, the daemon that owns your LLM
/// credentials.
#[derive(Parser)]
#[command(name = "llmctl", version, after_help = EXIT_CODES)]
struct Cli {
    /// Socket path (default: $LLMD_SOCKET, else the config's [daemon] socket, else
    /// $XDG_RUNTIME_DIR/llmd/llmd.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The llmd config file to take `[daemon] socket` from (default: $LLMD_CONFIG, else
    /// ~/.config/llmd/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

fn profile_arg() -> ArgValueCandidates {
    ArgValueCandidates::new(profile_candidates)
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the daemon's profiles, where each credential comes from and its state; exits 5
    /// when a profile needs attention.
    Status,
    /// Print a profile's bare token (for apiKeyHelper or scripts).
    Token {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
        /// The token must stay valid at least this many seconds.
        #[arg(long, value_name = "SECS")]
        min_valid: Option<u64>,
    },
    /// Print the auth headers a request to the profile's provider needs.
    Headers {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
    },
    /// Force a refresh of a login and print the new expiry.
    Refresh {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
    },
    /// Make the daemon re-read its config and credential files.
    Reload,
    /// Log in to an OAuth profile (Anthropic: paste the code shown; MiniMax: approve the
    /// code shown).
    Login {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
        /// Open the login page in the browser without asking.
        #[arg(long, conflicts_with = "no_browser")]
        browser: bool,
        /// Never open a browser.
        #[arg(long)]
        no_browser: bool,
    },
    /// Remove what llmd stored for a profile (stored key, setup-token, OAuth bundle).
    Logout {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Store an API key (or with --setup-token, a setup-token): typed hidden on a terminal,
    /// else read from stdin. It then wins over api_key_file and api_key_env.
    SetKey {
        /// Profile name.
        #[arg(add = profile_arg())]
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
        #[arg(add = profile_arg())]
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
        /// The prompt (read from stdin when absent).
        prompt: Option<String>,
    },
    /// Embed texts (arguments, else one per stdin line) and print one vector per line.
    Embed {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
        /// Embedding model (default: the provider's).
        #[arg(short = 'm', long)]
        model: Option<String>,
        /// Texts.
        texts: Vec<String>,
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
    /// Check the socket, config, every profile's credential source and (--net) provider
    /// reachability.
    Doctor {
        /// Also connect to each provider host.
        #[arg(long)]
        net: bool,
    },
    /// Print `export LLMD_SOCKET=…` for `eval "$(llmctl env)"`; with `--gateway PROFILE`,
    /// the exports that point SDKs and tools at that profile through the HTTP gateway.
    Env {
        /// Profile to reach through the gateway.
        #[arg(long, value_name = "PROFILE", add = profile_arg())]
        gateway: Option<String>,
        /// Use the named gateway key of this agent.
        #[arg(long, value_name = "NAME", requires = "gateway")]
        agent: Option<String>,
    },
    /// The HTTP gateway: its key.
    Gateway {
        #[command(subcommand)]
        cmd: gateway::GatewayCmd,
    },
    /// Run a command with the profile's credential in the provider's usual variables
    /// (ANTHROPIC_API_KEY, OPENAI_API_KEY, GEMINI_API_KEY, …, and base URLs).
    Exec {
        /// Profile name.
        #[arg(add = profile_arg())]
        profile: String,
        /// The token must stay valid at least this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        min_valid: u64,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// What your agents used: requests and tokens by profile, agent, model or day, with a
    /// chart per hour (windows up to 48h) or per day.
    Usage(usage::UsageArgs),
    /// Print shell completions, with profile names completed from the running daemon.
    Completions {
        /// Shell: bash, zsh, fish, elvish or powershell.
        shell: String,
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

/// Profile names of the running daemon, for shell completion; nothing when it is away.
fn profile_candidates() -> Vec<CompletionCandidate> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let (path, _) = place::socket(None, None);
        let ask = async {
            let c = Client::connect_to(path).await.ok()?;
            c.status().await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(Some(s)) => s
                .profiles
                .into_iter()
                .map(|p| {
                    CompletionCandidate::new(p.name)
                        .help(Some(format!("{} {}", p.provider, p.auth).into()))
                })
                .collect(),
            _ => Vec::new(),
        }
    })
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`llmctl completions bash | head -1`), as other Unix
    // tools do, instead of panicking in println!.
    // SAFETY: restoring the default disposition of a signal has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmctl: cannot start: {e}");
            return ExitCode::from(code::FAILURE);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => ExitCode::from(c),
        Err(f) => {
            f.print();
            ExitCode::from(f.code)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Fail> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn connect(socket: &std::path::Path) -> Result<Client, Fail> {
    let client = Client::connect_to(socket).await?;
    // Names llmctl in the daemon's logs and status.
    client.hello("llmctl", env!("CARGO_PKG_VERSION")).await?;
    Ok(client)
}

fn needs_attention(p: &ProfileStatus) -> bool {
    matches!(
        p.state,
        ProfileState::NeedsLogin | ProfileState::Missing | ProfileState::Error
    )
}

async fn run(cli: Cli) -> Result<u8, Fail> {
    let json = cli.json;
    let (socket, origin) = place::socket(cli.socket.clone(), cli.config.clone());
    match cli.cmd {
        Cmd::Completions { shell } => {
            let known = clap_complete::env::Shells::builtins();
            if known.completer(&shell).is_none() {
                return Err(Fail::usage(format!(
                    "unknown shell `{shell}`: use one of {}",
                    known.names().collect::<Vec<_>>().join(", ")
                )));
            }
            // The registration script calls back into llmctl (`COMPLETE=<shell> llmctl`),
            // which completes profile names from the running daemon.
            let exe = std::env::current_exe()
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|| "llmctl".into());
            let args: Vec<OsString> = vec!["llmctl".into()];
            std::env::set_var("COMPLETE", &shell);
            clap_complete::CompleteEnv::with_factory(Cli::command)
                .completer(exe)
                .try_complete(args, None)
                .map_err(|e| Fail::other(e.to_string()))?;
            return Ok(code::OK);
        }
        Cmd::Env { gateway: None, .. } => {
            let path = socket.to_string_lossy().into_owned();
            if json {
                print_json(&serde_json::json!({ "LLMD_SOCKET": path }))?;
            } else {
                println!("export LLMD_SOCKET={}", shell_quote(&path));
            }
            return Ok(code::OK);
        }
        Cmd::Doctor { net } => {
            let checks = doctor::run(&socket, origin, cli.config.clone(), net).await;
            let failed = checks.iter().any(|c| c.level == doctor::Level::Fail);
            if json {
                print_json(&checks)?;
            } else {
                let colour = ui::stdout_colour();
                let w = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
                for c in &checks {
                    let (mark, sgr) = match c.level {
                        doctor::Level::Ok => ("ok  ", "32"),
                        doctor::Level::Warn => ("warn", "33"),
                        doctor::Level::Fail => ("FAIL", "31"),
                    };
                    println!(
                        "{}  {:<w$}  {}",
                        ui::paint(colour, sgr, mark),
                        c.check,
                        c.detail
                    );
                }
            }
            return Ok(if failed { code::FAILURE } else { code::OK });
        }
        _ => {}
    }
    let client = connect(&socket).await?;
    match cli.cmd {
        Cmd::Status => {
            let s = client.status().await?;
            let attention = s.profiles.iter().any(needs_attention);
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "llmd {} (protocol {}), up {}, {} connection(s)",
                    s.version,
                    s.protocol,
                    human(s.uptime_secs as i64),
                    s.connections
                );
                print!("{}", status_table(&s.profiles, now(), ui::stdout_colour()));
                for p in &s.profiles {
                    if let Some(q) = p
                        .quota
                        .as_ref()
                        .map(|q| quota_text(q, now()))
                        .filter(|t| !t.is_empty())
                    {
                        println!("quota {}: {q}", p.name);
                    }
                }
                for pool in &s.pools {
                    println!("{}", pool_text(pool));
                }
                if let Some(g) = &s.gateway {
                    for place in g.listen.iter().chain(g.unix.iter()) {
                        println!("gateway: {place} (profile P under /p/P)");
                    }
                }
                if s.profiles
                    .iter()
                    .any(|p| p.source.as_ref().is_some_and(|x| !x.shadowed.is_empty()))
                {
                    println!(
                        "A stored key (llmctl set-key) wins over api_key_file, which wins over api_key_env; \
                         `llmctl logout PROFILE` removes the stored one."
                    );
                }
            }
            return Ok(if attention {
                code::NEEDS_LOGIN
            } else {
                code::OK
            });
        }
        Cmd::Token { profile, min_valid } => {
            let t = client.token(&profile, min_valid).await?;
            if json {
                print_json(&t)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", t.token)?;
            }
        }
        Cmd::Headers { profile } => {
            let t = client.token(&profile, None).await?;
            if json {
                println!("{}", serde_json::to_string(&t.headers)?);
            } else {
                for (k, v) in &t.headers {
                    println!("{k}: {v}");
                }
            }
        }
        Cmd::Refresh { profile } => {
            let t = client.refresh(&profile).await?;
            if json {
                print_json(&serde_json::json!({"profile": profile, "expires_at": t.expires_at}))?;
            } else {
                println!("{}: refreshed, {}", profile, expiry(t.expires_at, now()));
            }
        }
        Cmd::Reload => {
            let r = client.reload().await?;
            if json {
                print_json(&r)?;
            } else {
                println!("reloaded: {}", r.profiles.join(", "));
            }
        }
        Cmd::Login {
            profile,
            browser,
            no_browser,
        } => {
            let choice = match (browser, no_browser) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let start = client.login_start(&profile).await?;
            let done = if let Some(user_code) = &start.user_code {
                eprintln!(
                    "Open this URL in a browser, log in to MiniMax and approve the code {user_code}:\n\n{}\n",
                    start.url
                );
                ui::offer_browser(&start.url, choice);
                eprintln!("Waiting for the approval…");
                client.login_finish(&profile, user_code).await?
            } else {
                eprintln!(
                    "Open this URL in a browser, log in, and paste the code it shows:\n\n{}\n",
                    start.url
                );
                ui::offer_browser(&start.url, choice);
                eprint!("Code: ");
                let _ = std::io::stderr().flush();
                let mut code = String::new();
                std::io::stdin()
                    .read_line(&mut code)
                    .map_err(|e| Fail::other(format!("cannot read the code: {e}")))?;
                client.login_finish(&profile, code.trim()).await?
            };
            if json {
                print_json(
                    &serde_json::json!({"profile": profile, "expires_at": done.expires_at}),
                )?;
            } else {
                println!("{profile}: logged in, {}", expiry(done.expires_at, now()));
            }
        }
        Cmd::Logout { profile, yes } => {
            let s = client.status().await?;
            let Some(p) = s.profiles.iter().find(|p| p.name == profile) else {
                return Err(Fail::new(
                    code::UNKNOWN_PROFILE,
                    format!("no profile `{profile}`"),
                ));
            };
            if !yes {
                if !ui::interactive() {
                    return Err(Fail::usage(format!(
                        "`llmctl logout {profile}` removes what llmd stored for it; pass --yes to confirm without a terminal"
                    )));
                }
                let what = if p.auth == "oauth" {
                    "stored key and OAuth login"
                } else {
                    "stored key or setup-token"
                };
                if !ui::confirm(
                    &format!("Remove the {what} llmd keeps for `{profile}`?"),
                    false,
                ) {
                    return Err(Fail::other("nothing removed"));
                }
            }
            let r: CredentialsRemoveResult = client
                .call(
                    names::CREDENTIALS_REMOVE,
                    &ProfileParams {
                        profile: profile.clone(),
                    },
                )
                .await?;
            if json {
                print_json(&r)?;
            } else if r.removed.is_empty() {
                println!("{profile}: llmd had stored nothing");
            } else {
                for f in &r.removed {
                    println!("{profile}: removed {f}");
                }
            }
            if p.auth == "claude-cli" && !json {
                eprintln!("note: llmd never removes Claude Code's own login; log out in Claude Code for that");
            }
        }
        Cmd::SetKey {
            profile,
            setup_token,
        } => {
            let what = if setup_token {
                "setup-token"
            } else {
                "API key"
            };
            let secret = if std::io::stdin().is_terminal() {
                ui::read_hidden(&format!(
                    "Paste the {what} (input hidden) and press Enter: "
                ))
                .map_err(|e| Fail::other(format!("cannot read the {what}: {e}")))?
            } else {
                read_stdin(SECRET_LIMIT, "a key")?
            };
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(Fail::usage(
                    "nothing on stdin: pipe the secret in, e.g. `llmctl set-key NAME < keyfile`",
                ));
            }
            if setup_token {
                client.set_setup_token(&profile, secret).await?;
            } else {
                client.set_api_key(&profile, secret).await?;
            }
            let shadowed = client
                .status()
                .await
                .ok()
                .and_then(|s| s.profiles.into_iter().find(|p| p.name == profile))
                .and_then(|p| p.source)
                .map(|s| s.shadowed)
                .unwrap_or_default();
            if json {
                print_json(
                    &serde_json::json!({"profile": profile, "stored": true, "overrides": shadowed}),
                )?;
            } else {
                println!("{profile}: stored");
                if !shadowed.is_empty() {
                    eprintln!(
                        "note: the stored {what} now wins over {}; `llmctl logout {profile}` removes it",
                        shadowed.join(", ")
                    );
                }
            }
        }
        Cmd::Events => {
            let mut rx = client.subscribe(&[]).await?;
            while let Some(e) = rx.recv().await {
                println!("{}", serde_json::to_string(&e)?);
            }
            return Err(Fail::new(code::NOT_RUNNING, "llmd closed the connection"));
        }
        Cmd::Ping { count } => {
            let count = count.max(1);
            let mut times = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let t = Instant::now();
                client.hello("llmctl", env!("CARGO_PKG_VERSION")).await?;
                times.push(t.elapsed());
            }
            times.sort();
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
            if json {
                print_json(&serde_json::json!({
                    "count": count,
                    "min_us": times[0].as_micros() as u64,
                    "median_us": pct(0.5).as_micros() as u64,
                    "p99_us": pct(0.99).as_micros() as u64,
                }))?;
            } else {
                println!(
                    "{} round trips: min {} median {} p99 {}",
                    count,
                    micros(times[0]),
                    micros(pct(0.5)),
                    micros(pct(0.99))
                );
            }
        }
        Cmd::Chat {
            profile,
            model,
            system,
            tools,
            max_tokens,
            prompt,
        } => {
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    let mut text = String::new();
                    std::io::stdin().read_to_string(&mut text).map_err(|e| {
                        Fail::other(format!("cannot read the prompt from stdin: {e}"))
                    })?;
                    text
                }
            };
            if prompt.trim().is_empty() {
                return Err(Fail::usage(
                    "empty prompt: pass it as an argument or on stdin",
                ));
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
                let resp = client.chat(&profile, request).await?;
                print_json(&resp)?;
                return Ok(code::OK);
            }
            stream_chat(&client, &profile, request).await?;
        }
        Cmd::Embed {
            profile,
            model,
            texts,
        } => {
            let input = if texts.is_empty() {
                let text = read_stdin(EMBED_INPUT_LIMIT, "embedding input")?;
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect()
            } else {
                texts
            };
            if input.is_empty() {
                return Err(Fail::usage(
                    "nothing to embed: pass texts as arguments or one per stdin line",
                ));
            }
            let r: EmbedResult = client
                .call(
                    names::EMBED,
                    &EmbedParams {
                        profile,
                        model,
                        input,
                    },
                )
                .await?;
            if json {
                print_json(&r)?;
            } else {
                for v in &r.embeddings {
                    println!("{}", serde_json::to_string(v)?);
                }
            }
        }
        Cmd::Exec {
            profile,
            min_valid,
            command,
        } => {
            let s = client.status().await?;
            let Some(p) = s.profiles.into_iter().find(|p| p.name == profile) else {
                return Err(Fail::new(
                    code::UNKNOWN_PROFILE,
                    format!("no profile `{profile}`"),
                ));
            };
            let t = client.token(&profile, Some(min_valid)).await?;
            let vars = envvars::for_profile(&p, &t);
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new(&command[0]);
            cmd.args(&command[1..]).env("LLMD_SOCKET", &socket);
            for (k, v) in vars {
                cmd.env(k, v);
            }
            // exec only returns on failure.
            let e = cmd.exec();
            return Err(Fail::new(
                127,
                format!("cannot run {}: {e}", command[0].to_string_lossy()),
            ));
        }
        Cmd::Tools { cmd } => match cmd {
            ToolsCmd::Add { file } => {
                let def = read_tool(&file)?;
                let name = def.name.clone();
                client.call::<_, Empty>(names::TOOLS_REGISTER, &def).await?;
                if json {
                    print_json(&serde_json::json!({"registered": name}))?;
                } else {
                    println!("registered {name}");
                }
            }
            ToolsCmd::List => {
                let list: ToolList = client.call(names::TOOLS_LIST, &Empty {}).await?;
                if json {
                    print_json(&list)?;
                } else {
                    for t in list.tools {
                        println!("{}\t{}", t.name, t.description);
                    }
                }
            }
            ToolsCmd::Rm { name } => {
                client
                    .call::<_, Empty>(names::TOOLS_REMOVE, &ToolName { name: name.clone() })
                    .await?;
                if json {
                    print_json(&serde_json::json!({"removed": name}))?;
                } else {
                    println!("removed {name}");
                }
            }
        },
        Cmd::Completions { .. } | Cmd::Env { gateway: None, .. } | Cmd::Doctor { .. } => {}
        Cmd::Gateway { cmd } => {
            gateway::run(&client, cmd).await.map_err(Fail::other)?;
        }
        Cmd::Usage(args) => usage::run(&client, args, json).await?,
        Cmd::Env {
            gateway: Some(profile),
            agent,
        } => {
            gateway::env(&client, &profile, agent)
                .await
                .map_err(Fail::other)?;
        }
    }
    Ok(code::OK)
}

/// Most bytes `set-key` reads from stdin: far above any key, far below a mistake.
const SECRET_LIMIT: u64 = 64 * 1024;
/// Most bytes `embed` reads from stdin.
const EMBED_INPUT_LIMIT: u64 = 16 * 1024 * 1024;

/// All of stdin, refusing more than `limit` bytes instead of cutting it silently.
fn read_stdin(limit: u64, what: &str) -> Result<String, Fail> {
    let mut s = String::new();
    std::io::stdin()
        .take(limit + 1)
        .read_to_string(&mut s)
        .map_err(|e| Fail::other(format!("cannot read stdin: {e}")))?;
    if s.len() as u64 > limit {
        return Err(Fail::usage(format!(
            "more than {} KiB on stdin: too much for {what}",
            limit / 1024
        )));
    }
    Ok(s)
}

/// `'…'` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn read_tool(file: &std::path::Path) -> Result<ToolDef, Fail> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Fail::usage(format!("cannot read {}: {e}", file.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        Fail::usage(format!(
            "{} is not a tool definition ({{name, description, input_schema}}): {e}",
            file.display()
        ))
    })
}

/// Prints text as it arrives, tool calls as `[tool_use NAME {json}]`, reasoning on stderr.
async fn stream_chat(client: &Client, profile: &str, request: ChatRequest) -> Result<(), Fail> {
    let mut stream = client.chat_stream(profile, request).await?;
    let mut out = std::io::stdout();
    let mut in_tool = std::collections::BTreeSet::new();
    while let Some(event) = stream.next_event().await {
        match event? {
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
            match &p.last_error {
                // A file that exists but cannot be used is not "not logged in": say why.
                Some(e) if p.source.as_ref().is_some_and(|s| s.present) => {
                    format!("unusable login: {e}")
                }
                _ => format!("not logged in: run llmctl login {}", p.name),
            }
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

/// `5h 42%, resets in 1h10m; 7d 18%, resets in 3d2h`: every quota window reported.
fn quota_text(q: &llmd_client::proto::methods::Quota, now: i64) -> String {
    let mut parts: Vec<String> = q
        .windows
        .iter()
        .map(|w| {
            let pct = (w.utilization * 100.0).round() as i64;
            match w.resets_at {
                Some(r) if r > now => format!("{} {pct}%, resets in {}", w.name, human(r - now)),
                Some(_) => format!("{} reset", w.name),
                None => format!("{} {pct}%", w.name),
            }
        })
        .collect();
    if let Some(st) = q.status.as_deref().filter(|s| *s != "allowed") {
        parts.push(format!("status {st}"));
    }
    parts.join("; ")
}

/// `pool team (fill-first): work ok, 3 served; personal paused, 0 served`.
fn pool_text(p: &llmd_client::proto::methods::PoolStatus) -> String {
    let members: Vec<String> = p
        .members
        .iter()
        .map(|m| {
            format!(
                "{} {}, {} served",
                m.name,
                m.skipped.as_deref().unwrap_or("ok"),
                m.served
            )
        })
        .collect();
    let sticky = p
        .sticky_secs
        .map_or(String::new(), |s| format!(", sticky {s}s"));
    format!(
        "pool {} ({}{sticky}): {}",
        p.name,
        p.strategy,
        members.join("; ")
    )
}

/// `env ANTHROPIC_API_KEY`, `stored`, `file PATH`, `bundle PATH`, `Claude Code PATH`,
/// followed by the cluster part of a shared login.
fn source_text(p: &ProfileStatus) -> String {
    let base = local_source_text(p);
    match &p.cluster {
        None => base,
        Some(c) => format!("{base} [{}]", cluster_text(c)),
    }
}

/// `cluster owner, lease 1.8s, rev 42`, `cluster follower of host-b, rev 42`, or
/// `cluster disconnected: why`.
fn cluster_text(c: &llmd_client::proto::methods::ClusterStatus) -> String {
    let mut t = match (c.role.as_str(), &c.owner) {
        ("owner", _) => "cluster owner".to_owned(),
        ("follower", Some(o)) => format!("cluster follower of {o}"),
        (role, _) => format!("cluster {role}"),
    };
    if let Some(ms) = c.lease_remaining_ms {
        t.push_str(&format!(", lease {:.1}s", ms as f64 / 1000.0));
    }
    t.push_str(&format!(", rev {}", c.revision));
    if let Some(e) = &c.error {
        t.push_str(&format!(": {e}"));
    }
    t
}

fn local_source_text(p: &ProfileStatus) -> String {
    if let Some(u) = &p.upstream {
        return format!("upstream {} ({}, {})", u.socket, u.profile, u.connection);
    }
    let Some(s) = &p.source else {
        return "-".into();
    };
    let base = match s.kind.as_str() {
        "stored" => "stored (llmctl set-key)".to_owned(),
        "env" => format!("env {}", s.location),
        "claude-cli" => format!("Claude Code {}", s.location),
        k => format!("{k} {}", s.location),
    };
    if s.shadowed.is_empty() {
        base
    } else {
        format!("{base}, overrides {}", s.shadowed.join(", "))
    }
}

fn status_table(profiles: &[ProfileStatus], now: i64, colour: bool) -> String {
    if profiles.is_empty() {
        return "no profiles configured: set ANTHROPIC_API_KEY (or another provider key) or write ~/.config/llmd/config.toml\n".into();
    }
    let rows: Vec<[String; 5]> = profiles
        .iter()
        .map(|p| {
            let sgr = match p.state {
                ProfileState::Ok => "32",
                ProfileState::Refreshing => "33",
                _ => "31",
            };
            [
                p.name.clone(),
                p.provider.clone(),
                p.auth.clone(),
                source_text(p),
                ui::paint(colour, sgr, &(state_text(p, now) + &traffic_text(p))),
            ]
        })
        .collect();
    let head = ["PROFILE", "PROVIDER", "AUTH", "SOURCE", "STATE"];
    let w: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: [&str; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        )
    };
    let mut out = line(head);
    for r in &rows {
        out += &line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
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
            source: None,
            base_url: None,
            default_model: None,
            upstream: None,
            quota: None,
            cluster: None,
        }
    }

    #[test]
    fn quota_reads_as_shares_and_resets() {
        use llmd_client::proto::methods::{Quota, QuotaWindow};
        let q = Quota {
            status: Some("allowed".into()),
            windows: vec![
                QuotaWindow {
                    name: "5h".into(),
                    utilization: 0.42,
                    resets_at: Some(1000 + 4200),
                    ..QuotaWindow::default()
                },
                QuotaWindow {
                    name: "7d".into(),
                    utilization: 0.18,
                    ..QuotaWindow::default()
                },
            ],
            updated_at: 1000,
        };
        assert_eq!(quota_text(&q, 1000), "5h 42%, resets in 1h10m; 7d 18%");
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
            false,
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
        let t = status_table(&[p], 0, false);
        assert!(t.contains("ok; 3 queued, 2 in flight, paused 5s"), "{t}");
    }
}
