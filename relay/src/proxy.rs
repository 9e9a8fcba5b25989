//! The main job: `ANY /v1/connections/{name}/proxy/{path}` and the test request.
//!
//! A request to a private connection is carried to an online agent of the connection's group as
//! one tunnel stream; a public one is executed by the relay's own [`Engine`]. Bodies stream both
//! ways and keep their framing: a `Content-Length` stays a `Content-Length`, a body without one
//! stays chunked, an empty body stays empty. Hop-by-hop fields (RFC 9110 §7.6.1) and the caller's
//! own `Authorization` are never forwarded.
//!
//! Failures map to one status each ([`status_of`]): agent offline 503, destination refused 403,
//! upstream timeout 504, upstream DNS/connect/TLS/protocol failure 502. A failure after the
//! response head was sent aborts the client connection, so a cut-short body never looks complete.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use airlock_shared::exec::{self, BoxError, ExecError, LengthChecked, RequestBody};
use airlock_shared::mux::{Inbound, MuxError, RecvStream};
use airlock_shared::proto::{BodyKind, RequestHead, ResetCode};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body::Frame as BodyFrame;
use http_body_util::BodyExt;
use serde::Serialize;
use tracing::{debug, warn};

use crate::problem::Problem;
use crate::state::{AppState, CachedConnection};
use crate::tunnel::Session;

/// Extra time the relay waits for an agent's response head beyond the connection's own
/// response timeout (which the agent enforces): 5 s.
pub const AGENT_GRACE: Duration = Duration::from_secs(5);

/// HTTP status and problem slug for a classified failure.
pub fn status_of(code: ResetCode) -> (StatusCode, &'static str) {
    match code {
        ResetCode::DestinationNotAllowed => (StatusCode::FORBIDDEN, "destination_not_allowed"),
        ResetCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        ResetCode::Dns => (StatusCode::BAD_GATEWAY, "dns"),
        ResetCode::Connect => (StatusCode::BAD_GATEWAY, "connect"),
        ResetCode::Tls => (StatusCode::BAD_GATEWAY, "tls"),
        ResetCode::UpstreamProtocol => (StatusCode::BAD_GATEWAY, "upstream_protocol"),
        ResetCode::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request"),
        ResetCode::RequestBody => (StatusCode::BAD_REQUEST, "request_body"),
        ResetCode::Refused => (StatusCode::SERVICE_UNAVAILABLE, "agent_unavailable"),
        ResetCode::ConnectionLost => (StatusCode::BAD_GATEWAY, "agent_disconnected"),
        ResetCode::Cancel | ResetCode::Internal | ResetCode::ProtocolError => {
            (StatusCode::BAD_GATEWAY, "agent_error")
        }
    }
}

fn problem_of(code: ResetCode, message: &str) -> Problem {
    let (status, slug) = status_of(code);
    Problem::new(status, slug, message.to_string())
}

fn agent_offline(group: &str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "agent_offline",
        format!("no agent of group '{group}' is connected"),
    )
}

/// Where a request was executed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecutedBy {
    /// Enrolled agent id.
    pub id: String,
    /// Agent name.
    pub name: String,
    /// Host the agent runs on.
    pub hostname: String,
}

impl ExecutedBy {
    fn of(s: &Session) -> Self {
        ExecutedBy {
            id: s.agent_id.clone(),
            name: s.agent_name.clone(),
            hostname: s.hostname.clone(),
        }
    }
}

/// An upstream response head plus its body, from either executor.
pub struct Executed {
    /// Status code.
    pub status: StatusCode,
    /// End-to-end headers.
    pub headers: HeaderMap,
    /// The body, framing preserved.
    pub body: Body,
    /// The agent that ran it (`None`: the relay itself).
    pub agent: Option<ExecutedBy>,
}

/// Executes `head` with `body` for `conn`, through an agent or directly.
///
/// # Errors
/// A [`Problem`] with the status of [`status_of`], or 503 `agent_offline`.
pub async fn execute(
    state: &AppState,
    conn: &CachedConnection,
    head: RequestHead,
    body: Option<RequestBody>,
) -> Result<Executed, Problem> {
    let def = &conn.definition;
    if !def.network.private {
        return execute_public(state, conn, head, body).await;
    }
    let group = def.network.agent_group.as_deref().unwrap_or_default();
    // Try the least busy agent; one that is draining or full is skipped.
    let mut opened = None;
    let mut head = head;
    for session in state.registry.candidates(group) {
        match session.mux.try_open(head, conn.spec_json.clone()) {
            Ok(halves) => {
                opened = Some((session, halves));
                break;
            }
            Err((e, back)) => {
                head = back;
                match e {
                    MuxError::Closed | MuxError::GoingAway | MuxError::TooManyStreams(_) => {}
                    MuxError::StreamIdsExhausted => session.mux.go_away("stream ids exhausted"),
                    e => warn!(error = %e, "stream open failed"),
                }
            }
        }
    }
    let Some((session, (mut send, mut recv))) = opened else {
        return Err(agent_offline(group));
    };
    let stream_id = recv.id();
    debug!(agent_id = %session.agent_id, stream_id = %stream_id, "stream opened");
    match body {
        None => {
            let _ = send.finish();
        }
        Some(mut body) => {
            tokio::spawn(async move {
                loop {
                    match body.frame().await {
                        None => {
                            let _ = send.finish();
                            return;
                        }
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                if send.send_data(data).await.is_err() {
                                    return; // stream reset: nothing more to send
                                }
                            }
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, "client request body failed");
                            send.reset(ResetCode::RequestBody, "client request body failed");
                            return;
                        }
                    }
                }
            });
        }
    }
    let by = ExecutedBy::of(&session);
    let answered = async move {
        let wait = Duration::from_millis(def.response_timeout_ms) + AGENT_GRACE;
        let first = match tokio::time::timeout(wait, recv.recv()).await {
            Err(_) => {
                return Err(Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("no response from the agent within {} ms", wait.as_millis()),
                ))
            }
            Ok(first) => first,
        };
        match first {
            Some(Inbound::Response(r)) => {
                let status = StatusCode::from_u16(r.status).map_err(|_| {
                    Problem::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_protocol",
                        format!("invalid status code {}", r.status),
                    )
                })?;
                let (headers, _) = exec::from_fields(&r.headers);
                let body = match r.body {
                    BodyKind::Empty => Body::empty(),
                    BodyKind::Length(n) => {
                        Body::new(LengthChecked::new(TunnelBody { recv }, Some(n)))
                    }
                    BodyKind::Streamed => Body::new(LengthChecked::new(TunnelBody { recv }, None)),
                };
                Ok(Executed {
                    status,
                    headers,
                    body,
                    agent: Some(ExecutedBy::of(&session)),
                })
            }
            Some(Inbound::Reset { code, message }) => Err(problem_of(code, &message)),
            Some(other) => {
                warn!(?other, "agent answered out of order");
                Err(problem_of(
                    ResetCode::ProtocolError,
                    "agent answered out of order",
                ))
            }
            None => Err(problem_of(
                ResetCode::ConnectionLost,
                "tunnel connection lost",
            )),
        }
    }
    .await;
    // A failure still says which agent ran (or tried) the request.
    answered.map_err(|p| p.with_agent(by))
}

async fn execute_public(
    state: &AppState,
    conn: &CachedConnection,
    head: RequestHead,
    body: Option<RequestBody>,
) -> Result<Executed, Problem> {
    let spec = conn.definition.spec();
    let up = state
        .engine
        .execute(&spec, &head, body)
        .await
        .map_err(|e: ExecError| problem_of(e.code, &e.message))?;
    let status = StatusCode::from_u16(up.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let stream = up
        .response
        .bytes_stream()
        .map_err(|e| Box::new(exec::classify(&e)) as BoxError);
    let stream_body = http_body_util::StreamBody::new(stream.map_ok(BodyFrame::data));
    let body = match up.body {
        BodyKind::Empty => Body::empty(),
        BodyKind::Length(n) => Body::new(LengthChecked::new(stream_body, Some(n))),
        BodyKind::Streamed => Body::new(LengthChecked::new(stream_body, None)),
    };
    Ok(Executed {
        status,
        headers: up.headers,
        body,
        agent: None,
    })
}

/// A response body read from a tunnel stream. A reset or lost connection is a body error, so
/// hyper aborts the client connection instead of ending the body cleanly.
struct TunnelBody {
    recv: RecvStream,
}

/// The tunnel stream failed mid-body.
#[derive(Debug, thiserror::Error)]
#[error("tunnel stream failed mid-body: {code}: {message}")]
struct StreamFailed {
    code: &'static str,
    message: String,
}

impl http_body::Body for TunnelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        match self.recv.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Inbound::Data(d))) => Poll::Ready(Some(Ok(BodyFrame::data(d)))),
            Poll::Ready(Some(Inbound::End)) | Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Inbound::Reset { code, message })) => {
                warn!(stream_id = %self.recv.id(), code = code.as_str(), %message, "response body aborted");
                Poll::Ready(Some(Err(Box::new(StreamFailed {
                    code: code.as_str(),
                    message,
                }))))
            }
            Poll::Ready(Some(Inbound::Response(_))) => {
                Poll::Ready(Some(Err(Box::new(StreamFailed {
                    code: "protocol_error",
                    message: "second response head".into(),
                }))))
            }
        }
    }
}

/// Builds the request head and body of a client request. `target` is the path and query
/// relative to the connection's base URL.
pub fn split_request(req: Request, target: String) -> (RequestHead, Option<RequestBody>) {
    let (parts, body) = req.into_parts();
    let kind = request_body_kind(&parts.headers);
    let mut headers = parts.headers;
    exec::strip_hop_by_hop(&mut headers);
    // The caller's credential for the relay never travels upstream.
    headers.remove(http::header::AUTHORIZATION);
    let head = RequestHead {
        method: parts.method.as_str().to_string(),
        target,
        headers: exec::to_fields(&headers),
        body: kind,
    };
    let body = match kind {
        BodyKind::Empty => None,
        BodyKind::Length(n) => Some(LengthChecked::new(body, Some(n)).boxed_unsync()),
        BodyKind::Streamed => Some(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
    };
    (head, body)
}

/// Request framing (RFC 9112 §6.3): `Transfer-Encoding` → streamed; `Content-Length: n` →
/// exactly n; neither → no body.
pub fn request_body_kind(headers: &HeaderMap) -> BodyKind {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return BodyKind::Streamed;
    }
    match headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(n) => BodyKind::Length(n),
        None => BodyKind::Empty,
    }
}

/// The target of a proxy URI: what follows `/v1/connections/{name}/proxy`, raw
/// (percent-encoding untouched), with the query.
fn proxy_target(uri: &http::Uri, name: &str) -> Option<String> {
    let prefix = format!("/v1/connections/{name}/proxy");
    let path = uri.path();
    let rest = path.strip_prefix(&prefix)?;
    let rest = if rest.is_empty() { "/" } else { rest };
    if !rest.starts_with('/') {
        return None;
    }
    Some(match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    })
}

/// The connection name of a proxy path (`/v1/connections/{name}/proxy`, `…/proxy/` or
/// `…/proxy/{*path}`), taken from the raw path. `None` for any other path, and for a name with
/// a `%` (percent-decoding is left to the router).
pub fn route_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/connections/")?;
    let (name, rest) = rest.split_once('/')?;
    if name.is_empty() || name.contains('%') {
        return None;
    }
    let after = rest.strip_prefix("proxy")?;
    (after.is_empty() || after.starts_with('/')).then_some(name)
}

/// Serves a proxy request for the connection `name` (see [`route_name`]).
pub async fn serve(state: &AppState, name: &str, req: Request) -> Response {
    match proxy_inner(state, name, req).await {
        Ok(r) => r,
        Err(p) => p.into_response(),
    }
}

/// `ANY /v1/connections/{name}/proxy/{*path}`.
pub async fn proxy(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(params): axum::extract::Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let name = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    serve(&state, name, req).await
}

async fn proxy_inner(state: &AppState, name: &str, req: Request) -> Result<Response, Problem> {
    state.require_admin(req.headers())?;
    let conn = state.connection(name).await?;
    let target = proxy_target(req.uri(), name).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the proxy path must follow /v1/connections/{name}/proxy",
        )
    })?;
    let (head, body) = split_request(req, target);
    let executed = execute(state, &conn, head, body).await?;
    let mut resp = Response::new(executed.body);
    *resp.status_mut() = executed.status;
    *resp.headers_mut() = executed.headers;
    Ok(resp)
}

/// Result of `POST /v1/connections/{name}/test`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TestReport {
    /// True when the test request got a 2xx.
    pub ok: bool,
    /// The upstream's status code, when it answered.
    pub status: Option<u16>,
    /// Time to the complete response, in milliseconds.
    pub latency_ms: u64,
    /// The agent that ran it; `null` for a public connection.
    pub agent: Option<ExecutedBy>,
    /// The classified failure, when not ok.
    pub error: Option<TestFailure>,
}

/// A classified test failure.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TestFailure {
    /// One of `agent_offline`, `dns`, `connect`, `tls`, `timeout`, `auth` (401/403),
    /// `http_status` (other non-2xx), `destination_not_allowed`, or another problem slug.
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// Largest test response body read, in bytes (64 KiB); the rest is discarded.
const TEST_BODY_LIMIT: usize = 64 * 1024;

/// `POST /v1/connections/{name}/test`: sends the connection's test request and reports.
pub async fn test_connection(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(p) = state.require_admin(&headers) {
        return p.into_response();
    }
    let conn = match state.connection(&name).await {
        Ok(c) => c,
        Err(p) => return p.into_response(),
    };
    axum::Json(run_test(&state, &conn).await).into_response()
}

/// Runs the test request of `conn`.
pub async fn run_test(state: &AppState, conn: &CachedConnection) -> TestReport {
    let t = &conn.definition.test_request;
    let head = RequestHead {
        method: t.method.clone(),
        target: t.path.clone(),
        headers: vec![(
            "user-agent".into(),
            Bytes::from_static(b"airlock-relay test request"),
        )],
        body: BodyKind::Empty,
    };
    let started = Instant::now();
    let result = execute(state, conn, head, None).await;
    let (status, agent, error) = match result {
        Err(p) => (
            None,
            p.agent.clone().map(|a| *a),
            Some((p.slug().to_string(), p.detail.clone())),
        ),
        Ok(executed) => {
            let status = executed.status;
            // Read (a bounded part of) the body, so latency covers the whole response.
            let mut body = executed.body.into_data_stream();
            let mut read = 0usize;
            let mut body_error = None;
            // The start of the body, to recognise a web server's "client certificate" page.
            let mut head = Vec::new();
            while read < TEST_BODY_LIMIT {
                match futures_util::StreamExt::next(&mut body).await {
                    Some(Ok(chunk)) => {
                        read += chunk.len();
                        let room = 1024usize.saturating_sub(head.len());
                        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    Some(Err(e)) => {
                        body_error = Some(("upstream_protocol".to_string(), e.to_string()));
                        break;
                    }
                    None => break,
                }
            }
            let error = body_error.or_else(|| {
                if status.is_success() {
                    None
                } else if matches!(status.as_u16(), 401 | 403) {
                    Some((
                        "auth".to_string(),
                        format!("the app refused the credentials with {status}"),
                    ))
                } else {
                    Some((
                        "http_status".to_string(),
                        format!(
                            "the app answered {status}{}",
                            client_certificate_hint(status, &head)
                        ),
                    ))
                }
            });
            (Some(status.as_u16()), executed.agent, error)
        }
    };
    TestReport {
        ok: error.is_none(),
        status,
        latency_ms: started.elapsed().as_millis() as u64,
        agent,
        error: error.map(|(kind, message)| TestFailure { kind, message }),
    }
}

/// Explains a 400 that is really a TLS client-certificate failure: servers that check client
/// certificates at the HTTP layer (nginx with `ssl_verify_client on`) finish the handshake and
/// answer 400 with a page saying so, instead of a TLS alert.
fn client_certificate_hint(status: StatusCode, body: &[u8]) -> &'static str {
    if status != StatusCode::BAD_REQUEST {
        return "";
    }
    let text = String::from_utf8_lossy(body);
    if text.contains("No required SSL certificate was sent") {
        ": the app requires a TLS client certificate and none was sent (\"No required SSL \
         certificate was sent\"); set tls.client_certificate and tls.client_key"
    } else if text.contains("SSL certificate error") {
        ": the app refused the TLS client certificate (\"The SSL certificate error\"): it is \
         not signed by a CA the app trusts, or is expired or revoked"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_targets_keep_encoding_and_query() {
        let uri: http::Uri = "/v1/connections/c1/proxy/a%2Fb/c?x=1&y=%20"
            .parse()
            .unwrap();
        assert_eq!(proxy_target(&uri, "c1").unwrap(), "/a%2Fb/c?x=1&y=%20");
        let uri: http::Uri = "/v1/connections/c1/proxy".parse().unwrap();
        assert_eq!(proxy_target(&uri, "c1").unwrap(), "/");
        let uri: http::Uri = "/v1/connections/c1/proxyx".parse().unwrap();
        assert!(proxy_target(&uri, "c1").is_none());
    }

    #[test]
    fn proxy_route_names() {
        for (path, name) in [
            ("/v1/connections/c1/proxy", Some("c1")),
            ("/v1/connections/c1/proxy/", Some("c1")),
            (
                "/v1/connections/jira-prod/proxy/rest/api/2?x=1",
                Some("jira-prod"),
            ),
            ("/v1/connections/c1/proxyx", None),
            ("/v1/connections/c1/test", None),
            ("/v1/connections//proxy", None),
            ("/v1/connections/c1", None),
            ("/v1/connections/c%31/proxy", None),
            ("/v1/agents/c1/proxy", None),
        ] {
            assert_eq!(route_name(path), name, "{path}");
        }
    }

    #[test]
    fn request_framing() {
        let mut h = HeaderMap::new();
        assert_eq!(request_body_kind(&h), BodyKind::Empty);
        h.insert("content-length", "0".parse().unwrap());
        assert_eq!(request_body_kind(&h), BodyKind::Length(0));
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert_eq!(request_body_kind(&h), BodyKind::Streamed);
    }

    #[test]
    fn every_code_has_a_status() {
        assert_eq!(
            status_of(ResetCode::DestinationNotAllowed).0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(status_of(ResetCode::Timeout).0, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status_of(ResetCode::Tls).0, StatusCode::BAD_GATEWAY);
    }
}
