//! Command line and environment of `airlock-relay` (clap derive), validated into a
//! [`RelayConfig`] before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use airlock_shared::model::Secret;

use crate::cli::{AgentsCommand, ClientArgs, ConnectionsCommand};
use crate::secrets::MasterKey;
use crate::server::{MasterKeySource, RelayConfig, TlsMode};
use crate::state::TunnelSettings;

/// Airlock relay: lets cloud services call HTTP APIs inside private networks through agents.
#[derive(Debug, Parser)]
#[command(name = "airlock-relay", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay server.
    Serve(ServeArgs),
    /// Manage agents of a running relay (AIRLOCK_RELAY_URL, AIRLOCK_TOKEN).
    Agents {
        /// Relay to talk to.
        #[command(flatten)]
        client: ClientArgs,
        /// Action.
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Manage connection definitions of a running relay (AIRLOCK_RELAY_URL, AIRLOCK_TOKEN).
    Connections {
        /// Relay to talk to.
        #[command(flatten)]
        client: ClientArgs,
        /// Action.
        #[command(subcommand)]
        command: ConnectionsCommand,
    },
}

/// `airlock-relay serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "AIRLOCK_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Data directory: SQLite store, admin token, development TLS files.
    #[arg(long, env = "AIRLOCK_DATA_DIR", default_value = "airlock-data")]
    pub data_dir: PathBuf,
    /// Generate a development CA and server certificate under <data-dir>/tls.
    #[arg(long, env = "AIRLOCK_DEV_TLS", conflicts_with_all = ["tls_cert", "tls_key", "no_tls"])]
    pub dev_tls: bool,
    /// Extra DNS name or IP address for the development server certificate (repeatable).
    #[arg(long = "dev-tls-name", value_name = "NAME", requires = "dev_tls")]
    pub dev_tls_names: Vec<String>,
    /// Server certificate chain (PEM).
    #[arg(long, env = "AIRLOCK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "AIRLOCK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also serve clients (API and proxy) over plain HTTP on this address, e.g. a private
    /// interface behind a TLS-terminating load balancer, while agents use the TLS listener.
    #[arg(long, env = "AIRLOCK_PLAIN_LISTEN", value_name = "ADDR")]
    pub plain_listen: Option<SocketAddr>,
    /// Serve plain HTTP (only behind a TLS-terminating load balancer).
    #[arg(long, env = "AIRLOCK_NO_TLS")]
    pub no_tls: bool,
    /// Let public connections reach loopback, private and link-local addresses.
    #[arg(long, env = "AIRLOCK_ALLOW_PRIVATE_DESTINATIONS")]
    pub allow_private_destinations: bool,
    /// Tunnel heartbeat interval in milliseconds (an agent silent for 3 intervals is dropped).
    #[arg(long, env = "AIRLOCK_HEARTBEAT_MS", default_value_t = 15_000)]
    pub heartbeat_ms: u64,
    /// Per-stream flow-control window in bytes.
    #[arg(long, env = "AIRLOCK_STREAM_WINDOW", default_value_t = 1024 * 1024)]
    pub stream_window: u32,
    /// Per-connection flow-control window in bytes.
    #[arg(long, env = "AIRLOCK_CONNECTION_WINDOW", default_value_t = 16 * 1024 * 1024)]
    pub connection_window: u32,
    /// Most concurrent streams per agent connection.
    #[arg(long, env = "AIRLOCK_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: u32,
    /// Seconds to let in-flight requests finish at shutdown.
    #[arg(long, env = "AIRLOCK_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Log format.
    #[arg(long, env = "AIRLOCK_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// File holding the master key that encrypts connection secrets in the store: the base64 of
    /// 32 random bytes (e.g. `head -c 32 /dev/urandom | base64`), mode 0600. Without it and
    /// without AIRLOCK_MASTER_KEY the relay uses <data-dir>/master-key, generated on first start.
    #[arg(
        long,
        env = "AIRLOCK_MASTER_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "master_key"
    )]
    pub master_key_file: Option<PathBuf>,
    /// The master key itself, base64 of 32 bytes. Prefer the environment variable
    /// AIRLOCK_MASTER_KEY (command lines are visible to other local users) or --master-key-file.
    #[arg(
        long,
        env = "AIRLOCK_MASTER_KEY",
        hide_env_values = true,
        value_name = "BASE64",
        value_parser = parse_secret
    )]
    pub master_key: Option<Secret>,
}

/// Keeps the value out of clap's error messages: it is checked, without echoing it, in
/// [`RelayConfig::try_from`].
fn parse_secret(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(s))
}

/// A configuration value is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The flag at fault.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TryFrom<&ServeArgs> for RelayConfig {
    type Error = ConfigError;

    fn try_from(a: &ServeArgs) -> Result<Self, ConfigError> {
        let tls = if a.dev_tls {
            TlsMode::Dev {
                names: a.dev_tls_names.clone(),
            }
        } else if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
            TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            }
        } else if a.no_tls {
            TlsMode::Plain
        } else {
            return Err(ConfigError {
                field: "--tls-cert",
                message: "choose --tls-cert/--tls-key, --dev-tls (development) or --no-tls (behind a TLS proxy)".into(),
            });
        };
        let chunk = airlock_shared::proto::MAX_DATA_CHUNK as u32;
        if a.stream_window < chunk {
            return Err(ConfigError {
                field: "--stream-window",
                message: format!("must be at least {chunk} bytes"),
            });
        }
        if a.connection_window < a.stream_window {
            return Err(ConfigError {
                field: "--connection-window",
                message: "must be at least --stream-window".into(),
            });
        }
        if a.heartbeat_ms < 100 || a.heartbeat_ms > 600_000 {
            return Err(ConfigError {
                field: "--heartbeat-ms",
                message: "must be between 100 and 600000".into(),
            });
        }
        if a.max_streams == 0 {
            return Err(ConfigError {
                field: "--max-streams",
                message: "must be at least 1".into(),
            });
        }
        // Read here rather than at startup so that a bad key exits 64 before a port is bound.
        let master_key = if let Some(value) = &a.master_key {
            let key = MasterKey::from_base64(value.expose(), "AIRLOCK_MASTER_KEY / --master-key")
                .map_err(|e| ConfigError {
                field: "--master-key",
                message: e.to_string(),
            })?;
            MasterKeySource::Given(key)
        } else if let Some(path) = &a.master_key_file {
            let key = MasterKey::read_file(path).map_err(|e| ConfigError {
                field: "--master-key-file",
                message: e.to_string(),
            })?;
            MasterKeySource::Given(key)
        } else {
            MasterKeySource::DataDir
        };
        Ok(RelayConfig {
            listen: a.listen,
            data_dir: a.data_dir.clone(),
            tls,
            allow_private_destinations: a.allow_private_destinations,
            tunnel: TunnelSettings {
                heartbeat: Duration::from_millis(a.heartbeat_ms),
                initial_window: a.stream_window,
                connection_window: a.connection_window,
                max_frame_size: airlock_shared::proto::DEFAULT_MAX_FRAME_SIZE,
                max_concurrent_streams: a.max_streams,
            },
            shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
            plain_listen: a.plain_listen,
            master_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RelayConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Serve(s) => RelayConfig::try_from(&s).map_err(|e| e.to_string()),
            _ => Err("not serve".into()),
        }
    }

    #[test]
    fn tls_choice_is_required_and_exclusive() {
        assert!(parse(&["r", "serve"]).unwrap_err().contains("--tls-cert"));
        assert!(parse(&["r", "serve", "--dev-tls", "--no-tls"]).is_err());
        assert!(parse(&["r", "serve", "--tls-cert", "c.pem"]).is_err());
        assert!(matches!(
            parse(&["r", "serve", "--dev-tls"]).unwrap().tls,
            TlsMode::Dev { .. }
        ));
    }

    #[test]
    fn master_key_sources() {
        let dev = ["r", "serve", "--no-tls"];
        assert!(matches!(
            parse(&dev).unwrap().master_key,
            MasterKeySource::DataDir
        ));
        let key = MasterKey::generate();
        let b64 = key.to_base64();
        let mut args = dev.to_vec();
        args.extend(["--master-key", &b64]);
        match parse(&args).unwrap().master_key {
            MasterKeySource::Given(k) => assert_eq!(k, key),
            MasterKeySource::DataDir => panic!("key ignored"),
        }
        // A bad key is refused without being echoed.
        let mut args = dev.to_vec();
        args.extend(["--master-key", "hunter2-not-a-key"]);
        let e = parse(&args).unwrap_err();
        assert!(e.starts_with("--master-key: "), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        // Missing file: named.
        let mut args = dev.to_vec();
        args.extend(["--master-key-file", "/nonexistent/airlock-key"]);
        let e = parse(&args).unwrap_err();
        assert!(e.contains("/nonexistent/airlock-key"), "{e}");
        // Both at once: refused by clap.
        let mut args = dev.to_vec();
        args.extend(["--master-key", &b64, "--master-key-file", "k"]);
        assert!(parse(&args).is_err());
    }

    #[test]
    fn help_hides_the_master_key_value() {
        use clap::CommandFactory as _;
        let mut cmd = Cli::command();
        let serve = cmd.find_subcommand_mut("serve").unwrap();
        let help = serve.render_long_help().to_string();
        assert!(help.contains("--master-key-file"), "{help}");
        assert!(help.contains("AIRLOCK_MASTER_KEY"), "{help}");
    }

    #[test]
    fn windows_are_checked() {
        let e = parse(&["r", "serve", "--no-tls", "--stream-window", "10"]).unwrap_err();
        assert!(e.contains("--stream-window"));
        let e = parse(&["r", "serve", "--no-tls", "--heartbeat-ms", "0"]).unwrap_err();
        assert!(e.contains("--heartbeat-ms"));
    }
}
