//! Command line, environment and TOML file of `airlock-agent`, validated into an
//! [`AgentConfig`] before anything connects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_shared::exec::{AllowEntry, DestinationPolicy};
use airlock_shared::model::{valid_name, Auth, Secret, TlsSettings};
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
///
/// # Agent-side profiles: credentials that never leave the premises. A connection whose auth is
/// # {"type": "profile", "name": "jira"} gets this auth and these TLS settings here, on the
/// # agent; the relay never sees them.
/// [profiles.jira]
/// auth = { type = "basic", username = "svc", password = "…" }
/// [profiles.jira.tls]
/// client_certificate_file = "/etc/airlock/jira-client.pem"   # or client_certificate = "PEM"
/// client_key_file = "/etc/airlock/jira-client.key"           # or client_key = "PEM"
/// ca_certificate_file = "/etc/airlock/corp-ca.pem"           # or ca_certificate = "PEM"
///
/// [profiles.billing]
/// auth = { type = "header", headers = [{ name = "X-Api-Key", value = "…" }] }
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
    /// `[profiles.NAME]`: agent-side credentials, by profile name.
    #[serde(default)]
    pub profiles: BTreeMap<String, FileProfile>,
}

/// `[profiles.NAME]` of the TOML file: any auth type but `profile` (same shape as a connection
/// definition's `auth`, DESIGN.md "Connection model") and optional TLS settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProfile {
    /// The credentials; default `none` (a profile may hold only TLS settings).
    #[serde(default)]
    pub auth: Auth,
    /// TLS settings; each field set here replaces the connection's.
    #[serde(default)]
    pub tls: FileProfileTls,
}

/// `[profiles.NAME.tls]`: a connection's `tls` fields, and for each PEM a `*_file` alternative
/// (relative paths are relative to the configuration file's directory).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProfileTls {
    /// Extra trusted CA certificate(s), PEM.
    pub ca_certificate: Option<String>,
    /// File holding `ca_certificate`.
    pub ca_certificate_file: Option<PathBuf>,
    /// Client certificate (chain), PEM.
    pub client_certificate: Option<String>,
    /// File holding `client_certificate`.
    pub client_certificate_file: Option<PathBuf>,
    /// Client key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<Secret>,
    /// File holding `client_key`.
    pub client_key_file: Option<PathBuf>,
    /// Accept any server certificate (logged as a warning).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A validated agent-side profile. `Debug` shows no secret (they are [`Secret`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Replaces the connection's `{"type": "profile"}` auth; never itself `profile`.
    pub auth: Auth,
    /// Laid over the connection's TLS settings ([`TlsSettings::overlaid_with`]).
    pub tls: TlsSettings,
}

impl FileProfile {
    /// Reads the `*_file`s and validates like a saved connection definition.
    fn validate(self, name: &str, base_dir: &Path) -> Result<Profile, ConfigError> {
        let prefix = format!("profiles.{name}");
        if !valid_name(name) {
            return Err(err(
                &prefix,
                "profile names are 1 to 64 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        if matches!(self.auth, Auth::Profile { .. }) {
            return Err(err(
                &format!("{prefix}.auth.type"),
                "a profile cannot refer to another profile",
            ));
        }
        self.auth
            .validate(&format!("{prefix}.auth"))
            .map_err(|e| err(&e.field, e.message))?;
        let t = self.tls;
        let pick = |inline: Option<String>, file: Option<PathBuf>, key: &str| {
            let field = format!("{prefix}.tls.{key}");
            match (inline, file) {
                (Some(_), Some(_)) => Err(err(
                    &field,
                    format!("set either {key} or {key}_file, not both"),
                )),
                (Some(v), None) => Ok(Some(v)),
                (None, Some(path)) => {
                    read(&base_dir.join(path), &format!("{field}_file")).map(Some)
                }
                (None, None) => Ok(None),
            }
        };
        let tls = TlsSettings {
            ca_certificate: pick(t.ca_certificate, t.ca_certificate_file, "ca_certificate")?,
            client_certificate: pick(
                t.client_certificate,
                t.client_certificate_file,
                "client_certificate",
            )?,
            client_key: pick(
                t.client_key.map(|k| k.expose().to_string()),
                t.client_key_file,
                "client_key",
            )?
            .map(Secret::new),
            insecure_skip_verify: t.insecure_skip_verify,
        };
        tls.validate(&format!("{prefix}.tls"))
            .map_err(|e| err(&e.field, e.message))?;
        Ok(Profile {
            auth: self.auth,
            tls,
        })
    }
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
    /// Agent-side profiles by name (`[profiles.NAME]`).
    pub profiles: Arc<BTreeMap<String, Profile>>,
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
    /// Delay before attempt `attempt` (0-based): uniformly random in `[d/10, d]` with
    /// `d = min(max, initial * 2^attempt)` ("full jitter" with a small floor), so agents that
    /// lost the same relay at the same moment do not come back in one wave.
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let d = exp.min(self.max);
        d.mul_f64(0.1 + 0.9 * unit_random.clamp(0.0, 1.0))
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
            // toml's Display quotes the offending line, which may hold a profile's secret:
            // report the line number and the reason, with quoted values cut.
            Some(p) => {
                let text = read(p, "--config")?;
                toml::from_str(&text).map_err(|e| {
                    let line = e
                        .span()
                        .map(|s| format!(" line {}", 1 + text[..s.start].matches('\n').count()))
                        .unwrap_or_default();
                    err(
                        "--config",
                        format!("{}{line}: {}", p.display(), without_quoted(e.message())),
                    )
                })?
            }
            None => FileConfig::default(),
        };
        let base_dir = a
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut profiles = BTreeMap::new();
        for (name, profile) in file.profiles {
            let validated = profile.validate(&name, &base_dir)?;
            profiles.insert(name, validated);
        }
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
            profiles: Arc::new(profiles),
        })
    }
}

/// `message` with the content of every `"…"` quoted string replaced by `…`: TOML errors quote
/// values (`invalid type: string "…", expected …`), and a value may be a secret.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…");
            } else {
                out.push('"');
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
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
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(25));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(30));
        assert!(b.delay(3, 0.5) > b.delay(2, 0.5));
    }

    fn with_config(toml_text: &str) -> Result<AgentConfig, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "airlock-agent-config-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, toml_text).unwrap();
        let result = AgentConfig::from_args(&args(&[
            "a",
            "run",
            "--relay-url",
            "wss://r",
            "--token",
            "t",
            "--config",
            path.to_str().unwrap(),
        ]));
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn profiles_parse_and_validate() {
        let c = with_config(
            r#"
            [profiles.jira]
            auth = { type = "basic", username = "svc", password = "pw-SECRET" }
            [profiles.billing]
            auth = { type = "header", headers = [{ name = "X-Api-Key", value = "hdr-SECRET" }] }
            [profiles.q]
            auth = { type = "query", params = { "api key" = "q-SECRET" } }
            [profiles.tls-only.tls]
            insecure_skip_verify = true
            "#,
        )
        .unwrap();
        assert_eq!(c.profiles.len(), 4);
        assert_eq!(c.profiles["jira"].auth.type_name(), "basic");
        assert_eq!(c.profiles["tls-only"].auth, Auth::None);
        assert!(c.profiles["tls-only"].tls.insecure_skip_verify);
        let debug = format!("{c:?}");
        assert!(!debug.contains("SECRET"), "{debug}");

        let field = |toml_text: &str| with_config(toml_text).unwrap_err();
        let e = field("[profiles.p]\nauth = { type = \"profile\", name = \"x\" }");
        assert_eq!(e.field, "profiles.p.auth.type");
        let e = field("[profiles.p]\nauth = { type = \"header\", headers = [{ name = \"Bad Name\", value = \"v\" }] }");
        assert_eq!(e.field, "profiles.p.auth.headers[0].name");
        let e = field("[profiles.\"bad name\"]\nauth = { type = \"none\" }");
        assert_eq!(e.field, "profiles.bad name");
        let e =
            field("[profiles.p.tls]\nclient_certificate = \"x\"\nclient_key_file = \"key.pem\"");
        assert_eq!(e.field, "profiles.p.tls.client_certificate");
        let e = field("[profiles.p.tls]\nclient_key = \"k\"\nclient_key_file = \"key.pem\"");
        assert_eq!(e.field, "profiles.p.tls.client_key");
        let e = field("[profiles.p.tls]\nca_certificate_file = \"missing.pem\"");
        assert_eq!(e.field, "profiles.p.tls.ca_certificate_file");
        // A TOML error does not echo the value.
        let e = field("[profiles.p]\nauth = { type = \"basic\", username = \"u\", password = [\"pw-SECRET\"] }");
        assert_eq!(e.field, "--config");
        assert!(!e.message.contains("SECRET"), "{e}");
        let e = field(
            "[profiles.p]\nauth = { type = \"basic\", username = \"u\", password = \"pw-SECRET\" ]",
        );
        assert!(!e.message.contains("SECRET"), "{e}");
        assert!(e.message.contains("line 2"), "{e}");
    }

    #[test]
    fn toml_unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("relay_url = \"wss://r\"\nbogus = 1").is_err());
        let f: FileConfig = toml::from_str("allow = [\"10.0.0.0/8\"]").unwrap();
        assert_eq!(f.allow.len(), 1);
    }
}
