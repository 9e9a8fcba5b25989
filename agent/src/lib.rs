//! # airlock-agent
//!
//! Installed behind the firewall. Dials *out* to the relay over one TLS WebSocket
//! (`wss://RELAY/v1/agent/connect`), receives streams, executes them against private apps with
//! the shared execution engine (enforcing its allow-list after DNS resolution and on every
//! redirect), and streams responses back. Reconnects forever with capped exponential backoff and
//! jitter; drains in-flight streams on SIGTERM.
//!
//! - [`config`]: flags, environment and TOML file → [`config::AgentConfig`].
//! - [`tunnel`]: the connection loop and stream execution.
//!
//! `main.rs` only calls [`main`]; tests drive [`tunnel::run`] or the binary.

pub mod config;
pub mod tunnel;

use std::process::ExitCode;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

async fn metrics(State(status): State<Arc<tunnel::AgentStatus>>) -> String {
    format!(
        "# HELP airlock_agent_connected 1 while the tunnel to the relay is up.\n\
         # TYPE airlock_agent_connected gauge\n\
         airlock_agent_connected {}\n\
         # HELP airlock_agent_streams_active Streams in flight.\n\
         # TYPE airlock_agent_streams_active gauge\n\
         airlock_agent_streams_active {}\n",
        u8::from(status.connected()),
        status.active_streams()
    )
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    status: Arc<tunnel::AgentStatus>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(status);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

/// The `airlock-agent` program.
pub fn main() -> ExitCode {
    let cli = config::Cli::parse();
    let config::Command::Run(args) = cli.command;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let config = match config::AgentConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match airlock_shared::runtime::build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let status = Arc::new(tunnel::AgentStatus::default());
        if let Some(addr) = config.metrics_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    if let Ok(a) = l.local_addr() {
                        println!("airlock-agent metrics on http://{a}");
                    }
                    tokio::spawn(serve_metrics(l, status.clone(), shutdown.clone()));
                }
                Err(e) => {
                    eprintln!("error: --metrics-listen {addr}: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        let trigger = shutdown.clone();
        airlock_shared::runtime::spawn_signal_handler(move || {
            tracing::info!("signal received; draining");
            trigger.cancel();
        });
        airlock_shared::runtime::spawn_idle_heap_trim();
        // On a worker thread, not the main thread inside `block_on`: otherwise every stream the
        // session loop accepts hops from the main thread to a worker (a context switch each).
        let run = tokio::spawn(tunnel::run(config, status, shutdown));
        match run
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("agent task failed: {e}")))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
