//! Client subcommands (`airlock-relay agents …`, `airlock-relay connections …`): they talk to a
//! running relay's management API ([`crate::api`]) over HTTPS (DESIGN.md, "Relay surface").
//!
//! Configuration ([`ClientArgs`]): `AIRLOCK_RELAY_URL` (e.g. `https://127.0.0.1:8443`),
//! `AIRLOCK_TOKEN` (an admin token; its value is never printed, not even in `--help`) and
//! optionally `AIRLOCK_CA_FILE`, a PEM file of extra CA certificates to trust besides the system
//! roots (e.g. the relay's `<data-dir>/tls/ca.pem`).
//!
//! Output: pretty JSON on stdout for `get`, `create`, `update` and `test`, a compact table for
//! `list`. A problem answer becomes an error `<title>: <detail>` (the binary prints it as
//! `error: …` and exits 1). `connections test` also writes a summary line to stderr
//! (`ok: 200 in 12 ms via agent edge-1 (host-a)` or `failed: <kind>: <message>`) and fails with
//! [`Reported`] when the test failed.

use std::io::{BufRead, Read as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_shared::model::{ConnectionDefinition, Secret, TestRequest};
use anyhow::{anyhow, bail, Context as _};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

/// Longest wait for the relay to accept a TCP connection: 10 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for an API answer: 60 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for `connections test`: 1 h, the largest `response_timeout_ms`, plus a minute.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(3_660);

/// Which relay to talk to, and how. Flags may also be given after the subcommand.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Relay")]
pub struct ClientArgs {
    /// Base URL of the relay, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "AIRLOCK_RELAY_URL", value_name = "URL", global = true)]
    pub relay_url: Option<Url>,
    /// Admin API token. Prefer the environment variable: command lines are visible to other
    /// local users.
    #[arg(
        long,
        env = "AIRLOCK_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = parse_secret,
        global = true
    )]
    pub token: Option<Secret>,
    /// Extra CA certificate(s), PEM, to trust besides the system roots (e.g. the relay's
    /// <data-dir>/tls/ca.pem).
    #[arg(long, env = "AIRLOCK_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

fn parse_secret(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(s))
}

/// `airlock-relay agents …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentsCommand {
    /// Enrol an agent. Prints its token, which is shown only this once.
    Create {
        /// Agent name: 1 to 64 of letters, digits, '.', '_', '-'.
        name: String,
        /// Agent group whose private connections the agent serves.
        #[arg(long, value_name = "GROUP")]
        group: String,
    },
    /// List agents with their status and sessions.
    List,
    /// Revoke an agent: its token stops working and its sessions are closed at once.
    Revoke {
        /// Agent id (from `agents list`).
        id: String,
    },
}

/// `airlock-relay connections …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConnectionsCommand {
    /// Create a connection, from flags or from a JSON file.
    Create {
        /// Connection name: 1 to 64 of letters, digits, '.', '_', '-'.
        #[arg(
            long,
            value_name = "NAME",
            required_unless_present = "from_file",
            conflicts_with = "from_file"
        )]
        name: Option<String>,
        /// The definition.
        #[command(flatten)]
        definition: Box<ConnectionFlags>,
    },
    /// Replace a connection's definition. Omitted secrets keep their stored value.
    Update {
        /// The connection to replace.
        name: String,
        /// The new definition.
        #[command(flatten)]
        definition: Box<ConnectionFlags>,
    },
    /// List connections.
    List,
    /// Show a connection (secrets appear as {"set": true}).
    Get {
        /// Connection name.
        name: String,
    },
    /// Delete a connection.
    Delete {
        /// Connection name.
        name: String,
    },
    /// Send the connection's test request; exits 1 when it fails.
    Test {
        /// Connection name.
        name: String,
    },
}

/// `--auth`: the auth types of DESIGN.md but the two OAuth2 grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthKind {
    /// No credentials.
    None,
    /// HTTP Basic (RFC 7617): --username and a password.
    Basic,
    /// Header fields: --header, --header-env, --public-header.
    Header,
    /// Query parameters: --param, --param-env.
    Query,
    /// Any combination of --username/password, headers and parameters.
    Custom,
    /// Credentials held by the agent under [profiles.NAME] of its configuration: --profile.
    Profile,
}

impl AuthKind {
    fn name(self) -> &'static str {
        match self {
            AuthKind::None => "none",
            AuthKind::Basic => "basic",
            AuthKind::Header => "header",
            AuthKind::Query => "query",
            AuthKind::Custom => "custom",
            AuthKind::Profile => "profile",
        }
    }
}

/// A connection definition given as flags, or the file holding it.
///
/// Flags become the definition's JSON directly (see [`ConnectionFlags::to_body`]), so they do
/// not depend on the model's Rust types. Secret values given on the command line are visible to
/// other local users; each has a variant reading it from the environment (`--password-env`,
/// `--header-env`, `--param-env`), stdin (`--password-stdin`) or a file (`--client-key`), and
/// no secret is ever printed: answers show `{"set": true}`, errors name the flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectionFlags {
    /// Read the whole definition (JSON, as the API takes it) from FILE; `-` reads stdin.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "base_url", "auth", "username", "password", "password_env", "password_stdin",
            "headers", "header_envs", "public_headers", "params", "param_envs", "profile",
            "client_cert", "client_key", "ca_cert", "insecure_skip_verify",
            "private", "agent_group", "test_path", "test_method", "response_timeout_ms",
        ]
    )]
    pub from_file: Option<PathBuf>,
    /// Base URL of the app (http or https, no query).
    #[arg(long, value_name = "URL", required_unless_present = "from_file")]
    pub base_url: Option<String>,
    /// Authentication. When omitted it follows from the credential flags: `basic` with
    /// --username, `header` with header flags, `query` with parameter flags, `custom` with more
    /// than one of those, `profile` with --profile, otherwise `none`.
    #[arg(long, value_enum, value_name = "TYPE", help_heading = "Authentication")]
    pub auth: Option<AuthKind>,
    /// Basic auth user name (or API key).
    #[arg(long, value_name = "USER", help_heading = "Authentication")]
    pub username: Option<String>,
    /// Basic auth password. Visible to other local users; prefer --password-env or
    /// --password-stdin.
    #[arg(
        long,
        value_name = "PASSWORD",
        value_parser = parse_secret,
        conflicts_with_all = ["password_env", "password_stdin"],
        help_heading = "Authentication"
    )]
    pub password: Option<Secret>,
    /// Read the password from the environment variable VAR.
    #[arg(
        long,
        value_name = "VAR",
        conflicts_with = "password_stdin",
        help_heading = "Authentication"
    )]
    pub password_env: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long, help_heading = "Authentication")]
    pub password_stdin: bool,
    /// A header field the connection sends, secret (the API shows {"set": true}), e.g.
    /// 'Authorization: Bearer …'. Repeatable. Visible to other local users; prefer --header-env.
    #[arg(
        long = "header",
        value_name = "'NAME: VALUE'",
        value_parser = parse_secret,
        help_heading = "Authentication"
    )]
    pub headers: Vec<Secret>,
    /// A secret header field whose value is read from the environment variable VAR. Repeatable.
    #[arg(
        long = "header-env",
        value_name = "NAME=VAR",
        help_heading = "Authentication"
    )]
    pub header_envs: Vec<String>,
    /// A header field that is not a secret (the API shows its value), e.g. 'X-Tenant: acme'.
    /// Repeatable.
    #[arg(
        long = "public-header",
        value_name = "'NAME: VALUE'",
        help_heading = "Authentication"
    )]
    pub public_headers: Vec<String>,
    /// A query parameter the connection adds (its value is secret), e.g. api_key=….
    /// Repeatable. Visible to other local users; prefer --param-env.
    #[arg(
        long = "param",
        value_name = "NAME=VALUE",
        value_parser = parse_secret,
        help_heading = "Authentication"
    )]
    pub params: Vec<Secret>,
    /// A query parameter whose value is read from the environment variable VAR. Repeatable.
    #[arg(
        long = "param-env",
        value_name = "NAME=VAR",
        help_heading = "Authentication"
    )]
    pub param_envs: Vec<String>,
    /// The agent profile ([profiles.NAME] in the agent's configuration) holding the credentials;
    /// private connections only.
    #[arg(long, value_name = "NAME", help_heading = "Authentication")]
    pub profile: Option<String>,
    /// Client certificate for mutual TLS: a PEM file, leaf first, then any intermediates.
    #[arg(
        long,
        value_name = "FILE",
        requires = "client_key",
        help_heading = "TLS to the app"
    )]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key: a PEM file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", help_heading = "TLS to the app")]
    pub client_key: Option<PathBuf>,
    /// Extra CA certificate(s) to trust for the app, besides the system roots: a PEM file.
    #[arg(long, value_name = "FILE", help_heading = "TLS to the app")]
    pub ca_cert: Option<PathBuf>,
    /// Accept any certificate from the app (no chain, name or expiry check). Only for tests.
    #[arg(long, help_heading = "TLS to the app")]
    pub insecure_skip_verify: bool,
    /// The app is in a private network: requests go through an agent of --agent-group.
    #[arg(long, requires = "agent_group")]
    pub private: bool,
    /// Agent group that serves this private connection.
    #[arg(long, value_name = "GROUP", requires = "private")]
    pub agent_group: Option<String>,
    /// Path (and query) of the test request [default: /].
    #[arg(long, value_name = "PATH")]
    pub test_path: Option<String>,
    /// Method of the test request [default: GET].
    #[arg(long, value_name = "METHOD")]
    pub test_method: Option<String>,
    /// Longest wait for the app's response head, milliseconds [default: 60000].
    #[arg(long, value_name = "MS")]
    pub response_timeout_ms: Option<u64>,
}

/// Marks a failure already written to stderr (a failed `connections test`): print nothing more,
/// exit 1.
#[derive(Debug, thiserror::Error)]
#[error("connection test failed")]
pub struct Reported;

/// Where flag values that are not on the command line come from: stdin and the environment.
/// Injected so that tests need neither.
pub struct Sources<'a> {
    /// Read by `--password-stdin`.
    pub stdin: &'a mut dyn BufRead,
    /// Looks up an environment variable (`--password-env`, `--header-env`, `--param-env`).
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// One header field of the flags, in the order the definition lists them.
#[derive(Debug)]
struct HeaderFlag {
    /// The flag it came from, for messages: `--header`, `--header-env`, `--public-header`.
    flag: &'static str,
    name: String,
    value: Secret,
    secret: bool,
}

impl ConnectionFlags {
    /// True when the password comes from one of the password flags.
    pub fn password_given(&self) -> bool {
        self.password.is_some() || self.password_env.is_some() || self.password_stdin
    }

    /// Reads the password from its source: `--password`, the variable of `--password-env`, or the
    /// first line of stdin (without its line ending) with `--password-stdin`. `None` when no
    /// password flag is given.
    ///
    /// # Errors
    /// The variable is unset or not UTF-8; stdin cannot be read.
    pub fn read_password(&self, sources: &mut Sources<'_>) -> anyhow::Result<Option<Secret>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(var) = &self.password_env {
            let value = (sources.env)(var)
                .ok_or_else(|| anyhow!("--password-env: environment variable {var} is not set"))?;
            return Ok(Some(Secret::new(value)));
        }
        if self.password_stdin {
            let mut line = String::new();
            sources
                .stdin
                .read_line(&mut line)
                .context("--password-stdin: reading stdin")?;
            let value = line.trim_end_matches(['\n', '\r']);
            return Ok(Some(Secret::new(value)));
        }
        Ok(None)
    }

    /// The header fields of `--header`, `--header-env` and `--public-header`, in that order.
    fn header_flags(&self, sources: &Sources<'_>) -> anyhow::Result<Vec<HeaderFlag>> {
        let mut out = Vec::new();
        for (i, raw) in self.headers.iter().enumerate() {
            // The message never quotes the argument: it may hold the secret.
            let (name, value) = raw
                .expose()
                .split_once(':')
                .ok_or_else(|| anyhow!("--header #{}: expected 'NAME: VALUE'", i + 1))?;
            out.push(HeaderFlag {
                flag: "--header",
                name: name.to_string(),
                // RFC 9110 §5.5: optional whitespace around a field value is not part of it.
                value: Secret::new(value.trim_matches([' ', '\t'])),
                secret: true,
            });
        }
        for raw in &self.header_envs {
            let (name, var) = raw
                .split_once('=')
                .ok_or_else(|| anyhow!("--header-env {raw}: expected NAME=VAR"))?;
            let value = (sources.env)(var).ok_or_else(|| {
                anyhow!("--header-env {name}: environment variable {var} is not set")
            })?;
            out.push(HeaderFlag {
                flag: "--header-env",
                name: name.to_string(),
                value: Secret::new(value),
                secret: true,
            });
        }
        for raw in &self.public_headers {
            let (name, value) = raw
                .split_once(':')
                .ok_or_else(|| anyhow!("--public-header {raw}: expected 'NAME: VALUE'"))?;
            out.push(HeaderFlag {
                flag: "--public-header",
                name: name.to_string(),
                value: Secret::new(value.trim_matches([' ', '\t'])),
                secret: false,
            });
        }
        Ok(out)
    }

    /// The query parameters of `--param` and `--param-env`, as a JSON object (a later one of the
    /// same name wins).
    fn param_flags(&self, sources: &Sources<'_>) -> anyhow::Result<serde_json::Map<String, Value>> {
        let mut out = serde_json::Map::new();
        for (i, raw) in self.params.iter().enumerate() {
            let (name, value) = raw
                .expose()
                .split_once('=')
                .ok_or_else(|| anyhow!("--param #{}: expected NAME=VALUE", i + 1))?;
            out.insert(name.to_string(), Value::String(value.to_string()));
        }
        for raw in &self.param_envs {
            let (name, var) = raw
                .split_once('=')
                .ok_or_else(|| anyhow!("--param-env {raw}: expected NAME=VAR"))?;
            let value = (sources.env)(var).ok_or_else(|| {
                anyhow!("--param-env {name}: environment variable {var} is not set")
            })?;
            out.insert(name.to_string(), Value::String(value));
        }
        Ok(out)
    }

    /// The `auth` object the flags describe. `password` is the value read by
    /// [`ConnectionFlags::read_password`]; without one it is left out (an update then keeps the
    /// stored one).
    fn auth_json(
        &self,
        password: Option<Secret>,
        headers: &[HeaderFlag],
        params: serde_json::Map<String, Value>,
    ) -> anyhow::Result<Value> {
        let has_basic = self.username.is_some() || password.is_some();
        let kind = match self.auth {
            Some(kind) => kind,
            None => {
                let kinds = [has_basic, !headers.is_empty(), !params.is_empty()];
                match (self.profile.is_some(), kinds.iter().filter(|k| **k).count()) {
                    (true, _) => AuthKind::Profile,
                    (false, 0) => AuthKind::None,
                    (false, 1) if has_basic => AuthKind::Basic,
                    (false, 1) if !headers.is_empty() => AuthKind::Header,
                    (false, 1) => AuthKind::Query,
                    (false, _) => AuthKind::Custom,
                }
            }
        };
        let refuse = |present: bool, what: &str| -> anyhow::Result<()> {
            if present {
                bail!("{what} cannot be used with --auth {}", kind.name());
            }
            Ok(())
        };
        let takes_basic = matches!(kind, AuthKind::Basic | AuthKind::Custom);
        let takes_headers = matches!(kind, AuthKind::Header | AuthKind::Custom);
        let takes_params = matches!(kind, AuthKind::Query | AuthKind::Custom);
        refuse(!takes_basic && has_basic, "--username/--password")?;
        refuse(!takes_headers && !headers.is_empty(), "a header flag")?;
        refuse(!takes_params && !params.is_empty(), "a parameter flag")?;
        refuse(
            kind != AuthKind::Profile && self.profile.is_some(),
            "--profile",
        )?;
        if password.is_some() && self.username.is_none() && kind == AuthKind::Custom {
            bail!("--password needs --username (Basic credentials are username:password)");
        }
        let mut auth = serde_json::Map::new();
        auth.insert("type".into(), Value::String(kind.name().into()));
        match kind {
            AuthKind::None => {}
            AuthKind::Basic => {
                let username = self
                    .username
                    .clone()
                    .ok_or_else(|| anyhow!("--auth basic needs --username"))?;
                auth.insert("username".into(), Value::String(username));
            }
            AuthKind::Header if headers.is_empty() => {
                bail!("--auth header needs --header, --header-env or --public-header")
            }
            AuthKind::Query if params.is_empty() => {
                bail!("--auth query needs --param or --param-env")
            }
            AuthKind::Profile => {
                let name = self
                    .profile
                    .clone()
                    .ok_or_else(|| anyhow!("--auth profile needs --profile"))?;
                auth.insert("name".into(), Value::String(name));
            }
            AuthKind::Header | AuthKind::Query | AuthKind::Custom => {
                if let Some(username) = &self.username {
                    auth.insert("username".into(), Value::String(username.clone()));
                }
            }
        }
        if takes_basic {
            if let Some(password) = password {
                auth.insert(
                    "password".into(),
                    Value::String(password.expose().to_string()),
                );
            }
        }
        if takes_headers && !headers.is_empty() {
            let list = headers
                .iter()
                .map(|h| {
                    serde_json::json!({
                        "name": h.name, "value": h.value.expose(), "secret": h.secret
                    })
                })
                .collect();
            auth.insert("headers".into(), Value::Array(list));
        }
        if takes_params && !params.is_empty() {
            auth.insert("params".into(), Value::Object(params));
        }
        Ok(Value::Object(auth))
    }

    /// The `tls` object of the TLS flags, `None` when none is given. PEM files are read whole;
    /// errors name the flag and the file, never the content.
    fn tls_json(&self) -> anyhow::Result<Option<Value>> {
        let read = |flag: &str, path: &Path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("{flag}: reading {}", path.display()))
        };
        let mut tls = serde_json::Map::new();
        if let Some(path) = &self.client_cert {
            tls.insert(
                "client_certificate".into(),
                Value::String(read("--client-cert", path)?),
            );
        }
        if let Some(path) = &self.client_key {
            tls.insert(
                "client_key".into(),
                Value::String(read("--client-key", path)?),
            );
        }
        if let Some(path) = &self.ca_cert {
            tls.insert(
                "ca_certificate".into(),
                Value::String(read("--ca-cert", path)?),
            );
        }
        if self.insecure_skip_verify {
            tls.insert("insecure_skip_verify".into(), Value::Bool(true));
        }
        Ok((!tls.is_empty()).then_some(Value::Object(tls)))
    }

    /// The request body (the definition's JSON, as the API takes it) for connection `name`.
    ///
    /// Secrets not given are left out, so that `update` keeps the stored ones. For `create`
    /// (`update == false`) the definition is also checked locally with
    /// [`ConnectionDefinition::validate`], so that mistakes are reported by flag before anything
    /// is sent; an update is checked by the relay, which knows the stored secrets.
    ///
    /// # Errors
    /// Missing `--base-url`, flags that contradict the auth type, unreadable sources, or a
    /// validation failure naming the flag. Messages never contain a secret.
    pub fn to_body(
        &self,
        name: &str,
        update: bool,
        sources: &mut Sources<'_>,
    ) -> anyhow::Result<Value> {
        let base_url = self
            .base_url
            .as_deref()
            .ok_or_else(|| anyhow!("--base-url is required (or use --from-file)"))?;
        // url's messages do not quote the input.
        Url::parse(base_url).map_err(|e| anyhow!("--base-url: {e}"))?;
        let password = self.read_password(sources)?;
        let headers = self.header_flags(sources)?;
        let params = self.param_flags(sources)?;
        let auth = self.auth_json(password, &headers, params)?;
        let defaults = TestRequest::default();
        let mut network = serde_json::json!({ "private": self.private });
        if let Some(group) = &self.agent_group {
            network["agent_group"] = Value::String(group.clone());
        }
        let mut body = serde_json::json!({
            "name": name,
            "base_url": base_url,
            "auth": auth,
            "network": network,
            "test_request": {
                "method": self.test_method.clone().unwrap_or(defaults.method),
                "path": self.test_path.clone().unwrap_or(defaults.path),
            },
            "response_timeout_ms": self.response_timeout_ms.unwrap_or(60_000),
        });
        if let Some(tls) = self.tls_json()? {
            body["tls"] = tls;
        }
        if !update {
            // serde messages may quote values: report only that the model refused, by field.
            let definition: ConnectionDefinition = serde_path_to_error::deserialize(&body)
                .map_err(|e| {
                    anyhow!(
                        "{}: not accepted by the model",
                        flag_of(&e.path().to_string(), &headers)
                    )
                })?;
            definition
                .validate()
                .map_err(|e| anyhow!("{}: {}", flag_of(&e.field, &headers), e.message))?;
        }
        Ok(body)
    }
}

/// The flag that sets a definition field, for error messages. `headers` maps
/// `auth.headers[i]` to the header's flag and name.
fn flag_of(field: &str, headers: &[HeaderFlag]) -> String {
    if let Some(rest) = field.strip_prefix("auth.headers[") {
        let index = rest.split(']').next().and_then(|i| i.parse::<usize>().ok());
        if let Some(h) = index.and_then(|i| headers.get(i)) {
            return format!("{} {}", h.flag, h.name);
        }
        return "--header".into();
    }
    if field.starts_with("auth.params") {
        return "--param".into();
    }
    match field {
        "name" => "--name".into(),
        "auth" | "auth.type" => "--auth".into(),
        "auth.username" => "--username".into(),
        "auth.password" => "--password".into(),
        "auth.name" => "--profile".into(),
        "tls.client_certificate" => "--client-cert".into(),
        "tls.client_key" => "--client-key".into(),
        "tls.ca_certificate" => "--ca-cert".into(),
        "tls.insecure_skip_verify" => "--insecure-skip-verify".into(),
        "network.agent_group" => "--agent-group".into(),
        "network.private" => "--private".into(),
        "test_request.method" => "--test-method".into(),
        "test_request.path" => "--test-path".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// The request body for `create` / `update`: the file's JSON, or the flags' definition.
fn connection_body(
    name: Option<&str>,
    update: bool,
    flags: &ConnectionFlags,
) -> anyhow::Result<Value> {
    if let Some(path) = &flags.from_file {
        let text = if path == Path::new("-") {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the definition from stdin")?;
            s
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        // serde_json syntax errors do not quote the input.
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()));
    }
    let name = name.ok_or_else(|| anyhow!("--name is required (or use --from-file)"))?;
    let env = |var: &str| std::env::var(var).ok();
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let mut sources = Sources {
        stdin: &mut stdin,
        env: &env,
    };
    flags.to_body(name, update, &mut sources)
}

// ---- HTTP ----

/// The rustls configuration: system roots plus the certificates of `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as the system would.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?;
        let certs = airlock_shared::exec::parse_certificates(&pem)
            .map_err(|e| anyhow!("CA file {}: {e}", path.display()))?;
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("CA file {}", path.display()))?;
        }
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(airlock_shared::exec::crypto_provider())
            .with_safe_default_protocol_versions()
            .context("TLS configuration")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    // The relay speaks HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A configured connection to the relay's API.
struct Client {
    http: reqwest::Client,
    base: Url,
    authorization: HeaderValue,
}

impl Client {
    fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let base = args
            .relay_url
            .clone()
            .ok_or_else(|| anyhow!("no relay: set AIRLOCK_RELAY_URL or --relay-url"))?;
        if !matches!(base.scheme(), "https" | "http") || base.cannot_be_a_base() {
            bail!("--relay-url must be an https:// URL such as https://127.0.0.1:8443");
        }
        let token = args
            .token
            .as_ref()
            .ok_or_else(|| anyhow!("no admin token: set AIRLOCK_TOKEN or --token"))?;
        // The error of `from_str` does not include the value.
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| anyhow!("the admin token contains characters not allowed in a header"))?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(args.ca_file.as_deref())?)
            .http1_only()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Never follow a redirect with the token.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("airlock-relay-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base,
            authorization,
        })
    }

    /// `base` with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        endpoint(&self.base, segments)
    }

    /// Sends a request; `Ok(None)` for an empty success answer (204).
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Option<Value>> {
        let url = self.url(segments);
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let hint = if error_chain(&e).contains("invalid peer certificate") {
                    " (is the relay's CA trusted? set AIRLOCK_CA_FILE or --ca-file, e.g. to \
                     <data-dir>/tls/ca.pem)"
                } else {
                    ""
                };
                return Err(anyhow::Error::new(e)
                    .context(format!("{method} {url}: cannot reach the relay{hint}")));
            }
        };
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{method} {url}: reading the answer"))?;
        if status.is_success() {
            if bytes.is_empty() || status == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            let value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{method} {url}: the answer is not JSON"))?;
            return Ok(Some(value));
        }
        Err(answer_error(status, &bytes))
    }
}

/// The messages of `e` and its sources, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `base` with `segments` appended, each percent-encoded; a trailing `/` of `base` is dropped.
fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// The error for a non-success answer: `<title>: <detail>` of a problem, else the status and
/// the start of the body.
fn answer_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    if let Ok(problem) = serde_json::from_slice::<Value>(body) {
        let title = problem.get("title").and_then(Value::as_str);
        let detail = problem.get("detail").and_then(Value::as_str);
        match (title, detail) {
            (Some(t), Some(d)) => return anyhow!("{t}: {d}"),
            (Some(t), None) => return anyhow!("{t}"),
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(200).collect();
    if text.is_empty() {
        anyhow!("HTTP {status}")
    } else {
        anyhow!("HTTP {status}: {text}")
    }
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encoding the answer")?
    );
    Ok(())
}

/// A compact table: columns separated by two spaces, the last one unpadded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn agents_table(answer: &Value) -> String {
    let empty = Vec::new();
    let agents = answer
        .get("agents")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let sessions = a
                .get("sessions")
                .and_then(Value::as_array)
                .unwrap_or(&empty);
            let hosts: Vec<&str> = sessions.iter().map(|s| str_of(s, "hostname")).collect();
            vec![
                str_of(a, "id").to_string(),
                str_of(a, "name").to_string(),
                str_of(a, "group").to_string(),
                str_of(a, "status").to_string(),
                a.get("created_at_ms")
                    .and_then(Value::as_i64)
                    .map(format_ms)
                    .unwrap_or_default(),
                hosts.join(","),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "GROUP", "STATUS", "CREATED", "HOSTS"],
        &rows,
    )
}

fn connections_table(answer: &Value) -> String {
    let empty = Vec::new();
    let connections = answer
        .get("connections")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let rows: Vec<Vec<String>> = connections
        .iter()
        .map(|c| {
            let network = c.get("network").cloned().unwrap_or(Value::Null);
            let private = network
                .get("private")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let network = if private {
                format!("private ({})", str_of(&network, "agent_group"))
            } else {
                "public".to_string()
            };
            let auth = c
                .get("auth")
                .map(|a| str_of(a, "type").to_string())
                .unwrap_or_default();
            vec![
                str_of(c, "name").to_string(),
                auth,
                network,
                str_of(c, "base_url").to_string(),
            ]
        })
        .collect();
    table(&["NAME", "AUTH", "NETWORK", "BASE_URL"], &rows)
}

/// The summary line of a test answer, and whether the test passed.
fn test_summary(answer: &Value) -> (bool, String) {
    let ok = answer.get("ok").and_then(Value::as_bool).unwrap_or(false);
    let via = match answer.get("agent").filter(|a| !a.is_null()) {
        Some(agent) => format!(
            "via agent {} ({})",
            str_of(agent, "name"),
            str_of(agent, "hostname")
        ),
        None => "via the relay".to_string(),
    };
    let status = answer.get("status").and_then(Value::as_u64);
    if ok {
        let latency = answer
            .get("latency_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let status = status.map_or_else(|| "-".to_string(), |s| s.to_string());
        return (true, format!("ok: {status} in {latency} ms {via}"));
    }
    match answer.get("error").filter(|e| !e.is_null()) {
        Some(error) => (
            false,
            format!(
                "failed: {}: {}",
                str_of(error, "kind"),
                str_of(error, "message")
            ),
        ),
        None => (
            false,
            format!(
                "failed: http_status: {}",
                status.map_or_else(|| "no status".to_string(), |s| format!("HTTP {s}"))
            ),
        ),
    }
}

/// Runs `airlock-relay agents …`.
///
/// # Errors
/// Configuration (relay URL, token, CA file), transport failures, and problem answers as
/// `<title>: <detail>`.
pub async fn run_agents(args: &ClientArgs, cmd: AgentsCommand) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    match cmd {
        AgentsCommand::Create { name, group } => {
            let body = serde_json::json!({ "name": name, "group": group });
            let answer = client
                .send(
                    Method::POST,
                    &["v1", "agents"],
                    Some(&body),
                    REQUEST_TIMEOUT,
                )
                .await?
                .ok_or_else(|| anyhow!("the relay answered without the agent"))?;
            print_json(&answer)?;
            eprintln!(
                "note: the agent token is shown only now; give it to the agent (--token-file)"
            );
        }
        AgentsCommand::List => {
            let answer = client
                .send(Method::GET, &["v1", "agents"], None, REQUEST_TIMEOUT)
                .await?
                .unwrap_or(Value::Null);
            print!("{}", agents_table(&answer));
        }
        AgentsCommand::Revoke { id } => {
            client
                .send(
                    Method::DELETE,
                    &["v1", "agents", &id],
                    None,
                    REQUEST_TIMEOUT,
                )
                .await?;
            println!("revoked agent {id}");
        }
    }
    Ok(())
}

/// Runs `airlock-relay connections …`.
///
/// # Errors
/// Configuration (relay URL, token, CA file, bad flags), transport failures, problem answers
/// as `<title>: <detail>`, and [`Reported`] when `test` ran and failed.
pub async fn run_connections(args: &ClientArgs, cmd: ConnectionsCommand) -> anyhow::Result<()> {
    // Flags are checked before any network traffic.
    let body = match &cmd {
        ConnectionsCommand::Create { name, definition } => {
            Some(connection_body(name.as_deref(), false, definition)?)
        }
        ConnectionsCommand::Update { name, definition } => {
            Some(connection_body(Some(name), true, definition)?)
        }
        _ => None,
    };
    let client = Client::new(args)?;
    match cmd {
        ConnectionsCommand::Create { .. } => {
            let answer = client
                .send(
                    Method::POST,
                    &["v1", "connections"],
                    body.as_ref(),
                    REQUEST_TIMEOUT,
                )
                .await?
                .unwrap_or(Value::Null);
            print_json(&answer)?;
        }
        ConnectionsCommand::Update { name, .. } => {
            let answer = client
                .send(
                    Method::PUT,
                    &["v1", "connections", &name],
                    body.as_ref(),
                    REQUEST_TIMEOUT,
                )
                .await?
                .unwrap_or(Value::Null);
            print_json(&answer)?;
        }
        ConnectionsCommand::List => {
            let answer = client
                .send(Method::GET, &["v1", "connections"], None, REQUEST_TIMEOUT)
                .await?
                .unwrap_or(Value::Null);
            print!("{}", connections_table(&answer));
        }
        ConnectionsCommand::Get { name } => {
            let answer = client
                .send(
                    Method::GET,
                    &["v1", "connections", &name],
                    None,
                    REQUEST_TIMEOUT,
                )
                .await?
                .unwrap_or(Value::Null);
            print_json(&answer)?;
        }
        ConnectionsCommand::Delete { name } => {
            client
                .send(
                    Method::DELETE,
                    &["v1", "connections", &name],
                    None,
                    REQUEST_TIMEOUT,
                )
                .await?;
            println!("deleted connection {name}");
        }
        ConnectionsCommand::Test { name } => {
            let answer = client
                .send(
                    Method::POST,
                    &["v1", "connections", &name, "test"],
                    None,
                    TEST_TIMEOUT,
                )
                .await?
                .unwrap_or(Value::Null);
            print_json(&answer)?;
            let (ok, line) = test_summary(&answer);
            eprintln!("{line}");
            if !ok {
                return Err(Reported.into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ConnectionsCommand,
    }

    fn parse(args: &[&str]) -> Result<ConnectionsCommand, clap::Error> {
        let mut argv = vec!["airlock-relay"];
        argv.extend_from_slice(args);
        TestCli::try_parse_from(argv).map(|c| c.command)
    }

    fn flags_of(cmd: ConnectionsCommand) -> (Option<String>, ConnectionFlags) {
        match cmd {
            ConnectionsCommand::Create { name, definition } => (name, *definition),
            ConnectionsCommand::Update { name, definition } => (Some(name), *definition),
            other => panic!("{other:?}"),
        }
    }

    /// Sources with no stdin and an environment of `vars`.
    fn body_with(args: &[&str], vars: &[(&str, &str)], stdin: &[u8]) -> anyhow::Result<Value> {
        let cmd = parse(args).map_err(|e| anyhow!("{e}"))?;
        let update = matches!(cmd, ConnectionsCommand::Update { .. });
        let (name, flags) = flags_of(cmd);
        let env = |var: &str| {
            vars.iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| v.to_string())
        };
        let mut stdin = stdin;
        let mut sources = Sources {
            stdin: &mut stdin,
            env: &env,
        };
        flags.to_body(&name.unwrap(), update, &mut sources)
    }

    fn body_of(args: &[&str]) -> anyhow::Result<Value> {
        body_with(args, &[], b"")
    }

    fn create(rest: &[&str]) -> Vec<&'static str> {
        let mut args = vec!["create", "--name", "c", "--base-url", "https://app.example"];
        // The tests only pass literals.
        args.extend(
            rest.iter()
                .map(|s| &*Box::leak(s.to_string().into_boxed_str())),
        );
        args
    }

    #[test]
    fn flags_make_a_definition() {
        let body = body_of(&[
            "create",
            "--name",
            "jira",
            "--base-url",
            "https://jira.corp.example:8443",
            "--username",
            "svc",
            "--password",
            "pw",
            "--private",
            "--agent-group",
            "dc1",
            "--test-path",
            "/rest/api/2/myself",
            "--test-method",
            "HEAD",
        ])
        .unwrap();
        assert_eq!(
            body,
            json!({
                "name": "jira",
                "base_url": "https://jira.corp.example:8443",
                "auth": {"type": "basic", "username": "svc", "password": "pw"},
                "network": {"private": true, "agent_group": "dc1"},
                "test_request": {"method": "HEAD", "path": "/rest/api/2/myself"},
                "response_timeout_ms": 60000
            })
        );
        // The API takes it as it is.
        let definition: ConnectionDefinition = serde_json::from_value(body).unwrap();
        definition.validate().unwrap();
    }

    #[test]
    fn minimal_flags_use_defaults() {
        let body = body_of(&["create", "--name", "x", "--base-url", "http://a"]).unwrap();
        assert_eq!(body["auth"], json!({"type": "none"}));
        assert_eq!(body["network"], json!({"private": false}));
        assert_eq!(body["test_request"], json!({"method": "GET", "path": "/"}));
        assert_eq!(body["response_timeout_ms"], 60000);
        assert!(body.get("tls").is_none());
    }

    #[test]
    fn header_flags() {
        let vars = [("TOKEN_VAR", "from-env-secret")];
        let body = body_with(
            &create(&[
                "--auth",
                "header",
                "--header",
                "Authorization: Bearer abc def",
                "--header",
                "X-Empty:",
                "--header-env",
                "X-Api-Key=TOKEN_VAR",
                "--public-header",
                "X-Tenant:\tacme ",
            ]),
            &vars,
            b"",
        )
        .unwrap();
        assert_eq!(
            body["auth"],
            json!({"type": "header", "headers": [
                {"name": "Authorization", "value": "Bearer abc def", "secret": true},
                {"name": "X-Empty", "value": "", "secret": true},
                {"name": "X-Api-Key", "value": "from-env-secret", "secret": true},
                {"name": "X-Tenant", "value": "acme", "secret": false},
            ]})
        );
        // --auth is inferred from the header flags.
        let inferred = body_of(&create(&["--header", "X-Api-Key: k"])).unwrap();
        assert_eq!(inferred["auth"]["type"], "header");
    }

    #[test]
    fn query_flags() {
        let vars = [("SIG", "s=ig/+")];
        let body = body_with(
            &create(&["--param", "api_key=a=b c", "--param-env", "sig=SIG"]),
            &vars,
            b"",
        )
        .unwrap();
        assert_eq!(
            body["auth"],
            json!({"type": "query", "params": {"api_key": "a=b c", "sig": "s=ig/+"}})
        );
    }

    #[test]
    fn custom_flags_combine() {
        let body = body_with(
            &create(&[
                "--username",
                "svc",
                "--password-stdin",
                "--header",
                "X-Api-Key: k",
                "--param",
                "tenant=acme",
            ]),
            &[],
            b"stdin-pw\n",
        )
        .unwrap();
        assert_eq!(
            body["auth"],
            json!({
                "type": "custom", "username": "svc", "password": "stdin-pw",
                "headers": [{"name": "X-Api-Key", "value": "k", "secret": true}],
                "params": {"tenant": "acme"}
            })
        );
        let explicit = body_with(
            &create(&["--auth", "custom", "--header", "X-Api-Key: k"]),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(explicit["auth"]["type"], "custom");
        assert!(explicit["auth"].get("username").is_none());
    }

    #[test]
    fn profile_flags() {
        let body = body_of(&create(&[
            "--profile",
            "jira",
            "--private",
            "--agent-group",
            "dc1",
        ]))
        .unwrap();
        assert_eq!(body["auth"], json!({"type": "profile", "name": "jira"}));
        // A profile is resolved by an agent: private connections only (checked locally).
        let e = body_of(&create(&["--auth", "profile", "--profile", "jira"])).unwrap_err();
        assert!(e.to_string().contains("--auth"), "{e}");
        let e = body_of(&create(&["--auth", "profile"])).unwrap_err();
        assert!(e.to_string().contains("--profile"), "{e}");
    }

    #[test]
    fn tls_flags_read_files() {
        let dir = std::env::temp_dir().join(format!("airlock-cli-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file, ca_file) =
            (dir.join("c.pem"), dir.join("k.pem"), dir.join("ca.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let path = |p: &Path| p.display().to_string();
        let body = body_of(&create(&[
            "--client-cert",
            &path(&cert_file),
            "--client-key",
            &path(&key_file),
            "--ca-cert",
            &path(&ca_file),
            "--insecure-skip-verify",
        ]))
        .unwrap();
        assert_eq!(
            body["tls"],
            json!({
                "client_certificate": cert.pem(),
                "client_key": key.serialize_pem(),
                "ca_certificate": cert.pem(),
                "insecure_skip_verify": true
            })
        );
        // A key that does not match the certificate: named by flag, never quoted.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_file, other.serialize_pem()).unwrap();
        let e = body_err(&[
            "--client-cert",
            &path(&cert_file),
            "--client-key",
            &path(&key_file),
        ]);
        assert!(e.starts_with("--client-key: "), "{e}");
        assert!(!e.contains("PRIVATE KEY"), "{e}");
        // An unreadable file: named.
        let e = body_err(&["--ca-cert", &path(&dir.join("missing.pem"))]);
        assert!(e.contains("--ca-cert") && e.contains("missing.pem"), "{e}");
        // --client-cert needs --client-key (clap).
        assert!(parse(&create(&["--client-cert", "c.pem"])).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn body_err(rest: &[&str]) -> String {
        body_of(&create(rest)).unwrap_err().to_string()
    }

    #[test]
    fn update_leaves_omitted_secrets_out() {
        let body = body_of(&[
            "update",
            "jira",
            "--base-url",
            "https://jira.example",
            "--auth",
            "basic",
            "--username",
            "svc",
        ])
        .unwrap();
        assert_eq!(body["auth"], json!({"type": "basic", "username": "svc"}));
        // An update is validated by the relay, which knows the stored client key.
        let body = body_with(
            &[
                "update",
                "jira",
                "--base-url",
                "https://jira.example",
                "--client-cert",
                "/dev/null",
                "--client-key",
                "/dev/null",
            ],
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(body["tls"]["client_key"], "");
    }

    #[test]
    fn password_from_stdin_strips_the_line_end() {
        let body = body_with(
            &create(&["--username", "u", "--password-stdin"]),
            &[],
            b"s3cret\r\nignored\n",
        )
        .unwrap();
        assert_eq!(body["auth"]["password"], "s3cret");
        let body = body_with(
            &create(&["--username", "u", "--password-env", "PW"]),
            &[("PW", "from-env")],
            b"",
        )
        .unwrap();
        assert_eq!(body["auth"]["password"], "from-env");
    }

    #[test]
    fn unset_variables_are_named_not_valued() {
        for (flag, value) in [
            ("--password-env", "AIRLOCK_TEST_UNSET"),
            ("--header-env", "X-Key=AIRLOCK_TEST_UNSET"),
            ("--param-env", "key=AIRLOCK_TEST_UNSET"),
        ] {
            let mut rest = vec![flag, value];
            if flag == "--password-env" {
                rest.extend(["--username", "u"]);
            }
            let e = body_err(&rest);
            assert!(e.contains(flag) && e.contains("AIRLOCK_TEST_UNSET"), "{e}");
        }
    }

    #[test]
    fn bad_flags_name_the_flag_and_never_the_secret() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["create", "--name", "a b", "--base-url", "http://a"],
                "--name",
            ),
            (
                &["create", "--name", "a", "--base-url", "ftp://a"],
                "--base-url",
            ),
            (
                &["create", "--name", "a", "--base-url", "nope"],
                "--base-url",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "basic",
                ],
                "--username",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--test-path",
                    "x",
                ],
                "--test-path",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--header",
                    "hunter2",
                ],
                "--header #1",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--header",
                    "Bad Name: hunter2",
                ],
                "--header Bad Name",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--header",
                    "X-K: hunter2\r\nX-I: 1",
                ],
                "--header X-K",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--param",
                    "hunter2",
                ],
                "--param #1",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "header",
                ],
                "--auth header",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "query",
                    "--header",
                    "X: hunter2",
                ],
                "--auth query",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "none",
                    "--password",
                    "hunter2",
                ],
                "--auth none",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "basic",
                    "--username",
                    "u",
                    "--param",
                    "k=hunter2",
                ],
                "--auth basic",
            ),
            (
                &[
                    "create",
                    "--name",
                    "a",
                    "--base-url",
                    "http://a",
                    "--auth",
                    "custom",
                    "--password",
                    "hunter2",
                ],
                "--password",
            ),
        ];
        for (args, flag) in cases {
            let err = body_of(args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
            assert!(!err.contains("hunter2"), "{args:?}: {err}");
        }
    }

    #[test]
    fn clap_refuses_contradictions() {
        for args in [
            // --from-file excludes every definition flag and --name.
            &["create", "--from-file", "f.json", "--base-url", "http://a"][..],
            &["create", "--from-file", "f.json", "--name", "x"],
            // --name or --from-file is required, and --base-url with --name.
            &["create"],
            &["create", "--name", "x"],
            // One password source.
            &[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--password",
                "p",
                "--password-stdin",
            ],
            // --private and --agent-group go together.
            &[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--private",
            ],
            &[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--agent-group",
                "g",
            ],
            &[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--auth",
                "digest",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        let (name, flags) = flags_of(parse(&["create", "--from-file", "f.json"]).unwrap());
        assert_eq!(
            (name, flags.from_file),
            (None, Some(PathBuf::from("f.json")))
        );
        assert!(parse(&["update", "jira", "--from-file", "-"]).is_ok());
        // Client flags are accepted after the subcommand too.
        assert!(parse(&["get", "jira", "--relay-url", "https://r.example:8443"]).is_ok());
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let (_, flags) = flags_of(
            parse(&[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--username",
                "u",
                "--password",
                "hunter2",
                "--header",
                "X-Key: hunter4",
                "--param",
                "k=hunter5",
                "--token",
                "alk_admin_hunter3",
            ])
            .unwrap(),
        );
        let debug = format!("{flags:?}");
        for secret in ["hunter2", "hunter4", "hunter5"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let cli =
            TestCli::try_parse_from(["airlock-relay", "--token", "alk_admin_hunter3", "list"])
                .unwrap();
        assert!(!format!("{cli:?}").contains("hunter3"));
    }

    #[test]
    fn endpoints_encode_segments_and_keep_prefixes() {
        let base: Url = "https://relay.example:8443".parse().unwrap();
        assert_eq!(
            endpoint(&base, &["v1", "connections", "a b/c"]).as_str(),
            "https://relay.example:8443/v1/connections/a%20b%2Fc"
        );
        let prefixed: Url = "https://relay.example/airlock/".parse().unwrap();
        assert_eq!(
            endpoint(&prefixed, &["v1", "agents"]).as_str(),
            "https://relay.example/airlock/v1/agents"
        );
    }

    #[test]
    fn problems_become_title_and_detail() {
        let body = json!({
            "type": "https://airlock.dev/problems/not_found", "title": "Not found",
            "status": 404, "detail": "no connection named 'x'"
        });
        let err = answer_error(StatusCode::NOT_FOUND, body.to_string().as_bytes());
        assert_eq!(err.to_string(), "Not found: no connection named 'x'");
        let err = answer_error(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert_eq!(err.to_string(), "HTTP 502 Bad Gateway: upstream down");
    }

    #[test]
    fn test_summaries() {
        let ok = json!({
            "ok": true, "status": 200, "latency_ms": 12,
            "agent": {"id": "i", "name": "edge-1", "hostname": "host-a"}, "error": null
        });
        assert_eq!(
            test_summary(&ok),
            (
                true,
                "ok: 200 in 12 ms via agent edge-1 (host-a)".to_string()
            )
        );
        let public =
            json!({"ok": true, "status": 204, "latency_ms": 3, "agent": null, "error": null});
        assert_eq!(test_summary(&public).1, "ok: 204 in 3 ms via the relay");
        let failed = json!({
            "ok": false, "status": null, "latency_ms": 5, "agent": null,
            "error": {"kind": "dns", "message": "no such host"}
        });
        assert_eq!(
            test_summary(&failed),
            (false, "failed: dns: no such host".to_string())
        );
    }

    #[test]
    fn tables() {
        let agents = json!({"agents": [
            {"id": "1", "name": "edge-1", "group": "dc1", "created_at_ms": 0,
             "revoked": false, "status": "online",
             "sessions": [{"hostname": "host-a"}, {"hostname": "host-b"}]},
            {"id": "2", "name": "e2", "group": "dc2", "created_at_ms": 1_700_000_000_000_i64,
             "revoked": true, "status": "revoked", "sessions": []}
        ]});
        assert_eq!(
            agents_table(&agents),
            "ID  NAME    GROUP  STATUS   CREATED               HOSTS\n\
             1   edge-1  dc1    online   1970-01-01 00:00:00Z  host-a,host-b\n\
             2   e2      dc2    revoked  2023-11-14 22:13:20Z\n"
        );
        let connections = json!({"connections": [
            {"name": "jira", "base_url": "https://jira.example/", "auth": {"type": "basic"},
             "network": {"private": true, "agent_group": "dc1"}},
            {"name": "gh", "base_url": "https://api.github.com/", "auth": {"type": "none"},
             "network": {"private": false}}
        ]});
        assert_eq!(
            connections_table(&connections),
            "NAME  AUTH   NETWORK        BASE_URL\n\
             jira  basic  private (dc1)  https://jira.example/\n\
             gh    none   public         https://api.github.com/\n"
        );
    }

    #[test]
    fn ca_file_is_loaded() {
        let dir = std::env::temp_dir().join(format!("airlock-cli-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        assert!(tls_config(Some(&ca)).is_ok());
        std::fs::write(&ca, "not pem").unwrap();
        assert!(tls_config(Some(&ca)).is_err());
        assert!(tls_config(Some(&dir.join("missing.pem"))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
