//! A real `airlock-agent run` process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use crate::process::{write_private, Proc, ReadyOn, ScratchDir, Spawn};
use crate::Relay;

/// The line the agent prints on stdout once its metrics endpoint listens.
const READY_PREFIX: &str = "airlock-agent metrics on ";

/// Deadline of [`wait_agent_online`] and [`wait_agent_status`].
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start an [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `--allow`, repeated: `HOST[:PORT]` or CIDR.
    pub allow: Vec<String>,
    /// `--allow-any`; default false.
    pub allow_any: bool,
    /// `--metrics-listen`; default `127.0.0.1:0`. An agent inside a namespace needs an address
    /// the test can reach, see [`Netns::agent_options`](crate::Netns::agent_options).
    pub metrics_listen: String,
    /// Network namespace to run in (`ip netns exec NAME …`).
    pub netns: Option<String>,
    /// More arguments, appended after the ones above.
    pub args: Vec<String>,
    /// Extra environment variables (`RUST_LOG` defaults to `info`).
    pub env: Vec<(String, String)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            allow: Vec::new(),
            allow_any: false,
            metrics_listen: "127.0.0.1:0".to_owned(),
            netns: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running agent. Killed (SIGKILL) when dropped; while a test panics its log is printed.
#[derive(Debug)]
pub struct Agent {
    /// Base URL of the metrics endpoint, e.g. `http://127.0.0.1:40124`.
    pub metrics_url: String,
    /// The agent's scratch directory (token file, log).
    pub dir: PathBuf,
    relay_url: String,
    ca_file: PathBuf,
    options: AgentOptions,
    client: reqwest::Client,
    proc: Proc,
    _dir: ScratchDir,
}

impl Agent {
    /// Starts an agent for `relay` with the agent token `token` (from
    /// [`Relay::create_agent`]) and waits for its metrics line. Connecting to the relay happens
    /// afterwards: use [`wait_agent_online`].
    ///
    /// # Errors
    ///
    /// When the agent exits or prints no metrics line within
    /// [`START_TIMEOUT`](crate::START_TIMEOUT) (the error holds its log).
    pub async fn start(relay: &Relay, token: &str, options: AgentOptions) -> anyhow::Result<Agent> {
        Agent::start_to(&relay.ws_url, &relay.ca_file, token, options).await
    }

    /// As [`start`](Self::start), for a relay given by its WebSocket URL (`wss://HOST:PORT`)
    /// and CA file.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn start_to(
        relay_url: &str,
        ca_file: &Path,
        token: &str,
        options: AgentOptions,
    ) -> anyhow::Result<Agent> {
        let dir = ScratchDir::new("agent")?;
        write_private(&dir.path().join("token"), token)?;
        let (proc, metrics_url) = spawn(dir.path(), relay_url, ca_file, &options).await?;
        Ok(Agent {
            metrics_url,
            dir: dir.path().to_path_buf(),
            relay_url: relay_url.to_owned(),
            ca_file: ca_file.to_path_buf(),
            options,
            client: crate::http_client(),
            proc,
            _dir: dir,
        })
    }

    /// Kills the agent (SIGKILL) and reaps it: the relay sees the tunnel drop without a close.
    ///
    /// # Errors
    ///
    /// When reaping fails.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.proc.kill().await
    }

    /// Sends SIGTERM: the agent drains in-flight streams and exits; see
    /// [`wait_exit`](Self::wait_exit).
    ///
    /// # Errors
    ///
    /// When the agent is not running.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGTERM)
    }

    /// Waits for the agent to exit on its own and returns its status.
    ///
    /// # Errors
    ///
    /// When it is still running after `timeout`, or was already reaped.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// Kills the agent and starts it again with the same token and options (the metrics port
    /// may change; [`metrics_url`](Self::metrics_url) is updated).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill().await?;
        let (proc, metrics_url) =
            spawn(&self.dir, &self.relay_url, &self.ca_file, &self.options).await?;
        self.proc = proc;
        self.metrics_url = metrics_url;
        Ok(())
    }

    /// The agent's process id, `None` once it was killed or exited and reaped.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `GET /metrics`: the Prometheus text.
    ///
    /// # Errors
    ///
    /// Transport failures and any status but 200.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .client
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await
            .context("GET agent /metrics")?;
        if !response.status().is_success() {
            bail!("GET agent /metrics: {}", response.status());
        }
        Ok(response.text().await?)
    }

    /// One value from `/metrics` (see [`parse_metric`](crate::parse_metric)), e.g.
    /// `airlock_agent_connected`.
    ///
    /// # Errors
    ///
    /// As [`metrics`](Self::metrics), and when the metric is absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        crate::parse_metric(&text, name)
            .ok_or_else(|| anyhow!("no metric {name} in agent /metrics"))
    }

    /// Everything the agent wrote so far, across restarts.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

async fn spawn(
    dir: &Path,
    relay_url: &str,
    ca_file: &Path,
    options: &AgentOptions,
) -> anyhow::Result<(Proc, String)> {
    let mut args: Vec<OsString> = vec![
        "run".into(),
        "--relay-url".into(),
        relay_url.into(),
        "--token-file".into(),
        dir.join("token").into(),
        "--ca-file".into(),
        ca_file.into(),
        "--metrics-listen".into(),
        options.metrics_listen.clone().into(),
    ];
    for allow in &options.allow {
        args.push("--allow".into());
        args.push(allow.into());
    }
    if options.allow_any {
        args.push("--allow-any".into());
    }
    args.extend(options.args.iter().map(OsString::from));
    let spec = Spawn {
        name: "agent",
        program: crate::binary("e2e-agent")?,
        args,
        netns: options.netns.clone(),
        env: options.env.clone(),
        current_dir: Some(dir.to_path_buf()),
        log_path: dir.join("agent.log"),
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

/// An enrolled agent process that the relay sees online.
pub struct OnlineAgent {
    /// The agent process.
    pub agent: Agent,
    /// Its enrolment id.
    pub id: String,
    /// Its token.
    pub token: String,
}

/// Enrols agent `name` in `group` on `relay`, starts it with `options` and waits until the relay
/// lists it online.
///
/// # Errors
///
/// Enrolment or start-up failures, or the agent not coming online within 30 s.
pub async fn start_online_agent(
    relay: &Relay,
    name: &str,
    group: &str,
    options: AgentOptions,
) -> anyhow::Result<OnlineAgent> {
    let (id, token) = relay.create_agent(name, group).await?;
    let agent = Agent::start(relay, &token, options).await?;
    wait_agent_online(relay, &id).await?;
    Ok(OnlineAgent { agent, id, token })
}

/// Polls `GET /v1/agents` until the agent `agent_id` is `online`, and returns its entry.
///
/// # Errors
///
/// When it is not online within 30 s (the error shows the last listing).
pub async fn wait_agent_online(relay: &Relay, agent_id: &str) -> anyhow::Result<Value> {
    wait_agent_status(relay, agent_id, "online").await
}

/// Polls `GET /v1/agents` until the agent `agent_id` has `status` (`online`/`offline`), and
/// returns its entry.
///
/// # Errors
///
/// When it does not within 30 s (the error shows the last listing).
pub async fn wait_agent_status(
    relay: &Relay,
    agent_id: &str,
    status: &str,
) -> anyhow::Result<Value> {
    crate::eventually(STATUS_TIMEOUT, || async move {
        let agents = relay.agents().await?;
        let agent = agents
            .iter()
            .find(|a| a["id"].as_str() == Some(agent_id))
            .ok_or_else(|| anyhow!("agent {agent_id} not listed: {agents:?}"))?;
        if agent["status"].as_str() != Some(status) {
            bail!("agent {agent_id} is not {status}: {agent}");
        }
        Ok(agent.clone())
    })
    .await
    .with_context(|| format!("waiting for agent {agent_id} to be {status}"))
}
