//! The agent's side of the tunnel: dial out, handshake, serve streams, reconnect forever.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_shared::exec::{self, BoxError, Engine, LengthChecked};
use airlock_shared::model::{Auth, ConnectionSpec};
use airlock_shared::mux::{self, Inbound, IncomingStream, Mux, MuxConfig, RecvStream, Role};
use airlock_shared::proto::{self, BodyKind, Frame, Hello, ResetCode};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame as BodyFrame;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::Connector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{AgentConfig, Profile};

/// Time allowed for TCP + TLS + WebSocket upgrade + Welcome: 15 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How much outgoing data the tunnel's TLS connection may hold before a write waits for the
/// socket: 512 KiB (rustls' default is 64 KiB).
///
/// With the default, each 128 KiB batch of WebSocket messages went out as two `writev` calls
/// of 64 KiB; now it is one. Sending a response body to the relay then costs half the system
/// calls. Measured with `deploy/bench`'s topology, 6 alternating pairs: agent CPU per proxied
/// 1 MiB GET −13 % (median), per 100 MiB download −8 %. Memory is only held while the relay
/// reads more slowly than upstreams answer, at most this much per tunnel.
pub const TUNNEL_TLS_BUFFER_LIMIT: usize = 512 * 1024;

/// Live state, for metrics and tests.
#[derive(Default)]
pub struct AgentStatus {
    connected: AtomicBool,
    mux: Mutex<Option<Mux>>,
}

impl AgentStatus {
    /// True while a tunnel connection is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Streams in flight on the current connection.
    pub fn active_streams(&self) -> usize {
        self.mux
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.active_streams())
            .unwrap_or(0)
    }
}

fn tls_config(config: &AgentConfig) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs_roots() {
        let _ = roots.add(cert);
    }
    if let Some(pem) = &config.ca_pem {
        for cert in exec::parse_certificates(pem).map_err(anyhow::Error::msg)? {
            roots.add(cert)?;
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(exec::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn rustls_native_certs_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Why one connection attempt or session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Never got a Welcome.
    Failed(String),
    /// A session ran and ended.
    Ended { healthy: bool },
    /// Shutdown was requested and the session drained.
    Shutdown,
}

/// Runs the agent until `shutdown` is cancelled: connect, serve, reconnect with backoff.
///
/// # Errors
/// Only configuration failures (TLS setup); connection failures are retried forever.
pub async fn run(
    config: AgentConfig,
    status: Arc<AgentStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match &config.policy {
        exec::DestinationPolicy::Any => {
            warn!("--allow-any: this agent will call any destination the relay asks for")
        }
        exec::DestinationPolicy::AllowList(list) if list.is_empty() => warn!(
            "the allow-list is empty: every request will be refused; add --allow HOST[:PORT]|CIDR"
        ),
        _ => {}
    }
    let tls = Arc::new(tls_config(&config)?);
    let engine = Arc::new(Engine::new(config.policy.clone()));
    let agent_id = uuid_like();
    let hostname = hostname();
    let mut attempt: u32 = 0;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let end = session(
            &config, &tls, &engine, &status, &shutdown, &agent_id, &hostname,
        )
        .await;
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Ended { healthy: true } => attempt = 0,
            SessionEnd::Ended { healthy: false } => attempt = attempt.saturating_add(1),
            SessionEnd::Failed(reason) => {
                warn!(%reason, attempt, "could not connect to the relay");
                attempt = attempt.saturating_add(1);
            }
        }
        let delay = config
            .backoff
            .delay(attempt.saturating_sub(1), rand::random::<f64>());
        debug!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn uuid_like() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

async fn session(
    config: &AgentConfig,
    tls: &Arc<rustls::ClientConfig>,
    engine: &Arc<Engine>,
    status: &Arc<AgentStatus>,
    shutdown: &CancellationToken,
    agent_id: &str,
    hostname: &str,
) -> SessionEnd {
    let connect = async {
        let mut request = config
            .relay_url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad relay URL: {e}"))?;
        let auth = format!("Bearer {}", config.token.expose());
        let mut value = http::HeaderValue::from_str(&auth)
            .map_err(|_| "token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
        let ws_config = mux::websocket_config(proto::MAX_FRAME_SIZE_LIMIT);
        let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true, // TCP_NODELAY
            Some(Connector::Rustls(tls.clone())),
        )
        .await
        .map_err(describe_connect_error)?;
        if let tokio_tungstenite::MaybeTlsStream::Rustls(tls) = ws.get_mut() {
            tls.get_mut()
                .1
                .set_buffer_limit(Some(TUNNEL_TLS_BUFFER_LIMIT));
        }
        let hello = Hello {
            versions: proto::SUPPORTED_VERSIONS.to_vec(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            agent_id: agent_id.to_string(),
            hostname: hostname.to_string(),
        };
        mux::send_frame(&mut ws, &Frame::Hello(hello))
            .await
            .map_err(|e| format!("sending Hello: {e}"))?;
        match mux::recv_frame(&mut ws, CONNECT_TIMEOUT).await {
            Ok(Frame::Welcome(w)) => Ok((ws, w)),
            Ok(Frame::Reject(r)) => Err(format!("relay rejected the agent: {}", r.reason)),
            Ok(other) => Err(format!("expected Welcome, got {}", other.kind())),
            Err(e) => Err(format!("handshake: {e}")),
        }
    };
    let (ws, welcome) = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
            Err(_) => return SessionEnd::Failed("timed out connecting".into()),
            Ok(Err(e)) => return SessionEnd::Failed(e),
            Ok(Ok(x)) => x,
        },
    };
    let mux_config = match MuxConfig::from_welcome(Role::Agent, &welcome) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Failed(e.to_string()),
    };
    let (mux, driver, mut incoming) = Mux::new(ws, mux_config);
    let span = tracing::info_span!("session", session_id = %welcome.session_id);
    info!(parent: &span, relay = %config.relay_url, version = welcome.version, "connected to the relay");
    *status.mux.lock().unwrap_or_else(|e| e.into_inner()) = Some(mux.clone());
    status.connected.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let tracker = TaskTracker::new();
    let driver_task = tokio::spawn(driver.run().instrument(span.clone()));
    let mut shutting_down = false;
    let hostname: Arc<str> = Arc::from(hostname);
    loop {
        tokio::select! {
            s = incoming.accept() => match s {
                Some(s) => {
                    let engine = engine.clone();
                    let profiles = config.profiles.clone();
                    let hostname = hostname.clone();
                    // The session's span, not one per stream: a span per request costs more
                    // than the rest of the agent's bookkeeping; events name the stream instead.
                    tracker.spawn(
                        handle_stream(engine, profiles, hostname, s).instrument(span.clone()),
                    );
                }
                None => break,
            },
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                info!(parent: &span, in_flight = mux.active_streams(), "draining: no new streams, finishing in-flight ones");
                mux.go_away("agent shutting down");
                let grace = config.drain_grace;
                let drain_mux = mux.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(grace, drain_mux.drained()).await.is_err() {
                        warn!("in-flight streams did not finish within the drain grace period");
                    }
                    drain_mux.close(1001, "agent shutting down");
                });
            }
        }
    }
    let reason = match driver_task.await {
        Ok(r) => r.to_string(),
        Err(e) => format!("driver task failed: {e}"),
    };
    tracker.close();
    status.connected.store(false, Ordering::Relaxed);
    *status.mux.lock().unwrap_or_else(|e| e.into_inner()) = None;
    if shutting_down {
        info!(parent: &span, "disconnected after draining");
        return SessionEnd::Shutdown;
    }
    warn!(parent: &span, %reason, "disconnected from the relay");
    SessionEnd::Ended {
        healthy: started.elapsed() >= config.backoff.healthy_after,
    }
}

fn describe_connect_error(e: WsError) -> String {
    match e {
        WsError::Http(resp) => {
            let status = resp.status();
            let detail = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
                .unwrap_or_default();
            if status == http::StatusCode::UNAUTHORIZED {
                format!("relay refused the agent token (401): {detail}")
            } else {
                format!("relay answered {status}: {detail}")
            }
        }
        other => other.to_string(),
    }
}

/// The request body of a stream, as an `http_body::Body`. A reset is a body error.
struct RecvBody {
    recv: RecvStream,
}

#[derive(Debug, thiserror::Error)]
#[error("request body aborted: {0}")]
struct BodyAborted(String);

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match self.recv.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Inbound::Data(d))) => Poll::Ready(Some(Ok(BodyFrame::data(d)))),
            Poll::Ready(Some(Inbound::End)) | Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Inbound::Reset { code, message })) => Poll::Ready(Some(Err(
                Box::new(BodyAborted(format!("{}: {message}", code.as_str()))),
            ))),
            Poll::Ready(Some(Inbound::Response(_))) => Poll::Ready(Some(Err(Box::new(
                BodyAborted("unexpected response head".into()),
            )))),
        }
    }
}

/// Substitutes an agent-side profile: a spec whose auth is `{"type": "profile", "name": N}` gets
/// profile N's auth, and its TLS settings laid over the spec's. Other specs are returned as is.
///
/// # Errors
/// `unknown profile 'N' on agent HOSTNAME` when this agent has no such profile.
pub fn resolve_profile(
    mut spec: ConnectionSpec,
    profiles: &BTreeMap<String, Profile>,
    hostname: &str,
) -> Result<ConnectionSpec, String> {
    let Auth::Profile { name } = &spec.auth else {
        return Ok(spec);
    };
    let profile = profiles
        .get(name)
        .ok_or_else(|| format!("unknown profile '{name}' on agent {hostname}"))?;
    spec.auth = profile.auth.clone();
    spec.tls = spec.tls.overlaid_with(&profile.tls);
    Ok(spec)
}

/// Executes one stream: runs the request against the upstream and streams the response back.
/// A reset from the relay (client gone) drops the upstream request at once.
async fn handle_stream(
    engine: Arc<Engine>,
    profiles: Arc<BTreeMap<String, Profile>>,
    hostname: Arc<str>,
    s: IncomingStream,
) {
    let IncomingStream {
        id: stream_id,
        head,
        spec,
        mut send,
        recv,
    } = s;
    let cancelled = send.cancellation();
    // The relay sends the same bytes for every request of a connection: parse (and resolve the
    // profile) once. Profiles do not change while the agent runs.
    // FxHash: the keys come from the authenticated relay, and SipHash over a few hundred bytes
    // per request was a visible share of the agent's CPU.
    type SpecCache = HashMap<Bytes, Arc<ConnectionSpec>, rustc_hash::FxBuildHasher>;
    static SPECS: std::sync::OnceLock<Mutex<SpecCache>> = std::sync::OnceLock::new();
    let specs = SPECS.get_or_init(Default::default);
    let cached = specs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&spec)
        .cloned();
    let spec = match cached {
        Some(spec) => spec,
        None => {
            // A copy: `spec` is a slice of the received message, and a cache key must not keep
            // that whole read buffer alive.
            let raw = Bytes::copy_from_slice(&spec);
            let spec: ConnectionSpec = match serde_json::from_slice(&spec) {
                Ok(s) => s,
                Err(e) => {
                    // The error names the field, never a value.
                    warn!(
                        %stream_id,
                        line = e.line(),
                        column = e.column(),
                        "connection definition not understood"
                    );
                    send.reset(
                        ResetCode::InvalidRequest,
                        "this agent does not understand the connection definition; upgrade the agent",
                    );
                    return;
                }
            };
            let profile = match &spec.auth {
                Auth::Profile { name } => Some(name.clone()),
                _ => None,
            };
            let spec = match resolve_profile(spec, &profiles, &hostname) {
                Ok(spec) => spec,
                Err(message) => {
                    warn!(%stream_id, profile = ?profile, "{message}");
                    send.reset(ResetCode::InvalidRequest, &message);
                    return;
                }
            };
            let spec = Arc::new(spec);
            let mut map = specs.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= 256 {
                map.clear();
            }
            map.insert(raw, spec.clone());
            spec
        }
    };
    // For logs only: the query may carry secrets.
    let path = head.target.split('?').next().unwrap_or("/");
    debug!(%stream_id, method = %head.method, %path, connection = %spec.name, "executing");
    let body = match head.body {
        BodyKind::Empty => None,
        BodyKind::Length(n) => Some(LengthChecked::new(RecvBody { recv }, Some(n)).boxed_unsync()),
        BodyKind::Streamed => Some(LengthChecked::new(RecvBody { recv }, None).boxed_unsync()),
    };
    let work = async {
        let up = match engine.execute(&spec, &head, body).await {
            Ok(up) => up,
            Err(e) => {
                info!(%stream_id, code = e.code.as_str(), error = %e.message, %path, "request failed");
                return Err((e.code, e.message));
            }
        };
        let kind = up.body;
        send.send_response(up.status, exec::to_fields(&up.headers), kind)
            .map_err(|e| (ResetCode::Cancel, e.to_string()))?;
        if kind == BodyKind::Empty {
            return Ok(());
        }
        let mut stream = up.response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => send
                    .send_data(bytes)
                    .await
                    .map_err(|e| (ResetCode::Cancel, e.to_string()))?,
                Err(e) => {
                    let e = exec::classify(&e);
                    return Err((ResetCode::UpstreamProtocol, e.message));
                }
            }
        }
        Ok(())
    };
    let result = tokio::select! {
        r = work => r,
        () = cancelled => {
            debug!(%stream_id, %path, "stream cancelled by the relay; upstream request dropped");
            return;
        }
    };
    match result {
        Ok(()) => {
            if send.finish().is_err() {
                debug!(%stream_id, "stream was reset before its end");
            }
        }
        Err((ResetCode::Cancel, _)) => {}
        Err((code, message)) => send.reset(code, &message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_shared::model::{Secret, TlsSettings};

    fn spec(auth: Auth) -> ConnectionSpec {
        ConnectionSpec {
            name: "c".into(),
            base_url: url::Url::parse("https://app.internal").unwrap(),
            auth,
            tls: TlsSettings {
                ca_certificate: Some("CA".into()),
                ..TlsSettings::default()
            },
            response_timeout_ms: 1000,
        }
    }

    #[test]
    fn profiles_are_substituted_and_unknown_ones_named() {
        let profile = Profile {
            auth: Auth::Basic {
                username: "svc".into(),
                password: Secret::new("pw"),
            },
            tls: TlsSettings {
                client_certificate: Some("CERT".into()),
                client_key: Some(Secret::new("KEY")),
                ..TlsSettings::default()
            },
        };
        let profiles = BTreeMap::from([("jira".to_string(), profile.clone())]);
        let resolved = resolve_profile(
            spec(Auth::Profile {
                name: "jira".into(),
            }),
            &profiles,
            "host1",
        )
        .unwrap();
        assert_eq!(resolved.auth, profile.auth);
        assert_eq!(resolved.tls.ca_certificate.as_deref(), Some("CA"));
        assert_eq!(resolved.tls.client_certificate.as_deref(), Some("CERT"));
        let err = resolve_profile(spec(Auth::Profile { name: "x".into() }), &profiles, "host1")
            .unwrap_err();
        assert_eq!(err, "unknown profile 'x' on agent host1");
        assert_eq!(
            resolve_profile(spec(Auth::None), &profiles, "host1").unwrap(),
            spec(Auth::None)
        );
    }
}
