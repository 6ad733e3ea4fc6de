#!/usr/bin/env bash
# build.sh - build the jemd container image with podman, then smoke-test the
# image's file system under chroot (read-only root, non-root user, /readyz and
# a real classification).  Slow (debootstrap + apt): not part of `make test`.
#
# Usage: deploy/container/build.sh [--tag NAME] [--base IMAGE] [--builder IMAGE]
#                                  [--base-only] [--no-test] [--rebuild-base]
# Needs root (podman storage, debootstrap, chroot, mounts).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TAG=localhost/jemd:latest
BASE=""            # runtime base image; found or made below when empty
BUILDER=""         # builder base image; defaults to the runtime base
DEBOOT_TAG=localhost/jemd-base:bookworm
BASE_ONLY=0
RUN_TEST=1
REBUILD_BASE=0
SUITE=bookworm

die() { echo "build.sh: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --base) BASE=${2:?--base needs a value}; shift 2 ;;
    --builder) BUILDER=${2:?--builder needs a value}; shift 2 ;;
    --base-only) BASE_ONLY=1; shift ;;
    --no-test) RUN_TEST=0; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (podman storage, debootstrap and chroot need it)"

# Tools: install from Debian when missing, and say so.
need_pkgs=""
command -v podman >/dev/null || need_pkgs="$need_pkgs podman crun fuse-overlayfs"
command -v debootstrap >/dev/null || need_pkgs="$need_pkgs debootstrap"
command -v curl >/dev/null || need_pkgs="$need_pkgs curl"
if [ -n "$need_pkgs" ]; then
  log "installing:$need_pkgs"
  apt-get update -qq
  # shellcheck disable=SC2086  # a list of package names, split on purpose
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_pkgs
fi

# The Debian mirror this machine is configured with (deb822 or one-line format).
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri=$(grep -hoE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]*/debian/?([[:space:]]|$)' "$f" 2>/dev/null \
          | grep -oE '[a-z]+://[^[:space:]]*' | head -n1) || true
    if [ -n "$uri" ]; then echo "${uri%/}"; return 0; fi
  done
  echo "http://deb.debian.org/debian"
}

# A bookworm base made with debootstrap (minbase), trimmed the way the slim
# images are, and imported into podman.  Used when no base can be pulled.
make_debootstrap_base() {
  local mirror root t0
  mirror=${MIRROR:-$(debian_mirror)}
  root=$(mktemp -d /var/tmp/jemd-debootstrap.XXXXXX)
  t0=$(date +%s)
  log "debootstrap --variant=minbase $SUITE from $mirror"
  nice debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; rm -rf "$root"; die "debootstrap failed (log: $root.log)"; }
  # Same sources as the official image: main + updates + security.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Slim-image conventions: no recommends, no docs/man/locales, no apt cache.
  cat >"$root/etc/apt/apt.conf.d/90jemd-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/90jemd-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/man/* "$root"/usr/share/info/*
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  podman rmi -f "$DEBOOT_TAG" >/dev/null 2>&1 || true
  tar --numeric-owner -C "$root" -c . \
    | podman import --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $SUITE $mirror" - "$DEBOOT_TAG" >/dev/null
  rm -rf "$root" "$root.log"
  log "base image $DEBOOT_TAG made in $(( $(date +%s) - t0 )) s ($(podman image inspect --format '{{.Size}}' "$DEBOOT_TAG") bytes)"
}

if [ -z "$BASE" ]; then
  if [ "$REBUILD_BASE" = 0 ] && podman image exists "$DEBOOT_TAG"; then
    BASE=$DEBOOT_TAG
    log "using cached base image $BASE"
  elif [ "$REBUILD_BASE" = 0 ] && timeout 60 podman pull -q docker.io/library/debian:$SUITE-slim >/dev/null 2>&1; then
    BASE=docker.io/library/debian:$SUITE-slim
    log "pulled $BASE"
  else
    log "no base image can be pulled here: making one with debootstrap"
    make_debootstrap_base
    BASE=$DEBOOT_TAG
  fi
fi
BUILDER=${BUILDER:-$BASE}
[ "$BASE_ONLY" = 1 ] && { log "base image ready: $BASE"; exit 0; }

# ---------------------------------------------------------------------------
# Build.  --format docker keeps HEALTHCHECK (OCI image config has no field for
# it); --isolation chroot needs no user namespaces or runc in this sandbox.
[ -f "$REPO/models/fmnist-jem.safetensors" ] || die "models/fmnist-jem.safetensors is missing: the image bakes in the default model"
VERSION=$(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown)
log "podman build $TAG (base $BASE, builder $BUILDER, version $VERSION)"
t0=$(date +%s)
nice podman build --isolation chroot --format docker \
  --ignorefile "$HERE/Dockerfile.dockerignore" \
  -f "$HERE/Dockerfile" \
  --build-arg BASE_IMAGE="$BASE" --build-arg BUILDER_IMAGE="$BUILDER" \
  --build-arg VERSION="$VERSION" \
  -t "$TAG" "$REPO"
log "build took $(( $(date +%s) - t0 )) s; image size $(podman image inspect --format '{{.Size}}' "$TAG") bytes"

# The image's configuration: what a runtime would start.
hc=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
if [ -z "$hc" ] || [ "$hc" = "null" ]; then
  die "built image has no HEALTHCHECK (was --format docker used?)"
fi
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || die "image USER '$user' is not a numeric non-root user"
log "USER $user; HEALTHCHECK $hc"
[ "$RUN_TEST" = 1 ] || exit 0

# ---------------------------------------------------------------------------
# Smoke test: the image's own file system, entrypoint, environment and health
# check, under chroot with a read-only root and a tmpfs /tmp, as its user.
work=$(mktemp -d /var/tmp/jemd-smoke.XXXXXX)
rootfs=$work/rootfs
mkdir -p "$rootfs"
# The mounts live in a private namespace, so the exported tree is plain files;
# on failure keep the logs in $work but not the 160 MB tree.
trap 'rm -rf "$rootfs"; [ -d "$work" ] && echo "smoke test files: $work" >&2' EXIT
cid=$(podman create --health-cmd none "$TAG")
podman export "$cid" | tar --numeric-owner -C "$rootfs" -x
podman rm -f "$cid" >/dev/null 2>&1 || true  # (podman 4.3 logs a harmless systemd-timer error here)
podman image inspect "$TAG" >"$work/inspect.json"
# The Kubernetes preStop hook execs a binary from the image: it must be there.
prestop=$(/usr/bin/python3 -c '
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
c = d["spec"]["template"]["spec"]["containers"][0]
print(((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command", [""])[0])
' "$REPO/deploy/k8s/deployment.yaml")
if [ -n "$prestop" ]; then
  [ -x "$rootfs$prestop" ] || die "k8s preStop runs $prestop, which the image lacks"
  log "k8s preStop binary $prestop is in the image"
fi

port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# A real Fashion-MNIST test image (label known) as PNG, or the repo's sample.
png=$work/sample.png
label=$(/usr/bin/python3 - "$png" "$REPO" <<'EOF'
import glob, gzip, sys
from PIL import Image
out, repo = sys.argv[1], sys.argv[2]
idx = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
try:
    with gzip.open(idx) as f:
        raw = f.read(16 + 28 * 28)
    with gzip.open(idx.replace("images-idx3", "labels-idx1")) as f:
        lab = f.read(9)[8]
    Image.frombytes("L", (28, 28), raw[16:]).save(out)
    print(lab)
except OSError:
    pngs = sorted(glob.glob(repo + "/tests/data/images/*.png"))
    if not pngs:
        sys.exit("no test image: install dataset-fashion-mnist")
    Image.open(pngs[0]).save(out)
    print(-1)
EOF
)

# Runs inside a private mount namespace, so every mount vanishes with it.
cat >"$work/inner.sh" <<'EOF'
set -euo pipefail
rootfs=$1; port=$2; work=$3
mount --bind "$rootfs" "$rootfs"
mount -t proc proc "$rootfs/proc"
for d in null zero urandom random; do
  touch "$rootfs/dev/$d" 2>/dev/null || true
  mount --bind "/dev/$d" "$rootfs/dev/$d"
done
mount -t tmpfs -o mode=1777,size=64m,nosuid,nodev tmpfs "$rootfs/tmp"
mount -o remount,bind,ro "$rootfs"
# Writable root would hide a daemon that writes outside /tmp.
if touch "$rootfs/probe" 2>/dev/null; then echo "root is not read-only" >&2; exit 1; fi

/usr/bin/python3 - "$work/inspect.json" >"$work/config.sh" <<'PY'
import json, shlex, sys
img = json.load(open(sys.argv[1]))[0]
c = img["Config"]
argv = (c.get("Entrypoint") or []) + (c.get("Cmd") or [])
hc = (img.get("Healthcheck") or {}).get("Test") or []
if not argv or len(hc) < 2 or hc[0] != "CMD":
    sys.exit("image needs an exec-form ENTRYPOINT/CMD and HEALTHCHECK CMD [...]")
user = c.get("User") or ""
print("ARGV=(%s)" % " ".join(shlex.quote(a) for a in argv))
print("HC=(%s)" % " ".join(shlex.quote(a) for a in hc[1:]))
print("ENVS=(%s)" % " ".join(shlex.quote(e) for e in c.get("Env") or []))
print("USERSPEC=%s" % shlex.quote(user if ":" in user else user + ":" + user))
print("WD=%s" % shlex.quote(c.get("WorkingDir") or "/"))
PY
. "$work/config.sh"
echo "entrypoint: ${ARGV[*]} (user $USERSPEC, workdir $WD)"
missing=$(chroot "$rootfs" ldd "${ARGV[0]}" | grep 'not found' || true)
[ -z "$missing" ] || { echo "missing libraries: $missing" >&2; exit 1; }

run_in() {  # run a command the way the image would: its env, user and workdir
  env -i "${ENVS[@]}" JEMD_PORT="$port" \
    chroot --userspec="$USERSPEC" "$rootfs" /bin/sh -c 'cd "$0" && exec "$@"' "$WD" "$@"
}
t0=$(date +%s.%N)
# `exec` so that $! is jemd itself, not a subshell that would take the signal.
( exec env -i "${ENVS[@]}" JEMD_PORT="$port" \
    chroot --userspec="$USERSPEC" "$rootfs" /bin/sh -c 'cd "$0" && exec "$@"' "$WD" "${ARGV[@]}" ) \
  >"$work/jemd.log" 2>&1 &
pid=$!
trap 'kill -KILL "$pid" 2>/dev/null || true' EXIT
ready=""
for _ in $(seq 1 600); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; then ready=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "jemd did not become ready; its log:" >&2; cat "$work/jemd.log" >&2
  kill "$pid" 2>/dev/null || true; exit 1
fi
echo "ready after $(/usr/bin/python3 -c "print(round($(date +%s.%N) - $t0, 2))") s"
echo "jemd runs as uid $(awk '/^Uid/{print $2}' /proc/$pid/status), pid $pid"
echo "GET /readyz: $(curl -sS -w ' (HTTP %{http_code})' "http://127.0.0.1:$port/readyz")"
curl -fsS -H 'Content-Type: image/png' --data-binary @"$work/sample.png" \
  "http://127.0.0.1:$port/v1/classify" >"$work/classify.json" \
  || { echo "classification failed" >&2; cat "$work/jemd.log" >&2; kill "$pid"; exit 1; }
echo "POST /v1/classify: $(head -c 600 "$work/classify.json")"
run_in "${HC[@]}" && echo "HEALTHCHECK ${HC[*]}: exit 0" \
  || { echo "HEALTHCHECK failed" >&2; kill "$pid"; exit 1; }
# Writes outside /tmp would have failed above with EROFS; show what /tmp got.
echo "files the daemon left in /tmp: $(find "$rootfs/tmp" -mindepth 1 | wc -l)"
t1=$(date +%s.%N)
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
trap - EXIT
echo "SIGTERM -> exit $rc after $(/usr/bin/python3 -c "print(round($(date +%s.%N) - $t1, 2))") s"
echo "--- daemon log (tail)"; tail -n 15 "$work/jemd.log"
[ "$rc" = 0 ] || { echo "daemon exited with $rc on SIGTERM" >&2; exit 1; }
EOF

log "smoke test: chroot $rootfs on port $port (read-only root, tmpfs /tmp)"
unshare --mount --propagation private bash "$work/inner.sh" "$rootfs" "$port" "$work"
/usr/bin/python3 - "$work/classify.json" "$label" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
for k in ("label", "class", "confidence", "probs", "energy"):
    if k not in r:
        sys.exit("classification answer lacks '%s': %s" % (k, r))
if abs(sum(r["probs"]) - 1) > 1e-3:
    sys.exit("probs do not sum to 1: %s" % r["probs"])
print("classified as %d (%s, confidence %.3f); true label %s" %
      (r["label"], r["class"], r["confidence"], want if want >= 0 else "unknown"))
EOF
trap - EXIT
rm -rf "$work"
log "smoke test passed"
