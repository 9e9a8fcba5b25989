#!/usr/bin/env bash
# Airlock quickstart: one command, on a fresh machine, runs the main job end to end.
#
#   bash deploy/quickstart.sh
#
# 1. builds airlock-relay and airlock-agent (release);
# 2. starts httpbin (PyPI) from a venv on 127.0.0.1 as the *private app*;
# 3. starts the relay with development TLS and the embedded SQLite store;
# 4. enrols an agent in group "dc1" and starts it, allowed to reach only httpbin;
# 5. defines a private connection "httpbin" with basic auth, runs its test request and a
#    proxied call to /basic-auth/{user}/{password}, and prints both and a ready-to-paste curl line;
# 6. keeps everything running until Ctrl-C, then stops it all.
#
# Environment: AIRLOCK_QUICKSTART_PORT (relay port, default 8443), AIRLOCK_QUICKSTART_DIR
# (state, default ./tmp/quickstart).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${AIRLOCK_QUICKSTART_DIR:-$root/tmp/quickstart}"
port="${AIRLOCK_QUICKSTART_PORT:-8443}"
venv="${AIRLOCK_TEST_VENV:-$root/.venv}"
mkdir -p "$work"
pids=()

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
cleanup() {
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        say "stopping"
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# Waits until file $1 contains a line matching $2 (at most $3 seconds); prints that line.
wait_line() {
    local file=$1 pattern=$2 secs=${3:-60} i
    for ((i = 0; i < secs * 10; i++)); do
        if grep -m1 -E "$pattern" "$file" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for '$pattern' in $file" >&2
    tail -n 30 "$file" >&2 || true
    return 1
}

say "building airlock-relay and airlock-agent (release)"
cargo build --release --quiet -p airlock-relay -p airlock-agent
relay_bin="$root/target/release/airlock-relay"
agent_bin="$root/target/release/airlock-agent"

say "preparing httpbin in $venv"
if ! /usr/bin/env python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import httpbin, gunicorn' 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'httpbin==0.10.*' 'gunicorn>=22'

say "starting httpbin (the private app) on 127.0.0.1"
# --graceful-timeout: on Ctrl-C, a worker holding the agent's idle keep-alive connection would
# otherwise wait gunicorn's default 30 s and then be SIGKILLed (with a scary log line).
HOME="$work" "$venv/bin/gunicorn" -b 127.0.0.1:0 -w 2 -k gthread --threads 16 --graceful-timeout 2 \
    --chdir "$work" httpbin:app >"$work/httpbin.log" 2>&1 &
pids+=($!)
app_addr=$(wait_line "$work/httpbin.log" 'Listening at: http://' 30 | sed -E 's#.*Listening at: http://([0-9.:]+).*#\1#')
echo "    httpbin at http://$app_addr"

say "starting the relay on https://127.0.0.1:$port (dev TLS, SQLite in $work/relay)"
"$relay_bin" serve --listen "127.0.0.1:$port" --data-dir "$work/relay" --dev-tls \
    >"$work/relay.out" 2>"$work/relay.log" &
pids+=($!)
wait_line "$work/relay.out" 'listening on' 60 | sed 's/^/    /'
export AIRLOCK_RELAY_URL="https://127.0.0.1:$port"
export AIRLOCK_TOKEN
AIRLOCK_TOKEN="$(cat "$work/relay/admin-token")"
export AIRLOCK_CA_FILE="$work/relay/tls/ca.pem"

say "enrolling an agent in group dc1"
# A re-run revokes the agent an earlier run enrolled, so the list does not fill up.
"$relay_bin" agents list 2>/dev/null | awk '$2 == "quickstart-agent" && $4 != "revoked" {print $1}' \
    | while read -r old; do "$relay_bin" agents revoke "$old" >/dev/null 2>&1 || true; done
agent_json=$("$relay_bin" agents create quickstart-agent --group dc1 2>/dev/null)
python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$agent_json" >"$work/agent-token"
chmod 600 "$work/agent-token"
agent_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$agent_json")
echo "    agent $agent_id"

say "starting the agent (dials out to the relay; may call only $app_addr)"
"$agent_bin" run --relay-url "wss://127.0.0.1:$port" --token-file "$work/agent-token" \
    --ca-file "$AIRLOCK_CA_FILE" --allow "$app_addr" >"$work/agent.out" 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 1 100); do
    if "$relay_bin" agents list 2>/dev/null | grep -q online; then break; fi
    sleep 0.1
done
"$relay_bin" agents list | sed 's/^/    /'

say "defining the private connection 'httpbin' (basic auth user:passwd, via group dc1)"
umask 077 # the definition holds a password
cat >"$work/httpbin-connection.json" <<JSON
{
  "name": "httpbin",
  "base_url": "http://$app_addr",
  "auth": {"type": "basic", "username": "user", "password": "passwd"},
  "network": {"private": true, "agent_group": "dc1"},
  "test_request": {"method": "GET", "path": "/basic-auth/user/passwd"}
}
JSON
"$relay_bin" connections delete httpbin >/dev/null 2>&1 || true
"$relay_bin" connections create --from-file "$work/httpbin-connection.json" >/dev/null
echo "    created"

say "test request (GET /basic-auth/user/passwd through the agent)"
"$relay_bin" connections test httpbin 2>&1 | sed 's/^/    /'

say "proxied call: GET /v1/connections/httpbin/proxy/basic-auth/user/passwd"
status=$(curl -sS -o "$work/proxied.json" -w '%{http_code}' --cacert "$AIRLOCK_CA_FILE" \
    -H "Authorization: Bearer $AIRLOCK_TOKEN" \
    "$AIRLOCK_RELAY_URL/v1/connections/httpbin/proxy/basic-auth/user/passwd")
echo "    HTTP $status"
sed 's/^/    /' "$work/proxied.json"
echo
if [[ "$status" != 200 ]]; then
    echo "error: the proxied call answered $status, not 200; see $work/{relay,agent}.log" >&2
    exit 1
fi

say "ready. Try it yourself:"
cat <<CURL
    curl -sS --cacert $AIRLOCK_CA_FILE \\
         -H "Authorization: Bearer \$(cat $work/relay/admin-token)" \\
         '$AIRLOCK_RELAY_URL/v1/connections/httpbin/proxy/anything?hello=world'

Logs: $work/{relay,agent,httpbin}.log (stdout: {relay,agent}.out)   Press Ctrl-C to stop everything.
CURL
wait
