//! # airlock-relay
//!
//! Holds connection definitions, serves the REST API and the agents' WebSocket endpoint, and
//! executes requests of public apps itself (DESIGN.md, "Relay surface").
//!
//! - [`server`]: the listener (TLS, HTTP/1.1, graceful shutdown) and the router.
//! - [`tunnel`]: `GET /v1/agent/connect`, the handshake, the registry of agent sessions.
//! - [`proxy`]: the main job (`/v1/connections/{name}/proxy/…`) and the test request.
//! - [`api`]: agents and connection definitions (CRUD).
//! - [`store`]: persistent state on sqlx/SQLite, secrets sealed by [`secrets`] under the master
//!   key. [`state`]: what handlers share.
//! - [`tls`], [`token`], [`problem`] (RFC 9457 errors), [`config`], [`cli`] (client subcommands),
//!   [`openapi`] (the document served at `/v1/openapi.json`).
//!
//! `main.rs` only calls [`main`]; tests drive [`server::run`] or the binary.

pub mod api;
pub mod cli;
pub mod config;
pub mod openapi;
pub mod problem;
pub mod proxy;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod token;
pub mod tunnel;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The `airlock-relay` program.
pub fn main() -> ExitCode {
    let cli = config::Cli::parse();
    let runtime = match airlock_shared::runtime::build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        config::Command::Serve(args) => {
            init_tracing(args.log_format == "json");
            airlock_shared::runtime::tune_heap_for_bulk();
            let config = match server::RelayConfig::try_from(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: cannot listen on {}: {e}", config.listen);
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                airlock_shared::runtime::spawn_signal_handler(move || {
                    tracing::info!("signal received; shutting down");
                    trigger.cancel();
                });
                airlock_shared::runtime::spawn_idle_heap_trim();
                // On a worker thread, not the main thread inside `block_on`, so accepted
                // connections do not hop threads.
                let run = tokio::spawn(server::run(config, listener, shutdown));
                match run
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("relay task failed: {e}")))
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "relay failed");
                        eprintln!("error: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        config::Command::Agents { client, command } => {
            init_tracing(false);
            client_exit(runtime.block_on(cli::run_agents(&client, command)))
        }
        config::Command::Connections { client, command } => {
            init_tracing(false);
            client_exit(runtime.block_on(cli::run_connections(&client, command)))
        }
    }
}

fn client_exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // Already reported on stderr.
        Err(e) if e.is::<cli::Reported>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
