#!/usr/bin/env bash
# Fuzzes Outpost's parsers of untrusted input (ByteStream resource names,
# digests, Directory nodes, Commands, fleet messages) with cargo fuzz
# (libFuzzer, nightly Rust), each target for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60, all)
#
# New inputs go to fuzz/corpus-work/TARGET (not committed); the committed
# seeds in fuzz/corpus/TARGET are read only. A crash is saved under
# fuzz/artifacts/TARGET/; copy it to fuzz/regressions/TARGET/ and
# `cargo nextest run -p outpost-coordinator --test fuzz_corpus` replays it
# on stable from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  mkdir -p "fuzz/corpus-work/$target"
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" \
      "fuzz/corpus-work/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/; copy them to fuzz/regressions/TARGET/)" >&2
  exit 1
fi
echo "no crash in ${#targets[@]} targets, ${seconds}s each"
