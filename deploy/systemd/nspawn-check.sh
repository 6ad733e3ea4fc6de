#!/usr/bin/env bash
# nspawn-check.sh - runs jemd.service under a real systemd (booted with
# systemd-nspawn in a debootstrap root) with all of the unit's sandboxing, and
# checks start (Type=notify), /readyz, a classification, reload and stop.
# Usage: deploy/systemd/nspawn-check.sh [--build DIR] [--root DIR] [--model FILE]
# Needs root, debootstrap and systemd-container.  Slow the first time (the
# root is cached); not part of `make test`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=$REPO/build
ROOT=/var/tmp/jemd-nspawn-root
MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build) BUILD=$(cd "$2" && pwd); shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --model) MODEL=$(readlink -f "$2"); shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "nspawn-check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "nspawn-check.sh: run as root" >&2; exit 1; }
for t in debootstrap systemd-nspawn; do
  command -v "$t" >/dev/null \
    || { echo "nspawn-check.sh: $t missing (apt-get install debootstrap systemd-container)" >&2; exit 1; }
done
case "$ROOT" in /?*/*) ;; *) echo "nspawn-check.sh: --root must be an absolute path below /" >&2; exit 2 ;; esac
mode=release
[ "$BUILD" = "$REPO/build" ] || mode=$(basename "$BUILD")

if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
  mirror=$(grep -hoE '^URIs:[[:space:]]*[a-z]+://[^[:space:]]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | head -n1 | awk '{print $2}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "debootstrap bookworm (systemd + jemd's runtime libraries) into $ROOT from $mirror"
  rm -rf "$ROOT"
  nice debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,curl,procps,libmicrohttpd12,libjansson4,libuv1,libopenblas0-pthread,zlib1g,libhiredis0.14 \
    bookworm "$ROOT" "$mirror" >/var/tmp/jemd-nspawn-debootstrap.log 2>&1
fi

# Install exactly as a user would, then point the environment file at a free port.
rm -f "$ROOT/etc/default/jemd" "$ROOT/jemd-check.out"
make -s -C "$REPO" MODE="$mode" install DESTDIR="$ROOT" PREFIX=/usr
if [ -n "$MODEL" ]; then install -m 0644 "$MODEL" "$ROOT/usr/share/jemd/models/fmnist-jem.safetensors"; fi
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "JEMD_PORT=$port" >>"$ROOT/etc/default/jemd"
/usr/bin/python3 - "$ROOT/root/sample.png" <<'PY'
import gzip, sys
from PIL import Image
idx = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
with gzip.open(idx) as f:
    raw = f.read(16 + 28 * 28)
Image.frombytes("L", (28, 28), raw[16:]).save(sys.argv[1])
PY

# The check itself runs inside the booted container; results go to /jemd-check.out.
check=$ROOT/usr/local/sbin/jemd-check
{
  echo '#!/bin/bash'
  echo 'exec >/jemd-check.out 2>&1'
  echo "port=$port"
  cat <<'INNER'
show() { systemctl show jemd.service -p "$1" --value; }
t0=$(date +%s%N)
systemctl start jemd.service; rc=$?
echo "start: rc=$rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
echo "state: $(show ActiveState)/$(show SubState) type=$(show Type) result=$(show Result)"
pid=$(show MainPID)
echo "main pid $pid: $(grep -E '^(Uid|NoNewPrivs|Seccomp|CapEff)' /proc/$pid/status | tr -s '\t\n' '  ')"
echo "user: $(ps -o user= -p "$pid")"
echo "readyz: $(curl -sS -w ' HTTP %{http_code}' http://127.0.0.1:$port/readyz)"
code=$(curl -sS -o /tmp/classify.json -w '%{http_code}' -H 'Content-Type: image/png' --data-binary @/root/sample.png http://127.0.0.1:$port/v1/classify)
echo "classify: HTTP $code $(head -c 400 /tmp/classify.json)"
systemctl reload jemd.service; echo "reload: rc=$?"
sleep 1
echo "after reload: $(show ActiveState)/$(show SubState) pid=$(show MainPID) readyz=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/readyz)"
t0=$(date +%s%N)
systemctl stop jemd.service
echo "stop: $(( ($(date +%s%N) - t0) / 1000000 )) ms, result=$(show Result) exit=$(show ExecMainStatus)"
echo "--- journal"
journalctl -u jemd.service --no-pager -o cat | tail -n 25
echo CHECK-DONE
systemctl poweroff
INNER
} >"$check"
chmod 0755 "$check"
printf '%s\n' '[Unit]' 'Description=run the jemd.service check, then power off' \
  'After=basic.target network.target' '[Service]' 'Type=oneshot' \
  'ExecStart=/usr/local/sbin/jemd-check' >"$ROOT/etc/systemd/system/jemd-check.service"
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/jemd-check.service "$ROOT/etc/systemd/system/multi-user.target.wants/jemd-check.service"

echo "booting systemd in $ROOT (host network, jemd on port $port)"
timeout 300 systemd-nspawn -q -D "$ROOT" --register=no --keep-unit --boot >/var/tmp/jemd-nspawn-boot.log 2>&1 || true
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/jemd-check.service"
cat "$ROOT/jemd-check.out" 2>/dev/null || { echo "no result; boot log: /var/tmp/jemd-nspawn-boot.log" >&2; exit 1; }
if grep -q '^readyz: .*HTTP 200' "$ROOT/jemd-check.out" && grep -q '^classify: .*HTTP 200' "$ROOT/jemd-check.out" \
   && grep -q '^stop: .*result=success' "$ROOT/jemd-check.out"; then
  echo "nspawn-check: passed"
else
  echo "nspawn-check: FAILED" >&2; exit 1
fi
