#!/usr/bin/env bash
# Builds the local image the Docker tests run actions in: a minimal Debian
# with g++ (about 450 MB), made with debootstrap from this machine's apt
# mirror and imported into the local engine, since no registry is reachable.
# Does nothing when the image is already there.
#
#   scripts/test-image.sh [IMAGE]    default outpost-test-toolchain:1
set -euo pipefail

image="${1:-outpost-test-toolchain:1}"

if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "debootstrap is missing: apt-get install debootstrap" >&2
  exit 1
fi

# The first Debian mirror this machine's apt uses (deb822 or one-line form).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
    [ -n "$mirror" ] && break
  done
fi
if [ -z "$mirror" ]; then
  echo "no apt mirror found in /etc/apt/sources.list.d or /etc/apt/sources.list" >&2
  exit 1
fi

dir=$(mktemp -d /tmp/outpost-test-image.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "building $image from $mirror (about a minute)" >&2
debootstrap --variant=minbase --include=g++ bookworm "$dir/root" "$mirror" >"$dir/log" 2>&1 || {
  tail -n 30 "$dir/log" >&2
  echo "debootstrap failed; see above" >&2
  exit 1
}
# What a container needs of the root: no apt caches, no machine identity.
rm -rf "$dir/root/var/cache/apt/archives/"*.deb "$dir/root/var/lib/apt/lists/"*
tar -C "$dir/root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV OUTPOST_TEST_IMAGE=1' \
  - "$image" >/dev/null
echo "built $image" >&2
