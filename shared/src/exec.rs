//! The HTTP execution engine: a request head, a body and a connection definition in, a streaming
//! upstream response out. The relay uses it for public apps and the agent for private apps, so an
//! auth type behaves identically wherever it runs.
//!
//! What it does, per request:
//! - joins the connection's base URL and the request target;
//! - removes hop-by-hop header fields (RFC 9110 §7.6.1) and the caller's own credentials, then
//!   applies the connection's auth (which always wins);
//! - enforces the [`DestinationPolicy`] on IP literals before connecting and on every DNS answer
//!   (a custom resolver), so DNS rebinding cannot bypass it;
//! - follows redirects (at most [`MAX_REDIRECTS`]) itself, re-checking the policy at each hop and
//!   dropping every credential the connection added when the origin changes;
//! - keeps one pooled `reqwest::Client` per connection definition, so keep-alive connections to
//!   the upstream are reused;
//! - classifies failures into [`ResetCode`]s (`dns`, `connect`, `tls`, `timeout`, …) with messages
//!   that never contain the URL's query or any secret.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body::{Body, Frame as BodyFrame, SizeHint};
use ipnet::IpNet;
use url::Url;

use crate::model::{Auth, ConnectionSpec};
use crate::proto::{BodyKind, HeaderField, RequestHead, ResetCode};

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;

/// Time allowed to establish a TCP connection to the upstream: 10 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Boxed error type for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body for [`Engine::execute`]: any `http_body::Body` of `Bytes`.
pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A failed execution, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ExecError {
    /// The class of failure, as it crosses the tunnel.
    pub code: ResetCode,
    /// Human detail; never contains secrets or the query string.
    pub message: String,
}

impl ExecError {
    /// Builds an error.
    pub fn new(code: ResetCode, message: impl Into<String>) -> Self {
        ExecError {
            code,
            message: message.into(),
        }
    }
}

/// The destination was refused by the policy. Returned by the resolver inside reqwest and found
/// again by [`classify`].
#[derive(Debug, thiserror::Error)]
#[error("destination {host} ({addrs}) is not allowed")]
pub struct DestinationRefused {
    /// The host name or IP literal.
    pub host: String,
    /// The resolved addresses, comma-separated.
    pub addrs: String,
}

/// One entry of an agent's allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name or IP literal, optionally with a port: matches by name, any address it
    /// resolves to.
    Host {
        /// Lower-case host name or IP literal (IPv6 without brackets).
        host: String,
        /// When set, only this port.
        port: Option<u16>,
    },
    /// An address range: matches every resolved address in it, any port.
    Net(IpNet),
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    /// Parses `HOST`, `HOST:PORT`, `IP`, `[IPv6]:PORT` or a CIDR such as `10.0.0.0/8`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty allow-list entry".into());
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(AllowEntry::Net(net));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(AllowEntry::Net(IpNet::from(ip)));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(AllowEntry::Host {
                host: sa.ip().to_string(),
                port: Some(sa.port()),
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("bad port in allow-list entry '{s}'"))?,
                ),
            ),
            None => (s, None),
        };
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid {
            return Err(format!(
                "allow-list entry '{s}' is not HOST[:PORT], IP or CIDR"
            ));
        }
        Ok(AllowEntry::Host {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// Which destinations an engine may connect to.
#[derive(Debug, Clone)]
pub enum DestinationPolicy {
    /// Anything (the agent's `--allow-any`, the relay's `--allow-private-destinations`).
    Any,
    /// Only public addresses: refuses loopback, private (RFC 1918, RFC 4193), link-local
    /// (including 169.254.169.254), unspecified, multicast and other special-use addresses.
    /// The relay's default, so it is not an open door into its own cloud network.
    PublicOnly,
    /// Only what the allow-list admits (the agent's default; an empty list admits nothing).
    AllowList(Vec<AllowEntry>),
}

/// True for addresses the relay must not reach by default.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, RFC 4193
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 may reach IPv4 private space
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        }
    }
}

impl DestinationPolicy {
    fn host_admitted_by_name(&self, host: &str, port: Option<u16>) -> bool {
        match self {
            DestinationPolicy::Any => true,
            DestinationPolicy::PublicOnly => false,
            DestinationPolicy::AllowList(entries) => entries.iter().any(|e| match e {
                AllowEntry::Host { host: h, port: p } => {
                    h == host && (p.is_none() || port.is_none() || *p == port)
                }
                AllowEntry::Net(_) => false,
            }),
        }
    }

    fn ip_admitted(&self, ip: IpAddr) -> bool {
        match self {
            DestinationPolicy::Any => true,
            DestinationPolicy::PublicOnly => !is_non_public(ip),
            DestinationPolicy::AllowList(entries) => entries.iter().any(|e| match e {
                AllowEntry::Net(net) => net.contains(&ip),
                AllowEntry::Host { .. } => false,
            }),
        }
    }

    /// Checks a URL's host and port before connecting. IP literals are decided here; names
    /// admitted by an allow-list entry pass; other names are decided by the resolver.
    ///
    /// # Errors
    /// [`ExecError`] with [`ResetCode::DestinationNotAllowed`].
    pub fn check_url(&self, url: &Url) -> Result<(), ExecError> {
        let port = url.port_or_known_default();
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) => {
                return self.check_ip_literal(IpAddr::V4(ip), port);
            }
            Some(url::Host::Ipv6(ip)) => {
                return self.check_ip_literal(IpAddr::V6(ip), port);
            }
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            None => return Err(ExecError::new(ResetCode::InvalidRequest, "URL has no host")),
        };
        if let DestinationPolicy::AllowList(entries) = self {
            let by_name = self.host_admitted_by_name(&host, port);
            let any_net = entries.iter().any(|e| matches!(e, AllowEntry::Net(_)));
            if !by_name && !any_net {
                return Err(refused(&host, port, "not on the agent's allow-list"));
            }
        }
        Ok(())
    }

    fn check_ip_literal(&self, ip: IpAddr, port: Option<u16>) -> Result<(), ExecError> {
        let host = ip.to_string();
        if self.host_admitted_by_name(&host, port) || self.ip_admitted(ip) {
            return Ok(());
        }
        Err(refused(&host, port, self.refusal_reason()))
    }

    fn refusal_reason(&self) -> &'static str {
        match self {
            DestinationPolicy::PublicOnly => "a non-public address, refused by the relay (start it with --allow-private-destinations to permit)",
            _ => "not on the agent's allow-list",
        }
    }

    /// Filters resolved addresses of `host`, keeping the admitted ones.
    ///
    /// # Errors
    /// [`DestinationRefused`] when none is admitted.
    pub fn filter_resolved(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, DestinationRefused> {
        if self.host_admitted_by_name(&host.to_ascii_lowercase(), None) {
            return Ok(addrs);
        }
        let kept: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.ip_admitted(a.ip()))
            .collect();
        if kept.is_empty() {
            return Err(DestinationRefused {
                host: host.to_string(),
                addrs: addrs
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(kept)
    }
}

fn refused(host: &str, port: Option<u16>, why: &str) -> ExecError {
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    ExecError::new(
        ResetCode::DestinationNotAllowed,
        format!("destination {host}{port} is {why}"),
    )
}

/// DNS resolver enforcing the policy on every answer (each connection, each redirect hop).
struct PolicyResolver {
    policy: Arc<DestinationPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy
                .filter_resolved(&host, addrs)
                .map_err(|e| Box::new(e) as BoxError)?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Hop-by-hop header fields (RFC 9110 §7.6.1) plus the framing fields the tunnel re-creates.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop fields, the fields named in `Connection`, `Host` and `Content-Length`
/// (framing travels as [`BodyKind`]) from `headers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    headers.remove(http::header::HOST);
    headers.remove(http::header::CONTENT_LENGTH);
}

/// Converts a header map to wire fields.
pub fn to_fields(headers: &HeaderMap) -> Vec<HeaderField> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// Converts wire fields to a header map, skipping invalid names or values (with the count).
pub fn from_fields(fields: &[HeaderField]) -> (HeaderMap, usize) {
    let mut map = HeaderMap::with_capacity(fields.len());
    let mut skipped = 0;
    for (name, value) in fields {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(n), Ok(v)) => {
                map.append(n, v);
            }
            _ => skipped += 1,
        }
    }
    (map, skipped)
}

/// The body framing of a message with these headers (RFC 9112 §6.3).
pub fn body_kind(headers: &HeaderMap, body_allowed: bool) -> BodyKind {
    if !body_allowed {
        return BodyKind::Empty;
    }
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return BodyKind::Streamed;
    }
    match headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(n) => BodyKind::Length(n),
        None => BodyKind::Streamed,
    }
}

/// Joins `base` and `target` (path and query starting with `/`): `https://h/api` +
/// `/v1/x?y` → `https://h/api/v1/x?y`.
///
/// # Errors
/// [`ResetCode::InvalidRequest`] when the target is not a path or the result leaves the base's
/// origin.
pub fn join_url(base: &Url, target: &str) -> Result<Url, ExecError> {
    if !target.starts_with('/') || target.starts_with("//") {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            "request target must be a path starting with a single '/'",
        ));
    }
    let base_path = base.path().trim_end_matches('/');
    let s = format!(
        "{}{}{}",
        &base[..url::Position::BeforePath],
        base_path,
        target
    );
    let url = Url::parse(&s)
        .map_err(|e| ExecError::new(ResetCode::InvalidRequest, format!("bad target: {e}")))?;
    if url.origin() != base.origin() {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            "request target leaves the connection's origin",
        ));
    }
    Ok(url)
}

fn native_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                let _ = store.add(cert);
            }
            Arc::new(store)
        })
        .clone()
}

/// Parses PEM certificates.
///
/// # Errors
/// A message naming what is wrong (no certificate, bad base64).
pub fn parse_certificates(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// rustls with the ring provider, for every TLS configuration Airlock builds.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(spec: &ConnectionSpec) -> Result<rustls::ClientConfig, ExecError> {
    let tls_err = |m: String| ExecError::new(ResetCode::InvalidRequest, m);
    let mut roots = (*native_roots()).clone();
    if let Some(ca) = &spec.tls.ca_certificate {
        for cert in
            parse_certificates(ca).map_err(|e| tls_err(format!("tls.ca_certificate: {e}")))?
        {
            roots
                .add(cert)
                .map_err(|e| tls_err(format!("tls.ca_certificate: {e}")))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The execution engine. One per process; cheap to share behind an `Arc`.
pub struct Engine {
    policy: Arc<DestinationPolicy>,
    clients: Mutex<HashMap<String, (String, reqwest::Client)>>,
}

/// What the engine returns: the upstream's response, body not yet read.
pub struct UpstreamResponse {
    /// Status code.
    pub status: u16,
    /// End-to-end header fields (hop-by-hop and `Content-Length` removed).
    pub headers: HeaderMap,
    /// Body framing.
    pub body: BodyKind,
    /// The body, streamed.
    pub response: reqwest::Response,
}

impl Engine {
    /// An engine enforcing `policy`.
    pub fn new(policy: DestinationPolicy) -> Self {
        Engine {
            policy: Arc::new(policy),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The policy enforced.
    pub fn policy(&self) -> &DestinationPolicy {
        &self.policy
    }

    /// The pooled client of a connection definition, built on first use and rebuilt when its TLS
    /// settings change.
    fn client(&self, spec: &ConnectionSpec) -> Result<reqwest::Client, ExecError> {
        let key = serde_json::to_string(&spec.tls).unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, c)) = clients.get(&spec.name) {
            if *k == key {
                return Ok(c.clone());
            }
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(spec)?)
            .dns_resolver(Arc::new(PolicyResolver {
                policy: self.policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .http1_only()
            .build()
            .map_err(|e| ExecError::new(ResetCode::Internal, format!("HTTP client: {e}")))?;
        clients.insert(spec.name.clone(), (key, client.clone()));
        Ok(client)
    }

    /// Executes `head` with `body` against the connection `spec`.
    ///
    /// The response head is awaited for at most `spec.response_timeout_ms`; the body is then the
    /// caller's to stream. Redirects are followed (see the module docs) only when the request has
    /// no body or the status turns it into a GET (301/302 for POST, 303).
    ///
    /// # Errors
    /// [`ExecError`] classified by [`classify`] or the destination policy.
    pub async fn execute(
        &self,
        spec: &ConnectionSpec,
        head: &RequestHead,
        body: Option<RequestBody>,
    ) -> Result<UpstreamResponse, ExecError> {
        let client = self.client(spec)?;
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| ExecError::new(ResetCode::InvalidRequest, "invalid method"))?;
        let (mut headers, _) = from_fields(&head.headers);
        strip_hop_by_hop(&mut headers);
        // The caller's credentials for the relay never travel upstream; the connection's win.
        headers.remove(http::header::AUTHORIZATION);
        headers.remove(http::header::COOKIE);
        let origin = spec.base_url.origin();
        let mut url = join_url(&spec.base_url, &head.target)?;
        let mut method = method;
        let mut body = body;
        let timeout = Duration::from_millis(spec.response_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        for hop in 0..=MAX_REDIRECTS {
            self.policy.check_url(&url)?;
            let same_origin = url.origin() == origin;
            let mut req = client.request(method.clone(), url.clone());
            let mut hop_headers = headers.clone();
            if !same_origin {
                // Credentials the connection added, and the client's cookies, stay home.
                hop_headers.remove(http::header::COOKIE);
            }
            req = req.headers(hop_headers);
            if same_origin {
                req = apply_auth(req, &spec.auth);
            }
            let has_body = body.is_some();
            if let Some(b) = body.take() {
                req = req.body(reqwest::Body::wrap(SyncBody::new(b)));
            }
            let resp = match tokio::time::timeout_at(deadline, req.send()).await {
                Err(_) => {
                    return Err(ExecError::new(
                        ResetCode::Timeout,
                        format!(
                            "no response from the upstream within {} ms",
                            timeout.as_millis()
                        ),
                    ))
                }
                Ok(Err(e)) => return Err(classify(&e)),
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok());
            let follow = match (status.as_u16(), location) {
                (301 | 302 | 303 | 307 | 308, Some(next)) if hop < MAX_REDIRECTS => {
                    let to_get = status == 303
                        || (matches!(status.as_u16(), 301 | 302) && method == Method::POST);
                    if has_body && !to_get {
                        None // a streamed body cannot be replayed: hand the redirect back
                    } else {
                        Some((next, to_get))
                    }
                }
                _ => None,
            };
            let Some((next, to_get)) = follow else {
                return Ok(upstream_response(resp, &method));
            };
            if !matches!(next.scheme(), "http" | "https") {
                return Ok(upstream_response(resp, &method));
            }
            if to_get && method != Method::HEAD {
                method = Method::GET;
                headers.remove(http::header::CONTENT_TYPE);
            }
            url = next;
        }
        Err(ExecError::new(
            ResetCode::UpstreamProtocol,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }
}

fn upstream_response(resp: reqwest::Response, method: &Method) -> UpstreamResponse {
    let status = resp.status().as_u16();
    let mut headers = resp.headers().clone();
    let body_allowed = *method != Method::HEAD && !matches!(status, 100..=199 | 204 | 304);
    let kind = body_kind(&headers, body_allowed);
    // A HEAD or 304 response's Content-Length describes the representation, not this message:
    // keep it (RFC 9110 §8.6).
    let keep_length = if body_allowed {
        None
    } else {
        headers.get(http::header::CONTENT_LENGTH).cloned()
    };
    strip_hop_by_hop(&mut headers);
    if let Some(len) = keep_length {
        headers.insert(http::header::CONTENT_LENGTH, len);
    }
    UpstreamResponse {
        status,
        headers,
        body: kind,
        response: resp,
    }
}

/// Applies the connection's credentials to a request (RFC 7617 for Basic: UTF-8, base64).
fn apply_auth(req: reqwest::RequestBuilder, auth: &Auth) -> reqwest::RequestBuilder {
    match auth {
        Auth::None => req,
        Auth::Basic { username, password } => {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{username}:{}", password.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                .unwrap_or_else(|_| HeaderValue::from_static(""));
            value.set_sensitive(true);
            req.header(http::header::AUTHORIZATION, value)
        }
    }
}

/// Classifies a reqwest error by walking its source chain. The message never contains the URL.
pub fn classify(err: &reqwest::Error) -> ExecError {
    let mut chain: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    let mut code = None;
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<DestinationRefused>() {
            return ExecError::new(ResetCode::DestinationNotAllowed, r.to_string());
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            code.get_or_insert(ResetCode::Tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if inner.downcast_ref::<rustls::Error>().is_some() {
                    code.get_or_insert(ResetCode::Tls);
                }
                if let Some(r) = inner.downcast_ref::<DestinationRefused>() {
                    return ExecError::new(ResetCode::DestinationNotAllowed, r.to_string());
                }
            }
            if io.kind() == std::io::ErrorKind::TimedOut {
                code.get_or_insert(ResetCode::Timeout);
            }
        }
        let text = e.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            code.get_or_insert(ResetCode::Dns);
        }
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        source = e.source();
    }
    let code = code.unwrap_or(if err.is_timeout() {
        ResetCode::Timeout
    } else if err.is_connect() {
        ResetCode::Connect
    } else {
        ResetCode::UpstreamProtocol
    });
    let detail = if chain.is_empty() {
        err.to_string()
    } else {
        chain.join(": ")
    };
    ExecError::new(code, detail)
}

/// Adapts a `Send`-only body to the `Sync` bound `reqwest::Body::wrap` asks for. Only `&mut`
/// access is ever used, so the `Mutex` is never contended.
struct SyncBody {
    inner: Mutex<RequestBody>,
    hint: SizeHint,
    end: bool,
}

impl SyncBody {
    fn new(body: RequestBody) -> Self {
        SyncBody {
            hint: body.size_hint(),
            end: body.is_end_stream(),
            inner: Mutex::new(body),
        }
    }
}

impl Body for SyncBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let inner = this.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        Pin::new(inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }

    fn is_end_stream(&self) -> bool {
        self.end
    }
}

/// A body of a known length (`Content-Length`) or unknown (chunked), fed by a stream of chunks.
/// A body whose chunks add up to more or less than its declared length ends with an error,
/// never with a silently wrong length.
pub struct LengthChecked<B> {
    inner: B,
    declared: Option<u64>,
    seen: u64,
}

impl<B> LengthChecked<B> {
    /// Wraps `inner`, declaring `declared` bytes (`None`: unknown).
    pub fn new(inner: B, declared: Option<u64>) -> Self {
        LengthChecked {
            inner,
            declared,
            seen: 0,
        }
    }
}

/// The body's length did not match its declared length.
#[derive(Debug, thiserror::Error)]
#[error("body length mismatch: declared {declared} bytes, got {got}")]
pub struct LengthMismatch {
    /// Declared bytes.
    pub declared: u64,
    /// Bytes seen (so far).
    pub got: u64,
}

impl<B> Body for LengthChecked<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if let Some(declared) = this.declared {
                        if this.seen > declared {
                            return Poll::Ready(Some(Err(Box::new(LengthMismatch {
                                declared,
                                got: this.seen,
                            }))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => match this.declared {
                Some(declared) if declared != this.seen => {
                    Poll::Ready(Some(Err(Box::new(LengthMismatch {
                        declared,
                        got: this.seen,
                    }))))
                }
                _ => Poll::Ready(None),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.seen)),
            None => self.inner.size_hint(),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.declared == Some(self.seen) && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_base_and_target() {
        let base = Url::parse("https://h:8443/api/").unwrap();
        assert_eq!(
            join_url(&base, "/v1/x?y=1").unwrap().as_str(),
            "https://h:8443/api/v1/x?y=1"
        );
        let base = Url::parse("http://h").unwrap();
        assert_eq!(join_url(&base, "/a").unwrap().as_str(), "http://h/a");
        assert!(join_url(&base, "//evil.example/").is_err());
        assert!(join_url(&base, "a").is_err());
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("host", HeaderValue::from_static("relay"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn allow_list_entries_parse() {
        assert_eq!(
            "10.0.0.0/8".parse::<AllowEntry>().unwrap(),
            AllowEntry::Net("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            "Jira.Corp:8443".parse::<AllowEntry>().unwrap(),
            AllowEntry::Host {
                host: "jira.corp".into(),
                port: Some(8443)
            }
        );
        assert_eq!(
            "127.0.0.1:80".parse::<AllowEntry>().unwrap(),
            AllowEntry::Host {
                host: "127.0.0.1".into(),
                port: Some(80)
            }
        );
        assert!("a b".parse::<AllowEntry>().is_err());
        assert!("host:99999".parse::<AllowEntry>().is_err());
    }

    #[test]
    fn policies_decide() {
        let list = DestinationPolicy::AllowList(vec![
            "10.1.0.0/16".parse().unwrap(),
            "app.internal:8080".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
        ]);
        let ok = |p: &DestinationPolicy, u: &str| p.check_url(&Url::parse(u).unwrap()).is_ok();
        assert!(ok(&list, "http://10.1.2.3/"));
        assert!(!ok(&list, "http://10.2.0.1/"));
        assert!(ok(&list, "http://127.0.0.1:9000/"));
        assert!(!ok(&list, "http://127.0.0.1:9001/"));
        assert!(ok(&list, "http://app.internal:8080/"));
        // Names not listed are decided after resolution (there are CIDR entries).
        assert!(list
            .filter_resolved("db.internal", vec!["10.1.9.9:0".parse().unwrap()])
            .is_ok());
        let err = list
            .filter_resolved("evil.example", vec!["192.168.1.1:0".parse().unwrap()])
            .unwrap_err();
        assert!(err.to_string().contains("192.168.1.1"));
        let only_names = DestinationPolicy::AllowList(vec!["app.internal".parse().unwrap()]);
        assert!(!ok(&only_names, "http://other.internal/"));
        assert!(!ok(
            &DestinationPolicy::AllowList(vec![]),
            "http://10.1.2.3/"
        ));

        let public = DestinationPolicy::PublicOnly;
        for u in [
            "http://127.0.0.1/",
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://100.64.0.1/",
        ] {
            assert!(!ok(&public, u), "{u} should be refused");
        }
        assert!(ok(&public, "http://93.184.216.34/"));
        assert!(public
            .filter_resolved("x", vec!["127.0.0.1:0".parse().unwrap()])
            .is_err());
    }

    #[test]
    fn body_kinds() {
        let mut h = HeaderMap::new();
        assert_eq!(body_kind(&h, true), BodyKind::Streamed);
        assert_eq!(body_kind(&h, false), BodyKind::Empty);
        h.insert("content-length", HeaderValue::from_static("12"));
        assert_eq!(body_kind(&h, true), BodyKind::Length(12));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert_eq!(body_kind(&h, true), BodyKind::Streamed);
    }
}
