/* eval_metrics.c - accuracy, NLL, ECE, temperature fitting, OOD ranking metrics,
 * quantiles and the Frechet distance used by `jem eval` / `jem calibrate`. */
#include "metrics.h"
#include "internal.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* LAPACK's symmetric eigensolver, exported by libopenblas (Debian ships no
 * lapacke.h with it).  The two trailing arguments are the hidden lengths of
 * the character arguments that gfortran-compiled code expects. */
extern void dsyev_(const char *jobz, const char *uplo, const int *n, double *a,
                   const int *lda, double *w, double *work, const int *lwork,
                   int *info, size_t jobz_len, size_t uplo_len);

/* ------------------------------------------------------------------------ */
/* Classification                                                           */

static int argmax_row(const float *z, int k) {
  int best = 0;
  for (int j = 1; j < k; j++)
    if (z[j] > z[best]) best = j;
  return best;
}

double jem_accuracy(const float *logits, const int *y, int n, int k) {
  if (n <= 0) return NAN;
  int ok = 0;
  for (int i = 0; i < n; i++) ok += argmax_row(logits + (size_t)i * k, k) == y[i];
  return (double)ok / n;
}

/* log-sum-exp of beta*z in double; returns also max for reuse. */
static double lse_scaled(const float *z, int k, double beta) {
  double mx = -INFINITY;
  for (int j = 0; j < k; j++) {
    double v = beta * z[j];
    if (v > mx) mx = v;
  }
  double s = 0.0;
  for (int j = 0; j < k; j++) s += exp(beta * z[j] - mx);
  return mx + log(s);
}

static double nll_beta(const float *logits, const int *y, int n, int k, double beta) {
  double tot = 0.0;
  for (int i = 0; i < n; i++) {
    const float *z = logits + (size_t)i * k;
    tot += lse_scaled(z, k, beta) - beta * z[y[i]];
  }
  return tot / n;
}

double jem_nll(const float *logits, const int *y, int n, int k, double temperature) {
  if (n <= 0 || !(temperature > 0)) return NAN;
  return nll_beta(logits, y, n, k, 1.0 / temperature);
}

double jem_fit_temperature(const float *logits, const int *y, int n, int k) {
  if (n <= 0) return 1.0;
  /* NLL(beta) is convex in beta = 1/T (log-sum-exp of a linear function
   * minus a linear term), hence unimodal in log(beta) too. */
  const double gr = 0.5 * (sqrt(5.0) - 1.0);
  double a = log(1e-3), b = log(1e3);
  double c = b - gr * (b - a), d = a + gr * (b - a);
  double fc = nll_beta(logits, y, n, k, exp(c));
  double fd = nll_beta(logits, y, n, k, exp(d));
  for (int it = 0; it < 200 && b - a > 1e-10; it++) {
    if (fc <= fd) {
      b = d; d = c; fd = fc;
      c = b - gr * (b - a);
      fc = nll_beta(logits, y, n, k, exp(c));
    } else {
      a = c; c = d; fc = fd;
      d = a + gr * (b - a);
      fd = nll_beta(logits, y, n, k, exp(d));
    }
  }
  return 1.0 / exp(0.5 * (a + b));
}

/* ------------------------------------------------------------------------ */
/* Calibration                                                              */

int jem_ece_from_conf(const double *conf, const int *correct, int n, int nbins,
                      jem_calib *out, char *err, size_t errlen) {
  if (!out || (n > 0 && (!conf || !correct)))
    return jem__errf(err, errlen, JEM_EINVAL, "ece: NULL argument");
  if (nbins < 1 || nbins > JEM_ECE_MAX_BINS)
    return jem__errf(err, errlen, JEM_EINVAL, "ece: %d bins (want 1..%d)", nbins,
                     JEM_ECE_MAX_BINS);
  if (n < 1) return jem__errf(err, errlen, JEM_EINVAL, "ece: no samples");
  memset(out, 0, sizeof *out);
  out->nbins = nbins;
  out->n = n;
  double sum_conf[JEM_ECE_MAX_BINS] = {0}, sum_acc[JEM_ECE_MAX_BINS] = {0};
  for (int i = 0; i < n; i++) {
    double c = conf[i];
    if (!(c >= 0.0 && c <= 1.0))
      return jem__errf(err, errlen, JEM_EINVAL, "ece: confidence %g of sample %d "
                       "is outside [0,1]", c, i);
    /* Bin b is (b/B, (b+1)/B]: compare against the same boundaries that
     * linspace(0,1,B+1) gives, so values on a boundary land as in ECELoss. */
    int b = (int)ceil(c * nbins) - 1;
    if (b < 0) b = 0; /* c == 0 falls in no (lo,hi] bin there; keep it in 0 */
    if (b >= nbins) b = nbins - 1;
    while (b > 0 && !(c > (double)b / nbins)) b--;
    while (b < nbins - 1 && c > (double)(b + 1) / nbins) b++;
    out->count[b]++;
    sum_conf[b] += c;
    sum_acc[b] += correct[i] ? 1.0 : 0.0;
  }
  for (int b = 0; b < nbins; b++) {
    if (!out->count[b]) continue;
    out->conf[b] = sum_conf[b] / out->count[b];
    out->acc[b] = sum_acc[b] / out->count[b];
    double gap = fabs(out->acc[b] - out->conf[b]);
    out->ece += gap * out->count[b] / n;
    if (gap > out->mce) out->mce = gap;
  }
  return 0;
}

int jem_ece(const float *logits, const int *y, int n, int k, double temperature,
            int nbins, jem_calib *out, char *err, size_t errlen) {
  if (!logits || !y || n < 1 || k < 1)
    return jem__errf(err, errlen, JEM_EINVAL, "ece: empty or NULL input");
  if (!(temperature > 0))
    return jem__errf(err, errlen, JEM_EINVAL, "ece: temperature %g is not > 0",
                     temperature);
  double *conf = malloc((size_t)n * sizeof *conf);
  int *ok = malloc((size_t)n * sizeof *ok);
  if (!conf || !ok) {
    free(conf);
    free(ok);
    return jem__errf(err, errlen, JEM_ENOMEM, "ece: out of memory");
  }
  const double beta = 1.0 / temperature;
  for (int i = 0; i < n; i++) {
    const float *z = logits + (size_t)i * k;
    int a = argmax_row(z, k);
    /* max prob = exp(beta*z_max - lse(beta*z)) */
    conf[i] = exp(beta * z[a] - lse_scaled(z, k, beta));
    if (conf[i] > 1.0) conf[i] = 1.0;
    ok[i] = a == y[i];
  }
  int rc = jem_ece_from_conf(conf, ok, n, nbins, out, err, errlen);
  free(conf);
  free(ok);
  return rc;
}

/* ------------------------------------------------------------------------ */
/* OOD ranking metrics                                                      */

typedef struct {
  double s;
  int pos;
} scored;

/* Descending by score; ties broken by nothing (groups are handled whole). */
static int cmp_desc(const void *a, const void *b) {
  double x = ((const scored *)a)->s, y = ((const scored *)b)->s;
  return (x < y) - (x > y);
}

static scored *merge_sorted(const double *pos, int npos, const double *neg, int nneg) {
  scored *v = malloc(((size_t)npos + (size_t)nneg) * sizeof *v);
  if (!v) return NULL;
  for (int i = 0; i < npos; i++) v[i] = (scored){pos[i], 1};
  for (int i = 0; i < nneg; i++) v[npos + i] = (scored){neg[i], 0};
  qsort(v, (size_t)npos + (size_t)nneg, sizeof *v, cmp_desc);
  return v;
}

/* Walks tie groups in descending order, computing everything at once. */
static void ranking(const scored *v, int npos, int nneg, double tpr_level,
                    double *auroc, double *ap, double *fpr) {
  const int n = npos + nneg;
  double pairs = 0.0, apsum = 0.0, fpr_at = NAN;
  long tp = 0, fp = 0;
  /* smallest TP count that reaches the level (with a little slack for
   * levels like 0.95*npos that are integers in exact arithmetic) */
  const double need = tpr_level * npos - 1e-9 * (npos + 1);
  for (int i = 0; i < n;) {
    int j = i;
    long gp = 0, gn = 0;
    while (j < n && v[j].s == v[i].s) {
      if (v[j].pos) gp++;
      else gn++;
      j++;
    }
    /* pairs with this group's positives: every negative below, half the
     * tied ones */
    long neg_below = nneg - fp - gn;
    pairs += (double)gp * (double)neg_below + 0.5 * (double)gp * (double)gn;
    tp += gp;
    fp += gn;
    if (gp > 0) apsum += ((double)gp / npos) * ((double)tp / (double)(tp + fp));
    if (isnan(fpr_at) && (double)tp >= need) fpr_at = (double)fp / nneg;
    i = j;
  }
  if (auroc) *auroc = pairs / ((double)npos * (double)nneg);
  if (ap) *ap = apsum;
  if (fpr) *fpr = fpr_at;
}

static int check_scores(const double *v, int n) {
  for (int i = 0; i < n; i++)
    if (isnan(v[i])) return i;
  return -1;
}

double jem_auroc(const double *pos, int npos, const double *neg, int nneg) {
  if (npos < 1 || nneg < 1 || check_scores(pos, npos) >= 0 ||
      check_scores(neg, nneg) >= 0)
    return NAN;
  scored *v = merge_sorted(pos, npos, neg, nneg);
  if (!v) return NAN;
  double a;
  ranking(v, npos, nneg, 0.95, &a, NULL, NULL);
  free(v);
  return a;
}

double jem_average_precision(const double *pos, int npos, const double *neg, int nneg) {
  if (npos < 1 || nneg < 0 || check_scores(pos, npos) >= 0 ||
      check_scores(neg, nneg) >= 0)
    return NAN;
  scored *v = merge_sorted(pos, npos, neg, nneg);
  if (!v) return NAN;
  double a;
  ranking(v, npos, nneg, 0.95, NULL, &a, NULL);
  free(v);
  return a;
}

double jem_fpr_at_tpr(const double *pos, int npos, const double *neg, int nneg,
                      double tpr) {
  if (npos < 1 || nneg < 1 || !(tpr >= 0.0 && tpr <= 1.0) ||
      check_scores(pos, npos) >= 0 || check_scores(neg, nneg) >= 0)
    return NAN;
  scored *v = merge_sorted(pos, npos, neg, nneg);
  if (!v) return NAN;
  double f;
  ranking(v, npos, nneg, tpr, NULL, NULL, &f);
  free(v);
  return f;
}

int jem_ood_metrics_compute(const double *pos, int npos, const double *neg,
                            int nneg, jem_ood_metrics *out, char *err,
                            size_t errlen) {
  if (!out || !pos || !neg)
    return jem__errf(err, errlen, JEM_EINVAL, "ood metrics: NULL argument");
  if (npos < 1 || nneg < 1)
    return jem__errf(err, errlen, JEM_EINVAL, "ood metrics: need at least one "
                     "in-distribution and one OOD score (got %d and %d)", npos, nneg);
  int bad = check_scores(pos, npos);
  if (bad >= 0)
    return jem__errf(err, errlen, JEM_EINVAL, "ood metrics: in-distribution "
                     "score %d is NaN", bad);
  if ((bad = check_scores(neg, nneg)) >= 0)
    return jem__errf(err, errlen, JEM_EINVAL, "ood metrics: OOD score %d is NaN", bad);
  scored *v = merge_sorted(pos, npos, neg, nneg);
  if (!v) return jem__errf(err, errlen, JEM_ENOMEM, "ood metrics: out of memory");
  ranking(v, npos, nneg, 0.95, &out->auroc, &out->aupr_in, &out->fpr95);
  /* OOD as the positive class: negate scores and swap the roles; reuse the
   * same array by flipping labels and reversing the order. */
  const int n = npos + nneg;
  for (int i = 0; i < n / 2; i++) {
    scored t = v[i];
    v[i] = v[n - 1 - i];
    v[n - 1 - i] = t;
  }
  for (int i = 0; i < n; i++) {
    v[i].s = -v[i].s;
    v[i].pos = !v[i].pos;
  }
  ranking(v, nneg, npos, 0.95, NULL, &out->aupr_out, NULL);
  free(v);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Quantiles                                                                */

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int jem_quantiles(const float *v, int n, int nq, float *q, char *err, size_t errlen) {
  if (!v || !q || n < 1 || nq < 2)
    return jem__errf(err, errlen, JEM_EINVAL, "quantiles: need n >= 1 values "
                     "and nq >= 2 (got %d, %d)", n, nq);
  float *s = malloc((size_t)n * sizeof *s);
  if (!s) return jem__errf(err, errlen, JEM_ENOMEM, "quantiles: out of memory");
  for (int i = 0; i < n; i++) {
    if (isnan(v[i])) {
      free(s);
      return jem__errf(err, errlen, JEM_EINVAL, "quantiles: value %d is NaN", i);
    }
    s[i] = v[i];
  }
  qsort(s, (size_t)n, sizeof *s, cmp_float);
  for (int i = 0; i < nq; i++) {
    double pos = (double)i * (n - 1) / (nq - 1);
    int lo = (int)floor(pos);
    if (lo >= n - 1) {
      q[i] = s[n - 1];
      continue;
    }
    double f = pos - lo;
    q[i] = (float)((1.0 - f) * s[lo] + f * s[lo + 1]);
    /* rounding must never break the ascending order */
    if (i > 0 && q[i] < q[i - 1]) q[i] = q[i - 1];
  }
  free(s);
  return 0;
}

double jem_median(const double *v, int n) {
  if (!v || n < 1) return NAN;
  double *s = malloc((size_t)n * sizeof *s);
  if (!s) return NAN;
  memcpy(s, v, (size_t)n * sizeof *s);
  qsort(s, (size_t)n, sizeof *s, cmp_double);
  double m = (n & 1) ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  free(s);
  return m;
}

/* ------------------------------------------------------------------------ */
/* Gaussian fits and the Frechet distance                                   */

int jem_gaussian_fit(const float *x, int n, int d, double *mu, double *cov,
                     char *err, size_t errlen) {
  if (!x || !mu || !cov || d < 1)
    return jem__errf(err, errlen, JEM_EINVAL, "gaussian fit: bad arguments");
  if (n < 2)
    return jem__errf(err, errlen, JEM_EINVAL, "gaussian fit: need at least 2 "
                     "samples, got %d", n);
  double *c = malloc((size_t)n * (size_t)d * sizeof *c);
  if (!c) return jem__errf(err, errlen, JEM_ENOMEM, "gaussian fit: out of memory");
  for (int j = 0; j < d; j++) mu[j] = 0.0;
  for (int i = 0; i < n; i++)
    for (int j = 0; j < d; j++) mu[j] += x[(size_t)i * d + j];
  for (int j = 0; j < d; j++) mu[j] /= n;
  for (int i = 0; i < n; i++)
    for (int j = 0; j < d; j++) c[(size_t)i * d + j] = x[(size_t)i * d + j] - mu[j];
  /* cov = c^T c / (n-1), in double so centred sums do not lose digits */
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, d, n, 1.0 / (n - 1), c, d,
              0.0, cov, d);
  for (int i = 0; i < d; i++)
    for (int j = 0; j < i; j++) cov[(size_t)i * d + j] = cov[(size_t)j * d + i];
  free(c);
  return 0;
}

/* Eigen-decomposition of symmetric a [d,d] (row-major; symmetric so the
 * Fortran column-major view is the same matrix).  On return a holds the
 * eigenvectors as ROWS in row-major terms (columns in Fortran terms) when
 * vectors != 0; w the eigenvalues ascending. */
static int sym_eig(double *a, int d, double *w, int vectors, char *err, size_t errlen) {
  int n = d, lda = d, lwork = -1, info = 0;
  double wq = 0.0;
  const char *jobz = vectors ? "V" : "N";
  dsyev_(jobz, "U", &n, a, &lda, w, &wq, &lwork, &info, 1, 1);
  if (info != 0)
    return jem__errf(err, errlen, JEM_EINTERNAL, "dsyev workspace query failed "
                     "(info %d)", info);
  lwork = (int)wq;
  if (lwork < 3 * d) lwork = 3 * d;
  double *work = malloc((size_t)lwork * sizeof *work);
  if (!work) return jem__errf(err, errlen, JEM_ENOMEM, "eigensolver: out of memory");
  dsyev_(jobz, "U", &n, a, &lda, w, work, &lwork, &info, 1, 1);
  free(work);
  if (info != 0)
    return jem__errf(err, errlen, JEM_EINTERNAL, "dsyev failed to converge "
                     "(info %d)", info);
  return 0;
}

int jem_sqrtm_psd(double *a, int d, char *err, size_t errlen) {
  if (!a || d < 1) return jem__errf(err, errlen, JEM_EINVAL, "sqrtm: bad arguments");
  double *w = malloc((size_t)d * sizeof *w);
  double *vs = malloc((size_t)d * (size_t)d * sizeof *vs);
  if (!w || !vs) {
    free(w);
    free(vs);
    return jem__errf(err, errlen, JEM_ENOMEM, "sqrtm: out of memory");
  }
  /* symmetrise first: callers pass products that are symmetric only up to
   * rounding */
  for (int i = 0; i < d; i++)
    for (int j = 0; j < i; j++) {
      double m = 0.5 * (a[(size_t)i * d + j] + a[(size_t)j * d + i]);
      a[(size_t)i * d + j] = a[(size_t)j * d + i] = m;
    }
  int rc = sym_eig(a, d, w, 1, err, errlen);
  if (rc) {
    free(w);
    free(vs);
    return rc;
  }
  /* Row r of `a` (row-major) is eigenvector r.  Scale each by
   * sqrt(sqrt(l_r)) and form V S V^T = (scaled)^T (scaled). */
  for (int r = 0; r < d; r++) {
    double s = w[r] > 0.0 ? sqrt(sqrt(w[r])) : 0.0;
    for (int j = 0; j < d; j++) vs[(size_t)r * d + j] = a[(size_t)r * d + j] * s;
  }
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, d, 1.0, vs, d, vs, d,
              0.0, a, d);
  free(w);
  free(vs);
  return 0;
}

int jem_frechet_distance(const double *mu1, const double *c1, const double *mu2,
                         const double *c2, int d, double *out, char *err,
                         size_t errlen) {
  if (!mu1 || !c1 || !mu2 || !c2 || !out || d < 1)
    return jem__errf(err, errlen, JEM_EINVAL, "frechet: bad arguments");
  const size_t dd = (size_t)d * (size_t)d;
  double *s = malloc(dd * sizeof *s), *t = malloc(dd * sizeof *t);
  double *m = malloc(dd * sizeof *m), *w = malloc((size_t)d * sizeof *w);
  int rc = 0;
  if (!s || !t || !m || !w) {
    rc = jem__errf(err, errlen, JEM_ENOMEM, "frechet: out of memory");
    goto done;
  }
  memcpy(s, c1, dd * sizeof *s);
  if ((rc = jem_sqrtm_psd(s, d, err, errlen))) goto done;
  /* M = S C2 S with S = C1^{1/2}: symmetric PSD with the same eigenvalues
   * as C1 C2, so tr sqrt(C1 C2) = sum sqrt(eig(M)). */
  cblas_dsymm(CblasRowMajor, CblasLeft, CblasUpper, d, d, 1.0, s, d, c2, d, 0.0, t, d);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.0, t, d, s, d,
              0.0, m, d);
  for (int i = 0; i < d; i++)
    for (int j = 0; j < i; j++) {
      double v = 0.5 * (m[(size_t)i * d + j] + m[(size_t)j * d + i]);
      m[(size_t)i * d + j] = m[(size_t)j * d + i] = v;
    }
  if ((rc = sym_eig(m, d, w, 0, err, errlen))) goto done;
  double tr_sqrt = 0.0, tr1 = 0.0, tr2 = 0.0, dmu = 0.0;
  for (int i = 0; i < d; i++) {
    if (w[i] > 0.0) tr_sqrt += sqrt(w[i]);
    tr1 += c1[(size_t)i * d + i];
    tr2 += c2[(size_t)i * d + i];
    double e = mu1[i] - mu2[i];
    dmu += e * e;
  }
  *out = dmu + tr1 + tr2 - 2.0 * tr_sqrt;
  /* rounding can leave a tiny negative value for identical inputs */
  if (*out < 0.0 && *out > -1e-9 * (tr1 + tr2 + 1.0)) *out = 0.0;
done:
  free(s);
  free(t);
  free(m);
  free(w);
  return rc;
}

int jem_frechet_features(const float *a, int na, const float *b, int nb, int d,
                         double *out, char *err, size_t errlen) {
  if (d < 1) return jem__errf(err, errlen, JEM_EINVAL, "frechet: feature dim %d", d);
  const size_t dd = (size_t)d * (size_t)d;
  double *mu1 = malloc((size_t)d * sizeof *mu1), *mu2 = malloc((size_t)d * sizeof *mu2);
  double *c1 = malloc(dd * sizeof *c1), *c2 = malloc(dd * sizeof *c2);
  int rc;
  if (!mu1 || !mu2 || !c1 || !c2) {
    rc = jem__errf(err, errlen, JEM_ENOMEM, "frechet: out of memory");
  } else if (!(rc = jem_gaussian_fit(a, na, d, mu1, c1, err, errlen)) &&
             !(rc = jem_gaussian_fit(b, nb, d, mu2, c2, err, errlen))) {
    rc = jem_frechet_distance(mu1, c1, mu2, c2, d, out, err, errlen);
  }
  free(mu1);
  free(mu2);
  free(c1);
  free(c2);
  return rc;
}
