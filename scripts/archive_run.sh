#!/usr/bin/env bash
# archive_run.sh - packs the Fashion-MNIST run's last checkpoints into
# checkpoints/$RUN.tar (committed), so that a later session on a fresh clone
# resumes it: scripts/train_fmnist.sh unpacks the archive when runs/ is empty.
# Run it from the repository root before a session ends.
# RUN, BASE_RUN, BASE1_RUN and JEM2_RUN name the stages as in train_fmnist.sh
# (default run 5: fmnist5 JEM, fmnist5 second baseline cycle, fmnist2 first
# cycle; JEM2_RUN=fmnist6 adds run 6's second JEM cycle; run 3 was
# RUN=fmnist3 BASE_RUN=BASE1_RUN=fmnist2, run 1 all fmnist).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-fmnist5}
BASE_RUN=${BASE_RUN:-fmnist5}
BASE1_RUN=${BASE1_RUN:-fmnist2}
files=()
runs=("runs/$BASE1_RUN-baseline")
[ "$BASE_RUN" != "$BASE1_RUN" ] && runs+=("runs/$BASE_RUN-baseline")
runs+=("runs/$RUN-jem")
JEM2_RUN=${JEM2_RUN:-}
[ -n "$JEM2_RUN" ] && runs+=("runs/$JEM2_RUN-jem")
for run in "${runs[@]}"; do
  [ -f "$run/checkpoint" ] || continue
  ck=$(cat "$run/checkpoint")
  files+=("$run/checkpoint" "$run/$ck.state" "$run/$ck.safetensors" "$run/log.csv")
  for f in model.safetensors best.safetensors latest.safetensors; do
    [ -f "$run/$f" ] && files+=("$run/$f")
  done
done
for w in "runs/$RUN-jem-warmstart.safetensors" ${JEM2_RUN:+"runs/$JEM2_RUN-jem-warmstart.safetensors"}; do
  [ -f "$w" ] && files+=("$w")
done
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
tar -C "$tmp" -cf "checkpoints/$RUN.tar.tmp" runs
mv "checkpoints/$RUN.tar.tmp" "checkpoints/$RUN.tar"
ls -l "checkpoints/$RUN.tar"
tar -tf "checkpoints/$RUN.tar"
