/* test_conv.c - layer kernels: im2col convolution against a naive direct
 * convolution, im2col/col2im adjointness, and finite-difference gradients of
 * convolution, LeakyReLU, average pool and linear (with accumulation). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conv.h"
#include "internal.h"
#include "ref_kernels.h"

typedef struct cfg { int cin, cout, k, stride, pad, h, n; } cfg;

static const cfg CFGS[] = {
    {1, 16, 3, 1, 1, 32, 2},  /* stem, 1 channel */
    {3, 16, 3, 1, 1, 32, 3},  /* stem, 3 channels */
    {16, 32, 3, 2, 1, 32, 2}, /* strided conv2 */
    {16, 32, 1, 2, 0, 32, 2}, /* strided 1x1 shortcut */
    {16, 32, 1, 1, 0, 16, 3}, /* 1x1 shortcut read in place */
    {5, 7, 3, 1, 0, 9, 2},    /* no padding, odd sizes */
    {4, 6, 3, 2, 0, 11, 2},   /* no padding, stride 2, odd size */
    {8, 8, 3, 1, 1, 8, 4},
    {2, 3, 3, 2, 1, 7, 3},    /* odd size with stride 2 and padding */
    {16, 32, 3, 1, 1, 16, 2}, /* direct kernel, two rows per tile */
    {4, 5, 3, 1, 1, 16, 2},   /* direct kernel, odd channel counts */
    {32, 3, 3, 1, 1, 32, 2},  /* transposed stem-like shape */
    {6, 4, 3, 1, 1, 8, 3},    /* direct kernel, four rows per tile */
    {8, 6, 3, 2, 1, 16, 3},   /* direct kernel, stride 2 to 8 wide */
    {3, 5, 3, 2, 1, 64, 2},   /* direct kernel, stride 2 to 32 wide */
    /* the direct kernels work in groups of 3 output channels: remainders
     * of 1 and 2 (forward cout, input gradient cin) at each width */
    {8, 7, 3, 2, 1, 16, 2},   /* stride 2 to 8 wide: 7 = 2*3+1, 8 = 2*3+2 */
    {7, 4, 3, 2, 1, 32, 2},   /* stride 2 to 16 wide: 4 = 3+1, 7 = 2*3+1 */
    {5, 9, 3, 2, 1, 64, 2},   /* stride 2 to 32 wide: 9 = 3*3, 5 = 3+2 */
    {2, 7, 3, 1, 1, 16, 2},   /* stride 1 direct (2 input channels) */
};

static jem__conv to_conv(const cfg *c) {
  jem__conv v;
  memset(&v, 0, sizeof v);
  v.cin = c->cin; v.cout = c->cout; v.k = c->k; v.stride = c->stride; v.pad = c->pad;
  v.hin = v.win = c->h;
  v.hout = v.wout = (c->h + 2 * c->pad - c->k) / c->stride + 1;
  return v;
}

static double *to_double(const float *x, size_t n) {
  double *d = malloc(sizeof(double) * n);
  for (size_t i = 0; i < n; i++) d[i] = x[i];
  return d;
}

/* Pushes values away from the LeakyReLU kink so a step of h never crosses it. */
static void avoid_kink(float *x, size_t n, float margin) {
  for (size_t i = 0; i < n; i++)
    if (fabsf(x[i]) < margin) x[i] = x[i] < 0 ? -margin - x[i] : margin + x[i];
}

/* Double reference of conv(act(x)) in NCHW. */
static void ref_conv_act(double *out, const double *x, const double *w,
                         const double *b, const cfg *c, int act, double leak) {
  size_t len = (size_t)c->n * c->cin * c->h * c->h;
  double *t = malloc(sizeof(double) * len);
  for (size_t i = 0; i < len; i++) t[i] = act ? ref_lrelu(x[i], leak) : x[i];
  ref_conv(out, t, w, b, c->n, c->cin, c->h, c->h, c->cout, c->k, c->stride,
           c->pad, NULL, NULL);
  free(t);
}

static void conv_forward_vs_direct(void) {
  unsigned st = 1;
  for (size_t t = 0; t < sizeof CFGS / sizeof *CFGS; t++) {
    const cfg *c = &CFGS[t];
    jem__conv cv = to_conv(c);
    const int n = c->n, ho = cv.hout;
    size_t xin = (size_t)n * c->cin * c->h * c->h, xo = (size_t)n * c->cout * ho * ho;
    size_t nw = (size_t)c->cout * c->cin * c->k * c->k;
    float *x = malloc(sizeof(float) * xin), *xc = malloc(sizeof(float) * xin);
    float *w = malloc(sizeof(float) * nw), *b = malloc(sizeof(float) * c->cout);
    float *out = malloc(sizeof(float) * xo), *back = calloc(xo, sizeof(float));
    ref_fill(x, xin, &st, -1, 1);
    ref_fill(w, nw, &st, -0.5f, 0.5f);
    ref_fill(b, (size_t)c->cout, &st, -0.5f, 0.5f);
    jem__to_cnhw(xc, x, n, c->cin, c->h * c->h);
    double *xd = to_double(x, xin), *wd = to_double(w, nw), *bd = to_double(b, (size_t)c->cout);
    double *ref = malloc(sizeof(double) * xo);
    size_t per = (size_t)jem__conv_rows(&cv) * jem__conv_hwo(&cv);
    /* one image per chunk, two, and the whole batch at once */
    const size_t caps[3] = {per, 2 * per, (size_t)n * per};
    for (int act = 0; act < 2; act++) {
      ref_conv_act(ref, xd, wd, bd, c, act, 0.2);
      for (int ci = 0; ci < 3; ci++) {
        size_t need = jem__conv_col_need(&cv, n, caps[ci]);
        assert_true(need <= caps[ci] || jem__conv_fast(&cv)); /* padded image */
        float *col = malloc(sizeof(float) * (need ? need : 1));
        jem__conv_forward(out, xc, w, NULL, b, &cv, n, act, 0.2f, 0, col, need);
        memset(back, 0, sizeof(float) * xo);
        jem__from_cnhw_acc(back, out, n, c->cout, ho * ho);
        for (size_t i = 0; i < xo; i++)
          if (fabs(back[i] - ref[i]) > 1e-5 * (1 + fabs(ref[i])))
            fail_msg("cfg %zu act %d cap %d: out[%zu] %g vs %g", t, act, ci, i,
                     (double)back[i], ref[i]);
        /* accumulate = 1 adds onto what is there */
        jem__conv_forward(out, xc, w, NULL, b, &cv, n, act, 0.2f, 1, col, need);
        memset(back, 0, sizeof(float) * xo);
        jem__from_cnhw_acc(back, out, n, c->cout, ho * ho);
        for (size_t i = 0; i < xo; i++)
          assert_true(fabs(back[i] - 2 * ref[i]) <= 2e-5 * (1 + fabs(ref[i])));
        free(col);
      }
    }
    free(x); free(xc); free(w); free(b); free(out); free(back);
    free(xd); free(wd); free(bd); free(ref);
  }
}

static void test_conv_forward_vs_direct(void **state) {
  (void)state;
  conv_forward_vs_direct(); /* direct 3x3 kernel where the CPU has it */
  jem__conv_set_fast(0);
  conv_forward_vs_direct(); /* im2col everywhere */
  jem__conv_set_fast(1);
}

/* <im2col(x), c> == <x, col2im(c)>: col2im is the adjoint of im2col. */
static void test_im2col_adjoint(void **state) {
  (void)state;
  unsigned st = 2;
  for (size_t t = 0; t < sizeof CFGS / sizeof *CFGS; t++) {
    const cfg *c = &CFGS[t];
    jem__conv cv = to_conv(c);
    const int n = c->n;
    size_t xin = (size_t)n * c->cin * c->h * c->h;
    size_t cl = (size_t)jem__conv_rows(&cv) * jem__conv_hwo(&cv) * (size_t)(n - 1);
    float *x = malloc(sizeof(float) * xin), *col = malloc(sizeof(float) * cl);
    float *cr = malloc(sizeof(float) * cl), *xa = calloc(xin, sizeof(float));
    ref_fill(x, xin, &st, -1, 1);
    ref_fill(cr, cl, &st, -1, 1);
    /* images 1..n-1 only: the offset must be honoured */
    jem__im2col(col, x, &cv, n, 1, n - 1, 0, 0.2f);
    jem__col2im(xa, cr, &cv, n, 1, n - 1);
    double a = 0, b = 0;
    for (size_t i = 0; i < cl; i++) a += (double)col[i] * cr[i];
    for (size_t i = 0; i < xin; i++) b += (double)x[i] * xa[i];
    assert_true(fabs(a - b) <= 1e-4 * (fabs(a) + 1));
    /* image 0 untouched by col2im of images 1.. (CNHW: channel-major) */
    for (int ci = 0; ci < c->cin; ci++)
      for (int i = 0; i < c->h * c->h; i++)
        assert_true(xa[((size_t)ci * n) * c->h * c->h + i] == 0.0f);
    free(x); free(col); free(cr); free(xa);
  }
}

/* L = sum r * conv(act(x)); checks dx (w.r.t. act(x), times act'), dW, db by
 * central differences of the double reference, and accumulation. */
static void check_conv_grad(const cfg *c, int act, unsigned seed) {
  jem__conv cv = to_conv(c);
  const int n = c->n, ho = cv.hout;
  const double leak = 0.2, h = 1e-3;
  size_t xin = (size_t)n * c->cin * c->h * c->h, xo = (size_t)n * c->cout * ho * ho;
  size_t nw = (size_t)c->cout * c->cin * c->k * c->k;
  unsigned st = seed;
  float *x = malloc(sizeof(float) * xin), *xc = malloc(sizeof(float) * xin);
  float *w = malloc(sizeof(float) * nw), *r = malloc(sizeof(float) * xo);
  float *rc = malloc(sizeof(float) * xo), *b = malloc(sizeof(float) * c->cout);
  ref_fill(x, xin, &st, -1, 1);
  avoid_kink(x, xin, 0.01f);
  ref_fill(w, nw, &st, -0.5f, 0.5f);
  ref_fill(b, (size_t)c->cout, &st, -0.5f, 0.5f);
  ref_fill(r, xo, &st, -1, 1);
  jem__to_cnhw(xc, x, n, c->cin, c->h * c->h);
  jem__to_cnhw(rc, r, n, c->cout, ho * ho);
  size_t need = jem__conv_col_need(&cv, n, (size_t)jem__conv_rows(&cv) * jem__conv_hwo(&cv));
  float *col = malloc(sizeof(float) * need);
  float *dw = calloc(nw, sizeof(float)), *db = calloc((size_t)c->cout, sizeof(float));
  float *dxc = calloc(xin, sizeof(float)), *dx = calloc(xin, sizeof(float));
  float *wf = NULL;
  if (c->k == 3) {
    wf = malloc(sizeof(float) * nw);
    jem__conv_flip(wf, w, &cv);
  }
  jem__conv_backward(rc, xc, w, wf, &cv, n, act, (float)leak, dw, db, dxc, col, need);
  if (act) jem__lrelu_backward(dxc, xc, xin, (float)leak);
  jem__from_cnhw_acc(dx, dxc, n, c->cin, c->h * c->h);

  double *xd = to_double(x, xin), *wd = to_double(w, nw), *bd = to_double(b, (size_t)c->cout);
  double *o = malloc(sizeof(double) * xo);
#define LOSS(res)                                               \
  do {                                                          \
    ref_conv_act(o, xd, wd, bd, c, act, leak);                  \
    double s_ = 0;                                              \
    for (size_t q = 0; q < xo; q++) s_ += (double)r[q] * o[q];  \
    res = s_;                                                   \
  } while (0)
  double lp, lm;
  for (int t = 0; t < 12; t++) {
    size_t j = ref_rand(&st) % xin;
    xd[j] = x[j] + h; LOSS(lp);
    xd[j] = x[j] - h; LOSS(lm);
    xd[j] = x[j];
    double num = (lp - lm) / (2 * h);
    assert_true(fabs(num - dx[j]) <= 1e-2 * fabs(num) + 1e-4);
  }
  for (int t = 0; t < 12; t++) {
    size_t j = ref_rand(&st) % nw;
    wd[j] = w[j] + h; LOSS(lp);
    wd[j] = w[j] - h; LOSS(lm);
    wd[j] = w[j];
    double num = (lp - lm) / (2 * h);
    assert_true(fabs(num - dw[j]) <= 1e-2 * fabs(num) + 1e-4);
  }
  for (int j = 0; j < c->cout; j++) {
    bd[j] = b[j] + h; LOSS(lp);
    bd[j] = b[j] - h; LOSS(lm);
    bd[j] = b[j];
    double num = (lp - lm) / (2 * h);
    assert_true(fabs(num - db[j]) <= 1e-2 * fabs(num) + 1e-4);
  }
#undef LOSS
  /* accumulation: a second call adds the same amounts again */
  float *dw2 = malloc(sizeof(float) * nw), *db2 = malloc(sizeof(float) * c->cout);
  float *dxc2 = malloc(sizeof(float) * xin), *dxc1 = calloc(xin, sizeof(float));
  jem__conv_backward(rc, xc, w, wf, &cv, n, act, (float)leak, NULL, NULL, dxc1, col, need);
  memcpy(dw2, dw, sizeof(float) * nw);
  memcpy(db2, db, sizeof(float) * c->cout);
  memcpy(dxc2, dxc1, sizeof(float) * xin);
  jem__conv_backward(rc, xc, w, wf, &cv, n, act, (float)leak, dw2, db2, dxc2, col, need);
  for (size_t i = 0; i < nw; i++) assert_true(fabs(dw2[i] - 2 * dw[i]) <= 1e-5 * (1 + fabs(dw[i])));
  for (int i = 0; i < c->cout; i++) assert_true(fabs(db2[i] - 2 * db[i]) <= 1e-5 * (1 + fabs(db[i])));
  for (size_t i = 0; i < xin; i++) assert_true(fabs(dxc2[i] - 2 * dxc1[i]) <= 1e-5 * (1 + fabs(dxc1[i])));
  free(dw2); free(db2); free(dxc2); free(dxc1); free(wf);
  free(x); free(xc); free(w); free(r); free(rc); free(b); free(col);
  free(dw); free(db); free(dxc); free(dx); free(xd); free(wd); free(bd); free(o);
}

static void test_conv_grad(void **state) {
  (void)state;
  for (int fast = 1; fast >= 0; fast--) {
    jem__conv_set_fast(fast);
    for (size_t t = 0; t < sizeof CFGS / sizeof *CFGS; t++) {
      check_conv_grad(&CFGS[t], 0, 100 + (unsigned)t);
      check_conv_grad(&CFGS[t], 1, 200 + (unsigned)t);
    }
  }
  jem__conv_set_fast(1);
}

/* The direct kernel and im2col agree closely on every shape it takes. */
static void test_fast_matches_im2col(void **state) {
  (void)state;
  unsigned st = 9;
  int used = 0;
  for (size_t t = 0; t < sizeof CFGS / sizeof *CFGS; t++) {
    const cfg *c = &CFGS[t];
    jem__conv cv = to_conv(c);
    if (!jem__conv_fast(&cv)) continue;
    used++;
    const int n = c->n;
    size_t xin = (size_t)n * c->cin * c->h * c->h;
    size_t xo = (size_t)n * c->cout * cv.hout * cv.wout;
    size_t nw = (size_t)c->cout * c->cin * 9;
    float *x = malloc(sizeof(float) * xin), *w = malloc(sizeof(float) * nw);
    float *b = malloc(sizeof(float) * c->cout), *o1 = malloc(sizeof(float) * xo);
    float *o2 = malloc(sizeof(float) * xo);
    ref_fill(x, xin, &st, -1, 1);
    ref_fill(w, nw, &st, -1, 1);
    ref_fill(b, (size_t)c->cout, &st, -1, 1);
    size_t need = jem__conv_col_need(&cv, n, (size_t)1 << 20);
    float *col = malloc(sizeof(float) * need);
    jem__conv_forward(o1, x, w, NULL, b, &cv, n, 1, 0.2f, 0, col, need);
    jem__conv_set_fast(0);
    jem__conv_forward(o2, x, w, NULL, b, &cv, n, 1, 0.2f, 0, col, need);
    jem__conv_set_fast(1);
    for (size_t i = 0; i < xo; i++)
      if (fabs(o1[i] - o2[i]) > 1e-5 * (1 + fabs(o2[i])))
        fail_msg("cfg %zu: out[%zu] direct %g im2col %g", t, i, (double)o1[i], (double)o2[i]);
    free(x); free(w); free(b); free(o1); free(o2); free(col);
  }
  /* on CPUs without AVX2+FMA the direct kernel is never used */
  print_message("direct kernel used for %d of %zu shapes\n", used, sizeof CFGS / sizeof *CFGS);
}

static void test_lrelu_grad(void **state) {
  (void)state;
  const size_t n = 257;
  const double h = 1e-3;
  unsigned st = 3;
  float a[257], r[257], g[257];
  ref_fill(a, n, &st, -2, 2);
  avoid_kink(a, n, 0.01f);
  ref_fill(r, n, &st, -1, 1);
  a[0] = 0.0f; /* PyTorch: the kink itself takes the negative slope */
  memcpy(g, r, sizeof g);
  jem__lrelu_backward(g, a, n, 0.2f);
  assert_true(fabs(g[0] - 0.2 * r[0]) < 1e-7);
  for (size_t i = 1; i < n; i++) {
    double num = (ref_lrelu(a[i] + h, 0.2) - ref_lrelu(a[i] - h, 0.2)) / (2 * h) * r[i];
    assert_true(fabs(num - g[i]) <= 1e-2 * fabs(num) + 1e-6);
  }
}

static void test_pool_grad(void **state) {
  (void)state;
  const int c = 5, n = 3, hw = 64;
  const size_t len = (size_t)c * n * hw;
  const double h = 1e-3;
  unsigned st = 4;
  float *a = malloc(sizeof(float) * len), *da = calloc(len, sizeof(float));
  float feat[15], r[15];
  ref_fill(a, len, &st, -1, 1);
  avoid_kink(a, len, 0.01f);
  ref_fill(r, 15, &st, -1, 1);
  jem__pool_forward(feat, a, c, n, hw, 0.2f);
  for (int ci = 0; ci < c; ci++)
    for (int ni = 0; ni < n; ni++) {
      double s = 0;
      for (int i = 0; i < hw; i++) s += ref_lrelu(a[((size_t)ci * n + ni) * hw + i], 0.2);
      assert_true(fabs(feat[ni * c + ci] - s / hw) < 1e-6);
    }
  jem__pool_backward(da, r, a, c, n, hw, 0.2f);
  for (int t = 0; t < 30; t++) {
    size_t j = ref_rand(&st) % len;
    int ci = (int)(j / ((size_t)n * hw)), ni = (int)(j / hw % n);
    double num = (ref_lrelu(a[j] + h, 0.2) - ref_lrelu(a[j] - h, 0.2)) / (2 * h) / hw *
                 r[ni * c + ci];
    assert_true(fabs(num - da[j]) <= 1e-2 * fabs(num) + 1e-7);
  }
  /* accumulates */
  float *da2 = malloc(sizeof(float) * len);
  memcpy(da2, da, sizeof(float) * len);
  jem__pool_backward(da2, r, a, c, n, hw, 0.2f);
  for (size_t i = 0; i < len; i++) assert_true(fabs(da2[i] - 2 * da[i]) <= 1e-6);
  free(a); free(da); free(da2);
}

static void test_linear_grad(void **state) {
  (void)state;
  const int n = 3, f = 20, k = 7;
  const double h = 1e-3;
  unsigned st = 5;
  float x[60], w[140], b[7], y[21], r[21];
  ref_fill(x, 60, &st, -1, 1);
  ref_fill(w, 140, &st, -1, 1);
  ref_fill(b, 7, &st, -1, 1);
  ref_fill(r, 21, &st, -1, 1);
  jem__linear_forward(y, x, w, b, n, f, k);
  double xd[60], wd[140], bd[7];
  for (int i = 0; i < 60; i++) xd[i] = x[i];
  for (int i = 0; i < 140; i++) wd[i] = w[i];
  for (int i = 0; i < 7; i++) bd[i] = b[i];
#define LIN_LOSS(res)                                          \
  do {                                                         \
    double s_ = 0;                                             \
    for (int i_ = 0; i_ < n; i_++)                             \
      for (int j_ = 0; j_ < k; j_++) {                         \
        double v_ = bd[j_];                                    \
        for (int q_ = 0; q_ < f; q_++)                         \
          v_ += xd[i_ * f + q_] * wd[j_ * f + q_];             \
        s_ += r[i_ * k + j_] * v_;                             \
      }                                                        \
    res = s_;                                                  \
  } while (0)
  for (int i = 0; i < n; i++)
    for (int j = 0; j < k; j++) {
      double v = b[j];
      for (int q = 0; q < f; q++) v += (double)x[i * f + q] * w[j * f + q];
      assert_true(fabs(v - y[i * k + j]) < 1e-5);
    }
  float dw[140] = {0}, db[7] = {0}, dx[60] = {0};
  jem__linear_backward(r, x, w, n, f, k, dw, db, dx);
  double lp, lm;
  for (int j = 0; j < 60; j++) {
    xd[j] = x[j] + h; LIN_LOSS(lp); xd[j] = x[j] - h; LIN_LOSS(lm); xd[j] = x[j];
    assert_true(fabs((lp - lm) / (2 * h) - dx[j]) <= 1e-2 * fabs(dx[j]) + 1e-5);
  }
  for (int j = 0; j < 140; j++) {
    wd[j] = w[j] + h; LIN_LOSS(lp); wd[j] = w[j] - h; LIN_LOSS(lm); wd[j] = w[j];
    assert_true(fabs((lp - lm) / (2 * h) - dw[j]) <= 1e-2 * fabs(dw[j]) + 1e-5);
  }
  for (int j = 0; j < 7; j++) {
    bd[j] = b[j] + h; LIN_LOSS(lp); bd[j] = b[j] - h; LIN_LOSS(lm); bd[j] = b[j];
    assert_true(fabs((lp - lm) / (2 * h) - db[j]) <= 1e-2 * fabs(db[j]) + 1e-5);
  }
#undef LIN_LOSS
  float dw2[140], db2[7], dx2[60];
  memcpy(dw2, dw, sizeof dw); memcpy(db2, db, sizeof db); memcpy(dx2, dx, sizeof dx);
  jem__linear_backward(r, x, w, n, f, k, dw2, db2, dx2);
  for (int i = 0; i < 140; i++) assert_true(fabs(dw2[i] - 2 * dw[i]) < 1e-5);
  for (int i = 0; i < 7; i++) assert_true(fabs(db2[i] - 2 * db[i]) < 1e-5);
  for (int i = 0; i < 60; i++) assert_true(fabs(dx2[i] - 2 * dx[i]) < 1e-5);
}

static void test_layout(void **state) {
  (void)state;
  float x[2 * 3 * 4], c[24], back[24] = {0};
  for (int i = 0; i < 24; i++) x[i] = (float)i;
  jem__to_cnhw(c, x, 2, 3, 4);
  /* c[ci][ni][p] = x[ni][ci][p] */
  assert_true(c[(1 * 2 + 0) * 4 + 2] == x[(0 * 3 + 1) * 4 + 2]);
  assert_true(c[(2 * 2 + 1) * 4 + 3] == x[(1 * 3 + 2) * 4 + 3]);
  jem__from_cnhw_acc(back, c, 2, 3, 4);
  assert_memory_equal(back, x, sizeof x);
}

/* jem__conv_input_grad (overwrite, fused gate) equals conv_backward into a
 * zeroed buffer followed by the gate; both strides of the direct kernel. */
static void test_input_grad_fused(void **state) {
  (void)state;
  unsigned st = 17;
  int used = 0;
  for (size_t t = 0; t < sizeof CFGS / sizeof *CFGS; t++) {
    const cfg *c = &CFGS[t];
    jem__conv cv = to_conv(c);
    if (!jem__conv_fast(&cv)) continue;
    used++;
    const int n = c->n;
    size_t xin = (size_t)n * c->cin * c->h * c->h;
    size_t xo = (size_t)n * c->cout * cv.hout * cv.wout;
    size_t nw = (size_t)c->cout * c->cin * 9;
    float *w = malloc(sizeof(float) * nw), *wf = malloc(sizeof(float) * nw);
    float *g = malloc(sizeof(float) * xo), *gate = malloc(sizeof(float) * xo);
    float *gg = malloc(sizeof(float) * xo), *d1 = malloc(sizeof(float) * xin);
    float *d2 = calloc(xin, sizeof(float));
    ref_fill(w, nw, &st, -1, 1);
    ref_fill(g, xo, &st, -1, 1);
    ref_fill(gate, xo, &st, -1, 1);
    ref_fill(d1, xin, &st, 5, 6); /* garbage: must be overwritten */
    jem__conv_flip(wf, w, &cv);
    size_t need = jem__conv_col_need(&cv, n, (size_t)1 << 20);
    float *col = malloc(sizeof(float) * need);
    jem__conv_input_grad(d1, g, gate, 0.2f, wf, NULL, &cv, n, col, need);
    memcpy(gg, g, sizeof(float) * xo);
    jem__lrelu_backward(gg, gate, xo, 0.2f);
    jem__conv_set_fast(0);
    jem__conv_backward(gg, NULL, w, NULL, &cv, n, 0, 0.2f, NULL, NULL, d2, col, need);
    jem__conv_set_fast(1);
    for (size_t i = 0; i < xin; i++)
      if (fabs(d1[i] - d2[i]) > 1e-5 * (1 + fabs(d2[i])))
        fail_msg("cfg %zu: din[%zu] fused %g reference %g", t, i, (double)d1[i], (double)d2[i]);
    free(w); free(wf); free(g); free(gate); free(gg); free(d1); free(d2); free(col);
  }
  print_message("fused input gradient checked on %d shapes\n", used);
}

/* Naive double din[n][ci][y][x] = sum over co, ky, kx of g[n][co][y+1-ky]
 * [x+1-kx] w[co][ci][ky][kx] with g = dout * LeakyReLU'(gate) (gate may be
 * NULL): the input gradient of a 3x3 stride-1 padding-1 convolution, NCHW. */
static void ref_input_grad(double *din, const float *dout, const float *gate,
                           const float *w, int n, int cin, int cout, int h,
                           double leak) {
  const size_t hw = (size_t)h * h;
  for (int i = 0; i < n; i++)
    for (int ci = 0; ci < cin; ci++)
      for (int y = 0; y < h; y++)
        for (int x = 0; x < h; x++) {
          double acc = 0.0;
          for (int co = 0; co < cout; co++) {
            const float *g = dout + ((size_t)i * cout + co) * hw;
            const float *gt = gate ? gate + ((size_t)i * cout + co) * hw : NULL;
            for (int ky = 0; ky < 3; ky++)
              for (int kx = 0; kx < 3; kx++) {
                int oy = y + 1 - ky, ox = x + 1 - kx;
                if (oy < 0 || oy >= h || ox < 0 || ox >= h) continue;
                size_t o = (size_t)oy * h + ox;
                double gv = g[o];
                if (gt && !(gt[o] > 0.0f)) gv *= leak;
                acc += gv * w[((size_t)co * cin + ci) * 9 + ky * 3 + kx];
              }
          }
          din[((size_t)i * cin + ci) * hw + (size_t)y * h + x] = acc;
        }
}

/* Winograd F(2x2,3x3) forced on (jem__conv_set_fast(3)) against naive double
 * references: every map size of a WRN (32, 16, 8), even and odd channel
 * counts (the GEMM's channel remainders), 1 to 3 images (one 8x8 image is a
 * lone 16-tile block), forward plain and through LeakyReLU, overwrite and
 * accumulate, and the input gradient plain (accumulating, through
 * jem__conv_backward) and gated (overwriting, jem__conv_input_grad); the
 * precomputed transforms and the AVX2 kernels give the same bits. */
static void test_winograd_vs_naive(void **state) {
  (void)state;
  static const int chans[][2] = {{16, 16}, {3, 17}, {17, 3}, {8, 8}, {32, 24}, {64, 64}};
  static const int sizes[] = {32, 16, 8};
  unsigned st = 31;
  double worst_f = 0.0, worst_b = 0.0;
  int checked = 0;
  for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
    for (size_t k = 0; k < sizeof chans / sizeof *chans; k++) {
      const int h = sizes[si], cin = chans[k][0], cout = chans[k][1];
      const int n = 1 + (int)((si + k) % 3);
      if (cin * cout > 1024 && h == 32) continue; /* keeps the test quick */
      cfg c = {cin, cout, 3, 1, 1, h, n};
      jem__conv cv = to_conv(&c);
      const size_t hw = (size_t)h * h, xin = (size_t)n * cin * hw;
      const size_t xo = (size_t)n * cout * hw, nw = (size_t)cout * cin * 9;
      float *x = malloc(sizeof(float) * xin), *xc = malloc(sizeof(float) * xin);
      float *w = malloc(sizeof(float) * nw), *wf = malloc(sizeof(float) * nw);
      float *b = malloc(sizeof(float) * cout);
      float *g = malloc(sizeof(float) * xo), *gc = malloc(sizeof(float) * xo);
      float *gate = malloc(sizeof(float) * xo), *gatec = malloc(sizeof(float) * xo);
      float *out = malloc(sizeof(float) * xo), *back = malloc(sizeof(float) * xo);
      float *din = malloc(sizeof(float) * xin), *dback = malloc(sizeof(float) * xin);
      double *ref = malloc(sizeof(double) * (xo > xin ? xo : xin));
      ref_fill(x, xin, &st, -1, 1);
      ref_fill(w, nw, &st, -0.5f, 0.5f);
      ref_fill(b, (size_t)cout, &st, -0.5f, 0.5f);
      ref_fill(g, xo, &st, -1, 1);
      ref_fill(gate, xo, &st, -1, 1);
      jem__to_cnhw(xc, x, n, cin, (int)hw);
      jem__to_cnhw(gc, g, n, cout, (int)hw);
      jem__to_cnhw(gatec, gate, n, cout, (int)hw);
      jem__conv_flip(wf, w, &cv);
      double *xd = to_double(x, xin), *wd = to_double(w, nw), *bd = to_double(b, (size_t)cout);
      jem__conv_set_fast(3);
      size_t need = jem__conv_col_need(&cv, n, (size_t)1 << 18);
      float *col = malloc(sizeof(float) * need);
      for (int act = 0; act < 2; act++) {
        ref_conv_act(ref, xd, wd, bd, &c, act, 0.2);
        for (int acc = 0; acc < 2; acc++) {
          if (!acc) ref_fill(out, xo, &st, 5, 6); /* garbage: overwritten */
          jem__conv_forward(out, xc, w, NULL, b, &cv, n, act, 0.2f, acc, col, need);
          memset(back, 0, sizeof(float) * xo);
          jem__from_cnhw_acc(back, out, n, cout, (int)hw);
          double err = 0.0, mag = 0.0;
          for (size_t i = 0; i < xo; i++) {
            double r = (acc ? 2.0 : 1.0) * ref[i];
            err = fmax(err, fabs(back[i] - r));
            mag = fmax(mag, fabs(r));
          }
          if (err > 1e-5 * (1.0 + mag))
            fail_msg("forward %d->%d %dx%d n %d act %d acc %d: max error %g (max |ref| %g)",
                     cin, cout, h, h, n, act, acc, err, mag);
          worst_f = fmax(worst_f, err / (1.0 + mag));
        }
      }
      /* The model's precomputed transforms (packed for the micro-kernels)
       * give the bits of the per-call ones, and the AVX2 kernels those of
       * the AVX-512 ones. */
      const size_t nu = jem__conv_wino_floats(&cv);
      if (nu && jem__conv_fast(&cv)) {
        float *wu = malloc(sizeof(float) * 2 * nu), *o[3], *d[3];
        jem__conv_wino_weights(wu, w, cin, cout);
        jem__conv_wino_weights(wu + nu, wf, cout, cin);
        for (int r = 0; r < 3; r++) {
          o[r] = malloc(sizeof(float) * xo);
          d[r] = malloc(sizeof(float) * xin);
          jem__wide_force_avx2(r == 2);
          jem__conv_forward(o[r], xc, w, r ? wu : NULL, b, &cv, n, 1, 0.2f, 0, col, need);
          jem__conv_input_grad(d[r], gc, gatec, 0.2f, wf, r ? wu + nu : NULL, &cv, n, col, need);
        }
        jem__wide_force_avx2(0);
        for (int r = 1; r < 3; r++) {
          assert_memory_equal(o[0], o[r], sizeof(float) * xo);
          assert_memory_equal(d[0], d[r], sizeof(float) * xin);
        }
        for (int r = 0; r < 3; r++) {
          free(o[r]);
          free(d[r]);
        }
        free(wu);
      }
      if (jem__conv_fast(&cv)) {
        for (int gated = 0; gated < 2; gated++) {
          ref_input_grad(ref, g, gated ? gate : NULL, w, n, cin, cout, h, 0.2);
          if (gated) {
            ref_fill(din, xin, &st, 5, 6); /* garbage: overwritten */
            jem__conv_input_grad(din, gc, gatec, 0.2f, wf, NULL, &cv, n, col, need);
          } else {
            /* accumulates onto x */
            memcpy(din, xc, sizeof(float) * xin);
            jem__conv_backward(gc, NULL, w, wf, &cv, n, 0, 0.2f, NULL, NULL, din, col, need);
          }
          memset(dback, 0, sizeof(float) * xin);
          jem__from_cnhw_acc(dback, din, n, cin, (int)hw);
          double err = 0.0, mag = 0.0;
          for (size_t i = 0; i < xin; i++) {
            double r = ref[i] + (gated ? 0.0 : x[i]);
            err = fmax(err, fabs(dback[i] - r));
            mag = fmax(mag, fabs(r));
          }
          if (err > 1e-5 * (1.0 + mag))
            fail_msg("input grad %d->%d %dx%d n %d gated %d: max error %g (max |ref| %g)",
                     cin, cout, h, h, n, gated, err, mag);
          worst_b = fmax(worst_b, err / (1.0 + mag));
        }
      }
      jem__conv_set_fast(1);
      checked++;
      free(x); free(xc); free(w); free(wf); free(b); free(g); free(gc);
      free(gate); free(gatec); free(out); free(back); free(din); free(dback);
      free(ref); free(xd); free(wd); free(bd); free(col);
    }
  print_message("Winograd checked on %d shapes: max error / (1 + max |ref|) "
                "forward %.3g, input gradient %.3g\n", checked, worst_f, worst_b);
}

/* F(4x4,3x3)'s transforms (coefficients up to 8) round more than
 * F(2x2,3x3)'s: errors up to about 1e-5 of the largest value here. */
#define WIDE_TOL 5e-5

/* Wide layers (weights past the direct kernel's L2 budget) on Winograd with
 * the packed micro-kernels, against naive double references: each map size
 * and algorithm (F(4x4,3x3) on 32x32 and 16x16 maps, F(2x2,3x3) on 8x8),
 * channel counts that leave
 * panel remainders (100 = 8*12+4, 112 = 9*12+4, 124 = 10*12+4) and
 * tile-strip remainders (1 to 4 images), forward plain
 * and through LeakyReLU, overwrite and accumulate, and the input gradient
 * from the same transform (gated and not).  The AVX2 micro-kernels give the
 * same bits as the AVX-512 ones; im2col serves the layer without the
 * transforms or with the mode at 0. */
static void test_wide_vs_naive(void **state) {
  (void)state;
  static const int shapes[][4] = {{112, 100, 8, 2},  {100, 124, 16, 3}, {124, 112, 32, 1},
                                  {128, 128, 8, 1},  {112, 100, 16, 4}};
  unsigned st = 37;
  double worst_f = 0.0, worst_b = 0.0;
  for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
    const int cin = shapes[k][0], cout = shapes[k][1], h = shapes[k][2], n = shapes[k][3];
    cfg c = {cin, cout, 3, 1, 1, h, n};
    jem__conv cv = to_conv(&c);
    if (!jem__conv_wide_shape(&cv)) skip(); /* no AVX2+FMA */
    assert_true(jem__conv_wide(&cv) && !jem__conv_fast(&cv));
    const size_t hw = (size_t)h * h, xin = (size_t)n * cin * hw;
    const size_t xo = (size_t)n * cout * hw, nw = (size_t)cout * cin * 9;
    float *x = malloc(sizeof(float) * xin), *xc = malloc(sizeof(float) * xin);
    float *w = malloc(sizeof(float) * nw), *b = malloc(sizeof(float) * cout);
    float *g = malloc(sizeof(float) * xo), *gc = malloc(sizeof(float) * xo);
    float *gate = malloc(sizeof(float) * xo), *gatec = malloc(sizeof(float) * xo);
    float *out = malloc(sizeof(float) * xo), *out2 = malloc(sizeof(float) * xo);
    float *back = malloc(sizeof(float) * (xo > xin ? xo : xin));
    float *din = malloc(sizeof(float) * xin), *din2 = malloc(sizeof(float) * xin);
    double *ref = malloc(sizeof(double) * (xo > xin ? xo : xin));
    ref_fill(x, xin, &st, -1, 1);
    ref_fill(w, nw, &st, -0.1f, 0.1f);
    ref_fill(b, (size_t)cout, &st, -0.5f, 0.5f);
    ref_fill(g, xo, &st, -1, 1);
    ref_fill(gate, xo, &st, -1, 1);
    jem__to_cnhw(xc, x, n, cin, (int)hw);
    jem__to_cnhw(gc, g, n, cout, (int)hw);
    jem__to_cnhw(gatec, gate, n, cout, (int)hw);
    const size_t nu = jem__conv_wide_floats(&cv);
    float *u = jem__falloc(nu);
    jem__conv_wide_weights(u, w, &cv);
    double *xd = to_double(x, xin), *wd = to_double(w, nw), *bd = to_double(b, (size_t)cout);
    const size_t need = jem__conv_col_need(&cv, n, (size_t)1 << 18);
    float *col = malloc(sizeof(float) * need);
    for (int act = 0; act < 2; act++) {
      ref_conv_act(ref, xd, wd, bd, &c, act, 0.2);
      for (int acc = 0; acc < 2; acc++) {
        ref_fill(out, xo, &st, 5, 6); /* garbage unless accumulating */
        if (acc) memset(out, 0, sizeof(float) * xo);
        jem__conv_forward(out, xc, w, u, b, &cv, n, act, 0.2f, 0, col, need);
        if (acc) jem__conv_forward(out, xc, w, u, b, &cv, n, act, 0.2f, 1, col, need);
        /* the AVX2 kernels: the same bits */
        jem__wide_force_avx2(1);
        memcpy(out2, out, sizeof(float) * xo);
        jem__conv_forward(out2, xc, w, u, b, &cv, n, act, 0.2f, 0, col, need);
        if (acc) jem__conv_forward(out2, xc, w, u, b, &cv, n, act, 0.2f, 1, col, need);
        jem__wide_force_avx2(0);
        assert_memory_equal(out, out2, sizeof(float) * xo);
        memset(back, 0, sizeof(float) * xo);
        jem__from_cnhw_acc(back, out, n, cout, (int)hw);
        double err = 0.0, mag = 0.0;
        for (size_t i = 0; i < xo; i++) {
          double r = (acc ? 2.0 : 1.0) * ref[i];
          err = fmax(err, fabs(back[i] - r));
          mag = fmax(mag, fabs(r));
        }
        if (err > WIDE_TOL * (1.0 + mag))
          fail_msg("wide forward %d->%d %dx%d n %d act %d acc %d: max error %g (|ref| %g)",
                   cin, cout, h, h, n, act, acc, err, mag);
        worst_f = fmax(worst_f, err / (1.0 + mag));
      }
    }
    for (int gated = 0; gated < 2; gated++) {
      ref_input_grad(ref, g, gated ? gate : NULL, w, n, cin, cout, h, 0.2);
      ref_fill(din, xin, &st, 5, 6); /* garbage: overwritten */
      jem__conv_input_grad(din, gc, gated ? gatec : NULL, 0.2f, NULL, u + jem__conv_wide_grad_off(&cv), &cv, n,
                           col, need);
      jem__wide_force_avx2(1);
      jem__conv_input_grad(din2, gc, gated ? gatec : NULL, 0.2f, NULL, u + jem__conv_wide_grad_off(&cv), &cv, n,
                           col, need);
      jem__wide_force_avx2(0);
      assert_memory_equal(din, din2, sizeof(float) * xin);
      memset(back, 0, sizeof(float) * xin);
      jem__from_cnhw_acc(back, din, n, cin, (int)hw);
      double err = 0.0, mag = 0.0;
      for (size_t i = 0; i < xin; i++) {
        err = fmax(err, fabs(back[i] - ref[i]));
        mag = fmax(mag, fabs(ref[i]));
      }
      if (err > WIDE_TOL * (1.0 + mag))
        fail_msg("wide input grad %d->%d %dx%d n %d gated %d: max error %g (|ref| %g)",
                 cin, cout, h, h, n, gated, err, mag);
      worst_b = fmax(worst_b, err / (1.0 + mag));
    }
    /* without the transforms, and with the mode at 0: im2col, close */
    for (int mode = 1; mode >= 0; mode--) {
      jem__conv_set_fast(mode);
      jem__conv_forward(out2, xc, w, mode ? NULL : u, b, &cv, n, 1, 0.2f, 0, col, need);
      for (size_t i = 0; i < xo; i++) {
        float d = out2[i] - out[i] / 2.0f; /* out holds the accumulated pass */
        assert_true(fabsf(d) <= 1e-4f * (1.0f + fabsf(out2[i])));
      }
    }
    jem__conv_set_fast(1);
    free(x); free(xc); free(w); free(b); free(g); free(gc); free(gate); free(gatec);
    free(out); free(out2); free(back); free(din); free(din2); free(ref); free(xd);
    free(wd); free(bd); free(col); free(u);
  }
  print_message("wide layers: max error / (1 + max |ref|) forward %.3g, input gradient "
                "%.3g\n", worst_f, worst_b);
}

/* Strided wide layers: im2col with the product on the micro-kernels, forward
 * against the naive reference (bias, accumulate), the input gradient against
 * im2col + sgemm, AVX2 against AVX-512 bit for bit. */
static void test_wide_strided(void **state) {
  (void)state;
  static const int shapes[][3] = {{112, 100, 16}, {100, 124, 32}};
  unsigned st = 41;
  for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
    const int cin = shapes[k][0], cout = shapes[k][1], h = shapes[k][2], n = 2 + (int)k;
    cfg c = {cin, cout, 3, 2, 1, h, n};
    jem__conv cv = to_conv(&c);
    if (!jem__conv_wide_shape(&cv)) skip();
    const size_t hwi = (size_t)h * h, hwo = hwi / 4, xin = (size_t)n * cin * hwi;
    const size_t xo = (size_t)n * cout * hwo, nw = (size_t)cout * cin * 9;
    float *x = malloc(sizeof(float) * xin), *xc = malloc(sizeof(float) * xin);
    float *w = malloc(sizeof(float) * nw), *b = malloc(sizeof(float) * cout);
    float *out = malloc(sizeof(float) * xo), *back = malloc(sizeof(float) * xo);
    float *g = malloc(sizeof(float) * xo), *d[3];
    double *ref = malloc(sizeof(double) * xo);
    ref_fill(x, xin, &st, -1, 1);
    ref_fill(w, nw, &st, -0.1f, 0.1f);
    ref_fill(b, (size_t)cout, &st, -0.5f, 0.5f);
    ref_fill(g, xo, &st, -1, 1);
    jem__to_cnhw(xc, x, n, cin, (int)hwi);
    float *u = jem__falloc(jem__conv_wide_floats(&cv));
    jem__conv_wide_weights(u, w, &cv);
    const size_t need = jem__conv_col_need(&cv, n, (size_t)1 << 20);
    float *col = malloc(sizeof(float) * need);
    double *xd = to_double(x, xin), *wd = to_double(w, nw), *bd = to_double(b, (size_t)cout);
    ref_conv_act(ref, xd, wd, bd, &c, 1, 0.2);
    ref_fill(out, xo, &st, 5, 6);
    jem__conv_forward(out, xc, w, u, b, &cv, n, 1, 0.2f, 0, col, need);
    jem__conv_forward(out, xc, w, u, b, &cv, n, 1, 0.2f, 1, col, need);
    memset(back, 0, sizeof(float) * xo);
    jem__from_cnhw_acc(back, out, n, cout, (int)hwo);
    for (size_t i = 0; i < xo; i++)
      if (fabs(back[i] - 2.0 * ref[i]) > 1e-5 * (1.0 + fabs(2.0 * ref[i])))
        fail_msg("strided wide forward %d->%d: %g against %g", cin, cout, back[i], 2 * ref[i]);
    for (int r = 0; r < 3; r++) { /* AVX-512 (or AVX2), AVX2, im2col + sgemm */
      d[r] = malloc(sizeof(float) * xin);
      memcpy(d[r], xc, sizeof(float) * xin); /* accumulates */
      jem__wide_force_avx2(r == 1);
      if (r < 2)
        jem__conv_wide_input_grad_add(d[r], g, u + jem__conv_wide_grad_off(&cv), &cv, n, col,
                                      need);
      else
        jem__conv_backward(g, NULL, w, NULL, &cv, n, 0, 0.2f, NULL, NULL, d[r], col, need);
    }
    jem__wide_force_avx2(0);
    assert_memory_equal(d[0], d[1], sizeof(float) * xin);
    for (size_t i = 0; i < xin; i++)
      assert_true(fabsf(d[0][i] - d[2][i]) <= 1e-5f * (1.0f + fabsf(d[2][i])));
    free(x); free(xc); free(w); free(b); free(out); free(back); free(g); free(ref);
    free(u); free(col); free(xd); free(wd); free(bd);
    for (int r = 0; r < 3; r++) free(d[r]);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_conv_forward_vs_direct),
      cmocka_unit_test(test_im2col_adjoint),
      cmocka_unit_test(test_conv_grad),
      cmocka_unit_test(test_fast_matches_im2col),
      cmocka_unit_test(test_input_grad_fused),
      cmocka_unit_test(test_winograd_vs_naive),
      cmocka_unit_test(test_wide_vs_naive),
      cmocka_unit_test(test_wide_strided),
      cmocka_unit_test(test_lrelu_grad),
      cmocka_unit_test(test_pool_grad),
      cmocka_unit_test(test_linear_grad),
      cmocka_unit_test(test_layout),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
