/* conv.c - layer kernels on C,N,H,W activations: im2col + sgemm convolution,
 * LeakyReLU, 8x8 average pool and the linear head, forward and backward. */
#include "conv.h"
#include "internal.h"

#include <cblas.h>
#include <string.h>

/* The copy loops below are the hot part of im2col convolution: let GCC
 * vectorise them even in -O2 builds. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("tree-vectorize")
#endif

/* LeakyReLU as max(v, leak*v), exact for 0 <= leak <= 1 (the architecture
 * check enforces it); branch-free, so it vectorises and never mispredicts. */
static inline float lrelu(float v, float leak) {
  float t = v * leak;
  return v > t ? v : t;
}

int jem__conv_direct(const jem__conv *c, int act) {
  return c->k == 1 && c->stride == 1 && c->pad == 0 && !act;
}

/* Images per chunk: as many as fit in cap floats of im2col, at least one. */
static int chunk_images(const jem__conv *c, int n, size_t cap) {
  size_t per = (size_t)jem__conv_rows(c) * (size_t)jem__conv_hwo(c);
  size_t nc = per ? cap / per : (size_t)n;
  if (nc < 1) nc = 1;
  if (nc > (size_t)n) nc = (size_t)n;
  return (int)nc;
}

size_t jem__conv_col_need(const jem__conv *c, int n, size_t cap) {
  if (n < 1) n = 1;
  return (size_t)chunk_images(c, n, cap) * (size_t)jem__conv_rows(c) *
         (size_t)jem__conv_hwo(c);
}

/* Output columns [lo, hi) whose input column ox*s - p + kx lies inside. */
static void valid_range(int wo, int wi, int s, int p, int kx, int *lo, int *hi) {
  int a = p - kx; /* need ox*s >= a */
  int l = a <= 0 ? 0 : (a + s - 1) / s;
  int b = wi - 1 + p - kx; /* need ox*s <= b */
  int h = b < 0 ? 0 : b / s + 1;
  if (l > wo) l = wo;
  if (h > wo) h = wo;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

void jem__im2col(float *col, const float *in, const jem__conv *c, int n,
                 int n0, int nc, int act, float leak) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = 0; ci < c->cin; ci++) {
    for (int ky = 0; ky < k; ky++) {
      for (int kx = 0; kx < k; kx++) {
        float *row = col + ((size_t)(ci * k + ky) * k + kx) * ld;
        int lo, hix;
        valid_range(wo, wi, s, p, kx, &lo, &hix);
        for (int j = 0; j < nc; j++) {
          const float *src = in + ((size_t)ci * n + n0 + j) * hwi;
          float *dst = row + (size_t)j * hwo;
          for (int oy = 0; oy < ho; oy++) {
            float *d = dst + (size_t)oy * wo;
            int iy = oy * s - p + ky;
            if (iy < 0 || iy >= hi) {
              memset(d, 0, sizeof(float) * (size_t)wo);
              continue;
            }
            /* first valid input element; index arithmetic keeps the
             * pointer inside the row */
            const float *sr = src + (size_t)iy * wi + (lo * s - p + kx);
            for (int ox = 0; ox < lo; ox++) d[ox] = 0.0f;
            for (int ox = hix; ox < wo; ox++) d[ox] = 0.0f;
            float *dd = d + lo;
            const int cnt = hix - lo;
            if (s == 1) {
              if (act) {
                for (int i = 0; i < cnt; i++) dd[i] = lrelu(sr[i], leak);
              } else {
                for (int i = 0; i < cnt; i++) dd[i] = sr[i];
              }
            } else {
              if (act) {
                for (int i = 0; i < cnt; i++) dd[i] = lrelu(sr[i * s], leak);
              } else {
                for (int i = 0; i < cnt; i++) dd[i] = sr[i * s];
              }
            }
          }
        }
      }
    }
  }
}

void jem__col2im(float *in, const float *col, const jem__conv *c, int n,
                 int n0, int nc) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = 0; ci < c->cin; ci++) {
    for (int ky = 0; ky < k; ky++) {
      for (int kx = 0; kx < k; kx++) {
        const float *row = col + ((size_t)(ci * k + ky) * k + kx) * ld;
        int lo, hix;
        valid_range(wo, wi, s, p, kx, &lo, &hix);
        for (int j = 0; j < nc; j++) {
          float *dst = in + ((size_t)ci * n + n0 + j) * hwi;
          const float *src = row + (size_t)j * hwo;
          for (int oy = 0; oy < ho; oy++) {
            int iy = oy * s - p + ky;
            if (iy < 0 || iy >= hi) continue;
            const float *sr = src + (size_t)oy * wo + lo;
            float *d = dst + (size_t)iy * wi + (lo * s - p + kx);
            const int cnt = hix - lo;
            if (s == 1) {
              for (int i = 0; i < cnt; i++) d[i] += sr[i];
            } else {
              for (int i = 0; i < cnt; i++) d[i * s] += sr[i];
            }
          }
        }
      }
    }
  }
}

void jem__conv_forward(float *out, const float *in, const float *w,
                       const float *b, const jem__conv *c, int n, int act,
                       float leak, int accumulate, float *col, size_t col_cap) {
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)n * hwo;
  JEM_ASSERT(n >= 1);
  for (int co = 0; co < c->cout; co++) {
    float *o = out + (size_t)co * ldo, bv = b ? b[co] : 0.0f;
    if (accumulate) {
      for (size_t i = 0; i < ldo; i++) o[i] += bv;
    } else {
      for (size_t i = 0; i < ldo; i++) o[i] = bv;
    }
  }
  if (jem__conv_direct(c, act)) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->cout, (int)ldo,
                c->cin, 1.0f, w, c->cin, in, (int)ldo, 1.0f, out, (int)ldo);
    return;
  }
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  for (int n0 = 0; n0 < n; n0 += nc) {
    int m = n - n0 < nc ? n - n0 : nc;
    jem__im2col(col, in, c, n, n0, m, act, leak);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->cout, m * hwo,
                rows, 1.0f, w, rows, col, m * hwo, 1.0f,
                out + (size_t)n0 * hwo, (int)ldo);
  }
}

void jem__conv_backward(const float *dout, const float *in, const float *w,
                        const jem__conv *c, int n, int act, float leak,
                        float *dw, float *db, float *din, float *col,
                        size_t col_cap) {
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)n * hwo;
  JEM_ASSERT(n >= 1);
  if (db) {
    for (int co = 0; co < c->cout; co++) {
      const float *g = dout + (size_t)co * ldo;
      double acc = 0.0;
      for (size_t i = 0; i < ldo; i++) acc += g[i];
      db[co] += (float)acc;
    }
  }
  if (!dw && !din) return;
  if (jem__conv_direct(c, act)) {
    if (dw)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, c->cin,
                  (int)ldo, 1.0f, dout, (int)ldo, in, (int)ldo, 1.0f, dw,
                  c->cin);
    if (din)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->cin, (int)ldo,
                  c->cout, 1.0f, w, c->cin, dout, (int)ldo, 1.0f, din,
                  (int)ldo);
    return;
  }
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  for (int n0 = 0; n0 < n; n0 += nc) {
    int m = n - n0 < nc ? n - n0 : nc;
    const float *g = dout + (size_t)n0 * hwo;
    if (dw) {
      jem__im2col(col, in, c, n, n0, m, act, leak);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, rows,
                  m * hwo, 1.0f, g, (int)ldo, col, m * hwo, 1.0f, dw, rows);
    }
    if (din) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, m * hwo,
                  c->cout, 1.0f, w, rows, g, (int)ldo, 0.0f, col, m * hwo);
      jem__col2im(din, col, c, n, n0, m);
    }
  }
}

void jem__lrelu_backward(float *g, const float *a, size_t len, float leak) {
  for (size_t i = 0; i < len; i++)
    if (!(a[i] > 0.0f)) g[i] *= leak;
}

void jem__pool_forward(float *feat, const float *a, int c, int n, int hw,
                       float leak) {
  for (int ci = 0; ci < c; ci++) {
    for (int ni = 0; ni < n; ni++) {
      const float *r = a + ((size_t)ci * n + ni) * hw;
      float s = 0.0f;
      for (int i = 0; i < hw; i++) s += lrelu(r[i], leak);
      feat[(size_t)ni * c + ci] = s / (float)hw;
    }
  }
}

void jem__pool_backward(float *da, const float *dfeat, const float *a, int c,
                        int n, int hw, float leak) {
  for (int ci = 0; ci < c; ci++) {
    for (int ni = 0; ni < n; ni++) {
      size_t off = ((size_t)ci * n + ni) * hw;
      float g = dfeat[(size_t)ni * c + ci] / (float)hw;
      for (int i = 0; i < hw; i++)
        da[off + i] += a[off + i] > 0.0f ? g : g * leak;
    }
  }
}

void jem__linear_forward(float *y, const float *x, const float *w,
                         const float *b, int n, int f, int k) {
  for (int i = 0; i < n; i++)
    for (int j = 0; j < k; j++) y[(size_t)i * k + j] = b ? b[j] : 0.0f;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, k, f, 1.0f, x, f, w,
              f, 1.0f, y, k);
}

void jem__linear_backward(const float *dy, const float *x, const float *w,
                          int n, int f, int k, float *dw, float *db, float *dx) {
  if (db)
    for (int i = 0; i < n; i++)
      for (int j = 0; j < k; j++) db[j] += dy[(size_t)i * k + j];
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, f, n, 1.0f, dy, k,
                x, f, 1.0f, dw, f);
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, f, k, 1.0f, dy,
                k, w, f, 1.0f, dx, f);
}

void jem__to_cnhw(float *dst, const float *src, int n, int c, int hw) {
  for (int ni = 0; ni < n; ni++)
    for (int ci = 0; ci < c; ci++)
      memcpy(dst + ((size_t)ci * n + ni) * hw, src + ((size_t)ni * c + ci) * hw,
             sizeof(float) * (size_t)hw);
}

void jem__from_cnhw_acc(float *dst, const float *src, int n, int c, int hw) {
  for (int ni = 0; ni < n; ni++)
    for (int ci = 0; ci < c; ci++) {
      float *d = dst + ((size_t)ni * c + ci) * hw;
      const float *s = src + ((size_t)ci * n + ni) * hw;
      for (int i = 0; i < hw; i++) d[i] += s[i];
    }
}
