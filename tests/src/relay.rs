//! A real `airlock-relay serve` process.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::process::{Proc, ReadyOn, ScratchDir, Spawn};

/// The line the relay prints on stdout once it accepts connections.
const READY_PREFIX: &str = "airlock-relay listening on ";

/// How to start a [`Relay`].
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// `--listen`; default `127.0.0.1:0` (the bound port is read from the ready line).
    pub listen: String,
    /// `--data-dir`; default a fresh scratch directory removed when the relay is dropped. A
    /// directory given here is kept.
    pub data_dir: Option<PathBuf>,
    /// `--dev-tls` (the relay makes a throwaway CA under `<data-dir>/tls/`); default true.
    pub dev_tls: bool,
    /// `--dev-tls-name`, repeated. The listen IP is added on its own when it is neither
    /// loopback nor unspecified (a relay listening on a namespace's veth address).
    pub dev_tls_names: Vec<String>,
    /// `--allow-private-destinations`; default true, since every test upstream is on loopback or
    /// in a private range. Tests of the refusal set it to false.
    pub allow_private_destinations: bool,
    /// `--heartbeat-ms`; default: the relay's own.
    pub heartbeat: Option<Duration>,
    /// More arguments, appended after the ones above.
    pub args: Vec<String>,
    /// Network namespace to run in (`ip netns exec NAME …`); default the test's own.
    pub netns: Option<String>,
    /// Extra environment variables (`RUST_LOG` defaults to `info` unless set here or inherited).
    pub env: Vec<(String, String)>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            listen: "127.0.0.1:0".to_owned(),
            data_dir: None,
            dev_tls: true,
            dev_tls_names: Vec::new(),
            allow_private_destinations: true,
            heartbeat: None,
            args: Vec::new(),
            netns: None,
            env: Vec::new(),
        }
    }
}

/// A running relay. Killed (SIGKILL) when dropped; while a test panics its log is printed.
#[derive(Debug)]
pub struct Relay {
    /// HTTPS base URL without a trailing slash, e.g. `https://127.0.0.1:40123`.
    pub url: String,
    /// WebSocket base URL for agents' `--relay-url`, e.g. `wss://127.0.0.1:40123`.
    pub ws_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// The admin API token from `<data-dir>/admin-token`.
    pub admin_token: String,
    /// The dev CA certificate `<data-dir>/tls/ca.pem`.
    pub ca_file: PathBuf,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    options: RelayOptions,
    client: reqwest::Client,
    proc: Option<Proc>,
    // Dropped last: removing the directory must wait for the process to be gone.
    _dir: ScratchDir,
}

impl Relay {
    /// Starts a relay and waits (at most [`START_TIMEOUT`](crate::START_TIMEOUT)) for its ready
    /// line, then reads the admin token and CA.
    ///
    /// # Errors
    ///
    /// When the relay exits or prints no ready line in time (the error holds its log), or the
    /// admin token or CA file is missing.
    pub async fn start(options: RelayOptions) -> anyhow::Result<Relay> {
        let dir = match &options.data_dir {
            Some(path) => ScratchDir::existing(path.clone())?,
            None => ScratchDir::new("relay")?,
        };
        let data_dir = dir.path().to_path_buf();
        let (proc, url) = spawn(&options, &data_dir, &options.listen).await?;
        let addr = crate::parse_socket_addr(&url)?;
        let admin_token = read_admin_token(&data_dir).await?;
        let ca_file = data_dir.join("tls").join("ca.pem");
        let client = build_client(&options, &ca_file)?;
        Ok(Relay {
            ws_url: url
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1),
            url,
            addr,
            admin_token,
            ca_file,
            data_dir,
            options,
            client,
            proc: Some(proc),
            _dir: dir,
        })
    }

    /// An HTTPS client that trusts the relay's dev CA (and nothing else), ignoring proxies.
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// A request to `{url}{path}` with `Authorization: Bearer <admin token>`.
    /// `path` starts with `/`, e.g. `/v1/agents`.
    pub fn api(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
    }

    /// Sends an API request with an optional JSON body and returns the status and the JSON body
    /// (`Value::Null` when the body is empty or not JSON).
    ///
    /// # Errors
    ///
    /// Transport failures only; any status is returned.
    pub async fn api_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.api(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{method} {path} body"))?;
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// `POST /v1/agents {"name","group"}`; returns `(id, token)`.
    ///
    /// # Errors
    ///
    /// Any status but 201, or a body without string `id` and `token`.
    pub async fn create_agent(&self, name: &str, group: &str) -> anyhow::Result<(String, String)> {
        let body = serde_json::json!({ "name": name, "group": group });
        let created = self
            .expect_status(Method::POST, "/v1/agents", Some(&body), 201)
            .await?;
        let field = |key: &str| {
            created[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("no string {key:?} in {created}"))
        };
        Ok((field("id")?, field("token")?))
    }

    /// `GET /v1/agents`; returns the `agents` array.
    ///
    /// # Errors
    ///
    /// Any status but 200, or no `agents` array.
    pub async fn agents(&self) -> anyhow::Result<Vec<Value>> {
        let listed = self
            .expect_status(Method::GET, "/v1/agents", None, 200)
            .await?;
        match listed.get("agents") {
            Some(Value::Array(agents)) => Ok(agents.clone()),
            _ => bail!("no agents array in {listed}"),
        }
    }

    /// `POST /v1/connections` with `definition`; returns the created connection.
    ///
    /// # Errors
    ///
    /// Any status but 201.
    pub async fn create_connection(&self, definition: &Value) -> anyhow::Result<Value> {
        self.expect_status(Method::POST, "/v1/connections", Some(definition), 201)
            .await
    }

    /// `POST /v1/connections/{name}/test`; returns the report (`ok`, `status`, `error`, ...).
    ///
    /// # Errors
    ///
    /// Any status but 200.
    pub async fn test_connection(&self, name: &str) -> anyhow::Result<Value> {
        let path = format!("/v1/connections/{name}/test");
        self.expect_status(Method::POST, &path, None, 200).await
    }

    /// A request through `ANY /v1/connections/{name}/proxy/{path}` (`path` without leading `/`).
    pub fn proxy(&self, method: Method, connection: &str, path: &str) -> RequestBuilder {
        self.api(
            method,
            &format!("/v1/connections/{connection}/proxy/{path}"),
        )
    }

    async fn expect_status(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        expected: u16,
    ) -> anyhow::Result<Value> {
        let (status, json) = self.api_json(method.clone(), path, body).await?;
        if status.as_u16() != expected {
            bail!("{method} {path}: expected {expected}, got {status}: {json}");
        }
        Ok(json)
    }

    /// `GET /metrics` (no auth): the Prometheus text.
    ///
    /// # Errors
    ///
    /// Transport failures and any status but 200.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .context("GET relay /metrics")?;
        if !response.status().is_success() {
            bail!("GET relay /metrics: {}", response.status());
        }
        Ok(response.text().await?)
    }

    /// One value from `/metrics` (see [`parse_metric`](crate::parse_metric)).
    ///
    /// # Errors
    ///
    /// As [`metrics`](Self::metrics), and when the metric is absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        crate::parse_metric(&text, name)
            .ok_or_else(|| anyhow!("no metric {name} in relay /metrics"))
    }

    /// Kills the relay (SIGKILL) and starts it again on the same address and data directory.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start); the port may have been taken in between (unlikely).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let (proc, url) = spawn(&self.options, &self.data_dir, &self.addr.to_string()).await?;
        self.proc = Some(proc);
        if url != self.url {
            bail!("relay came back on {url}, not {}", self.url);
        }
        self.admin_token = read_admin_token(&self.data_dir).await?;
        Ok(())
    }

    /// Kills the relay (SIGKILL) and reaps it; a no-op when it is not running.
    ///
    /// # Errors
    ///
    /// When reaping fails.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        match &mut self.proc {
            Some(proc) => proc.kill().await,
            None => Ok(()),
        }
    }

    /// Sends SIGTERM (graceful shutdown); see [`wait_exit`](Self::wait_exit).
    ///
    /// # Errors
    ///
    /// When the relay is not running.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.running()?.signal(libc::SIGTERM)
    }

    /// Waits for the relay to exit on its own.
    ///
    /// # Errors
    ///
    /// When it is still running after `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        match &mut self.proc {
            Some(proc) => proc.wait_exit(timeout).await,
            None => bail!("relay is not running"),
        }
    }

    /// The relay's process id, `None` once it was killed or exited and reaped.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Everything the relay wrote to stderr and stdout so far, across restarts.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_else(|| {
            std::fs::read_to_string(self.data_dir.join("relay.log")).unwrap_or_default()
        })
    }

    fn running(&self) -> anyhow::Result<&Proc> {
        self.proc
            .as_ref()
            .ok_or_else(|| anyhow!("relay is not running"))
    }
}

async fn spawn(
    options: &RelayOptions,
    data_dir: &std::path::Path,
    listen: &str,
) -> anyhow::Result<(Proc, String)> {
    let mut args: Vec<OsString> = vec![
        "serve".into(),
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        data_dir.into(),
    ];
    if options.dev_tls {
        args.push("--dev-tls".into());
        let mut names = options.dev_tls_names.clone();
        if let Ok(addr) = listen.parse::<SocketAddr>() {
            let ip: IpAddr = addr.ip();
            if !ip.is_loopback() && !ip.is_unspecified() && !names.contains(&ip.to_string()) {
                names.push(ip.to_string());
            }
        }
        for name in names {
            args.push("--dev-tls-name".into());
            args.push(name.into());
        }
    }
    if options.allow_private_destinations {
        args.push("--allow-private-destinations".into());
    }
    if let Some(heartbeat) = options.heartbeat {
        args.push("--heartbeat-ms".into());
        args.push(heartbeat.as_millis().to_string().into());
    }
    args.extend(options.args.iter().map(OsString::from));
    let spec = Spawn {
        name: "relay",
        program: crate::binary("e2e-relay")?,
        args,
        netns: options.netns.clone(),
        env: options.env.clone(),
        current_dir: Some(data_dir.to_path_buf()),
        log_path: data_dir.join("relay.log"),
        ready_on: ReadyOn::Stdout,
        process_group: false,
    };
    Proc::spawn(
        spec,
        |line| {
            line.strip_prefix(READY_PREFIX)
                .map(|url| url.trim().trim_end_matches('/').to_owned())
        },
        crate::START_TIMEOUT,
    )
    .await
}

/// Reads `<data-dir>/admin-token`, which the relay writes before it reports ready.
async fn read_admin_token(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("admin-token");
    let token = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("read {}", path.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(token)
}

fn build_client(
    options: &RelayOptions,
    ca_file: &std::path::Path,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10));
    if options.dev_tls {
        let pem = std::fs::read(ca_file).with_context(|| format!("read {}", ca_file.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("parse {}", ca_file.display()))?;
        builder = builder.add_root_certificate(ca);
    }
    builder.build().context("build the relay client")
}
