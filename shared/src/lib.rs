//! # airlock-shared
//!
//! What the relay and the agent have in common:
//!
//! - [`proto`]: tunnel frames ([`proto::Frame`], [`proto::StreamId`], [`proto::PROTOCOL_VERSION`],
//!   size limits) and the bincode codec. No sockets, no tasks.
//! - [`mux`]: the stream multiplexer over one WebSocket: many concurrent streams, credit-based flow
//!   control per stream and per connection (RFC 9113 §5.2 is the model), reset, GoAway, ping/pong
//!   liveness.
//! - [`model`]: connection definitions and auth types, as the API takes them and as they cross the
//!   tunnel.
//! - [`exec`]: the HTTP execution engine (reqwest): applies auth, TLS settings and the destination
//!   policy, so an auth type behaves the same whichever side executes it.
#![warn(missing_docs)]

pub mod exec;
pub mod model;
pub mod mux;
#[cfg(feature = "openapi")]
mod openapi;
pub mod proto;
pub mod runtime;
