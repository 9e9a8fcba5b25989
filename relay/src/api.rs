//! The management API (DESIGN.md, "Relay surface"): enrolling, listing and revoking agents, and
//! creating, reading, replacing and deleting connection definitions.
//!
//! Every endpoint requires the admin token (`Authorization: Bearer <admin token>`, RFC 6750
//! §2.1) and is checked before anything else; requests and responses are JSON, and every error is
//! an RFC 9457 [`Problem`]:
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/agents` `{"name", "group"}` | 201 `{"id", "name", "group", "created_at_ms", "token"}` |
//! | `GET /v1/agents` | 200 `{"agents": [agent…]}` |
//! | `GET /v1/agents/{id}` | 200 agent |
//! | `DELETE /v1/agents/{id}` | 204; the agent's sessions are closed at once |
//! | `POST /v1/connections` definition | 201 view |
//! | `GET /v1/connections` | 200 `{"connections": [view…]}` |
//! | `GET /v1/connections/{name}` | 200 view |
//! | `PUT /v1/connections/{name}` definition | 200 view (full replacement) |
//! | `DELETE /v1/connections/{name}` | 204 |
//!
//! An agent is `{"id", "name", "group", "created_at_ms", "revoked", "status", "sessions"}` with
//! `status` one of `online`, `offline`, `revoked` and `sessions` a list of
//! [`SessionInfo`]. The agent token (`alk_agent_…`) is in the creation answer only; the store
//! keeps its hash.
//!
//! A connection *view* is the definition's JSON with every secret replaced by `{"set": true}`
//! (or `{"set": false}` when empty), so no answer ever carries a secret ([`connection_view`]). In
//! a `PUT`, a secret that is omitted or given as `{"set": true}` keeps its stored value (auth
//! secrets when the auth type is unchanged, header values and query parameters matched by name;
//! see [`keep_stored_secrets`]), and `{"set": false}` clears it; a `GET` view can thus be edited
//! and sent back as is.
//!
//! Request errors: a `Content-Type` other than `application/json` (or `application/*+json`) is
//! 415 `unsupported_media_type`; a body over [`MAX_BODY_BYTES`] is 413 `payload_too_large`; a
//! body that has not fully arrived after [`BODY_READ_TIMEOUT`] is 408 `request_timeout`;
//! malformed JSON is 400 `malformed_json` (with line and column); a missing, unknown or mistyped
//! field and a failed validation are 422 `invalid_field` with `"field"` naming it. Error details
//! never echo request values. Everything is validated before the store is called, so nothing is
//! stored half-written.

use std::sync::Arc;

use airlock_shared::model::{valid_name, ConnectionDefinition};
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::problem::Problem;
use crate::state::AppState;
use crate::store::AgentRecord;
use crate::tunnel::SessionInfo;

/// Largest accepted request body: 1 MiB. Larger bodies are answered 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long the API waits for a whole request body: 30 s. A client that stalls, or declares a
/// `Content-Length` it never sends, is answered 408 `request_timeout` (RFC 9110 §15.5.9) and its
/// connection is not reused, instead of holding the connection open.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The management API's routes, with `state` applied. Merge into the relay's router.
///
/// No fallback is set, so the result can be merged with other routers.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/agents", get(list_agents).post(create_agent))
        .route("/v1/agents/{id}", get(get_agent).delete(revoke_agent))
        .route(
            "/v1/connections",
            get(list_connections).post(create_connection),
        )
        .route(
            "/v1/connections/{name}",
            get(get_connection)
                .put(update_connection)
                .delete(delete_connection),
        )
        .with_state(state)
}

// ---- extractors ----

/// Proof that the request carries the admin token. As the first extractor of a handler it makes
/// a missing or wrong token the first thing checked: 401 before any other problem.
struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        state.require_admin(&parts.headers)?;
        Ok(Admin)
    }
}

/// The single `{id}` / `{name}` path parameter; a rejection is a problem, not axum's plain text.
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParam(value)),
            Err(e) => {
                tracing::debug!(error = %e, "bad path parameter");
                Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_path",
                    "the path parameter is not valid percent-encoded UTF-8",
                ))
            }
        }
    }
}

// ---- request bodies ----

/// True for `application/json` and `application/*+json` (RFC 6839 §3.1), parameters ignored.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

fn payload_too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
    )
}

/// Checks the content type, reads at most [`MAX_BODY_BYTES`] within [`BODY_READ_TIMEOUT`] and
/// parses a JSON object.
async fn read_json(headers: &HeaderMap, body: Body) -> Result<Value, Problem> {
    read_json_within(headers, body, BODY_READ_TIMEOUT).await
}

async fn read_json_within(
    headers: &HeaderMap,
    body: Body,
    timeout: std::time::Duration,
) -> Result<Value, Problem> {
    if !is_json_content_type(headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(payload_too_large());
    }
    let read = http_body_util::Limited::new(body, MAX_BODY_BYTES).collect();
    let Ok(read) = tokio::time::timeout(timeout, read).await else {
        return Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        ));
    };
    let bytes: Bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(payload_too_large());
                }
                source = err.source();
            }
            tracing::debug!(error = %e, "reading the request body failed");
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "body_read",
                "the request body could not be read",
            ));
        }
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        // Syntax and EOF messages are fixed texts plus the position; they never quote the body.
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    // serde would also read a struct from an array; every body here is an object.
    if !value.is_object() {
        return Err(invalid_field(
            None,
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// 422 `invalid_field` naming `field` (when known).
fn invalid_field(field: Option<&str>, message: &str) -> Problem {
    match field {
        Some(f) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{f}: {message}"),
        )
        .with_field(f),
        None => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message),
    }
}

/// Deserializes a request value; errors name the field and never quote the value.
fn from_json<T: DeserializeOwned>(value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = sanitize_serde_message(&e.inner().to_string());
        let mut field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        // "missing field `x`" arises at the parent (an unknown field's path already ends with
        // it): name the field itself.
        for prefix in ["missing field `", "unknown field `"] {
            if let Some(name) = message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
            {
                if field.rsplit('.').next() != Some(name) {
                    if !field.is_empty() {
                        field.push('.');
                    }
                    field.push_str(name);
                }
            }
        }
        invalid_field((!field.is_empty()).then_some(field.as_str()), &message)
    })
}

/// A serde error message without the offending value.
///
/// serde's `invalid type: <value>, expected <what>` and `invalid value: …` quote the value (a
/// secret, possibly), as do `unknown variant` and `url`'s `relative URL without a base: "<value>"`;
/// those parts are cut. Messages naming only fields (`missing field`, `unknown field`,
/// `duplicate field`) and `invalid length` are kept.
fn sanitize_serde_message(message: &str) -> String {
    for (prefix, short) in [
        ("invalid type: ", "invalid type"),
        ("invalid value: ", "invalid value"),
        ("unknown variant ", "unknown variant"),
    ] {
        if message.starts_with(prefix) {
            // The expectation is a type description (`a string`, `` `none` or `basic` ``).
            return match message.find(", expected ") {
                Some(i) => format!("{short}{}", &message[i..]),
                None => short.to_string(),
            };
        }
    }
    for keep in [
        "missing field `",
        "unknown field `",
        "duplicate field `",
        "invalid length ",
    ] {
        if message.starts_with(keep) {
            return message.to_string();
        }
    }
    // Custom messages: keep the text before any quoted part.
    let cut = message
        .find(": \"")
        .or_else(|| message.find(['"', '`', '\'']))
        .unwrap_or(message.len());
    let kept = message[..cut].trim_end_matches([' ', ':']);
    if kept.is_empty() {
        "invalid value".to_string()
    } else {
        kept.to_string()
    }
}

/// Refuses secret markers (`{"set": …}`) left anywhere in `auth` or `tls` once stored values
/// have been merged: in a create, a `PUT` changing the auth type, or for a header or query
/// parameter the stored definition does not have, there is no stored value for them to stand for.
fn refuse_secret_markers(body: &Value) -> Result<(), Problem> {
    for key in ["auth", "tls"] {
        if let Some(field) = body.get(key).and_then(|v| find_marker(v, key.to_string())) {
            return Err(invalid_field(
                Some(&field),
                "needs the secret's value: {\"set\": …} keeps a stored value only in an update, \
                 for a secret the stored definition has (same auth type; headers and query \
                 parameters matched by name)",
            ));
        }
    }
    Ok(())
}

/// The path (`auth.headers[0].value`, `auth.params.api_key`) of the first secret marker in
/// `value`, whose own path is `path`.
fn find_marker(value: &Value, path: String) -> Option<String> {
    if secret_marker(value).is_some() {
        return Some(path);
    }
    match value {
        Value::Object(object) => object
            .iter()
            .find_map(|(key, v)| find_marker(v, format!("{path}.{key}"))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_marker(v, format!("{path}[{i}]"))),
        _ => None,
    }
}

fn validated(definition: &ConnectionDefinition) -> Result<(), Problem> {
    definition
        .validate()
        .map_err(|e| invalid_field(Some(&e.field), &e.message))
}

// ---- agents ----

/// `POST /v1/agents` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: String,
    group: String,
}

/// `POST /v1/agents` answer: the only time the token is shown.
#[derive(Serialize)]
struct CreatedAgent {
    id: String,
    name: String,
    group: String,
    created_at_ms: i64,
    token: String,
}

/// Whether an agent can serve requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum AgentStatus {
    /// At least one session is connected.
    Online,
    /// Enrolled, not connected.
    Offline,
    /// Revoked; its token no longer authenticates.
    Revoked,
}

/// An agent as `GET /v1/agents` shows it.
#[derive(Serialize)]
struct AgentView {
    id: String,
    name: String,
    group: String,
    created_at_ms: i64,
    revoked: bool,
    status: AgentStatus,
    sessions: Vec<SessionInfo>,
}

fn agent_view(state: &AppState, record: AgentRecord) -> AgentView {
    let sessions: Vec<SessionInfo> = state
        .registry
        .sessions_of(&record.id)
        .iter()
        .map(|s| s.info())
        .collect();
    let revoked = record.revoked_at_ms.is_some();
    let status = if revoked {
        AgentStatus::Revoked
    } else if sessions.is_empty() {
        AgentStatus::Offline
    } else {
        AgentStatus::Online
    };
    AgentView {
        id: record.id,
        name: record.name,
        group: record.group,
        created_at_ms: record.created_at_ms,
        revoked,
        status,
        sessions,
    }
}

const NAME_RULE: &str = "must be 1 to 64 characters of letters, digits, '.', '_' or '-'";

async fn create_agent(
    _: Admin,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let new: NewAgent = from_json(read_json(&headers, body).await?)?;
    if !valid_name(&new.name) {
        return Err(invalid_field(Some("name"), NAME_RULE));
    }
    if !valid_name(&new.group) {
        return Err(invalid_field(Some("group"), NAME_RULE));
    }
    let token = crate::token::generate(crate::token::AGENT_PREFIX);
    let record = state
        .store
        .create_agent(&new.name, &new.group, &crate::token::hash(&token))
        .await?;
    tracing::info!(agent_id = %record.id, name = %record.name, group = %record.group, "agent enrolled");
    let created = CreatedAgent {
        id: record.id,
        name: record.name,
        group: record.group,
        created_at_ms: record.created_at_ms,
        token,
    };
    let mut response = (StatusCode::CREATED, Json(created)).into_response();
    // The token must not linger in caches.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn list_agents(_: Admin, State(state): State<Arc<AppState>>) -> Result<Json<Value>, Problem> {
    let agents: Vec<AgentView> = state
        .store
        .list_agents()
        .await?
        .into_iter()
        .map(|r| agent_view(&state, r))
        .collect();
    Ok(Json(json!({ "agents": agents })))
}

async fn get_agent(
    _: Admin,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
) -> Result<Json<AgentView>, Problem> {
    let record = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no agent with id '{id}'")))?;
    Ok(Json(agent_view(&state, record)))
}

async fn revoke_agent(
    _: Admin,
    State(state): State<Arc<AppState>>,
    PathParam(id): PathParam,
) -> Result<StatusCode, Problem> {
    if !state.store.revoke_agent(&id).await? {
        return Err(Problem::not_found(format!(
            "no active agent with id '{id}' (unknown or already revoked)"
        )));
    }
    let closed = state.registry.disconnect_agent(&id, "agent revoked");
    tracing::info!(agent_id = %id, sessions_closed = closed, "agent revoked");
    Ok(StatusCode::NO_CONTENT)
}

// ---- connections ----

/// Sets the value at JSON pointer `ptr` (RFC 6901) of `root`, when its parent object exists.
fn set_pointer(root: &mut Value, ptr: &str, value: Value) {
    let Some((parent, last)) = ptr.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    if let Some(object) = root.pointer_mut(parent).and_then(Value::as_object_mut) {
        object.insert(last, value);
    }
}

/// `Some(set)` when `value` is the secret marker `{"set": <bool>}` of a view.
fn secret_marker(value: &Value) -> Option<bool> {
    match value.as_object() {
        Some(object) if object.len() == 1 => object.get("set").and_then(Value::as_bool),
        _ => None,
    }
}

/// The API view of a definition: its JSON with every secret replaced by `{"set": <non-empty>}`.
///
/// # Errors
/// 500 `internal` if the definition cannot be encoded (not expected).
pub fn connection_view(definition: &ConnectionDefinition) -> Result<Value, Problem> {
    let mut value = serde_json::to_value(definition).map_err(|e| {
        tracing::error!(connection = %definition.name, category = ?e.classify(), "view encoding failed");
        Problem::internal()
    })?;
    for ptr in definition.secret_pointers() {
        let set = value
            .pointer(&ptr)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        set_pointer(&mut value, &ptr, json!({ "set": set }));
    }
    Ok(value)
}

/// In a `PUT` body, puts stored secrets back where the body leaves them unchanged:
///
/// - with the stored auth type: `auth.password` omitted or `{"set": true}` keeps the stored
///   password; a header whose `value` is omitted or `{"set": true}` keeps the stored value of the
///   header of the same name (case-insensitive); a query parameter given as `{"set": true}` keeps
///   the stored value of the parameter of the same name;
/// - whatever the auth type: `tls.client_key` given as `{"set": true}`, or omitted while the
///   body still has a `tls.client_certificate`, keeps the stored key.
///
/// `{"set": false}` clears a secret (the empty string; for `tls.client_key`, no key). Markers
/// with nothing stored to stand for are left for [`refuse_secret_markers`] to refuse.
fn keep_stored_secrets(body: &mut Value, stored: &ConnectionDefinition) -> Result<(), Problem> {
    let stored_json = serde_json::to_value(stored).map_err(|e| {
        tracing::error!(connection = %stored.name, category = ?e.classify(), "stored definition encoding failed");
        Problem::internal()
    })?;
    let same_auth_type =
        body.pointer("/auth/type").and_then(Value::as_str) == Some(stored.auth.type_name());
    if same_auth_type {
        if stored.auth.basic_credentials().is_some() {
            let replacement = match body.pointer("/auth/password") {
                None => stored_json.pointer("/auth/password").cloned(),
                Some(v) => match secret_marker(v) {
                    Some(true) => stored_json.pointer("/auth/password").cloned(),
                    Some(false) => Some(Value::String(String::new())),
                    None => None,
                },
            };
            if let Some(value) = replacement {
                set_pointer(body, "/auth/password", value);
            }
        }
        let stored_headers = stored.auth.headers();
        if let Some(headers) = body
            .pointer_mut("/auth/headers")
            .and_then(Value::as_array_mut)
        {
            for header in headers.iter_mut().filter_map(Value::as_object_mut) {
                let Some(name) = header.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let kept = stored_headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| Value::String(h.value.expose().to_string()));
                let replacement = match header.get("value") {
                    None => kept,
                    Some(v) => match secret_marker(v) {
                        Some(true) => kept,
                        Some(false) => Some(Value::String(String::new())),
                        None => None,
                    },
                };
                if let Some(value) = replacement {
                    header.insert("value".into(), value);
                }
            }
        }
        let stored_params = stored.auth.params();
        if let Some(params) = body
            .pointer_mut("/auth/params")
            .and_then(Value::as_object_mut)
        {
            for (name, value) in params.iter_mut() {
                let replacement = match secret_marker(value) {
                    Some(true) => stored_params
                        .and_then(|p| p.get(name))
                        .map(|s| Value::String(s.expose().to_string())),
                    Some(false) => Some(Value::String(String::new())),
                    None => None,
                };
                if let Some(replacement) = replacement {
                    *value = replacement;
                }
            }
        }
    }
    if let Some(key) = &stored.tls.client_key {
        if let Some(tls) = body.get_mut("tls").and_then(Value::as_object_mut) {
            let stored_key = Value::String(key.expose().to_string());
            match tls.get("client_key").map(secret_marker) {
                None if tls.contains_key("client_certificate") => {
                    tls.insert("client_key".into(), stored_key);
                }
                Some(Some(true)) => {
                    tls.insert("client_key".into(), stored_key);
                }
                Some(Some(false)) => {
                    tls.remove("client_key");
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn create_connection(
    _: Admin,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let value = read_json(&headers, body).await?;
    refuse_secret_markers(&value)?;
    let definition: ConnectionDefinition = from_json(value)?;
    validated(&definition)?;
    let view = connection_view(&definition)?;
    state.store.create_connection(&definition).await?;
    state.invalidate_connection(&definition.name);
    tracing::info!(connection = %definition.name, "connection created");
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    // Valid names are `[A-Za-z0-9._-]`, so the location is a valid header value.
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/connections/{}", definition.name)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn list_connections(
    _: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, Problem> {
    let views = state
        .store
        .list_connections()
        .await?
        .iter()
        .map(connection_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "connections": views })))
}

fn no_connection(name: &str) -> Problem {
    Problem::not_found(format!("no connection named '{name}'"))
}

async fn get_connection(
    _: Admin,
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam,
) -> Result<Json<Value>, Problem> {
    let definition = state
        .store
        .connection(&name)
        .await?
        .ok_or_else(|| no_connection(&name))?;
    Ok(Json(connection_view(&definition)?))
}

async fn update_connection(
    _: Admin,
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, Problem> {
    let mut value = read_json(&headers, body).await?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| invalid_field(None, "the body must be a JSON object"))?;
    match object.get("name") {
        None => {
            object.insert("name".into(), Value::String(name.clone()));
        }
        Some(Value::String(n)) if *n == name => {}
        Some(_) => {
            return Err(invalid_field(
                Some("name"),
                "must equal the name in the path, or be omitted (connections cannot be renamed)",
            ))
        }
    }
    let stored = state
        .store
        .connection(&name)
        .await?
        .ok_or_else(|| no_connection(&name))?;
    keep_stored_secrets(&mut value, &stored)?;
    refuse_secret_markers(&value)?;
    let definition: ConnectionDefinition = from_json(value)?;
    validated(&definition)?;
    let view = connection_view(&definition)?;
    let updated = state.store.update_connection(&definition).await?;
    state.invalidate_connection(&name);
    if !updated {
        // Deleted since it was read.
        return Err(no_connection(&name));
    }
    tracing::info!(connection = %name, "connection replaced");
    Ok(Json(view))
}

async fn delete_connection(
    _: Admin,
    State(state): State<Arc<AppState>>,
    PathParam(name): PathParam,
) -> Result<StatusCode, Problem> {
    let deleted = state.store.delete_connection(&name).await?;
    state.invalidate_connection(&name);
    if !deleted {
        return Err(no_connection(&name));
    }
    tracing::info!(connection = %name, "connection deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_shared::model::{Auth, Secret};
    use axum::http::{Method, Request};
    use tower::ServiceExt as _;

    const ADMIN: &str = "alk_admin_test-admin-token";
    const PASSWORD: &str = "hunter2-very-secret";

    async fn setup() -> (Arc<AppState>, Router) {
        let state = crate::state::test_state(ADMIN).await;
        (state.clone(), router(state))
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
        }

        fn content_type(&self) -> &str {
            self.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        }

        /// Asserts a problem of `status` and `slug`; returns its JSON.
        fn problem(&self, status: StatusCode, slug: &str) -> Value {
            assert_eq!(
                self.status,
                status,
                "{}",
                String::from_utf8_lossy(&self.body)
            );
            assert_eq!(self.content_type(), "application/problem+json");
            let p = self.json();
            assert_eq!(p["type"], format!("{}{slug}", crate::problem::TYPE_BASE));
            assert_eq!(p["status"], status.as_u16());
            p
        }
    }

    async fn send(
        router: &Router,
        method: Method,
        uri: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = router
            .clone()
            .oneshot(req.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn call(router: &Router, method: Method, uri: &str, body: Option<Value>) -> Answer {
        match body {
            Some(b) => {
                send(
                    router,
                    method,
                    uri,
                    Some(ADMIN),
                    Some("application/json"),
                    b.to_string(),
                )
                .await
            }
            None => send(router, method, uri, Some(ADMIN), None, Body::empty()).await,
        }
    }

    fn jira() -> Value {
        json!({
            "name": "jira",
            "base_url": "https://jira.corp.example:8443",
            "auth": {"type": "basic", "username": "svc", "password": PASSWORD},
            "network": {"private": true, "agent_group": "dc1"},
            "test_request": {"method": "GET", "path": "/rest/api/2/myself"}
        })
    }

    fn assert_no_password(answer: &Answer) {
        let haystack = String::from_utf8_lossy(&answer.body);
        assert!(!haystack.contains(PASSWORD), "secret leaked: {haystack}");
        assert!(!haystack.contains("hunter2"), "secret leaked: {haystack}");
    }

    #[tokio::test]
    async fn every_endpoint_requires_the_admin_token() {
        let (_state, router) = setup().await;
        let endpoints = [
            (Method::GET, "/v1/agents"),
            (Method::POST, "/v1/agents"),
            (Method::GET, "/v1/agents/x"),
            (Method::DELETE, "/v1/agents/x"),
            (Method::GET, "/v1/connections"),
            (Method::POST, "/v1/connections"),
            (Method::GET, "/v1/connections/jira"),
            (Method::PUT, "/v1/connections/jira"),
            (Method::DELETE, "/v1/connections/jira"),
        ];
        for (method, uri) in endpoints {
            for token in [None, Some("alk_admin_wrong"), Some("alk_agent_x")] {
                let a = send(
                    &router,
                    method.clone(),
                    uri,
                    token,
                    Some("application/json"),
                    jira().to_string(),
                )
                .await;
                a.problem(StatusCode::UNAUTHORIZED, "unauthorized");
                assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");
            }
        }
    }

    #[tokio::test]
    async fn connection_crud() {
        let (state, router) = setup().await;
        assert_eq!(
            call(&router, Method::GET, "/v1/connections", None)
                .await
                .json(),
            json!({"connections": []})
        );

        let created = call(&router, Method::POST, "/v1/connections", Some(jira())).await;
        assert_eq!(created.status, StatusCode::CREATED);
        assert_eq!(created.headers[header::LOCATION], "/v1/connections/jira");
        assert_no_password(&created);
        let view = created.json();
        assert_eq!(view["auth"]["password"], json!({"set": true}));
        assert_eq!(view["auth"]["username"], "svc");
        assert_eq!(view["network"]["agent_group"], "dc1");
        assert_eq!(view["response_timeout_ms"], 60_000);
        let stored = state.store.connection("jira").await.unwrap().unwrap();
        assert_eq!(
            stored.auth,
            Auth::Basic {
                username: "svc".into(),
                password: Secret::new(PASSWORD)
            }
        );

        let got = call(&router, Method::GET, "/v1/connections/jira", None).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_no_password(&got);
        assert_eq!(got.json(), view);

        let listed = call(&router, Method::GET, "/v1/connections", None).await;
        assert_no_password(&listed);
        assert_eq!(listed.json(), json!({ "connections": [view] }));

        // Full replacement with a new password; the name may be omitted.
        let mut replacement = jira();
        replacement.as_object_mut().unwrap().remove("name");
        replacement["auth"]["password"] = json!("hunter2-rotated");
        replacement["network"] = json!({"private": false});
        let put = call(
            &router,
            Method::PUT,
            "/v1/connections/jira",
            Some(replacement),
        )
        .await;
        assert_eq!(put.status, StatusCode::OK);
        assert_no_password(&put);
        assert_eq!(put.json()["network"], json!({"private": false}));
        let stored = state.store.connection("jira").await.unwrap().unwrap();
        assert!(!stored.network.private);
        assert!(
            matches!(&stored.auth, Auth::Basic { password, .. } if password.expose() == "hunter2-rotated")
        );
        // The request path sees the new definition.
        assert!(
            !state
                .connection("jira")
                .await
                .unwrap()
                .definition
                .network
                .private
        );

        let deleted = call(&router, Method::DELETE, "/v1/connections/jira", None).await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
        assert!(deleted.body.is_empty());
        assert!(state.store.connection("jira").await.unwrap().is_none());
        for method in [Method::GET, Method::DELETE] {
            call(&router, method, "/v1/connections/jira", None)
                .await
                .problem(StatusCode::NOT_FOUND, "not_found");
        }
        call(&router, Method::PUT, "/v1/connections/jira", Some(jira()))
            .await
            .problem(StatusCode::NOT_FOUND, "not_found");
    }

    #[tokio::test]
    async fn create_conflict_is_409_and_keeps_the_original() {
        let (state, router) = setup().await;
        call(&router, Method::POST, "/v1/connections", Some(jira())).await;
        let mut other = jira();
        other["base_url"] = json!("https://elsewhere.example");
        let a = call(&router, Method::POST, "/v1/connections", Some(other)).await;
        a.problem(StatusCode::CONFLICT, "conflict");
        assert_no_password(&a);
        let stored = state.store.connection("jira").await.unwrap().unwrap();
        assert_eq!(stored.base_url.as_str(), "https://jira.corp.example:8443/");
    }

    #[tokio::test]
    async fn request_errors_are_problems() {
        let (state, router) = setup().await;
        // Malformed JSON: 400 with the position, no echo.
        let a = send(
            &router,
            Method::POST,
            "/v1/connections",
            Some(ADMIN),
            Some("application/json"),
            format!("{{\"name\": \"x\", \"auth\": {{\"password\": \"{PASSWORD}\""),
        )
        .await;
        let p = a.problem(StatusCode::BAD_REQUEST, "malformed_json");
        assert!(
            p["detail"].as_str().unwrap().contains("line 1"),
            "{}",
            p["detail"]
        );
        assert_no_password(&a);

        // Wrong or missing content type: 415.
        for ct in [Some("text/plain"), None] {
            send(
                &router,
                Method::POST,
                "/v1/connections",
                Some(ADMIN),
                ct,
                jira().to_string(),
            )
            .await
            .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
        }
        // A JSON suffix type and parameters are fine.
        let a = send(
            &router,
            Method::POST,
            "/v1/agents",
            Some(ADMIN),
            Some("Application/Merge-Patch+JSON; charset=utf-8"),
            json!({"name": "a", "group": "g"}).to_string(),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED);

        // Too large: 413.
        let big = format!("{{\"name\": \"{}\"}}", "x".repeat(MAX_BODY_BYTES + 1));
        call_raw_too_large(&router, big).await;

        // Missing field: 422 naming it.
        let p = call(
            &router,
            Method::POST,
            "/v1/connections",
            Some(json!({"name": "x"})),
        )
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "base_url");

        // Not an object: 422.
        let p = call(
            &router,
            Method::POST,
            "/v1/connections",
            Some(json!(["jira"])),
        )
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert!(p.get("field").is_none());

        // Unknown field: 422 naming it.
        let mut extra = jira();
        extra["colour"] = json!("blue");
        let p = call(&router, Method::POST, "/v1/connections", Some(extra))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "colour");

        // Wrong type of a secret: the value is not echoed.
        let mut wrong = jira();
        wrong["auth"]["password"] = json!(["hunter2-in-a-list"]);
        let a = call(&router, Method::POST, "/v1/connections", Some(wrong)).await;
        a.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_no_password(&a);

        // Unparseable base_url: 422 on base_url, value not echoed.
        let mut bad = jira();
        bad["base_url"] = json!("hunter2 is not a url");
        let a = call(&router, Method::POST, "/v1/connections", Some(bad)).await;
        let p = a.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "base_url");
        assert_no_password(&a);

        // Validation failure: 422 with the field.
        let mut bad = jira();
        bad["base_url"] = json!("ftp://jira.corp.example");
        let p = call(&router, Method::POST, "/v1/connections", Some(bad))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "base_url");

        let mut bad = jira();
        bad["network"] = json!({"private": true});
        let p = call(&router, Method::POST, "/v1/connections", Some(bad))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "network.agent_group");

        // Nothing was stored by any of the failures.
        assert!(state.store.list_connections().await.unwrap().is_empty());
    }

    /// A client that declares more body than it sends (or stalls mid-body) gets 408 with a
    /// problem body and `Connection: close`, instead of holding the connection forever.
    #[tokio::test]
    async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        let first =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"name\""))]);
        let body = Body::from_stream(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ));
        let started = std::time::Instant::now();
        let problem = read_json_within(&headers, body, std::time::Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(problem.status, 408);
        assert_eq!(problem.slug(), "request_timeout");
        assert!(problem.detail.contains("0.1 s"), "{}", problem.detail);
        let resp = problem.into_response();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        // A body that does arrive in time is read as before.
        let body = Body::from(r#"{"name": "x"}"#);
        let value = read_json_within(&headers, body, std::time::Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(value["name"], "x");
    }

    async fn call_raw_too_large(router: &Router, big: String) {
        send(
            router,
            Method::POST,
            "/v1/connections",
            Some(ADMIN),
            Some("application/json"),
            big.clone(),
        )
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
        // Without a Content-Length the limit still holds while reading.
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(big))]);
        send(
            router,
            Method::POST,
            "/v1/connections",
            Some(ADMIN),
            Some("application/json"),
            Body::from_stream(stream),
        )
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }

    #[tokio::test]
    async fn put_keeps_or_clears_secrets() {
        let (state, router) = setup().await;
        call(&router, Method::POST, "/v1/connections", Some(jira())).await;
        let stored_password = || async {
            match state.store.connection("jira").await.unwrap().unwrap().auth {
                Auth::Basic { password, .. } => password.expose().to_string(),
                other => panic!("auth {}", other.type_name()),
            }
        };

        // A GET view sent back unchanged keeps the password.
        let view = call(&router, Method::GET, "/v1/connections/jira", None)
            .await
            .json();
        let mut edited = view.clone();
        edited["auth"]["username"] = json!("svc2");
        let put = call(&router, Method::PUT, "/v1/connections/jira", Some(edited)).await;
        assert_eq!(put.status, StatusCode::OK);
        assert_no_password(&put);
        assert_eq!(put.json()["auth"]["password"], json!({"set": true}));
        assert_eq!(stored_password().await, PASSWORD);

        // Omitted: kept too.
        let mut omitted = jira();
        omitted["auth"].as_object_mut().unwrap().remove("password");
        let put = call(&router, Method::PUT, "/v1/connections/jira", Some(omitted)).await;
        assert_eq!(put.status, StatusCode::OK);
        assert_eq!(stored_password().await, PASSWORD);

        // {"set": false} clears it.
        let mut cleared = jira();
        cleared["auth"]["password"] = json!({"set": false});
        let put = call(&router, Method::PUT, "/v1/connections/jira", Some(cleared)).await;
        assert_eq!(put.json()["auth"]["password"], json!({"set": false}));
        assert_eq!(stored_password().await, "");

        // A different name in the body: 422, nothing changed.
        let mut renamed = jira();
        renamed["name"] = json!("other");
        let p = call(&router, Method::PUT, "/v1/connections/jira", Some(renamed))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "name");
        assert_eq!(
            state.store.connection("jira").await.unwrap().unwrap().auth,
            Auth::Basic {
                username: "svc".into(),
                password: Secret::new("")
            }
        );

        // A marker cannot stand for a value that does not exist: create and type changes.
        let mut marker = jira();
        marker["name"] = json!("new");
        marker["auth"]["password"] = json!({"set": true});
        let p = call(&router, Method::POST, "/v1/connections", Some(marker))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.password");
        let mut changed = jira();
        changed["auth"] = json!({"type": "none", "password": {"set": true}});
        let p = call(&router, Method::PUT, "/v1/connections/jira", Some(changed))
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.password");
        assert!(state.store.connection("new").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn agents_lifecycle() {
        let (state, router) = setup().await;
        let created = call(
            &router,
            Method::POST,
            "/v1/agents",
            Some(json!({"name": "edge-1", "group": "dc1"})),
        )
        .await;
        assert_eq!(created.status, StatusCode::CREATED);
        assert_eq!(created.headers[header::CACHE_CONTROL], "no-store");
        let agent = created.json();
        let token = agent["token"].as_str().unwrap().to_string();
        assert!(token.starts_with(crate::token::AGENT_PREFIX));
        let id = agent["id"].as_str().unwrap().to_string();
        assert_eq!(agent["name"], "edge-1");
        assert_eq!(agent["group"], "dc1");
        assert!(agent["created_at_ms"].as_i64().unwrap() > 0);
        // Only the hash is stored, and it authenticates.
        let record = state
            .store
            .agent_by_token_hash(&crate::token::hash(&token))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.id, id);

        let listed = call(&router, Method::GET, "/v1/agents", None).await;
        assert!(!String::from_utf8_lossy(&listed.body).contains(&token));
        let expected = json!({
            "id": id, "name": "edge-1", "group": "dc1",
            "created_at_ms": agent["created_at_ms"], "revoked": false,
            "status": "offline", "sessions": []
        });
        assert_eq!(listed.json(), json!({ "agents": [expected.clone()] }));
        let one = call(&router, Method::GET, &format!("/v1/agents/{id}"), None).await;
        assert_eq!(one.json(), expected);
        call(&router, Method::GET, "/v1/agents/unknown", None)
            .await
            .problem(StatusCode::NOT_FOUND, "not_found");

        let revoked = call(&router, Method::DELETE, &format!("/v1/agents/{id}"), None).await;
        assert_eq!(revoked.status, StatusCode::NO_CONTENT);
        call(&router, Method::DELETE, &format!("/v1/agents/{id}"), None)
            .await
            .problem(StatusCode::NOT_FOUND, "not_found");
        call(&router, Method::DELETE, "/v1/agents/unknown", None)
            .await
            .problem(StatusCode::NOT_FOUND, "not_found");
        let one = call(&router, Method::GET, &format!("/v1/agents/{id}"), None)
            .await
            .json();
        assert_eq!(
            (one["revoked"].clone(), one["status"].clone()),
            (json!(true), json!("revoked"))
        );
        assert!(state
            .store
            .agent_by_token_hash(&crate::token::hash(&token))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn agent_creation_is_validated() {
        let (state, router) = setup().await;
        for (body, field) in [
            (json!({"name": "a b", "group": "g"}), "name"),
            (json!({"name": "a", "group": ""}), "group"),
            (json!({"name": "a"}), "group"),
            (json!({"name": "a", "group": "g", "token": "x"}), "token"),
        ] {
            let p = call(&router, Method::POST, "/v1/agents", Some(body.clone()))
                .await
                .problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
            assert_eq!(p["field"], field, "{body}");
        }
        assert!(state.store.list_agents().await.unwrap().is_empty());
    }

    #[test]
    fn serde_messages_lose_their_values() {
        let cases = [
            (
                "invalid type: string \"hunter2\", expected a sequence",
                "invalid type, expected a sequence",
            ),
            (
                "invalid value: string \"hunter2\", expected a URL",
                "invalid value, expected a URL",
            ),
            (
                "unknown variant `hunter2`, expected `none` or `basic`",
                "unknown variant, expected `none` or `basic`",
            ),
            (
                "relative URL without a base: \"hunter2\"",
                "relative URL without a base",
            ),
            ("missing field `name`", "missing field `name`"),
            ("\"hunter2\"", "invalid value"),
        ];
        for (raw, clean) in cases {
            assert_eq!(sanitize_serde_message(raw), clean);
        }
    }

    #[test]
    fn view_marks_every_secret() {
        let mut definition: ConnectionDefinition = serde_json::from_value(jira()).unwrap();
        let view = connection_view(&definition).unwrap();
        assert_eq!(view["auth"]["password"], json!({"set": true}));
        assert!(!view.to_string().contains(PASSWORD));
        definition.auth = Auth::Basic {
            username: "u".into(),
            password: Secret::default(),
        };
        let view = connection_view(&definition).unwrap();
        assert_eq!(view["auth"]["password"], json!({"set": false}));
        definition.auth = Auth::None;
        assert_eq!(
            connection_view(&definition).unwrap()["auth"],
            json!({"type": "none"})
        );
    }

    fn client_identity() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[tokio::test]
    async fn every_secret_of_every_auth_type_is_hidden_and_kept() {
        let (state, router) = setup().await;
        let (cert, key) = client_identity();
        let definition = json!({
            "name": "cu",
            "base_url": "https://app.example",
            "auth": {"type": "custom", "username": "svc", "password": "pw-SECRET-1",
                "headers": [{"name": "X-Api-Key", "value": "hdr-SECRET-2"},
                            {"name": "X-Tenant", "value": "acme", "secret": false}],
                "params": {"api key&": "param-SECRET-3"}},
            "tls": {"client_certificate": cert, "client_key": key}
        });
        let created = call(&router, Method::POST, "/v1/connections", Some(definition)).await;
        assert_eq!(created.status, StatusCode::CREATED);
        let view = call(&router, Method::GET, "/v1/connections/cu", None)
            .await
            .json();
        let text = view.to_string();
        for secret in ["SECRET", "PRIVATE KEY"] {
            assert!(!text.contains(secret), "secret in view: {text}");
        }
        assert_eq!(view["auth"]["password"], json!({"set": true}));
        assert_eq!(view["auth"]["headers"][0]["value"], json!({"set": true}));
        assert_eq!(view["auth"]["headers"][1]["value"], "acme");
        assert_eq!(view["auth"]["params"]["api key&"], json!({"set": true}));
        assert_eq!(view["tls"]["client_key"], json!({"set": true}));
        assert!(view["tls"]["client_certificate"].as_str().is_some());

        // The view sent back unchanged keeps every secret; a header value may also be omitted.
        let mut back = view.clone();
        back["auth"]["headers"][0]
            .as_object_mut()
            .unwrap()
            .remove("value");
        let put = call(&router, Method::PUT, "/v1/connections/cu", Some(back)).await;
        assert_eq!(put.status, StatusCode::OK, "{}", put.json());
        let stored = state.store.connection("cu").await.unwrap().unwrap();
        let Auth::Custom {
            password,
            headers,
            params,
            ..
        } = &stored.auth
        else {
            panic!("auth {}", stored.auth.type_name());
        };
        assert_eq!(password.expose(), "pw-SECRET-1");
        assert_eq!(headers[0].value.expose(), "hdr-SECRET-2");
        assert_eq!(params["api key&"].expose(), "param-SECRET-3");
        assert_eq!(stored.tls.client_key.as_ref().unwrap().expose(), key);

        // A marker for a parameter or header that is not stored is refused, naming it.
        let mut unknown = view.clone();
        unknown["auth"]["params"]["new"] = json!({"set": true});
        let answer = call(&router, Method::PUT, "/v1/connections/cu", Some(unknown)).await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.params.new");
        let mut unknown = view.clone();
        unknown["auth"]["headers"][0]["name"] = json!("X-Other");
        let answer = call(&router, Method::PUT, "/v1/connections/cu", Some(unknown)).await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.headers[0].value");
        // Changing the auth type keeps no auth secret, but the client key stays.
        let mut header_type = view.clone();
        header_type["auth"] = json!({"type": "header",
            "headers": [{"name": "X-Api-Key", "value": {"set": true}}]});
        let answer = call(
            &router,
            Method::PUT,
            "/v1/connections/cu",
            Some(header_type.clone()),
        )
        .await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.headers[0].value");
        header_type["auth"]["headers"][0]["value"] = json!("new-value");
        let put = call(
            &router,
            Method::PUT,
            "/v1/connections/cu",
            Some(header_type),
        )
        .await;
        assert_eq!(put.status, StatusCode::OK, "{}", put.json());
        let stored = state.store.connection("cu").await.unwrap().unwrap();
        assert_eq!(stored.tls.client_key.as_ref().unwrap().expose(), key);
        // {"set": false} removes the client key (and then the certificate lacks its key).
        let mut no_key = call(&router, Method::GET, "/v1/connections/cu", None)
            .await
            .json();
        no_key["tls"]["client_key"] = json!({"set": false});
        let answer = call(&router, Method::PUT, "/v1/connections/cu", Some(no_key)).await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "tls.client_key");
        // A create cannot use markers anywhere.
        let mut marker = json!({"name": "m", "base_url": "https://a",
            "auth": {"type": "query", "params": {"k": {"set": true}}}});
        let answer = call(
            &router,
            Method::POST,
            "/v1/connections",
            Some(marker.clone()),
        )
        .await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "auth.params.k");
        marker["auth"] = json!({"type": "none"});
        marker["tls"] = json!({"client_key": {"set": true}});
        let answer = call(&router, Method::POST, "/v1/connections", Some(marker)).await;
        let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert_eq!(p["field"], "tls.client_key");
    }

    #[tokio::test]
    async fn header_injection_and_bad_pem_are_refused_naming_the_field() {
        let (_, router) = setup().await;
        let cases = [
            (
                json!({"type": "header", "headers": [{"name": "X-A", "value": "v\r\nX-Evil: 1"}]}),
                None,
                "auth.headers[0].value",
            ),
            (
                json!({"type": "header", "headers": [{"name": "Bad Name", "value": "v"}]}),
                None,
                "auth.headers[0].name",
            ),
            (
                json!({"type": "none"}),
                Some(json!({"ca_certificate": "not a PEM"})),
                "tls.ca_certificate",
            ),
            (
                json!({"type": "none"}),
                Some(json!({"client_certificate": "x", "client_key": "y"})),
                "tls.client_certificate",
            ),
        ];
        for (auth, tls, field) in cases {
            let mut body = json!({"name": "x", "base_url": "https://a", "auth": auth});
            if let Some(tls) = tls {
                body["tls"] = tls;
            }
            let answer = call(&router, Method::POST, "/v1/connections", Some(body)).await;
            let p = answer.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
            assert_eq!(p["field"], field);
            assert!(!p.to_string().contains("X-Evil"), "{p}");
        }
    }
}
