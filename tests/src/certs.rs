//! Throwaway certificates for TLS tests: a [`TestCa`] made with rcgen issues server and client
//! certificates; the `openssl` command line (Debian package `openssl`, installed by `tests/run`)
//! makes the key formats rcgen cannot write: RSA keys, PKCS#1 (`RSA PRIVATE KEY`) and SEC1
//! (`EC PRIVATE KEY`).

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM (the key PKCS#8 unless converted).
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

/// What a [`TestCa`] issues.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// Subject common name.
    pub common_name: String,
    /// Subject alternative names: IP addresses or DNS names.
    pub names: Vec<String>,
    /// `clientAuth` extended key usage (else `serverAuth`).
    pub client: bool,
    /// Validity start `(year, month, day)`; default 2020-01-01.
    pub not_before: (i32, u8, u8),
    /// Validity end `(year, month, day)`; default 2999-01-01.
    pub not_after: (i32, u8, u8),
    /// The subject's key, PKCS#8 PEM; default a fresh ECDSA P-256 key.
    pub key_pem: Option<String>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            common_name: "airlock test".to_owned(),
            names: Vec::new(),
            client: false,
            not_before: (2020, 1, 1),
            not_after: (2999, 1, 1),
            key_pem: None,
        }
    }
}

/// A throwaway certificate authority.
pub struct TestCa {
    /// The CA certificate, PEM: what a client or server must trust.
    pub pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed CA called `common_name`.
    ///
    /// # Panics
    ///
    /// When rcgen fails (not expected).
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2999, 1, 1);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A server certificate for `names` (IP addresses or DNS names).
    ///
    /// # Panics
    ///
    /// When rcgen fails (not expected).
    pub fn server(&self, names: &[&str]) -> Issued {
        self.issue(&IssueOptions {
            common_name: names.first().copied().unwrap_or("server").to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            ..IssueOptions::default()
        })
        .expect("issue a server certificate")
    }

    /// A client certificate with subject `CN=common_name` and an ECDSA P-256 key.
    ///
    /// # Panics
    ///
    /// When rcgen fails (not expected).
    pub fn client(&self, common_name: &str) -> Issued {
        self.issue(&IssueOptions {
            common_name: common_name.to_owned(),
            client: true,
            ..IssueOptions::default()
        })
        .expect("issue a client certificate")
    }

    /// Issues a certificate as `options` say.
    ///
    /// # Errors
    ///
    /// When the key does not parse or rcgen refuses the parameters.
    pub fn issue(&self, options: &IssueOptions) -> anyhow::Result<Issued> {
        let key = match &options.key_pem {
            Some(pem) => KeyPair::from_pem(pem).context("parse the subject key")?,
            None => KeyPair::generate()?,
        };
        let mut params = CertificateParams::new(options.names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, options.common_name.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if options.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let (y, m, d) = options.not_before;
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = options.not_after;
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Runs `openssl args…` with `input` on stdin and returns its stdout.
///
/// # Errors
///
/// When `openssl` is missing (run `tests/run`, which installs it) or fails.
pub fn openssl(args: &[&str], input: &str) -> anyhow::Result<String> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run openssl (install the Debian package openssl: `bash tests/run` does)")?;
    child
        .stdin
        .take()
        .context("openssl stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// A fresh 2048-bit RSA key, PKCS#8 PEM.
///
/// # Errors
///
/// As [`openssl`].
pub fn rsa_key_pkcs8() -> anyhow::Result<String> {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "",
    )
}

/// A PKCS#8 key PEM in its traditional format: PKCS#1 (`RSA PRIVATE KEY`) for RSA, SEC1
/// (`EC PRIVATE KEY`) for ECDSA.
///
/// # Errors
///
/// As [`openssl`].
pub fn traditional_key(pkcs8_pem: &str) -> anyhow::Result<String> {
    let out = openssl(&["pkey", "-traditional"], pkcs8_pem)?;
    if !out.contains("-----BEGIN RSA PRIVATE KEY-----")
        && !out.contains("-----BEGIN EC PRIVATE KEY-----")
    {
        bail!("openssl pkey -traditional wrote no PKCS#1 or SEC1 key");
    }
    Ok(out)
}
