//! The `llmd` binary: parse flags, load config, bind (or take systemd's socket), serve, stop
//! cleanly on signals.

use clap::Parser;
use llmd::config;
use llmd::server::{self, listener};
use llmd::state::Daemon;
use llmd::systemd::{self, Manager};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Per-user daemon that owns LLM credentials and serves them over a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "llmd", version, about)]
struct Args {
    /// Socket path (default: $LLMD_SOCKET, [daemon] socket, $XDG_RUNTIME_DIR/llmd/llmd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (default: $LLMD_CONFIG, $XDG_CONFIG_HOME/llmd/config.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    llmd::logging::init();
    // Before the runtime starts any thread: this edits the environment.
    let manager = Manager::from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("llmd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Login tasks get a thread of their own (see `refresh::run_logins_on`). It lives as
    // long as the process; a login task still running at exit ends with it, as it would
    // with the main runtime.
    match start_login_runtime() {
        Ok(handle) => llmd::refresh::run_logins_on(handle),
        Err(e) => {
            eprintln!("llmd: cannot start the login thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = runtime.block_on(run(args, manager));
    // Requests cut at the end of the grace period still have tasks; they are dropped here,
    // and nothing may hold the exit for long.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A one-thread runtime for the login tasks, parked on its thread until the process ends.
fn start_login_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("llmd-logins")
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("llmd-logins".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// `--check-config`: the file parses, and every profile has a credential this environment
/// can see (a profile without one would only fail later, on its first request).
fn check_config(cfg: &config::Config, source: &config::ConfigSource) -> Result<(), String> {
    let state_dir = config::state_dir(&cfg.daemon);
    let mut missing = 0;
    for (name, p) in &cfg.profiles {
        let s = llmd::profile::credential_source(name, p, &state_dir);
        let what = format!("{} {}", s.kind, s.location);
        if s.present {
            println!("  {name}: {} from {what}", p.auth);
        } else {
            missing += 1;
            let why = match s.kind.as_str() {
                "env" => format!("{what} is not set"),
                "bundle" | "claude-cli" => {
                    format!("{what} does not exist yet: run `llmctl login {name}`")
                }
                _ => format!("{what} is missing, empty or unreadable"),
            };
            println!("  {name}: MISSING {} ({why})", p.auth);
        }
    }
    for (name, p) in &cfg.pools {
        println!(
            "  {name}: pool of {} ({})",
            p.pool.join(", "),
            p.strategy.as_str()
        );
    }
    if missing > 0 {
        return Err(format!(
            "{source}: parses, but {missing} of {} profiles have no credential in this environment",
            cfg.profiles.len()
        ));
    }
    println!("{source}: ok ({} profiles)", cfg.profiles.len());
    Ok(())
}

async fn run(args: Args, manager: Manager) -> Result<(), String> {
    let (config_path, explicit) = config::config_path(args.config);
    let (cfg, source) = config::load(&config_path, explicit).map_err(|e| e.0)?;
    if args.check_config {
        return check_config(&cfg, &source);
    }
    let socket = llmd_proto::paths::resolve_socket_path(args.socket, cfg.daemon.socket.clone());
    let grace = Duration::from_secs(cfg.daemon.shutdown_grace_secs);
    let signals = systemd::Signals::catch()?;
    let (listener, shown, probe_address) = match listener::from_systemd()? {
        Some((l, addr)) => {
            let shown = listener::describe(&addr);
            tracing::info!(socket = %shown, "using the socket passed by systemd");
            (l, shown, Some(addr))
        }
        None => {
            let l = listener::bind(&socket)?;
            let addr = std::os::unix::net::SocketAddr::from_pathname(&socket).ok();
            (l, socket.display().to_string(), addr)
        }
    };
    let gateway_cfg = cfg.gateway.clone();
    let daemon = Daemon::new(cfg, source.clone(), config_path, explicit)?;
    if let Some(g) = &gateway_cfg {
        let gw = llmd::gateway::start(daemon.clone(), g).await?;
        let _ = daemon.gateway.set(gw);
    }
    let profiles: Vec<String> = daemon.registry().profiles.keys().cloned().collect();
    tracing::info!(socket = %shown, config = %source, ?profiles, "llmd {} serving", env!("CARGO_PKG_VERSION"));

    systemd::handle_signals(
        signals,
        daemon.clone(),
        manager.notifier.clone(),
        shown.clone(),
        grace,
    )?;
    manager
        .notifier
        .ready(&systemd::serving_status(profiles.len(), &shown));
    manager.start_watchdog(probe_address.as_ref(), daemon.shutdown.clone());
    let handlers = llmd::handlers::Handlers::new(daemon.clone());
    server::run(daemon.clone(), handlers, listener, grace).await;
    // A refresh in flight gets to write its tokens, within the same stop budget.
    let refresh_limit = llmd::refresh::late_limit(Duration::from_secs(
        daemon.registry().config.daemon.refresh_timeout_secs,
    )) + Duration::from_secs(1);
    daemon.stop_logins(refresh_limit.min(grace)).await;
    // Rows of the requests that just finished are still queued: they go to disk now.
    daemon.usage.close(Duration::from_secs(10)).await;
    tracing::info!("stopped");
    Ok(())
}
