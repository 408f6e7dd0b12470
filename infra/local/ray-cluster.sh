#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, with token authentication on: one head node plus
# RAY_WORKERS worker nodes, each a separate `ray start --block` process group, so that `stop`
# (or a test that removes a node) ends exactly the processes this script started and never
# another Ray running on the same machine.
#
#   infra/local/ray-cluster.sh start              # head + workers; prints the addresses
#   infra/local/ray-cluster.sh submit -- twotower nightly --logs DIR --root DIR --date D
#   infra/local/ray-cluster.sh status             # `ray status` of this cluster
#   eval "$(infra/local/ray-cluster.sh env)"      # RAY_ADDRESS + token for `ray`/`twotower`
#   infra/local/ray-cluster.sh stop               # SIGTERM each node's group, then SIGKILL
#
# Settings (environment): TWOTOWER_CLUSTER_DIR (state: pids, logs, token, Ray temp dir; keep
# it short, Unix socket paths are limited to ~100 characters), RAY_HEAD_PORT, RAY_DASHBOARD_PORT,
# RAY_CLIENT_PORT, RAY_AGENT_PORT_BASE (node i's dashboard agent listens on BASE + i),
# RAY_HEAD_CPUS, RAY_WORKER_CPUS, RAY_WORKERS, RAY_OBJECT_STORE_BYTES, RAY_BIN.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${TWOTOWER_CLUSTER_DIR:-/tmp/twotower-ray}"
HEAD_PORT="${RAY_HEAD_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10011}"
AGENT_PORT_BASE="${RAY_AGENT_PORT_BASE:-52400}"
HEAD_CPUS="${RAY_HEAD_CPUS:-2}"
WORKER_CPUS="${RAY_WORKER_CPUS:-2}"
WORKERS="${RAY_WORKERS:-1}"
OBJECT_STORE_BYTES="${RAY_OBJECT_STORE_BYTES:-300000000}"
RAY_BIN="${RAY_BIN:-ray}"
STARTUP_TIMEOUT_S="${RAY_STARTUP_TIMEOUT_S:-180}"
STOP_GRACE_S="${RAY_STOP_GRACE_S:-10}"

# Token auth: every node, driver and `ray job submit` reads the same token file. A token of our
# own (not ~/.ray/auth_token) keeps this cluster independent of any other Ray on the machine.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
unset RAY_AUTH_TOKEN
GCS_ADDRESS="127.0.0.1:$HEAD_PORT"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"

log() { echo "ray-cluster: $*" >&2; }

alive_nodes() {
  # Number of alive nodes as the GCS sees them (0 while the head is not up).
  "$RAY_BIN" status --address="$GCS_ADDRESS" 2>/dev/null \
    | awk '/^Active:/ {active=1; next} /^(Pending|Idle|Recent failures):/ {active=0} active && /node_/ {n++} END {print n+0}'
}

wait_for_nodes() {
  local want="$1" waited=0 pidfile
  until [ "$(alive_nodes)" -ge "$want" ]; do
    for pidfile in "$STATE"/*.pid; do
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "$(basename "$pidfile" .pid) exited during startup:"
        { grep -E "Exception|Error" "${pidfile%.pid}.log" | tail -n 3 || tail -n 5 "${pidfile%.pid}.log"; } >&2
        return 1
      fi
    done
    if [ "$waited" -ge "$STARTUP_TIMEOUT_S" ]; then
      log "timed out waiting for $want node(s); logs in $STATE/*.log"
      return 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
}

start_node() {
  # $1 = name; the rest = `ray start` arguments. setsid makes the node its own process group.
  local name="$1"
  shift
  setsid "$RAY_BIN" start --block --node-ip-address=127.0.0.1 --temp-dir="$STATE/ray" \
    --object-store-memory="$OBJECT_STORE_BYTES" "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

group_alive() {
  # Live (non-zombie) processes in process group $1.
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {n++} END {exit n ? 0 : 1}'
}

stop_group() {
  # SIGTERM to the `ray start --block` leader, which stops its node's processes in order;
  # whatever of the group is still alive after STOP_GRACE_S gets SIGKILL.
  local pidfile="$1" pid waited=0
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  while group_alive "$pid" && [ "$waited" -lt "$STOP_GRACE_S" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

cmd_start() {
  mkdir -p "$STATE"
  if [ -f "$STATE/head.pid" ] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
    log "already running (head pid $(cat "$STATE/head.pid")); stop it first"
    return 1
  fi
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
  fi
  # A node that fails to come up takes the others down with it: no half-started cluster.
  trap 'cmd_stop; exit 1' ERR
  start_node head --head --port="$HEAD_PORT" --num-cpus="$HEAD_CPUS" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT_BASE"
  wait_for_nodes 1
  local i
  for i in $(seq 1 "$WORKERS"); do
    start_node "worker-$i" --address="$GCS_ADDRESS" --num-cpus="$WORKER_CPUS" \
      --dashboard-agent-listen-port="$((AGENT_PORT_BASE + i))"
  done
  wait_for_nodes "$((WORKERS + 1))"
  trap - ERR
  log "up: $((WORKERS + 1)) nodes; GCS $GCS_ADDRESS, dashboard $DASHBOARD_URL"
  cmd_env
}

cmd_stop() {
  local pidfile
  for pidfile in "$STATE"/worker-*.pid "$STATE/head.pid"; do
    stop_group "$pidfile"
  done
  log "stopped"
}

cmd_env() {
  echo "export RAY_ADDRESS=$GCS_ADDRESS"
  echo "export RAY_DASHBOARD_ADDRESS=$DASHBOARD_URL"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
}

cmd_submit() {
  [ "${1:-}" = "--" ] && shift
  cd "$REPO"
  # Just after `start`, the head's job agent may not have registered yet, and the dashboard
  # refuses the job with "No available agent to submit job". Retry that refusal (only that)
  # for up to a minute; any other outcome, the job's own failure included, is returned as is.
  local attempt status output
  output="$(mktemp)"
  for attempt in $(seq 1 12); do
    set +e
    "$RAY_BIN" job submit --address="$DASHBOARD_URL" --working-dir=. -- "$@" 2>&1 | tee "$output"
    status="${PIPESTATUS[0]}"
    set -e
    if [ "$status" -eq 0 ] || ! grep -q "No available agent to submit job" "$output"; then
      break
    fi
    log "the head's job agent is not ready yet; retrying in 5 s ($attempt/12)"
    sleep 5
  done
  rm -f "$output"
  return "$status"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) "$RAY_BIN" status --address="$GCS_ADDRESS" ;;
  env) cmd_env ;;
  submit) shift; cmd_submit "$@" ;;
  *)
    echo "usage: $0 start|stop|status|env|submit -- COMMAND..." >&2
    exit 2
    ;;
esac
