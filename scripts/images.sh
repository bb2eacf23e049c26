#!/usr/bin/env bash
# Builds container images of the agent and the coordinator with the local
# Docker engine, without a registry: the root filesystem is made from the
# `outpost` binary, the shared libraries it links (as `ldd` lists them),
# CA certificates and a few /etc files, and imported with `docker import`
# (about 45 MB with the debug binary stripped). Nothing is pulled.
#
#   scripts/images.sh [--if-missing] [--tag TAG] [--binary PATH]
#
#   --if-missing   build only the images that are not there yet or hold
#                  another binary (each image is labelled with its sha256)
#   --tag TAG      image tag, default dev: outpost-agent:TAG, outpost-coordinator:TAG
#   --binary PATH  the outpost binary to put in them (default: cargo build
#                  --bin outpost, target/debug/outpost)
#
# The agent image holds no toolchain: it is meant to run actions with
# `--isolation docker` in sibling containers through the host's engine
# socket (docs/containers.md). An agent that runs actions itself (`none`,
# `linux-sandbox`) needs its toolchain in the image: set AGENT_BASE to an
# image that has one (e.g. outpost-test-toolchain:1, scripts/test-image.sh)
# and the binary is added on top of it instead.
#
# packaging/docker/Dockerfile.coordinator is the recipe for machines that
# reach a registry (it builds a release binary in a Rust image).
set -euo pipefail

cd "$(dirname "$0")/.."

tag=dev
binary=""
if_missing=0
while [ $# -gt 0 ]; do
  case "$1" in
    --if-missing) if_missing=1 ;;
    --tag) tag="$2"; shift ;;
    --binary) binary="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

agent="outpost-agent:$tag"
coordinator="outpost-coordinator:$tag"

if [ -z "$binary" ]; then
  cargo build --bin outpost >&2
  binary=target/debug/outpost
fi
[ -x "$binary" ] || { echo "no outpost binary at $binary" >&2; exit 1; }
sum=$(sha256sum "$binary" | cut -d' ' -f1)

# Whether IMAGE is there and holds this binary.
have() {
  [ "$(docker image inspect --format '{{index .Config.Labels "dev.outpost.binary"}}' "$1" 2>/dev/null)" = "$sum" ]
}

if [ "$if_missing" = 1 ] && have "$agent" && have "$coordinator"; then
  exit 0
fi

dir=$(mktemp -d /tmp/outpost-images.XXXXXX)
trap 'rm -rf "$dir"' EXIT
root="$dir/root"
mkdir -p "$root"/{usr/local/bin,etc/ssl/certs,tmp,var/lib/outpost,var/run}
chmod 1777 "$root/tmp"

# The binary without its debug information.
strip --strip-debug -o "$root/usr/local/bin/outpost" "$binary"
chmod 0755 "$root/usr/local/bin/outpost"

# Every library it links, at the path it was found at (the loader too).
ldd "$binary" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The loader's usual paths on this architecture, as links to the copy.
if [ -e /lib64/ld-linux-x86-64.so.2 ] && [ ! -e "$root/lib64/ld-linux-x86-64.so.2" ]; then
  mkdir -p "$root/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi

# CA roots, for a coordinator with TLS that the system's roots verify.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
outpost:x:10001:10001:outpost:/var/lib/outpost:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
outpost:x:10001:
nogroup:x:65534:
GROUP
echo "hosts: files dns" >"$root/etc/nsswitch.conf"
: >"$root/etc/hosts"
chown 10001:10001 "$root/var/lib/outpost"
chmod 0750 "$root/var/lib/outpost"

common=(
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin'
  --change 'ENV OUTPOST_LOG=info'
  --change 'LABEL org.opencontainers.image.licenses=Apache-2.0'
  --change "LABEL dev.outpost.binary=$sum"
)

if [ "$if_missing" = 0 ] || ! have "$coordinator"; then
  tar -C "$root" --numeric-owner -c . | docker import "${common[@]}" \
    --change 'LABEL org.opencontainers.image.title=outpost-coordinator' \
    --change 'USER 10001:10001' \
    --change 'WORKDIR /var/lib/outpost' \
    --change 'VOLUME ["/var/lib/outpost"]' \
    --change 'EXPOSE 8980' \
    --change 'ENTRYPOINT ["/usr/local/bin/outpost", "coordinator"]' \
    --change 'CMD ["--listen", "0.0.0.0:8980", "--data-dir", "/var/lib/outpost"]' \
    - "$coordinator" >/dev/null
  echo "built $coordinator" >&2
fi

if [ "$if_missing" = 0 ] || ! have "$agent"; then
  # The agent runs as root by default: it needs the engine's socket (root
  # or the socket's group) and a work dir at the host's path; see
  # docs/containers.md for running it as another user.
  agent_changes=(
    --change 'LABEL org.opencontainers.image.title=outpost-agent'
    --change 'ENTRYPOINT ["/usr/local/bin/outpost", "agent"]'
    --change "LABEL dev.outpost.binary=$sum"
  )
  if [ -n "${AGENT_BASE:-}" ]; then
    printf 'FROM %s\nCOPY outpost /usr/local/bin/outpost\n' "$AGENT_BASE" >"$dir/Dockerfile"
    for c in "${agent_changes[@]}"; do
      [ "$c" = --change ] || printf '%s\n' "$c" >>"$dir/Dockerfile"
    done
    cp "$root/usr/local/bin/outpost" "$dir/outpost"
    DOCKER_BUILDKIT=0 docker build -q -t "$agent" -f "$dir/Dockerfile" "$dir" >/dev/null
  else
    tar -C "$root" --numeric-owner -c . | docker import "${common[@]}" "${agent_changes[@]}" \
      - "$agent" >/dev/null
  fi
  echo "built $agent" >&2
fi
