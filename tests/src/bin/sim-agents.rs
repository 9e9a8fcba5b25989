//! `sim-agents`: opens N authenticated agent sessions to one relay from one process, for the relay
//! memory and reconnect benchmark (`deploy/bench/agents`).
//!
//! Each simulated agent is a tokio task doing what `airlock-agent` does on the wire: TLS (rustls)
//! WebSocket to `/v1/agent/connect` with `Authorization: Bearer <token>`, `Hello`, wait for
//! `Welcome`, then keep reading the socket (tungstenite answers the relay's pings while reading)
//! until the connection ends, and reconnect with the agent's own capped exponential backoff with
//! jitter (`airlock_agent::config::Backoff`: 250 ms initial, ×2, cap 30 s, uniform in `[d/10, d]`).
//! It never serves streams: a relay that opened one would see it time out.
//!
//! ```text
//! sim-agents --relay-url wss://127.0.0.1:8443 --token-file F [--ca-file F] -n 10000
//!            [--ramp-concurrency 256] [--status-ms 250]
//! ```
//!
//! The first connection of every agent is paced by `--ramp-concurrency` (handshakes in flight);
//! reconnections are paced only by the backoff, as with real agents. Output on stdout, one JSON
//! object per line:
//! - `{"event":"status","unix_ms":…,"connected":…,"sessions_total":…,"failures_total":…,"disconnects_total":…}`
//!   every `--status-ms`;
//! - on the stdin line `report`: `{"event":"report","unix_ms":…,"n":…,"connected":…,
//!   "down_unix_ms":[…],"up_unix_ms":[…],"attempts":[…]}`: per agent, when its last session
//!   ended, when the following session got its `Welcome` (0 if not yet), and how many attempts
//!   that took;
//! - stdin `quit` or end of input exits.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_agent::config::Backoff;
use airlock_shared::exec;
use airlock_shared::mux;
use airlock_shared::proto::{self, Frame, Hello};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

/// Same as the agent: TCP + TLS + upgrade + Welcome within 15 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

struct Args {
    relay_url: String,
    token: String,
    ca_pem: Option<String>,
    n: usize,
    ramp_concurrency: usize,
    status_ms: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: sim-agents --relay-url URL --token-file F [--ca-file F] -n N \
         [--ramp-concurrency K] [--status-ms MS]"
    );
    std::process::exit(2)
}

fn parse_args() -> anyhow::Result<Args> {
    let mut relay_url = None;
    let mut token_file = None;
    let mut ca_file = None;
    let mut n = None;
    let mut ramp_concurrency = 256;
    let mut status_ms = 250;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--relay-url" => relay_url = Some(val()),
            "--token-file" => token_file = Some(val()),
            "--ca-file" => ca_file = Some(val()),
            "-n" | "--agents" => n = Some(val().parse()?),
            "--ramp-concurrency" => ramp_concurrency = val().parse()?,
            "--status-ms" => status_ms = val().parse()?,
            "-h" | "--help" => usage(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let (Some(relay_url), Some(token_file), Some(n)) = (relay_url, token_file, n) else {
        usage()
    };
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let ca_pem = ca_file.map(std::fs::read_to_string).transpose()?;
    Ok(Args {
        relay_url,
        token,
        ca_pem,
        n,
        ramp_concurrency: ramp_concurrency.max(1),
        status_ms: status_ms.max(10),
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Per simulated agent, readable by the report.
#[derive(Default)]
struct AgentSlot {
    down_unix_ms: AtomicU64,
    up_unix_ms: AtomicU64,
    attempts: AtomicU32,
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    sessions_total: AtomicU64,
    failures_total: AtomicU64,
    disconnects_total: AtomicU64,
}

struct Sim {
    url: String,
    auth: http::HeaderValue,
    tls: Arc<rustls::ClientConfig>,
    counters: Counters,
    slots: Vec<AgentSlot>,
    ramp: Semaphore,
    backoff: Backoff,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_config() -> WebSocketConfig {
    let max = proto::MAX_FRAME_SIZE_LIMIT;
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .write_buffer_size(128 * 1024)
}

impl Sim {
    async fn connect(&self, index: usize) -> Result<Ws, String> {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad relay URL: {e}"))?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, self.auth.clone());
        let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config()),
            true,
            Some(Connector::Rustls(self.tls.clone())),
        )
        .await
        .map_err(|e| e.to_string())?;
        let hello = Hello {
            versions: proto::SUPPORTED_VERSIONS.to_vec(),
            agent_version: concat!("sim-", env!("CARGO_PKG_VERSION")).to_string(),
            agent_id: format!("{:032x}", rand::random::<u128>()),
            hostname: format!("sim-{index}"),
        };
        mux::send_frame(&mut ws, &Frame::Hello(hello))
            .await
            .map_err(|e| format!("sending Hello: {e}"))?;
        match mux::recv_frame(&mut ws, CONNECT_TIMEOUT).await {
            Ok(Frame::Welcome(_)) => Ok(ws),
            Ok(Frame::Reject(r)) => Err(format!("rejected: {}", r.reason)),
            Ok(other) => Err(format!("expected Welcome, got {}", other.kind())),
            Err(e) => Err(format!("handshake: {e}")),
        }
    }

    /// One simulated agent, forever.
    async fn agent(self: Arc<Self>, index: usize) {
        let slot = &self.slots[index];
        let mut attempt: u32 = 0;
        let mut first = true;
        loop {
            slot.attempts.fetch_add(1, Ordering::Relaxed);
            let result = if first {
                let _permit = self.ramp.acquire().await;
                tokio::time::timeout(CONNECT_TIMEOUT, self.connect(index)).await
            } else {
                tokio::time::timeout(CONNECT_TIMEOUT, self.connect(index)).await
            };
            match result {
                Ok(Ok(mut ws)) => {
                    first = false;
                    slot.up_unix_ms.store(unix_ms(), Ordering::Relaxed);
                    self.counters.connected.fetch_add(1, Ordering::Relaxed);
                    self.counters.sessions_total.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    // Reading drives tungstenite's automatic pong replies.
                    while let Some(msg) = ws.next().await {
                        match msg {
                            Ok(Message::Close(_)) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    self.counters.connected.fetch_sub(1, Ordering::Relaxed);
                    self.counters
                        .disconnects_total
                        .fetch_add(1, Ordering::Relaxed);
                    slot.down_unix_ms.store(unix_ms(), Ordering::Relaxed);
                    slot.up_unix_ms.store(0, Ordering::Relaxed);
                    slot.attempts.store(0, Ordering::Relaxed);
                    if started.elapsed() >= self.backoff.healthy_after {
                        attempt = 0;
                    } else {
                        attempt = attempt.saturating_add(1);
                    }
                }
                Ok(Err(e)) => {
                    // The first few reasons, for diagnosis; the count says the rest.
                    if self.counters.failures_total.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("sim-agents: agent {index}: {e}");
                    }
                    attempt = attempt.saturating_add(1);
                }
                Err(_) => {
                    if self.counters.failures_total.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("sim-agents: agent {index}: timed out connecting");
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
            let delay = self
                .backoff
                .delay(attempt.saturating_sub(1), rand::random::<f64>());
            tokio::time::sleep(delay).await;
        }
    }

    fn status_line(&self) -> String {
        let c = &self.counters;
        serde_json::json!({
            "event": "status",
            "unix_ms": unix_ms(),
            "connected": c.connected.load(Ordering::Relaxed),
            "sessions_total": c.sessions_total.load(Ordering::Relaxed),
            "failures_total": c.failures_total.load(Ordering::Relaxed),
            "disconnects_total": c.disconnects_total.load(Ordering::Relaxed),
        })
        .to_string()
    }

    fn report_line(&self) -> String {
        let load = |f: fn(&AgentSlot) -> u64| self.slots.iter().map(f).collect::<Vec<u64>>();
        serde_json::json!({
            "event": "report",
            "unix_ms": unix_ms(),
            "n": self.slots.len(),
            "connected": self.counters.connected.load(Ordering::Relaxed),
            "down_unix_ms": load(|s| s.down_unix_ms.load(Ordering::Relaxed)),
            "up_unix_ms": load(|s| s.up_unix_ms.load(Ordering::Relaxed)),
            "attempts": load(|s| u64::from(s.attempts.load(Ordering::Relaxed))),
        })
        .to_string()
    }
}

fn tls_config(ca_pem: Option<&str>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in exec::parse_certificates(pem).map_err(anyhow::Error::msg)? {
            roots.add(cert)?;
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(exec::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every simulated agent is a separate machine: no shared session cache.
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let auth = http::HeaderValue::from_str(&format!("Bearer {}", args.token))?;
    // Like the agent: the path /v1/agent/connect is added when missing.
    let mut url = args.relay_url.trim_end_matches('/').to_string();
    if url.splitn(4, '/').nth(3).is_none() {
        url.push_str("/v1/agent/connect");
    }
    let sim = Arc::new(Sim {
        url,
        auth,
        tls: Arc::new(tls_config(args.ca_pem.as_deref())?),
        counters: Counters::default(),
        slots: (0..args.n).map(|_| AgentSlot::default()).collect(),
        ramp: Semaphore::new(args.ramp_concurrency),
        backoff: Backoff::default(),
    });
    for i in 0..args.n {
        tokio::spawn(sim.clone().agent(i));
    }
    let status_sim = sim.clone();
    let period = Duration::from_millis(args.status_ms);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            println!("{}", status_sim.status_line());
        }
    });
    // stdin is read on a plain thread (the workspace's tokio has no `io-std`).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        match line.trim() {
            "report" => println!("{}", sim.report_line()),
            "status" => println!("{}", sim.status_line()),
            "quit" => break,
            _ => {}
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sim-agents: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sim-agents: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sim-agents: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
