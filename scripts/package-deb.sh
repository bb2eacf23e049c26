#!/usr/bin/env bash
# Builds a Debian package of Outpost from an already-built binary.
#
#   scripts/package-deb.sh [--binary PATH] [--out DIR] [--version V] [--arch A]
#                          [--no-strip] [--fast]
#
#   --binary PATH  the outpost binary [default: target/release/outpost]
#   --out DIR      where the .deb goes [default: target/debian]
#   --version V    package version [default: the version in Cargo.toml]
#   --arch A       Debian architecture [default: dpkg --print-architecture]
#   --no-strip     package the binary as it is (strip is the default, when
#                  `strip` is installed)
#   --fast         no compression (-Znone) instead of gzip -6
#
# The package holds /usr/bin/outpost, systemd units for the agent and the
# coordinator (installed, neither enabled nor started), example configs in
# /etc/outpost as conffiles, and creates the `outpost` system user and
# /var/lib/outpost/{agent,coordinator} on install. Progress goes to stderr;
# the last line on stdout is the path of the .deb.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "package-deb: $*" >&2; exit 1; }
say() { echo "package-deb: $*" >&2; }

usage() { sed -n '2,/^set -euo/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }

binary="$root/target/release/outpost"
out="$root/target/debian"
version=""
arch=""
strip=1
compress=(-Zgzip -z6)

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary="$2"; shift 2 ;;
    --binary=*) binary="${1#*=}"; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --version) [ $# -ge 2 ] || die "--version needs a value"; version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; arch="$2"; shift 2 ;;
    --arch=*) arch="${1#*=}"; shift ;;
    --no-strip) strip=0; shift ;;
    --fast) compress=(-Znone); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (install dpkg)"
[ -e "$binary" ] || die "no binary at $binary; build it first (cargo build --release) or pass --binary PATH"
[ -f "$binary" ] || die "$binary is not a regular file"

# The version: [workspace.package] first, then [package], as Cargo reads it.
if [ -z "$version" ]; then
  version="$(awk '
    /^\[/ { section = $0; next }
    /^[ \t]*version[ \t]*=[ \t]*"/ {
      v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v)
      if (section == "[workspace.package]") ws = v
      else if (section == "[package]") pkg = v
    }
    END { if (ws != "") print ws; else print pkg }
  ' "$root/Cargo.toml")"
  [ -n "$version" ] || die "no version found in $root/Cargo.toml; pass --version"
  # SemVer pre-releases (1.0.0-rc.1) sort before the release in Debian with ~.
  version="${version/-/\~}"
fi
case "$version" in
  [0-9]*) ;;
  *) die "version must start with a digit: $version" ;;
esac
if [ -z "$arch" ]; then
  command -v dpkg >/dev/null 2>&1 || die "dpkg not found; pass --arch"
  arch="$(dpkg --print-architecture)"
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
deb="$out/outpost_${version}_${arch}.deb"
stage="$(mktemp -d "$out/.outpost-deb.XXXXXX")"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
umask 022

say "packaging $binary as outpost $version ($arch)"

# The binary.
install -d "$stage/usr/bin"
if [ "$strip" = 1 ] && command -v strip >/dev/null 2>&1 \
  && strip --strip-unneeded -o "$stage/usr/bin/outpost" "$binary" 2>/dev/null; then
  :
else
  [ "$strip" = 0 ] || say "not stripping $binary (no strip, or not an object file)"
  cp "$binary" "$stage/usr/bin/outpost"
fi
chmod 0755 "$stage/usr/bin/outpost"

# systemd units, rendered from the templates.
render_unit() { # template config state_dir destination
  sed -e 's|{{binary}}|/usr/bin/outpost|g' \
    -e "s|{{config}}|$2|g" \
    -e 's|{{user}}|outpost|g' \
    -e 's|{{group}}|outpost|g' \
    -e "s|{{state_dir}}|$3|g" \
    "$1" >"$4"
  if grep -q '{{' "$4"; then
    die "unreplaced placeholder in $1: $(grep -o '{{[^}]*}}' "$4" | sort -u | tr '\n' ' ')"
  fi
  chmod 0644 "$4"
}
install -d "$stage/lib/systemd/system"
render_unit "$root/packaging/systemd/outpost-agent.service" \
  /etc/outpost/agent.yaml /var/lib/outpost/agent \
  "$stage/lib/systemd/system/outpost-agent.service"
render_unit "$root/packaging/systemd/outpost-coordinator.service" \
  /etc/outpost/coordinator.yaml /var/lib/outpost/coordinator \
  "$stage/lib/systemd/system/outpost-coordinator.service"

# Configuration: the documented examples, as conffiles.
install -d "$stage/etc/outpost"
for role in agent coordinator; do
  example="$root/docs/examples/$role.yaml"
  if [ -f "$example" ]; then
    # The examples' sample labels are not defaults: leave them out.
    sed -e '/# not a default/d' -e 's/^labels:$/labels: []/' "$example" \
      >"$stage/etc/outpost/$role.yaml"
    chmod 0644 "$stage/etc/outpost/$role.yaml"
  else
    say "no $example; writing a minimal $role.yaml"
    printf '# Outpost %s configuration: every key is optional and defaults\n# apply. See /usr/share/doc/outpost/README.md and docs/configuration.md.\n' \
      "$role" >"$stage/etc/outpost/$role.yaml"
    chmod 0644 "$stage/etc/outpost/$role.yaml"
  fi
done

# Documentation.
doc="$stage/usr/share/doc/outpost"
install -d "$doc"
license="$(awk -F'"' '/^license[ \t]*=/ { print $2; exit }' "$root/Cargo.toml")"
license="${license:-Apache-2.0}"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: outpost
Upstream-Contact: Outpost developers <outpost@localhost>

Files: *
Copyright: Outpost developers
License: $license
EOF
if [ "$license" = "Apache-2.0" ]; then
  cat >>"$doc/copyright" <<'EOF'
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
fi
if [ -f "$root/README.md" ]; then
  install -m 0644 "$root/README.md" "$doc/README.md"
fi
{
  printf 'outpost (%s) unstable; urgency=medium\n\n' "$version"
  printf '  * Package built from the Outpost sources.\n\n'
  printf ' -- Outpost developers <outpost@localhost>  %s\n' \
    "$(LC_ALL=C date -R ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH})"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc"/*

# Control files.
install -d "$stage/DEBIAN"
printf '/etc/outpost/agent.yaml\n/etc/outpost/coordinator.yaml\n' >"$stage/DEBIAN/conffiles"

# libc6 as new as the newest symbol version the binary uses.
depends="libc6"
if command -v objdump >/dev/null 2>&1; then
  glibc="$(objdump -T "$stage/usr/bin/outpost" 2>/dev/null \
    | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1 || true)"
  [ -z "$glibc" ] || depends="libc6 (>= $glibc)"
fi
installed_size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"

cat >"$stage/DEBIAN/control" <<EOF
Package: outpost
Version: $version
Architecture: $arch
Maintainer: Outpost developers <outpost@localhost>
Installed-Size: $installed_size
Depends: $depends, adduser
Recommends: util-linux
Section: devel
Priority: optional
Description: remote build execution for self-hosted, mixed fleets
 Outpost runs Bazel's Remote Execution API (REAPI v2) on your own machines.
 One binary holds both parts: the coordinator, which serves the REAPI
 endpoint, the content-addressable storage, the Action Cache and the queue;
 and the agent, which dials out to a coordinator and runs the actions it
 leases, each in its own sandbox (Linux namespaces, Landlock, cgroups).
 .
 This package installs the binary, systemd units for the coordinator and
 the agent (neither enabled nor started) and example configuration files in
 /etc/outpost, and creates the outpost system user.
EOF

cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e

case "$1" in
  configure)
    if ! getent passwd outpost >/dev/null; then
      if getent group outpost >/dev/null; then
        adduser --quiet --system --ingroup outpost --home /var/lib/outpost \
          --no-create-home --gecos "Outpost remote build execution" outpost
      else
        adduser --quiet --system --group --home /var/lib/outpost \
          --no-create-home --gecos "Outpost remote build execution" outpost
      fi
    fi
    # Modes and owners are set only on creation, so an admin's changes stay.
    for dir in /var/lib/outpost /var/lib/outpost/agent /var/lib/outpost/coordinator; do
      if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        chown outpost:outpost "$dir"
        chmod 0750 "$dir"
      fi
    done
    if [ -d /run/systemd/system ]; then
      systemctl --system daemon-reload >/dev/null || true
    fi
    if [ -z "$2" ]; then
      echo "outpost: edit /etc/outpost/*.yaml, then: systemctl enable --now outpost-coordinator.service and/or outpost-agent.service"
    else
      echo "outpost: running units keep the old binary until restarted: systemctl try-restart outpost-coordinator.service outpost-agent.service"
    fi
    ;;
esac

exit 0
EOF

cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e

case "$1" in
  remove)
    if [ -d /run/systemd/system ]; then
      for unit in outpost-agent.service outpost-coordinator.service; do
        if systemctl --quiet is-active "$unit" 2>/dev/null; then
          # The agent drains first: this can take up to its TimeoutStopSec.
          echo "outpost: stopping $unit"
          systemctl stop "$unit" || true
        fi
      done
    fi
    ;;
esac

exit 0
EOF

cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e

case "$1" in
  purge)
    rm -rf /var/lib/outpost
    # Enablement links that would otherwise point at removed units.
    rm -f /etc/systemd/system/multi-user.target.wants/outpost-agent.service \
      /etc/systemd/system/multi-user.target.wants/outpost-coordinator.service
    if getent passwd outpost >/dev/null; then
      deluser --quiet --system outpost >/dev/null 2>&1 \
        || userdel outpost >/dev/null 2>&1 || true
    fi
    if getent group outpost >/dev/null; then
      delgroup --quiet --system outpost >/dev/null 2>&1 \
        || groupdel outpost >/dev/null 2>&1 || true
    fi
    ;;
esac

case "$1" in
  remove|purge)
    if [ -d /run/systemd/system ]; then
      systemctl --system daemon-reload >/dev/null || true
    fi
    ;;
esac

exit 0
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

# md5sums of everything but the conffiles (dpkg keeps those itself).
(
  cd "$stage"
  find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -print \
    | sed 's|^\./||' | LC_ALL=C sort | xargs md5sum
) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"

rm -f "$deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >&2
echo "$deb"
