/* score.c - per-image scores of a batch: logsumexp, tempered softmax, the
 * OOD scores (energy, grad_norm, max_softmax, energy_complexity, mahalanobis). */
#include "net.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

float jem_logsumexp(const float *z, int k) {
  JEM_ASSERT(z && k >= 1);
  float mx = z[0];
  for (int i = 1; i < k; i++) {
    if (isnan(z[i])) return z[i];
    if (z[i] > mx) mx = z[i];
  }
  if (isnan(mx)) return mx;
  if (isinf(mx)) return mx; /* +inf, or every logit -inf */
  double s = 0.0;
  for (int i = 0; i < k; i++) s += exp((double)z[i] - (double)mx);
  return (float)((double)mx + log(s));
}

void jem_softmax(float *p, const float *z, int k, float temperature) {
  JEM_ASSERT(p && z && k >= 1 && temperature > 0.0f);
  double mx = -INFINITY;
  int has_nan = 0;
  for (int i = 0; i < k; i++) {
    double v = (double)z[i] / temperature;
    if (isnan(v)) has_nan = 1;
    if (v > mx) mx = v;
  }
  if (has_nan || isinf(mx)) {
    /* +inf logits share the mass; NaN (or all -inf) gives NaN */
    int ninf = 0;
    if (!has_nan && mx > 0)
      for (int i = 0; i < k; i++) ninf += isinf(z[i]) && z[i] > 0;
    for (int i = 0; i < k; i++)
      p[i] = ninf ? ((isinf(z[i]) && z[i] > 0) ? 1.0f / (float)ninf : 0.0f)
                  : NAN;
    return;
  }
  double s = 0.0;
  for (int i = 0; i < k; i++) s += exp((double)z[i] / temperature - mx);
  for (int i = 0; i < k; i++)
    p[i] = (float)(exp((double)z[i] / temperature - mx) / s);
}

/* out[i] = min_k |W f_i - W mean_k|^2 for the c images of the last forward. */
static void mahalanobis(jem_ws *ws, const jem_model *m, int c, float *out) {
  const int F = m->net->feat, K = m->net->k;
  if (!m->feat_whiten) {
    for (int i = 0; i < c; i++) out[i] = NAN;
    return;
  }
  /* batch-invariant: the same product for every row, whatever c */
  const int rows = ws->invariant ? 1 : c;
  for (int r0 = 0; r0 < c; r0 += rows)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, F, F, 1.0f,
                ws->feat + (size_t)r0 * F, F, m->feat_whiten, F, 0.0f,
                ws->fwhite + (size_t)r0 * F, F);
  for (int i = 0; i < c; i++) {
    const float *u = ws->fwhite + (size_t)i * F;
    double best = INFINITY;
    for (int k = 0; k < K; k++) {
      const float *w = m->feat_wmean + (size_t)k * F;
      double d = 0.0;
      for (int j = 0; j < F; j++) d += (double)(u[j] - w[j]) * (u[j] - w[j]);
      if (d < best) best = d;
    }
    out[i] = (float)best;
  }
}

void jem_score_batch(jem_ws *ws, const jem_model *m, const float *x, int n,
                     int want_grad, const jem_scores *out) {
  jem__ws_check(ws, m);
  JEM_ASSERT(out && n >= 0 && (x || n == 0));
  const int k = m->net->k;
  const size_t css = (size_t)m->net->in_c * m->net->size * m->net->size;
  const float T = m->temperature > 0.0f ? m->temperature : 1.0f;
  for (int off = 0; off < n; off += ws->max_batch) {
    int c = n - off < ws->max_batch ? n - off : ws->max_batch;
    const float *xc = x + (size_t)off * css;
    if (want_grad)
      jem_input_grad(ws, m, xc, c, NULL, ws->logits, ws->dx);
    else
      jem_forward(ws, m, xc, c, ws->logits);
    float *const *sc = out->score;
    if (sc[JEM_SCORE_MAHALANOBIS]) mahalanobis(ws, m, c, sc[JEM_SCORE_MAHALANOBIS] + off);
    for (int i = 0; i < c; i++) {
      const size_t r = (size_t)off + i;
      const float *z = ws->logits + (size_t)i * k;
      float *p = ws->probs + (size_t)i * k;
      float lse = jem_logsumexp(z, k);
      int best = 0;
      for (int j = 1; j < k; j++)
        if (z[j] > z[best]) best = j;
      jem_softmax(p, z, k, T);
      if (out->logits) memcpy(out->logits + r * k, z, sizeof(float) * (size_t)k);
      if (out->probs) memcpy(out->probs + r * k, p, sizeof(float) * (size_t)k);
      if (out->label) out->label[r] = best;
      if (out->confidence) out->confidence[r] = p[best];
      if (sc[JEM_SCORE_ENERGY]) sc[JEM_SCORE_ENERGY][r] = -lse;
      if (sc[JEM_SCORE_MAX_SOFTMAX]) sc[JEM_SCORE_MAX_SOFTMAX][r] = expf(z[best] - lse);
      if (sc[JEM_SCORE_ENERGY_COMPLEXITY]) /* deflate only when the model has a weight */
        sc[JEM_SCORE_ENERGY_COMPLEXITY][r] =
            isnan(m->ood.complexity_weight)
                ? NAN
                : jem_energy_complexity(m, -lse, jem_input_complexity_bits(m, xc + (size_t)i * css));
      if (sc[JEM_SCORE_GRAD_NORM]) {
        double s = 0.0;
        const float *g = ws->dx + (size_t)i * css;
        for (size_t j = 0; want_grad && j < css; j++) s += (double)g[j] * g[j];
        sc[JEM_SCORE_GRAD_NORM][r] = want_grad ? (float)sqrt(s) : NAN;
      }
    }
  }
}
