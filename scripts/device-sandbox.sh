#!/usr/bin/env bash
# Runs the sandbox suite (tests/sandbox/) on another Linux host from
# binaries built here, for hosts this machine is not: a plain cgroup v2
# hierarchy with the memory controller (where the agent must take the v2
# path), or a GPU box. Nothing is built on the target host.
#
#   scripts/device-sandbox.sh prepare   # here: builds and strips into .device/
#   scripts/device-sandbox.sh run       # there, from the repository root:
#                                       # installs them and runs the suite;
#                                       # logs go to $OUT (or .device/out)
#
# The test binary looks for `outpost` where it was built
# ($PWD/target/debug/outpost here), so `run` puts it at that same path.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.device

case "${1:-}" in
prepare)
  cargo build --release --bin outpost
  cargo test --test sandbox --no-run 2>&1 | tee /tmp/device-sandbox-build.log
  test_bin=$(grep -o 'target/debug/deps/sandbox-[0-9a-f]*' /tmp/device-sandbox-build.log | tail -1)
  mkdir -p "$dir"
  objcopy --strip-debug target/release/outpost "$dir/outpost"
  objcopy --strip-debug "$test_bin" "$dir/sandbox-tests"
  # Where the test binary expects `outpost`, as compiled in.
  echo "$PWD/target/debug/outpost" >"$dir/outpost-path"
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
  ls -la "$dir"
  ;;
run)
  out=${OUT:-$dir/out}
  mkdir -p "$out"
  want=$(cat "$dir/outpost-path")
  mkdir -p "$(dirname "$want")"
  install -m 0755 "$dir/outpost" "$want"
  {
    echo "== host"; uname -a; id
    echo "== cgroups"; grep cgroup /proc/self/mountinfo || true
    cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null || echo "(no cgroup2 at /sys/fs/cgroup)"
    cat /proc/self/cgroup
    echo "== user namespaces"; sysctl kernel.unprivileged_userns_clone user.max_user_namespaces 2>&1 || true
    command -v setpriv || echo "setpriv missing: the unprivileged half will fail"
  } >"$out/host.txt" 2>&1
  cat "$out/host.txt"
  status=0
  "$dir/sandbox-tests" --test-threads 4 2>&1 | tee "$out/sandbox-tests.txt" || status=$?
  echo "sandbox tests exit status: $status"
  exit "$status"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
