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
