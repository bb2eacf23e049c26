#!/usr/bin/env bash
# Soak test: real Bazel and gRPC's C-core client against a coordinator and
# two agents while agents are killed and restarted, the coordinator
# restarts, client streams break and an agent is drained (scripts/soak.py,
# docs/reliability.md). About two and a half minutes.
#
# Needs bazel (bazel-bootstrap) and python3-grpcio, as scripts/test.sh
# installs them. SOAK_SEED=N repeats a run's choices; OUTPOST_BIN names the
# binary to use instead of building target/debug/outpost; SOAK_KEEP=1 keeps
# the logs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${OUTPOST_BIN:-}" ]; then
  cargo build --quiet --bin outpost
  OUTPOST_BIN="$PWD/target/debug/outpost"
fi
command -v bazel >/dev/null || { echo "soak: bazel is not installed (apt-get install bazel-bootstrap)" >&2; exit 2; }
/usr/bin/python3 -c 'import grpc' 2>/dev/null || { echo "soak: python3-grpcio is not installed" >&2; exit 2; }
OUTPOST_BIN="$OUTPOST_BIN" exec /usr/bin/python3 scripts/soak.py
