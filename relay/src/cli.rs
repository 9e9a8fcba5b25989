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

use airlock_shared::model::{
    Auth, ConnectionDefinition, Network, Secret, TestRequest, TlsSettings,
};
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
        definition: ConnectionFlags,
    },
    /// Replace a connection's definition. Omitted secrets keep their stored value.
    Update {
        /// The connection to replace.
        name: String,
        /// The new definition.
        #[command(flatten)]
        definition: ConnectionFlags,
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

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthKind {
    /// No credentials.
    None,
    /// HTTP Basic (RFC 7617): --username and a password.
    Basic,
}

/// A connection definition given as flags, or the file holding it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectionFlags {
    /// Read the whole definition (JSON, as the API takes it) from FILE; `-` reads stdin.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "base_url", "auth", "username", "password", "password_env", "password_stdin",
            "private", "agent_group", "test_path", "test_method", "response_timeout_ms",
        ]
    )]
    pub from_file: Option<PathBuf>,
    /// Base URL of the app (http or https, no query).
    #[arg(long, value_name = "URL", required_unless_present = "from_file")]
    pub base_url: Option<String>,
    /// Authentication; `basic` when --username is given, otherwise `none`.
    #[arg(long, value_enum, value_name = "TYPE")]
    pub auth: Option<AuthKind>,
    /// Basic auth user name (or API key).
    #[arg(long, value_name = "USER")]
    pub username: Option<String>,
    /// Basic auth password. Visible to other local users; prefer --password-env or
    /// --password-stdin.
    #[arg(
        long,
        value_name = "PASSWORD",
        value_parser = parse_secret,
        conflicts_with_all = ["password_env", "password_stdin"]
    )]
    pub password: Option<Secret>,
    /// Read the password from the environment variable VAR.
    #[arg(long, value_name = "VAR", conflicts_with = "password_stdin")]
    pub password_env: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
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

impl ConnectionFlags {
    /// True when the password comes from one of the password flags.
    pub fn password_given(&self) -> bool {
        self.password.is_some() || self.password_env.is_some() || self.password_stdin
    }

    /// Reads the password from its source: `--password`, the variable of `--password-env`, or the
    /// first line of `stdin` (without its line ending) with `--password-stdin`. `None` when no
    /// password flag is given.
    ///
    /// # Errors
    /// The variable is unset or not UTF-8; stdin cannot be read.
    pub fn read_password(&self, stdin: &mut dyn BufRead) -> anyhow::Result<Option<Secret>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(var) = &self.password_env {
            let value = std::env::var(var)
                .map_err(|_| anyhow!("--password-env: environment variable {var} is not set"))?;
            return Ok(Some(Secret::new(value)));
        }
        if self.password_stdin {
            let mut line = String::new();
            stdin
                .read_line(&mut line)
                .context("--password-stdin: reading stdin")?;
            let value = line.trim_end_matches(['\n', '\r']);
            return Ok(Some(Secret::new(value)));
        }
        Ok(None)
    }

    /// The definition the flags describe, named `name`, checked with
    /// [`ConnectionDefinition::validate`]. `password` is the value read by
    /// [`ConnectionFlags::read_password`]; without one a basic password is empty.
    ///
    /// # Errors
    /// Missing `--base-url`, contradictory auth flags, or a validation failure naming the flag.
    pub fn to_definition(
        &self,
        name: &str,
        password: Option<Secret>,
    ) -> anyhow::Result<ConnectionDefinition> {
        let base_url = self
            .base_url
            .as_deref()
            .ok_or_else(|| anyhow!("--base-url is required (or use --from-file)"))?;
        let base_url = Url::parse(base_url).map_err(|e| anyhow!("--base-url: {e}"))?;
        let kind = self.auth.unwrap_or(if self.username.is_some() {
            AuthKind::Basic
        } else {
            AuthKind::None
        });
        let auth = match kind {
            AuthKind::None => {
                if self.username.is_some() || password.is_some() {
                    bail!("--username and passwords need --auth basic");
                }
                Auth::None
            }
            AuthKind::Basic => Auth::Basic {
                username: self
                    .username
                    .clone()
                    .ok_or_else(|| anyhow!("--auth basic needs --username"))?,
                password: password.unwrap_or_default(),
            },
        };
        let defaults = TestRequest::default();
        let definition = ConnectionDefinition {
            name: name.to_string(),
            base_url,
            auth,
            tls: TlsSettings::default(),
            network: Network {
                private: self.private,
                agent_group: self.agent_group.clone(),
            },
            test_request: TestRequest {
                method: self.test_method.clone().unwrap_or(defaults.method),
                path: self.test_path.clone().unwrap_or(defaults.path),
            },
            response_timeout_ms: self.response_timeout_ms.unwrap_or(60_000),
        };
        definition
            .validate()
            .map_err(|e| anyhow!("{}: {}", flag_of(&e.field), e.message))?;
        Ok(definition)
    }
}

/// The flag that sets a definition field, for error messages.
fn flag_of(field: &str) -> String {
    match field {
        "name" => "--name".into(),
        "auth.username" => "--username".into(),
        "auth.password" => "--password".into(),
        "network.agent_group" => "--agent-group".into(),
        "test_request.method" => "--test-method".into(),
        "test_request.path" => "--test-path".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// The request body for a definition given as flags. Without a password flag the password is
/// left out, so that `update` keeps the stored one (and `create` stores an empty one).
fn body_from_flags(
    definition: &ConnectionDefinition,
    password_given: bool,
) -> anyhow::Result<Value> {
    let mut body = serde_json::to_value(definition).context("encoding the definition")?;
    if !password_given {
        if let Some(auth) = body.get_mut("auth").and_then(Value::as_object_mut) {
            auth.remove("password");
        }
    }
    Ok(body)
}

/// The request body for `create` / `update`: the file's JSON, or the flags' definition.
fn connection_body(name: Option<&str>, flags: &ConnectionFlags) -> anyhow::Result<Value> {
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
    let password = flags.read_password(&mut std::io::stdin().lock())?;
    let definition = flags.to_definition(name, password)?;
    body_from_flags(&definition, flags.password_given())
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
            Some(connection_body(name.as_deref(), definition)?)
        }
        ConnectionsCommand::Update { name, definition } => {
            Some(connection_body(Some(name), definition)?)
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
            ConnectionsCommand::Create { name, definition } => (name, definition),
            ConnectionsCommand::Update { name, definition } => (Some(name), definition),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_make_a_definition() {
        let (name, flags) = flags_of(
            parse(&[
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
            .unwrap(),
        );
        let password = flags.read_password(&mut &b""[..]).unwrap();
        let definition = flags.to_definition(&name.unwrap(), password).unwrap();
        assert_eq!(
            definition,
            ConnectionDefinition {
                name: "jira".into(),
                base_url: "https://jira.corp.example:8443".parse().unwrap(),
                auth: Auth::Basic {
                    username: "svc".into(),
                    password: Secret::new("pw"),
                },
                tls: TlsSettings::default(),
                network: Network {
                    private: true,
                    agent_group: Some("dc1".into()),
                },
                test_request: TestRequest {
                    method: "HEAD".into(),
                    path: "/rest/api/2/myself".into(),
                },
                response_timeout_ms: 60_000,
            }
        );
        let body = body_from_flags(&definition, flags.password_given()).unwrap();
        assert_eq!(body["auth"]["password"], "pw");
    }

    #[test]
    fn minimal_flags_use_defaults() {
        let (name, flags) =
            flags_of(parse(&["create", "--name", "x", "--base-url", "http://a"]).unwrap());
        let definition = flags.to_definition(&name.unwrap(), None).unwrap();
        assert_eq!(definition.auth, Auth::None);
        assert_eq!(definition.network, Network::default());
        assert_eq!(definition.test_request, TestRequest::default());
        assert_eq!(definition.response_timeout_ms, 60_000);
    }

    #[test]
    fn update_without_password_leaves_it_out() {
        let (name, flags) = flags_of(
            parse(&[
                "update",
                "jira",
                "--base-url",
                "https://jira.example",
                "--auth",
                "basic",
                "--username",
                "svc",
            ])
            .unwrap(),
        );
        assert_eq!(name.as_deref(), Some("jira"));
        assert!(!flags.password_given());
        let definition = flags.to_definition("jira", None).unwrap();
        let body = body_from_flags(&definition, false).unwrap();
        assert_eq!(body["auth"], json!({"type": "basic", "username": "svc"}));
    }

    #[test]
    fn password_from_stdin_strips_the_line_end() {
        let (_, flags) = flags_of(
            parse(&[
                "create",
                "--name",
                "x",
                "--base-url",
                "http://a",
                "--username",
                "u",
                "--password-stdin",
            ])
            .unwrap(),
        );
        let password = flags
            .read_password(&mut &b"s3cret\r\nignored\n"[..])
            .unwrap()
            .unwrap();
        assert_eq!(password.expose(), "s3cret");
        // An unset variable is reported by name only.
        let flags = ConnectionFlags {
            password_env: Some("AIRLOCK_TEST_SURELY_UNSET_VARIABLE".into()),
            ..ConnectionFlags::default()
        };
        let err = flags.read_password(&mut &b""[..]).unwrap_err();
        assert!(err
            .to_string()
            .contains("AIRLOCK_TEST_SURELY_UNSET_VARIABLE"));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let cases: [(&[&str], &str); 5] = [
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
        ];
        for (args, flag) in cases {
            let (name, flags) = flags_of(parse(args).unwrap());
            let err = flags
                .to_definition(&name.unwrap(), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let (name, flags) = flags_of(
            parse(&[
                "create",
                "--name",
                "a",
                "--base-url",
                "http://a",
                "--auth",
                "none",
                "--password",
                "p",
            ])
            .unwrap(),
        );
        let password = flags.read_password(&mut &b""[..]).unwrap();
        assert!(flags.to_definition(&name.unwrap(), password).is_err());
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
                "--token",
                "alk_admin_hunter3",
            ])
            .unwrap(),
        );
        assert!(!format!("{flags:?}").contains("hunter2"));
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
