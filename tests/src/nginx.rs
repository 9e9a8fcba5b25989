//! The real nginx (Debian package `nginx`, installed by `tests/run`) as an HTTPS upstream, with
//! or without mutual TLS (`ssl_verify_client on`).
//!
//! Each instance gets a generated configuration in its own scratch directory and runs in the
//! foreground (`-g 'daemon off;'`, errors to stderr) as a process group that is killed when it
//! is dropped. Every location answers `200` with a JSON body naming the client certificate nginx
//! saw:
//!
//! ```json
//! {"ok": true, "path": "/x", "client_verify": "SUCCESS", "client_subject": "CN=airlock-client"}
//! ```
//!
//! With `ssl_verify_client on`, nginx itself answers a request without a client certificate
//! with `400` and an HTML page saying "No required SSL certificate was sent", and one whose
//! certificate it does not trust with `400` "The SSL certificate error".

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::process::{Proc, ReadyOn, ScratchDir, Spawn};

/// nginx logs this (level `notice`) once its listening sockets are bound.
const READY_MARKER: &str = "start worker process";

/// How to start [`Nginx`].
#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// The server certificate (chain), PEM.
    pub cert_pem: String,
    /// The server key, PEM.
    pub key_pem: String,
    /// When set, `ssl_verify_client on` with this CA (PEM) as `ssl_client_certificate`.
    pub client_ca_pem: Option<String>,
}

/// A running nginx. Its process group is killed when dropped.
#[derive(Debug)]
pub struct Nginx {
    /// Bound address (127.0.0.1).
    pub addr: SocketAddr,
    /// Base URL without a trailing slash, e.g. `https://127.0.0.1:40125`.
    pub url: String,
    proc: Proc,
    _dir: ScratchDir,
}

/// The nginx binary: `/usr/sbin/nginx` (Debian), else `nginx` on `PATH`.
///
/// # Panics
///
/// When there is none: the tests that need nginx fail loudly rather than skip.
pub fn nginx_binary() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        return debian;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nginx not found (neither /usr/sbin/nginx nor on PATH): run `bash tests/run` once \
             (it installs the Debian package nginx), or `apt-get install nginx`"
        )
    })
}

impl Nginx {
    /// Starts nginx on 127.0.0.1 (a free port) with TLS as `options` say, and waits until it
    /// accepts TCP connections.
    ///
    /// # Errors
    ///
    /// When nginx exits (bad configuration, port taken) or is not ready within
    /// [`START_TIMEOUT`](crate::START_TIMEOUT); the error holds its log.
    ///
    /// # Panics
    ///
    /// When nginx is not installed (see [`nginx_binary`]).
    pub async fn start(options: NginxOptions) -> anyhow::Result<Nginx> {
        let program = nginx_binary();
        let dir = ScratchDir::new("nginx")?;
        let path = dir.path();
        std::fs::write(path.join("server.pem"), &options.cert_pem)?;
        crate::process::write_private(&path.join("server.key"), &options.key_pem)?;
        let client_auth = match &options.client_ca_pem {
            Some(ca) => {
                std::fs::write(path.join("client-ca.pem"), ca)?;
                "ssl_client_certificate client-ca.pem;\n        ssl_verify_client on;\n        \
                 ssl_verify_depth 3;"
            }
            None => "",
        };
        // nginx cannot report a port it bound itself (port 0): take a free one.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::free_port()));
        let config = format!(
            r#"worker_processes 1;
pid nginx.pid;
error_log stderr notice;
events {{
    worker_connections 256;
}}
http {{
    access_log access.log;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen {addr} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        {client_auth}
        location / {{
            default_type application/json;
            return 200 '{{"ok": true, "path": "$uri", "client_verify": "$ssl_client_verify", "client_subject": "$ssl_client_s_dn"}}';
        }}
    }}
}}
"#
        );
        std::fs::create_dir_all(path.join("tmp"))?;
        std::fs::write(path.join("nginx.conf"), config)?;
        let mut prefix = path.as_os_str().to_owned();
        prefix.push("/");
        let args: Vec<OsString> = vec![
            "-p".into(),
            prefix,
            "-c".into(),
            path.join("nginx.conf").into(),
            "-e".into(),
            "stderr".into(),
            "-g".into(),
            "daemon off;".into(),
        ];
        let spec = Spawn {
            name: "nginx",
            program: program.into_os_string(),
            args,
            netns: None,
            env: Vec::new(),
            current_dir: Some(path.to_path_buf()),
            log_path: path.join("nginx.log"),
            ready_on: ReadyOn::Stderr,
            process_group: true,
        };
        let (proc, ()) = Proc::spawn(
            spec,
            |line| line.contains(READY_MARKER).then_some(()),
            crate::START_TIMEOUT,
        )
        .await
        .context("start nginx")?;
        let nginx = Nginx {
            addr,
            url: format!("https://{addr}"),
            proc,
            _dir: dir,
        };
        let ready = crate::eventually(crate::START_TIMEOUT, || async move {
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .context("connect timed out")?
                .context("connect")?;
            Ok(())
        })
        .await;
        if let Err(error) = ready {
            bail!(
                "nginx does not accept connections: {error:#}\n{}",
                nginx.log()
            );
        }
        Ok(nginx)
    }

    /// nginx's error log (stderr) so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}
