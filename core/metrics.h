/* metrics.h - evaluation metrics and attacks behind `jem eval` and
 * `jem calibrate` (core/eval_metrics.c, core/eval.c).  Part of libjem.a but
 * not of the serving API in jem.h: the CLI and the tests include it.
 *
 * Conventions:
 * - Classification metrics take raw logits [n,K] and labels [n].
 * - OOD ranking metrics take two score arrays, `pos` (in-distribution, the
 *   POSITIVE class) and `neg` (out-of-distribution), oriented so that a
 *   HIGHER score means MORE in-distribution.  Callers negate or transform a
 *   raw score (energy, grad_norm, ...) into that orientation first.
 * - Ties are handled as scikit-learn does: AUROC counts a tied (pos, neg) pair
 *   as 1/2 (roc_auc_score), average precision puts tied scores at one
 *   threshold (average_precision_score).
 * - Functions that can fail return 0 or a negative JEM_E* code and write a
 *   sentence into (err, errlen).
 */
#ifndef JEM_METRICS_H
#define JEM_METRICS_H

#include "jem.h"
#include "train.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Classification and calibration (core/eval_metrics.c)                     */

/* Fraction of rows whose argmax (first maximum) equals y. */
double jem_accuracy(const float *logits, const int *y, int n, int k);

/* Mean negative log-likelihood of y under softmax(logits / T), T > 0. */
double jem_nll(const float *logits, const int *y, int n, int k, double temperature);

/* Expected calibration error with equal-width bins, as JEM++'s ECELoss:
 * bin b covers confidences in (b/B, (b+1)/B], confidence = max tempered
 * probability, ECE = sum_b |acc_b - conf_b| * n_b / n.  The per-bin data is
 * what a reliability diagram draws. */
#define JEM_ECE_MAX_BINS 100
typedef struct jem_calib {
  int nbins;
  int n;                          /* samples counted */
  double ece;
  double mce;                     /* largest gap over non-empty bins */
  int count[JEM_ECE_MAX_BINS];
  double conf[JEM_ECE_MAX_BINS];  /* mean confidence (0 when empty) */
  double acc[JEM_ECE_MAX_BINS];   /* accuracy (0 when empty) */
} jem_calib;

/* From per-sample confidences in [0,1] and correctness (0/1). */
int jem_ece_from_conf(const double *conf, const int *correct, int n, int nbins,
                      jem_calib *out, char *err, size_t errlen);
/* From logits and labels at temperature T. */
int jem_ece(const float *logits, const int *y, int n, int k, double temperature,
            int nbins, jem_calib *out, char *err, size_t errlen);

/* Temperature scaling: the T minimising jem_nll on (logits, y).  NLL is
 * convex in 1/T, so a golden-section search over log(1/T) in
 * [log 1e-3, log 1e3] finds the global minimum (to ~1e-9 relative). */
double jem_fit_temperature(const float *logits, const int *y, int n, int k);

/* ------------------------------------------------------------------------ */
/* OOD ranking metrics (core/eval_metrics.c)                                */

/* Area under the ROC curve, P(s_pos > s_neg) + 1/2 P(s_pos == s_neg). */
double jem_auroc(const double *pos, int npos, const double *neg, int nneg);
/* Average precision with `pos` as the positive class (sklearn's definition:
 * sum over distinct thresholds of (R_i - R_{i-1}) * P_i). */
double jem_average_precision(const double *pos, int npos, const double *neg,
                             int nneg);
/* False-positive rate at the highest threshold t whose true-positive rate
 * (fraction of pos with s >= t) reaches `tpr`; FPR = fraction of neg with
 * s >= t. */
double jem_fpr_at_tpr(const double *pos, int npos, const double *neg, int nneg,
                      double tpr);

typedef struct jem_ood_metrics {
  double auroc;     /* in-distribution positive */
  double aupr_in;   /* average precision, in-distribution positive */
  double aupr_out;  /* average precision, OOD positive (scores negated) */
  double fpr95;     /* FPR at 95% TPR of the in-distribution set */
} jem_ood_metrics;
/* All four at once (one sort).  NaN scores are an error. */
int jem_ood_metrics_compute(const double *pos, int npos, const double *neg,
                            int nneg, jem_ood_metrics *out, char *err,
                            size_t errlen);

/* nq quantiles of v[0..n) at probabilities 0, 1/(nq-1), ..., 1, with
 * linear interpolation between order statistics (numpy's default).  NaN
 * values are an error.  nq >= 2, n >= 1. */
int jem_quantiles(const float *v, int n, int nq, float *q, char *err,
                  size_t errlen);

/* Median of v[0..n) (mean of the two middle values for even n). */
double jem_median(const double *v, int n);

/* ------------------------------------------------------------------------ */
/* Gaussian fits and the Frechet distance (core/eval_metrics.c, dsyev)      */

/* Mean [d] and unbiased covariance [d,d] (divided by n-1) of x [n,d]. */
int jem_gaussian_fit(const float *x, int n, int d, double *mu, double *cov,
                     char *err, size_t errlen);

/* In place: a [d,d] symmetric positive semi-definite -> its symmetric
 * square root V diag(sqrt(max(l,0))) V^T. */
int jem_sqrtm_psd(double *a, int d, char *err, size_t errlen);

/* ||mu1-mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^{1/2}), with the trace
 * term computed in symmetric form as sum sqrt(eig(C1^{1/2} C2 C1^{1/2})). */
int jem_frechet_distance(const double *mu1, const double *c1, const double *mu2,
                         const double *c2, int d, double *out, char *err,
                         size_t errlen);
/* Gaussian fits of two feature sets a [na,d], b [nb,d], then the distance. */
int jem_frechet_features(const float *a, int na, const float *b, int nb, int d,
                         double *out, char *err, size_t errlen);

/* ------------------------------------------------------------------------ */
/* PGD attacks on the cross-entropy loss (core/eval.c)                      */

/* Inputs live in model space [-1,1]; eps and step are in model units (a
 * radius r in [0,1] pixel units is 2r here).  The first and last `pad`
 * rows and columns of each image (the padding added by preprocessing) are
 * never perturbed.  L-inf: random start U(-eps,eps), steps of
 * step*sign(grad); L2: start at x, steps of step*grad/||grad||; after each
 * step the perturbation is projected onto the eps-ball and x onto [-1,1]. */
enum { JEM_PGD_LINF = 0, JEM_PGD_L2 = 2 };
typedef struct jem_pgd_params {
  int norm;       /* JEM_PGD_LINF or JEM_PGD_L2 */
  float eps;      /* radius, model units */
  float step;     /* step size, model units */
  int steps;      /* >= 0 */
  int pad;        /* untouched border width, pixels */
  int random_start;
} jem_pgd_params;

/* Writes the adversarial images into xadv [n,C,S,S] (x is not modified) and,
 * when correct != NULL, correct[i] = (argmax f(xadv_i) == y_i).  Runs in
 * chunks of jem_ws_max_batch(ws); the random start draws from `rng` in
 * image order.  Gradient: jem_forward + jem_backward with dL/dlogits =
 * softmax(logits) - onehot(y) (the cross-entropy, untempered). */
int jem_pgd_attack(jem_ws *ws, const jem_model *m, const float *x,
                   const int *y, int n, const jem_pgd_params *p,
                   jem_rng *rng, float *xadv, int *correct, char *err,
                   size_t errlen);

/* ------------------------------------------------------------------------ */
/* Scoring a whole set (core/eval.c)                                        */

/* Per-image outputs for n images, computed in chunks of the workspace's
 * max batch.  score[JEM_SCORE_*] are the raw scores as jem_score_batch
 * defines them (grad_norm NaN without want_grad; energy_complexity NaN
 * without the model's complexity_weight); feat [n, nfeat] the
 * penultimate features when want_feat.  noise > 0 adds N(0, noise^2) to
 * each input first (JEM's evaluation noise), drawn from jem_rng stream
 * (seed, image index), so a result never depends on the chunking. */
typedef struct jem_set_scores {
  int n, k, nfeat;
  float *logits;                  /* [n, k] */
  float *score[JEM_NUM_SCORES];   /* [n] each */
  float *feat;                    /* [n, nfeat] or NULL */
} jem_set_scores;
int jem_eval_score_set(jem_ws *ws, const jem_model *m, const float *x, int n,
                       int want_grad, int want_feat, float noise, uint64_t seed,
                       jem_set_scores *out, char *err, size_t errlen);
void jem_set_scores_free(jem_set_scores *s); /* NULL ok; zeroes it */

/* Continuous form of the verdict rule of jem_ood_eval: the smallest
 * in-distribution tail probability over the used scores (side high: 1-p,
 * low: p, two-sided: 2 min(p, 1-p), p = percentile).  jem_ood_eval flags an
 * input at level tpr exactly when this falls below (1-tpr)/n_used, so it is
 * the statistic whose AUROC describes the rule.  Higher = more
 * in-distribution; NaN when the rule uses no score with a value. */
double jem_ood_rule_stat(const jem_ood_stats *s, const float value[JEM_NUM_SCORES]);

/* ------------------------------------------------------------------------ */
/* OOD test sets (core/eval.c), built by scripts/make_ood_sets.py           */

/* mnist, uniform, gaussian, vflip, interp, constant, letters: files
 * DIR/<name>-images-idx3-ubyte.gz (uint8 28x28, preprocessed like the
 * Fashion-MNIST test set).  The image-file families (photos-skimage,
 * photos-wallpapers, illustrations, icons, procedural, text): folders
 * DIR/<name>/ of PNG and JPEG files of any size, each decoded and
 * preprocessed as a request body is. */
#define JEM_OOD_NSETS 13
extern const char *const jem_ood_set_names[JEM_OOD_NSETS];
/* Loads set `name` from dir for model m (first max_items images in file
 * order, 0 = all); a colour model gets the grey IDX sets with each image's
 * plane repeated.  Returns JEM_EIO with "missing" in err when neither the
 * file nor the folder exists, so callers can skip it. */
int jem_ood_set_load(const char *dir, const char *name, const jem_model *m,
                     int max_items, jem_dataset *out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* JEM_METRICS_H */
