//! HTTP execution engine (placeholder while the mux lands).
