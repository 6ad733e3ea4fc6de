/* train.h - datasets (IDX readers) and the JEM trainer of the core (libjem.a).
 *
 * Data (core/data.c):
 *   jem_idx      one IDX tensor (the MNIST-family format), ubyte only
 *   jem_dataset  images as float in model space [n, C, S, S] plus labels
 *
 *     jem_dataset train, valid, test; char err[256];
 *     if (jem_fmnist_load(NULL, JEM_SPLIT_TRAIN, &train, err, sizeof err)) ...
 *     ...
 *     jem_dataset_free(&train);
 *
 * Model space: pixel p (0..255) -> p/255 in [0,1] -> pad each side with
 * `pad` pixels of 0 (background) -> mapped to [-1,1] as 2*v-1.  So the
 * padding is -1 in model space, like the model metadata's
 * {"resize":[28,28],"pad":2,"pad_value":0.0,"range":[-1,1]}.
 *
 * Validation split: a Fisher-Yates permutation of the N training indices
 * driven by splitmix64 seeded with JEM_VALID_SEED (1234); the first n_valid
 * permuted indices are the validation set, the rest the training set, each
 * kept in ascending index order.  The split depends only on (N, n_valid,
 * seed), never on the platform or thread count.
 *
 * Trainer (core/train.c, core/train_run.c, its files in core/train_ckpt.c):
 * see the second half of this header.
 */
#ifndef JEM_TRAIN_H
#define JEM_TRAIN_H

#include "jem.h"

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* IDX files (core/data.c)                                                  */

/* Hard caps applied while parsing (a header may not claim more). */
#define JEM_IDX_MAX_DIMS 4
#define JEM_IDX_MAX_BYTES ((size_t)1 << 30) /* decompressed payload cap */

typedef struct jem_idx {
  int ndim;                     /* 1..4 */
  int dims[JEM_IDX_MAX_DIMS];   /* dims[0] = number of items */
  size_t count;                 /* product of dims */
  unsigned char *data;          /* count bytes (malloc'd) */
} jem_idx;

/* Parses an IDX image held in memory: magic 0x00 0x00 0x08 ndim, big-endian
 * int32 dims, then exactly prod(dims) unsigned bytes.  Only dtype 0x08
 * (ubyte) is accepted.  Checks: length, ndim 1..4, every dim >= 1, product
 * <= max_bytes, payload length exactly equal.  The data is copied. */
int jem_idx_parse(const void *buf, size_t len, size_t max_bytes, jem_idx *out,
                  char *err, size_t errlen);
/* Reads a file, gzip-compressed (detected by its magic) or raw, refusing to
 * decompress more than max_bytes of payload (0 = JEM_IDX_MAX_BYTES). */
int jem_idx_load(const char *path, size_t max_bytes, jem_idx *out, char *err,
                 size_t errlen);
void jem_idx_free(jem_idx *x);  /* NULL ok; zeroes the struct */

/* ------------------------------------------------------------------------ */
/* Datasets (core/data.c)                                                   */

typedef struct jem_dataset {
  int n;            /* images */
  int c, s;         /* channels, side (model space) */
  float *x;         /* [n, c, s, s] in [-1,1] (jem__falloc'd) */
  int *y;           /* [n] labels, or NULL when loaded without labels */
  int num_classes;  /* 1 + max label (0 without labels) */
  int *index;       /* [n] index of each image in its source file, or NULL */
  int src_s;        /* side of the source images before padding */
} jem_dataset;

/* Builds a dataset from an images IDX and (optionally, may be NULL) a labels
 * IDX.  Images: 3 dims [N,H,W] (one channel) or 4 dims, read as [N,C,H,W]
 * when dims[1] is 1 or 3, else as [N,H,W,C] when dims[3] is 1 or 3.  Images
 * must be square with H <= image_size and (image_size - H) even; they are
 * padded to image_size with background.  Labels: 1 dim [N], each value
 * < 256.  max_items (0 = all) keeps only the first max_items. */
int jem_dataset_from_idx(jem_dataset *out, const jem_idx *images,
                         const jem_idx *labels, int image_size, int max_items,
                         char *err, size_t errlen);
/* jem_idx_load + jem_dataset_from_idx. */
int jem_dataset_load(jem_dataset *out, const char *images_path,
                     const char *labels_path, int image_size, int max_items,
                     char *err, size_t errlen);
void jem_dataset_free(jem_dataset *d);   /* NULL ok; zeroes the struct */

/* The documented fixed split (see the top of this file).  Fills valid and
 * train with copies; either may be NULL.  0 < n_valid < src->n. */
#define JEM_VALID_SEED 1234u
#define JEM_VALID_N 5000
int jem_dataset_split(const jem_dataset *src, int n_valid, uint64_t seed,
                      jem_dataset *train, jem_dataset *valid, char *err,
                      size_t errlen);
/* The images of nparts datasets of one shape, in order, without labels. */
int jem_dataset_concat(const jem_dataset *parts, int nparts, jem_dataset *out,
                       char *err, size_t errlen);
/* Copies images [idx[0], idx[1], ...] of src into out. */
int jem_dataset_subset(const jem_dataset *src, const int *idx, int n,
                       jem_dataset *out, char *err, size_t errlen);

/* Per-class Gaussians N(mean_y, cov_y) fitted to a labelled dataset
 * (core/gauss.c): JEM++'s informative initialisation of SGLD chains.  Each
 * covariance gets a 1e-3 ridge (constant padding pixels make it singular);
 * chol holds its lower Cholesky factor.  Images of at most
 * JEM_GAUSS_MAX_DIM values d = C*S*S, and the factors (classes*d*d floats)
 * at most JEM_GAUSS_MAX_BYTES. */
#define JEM_GAUSS_MAX_DIM 4096
#define JEM_GAUSS_MAX_BYTES (1024.0 * 1024 * 1024) /* all classes' factors */
typedef struct jem_class_gauss {
  int classes;
  size_t d;
  float *mean; /* [classes, d] */
  float *chol; /* [classes, d, d], lower triangle */
} jem_class_gauss;
int jem_class_gauss_fit(jem_class_gauss *g, const jem_dataset *ds, char *err, size_t errlen);
/* One draw of class cls into out [d], clamped to [-1,1]. */
void jem_class_gauss_sample(const jem_class_gauss *g, int cls, float *out, jem_rng *r);
void jem_class_gauss_free(jem_class_gauss *g); /* NULL ok; zeroes the struct */

/* Fashion-MNIST as Debian's dataset-fashion-mnist ships it:
 *   DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
 * or, when DIR holds them (jem_cifar10_dir), the CIFAR-10 binary files:
 *   DIR/data_batch_{1..5}.bin (those present) and DIR/test_batch.bin.
 * dir NULL -> $JEM_FMNIST_DIR, else JEM_FMNIST_DIR_DEFAULT.
 * JEM_SPLIT_TRAIN = the training images minus the validation split (55k),
 * JEM_SPLIT_VALID = the 5k validation split, JEM_SPLIT_TRAIN_ALL = all of
 * them (60k), JEM_SPLIT_TEST = the test set (10k).  Fashion-MNIST images
 * are padded 28 -> 32. */
#define JEM_FMNIST_DIR_DEFAULT "/usr/share/datasets/fashion-mnist"
enum { JEM_SPLIT_TRAIN = 0, JEM_SPLIT_VALID, JEM_SPLIT_TRAIN_ALL,
       JEM_SPLIT_TEST };
int jem_fmnist_load(const char *dir, int split, jem_dataset *out, char *err,
                    size_t errlen);
/* CIFAR-10 binary format: records of one label byte (0..9) and 3,072 pixel
 * bytes (the R, G and B 32x32 planes).  Parses nfiles buffers, in order,
 * into one dataset [n, 3, 32, 32] in [-1,1], the official (x-0.5)/0.5. */
int jem_cifar10_parse(jem_dataset *out, const unsigned char *const *bufs, const size_t *lens,
                      int nfiles, char *err, size_t errlen);
/* Whether dir holds data_batch_N.bin or test_batch.bin. */
int jem_cifar10_dir(const char *dir);
extern const char *const jem_cifar10_classes[10];
/* The ten Fashion-MNIST class names, in label order. */
extern const char *const jem_fmnist_classes[10];

/* splitmix64 step: the stateless mixer behind the split and the trainer's
 * data order (kept separate from jem_rng so the split never changes). */
uint64_t jem_splitmix64(uint64_t *state);

/* ------------------------------------------------------------------------ */
/* Trainer (core/train.c, core/train_run.c)                                 */

enum { JEM_LR_CONST = 0, JEM_LR_STEP, JEM_LR_COSINE };
enum { JEM_BUFFER_UNIFORM = 0, JEM_BUFFER_DATA, JEM_BUFFER_GAUSSIAN };

typedef struct jem_train_config {
  /* objective */
  int baseline;        /* 1: cross-entropy only (no SGLD, no p(x) term) */
  int batch;           /* 64: size of each of the two minibatches */
  int iterations;      /* total optimiser steps of the run */
  float px_weight;     /* 1: weight of mean E(x_data) - mean E(x_sgld) */
  float energy_l2;     /* 0: lambda * (mean E_data^2 + mean E_sgld^2) */
  /* data */
  float sigma;         /* 0.03: Gaussian noise added to every data image */
  int crop_pad;        /* 2: random shift by up to this many pixels (0 off) */
  int flip;            /* 1: random horizontal flip */
  /* SGLD with a replay buffer (persistent chains) */
  int sgld_steps;      /* K, 20 */
  float sgld_step;     /* 1.0 */
  float sgld_noise;    /* 0.01 */
  int sgld_clamp;      /* 0 (official): 1 clamps chains to [-1,1] each step */
  int buffer_size;     /* 10000 */
  float reinit;        /* 0.05: probability a chain restarts (from U(-1,1),
                        * or from a class Gaussian with JEM_BUFFER_GAUSSIAN) */
  int buffer_init;     /* JEM_BUFFER_UNIFORM (official), JEM_BUFFER_DATA:
                        * training images + sigma noise, so that a warm-started
                        * classifier does not meet a buffer of pure noise at
                        * once (noise chains still enter through reinit), or
                        * JEM_BUFFER_GAUSSIAN: draws of per-class Gaussians
                        * fitted to the training images, for the buffer and
                        * for every restart (JEM++'s informative init) */
  int px_ramp;         /* 0, or ramp the energy terms' weights (px_weight and
                        * energy_l2) linearly from 0 over this many iterations */
  /* Outlier exposure (Hendrycks et al., ICLR 2019) with the energy-bounded
   * loss of Liu et al. (NeurIPS 2020): each iteration adds B images drawn
   * from `outliers` and oe_weight * (mean relu(E_in - oe_margin_in)^2 over
   * the labelled batch + mean relu(oe_margin_out - E_out)^2 over them). */
  const jem_dataset *outliers; /* NULL: off (model space, labels unused) */
  const char *outlier_sets;    /* their names, for the provenance */
  float oe_weight;             /* 0.1 when outliers are given */
  float oe_margin_in;          /* -10 (near the data's median energy) */
  float oe_margin_out;         /* -3 */
  /* optimiser: Adam with linear warmup then a decay schedule */
  float lr;            /* 1e-4 (peak) */
  float beta1, beta2, adam_eps; /* .9 .999 1e-8 */
  int warmup;          /* 1000 iterations */
  int schedule;        /* JEM_LR_COSINE (to 0 at the end), _STEP, _CONST */
  float decay_rate;    /* _STEP: x0.3 at 80% and again at 90% of the run */
  /* bookkeeping */
  uint64_t seed;       /* 1 */
  int ckpt_every;      /* 500 */
  int log_every;       /* 50 */
  int eval_every;      /* 1000 (0: only at the end) */
  int replay_keep;     /* 500: buffer images kept in the final model file */
  const char *run_dir; /* checkpoints, log.csv, best.safetensors (required) */
  const char *out;     /* final model file (NULL: RUN_DIR/model.safetensors) */
  int resume;          /* 1: continue from RUN_DIR's checkpoint if present */
  int stop_at;         /* 0, or stop (with a checkpoint) at this iteration */
  volatile int *stop;  /* set asynchronously (signal) to checkpoint and stop */
  FILE *progress;      /* progress lines (NULL: silent) */
  /* divergence guard */
  int max_rollbacks;   /* 3 */
  float loss_limit;    /* 1e8 */
  float energy_limit;  /* 1e5: |mean energy| beyond this counts as diverged */
  /* testing hook: the loss of iteration inject_at (and of that iteration
   * again after a rollback) is replaced by NaN, inject_count times */
  int inject_at, inject_count;
} jem_train_config;

void jem_train_defaults(jem_train_config *c);
/* Checks every field; writes why not into err. */
int jem_train_config_check(const jem_train_config *c, char *err,
                           size_t errlen);

typedef struct jem_train_status {
  int iteration;        /* iterations done */
  int finished;         /* reached c->iterations (final model written) */
  int rollbacks;        /* divergence rollbacks so far */
  int resumed_from;     /* checkpoint iteration resumed from, -1 fresh */
  float lr_scale;       /* 0.5^rollbacks */
  float val_acc;        /* last validation accuracy (NaN if none) */
  float best_val_acc;
  double wall_s;        /* training wall time, summed over resumes */
  char final_path[1024];
} jem_train_status;

/* Trains m in place on `train` (labels required), validating on `valid`
 * (may be NULL).  m must be initialised (random or warm start) and carry
 * the metadata the final file should have; the trainer adds
 * provenance.train (the configuration) and provenance.{iterations,
 * wall_seconds, rollbacks, best_val_acc, val_acc}.  With c->resume and a
 * checkpoint in c->run_dir, the weights, replay buffer, metadata, Adam
 * moments, RNG states, data position and guard state are restored and the
 * run continues exactly.  Files in RUN_DIR: ckpt-NNNNNNNN.{safetensors,
 * state} (last two kept), `checkpoint` (name of the latest), log.csv,
 * best.safetensors; the final model goes to c->out.  Returns 0 when
 * finished or stopped cleanly. */
int jem_train_run(jem_model *m, const jem_dataset *train,
                  const jem_dataset *valid, const jem_train_config *c,
                  jem_train_status *st, char *err, size_t errlen);

/* Accuracy of m on d (clean inputs), in batches of ws's max batch; also the
 * mean cross-entropy into *nll when non-NULL. */
float jem_eval_accuracy(jem_ws *ws, const jem_model *m, const jem_dataset *d,
                        float *nll);

#ifdef __cplusplus
}
#endif
#endif /* JEM_TRAIN_H */
