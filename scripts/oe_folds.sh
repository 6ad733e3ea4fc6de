#!/bin/sh
# Outlier-exposure fine-tunes of run 16 (model card, "Outlier exposure"):
# three fold models, each trained on the OOD sets of the two other groups,
# and the model trained on every tuning set.  Resumable: rerun it after an
# interruption.  Run from the repository root after `make ood-sets`, e.g.
#   nohup nice -n 5 scripts/oe_folds.sh > runs/oe.log 2>&1 &
# A fold's figures: calibrate it without its group (jem calibrate MODEL
# --tune-sets <the other sets> --out CAL), then `jem eval CAL --no-attack
# --sample-steps 0` reports the share of each held-out set the verdict flags.
set -e
JEM=${JEM:-build/jem}
WARM=${WARM:-models/fmnist-jem.safetensors}  # run 16: this file until OE ships; scripts/train_fmnist.sh
                                              # rebuilds it as runs/fmnist16-jem/model.safetensors
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
mkdir -p runs/oe
run g1 "$(without $G1)"
run g2 "$(without $G2)"
run g3 "$(without $G3)"
run all "$ALL"
