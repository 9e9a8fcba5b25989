//! TLS for the relay's listener (rustls with the *ring* provider).
//!
//! Two sources of a certificate:
//!
//! - Operator-provided PEM files: [`load_files`] then [`server_config`], or
//!   [`server_config_from_files`] which names the files in its errors.
//! - Development mode, [`dev_tls`]: the relay keeps its own self-signed CA under
//!   `<data-dir>/tls/` (created once, reused on every later start so that agents can keep
//!   trusting it with `--ca-file <data-dir>/tls/ca.pem`) and issues a fresh server certificate
//!   signed by that CA on each start.
//!
//! Files in `<data-dir>/tls/`:
//!
//! | file | content | mode (Unix) |
//! | --- | --- | --- |
//! | `ca.pem` | CA certificate; give it to agents | 0644 |
//! | `ca-key.pem` | CA private key (PKCS#8) | 0600 |
//! | `server.pem` | current server certificate | 0644 |
//! | `server-key.pem` | current server private key (PKCS#8) | 0600 |

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Subdirectory of the data directory holding the development CA and server certificate.
pub const TLS_DIR: &str = "tls";
/// CA certificate file name inside [`TLS_DIR`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside [`TLS_DIR`].
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Server certificate file name inside [`TLS_DIR`].
pub const SERVER_CERT_FILE: &str = "server.pem";
/// Server private key file name inside [`TLS_DIR`].
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Start of the development CA's subject common name, which continues with a fingerprint of
/// its key. The CA certificate used for signing is rebuilt from the name and the stored key on
/// every start, so changing this would break the chain to `ca.pem` files that agents already
/// trust: never change it.
const CA_COMMON_NAME: &str = "Airlock relay development CA";
/// Subject common name of development server certificates.
const SERVER_COMMON_NAME: &str = "Airlock relay";

/// ALPN protocol the listener offers: the agent endpoint is a WebSocket over HTTP/1.1.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// A TLS setup problem. File-related variants name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The input holds no PEM block of the expected kind.
    #[error("{what}: no {expected} PEM block found")]
    NoPem {
        /// The file path, or `certificate` / `private key` for in-memory PEM.
        what: String,
        /// What was looked for: `CERTIFICATE` or `PRIVATE KEY`.
        expected: &'static str,
    },
    /// The PEM text is malformed (bad base64, unterminated block).
    #[error("{what}: malformed PEM: {source}")]
    BadPem {
        /// The file path, or `certificate` / `private key` for in-memory PEM.
        what: String,
        /// The parse error.
        source: std::io::Error,
    },
    /// The private key is not a usable RSA, ECDSA or Ed25519 key.
    #[error("{what}: unusable private key: {reason}")]
    BadKey {
        /// The file path, or `private key` for in-memory PEM.
        what: String,
        /// Why rustls or rcgen refused it.
        reason: String,
    },
    /// The certificate could not be parsed or used.
    #[error("{what}: unusable certificate: {reason}")]
    BadCertificate {
        /// The file path, or `certificate` for in-memory PEM.
        what: String,
        /// Why rustls refused it.
        reason: String,
    },
    /// The private key does not belong to the (first) certificate.
    #[error("private key {key} does not match certificate {cert}")]
    Mismatch {
        /// The certificate file path, or `certificate`.
        cert: String,
        /// The key file path, or `private key`.
        key: String,
    },
    /// A name for the server certificate is neither an IP address nor a valid DNS name.
    #[error("'{name}' is neither an IP address nor a valid DNS name")]
    BadName {
        /// The name as given.
        name: String,
    },
    /// The development CA certificate exists but its key is missing; the relay will not
    /// silently replace a CA that agents may trust.
    #[error(
        "{} exists but its key {} is missing; restore the key, or delete both to create a new CA",
        ca.display(),
        key.display()
    )]
    MissingCaKey {
        /// The CA certificate path.
        ca: PathBuf,
        /// The missing key path.
        key: PathBuf,
    },
    /// Certificate generation failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration for another reason.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Installs rustls' *ring* [`rustls::crypto::CryptoProvider`] as the process default, for code
/// (tokio-tungstenite, reqwest) that builds configs without naming a provider. Idempotent: a
/// provider installed earlier (by this or another call) is left in place.
pub fn install_crypto_provider() {
    // Err means a default is already installed, which is all this function promises.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The development TLS material produced by [`dev_tls`].
#[derive(Clone)]
pub struct DevTls {
    /// Path of the CA certificate (`<data-dir>/tls/ca.pem`) that agents pass as `--ca-file`.
    pub ca_path: PathBuf,
    /// The new server certificate, PEM (leaf only; agents trust the CA directly).
    pub cert_pem: String,
    /// The new server private key, PKCS#8 PEM. Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for DevTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevTls")
            .field("ca_path", &self.ca_path)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .finish()
    }
}

/// Development TLS: loads (or creates, the first time) the CA under `<data_dir>/tls/` and
/// issues a new ECDSA P-256 server certificate signed by it.
///
/// The server certificate's subject alternative names are `localhost`, `127.0.0.1`, `::1` and
/// each of `extra_names` (an IP address if it parses as one, else a DNS name). It is also
/// written to `server.pem` / `server-key.pem` for inspection. Creates `data_dir` and
/// `data_dir/tls` (mode 0700) as needed. If only `ca-key.pem` exists (a first start that was
/// interrupted), `ca.pem` is rebuilt from it.
///
/// # Errors
/// [`TlsError::BadName`] for an invalid extra name; [`TlsError::MissingCaKey`] when `ca.pem`
/// exists without `ca-key.pem`; [`TlsError::Read`] / [`TlsError::Write`] naming the file;
/// [`TlsError::BadKey`] / [`TlsError::Mismatch`] when the stored CA files are unusable or do
/// not belong together; [`TlsError::Generate`] when rcgen fails.
pub fn dev_tls(data_dir: &Path, extra_names: &[String]) -> Result<DevTls, TlsError> {
    // Validate the names before touching the disk.
    let mut names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ];
    for name in extra_names {
        let san = san_for(name)?;
        if !names.contains(&san) {
            names.push(san);
        }
    }

    let dir = data_dir.join(TLS_DIR);
    create_private_dir(&dir)?;
    let ca_path = dir.join(CA_CERT_FILE);
    let (ca_cert, ca_key) = load_or_create_ca(&ca_path, &dir.join(CA_KEY_FILE))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(SERVER_COMMON_NAME);
    params.subject_alt_names = names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    write_file(&dir.join(SERVER_KEY_FILE), key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(SERVER_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    Ok(DevTls {
        ca_path,
        cert_pem,
        key_pem,
    })
}

/// Reads a certificate file and a key file, checking that the first holds at least one
/// `CERTIFICATE` PEM block and the second a private key (PKCS#8, PKCS#1 or SEC1).
///
/// Returns `(cert_pem, key_pem)` as read.
///
/// # Errors
/// [`TlsError::Read`], [`TlsError::NoPem`] or [`TlsError::BadPem`], naming the file.
pub fn load_files(cert: &Path, key: &Path) -> Result<(String, String), TlsError> {
    let cert_pem = read_file(cert)?;
    let key_pem = read_file(key)?;
    let what_cert = cert.display().to_string();
    let what_key = key.display().to_string();
    parse_certs(&cert_pem, &what_cert)?;
    parse_key(&key_pem, &what_key)?;
    Ok((cert_pem, key_pem))
}

/// A rustls server config (ring provider, TLS 1.2 and 1.3, no client authentication, ALPN
/// `http/1.1`) for a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
/// SEC1 PEM).
///
/// # Errors
/// [`TlsError::NoPem`] / [`TlsError::BadPem`] for unreadable PEM, [`TlsError::BadKey`] for an
/// unsupported key, [`TlsError::BadCertificate`] for an unparsable leaf certificate,
/// [`TlsError::Mismatch`] when the key does not belong to the leaf certificate.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, TlsError> {
    server_config_labeled(cert_pem, key_pem, "certificate", "private key")
}

/// [`load_files`] then [`server_config`], with every error naming the file concerned.
///
/// # Errors
/// As [`load_files`] and [`server_config`].
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let (cert_pem, key_pem) = load_files(cert, key)?;
    server_config_labeled(
        &cert_pem,
        &key_pem,
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

fn server_config_labeled(
    cert_pem: &str,
    key_pem: &str,
    cert_what: &str,
    key_what: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = parse_certs(cert_pem, cert_what)?;
    let key = parse_key(key_pem, key_what)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: cert_what.to_owned(),
                key: key_what.to_owned(),
            },
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                TlsError::BadCertificate {
                    what: cert_what.to_owned(),
                    reason: e.to_string(),
                }
            }
            other => TlsError::BadKey {
                what: key_what.to_owned(),
                reason: other.to_string(),
            },
        })?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(config)
}

fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what: what.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|source| TlsError::BadPem {
            what: what.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPem {
            what: what.to_owned(),
            expected: "PRIVATE KEY",
        })
}

/// The subject alternative name for `name`: an IP address (brackets around IPv6 allowed) or a
/// DNS name valid per RFC 1035 as rustls checks it.
fn san_for(name: &str) -> Result<SanType, TlsError> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = || TlsError::BadName {
        name: name.to_owned(),
    };
    rustls::pki_types::DnsName::try_from(name).map_err(|_| bad())?;
    Ok(SanType::DnsName(
        name.to_owned().try_into().map_err(|_| bad())?,
    ))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Airlock");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CA's parameters. A function of the key only: together with the stored key they rebuild a
/// certificate with the same subject and subject key identifier as `ca.pem`, which is all that
/// signing needs (the issuer name and authority key identifier of issued certificates).
///
/// The subject carries a fingerprint of the key (first 8 bytes of the SHA-256 of its
/// SubjectPublicKeyInfo, hex) so that two relays' CAs have different names: a client trusting
/// the wrong one then reports an unknown issuer rather than a bad signature.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let fingerprint = hex::encode(
        &ring::digest::digest(&ring::digest::SHA256, &key.public_key_der()).as_ref()[..8],
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&format!("{CA_COMMON_NAME} {fingerprint}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Loads the CA from `cert_path` / `key_path`, creating it when neither exists.
fn load_or_create_ca(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Certificate, KeyPair), TlsError> {
    let key_what = key_path.display().to_string();
    let key = match std::fs::read_to_string(key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| TlsError::BadKey {
            what: key_what.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cert_path.exists() {
                return Err(TlsError::MissingCaKey {
                    ca: cert_path.to_owned(),
                    key: key_path.to_owned(),
                });
            }
            let key = KeyPair::generate()?;
            // The key is written first: if the certificate write is interrupted, the next start
            // rebuilds the certificate from the key (below).
            write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
            key
        }
        Err(source) => {
            return Err(TlsError::Read {
                path: key_path.to_owned(),
                source,
            })
        }
    };

    // Rebuilt on every start from the deterministic parameters and the stored key; see
    // `ca_params`.
    let cert = ca_params(&key).self_signed(&key)?;
    match std::fs::read_to_string(cert_path) {
        Ok(pem) => {
            let what = cert_path.display().to_string();
            let stored = parse_certs(&pem, &what)?;
            // The stored certificate's SubjectPublicKeyInfo appears verbatim in its DER; if the
            // key's does not, the two files do not belong together and issued certificates
            // would not verify against ca.pem.
            let spki = key.public_key_der();
            if !stored[0].windows(spki.len()).any(|w| w == spki.as_slice()) {
                return Err(TlsError::Mismatch {
                    cert: what,
                    key: key_what,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        }
        Err(source) => {
            return Err(TlsError::Read {
                path: cert_path.to_owned(),
                source,
            })
        }
    }
    Ok((cert, key))
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` atomically (temporary file in the same directory, then rename),
/// with permission bits `mode` on Unix from the moment the file exists.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = result.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            TempDir(std::env::temp_dir().join(format!(
                "airlock-tls-{tag}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Runs a TLS handshake over an in-memory pipe with a small buffer, then one round trip.
    async fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(), std::io::Error> {
        let (client_io, server_io) = tokio::io::duplex(1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let server_task = tokio::spawn(async move {
            let mut stream = acceptor.accept(server_io).await?;
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await?;
            stream.write_all(&buf).await?;
            stream.flush().await?;
            Ok::<_, std::io::Error>(())
        });
        let client_result = async {
            let mut stream = connector.connect(server_name, client_io).await?;
            stream.write_all(b"ping").await?;
            stream.flush().await?;
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            Ok::<_, std::io::Error>(())
        }
        .await;
        // On a client-side failure the server's handshake fails too (alert or EOF).
        let server_result = server_task.await.unwrap();
        client_result.and(server_result)
    }

    #[tokio::test]
    async fn dev_ca_is_reused_and_server_certificates_verify() {
        let dir = TempDir::new("dev");
        let first = dev_tls(&dir.0, &[]).unwrap();
        let ca_pem = std::fs::read_to_string(&first.ca_path).unwrap();
        let ca_key_pem = std::fs::read_to_string(dir.0.join("tls/ca-key.pem")).unwrap();
        let second = dev_tls(
            &dir.0,
            &[
                "relay.example.com".to_owned(),
                "10.1.2.3".to_owned(),
                "[fd00::1]".to_owned(),
            ],
        )
        .unwrap();
        assert_eq!(first.ca_path, second.ca_path);
        assert_eq!(first.ca_path, dir.0.join("tls").join("ca.pem"));
        // Same CA on the second start, new server key.
        assert_eq!(std::fs::read_to_string(&second.ca_path).unwrap(), ca_pem);
        assert_eq!(
            std::fs::read_to_string(dir.0.join("tls/ca-key.pem")).unwrap(),
            ca_key_pem
        );
        assert_ne!(first.key_pem, second.key_pem);
        assert_eq!(
            std::fs::read_to_string(dir.0.join("tls/server.pem")).unwrap(),
            second.cert_pem
        );
        assert_eq!(
            std::fs::read_to_string(dir.0.join("tls/server-key.pem")).unwrap(),
            second.key_pem
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for file in ["ca-key.pem", "server-key.pem"] {
                let mode = std::fs::metadata(dir.0.join("tls").join(file))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{file}");
            }
        }
        assert!(!format!("{second:?}").contains(&second.key_pem));

        let client = client_config(&ca_pem);
        // Both generations verify against the one ca.pem, by DNS name and by IP address.
        for tls in [&first, &second] {
            for name in ["localhost", "127.0.0.1", "::1"] {
                let server = server_config(&tls.cert_pem, &tls.key_pem).unwrap();
                handshake(client.clone(), server, name)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        for name in ["relay.example.com", "10.1.2.3", "fd00::1"] {
            let server = server_config(&second.cert_pem, &second.key_pem).unwrap();
            handshake(client.clone(), server, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // Names outside the certificate are refused.
        let server = server_config(&second.cert_pem, &second.key_pem).unwrap();
        let err = handshake(client.clone(), server, "other.example.com")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");

        // Another data directory means another CA, which this client does not trust.
        let other_dir = TempDir::new("other");
        let other = dev_tls(&other_dir.0, &[]).unwrap();
        let server = server_config(&other.cert_pem, &other.key_pem).unwrap();
        let err = handshake(client, server, "localhost").await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    /// The tunnel's suite is what the agent's provider offers first (the server follows the
    /// client's order): AES-128-GCM, cheaper per byte than AES-256-GCM.
    #[tokio::test]
    async fn an_agent_and_the_relay_agree_on_aes_128_gcm() {
        let dir = TempDir::new("suite");
        let tls = dev_tls(&dir.0, &[]).unwrap();
        let ca_pem = std::fs::read_to_string(&tls.ca_path).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let client =
            rustls::ClientConfig::builder_with_provider(airlock_shared::exec::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            server_config(&tls.cert_pem, &tls.key_pem).unwrap(),
        ));
        let server = tokio::spawn(async move {
            let stream = acceptor.accept(server_io).await.unwrap();
            stream
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|s| s.suite())
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), client_io)
            .await
            .unwrap();
        let client_suite = stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite());
        assert_eq!(
            client_suite,
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(server.await.unwrap(), client_suite);
    }

    #[test]
    fn missing_ca_pieces() {
        let dir = TempDir::new("pieces");
        dev_tls(&dir.0, &[]).unwrap();
        let ca = dir.0.join("tls/ca.pem");
        let ca_key = dir.0.join("tls/ca-key.pem");
        let ca_pem = std::fs::read_to_string(&ca).unwrap();

        // Certificate lost (interrupted first start): rebuilt from the key; the old one is
        // equivalent for verification, so restore it to check the key was kept.
        std::fs::remove_file(&ca).unwrap();
        let tls = dev_tls(&dir.0, &[]).unwrap();
        assert!(ca.is_file());
        std::fs::write(&ca, &ca_pem).unwrap();
        let config = client_config(&ca_pem);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(handshake(
            config,
            server_config(&tls.cert_pem, &tls.key_pem).unwrap(),
            "localhost",
        ))
        .unwrap();

        // Key lost: refuse to replace a CA agents may trust.
        std::fs::remove_file(&ca_key).unwrap();
        let err = dev_tls(&dir.0, &[]).unwrap_err();
        assert!(matches!(err, TlsError::MissingCaKey { .. }), "{err}");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");

        // A key that does not belong to ca.pem.
        std::fs::write(&ca_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = dev_tls(&dir.0, &[]).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");

        // A key file that is not a key.
        std::fs::write(&ca_key, "garbage").unwrap();
        let err = dev_tls(&dir.0, &[]).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }

    #[test]
    fn bad_names_are_refused_before_writing() {
        let dir = TempDir::new("names");
        for bad in ["not a name", "", "exa mple.com", "-bad-.example..com"] {
            let err = dev_tls(&dir.0, &[bad.to_owned()]).unwrap_err();
            assert!(matches!(err, TlsError::BadName { .. }), "{bad:?}: {err}");
        }
        assert!(!dir.0.exists());
    }

    #[test]
    fn server_config_errors() {
        let dir = TempDir::new("errors");
        let a = dev_tls(&dir.0, &[]).unwrap();
        let b = dev_tls(&dir.0, &[]).unwrap();
        let config = server_config(&a.cert_pem, &a.key_pem).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        let err = server_config(&a.cert_pem, &b.key_pem).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        let err = server_config("", &a.key_pem).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoPem {
                    expected: "CERTIFICATE",
                    ..
                }
            ),
            "{err}"
        );
        let err = server_config(&a.cert_pem, &a.cert_pem).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoPem {
                    expected: "PRIVATE KEY",
                    ..
                }
            ),
            "{err}"
        );
        let bogus_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let err = server_config(&a.cert_pem, bogus_key).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        let bogus_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = server_config(bogus_cert, &a.key_pem).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err}");
    }

    #[test]
    fn files_are_named_in_errors() {
        let dir = TempDir::new("files");
        let tls = dev_tls(&dir.0, &[]).unwrap();
        let cert = dir.0.join("tls/server.pem");
        let key = dir.0.join("tls/server-key.pem");
        let (cert_pem, key_pem) = load_files(&cert, &key).unwrap();
        assert_eq!(
            (cert_pem.as_str(), key_pem.as_str()),
            (tls.cert_pem.as_str(), tls.key_pem.as_str())
        );
        server_config_from_files(&cert, &key).unwrap();

        let missing = dir.0.join("missing.pem");
        let err = load_files(&missing, &key).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { .. }) && err.to_string().contains("missing.pem"),
            "{err}"
        );
        // Swapped arguments: the key file has no certificate.
        let err = load_files(&key, &cert).unwrap_err();
        assert!(err.to_string().contains("server-key.pem"), "{err}");
        // A key for another certificate.
        let err = server_config_from_files(&cert, &dir.0.join("tls/ca-key.pem")).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("ca-key.pem") && err.to_string().contains("server.pem"),
            "{err}"
        );
    }

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
