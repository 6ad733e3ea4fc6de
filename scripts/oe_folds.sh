#!/bin/sh
# Outlier-exposure fine-tunes of run 16 for the model card's leave-one-
# group-out table: three fold models, each trained on the OOD sets of the two
# other groups and evaluated without its own (ALL_SETS_RUN=1 adds the model
# trained on every set: scripts/train_fmnist.sh's OE stage).  Resumable:
# rerun it after an interruption.  Run from the repository root after
# `make ood-sets` and scripts/train_fmnist.sh (for run 16's weights), e.g.
#   nohup nice -n 5 scripts/oe_folds.sh > runs/oe.log 2>&1 &
set -e
JEM=${JEM:-build/jem}
WARM=${WARM:-runs/fmnist16-jem/model.safetensors}  # run 16 (shipped in sessions 12-14)
# The tuning sets in jem calibrate's order; a fold trains on all but its group.
ALL=uniform,gaussian,constant,letters,photos-skimage,photos-wallpapers,illustrations,icons,procedural,text
G1=icons,uniform,photos-skimage,procedural
G2=letters,gaussian,illustrations
G3=text,constant,photos-wallpapers
without() { echo "$ALL" | tr , '\n' | grep -vxF "$(echo "$1" | tr , '\n')" | paste -sd, -; }
run() { # run-name outlier-sets
  $JEM train --run-dir runs/oe/$1 --resume --baseline --warm-start "$WARM" \
    --name fmnist-jem --iterations 1500 --lr 2e-5 --warmup 50 --schedule cosine \
    --sigma 0.03 --seed 19 --threads 2 --ckpt-every 100 --log-every 50 --eval-every 500 \
    --outliers "$2" --oe-weight 0.1 --oe-margins -10,-3
}
# A fold's figures: half and half with the cross-entropy baseline (as the
# recipe's OE_WISE stage), calibrated without its group, then evaluated
# (runs/oe/FOLD-wise/report.json, read by scripts/ood_table.py --fold).
evaluate() { # fold-name held-out-sets
  d=runs/oe/$1-wise
  [ -f "$d/report.json" ] && return 0
  mkdir -p "$d"
  $JEM average runs/oe/$1/model.safetensors "$BASELINE" --weights 1,1 --out "$d/model.safetensors"
  # the sampler settings do not touch the verdict: the shortest search
  $JEM calibrate "$d/model.safetensors" --tune-sets "$(without "$2")" --sampler-chains 1 \
    --sampler-steps 5 --threads 2 --out "$d/calibrated.safetensors" > "$d/calibrate.log" 2>&1
  $JEM eval "$d/calibrated.safetensors" --no-attack --sample-steps 0 --threads 2 --out-dir "$d"
}
BASELINE=${BASELINE:-models/fmnist-baseline.safetensors}
mkdir -p runs/oe
run g1 "$(without $G1)"
run g2 "$(without $G2)"
run g3 "$(without $G3)"
evaluate g1 $G1
evaluate g2 $G2
evaluate g3 $G3
if [ "${ALL_SETS_RUN:-0}" = 1 ]; then # the recipe's OE stage trains this one
  run all "$ALL"
fi
