#!/usr/bin/env bash
# train_fmnist.sh - the whole Fashion-MNIST recipe: a cross-entropy baseline
# (WRN, to convergence), then JEM warm-started from it.  Resumable: run it
# again and every stage continues from its last checkpoint (finished stages
# are skipped).  Usage, from the repository root:
#
#   nohup nice -n 5 scripts/train_fmnist.sh > runs/train.log 2>&1 &
#
# Settings below may be overridden by the environment or by runs/train_fmnist.env
# (sourced before each stage, so a later stage can be tuned while an earlier
# one runs).  Changing a stage's settings after it started breaks its resume.
# Outputs: runs/fmnist-baseline/, runs/fmnist-jem/ (checkpoints, log.csv,
# best/latest/model.safetensors); models/fmnist-baseline.safetensors and
# models/fmnist-jem.safetensors are refreshed as stages progress.

# Everything lives in main() so that editing this file never changes a run
# that is already going (bash reads scripts as it executes them).
main() {
  set -euo pipefail
  cd "$(dirname "$0")/.."
  mkdir -p runs models

  # Run a private copy of the binary: rebuilding the tree mid-run (or a broken
  # build) must not touch the trainer.
  if [ ! -x runs/bin/jem ] || [ "${REFRESH_BIN:-0}" = 1 ]; then
    make -s build/jem
    mkdir -p runs/bin
    cp build/jem runs/bin/jem.tmp && mv runs/bin/jem.tmp runs/bin/jem
  fi
  local JEM=runs/bin/jem

  load_settings
  echo "== $(date -u +%FT%TZ) baseline: WRN-$DEPTH-$WIDEN, $BASE_ITERS iterations"
  "$JEM" train --run-dir runs/fmnist-baseline --resume --baseline \
    --depth "$DEPTH" --widen "$WIDEN" --name fmnist-baseline \
    --iterations "$BASE_ITERS" --lr "$BASE_LR" --warmup "$BASE_WARMUP" \
    --schedule cosine --sigma "$SIGMA" --seed "$SEED" --threads "$THREADS" \
    --ckpt-every 500 --log-every 100 --eval-every 1000
  cp runs/fmnist-baseline/model.safetensors models/fmnist-baseline.safetensors.tmp
  mv models/fmnist-baseline.safetensors.tmp models/fmnist-baseline.safetensors

  load_settings
  echo "== $(date -u +%FT%TZ) JEM: warm start from the baseline, K=$JEM_K, $JEM_ITERS iterations"
  # In segments, so that models/fmnist-jem.safetensors follows the run.
  local stop=0
  while :; do
    stop=$((stop + JEM_SEGMENT))
    [ "$stop" -gt "$JEM_ITERS" ] && stop=$JEM_ITERS
    "$JEM" train --run-dir runs/fmnist-jem --resume \
      --warm-start runs/fmnist-baseline/model.safetensors --name fmnist-jem \
      --iterations "$JEM_ITERS" --stop-at "$stop" --lr "$JEM_LR" --warmup "$JEM_WARMUP" \
      --schedule cosine --sigma "$SIGMA" --sgld-steps "$JEM_K" --buffer-size "$JEM_BUFFER" \
      --reinit 0.05 --energy-l2 "$JEM_L2" --seed "$SEED" --threads "$THREADS" \
      --ckpt-every 250 --log-every 25 --eval-every 500 --replay-keep 500
    local snap=runs/fmnist-jem/latest.safetensors
    [ "$stop" -ge "$JEM_ITERS" ] && snap=runs/fmnist-jem/model.safetensors
    cp "$snap" models/fmnist-jem.safetensors.tmp
    mv models/fmnist-jem.safetensors.tmp models/fmnist-jem.safetensors
    echo "== $(date -u +%FT%TZ) models/fmnist-jem.safetensors <- $snap (iteration $stop)"
    [ "$stop" -ge "$JEM_ITERS" ] && break
  done
  echo "== $(date -u +%FT%TZ) done"
}

load_settings() {
  DEPTH=${DEPTH:-10}
  WIDEN=${WIDEN:-1}
  SEED=${SEED:-1}
  SIGMA=${SIGMA:-0.03}
  THREADS=${THREADS:-1}
  BASE_ITERS=${BASE_ITERS:-8600}     # 10 epochs of 860 batches
  BASE_LR=${BASE_LR:-1e-3}
  BASE_WARMUP=${BASE_WARMUP:-500}
  JEM_ITERS=${JEM_ITERS:-4000}
  JEM_SEGMENT=${JEM_SEGMENT:-500}
  JEM_K=${JEM_K:-20}
  JEM_LR=${JEM_LR:-1e-4}
  JEM_WARMUP=${JEM_WARMUP:-200}
  JEM_L2=${JEM_L2:-0.1}
  JEM_BUFFER=${JEM_BUFFER:-10000}
  if [ -f runs/train_fmnist.env ]; then
    # shellcheck disable=SC1091
    . runs/train_fmnist.env
  fi
}

main "$@"
exit $?
