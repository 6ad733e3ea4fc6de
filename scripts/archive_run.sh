#!/usr/bin/env bash
# archive_run.sh - packs the Fashion-MNIST run's last checkpoints into
# checkpoints/fmnist.tar (committed), so that a later session on a fresh clone
# resumes it: scripts/train_fmnist.sh unpacks the archive when runs/ is empty.
# Run it from the repository root before a session ends.
set -euo pipefail
cd "$(dirname "$0")/.."
files=()
for run in runs/fmnist-baseline runs/fmnist-jem; do
  [ -f "$run/checkpoint" ] || continue
  ck=$(cat "$run/checkpoint")
  files+=("$run/checkpoint" "$run/$ck.state" "$run/$ck.safetensors" "$run/log.csv")
  for f in model.safetensors best.safetensors latest.safetensors; do
    [ -f "$run/$f" ] && files+=("$run/$f")
  done
done
[ -f runs/fmnist-jem-warmstart.safetensors ] && files+=(runs/fmnist-jem-warmstart.safetensors)
[ -f runs/train_fmnist.env ] && files+=(runs/train_fmnist.env)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "${files[@]}"; do
  mkdir -p "$tmp/$(dirname "$f")"
  case "$f" in
    *.safetensors) gzip -1 -c "$f" > "$tmp/$f.gz" ;;
    *) cp "$f" "$tmp/$f" ;;
  esac
done
mkdir -p checkpoints
tar -C "$tmp" -cf checkpoints/fmnist.tar.tmp runs
mv checkpoints/fmnist.tar.tmp checkpoints/fmnist.tar
ls -l checkpoints/fmnist.tar
tar -tf checkpoints/fmnist.tar
