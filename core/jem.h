/* jem.h - public API of the JEM inference core (libjem.a).
 *
 * A Joint Energy-based Model (Grathwohl et al., ICLR 2020) is a classifier whose
 * logits f(x) also define an energy: E(x) = -logsumexp_y f(x)[y].  This library
 * evaluates the official JEM Wide-ResNet (wgrathwohl/JEM wideresnet.py + CCF
 * head, with any of its norms) on the CPU: logits, energies, input and parameter gradients,
 * SGLD sampling, safetensors model files, image preprocessing and OOD scores.
 *
 * Usage, the short tour:
 *
 *     jem_blas_setup(argc, argv);                 // first line of main()
 *     jem_model *m; char err[256];
 *     if (jem_model_load(&m, "models/fmnist-jem.safetensors", err, sizeof err))
 *         die(err);
 *     jem_ws *ws = jem_ws_create(m, 64, 0);       // all scratch planned here
 *     jem_scores s = {logits, probs, energy, grad_norm, max_softmax};
 *     jem_score_batch(ws, m, x, n, 1, &s);        // no allocation inside
 *     jem_ws_free(ws); jem_model_free(m);
 *
 * Conventions:
 * - Tensors are float32, NCHW, contiguous.  `n` is the batch size.
 * - A model is read-only once loaded and may be shared by threads; a workspace
 *   (jem_ws) belongs to one thread at a time.
 * - Fallible functions return 0 or a negative JEM_E* code and, where they take
 *   (err, errlen), write a sentence naming the problem.  Hot kernels return void
 *   and check their preconditions with JEM_ASSERT (always on).
 * - Backward functions ACCUMULATE into their gradient outputs.
 * - The core never calls exit().
 */
#ifndef JEM_H
#define JEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define JEM_VERSION "0.1.0"

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */

#define JEM_ERRNO_MAP(XX)                          \
  XX(OK, 0, "success")                             \
  XX(EINVAL, -1, "invalid argument")               \
  XX(ENOMEM, -2, "out of memory")                  \
  XX(EIO, -3, "input/output error")                \
  XX(EFORMAT, -4, "malformed file or data")        \
  XX(ESHAPE, -5, "shape mismatch")                 \
  XX(EBUSY, -6, "resource busy")                   \
  XX(ETOOBIG, -7, "input exceeds a limit")         \
  XX(EUNSUPPORTED, -8, "unsupported input")        \
  XX(EINTERNAL, -9, "internal error")

enum {
#define XX(name, val, msg) JEM_##name = (val),
  JEM_ERRNO_MAP(XX)
#undef XX
};

const char *jem_strerror(int code);
const char *jem_err_name(int code); /* "EINVAL", ... */

/* Copies src into dst (cap bytes, NUL included) as valid UTF-8: each byte
 * that does not start a valid sequence becomes U+FFFD, and truncation never
 * splits a character.  Messages that echo user input (paths, names, file
 * names) go through it before they become JSON strings, which must be
 * UTF-8.  Returns the length written. */
size_t jem_utf8_clean(char *dst, size_t cap, const char *src);

void jem__assert_fail(const char *expr, const char *file, int line);
#define JEM_ASSERT(x) \
  do { if (!(x)) jem__assert_fail(#x, __FILE__, __LINE__); } while (0)

/* ------------------------------------------------------------------------ */
/* BLAS (core/blas.c)                                                       */

/* Call first in main().  When OPENBLAS_CORETYPE is unset and the CPU has
 * AVX-512 F/BW/VL/DQ (-> "SkylakeX") or AVX2+FMA (-> "Haswell") while
 * OpenBLAS would pick a slower generic core, sets the variable and re-execs
 * /proc/self/exe with the same argv (OpenBLAS reads it only at load time).
 * Never selects a core the CPU lacks.  Returns 0 (or does not return). */
int jem_blas_setup(int argc, char **argv);
const char *jem_blas_core(void);       /* openblas_get_corename() */
/* Threads per core call (process-wide, default: the number of CPUs).  The
 * core splits a batch into slices of up to 8 images run by helper threads
 * that each workspace starts at jem_ws_create (using the count set then),
 * and keeps OpenBLAS itself single-threaded so the two never oversubscribe
 * the cores.  A batch of one slice runs on the calling thread, which then
 * splits the large matrix products of its im2col layers (WRN-28-10's) over
 * the helpers; results never depend on the thread count. */
void jem_blas_set_threads(int n);
int jem_blas_threads(void);

/* ------------------------------------------------------------------------ */
/* Architecture and parameters (core/model.c)                               */

/* Normalisation layers, the official get_norm (core/norm.c), evaluated
 * with eval-mode semantics: none (the JEM default), BatchNorm2d with its
 * running statistics, InstanceNorm2d(affine), GroupNorm(1, C) ("layer"),
 * ActNorm (y = scale * (x + loc)). */
enum { JEM_NORM_NONE = 0, JEM_NORM_BATCH, JEM_NORM_INSTANCE, JEM_NORM_LAYER, JEM_NORM_ACT,
       JEM_NUM_NORMS };
extern const char *const jem_norm_names[JEM_NUM_NORMS]; /* "none", "batch", ... */
/* JEM_NORM_* of a name, or -1. */
int jem_norm_from_name(const char *name);

typedef struct jem_arch {
  int depth;        /* 6n+4 */
  int widen;        /* k >= 1 */
  int in_channels;  /* 1 or 3 */
  int image_size;   /* 32 (must make the last map 8x8) */
  int num_classes;  /* >= 1 */
  float leak;       /* LeakyReLU slope, 0.2 in JEM */
  int norm;         /* JEM_NORM_*, 0 (none) when left out of an initialiser */
} jem_arch;

/* Checks every field; writes why not into err. */
int jem_arch_validate(const jem_arch *a, char *err, size_t errlen);

#define JEM_PARAM_NAME_MAX 64
typedef struct jem_param {
  char name[JEM_PARAM_NAME_MAX]; /* official CCF state_dict name */
  int ndim;                      /* 1, 2 or 4 */
  int shape[4];
  size_t numel;
  size_t offset;                 /* in floats, into jem_model.weights */
} jem_param;

/* Canonical parameter table for an architecture, in this order:
 *   f.conv1.{weight,bias}
 *   for L in 1..3, i in 0..n-1:
 *     f.layerL.i.bn1.*, f.layerL.i.conv1.{weight,bias},
 *     f.layerL.i.bn2.*, f.layerL.i.conv2.{weight,bias},
 *     f.layerL.i.shortcut.0.{weight,bias}   (when stride!=1 or in!=out)
 *   f.bn1.*
 *   class_output.{weight,bias}
 * Conv weights are [out,in,kh,kw]; class_output.weight is [K, 64*widen].
 * The norm tensors (bn*.*) exist only with a norm: {weight, bias,
 * running_mean, running_var} [C] for batch, {weight, bias} [C] for instance
 * and layer, {scale, loc} [1,C,1,1] for act.
 * Returns the count; fills up to `cap` entries of `out` (out may be NULL). */
int jem_arch_params(const jem_arch *a, jem_param *out, int cap);

/* Preprocessing: how an image file becomes the model input (core/image.c).
 * JSON form in the metadata (all keys optional):
 *   {"channels": 1, "resize": [28, 28], "pad": 2, "pad_value": 0.0,
 *    "background": 0.0, "range": [-1, 1], "invert": false}
 * Steps: decode -> upright by the EXIF Orientation tag -> composite alpha over `background` -> grey (BT.601 luma) or
 * RGB -> area-resize to resize_w x resize_h -> values in [0,1] -> optional
 * invert -> pad by `pad` with pad_value -> map [0,1] to [range_lo, range_hi].
 * Default: resize to image_size, pad 0, range [-1,1]. */
typedef struct jem_preprocess {
  int channels;
  int resize_w, resize_h;
  int pad;
  float pad_value, background;
  float range_lo, range_hi;
  int invert;
} jem_preprocess;

/* OOD statistics (core/ood.c, parsed by core/meta.c).  JSON form under
 * metadata key "ood":
 *   {"scores": {"energy":      {"quantiles": [q_0, ..., q_m], "side": "high"},
 *               "grad_norm":   {"quantiles": [...], "side": "two-sided"},
 *               "max_softmax": {"quantiles": [...], "side": "unused"},
 *               "energy_complexity": {...}},
 *    "complexity_weight": 0.005,
 *    "tpr": 0.95, "rule": "human-readable description of the verdict rule"}
 * quantiles: ascending, at evenly spaced probabilities 0, 1/m, ..., 1 of the
 * in-distribution validation values (2 <= m+1 <= JEM_OOD_MAX_QUANTILES).
 * side: "high" (high values are OOD), "low", "two-sided", "unused".
 *
 * OOD statistics.  Scores: energy (= -logsumexp f), grad_norm
 * (||d logsumexp f / dx||_2), max_softmax (untempered) and energy_complexity
 * = energy - complexity_weight * bits, where bits is the input's length
 * after lossless compression (jem_input_complexity_bits).  It is the
 * input-complexity correction of Serra et al. (ICLR 2020): a density model
 * gives simple images high likelihood whatever they show (Nalisnick et al.,
 * ICLR 2019: FashionMNIST models and MNIST), and subtracting a generic
 * compressor's code length cancels that bias.  A JEM's energy is not a
 * normalised likelihood, so the weight is fitted by jem calibrate (never on
 * MNIST); without it the score is NaN.  mahalanobis is the squared
 * distance of the input's penultimate features to the nearest class mean
 * under the shared covariance of the training features (Lee et al.,
 * NeurIPS 2018), NaN when the model has no feature Gaussian
 * (jem_model.feat_mean).  For each score the
 * metadata stores quantiles of its in-distribution validation values; the
 * percentile of a value is the empirical CDF (interpolated), in [0,1]. */
enum { JEM_SCORE_ENERGY = 0, JEM_SCORE_GRAD_NORM, JEM_SCORE_MAX_SOFTMAX,
       JEM_SCORE_ENERGY_COMPLEXITY, JEM_SCORE_MAHALANOBIS, JEM_NUM_SCORES };
extern const char *const jem_score_names[JEM_NUM_SCORES];
/* The side on which each score marks OOD by its definition: +1 (high
 * energy, gradient norm, energy_complexity, mahalanobis) or -1 (low
 * max_softmax). */
extern const int jem_score_conventional_side[JEM_NUM_SCORES];

#define JEM_OOD_MAX_QUANTILES 1001
typedef struct jem_ood_stats {
  int present;                     /* 0: the model has no statistics */
  int nq[JEM_NUM_SCORES];          /* number of quantiles, 0 = none */
  float q[JEM_NUM_SCORES][JEM_OOD_MAX_QUANTILES]; /* ascending, evenly spaced
                                                      probabilities 0..1 */
  /* Verdict rule: OOD when any used score falls outside its acceptance
   * region at the per-score level t' = 1-(1-tpr)/n_used. side: +1 = high
   * values are OOD, -1 = low values are OOD, 2 = two-sided, 0 = unused. */
  int side[JEM_NUM_SCORES];
  /* The rule for inputs scored without a gradient (grad=false), in the same
   * form: applied when a score `side` uses is missing (NaN).  has_nograd = 0
   * when the model stores none (then the missing score is left out). */
  int has_nograd;
  int side_nograd[JEM_NUM_SCORES];
  float complexity_weight;         /* nats per bit for energy_complexity; NaN: none */
  float default_tpr;               /* 0.95 */
  char rule[512];                  /* human-readable description */
  char rule_nograd[512];
} jem_ood_stats;

typedef struct jem_ood_result {
  float value[JEM_NUM_SCORES];
  float percentile[JEM_NUM_SCORES]; /* NaN when no statistics (or score skipped) */
  int is_ood;                       /* -1: unknown (no statistics), 0, 1 */
  float tpr;
  const char *rule;                 /* the rule applied; NULL without statistics */
} jem_ood_result;

/* value[] holds the raw scores; a NaN value (e.g. grad skipped) switches to
 * the no-gradient rule when the model has one, else it is left out. */
/* "high", "low", "two-sided" or "unused": the JSON name of a side value. */
const char *jem_ood_side_name(int side);
void jem_ood_eval(const jem_ood_stats *s, const float value[JEM_NUM_SCORES],
                  float tpr, jem_ood_result *out);
/* The sides jem_ood_eval applies to value[] (the no-gradient rule's when a
 * score of the main rule is NaN and the model has one); *rule (if not NULL)
 * gets that rule's description. */
const int *jem_ood_rule_for(const jem_ood_stats *s, const float value[JEM_NUM_SCORES],
                            const char **rule);
float jem_ood_percentile(const float *q, int nq, float value);

/* ------------------------------------------------------------------------ */
/* Model (core/model.c, core/safetensors.c, core/meta.c)                    */

typedef struct jem_net jem_net; /* layer plan derived from the arch (private) */
typedef struct json_t json_t;   /* jansson */

/* SGLD settings (core/sgld.c, core/meta.c); jem_sgld_run is below. */
typedef struct jem_sgld_params {
  float step_size;  /* alpha */
  float noise;      /* sigma */
  int clamp;        /* clamp x to [-1,1] after each step */
} jem_sgld_params;
/* The sampling defaults of contracts.md (step size 1.0, noise 0.01, clamp on,
 * 100 steps): what jobs and `jem sample` use for a model without sampler
 * settings of its own (jem_model.sampler).  Training's chains have theirs. */
#define JEM_SAMPLER_STEPS 100
void jem_sgld_defaults(jem_sgld_params *p);

/* Sampler settings that suit a model, metadata "sampler" (written by `jem
 * calibrate`, which chooses them by measurement):
 *   {"step_size": 0.1, "noise": 0.01, "steps": 100, "clamp": true,
 *    "calibration": {...free form: how they were chosen...}}
 * Every key but "calibration" is required.  Without the block: the defaults
 * above, from_model = 0. */
typedef struct jem_sampler {
  int from_model;       /* 1: read from the metadata */
  jem_sgld_params sgld;
  int steps;
} jem_sampler;
/* {"step_size", "noise", "steps", "clamp", "source": "model"|"default"}, as
 * jemd's /v1/models and `jem info --json` show it (new reference). */
json_t *jem_sampler_to_json(const jem_sampler *s);

typedef struct jem_model {
  jem_arch arch;
  int n_params;
  jem_param *params;       /* canonical table, n_params entries */
  float *weights;          /* one 64-byte-aligned block of n_weights floats */
  size_t n_weights;

  /* metadata, with defaults filled in */
  char name[128];
  char **classes;          /* num_classes strings */
  float temperature;       /* > 0 */
  jem_preprocess pre;
  jem_ood_stats ood;
  jem_sampler sampler;     /* the defaults when the metadata has none */
  json_t *meta;            /* the whole "jem" metadata object (owned) */

  float *replay;           /* optional replay buffer [replay_n, C, S, S] */
  int replay_n;
  /* Set by jem_replay_label (else NULL): buffer indices grouped by the
   * model's predicted class, class c at replay_order[replay_first[c] ..
   * replay_first[c+1]). */
  int *replay_order;
  int *replay_first;       /* [num_classes + 1] */

  /* Class-conditional Gaussian of the penultimate features with a shared
   * covariance, fitted by jem calibrate on the training split (the
   * mahalanobis score), or NULL: class means [K, F] and the whitener W
   * [F, F], lower triangular with W^T W = inverse covariance, so the
   * distance is |W (f - mean_k)|^2.  Set with jem_model_set_feature_gauss;
   * stored as tensors ood.feature_mean and ood.feature_whitener. */
  float *feat_mean, *feat_whiten;
  float *feat_wmean;       /* W mean_k, [K, F], derived */

  jem_net *net;            /* private plan */
  uint64_t uid;            /* unique in the process, set at creation (workspace caches) */
} jem_model;

/* A model with the architecture's parameters zeroed and default metadata. */
int jem_model_create(jem_model **out, const jem_arch *a, char *err, size_t errlen);
/* PyTorch default init (kaiming_uniform(a=sqrt(5)) for weights,
 * U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for biases), from `seed`. */
void jem_model_init_random(jem_model *m, uint64_t seed);
void jem_model_free(jem_model *m);              /* NULL ok */
const jem_param *jem_model_param(const jem_model *m, const char *name);
/* Copies a feature Gaussian (mean [K,F], whiten [F,F] as in jem_model, F =
 * 64*widen) into m, or removes it when mean is NULL.  Values must be finite
 * and the whitener lower triangular with a positive diagonal. */
int jem_model_set_feature_gauss(jem_model *m, const float *mean, const float *whiten,
                                char *err, size_t errlen);
/* Fits the feature Gaussian to features feat [n, F] of labelled images y
 * (each in 0..K-1) and sets it on m: per-class means and one covariance of
 * the deviations from them, plus a small ridge (core/gauss.c). */
int jem_model_fit_feature_gauss(jem_model *m, const float *feat, const int *y, int n,
                                char *err, size_t errlen);
/* Re-derive name/classes/temperature/pre/ood from m->meta after editing it. */
int jem_model_apply_meta(jem_model *m, char *err, size_t errlen);
/* The metadata's "arch" object <-> jem_arch (core/meta.c).  from_json wants
 * every key (family "wrn", depth, widen, in_channels, image_size, num_classes
 * as JSON integers, leak a number; norm, one of jem_norm_names, may be left
 * out for "none"), rejects unknown keys and
 * runs jem_arch_validate.  to_json returns a new reference (NULL on OOM). */
int jem_arch_from_json(const json_t *j, jem_arch *a, char *err, size_t errlen);
json_t *jem_arch_to_json(const jem_arch *a);

/* safetensors I/O.  The loader validates everything and never crashes. */
#define JEM_MAX_HEADER_BYTES (16u << 20)
int jem_model_load(jem_model **out, const char *path, char *err, size_t errlen);
int jem_model_load_mem(jem_model **out, const void *buf, size_t len,
                       const char *default_name, char *err, size_t errlen);
/* Writes weights, replay buffer (if any) and m->meta as __metadata__["jem"].
 * Writes to path.tmp then renames, so readers never see a partial file. */
int jem_model_save(const jem_model *m, const char *path, char *err, size_t errlen);

/* ------------------------------------------------------------------------ */
/* Workspaces and compute (core/workspace.c, core/forward.c, core/score.c)  */

typedef struct jem_ws jem_ws;

enum {
  JEM_WS_TRAIN = 1,         /* also plan parameter-gradient scratch */
  /* The caller promises that a model's weights do not change while it is
   * used with this workspace (serving, sampling, evaluation; not training).
   * The workspace then derives the transposed and Winograd-transformed
   * weights once per model (by jem_model.uid) instead of in every call. */
  JEM_WS_FIXED_WEIGHTS = 2,
  /* With JEM_WS_FIXED_WEIGHTS: leave the wide 3x3 layers (weights over 96K
   * floats: 160 channels and up) on im2col instead of the model's packed
   * Winograd transforms, which such a workspace otherwise builds on first
   * use and every one shares (WRN-28-10: 664 MB, about 4.5 times the
   * weights, for 4.4 times jemd's classify throughput). */
  JEM_WS_NO_WIDE_TRANSFORMS = 4
};

/* Plans and allocates all scratch for batches up to max_batch. */
jem_ws *jem_ws_create(const jem_model *m, int max_batch, int flags);
void jem_ws_free(jem_ws *ws);                   /* NULL ok */
int jem_ws_max_batch(const jem_ws *ws);
size_t jem_ws_bytes(const jem_ws *ws);
/* Batch-invariant mode (off at creation): while on, every per-image result
 * of this workspace's calls (logits, features, input gradients, and so the
 * scores and SGLD steps) is bit for bit the same whatever batch the image is
 * in -- its size, its other images, the image's place -- at some cost in
 * speed (sgemm runs image by image).  SGLD sampling (`jem sample`, jemd's
 * jobs, whose chains share batches) runs with it on. */
int jem_ws_set_batch_invariant(jem_ws *ws, int on); /* returns the previous setting */
/* The largest batch, at most max_batch and at least 1, whose workspace
 * (jem_ws_create with these flags, at the current thread count) takes at
 * most `bytes` (jem_ws_bytes).  Whole slices of 8 images cost nothing in
 * speed: a workspace runs batches as slices of up to 8 images anyway, so a
 * big model can run large batches in chunks (jem_score_batch, jem_sgld_run
 * take any n) in a fraction of the memory. */
int jem_ws_batch_within(const jem_model *m, int max_batch, int flags, size_t bytes);
/* What jem_ws_create(m, max_batch, flags) would take (its jem_ws_bytes), at
 * the current thread count, without allocating. */
size_t jem_ws_plan_bytes(const jem_model *m, int max_batch, int flags);

/* Forward pass: logits [n,K].  Keeps the activations in ws for a following
 * jem_backward.  n <= max_batch. */
void jem_forward(jem_ws *ws, const jem_model *m, const float *x, int n,
                 float *logits);

/* Backward of the last jem_forward on this ws, given dL/dlogits [n,K].
 * Accumulates into dweights (n_weights floats, same layout as m->weights)
 * and/or dx ([n,C,S,S]); either may be NULL. dweights needs JEM_WS_TRAIN. */
void jem_backward(jem_ws *ws, const jem_model *m, const float *dlogits,
                  float *dweights, float *dx);

/* dx[i] = d f~(x_i) / d x_i with f~ = logsumexp f (y == NULL, or y[i] < 0:
 * that image's energy) or f[y_i].  Overwrites dx ([n,C,S,S]); writes logits when non-NULL.  n <= max_batch. */
void jem_input_grad(jem_ws *ws, const jem_model *m, const float *x, int n,
                    const int *y, float *logits, float *dx);

/* Length in bits of one model input (C*S*S floats) after lossless deflate
 * (zlib level 9) of its 8-bit quantisation over the preprocessing range
 * [range_lo, range_hi]: a generic estimate of the image's complexity.
 * Deterministic; zlib allocates its own state.  NaN on failure. */
float jem_input_complexity_bits(const jem_model *m, const float *x);
/* energy - weight * bits, or NaN when the model has no weight. */
float jem_energy_complexity(const jem_model *m, float energy, float bits);

/* Per-image quantities.  Any output pointer may be NULL.
 * probs = softmax(logits / T); score[JEM_SCORE_*], the OOD scores as the
 * statistics above define them: energy = -logsumexp(logits); grad_norm
 * (NaN with want_grad=0, when only a forward pass runs); max_softmax =
 * max softmax(logits) (untempered); energy_complexity (the one output that
 * allocates, zlib's state, and only when the model has a weight);
 * mahalanobis.  n may exceed max_batch (processed in chunks). */
typedef struct jem_scores {
  float *logits;      /* [n,K] */
  float *probs;       /* [n,K] tempered */
  int *label;         /* [n] argmax */
  float *confidence;  /* [n] max tempered prob */
  float *score[JEM_NUM_SCORES]; /* [n] each */
} jem_scores;
void jem_score_batch(jem_ws *ws, const jem_model *m, const float *x, int n,
                     int want_grad, const jem_scores *out);

/* Penultimate features of the last jem_forward on this ws: [n, 64*widen]
 * (after the final LeakyReLU and the 8x8 average pool). */
const float *jem_ws_features(const jem_ws *ws);

/* Numerically stable helpers on one row of K logits. */
float jem_logsumexp(const float *z, int k);
void jem_softmax(float *p, const float *z, int k, float temperature);

/* ------------------------------------------------------------------------ */
/* Random numbers and SGLD (core/rng.c, core/sgld.c)                        */

/* Explicit-state generator; one stream per (seed, stream) pair, so chain k
 * of a job with seed S always draws the same numbers. */
typedef struct jem_rng { uint64_t state, inc; int has_spare; float spare; } jem_rng;
void jem_rng_seed(jem_rng *r, uint64_t seed, uint64_t stream);
uint32_t jem_rng_u32(jem_rng *r);
float jem_rng_uniform(jem_rng *r);      /* [0,1) */
float jem_rng_normal(jem_rng *r);       /* N(0,1) */

/* Chain initialisation, chain i drawing from rngs[i]. */
void jem_sgld_init_noise(float *x, int n, size_t chw, jem_rng *rngs);
/* From m->replay: each chain takes a random buffer image, or fresh U(-1,1)
 * noise with probability reinit (or when the model has no buffer).  With
 * y (class-conditional chains) and a labelled buffer (jem_replay_label),
 * chain i takes an image the model classifies as y[i] when there is one. */
void jem_sgld_init_buffer(const jem_model *m, float *x, int n, float reinit,
                          const int *y, jem_rng *rngs);
/* Labels the replay buffer with the model's own predictions, so that
 * class-conditional chains start from images of their class (with a buffer
 * of per-class Gaussian draws, `jem buffer`, each chain then starts near
 * its class).  Once after loading, before m is shared; ws: a workspace of
 * m.  0, or JEM_ENOMEM (the buffer then stays unlabelled). */
int jem_replay_label(jem_model *m, jem_ws *ws);

/* `steps` SGLD steps on x [n,C,S,S] in place:
 *   x <- x + step_size * d f~(x)/dx + noise * N(0,1)   [then clamp]
 * with f~ = logsumexp f (y == NULL) or f[y_i].  n may exceed max_batch.
 * Deterministic for given inputs and rng states. */
/* One Langevin step of one chain given its gradient g = d f~/dx (chw
 * floats): x += step_size g + noise N(0,1) (from rng), clamped when asked.
 * jem_sgld_run is jem_input_grad then this per chain; a caller that batches
 * chains its own way (jemd's jobs) gets the same numbers. */
void jem_sgld_update(float *x, const float *g, size_t chw, const jem_sgld_params *p,
                     jem_rng *rng);
void jem_sgld_run(jem_ws *ws, const jem_model *m, float *x, int n,
                  const int *y, int steps, const jem_sgld_params *p,
                  jem_rng *rngs);

/* Sampling jobs (core/sample.c): the one chain set-up used by `jem sample`
 * and the daemon, so the same seed gives the same samples in both.  Seeds
 * rngs[i] = jem_rng_seed(seed, i) and fills x [n,C,S,S]: uniform noise in
 * [-1,1], replay-buffer images (each chain restarting from noise with
 * probability JEM_SAMPLE_REINIT, as in JEM; with y, class-conditional
 * chains take images of their class, see jem_sgld_init_buffer), or, for
 * GIVEN, leaves the caller's images in x.  Then run jem_sgld_run(ws, m, x, n, y, steps, p,
 * rngs), in one call or several consecutive ones (e.g. to report progress):
 * the chains only depend on x and rngs. */
enum { JEM_SAMPLE_INIT_NOISE = 0, JEM_SAMPLE_INIT_BUFFER = 1, JEM_SAMPLE_INIT_GIVEN = 2 };
#define JEM_SAMPLE_REINIT 0.05f
void jem_sample_init(const jem_model *m, float *x, int n, int init, const int *y,
                     uint64_t seed, jem_rng *rngs);
/* JEM_SAMPLE_INIT_BUFFER when the model has a replay buffer, else NOISE. */
int jem_sample_default_init(const jem_model *m);

/* ------------------------------------------------------------------------ */
/* Images, NumPy and PNG output (core/image.c, core/npy.c)                  */

typedef struct jem_image_limits {
  size_t max_bytes;   /* encoded size cap */
  int max_side;       /* per-axis cap, e.g. 8192 */
  size_t max_pixels;  /* area cap, default 4194304 */
} jem_image_limits;
void jem_image_limits_default(jem_image_limits *l);

/* Width and height from a PNG or JPEG header, after the same checks as
 * jem_image_to_input (magic bytes, chunk/marker walk, the limits), without
 * decoding: lets a caller budget a request's pixels before any work. */
int jem_image_dims(const void *buf, size_t len, const jem_image_limits *lim, int *w, int *h,
                   char *err, size_t errlen);

/* Decodes a PNG or JPEG held in memory and preprocesses it into out
 * ([C,S,S] of the model).  Checks magic bytes, then the header's width,
 * height and area against the limits before decoding anything.
 * Returns JEM_EUNSUPPORTED (not PNG/JPEG), JEM_ETOOBIG, JEM_EFORMAT, or
 * JEM_EINVAL when p does not fit image_size (resize + 2*pad must equal it;
 * resize 0 means image_size - 2*pad).  lim NULL = defaults.  Thread-safe:
 * stb_image's allocations are charged to a per-thread budget. */
int jem_image_to_input(const void *buf, size_t len, const jem_preprocess *p,
                       int image_size, const jem_image_limits *lim,
                       float *out, char *err, size_t errlen);

/* Encodes model-space images (values in [lo,hi] mapped to 0..255, clipped)
 * as one PNG: a grid of `cols` columns (n images, [n,C,S,S]) with a 2-pixel
 * border.  For a single image use n=1, cols=1 (no border).  Returns a
 * malloc'd buffer (free()) and its size, or NULL. */
unsigned char *jem_png_grid(const float *x, int n, int c, int s, int cols,
                            float lo, float hi, size_t *out_len);

/* NumPy .npy (float32, little-endian, C order).  Read returns malloc'd data;
 * shape has ndim entries (ndim <= 4). */
int jem_npy_read_mem(const void *buf, size_t len, float **data, int *ndim,
                     int shape[4], char *err, size_t errlen);
int jem_npy_read(const char *path, float **data, int *ndim, int shape[4],
                 char *err, size_t errlen);
/* Returns a malloc'd .npy image of the tensor. */
unsigned char *jem_npy_encode(const float *data, int ndim, const int *shape,
                              size_t *out_len);

/* Reads a whole file, refusing more than max_bytes.  malloc'd. */
int jem_read_file(const char *path, size_t max_bytes, unsigned char **buf,
                  size_t *len, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* JEM_H */
