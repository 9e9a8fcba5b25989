//! Network namespaces that make "behind the firewall" real.
//!
//! ```text
//!  root namespace (test, relay)        namespace A (agent)              namespace P (private app)
//!  alkXr 10.213.X.1/30  ◀── veth ──▶  alkXa 10.213.X.2/30
//!                                      alkXb 10.213.X.5/30  ◀── veth ──▶ alkXp 10.213.X.6/30
//!  route: unreachable 10.213.X.4/30
//! ```
//!
//! A reaches the root namespace (the relay listens on 10.213.X.1) and P; P reaches only A; the
//! root namespace cannot reach P: its `unreachable` route makes a connection attempt fail at
//! once (EHOSTUNREACH) instead of leaving through the default route. A keeps `ip_forward` off, so
//! it never routes between the root namespace and P. No namespace has a default route.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{AgentOptions, HttpbinOptions, RelayOptions, UpstreamOptions};

/// Where `ip netns add` mounts namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// A pair of network namespaces, A ("agent side") and P ("private app"), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    slot: u8,
    agent_ns: String,
    private_ns: String,
    root_veth: String,
}

/// A TCP stream opened from inside a namespace (usable as a normal tokio stream).
pub type NetnsStream = tokio::net::TcpStream;

impl Netns {
    /// Whether namespaces can be made here: running as root, `ip` installed, and creating a
    /// namespace with a veth pair works. Checked once per process.
    ///
    /// # Errors
    ///
    /// The reason, for tests to print as `SKIP: <reason>` (see
    /// [`require_netns!`](crate::require_netns)).
    pub fn available() -> Result<(), String> {
        static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
        AVAILABLE.get_or_init(probe).clone()
    }

    /// Creates the two namespaces, their veth pairs, addresses and the root `unreachable` route.
    ///
    /// The slot X (third octet of 10.213.X.0) is picked from the process id, skipping slots
    /// whose addresses or routes already exist; claiming it is atomic across processes because
    /// the root-side veth name `alkXr` can exist only once. Leftovers of test processes that no
    /// longer exist are removed first.
    ///
    /// # Errors
    ///
    /// When an `ip` command fails or no slot is free.
    pub fn create() -> anyhow::Result<Netns> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Netns::available().map_err(|reason| anyhow::anyhow!("network namespaces: {reason}"))?;
        remove_stale();
        let pid = std::process::id();
        let start = pid
            .wrapping_mul(7)
            .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
        for offset in 0..256u32 {
            let slot = ((start.wrapping_add(offset)) % 256) as u8;
            let in_use = format!("10.213.{slot}.");
            let addrs = output("ip", &["-4", "addr"])? + &output("ip", &["-4", "route"])?;
            if addrs.contains(&in_use) {
                continue;
            }
            let root_veth = format!("alk{slot}r");
            let claimed = Command::new("ip")
                .args(["link", "add", &root_veth, "type", "veth", "peer", "name"])
                .arg(format!("alk{slot}a"))
                .output()
                .context("run ip")?;
            if !claimed.status.success() {
                continue;
            }
            let netns = Netns {
                slot,
                agent_ns: format!("airlock-{pid}-{slot}-a"),
                private_ns: format!("airlock-{pid}-{slot}-p"),
                root_veth,
            };
            // On error `netns` is dropped, which removes whatever was made.
            netns.setup()?;
            return Ok(netns);
        }
        bail!("no free 10.213.X.0/29 slot for network namespaces")
    }

    fn setup(&self) -> anyhow::Result<()> {
        let x = self.slot;
        let (a, p) = (self.agent_ns.as_str(), self.private_ns.as_str());
        let (ra, ab, bp) = (format!("alk{x}a"), format!("alk{x}b"), format!("alk{x}p"));
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", p])?;
        ip(&["link", "set", &ra, "netns", a])?;
        ip(&[
            "addr",
            "add",
            &format!("10.213.{x}.1/30"),
            "dev",
            &self.root_veth,
        ])?;
        ip(&["link", "set", &self.root_veth, "up"])?;
        ip(&["-n", a, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            &format!("10.213.{x}.2/30"),
            "dev",
            &ra,
        ])?;
        ip(&["-n", a, "link", "set", &ra, "up"])?;
        ip(&[
            "-n", a, "link", "add", &ab, "type", "veth", "peer", "name", &bp, "netns", p,
        ])?;
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            &format!("10.213.{x}.5/30"),
            "dev",
            &ab,
        ])?;
        ip(&["-n", a, "link", "set", &ab, "up"])?;
        ip(&["-n", p, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            p,
            "addr",
            "add",
            &format!("10.213.{x}.6/30"),
            "dev",
            &bp,
        ])?;
        ip(&["-n", p, "link", "set", &bp, "up"])?;
        ip(&["route", "add", "unreachable", &format!("10.213.{x}.4/30")])?;
        // New namespaces start with forwarding off; make sure, whatever the host's sysctls say.
        let forwarding = Command::new("ip")
            .args(["netns", "exec", a, "sh", "-c"])
            .arg("echo 0 > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward")
            .output()
            .context("run ip netns exec")?;
        if String::from_utf8_lossy(&forwarding.stdout).trim() != "0" {
            bail!("cannot turn ip_forward off in {a}: {forwarding:?}");
        }
        Ok(())
    }

    /// The `ip netns exec NAME` argv prefix that runs a program inside namespace `name`.
    pub fn exec_prefix(name: &str) -> Vec<String> {
        ["ip", "netns", "exec", name].map(str::to_owned).to_vec()
    }

    /// A `tokio::process::Command` running `program` inside namespace `name`.
    pub fn command(name: &str, program: &str) -> tokio::process::Command {
        let prefix = Netns::exec_prefix(name);
        let mut command = tokio::process::Command::new(&prefix[0]);
        command.args(&prefix[1..]).arg(program).kill_on_drop(true);
        command
    }

    /// Name of namespace A, where agents run.
    pub fn agent_ns(&self) -> &str {
        &self.agent_ns
    }

    /// Name of namespace P, where the private app runs.
    pub fn private_ns(&self) -> &str {
        &self.private_ns
    }

    /// 10.213.X.1: the root namespace's end of the link to A (a relay A can reach listens here).
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot, 1)
    }

    /// 10.213.X.2: A's end of the link to the root namespace (reachable from the test).
    pub fn agent_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot, 2)
    }

    /// 10.213.X.5: A's end of the link to P.
    pub fn agent_private_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot, 5)
    }

    /// 10.213.X.6: P's address, reachable only from A.
    pub fn private_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.slot, 6)
    }

    /// Relay options for a relay in the root namespace that agents in A can reach: listens on
    /// [`root_ip`](Self::root_ip), port 0.
    pub fn relay_options(&self) -> RelayOptions {
        RelayOptions {
            listen: format!("{}:0", self.root_ip()),
            ..RelayOptions::default()
        }
    }

    /// Agent options for an agent inside A whose metrics the test can read (they listen on
    /// [`agent_ip`](Self::agent_ip), port 0).
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            netns: Some(self.agent_ns.clone()),
            metrics_listen: format!("{}:0", self.agent_ip()),
            ..AgentOptions::default()
        }
    }

    /// Httpbin options for an httpbin inside P on [`private_ip`](Self::private_ip).
    pub fn httpbin_options(&self) -> HttpbinOptions {
        HttpbinOptions {
            netns: Some(self.private_ns.clone()),
            bind_ip: self.private_ip().into(),
            ..HttpbinOptions::default()
        }
    }

    /// Upstream options for an in-process [`Upstream`](crate::Upstream) whose socket lives in P.
    pub fn upstream_options(&self) -> UpstreamOptions {
        UpstreamOptions {
            netns: Some(self.private_ns.clone()),
            bind_ip: self.private_ip().into(),
        }
    }

    /// Opens a TCP connection to `addr` from inside namespace `name` (or the test's own when
    /// `None`). The socket is made on a short-lived thread that entered the namespace, so the
    /// test's other threads stay where they are.
    ///
    /// # Errors
    ///
    /// Connect failures and timeouts; failing to enter the namespace.
    pub async fn connect_in(
        name: Option<&str>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<NetnsStream> {
        let stream = match name {
            None => tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??,
            Some(name) => {
                let std_stream = run_in(name, move || {
                    let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
                    stream.set_nonblocking(true)?;
                    Ok(stream)
                })
                .await?;
                tokio::net::TcpStream::from_std(std_stream)?
            }
        };
        Ok(stream)
    }

    /// Binds a TCP listener on `addr` inside namespace `name` (or the test's own when `None`);
    /// the listener stays in that namespace whichever thread uses it.
    ///
    /// # Errors
    ///
    /// Bind failures; failing to enter the namespace.
    pub async fn bind_in(
        name: Option<&str>,
        addr: SocketAddr,
    ) -> io::Result<std::net::TcpListener> {
        let listener = match name {
            None => std::net::TcpListener::bind(addr)?,
            Some(name) => run_in(name, move || std::net::TcpListener::bind(addr)).await?,
        };
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// `GET path` over plain HTTP/1.1 from inside namespace `name`; returns the status code.
    ///
    /// # Errors
    ///
    /// Connect or I/O failures, a response that is not HTTP, all bounded by `timeout`.
    pub async fn http_status_in(
        name: Option<&str>,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> io::Result<u16> {
        let attempt = async {
            let mut stream = Netns::connect_in(name, addr, timeout).await?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(2).any(|w| w == b"\r\n") {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&head);
            head.split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("not HTTP: {head:?}"))
                })
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP probe timed out"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep a namespace alive after its name is deleted; deleting the
        // root-side veth at once frees the slot anyway.
        let _ = ip(&["netns", "del", &self.agent_ns]);
        let _ = ip(&["netns", "del", &self.private_ns]);
        let _ = ip(&["link", "del", &self.root_veth]);
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            &format!("10.213.{}.4/30", self.slot),
        ]);
    }
}

/// Runs `f` on a fresh thread that entered namespace `name`; the thread ends afterwards, so no
/// pooled thread is ever left inside a namespace.
fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> impl Future<Output = io::Result<T>> {
    let path = format!("{NETNS_DIR}/{name}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let file = File::open(&path)?;
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread ends right after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })();
        let _ = tx.send(result);
    });
    async move {
        rx.await
            .map_err(|_| io::Error::other("namespace thread panicked"))?
    }
}

fn probe() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network namespaces need root".to_owned());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("`ip` (iproute2) is not installed".to_owned());
    }
    let name = format!("airlock-probe-{}", std::process::id());
    let _ = ip(&["netns", "del", &name]);
    let result = ip(&["netns", "add", &name])
        .and_then(|()| {
            ip(&[
                "-n", &name, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
            ])
        })
        .map_err(|e| format!("cannot create a network namespace with a veth pair: {e:#}"));
    let _ = ip(&["netns", "del", &name]);
    result
}

/// Deletes namespaces `airlock-PID-X-{a,p}` (and slot X's root veth and route) whose process is
/// gone, e.g. after a test binary was killed.
fn remove_stale() {
    let Ok(list) = output("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let parts: Vec<&str> = name.split('-').collect();
        let [prefix, pid, slot, side] = parts[..] else {
            continue;
        };
        let (Ok(pid), Ok(slot)) = (pid.parse::<u32>(), slot.parse::<u8>()) else {
            continue;
        };
        if prefix != "airlock" || !matches!(side, "a" | "p") {
            continue;
        }
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", &format!("alk{slot}r")]);
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            &format!("10.213.{slot}.4/30"),
        ]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Returns early from a test (printing `SKIP: <reason>`) when network namespaces are not
/// available. Without an argument it `return`s `()`; with one it returns that value:
///
/// ```ignore
/// #[tokio::test]
/// async fn agent_reaches_private_app() -> anyhow::Result<()> {
///     airlock_tests::require_netns!(Ok(()));
///     let netns = Netns::create()?;
///     // …
/// }
/// ```
#[macro_export]
macro_rules! require_netns {
    () => {
        $crate::require_netns!(())
    };
    ($ret:expr) => {
        if let Err(reason) = $crate::Netns::available() {
            eprintln!("SKIP: {reason}");
            return $ret;
        }
    };
}
