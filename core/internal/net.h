/* net.h - the layer plan of the JEM Wide-ResNet (core/model.c) and the
 * workspace that runs it (core/workspace.c; passes in core/forward.c,
 * scores in core/score.c).  Internal. */
#ifndef JEM_NET_H
#define JEM_NET_H

#include <pthread.h>
#include <stdatomic.h>

#include "conv.h"
#include "internal.h"
#include "norm.h"

/* ------------------------------------------------------------------------ */
/* Layer plan                                                               */

typedef struct jem__block {
  jem__conv c1, c2, sc;
  jem__norm n1, n2;        /* before conv1 and conv2 (kind none: absent) */
  int has_sc;
} jem__block;

struct jem_net {
  int in_c, size, k, feat; /* input channels, image side, classes, 64*widen */
  float leak;
  int norm;                /* JEM_NORM_* */
  jem__norm head;          /* f.bn1, before the final LeakyReLU */
  jem__conv stem;
  int nblocks;
  jem__block *blocks;
  size_t lin_w, lin_b;
  int last_hw;             /* pixels of the last map (64) */
  size_t wf_total;         /* transposed-weight floats of the 3x3 convs */
  size_t wu_total;         /* Winograd-transform floats (forward + input grad) */
  size_t wide_total;       /* floats of the wide layers' transforms */
  _Atomic(float *) wide;   /* those transforms, built by the first
                            * JEM_WS_FIXED_WEIGHTS workspace that runs the
                            * model (jem__net_wide), shared by all */
  size_t max_act;          /* largest activation per image, floats */
};

/* The wide layers' transforms of m (jem__conv_wide_weights for every layer
 * with jem__conv_wide_floats > 0), built on the first call: NULL when the
 * model has no wide layer or memory runs out.  Thread-safe; the weights must
 * not change afterwards. */
const float *jem__net_wide(const jem_model *m);

static inline size_t jem__umax(size_t a, size_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------ */
/* Workspaces                                                               */

/* A batch is split into contiguous slices of images, each with its own
 * activations and scratch, run by the workspace's threads (the caller's
 * thread among them), each taking the next slice left.  Without normalisation
 * layers images never interact, so a slice is a complete small batch.  Slices
 * hold at most SLICE_IMAGES images so that a slice's activations stay in the
 * caches while it runs through the whole network.  The split depends only on
 * the batch size n -- never on the thread count or the workspace's max_batch
 * -- so a batch of n gives the same bits in `jem sample`, a daemon job and
 * any workspace big enough for it. */
#define SLICE_IMAGES 8
typedef struct jem_sub {
  int cap;               /* images this slice can hold */
  int n0, n;             /* its images in the last forward */
  float *x;              /* [C, n, S, S] */
  float **a;             /* nblocks+1 block inputs / outputs, CNHW */
  float **u;             /* nblocks conv1 outputs (pre-activation), CNHW */
  float **t1, **t2, *th; /* with a norm: norm1(a[b]), norm2(u[b]), f.bn1(a[nblocks]) */
  float *g[3];           /* gradient buffers, max_act * cap each */
  float *col;
  size_t col_cap;
  float *dfeat;          /* [cap, F] */
} jem_sub;

/* What a workspace's threads run: one slice of the batch (si) on thread tid
 * (0: the caller's). */
typedef void (*jem__slice_fn)(jem_ws *ws, int si, int tid);

enum { JOB_SLICES = 1, JOB_PARTS, JOB_STOP };

typedef struct jem_helper {
  jem_ws *ws;
  int tid;
  pthread_t th;
  float *dw;             /* private parameter gradient (TRAIN) */
  int dw_used;           /* dw holds this job's gradient */
} jem_helper;

struct jem_ws {
  int max_batch, flags;
  int invariant;         /* jem_ws_set_batch_invariant */
  int n;                 /* batch of the last forward, 0 = none */
  const jem_model *m;    /* model of the last forward */
  /* plan signature, checked against the model at every call */
  int in_c, size, k, nfeat, nblocks, norm;
  size_t max_act, n_weights;
  size_t bytes;
  float *mem;            /* the one scratch block */
  float *feat;           /* [N, F] */
  float *fwhite;         /* [N, F] whitened features (mahalanobis) */
  float *logits, *dlogits, *probs; /* [N, K] */
  float *dx;             /* [N, C, S, S] for jem_score_batch */
  float *wflip;          /* transposed 3x3 weights (derive_weights) */
  /* JEM_WS_FIXED_WEIGHTS: wflip and the Winograd transforms (wino) derived
   * once per model, the one whose uid is derived_uid (0: none yet) */
  float *wino;
  const float *wide;       /* the model's jem__net_wide, or NULL */
  uint64_t derived_uid;
  int nsub;
  jem_sub *sub;

  /* helper threads (threads - 1), started at creation, parked between jobs */
  int nhelpers;
  jem_helper *helpers;
  int sync_ok;           /* mutex and condition variables initialised */
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  unsigned gen;          /* bumped for every job */
  int pending;           /* helpers still busy with the current job */
  int active;            /* threads taking part in the current job */
  atomic_int next;       /* next slice (or part) to hand out */
  int job;               /* JOB_* */
  jem__slice_fn slice_fn; /* JOB_SLICES: what runs on each slice */
  /* JOB_PARTS: jem__par's parts of one layer of a lone slice */
  jem__par_fn par_fn;
  void *par_arg;
  int par_parts;
  /* job arguments */
  const float *jx;
  float *jlogits;
  const float *jdlogits;
  float *jdw, *jdx;
};

/* Runs fn on each of the `used` non-empty slices with up to `threads`
 * threads (core/workspace.c). */
void jem__ws_run(jem_ws *ws, jem__slice_fn fn, int threads, int used);

/* Asserts that ws was planned for m's architecture (core/workspace.c). */
void jem__ws_check(const jem_ws *ws, const jem_model *m);

#endif
