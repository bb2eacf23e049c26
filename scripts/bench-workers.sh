#!/usr/bin/env bash
# A persistent worker's action latency against the same tool run cold per
# action: tests/worker-workspace's bench_warm (20 actions through one
# worker) and bench_cold (the same 20 actions as plain runs), the tool
# sleeping 300 ms at start-up either way. One coordinator and one agent of
# one slot on this machine (linux-sandbox), Bazel 4.2.3 building each chain
# in order; the latency of an action is the agent's run time for it
# (`run_ms`, from the start of the command, or the request to the worker,
# to its end). Prints p50 and p90 of both, and each chain's build time.
#
#   scripts/bench-workers.sh [path/to/outpost]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
outpost=${1:-$here/target/debug/outpost}
scratch=$(mktemp -d)
chmod 755 "$scratch"  # sandboxed actions run as other users
cleanup() {
  (cd "$scratch/ws" 2>/dev/null && bazel --output_user_root="$scratch/bazel" shutdown) >/dev/null 2>&1 || true
  [ -n "${agent_failed:-}" ] && tail -20 "$scratch/agent.log"
  kill "${agent:-}" "${coordinator:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$outpost" coordinator --data-dir "$scratch/data" --listen "127.0.0.1:$port" 2>"$scratch/coordinator.log" &
coordinator=$!
OUTPOST_LOG=info,outpost_agent=debug "$outpost" agent --coordinator "grpc://127.0.0.1:$port" \
  --work-dir "$scratch/agent" --slots 1 2>"$scratch/agent.log" &
agent=$!
cp -a "$here/tests/worker-workspace" "$scratch/ws"
sleep 2
build() {
  (cd "$scratch/ws" && bazel --output_user_root="$scratch/bazel" build "$1" \
    --remote_executor="grpc://127.0.0.1:$port" --color=no --curses=no --noshow_progress >"$scratch/bazel.log" 2>&1) || { tail -30 "$scratch/bazel.log"; agent_failed=1; exit 1; }
}
# The run_ms of the leases logged since line $1 of the agent's log.
times_since() {
  tail -n +"$1" "$scratch/agent.log" | grep 'action stages' | sed -E 's/.*run_ms=([0-9.]+).*/\1/'
}
report() {
  python3 -c '
import sys
name = sys.argv[1]
xs = sorted(float(x) for x in sys.stdin.read().split())
q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
print("%s: %d actions, p50 %.0f ms, p90 %.0f ms" % (name, len(xs), q(0.5), q(0.9)))
' "$1"
}
build //:worker.py  # starts Bazel's server
for group in bench_warm bench_cold; do
  from=$(($(wc -l <"$scratch/agent.log") + 1))
  start=$(date +%s%N)
  build "//:$group"
  wall=$((($(date +%s%N) - start) / 1000000))
  times_since "$from" | report "$group"
  echo "$group: the build of its 20-action chain took $wall ms"
done
