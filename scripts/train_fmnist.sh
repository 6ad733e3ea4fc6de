#!/usr/bin/env bash
# train_fmnist.sh - the whole Fashion-MNIST recipe, resumable:
#   1. baseline: WRN-10-2 trained with cross-entropy only, in one cosine
#      cycle (runs/$BASE1_RUN-baseline) and, when BASE2_ITERS > 0, a second
#      one warm-started from the first (runs/$BASE_RUN-baseline); the last
#      is the model card's comparison model;
#   2. JEM: warm-started from the baseline run's checkpoint at iteration
#      $WARM_AT (a cross-entropy warm start), then JEM training with SGLD
#      (runs/$RUN-jem).  It starts as soon as that checkpoint exists (run 1
#      ran it beside the rest of the baseline, one BLAS thread each; since
#      run 2 the stages run one after the other on both cores).
#      Because a cross-entropy model meets SGLD samples of very low energy
#      (E ~ -35 to -100 against ~ -8 for data), the JEM stage starts its
#      replay buffer near the data (training images in run 2, draws of
#      per-class Gaussians since run 3), ramps the energy terms in over
#      JEM_PX_RAMP iterations, weighs them by JEM_PX_WEIGHT (official: 1) and
#      keeps the energy L2 penalty small: with the official uniform buffer, an
#      L2 weight of 0.1 and weight 1 the classifier fell from 87% to 44% within
#      250 iterations (runs/fmnist-jem-try1); with the data buffer, L2 0.01
#      and the ramp it still fell to 79% by iteration 125 (fmnist-jem-try2),
#      and with weight 0.3 to 77% by 150 (fmnist-jem-try3, recovering to 80%
#      at 250).  The cause is the size of the unclamped SGLD samples (E down to
#      -100: huge activations, so huge parameter gradients); clamping the
#      chains to [-1,1] (as `jem sample` and the daemon do by default) keeps
#      the classifier at 87% through iteration 100, hence JEM_CLAMP=1.
# Run it again at any time: every stage continues from its last checkpoint,
# finished stages are skipped.  From the repository root:
#
#   nohup nice -n 5 scripts/train_fmnist.sh > runs/train.log 2>&1 &
#
# Settings may be overridden by the environment or by runs/train_fmnist.env
# (sourced when a stage starts, and before every JEM segment so that
# JEM_THREADS can follow the machine's load).  Changing any other setting of a
# stage after it started breaks its resume (refused, or a changed schedule).
# Outputs: runs/<stage>/{ckpt-*,log.csv,best,latest,model}.safetensors;
# models/fmnist-baseline.safetensors and models/fmnist-jem.safetensors are
# refreshed as the stages progress (JEM snapshots only once calibrated, which
# needs the OOD sets of `make ood-sets` in data/ood/).

# Everything lives in functions called from the last line, so editing this
# file never changes a run that is already going (bash reads as it executes).

load_settings() {
  # Run 2 (session 2): WRN-10-2, because WRN-10-1 topped out at 86.8% with
  # cross-entropy alone (run 1, RUN=fmnist, whose settings are in the comments
  # and in checkpoints/fmnist.tar, now in the git history: models/HISTORY.md).
  # The stages now run one after the other
  # on both cores: JEM starts from the finished baseline.
  # Run 3 (session 3) keeps run 2's baseline and warm start and changes only
  # the JEM stage: chains start from per-class Gaussians fitted to the
  # training images (JEM++'s informative initialisation) in a buffer of
  # 1,000, so that every chain is revisited ~20 times before a restart, and
  # the stage runs 2,800 iterations.
  # Run 5 (session 4) gives the baseline a second cosine cycle of 20 epochs
  # (a warm restart from run 2's baseline at half its peak lr: run 2 still
  # underfitted, train accuracy 92% against 91% validation), then runs
  # run 3's JEM stage from it for 2,000 iterations.
  # Run 8 (session 6, shipped until session 8) runs the JEM stage again from run 5's baseline
  # with half the energy weight (0.05) and a weaker energy L2 (0.002), so
  # that the data energies stay near the cross-entropy model's (about -10)
  # instead of being pulled to about -4 (run 7: weight 0.05, L2 0.005).
  # Run 10 (session 7, shipped in session 8) keeps run 8's gap
  # equilibrium (w/2L = 12.5) with weight 0.02 and L2 0.0008: 91.38% test
  # accuracy against run 8's 90.85%.  Run 12 (session 9, shipped until
  # session 11) is run 10 followed by a second cycle with K = 20 (JEM2_*
  # below).  Run 15 (session 11, shipped until session 12) adds run 14's
  # third cycle with SGLD step 0.1 (JEM3_*) and a cross-entropy tail
  # (TAIL_*).  Run 16 (session 12, shipped until session 15) interpolates
  # run 15's weights with the baseline's (WISE_*).  Run 18 (session 15,
  # shipped) is run 16 fine-tuned with outlier exposure (run 17, OE_*) and
  # interpolated with the baseline again (OE_WISE_*).
  RUN=${RUN:-fmnist10}               # JEM stage in runs/$RUN-jem (run 5: fmnist5, run 8: fmnist8)
  BASE1_RUN=${BASE1_RUN:-fmnist2}    # first baseline cycle in runs/$BASE1_RUN-baseline
  BASE_RUN=${BASE_RUN:-fmnist5}      # last baseline cycle (BASE1_RUN without a second)
  DEPTH=${DEPTH:-10}
  WIDEN=${WIDEN:-2}                  # run 1: 1
  SEED=${SEED:-1}
  SIGMA=${SIGMA:-0.03}
  BASE_ITERS=${BASE_ITERS:-12900}    # 15 epochs of 859 batches of 64 (run 1: 8600)
  BASE_LR=${BASE_LR:-1e-3}
  BASE_WARMUP=${BASE_WARMUP:-500}
  BASE_THREADS=${BASE_THREADS:-2}    # run 1: 1
  BASE2_ITERS=${BASE2_ITERS:-17180}  # second cycle: 20 epochs (0: none; runs 1-3)
  BASE2_LR=${BASE2_LR:-5e-4}
  BASE2_WARMUP=${BASE2_WARMUP:-200}
  BASE2_SEED=${BASE2_SEED:-5}
  # the last cycle's checkpoint used as warm start (run 1: 6000)
  if [ "$BASE2_ITERS" -gt 0 ]; then WARM_AT=${WARM_AT:-$BASE2_ITERS}; else WARM_AT=${WARM_AT:-$BASE_ITERS}; fi
  JEM_ITERS=${JEM_ITERS:-2000}       # run 1: 3000, run 2: 600, run 3: 2800
  JEM_SEGMENT=${JEM_SEGMENT:-500}    # models/fmnist-jem.safetensors refresh (run 2: 300, run 3: 700)
  JEM_SEED=${JEM_SEED:-10}           # run 2: 1 (= SEED); runs 3, 5: 3; run 7: 7; run 8: 8; run 9: 9
  JEM_K=${JEM_K:-10}
  JEM_LR=${JEM_LR:-1e-4}
  JEM_WARMUP=${JEM_WARMUP:-100}      # run 1: 200
  JEM_L2=${JEM_L2:-0.0008}           # runs 2-7: 0.005; run 8: 0.002; run 9: 0.001; run 1: 0.01; 0.05 cost 8 points of train accuracy in
                                     # 50 iterations (runs/fmnist2-jem-try1): its pull on
                                     # E_sample ~ -30 dominates at the start
  JEM_BUFFER_INIT=${JEM_BUFFER_INIT:-gaussian}   # run 2: data
  JEM_PX_RAMP=${JEM_PX_RAMP:-200}    # run 1: 500
  JEM_PX_WEIGHT=${JEM_PX_WEIGHT:-0.02}  # runs 2-6: 0.1; runs 7-9: 0.05; official: 1; run 1: 0.3 (cost 6 points, most of it
                                        # in the first 250 iterations)
  JEM_CLAMP=${JEM_CLAMP:-1}             # official: 0 (see the note above)
  JEM_BUFFER=${JEM_BUFFER:-1000}        # run 2: 10000
  JEM_THREADS=${JEM_THREADS:-2}         # run 1: 1
  # A second JEM cosine cycle from the first's final model (0 iterations:
  # none).  Run 12 (session 9, shipped since session 9): 1,000 iterations
  # from run 10 with K = 20 SGLD steps (the official JEM's K), lr 5e-5, the
  # energy terms ramped in over 50 iterations; the same weight and L2.
  # Run 6 (session 5, measured, not shipped) was such a cycle from run 5:
  # RUN=fmnist5 JEM_SEED=3 JEM_PX_WEIGHT=0.1 JEM_L2=0.005 JEM2_ITERS=3200
  # JEM2_RUN=fmnist6 JEM2_SEED=6 JEM2_K=10 JEM2_WARMUP=100 JEM2_PX_RAMP=0.
  JEM2_ITERS=${JEM2_ITERS:-1000}
  JEM2_RUN=${JEM2_RUN:-fmnist12}        # in runs/$JEM2_RUN-jem
  JEM2_LR=${JEM2_LR:-5e-5}
  JEM2_WARMUP=${JEM2_WARMUP:-50}
  JEM2_SEED=${JEM2_SEED:-12}
  JEM2_K=${JEM2_K:-20}
  JEM2_PX_RAMP=${JEM2_PX_RAMP:-50}
  # A third JEM cycle (run 14, session 10) from the second's final model, its
  # chains trained with SGLD step 0.1 instead of 1 (clean samples at that
  # step), half the energy weight and L2 (0 iterations: none).
  JEM3_ITERS=${JEM3_ITERS:-800}
  JEM3_RUN=${JEM3_RUN:-fmnist14}        # in runs/$JEM3_RUN-jem
  JEM3_LR=${JEM3_LR:-5e-5}
  JEM3_WARMUP=${JEM3_WARMUP:-50}
  JEM3_SEED=${JEM3_SEED:-14}
  JEM3_K=${JEM3_K:-20}
  JEM3_PX_RAMP=${JEM3_PX_RAMP:-50}
  JEM3_PX_WEIGHT=${JEM3_PX_WEIGHT:-0.01}
  JEM3_L2=${JEM3_L2:-0.0004}
  JEM3_STEP=${JEM3_STEP:-0.1}
  # A cross-entropy tail (run 15, session 11) from the third cycle's final
  # model: the energy term off, so the classifier recovers the accuracy the
  # step-0.1 cycle cost while the energy keeps most of what it learnt
  # (0 iterations: none; the third cycle's model is then the result).
  TAIL_ITERS=${TAIL_ITERS:-2000}
  TAIL_RUN=${TAIL_RUN:-fmnist15}        # in runs/$TAIL_RUN-jem
  TAIL_LR=${TAIL_LR:-2e-5}
  TAIL_WARMUP=${TAIL_WARMUP:-20}
  TAIL_SEED=${TAIL_SEED:-15}
  # A weight-space interpolation (run 16, session 12) of the tail's model and
  # the cross-entropy model the JEM stages started from (runs/$RUN-jem-
  # warmstart.safetensors, the baseline's final model): WiSE-FT (Wortsman et
  # al., CVPR 2022).  WISE_WEIGHTS are `jem average --weights` for the two, in
  # that order (empty: none; the tail's model is then the result).
  WISE_WEIGHTS=${WISE_WEIGHTS-3,1}
  WISE_RUN=${WISE_RUN:-fmnist16}        # in runs/$WISE_RUN-jem
  # Outlier exposure (run 17, session 15): a cross-entropy fine-tune of the
  # result so far with Liu et al.'s (NeurIPS 2020) energy-bounded loss on the
  # OOD tuning sets of `make ood-sets` (OE_SETS; 0 iterations: none).  The
  # model card's leave-one-group-out folds (scripts/oe_folds.sh) are this
  # stage with one group of sets left out.
  OE_ITERS=${OE_ITERS:-1500}
  OE_RUN=${OE_RUN:-fmnist17}            # in runs/$OE_RUN-jem
  OE_LR=${OE_LR:-2e-5}
  OE_WARMUP=${OE_WARMUP:-50}
  OE_SEED=${OE_SEED:-19}
  OE_SETS=${OE_SETS:-uniform,gaussian,constant,letters,photos-skimage,photos-wallpapers,illustrations,icons,procedural,text}
  OE_WEIGHT=${OE_WEIGHT:-0.1}
  OE_MARGINS=${OE_MARGINS:--10,-3}
  # ... then interpolated with the cross-entropy warm start like run 16
  # (run 18: OE_WISE_WEIGHTS for the two, in that order; empty: none): the
  # fine-tune alone costs half a point of accuracy and letters/MNIST margin.
  OE_WISE_WEIGHTS=${OE_WISE_WEIGHTS-1,1}
  OE_WISE_RUN=${OE_WISE_RUN:-fmnist18}  # in runs/$OE_WISE_RUN-jem
  # The shipped replay buffer (jemd's sample starts): this many per-class
  # Gaussian draws (`jem buffer`, since session 4; before, the last training
  # chains).
  SHIP_BUFFER=${SHIP_BUFFER:-500}
  if [ -f runs/train_fmnist.env ]; then
    # shellcheck disable=SC1091
    . runs/train_fmnist.env
  fi
}

log() { echo "== $(date -u +%FT%TZ) $*"; }

# A private copy of the binary per stage, taken when the stage first starts:
# rebuilding the tree mid-run (or a broken build) must not touch a run.
# (runs/bin/STAGE/jem, so that `pgrep -f 'jem train'` finds the runs.)
stage_bin() {
  local b=runs/bin/${2:-$RUN}-$1/jem
  if [ ! -x "$b" ]; then
    mkdir -p "runs/bin/${2:-$RUN}-$1"
    make -s build/jem >&2
    cp build/jem "$b.tmp" && mv "$b.tmp" "$b"
  fi
  echo "$b"
}

publish() { # publish SRC DST: atomic copy into models/
  cp "$1" "$2.tmp" && mv "$2.tmp" "$2"
}

# One cosine cycle of cross-entropy training: base_cycle STAGE ITERS LR
# WARMUP SEED [WARM_START]
base_cycle() {
  local jem
  jem=$(stage_bin baseline "$1")
  log "baseline $1: WRN-$DEPTH-$WIDEN cross-entropy, $2 iterations, lr $3${6:+, from $6}"
  "$jem" train --run-dir "runs/$1-baseline" --resume --baseline ${6:+--warm-start "$6"} \
    --depth "$DEPTH" --widen "$WIDEN" --name fmnist-baseline \
    --iterations "$2" --lr "$3" --warmup "$4" \
    --schedule cosine --sigma "$SIGMA" --seed "$5" --threads "$BASE_THREADS" \
    --ckpt-every 500 --log-every 100 --eval-every 1000
}

stage_baseline() {
  load_settings
  local first=$BASE1_RUN
  [ "$BASE2_ITERS" -gt 0 ] || first=$BASE_RUN
  base_cycle "$first" "$BASE_ITERS" "$BASE_LR" "$BASE_WARMUP" "$SEED"
  if [ "$BASE2_ITERS" -gt 0 ]; then
    base_cycle "$BASE_RUN" "$BASE2_ITERS" "$BASE2_LR" "$BASE2_WARMUP" "$BASE2_SEED" \
      "runs/$first-baseline/model.safetensors"
  fi
  # calibrated like the JEM, so that the card compares the two verdict rules
  local jem
  jem=$(stage_bin baseline "$BASE_RUN")
  if "$jem" calibrate runs/$BASE_RUN-baseline/model.safetensors \
      --out runs/$BASE_RUN-baseline/calibrated.safetensors --threads "$BASE_THREADS" \
      > runs/$BASE_RUN-baseline/calibrate.log 2>&1; then
    publish runs/$BASE_RUN-baseline/calibrated.safetensors models/fmnist-baseline.safetensors
    log "baseline finished: models/fmnist-baseline.safetensors (calibrated)"
  else
    log "baseline finished; calibration failed (runs/$BASE_RUN-baseline/calibrate.log; OOD" \
        "sets from scripts/make_ood_sets.py); models/fmnist-baseline.safetensors left as it was"
  fi
}

stage_jem() {
  load_settings
  local warm=runs/$RUN-jem-warmstart.safetensors
  local ck
  ck=runs/$BASE_RUN-baseline/$(printf 'ckpt-%08d.safetensors' "$WARM_AT")
  # Wait for the baseline to reach the warm-start point (its checkpoints
  # rotate, so copy this one as soon as it appears).
  while [ ! -f "$warm" ]; do
    if [ -f "$ck" ] && [ -f "${ck%.safetensors}.state" ]; then
      sleep 5 # the pair is written model first, state second
      cp "$ck" "$warm.tmp" && mv "$warm.tmp" "$warm"
      log "JEM warm start: $ck -> $warm"
    elif [ -f runs/$BASE_RUN-baseline/model.safetensors ]; then
      cp runs/$BASE_RUN-baseline/model.safetensors "$warm.tmp" && mv "$warm.tmp" "$warm"
      log "JEM warm start: baseline already past $WARM_AT; using its final model"
    else
      sleep 30
    fi
  done
  jem_cycle "$RUN" "$warm" "$JEM_ITERS" "$JEM_LR" "$JEM_WARMUP" "$JEM_SEED" "$JEM_PX_RAMP" \
    "$JEM_K" "$JEM_PX_WEIGHT" "$JEM_L2" 1
  load_settings
  local last=$RUN
  if [ "$JEM2_ITERS" -gt 0 ]; then
    # a second cosine cycle of the same objective, from the first's final model
    warm_copy "$last" "$JEM2_RUN"
    jem_cycle "$JEM2_RUN" "runs/$JEM2_RUN-jem-warmstart.safetensors" "$JEM2_ITERS" "$JEM2_LR" \
      "$JEM2_WARMUP" "$JEM2_SEED" "$JEM2_PX_RAMP" "$JEM2_K" "$JEM_PX_WEIGHT" "$JEM_L2" 1
    last=$JEM2_RUN
  fi
  load_settings
  if [ "$JEM3_ITERS" -gt 0 ]; then
    warm_copy "$last" "$JEM3_RUN"
    jem_cycle "$JEM3_RUN" "runs/$JEM3_RUN-jem-warmstart.safetensors" "$JEM3_ITERS" "$JEM3_LR" \
      "$JEM3_WARMUP" "$JEM3_SEED" "$JEM3_PX_RAMP" "$JEM3_K" "$JEM3_PX_WEIGHT" "$JEM3_L2" \
      "$JEM3_STEP"
    last=$JEM3_RUN
  fi
  load_settings
  if [ "$TAIL_ITERS" -gt 0 ]; then
    warm_copy "$last" "$TAIL_RUN"
    tail_cycle
    last=$TAIL_RUN
  fi
  load_settings
  if [ -n "$WISE_WEIGHTS" ]; then
    wise_average "$last" "$WISE_RUN" "$WISE_WEIGHTS"
    last=$WISE_RUN
  fi
  load_settings
  if [ "$OE_ITERS" -gt 0 ]; then
    warm_copy "$last" "$OE_RUN"
    oe_cycle
    last=$OE_RUN
    if [ -n "$OE_WISE_WEIGHTS" ]; then
      wise_average "$last" "$OE_WISE_RUN" "$OE_WISE_WEIGHTS"
    fi
  fi
  log "JEM finished"
}

# warm_copy FROM TO: the next stage's warm start, the previous one's final model
warm_copy() {
  local w=runs/$2-jem-warmstart.safetensors
  if [ ! -f "$w" ]; then
    cp "runs/$1-jem/model.safetensors" "$w.tmp" && mv "$w.tmp" "$w"
  fi
}

# ce_cycle STAGE ITERS LR WARMUP SEED CKPT_EVERY EVAL_EVERY [TRAIN_ARGS...]: a
# cross-entropy fine-tune of runs/STAGE-jem-warmstart.safetensors (the tail,
# and the outlier exposure with its --outliers arguments), then buffer,
# calibration and publication as after a JEM cycle.
ce_cycle() {
  local stage=$1 iters=$2 dir=runs/$1-jem jem
  jem=$(stage_bin jem "$stage")
  [ -f "$dir/calibrated-$iters.safetensors" ] && return 0 # done in an earlier call
  "$jem" train --run-dir "$dir" --resume --baseline \
    --warm-start "runs/$stage-jem-warmstart.safetensors" --name fmnist-jem \
    --iterations "$iters" --lr "$3" --warmup "$4" --schedule cosine \
    --sigma "$SIGMA" --seed "$5" --threads "$JEM_THREADS" \
    --ckpt-every "$6" --log-every 50 --eval-every "$7" "${@:8}"
  ship "$jem" "$dir" "$dir/model.safetensors" "$iters"
}

tail_cycle() {
  log "cross-entropy tail $TAIL_RUN: $TAIL_ITERS iterations, lr $TAIL_LR"
  ce_cycle "$TAIL_RUN" "$TAIL_ITERS" "$TAIL_LR" "$TAIL_WARMUP" "$TAIL_SEED" 200 1000
}

oe_cycle() {
  log "outlier exposure $OE_RUN: $OE_ITERS iterations, lr $OE_LR, sets $OE_SETS"
  ce_cycle "$OE_RUN" "$OE_ITERS" "$OE_LR" "$OE_WARMUP" "$OE_SEED" 100 500 \
    --outliers "$OE_SETS" --oe-weight "$OE_WEIGHT" --oe-margins "$OE_MARGINS"
}

# wise_average LAST STAGE WEIGHTS: LAST's final model interpolated with the
# JEM stages' warm start (the baseline's final model) into runs/STAGE-jem,
# then buffer, calibration and publication.
wise_average() {
  local dir=runs/$2-jem jem
  jem=$(stage_bin jem "$2")
  log "WiSE-FT $2: runs/$1-jem/model.safetensors and runs/$RUN-jem-warmstart.safetensors," \
      "weights $3"
  [ -f "$dir/calibrated-0.safetensors" ] && return 0 # done in an earlier call
  mkdir -p "$dir"
  "$jem" average "runs/$1-jem/model.safetensors" "runs/$RUN-jem-warmstart.safetensors" \
    --weights "$3" --out "$dir/model.safetensors"
  ship "$jem" "$dir" "$dir/model.safetensors" 0
}

# One cosine cycle of JEM training in segments of JEM_SEGMENT iterations,
# each followed by a shipped buffer, calibration and (if that worked) a
# refresh of models/fmnist-jem.safetensors:
# jem_cycle STAGE WARM_START ITERS LR WARMUP SEED PX_RAMP K PX_WEIGHT L2 STEP
jem_cycle() {
  local dir=runs/$1-jem jem stop=0 snap
  jem=$(stage_bin jem "$1")
  load_settings
  log "JEM $1: WRN-$DEPTH-$WIDEN, K=$8, step ${11}, $3 iterations, lr $4, energy weight $9," \
      "L2 ${10}, from $2"
  while :; do
    load_settings
    stop=$((stop + JEM_SEGMENT))
    [ "$stop" -gt "$3" ] && stop=$3
    if [ -f "$dir/calibrated-$stop.safetensors" ]; then # done in an earlier call
      [ "$stop" -ge "$3" ] && break
      continue
    fi
    # a finished stage (unpacked from its archive): only its final model ships
    [ "$stop" -lt "$3" ] && [ -f "$dir/model.safetensors" ] && continue
    "$jem" train --run-dir "$dir" --resume \
      --warm-start "$2" --name fmnist-jem \
      --iterations "$3" --stop-at "$stop" --lr "$4" --warmup "$5" \
      --schedule cosine --sigma "$SIGMA" --sgld-steps "$8" --sgld-step-size "${11}" \
      --buffer-size "$JEM_BUFFER" --reinit 0.05 --energy-l2 "${10}" \
      --buffer-init "$JEM_BUFFER_INIT" --px-ramp "$7" --px-weight "$9" --seed "$6" \
      --threads "$JEM_THREADS" $([ "$JEM_CLAMP" = 1 ] && echo --sgld-clamp) \
      --ckpt-every 200 --log-every 25 --eval-every 400 --replay-keep 500
    snap=$dir/latest.safetensors
    [ "$stop" -ge "$3" ] && snap=$dir/model.safetensors
    ship "$jem" "$dir" "$snap" "$stop"
    [ "$stop" -ge "$3" ] && break
  done
}

# ship JEM DIR SNAPSHOT ITERATION: the shipped buffer and calibration, then
# models/fmnist-jem.safetensors.  The daemon serves that file, so only a
# calibrated snapshot (temperature + OOD statistics) may replace it.
ship() {
  local jem=$1 dir=$2
  if "$jem" buffer "$3" --size "$SHIP_BUFFER" --out "$dir/shipped.safetensors" \
      --threads "$JEM_THREADS" > "$dir/calibrate.log" 2>&1 &&
     "$jem" calibrate "$dir/shipped.safetensors" --leave-one-out \
      --out "$dir/calibrated.safetensors" --threads "$JEM_THREADS" \
      >> "$dir/calibrate.log" 2>&1; then
    cp "$dir/calibrated.safetensors" "$dir/calibrated-$4.safetensors"
    publish "$dir/calibrated.safetensors" models/fmnist-jem.safetensors
    log "models/fmnist-jem.safetensors <- $3, calibrated (iteration $4)"
  else
    log "calibration of $3 failed ($dir/calibrate.log; OOD sets from" \
        "scripts/make_ood_sets.py); models/fmnist-jem.safetensors left as it was"
  fi
}

# runs/ is not in git, so a session that ends mid-run leaves its last
# checkpoint in checkpoints/$RUN.tar (scripts/archive_run.sh); a fresh clone
# unpacks it here and every stage resumes from where that session stopped.
restore_archive() {
  load_settings
  if [ ! -e "runs/$RUN-jem/checkpoint" ] && [ ! -e "runs/$BASE_RUN-baseline/checkpoint" ] \
      && [ -f "checkpoints/$RUN.tar" ]; then
    log "restoring runs/ from checkpoints/$RUN.tar"
    tar -xf "checkpoints/$RUN.tar"
    find runs -name '*.safetensors.gz' -exec gunzip -f {} +
  fi
  # each later stage has an archive of its own (checkpoints/fmnist12.tar,
  # fmnist14.tar, fmnist15.tar, fmnist17.tar)
  local stage
  for stage in "$JEM2_RUN:$JEM2_ITERS" "$JEM3_RUN:$JEM3_ITERS" "$TAIL_RUN:$TAIL_ITERS" \
      "$OE_RUN:$OE_ITERS"; do
    local name=${stage%%:*} iters=${stage#*:}
    if [ "$iters" -gt 0 ] && [ ! -e "runs/$name-jem/checkpoint" ] \
        && [ -f "checkpoints/$name.tar" ]; then
      log "restoring runs/ from checkpoints/$name.tar"
      tar -xf "checkpoints/$name.tar"
      find runs -name '*.safetensors.gz' -exec gunzip -f {} +
    fi
  done
}

main() {
  set -euo pipefail
  cd "$(dirname "$0")/.."
  mkdir -p runs models
  restore_archive
  stage_baseline > >(sed -u 's/^/[baseline] /') 2>&1 &
  local base=$!
  stage_jem > >(sed -u 's/^/[jem] /') 2>&1 &
  local jemp=$!
  local rc=0
  wait "$base" || rc=$?
  wait "$jemp" || rc=$?
  log "all stages done (status $rc)"
  return "$rc"
}

main "$@"
exit $?
