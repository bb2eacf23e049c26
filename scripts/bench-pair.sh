#!/usr/bin/env bash
# Paired exec-latency runs of two outpost binaries, alternating, so that
# both see the same machine state: the way to say whether a change made
# per-action latency better or worse.
#
#   scripts/bench-pair.sh BEFORE_BIN AFTER_BIN [ROUNDS] [N]
#
# Each round starts a coordinator and an agent (none and linux-sandbox) of
# each binary in turn and runs `exec-latency -n N` for both isolations.
# Prints one line per run and the median p50 per binary and isolation.
set -euo pipefail
before=$1 after=$2 rounds=${3:-3} n=${4:-300}
work=$(mktemp -d -t outpost-pair-XXXXXX)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$work"' EXIT

one() { # BIN LABEL
  local bin=$1 label=$2 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$work/data" "$work/agent"
  "$bin" coordinator --listen "127.0.0.1:$port" --data-dir "$work/data" --abandon-after 1h --log warn 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  "$bin" agent --coordinator "grpc://127.0.0.1:$port" --work-dir "$work/agent" --slots 8 --log warn \
    --isolation none,linux-sandbox 2>/dev/null &
  pids+=($!)
  sleep 2
  for iso in none linux-sandbox; do
    local out
    out=$("$bin" bench exec-latency -n "$n" --endpoint "grpc://127.0.0.1:$port" \
      --platform "workload-isolation-type=$iso")
    echo "$label $iso $out"
  done
  stop
}

for r in $(seq "$rounds"); do
  one "$before" before
  one "$after" after
done | tee "$work/runs"
echo "== median p50_ms over $rounds rounds"
for label in before after; do
  for iso in none linux-sandbox; do
    grep "^$label $iso " "$work/runs" | sed -E 's/.* p50_ms=([0-9.]+).*/\1/' | sort -n |
      awk -v l="$label" -v i="$iso" '{a[NR]=$1} END {printf "%s %s p50_ms=%s\n", l, i, a[int((NR+1)/2)]}'
  done
done
