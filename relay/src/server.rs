//! The relay server: store, admin token bootstrap, TLS listener, router, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_shared::exec::{DestinationPolicy, Engine};
use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::problem::Problem;
use crate::secrets::{MasterKey, MASTER_KEY_FILE};
use crate::state::{AppState, TunnelSettings};
use crate::store::{Store, StoreError};

/// Time a client has to complete the TLS handshake: 10 s.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send a complete request head: 30 s.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How the listener speaks TLS.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// A development CA and server certificate under `<data-dir>/tls`, with these extra names.
    Dev {
        /// Extra DNS names or IPs for the server certificate.
        names: Vec<String>,
    },
    /// Certificate chain and key from PEM files.
    Files {
        /// Certificate chain PEM.
        cert: PathBuf,
        /// Private key PEM.
        key: PathBuf,
    },
    /// Plain HTTP, for use behind a TLS-terminating load balancer only.
    Plain,
}

/// Where the master key that seals connection secrets comes from ([`crate::secrets`]).
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// Given by the operator (`AIRLOCK_MASTER_KEY` or `--master-key-file`), already read.
    Given(MasterKey),
    /// `<data-dir>/master-key`, generated (mode 0600) on first start: the embedded default.
    DataDir,
}

/// Validated relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory (SQLite store, admin token, dev TLS).
    pub data_dir: PathBuf,
    /// TLS mode.
    pub tls: TlsMode,
    /// Let public connections reach loopback/private/link-local addresses.
    pub allow_private_destinations: bool,
    /// Tunnel parameters.
    pub tunnel: TunnelSettings,
    /// Longest wait for in-flight work at shutdown.
    pub shutdown_grace: Duration,
    /// The master key for connection secrets.
    pub master_key: MasterKeySource,
    /// A second, plain-HTTP listener for clients behind a TLS-terminating proxy.
    pub plain_listen: Option<SocketAddr>,
}

/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

async fn bootstrap_admin_token(store: &Store, data_dir: &Path) -> anyhow::Result<()> {
    if store.admin_token_count().await? > 0 {
        return Ok(());
    }
    let token = crate::token::generate(crate::token::ADMIN_PREFIX);
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    write_secret_file(&path, &format!("{token}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    store
        .insert_admin_token(&crate::token::hash(&token))
        .await?;
    info!(path = %path.display(), "first start: admin API token written (mode 0600)");
    Ok(())
}

fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Opens the store with the configured master key (generating `<data-dir>/master-key` when no
/// key is given and none exists), then checks that the key opens every stored secret.
async fn open_store(config: &RelayConfig) -> anyhow::Result<Store> {
    let data_dir = &config.data_dir;
    let key_path = data_dir.join(MASTER_KEY_FILE);
    let (key, generated) = match &config.master_key {
        MasterKeySource::Given(key) => (key.clone(), false),
        MasterKeySource::DataDir => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let (key, generated) = MasterKey::load_or_create(&key_path)
                .context("loading the master key of the embedded default")?;
            if generated {
                info!(path = %key_path.display(), "first start: master key generated (mode 0600); back it up, secrets are lost without it");
            }
            (key, generated)
        }
    };
    let store = Store::open_sqlite(data_dir, &key)
        .await
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    match store.seal_stored_secrets().await {
        Ok(0) => {}
        Ok(n) => info!(
            connections = n,
            "sealed secrets that were stored in plain text"
        ),
        Err(e @ StoreError::Decrypt { .. }) => {
            store.close().await;
            if generated {
                // The store holds secrets of a key that is gone: do not keep a key that can
                // never open them, so the next start fails the same way until the operator acts.
                let _ = std::fs::remove_file(&key_path);
                return Err(anyhow::Error::new(e).context(format!(
                    "{} was missing, but the store holds secrets sealed with a master key: \
                     restore that key file or pass the key (AIRLOCK_MASTER_KEY, \
                     --master-key-file)",
                    key_path.display()
                )));
            }
            return Err(anyhow::Error::new(e)
                .context("the master key does not open the secrets in the store"));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(store)
}

/// Builds the router over `state`. Tested without a socket.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/agent/connect", get(crate::tunnel::connect))
        .route("/v1/connections/{name}/proxy", any(crate::proxy::proxy))
        .route("/v1/connections/{name}/proxy/", any(crate::proxy::proxy))
        .route(
            "/v1/connections/{name}/proxy/{*path}",
            any(crate::proxy::proxy),
        )
        .route(
            "/v1/connections/{name}/test",
            post(crate::proxy::test_connection),
        )
        .route(crate::openapi::PATH, get(crate::openapi::serve))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state.clone())
        .merge(crate::api::router(state))
        .fallback(|| async { Problem::not_found("no such endpoint").into_response() })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not support that method",
            )
            .into_response()
        })
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let sessions = state.registry.all();
    let streams: usize = sessions.iter().map(|s| s.mux.active_streams()).sum();
    let body = format!(
        "# HELP airlock_agents_connected Agent tunnel connections open.\n\
         # TYPE airlock_agents_connected gauge\n\
         airlock_agents_connected {}\n\
         # HELP airlock_streams_active Tunnel streams in flight.\n\
         # TYPE airlock_streams_active gauge\n\
         airlock_streams_active {}\n",
        sessions.len(),
        streams
    );
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

/// What every connection is served with: the proxy route directly, everything else through the
/// router.
///
/// The main job skips axum's router: matching the route, extracting parameters and boxing the
/// handler cost about 8 % of the relay's instructions per proxied request. The router still
/// declares the proxy routes (for the OpenAPI description and for names that need
/// percent-decoding, which [`crate::proxy::route_name`] leaves to it).
#[derive(Clone)]
struct RelayService {
    state: Arc<AppState>,
    router: Router,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for RelayService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let req = req.map(axum::body::Body::new);
        if let Some(name) = crate::proxy::route_name(req.uri().path()) {
            let name = name.to_string();
            let state = self.state.clone();
            return Box::pin(async move { Ok(crate::proxy::serve(&state, &name, req).await) });
        }
        let router = self.router.clone();
        Box::pin(async move { tower::ServiceExt::oneshot(router, req).await })
    }
}

/// Accepts connections on `listener` until `shutdown`, serving `app` over HTTP/1.1 (with
/// upgrades, for the agents' WebSocket), through TLS when `acceptor` is set. Every accepted
/// socket sets TCP_NODELAY. Each connection runs as a task of `connections`; at `shutdown` it
/// finishes the request in flight and closes (hyper's graceful shutdown).
///
/// hyper's own HTTP/1 server is used directly (not hyper-util's protocol-sniffing builder): the
/// socket then reaches handlers and the agents' WebSocket without extra I/O wrappers, which a
/// tunnel pays for on every read and write.
async fn accept_loop(
    listener: &TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: &RelayService,
    connections: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let result = match acceptor {
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(t)) => t,
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    serve_http1(TokioIo::new(tls), app, &shutdown).await
                }
                None => serve_http1(TokioIo::new(tcp), app, &shutdown).await,
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves one HTTP/1.1 connection until it ends; once `shutdown` fires, the request in flight
/// finishes and the connection closes.
async fn serve_http1<I>(
    io: I,
    service: RelayService,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Runs the relay on `listener` until `shutdown` is cancelled, then drains: agents get GoAway,
/// in-flight requests finish (up to `shutdown_grace`), tunnels close with 1001.
///
/// Prints `airlock-relay listening on <url>` to stdout once ready.
///
/// # Errors
/// Store, TLS or listener failures at start.
pub async fn run(
    config: RelayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let addr = listener.local_addr()?;
    let store = open_store(&config).await?;
    bootstrap_admin_token(&store, &config.data_dir).await?;
    let acceptor = match &config.tls {
        TlsMode::Dev { names } => {
            let mut names = names.clone();
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
            let dev = crate::tls::dev_tls(&config.data_dir, &names)?;
            info!(ca = %dev.ca_path.display(), "development TLS: agents trust this CA with --ca-file");
            Some(TlsAcceptor::from(Arc::new(crate::tls::server_config(
                &dev.cert_pem,
                &dev.key_pem,
            )?)))
        }
        TlsMode::Files { cert, key } => Some(TlsAcceptor::from(Arc::new(
            crate::tls::server_config_from_files(cert, key)?,
        ))),
        TlsMode::Plain => {
            warn!("serving plain HTTP: put a TLS-terminating proxy in front of this relay");
            None
        }
    };
    let policy = if config.allow_private_destinations {
        warn!("public connections may reach private, loopback and link-local addresses (--allow-private-destinations)");
        DestinationPolicy::Any
    } else {
        DestinationPolicy::PublicOnly
    };
    let state = Arc::new(
        AppState::new(
            store.clone(),
            Engine::new(policy),
            config.tunnel.clone(),
            shutdown.child_token(),
        )
        .await?,
    );
    let app = RelayService {
        state: state.clone(),
        router: router(state.clone()),
    };
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    println!("airlock-relay listening on {scheme}://{addr}");
    info!(%addr, scheme, "relay ready");

    let connections = TaskTracker::new();
    let plain = match &config.plain_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("--plain-listen {addr}"))?;
            let a = l.local_addr()?;
            println!("airlock-relay listening on http://{a}");
            warn!(addr = %a, "also serving the API without TLS (--plain-listen): keep it on a private interface behind a TLS-terminating proxy");
            Some(l)
        }
        None => None,
    };
    let main_loop = accept_loop(&listener, acceptor, &app, &connections, &shutdown);
    match &plain {
        Some(l) => {
            tokio::join!(
                main_loop,
                accept_loop(l, None, &app, &connections, &shutdown)
            );
        }
        None => main_loop.await,
    }
    info!("shutting down: draining agents and in-flight requests");
    state.shutdown.cancel();
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        connections.close();
        connections.wait().await;
        while !state.registry.all().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(grace = ?config.shutdown_grace, "in-flight work did not finish within the grace period");
        for s in state.registry.all() {
            s.mux.close(1001, "relay shutting down");
        }
    }
    store.close().await;
    Ok(())
}
