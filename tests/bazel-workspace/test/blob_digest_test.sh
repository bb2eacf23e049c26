#!/bin/sh
# Compares the digest of //gen:blob (computed by //gen:blob_digest) with the
# checked-in expected value.
set -eu
actual="gen/blob_digest.txt"
expected="test/expected_blob_digest.txt"
if cmp -s "$actual" "$expected"; then
  echo "PASS: blob digest matches"
  exit 0
fi
echo "blob digest mismatch"
echo "--- expected"; cat "$expected"
echo "--- actual"; cat "$actual"
exit 1
