//! End-to-end test harness for Airlock: a real relay, real agents and real upstream apps.
//!
//! The integration tests in `tests/tests/` start the real `airlock-relay` and `airlock-agent`
//! binaries (built from this crate's `src/bin/`, found through `CARGO_BIN_EXE_*`) as child
//! processes and drive them over their public surfaces only: the relay's HTTP API, the agents'
//! WebSocket and both `/metrics` endpoints. Nothing here sleeps for a fixed time to synchronise:
//! processes report their bound addresses on stdout and everything else is polled with a
//! deadline ([`assert_eventually!`], [`eventually`]).
//!
//! # Layout
//!
//! - [`Relay`] / [`RelayOptions`]: one `airlock-relay serve` process with its own data directory
//!   and throwaway dev CA; an HTTP client trusting that CA; admin API helpers; restart and kill.
//! - [`Agent`] / [`AgentOptions`]: one `airlock-agent run` process; its metrics; kill (SIGKILL)
//!   and terminate (SIGTERM, for drain tests). [`wait_agent_online`] polls the relay's view.
//! - [`Httpbin`]: the real httpbin app (Python, gunicorn) from the virtualenv that `tests/run`
//!   creates, for the main paths against an app nobody here wrote.
//! - [`Upstream`]: an in-process upstream for precise streaming edge cases: deterministic
//!   bodies of any size (see [`pattern`]), chunked and sized, uploads hashed on the fly, slow
//!   chunks, and a `/hang` route that records when its request was cancelled.
//! - [`Netns`]: network namespaces that make "behind the firewall" real: the agent runs in
//!   namespace A, the private app in namespace P that only A can reach.
//! - [`Nginx`]: the real nginx (Debian package) as an HTTPS upstream, optionally requiring a
//!   client certificate (`ssl_verify_client on`).
//! - [`certs`]: throwaway CAs and certificates ([`TestCa`], rcgen), and the `openssl` CLI for
//!   RSA keys and the PKCS#1 / SEC1 key formats.
//! - [`free_port`], [`http_client`], [`parse_metric`]: small helpers.
//!
//! # Where traffic goes
//!
//! Every address the harness uses is on loopback or inside namespaces a test created; child
//! processes get the proxy variables (`HTTP_PROXY`, ...) removed from their environment and the
//! harness' HTTP clients ignore them, so no request can leave through a proxy or default route.
//!
//! # Files
//!
//! Each process gets a scratch directory under `<workspace>/tmp/tests/` holding its log. The
//! directory is removed when the owner is dropped, except while a test is panicking: then it is
//! kept and the last lines of the log are printed, so a failing test shows what the relay or
//! agent said.

mod agent;
pub mod certs;
mod eventually;
mod httpbin;
mod netns;
mod nginx;
pub mod pattern;
mod process;
mod relay;
mod upstream;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

pub use agent::{
    start_online_agent, wait_agent_online, wait_agent_status, Agent, AgentOptions, OnlineAgent,
};
pub use certs::{Issued, TestCa};
pub use eventually::{eventually, EVENTUALLY_TIMEOUT, POLL_INTERVAL};
pub use httpbin::{venv_dir, Httpbin, HttpbinOptions};
pub use netns::{Netns, NetnsStream};
pub use nginx::{nginx_binary, Nginx, NginxOptions};
pub use relay::{Relay, RelayOptions};
pub use upstream::{RecordedRequest, Upstream, UpstreamOptions};

/// Re-exports used by the exported macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

/// How long a child process may take to print its ready line.
pub const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that no earlier call in this test
/// process returned: the kernel may hand a port that was just bound and released to the next
/// bind, so two calls (from one test or from tests running in parallel) could otherwise agree.
///
/// Prefer letting a server bind port 0 and report its address; this is for the few programs
/// that cannot.
///
/// # Panics
///
/// If binding 127.0.0.1:0 fails.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// An HTTP client for plain-HTTP test traffic (upstreams, metrics): no proxy, 10 s connect
/// timeout, no overall timeout (streaming tests run long).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("a reqwest client without TLS roots always builds")
}

/// Reads one value out of a Prometheus text exposition.
///
/// `name` is either a bare metric name (`airlock_streams_active`), whose series are summed over
/// all label sets, or a full series (`airlock_requests_total{status="200"}`), matched exactly
/// (labels in the order the exporter prints them). `None` when no line matches.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.find('}') {
            Some(end) => (&line[..=end], line[end + 1..].trim()),
            None => match line.split_once(char::is_whitespace) {
                Some((s, v)) => (s, v.trim()),
                None => continue,
            },
        };
        let matches = if name.contains('{') {
            series == name
        } else {
            series.split('{').next() == Some(name)
        };
        if !matches {
            continue;
        }
        // A sample may carry a timestamp after the value.
        let value = value.split_whitespace().next().unwrap_or("");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// The path of one of this crate's binaries (`airlock-relay`, `airlock-agent`).
///
/// Cargo sets `CARGO_BIN_EXE_<name>` while it runs integration tests; outside of that, the
/// binary next to the test executable's `deps/` directory is used.
///
/// # Errors
///
/// When neither exists (build with `cargo test`, which builds the binaries first).
pub fn binary(name: &str) -> anyhow::Result<std::ffi::OsString> {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .filter(|path| path.is_file())
        .ok_or_else(|| anyhow::anyhow!("no {name} binary next to {}", exe.display()))?;
    Ok(candidate.into_os_string())
}

pub(crate) fn parse_socket_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let parsed = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("bad URL {url:?}: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("no host in {url:?}"))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| anyhow::anyhow!("no port in {url:?}"))?;
    format!("{host}:{port}")
        .parse()
        .map_err(|e| anyhow::anyhow!("host of {url:?} is not an IP address: {e}"))
}

/// A relay with one agent enrolled in group `dc1` (name `a1`) and online, allowed to reach
/// `allow` (`HOST[:PORT]` or CIDR entries).
pub struct Tunnel {
    /// The relay.
    pub relay: Relay,
    /// The agent process.
    pub agent: Agent,
    /// The agent's enrolment id.
    pub agent_id: String,
    /// The agent's token.
    pub token: String,
}

impl Tunnel {
    /// Starts the relay and the agent and waits until the relay sees the agent online.
    ///
    /// # Errors
    ///
    /// Any start-up failure of the relay or the agent, or the agent not coming online.
    pub async fn start(allow: &[String]) -> anyhow::Result<Tunnel> {
        let relay = Relay::start(RelayOptions::default()).await?;
        let OnlineAgent { agent, id, token } = start_online_agent(
            &relay,
            "a1",
            "dc1",
            AgentOptions {
                allow: allow.to_vec(),
                ..AgentOptions::default()
            },
        )
        .await?;
        Ok(Tunnel {
            relay,
            agent,
            agent_id: id,
            token,
        })
    }

    /// Also defines the private connection `up` (auth none, group `dc1`) to `upstream`.
    ///
    /// # Errors
    ///
    /// As [`Tunnel::start`], or the connection not being created.
    pub async fn to_upstream(upstream: &Upstream) -> anyhow::Result<Tunnel> {
        let t = Tunnel::start(&[upstream.addr.to_string()]).await?;
        t.relay
            .create_connection(&serde_json::json!({
                "name": "up",
                "base_url": upstream.url,
                "network": {"private": true, "agent_group": "dc1"}
            }))
            .await?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_metric_sums_series_and_matches_exact_ones() {
        let text = "# HELP x\n# TYPE x gauge\nairlock_streams_active 3\n\
                    airlock_req{s=\"200\"} 2\nairlock_req{s=\"502\"} 5 1700000000\n\
                    airlock_streams_active_total 9\n";
        assert_eq!(parse_metric(text, "airlock_streams_active"), Some(3.0));
        assert_eq!(parse_metric(text, "airlock_req"), Some(7.0));
        assert_eq!(parse_metric(text, "airlock_req{s=\"502\"}"), Some(5.0));
        assert_eq!(parse_metric(text, "missing"), None);
    }

    #[test]
    fn parse_socket_addr_handles_ipv4_and_ipv6() {
        assert_eq!(
            parse_socket_addr("https://127.0.0.1:4443").unwrap(),
            "127.0.0.1:4443".parse().unwrap()
        );
        assert_eq!(
            parse_socket_addr("http://[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert!(parse_socket_addr("https://relay.example:1").is_err());
    }
}
