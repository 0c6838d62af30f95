#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for a laptop or a CI box: a head that runs no work (like the
# production head, num-cpus 0) plus N worker nodes, each its own raylet with its own CPUs, its own
# custom resource `local_worker_<i>` (to pin work to a node in tests), and its own temp dir.
# On a laptop this exercises what a real cluster does: several nodes, per-node outputs in the
# report, the Jobs API on the dashboard port.
#
#   cluster/local-multinode.sh start [--workers N] [--cpus-per-worker C] [--gpus-per-worker G]
#                                    [--port P] [--dashboard-port D] [--state-dir DIR] [--auth MODE]
#   cluster/local-multinode.sh status [--state-dir DIR]
#   cluster/local-multinode.sh stop [--state-dir DIR]
#
#   invardiff submit generate --address http://127.0.0.1:8265 -- --classes 0-9 --per-class 8 --out ...
#
# Auth: token auth is on by default, as on a production cluster (cluster/README.md, "Security"): the
# token is ~/.ray/auth_token, created if missing; submit with RAY_AUTH_TOKEN_PATH=~/.ray/auth_token
# (or RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)). `--auth disabled` starts it without, for a machine
# whose network you trust and nobody else logs into.
#
# Addresses: every node is started with --node-ip-address=127.0.0.1 and the dashboard (Jobs API)
# listens on 127.0.0.1 only. Ray 2.60's `ray start` nevertheless registers nodes under the machine's
# routable IP (it rewrites loopback addresses so that other machines could join) and the GCS, raylet
# and worker ports listen on all interfaces: the token is what keeps others out. (Ray's single-machine
# mode, which the embedded Ray of `invardiff generate` uses to bind loopback only, refuses worker nodes.)
#
# --gpus-per-worker G advertises G *logical* GPUs per worker. Ray only counts them, so code that asks
# for num_gpus=1 schedules on a laptop; it still runs on the CPU.
#
# Every node runs under `ray start --block` in the background and its PID is recorded in the state
# dir. `stop` sends SIGTERM to exactly those PIDs, and each one tears down its own node. It never
# runs `ray stop`, which would also kill unrelated Ray instances on the same machine.
set -euo pipefail

workers=2
cpus_per_worker=1
gpus_per_worker=0
gcs_port=6379
dashboard_port=8265
# Short on purpose: Ray puts Unix sockets under the temp dir, and socket paths are limited to
# ~107 bytes, so a deep $TMPDIR (macOS) would break `ray start`.
state_dir=/tmp/invardiff-ray
# Seconds to wait for all nodes to register before giving up.
start_timeout=120
auth_mode=token

usage() {
  sed -n "8,11p" "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "local-multinode: $*" >&2
  exit 1
}

parse_options() {
  while [[ $# -gt 0 ]]; do
    [[ "$1" == -h || "$1" == --help || $# -ge 2 ]] || die "$1 needs a value"
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --cpus-per-worker) cpus_per_worker="$2"; shift 2 ;;
      --gpus-per-worker) gpus_per_worker="$2"; shift 2 ;;
      --port) gcs_port="$2"; shift 2 ;;
      --dashboard-port) dashboard_port="$2"; shift 2 ;;
      --state-dir) state_dir="$2"; shift 2 ;;
      --auth) auth_mode="$2"; shift 2 ;;
      -h|--help) usage 0 ;;
      *) echo "local-multinode: unknown option: $1" >&2; usage ;;
    esac
  done
  [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a non-negative integer, got '$workers'"
  [[ "$auth_mode" == disabled || "$auth_mode" == token ]] || die "--auth must be 'disabled' or 'token'"
}

# The nodes of this cluster, one PID file per node: head.pid, worker-1.pid, ...
pid_files() {
  compgen -G "$state_dir/*.pid" || true
}

is_running() {
  local pid_file="$1"
  local pid
  pid="$(cat "$pid_file")"
  kill -0 "$pid" 2>/dev/null
}

# A TCP port nothing listens on right now. Ray's per-node defaults are fixed numbers (dashboard agent
# 52365, client server 10001): a second node on the same machine, or another Ray instance such as a
# test session's, already holds them, and the node then comes up without its agent HTTP server, so
# the Jobs API answers "No available agent to submit job".
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Start one node under `ray start --block` in its own session and record its PID and agent port.
start_node() {
  local name="$1"
  shift
  local agent_port
  agent_port="$(free_port)"
  mkdir -p "$state_dir/$name"
  echo "$agent_port" >"$state_dir/$name.agent-port"
  RAY_AUTH_MODE="$auth_mode" setsid ray start --block --node-ip-address=127.0.0.1 \
    --temp-dir="$state_dir/$name" --dashboard-agent-listen-port="$agent_port" "$@" \
    >"$state_dir/$name.log" 2>&1 </dev/null &
  echo $! >"$state_dir/$name.pid"
}

# Polls a port, not `ray list` (a Python start-up per poll, and it needs the dashboard too).
wait_for_port() {
  local port="$1" what="$2"
  local waited=0
  until port_open "$port"; do
    for pid_file in $(pid_files); do
      is_running "$pid_file" || die "node $(basename "$pid_file" .pid) exited; see ${pid_file%.pid}.log"
    done
    ((waited >= start_timeout * 10)) && die "$what did not open port $port in ${start_timeout}s"
    sleep 0.1
    waited=$((waited + 1))
  done
}

# `ray list` prints the JSON on one line; count the node records, not the lines.
alive_node_count() {
  RAY_AUTH_MODE="$auth_mode" ray list nodes --address="127.0.0.1:$gcs_port" \
    --filter "state=ALIVE" --format json 2>/dev/null | grep -o '"node_id"' | wc -l || true
}

wait_for_nodes() {
  local expected="$1"
  local waited=0
  until [[ "$(alive_node_count)" -ge "$expected" ]]; do
    for pid_file in $(pid_files); do
      is_running "$pid_file" || die "node $(basename "$pid_file" .pid) exited; see ${pid_file%.pid}.log"
    done
    ((waited >= start_timeout)) && die "only $(alive_node_count) of $expected nodes came up in ${start_timeout}s"
    sleep 2
    waited=$((waited + 2))
  done
}

start_cluster() {
  command -v ray >/dev/null || die "'ray' is not on PATH; activate the project's environment first"
  if [[ -n "$(pid_files)" ]]; then
    die "a cluster is already recorded in $state_dir; run '$0 stop --state-dir $state_dir' first"
  fi
  mkdir -p "$state_dir"
  if [[ "$auth_mode" == token && ! -s "$HOME/.ray/auth_token" ]]; then
    ray get-auth-token --generate >/dev/null
  fi
  # A half-started cluster is worse than none: if anything below fails, stop what was started.
  trap 'echo "local-multinode: start failed; stopping the nodes it started" >&2; stop_cluster >&2' EXIT

  start_node head --head --port="$gcs_port" --dashboard-host=127.0.0.1 \
    --dashboard-port="$dashboard_port" --ray-client-server-port="$(free_port)" --num-cpus=0 --num-gpus=0
  # Workers only need the GCS; they start while the head's dashboard is still coming up.
  wait_for_port "$gcs_port" "the head's GCS"

  local i
  for ((i = 1; i <= workers; i++)); do
    start_node "worker-$i" --address="127.0.0.1:$gcs_port" --num-cpus="$cpus_per_worker" \
      --num-gpus="$gpus_per_worker" --resources="{\"local_worker_$i\": 1}"
  done
  # Jobs are accepted once the dashboard and the head's agent (which runs job drivers) listen.
  wait_for_port "$dashboard_port" "the dashboard"
  wait_for_port "$(cat "$state_dir/head.agent-port")" "the head's dashboard agent"
  wait_for_nodes $((workers + 1))
  trap - EXIT

  echo "Ray cluster up: head + $workers worker node(s) on this machine (auth: $auth_mode)"
  echo "  GCS address:  127.0.0.1:$gcs_port"
  echo "  Dashboard:    http://127.0.0.1:$dashboard_port"
  if [[ "$auth_mode" == token ]]; then
    echo "  Submit with:  RAY_AUTH_TOKEN_PATH=~/.ray/auth_token invardiff submit generate --address http://127.0.0.1:$dashboard_port -- ..."
  else
    echo "  Submit with:  invardiff submit generate --address http://127.0.0.1:$dashboard_port -- ..."
  fi
  echo "  Stop with:    $0 stop --state-dir $state_dir"
}

show_status() {
  local pid_file
  [[ -n "$(pid_files)" ]] || { echo "no cluster recorded in $state_dir"; return 0; }
  for pid_file in $(pid_files); do
    if is_running "$pid_file"; then
      echo "$(basename "$pid_file" .pid): running (pid $(cat "$pid_file"))"
    else
      echo "$(basename "$pid_file" .pid): exited"
    fi
  done
}

# SIGTERM to the recorded `ray start --block` PIDs (each tears down its own node), then wait for all.
stop_nodes() {
  local pid_file pid
  local pids=()
  for pid_file in "$@"; do
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      pids+=("$pid")
    fi
  done
  for _ in $(seq 1 300); do
    local alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && echo "local-multinode: pid $pid still running after 30s" >&2
  done
  for pid_file in "$@"; do
    rm -f "$pid_file" "${pid_file%.pid}.agent-port"
  done
  return 0
}

stop_cluster() {
  local pid_file
  local workers_pids=() head_pid=()
  for pid_file in $(pid_files); do
    if [[ "$(basename "$pid_file")" == head.pid ]]; then head_pid+=("$pid_file"); else workers_pids+=("$pid_file"); fi
  done
  # Workers first (together), then the head, so the head does not spend its last seconds reporting
  # lost nodes.
  stop_nodes "${workers_pids[@]}"
  stop_nodes "${head_pid[@]}"
  echo "stopped the cluster recorded in $state_dir"
}

main() {
  local command="${1:-}"
  [[ -n "$command" ]] || usage
  [[ "$command" == -h || "$command" == --help || "$command" == help ]] && usage 0
  shift
  parse_options "$@"
  case "$command" in
    start) start_cluster ;;
    status) show_status ;;
    stop) stop_cluster ;;
    *) echo "local-multinode: unknown command: $command" >&2; usage ;;
  esac
}

main "$@"
