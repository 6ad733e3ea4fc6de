/* gauss.c - per-class Gaussians fitted to labelled images, the "informative
 * initialisation" of SGLD chains from JEM++ (Yang & Ji, ICCV 2021, sec. 3.2):
 * a chain that starts from a draw of N(mean_y, cov_y) begins near the data
 * of class y, so a few SGLD steps per iteration reach useful negatives and a
 * conditional chain starts from something already shaped like its class. */
#include "train.h"
#include "internal.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Ridge added to every covariance: padding pixels never vary, so the raw
 * covariance is singular; 1e-3 is about the variance of the data noise. */
#define GAUSS_RIDGE 1e-3

void jem_class_gauss_free(jem_class_gauss *g) {
  if (!g) return;
  free(g->mean);
  free(g->chol);
  memset(g, 0, sizeof *g);
}

/* In-place lower Cholesky factor of the symmetric positive definite a [d,d]
 * (row-major, lower triangle read and written).  Returns -1 when a pivot is
 * not positive. */
static int cholesky(double *a, size_t d) {
  for (size_t j = 0; j < d; j++) {
    double *rj = a + j * d;
    double s = rj[j];
    for (size_t k = 0; k < j; k++) s -= rj[k] * rj[k];
    if (!(s > 0)) return -1;
    double ljj = sqrt(s);
    rj[j] = ljj;
    for (size_t i = j + 1; i < d; i++) {
      double *ri = a + i * d;
      double t = ri[j];
      for (size_t k = 0; k < j; k++) t -= ri[k] * rj[k];
      ri[j] = t / ljj;
    }
  }
  return 0;
}

int jem_class_gauss_fit(jem_class_gauss *g, const jem_dataset *ds, char *err, size_t errlen) {
  memset(g, 0, sizeof *g);
  if (!ds || !ds->y || ds->num_classes < 1)
    return jem__errf(err, errlen, JEM_EINVAL, "class Gaussians need labelled images");
  const size_t d = (size_t)ds->c * (size_t)ds->s * (size_t)ds->s;
  const int C = ds->num_classes;
  if (d > JEM_GAUSS_MAX_DIM)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "class Gaussians need images of at most %d values, these have %zu",
                     JEM_GAUSS_MAX_DIM, d);
  if ((double)C * (double)d * (double)d * sizeof(float) > JEM_GAUSS_MAX_BYTES)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "class Gaussians for %d classes of %zu values need %.1f GiB (limit %.0f GiB)",
                     C, d, (double)C * d * d * sizeof(float) / (1 << 30),
                     JEM_GAUSS_MAX_BYTES / (1 << 30));
  int *count = calloc((size_t)C, sizeof *count);
  g->mean = calloc((size_t)C * d, sizeof *g->mean);
  g->chol = calloc((size_t)C * d * d, sizeof *g->chol);
  double *cov = malloc(d * d * sizeof *cov);
  float *xc = NULL, *cf = malloc(d * d * sizeof *cf);
  if (!count || !g->mean || !g->chol || !cov || !cf) goto oom;
  for (int i = 0; i < ds->n; i++) count[ds->y[i]]++;
  int most = 0;
  for (int c = 0; c < C; c++) most = count[c] > most ? count[c] : most;
  xc = malloc((size_t)most * d * sizeof *xc);
  if (!xc) goto oom;
  g->classes = C;
  g->d = d;
  for (int c = 0; c < C; c++) {
    float *mu = g->mean + (size_t)c * d;
    float *lc = g->chol + (size_t)c * d * d;
    int nc = 0;
    for (int i = 0; i < ds->n; i++)
      if (ds->y[i] == c) memcpy(xc + (size_t)nc++ * d, ds->x + (size_t)i * d, d * sizeof *xc);
    if (nc < 2) { /* too few images: a unit-ridge Gaussian at their mean (or 0) */
      if (nc == 1) memcpy(mu, xc, d * sizeof *mu);
      for (size_t j = 0; j < d; j++) lc[j * d + j] = (float)sqrt(GAUSS_RIDGE);
      continue;
    }
    double *acc = cov; /* first as the mean accumulator */
    memset(acc, 0, d * sizeof *acc);
    for (int i = 0; i < nc; i++)
      for (size_t j = 0; j < d; j++) acc[j] += xc[(size_t)i * d + j];
    for (size_t j = 0; j < d; j++) mu[j] = (float)(acc[j] / nc);
    for (int i = 0; i < nc; i++)
      for (size_t j = 0; j < d; j++) xc[(size_t)i * d + j] -= mu[j];
    /* cov = Xc^T Xc / (n - 1), lower triangle */
    cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, (int)d, nc, 1.0f / (float)(nc - 1), xc,
                (int)d, 0.0f, cf, (int)d);
    for (size_t i = 0; i < d; i++) {
      for (size_t j = 0; j <= i; j++) cov[i * d + j] = cf[i * d + j];
      cov[i * d + i] += GAUSS_RIDGE;
    }
    if (cholesky(cov, d)) {
      free(count), free(cov), free(xc), free(cf);
      jem_class_gauss_free(g);
      return jem__errf(err, errlen, JEM_EINVAL, "class %d's covariance is not positive definite", c);
    }
    for (size_t i = 0; i < d; i++)
      for (size_t j = 0; j <= i; j++) lc[i * d + j] = (float)cov[i * d + j];
  }
  free(count), free(cov), free(xc), free(cf);
  return 0;
oom:
  free(count), free(cov), free(xc), free(cf);
  jem_class_gauss_free(g);
  return jem__errf(err, errlen, JEM_ENOMEM, "out of memory fitting class Gaussians");
}

void jem_class_gauss_sample(const jem_class_gauss *g, int cls, float *out, jem_rng *r) {
  JEM_ASSERT(g && cls >= 0 && cls < g->classes && out && r);
  const size_t d = g->d;
  const float *mu = g->mean + (size_t)cls * d;
  const float *lc = g->chol + (size_t)cls * d * d;
  /* out = mu + L z, with L lower: row i only needs z[0..i], so draw z into
   * out back to front and overwrite from the last row up. */
  for (size_t i = 0; i < d; i++) out[i] = jem_rng_normal(r);
  for (size_t ii = d; ii-- > 0;) {
    const float *row = lc + ii * d;
    double s = 0;
    for (size_t k = 0; k <= ii; k++) s += (double)row[k] * out[k];
    float v = mu[ii] + (float)s;
    out[ii] = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
  }
}

/* ------------------------------------------------------------------------ */
/* The feature Gaussian of the mahalanobis score (Lee et al., NeurIPS 2018):
 * class means of the penultimate features and one covariance shared by the
 * classes, whose inverse is stored as W^T W with W = L^-1, L its lower
 * Cholesky factor, so a distance is |W (f - mean)|^2. */

/* Ridge, relative to the mean feature variance: keeps the covariance
 * invertible when some features never fire (dead LeakyReLU channels). */
#define FEATURE_RIDGE 1e-6

int jem_model_fit_feature_gauss(jem_model *m, const float *feat, const int *y, int n,
                                char *err, size_t errlen) {
  if (!m || !feat || !y || n < 2)
    return jem__errf(err, errlen, JEM_EINVAL, "feature Gaussian: need at least 2 labelled images");
  const int K = m->arch.num_classes;
  const size_t F = (size_t)64 * m->arch.widen;
  double *mean = calloc((size_t)K * F, sizeof *mean);
  double *cov = calloc(F * F, sizeof *cov);
  double *dev = malloc(F * sizeof *dev);
  int *count = calloc((size_t)K, sizeof *count);
  float *fmean = jem__falloc((size_t)K * F), *fw = jem__falloc(F * F);
  int rc = 0;
  if (!mean || !cov || !dev || !count || !fmean || !fw) {
    rc = jem__errf(err, errlen, JEM_ENOMEM, "feature Gaussian: out of memory");
    goto done;
  }
  for (int i = 0; i < n; i++) {
    if (y[i] < 0 || y[i] >= K) {
      rc = jem__errf(err, errlen, JEM_EINVAL, "feature Gaussian: label %d of image %d "
                     "outside 0..%d", y[i], i, K - 1);
      goto done;
    }
    count[y[i]]++;
    for (size_t j = 0; j < F; j++) mean[(size_t)y[i] * F + j] += feat[(size_t)i * F + j];
  }
  for (int k = 0; k < K; k++) {
    if (!count[k]) {
      rc = jem__errf(err, errlen, JEM_EINVAL, "feature Gaussian: no image of class %d", k);
      goto done;
    }
    for (size_t j = 0; j < F; j++) mean[(size_t)k * F + j] /= count[k];
  }
  for (int i = 0; i < n; i++) { /* lower triangle of sum dev dev^T */
    for (size_t j = 0; j < F; j++) dev[j] = feat[(size_t)i * F + j] - mean[(size_t)y[i] * F + j];
    for (size_t r = 0; r < F; r++)
      for (size_t c = 0; c <= r; c++) cov[r * F + c] += dev[r] * dev[c];
  }
  double trace = 0.0;
  for (size_t r = 0; r < F; r++) trace += cov[r * F + r] / n;
  const double ridge = FEATURE_RIDGE * (trace > 0 ? trace / (double)F : 1.0);
  for (size_t r = 0; r < F; r++) {
    for (size_t c = 0; c <= r; c++) cov[r * F + c] /= n;
    cov[r * F + r] += ridge;
  }
  if (cholesky(cov, F)) {
    rc = jem__errf(err, errlen, JEM_EFORMAT, "feature Gaussian: covariance not positive definite");
    goto done;
  }
  /* W = L^-1 by forward substitution, one column of the identity at a time;
   * column c of W depends only on its own entries above, kept in dev. */
  memset(fw, 0, F * F * sizeof *fw);
  for (size_t c = 0; c < F; c++) {
    for (size_t r = c; r < F; r++) {
      double s = r == c ? 1.0 : 0.0;
      for (size_t k = c; k < r; k++) s -= cov[r * F + k] * dev[k];
      dev[r] = s / cov[r * F + r];
      fw[r * F + c] = (float)dev[r];
    }
  }
  for (size_t i = 0; i < (size_t)K * F; i++) fmean[i] = (float)mean[i];
  rc = jem_model_set_feature_gauss(m, fmean, fw, err, errlen);
done:
  free(mean);
  free(cov);
  free(dev);
  free(count);
  free(fmean);
  free(fw);
  return rc;
}
