//! RFC 9457 problem details: every error the relay answers with.
//!
//! Body: `{"type": "https://airlock.dev/problems/<slug>", "title", "status", "detail"}` with
//! `Content-Type: application/problem+json`. The `type` slug is stable; `detail` is for humans and
//! never contains secrets.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Base of every problem `type` URI.
pub const TYPE_BASE: &str = "https://airlock.dev/problems/";

/// A problem response (RFC 9457 §3).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable URI naming the problem type.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What happened this time, for humans.
    pub detail: String,
    /// The request field at fault, for validation problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The agent that ran (or tried) the request, for failures of a private connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<Box<crate::proxy::ExecutedBy>>,
}

impl Problem {
    /// A problem of type `slug` (e.g. `agent_offline`) with `status` and `detail`.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Problem {
            type_uri: format!("{TYPE_BASE}{slug}"),
            title: title(slug),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            agent: None,
        }
    }

    /// Names the agent that ran the failed request.
    pub fn with_agent(mut self, agent: crate::proxy::ExecutedBy) -> Self {
        self.agent = Some(Box::new(agent));
        self
    }

    /// Names the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The stable slug (`type` without its base).
    pub fn slug(&self) -> &str {
        self.type_uri.trim_start_matches(TYPE_BASE)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token (Authorization: Bearer <token>)",
        )
    }

    /// 404 `not_found`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// 500 `internal`, with a generic detail; log the cause separately.
    pub fn internal() -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the relay's log",
        )
    }
}

fn title(slug: &str) -> String {
    let mut s = slug
        .split('_')
        .map(|w| match w {
            "json" | "dns" | "tls" => w.to_ascii_uppercase(),
            _ => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(first) = s.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    s
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // RFC 9110 §15.5.9: the connection is closed, since the rest of the request may still
            // arrive on it.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Conflict { name } => Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("'{name}' already exists"),
            ),
            other => {
                tracing::error!(error = %other, "store failure");
                Problem::internal()
            }
        }
    }
}
