//! The HTTP execution engine: a request head, a body and a connection definition in, a streaming
//! upstream response out. The relay uses it for public apps and the agent for private apps, so an
//! auth type behaves identically wherever it runs.
//!
//! What it does, per request:
//! - joins the connection's base URL and the request target;
//! - removes hop-by-hop header fields (RFC 9110 §7.6.1), the caller's `Authorization` and
//!   `Cookie`, and every header field the connection's auth sets, then applies the connection's
//!   auth ([`apply_auth`]), which always wins: its header fields replace the client's, its query
//!   parameters replace the client's of the same name;
//! - enforces the [`DestinationPolicy`] on IP literals before connecting and on every DNS answer
//!   (a custom resolver), so DNS rebinding cannot bypass it;
//! - follows redirects (at most [`MAX_REDIRECTS`]) itself, re-checking the policy at each hop;
//!   auth is applied afresh to each same-origin hop and to no other, and the next hop's URL is
//!   resolved against the URL *before* auth query parameters were added, so a redirect to
//!   another origin carries none of the connection's header fields, Basic credentials or query
//!   parameters (unless the upstream itself wrote them into `Location`);
//! - builds TLS from the connection's [`TlsSettings`] ([`tls_config`]: extra CA, client
//!   certificate, or the logged `insecure_skip_verify` opt-in);
//! - keeps one pooled `reqwest::Client` per connection definition and TLS settings (keyed by a
//!   SHA-256 digest of the settings, so the cache holds no key material), so keep-alive
//!   connections to the upstream are reused;
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

use crate::model::{Auth, AuthParams, ConnectionSpec, TlsSettings};
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
            // Digits only: `u16::from_str` would also take a leading `+`.
            Some((h, p)) => match p.parse::<u16>() {
                Ok(port) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(port)),
                _ => return Err(format!("bad port in allow-list entry '{s}'")),
            },
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
        self.host_entry_admits(|h| h == host, port)
    }

    /// True when a `Host` entry whose host satisfies `host_matches` admits `port` (or the
    /// policy admits every destination).
    fn host_entry_admits(&self, host_matches: impl Fn(&str) -> bool, port: Option<u16>) -> bool {
        match self {
            DestinationPolicy::Any => true,
            DestinationPolicy::PublicOnly => false,
            DestinationPolicy::AllowList(entries) => entries.iter().any(|e| match e {
                AllowEntry::Host { host: h, port: p } => {
                    host_matches(h) && (p.is_none() || port.is_none() || *p == port)
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
        // Compared as addresses: formatting the literal for a by-name comparison on every
        // request was a visible share of the agent's CPU per small request.
        if self.ip_admitted(ip) || self.ip_admitted_by_name(ip, port) {
            return Ok(());
        }
        Err(refused(&ip.to_string(), port, self.refusal_reason()))
    }

    /// [`Self::host_admitted_by_name`] for an IP literal: `Host` entries hold IP literals in
    /// their canonical text form (see [`AllowEntry::from_str`]), so comparing parsed addresses
    /// gives the same answer as comparing `ip.to_string()` with them.
    fn ip_admitted_by_name(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.host_entry_admits(|h| h.parse::<IpAddr>().is_ok_and(|h| h == ip), port)
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

/// The refusal of `host` (a name or an IP literal) and `port`. An IPv6 literal followed by a
/// port is bracketed, as in a URL's authority (RFC 3986 §3.2.2): `[::1]:8080`, not `::1:8080`.
fn refused(host: &str, port: Option<u16>, why: &str) -> ExecError {
    let destination = match port {
        Some(p) if host.contains(':') => format!("[{host}]:{p}"),
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    ExecError::new(
        ResetCode::DestinationNotAllowed,
        format!("destination {destination} is {why}"),
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

/// True for a hop-by-hop field (RFC 9110 §7.6.1), a framing field the tunnel re-creates
/// ([`HOP_BY_HOP`]), `Host` or `Content-Length`. A `match` on the name compiles to a dispatch on
/// its length; this runs for every field of every request and response.
fn is_stripped(name: &HeaderName) -> bool {
    let stripped = matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    );
    debug_assert_eq!(
        stripped,
        HOP_BY_HOP.contains(&name.as_str())
            || name == http::header::HOST
            || name == http::header::CONTENT_LENGTH
    );
    stripped
}

/// Removes hop-by-hop fields, the fields named in `Connection`, `Host` and `Content-Length`
/// (framing travels as [`BodyKind`]) from `headers`.
///
/// One pass over the names present: a map without such fields (the common case) is not
/// touched, and only fields actually present are removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_stripped(name) {
            doomed.push(name.clone());
        }
    }
    if headers.contains_key(http::header::CONNECTION) {
        for token in headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        headers.remove(name);
    }
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
    // Start from the parsed base and set only path and query: the scheme and host are not parsed
    // again (no IDNA processing per request). The path parser still resolves dot-segments.
    let (path_part, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if path_part.contains('#') {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            "request target must not contain a fragment",
        ));
    }
    let mut url = base.clone();
    url.set_path(&format!("{base_path}{path_part}"));
    url.set_query(query);
    if url.origin() != base.origin() {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            "request target leaves the connection's origin",
        ));
    }
    // Dot-segments (`..`, `%2e%2e`, `..\`) are resolved by the parser (RFC 3986 §5.2.4); the
    // result must stay under the base URL's path, or the connection's credentials would reach
    // paths of the host the connection was never defined for.
    let path = url.path();
    let inside = base_path.is_empty()
        || path == base_path
        || path
            .strip_prefix(base_path)
            .is_some_and(|rest| rest.starts_with('/'));
    // An encoded slash next to dots (`..%2f`) survives the parser but many servers decode it
    // before resolving dot-segments: refuse any `..` segment left after percent-decoding.
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let climbs = decoded.split(['/', '\\']).any(|segment| segment == "..");
    if !inside || climbs {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            "request target leaves the connection's base path",
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

/// Parses one PEM private key: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
/// (`EC PRIVATE KEY`).
///
/// # Errors
/// A message naming what is wrong; it never contains key material.
pub fn parse_private_key(pem: &str) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(
            "no PEM private key found (expected PKCS#8 \"PRIVATE KEY\", PKCS#1 \
                         \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")"
                .into(),
        ),
        // The error may quote part of the input: say only that the PEM is broken.
        Err(_) => Err("bad PEM: the private key cannot be decoded".into()),
    }
}

/// rustls with the ring provider, for every TLS configuration Airlock builds, offering the
/// AES-128-GCM suites first: TLS 1.3 `TLS_AES_128_GCM_SHA256` (RFC 8446 section 9.1, the suite
/// every TLS 1.3 implementation must support), then ring's usual order (AES-256-GCM,
/// ChaCha20-Poly1305; for TLS 1.2, ECDHE AES-128-GCM first likewise).
///
/// AES-128 runs 10 rounds per block where AES-256 runs 14, so bulk transfers through the tunnel
/// spend less time in encryption. rustls servers follow the client's order by default, so an
/// agent's preference decides the tunnel's suite.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: AES-128-GCM suites move ahead, everything else keeps its order.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// A server certificate verifier that accepts any certificate: `tls.insecure_skip_verify`.
/// Handshake signatures are still checked against the presented certificate, so the session is
/// at least bound to *some* key; who holds it is not verified.
#[derive(Debug)]
struct AcceptAnyServerCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client configuration for a connection's [`TlsSettings`]: the system roots plus
/// `ca_certificate`, or no verification at all with `insecure_skip_verify`; the client
/// certificate and key when set. ALPN offers HTTP/1.1 only.
///
/// # Errors
/// [`ResetCode::InvalidRequest`] naming the `tls.*` field when a PEM does not parse or the key
/// does not fit the certificate (saved definitions were validated, so this means an agent
/// profile or an old definition is broken). Messages never contain key material.
pub fn tls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, ExecError> {
    let tls_err = |m: String| ExecError::new(ResetCode::InvalidRequest, m);
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCertificate {
                provider: provider.clone(),
            }))
    } else {
        let mut roots = (*native_roots()).clone();
        if let Some(ca) = &tls.ca_certificate {
            for cert in
                parse_certificates(ca).map_err(|e| tls_err(format!("tls.ca_certificate: {e}")))?
            {
                roots
                    .add(cert)
                    .map_err(|e| tls_err(format!("tls.ca_certificate: {e}")))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&tls.client_certificate, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs = parse_certificates(cert)
                .map_err(|e| tls_err(format!("tls.client_certificate: {e}")))?;
            let key = parse_private_key(key.expose())
                .map_err(|e| tls_err(format!("tls.client_key: {e}")))?;
            // rustls checks that the key's public key is the certificate's.
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                let why = match e {
                    rustls::Error::InconsistentKeys(_) => {
                        "does not match tls.client_certificate".to_string()
                    }
                    _ => "is not a usable private key".to_string(),
                };
                tls_err(format!("tls.client_key {why}"))
            })?
        }
        (Some(_), None) => {
            return Err(tls_err(
                "tls.client_key: is required with tls.client_certificate".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(tls_err(
                "tls.client_certificate: is required with tls.client_key".into(),
            ))
        }
        (None, None) => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The pooled-client cache key of TLS settings: a SHA-256 digest of their JSON, so the cache
/// (and anything that might print it) never holds the client key.
/// The execution engine. One per process; cheap to share behind an `Arc`.
pub struct Engine {
    policy: Arc<DestinationPolicy>,
    /// Connection name → (the TLS settings its client was built with, client). Compared field by
    /// field on every request: cheaper than hashing them, and a change rebuilds the client.
    clients: Mutex<HashMap<String, (TlsSettings, reqwest::Client)>>,
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
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tls, c)) = clients.get(&spec.name) {
            if *tls == spec.tls {
                return Ok(c.clone());
            }
        }
        let tls = tls_config(&spec.tls)?;
        if spec.tls.insecure_skip_verify {
            tracing::warn!(
                connection = %spec.name,
                "tls.insecure_skip_verify is on: the app's certificate is NOT verified; anyone \
                 on the path can impersonate it"
            );
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
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
        clients.insert(spec.name.clone(), (spec.tls.clone(), client.clone()));
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
        strip_client_credentials(&spec.auth, &mut headers);
        let origin = spec.base_url.origin();
        // The URL as the client asked for it, without the connection's query parameters: the
        // base against which a Location is resolved, so they never leak into the next hop.
        let mut url = join_url(&spec.base_url, &head.target)?;
        let mut method = method;
        let mut body = body;
        let timeout = Duration::from_millis(spec.response_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        for hop in 0..=MAX_REDIRECTS {
            self.policy.check_url(&url)?;
            let mut hop_url = url.clone();
            let mut hop_headers = headers.clone();
            // Credentials go to the connection's own origin only.
            if url.origin() == origin {
                apply_auth(&spec.auth, &mut hop_url, &mut hop_headers)?;
            }
            let mut req = client.request(method.clone(), hop_url).headers(hop_headers);
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

fn upstream_response(mut resp: reqwest::Response, method: &Method) -> UpstreamResponse {
    let status = resp.status().as_u16();
    // The body stream does not need the head: move the fields out instead of copying them.
    let mut headers = std::mem::take(resp.headers_mut());
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

/// Removes what a client must not send upstream itself: its `Authorization` and `Cookie` (its
/// credentials for the relay, never the app's), and every header field the connection's auth
/// sets, so that a client value can neither replace a credential nor follow a redirect to
/// another origin in its place.
pub fn strip_client_credentials(auth: &Auth, headers: &mut HeaderMap) {
    headers.remove(http::header::AUTHORIZATION);
    headers.remove(http::header::COOKIE);
    for h in auth.headers() {
        if let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// Applies the connection's credentials to one request to the connection's origin:
/// - Basic (`basic`, `custom` with a username): `Authorization: Basic base64(utf8(user:pass))`
///   (RFC 7617 §2 and §2.1);
/// - header fields (`header`, `custom`): each replaces every client field of the same name;
/// - query parameters (`query`, `custom`): see [`merge_query`].
///
/// Credential header values are marked sensitive (never indexed by HPACK, hidden from
/// `Debug`).
///
/// # Errors
/// [`ResetCode::InvalidRequest`] for `profile` auth (only an agent can resolve it, before
/// calling the engine) or a header that is not valid (not expected: definitions are validated
/// when saved, and agent profiles at start).
pub fn apply_auth(auth: &Auth, url: &mut Url, headers: &mut HeaderMap) -> Result<(), ExecError> {
    if let Auth::Profile { name } = auth {
        return Err(ExecError::new(
            ResetCode::InvalidRequest,
            format!("auth profile '{name}' can only be resolved by an agent"),
        ));
    }
    if let Some((username, password)) = auth.basic_credentials() {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{username}:{}", password.expose()));
        let mut value = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
            ExecError::new(ResetCode::Internal, "base64 is always a valid header value")
        })?;
        value.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, value);
    }
    for (i, h) in auth.headers().iter().enumerate() {
        let invalid = |what: &str| {
            ExecError::new(
                ResetCode::InvalidRequest,
                format!("auth.headers[{i}].{what} is not valid"),
            )
        };
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| invalid("name"))?;
        let mut value =
            HeaderValue::from_bytes(h.value.expose().as_bytes()).map_err(|_| invalid("value"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    if let Some(params) = auth.params() {
        merge_query(url, params);
    }
    Ok(())
}

/// Merges the connection's query parameters into `url`'s query: every client parameter whose
/// (decoded) name is one of them is removed, the others are kept byte for byte, and the
/// connection's are appended `application/x-www-form-urlencoded` (WHATWG URL Standard §5.2:
/// space as `+`, all but `A-Za-z0-9*-._` percent-encoded as UTF-8), in name order.
pub fn merge_query(url: &mut Url, params: &AuthParams) {
    if params.is_empty() {
        return;
    }
    let kept: Vec<String> = url
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|segment| !segment.is_empty())
        .filter(|segment| {
            let name = url::form_urlencoded::parse(segment.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            !params.contains_key(&name)
        })
        .map(str::to_string)
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.set_query(Some(&kept.join("&")));
    }
    let mut pairs = url.query_pairs_mut();
    for (name, value) in params {
        pairs.append_pair(name, value.expose());
    }
}

/// The rustls error `e` is or wraps: directly, or inside `io::Error`s (tokio-rustls wraps it in
/// one, and hyper-rustls wraps that in another; `io::Error::source` skips the wrapped error, so
/// the source chain alone never shows it).
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = e;
    for _ in 0..4 {
        if let Some(t) = current.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        let inner = current.downcast_ref::<std::io::Error>()?.get_ref()?;
        current = inner;
    }
    None
}

/// A human description of a TLS failure: which certificate problem or which alert, and what to
/// set to fix it.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown CA: the app's certificate is not signed by a trusted \
                                 CA (set tls.ca_certificate to trust a private CA)"
                .into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "hostname mismatch: the app's certificate is not valid for the host of base_url"
                    .into()
            }
            C::Expired | C::ExpiredContext { .. } => "the app's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the app's certificate is not valid yet".into()
            }
            C::Revoked => "the app's certificate is revoked".into(),
            C::BadEncoding => "the app's certificate is malformed".into(),
            C::BadSignature => "the app's certificate has an invalid signature".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the app's certificate is not valid for TLS server authentication".into()
            }
            other => format!("the app's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            A::CertificateRequired => "the app requires a client certificate (TLS alert \
                                       certificate_required): set tls.client_certificate and \
                                       tls.client_key"
                .into(),
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::UnknownCA
            | A::AccessDenied => format!(
                "the app refused the client certificate (TLS alert {})",
                alert_name(*alert)
            ),
            A::HandshakeFailure => "the app aborted the TLS handshake (alert \
                                    handshake_failure): no common protocol version or cipher \
                                    suite, or a required client certificate is missing"
                .into(),
            A::ProtocolVersion => "the app supports no TLS version in common (TLS 1.2 or 1.3 \
                                   required)"
                .into(),
            other => format!("the app sent TLS alert {}", alert_name(*other)),
        },
        rustls::Error::NoCertificatesPresented => "the app presented no certificate".into(),
        other => format!("TLS error: {other}"),
    }
}

/// The RFC 8446 §6 name of an alert (`certificate_required`), or its `Debug` form.
fn alert_name(alert: rustls::AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    let mut previous_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            out.push('_');
        }
        previous_lower = c.is_ascii_lowercase();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Classifies a reqwest error by walking its source chain. TLS failures lead with
/// [`describe_tls_error`]'s human message (unknown CA, hostname mismatch, client certificate
/// required or refused, expired). The message never contains the URL.
pub fn classify(err: &reqwest::Error) -> ExecError {
    let mut chain: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    let mut code = None;
    let mut tls: Option<String> = None;
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<DestinationRefused>() {
            return ExecError::new(ResetCode::DestinationNotAllowed, r.to_string());
        }
        if let Some(t) = find_rustls_error(e) {
            code.get_or_insert(ResetCode::Tls);
            tls.get_or_insert_with(|| describe_tls_error(t));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
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
    match tls {
        Some(human) => ExecError::new(code, format!("{human} ({detail})")),
        None => ExecError::new(code, detail),
    }
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
    fn the_provider_offers_aes_128_gcm_first_and_keeps_every_suite() {
        let ours: Vec<_> = crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut sorted_ours = ours.clone();
        let mut sorted_ring = ring.clone();
        sorted_ours.sort_by_key(|s| u16::from(*s));
        sorted_ring.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted_ours, sorted_ring, "no suite added or lost");
        // Among TLS 1.2 suites, AES-128-GCM also comes before AES-256-GCM.
        let pos = |suite| ours.iter().position(|s| *s == suite).unwrap();
        assert!(
            pos(rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
                < pos(rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)
        );
    }

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
        // Dot-segments may not climb out of the base path, however they are spelled.
        let base = Url::parse("http://h/api/v2/").unwrap();
        for escape in [
            "/../x",
            "/../../status",
            "/%2e%2e/x",
            "/%2E%2E/%2e%2e/x",
            "/..\\x",
            "/a/../../x",
        ] {
            let err = join_url(&base, escape).unwrap_err();
            assert_eq!(err.code, ResetCode::InvalidRequest, "{escape}");
        }
        assert_eq!(
            join_url(&base, "/a/../b").unwrap().as_str(),
            "http://h/api/v2/b"
        );
        assert!(join_url(&Url::parse("http://h/api").unwrap(), "/../apix").is_err());
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

        // Several Connection fields, names in any case; framing and proxy credentials go too.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("X-One"));
        h.append("connection", HeaderValue::from_static(" x-two ,keep-alive"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eDp5"),
        );
        h.append("x-kept", HeaderValue::from_static("a"));
        h.append("x-kept", HeaderValue::from_static("b"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get_all("x-kept").iter().count(), 2);

        // Nothing to strip: the map is left as it was.
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
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
        for bad in ["host:+80", "127.0.0.1:+80", "host:-1", "host:", "host: 80"] {
            let err = bad.parse::<AllowEntry>().unwrap_err();
            assert!(err.contains("bad port"), "{bad}: {err}");
        }
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
        assert!(!ok(&list, "http://127.0.0.2:9000/"));
        assert!(ok(&list, "http://app.internal:8080/"));
        // IPv6 literals with a port are matched as addresses, whatever their spelling.
        let v6 = DestinationPolicy::AllowList(vec!["[::1]:9000".parse().unwrap()]);
        assert!(ok(&v6, "http://[::1]:9000/"));
        assert!(ok(&v6, "http://[0:0:0:0:0:0:0:1]:9000/"));
        assert!(!ok(&v6, "http://[::1]:9001/"));
        assert!(!ok(&v6, "http://[::2]:9000/"));
        let refused = v6
            .check_url(&Url::parse("http://[::2]:9000/").unwrap())
            .unwrap_err();
        assert!(
            refused.message.contains("destination [::2]:9000 "),
            "{}",
            refused.message
        );
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

    fn auth(json: serde_json::Value) -> Auth {
        serde_json::from_value(json).unwrap()
    }

    fn applied(a: &Auth, target: &str, client: &[(&str, &str)]) -> (Url, HeaderMap) {
        let mut url = join_url(&Url::parse("http://h/base").unwrap(), target).unwrap();
        let mut headers = HeaderMap::new();
        for (n, v) in client {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        strip_client_credentials(a, &mut headers);
        apply_auth(a, &mut url, &mut headers).unwrap();
        (url, headers)
    }

    #[test]
    fn basic_credentials_are_utf8_and_win() {
        use base64::Engine as _;
        let a = auth(serde_json::json!({"type": "basic", "username": "u", "password": "pässwörd"}));
        let (_, h) = applied(&a, "/", &[("authorization", "Bearer client")]);
        let values: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(values.len(), 1);
        let token = values[0].to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "u:pässwörd");
        assert!(values[0].is_sensitive());
    }

    #[test]
    fn connection_headers_replace_the_client_s() {
        let a = auth(serde_json::json!({"type": "header", "headers": [
            {"name": "Authorization", "value": "Bearer conn"},
            {"name": "X-Api-Key", "value": "conn-key"}]}));
        let (_, h) = applied(
            &a,
            "/",
            &[
                ("authorization", "Bearer client"),
                ("x-api-key", "client-1"),
                ("X-API-KEY", "client-2"),
                ("cookie", "c=1"),
                ("accept", "text/plain"),
            ],
        );
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer conn");
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-api-key"], "conn-key");
        assert!(h.get("cookie").is_none());
        assert_eq!(h["accept"], "text/plain");
    }

    #[test]
    fn query_params_are_encoded_merged_and_win() {
        let a = auth(serde_json::json!({"type": "query", "params": {
            "api_key": "k 1+2", "a&b=c d+/ü": "x&y=z/ä"}}));
        let (url, _) = applied(
            &a,
            "/p?q=1&api_key=evil&api%5Fkey=evil2&api_key&keep=a%20b&a%26b%3Dc+d%2B%2F%C3%BC=evil3",
            &[],
        );
        assert_eq!(
            url.query().unwrap(),
            "q=1&keep=a%20b&a%26b%3Dc+d%2B%2F%C3%BC=x%26y%3Dz%2F%C3%A4&api_key=k+1%2B2"
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert!(pairs.contains(&("a&b=c d+/ü".into(), "x&y=z/ä".into())));
        assert!(pairs.contains(&("api_key".into(), "k 1+2".into())));
        assert_eq!(pairs.iter().filter(|(n, _)| n == "api_key").count(), 1);
        // No client query at all.
        let (url, _) = applied(&a, "/p", &[]);
        assert_eq!(
            url.as_str(),
            "http://h/base/p?a%26b%3Dc+d%2B%2F%C3%BC=x%26y%3Dz%2F%C3%A4&api_key=k+1%2B2"
        );
    }

    #[test]
    fn custom_combines_everything_and_profile_is_refused() {
        let a = auth(
            serde_json::json!({"type": "custom", "username": "svc", "password": "pw",
            "headers": [{"name": "X-Api-Key", "value": "k"}], "params": {"tenant": "t"}}),
        );
        let (url, h) = applied(&a, "/x?tenant=other", &[]);
        assert!(h["authorization"].to_str().unwrap().starts_with("Basic "));
        assert_eq!(h["x-api-key"], "k");
        assert_eq!(url.query(), Some("tenant=t"));
        let p = auth(serde_json::json!({"type": "profile", "name": "jira"}));
        let mut url = Url::parse("http://h/").unwrap();
        let err = apply_auth(&p, &mut url, &mut HeaderMap::new()).unwrap_err();
        assert_eq!(err.code, ResetCode::InvalidRequest);
        assert!(err.message.contains("jira"));
    }

    #[test]
    fn tls_failures_are_described() {
        use rustls::{AlertDescription, CertificateError, Error};
        let d = |e: Error| describe_tls_error(&e);
        assert!(
            d(Error::InvalidCertificate(CertificateError::UnknownIssuer)).contains("unknown CA")
        );
        assert!(
            d(Error::InvalidCertificate(CertificateError::NotValidForName))
                .contains("hostname mismatch")
        );
        assert!(d(Error::InvalidCertificate(CertificateError::Expired)).contains("expired"));
        assert!(
            d(Error::AlertReceived(AlertDescription::CertificateRequired))
                .contains("requires a client certificate")
        );
        assert!(d(Error::AlertReceived(AlertDescription::UnknownCA))
            .contains("refused the client certificate (TLS alert unknown_ca)"));
        assert_eq!(
            alert_name(AlertDescription::CertificateRequired),
            "certificate_required"
        );
    }

    #[test]
    fn tls_configs_build_and_cache_keys_hide_keys() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let mut tls = TlsSettings {
            ca_certificate: Some(ca.pem()),
            client_certificate: Some(cert.pem()),
            client_key: Some(crate::model::Secret::new(key.serialize_pem())),
            insecure_skip_verify: false,
        };
        let config = tls_config(&tls).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        tls.insecure_skip_verify = true;
        tls_config(&tls).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        tls.client_key = Some(crate::model::Secret::new(other.serialize_pem()));
        let err = tls_config(&tls).unwrap_err();
        assert!(err.message.contains("tls.client_key"), "{err}");
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
