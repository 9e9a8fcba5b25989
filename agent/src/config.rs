//! Command line, environment and TOML file of `airlock-agent`, validated into an
//! [`AgentConfig`] before anything connects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_shared::exec::{AllowEntry, DestinationPolicy};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use url::Url;

/// Airlock agent: dials out to the relay and executes requests against private apps.
#[derive(Debug, Parser)]
#[command(name = "airlock-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect to the relay and serve requests until stopped.
    Run(RunArgs),
}

/// `airlock-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The relay's agent endpoint base, e.g. wss://relay.example.com:8443 (the path
    /// /v1/agent/connect is added when missing).
    #[arg(long, env = "AIRLOCK_RELAY_URL")]
    pub relay_url: Option<Url>,
    /// File holding the agent token (from `airlock-relay agents create`).
    #[arg(long, env = "AIRLOCK_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The agent token itself (prefer --token-file).
    #[arg(long = "token", env = "AIRLOCK_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA certificate (PEM) to trust for the relay, besides the system roots.
    #[arg(long, env = "AIRLOCK_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Destination the agent may call: HOST[:PORT], IP or CIDR (repeatable). Checked after DNS
    /// resolution and on every redirect.
    #[arg(long = "allow", value_name = "HOST[:PORT]|CIDR")]
    pub allow: Vec<String>,
    /// Let the agent call any destination (logged as a warning).
    #[arg(long, env = "AIRLOCK_ALLOW_ANY")]
    pub allow_any: bool,
    /// Serve /metrics and /healthz on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "AIRLOCK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// TOML configuration file; flags override it.
    #[arg(long, env = "AIRLOCK_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seconds to let in-flight streams finish after SIGTERM.
    #[arg(long, env = "AIRLOCK_DRAIN_GRACE_SECS")]
    pub drain_grace_secs: Option<u64>,
    /// Log format.
    #[arg(long, env = "AIRLOCK_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

/// The TOML file (`--config`). Every key is optional; flags win.
///
/// ```toml
/// relay_url = "wss://relay.example.com:8443"
/// token_file = "/etc/airlock/agent-token"
/// ca_file = "/etc/airlock/relay-ca.pem"
/// allow = ["jira.corp.example:8443", "10.20.0.0/16"]
/// allow_any = false
/// metrics_listen = "127.0.0.1:9464"
/// drain_grace_secs = 30
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See `--relay-url`.
    pub relay_url: Option<Url>,
    /// See `--token-file`.
    pub token_file: Option<PathBuf>,
    /// See `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// See `--allow`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// See `--allow-any`.
    #[serde(default)]
    pub allow_any: bool,
    /// See `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// See `--drain-grace-secs`.
    pub drain_grace_secs: Option<u64>,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Full URL of the relay's agent endpoint (`wss://…/v1/agent/connect`).
    pub relay_url: Url,
    /// The agent token.
    pub token: airlock_shared::model::Secret,
    /// Extra trusted CA PEM for the relay.
    pub ca_pem: Option<String>,
    /// Which destinations streams may reach.
    pub policy: DestinationPolicy,
    /// Metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Drain grace at shutdown.
    pub drain_grace: Duration,
    /// Backoff between reconnection attempts.
    pub backoff: Backoff,
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A session that lasted at least this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Delay before attempt `attempt` (0-based): uniformly random in
    /// `[d/2, d]` with `d = min(max, initial * 2^attempt)`.
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
    }
}

/// A configuration value is unusable; names the flag or key.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The flag or key at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn read(path: &Path, field: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))
}

impl AgentConfig {
    /// Merges the TOML file (if any) and the flags, reads the token and CA files, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag.
    pub fn from_args(a: &RunArgs) -> Result<Self, ConfigError> {
        let file: FileConfig = match &a.config {
            Some(p) => toml::from_str(&read(p, "--config")?)
                .map_err(|e| err("--config", format!("{}: {e}", p.display())))?,
            None => FileConfig::default(),
        };
        let mut relay_url = a
            .relay_url
            .clone()
            .or(file.relay_url)
            .ok_or_else(|| err("--relay-url", "required (wss://relay.example.com:8443)"))?;
        match relay_url.scheme() {
            "wss" | "ws" => {}
            "https" => {
                let _ = relay_url.set_scheme("wss");
            }
            "http" => {
                let _ = relay_url.set_scheme("ws");
            }
            other => {
                return Err(err(
                    "--relay-url",
                    format!("scheme must be wss, not '{other}'"),
                ))
            }
        }
        if relay_url.path() == "/" || relay_url.path().is_empty() {
            relay_url.set_path("/v1/agent/connect");
        }
        let token = match (&a.token, a.token_file.as_ref().or(file.token_file.as_ref())) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(p)) => read(p, "--token-file")?.trim().to_string(),
            (None, None) => return Err(err(
                "--token-file",
                "required (or AIRLOCK_AGENT_TOKEN): the token from `airlock-relay agents create`",
            )),
        };
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("--token-file", "the token is empty or malformed"));
        }
        let ca_pem = match a.ca_file.as_ref().or(file.ca_file.as_ref()) {
            Some(p) => {
                let pem = read(p, "--ca-file")?;
                airlock_shared::exec::parse_certificates(&pem)
                    .map_err(|e| err("--ca-file", format!("{}: {e}", p.display())))?;
                Some(pem)
            }
            None => None,
        };
        let allow_any = a.allow_any || file.allow_any;
        let mut entries = Vec::new();
        for e in a.allow.iter().chain(file.allow.iter()) {
            entries.push(e.parse::<AllowEntry>().map_err(|m| err("--allow", m))?);
        }
        let policy = if allow_any {
            DestinationPolicy::Any
        } else {
            DestinationPolicy::AllowList(entries)
        };
        Ok(AgentConfig {
            relay_url,
            token: airlock_shared::model::Secret::new(token),
            ca_pem,
            policy,
            metrics_listen: a.metrics_listen.or(file.metrics_listen),
            drain_grace: Duration::from_secs(
                a.drain_grace_secs.or(file.drain_grace_secs).unwrap_or(30),
            ),
            backoff: Backoff::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> RunArgs {
        match Cli::try_parse_from(v).unwrap().command {
            Command::Run(r) => r,
        }
    }

    #[test]
    fn url_path_is_completed_and_token_required() {
        let e =
            AgentConfig::from_args(&args(&["a", "run", "--relay-url", "wss://r:1"])).unwrap_err();
        assert_eq!(e.field, "--token-file");
        let c = AgentConfig::from_args(&args(&[
            "a",
            "run",
            "--relay-url",
            "https://r:1",
            "--token",
            "alk_agent_x",
        ]))
        .unwrap();
        assert_eq!(c.relay_url.as_str(), "wss://r:1/v1/agent/connect");
        assert!(matches!(c.policy, DestinationPolicy::AllowList(ref l) if l.is_empty()));
        let e = AgentConfig::from_args(&args(&[
            "a",
            "run",
            "--relay-url",
            "wss://r",
            "--token",
            "t",
            "--allow",
            "bad entry",
        ]))
        .unwrap_err();
        assert_eq!(e.field, "--allow");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(250));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(125));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(30));
        assert!(b.delay(3, 0.5) > b.delay(2, 0.5));
    }

    #[test]
    fn toml_unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("relay_url = \"wss://r\"\nbogus = 1").is_err());
        let f: FileConfig = toml::from_str("allow = [\"10.0.0.0/8\"]").unwrap();
        assert_eq!(f.allow.len(), 1);
    }
}
