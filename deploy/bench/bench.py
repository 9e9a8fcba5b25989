#!/usr/bin/env python3
"""Airlock side-by-side benchmark (issue 4). Started by deploy/bench/run; stdlib only.

Paths to one upstream nginx, all on loopback:
  direct        client -> upstream
  airlock       client -http-> relay (--dev-tls --plain-listen) <=wss= agent -> upstream (issue 4)
  airlock-tls   client -https-> relay (--dev-tls) <=wss= agent -> upstream
  airlock-ws    client -http-> relay (--no-tls) <=ws= agent -> upstream
  nginx-proxy   client -> nginx (proxy_pass, keepalive upstream pool) -> upstream
  rathole-tls   client -> rathole server <=TLS= rathole client -> upstream
  rathole-wss   client -> rathole server <=WebSocket over TLS= rathole client -> upstream

`airlock` is issue 4's topology; it needs a relay with `--plain-listen` (a plain-HTTP listener for
clients next to the TLS one for agents). Older relays lack it: the row is then left out and
airlock-tls and airlock-ws bracket it.
"""

import argparse
import atexit
import datetime as dt
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(BENCH))
RELEASE = os.path.join(ROOT, "target", "release")
# deploy/build-release's output (the profile-guided build we ship), passed on by deploy/bench/run.
AIRLOCK_BIN_DIR = os.environ.get("AIRLOCK_BIN_DIR") or RELEASE
RELAY_BIN = os.path.join(AIRLOCK_BIN_DIR, "airlock-relay")
AGENT_BIN = os.path.join(AIRLOCK_BIN_DIR, "airlock-agent")
SIM_BIN = os.path.join(RELEASE, "sim-agents")
RATHOLE_BIN = os.path.join(BENCH, ".tools", "bin", "rathole")
WRK_LUA = os.path.join(BENCH, "wrk-report.lua")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

ALL_PATHS = ["direct", "airlock", "airlock-tls", "airlock-ws", "nginx-proxy", "rathole-tls", "rathole-wss"]
AIRLOCK_PATHS = ("airlock", "airlock-tls", "airlock-ws")
PATHS = list(ALL_PATHS)  # narrowed by --paths and by what the relay supports

# figure id -> (label, unit, higher_is_better)
METRICS = [
    ("c1_rps", "small GET c1", "req/s", True),
    ("c64_rps", "small GET c64", "req/s", True),
    ("p50_ms", "p50 c1", "ms", False),
    ("p99_ms", "p99 c1", "ms", False),
    ("close_c16_rps", "new conn c16", "req/s", True),
    ("get1m_c4_rps", "1 MiB GET c4", "GET/s", True),
    ("dl100m_MBps", "100 MiB dl", "MB/s", True),
]

# Issue 4 targets: metric -> (comparison, value).
TARGETS = [
    ("c1_rps", ">=", 0.70),
    ("c64_rps", ">=", 0.45),
    ("p50_ms", "<=", 1.4),
    ("close_c16_rps", ">=", 0.50),
    ("get1m_c4_rps", ">=", 0.35),
    ("dl100m_MBps", ">=", 0.45),
]
RSS_TARGETS = {("relay", "idle"): 16, ("relay", "idle after load"): 16, ("relay", "c64"): 48,
               ("agent", "idle"): 12, ("agent", "idle after load"): 12, ("agent", "c64"): 48}
PER_AGENT_TARGET_KIB = 64
NOISY_PCT = 30


def log(msg):
    print(f"\033[1m==> {msg}\033[0m", file=sys.stderr, flush=True)


_PORTS_GIVEN = set()


def free_port():
    """A free loopback port not handed out before in this run: the kernel may give a port that
    was bound and released a moment ago to the next bind, so two calls could otherwise agree."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


# ---------------------------------------------------------------------------------------------
# processes


class Procs:
    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, env=None, cwd=None, stdin=None):
        out = open(os.path.join(self.logdir, f"{name}.out"), "ab")
        err = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd,
                             stdin=stdin if stdin is not None else subprocess.DEVNULL)
        p.bench_name = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p, timeout=5)


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = pred()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


def file_has(path, pattern):
    try:
        with open(path, errors="replace") as f:
            return re.search(pattern, f.read())
    except FileNotFoundError:
        return None


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return kids


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError):
        return 0


def ctx_switches(pid):
    """Voluntary + involuntary context switches of every thread of pid."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total


def system_cpu():
    """(busy, softirq) CPU seconds machine-wide, from /proc/stat. Softirq time is not charged to
    any process: over loopback it is mostly the bench's own packet processing."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TICK, v[6] / TICK


def system_busy_seconds():
    return system_cpu()[0]


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


class Sampler(threading.Thread):
    """Samples the RSS of every role's processes every 100 ms; keeps the maximum per role."""

    def __init__(self, roles):
        super().__init__(daemon=True)
        self.roles = roles
        self.peak = {r: 0 for r in roles}
        self.stop_evt = threading.Event()

    def sample(self):
        for role, pids in self.roles.items():
            self.peak[role] = max(self.peak[role], sum(rss_bytes(p) for p in pids))

    def run(self):
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(0.1)

    def finish(self):
        self.stop_evt.set()
        self.join()
        self.sample()
        return self.peak


def run_measured(argv, timeout):
    """Runs a load generator; returns (stdout, stderr, returncode, cpu seconds it used)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                p.returncode, ru.ru_utime + ru.ru_stime)


# ---------------------------------------------------------------------------------------------
# setup


NGINX_COMMON = """
daemon off;
master_process on;
{user}
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  {body}
}}
"""


def nginx_conf(d, body, workers="auto"):
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = NGINX_COMMON.format(dir=d, body=body, workers=workers, user=user)
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def make_files(www):
    os.makedirs(www, exist_ok=True)
    small = (b"airlock bench: a small body of about one hundred bytes, the same on every path. "
             b"0123456789abcdef\n")
    small = small[:100]
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(small)
    block = os.urandom(MIB)
    with open(os.path.join(www, "1m"), "wb") as f:
        f.write(block)
    with open(os.path.join(www, "100m"), "wb") as f:
        for i in range(100):
            f.write(block[i:] + block[:i])
    return {"small": small, "1m": hashlib.sha256(block).hexdigest()}


def throwaway_pki(d):
    """A throwaway CA and a localhost server identity (PEM + PKCS#12) for rathole."""
    os.makedirs(d, exist_ok=True)

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key")
    ossl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=airlock bench throwaway CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "srv.key")
    ossl("req", "-new", "-key", "srv.key", "-subj", "/CN=localhost", "-out", "srv.csr")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-out", "srv.pem", "-extfile", "ext.cnf")
    ossl("pkcs12", "-export", "-out", "identity.p12", "-inkey", "srv.key", "-in", "srv.pem",
         "-certfile", "ca.pem", "-passout", "pass:bench")
    return os.path.join(d, "ca.pem"), os.path.join(d, "identity.p12")


RATHOLE_SERVER = """
[server]
bind_addr = "127.0.0.1:{ctl}"
[server.transport]
type = "{type}"
{ws_server}
[server.transport.tls]
pkcs12 = "{p12}"
pkcs12_password = "bench"
[server.services.up]
token = "airlock-bench"
bind_addr = "127.0.0.1:{svc}"
"""

RATHOLE_CLIENT = """
[client]
remote_addr = "127.0.0.1:{ctl}"
[client.transport]
type = "{type}"
{ws_client}
[client.transport.tls]
trusted_root = "{ca}"
hostname = "localhost"
[client.services.up]
token = "airlock-bench"
local_addr = "127.0.0.1:{up}"
"""


def ssl_context(cafile):
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    return None


def http_get(url, headers, cafile=None, timeout=10):
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=ssl_context(cafile)) as r:
        return r.status, r.read()


class Path:
    def __init__(self, name, base, headers=None, cafile=None, roles=None, note=""):
        self.name = name
        self.base = base  # URL prefix; the file name is appended
        self.headers = headers or {}
        self.cafile = cafile
        self.roles = roles or {}  # role -> [pids]
        self.note = note

    def url(self, f):
        return self.base + f


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="airlock-bench-")
        os.chmod(self.work, 0o755)
        self.logdir = os.path.join(self.work, "logs")
        os.makedirs(self.logdir)
        self.procs = Procs(self.logdir)
        self.paths = {}
        self.upstream_pids = []
        self.notes = []
        self.quiet_budget = args.quiet_budget
        atexit.register(self.cleanup)

    def cleanup(self):
        self.procs.stop_all()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- upstream and paths ------------------------------------------------------------------

    def start_nginx(self, name, body, workers="auto"):
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        conf = nginx_conf(d, body, workers)
        p = self.procs.start(name, ["nginx", "-p", d, "-c", conf, "-e", os.path.join(d, "error.log")])
        wait_for(lambda: len(children(p.pid)) >= 1, 10, f"{name} workers")
        time.sleep(0.2)
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited; see {d}/error.log")
        return p

    def setup_upstream(self):
        www = os.path.join(self.work, "www")
        self.expect = make_files(www)
        self.up_port = free_port()
        body = f"""
  sendfile on; tcp_nopush on; tcp_nodelay on;
  server {{
    listen 127.0.0.1:{self.up_port} backlog=4096;
    location / {{ root {www}; }}
  }}"""
        p = self.start_nginx("upstream", body, self.args.upstream_workers)
        self.upstream_pids = [p.pid] + children(p.pid)
        self.paths["direct"] = Path("direct", f"http://127.0.0.1:{self.up_port}/")

    def setup_nginx_proxy(self):
        port = free_port()
        body = f"""
  upstream up {{ server 127.0.0.1:{self.up_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
        p = self.start_nginx("nginx-proxy", body, self.args.proxy_workers)
        self.paths["nginx-proxy"] = Path(
            "nginx-proxy", f"http://127.0.0.1:{port}/",
            roles={"nginx": [p.pid] + children(p.pid)},
            note=f"worker_processes {self.args.proxy_workers}, keepalive 64 to the upstream")

    def start_relay(self, name, data_dir, port, tls, plain_port=None):
        argv = [RELAY_BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
                "--dev-tls" if tls else "--no-tls"]
        if plain_port:
            argv += ["--plain-listen", f"127.0.0.1:{plain_port}"]
        p = self.procs.start(name, argv)
        out = os.path.join(self.logdir, f"{name}.out")
        want = 2 if plain_port else 1

        def up():
            try:
                with open(out, errors="replace") as f:
                    return p.poll() is not None or f.read().count("listening on") >= want
            except FileNotFoundError:
                return False
        wait_for(up, 60, f"{name} to listen")
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited; see {self.logdir}/{name}.log")
        return p

    def relay_env(self, scheme, port, data_dir):
        env = dict(os.environ)
        env["AIRLOCK_RELAY_URL"] = f"{scheme}://127.0.0.1:{port}"
        with open(os.path.join(data_dir, "admin-token")) as f:
            env["AIRLOCK_TOKEN"] = f.read().strip()
        ca = os.path.join(data_dir, "tls", "ca.pem")
        if scheme == "https":
            env["AIRLOCK_CA_FILE"] = ca
        return env

    def enrol_agent(self, env, name, group, token_file):
        out = subprocess.run([RELAY_BIN, "agents", "create", name, "--group", group], env=env,
                             check=True, capture_output=True, text=True).stdout
        token = json.loads(out)["token"]
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)

    def setup_airlock(self, name, mode):
        """mode: "spec" (clients over plain HTTP, agent over wss), "tls" (both TLS), "ws" (no TLS)."""
        tls = mode in ("spec", "tls")
        d = os.path.join(self.work, name)
        data = os.path.join(d, "relay")
        os.makedirs(d)
        port = free_port()
        plain_port = free_port() if mode == "spec" else None
        relay = self.start_relay(f"{name}-relay", data, port, tls, plain_port)
        scheme = "https" if tls else "http"
        env = self.relay_env(scheme, port, data)
        token_file = os.path.join(d, "agent-token")
        self.enrol_agent(env, "bench-agent", "bench", token_file)
        conn = {
            "name": "bench",
            "base_url": f"http://127.0.0.1:{self.up_port}",
            "auth": {"type": "none"},
            "network": {"private": True, "agent_group": "bench"},
            "test_request": {"method": "GET", "path": "/small"},
        }
        conn_file = os.path.join(d, "conn.json")
        with open(conn_file, "w") as f:
            json.dump(conn, f)
        subprocess.run([RELAY_BIN, "connections", "create", "--from-file", conn_file], env=env,
                       check=True, capture_output=True, text=True)
        ca = os.path.join(data, "tls", "ca.pem") if tls else None
        argv = [AGENT_BIN, "run", "--relay-url", f"{'wss' if tls else 'ws'}://127.0.0.1:{port}",
                "--token-file", token_file, "--allow", f"127.0.0.1:{self.up_port}"]
        if ca:
            argv += ["--ca-file", ca]
        agent = self.procs.start(f"{name}-agent", argv)
        base = (f"http://127.0.0.1:{plain_port}" if plain_port else f"{scheme}://127.0.0.1:{port}")
        self.paths[name] = Path(
            name, base + "/v1/connections/bench/proxy/",
            headers={"Authorization": "Bearer " + env["AIRLOCK_TOKEN"]},
            cafile=None if plain_port else ca,
            roles={"relay": [relay.pid], "agent": [agent.pid]},
            note={"spec": "client -http-> relay (--plain-listen), relay <=wss= agent (issue 4's topology)",
                  "tls": "client -https-> relay (dev TLS), relay <=wss= agent",
                  "ws": "client -http-> relay (--no-tls), relay <=ws (no TLS)= agent"}[mode])

    def setup_rathole(self, name, ws):
        d = os.path.join(self.work, name)
        os.makedirs(d)
        ca, p12 = self.pki
        ctl, svc = free_port(), free_port()
        kind = "websocket" if ws else "tls"
        server_conf = RATHOLE_SERVER.format(
            ctl=ctl, svc=svc, type=kind, p12=p12,
            ws_server="[server.transport.websocket]\ntls = true" if ws else "")
        client_conf = RATHOLE_CLIENT.format(
            ctl=ctl, up=self.up_port, type=kind, ca=ca,
            ws_client="[client.transport.websocket]\ntls = true" if ws else "")
        for fname, text in (("server.toml", server_conf), ("client.toml", client_conf)):
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
        env = dict(os.environ, RUST_LOG="warn")
        server = self.procs.start(f"{name}-server", [RATHOLE_BIN, "--server", os.path.join(d, "server.toml")], env=env)
        time.sleep(0.2)
        client = self.procs.start(f"{name}-client", [RATHOLE_BIN, "--client", os.path.join(d, "client.toml")], env=env)
        self.paths[name] = Path(
            name, f"http://127.0.0.1:{svc}/",
            roles={"rathole-server": [server.pid], "rathole-client": [client.pid]},
            note=f"rathole 0.5 transport={kind}" + (" (tls=true)" if ws else ""))

    def verify(self, path):
        def ok():
            st, body = http_get(path.url("small"), path.headers, path.cafile, timeout=5)
            return st == 200 and body == self.expect["small"]
        wait_for(ok, 60, f"{path.name}: GET small through the path", interval=0.25)
        st, body = http_get(path.url("1m"), path.headers, path.cafile)
        if st != 200 or hashlib.sha256(body).hexdigest() != self.expect["1m"]:
            raise RuntimeError(f"{path.name}: 1 MiB body differs")

    def setup(self):
        log(f"work directory {self.work}")
        self.setup_upstream()
        if "nginx-proxy" in PATHS:
            self.setup_nginx_proxy()
        self.pki = throwaway_pki(os.path.join(self.work, "pki"))
        modes = {"airlock": "spec", "airlock-tls": "tls", "airlock-ws": "ws"}
        for name in PATHS:
            if name in modes:
                self.setup_airlock(name, modes[name])
            elif name.startswith("rathole-"):
                self.setup_rathole(name, name == "rathole-wss")
        for name in PATHS:
            self.verify(self.paths[name])
            log(f"path ready: {name:12} {self.paths[name].base}")

    # -- measurements --------------------------------------------------------------------------

    def wait_quiet(self):
        """Waits (within a per-run and a total budget) until other jobs leave the CPUs alone."""
        t0 = time.time()
        while True:
            b0 = system_busy_seconds()
            time.sleep(0.3)
            busy = (system_busy_seconds() - b0) / 0.3
            waited = time.time() - t0
            if busy < self.args.quiet_cores or waited > 5 or self.quiet_budget - waited <= 0:
                break
        self.quiet_budget -= time.time() - t0
        return busy

    def measure(self, path, figure, argv, timeout):
        busy_before = self.wait_quiet() if figure not in ("warmup", "profile") else None
        roles = path.roles
        fwd_pids = [p for pids in roles.values() for p in pids]
        cpu0 = {p: cpu_seconds(p) for p in fwd_pids + self.upstream_pids}
        cs0 = sum(ctx_switches(p) for p in fwd_pids)
        sampler = Sampler(roles)
        sampler.start()
        busy0, soft0 = system_cpu()
        t0 = time.time()
        out, err, rc, cpu_gen = run_measured(argv, timeout)
        wall = time.time() - t0
        busy1, soft1 = system_cpu()
        busy, softirq = busy1 - busy0, soft1 - soft0
        peak = sampler.finish()
        cpu_fwd = sum(cpu_seconds(p) - cpu0[p] for p in fwd_pids)
        ctxsw = sum(ctx_switches(p) for p in fwd_pids) - cs0
        cpu_up = sum(cpu_seconds(p) - cpu0[p] for p in self.upstream_pids)
        # Everything else on the machine (other jobs, this script, kernel threads), softirq time
        # (network processing) excluded: a busy neighbour makes every figure of that run unreliable.
        cpu_other = max(0.0, busy - softirq - cpu_gen - cpu_fwd - cpu_up)
        rec = {"path": path.name, "figure": figure, "wall_s": round(wall, 3),
               "cpu_loadgen_s": round(cpu_gen, 3), "cpu_forwarders_s": round(cpu_fwd, 3),
               "cpu_upstream_s": round(cpu_up, 3), "cpu_other_s": round(cpu_other, 3),
               "cpu_softirq_s": round(softirq, 3),
               "forwarders_ctx_switches": ctxsw,
               "busy_cores_before": None if busy_before is None else round(busy_before, 2),
               "rss_peak_bytes": peak, "rc": rc}
        return rec, out, err

    def wrk(self, path, figure, file, conns, threads, close=False):
        argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{self.args.duration}s", "--timeout", "10s",
                "-s", WRK_LUA]
        for k, v in path.headers.items():
            argv += ["-H", f"{k}: {v}"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(path.url(file))
        rec, out, err = self.measure(path, figure, argv, self.args.duration + 30)
        m = re.search(r"BENCHJSON (\{.*\})", out)
        if not m:
            rec["error"] = f"wrk failed (rc {rec['rc']}): {err.strip() or out.strip()}"[:500]
            return rec
        w = json.loads(m.group(1))
        rec["wrk"] = w
        secs = w["duration_us"] / 1e6
        rec["rps"] = w["requests"] / secs if secs else 0.0
        errors = {k[4:]: v for k, v in w.items() if k.startswith("err_") and v}
        if errors:
            rec["errors"] = errors
        return rec

    def download(self, path):
        argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
                "--max-time", "120"]
        for k, v in path.headers.items():
            argv += ["-H", f"{k}: {v}"]
        if path.cafile:
            argv += ["--cacert", path.cafile]
        argv.append(path.url("100m"))
        rec, out, err = self.measure(path, "dl100m", argv, 130)
        try:
            code, size, speed = out.split()
            rec["http_code"], rec["size"] = int(code), int(size)
            rec["MBps"] = float(speed) / 1e6
            if rec["http_code"] != 200 or rec["size"] != 100 * MIB:
                rec["errors"] = {"status_or_size": f"{code} {size}"}
        except ValueError:
            rec["error"] = f"curl failed (rc {rec['rc']}): {err.strip()}"[:500]
        return rec

    def figure_runs(self):
        return [
            ("small_c1", lambda p: self.wrk(p, "small_c1", "small", 1, 1)),
            ("small_c64", lambda p: self.wrk(p, "small_c64", "small", 64, 2)),
            ("close_c16", lambda p: self.wrk(p, "close_c16", "small", 16, 2, close=True)),
            ("get1m_c4", lambda p: self.wrk(p, "get1m_c4", "1m", 4, 2)),
            ("dl100m", self.download),
        ]

    def idle_rss(self):
        out = {}
        for name, path in self.paths.items():
            out[name] = {role: sum(rss_bytes(p) for p in pids) for role, pids in path.roles.items()}
        return out

    def run_rounds(self):
        # Warm-up: every path briefly under load (connection pools, allocator arenas), then rest.
        idle_cold = self.idle_rss()
        log("warm-up (1 s of c64 on every path)")
        saved = self.args.duration
        self.args.duration = 1
        for name in PATHS:
            self.wrk(self.paths[name], "warmup", "small", 64, 2)
        self.args.duration = saved
        time.sleep(1.0)
        idle = self.idle_rss()
        runs = []
        figures = self.figure_runs()
        for r in range(self.args.rounds):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            for fig, fn in figures:
                for name in order:
                    rec = fn(self.paths[name])
                    rec["round"] = r
                    runs.append(rec)
                    log(f"round {r + 1}/{self.args.rounds} {fig:10} {name:12} {summarise_run(rec)}")
        return idle_cold, idle, runs

    def profile(self, names, seconds=6):
        """perf record (DWARF call graphs) of each Airlock relay and agent under c64 load."""
        reports = {}
        if not shutil.which("perf"):
            self.notes.append("perf not installed: no profile")
            return reports
        for name in names:
            path = self.paths[name]
            for role, pids in path.roles.items():
                data = os.path.join(self.work, f"perf-{name}-{role}.data")
                rec = subprocess.Popen(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384",
                                        "-o", data, "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                saved = self.args.duration
                self.args.duration = seconds + 1
                self.wrk(path, "profile", "small", 64, 2)
                self.args.duration = saved
                _, perr = rec.communicate()
                rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                                      "--sort", "dso,sym", "--percent-limit", "0"],
                                     capture_output=True, text=True)
                rows = parse_perf(rep.stdout)
                text = [f"--- {name} {role} under c64 small GETs: self time by component"]
                if not rows:
                    text.append((perr.decode(errors="replace") + rep.stderr).strip()[:2000])
                for cat, share in categorise(rows):
                    text.append(f"  {share:5.1f}%  {cat}")
                text.append(f"--- {name} {role}: top symbols (self)")
                text += [f"  {pc:5.2f}%  {dso:18} {sym}"[:150] for pc, dso, sym in rows[:25]]
                inc = subprocess.run(["perf", "report", "-i", data, "--stdio", "--children", "-g", "none",
                                      "--sort", "sym", "--percent-limit", "2"], capture_output=True, text=True)
                text.append(f"--- {name} {role}: inclusive time of Airlock/hyper/rustls/tungstenite/reqwest/bincode frames")
                for line in inc.stdout.splitlines():
                    if line.startswith("#") or "(inlined)" in line:
                        continue
                    if re.search(r"airlock|hyper::|rustls::|tungstenite|reqwest|bincode|tracing::|malloc|memmove|tcp_sendmsg|tcp_recvmsg|futex|epoll", line):
                        text.append("  " + line.strip()[:150])
                reports[f"{name}/{role}"] = "\n".join(text)
                os.unlink(data)
        return reports


def parse_perf(text):
    """(percent, dso, symbol) rows of `perf report --stdio --sort dso,sym`."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), f"[{m.group(3)}] {m.group(4).strip()}"))
    return rows


PERF_CATEGORIES = [
    ("kernel: scheduler, wake-ups, futex, epoll",
     r"^\[k\].*(finish_task_switch|schedule|spin_unlock_irq|futex|wake_up|ttwu|select_task_rq|enqueue|dequeue|update_curr|pick_next|ep_poll|switch_to|psi_|__wake|ep_|sched|idle|cpuidle|hrtimer)"),
    ("kernel: TCP/IP over loopback, copies to/from sockets",
     r"^\[k\].*(tcp|ip_|ipv4|skb|net_|netif|sock|__dev|loopback|_copy_|copy_user|csum|inet|sk_|rep_movs|memcpy|clear_user|__x64_sys_(send|recv|write|read))"),
    ("kernel: other (syscall entry/exit, memory management, ...)", r"^\[k\]"),
    ("malloc/free", r"(malloc|free|_int_|unlink_chunk|consolidate|realloc|calloc|tcache|alloc::alloc|__rdl_|__rust_alloc|__rust_dealloc)"),
    ("memcpy/memmove/memset", r"(memmove|memcpy|memset|memcmp)"),
    ("TLS (rustls, ring)", r"(rustls|ring::|ring_core|aes|gcm|chacha|poly1305|sha256|sha2|GFp)"),
    ("WebSocket (tungstenite)", r"tungstenite"),
    ("bincode/serde", r"(bincode|serde)"),
    ("HTTP (hyper, reqwest, http, url)", r"(hyper|reqwest|h2::|http::|httparse|url::|headers)"),
    ("axum/tower", r"(axum|tower)"),
    ("tracing", r"tracing"),
    ("tokio runtime, mio", r"(tokio|mio::)"),
    ("Airlock binary: Airlock code and inlined generic code", r"airlock"),
    ("other", r""),
]


def categorise(rows):
    totals = {}
    for pc, dso, sym in rows:
        for cat, pattern in PERF_CATEGORIES:
            if re.search(pattern, sym) or (cat.startswith("Airlock binary") and dso.startswith("airlock")):
                totals[cat] = totals.get(cat, 0) + pc
                break
    return sorted(totals.items(), key=lambda kv: -kv[1])


def summarise_run(rec):
    if "error" in rec:
        return "ERROR " + rec["error"]
    if rec["figure"] == "dl100m":
        s = f"{rec.get('MBps', 0):9.1f} MB/s"
    else:
        s = f"{rec.get('rps', 0):9.0f} req/s"
        if rec["figure"] == "small_c1":
            s += f"  p50 {rec['wrk']['p50_us'] / 1000:.3f} ms p99 {rec['wrk']['p99_us'] / 1000:.3f} ms"
    s += (f"  cpu gen {rec['cpu_loadgen_s']:.2f}s fwd {rec['cpu_forwarders_s']:.2f}s"
          f" up {rec['cpu_upstream_s']:.2f}s other {rec['cpu_other_s']:.2f}s")
    if rec.get("errors"):
        s += f"  ERRORS {rec['errors']}"
    return s


# ---------------------------------------------------------------------------------------------
# aggregation and tables


def metric_value(rec, metric):
    if "error" in rec:
        return None
    if metric == "dl100m_MBps":
        return rec.get("MBps")
    w = rec.get("wrk", {})
    return {
        "c1_rps": rec.get("rps") if rec["figure"] == "small_c1" else None,
        "c64_rps": rec.get("rps") if rec["figure"] == "small_c64" else None,
        "p50_ms": w.get("p50_us", 0) / 1000 if rec["figure"] == "small_c1" else None,
        "p99_ms": w.get("p99_us", 0) / 1000 if rec["figure"] == "small_c1" else None,
        "close_c16_rps": rec.get("rps") if rec["figure"] == "close_c16" else None,
        "get1m_c4_rps": rec.get("rps") if rec["figure"] == "get1m_c4" else None,
    }.get(metric)


FIG_OF = {"c1_rps": "small_c1", "c64_rps": "small_c64", "p50_ms": "small_c1", "p99_ms": "small_c1",
          "close_c16_rps": "close_c16", "get1m_c4_rps": "get1m_c4", "dl100m_MBps": "dl100m"}


def aggregate(runs, rounds):
    by = {}
    for rec in runs:
        by.setdefault((rec["path"], rec["figure"], rec["round"]), rec)
    summary = {}
    for path in PATHS:
        summary[path] = {}
        for metric, _, _, _ in METRICS:
            fig = FIG_OF[metric]
            vals, ratios, errs, others = [], [], 0, []
            for r in range(rounds):
                rec = by.get((path, fig, r))
                d = by.get(("direct", fig, r))
                if not rec:
                    continue
                if rec.get("errors") or rec.get("error"):
                    errs += 1
                v = metric_value(rec, metric)
                dv = metric_value(d, metric) if d else None
                if v is None:
                    continue
                vals.append(v)
                others.append(100 * rec.get("cpu_other_s", 0) / (rec["wall_s"] or 1))
                if dv:
                    ratios.append(v / dv)
            summary[path][metric] = {
                "samples": vals,
                "median": statistics.median(vals) if vals else None,
                "spread_pct": (100 * (max(vals) - min(vals)) / 2 / statistics.median(vals)
                               if len(vals) > 1 and statistics.median(vals) else 0.0),
                "ratio_to_direct": statistics.median(ratios) if ratios else None,
                "ratio_samples": ratios,
                "runs_with_errors": errs,
                "other_cpu_pct_median": statistics.median(others) if others else None,
            }
    return summary


def cpu_summary(runs):
    out = {}
    for rec in runs:
        if rec["figure"] in ("warmup", "profile"):
            continue
        k = out.setdefault(rec["path"], {}).setdefault(rec["figure"], {"wall": 0, "gen": 0, "fwd": 0, "up": 0, "other": 0, "requests": 0, "ctxsw": 0})
        k["wall"] += rec["wall_s"]
        k["gen"] += rec["cpu_loadgen_s"]
        k["fwd"] += rec["cpu_forwarders_s"]
        k["up"] += rec["cpu_upstream_s"]
        k["other"] += rec.get("cpu_other_s", 0)
        k["ctxsw"] += rec.get("forwarders_ctx_switches", 0)
        k["requests"] += rec.get("wrk", {}).get("requests", 0) or (1 if rec["figure"] == "dl100m" else 0)
    res = {}
    for path, figs in out.items():
        res[path] = {}
        for fig, k in figs.items():
            wall = k["wall"] or 1
            res[path][fig] = {
                "loadgen_pct": 100 * k["gen"] / wall, "forwarders_pct": 100 * k["fwd"] / wall,
                "upstream_pct": 100 * k["up"] / wall, "other_pct": 100 * k["other"] / wall,
                "forwarders_cpu_us_per_request": (1e6 * k["fwd"] / k["requests"]) if k["requests"] and fig != "dl100m" else None,
                "forwarders_ctx_switches_per_request": (k["ctxsw"] / k["requests"]) if k["requests"] and fig != "dl100m" else None,
                "cpu_seconds": {"loadgen": round(k["gen"], 2), "forwarders": round(k["fwd"], 2),
                                "upstream": round(k["up"], 2), "other": round(k["other"], 2)},
                "wall_seconds": round(k["wall"], 2),
            }
    return res


def rss_summary(paths, idle_cold, idle, runs):
    res = {}
    for name in PATHS:
        roles = paths[name].roles
        res[name] = {}
        for role in roles:
            c64 = [r["rss_peak_bytes"].get(role, 0) for r in runs if r["path"] == name and r["figure"] == "small_c64"]
            allp = [r["rss_peak_bytes"].get(role, 0) for r in runs if r["path"] == name]
            res[name][role] = {
                "cold_idle_MiB": idle_cold[name][role] / MIB,
                "idle_MiB": idle[name][role] / MIB,
                "c64_MiB": (max(c64) / MIB) if c64 else None,
                "peak_any_MiB": (max(allp) / MIB) if allp else None,
            }
    return res


def fmt_num(v, metric):
    if v is None:
        return "n/a"
    if metric in ("p50_ms", "p99_ms"):
        return f"{v:.3f}"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def print_tables(summary, cpu, rss, paths, out=sys.stdout):
    w0 = 13
    cols = METRICS
    hdr = f"{'path':{w0}}" + "".join(f"{label:>17}" for _, label, _, _ in cols)
    units = f"{'':{w0}}" + "".join(f"{'(' + unit + ')':>17}" for _, _, unit, _ in cols)
    print("\nMedians over rounds (± half the min-max spread, % of median; ! = a run had errors;"
          f" ~ = other jobs used > {NOISY_PCT}% of a core during these runs)", file=out)
    print(hdr, file=out)
    print(units, file=out)
    for path in PATHS:
        row = f"{path:{w0}}"
        for metric, _, _, _ in cols:
            s = summary[path][metric]
            cell = fmt_num(s["median"], metric) + f" ±{s['spread_pct']:.0f}%"
            if s["runs_with_errors"]:
                cell += "!"
            if (s["other_cpu_pct_median"] or 0) > NOISY_PCT:
                cell += "~"
            row += f"{cell:>17}"
        print(row, file=out)
    print("\nRatios to direct (median of per-round ratios; req/s and MB/s: higher is better,"
          " latency: × direct, lower is better)", file=out)
    print(hdr, file=out)
    for path in PATHS:
        row = f"{path:{w0}}"
        for metric, _, _, better in cols:
            r = summary[path][metric]["ratio_to_direct"]
            cell = "n/a" if r is None else (f"{r:.2f}" if better else f"{r:.2f}×")
            row += f"{cell:>17}"
        print(row, file=out)

    print("\nRSS of the forwarding processes (MiB): idle after start / idle after warm-up /"
          " peak under c64 / peak in any figure", file=out)
    for path in PATHS:
        for role, v in rss[path].items():
            c64 = "n/a" if v["c64_MiB"] is None else f"{v['c64_MiB']:.1f}"
            peak = "n/a" if v["peak_any_MiB"] is None else f"{v['peak_any_MiB']:.1f}"
            print(f"  {path:12} {role:15} {v['cold_idle_MiB']:7.1f} {v['idle_MiB']:7.1f}"
                  f" {c64:>7} {peak:>7}", file=out)

    figs = ["small_c1", "small_c64", "close_c16", "get1m_c4", "dl100m"]
    print("\nCPU used during each figure, % of one core (the machine has "
          f"{os.cpu_count()}: {100 * os.cpu_count()}% = all): load generator / forwarders / upstream nginx /"
          " everything else on the machine except softirq (other jobs; high = unreliable figure)",
          file=out)
    print(f"{'path':{w0}}" + "".join(f"{f:>17}" for f in figs) + "   fwd CPU µs/req (c1, c64, close)", file=out)
    for path in PATHS:
        row = f"{path:{w0}}"
        for f in figs:
            c = cpu.get(path, {}).get(f)
            cell = "n/a" if not c else (f"{c['loadgen_pct']:.0f}/{c['forwarders_pct']:.0f}/"
                                        f"{c['upstream_pct']:.0f}/{c['other_pct']:.0f}")
            row += f"{cell:>17}"
        per = []
        for f in ("small_c1", "small_c64", "close_c16"):
            c = cpu.get(path, {}).get(f)
            per.append("-" if not c or c["forwarders_cpu_us_per_request"] is None or path == "direct"
                       else f"{c['forwarders_cpu_us_per_request']:.0f}")
        row += "   " + ", ".join(per)
        print(row, file=out)
    print("\nContext switches of the forwarding processes per request (all threads; c1, c64, new conn c16)", file=out)
    for path in PATHS[1:]:
        per = []
        for f in ("small_c1", "small_c64", "close_c16"):
            c = cpu.get(path, {}).get(f)
            v = c and c.get("forwarders_ctx_switches_per_request")
            per.append("-" if v is None else f"{v:.1f}")
        print(f"  {path:12} " + ", ".join(per), file=out)


def targets_check(summary, rss, agents):
    """Issue 4's targets, for both Airlock rows; each must also beat rathole-wss."""
    rows = []
    for metric, cmp, target in TARGETS:
        rat = summary["rathole-wss"][metric]["ratio_to_direct"] if "rathole-wss" in summary else None
        for path in [p for p in AIRLOCK_PATHS if p in summary]:
            r = summary[path][metric]["ratio_to_direct"]
            if r is None:
                continue
            meets = r >= target if cmp == ">=" else r <= target
            beats = rat is None or (r > rat if cmp == ">=" else r < rat)
            rows.append({"figure": metric, "path": path, "value": r, "target": f"{cmp} {target}",
                         "meets_target": meets, "rathole_wss": rat, "beats_rathole_wss": beats})
    for (role, when), limit in RSS_TARGETS.items():
        rat_role = "rathole-server" if role == "relay" else "rathole-client"
        key = {"idle": "cold_idle_MiB", "idle after load": "idle_MiB", "c64": "c64_MiB"}[when]
        rat = rss["rathole-wss"][rat_role][key] if "rathole-wss" in rss else None
        for path in [p for p in AIRLOCK_PATHS if p in rss]:
            v = rss[path][role][key]
            rows.append({"figure": f"{role} RSS {when} (MiB)", "path": path, "value": v,
                         "target": f"<= {limit}", "meets_target": v <= limit,
                         "rathole_wss": rat, "beats_rathole_wss": rat is None or v < rat})
    for a in agents or []:
        v = a["relay_rss_per_agent_KiB"]
        rows.append({"figure": f"relay RSS per idle agent, N={a['n']} (KiB)", "path": "relay (wss)",
                     "value": v, "target": f"<= {PER_AGENT_TARGET_KIB}" + ("" if a["n"] >= 10000 else " (target is for N=10,000)"),
                     "meets_target": v <= PER_AGENT_TARGET_KIB, "rathole_wss": None, "beats_rathole_wss": True})
    return rows


def print_targets(rows, out=sys.stdout):
    print("\nIssue 4 targets (ratios to direct; RSS in MiB). 'vs rathole-wss' = beats rathole's"
          " WebSocket-TLS figure in this run", file=out)
    print(f"  {'figure':36} {'path':12} {'value':>9} {'target':>14} {'rathole-wss':>12}  verdict", file=out)
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.2f}"
        rat = "-" if r["rathole_wss"] is None else f"{r['rathole_wss']:.2f}"
        verdict = ("ok" if r["meets_target"] else "MISSES target") + \
                  ("" if r["beats_rathole_wss"] else ", LOSES to rathole-wss")
        print(f"  {r['figure']:36} {r['path']:12} {v:>9} {r['target']:>14} {rat:>12}  {verdict}", file=out)


# ---------------------------------------------------------------------------------------------
# relay memory and reconnect bench (sim-agents)


class SimAgents:
    def __init__(self, bench, n, url, token_file, ca):
        self.bench = bench
        self.n = n
        argv = [SIM_BIN, "--relay-url", url, "--token-file", token_file, "--ca-file", ca,
                "-n", str(n), "--status-ms", "100", "--ramp-concurrency", str(bench.args.ramp)]
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(bench.logdir, f"sim-agents-{n}.log"), "ab"),
                                  text=True, bufsize=1)
        bench.procs.procs.append(self.p)
        self.status = {}
        self.report = None
        self.history = []
        self.cond = threading.Condition()
        threading.Thread(target=self.reader, daemon=True).start()

    def reader(self):
        for line in self.p.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if msg.get("event") == "status":
                    self.status = msg
                    self.history.append((msg["unix_ms"], msg["connected"], msg["failures_total"]))
                elif msg.get("event") == "report":
                    self.report = msg
                self.cond.notify_all()

    def wait(self, pred, timeout, what):
        deadline = time.time() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.time()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"sim-agents: timed out waiting for {what}; last status {self.status}")
                self.cond.wait(min(left, 0.5))
            return self.status

    def get_report(self):
        with self.cond:
            self.report = None
        self.p.stdin.write("report\n")
        self.p.stdin.flush()
        self.wait(lambda: self.report is not None, 30, "report")
        return self.report

    def stop(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        self.bench.procs.stop(self.p, timeout=10)


def histogram(values_ms, bins=12):
    if not values_ms:
        return []
    lo, hi = 0, max(values_ms)
    width = max(50, -(-hi // bins))  # ms, rounded up; at least 50 ms
    width = int(-(-width // 50) * 50)
    counts = {}
    for v in values_ms:
        counts[v // width] = counts.get(v // width, 0) + 1
    top = max(counts) if counts else 0
    return [{"from_ms": i * width, "to_ms": (i + 1) * width, "count": counts.get(i, 0)} for i in range(top + 1)]


def print_histogram(title, hist, total, out=sys.stderr):
    if title:
        print(f"    {title}", file=out)
    peak = max((h["count"] for h in hist), default=1) or 1
    for h in hist:
        bar = "#" * int(round(40 * h["count"] / peak))
        print(f"    {h['from_ms']:7d}-{h['to_ms']:<7d} ms {h['count']:6d} {100 * h['count'] / total:5.1f}% {bar}", file=out)


def tcp_ext():
    """Kernel TCP counters that show a thundering herd: listen-queue overflows and drops."""
    want = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop")
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return {k: d.get(k, 0) for k in want}
    return {}


def delta(a, b):
    return {k: b.get(k, 0) - a.get(k, 0) for k in b}


def pct(vals, p):
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def agents_bench(bench, n):
    log(f"agent memory bench: N = {n:,}")
    d = os.path.join(bench.work, f"agents-{n}")
    data = os.path.join(d, "relay")
    os.makedirs(d)
    port = free_port()
    relay = bench.start_relay(f"agents-{n}-relay", data, port, True)
    env = bench.relay_env("https", port, data)
    token_file = os.path.join(d, "agent-token")
    bench.enrol_agent(env, "sim", "sim", token_file)
    ca = os.path.join(data, "tls", "ca.pem")
    time.sleep(1.0)
    rss_idle = statistics.median([rss_bytes(relay.pid) for _ in range(5) if not time.sleep(0.1)])
    net0 = tcp_ext()
    sim = SimAgents(bench, n, f"wss://127.0.0.1:{port}", token_file, ca)
    t0 = time.time()
    cpu0 = cpu_seconds(relay.pid)
    st = sim.wait(lambda: sim.status.get("connected", 0) >= n, bench.args.agents_timeout, f"{n} agents connected")
    ramp_s = st["unix_ms"] / 1000 - t0
    ramp_cpu = cpu_seconds(relay.pid) - cpu0
    net_ramp = delta(net0, tcp_ext())
    time.sleep(3.0)
    samples = []
    for _ in range(10):
        samples.append(rss_bytes(relay.pid))
        time.sleep(0.1)
    rss_n = statistics.median(samples)
    per_agent = (rss_n - rss_idle) / n
    log(f"  {n:,} connected in {ramp_s:.1f} s (ramp {bench.args.ramp} handshakes in flight); relay RSS "
        f"{rss_idle / MIB:.1f} -> {rss_n / MIB:.1f} MiB = {per_agent / 1024:.1f} KiB per agent")

    # Kill the relay (as a crash would) and restart it on the same port and data directory.
    failures0 = sim.status.get("failures_total", 0)
    sessions0 = sim.status.get("sessions_total", 0)
    net1 = tcp_ext()
    t_kill = time.time()
    relay.kill()
    relay.wait()
    bench.procs.procs.remove(relay)
    # Restarted at once, as a supervisor would (systemd Restart=always).
    relay = bench.start_relay(f"agents-{n}-relay2", data, port, True)
    t_up = time.time()
    with sim.cond:
        gone = [h for h in sim.history if h[0] / 1000 >= t_kill and h[1] == 0]
    t_noticed = gone[0][0] / 1000 if gone else None
    cpu1 = cpu_seconds(relay.pid)
    # Every agent must have had a new session (the status line from before the kill still says
    # "all connected").
    st = sim.wait(lambda: sim.status.get("sessions_total", 0) >= sessions0 + n
                  and sim.status.get("connected", 0) >= n,
                  bench.args.agents_timeout, f"{n} agents reconnected")
    t_all = st["unix_ms"] / 1000
    reconnect_cpu = cpu_seconds(relay.pid) - cpu1
    net_reconnect = delta(net1, tcp_ext())
    rep = sim.get_report()
    downs, ups, attempts = rep["down_unix_ms"], rep["up_unix_ms"], rep["attempts"]
    since_down = [u - dn for u, dn in zip(ups, downs) if u and dn]
    since_up = [max(0, int(u - t_up * 1000)) for u in ups if u]
    time.sleep(2.0)
    rss_after = statistics.median([rss_bytes(relay.pid) for _ in range(5) if not time.sleep(0.1)])
    # Arrival rate: busiest 100 ms window after the restart, from the 100 ms status samples.
    peak_rate = 0
    with sim.cond:
        hist_status = [h for h in sim.history if h[0] / 1000 >= t_up]
    for (ta, ca_, _), (tb, cb, _) in zip(hist_status, hist_status[1:]):
        if tb > ta:
            peak_rate = max(peak_rate, (cb - ca_) * 1000 / (tb - ta))
    failures = sim.status.get("failures_total", 0) - failures0
    sim.stop()
    bench.procs.stop(relay)
    res = {
        "n": n,
        "relay_rss_idle_MiB": rss_idle / MIB,
        "relay_rss_with_n_MiB": rss_n / MIB,
        "relay_rss_per_agent_KiB": per_agent / 1024,
        "relay_rss_after_reconnect_MiB": rss_after / MIB,
        "initial_connect_s": ramp_s,
        "initial_connect_ramp_in_flight": bench.args.ramp,
        "initial_connect_relay_cpu_s": ramp_cpu,
        "relay_down_s": t_up - t_kill,
        "all_noticed_after_kill_s": None if t_noticed is None else t_noticed - t_kill,
        "all_reconnected_after_kill_s": t_all - t_kill,
        "all_reconnected_after_restart_s": t_all - t_up,
        "reconnect_relay_cpu_s": reconnect_cpu,
        "failed_attempts_during_outage": failures,
        "kernel_tcp_initial_connect": net_ramp,
        "kernel_tcp_reconnect": net_reconnect,
        "reconnect_ms_since_disconnect": {"p50": pct(since_down, 50), "p90": pct(since_down, 90),
                                          "p99": pct(since_down, 99), "max": max(since_down, default=None)},
        "attempts_per_agent": {"p50": pct(attempts, 50), "max": max(attempts, default=None)},
        "peak_reconnects_per_s_100ms_window": peak_rate,
        "hist_reconnect_since_disconnect_ms": histogram(since_down),
        "hist_reconnect_since_restart_ms": histogram(since_up),
    }
    print_agents(res)
    return res


def print_agents(a, out=sys.stderr):
    print(f"  N={a['n']:,}: relay RSS idle {a['relay_rss_idle_MiB']:.1f} MiB, with N {a['relay_rss_with_n_MiB']:.1f} MiB "
          f"-> {a['relay_rss_per_agent_KiB']:.1f} KiB per agent; initial connect {a['initial_connect_s']:.1f} s", file=out)
    print(f"  killed relay: back up after {a['relay_down_s']:.2f} s; all {a['n']:,} reconnected "
          f"{a['all_reconnected_after_restart_s']:.2f} s after the restart ({a['all_reconnected_after_kill_s']:.2f} s after the kill); "
          f"{a['failed_attempts_during_outage']:,} failed attempts; peak {a['peak_reconnects_per_s_100ms_window']:.0f} reconnects/s", file=out)
    print(f"  kernel TCP counters (machine-wide deltas): initial connect {a['kernel_tcp_initial_connect']}, "
          f"reconnect {a['kernel_tcp_reconnect']}", file=out)
    print_histogram("reconnected, ms after the agent saw the disconnect:", a["hist_reconnect_since_disconnect_ms"], a["n"], out)
    print_histogram("reconnected, ms after the relay was listening again:", a["hist_reconnect_since_restart_ms"], a["n"], out)


def print_agents_table(agents, out=sys.stdout):
    if not agents:
        return
    print("\nRelay memory and reconnect (sim-agents: N TLS WebSocket agent sessions, one token, one process)", file=out)
    print(f"  {'N':>7} {'idle MiB':>9} {'with N MiB':>11} {'KiB/agent':>10} {'connect N s':>12} {'relay down s':>13}"
          f" {'all back s*':>12} {'p50/p99 ms**':>14} {'peak/s':>8} {'failed':>8}", file=out)
    for a in agents:
        r = a["reconnect_ms_since_disconnect"]
        print(f"  {a['n']:>7,} {a['relay_rss_idle_MiB']:>9.1f} {a['relay_rss_with_n_MiB']:>11.1f} "
              f"{a['relay_rss_per_agent_KiB']:>10.1f} {a['initial_connect_s']:>12.1f} {a['relay_down_s']:>13.2f} "
              f"{a['all_reconnected_after_restart_s']:>12.2f} {str(r['p50']) + '/' + str(r['p99']):>14} "
              f"{a['peak_reconnects_per_s_100ms_window']:>8.0f} {a['failed_attempts_during_outage']:>8,}", file=out)
    print("  * after the restarted relay listened; ** time from each agent's disconnect to its new Welcome", file=out)
    for a in agents:
        print(f"  N={a['n']:,} reconnect histogram (ms after the relay listened again):", file=out)
        print_histogram("", a["hist_reconnect_since_restart_ms"], a["n"], out)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    ap.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 3)),
                    help="seconds per wrk run (default 3)")
    ap.add_argument("--agents", default=os.environ.get("BENCH_AGENTS", "1000,10000"),
                    help="comma-separated N for the relay memory bench; empty to skip")
    ap.add_argument("--only-agents", action="store_true", help="run only the relay memory bench")
    ap.add_argument("--skip-agents", action="store_true")
    ap.add_argument("--ramp", type=int, default=256, help="sim-agents: handshakes in flight for the first connect")
    ap.add_argument("--agents-timeout", type=float, default=240)
    ap.add_argument("--profile", action="store_true", help="perf-record the Airlock relay and agent under c64 load")
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help="comma-separated paths to measure (direct is always included)")
    ap.add_argument("--upstream-workers", default="auto")
    ap.add_argument("--proxy-workers", default="auto")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="before each run, wait (up to 5 s) until the machine uses fewer cores than this")
    ap.add_argument("--quiet-budget", type=float, default=90, help="total seconds to spend waiting for quiet")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--out", default=None, help="JSON result path (default deploy/bench/results/<timestamp>.json)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ns = [int(x) for x in args.agents.split(",") if x.strip()] if not args.skip_agents else []
    if ns and max(ns) * 1.2 + 1000 > resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        print(f"warning: open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} is low for "
              f"{max(ns)} agents", file=sys.stderr)

    wanted = ["direct"] + [p.strip() for p in args.paths.split(",") if p.strip() and p.strip() != "direct"]
    unknown = [p for p in wanted if p not in ALL_PATHS]
    if unknown:
        ap.error(f"unknown paths {unknown}; known: {ALL_PATHS}")
    notes = []
    if "airlock" in wanted:
        helptext = subprocess.run([RELAY_BIN, "serve", "--help"], capture_output=True, text=True).stdout
        if "--plain-listen" not in helptext:
            wanted.remove("airlock")
            notes.append("this relay has no --plain-listen: issue 4's topology (client -> relay over plain "
                         "HTTP, agent over TLS) is not measured; airlock-tls and airlock-ws bracket it")
    PATHS[:] = [p for p in ALL_PATHS if p in wanted]

    started = time.time()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    bench = Bench(args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))

    result = {"timestamp": stamp, "host": machine_info(), "config": vars(args), "notes": []}
    summary = cpu = rss = None
    agents = []
    if not args.only_agents:
        bench.setup()
        idle_cold, idle, runs = bench.run_rounds()
        summary = aggregate(runs, args.rounds)
        cpu = cpu_summary(runs)
        rss = rss_summary(bench.paths, idle_cold, idle, runs)
        result.update({
            "paths": {n: {"url": p.base, "roles": list(p.roles), "note": p.note} for n, p in bench.paths.items()},
            "summary": summary, "cpu": cpu, "rss": rss, "runs": runs,
        })
        if args.profile:
            log("profiling the Airlock relay and agent under c64 (perf record --call-graph dwarf)")
            result["profiles"] = bench.profile([p for p in ("airlock", "airlock-ws") if p in PATHS])
        # The HTTP paths are no longer needed; free the cores for the agents bench.
        bench.procs.stop_all()
    for n in ns:
        agents.append(agents_bench(bench, n))
    result["agents"] = agents
    result["wall_time_s"] = time.time() - started
    result["notes"] = notes + bench.notes + [
        "airlock = issue 4's topology (client -> relay over plain HTTP via --plain-listen, relay <-> agent "
        "over TLS WebSocket); airlock-tls = TLS on both legs (new-connection figure includes a client TLS "
        "handshake per request); airlock-ws = no TLS anywhere.",
        "Ratios are medians of per-round ratios (path / direct measured in the same round).",
        "RSS of nginx-proxy is master + workers summed; shared pages are counted once per process.",
    ]

    if summary:
        print_tables(summary, cpu, rss, bench.paths)
    print_agents_table(agents)
    if summary:
        rows = targets_check(summary, rss, agents)
        result["targets"] = rows
        print_targets(rows)
    out = args.out or os.path.join(BENCH, "results", f"{stamp}.json")
    if result.get("profiles"):
        prof = out[:-5] + "-perf.txt" if out.endswith(".json") else out + "-perf.txt"
        with open(prof, "w") as f:
            f.write("\n\n".join(result["profiles"].values()) + "\n")
        print(f"\nperf profiles of the relay and agent under c64: {prof}")
    print(f"\nwall time {result['wall_time_s']:.0f} s; machine: {result['host']['cpus']} CPUs, {result['host']['model']}")
    print(f"Airlock binaries: {AIRLOCK_BIN_DIR} ({result['host']['airlock_build']} build)")
    for n in result["notes"]:
        print("note: " + n)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {out}")


def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def ver(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
            return " ".join((r.stdout + r.stderr).split())[:120]
        except OSError:
            return None
    return {"cpus": os.cpu_count(), "model": model, "loadavg_at_start": os.getloadavg(), "kernel": os.uname().release,
            "nginx": ver(["nginx", "-v"]), "wrk": ver(["wrk", "-v"])[:40], "curl": ver(["curl", "--version"])[:40],
            "rathole": ver([RATHOLE_BIN, "--version"]),
            "airlock_commit": ver(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
            "airlock_build": airlock_build(),
            # The binaries are built from the working tree: say which sources differ from HEAD.
            "airlock_uncommitted": ver(["git", "-C", ROOT, "status", "--porcelain", "--", "shared", "relay", "agent"])}


def airlock_build():
    """'pgo' or 'plain' as deploy/build-release recorded it; 'unknown' for other binaries."""
    try:
        with open(os.path.join(AIRLOCK_BIN_DIR, "BUILD")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
