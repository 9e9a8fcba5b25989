#!/usr/bin/env python3
"""Training load for the profile-guided release build (deploy/build-release).

    pgo-train.py BIN_DIR WORK_DIR

WORK_DIR gets a fresh run-* directory (relay data, logs) on every run.

Runs the instrumented airlock-relay and airlock-agent from BIN_DIR through the product's main
job and stops both with SIGTERM, so that each writes its execution profile on exit (where
LLVM_PROFILE_FILE points). The load is the kind of traffic the tunnel carries, not the benchmark:

- a private app of its own (Python's standard-library HTTP/1.1 server on 127.0.0.1, a free port):
  small and 1 MiB bodies, a 16 MiB download, a chunked body, an echo for uploads, a 404;
- two private connections (Basic auth, RFC 7617, and a header credential) with their test
  requests;
- proxied requests over the relay's plain and TLS listeners, keep-alive and a new connection per
  request, one and eight at a time; GETs, HEADs and POST uploads with and without a length.

Every answer is checked (status, length, echoed bytes); a request that fails with an exception
counts as wrong too. A wrong answer, a process that does not start or exits early, or one that does
not exit with status 0 within 20 s of SIGTERM ends the script with status 1 and a message, so that
deploy/build-release never builds from a broken training. The run's directory (relay data with its
throwaway tokens, logs) is removed after a good run and kept after a failed one. Standard library
only; loopback only.
"""

import http.client
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import shutil
import tempfile
import threading
import time
import traceback

SMALL = b"x" * 100
ONE_MIB = bytes(range(256)) * 4096
BIG_LEN = 16 * 1024 * 1024


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


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: without TCP_NODELAY the body waits for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, status, body, ctype="application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.endswith("/small"):
            self._send(200, SMALL, "text/plain")
        elif path.endswith("/1m"):
            self._send(200, ONE_MIB)
        elif path.endswith("/big"):
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_LEN))
            self.end_headers()
            if self.command != "HEAD":
                chunk = ONE_MIB[: 64 * 1024]
                for _ in range(BIG_LEN // len(chunk)):
                    self.wfile.write(chunk)
        elif path.endswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(16):
                part = ONE_MIB[:4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path.endswith("/auth"):
            ok = self.headers.get("Authorization", "").startswith("Basic ") or self.headers.get("X-Api-Key")
            self._send(200 if ok else 401, b'{"ok": true}' if ok else b"{}", "application/json")
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(200, bytes(body))


def fail(message):
    sys.exit(f"pgo-train: {message}")


def wait_for(pred, what, procs, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        for name, p, log in procs:
            if p.poll() is not None:
                fail(f"{name} exited with status {p.returncode} before {what}; see {log}")
        time.sleep(0.1)
    fail(f"{what} did not happen within {timeout} s")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    bin_dir, work = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    for b in ("airlock-relay", "airlock-agent"):
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            fail(f"no executable {b} in {bin_dir}")
    try:
        os.makedirs(work, exist_ok=True)
        work = tempfile.mkdtemp(prefix="run-", dir=work)  # a fresh relay data directory every time
    except OSError as e:
        fail(f"cannot create a work directory under {work}: {e.strerror}")
    app_port, tls_port, plain_port = free_port(), free_port(), free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    relay_log = open(os.path.join(work, "relay.log"), "w")
    relay = subprocess.Popen(
        [f"{bin_dir}/airlock-relay", "serve", "--dev-tls", "--listen", f"127.0.0.1:{tls_port}",
         "--plain-listen", f"127.0.0.1:{plain_port}", "--data-dir", f"{work}/relay"],
        stdout=relay_log, stderr=subprocess.STDOUT)
    procs = [("the relay", relay, relay_log.name)]
    ok = False
    try:
        wait_for(lambda: "listening on http://" in open(relay_log.name).read(), "the relay listened", procs)
        token = open(f"{work}/relay/admin-token").read().strip()
        env = dict(os.environ, AIRLOCK_RELAY_URL=f"https://127.0.0.1:{tls_port}",
                   AIRLOCK_CA_FILE=f"{work}/relay/tls/ca.pem", AIRLOCK_TOKEN=token)
        cli = f"{bin_dir}/airlock-relay"
        out = subprocess.run([cli, "agents", "create", "train", "--group", "train"], env=env,
                             capture_output=True)
        if out.returncode != 0:
            fail(f"'airlock-relay agents create' failed: {out.stderr.decode(errors='replace')[-300:]}")
        out = out.stdout
        with open(f"{work}/agent-token", "w") as f:
            f.write(json.loads(out)["token"])
        os.chmod(f"{work}/agent-token", 0o600)
        base = f"http://127.0.0.1:{app_port}/api"
        defs = [
            {"name": "basic", "base_url": base, "auth": {"type": "basic", "username": "svc", "password": "pw"},
             "network": {"private": True, "agent_group": "train"}, "test_request": {"method": "GET", "path": "/auth"}},
            {"name": "header", "base_url": base,
             "auth": {"type": "header", "headers": [{"name": "X-Api-Key", "value": "k", "secret": True}]},
             "network": {"private": True, "agent_group": "train"}, "test_request": {"method": "GET", "path": "/auth"}},
        ]
        for d in defs:
            path = f"{work}/{d['name']}.json"
            with open(path, "w") as f:
                json.dump(d, f)
            out = subprocess.run([cli, "connections", "create", "--from-file", path], env=env,
                                 capture_output=True)
            if out.returncode != 0:
                fail(f"'airlock-relay connections create' failed: {out.stderr.decode(errors='replace')[-300:]}")
        agent_log = open(os.path.join(work, "agent.log"), "w")
        agent = subprocess.Popen(
            [f"{bin_dir}/airlock-agent", "run", "--relay-url", f"wss://127.0.0.1:{tls_port}",
             "--token-file", f"{work}/agent-token", "--ca-file", f"{work}/relay/tls/ca.pem",
             "--allow", f"127.0.0.1:{app_port}"], stdout=agent_log, stderr=subprocess.STDOUT)
        procs.append(("the agent", agent, agent_log.name))
        auth = {"Authorization": f"Bearer {token}"}

        def online():
            try:
                c = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=10)
                c.request("GET", "/v1/connections/basic/proxy/small", headers=auth)
                return c.getresponse().status == 200
            except OSError:
                return False

        wait_for(online, "the agent came online", procs)
        for name in ("basic", "header"):
            out = subprocess.run([cli, "connections", "test", name], env=env, capture_output=True)
            if out.returncode != 0:
                fail(f"test request of '{name}' failed: {out.stdout[-300:]!r}")

        tls = ssl.create_default_context(cafile=f"{work}/relay/tls/ca.pem")
        failures = []

        def check(conn, method, path, body=None, want=None, headers=None, status=200):
            h = dict(auth, **(headers or {}))
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            if r.status != status or (want is not None and data != want):
                failures.append(f"{method} {path}: {r.status}, {len(data)} bytes: {data[:200]!r}")

        def guarded(job, *args):
            """Runs one client; an exception (reset, refused, timeout) is a wrong answer."""
            try:
                job(*args)
            except Exception as e:  # noqa: BLE001 - every failure must count
                failures.append(f"{job.__name__}: {type(e).__name__}: {e}")
                if os.environ.get("PGO_TRAIN_DEBUG"):
                    traceback.print_exc()

        def client(n, tls_leg, keep_alive, name):
            def connect():
                if tls_leg:
                    return http.client.HTTPSConnection("127.0.0.1", tls_port, context=tls, timeout=60)
                return http.client.HTTPConnection("127.0.0.1", plain_port, timeout=60)

            conn = connect()
            p = f"/v1/connections/{name}/proxy"
            for i in range(n):
                if not keep_alive:
                    conn.close()
                    conn = connect()
                k = i % 20
                if k < 12:
                    check(conn, "GET", f"{p}/small?i={i}", want=SMALL)
                elif k < 14:
                    check(conn, "POST", f"{p}/echo", body=ONE_MIB[:4096], want=ONE_MIB[:4096])
                elif k == 14:
                    check(conn, "HEAD", f"{p}/small", want=b"")
                elif k == 15:
                    check(conn, "GET", f"{p}/chunked", want=ONE_MIB[:4096] * 16)
                elif k == 16:
                    check(conn, "GET", f"{p}/missing", status=404)
                elif k == 17:
                    check(conn, "GET", f"{p}/auth", want=b'{"ok": true}')
                elif k == 18 and i % 100 == 18:
                    check(conn, "GET", f"{p}/1m", want=ONE_MIB)
                else:
                    # An iterable body without a length goes out chunked (http.client).
                    check(conn, "POST", f"{p}/echo", body=iter([ONE_MIB[:8192]] * 4),
                          want=ONE_MIB[:8192] * 4)
            conn.close()

        def bulk():
            conn = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=120)
            for _ in range(20):
                check(conn, "GET", "/v1/connections/basic/proxy/1m", want=ONE_MIB)
                check(conn, "POST", "/v1/connections/header/proxy/echo", body=ONE_MIB, want=ONE_MIB)
            for _ in range(3):
                conn.request("GET", "/v1/connections/basic/proxy/big", headers=auth)
                r = conn.getresponse()
                n = 0
                while chunk := r.read(1 << 20):
                    n += len(chunk)
                if r.status != 200 or n != BIG_LEN:
                    failures.append(f"GET /big: {r.status}, {n} bytes")
            conn.close()

        def job(*args):
            return threading.Thread(target=guarded, args=args)

        jobs = [job(client, 3000, False, True, "basic")]
        jobs += [job(client, 600, False, True, "header") for _ in range(8)]
        jobs += [job(client, 300, False, False, "basic") for _ in range(2)]
        jobs += [job(client, 300, True, True, "header"), job(client, 100, True, False, "basic"), job(bulk)]
        started = time.time()
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()
        for name, p, log in procs:
            if p.poll() is not None:
                fail(f"{name} exited with status {p.returncode} during the load; see {log}")
        if failures:
            fail(f"{len(failures)} wrong answers, first: {failures[0]}")
        ok = True
        print(f"pgo-train: load done in {time.time() - started:.1f} s", file=sys.stderr)
    finally:
        for _, p, _ in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        stuck = []
        for name, p, log in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                stuck.append(name)
            # A profile is written at a clean exit only: anything else makes this training void.
            if ok and p.returncode != 0 and name not in stuck:
                ok = False
                print(f"pgo-train: {name} exited with status {p.returncode} after SIGTERM; see {log}",
                      file=sys.stderr)
        server.shutdown()
        if stuck:
            print(f"pgo-train: {' and '.join(stuck)} did not exit within 20 s of SIGTERM", file=sys.stderr)
            ok = False
    if not ok:
        fail(f"training failed; no usable profile (logs in {work})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
