//! Connection definitions: what the relay stores and what crosses the tunnel in [`crate::proto::Open`].
//!
//! JSON shape (DESIGN.md, "Connection model"):
//!
//! ```json
//! {
//!   "name": "jira",
//!   "base_url": "https://jira.corp.example:8443",
//!   "auth": {"type": "basic", "username": "svc", "password": "…"},
//!   "network": {"private": true, "agent_group": "dc1"},
//!   "test_request": {"method": "GET", "path": "/rest/api/2/myself"}
//! }
//! ```
//!
//! Secrets are [`Secret`]s: their `Debug` is redacted, and the relay's API replaces them with
//! `{"set": true}` before answering.

use serde::{Deserialize, Serialize};
use url::Url;

/// A secret string (password, token). `Debug` and `Display` never show it; read it with
/// [`Secret::expose`]. Serializes as the plain string, because it must reach the store (encrypted)
/// and the agent (inside the TLS tunnel).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The plaintext. Call only where the value is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How requests of a connection are authenticated. JSON: `{"type": "<variant>", …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    /// No credentials. Also the type of webhook receivers.
    #[default]
    None,
    /// HTTP Basic (RFC 7617): `Authorization: Basic base64(utf8(username ":" password))`.
    /// An API key may be sent as `username` with an empty `password`.
    Basic {
        /// The user-id; must not contain `:` (RFC 7617 §2).
        username: String,
        /// The password; may be empty.
        #[serde(default)]
        password: Secret,
    },
}

impl Auth {
    /// Stable name of the auth type, as in the JSON `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Basic { .. } => "basic",
        }
    }
}

/// TLS settings for the connection to the app. Empty means: verify against the system roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Extra trusted CA certificate(s), PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
}

impl TlsSettings {
    /// True when nothing is set.
    pub fn is_default(&self) -> bool {
        self == &TlsSettings::default()
    }
}

/// Everything an executor (relay or agent) needs to make a request of a connection: sent as JSON
/// inside each [`crate::proto::Open`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionSpec {
    /// The connection's name, for logs and client pooling.
    pub name: String,
    /// Base URL (`http` or `https`); request targets are appended to its path.
    pub base_url: Url,
    /// Authentication applied to every request.
    #[serde(default)]
    pub auth: Auth,
    /// TLS settings for the app.
    #[serde(default, skip_serializing_if = "TlsSettings::is_default")]
    pub tls: TlsSettings,
    /// Longest wait for the response head, in milliseconds. Default 60,000.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
}

fn default_response_timeout_ms() -> u64 {
    60_000
}

/// Where the app lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// True when the app is in a private network and must be called by an agent.
    #[serde(default)]
    pub private: bool,
    /// The agent group whose agents execute requests (required when `private`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_group: Option<String>,
}

/// The request that proves a connection works (DESIGN.md: "a test request (a GET)").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// Method; `GET` by default.
    #[serde(default = "default_test_method")]
    pub method: String,
    /// Path (and query) relative to the base URL; `/` by default.
    #[serde(default = "default_test_path")]
    pub path: String,
}

impl Default for TestRequest {
    fn default() -> Self {
        TestRequest {
            method: default_test_method(),
            path: default_test_path(),
        }
    }
}

fn default_test_method() -> String {
    "GET".into()
}

fn default_test_path() -> String {
    "/".into()
}

/// A connection definition as the API takes it and the relay stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionDefinition {
    /// Unique name: 1 to 64 characters of `[A-Za-z0-9._-]`; used in URLs.
    pub name: String,
    /// Base URL of the app (`http` or `https`, no query or fragment).
    pub base_url: Url,
    /// Authentication.
    #[serde(default)]
    pub auth: Auth,
    /// TLS settings.
    #[serde(default, skip_serializing_if = "TlsSettings::is_default")]
    pub tls: TlsSettings,
    /// Public or private app.
    #[serde(default)]
    pub network: Network,
    /// The test request.
    #[serde(default)]
    pub test_request: TestRequest,
    /// Longest wait for the response head, in milliseconds. Default 60,000.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
}

/// A field of a connection definition failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the field, e.g. `auth.username`.
    pub field: String,
    /// What is wrong, without the value if it is secret.
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// True when `name` is a valid connection or group name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ConnectionDefinition {
    /// Checks every field; the first problem found is returned, naming the field.
    ///
    /// # Errors
    /// [`ValidationError`] naming the field (`name`, `base_url`, `auth.username`,
    /// `network.agent_group`, `test_request.method`, `test_request.path`, `response_timeout_ms`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !valid_name(&self.name) {
            return Err(ValidationError::new(
                "name",
                "must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        match self.base_url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(ValidationError::new(
                    "base_url",
                    format!("scheme must be http or https, not '{other}'"),
                ))
            }
        }
        if self.base_url.host_str().is_none_or(str::is_empty) {
            return Err(ValidationError::new("base_url", "must name a host"));
        }
        if self.base_url.query().is_some() || self.base_url.fragment().is_some() {
            return Err(ValidationError::new(
                "base_url",
                "must not have a query or fragment",
            ));
        }
        if !self.base_url.username().is_empty() || self.base_url.password().is_some() {
            return Err(ValidationError::new(
                "base_url",
                "must not carry credentials; use auth",
            ));
        }
        if let Auth::Basic { username, .. } = &self.auth {
            if username.contains(':') {
                return Err(ValidationError::new(
                    "auth.username",
                    "must not contain ':' (RFC 7617 section 2)",
                ));
            }
            if username.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    "auth.username",
                    "must not contain control characters",
                ));
            }
        }
        if self.network.private {
            match &self.network.agent_group {
                Some(g) if valid_name(g) => {}
                Some(_) => {
                    return Err(ValidationError::new(
                        "network.agent_group",
                        "must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
                    ))
                }
                None => {
                    return Err(ValidationError::new(
                        "network.agent_group",
                        "is required when network.private is true",
                    ))
                }
            }
        }
        if http::Method::from_bytes(self.test_request.method.as_bytes()).is_err() {
            return Err(ValidationError::new(
                "test_request.method",
                "is not a valid method token (RFC 9110 section 9.1)",
            ));
        }
        if !self.test_request.path.starts_with('/')
            || http::uri::PathAndQuery::try_from(self.test_request.path.as_str()).is_err()
        {
            return Err(ValidationError::new(
                "test_request.path",
                "must be an absolute path such as /status",
            ));
        }
        if self.response_timeout_ms == 0 || self.response_timeout_ms > 3_600_000 {
            return Err(ValidationError::new(
                "response_timeout_ms",
                "must be between 1 and 3600000",
            ));
        }
        Ok(())
    }

    /// The part of the definition an executor needs.
    pub fn spec(&self) -> ConnectionSpec {
        ConnectionSpec {
            name: self.name.clone(),
            base_url: self.base_url.clone(),
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            response_timeout_ms: self.response_timeout_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(json: serde_json::Value) -> Result<ConnectionDefinition, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn parses_design_example_and_defaults() {
        let d = def(serde_json::json!({
            "name": "jira",
            "base_url": "https://jira.corp.example:8443",
            "auth": {"type": "basic", "username": "svc", "password": "pw"},
            "network": {"private": true, "agent_group": "dc1"},
            "test_request": {"method": "GET", "path": "/rest/api/2/myself"}
        }))
        .unwrap();
        d.validate().unwrap();
        assert_eq!(d.auth.type_name(), "basic");
        let d = def(serde_json::json!({"name": "x", "base_url": "http://a"})).unwrap();
        assert_eq!(d.auth, Auth::None);
        assert_eq!(d.test_request, TestRequest::default());
        d.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                serde_json::json!({"name": "a b", "base_url": "http://a"}),
                "name",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "ftp://a"}),
                "base_url",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://a/?q=1"}),
                "base_url",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://u:p@a/"}),
                "base_url",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://a", "auth": {"type": "basic", "username": "a:b"}}),
                "auth.username",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://a", "network": {"private": true}}),
                "network.agent_group",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://a", "test_request": {"path": "x"}}),
                "test_request.path",
            ),
        ];
        for (json, field) in cases {
            let err = def(json.clone()).unwrap().validate().unwrap_err();
            assert_eq!(err.field, field, "{json}");
        }
    }

    #[test]
    fn unknown_fields_and_auth_types_are_refused() {
        assert!(def(serde_json::json!({"name": "a", "base_url": "http://a", "x": 1})).is_err());
        assert!(def(
            serde_json::json!({"name": "a", "base_url": "http://a", "auth": {"type": "nope"}})
        )
        .is_err());
    }

    #[test]
    fn secret_debug_is_redacted() {
        let auth = Auth::Basic {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
