#!/usr/bin/env bash
# fresh_check.sh - the README's quick start on a minimal Debian 12 root.
#
# usage: scripts/fresh_check.sh [REPO]      (as root; needs debootstrap)
#
# Builds a bookworm root with debootstrap (variant minbase, as the debian:12
# image) and installs build-essential, git, pkg-config, curl, python3, nodejs
# and npm in it (a newcomer's first `apt-get install`), clones REPO (default: this
# checkout; a clone takes its committed HEAD) into it, and runs the README's two
# commands inside it with chroot: `make test`, then `make run` in the background
# until /readyz answers 200.  Exits non-zero on the first failure.  The mounts
# (proc, sys, dev) and the root are removed on exit; FRESH_KEEP=1 keeps the root
# (for a look after a failure).  FRESH_MIRROR overrides the apt mirror, which is
# otherwise the host's Debian mirror from /etc/apt/sources.list*.
set -euo pipefail

REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
SUITE=bookworm
BASE_PKGS=build-essential,git,pkg-config,curl,python3,nodejs,npm
T0=$(date +%s)

say() { printf 'fresh_check [%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, mount and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
git -C "$REPO" rev-parse --verify -q HEAD >/dev/null || die "$REPO is not a git checkout"

# The host's Debian mirrors: the first URI of a deb822 stanza or a one-line
# entry that serves $SUITE, and the one that serves $SUITE-security.
host_mirror() {  # $1: suite to match
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case "$f" in
      *.sources) awk -v s="$1" '
          /^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == s) hit = 1}
          /^$/ {if (hit && u) {print u; exit} u = ""; hit = 0}
          END {if (hit && u) print u}' "$f" ;;
      *) awk -v s="$1" '$1 == "deb" {for (i = 2; i < NF; i++)
          if ($i ~ /^[a-z]+:\/\//) {if ($(i + 1) == s) {print $i; exit} break}}' "$f" ;;
    esac
  done | head -n 1
}
MIRROR=${FRESH_MIRROR:-$(host_mirror "$SUITE")}
SECURITY=$(host_mirror "$SUITE-security")
[ -n "$MIRROR" ] || die "no $SUITE mirror in /etc/apt/sources.list*; set FRESH_MIRROR"

ROOT=$(mktemp -d /var/tmp/jemd-fresh.XXXXXX)
chmod 0755 "$ROOT"  # it becomes /: mktemp's 0700 would lock every other user out
RUN_PID=""
cleanup() {
  local rc=$?
  if [ -n "$RUN_PID" ]; then  # the background `make run` and its jemd
    kill -TERM -- "-$RUN_PID" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$RUN_PID" 2>/dev/null || true
  fi
  local m
  for m in dev sys proc; do
    mountpoint -q "$ROOT/$m" && { umount -R "$ROOT/$m" || umount -R -l "$ROOT/$m"; }
  done
  if [ "${FRESH_KEEP:-0}" = 1 ]; then
    say "root kept at $ROOT"
  elif ! grep -q " $ROOT/" /proc/mounts; then
    rm -rf --one-file-system "$ROOT"
  else
    say "mounts left under $ROOT; not removing it" >&2
  fi
  say "exit $rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "debootstrap $SUITE (minbase) from $MIRROR into $ROOT"
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" > "$ROOT.log" 2>&1 ||
  { tail -n 30 "$ROOT.log" >&2; die "debootstrap (log: $ROOT.log)"; }

# Sources like the debian:12 image's: the suite, its updates and security.
{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  [ -z "$SECURITY" ] || echo "deb $SECURITY $SUITE-security main"
} > "$ROOT/etc/apt/sources.list"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
for f in /etc/apt/apt.conf.d/*; do  # the host's apt settings (proxies, mirror quirks)
  [ -f "$f" ] && cp "$f" "$ROOT/etc/apt/apt.conf.d/"
done
# No package may start its service in the root (prometheus would, from
# `make deps`): the usual policy for chroots and container builds.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"

mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
mount --make-rslave "$ROOT/dev"

in_root() {  # $1 in a login-like environment, as a newcomer's shell would have
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive /bin/bash -c "cd /root/jemd 2>/dev/null; $1"
}

say "apt-get install $BASE_PKGS"
in_root "apt-get update -qq && apt-get install -y -qq ${BASE_PKGS//,/ }" >> "$ROOT.log" 2>&1 ||
  { tail -n 30 "$ROOT.log" >&2; die "installing the base packages (log: $ROOT.log)"; }
rm -f "$ROOT.log"
# The host's trust settings, as every machine here has them: extra CA
# certificates (the network's egress proxy) and npm's global settings (its
# cafile), without which `npm ci` in make test cannot reach the registry.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  in_root 'update-ca-certificates' > /dev/null 2>&1 || die "update-ca-certificates in the root"
fi
if [ -f /usr/etc/npmrc ]; then mkdir -p "$ROOT/usr/etc" && cp /usr/etc/npmrc "$ROOT/usr/etc/npmrc"; fi

say "clone $REPO ($(git -C "$REPO" rev-parse --short HEAD))"
git clone -q --no-local "$REPO" "$ROOT/root/jemd"

say "make test"
in_root 'make test' > "$ROOT.test.log" 2>&1 || {
  tail -n 60 "$ROOT.test.log" >&2; die "make test (log: $ROOT.test.log)"; }
grep -E '^(== |\[  PASSED|[0-9]+ passed)' "$ROOT.test.log" | tail -n 40 || true
rm -f "$ROOT.test.log"
say "make test passed"

# `make run` on a free port (8080 may be taken on a shared machine), in its own
# process group so that cleanup stops make and jemd together.
PORT=$(in_root "python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'")
say "make run ARGS='--port $PORT' in the background"
setsid bash -c "$(declare -f in_root); ROOT='$ROOT'; in_root \"exec make run ARGS='--port $PORT'\"" \
  > "$ROOT/run.log" 2>&1 &
RUN_PID=$!
ready=""
for _ in $(seq 1 120); do
  if ready=$(in_root "curl -sf http://127.0.0.1:$PORT/readyz"); then break; fi
  kill -0 "$RUN_PID" 2>/dev/null || { tail -n 30 "$ROOT/run.log" >&2; die "make run exited"; }
  ready=""
  sleep 1
done
[ -n "$ready" ] || { tail -n 30 "$ROOT/run.log" >&2; die "/readyz did not answer 200 in 120 s"; }
say "GET /readyz: $ready"
echo "$ready" | grep -q '"ready"' || die "unexpected /readyz body"
say "PASSED in $(( $(date +%s) - T0 )) s"
