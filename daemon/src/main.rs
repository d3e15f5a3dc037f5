//! The `llmd` binary: parse flags, load config, bind, serve, stop cleanly on signals.

use clap::Parser;
use llmd::config;
use llmd::server::{self, listener};
use llmd::state::Daemon;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let (config_path, explicit) = config::config_path(args.config);
    let (cfg, source) = config::load(&config_path, explicit).map_err(|e| e.0)?;
    if args.check_config {
        println!("{source}: ok ({} profiles)", cfg.profiles.len());
        return Ok(());
    }
    let socket = llmd_proto::paths::resolve_socket_path(args.socket, cfg.daemon.socket.clone());
    let grace = Duration::from_secs(cfg.daemon.shutdown_grace_secs);
    let listener = match listener::from_systemd()? {
        Some(l) => {
            tracing::info!("using the socket passed by systemd");
            l
        }
        None => listener::bind(&socket)?,
    };
    let daemon = Daemon::new(cfg, source.clone(), config_path, explicit);
    let profiles: Vec<String> = daemon.registry().profiles.keys().cloned().collect();
    tracing::info!(socket = %socket.display(), config = %source, ?profiles, "llmd {} serving", env!("CARGO_PKG_VERSION"));

    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    let d = daemon.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => {
                    if let Err(e) = d.reload() {
                        tracing::error!(error = %e, "reload failed; keeping the running configuration");
                    }
                }
            }
        }
        d.shutdown.cancel();
    });
    server::run(daemon, listener, grace).await;
    tracing::info!("stopped");
    Ok(())
}
