//! The real httpbin app (PyPI `httpbin` 0.10, served by gunicorn) as an upstream.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::process::{Proc, ReadyOn, ScratchDir, Spawn};
use crate::Netns;

/// What gunicorn logs once it has bound its socket: `Listening at: http://IP:PORT (PID)`.
const READY_MARKER: &str = "Listening at: ";

/// How to start [`Httpbin`].
#[derive(Clone, Debug)]
pub struct HttpbinOptions {
    /// Address to bind (port 0: gunicorn reports the port it got); default 127.0.0.1.
    pub bind_ip: IpAddr,
    /// Network namespace to run in; default the test's own.
    pub netns: Option<String>,
    /// gunicorn worker processes (`-w`); default 2.
    pub workers: u32,
    /// Threads per worker (`--threads`, gthread worker); default 32.
    pub threads: u32,
}

impl Default for HttpbinOptions {
    fn default() -> Self {
        HttpbinOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
            workers: 2,
            threads: 32,
        }
    }
}

/// A running httpbin. Its gunicorn process group is killed when dropped.
#[derive(Debug)]
pub struct Httpbin {
    /// Bound address.
    pub addr: SocketAddr,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:40125`.
    pub url: String,
    proc: Proc,
    _dir: ScratchDir,
}

/// The virtualenv holding httpbin and gunicorn: `$AIRLOCK_TEST_VENV`, else `<workspace>/.venv`.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("AIRLOCK_TEST_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::workspace_root().join(".venv"),
    }
}

impl Httpbin {
    /// Starts httpbin on 127.0.0.1 (a free port) and waits until `GET /get` answers 200.
    ///
    /// # Errors
    ///
    /// As [`start_with`](Self::start_with).
    ///
    /// # Panics
    ///
    /// When the virtualenv has no gunicorn: run `tests/run`, which creates it.
    pub async fn start() -> anyhow::Result<Httpbin> {
        Httpbin::start_with(HttpbinOptions::default()).await
    }

    /// Starts httpbin with `options` and waits (at most [`START_TIMEOUT`](crate::START_TIMEOUT))
    /// until `GET /get` answers 200 from inside its namespace.
    ///
    /// # Errors
    ///
    /// When gunicorn exits or does not answer in time (the error holds its log).
    ///
    /// # Panics
    ///
    /// When the virtualenv has no gunicorn: run `tests/run`, which creates it.
    pub async fn start_with(options: HttpbinOptions) -> anyhow::Result<Httpbin> {
        let venv = venv_dir();
        let gunicorn = venv.join("bin").join("gunicorn");
        assert!(
            gunicorn.is_file(),
            "{} not found: run `bash tests/run` once (it creates the virtualenv with httpbin and \
             gunicorn), or point AIRLOCK_TEST_VENV at one",
            gunicorn.display()
        );
        let dir = ScratchDir::new("httpbin")?;
        let bind = SocketAddr::new(options.bind_ip, 0);
        let args: Vec<OsString> = vec![
            "-b".into(),
            bind.to_string().into(),
            "-w".into(),
            options.workers.to_string().into(),
            "-k".into(),
            "gthread".into(),
            "--threads".into(),
            options.threads.to_string().into(),
            "--log-level".into(),
            "info".into(),
            "httpbin:app".into(),
        ];
        let spec = Spawn {
            name: "httpbin",
            program: gunicorn.into_os_string(),
            args,
            netns: options.netns.clone(),
            // gunicorn >= 24 puts a control socket under $HOME; keep each instance's apart.
            env: vec![("HOME".to_owned(), dir.path().display().to_string())],
            current_dir: Some(dir.path().to_path_buf()),
            log_path: dir.path().join("httpbin.log"),
            ready_on: ReadyOn::Stderr,
            process_group: true,
        };
        let deadline = tokio::time::Instant::now() + crate::START_TIMEOUT;
        let (proc, url) = Proc::spawn(
            spec,
            |line| {
                let rest = &line[line.find(READY_MARKER)? + READY_MARKER.len()..];
                rest.split_whitespace().next().map(str::to_owned)
            },
            crate::START_TIMEOUT,
        )
        .await?;
        let addr = crate::parse_socket_addr(&url)?;
        let httpbin = Httpbin {
            addr,
            url: url.trim_end_matches('/').to_owned(),
            proc,
            _dir: dir,
        };
        // The master binds before the workers import the app: wait for a real answer.
        let netns = options.netns.as_deref();
        let ready = crate::eventually(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
            || async move {
                let status = Netns::http_status_in(netns, addr, "/get", Duration::from_secs(5))
                    .await
                    .context("GET /get")?;
                if status != 200 {
                    bail!("GET /get answered {status}");
                }
                Ok(())
            },
        )
        .await;
        if let Err(error) = ready {
            bail!("httpbin did not answer: {error:#}\n{}", httpbin.log());
        }
        Ok(httpbin)
    }

    /// `{url}{path}`, `path` starting with `/`.
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// gunicorn's log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}
