#!/bin/sh
# Regenerates the 300 tiny checked-in input files under many/data/ used by
# //many:concat (an action with hundreds of inputs in nested directories).
# Output is deterministic; run from anywhere: tools/gen_many_inputs.sh
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)/many/data"
rm -rf "$root"
for dir in a b c; do
  mkdir -p "$root/$dir"
  i=0
  while [ "$i" -lt 100 ]; do
    name=$(printf 'f%03d.txt' "$i")
    printf '%s/%s %d\n' "$dir" "$name" "$((i * i))" > "$root/$dir/$name"
    i=$((i + 1))
  done
done
