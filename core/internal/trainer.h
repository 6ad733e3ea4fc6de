/* trainer.h - the trainer's state, shared by the training step
 * (core/train.c), the run (core/train_run.c) and its files
 * (core/train_ckpt.c).  Internal to the core;
 * the API is jem_train_run in train.h.
 *
 * A run directory holds ckpt-NNNNNNNN.{safetensors,state} pairs (the model
 * with its whole replay buffer, and the optimiser, data-order and random
 * streams: exact resume), a `checkpoint` file naming the latest complete
 * pair and `checkpoint.prev` the one before (kept as a fallback). */
#ifndef JEM_TRAINER_H
#define JEM_TRAINER_H

#include "train.h"

#include <stddef.h>
#include <stdint.h>

typedef struct jem__train_loader {
  int epoch, pos; /* position in the epoch's permutation */
  int *perm;      /* [n] */
} jem__train_loader;

typedef struct jem__trainer {
  jem_model *m;
  const jem_dataset *tr, *va;
  jem_train_config c;
  int B, K, C, S, rows;
  size_t chw, nw;
  jem_ws *ws;
  float *grad, *am, *av;      /* [nw] gradient and Adam moments */
  float *buf;                 /* replay buffer [buffer_size, chw] */
  jem_class_gauss gauss;      /* JEM_BUFFER_GAUSSIAN: chain starts */
  float *x;                   /* [3B, chw]: labelled, data, samples */
  float *logits, *dlogits;    /* [3B, K] */
  int *ylab, *bidx;           /* [B] */
  jem_rng *chain;             /* [B] SGLD noise streams */
  jem__train_loader ld[2];    /* 0: labelled batch, 1: unlabelled batch */
  /* persisted scalars */
  int iter;
  int64_t adam_t;
  jem_rng aug, brng;
  uint64_t seed_eff;
  float lr_scale;
  int rollbacks;
  double wall_s;
  float best_val, last_val;
  /* runtime */
  int injected;
  int resumes;
} jem__trainer;

/* One iteration's statistics, for the progress lines and log.csv. */
typedef struct jem__step_stats {
  double loss, ce, px, l2, acc, e_data, e_sample, lr;
  double oe, e_out; /* outlier-exposure term and mean outlier energy */
} jem__step_stats;

/* core/train.c */
/* One iteration into ss.  Returns 0, or 1 when it diverged (nothing was
 * updated). */
int jem__train_step(jem__trainer *t, jem__step_stats *ss);
/* The epoch's order of the training set for loader `which`, a pure
 * function of (seed_eff, which, epoch), so resume only needs (epoch, pos). */
void jem__train_make_perm(jem__trainer *t, int which);
/* Seeds the augmentation, buffer and chain streams from seed_eff. */
void jem__train_reseed(jem__trainer *t);
/* A class for a restarted chain: uniform over the classes. */
int jem__train_random_class(const jem__trainer *t, jem_rng *r);
/* A seed derived from a and b. */
uint64_t jem__train_mix(uint64_t a, uint64_t b);

/* core/train_ckpt.c */
/* out = run_dir/name. */
void jem__train_path(const jem__trainer *t, char *out, size_t cap, const char *name);
/* Saves the model, its provenance brought up to date, with a replay buffer
 * of `keep` images (evenly spaced through the training buffer), or the
 * whole buffer when keep < 0. */
int jem__train_save_model(jem__trainer *t, const char *path, int keep, char *err,
                          size_t errlen);
/* Writes the pair for t->iter, then points `checkpoint` at it; keeps the
 * previous pair and removes older ones. */
int jem__train_checkpoint(jem__trainer *t, char *err, size_t errlen);
/* Loads the latest checkpoint of the run directory into t.  Returns 1 when
 * there is none, 0 on success, negative on error. */
int jem__train_load_checkpoint(jem__trainer *t, char *err, size_t errlen);
/* 1 when the run directory has a checkpoint pointer at all; 1 when the
 * pointer names t->iter's pair (jem__train_ckpt_current). */
int jem__train_ckpt_exists(const jem__trainer *t);
int jem__train_ckpt_current(const jem__trainer *t);

#endif
