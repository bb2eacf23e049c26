#!/usr/bin/env bash
# Builds release binaries, starts a coordinator and one agent on loopback,
# runs every `outpost bench` scenario against them and prints a table.
#
#   scripts/bench.sh                 # full figures (takes a few minutes)
#   QUICK=1 scripts/bench.sh         # small counts, for a smoke run
#   ENDPOINT=grpc://host:port scripts/bench.sh   # measure another server
#                                    # (skips starting Outpost and the fleet scenario)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=target/release/outpost
work=$(mktemp -d -t outpost-bench-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ "${QUICK:-}" = 1 ]; then
  n=50; c=8; large=16; agents=50; deep=1000; idle=2; acn=2000
else
  n=500; c=32; large=256; agents=1000; deep=100000; idle=10; acn=50000
fi

if [ -z "${ENDPOINT:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  endpoint="grpc://127.0.0.1:$port"
  "$bin" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" --abandon-after 1h \
    --log warn 2>"$work/coordinator.log" &
  coordinator=$!
  pids+=("$coordinator")
  for _ in $(seq 100); do
    grep -q . "$work/coordinator.log" 2>/dev/null || true
    (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.1
  done
  # `none` is the default (the budget's figures); actions that ask get the
  # linux-sandbox, for its per-action cost.
  "$bin" agent --coordinator "$endpoint" --work-dir "$work/agent" --slots 8 --log warn \
    --isolation none,linux-sandbox 2>"$work/agent.log" &
  agent=$!
  pids+=("$agent")
  sleep 2
  rss() { awk '/VmRSS/ {printf "%.1f", $2/1000}' "/proc/$1/status"; }
  cpu() { # percent of one core over 5 seconds
    local a b
    a=$(awk '{print $14+$15}' "/proc/$1/stat"); sleep 5; b=$(awk '{print $14+$15}' "/proc/$1/stat")
    awk -v a="$a" -v b="$b" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b-a)/hz/5*100}'
  }
  # The agent's one child, its spawner, counts towards the agent.
  spawner=$(pgrep -P "$agent" -f __spawner | head -1)
  echo "idle coordinator_rss_mb=$(rss "$coordinator") agent_rss_mb=$(rss "$agent") spawner_rss_mb=$(rss "$spawner") coordinator_cpu_pct=$(cpu "$coordinator") agent_cpu_pct=$(cpu "$agent")"
else
  endpoint=$ENDPOINT
fi

run() { "$bin" bench "$@" --endpoint "$endpoint"; }
run exec-latency -n "$n"
if [ -z "${ENDPOINT:-}" ]; then
  printf 'linux-sandbox '
  run exec-latency -n "$n" --platform workload-isolation-type=linux-sandbox
fi
run exec-throughput -n $((n * 4)) -c "$c"
run cas --large-mib "$large"
run ac-hit -n "$acn" -c "$c"
if [ -z "${ENDPOINT:-}" ]; then
  run fleet --agents "$agents" --deep-queue "$deep" --idle-seconds "$idle" --coordinator-pid "$coordinator"
  echo "after coordinator_rss_mb=$(rss "$coordinator")"
fi
