/* ref_kernels.h - naive double-precision reference kernels (NCHW direct
 * convolution, LeakyReLU, average pool, linear, a whole JEM WRN) for tests. */
#ifndef JEM_REF_KERNELS_H
#define JEM_REF_KERNELS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jem.h"

/* Each test uses some of these helpers only. */
#define REF_FN static __attribute__((unused))

REF_FN inline double ref_lrelu(double v, double leak) { return v > 0 ? v : v * leak; }

/* out[n, cout, ho, wo] = b + direct convolution of in[n, cin, h, w]. */
REF_FN void ref_conv(double *out, const double *in, const double *w,
                     const double *b, int n, int cin, int h, int wd, int cout,
                     int k, int stride, int pad, int *pho, int *pwo) {
  int ho = (h + 2 * pad - k) / stride + 1, wo = (wd + 2 * pad - k) / stride + 1;
  for (int ni = 0; ni < n; ni++)
    for (int co = 0; co < cout; co++) {
      double *o = out + ((size_t)ni * cout + co) * ho * wo;
      for (int i = 0; i < ho * wo; i++) o[i] = b ? b[co] : 0.0;
      for (int ci = 0; ci < cin; ci++) {
        const double *src = in + ((size_t)ni * cin + ci) * h * wd;
        for (int ky = 0; ky < k; ky++)
          for (int kx = 0; kx < k; kx++) {
            double wv = w[(((size_t)co * cin + ci) * k + ky) * k + kx];
            /* output columns whose input column is inside the image */
            int lo = 0, hi = wo;
            while (lo < wo && lo * stride - pad + kx < 0) lo++;
            while (hi > lo && (hi - 1) * stride - pad + kx >= wd) hi--;
            for (int oy = 0; oy < ho; oy++) {
              int iy = oy * stride - pad + ky;
              if (iy < 0 || iy >= h) continue;
              double *orow = o + oy * wo;
              const double *srow = src + iy * wd + (lo * stride - pad + kx);
              double *od = orow + lo;
              if (stride == 1)
                for (int i = 0; i < hi - lo; i++) od[i] += wv * srow[i];
              else
                for (int i = 0; i < hi - lo; i++) od[i] += wv * srow[i * stride];
            }
          }
      }
    }
  if (pho) *pho = ho;
  if (pwo) *pwo = wo;
}

REF_FN const jem_param *ref_param(const jem_model *m, const char *name) {
  for (int i = 0; i < m->n_params; i++)
    if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
  return NULL;
}

/* Conv layer of the model by parameter prefix, on one image. */
REF_FN void ref_model_conv(const jem_model *m, const double *wts,
                           const char *prefix, double *out, const double *in,
                           int h, int stride, int *ho) {
  char wn[96], bn[96];
  snprintf(wn, sizeof wn, "%s.weight", prefix);
  snprintf(bn, sizeof bn, "%s.bias", prefix);
  const jem_param *pw = ref_param(m, wn), *pb = ref_param(m, bn);
  if (!pw || !pb) abort();
  int k = pw->shape[2];
  ref_conv(out, in, wts + pw->offset, wts + pb->offset, 1, pw->shape[1], h, h,
           pw->shape[0], k, stride, k / 2, ho, NULL);
}

/* logits[K] of one image x[C, 32, 32] with weights wts (model layout). */
REF_FN void ref_model_logits(const jem_model *m, const double *wts,
                             const double *x, double *logits) {
  const jem_arch *a = &m->arch;
  const int nb = (a->depth - 4) / 6, k = a->widen, s0 = a->image_size;
  const int widths[4] = {16, 16 * k, 32 * k, 64 * k};
  const double leak = a->leak;
  size_t cap = (size_t)64 * k * s0 * s0 + (size_t)16 * s0 * s0;
  double *cur = malloc(sizeof(double) * cap), *t = malloc(sizeof(double) * cap);
  double *u = malloc(sizeof(double) * cap), *o = malloc(sizeof(double) * cap);
  int h = s0, ho;
  ref_model_conv(m, wts, "f.conv1", cur, x, h, 1, &ho);
  int in = 16;
  char pre[64];
  for (int L = 1; L <= 3; L++)
    for (int i = 0; i < nb; i++) {
      int oc = widths[L], stride = (L > 1 && i == 0) ? 2 : 1;
      size_t len = (size_t)in * h * h;
      for (size_t j = 0; j < len; j++) t[j] = ref_lrelu(cur[j], leak);
      snprintf(pre, sizeof pre, "f.layer%d.%d.conv1", L, i);
      ref_model_conv(m, wts, pre, u, t, h, 1, &ho);
      size_t ulen = (size_t)oc * h * h;
      for (size_t j = 0; j < ulen; j++) u[j] = ref_lrelu(u[j], leak);
      snprintf(pre, sizeof pre, "f.layer%d.%d.conv2", L, i);
      ref_model_conv(m, wts, pre, o, u, h, stride, &ho);
      size_t olen = (size_t)oc * ho * ho;
      if (stride != 1 || in != oc) {
        snprintf(pre, sizeof pre, "f.layer%d.%d.shortcut.0", L, i);
        ref_model_conv(m, wts, pre, t, cur, h, stride, NULL);
        for (size_t j = 0; j < olen; j++) o[j] += t[j];
      } else {
        for (size_t j = 0; j < olen; j++) o[j] += cur[j];
      }
      memcpy(cur, o, sizeof(double) * olen);
      h = ho;
      in = oc;
    }
  const jem_param *lw = ref_param(m, "class_output.weight");
  const jem_param *lb = ref_param(m, "class_output.bias");
  double *feat = t;
  for (int c = 0; c < in; c++) {
    double s = 0;
    for (int j = 0; j < h * h; j++) s += ref_lrelu(cur[(size_t)c * h * h + j], leak);
    feat[c] = s / (h * h);
  }
  for (int j = 0; j < a->num_classes; j++) {
    double s = wts[lb->offset + j];
    for (int c = 0; c < in; c++) s += wts[lw->offset + (size_t)j * in + c] * feat[c];
    logits[j] = s;
  }
  free(cur); free(t); free(u); free(o);
}

REF_FN double ref_logsumexp(const double *z, int k) {
  double mx = z[0];
  for (int i = 1; i < k; i++) if (z[i] > mx) mx = z[i];
  double s = 0;
  for (int i = 0; i < k; i++) s += exp(z[i] - mx);
  return mx + log(s);
}

/* Fills x with uniform values in [lo, hi) from a small LCG state. */
REF_FN void ref_fill(float *x, size_t n, unsigned *st, float lo, float hi) {
  for (size_t i = 0; i < n; i++) {
    *st = *st * 1664525u + 1013904223u;
    x[i] = lo + (hi - lo) * (float)(*st >> 8) / 16777216.0f;
  }
}

REF_FN unsigned ref_rand(unsigned *st) {
  *st = *st * 1664525u + 1013904223u;
  return *st >> 8;
}

#endif
