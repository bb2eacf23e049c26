#!/bin/sh
# Passes only inside Outpost's linux-sandbox: the host toolchain is
# read-only, the host name is the sandbox's, and there is no network.
set -u
fail() { echo "NOT SANDBOXED: $*"; exit 1; }
touch /usr/outpost-sandbox-probe 2>/dev/null && fail "/usr is writable"
[ "$(hostname)" = localhost ] || fail "host name is $(hostname)"
[ -d /execroot ] || fail "no /execroot"
echo "OUTPOST_SANDBOXED: ok"
