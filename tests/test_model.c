/* test_model.c - whole-model checks: parameter table, forward against a
 * double-precision direct reference, finite-difference input and parameter
 * gradients, score consistency, batch independence and chunking. */
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
#include "net.h"
#include "internal.h"
#include "ref_kernels.h"

#ifndef FD_H
#define FD_H 1e-5 /* the net is piecewise linear: a larger step crosses LeakyReLU kinks */
#endif
static const jem_arch ARCH_10_1 = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
static const jem_arch ARCH_10_2 = {10, 2, 3, 32, 5, 0.2f, JEM_NORM_NONE};

static jem_model *make_model(const jem_arch *a, uint64_t seed) {
  jem_model *m = NULL;
  char err[256] = "";
  int rc = jem_model_create(&m, a, err, sizeof err);
  if (rc) fail_msg("jem_model_create: %s", err);
  jem_model_init_random(m, seed);
  return m;
}

static double *weights_double(const jem_model *m) {
  double *w = malloc(sizeof(double) * m->n_weights);
  for (size_t i = 0; i < m->n_weights; i++) w[i] = m->weights[i];
  return w;
}

static size_t input_size(const jem_model *m) {
  return (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
}

/* Relative error with a floor scaled to the whole gradient. */
static int close_enough(double num, double ana, double scale, double rtol) {
  double d = fabs(num - ana);
  return d <= rtol * fmax(fabs(num), fabs(ana)) + 1e-4 * scale;
}

/* ------------------------------------------------------------------------ */

static void test_utf8_clean(void **state) {
  (void)state;
  char out[16];
  assert_int_equal(jem_utf8_clean(out, sizeof out, "caf\xc3\xa9"), 5); /* valid: kept */
  assert_string_equal(out, "caf\xc3\xa9");
  jem_utf8_clean(out, sizeof out, "a\xff" "b"); /* a stray byte becomes U+FFFD */
  assert_string_equal(out, "a\xef\xbf\xbd" "b");
  jem_utf8_clean(out, sizeof out, "\xc0\xaf"); /* overlong '/' is two bad bytes */
  assert_string_equal(out, "\xef\xbf\xbd\xef\xbf\xbd");
  jem_utf8_clean(out, sizeof out, "\xed\xa0\x80"); /* a surrogate */
  assert_int_equal(strlen(out), 9);
  jem_utf8_clean(out, 6, "ab\xc3\xa9\xc3\xa9"); /* truncation keeps whole characters */
  assert_string_equal(out, "ab\xc3\xa9");
  jem_utf8_clean(out, sizeof out, "ok\xe2\x82"); /* a sequence cut short at the end */
  assert_string_equal(out, "ok\xef\xbf\xbd\xef\xbf\xbd");
  assert_int_equal(jem_utf8_clean(out, 1, "abc"), 0);
}

static void test_arch_params(void **state) {
  (void)state;
  jem_param p[64];
  int n = jem_arch_params(&ARCH_10_1, p, 64);
  assert_int_equal(n, 20);
  assert_string_equal(p[0].name, "f.conv1.weight");
  assert_int_equal(p[0].shape[0], 16);
  assert_int_equal(p[0].shape[1], 1);
  assert_string_equal(p[2].name, "f.layer1.0.conv1.weight");
  assert_string_equal(p[5].name, "f.layer1.0.conv2.bias");
  /* layer1.0 has in = out = 16, stride 1: no shortcut */
  assert_string_equal(p[6].name, "f.layer2.0.conv1.weight");
  assert_int_equal(p[6].shape[0], 32);
  assert_int_equal(p[6].shape[1], 16);
  assert_string_equal(p[10].name, "f.layer2.0.shortcut.0.weight");
  assert_int_equal(p[10].shape[2], 1);
  assert_string_equal(p[18].name, "class_output.weight");
  assert_int_equal(p[18].ndim, 2);
  assert_int_equal(p[18].shape[0], 10);
  assert_int_equal(p[18].shape[1], 64);
  size_t total = 0;
  for (int i = 0; i < n; i++) {
    assert_int_equal(p[i].offset, total);
    total += p[i].numel;
  }
  assert_int_equal(total, 77418); /* WRN-10-1, 1 channel, 10 classes */
  /* widen 2: layer1.0 goes 16 -> 32, so it has a shortcut */
  jem_param q[64];
  n = jem_arch_params(&ARCH_10_2, q, 64);
  assert_int_equal(n, 22);
  assert_string_equal(q[6].name, "f.layer1.0.shortcut.0.weight");
  assert_int_equal(q[0].shape[1], 3);
  /* WRN-28-10: the JEM paper's net */
  jem_arch big = {28, 10, 3, 32, 10, 0.2f, JEM_NORM_NONE};
  int nb = jem_arch_params(&big, NULL, 0);
  jem_param *bp = calloc((size_t)nb, sizeof *bp);
  assert_int_equal(jem_arch_params(&big, bp, nb), nb);
  size_t trunk = 0;
  for (int i = 0; i < nb - 2; i++) trunk += bp[i].numel;
  assert_int_equal(trunk, 36464928); /* counted from the official code */
  free(bp);
  /* cap smaller than the count still reports the count */
  assert_int_equal(jem_arch_params(&ARCH_10_1, p, 3), 20);
}

static void test_arch_validate(void **state) {
  (void)state;
  char err[256];
  assert_int_equal(jem_arch_validate(&ARCH_10_1, err, sizeof err), 0);
  jem_arch a = ARCH_10_1;
  a.depth = 12;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "depth"));
  a = ARCH_10_1; a.depth = 4;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  a = ARCH_10_1; a.widen = 0;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "widen"));
  a = ARCH_10_1; a.in_channels = 2;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "in_channels"));
  a = ARCH_10_1; a.image_size = 28;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "image_size"));
  a = ARCH_10_1; a.num_classes = 0;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "num_classes"));
  a = ARCH_10_1; a.leak = NAN;
  assert_int_equal(jem_arch_validate(&a, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "leak"));
  assert_int_equal(jem_arch_validate(NULL, err, sizeof err), JEM_EINVAL);
  assert_int_equal(jem_arch_params(&a, NULL, 0), 0);
}

static void test_init_random(void **state) {
  (void)state;
  jem_model *m1 = make_model(&ARCH_10_1, 7), *m2 = make_model(&ARCH_10_1, 7);
  jem_model *m3 = make_model(&ARCH_10_1, 8);
  assert_memory_equal(m1->weights, m2->weights, m1->n_weights * sizeof(float));
  assert_memory_not_equal(m1->weights, m3->weights, m1->n_weights * sizeof(float));
  /* bounds: 1/sqrt(fan_in); biases share their weight's fan-in */
  for (int i = 0; i < m1->n_params; i++) {
    const jem_param *p = &m1->params[i];
    const char *dot = strrchr(p->name, '.');
    size_t fan = strcmp(dot, ".bias") == 0 ? m1->params[i - 1].numel / (size_t)p->shape[0]
                                           : p->numel / (size_t)p->shape[0];
    double b = 1.0 / sqrt((double)fan), mx = 0, s2 = 0;
    for (size_t j = 0; j < p->numel; j++) {
      double v = m1->weights[p->offset + j];
      mx = fmax(mx, fabs(v));
      s2 += v * v;
    }
    assert_true(mx <= b + 1e-7);
    if (p->numel >= 500) {
      /* variance of U(-b, b) is b^2/3 */
      double var = s2 / (double)p->numel;
      assert_true(fabs(var / (b * b / 3) - 1) < 0.15);
    }
  }
  jem_model_free(m1); jem_model_free(m2); jem_model_free(m3);
}

/* Forward in float against the double direct reference. */
static void check_forward(const jem_arch *a, uint64_t seed) {
  jem_model *m = make_model(a, seed);
  const int n = 3, K = a->num_classes;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n), *lg = malloc(sizeof(float) * K * n);
  unsigned st = (unsigned)seed;
  ref_fill(x, css * n, &st, -1, 1);
  jem_ws *ws = jem_ws_create(m, n, 0);
  assert_non_null(ws);
  jem_forward(ws, m, x, n, lg);
  double *w = weights_double(m), *xd = malloc(sizeof(double) * css), ref[64];
  for (int i = 0; i < n; i++) {
    for (size_t j = 0; j < css; j++) xd[j] = x[i * css + j];
    ref_model_logits(m, w, xd, ref);
    double mx = 1;
    for (int j = 0; j < K; j++) mx = fmax(mx, fabs(ref[j]));
    for (int j = 0; j < K; j++) assert_true(fabs(lg[i * K + j] - ref[j]) / mx <= 1e-5);
  }
  free(x); free(lg); free(w); free(xd);
  jem_ws_free(ws);
  jem_model_free(m);
}

static void test_forward_ref(void **state) {
  (void)state;
  check_forward(&ARCH_10_1, 11);
  check_forward(&ARCH_10_2, 12);
}

/* d f~/dx by central differences on the double reference vs jem_input_grad;
 * f~ = logsumexp (cls < 0) or the logit of class cls. */
static void check_input_grad(const jem_arch *a, uint64_t seed, int cls, int ncoord) {
  jem_model *m = make_model(a, seed);
  const int K = a->num_classes;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css), *dx = malloc(sizeof(float) * css);
  float lg[64];
  unsigned st = (unsigned)seed * 31u + 5u;
  ref_fill(x, css, &st, -1, 1);
  jem_ws *ws = jem_ws_create(m, 1, 0);
  int y = cls;
  jem_input_grad(ws, m, x, 1, cls < 0 ? NULL : &y, lg, dx);
  double *w = weights_double(m), *xd = malloc(sizeof(double) * css), z[64];
  for (size_t j = 0; j < css; j++) xd[j] = x[j];
  double gmax = 0;
  for (size_t j = 0; j < css; j++) gmax = fmax(gmax, fabs(dx[j]));
  assert_true(gmax > 0);
  const double h = FD_H;
  int bad = 0;
  for (int t = 0; t < ncoord; t++) {
    size_t j = ref_rand(&st) % css;
    double f[2];
    for (int sgn = 0; sgn < 2; sgn++) {
      xd[j] = x[j] + (sgn ? -h : h);
      ref_model_logits(m, w, xd, z);
      f[sgn] = cls < 0 ? ref_logsumexp(z, K) : z[cls];
    }
    xd[j] = x[j];
    double num = (f[0] - f[1]) / (2 * h);
    if (!close_enough(num, dx[j], gmax, 1e-2)) {
      print_message("input %zu: numeric %.8g analytic %.8g\n", j, num, (double)dx[j]);
      bad++;
    }
  }
  assert_int_equal(bad, 0);
  free(x); free(dx); free(w); free(xd);
  jem_ws_free(ws);
  jem_model_free(m);
}

static void test_input_grad_lse_10_1(void **state) {
  (void)state;
  check_input_grad(&ARCH_10_1, 21, -1, 50);
}
static void test_input_grad_class_10_1(void **state) {
  (void)state;
  check_input_grad(&ARCH_10_1, 22, 3, 20);
}
static void test_input_grad_10_2(void **state) {
  (void)state;
  check_input_grad(&ARCH_10_2, 23, -1, 8);
  check_input_grad(&ARCH_10_2, 24, 4, 8);
}

/* Parameter gradient of logsumexp f(x) by central differences on the double
 * reference; then, on a batch of 2, the gradient is the sum of the two
 * single-image gradients and a second backward doubles it (accumulation). */
static void check_param_grad(const jem_arch *a, uint64_t seed, int ncoord) {
  jem_model *m = make_model(a, seed);
  const int K = a->num_classes;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * 2), lg[128], dl[128];
  unsigned st = (unsigned)seed * 17u + 3u;
  ref_fill(x, css * 2, &st, -1, 1);
  jem_ws *ws = jem_ws_create(m, 2, JEM_WS_TRAIN);
  float *dwi[2];
  for (int i = 0; i < 2; i++) {
    jem_forward(ws, m, x + i * css, 1, lg);
    jem_softmax(dl, lg, K, 1.0f);
    dwi[i] = jem__falloc(m->n_weights);
    jem_backward(ws, m, dl, dwi[i], NULL);
  }
  float *dw = dwi[0];
  double *w = weights_double(m), *xd = malloc(sizeof(double) * css), z[64];
  for (size_t j = 0; j < css; j++) xd[j] = x[j];
  const double h = FD_H;
  int bad = 0;
  for (int t = 0; t < ncoord; t++) {
    /* pick a tensor first so that biases and the head are covered */
    const jem_param *p = &m->params[ref_rand(&st) % (unsigned)m->n_params];
    size_t j = p->offset + ref_rand(&st) % p->numel;
    double gmax = 0;
    for (size_t q = 0; q < p->numel; q++) gmax = fmax(gmax, fabs(dw[p->offset + q]));
    double f[2];
    for (int sgn = 0; sgn < 2; sgn++) {
      w[j] = m->weights[j] + (sgn ? -h : h);
      ref_model_logits(m, w, xd, z);
      f[sgn] = ref_logsumexp(z, K);
    }
    w[j] = m->weights[j];
    double num = (f[0] - f[1]) / (2 * h);
    if (!close_enough(num, dw[j], gmax, 1e-2)) {
      print_message("%s[%zu]: numeric %.8g analytic %.8g\n", p->name,
                    j - p->offset, num, (double)dw[j]);
      bad++;
    }
  }
  assert_int_equal(bad, 0);
  /* batch of 2 = sum of singles; twice = double */
  jem_forward(ws, m, x, 2, lg);
  for (int i = 0; i < 2; i++) jem_softmax(dl + i * K, lg + i * K, K, 1.0f);
  float *dwb = jem__falloc(m->n_weights);
  jem_backward(ws, m, dl, dwb, NULL);
  double scale = 0;
  for (size_t i = 0; i < m->n_weights; i++) scale = fmax(scale, fabs(dwb[i]));
  for (size_t i = 0; i < m->n_weights; i++)
    assert_true(fabs(dwb[i] - (dwi[0][i] + dwi[1][i])) <=
                1e-4 * fabs(dwb[i]) + 1e-6 * scale);
  float *dw2 = jem__falloc(m->n_weights);
  memcpy(dw2, dwb, sizeof(float) * m->n_weights);
  jem_backward(ws, m, dl, dw2, NULL);
  for (size_t i = 0; i < m->n_weights; i++)
    assert_true(fabs(dw2[i] - 2 * dwb[i]) <= 1e-5 * fabs(dwb[i]) + 1e-9);
  free(dwi[0]); free(dwi[1]); free(dwb); free(dw2); free(x); free(w); free(xd);
  jem_ws_free(ws);
  jem_model_free(m);
}

static void test_param_grad_10_1(void **state) {
  (void)state;
  check_param_grad(&ARCH_10_1, 31, 40);
}
static void test_param_grad_10_2(void **state) {
  (void)state;
  check_param_grad(&ARCH_10_2, 32, 8);
}

/* Backward with both outputs gives the same dx as jem_input_grad. */
static void test_backward_dx_and_dw(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_2, 41);
  const int n = 3, K = 5;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n), lg[15], dl[15];
  float *dx1 = malloc(sizeof(float) * css * n), *dx2 = calloc(css * n, sizeof(float));
  unsigned st = 9;
  ref_fill(x, css * n, &st, -1, 1);
  jem_ws *ws = jem_ws_create(m, n, JEM_WS_TRAIN);
  jem_input_grad(ws, m, x, n, NULL, lg, dx1);
  jem_forward(ws, m, x, n, lg);
  for (int i = 0; i < n; i++) jem_softmax(dl + i * K, lg + i * K, K, 1.0f);
  float *dw = jem__falloc(m->n_weights);
  jem_backward(ws, m, dl, dw, dx2);
  for (size_t i = 0; i < css * n; i++) assert_float_equal(dx1[i], dx2[i], 1e-6);
  /* without JEM_WS_TRAIN a ws still computes dx */
  free(dw); free(x); free(dx1); free(dx2);
  jem_ws_free(ws);
  jem_model_free(m);
}

/* Scores: energy, tempered probabilities, grad_norm, labels. */
static void test_score_batch(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_2, 51);
  m->temperature = 2.0f;
  const int n = 5, K = 5;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 77;
  ref_fill(x, css * n, &st, -1, 1);
  float logits[25], probs[25], energy[5], gn[5], ms[5], conf[5];
  int label[5];
  jem_scores s = {logits, probs, label, conf, {[JEM_SCORE_ENERGY] = energy, [JEM_SCORE_GRAD_NORM] = gn, [JEM_SCORE_MAX_SOFTMAX] = ms}};
  jem_ws *ws = jem_ws_create(m, 2, 0); /* forces chunks of 2, 2, 1 */
  jem_score_batch(ws, m, x, n, 1, &s);
  float *dx = malloc(sizeof(float) * css);
  jem_ws *ws1 = jem_ws_create(m, 1, 0);
  for (int i = 0; i < n; i++) {
    float lg[5], p[5];
    jem_input_grad(ws1, m, x + i * css, 1, NULL, lg, dx);
    double nrm = 0;
    for (size_t j = 0; j < css; j++) nrm += (double)dx[j] * dx[j];
    nrm = sqrt(nrm);
    assert_true(fabs(gn[i] - nrm) <= 1e-5 * nrm);
    for (int j = 0; j < K; j++)
      assert_true(fabs(logits[i * K + j] - lg[j]) <= 1e-5 * fmax(1, fabs(lg[j])));
    double z[5], sum = 0;
    for (int j = 0; j < K; j++) z[j] = lg[j];
    assert_true(fabs(energy[i] + ref_logsumexp(z, K)) <= 1e-5);
    int best = 0;
    for (int j = 0; j < K; j++) {
      sum += probs[i * K + j];
      if (lg[j] > lg[best]) best = j;
    }
    assert_true(fabs(sum - 1) < 1e-5);
    assert_int_equal(label[i], best);
    /* tempered: p = softmax(z / 2) */
    double zt[5];
    for (int j = 0; j < K; j++) zt[j] = z[j] / 2;
    double lt = ref_logsumexp(zt, K);
    for (int j = 0; j < K; j++) {
      p[j] = (float)exp(zt[j] - lt);
      assert_true(fabs(probs[i * K + j] - p[j]) < 1e-6);
    }
    assert_true(fabs(conf[i] - p[best]) < 1e-6);
    assert_true(fabs(ms[i] - exp(z[best] - ref_logsumexp(z, K))) < 1e-6);
  }
  /* without the gradient: same forward scores, NaN grad_norm */
  float logits2[25], gn2[5];
  jem_scores s2 = {.logits = logits2, .score[JEM_SCORE_GRAD_NORM] = gn2};
  jem_score_batch(ws, m, x, n, 0, &s2);
  for (int i = 0; i < n; i++) assert_true(isnan(gn2[i]));
  for (int i = 0; i < n * K; i++) assert_float_equal(logits[i], logits2[i], 1e-6);
  free(x); free(dx);
  jem_ws_free(ws); jem_ws_free(ws1);
  jem_model_free(m);
}

/* An image's results do not depend on the batch it runs in. */
static void test_batch_independence(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_1, 61);
  const int n = 70, K = 10;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 123;
  ref_fill(x, css * n, &st, -1, 1);
  float *lg = malloc(sizeof(float) * n * K), *gn = malloc(sizeof(float) * n);
  float *en = malloc(sizeof(float) * n);
  jem_scores s = {.logits = lg, .score[JEM_SCORE_ENERGY] = en, .score[JEM_SCORE_GRAD_NORM] = gn};
  jem_ws *ws = jem_ws_create(m, 64, 0); /* 70 = 64 + 6 */
  jem_score_batch(ws, m, x, n, 1, &s);
  jem_ws *ws1 = jem_ws_create(m, 1, 0);
  const int pick[] = {0, 1, 37, 63, 64, 69};
  for (size_t t = 0; t < sizeof pick / sizeof *pick; t++) {
    int i = pick[t];
    float l1[10], e1, g1;
    jem_scores s1 = {.logits = l1, .score[JEM_SCORE_ENERGY] = &e1, .score[JEM_SCORE_GRAD_NORM] = &g1};
    jem_score_batch(ws1, m, x + i * css, 1, 1, &s1);
    for (int j = 0; j < K; j++)
      assert_true(fabs(l1[j] - lg[i * K + j]) <= 1e-5 * fmax(1, fabs(l1[j])));
    assert_true(fabs(e1 - en[i]) <= 1e-5 * fmax(1, fabs(e1)));
    assert_true(fabs(g1 - gn[i]) <= 1e-5 * g1);
  }
  free(x); free(lg); free(gn); free(en);
  jem_ws_free(ws); jem_ws_free(ws1);
  jem_model_free(m);
}

static void test_features_and_helpers(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_1, 71);
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css), lg[10];
  unsigned st = 5;
  ref_fill(x, css, &st, -1, 1);
  jem_ws *ws = jem_ws_create(m, 4, 0);
  assert_int_equal(jem_ws_max_batch(ws), 4);
  assert_true(jem_ws_bytes(ws) > 4 * css * sizeof(float));
  jem_forward(ws, m, x, 1, lg);
  const float *f = jem_ws_features(ws);
  const jem_param *w = jem_model_param(m, "class_output.weight");
  const jem_param *b = jem_model_param(m, "class_output.bias");
  for (int j = 0; j < 10; j++) {
    double s = m->weights[b->offset + j];
    for (int c = 0; c < 64; c++) {
      assert_true(f[c] >= -0.2 * 10); /* LeakyReLU output averaged */
      s += (double)m->weights[w->offset + j * 64 + c] * f[c];
    }
    assert_true(fabs(s - lg[j]) < 1e-5);
  }
  float z[3] = {1000.0f, 1000.0f, -INFINITY};
  assert_true(fabs(jem_logsumexp(z, 3) - (1000.0f + logf(2.0f))) < 1e-3);
  float p[3];
  jem_softmax(p, z, 3, 1.0f);
  assert_float_equal(p[0], 0.5f, 1e-6);
  assert_float_equal(p[2], 0.0f, 0);
  float zn[2] = {NAN, 1.0f};
  assert_true(isnan(jem_logsumexp(zn, 2)));
  assert_null(jem_ws_create(m, 0, 0));
  jem_ws_free(NULL);
  free(x);
  jem_ws_free(ws);
  jem_model_free(m);
}

/* A workspace split into slices run by helper threads gives the results of
 * a single-threaded one (to rounding), and the same logits and input
 * gradients bit for bit whatever the number of active threads; parameter
 * gradients are summed over the threads. */
static void test_threads(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_2, 81);
  const int n = 30, K = 5; /* 3 threads x slices of up to 8 images */
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 99;
  ref_fill(x, css * n, &st, -1, 1);
  float lg[3][150], dl[150];
  float *dx[3], *dw[3];
  jem_blas_set_threads(1);
  jem_ws *w1 = jem_ws_create(m, n, JEM_WS_TRAIN);
  jem_blas_set_threads(3);
  assert_int_equal(jem_blas_threads(), 3);
  jem_ws *w3 = jem_ws_create(m, n, JEM_WS_TRAIN);
  for (int r = 0; r < 3; r++) {
    /* r = 0: one slice; r = 1: three slices on three threads; r = 2: the
     * same three slices run by the caller alone */
    jem_ws *ws = r == 0 ? w1 : w3;
    jem_blas_set_threads(r == 2 ? 1 : 3);
    dx[r] = calloc(css * n, sizeof(float));
    dw[r] = jem__falloc(m->n_weights);
    jem_forward(ws, m, x, n, lg[r]);
    for (int i = 0; i < n; i++) jem_softmax(dl + i * K, lg[r] + i * K, K, 1.0f);
    jem_backward(ws, m, dl, dw[r], dx[r]);
  }
  for (int i = 0; i < n * K; i++) {
    assert_true(fabs(lg[1][i] - lg[0][i]) <= 1e-5 * fmax(1, fabs(lg[0][i])));
    assert_true(lg[1][i] == lg[2][i]);
  }
  /* slices of the one-thread workspace are 8 images too: logits agree */
  double gs = 0, ws_ = 0;
  for (size_t i = 0; i < css * n; i++) gs = fmax(gs, fabs(dx[0][i]));
  for (size_t i = 0; i < m->n_weights; i++) ws_ = fmax(ws_, fabs(dw[0][i]));
  for (size_t i = 0; i < css * n; i++) {
    assert_true(fabs(dx[1][i] - dx[0][i]) <= 1e-4 * fabs(dx[0][i]) + 1e-6 * gs);
    assert_true(dx[1][i] == dx[2][i]);
  }
  /* parameter gradients are summed per thread: only the order differs */
  for (size_t i = 0; i < m->n_weights; i++) {
    assert_true(fabs(dw[1][i] - dw[0][i]) <= 1e-4 * fabs(dw[0][i]) + 1e-6 * ws_);
    assert_true(fabs(dw[2][i] - dw[0][i]) <= 1e-4 * fabs(dw[0][i]) + 1e-6 * ws_);
  }
  /* features are gathered from the slices in image order */
  const float *f = jem_ws_features(w3);
  jem_forward(w1, m, x + 26 * css, 1, lg[0]);
  for (int c = 0; c < 128; c++)
    assert_true(fabs(f[26 * 128 + c] - jem_ws_features(w1)[c]) <= 1e-5 * (1 + fabs(f[26 * 128 + c])));
  for (int r = 0; r < 3; r++) { free(dx[r]); free(dw[r]); }
  free(x);
  jem_ws_free(w1); jem_ws_free(w3);
  jem_model_free(m);
}

/* A JEM_WS_FIXED_WEIGHTS workspace (derived weights kept per model) gives
 * the logits and input gradients of a plain one bit for bit, also when a
 * second model, then the first again, runs on it. */
static void test_fixed_weights(void **state) {
  (void)state;
  /* WRN-10-1 on 3 channels: no wide layer (those differ by design: see
   * test_wide_layers) */
  const jem_arch a = {10, 1, 3, 32, 5, 0.2f, JEM_NORM_NONE};
  jem_model *ms[2] = {make_model(&a, 95), make_model(&a, 96)};
  const int n = 12, K = ms[0]->arch.num_classes; /* slices of 6: Winograd on 32x32, 16x16 */
  const size_t css = input_size(ms[0]);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 8;
  ref_fill(x, css * n, &st, -1, 1);
  float *dx = malloc(sizeof(float) * css * n), *dxf = malloc(sizeof(float) * css * n);
  float *lg = malloc(sizeof(float) * n * K), *lgf = malloc(sizeof(float) * n * K);
  jem_ws *plain = jem_ws_create(ms[0], n, 0);
  jem_ws *fixed = jem_ws_create(ms[0], n, JEM_WS_FIXED_WEIGHTS);
  assert_true(jem_ws_bytes(fixed) > jem_ws_bytes(plain)); /* room for the transforms */
  const int order[] = {0, 1, 0};
  for (int r = 0; r < 3; r++) {
    const jem_model *m = ms[order[r]];
    for (int nb = 1; nb <= n; nb += n - 1) { /* one image, then all */
      int y[12];
      for (int i = 0; i < nb; i++) y[i] = (i * 7 + r) % K;
      jem_input_grad(plain, m, x, nb, r == 1 ? y : NULL, lg, dx);
      jem_input_grad(fixed, m, x, nb, r == 1 ? y : NULL, lgf, dxf);
      for (int i = 0; i < nb * K; i++) assert_true(lg[i] == lgf[i]);
      for (size_t i = 0; i < css * nb; i++) assert_true(dx[i] == dxf[i]);
    }
  }
  assert_true(ms[0]->uid != ms[1]->uid);
  free(x); free(dx); free(dxf); free(lg); free(lgf);
  jem_ws_free(plain); jem_ws_free(fixed);
  jem_model_free(ms[0]); jem_model_free(ms[1]);
}

/* Wide layers (WRN-10-3's 192-channel 3x3 convolutions): a
 * JEM_WS_FIXED_WEIGHTS workspace runs them on Winograd from the model's
 * shared transforms, a plain one on im2col; logits and input gradients
 * agree closely, one image with lent threads gives the bits of one thread,
 * and the AVX2 micro-kernels the bits of the AVX-512 ones.  A fixed
 * workspace with JEM_WS_NO_WIDE_TRANSFORMS keeps im2col and builds none. */
static void test_wide_layers(void **state) {
  (void)state;
  const jem_arch a = {10, 3, 3, 32, 7, 0.2f, JEM_NORM_NONE};
  jem_model *m = make_model(&a, 97);
  const int n = 9, K = a.num_classes;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 12;
  ref_fill(x, css * n, &st, -1, 1);
  float *dx[4], lg[4][63];
  for (int r = 0; r < 4; r++) {
    /* 0: plain (im2col); 1: fixed, 1 thread; 2: fixed, 2 threads; 3: AVX2 */
    jem_blas_set_threads(r == 2 ? 2 : 1);
    jem__wide_force_avx2(r == 3);
    jem_ws *ws = jem_ws_create(m, n, r ? JEM_WS_FIXED_WEIGHTS : 0);
    jem_ws *ws2 = r == 1 ? jem_ws_create(m, 1, JEM_WS_FIXED_WEIGHTS) : NULL;
    dx[r] = malloc(sizeof(float) * css * n);
    /* image by image: a lone slice lends its threads */
    for (int i = 0; i < n; i++)
      jem_input_grad(ws, m, x + css * i, 1, NULL, lg[r] + K * i, dx[r] + css * i);
    if (ws2) { /* a second workspace shares the model's transforms */
      float l2[7];
      jem_input_grad(ws2, m, x, 1, NULL, l2, dx[r]);
      for (int k = 0; k < K; k++) assert_true(l2[k] == lg[r][k]);
      jem_ws_free(ws2);
    }
    jem_ws_free(ws);
  }
  jem__wide_force_avx2(0);
  jem_blas_set_threads(1);
  for (int r = 2; r < 4; r++) {
    assert_memory_equal(lg[1], lg[r], sizeof(float) * K * n);
    assert_memory_equal(dx[1], dx[r], sizeof(float) * css * n);
  }
  /* the fixed workspace took another path than im2col: other rounding */
  assert_true(memcmp(dx[0], dx[1], sizeof(float) * css * n) != 0);
  double gmax = 0;
  for (size_t i = 0; i < css * n; i++) gmax = fmax(gmax, fabs(dx[0][i]));
  for (int i = 0; i < n * K; i++)
    assert_true(fabs(lg[0][i] - lg[1][i]) <= 1e-4 * fmax(1, fabs(lg[0][i])));
  for (size_t i = 0; i < css * n; i++)
    assert_true(fabs(dx[0][i] - dx[1][i]) <= 1e-3 * fabs(dx[0][i]) + 1e-5 * gmax);
  /* JEM_WS_NO_WIDE_TRANSFORMS: im2col as in a plain workspace, bit for bit,
   * and the model never builds its transforms */
  jem_model *m2 = make_model(&a, 97);
  jem_ws *lean = jem_ws_create(m2, n, JEM_WS_FIXED_WEIGHTS | JEM_WS_NO_WIDE_TRANSFORMS);
  float *dx2 = malloc(sizeof(float) * css * n), lg2[63];
  for (int i = 0; i < n; i++)
    jem_input_grad(lean, m2, x + css * i, 1, NULL, lg2 + K * i, dx2 + css * i);
  assert_memory_equal(lg[0], lg2, sizeof(float) * K * n);
  assert_memory_equal(dx[0], dx2, sizeof(float) * css * n);
  assert_null(atomic_load(&m2->net->wide));
  jem_ws_free(lean);
  jem_model_free(m2);
  free(dx2);
  for (int r = 0; r < 4; r++) free(dx[r]);
  free(x);
  jem_model_free(m);
}

/* The general im2col + sgemm path (CPUs without AVX2+FMA) on the whole
 * model: forward against the reference, gradients by finite differences,
 * and agreement with the direct kernel. */
static void test_im2col_path(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_1, 91);
  const int n = 3, K = 10;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 4;
  ref_fill(x, css * n, &st, -1, 1);
  float lg[2][30], *dx[2];
  for (int fast = 1; fast >= 0; fast--) {
    jem__conv_set_fast(fast);
    jem_ws *ws = jem_ws_create(m, n, 0);
    dx[fast] = malloc(sizeof(float) * css * n);
    jem_input_grad(ws, m, x, n, NULL, lg[fast], dx[fast]);
    jem_ws_free(ws);
  }
  check_forward(&ARCH_10_1, 92);
  check_input_grad(&ARCH_10_1, 93, 2, 10);
  check_param_grad(&ARCH_10_1, 94, 10);
  jem__conv_set_fast(1);
  double gmax = 0;
  for (size_t i = 0; i < css * n; i++) gmax = fmax(gmax, fabs(dx[1][i]));
  for (int i = 0; i < n * K; i++)
    assert_true(fabs(lg[0][i] - lg[1][i]) <= 1e-5 * fmax(1, fabs(lg[1][i])));
  for (size_t i = 0; i < css * n; i++)
    assert_true(fabs(dx[0][i] - dx[1][i]) <= 1e-4 * fabs(dx[1][i]) + 1e-6 * gmax);
  free(dx[0]); free(dx[1]); free(x);
  jem_model_free(m);
}

/* A lone slice lends the workspace's idle threads to its im2col layers:
 * logits and input gradients are those of one thread bit for bit (the parts
 * of a product depend on the shape only), parameter gradients too. */
static void test_lent_threads(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_2, 83);
  const int n = 3, K = 5;
  const size_t css = input_size(m);
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 7;
  ref_fill(x, css * n, &st, -1, 1);
  float lg[2][15], dl[15], *dx[2], *dw[2];
  jem__conv_set_fast(0); /* every 3x3 layer on im2col + sgemm */
  for (int r = 0; r < 2; r++) {
    jem_blas_set_threads(r == 0 ? 1 : 2);
    jem_ws *ws = jem_ws_create(m, n, JEM_WS_TRAIN);
    dx[r] = calloc(css * n, sizeof(float));
    dw[r] = jem__falloc(m->n_weights);
    memset(dw[r], 0, sizeof(float) * m->n_weights);
    jem_forward(ws, m, x, n, lg[r]);
    for (int i = 0; i < n; i++) jem_softmax(dl + i * K, lg[r] + i * K, K, 1.0f);
    jem_backward(ws, m, dl, dw[r], dx[r]);
    jem_ws_free(ws);
  }
  jem__conv_set_fast(1);
  jem_blas_set_threads(1);
  for (int i = 0; i < n * K; i++) assert_true(lg[0][i] == lg[1][i]);
  assert_memory_equal(dx[0], dx[1], sizeof(float) * css * n);
  assert_memory_equal(dw[0], dw[1], sizeof(float) * m->n_weights);
  for (int r = 0; r < 2; r++) { free(dx[r]); free(dw[r]); }
  free(x);
  jem_model_free(m);
}

/* jem_ws_batch_within: the whole batch when it fits, else whole slices of 8
 * (then single images) that fit (jem_ws_plan_bytes: create's size); a capped workspace scores any n in chunks
 * with the results of an uncapped one. */
static void test_batch_within(void **state) {
  (void)state;
  jem_model *m = make_model(&ARCH_10_2, 85);
  const int n = 20, K = 5;
  const size_t css = input_size(m);
  jem_blas_set_threads(1);
  jem_ws *full = jem_ws_create(m, 64, JEM_WS_FIXED_WEIGHTS);
  jem_ws *eight = jem_ws_create(m, 8, JEM_WS_FIXED_WEIGHTS);
  jem_ws *one = jem_ws_create(m, 1, JEM_WS_FIXED_WEIGHTS);
  assert_int_equal(jem_ws_batch_within(m, 64, JEM_WS_FIXED_WEIGHTS, jem_ws_bytes(full)), 64);
  assert_int_equal(jem_ws_batch_within(m, 64, JEM_WS_FIXED_WEIGHTS, jem_ws_bytes(full) - 1), 56);
  assert_int_equal(jem_ws_batch_within(m, 64, JEM_WS_FIXED_WEIGHTS, jem_ws_bytes(eight)), 8);
  assert_int_equal(jem_ws_batch_within(m, 64, JEM_WS_FIXED_WEIGHTS, jem_ws_bytes(eight) - 1), 7);
  assert_int_equal(jem_ws_batch_within(m, 64, JEM_WS_FIXED_WEIGHTS, 0), 1);
  assert_int_equal(jem_ws_batch_within(m, 5, JEM_WS_FIXED_WEIGHTS, jem_ws_bytes(full)), 5);
  assert_true(jem_ws_bytes(one) < jem_ws_bytes(eight) && jem_ws_bytes(eight) < jem_ws_bytes(full));
  /* the plan is what create allocates */
  assert_int_equal(jem_ws_plan_bytes(m, 64, JEM_WS_FIXED_WEIGHTS), jem_ws_bytes(full));
  assert_int_equal(jem_ws_plan_bytes(m, 1, JEM_WS_FIXED_WEIGHTS), jem_ws_bytes(one));
  float *x = malloc(sizeof(float) * css * n);
  unsigned st = 11;
  ref_fill(x, css * n, &st, -1, 1);
  float lg[2][100], en[2][20], gn[2][20];
  jem_ws *wss[2] = {full, eight};
  for (int r = 0; r < 2; r++) {
    jem_scores s = {.logits = lg[r]};
    s.score[JEM_SCORE_ENERGY] = en[r];
    s.score[JEM_SCORE_GRAD_NORM] = gn[r];
    jem_score_batch(wss[r], m, x, n, 1, &s);
  }
  for (int i = 0; i < n * K; i++)
    assert_true(fabs(lg[0][i] - lg[1][i]) <= 1e-5 * fmax(1, fabs(lg[0][i])));
  for (int i = 0; i < n; i++) {
    assert_true(fabs(en[0][i] - en[1][i]) <= 1e-5 * fmax(1, fabs(en[0][i])));
    assert_true(fabs(gn[0][i] - gn[1][i]) <= 1e-4 * fmax(1e-3, fabs(gn[0][i])));
  }
  free(x);
  jem_ws_free(full); jem_ws_free(eight); jem_ws_free(one);
  jem_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_arch_params),
      cmocka_unit_test(test_arch_validate),
      cmocka_unit_test(test_init_random),
      cmocka_unit_test(test_forward_ref),
      cmocka_unit_test(test_input_grad_lse_10_1),
      cmocka_unit_test(test_input_grad_class_10_1),
      cmocka_unit_test(test_input_grad_10_2),
      cmocka_unit_test(test_param_grad_10_1),
      cmocka_unit_test(test_param_grad_10_2),
      cmocka_unit_test(test_backward_dx_and_dw),
      cmocka_unit_test(test_score_batch),
      cmocka_unit_test(test_batch_independence),
      cmocka_unit_test(test_utf8_clean),
      cmocka_unit_test(test_features_and_helpers),
      cmocka_unit_test(test_threads),
      cmocka_unit_test(test_im2col_path),
      cmocka_unit_test(test_lent_threads),
      cmocka_unit_test(test_batch_within),
      cmocka_unit_test(test_fixed_weights),
      cmocka_unit_test(test_wide_layers),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
