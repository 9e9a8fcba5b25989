//! Airlock relay: holds connection definitions, serves the REST API and the agents' WebSocket
//! endpoint, and executes requests of public apps itself (DESIGN.md, "Relay surface").
//!
//! Modules:
//! - [`store`]: persistent state (admin tokens, agents, connection definitions) on sqlx/SQLite.
//! - [`tls`]: the listener's TLS configuration, including the development CA.
//! - [`token`]: API token generation, hashing and `Authorization: Bearer` parsing.

pub mod store;
pub mod tls;
pub mod token;
