//! Connection definitions: what the relay stores and what crosses the tunnel in [`crate::proto::Open`].
//!
//! JSON shape (DESIGN.md, "Connection model"):
//!
//! ```json
//! {
//!   "name": "jira",
//!   "base_url": "https://jira.corp.example:8443",
//!   "auth": {"type": "basic", "username": "svc", "password": "…"},
//!   "tls": {"client_certificate": "PEM", "client_key": "PEM", "ca_certificate": "PEM"},
//!   "network": {"private": true, "agent_group": "dc1"},
//!   "test_request": {"method": "GET", "path": "/rest/api/2/myself"}
//! }
//! ```
//!
//! # Auth types (`auth.type`)
//!
//! | type | fields | sent as |
//! | --- | --- | --- |
//! | `none` | — | nothing |
//! | `basic` | `username`, `password` | `Authorization: Basic base64(utf8(username ":" password))` (RFC 7617) |
//! | `header` | `headers`: `[{"name", "value", "secret"}]` | each header field, replacing the client's |
//! | `query` | `params`: `{"name": "value"}` | query parameters, replacing the client's of the same name |
//! | `custom` | `username`, `password`, `headers`, `params`, all optional | any combination of the above |
//! | `profile` | `name` | resolved by the agent from its own configuration (private connections only) |
//!
//! Examples:
//!
//! ```json
//! {"type": "header", "headers": [
//!     {"name": "Authorization", "value": "Bearer abc"},
//!     {"name": "X-Tenant", "value": "acme", "secret": false}]}
//! {"type": "query", "params": {"api_key": "abc", "sig&=/+ ü": "x y"}}
//! {"type": "custom", "username": "svc", "password": "pw",
//!  "headers": [{"name": "X-Api-Key", "value": "k"}], "params": {"tenant": "acme"}}
//! {"type": "profile", "name": "jira"}
//! ```
//!
//! `headers` is a list, not a map, so that each value can say whether it is `secret` (default
//! `true`: a header value is a credential unless marked otherwise). Header names are RFC 9110
//! tokens (§5.1), unique case-insensitively; values must not contain CR, LF, NUL or other control
//! characters but HTAB. Query parameter names and values are any strings: the execution engine
//! encodes them as `application/x-www-form-urlencoded` (WHATWG URL Standard §5.2, what HTML forms
//! and most servers' query parsers use: space becomes `+`, everything but `A-Za-z0-9*-._` is
//! percent-encoded as UTF-8). Every query parameter value is secret.
//!
//! # TLS (`tls`)
//!
//! `ca_certificate` (PEM, one or more certificates) is trusted besides the system roots;
//! `client_certificate` (PEM; the leaf first, then any intermediates) with `client_key` (PEM:
//! PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`) is presented to apps
//! that require mutual TLS; `insecure_skip_verify: true` accepts any server certificate (an
//! explicit opt-in, logged as a warning whenever a client is built with it).
//!
//! # Secrets
//!
//! Secrets are [`Secret`]s: their `Debug` is redacted, and the relay's API replaces them with
//! `{"set": true}` before answering. [`ConnectionDefinition::secret_pointers`] lists where they
//! are: `auth.password`, the `value` of every header marked secret, every query parameter value,
//! and `tls.client_key`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// One header field an auth type sends: `{"name": "X-Api-Key", "value": "…", "secret": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuthHeader {
    /// Field name, an RFC 9110 token (§5.1); compared case-insensitively.
    pub name: String,
    /// Field value; no CR, LF, NUL or other control characters but HTAB.
    pub value: Secret,
    /// Whether the API hides the value (default `true`). `false` for non-credentials such as a
    /// tenant id that operators should be able to read back.
    #[serde(default = "default_true")]
    pub secret: bool,
}

fn default_true() -> bool {
    true
}

/// Query parameters an auth type adds: name → value, both any string (percent-encoded on use).
pub type AuthParams = BTreeMap<String, Secret>;

/// How requests of a connection are authenticated. JSON: `{"type": "<variant>", …}`; see the
/// module documentation for every shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
        /// The password; may be empty, no control characters (RFC 7617 §2). Encoded as UTF-8
        /// (RFC 7617 §2.1, `charset="UTF-8"`).
        #[serde(default)]
        password: Secret,
    },
    /// Arbitrary header fields, e.g. `Authorization: Bearer …` (RFC 6750 §2.1) or `X-Api-Key`.
    Header {
        /// At least one field; names unique case-insensitively.
        headers: Vec<AuthHeader>,
    },
    /// API keys as query parameters, merged with the request's own query string.
    Query {
        /// At least one parameter.
        #[cfg_attr(feature = "openapi", schema(inline))]
        params: AuthParams,
    },
    /// Any combination of Basic credentials, header fields and query parameters.
    Custom {
        /// Basic user-id; when set, `Authorization: Basic …` is sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        /// Basic password (needs `username`); may be empty.
        #[serde(default, skip_serializing_if = "Secret::is_empty")]
        password: Secret,
        /// Header fields; none may be `Authorization` when `username` is set.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<AuthHeader>,
        /// Query parameters.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        #[cfg_attr(feature = "openapi", schema(inline))]
        params: AuthParams,
    },
    /// Credentials (and TLS settings) held by the agent in its own configuration under
    /// `[profiles.NAME]`; the relay never sees them. Valid only for private connections.
    Profile {
        /// The profile's name in the agent's configuration.
        name: String,
    },
}

impl Auth {
    /// Stable name of the auth type, as in the JSON `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Basic { .. } => "basic",
            Auth::Header { .. } => "header",
            Auth::Query { .. } => "query",
            Auth::Custom { .. } => "custom",
            Auth::Profile { .. } => "profile",
        }
    }

    /// Basic credentials to send, if any: `(username, password)`.
    pub fn basic_credentials(&self) -> Option<(&str, &Secret)> {
        match self {
            Auth::Basic { username, password } => Some((username, password)),
            Auth::Custom {
                username: Some(username),
                password,
                ..
            } => Some((username, password)),
            _ => None,
        }
    }

    /// Header fields to send (not counting Basic credentials).
    pub fn headers(&self) -> &[AuthHeader] {
        match self {
            Auth::Header { headers } | Auth::Custom { headers, .. } => headers,
            _ => &[],
        }
    }

    /// Query parameters to add.
    pub fn params(&self) -> Option<&AuthParams> {
        match self {
            Auth::Query { params } | Auth::Custom { params, .. } => Some(params),
            _ => None,
        }
    }

    /// RFC 6901 JSON pointers, relative to the auth object (e.g. `/password`,
    /// `/headers/0/value`, `/params/api_key`), of every secret this auth holds.
    pub fn secret_pointers(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Auth::Basic { .. } => out.push("/password".to_string()),
            Auth::Custom {
                username: Some(_), ..
            } => out.push("/password".to_string()),
            _ => {}
        }
        for (i, h) in self.headers().iter().enumerate() {
            if h.secret {
                out.push(format!("/headers/{i}/value"));
            }
        }
        if let Some(params) = self.params() {
            for name in params.keys() {
                out.push(format!("/params/{}", pointer_token(name)));
            }
        }
        out
    }

    /// Checks the auth fields; `prefix` is the JSON path of the auth object (`auth`, or
    /// `profiles.jira.auth` in the agent's configuration) and starts every error's field.
    ///
    /// Does not check that a `profile` auth is used by a private connection: that is
    /// [`ConnectionDefinition::validate`]'s job.
    ///
    /// # Errors
    /// [`ValidationError`] naming the field, e.g. `auth.headers[0].name`.
    pub fn validate(&self, prefix: &str) -> Result<(), ValidationError> {
        let field = |rest: &str| format!("{prefix}.{rest}");
        if let Some((username, password)) = self.basic_credentials() {
            if username.contains(':') {
                return Err(ValidationError::new(
                    field("username"),
                    "must not contain ':' (RFC 7617 section 2)",
                ));
            }
            if username.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    field("username"),
                    "must not contain control characters",
                ));
            }
            // RFC 7617 section 2 forbids them in the password too. The message never echoes it.
            if password.expose().chars().any(char::is_control) {
                return Err(ValidationError::new(
                    field("password"),
                    "must not contain control characters (RFC 7617 section 2)",
                ));
            }
        }
        match self {
            Auth::None | Auth::Basic { .. } => {}
            Auth::Header { headers } => {
                if headers.is_empty() {
                    return Err(ValidationError::new(
                        field("headers"),
                        "needs at least one header field",
                    ));
                }
            }
            Auth::Query { params } => {
                if params.is_empty() {
                    return Err(ValidationError::new(
                        field("params"),
                        "needs at least one query parameter",
                    ));
                }
            }
            Auth::Custom {
                username,
                password,
                headers,
                params,
            } => {
                if username.is_none() && !password.is_empty() {
                    return Err(ValidationError::new(
                        field("password"),
                        "needs a username (Basic credentials are username:password)",
                    ));
                }
                if username.is_none() && headers.is_empty() && params.is_empty() {
                    return Err(ValidationError::new(
                        prefix,
                        "custom auth needs at least one of username, headers or params",
                    ));
                }
            }
            Auth::Profile { name } => {
                if !valid_name(name) {
                    return Err(ValidationError::new(
                        field("name"),
                        "must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
                    ));
                }
            }
        }
        let mut seen: Vec<String> = Vec::new();
        for (i, h) in self.headers().iter().enumerate() {
            let name_field = field(&format!("headers[{i}].name"));
            if !is_token(&h.name) {
                return Err(ValidationError::new(
                    name_field,
                    "must be a header field name: one or more of letters, digits and \
                     !#$%&'*+-.^_`|~ (an RFC 9110 section 5.1 token)",
                ));
            }
            let lower = h.name.to_ascii_lowercase();
            if MANAGED_HEADERS.contains(&lower.as_str()) {
                return Err(ValidationError::new(
                    name_field,
                    "is a connection-level header field the execution engine manages; it \
                     cannot carry credentials",
                ));
            }
            if lower == "authorization" && self.basic_credentials().is_some() {
                return Err(ValidationError::new(
                    name_field,
                    "conflicts with username/password, which send Authorization: Basic",
                ));
            }
            if seen.contains(&lower) {
                return Err(ValidationError::new(
                    name_field,
                    "appears twice (header names are case-insensitive)",
                ));
            }
            seen.push(lower);
            if let Err(problem) = check_field_value(h.value.expose()) {
                return Err(ValidationError::new(
                    field(&format!("headers[{i}].value")),
                    problem,
                ));
            }
        }
        if let Some(params) = self.params() {
            for name in params.keys() {
                if name.is_empty() {
                    return Err(ValidationError::new(
                        field("params"),
                        "a query parameter name must not be empty",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Header fields the engine owns (hop-by-hop, framing, `Host`): an auth type may not set them.
const MANAGED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True when `s` is an RFC 9110 §5.6.2 token: `1*tchar`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Why `value` cannot be a header field value (RFC 9110 §5.5), if it cannot. The message never
/// contains the value.
fn check_field_value(value: &str) -> Result<(), &'static str> {
    if value.contains(['\r', '\n']) {
        return Err("must not contain CR or LF (header injection)");
    }
    if value.contains('\0') {
        return Err("must not contain NUL");
    }
    if value.chars().any(|c| c != '\t' && c.is_control()) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// Escapes a JSON pointer reference token (RFC 6901 §3): `~` → `~0`, `/` → `~1`.
pub fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// TLS settings for the connection to the app. Empty means: verify against the system roots,
/// present no client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Extra trusted CA certificate(s), PEM, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
    /// Client certificate for mutual TLS, PEM: the leaf first, then any intermediates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// The client certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<Secret>,
    /// Accept any server certificate (no chain, name or expiry check). Explicit opt-in only,
    /// logged as a warning each time a client is built with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

impl TlsSettings {
    /// True when nothing is set.
    pub fn is_default(&self) -> bool {
        self == &TlsSettings::default()
    }

    /// These settings with every field set in `over` replacing ours; `insecure_skip_verify` is
    /// on when either has it on. How an agent profile's TLS settings apply to a connection's.
    pub fn overlaid_with(&self, over: &TlsSettings) -> TlsSettings {
        TlsSettings {
            ca_certificate: over
                .ca_certificate
                .clone()
                .or_else(|| self.ca_certificate.clone()),
            client_certificate: over
                .client_certificate
                .clone()
                .or_else(|| self.client_certificate.clone()),
            client_key: over.client_key.clone().or_else(|| self.client_key.clone()),
            insecure_skip_verify: self.insecure_skip_verify || over.insecure_skip_verify,
        }
    }

    /// RFC 6901 JSON pointers, relative to the TLS object, of the secrets it holds.
    pub fn secret_pointers(&self) -> Vec<String> {
        match self.client_key {
            Some(_) => vec!["/client_key".to_string()],
            None => Vec::new(),
        }
    }

    /// Checks the settings now; see [`validate_at`](Self::validate_at).
    ///
    /// # Errors
    /// As [`validate_at`](Self::validate_at).
    pub fn validate(&self, prefix: &str) -> Result<(), ValidationError> {
        self.validate_at(prefix, SystemTime::now())
    }

    /// Checks that the PEM parses, that `client_certificate` and `client_key` come together and
    /// match (same public key), and that every certificate of the client chain is valid at
    /// `now`. `prefix` is the JSON path of the TLS object (`tls`).
    ///
    /// # Errors
    /// [`ValidationError`] naming `tls.ca_certificate`, `tls.client_certificate` or
    /// `tls.client_key`, with a message saying which problem (bad PEM, key mismatch, expired,
    /// not yet valid). Messages never contain key material.
    pub fn validate_at(&self, prefix: &str, now: SystemTime) -> Result<(), ValidationError> {
        let field = |rest: &str| format!("{prefix}.{rest}");
        if let Some(ca) = &self.ca_certificate {
            let certs = crate::exec::parse_certificates(ca)
                .map_err(|e| ValidationError::new(field("ca_certificate"), e))?;
            for (i, der) in certs.iter().enumerate() {
                x509_parser::parse_x509_certificate(der).map_err(|_| {
                    ValidationError::new(
                        field("ca_certificate"),
                        format!("certificate {} is not a valid X.509 certificate", i + 1),
                    )
                })?;
            }
        }
        let (cert_pem, key_pem) = match (&self.client_certificate, &self.client_key) {
            (None, None) => return Ok(()),
            (Some(_), None) => {
                return Err(ValidationError::new(
                    field("client_key"),
                    "is required with client_certificate",
                ))
            }
            (None, Some(_)) => {
                return Err(ValidationError::new(
                    field("client_certificate"),
                    "is required with client_key",
                ))
            }
            (Some(c), Some(k)) => (c, k),
        };
        let certs = crate::exec::parse_certificates(cert_pem)
            .map_err(|e| ValidationError::new(field("client_certificate"), e))?;
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for (i, der) in certs.iter().enumerate() {
            let which = if i == 0 {
                "the certificate".to_string()
            } else {
                format!("certificate {} of the chain", i + 1)
            };
            let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| {
                ValidationError::new(
                    field("client_certificate"),
                    format!("{which} is not a valid X.509 certificate"),
                )
            })?;
            let validity = cert.validity();
            if now_secs > validity.not_after.timestamp() {
                return Err(ValidationError::new(
                    field("client_certificate"),
                    format!(
                        "{which} has expired (not valid after {})",
                        validity.not_after
                    ),
                ));
            }
            if now_secs < validity.not_before.timestamp() {
                return Err(ValidationError::new(
                    field("client_certificate"),
                    format!(
                        "{which} is not valid yet (not valid before {})",
                        validity.not_before
                    ),
                ));
            }
        }
        let key = crate::exec::parse_private_key(key_pem.expose())
            .map_err(|e| ValidationError::new(field("client_key"), e))?;
        let provider = crate::exec::crypto_provider();
        let signing_key = provider.key_provider.load_private_key(key).map_err(|_| {
            ValidationError::new(
                field("client_key"),
                "is not a usable private key (supported: RSA, ECDSA P-256/P-384, Ed25519)",
            )
        })?;
        let certified = rustls::sign::CertifiedKey::new(certs, signing_key);
        match certified.keys_match() {
            Ok(()) => Ok(()),
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(ValidationError::new(
                    field("client_key"),
                    "does not match client_certificate (their public keys differ)",
                ))
            }
            // The provider cannot derive the public key: nothing to compare; the handshake
            // will tell.
            Err(_) => Ok(()),
        }
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConnectionDefinition {
    /// Unique name: 1 to 64 characters of `[A-Za-z0-9._-]`; used in URLs.
    pub name: String,
    /// Base URL of the app (`http` or `https`, no query or fragment). Control characters are
    /// refused rather than silently dropped (the URL parser strips tabs and newlines).
    #[serde(deserialize_with = "strict_url")]
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

/// Parses a URL, refusing control characters (CR, LF, tab, NUL) that the WHATWG parser would
/// silently remove.
fn strict_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let raw = String::deserialize(d)?;
    if raw.chars().any(char::is_control) {
        return Err(serde::de::Error::custom(
            "must not contain control characters (CR, LF, tab, NUL)",
        ));
    }
    Url::parse(&raw).map_err(serde::de::Error::custom)
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
    /// `auth.headers[0].name`, `auth.type`, `network.agent_group`, `tls.client_key`,
    /// `test_request.method`, `test_request.path`, `response_timeout_ms`, …); see
    /// [`Auth::validate`] and [`TlsSettings::validate_at`].
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
        self.auth.validate("auth")?;
        if matches!(self.auth, Auth::Profile { .. }) && !self.network.private {
            return Err(ValidationError::new(
                "auth.type",
                "profile auth is resolved by an agent: only private connections \
                 (network.private = true) can use it",
            ));
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
        self.tls.validate("tls")?;
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

    /// RFC 6901 JSON pointers of every secret in the definition's JSON: `/auth/password`,
    /// `/auth/headers/{i}/value` (headers marked secret), `/auth/params/{name}` (escaped per
    /// RFC 6901 §3) and `/tls/client_key`. What the API hides and the store encrypts.
    pub fn secret_pointers(&self) -> Vec<String> {
        let auth = self
            .auth
            .secret_pointers()
            .into_iter()
            .map(|p| format!("/auth{p}"));
        let tls = self
            .tls
            .secret_pointers()
            .into_iter()
            .map(|p| format!("/tls{p}"));
        auth.chain(tls).collect()
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
                serde_json::json!({"name": "a", "base_url": "http://a", "auth": {"type": "basic", "username": "u", "password": "hun\r\nter2"}}),
                "auth.password",
            ),
            (
                serde_json::json!({"name": "a", "base_url": "http://a", "auth": {"type": "custom", "username": "u", "password": "hun\u{0}ter2"}}),
                "auth.password",
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
            assert!(
                !err.to_string().contains("hun"),
                "the password leaked: {err}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_auth_types_are_refused() {
        assert!(def(serde_json::json!({"name": "a", "base_url": "http://a", "x": 1})).is_err());
        // CR/LF in the base URL is refused, not silently dropped by the URL parser.
        assert!(def(serde_json::json!({"name": "a", "base_url": "http://a/x\r\ny"})).is_err());
        assert!(def(serde_json::json!({"name": "a", "base_url": "http://a/x\ty"})).is_err());
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

    fn with_auth(auth: serde_json::Value) -> ConnectionDefinition {
        def(serde_json::json!({"name": "a", "base_url": "http://a", "auth": auth})).unwrap()
    }

    fn field_of(auth: serde_json::Value) -> String {
        with_auth(auth.clone())
            .validate()
            .map(|()| panic!("{auth} should be refused"))
            .unwrap_err()
            .field
    }

    #[test]
    fn every_auth_type_parses_validates_and_round_trips() {
        let cases = [
            serde_json::json!({"type": "none"}),
            serde_json::json!({"type": "basic", "username": "u", "password": "pässwörd"}),
            serde_json::json!({"type": "header", "headers": [
                {"name": "Authorization", "value": "Bearer t", "secret": true},
                {"name": "X-Tenant", "value": "acme", "secret": false}]}),
            serde_json::json!({"type": "query", "params": {"api_key": "k", "a&b= +/ü": "v v"}}),
            serde_json::json!({"type": "custom", "username": "u", "password": "p",
                "headers": [{"name": "X-Api-Key", "value": "k", "secret": true}],
                "params": {"sig": "s"}}),
            serde_json::json!({"type": "custom", "params": {"sig": "s"}}),
        ];
        for auth in cases {
            let d = with_auth(auth.clone());
            d.validate().unwrap_or_else(|e| panic!("{auth}: {e}"));
            assert_eq!(serde_json::to_value(&d.auth).unwrap(), auth);
        }
        // `secret` defaults to true.
        let d = with_auth(
            serde_json::json!({"type": "header", "headers": [{"name": "X", "value": "v"}]}),
        );
        assert!(d.auth.headers()[0].secret);
        // A profile needs a private connection.
        let mut d = with_auth(serde_json::json!({"type": "profile", "name": "jira"}));
        assert_eq!(d.validate().unwrap_err().field, "auth.type");
        d.network = Network {
            private: true,
            agent_group: Some("dc1".into()),
        };
        d.validate().unwrap();
    }

    #[test]
    fn auth_validation_names_the_field() {
        use serde_json::json;
        let header = |name: &str, value: &str| json!({"type": "header", "headers": [{"name": "X-Ok", "value": "1"}, {"name": name, "value": value}]});
        assert_eq!(field_of(header("Bad Name", "v")), "auth.headers[1].name");
        assert_eq!(field_of(header("", "v")), "auth.headers[1].name");
        assert_eq!(field_of(header("X:Y", "v")), "auth.headers[1].name");
        assert_eq!(field_of(header("Héader", "v")), "auth.headers[1].name");
        assert_eq!(field_of(header("x-ok", "v")), "auth.headers[1].name");
        assert_eq!(
            field_of(header("Content-Length", "1")),
            "auth.headers[1].name"
        );
        assert_eq!(
            field_of(header("X-A", "a\r\nX-Evil: 1")),
            "auth.headers[1].value"
        );
        assert_eq!(field_of(header("X-A", "a\nb")), "auth.headers[1].value");
        assert_eq!(field_of(header("X-A", "a\u{0}b")), "auth.headers[1].value");
        assert_eq!(field_of(header("X-A", "a\u{7f}b")), "auth.headers[1].value");
        with_auth(header("X-A", "tab\tand non-ASCII é"))
            .validate()
            .unwrap();
        let e = with_auth(header("X-A", "a\r\nsecret-part"))
            .validate()
            .unwrap_err();
        assert!(!e.message.contains("secret-part"), "{e}");
        assert_eq!(
            field_of(json!({"type": "header", "headers": []})),
            "auth.headers"
        );
        assert_eq!(
            field_of(json!({"type": "query", "params": {}})),
            "auth.params"
        );
        assert_eq!(
            field_of(json!({"type": "query", "params": {"": "v"}})),
            "auth.params"
        );
        assert_eq!(field_of(json!({"type": "custom"})), "auth");
        assert_eq!(
            field_of(json!({"type": "custom", "password": "p", "params": {"a": "b"}})),
            "auth.password"
        );
        assert_eq!(
            field_of(json!({"type": "custom", "username": "a:b"})),
            "auth.username"
        );
        assert_eq!(
            field_of(json!({"type": "custom", "username": "u",
                "headers": [{"name": "authorization", "value": "x"}]})),
            "auth.headers[0].name"
        );
        assert_eq!(
            field_of(json!({"type": "profile", "name": "bad name"})),
            "auth.name"
        );
        assert!(def(json!({"name": "a", "base_url": "http://a",
            "auth": {"type": "header", "headers": [{"name": "X", "value": "v", "extra": 1}]}}))
        .is_err());
    }

    #[test]
    fn secret_pointers_cover_every_secret() {
        use serde_json::json;
        let mut d = with_auth(json!({"type": "custom", "username": "u", "password": "p",
            "headers": [{"name": "X-Tenant", "value": "t", "secret": false},
                        {"name": "X-Api-Key", "value": "k"}],
            "params": {"api/key~1": "v"}}));
        d.tls.client_key = Some(Secret::new("KEY"));
        assert_eq!(
            d.secret_pointers(),
            [
                "/auth/password",
                "/auth/headers/1/value",
                "/auth/params/api~1key~01",
                "/tls/client_key"
            ]
        );
        let json = serde_json::to_value(&d).unwrap();
        for p in d.secret_pointers() {
            assert!(json.pointer(&p).is_some(), "{p}");
        }
        assert_eq!(
            with_auth(json!({"type": "none"})).secret_pointers(),
            Vec::<String>::new()
        );
        assert_eq!(
            with_auth(json!({"type": "query", "params": {"a": "1", "b": "2"}})).secret_pointers(),
            ["/auth/params/a", "/auth/params/b"]
        );
    }

    /// A CA and a client certificate it signs, valid from `not_before` to `not_after`
    /// (year, month, day).
    fn client_identity(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (format!("{}{}", cert.pem(), ca.pem()), key.serialize_pem())
    }

    #[test]
    fn tls_settings_are_checked_at_save_time() {
        let (cert, key) = client_identity((2020, 1, 1), (2999, 1, 1));
        let tls = |cert: Option<&str>, key: Option<&str>| TlsSettings {
            client_certificate: cert.map(str::to_string),
            client_key: key.map(Secret::new),
            ..TlsSettings::default()
        };
        let field = |t: TlsSettings| t.validate("tls").unwrap_err();
        tls(Some(&cert), Some(&key)).validate("tls").unwrap();
        assert_eq!(field(tls(Some(&cert), None)).field, "tls.client_key");
        assert_eq!(field(tls(None, Some(&key))).field, "tls.client_certificate");
        let e = field(tls(Some("not pem"), Some(&key)));
        assert_eq!(e.field, "tls.client_certificate");
        assert!(e.message.contains("no PEM certificate"), "{e}");
        let e = field(tls(
            Some("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
            Some(&key),
        ));
        assert_eq!(e.field, "tls.client_certificate");
        let e = field(tls(Some(&cert), Some("junk")));
        assert_eq!(e.field, "tls.client_key");
        assert!(e.message.contains("no PEM private key"), "{e}");
        // A key of another certificate.
        let (_, other_key) = client_identity((2020, 1, 1), (2999, 1, 1));
        let e = field(tls(Some(&cert), Some(&other_key)));
        assert_eq!(e.field, "tls.client_key");
        assert!(e.message.contains("does not match"), "{e}");
        assert!(!e.message.contains("PRIVATE"), "{e}");
        // Expired and not yet valid.
        let (old, old_key) = client_identity((2000, 1, 1), (2001, 1, 1));
        let e = field(tls(Some(&old), Some(&old_key)));
        assert_eq!(e.field, "tls.client_certificate");
        assert!(e.message.contains("has expired"), "{e}");
        let (future, future_key) = client_identity((2990, 1, 1), (2999, 1, 1));
        let e = field(tls(Some(&future), Some(&future_key)));
        assert!(e.message.contains("not valid yet"), "{e}");
        // A bad CA certificate.
        let e = TlsSettings {
            ca_certificate: Some("nope".into()),
            ..TlsSettings::default()
        }
        .validate("tls")
        .unwrap_err();
        assert_eq!(e.field, "tls.ca_certificate");
        // Through the definition.
        let mut d = with_auth(serde_json::json!({"type": "none"}));
        d.tls = tls(Some(&cert), Some(&other_key));
        assert_eq!(d.validate().unwrap_err().field, "tls.client_key");
    }

    #[test]
    fn profile_tls_overlays_the_connection_s() {
        let base = TlsSettings {
            ca_certificate: Some("CA".into()),
            client_certificate: Some("C1".into()),
            client_key: Some(Secret::new("K1")),
            insecure_skip_verify: false,
        };
        let over = TlsSettings {
            client_certificate: Some("C2".into()),
            client_key: Some(Secret::new("K2")),
            ..TlsSettings::default()
        };
        let t = base.overlaid_with(&over);
        assert_eq!(t.ca_certificate.as_deref(), Some("CA"));
        assert_eq!(t.client_certificate.as_deref(), Some("C2"));
        assert_eq!(t.client_key.as_ref().map(Secret::expose), Some("K2"));
        assert!(!t.insecure_skip_verify);
    }
}
