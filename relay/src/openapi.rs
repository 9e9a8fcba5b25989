//! The OpenAPI 3.1 document of the relay's HTTP surface, served without authentication at
//! `GET /v1/openapi.json` (issue "API and CLI": "an OpenAPI document for the relay API … generated
//! from the code").
//!
//! Generated with utoipa from the code: the connection model derives its schemas in
//! `airlock_shared::model` (feature `openapi`; a [`Secret`](airlock_shared::model::Secret) is
//! described as a string in requests and `{"set": bool}` in answers), and the relay's own answer
//! types ([`Problem`], [`TestReport`], [`SessionInfo`], …) derive theirs where they are defined.
//! The management API's private request and answer types are mirrored here ([`NewAgent`],
//! [`CreatedAgent`], [`AgentView`]); a unit test compares those mirrors and every documented route
//! against the real router, in both directions, so the document cannot drift from the code.
//!
//! Security schemes: `admin_token` (the admin API token, `Authorization: Bearer`, RFC 6750 §2.1)
//! for the management API, the test request and the proxy; `agent_token` for the agents'
//! WebSocket. `healthz`, `metrics` and this document need none.

// The `#[utoipa::path]` functions below only carry the documentation of the real handlers (in
// `api`, `proxy`, `tunnel` and `server`); utoipa needs a function to attach each to.
#![allow(dead_code)]

use std::sync::OnceLock;

use airlock_shared::model::{
    Auth, AuthHeader, ConnectionDefinition, Network, Secret, TestRequest, TlsSettings,
};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::problem::Problem;
use crate::proxy::{ExecutedBy, TestFailure, TestReport};
use crate::tunnel::SessionInfo;

/// Path of the document.
pub const PATH: &str = "/v1/openapi.json";

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Airlock relay API",
        description = "Lets cloud services call HTTP APIs inside private networks: connection \
                       definitions, agents, the test request and the proxy. Errors are RFC 9457 \
                       problem details (application/problem+json). Secrets are write-only: \
                       answers show {\"set\": true} instead.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        agent_connect,
        create_agent,
        list_agents,
        get_agent,
        revoke_agent,
        create_connection,
        list_connections,
        get_connection,
        update_connection,
        delete_connection,
        test_connection,
        proxy,
        proxy_root,
        healthz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        ConnectionDefinition,
        Auth,
        AuthHeader,
        TlsSettings,
        Network,
        TestRequest,
        Secret,
        ConnectionList,
        NewAgent,
        CreatedAgent,
        AgentView,
        AgentStatus,
        AgentList,
        SessionInfo,
        TestReport,
        TestFailure,
        ExecutedBy,
        Problem,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "agents", description = "Enrolling, listing and revoking agents"),
        (name = "connections", description = "Connection definitions, the test request"),
        (name = "proxy", description = "Requests to the app of a connection"),
        (name = "tunnel", description = "The agents' WebSocket"),
        (name = "operations", description = "Liveness, metrics, this document"),
    ),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "admin_token",
            bearer(
                "An admin API token (alk_admin_…), written to <data-dir>/admin-token on first start.",
            ),
        );
        components.add_security_scheme(
            "agent_token",
            bearer("An agent token (alk_agent_…), returned once by POST /v1/agents."),
        );
    }
}

/// The document as JSON, built once.
pub fn json() -> &'static Bytes {
    static JSON: OnceLock<Bytes> = OnceLock::new();
    JSON.get_or_init(|| {
        // Serializing plain data cannot fail; an empty body would show if it ever did.
        Bytes::from(ApiDoc::openapi().to_pretty_json().unwrap_or_default())
    })
}

/// `GET /v1/openapi.json`.
pub async fn serve() -> Response {
    let mut response = (StatusCode::OK, json().clone()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---- mirrors of the management API's private types (checked against it by the tests) ----

/// `POST /v1/agents` body.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    /// Agent name: 1 to 64 of letters, digits, `.`, `_`, `-`.
    #[schema(example = "edge-1")]
    pub name: String,
    /// The agent group whose private connections the agent executes (same rule as names).
    #[schema(example = "dc1")]
    pub group: String,
}

/// `POST /v1/agents` answer: the only time the agent token is shown (`Cache-Control: no-store`).
#[derive(Debug, ToSchema)]
pub struct CreatedAgent {
    /// Agent id, a UUID v4.
    pub id: String,
    /// Agent name.
    pub name: String,
    /// Agent group.
    pub group: String,
    /// Enrolment time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The agent token (`alk_agent_…`) for the agent's `--token-file`; only its hash is stored.
    pub token: String,
}

/// Whether an agent can serve requests now.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// At least one session is connected.
    Online,
    /// Enrolled, not connected.
    Offline,
    /// Revoked; its token no longer authenticates.
    Revoked,
}

/// An agent.
#[derive(Debug, ToSchema)]
pub struct AgentView {
    /// Agent id, a UUID v4.
    pub id: String,
    /// Agent name.
    pub name: String,
    /// Agent group.
    pub group: String,
    /// Enrolment time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// True once revoked.
    pub revoked: bool,
    /// Online, offline or revoked.
    pub status: AgentStatus,
    /// Connected tunnel sessions (an agent may hold several, e.g. during a restart).
    pub sessions: Vec<SessionInfo>,
}

/// `GET /v1/agents` answer.
#[derive(Debug, ToSchema)]
pub struct AgentList {
    /// Every agent, revoked ones included, in enrolment order.
    pub agents: Vec<AgentView>,
}

/// `GET /v1/connections` answer.
#[derive(Debug, ToSchema)]
pub struct ConnectionList {
    /// Every connection, by name, secrets shown as `{"set": …}`.
    pub connections: Vec<ConnectionDefinition>,
}

// ---- paths ----

#[utoipa::path(
    get,
    path = "/v1/agent/connect",
    tag = "tunnel",
    operation_id = "agent_connect",
    description = "The agents' WebSocket (RFC 6455): the agent dials out and upgrades; each binary \
                   message then carries one tunnel frame. Only agents call this.",
    security(("agent_token" = [])),
    responses(
        (status = 101, description = "Switching Protocols: the tunnel is open"),
        (status = 400, description = "Not a WebSocket upgrade request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked agent token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The relay is shutting down", body = Problem, content_type = "application/problem+json"),
    )
)]
fn agent_connect() {}

#[utoipa::path(
    post,
    path = "/v1/agents",
    tag = "agents",
    operation_id = "create_agent",
    description = "Enrols an agent and returns its token, shown only this once.",
    security(("admin_token" = [])),
    request_body = NewAgent,
    responses(
        (status = 201, description = "Enrolled", body = CreatedAgent),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within 30 s; the connection is closed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing or invalid; `field` names it", body = Problem, content_type = "application/problem+json"),
    )
)]
fn create_agent() {}

#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    operation_id = "list_agents",
    description = "Every agent with its status and sessions.",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    )
)]
fn list_agents() {}

#[utoipa::path(
    get,
    path = "/v1/agents/{id}",
    tag = "agents",
    operation_id = "get_agent",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such agent", body = Problem, content_type = "application/problem+json"),
    )
)]
fn get_agent() {}

#[utoipa::path(
    delete,
    path = "/v1/agents/{id}",
    tag = "agents",
    operation_id = "revoke_agent",
    description = "Revokes an agent: its token stops working and its sessions are closed at once.",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No active agent with this id", body = Problem, content_type = "application/problem+json"),
    )
)]
fn revoke_agent() {}

#[utoipa::path(
    post,
    path = "/v1/connections",
    tag = "connections",
    operation_id = "create_connection",
    description = "Creates a connection. Secrets are given in plain text here, stored encrypted, \
                   and shown as {\"set\": true} in the answer.",
    security(("admin_token" = [])),
    request_body = ConnectionDefinition,
    responses(
        (status = 201, description = "Created; `Location` names it", body = ConnectionDefinition,
         headers(("location" = String, description = "/v1/connections/{name}"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A connection of that name exists", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within 30 s; the connection is closed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing or invalid; `field` names it", body = Problem, content_type = "application/problem+json"),
    )
)]
fn create_connection() {}

#[utoipa::path(
    get,
    path = "/v1/connections",
    tag = "connections",
    operation_id = "list_connections",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every connection, secrets shown as {\"set\": …}", body = ConnectionList),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    )
)]
fn list_connections() {}

#[utoipa::path(
    get,
    path = "/v1/connections/{name}",
    tag = "connections",
    operation_id = "get_connection",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "Connection name")),
    responses(
        (status = 200, description = "The connection, secrets shown as {\"set\": …}", body = ConnectionDefinition),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
    )
)]
fn get_connection() {}

#[utoipa::path(
    put,
    path = "/v1/connections/{name}",
    tag = "connections",
    operation_id = "update_connection",
    description = "Replaces a connection's definition. With the same auth type, a secret that is \
                   omitted or given as {\"set\": true} keeps its stored value and {\"set\": false} \
                   clears it, so a GET answer can be edited and sent back. `name` may be omitted; \
                   connections cannot be renamed.",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "Connection name")),
    request_body = ConnectionDefinition,
    responses(
        (status = 200, description = "Replaced", body = ConnectionDefinition),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within 30 s; the connection is closed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing or invalid; `field` names it", body = Problem, content_type = "application/problem+json"),
    )
)]
fn update_connection() {}

#[utoipa::path(
    delete,
    path = "/v1/connections/{name}",
    tag = "connections",
    operation_id = "delete_connection",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "Connection name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
    )
)]
fn delete_connection() {}

#[utoipa::path(
    post,
    path = "/v1/connections/{name}/test",
    tag = "connections",
    operation_id = "test_connection",
    description = "Sends the connection's test request (through an agent for a private app) and \
                   reports status, latency and which agent ran it, or a classified failure: \
                   agent_offline, dns, connect, tls, timeout, auth (401/403), http_status.",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "Connection name")),
    responses(
        (status = 200, description = "The report (also when the test failed: see `ok`)", body = TestReport),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
    )
)]
fn test_connection() {}

#[utoipa::path(
    method(get, post, put, delete, patch, head, options, trace),
    path = "/v1/connections/{name}/proxy/{path}",
    tag = "proxy",
    operation_id = "proxy",
    description = "The main job: the request goes to `base_url` + `path` (and query) with the \
                   connection's auth applied, executed by an agent for a private app or by the \
                   relay for a public one; bodies stream both ways. The caller's Authorization \
                   (the admin token) is never forwarded. The answer is the app's, unchanged but \
                   for hop-by-hop fields; failures before the app answered are problems.",
    security(("admin_token" = [])),
    params(
        ("name" = String, Path, description = "Connection name"),
        ("path" = String, Path, description = "The rest of the target path; may contain `/`"),
    ),
    request_body(content = inline(String), content_type = "*/*", description = "Any body, streamed to the app"),
    responses(
        (status = "default", description = "The app's response, streamed", content_type = "*/*"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "destination_not_allowed: the app resolves to a refused address", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "dns, connect, tls, upstream_protocol or agent failures", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "agent_offline: no agent of the group is connected", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "timeout: no response head in response_timeout_ms", body = Problem, content_type = "application/problem+json"),
    )
)]
fn proxy() {}

#[utoipa::path(
    method(get, post, put, delete, patch, head, options, trace),
    path = "/v1/connections/{name}/proxy",
    tag = "proxy",
    operation_id = "proxy_root",
    description = "As the proxy with a path, for `base_url` itself.",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "Connection name")),
    request_body(content = inline(String), content_type = "*/*", description = "Any body, streamed to the app"),
    responses(
        (status = "default", description = "The app's response, streamed", content_type = "*/*"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The app could not be reached", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "agent_offline", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "timeout", body = Problem, content_type = "application/problem+json"),
    )
)]
fn proxy_root() {}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    description = "Liveness: 200 `ok` while the relay serves.",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain"))
)]
fn healthz() {}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    description = "Prometheus metrics (text exposition format 0.0.4).",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain; version=0.0.4"))
)]
fn metrics() {}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    description = "This document.",
    responses((status = 200, description = "The OpenAPI document", body = Object, content_type = "application/json"))
)]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use super::*;
    use crate::state::AppState;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use axum::Router;
    use http_body_util::BodyExt as _;
    use serde_json::{json, Value};
    use tower::ServiceExt as _;

    const ADMIN: &str = "alk_admin_openapi-test-token";

    fn document() -> Value {
        serde_json::from_slice(json()).expect("the document is JSON")
    }

    async fn setup() -> (Arc<AppState>, Router) {
        let state = crate::state::test_state(ADMIN).await;
        (state.clone(), crate::server::router(state))
    }

    async fn call(router: &Router, method: Method, uri: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {ADMIN}"));
        let body = match body {
            Some(v) => {
                request = request.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let response = router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The route paths registered in the source of the relay's router (`server::router` and the
    /// `api::router` it merges): every string literal that follows `.route(`. A route added
    /// there without documentation fails [`every_route_is_documented`].
    fn router_paths() -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        for source in [include_str!("server.rs"), include_str!("api.rs")] {
            let mut rest = source;
            while let Some(i) = rest.find(".route(") {
                rest = &rest[i + ".route(".len()..];
                let trimmed = rest.trim_start();
                if trimmed.starts_with("crate::openapi::PATH") {
                    paths.insert(PATH.to_string());
                }
                if let Some(literal) = trimmed.strip_prefix('"') {
                    if let Some(end) = literal.find('"') {
                        // `{*path}` is axum's catch-all; OpenAPI writes it `{path}`. A route with
                        // a trailing slash is an alias of the one without (documented once).
                        let path = literal[..end].replace("{*", "{");
                        let path = match path.strip_suffix('/') {
                            Some(p) if !p.is_empty() => p.to_string(),
                            _ => path,
                        };
                        paths.insert(path);
                    }
                }
            }
        }
        paths
    }

    /// Every documented `(path, method)`.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let doc = document();
        let mut out = BTreeMap::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| {
                    matches!(
                        k.as_str(),
                        "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
                    )
                })
                .cloned()
                .collect();
            out.insert(path.clone(), methods);
        }
        out
    }

    fn concrete(path: &str) -> String {
        path.replace("{name}", "probe")
            .replace("{id}", "probe")
            .replace("{path}", "a/b")
    }

    /// True when the router answered with one of its fallbacks: no such route, or no such
    /// method on the route.
    fn is_fallback(status: u16, body: &Value) -> bool {
        let slug = body["type"].as_str().unwrap_or_default();
        (status == 404 && body["detail"] == "no such endpoint")
            || (status == 405 && slug.ends_with("/method_not_allowed"))
    }

    #[test]
    fn document_is_openapi_3_json() {
        let doc = document();
        let version = doc["openapi"].as_str().unwrap();
        assert!(version.starts_with("3."), "{version}");
        assert_eq!(doc["info"]["title"], "Airlock relay API");
        assert!(!doc["info"]["version"].as_str().unwrap().is_empty());
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["admin_token"]["scheme"], "bearer");
        assert_eq!(schemes["agent_token"]["scheme"], "bearer");
        // The problem schema, with `type` (serde's rename of `type_uri`).
        let problem = &doc["components"]["schemas"]["Problem"];
        for field in ["type", "title", "status", "detail", "field"] {
            assert!(
                problem["properties"].get(field).is_some(),
                "Problem lacks {field}: {problem}"
            );
        }
        // Every $ref resolves.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }

    #[test]
    fn every_route_is_documented() {
        let routes = router_paths();
        // The scan found the routes it should (guards the scan itself).
        for expected in [
            "/v1/agent/connect",
            "/v1/agents",
            "/v1/agents/{id}",
            "/v1/connections",
            "/v1/connections/{name}",
            "/v1/connections/{name}/test",
            "/v1/connections/{name}/proxy/{path}",
            "/healthz",
            "/metrics",
            PATH,
        ] {
            assert!(
                routes.contains(expected),
                "{expected} not found in {routes:?}"
            );
        }
        let documented: BTreeSet<String> = documented().into_keys().collect();
        assert_eq!(routes, documented, "router paths vs documented paths");
    }

    #[tokio::test]
    async fn documented_methods_are_exactly_the_routed_ones() {
        let (_, router) = setup().await;
        let all = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
        ];
        for (path, methods) in documented() {
            let uri = concrete(&path);
            for method in &all {
                let name = method.as_str().to_ascii_lowercase();
                let (status, body) = call(&router, method.clone(), &uri, None).await;
                // A HEAD answer has no body to tell the fallbacks by; every path probed here is
                // routed for some method, so only 405 means "not this method".
                let routed = if *method == Method::HEAD {
                    status != 405
                } else {
                    !is_fallback(status, &body)
                };
                // axum answers HEAD for every GET route (RFC 9110 §9.3.2).
                let implied = name == "head" && methods.contains("get");
                assert_eq!(
                    routed,
                    methods.contains(&name) || implied,
                    "{method} {path}: routed={routed}, documented={methods:?} ({status} {body})"
                );
            }
        }
    }

    #[tokio::test]
    async fn document_is_served_without_auth() {
        let (_, router) = setup().await;
        let response = router
            .oneshot(Request::get(PATH).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let served: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(served, document());
    }

    /// The property names of schema `name`, following `$ref`s, `allOf` and `oneOf` members.
    fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
        let schema = &doc["components"]["schemas"][name];
        let mut out = BTreeSet::new();
        collect_properties(doc, schema, &mut out);
        out
    }

    fn collect_properties(doc: &Value, schema: &Value, out: &mut BTreeSet<String>) {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.trim_start_matches("#/components/schemas/");
            collect_properties(doc, &doc["components"]["schemas"][name], out);
        }
        if let Some(props) = schema["properties"].as_object() {
            out.extend(props.keys().cloned());
        }
        for key in ["allOf", "oneOf", "anyOf"] {
            for member in schema[key].as_array().into_iter().flatten() {
                collect_properties(doc, member, out);
            }
        }
    }

    fn keys(value: &Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    /// The mirrored answer types say what the real answers hold: no documented property is
    /// missing from a real answer, and no real member is undocumented.
    #[tokio::test]
    async fn answers_match_their_schemas() {
        let doc = document();
        let (_, router) = setup().await;

        let (status, created) = call(
            &router,
            Method::POST,
            "/v1/agents",
            Some(json!({"name": "edge-1", "group": "dc1"})),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(keys(&created), properties(&doc, "CreatedAgent"));
        assert_eq!(
            properties(&doc, "NewAgent"),
            BTreeSet::from(["name".to_string(), "group".to_string()])
        );

        let (_, list) = call(&router, Method::GET, "/v1/agents", None).await;
        assert_eq!(keys(&list), properties(&doc, "AgentList"));
        let agent = &list["agents"][0];
        assert_eq!(keys(agent), properties(&doc, "AgentView"));
        let statuses: BTreeSet<String> = doc["components"]["schemas"]["AgentStatus"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(statuses.contains(agent["status"].as_str().unwrap()));

        let definition = json!({
            "name": "jira",
            "base_url": "http://127.0.0.1:9",
            "auth": {"type": "basic", "username": "svc", "password": "pw"},
            "network": {"private": false},
            "test_request": {"method": "GET", "path": "/"}
        });
        let (status, view) = call(&router, Method::POST, "/v1/connections", Some(definition)).await;
        assert_eq!(status, 201, "{view}");
        let documented = properties(&doc, "ConnectionDefinition");
        assert!(
            keys(&view).is_subset(&documented),
            "{view} vs {documented:?}"
        );
        let (_, list) = call(&router, Method::GET, "/v1/connections", None).await;
        assert_eq!(keys(&list), properties(&doc, "ConnectionList"));

        let (status, report) = call(&router, Method::POST, "/v1/connections/jira/test", None).await;
        assert_eq!(status, 200);
        assert_eq!(keys(&report), properties(&doc, "TestReport"));
        assert_eq!(keys(&report["error"]), properties(&doc, "TestFailure"));

        let (status, problem) = call(&router, Method::GET, "/v1/connections/nope", None).await;
        assert_eq!(status, 404);
        assert!(keys(&problem).is_subset(&properties(&doc, "Problem")));
    }

    #[test]
    fn secrets_are_write_only_in_the_schema() {
        let doc = document();
        let secret = &doc["components"]["schemas"]["Secret"];
        let members = secret["oneOf"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{secret}");
        assert_eq!(members[0]["type"], "string");
        assert_eq!(members[0]["writeOnly"], true);
        assert_eq!(members[1]["required"], json!(["set"]));
    }
}
