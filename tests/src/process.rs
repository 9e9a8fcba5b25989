//! Child processes that announce readiness on a line of output, and their scratch directories.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::Netns;

/// Proxy variables removed from every child's environment: test traffic never goes through a
/// proxy.
const PROXY_VARIABLES: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// How many log lines a panicking test prints per process.
const LOG_TAIL_LINES: usize = 150;

/// A directory under `<workspace>/tmp/tests/`, removed on drop unless the thread is panicking.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
    remove: bool,
}

impl ScratchDir {
    pub(crate) fn new(prefix: &str) -> anyhow::Result<ScratchDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = crate::workspace_root()
            .join("tmp")
            .join("tests")
            .join(format!("{prefix}-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("clear {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(ScratchDir { path, remove: true })
    }

    /// A directory the caller owns: never removed.
    pub(crate) fn existing(path: PathBuf) -> anyhow::Result<ScratchDir> {
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(ScratchDir {
            path,
            remove: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.remove {
            return;
        }
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which output stream of a child carries its ready line.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReadyOn {
    Stdout,
    Stderr,
}

/// How to start a child process.
#[derive(Debug)]
pub(crate) struct Spawn {
    /// Shown in errors and log dumps ("relay", "agent", ...).
    pub name: &'static str,
    pub program: OsString,
    pub args: Vec<OsString>,
    pub netns: Option<String>,
    pub env: Vec<(String, String)>,
    pub current_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    pub ready_on: ReadyOn,
    /// Start the child in its own process group and signal the whole group (for programs that
    /// fork workers, like gunicorn).
    pub process_group: bool,
}

/// A running child process whose output goes to a log file.
#[derive(Debug)]
pub(crate) struct Proc {
    name: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
    process_group: bool,
}

impl Proc {
    /// Spawns the child and reads its `ready_on` stream until `ready` accepts a line.
    ///
    /// Every line read goes to the log file as well; after the ready line a task keeps copying
    /// the stream there, the other stream is written to the log file directly.
    pub(crate) async fn spawn<T>(
        spec: Spawn,
        mut ready: impl FnMut(&str) -> Option<T>,
        timeout: Duration,
    ) -> anyhow::Result<(Proc, T)> {
        let mut command = match &spec.netns {
            Some(ns) => {
                let prefix = Netns::exec_prefix(ns);
                let mut command = Command::new(&prefix[0]);
                command.args(&prefix[1..]).arg(&spec.program);
                command
            }
            None => Command::new(&spec.program),
        };
        command
            .args(&spec.args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for var in PROXY_VARIABLES {
            command.env_remove(var);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        if let Some(dir) = &spec.current_dir {
            command.current_dir(dir);
        }
        if spec.process_group {
            command.process_group(0);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .with_context(|| format!("open {}", spec.log_path.display()))?;
        let _ = writeln!(
            &log,
            "=== {} started: {:?} {:?}",
            spec.name, spec.program, spec.args
        );
        match spec.ready_on {
            ReadyOn::Stdout => command.stdout(Stdio::piped()).stderr(log.try_clone()?),
            ReadyOn::Stderr => command.stderr(Stdio::piped()).stdout(log.try_clone()?),
        };
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {} ({:?})", spec.name, spec.program))?;
        let mut proc = Proc {
            name: spec.name,
            child: None,
            log_path: spec.log_path.clone(),
            process_group: spec.process_group,
        };
        let stream: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match spec.ready_on {
            ReadyOn::Stdout => Box::new(child.stdout.take().expect("stdout is piped")),
            ReadyOn::Stderr => Box::new(child.stderr.take().expect("stderr is piped")),
        };
        proc.child = Some(child);

        let mut lines = BufReader::new(stream).lines();
        let deadline = tokio::time::Instant::now() + timeout;
        let value = loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let _ = writeln!(&log, "{line}");
                    if let Some(value) = ready(line.trim()) {
                        break value;
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let status = proc.wait_exit(Duration::from_secs(5)).await;
                    bail!(
                        "{} exited before it was ready ({}); log {}:\n{}",
                        spec.name,
                        status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|e| e.to_string()),
                        spec.log_path.display(),
                        log_tail(&spec.log_path, LOG_TAIL_LINES)
                    );
                }
                Err(_elapsed) => {
                    let _ = proc.kill().await;
                    bail!(
                        "{} printed no ready line within {timeout:?}; log {}:\n{}",
                        spec.name,
                        spec.log_path.display(),
                        log_tail(&spec.log_path, LOG_TAIL_LINES)
                    );
                }
            }
        };
        // Keep draining the stream so the child never blocks on a full pipe.
        let mut reader = lines.into_inner();
        tokio::spawn(async move {
            let mut log = tokio::fs::File::from_std(log);
            let _ = tokio::io::copy(&mut reader, &mut log).await;
        });
        Ok((proc, value))
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Sends `signal` to the child (or its process group).
    pub(crate) fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2)/killpg(2) take plain integers; the pid is our own unreaped child, so it
        // cannot have been recycled for another process.
        let rc = unsafe {
            if self.process_group {
                libc::killpg(pid, signal)
            } else {
                libc::kill(pid, signal)
            }
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {}", self.name));
        }
        Ok(())
    }

    /// SIGKILLs the child and reaps it. A child that already exited is only reaped.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if self.process_group {
            if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                // SAFETY: see `signal`.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
        }
        let _ = child.start_kill();
        child
            .wait()
            .await
            .with_context(|| format!("reap {}", self.name))?;
        Ok(())
    }

    /// Waits for the child to exit on its own.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| anyhow!("{} still running after {timeout:?}", self.name))??;
        self.child = None;
        Ok(status)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if self.process_group {
                if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                    // SAFETY: see `signal`.
                    unsafe { libc::killpg(pid, libc::SIGKILL) };
                }
            }
            // kill_on_drop also SIGKILLs the child; tokio reaps it in the background.
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log {} (last {LOG_TAIL_LINES} lines) ---\n{}--- end of {} log ---",
                self.name,
                self.log_path.display(),
                log_tail(&self.log_path, LOG_TAIL_LINES),
                self.name
            );
        }
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut out = all[start..].join("\n");
            out.push('\n');
            out
        }
        Err(e) => format!("(cannot read {}: {e})\n", path.display()),
    }
}

/// Writes `contents` to `path` with mode 0600.
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}
