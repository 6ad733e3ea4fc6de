/* norm.c - BatchNorm (eval), InstanceNorm (affine), GroupNorm(1) and ActNorm
 * on CNHW activations: forward, input and parameter gradients. */
#include "norm.h"

#include <math.h>

#include <string.h>

#define EPS 1e-5

const char *const jem_norm_names[JEM_NUM_NORMS] = {"none", "batch", "instance", "layer", "act"};

int jem_norm_from_name(const char *name) {
  for (int i = 0; name && i < JEM_NUM_NORMS; i++)
    if (!strcmp(name, jem_norm_names[i])) return i;
  return -1;
}

int jem__norm_tensors(int kind, const char *const **suffixes) {
  static const char *const bn[] = {"weight", "bias", "running_mean", "running_var"};
  static const char *const affine[] = {"weight", "bias"};
  static const char *const act[] = {"scale", "loc"};
  switch (kind) {
    case JEM_NORM_BATCH: *suffixes = bn; return 4;
    case JEM_NORM_INSTANCE: case JEM_NORM_LAYER: *suffixes = affine; return 2;
    case JEM_NORM_ACT: *suffixes = act; return 2;
    default: *suffixes = NULL; return 0;
  }
}

/* Start of image i's plane of channel c in a [C, n, hw] tensor. */
static size_t at(int c, int i, int n, int hw) { return ((size_t)c * n + i) * hw; }

/* Channels [c0, c1) of image i form one normalisation group: its mean and
 * 1/sqrt(var + eps), the variance biased, accumulated in double. */
static void group_stats(const float *x, int c0, int c1, int i, int n, int hw, double *mean,
                        double *rstd) {
  double s = 0.0, ss = 0.0;
  const double m = (double)(c1 - c0) * hw;
  for (int c = c0; c < c1; c++) {
    const float *p = x + at(c, i, n, hw);
    for (int j = 0; j < hw; j++) s += p[j];
  }
  *mean = s / m;
  for (int c = c0; c < c1; c++) {
    const float *p = x + at(c, i, n, hw);
    for (int j = 0; j < hw; j++) {
      double d = p[j] - *mean;
      ss += d * d;
    }
  }
  *rstd = 1.0 / sqrt(ss / m + EPS);
}

/* The per-image groups of instance ([c, c+1)) or layer ([0, C)) norm. */
static int group_end(const jem__norm *nm, int c0) {
  return nm->kind == JEM_NORM_LAYER ? nm->c : c0 + 1;
}

void jem__norm_forward(float *y, const float *x, const jem__norm *nm, const float *W, int n,
                       int hw) {
  const int C = nm->c;
  const float *w = W + nm->w_off, *b = W + nm->b_off;
  if (nm->kind == JEM_NORM_BATCH || nm->kind == JEM_NORM_ACT) {
    /* a per-channel affine map a x + t */
    for (int c = 0; c < C; c++) {
      float a, t;
      if (nm->kind == JEM_NORM_BATCH) {
        const float istd = (float)(1.0 / sqrt((double)W[nm->rv_off + c] + EPS));
        a = w[c] * istd;
        t = b[c] - W[nm->rm_off + c] * a;
      } else {
        a = w[c];        /* scale */
        t = w[c] * b[c]; /* scale * loc */
      }
      const size_t o = at(c, 0, n, hw), len = (size_t)n * hw;
      for (size_t j = 0; j < len; j++) y[o + j] = a * x[o + j] + t;
    }
    return;
  }
  for (int i = 0; i < n; i++)
    for (int c0 = 0; c0 < C; c0 = group_end(nm, c0)) {
      const int c1 = group_end(nm, c0);
      double mean, rstd;
      group_stats(x, c0, c1, i, n, hw, &mean, &rstd);
      for (int c = c0; c < c1; c++) {
        const size_t o = at(c, i, n, hw);
        const float a = (float)(w[c] * rstd), t = (float)(b[c] - w[c] * rstd * mean);
        for (int j = 0; j < hw; j++) y[o + j] = a * x[o + j] + t;
      }
    }
}

void jem__norm_backward(float *dx, const float *dy, const float *x, const jem__norm *nm,
                        const float *W, int n, int hw, float *dW) {
  const int C = nm->c;
  const float *w = W + nm->w_off, *b = W + nm->b_off;
  float *dw = dW ? dW + nm->w_off : NULL, *db = dW ? dW + nm->b_off : NULL;
  if (nm->kind == JEM_NORM_BATCH || nm->kind == JEM_NORM_ACT) {
    for (int c = 0; c < C; c++) {
      const size_t o = at(c, 0, n, hw), len = (size_t)n * hw;
      double sdy = 0.0, sdyx = 0.0;
      if (nm->kind == JEM_NORM_BATCH) {
        const double istd = 1.0 / sqrt((double)W[nm->rv_off + c] + EPS), rm = W[nm->rm_off + c];
        const float a = (float)(w[c] * istd);
        for (size_t j = 0; j < len; j++) {
          if (dx) dx[o + j] += a * dy[o + j];
          sdy += dy[o + j];
          sdyx += dy[o + j] * ((x[o + j] - rm) * istd);
        }
        if (dw) dw[c] += (float)sdyx; /* d/dweight: dy * xhat */
        if (db) db[c] += (float)sdy;
      } else {
        for (size_t j = 0; j < len; j++) {
          if (dx) dx[o + j] += w[c] * dy[o + j];
          sdy += dy[o + j];
          sdyx += dy[o + j] * ((double)x[o + j] + b[c]);
        }
        if (dw) dw[c] += (float)sdyx;       /* d/dscale: dy * (x + loc) */
        if (db) db[c] += (float)(sdy * w[c]); /* d/dloc: dy * scale */
      }
    }
    return;
  }
  /* instance, layer: with xh = (x - mean) rstd and g = dy w over a group of
   * m values, dx = rstd (g - mean(g) - xh mean(g xh)) */
  for (int i = 0; i < n; i++)
    for (int c0 = 0; c0 < C; c0 = group_end(nm, c0)) {
      const int c1 = group_end(nm, c0);
      const double m = (double)(c1 - c0) * hw;
      double mean, rstd, sg = 0.0, sgx = 0.0;
      group_stats(x, c0, c1, i, n, hw, &mean, &rstd);
      for (int c = c0; c < c1; c++) {
        const size_t o = at(c, i, n, hw);
        double sdy = 0.0, sdyx = 0.0;
        for (int j = 0; j < hw; j++) {
          const double xh = (x[o + j] - mean) * rstd;
          sdy += dy[o + j];
          sdyx += dy[o + j] * xh;
        }
        sg += w[c] * sdy;
        sgx += w[c] * sdyx;
        if (dw) dw[c] += (float)sdyx;
        if (db) db[c] += (float)sdy;
      }
      if (!dx) continue;
      const double mg = sg / m, mgx = sgx / m;
      for (int c = c0; c < c1; c++) {
        const size_t o = at(c, i, n, hw);
        for (int j = 0; j < hw; j++) {
          const double xh = (x[o + j] - mean) * rstd;
          dx[o + j] += (float)(rstd * (w[c] * dy[o + j] - mg - xh * mgx));
        }
      }
    }
}
