/* test_metrics.c - evaluation metrics against hand-computed values and
 * brute-force references (AUROC, AP, FPR95, ECE, temperature, quantiles,
 * matrix square root, Frechet distance) and PGD invariants. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "jem.h"
#include "metrics.h"

#define NEAR(a, b, tol) assert_true(fabs((double)(a) - (double)(b)) <= (tol))

/* ------------------------------------------------------------------------ */
/* Classification                                                           */

static void test_accuracy_nll(void **state) {
  (void)state;
  /* row 0: p = [1/4, 3/4] (logit gap ln 3); row 1: argmax 0 */
  float z[4] = {0.0f, (float)log(3.0), 2.0f, 1.0f};
  int y[2] = {1, 1};
  NEAR(jem_accuracy(z, y, 2, 2), 0.5, 1e-12);
  double nll1 = -log(0.75);
  double nll2 = log(exp(2.0) + exp(1.0)) - 1.0;
  NEAR(jem_nll(z, y, 2, 2, 1.0), 0.5 * (nll1 + nll2), 1e-6);
  /* T = 2 halves the logits: row 1's nll = lse(1, 0.5) - 0.5 */
  double t2 = 0.5 * ((log(1.0 + sqrt(3.0)) - 0.5 * log(3.0)) +
                     (log(exp(1.0) + exp(0.5)) - 0.5));
  NEAR(jem_nll(z, y, 2, 2, 2.0), t2, 1e-6);
  assert_true(isnan(jem_nll(z, y, 2, 2, 0.0)));
}

static void test_ece_hand(void **state) {
  (void)state;
  double conf[6] = {0.96, 0.97, 0.55, 0.52, 0.05, 1.0};
  int ok[6] = {1, 0, 1, 1, 0, 1};
  jem_calib c;
  char err[128];
  assert_int_equal(jem_ece_from_conf(conf, ok, 6, 20, &c, err, sizeof err), 0);
  /* bin 19 (0.95,1]: conf 0.97667, acc 2/3; bin 10 (0.5,0.55]: conf 0.535,
   * acc 1 (0.55 sits on the upper edge, so it belongs to bin 10);
   * bin 0 (0,0.05]: conf 0.05, acc 0 */
  assert_int_equal(c.count[19], 3);
  assert_int_equal(c.count[10], 2);
  assert_int_equal(c.count[0], 1);
  assert_int_equal(c.count[11], 0);
  NEAR(c.conf[19], (0.96 + 0.97 + 1.0) / 3, 1e-12);
  NEAR(c.acc[10], 1.0, 1e-12);
  double ece = 0.5 * fabs(2.0 / 3 - 2.93 / 3) + (2.0 / 6) * 0.465 + (1.0 / 6) * 0.05;
  NEAR(c.ece, ece, 1e-12);
  NEAR(c.mce, 0.465, 1e-12);
  /* bad inputs */
  double badc[1] = {1.5};
  assert_int_equal(jem_ece_from_conf(badc, ok, 1, 20, &c, err, sizeof err), JEM_EINVAL);
  assert_int_equal(jem_ece_from_conf(conf, ok, 6, 0, &c, err, sizeof err), JEM_EINVAL);
}

static void test_ece_from_logits(void **state) {
  (void)state;
  /* two classes, logit gap ln(.72/.28) -> conf 0.72, bin 14 (0.7,0.75] */
  const float g = (float)log(0.72 / 0.28);
  float z[6] = {0.0f, g, 0.0f, g, 0.0f, g};
  int y[3] = {1, 1, 0};
  jem_calib c;
  char err[128];
  assert_int_equal(jem_ece(z, y, 3, 2, 1.0, 20, &c, err, sizeof err), 0);
  assert_int_equal(c.count[14], 3);
  NEAR(c.ece, fabs(0.72 - 2.0 / 3), 1e-6);
}

/* Deterministic synthetic data. */
static uint64_t rs = 88172645463325252ull;
static double urand(void) {
  rs ^= rs << 13;
  rs ^= rs >> 7;
  rs ^= rs << 17;
  return (double)(rs >> 11) * (1.0 / 9007199254740992.0);
}
static double nrand(void) {
  double u = urand(), v = urand();
  if (u < 1e-300) u = 1e-300;
  return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

static void test_temperature_recovers(void **state) {
  (void)state;
  const int n = 20000, k = 10;
  const double t0 = 2.5;
  float *z = malloc(sizeof(float) * n * k);
  int *y = malloc(sizeof(int) * n);
  for (int i = 0; i < n; i++) {
    double p[10], s = 0.0;
    for (int j = 0; j < k; j++) {
      double v = 2.0 * nrand();
      p[j] = exp(v);
      s += p[j];
      z[i * k + j] = (float)(v * t0); /* overconfident by t0 */
    }
    /* label drawn from the true (untempered) distribution */
    double u = urand() * s, c = 0.0;
    y[i] = k - 1;
    for (int j = 0; j < k; j++) {
      c += p[j];
      if (u < c) { y[i] = j; break; }
    }
  }
  double t = jem_fit_temperature(z, y, n, k);
  NEAR(t, t0, 0.1);
  /* and it is a minimum of the NLL */
  double f = jem_nll(z, y, n, k, t);
  assert_true(f <= jem_nll(z, y, n, k, t * 1.01) + 1e-12);
  assert_true(f <= jem_nll(z, y, n, k, t / 1.01) + 1e-12);
  /* calibrated: ECE after scaling is small, before it is large */
  jem_calib before, after;
  char err[128];
  assert_int_equal(jem_ece(z, y, n, k, 1.0, 20, &before, err, sizeof err), 0);
  assert_int_equal(jem_ece(z, y, n, k, t, 20, &after, err, sizeof err), 0);
  assert_true(after.ece < 0.02);
  assert_true(before.ece > 0.1);
  free(z);
  free(y);
}

/* ------------------------------------------------------------------------ */
/* Ranking metrics                                                          */

static void test_ranking_hand(void **state) {
  (void)state;
  double pos[4] = {0.9, 0.8, 0.5, 0.5};
  double neg[3] = {0.7, 0.5, 0.1};
  /* pairs: 3 + 3 + 2*(0 + 0.5 + 1) = 9 of 12 */
  NEAR(jem_auroc(pos, 4, neg, 3), 0.75, 1e-12);
  /* thresholds 0.9 (R .25, P 1), 0.8 (R .5, P 1), 0.7 (no new TP),
   * 0.5 (R 1, P 4/6) */
  NEAR(jem_average_precision(pos, 4, neg, 3), 0.25 + 0.25 + 0.5 * 4.0 / 6.0, 1e-12);
  /* 95% of 4 positives needs all 4: threshold 0.5 admits 2 of 3 negatives */
  NEAR(jem_fpr_at_tpr(pos, 4, neg, 3, 0.95), 2.0 / 3.0, 1e-12);
  NEAR(jem_fpr_at_tpr(pos, 4, neg, 3, 0.5), 0.0, 1e-12);
  NEAR(jem_fpr_at_tpr(pos, 4, neg, 3, 0.75), 2.0 / 3.0, 1e-12);
  jem_ood_metrics m;
  char err[128];
  assert_int_equal(jem_ood_metrics_compute(pos, 4, neg, 3, &m, err, sizeof err), 0);
  NEAR(m.auroc, 0.75, 1e-12);
  NEAR(m.fpr95, 2.0 / 3.0, 1e-12);
  /* OOD positive, negated: -0.1 (R 1/3, P 1), -0.5 group (R 2/3, P 2/4),
   * -0.7 (R 1, P 3/5) */
  NEAR(m.aupr_out, 1.0 / 3 + 1.0 / 6 + 0.2, 1e-12);
  /* perfect separation and complete reversal */
  double a[2] = {2, 3}, b[2] = {0, 1};
  NEAR(jem_auroc(a, 2, b, 2), 1.0, 0);
  NEAR(jem_auroc(b, 2, a, 2), 0.0, 0);
  NEAR(jem_average_precision(a, 2, b, 2), 1.0, 1e-12);
  /* all tied */
  double t[3] = {1, 1, 1};
  NEAR(jem_auroc(t, 3, t, 2), 0.5, 1e-12);
  NEAR(jem_average_precision(t, 3, t, 2), 0.6, 1e-12);
  /* errors */
  double nanv[1] = {NAN};
  assert_int_equal(jem_ood_metrics_compute(nanv, 1, neg, 3, &m, err, sizeof err), JEM_EINVAL);
  assert_int_equal(jem_ood_metrics_compute(pos, 4, neg, 0, &m, err, sizeof err), JEM_EINVAL);
  assert_true(isnan(jem_auroc(pos, 0, neg, 3)));
}

/* O(n^2) references, straight from the definitions. */
static double brute_auroc(const double *p, int np, const double *q, int nq) {
  double s = 0;
  for (int i = 0; i < np; i++)
    for (int j = 0; j < nq; j++) s += p[i] > q[j] ? 1.0 : (p[i] == q[j] ? 0.5 : 0.0);
  return s / ((double)np * nq);
}
static void counts_at(const double *p, int np, const double *q, int nq, double t,
                      int *tp, int *fp) {
  *tp = *fp = 0;
  for (int i = 0; i < np; i++) *tp += p[i] >= t;
  for (int j = 0; j < nq; j++) *fp += q[j] >= t;
}
static int cmp_desc_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x < y) - (x > y);
}
/* distinct thresholds, descending */
static int thresholds(const double *p, int np, const double *q, int nq, double *t) {
  int n = 0;
  for (int i = 0; i < np; i++) t[n++] = p[i];
  for (int j = 0; j < nq; j++) t[n++] = q[j];
  qsort(t, (size_t)n, sizeof *t, cmp_desc_d);
  int m = 0;
  for (int i = 0; i < n; i++)
    if (i == 0 || t[i] != t[m - 1]) t[m++] = t[i];
  return m;
}
static double brute_ap(const double *p, int np, const double *q, int nq) {
  double *t = malloc(sizeof(double) * (size_t)(np + nq));
  int m = thresholds(p, np, q, nq, t);
  double ap = 0, prev_r = 0;
  for (int i = 0; i < m; i++) {
    int tp, fp;
    counts_at(p, np, q, nq, t[i], &tp, &fp);
    double r = (double)tp / np;
    if (tp + fp > 0) ap += (r - prev_r) * tp / (double)(tp + fp);
    prev_r = r;
  }
  free(t);
  return ap;
}
static double brute_fpr(const double *p, int np, const double *q, int nq, double level) {
  double *t = malloc(sizeof(double) * (size_t)(np + nq));
  int m = thresholds(p, np, q, nq, t);
  double f = NAN;
  for (int i = 0; i < m; i++) {
    int tp, fp;
    counts_at(p, np, q, nq, t[i], &tp, &fp);
    if (tp >= (int)ceil(level * np - 1e-9)) { f = (double)fp / nq; break; }
  }
  free(t);
  return f;
}

static void test_ranking_bruteforce(void **state) {
  (void)state;
  for (int trial = 0; trial < 40; trial++) {
    int np = 1 + (int)(urand() * 120), nq = 1 + (int)(urand() * 90);
    double *p = malloc(sizeof(double) * np), *q = malloc(sizeof(double) * nq);
    /* coarse grid for many ties on even trials, continuous otherwise */
    for (int i = 0; i < np; i++)
      p[i] = trial % 2 ? nrand() + 0.7 : floor(urand() * 8) + (urand() < 0.4);
    for (int j = 0; j < nq; j++)
      q[j] = trial % 2 ? nrand() : floor(urand() * 8);
    NEAR(jem_auroc(p, np, q, nq), brute_auroc(p, np, q, nq), 1e-12);
    NEAR(jem_average_precision(p, np, q, nq), brute_ap(p, np, q, nq), 1e-12);
    NEAR(jem_fpr_at_tpr(p, np, q, nq, 0.95), brute_fpr(p, np, q, nq, 0.95), 1e-12);
    NEAR(jem_fpr_at_tpr(p, np, q, nq, 0.5), brute_fpr(p, np, q, nq, 0.5), 1e-12);
    jem_ood_metrics m;
    char err[64];
    assert_int_equal(jem_ood_metrics_compute(p, np, q, nq, &m, err, sizeof err), 0);
    /* AUPR-out = AP with roles swapped and scores negated */
    for (int i = 0; i < np; i++) p[i] = -p[i];
    for (int j = 0; j < nq; j++) q[j] = -q[j];
    NEAR(m.aupr_out, brute_ap(q, nq, p, np), 1e-12);
    free(p);
    free(q);
  }
}

static void test_quantiles(void **state) {
  (void)state;
  float v[4] = {3, 1, 2, 4}, q[5];
  char err[64];
  assert_int_equal(jem_quantiles(v, 4, 3, q, err, sizeof err), 0);
  NEAR(q[0], 1, 0); NEAR(q[1], 2.5, 1e-6); NEAR(q[2], 4, 0);
  assert_int_equal(jem_quantiles(v, 4, 5, q, err, sizeof err), 0);
  NEAR(q[1], 1.75, 1e-6); NEAR(q[3], 3.25, 1e-6);
  float one = 7;
  assert_int_equal(jem_quantiles(&one, 1, 3, q, err, sizeof err), 0);
  NEAR(q[0], 7, 0); NEAR(q[2], 7, 0);
  float bad[2] = {1, NAN};
  assert_int_equal(jem_quantiles(bad, 2, 3, q, err, sizeof err), JEM_EINVAL);
  assert_int_equal(jem_quantiles(v, 4, 1, q, err, sizeof err), JEM_EINVAL);
  /* consistency with the server's percentile: the median of the values
   * comes out at percentile 0.5 */
  float w[101], qq[11];
  for (int i = 0; i < 101; i++) w[i] = (float)((i * 37) % 101);
  assert_int_equal(jem_quantiles(w, 101, 11, qq, err, sizeof err), 0);
  NEAR(jem_ood_percentile(qq, 11, 50.0f), 0.5, 1e-6);
  double dv[4] = {4, 1, 3, 2};
  NEAR(jem_median(dv, 4), 2.5, 0);
  NEAR(jem_median(dv, 3), 3, 0);
}

/* The continuous rule statistic agrees with jem_ood_eval's verdict. */
static void test_rule_stat(void **state) {
  (void)state;
  static jem_ood_stats st;
  memset(&st, 0, sizeof st);
  st.present = 1;
  st.default_tpr = 0.95f;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    st.nq[k] = 101;
    for (int i = 0; i < 101; i++) st.q[k][i] = (float)(i * (k + 1));
  }
  const int sides[4] = {1, -1, 2, 0};
  for (int combo = 0; combo < 64; combo++) {
    int used = 0;
    for (int k = 0; k < JEM_NUM_SCORES; k++) {
      st.side[k] = sides[(combo >> (2 * k)) & 3];
      used += st.side[k] != 0;
    }
    for (int trial = 0; trial < 50; trial++) {
      float v[JEM_NUM_SCORES];
      for (int k = 0; k < JEM_NUM_SCORES; k++) v[k] = (float)(urand() * 110 * (k + 1) - 5);
      jem_ood_result r;
      jem_ood_eval(&st, v, 0.9f, &r);
      double s = jem_ood_rule_stat(&st, v);
      if (!used) {
        assert_true(isnan(s));
        assert_int_equal(r.is_ood, -1);
        continue;
      }
      double cut = 0.1 / used;
      /* skip values within rounding of the cut, where float and double differ */
      if (fabs(s - cut) < 1e-5) continue;
      assert_int_equal(r.is_ood, s < cut);
    }
  }
  /* no statistics: NaN */
  st.present = 0;
  float v[JEM_NUM_SCORES] = {1, 2, 3};
  assert_true(isnan(jem_ood_rule_stat(&st, v)));
}

/* ------------------------------------------------------------------------ */
/* Matrix square root and Frechet distance                                  */

/* Random orthogonal matrix by Gram-Schmidt of a Gaussian one. */
static void rand_orth(double *qm, int d) {
  for (int i = 0; i < d * d; i++) qm[i] = nrand();
  for (int i = 0; i < d; i++) {
    double *r = qm + i * d;
    for (int j = 0; j < i; j++) {
      double dot = 0;
      for (int t = 0; t < d; t++) dot += r[t] * qm[j * d + t];
      for (int t = 0; t < d; t++) r[t] -= dot * qm[j * d + t];
    }
    double nn = 0;
    for (int t = 0; t < d; t++) nn += r[t] * r[t];
    nn = sqrt(nn);
    for (int t = 0; t < d; t++) r[t] /= nn;
  }
}
/* out = Q^T diag(l) Q (rows of Q are the eigenvectors) */
static void from_eig(double *out, const double *qm, const double *l, int d) {
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++) {
      double s = 0;
      for (int r = 0; r < d; r++) s += qm[r * d + i] * l[r] * qm[r * d + j];
      out[i * d + j] = s;
    }
}

static void test_sqrtm(void **state) {
  (void)state;
  const int d = 60;
  double *a = malloc(sizeof(double) * d * d), *s = malloc(sizeof(double) * d * d);
  double *b = malloc(sizeof(double) * d * d);
  /* A = B B^T + 0.1 I, SPD */
  for (int i = 0; i < d * d; i++) b[i] = nrand();
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++) {
      double v = i == j ? 0.1 : 0.0;
      for (int t = 0; t < d; t++) v += b[i * d + t] * b[j * d + t];
      a[i * d + j] = v;
    }
  memcpy(s, a, sizeof(double) * d * d);
  char err[128];
  assert_int_equal(jem_sqrtm_psd(s, d, err, sizeof err), 0);
  double num = 0, den = 0, asym = 0;
  for (int i = 0; i < d; i++)
    for (int j = 0; j < d; j++) {
      double v = 0;
      for (int t = 0; t < d; t++) v += s[i * d + t] * s[t * d + j];
      num += (v - a[i * d + j]) * (v - a[i * d + j]);
      den += a[i * d + j] * a[i * d + j];
      asym = fmax(asym, fabs(s[i * d + j] - s[j * d + i]));
    }
  assert_true(sqrt(num / den) < 1e-10);
  assert_true(asym < 1e-10);
  /* known eigenvalues: sqrt of Q^T diag(l) Q is Q^T diag(sqrt l) Q */
  double *qm = malloc(sizeof(double) * d * d), l[60], sl[60];
  rand_orth(qm, d);
  for (int i = 0; i < d; i++) { l[i] = 0.01 + i * i; sl[i] = sqrt(l[i]); }
  from_eig(a, qm, l, d);
  from_eig(b, qm, sl, d);
  assert_int_equal(jem_sqrtm_psd(a, d, err, sizeof err), 0);
  double md = 0;
  for (int i = 0; i < d * d; i++) md = fmax(md, fabs(a[i] - b[i]));
  assert_true(md < 1e-9 * d * d);
  free(a); free(s); free(b); free(qm);
}

static void test_frechet(void **state) {
  (void)state;
  const int n = 400, d = 16;
  float *x = malloc(sizeof(float) * n * d), *y = malloc(sizeof(float) * n * d);
  for (int i = 0; i < n * d; i++) x[i] = (float)(nrand() * (1 + (i % d) * 0.2));
  /* correlate the features so the covariance is not diagonal */
  for (int i = 0; i < n; i++)
    for (int j = 1; j < d; j++) x[i * d + j] += 0.5f * x[i * d + j - 1];
  double mu[16], sq = 0, fd;
  for (int j = 0; j < d; j++) { mu[j] = 0.25 * j - 1.0; sq += mu[j] * mu[j]; }
  char err[128];
  assert_int_equal(jem_frechet_features(x, n, x, n, d, &fd, err, sizeof err), 0);
  NEAR(fd, 0.0, 1e-6);
  /* the same sample shifted: equal covariances, distance ||mu||^2 */
  for (int i = 0; i < n; i++)
    for (int j = 0; j < d; j++) y[i * d + j] = x[i * d + j] + (float)mu[j];
  assert_int_equal(jem_frechet_features(x, n, y, n, d, &fd, err, sizeof err), 0);
  NEAR(fd, sq, 1e-4 * sq);
  /* commuting covariances: distance sum (sqrt a - sqrt b)^2 */
  double qm[16 * 16], la[16], lb[16], c1[256], c2[256], z[16] = {0}, ref = 0;
  rand_orth(qm, d);
  for (int i = 0; i < d; i++) {
    la[i] = 0.5 + i;
    lb[i] = 3.0 + 0.3 * i * i;
    ref += (sqrt(la[i]) - sqrt(lb[i])) * (sqrt(la[i]) - sqrt(lb[i]));
  }
  from_eig(c1, qm, la, d);
  from_eig(c2, qm, lb, d);
  assert_int_equal(jem_frechet_distance(z, c1, z, c2, d, &fd, err, sizeof err), 0);
  NEAR(fd, ref, 1e-8 * ref);
  /* non-commuting 2-D case against the closed form
   * tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for 2x2 PSD M = C1 C2 */
  double a2[4] = {2, 0.5, 0.5, 1}, b2[4] = {1, -0.3, -0.3, 3}, m2[4];
  m2[0] = a2[0] * b2[0] + a2[1] * b2[2];
  m2[1] = a2[0] * b2[1] + a2[1] * b2[3];
  m2[2] = a2[2] * b2[0] + a2[3] * b2[2];
  m2[3] = a2[2] * b2[1] + a2[3] * b2[3];
  double trs = sqrt(m2[0] + m2[3] + 2 * sqrt(m2[0] * m2[3] - m2[1] * m2[2]));
  double mu1[2] = {1, 2}, mu2[2] = {0, 0};
  double ref2 = 5 + 3 + 4 - 2 * trs;
  assert_int_equal(jem_frechet_distance(mu1, a2, mu2, b2, 2, &fd, err, sizeof err), 0);
  NEAR(fd, ref2, 1e-10);
  /* too few samples */
  assert_int_equal(jem_frechet_features(x, 1, y, n, d, &fd, err, sizeof err), JEM_EINVAL);
  free(x);
  free(y);
}

/* ------------------------------------------------------------------------ */
/* PGD on a small random model                                              */

static double ce_of(jem_ws *ws, const jem_model *m, const float *x, const int *y, int n) {
  int k = m->arch.num_classes;
  float *lg = malloc(sizeof(float) * n * k);
  double s = 0;
  jem_forward(ws, m, x, n, lg);
  for (int i = 0; i < n; i++) s += jem_logsumexp(lg + i * k, k) - lg[i * k + y[i]];
  free(lg);
  return s / n;
}

static void test_pgd(void **state) {
  (void)state;
  jem_arch a = {.depth = 10, .widen = 1, .in_channels = 1, .image_size = 32,
                .num_classes = 10, .leak = 0.2f};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  jem_model_init_random(m, 7);
  const int n = 6, chw = 32 * 32, pad = 2;
  jem_ws *ws = jem_ws_create(m, 4, 0); /* smaller than n: exercises chunks */
  jem_ws *wf = jem_ws_create(m, n, 0); /* for whole-batch losses */
  assert_non_null(ws);
  assert_non_null(wf);
  float *x = malloc(sizeof(float) * n * chw), *xa = malloc(sizeof(float) * n * chw);
  int y[6], ok[6];
  for (int i = 0; i < n * chw; i++) {
    int r = (i % chw) / 32, c = i % 32;
    x[i] = (r < pad || r >= 32 - pad || c < pad || c >= 32 - pad) ? -1.0f
                                                                  : (float)(urand() * 2 - 1);
  }
  for (int i = 0; i < n; i++) y[i] = i % 10;
  jem_rng rng;
  jem_rng_seed(&rng, 1, 0);
  const float eps_li = 2 * 0.03f, eps_l2 = 2 * 0.5f;
  jem_pgd_params p = {JEM_PGD_LINF, eps_li, eps_li / 4, 10, pad, 1};
  double ce0 = ce_of(wf, m, x, y, n);
  assert_int_equal(jem_pgd_attack(ws, m, x, y, n, &p, &rng, xa, ok, err, sizeof err), 0);
  double ce1 = ce_of(wf, m, xa, y, n);
  assert_true(ce1 > ce0);
  for (int i = 0; i < n * chw; i++) {
    int r = (i % chw) / 32, c = i % 32;
    assert_true(fabsf(xa[i] - x[i]) <= eps_li + 1e-6f);
    assert_true(xa[i] >= -1.0f && xa[i] <= 1.0f);
    if (r < pad || r >= 32 - pad || c < pad || c >= 32 - pad) assert_true(xa[i] == x[i]);
  }
  /* L2 stays in the ball */
  p = (jem_pgd_params){JEM_PGD_L2, eps_l2, eps_l2 / 4, 10, pad, 0};
  assert_int_equal(jem_pgd_attack(ws, m, x, y, n, &p, &rng, xa, ok, err, sizeof err), 0);
  assert_true(ce_of(wf, m, xa, y, n) > ce0);
  for (int i = 0; i < n; i++) {
    double s = 0;
    for (int j = 0; j < chw; j++) s += (xa[i * chw + j] - x[i * chw + j]) * (double)(xa[i * chw + j] - x[i * chw + j]);
    assert_true(sqrt(s) <= eps_l2 * (1 + 1e-5));
  }
  /* eps 0 changes nothing and `correct` matches clean accuracy */
  p.eps = 0;
  assert_int_equal(jem_pgd_attack(ws, m, x, y, n, &p, &rng, xa, ok, err, sizeof err), 0);
  assert_memory_equal(xa, x, sizeof(float) * n * chw);
  float lg[60];
  jem_forward(ws, m, x, 4, lg);
  int acc4 = 0;
  for (int i = 0; i < 4; i++) acc4 += ok[i];
  assert_int_equal(acc4, (int)lround(4 * jem_accuracy(lg, y, 4, 10)));
  /* bad parameters */
  p.norm = 1;
  assert_int_equal(jem_pgd_attack(ws, m, x, y, n, &p, &rng, xa, ok, err, sizeof err), JEM_EINVAL);
  free(x); free(xa);
  jem_ws_free(ws);
  jem_ws_free(wf);
  jem_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_accuracy_nll),
      cmocka_unit_test(test_ece_hand),
      cmocka_unit_test(test_ece_from_logits),
      cmocka_unit_test(test_temperature_recovers),
      cmocka_unit_test(test_ranking_hand),
      cmocka_unit_test(test_ranking_bruteforce),
      cmocka_unit_test(test_quantiles),
      cmocka_unit_test(test_rule_stat),
      cmocka_unit_test(test_sqrtm),
      cmocka_unit_test(test_frechet),
      cmocka_unit_test(test_pgd),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
