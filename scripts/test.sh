#!/usr/bin/env bash
# Runs every test of Outpost: formatting, lints, unit, component and
# end-to-end tests (the real outpost binary, real Bazel), then the soak
# (scripts/soak.sh: Bazel and gRPC's C core against a coordinator and two
# agents while they are killed, restarted and drained).
#
# On a fresh Debian/Ubuntu machine it first installs what the tests need:
#   bazel-bootstrap  Bazel 4.2.3 for the end-to-end build (needs a JDK, pulled in by apt)
#   util-linux       unshare and setpriv: the full-disk test's private tmpfs,
#                    the sandbox suite's unprivileged agent
#   python3          (Debian's, in /usr/bin: what sandboxed actions can see)
#                    for the sandbox suite's ptrace attempts
#   python3-grpcio   gRPC's C core client, for TLS and mutual TLS against
#                    another TLS/HTTP2 stack (Debian's Bazel cannot do TLS),
#                    long actions and the soak
#   chromium         headless, to look at the status page
#   systemd, dpkg    systemd-analyze verify for the rendered units; dpkg-deb and
#                    dpkg -i for the Debian package (systemd need not be running)
#   debootstrap      builds the Docker tests' toolchain image (scripts/test-image.sh)
#                    from the machine's apt mirror: no registry is reachable
#   docker-registry  a registry on loopback for the Docker tests' pulls
#   cargo-nextest    the test runner (falls back to cargo test if it cannot be installed)
#   buildstream      BuildStream 2 from PyPI in target/buildstream, with bubblewrap
#                    and busybox-static (scripts/buildstream-env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

missing=()
command -v bazel >/dev/null 2>&1 || missing+=(bazel-bootstrap)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
[ -x /usr/bin/python3 ] || missing+=(python3)
/usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || missing+=(python3-grpcio)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

runner=(cargo nextest run --workspace --no-fail-fast)
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  if ! cargo install cargo-nextest --locked; then
    echo "cargo-nextest could not be installed; using cargo test" >&2
    runner=(cargo test --workspace --no-fail-fast)
  fi
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

say "cargo clippy, the macOS configuration (portable-check; see docs/macos.md)"
cargo clippy --workspace --lib --bins --features outpost/portable-check -- -D warnings

say "buildstream"
# tests/buildstream.rs builds with BuildStream 2 against Outpost: PyPI's
# buildstream in a virtual environment, with bubblewrap and busybox-static
# (installed once; about 20 s the first time).
OUTPOST_BUILDSTREAM="$(scripts/buildstream-env.sh target/buildstream)"
export OUTPOST_BUILDSTREAM OUTPOST_REQUIRE_BUILDSTREAM=1

say "docker images"
# The Docker engine runs on the project's machines; tests/docker/ needs
# the local toolchain image (built once, about a minute).
scripts/test-image.sh
# tests/containers.rs runs the agent's image, of the binary under test
# (scripts/images.sh rebuilds it only when that binary changed).
scripts/images.sh --if-missing --tag test

say "tests"
# The end-to-end Bazel, browser, gRPC core and service tests must run, not skip, here.
OUTPOST_REQUIRE_BAZEL=1 OUTPOST_REQUIRE_CHROMIUM=1 OUTPOST_REQUIRE_SERVICE_TOOLS=1 \
  OUTPOST_REQUIRE_GRPCIO=1 OUTPOST_REQUIRE_DOCKER=1 \
  "${runner[@]}" "$@"

say "soak"
scripts/soak.sh
