#!/usr/bin/env bash
# What someone with a Mac runs to check what only a Mac can (docs/macos.md):
# the build, the Mac parts' tests on real tools, the agent's host facts and
# sandbox-exec probe, and sandboxed actions through a local coordinator.
#
#   scripts/mac-check.sh [OUT_DIR]      (default target/mac-check)
#
# Nothing is installed and nothing outside OUT_DIR is written. Each step
# says ok or FAILED; the report (OUT_DIR/report.txt, with the logs beside
# it) is what to attach to an issue. Exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" != Darwin ]; then
  echo "mac-check.sh checks a Mac; on Linux, scripts/test.sh type-checks the macOS configuration" >&2
  exit 2
fi

out="${1:-target/mac-check}"
rm -rf "$out"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
report="$out/report.txt"
failed=0
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

say() { echo "$*" | tee -a "$report"; }
# step NAME COMMAND...: runs it with its output in OUT_DIR/NAME.log.
step() {
  local name="$1"
  shift
  if "$@" >"$out/$name.log" 2>&1; then
    say "ok      $name"
  else
    say "FAILED  $name (see $out/$name.log)"
    tail -n 20 "$out/$name.log" | sed 's/^/        /' | tee -a "$report"
    failed=1
  fi
}

say "Outpost mac-check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "$(sw_vers | tr '\n' ' ')"
say "$(uname -m), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

step build cargo build --bin outpost
bin="$(pwd)/target/debug/outpost"

# The parsers, the Xcode discovery, the profile renderer and the process
# tree, now against this Mac's own ps, plist files and file system.
step unit-tests cargo test -p outpost-agent --lib -- host:: sandbox_exec xcode
# Xcode selection end to end against generated Xcodes, as on Linux.
step xcode-selection-tests cargo test --test macos

# What the agent reads, shown raw beside what it advertises below.
facts() {
  sw_vers
  sysctl hw.perflevel0.physicalcpu hw.perflevel1.physicalcpu || true
  ls -d /Applications/Xcode*.app /Applications/Xcodes/Xcode*.app 2>/dev/null || true
  xcode-select -p || true
  xcrun --show-sdk-version || true
  xcrun simctl list runtimes -j || true
  getconf DARWIN_USER_TEMP_DIR
  getconf DARWIN_USER_CACHE_DIR
}
step host-tools facts

port=$((20000 + RANDOM % 20000))
endpoint="grpc://127.0.0.1:$port"
"$bin" coordinator --listen "127.0.0.1:$port" --data-dir "$out/coordinator-data" \
  >"$out/coordinator.log" 2>&1 &
pids+=($!)
# The agent probes sandbox-exec with a generated profile at start-up and
# refuses to start if the probe fails (its log says why).
"$bin" agent --coordinator "$endpoint" --work-dir "$out/agent" \
  --isolation sandbox-exec,none --slots 2 >"$out/agent.log" 2>&1 &
agent=$!
pids+=("$agent")

registered() {
  for _ in $(seq 1 60); do
    if ! kill -0 "$agent" 2>/dev/null; then
      echo "the agent exited:"
      cat "$out/agent.log"
      return 1
    fi
    if "$bin" fleet --coordinator "$endpoint" 2>/dev/null | grep -q sandbox-exec; then
      "$bin" fleet --coordinator "$endpoint"
      return 0
    fi
    sleep 1
  done
  echo "no agent with sandbox-exec registered within 60s"
  return 1
}
step agent-probe-and-registration registered

# Trivial actions (/bin/true) in sandbox-exec, then unisolated to compare.
step sandboxed-actions "$bin" bench exec-latency --endpoint "$endpoint" -n 20 -c 1 \
  --platform workload-isolation-type=sandbox-exec
step unisolated-actions "$bin" bench exec-latency --endpoint "$endpoint" -n 20 -c 1 \
  --platform workload-isolation-type=none

# What the agent advertises, proven by matching: actions that require this
# Mac's macOS version (as a minimum) and its selected Xcode run here; one
# requiring a macOS from the future fails at once, naming what the fleet has.
macos="$(sw_vers -productVersion)"
step macos-version-matches "$bin" bench exec-latency --endpoint "$endpoint" -n 2 -c 1 \
  --platform "workload-isolation-type=sandbox-exec,macos-version=$macos"
step future-macos-fails-fast sh -c "'$bin' bench exec-latency --endpoint '$endpoint' -n 1 -c 1 \
  --platform macos-version=99 2>&1 | grep 'fleet offers macos-version'"
if xcode="$(xcodebuild -version 2>/dev/null | awk 'NR == 1 { print $2 }')" && [ -n "$xcode" ]; then
  step xcode-version-matches "$bin" bench exec-latency --endpoint "$endpoint" -n 2 -c 1 \
    --platform "workload-isolation-type=sandbox-exec,xcode-version=$xcode"
else
  say "skipped xcode-version-matches (no Xcode selected: xcodebuild -version fails)"
fi

say ""
if [ "$failed" = 0 ]; then
  say "all steps ok; report: $report"
else
  say "some steps FAILED; report: $report"
fi
exit "$failed"
