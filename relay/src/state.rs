//! State shared by every request handler and agent session.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use airlock_shared::exec::Engine;
use airlock_shared::model::ConnectionDefinition;
use bytes::Bytes;
use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::problem::Problem;
use crate::store::Store;
use crate::tunnel::Registry;

/// Tunnel parameters the relay announces in `Welcome`.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// Ping interval (default 15 s).
    pub heartbeat: Duration,
    /// Per-stream flow-control window, bytes (default 1 MiB).
    pub initial_window: u32,
    /// Connection flow-control window, bytes (default 16 MiB).
    pub connection_window: u32,
    /// Largest frame, bytes (default 1 MiB).
    pub max_frame_size: u32,
    /// Most concurrent streams per agent connection (default 1024).
    pub max_concurrent_streams: u32,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        let d = airlock_shared::mux::MuxConfig::relay_default();
        TunnelSettings {
            heartbeat: d.heartbeat,
            initial_window: d.initial_window,
            connection_window: d.connection_window,
            max_frame_size: d.max_frame_size,
            max_concurrent_streams: d.max_concurrent_streams,
        }
    }
}

/// A connection definition as the request path uses it: parsed, with its executor spec already
/// encoded for `Open` frames.
#[derive(Debug)]
pub struct CachedConnection {
    /// The definition.
    pub definition: ConnectionDefinition,
    /// JSON of its [`airlock_shared::model::ConnectionSpec`].
    pub spec_json: Bytes,
}

/// Everything handlers share. Held in an `Arc`.
pub struct AppState {
    /// Persistent store.
    pub store: Store,
    /// Connected agent sessions.
    pub registry: Registry,
    /// Executes requests of public connections.
    pub engine: Engine,
    /// Tunnel parameters.
    pub tunnel: TunnelSettings,
    /// Cancelled when the relay shuts down.
    pub shutdown: CancellationToken,
    /// Raw SHA-256 digests of the admin tokens ([`crate::token::digest`]).
    admin_digests: RwLock<HashSet<[u8; 32]>>,
    connections: RwLock<HashMap<String, Arc<CachedConnection>>>,
}

impl AppState {
    /// Builds the state; loads the admin token hashes from the store.
    ///
    /// # Errors
    /// Store failures.
    pub async fn new(
        store: Store,
        engine: Engine,
        tunnel: TunnelSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, crate::store::StoreError> {
        let digests = store
            .admin_token_hashes()
            .await?
            .iter()
            .filter_map(|h| crate::token::digest_of_hash(h))
            .collect();
        Ok(AppState {
            store,
            registry: Registry::default(),
            engine,
            tunnel,
            shutdown,
            admin_digests: RwLock::new(digests),
            connections: RwLock::new(HashMap::new()),
        })
    }

    /// Checks `Authorization: Bearer <admin token>` (RFC 6750 §2.1).
    ///
    /// # Errors
    /// [`Problem::unauthorized`] (401) when missing or wrong.
    pub fn require_admin(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let token = crate::token::bearer(headers).ok_or_else(Problem::unauthorized)?;
        let digest = crate::token::digest(token);
        let known = self
            .admin_digests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&digest);
        if known {
            Ok(())
        } else {
            Err(Problem::unauthorized())
        }
    }

    /// Remembers a new admin token hash (after storing it).
    pub fn add_admin_hash(&self, hash: &str) {
        if let Some(digest) = crate::token::digest_of_hash(hash) {
            self.admin_digests
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(digest);
        }
    }

    /// The connection named `name`, from the cache or the store.
    ///
    /// # Errors
    /// 404 `not_found` when unknown; 500 on store failure.
    pub async fn connection(&self, name: &str) -> Result<Arc<CachedConnection>, Problem> {
        if let Some(c) = self
            .connections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(c.clone());
        }
        let definition = self
            .store
            .connection(name)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no connection named '{name}'")))?;
        let spec_json = Bytes::from(serde_json::to_vec(&definition.spec()).map_err(|e| {
            tracing::error!(error = %e, "spec encoding failed");
            Problem::internal()
        })?);
        let cached = Arc::new(CachedConnection {
            definition,
            spec_json,
        });
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), cached.clone());
        Ok(cached)
    }

    /// Forgets the cached copy of `name`; call after every write to it.
    pub fn invalidate_connection(&self, name: &str) {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

/// An in-memory relay state whose admin token is `admin`, for handler tests without a socket.
#[cfg(test)]
pub(crate) async fn test_state(admin: &str) -> Arc<AppState> {
    let store = Store::open_memory().await.unwrap();
    let hash = crate::token::hash(admin);
    store.insert_admin_token(&hash).await.unwrap();
    let state = Arc::new(
        AppState::new(
            store,
            Engine::new(airlock_shared::exec::DestinationPolicy::Any),
            TunnelSettings::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap(),
    );
    state.add_admin_hash(&hash);
    state
}
