/* test_norm.c - the official norm layers (core/norm.c): finite-difference
 * input and parameter gradients of each kernel, accumulation, and whole
 * models with each norm read from checkpoints written by PyTorch
 * (tests/ref/torch/, tests/ref/make_torch_ckpt.py): parameter gradients of
 * the cross-entropy and input gradients of the energy against PyTorch's
 * (float64), and the safetensors round trip of arch.norm. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "norm.h"
#include "testutil.h"
#include "torchload.h"

#define REF "tests/ref/torch/"

static double urand(uint64_t *s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(*s >> 11) / 9007199254740992.0;
}

/* ------------------------------------------------------------------------ */
/* Kernels                                                                  */

enum { C = 3, N = 2, HW = 6, LEN = C * N * HW };

/* A weight block [w | b | rm | rv] of C each, with random values. */
static jem__norm setup(int kind, float *W, float *x, float *r, uint64_t seed) {
  uint64_t s = seed;
  for (int i = 0; i < 4 * C; i++) W[i] = (float)(urand(&s) * 1.5 + 0.25);
  for (int i = 0; i < C; i++) W[C + i] -= 1.0f;       /* bias / loc of either sign */
  for (int i = 0; i < C; i++) W[2 * C + i] -= 0.8f;   /* running mean */
  for (int i = 0; i < LEN; i++) x[i] = (float)(urand(&s) * 4.0 - 2.0);
  for (int i = 0; i < LEN; i++) r[i] = (float)(urand(&s) * 2.0 - 1.0);
  jem__norm nm = {kind, C, 0, C, 2 * C, 3 * C};
  return nm;
}

/* L = sum y * r, in double through the float kernel. */
static double loss(const jem__norm *nm, const float *W, const float *x, const float *r) {
  float y[LEN];
  jem__norm_forward(y, x, nm, W, N, HW);
  double l = 0.0;
  for (int i = 0; i < LEN; i++) l += (double)y[i] * r[i];
  return l;
}

/* dL/dv by central differences, v being one entry of W or x. */
static double central(const jem__norm *nm, float *W, float *x, const float *r, float *v) {
  const float h = 1e-2f, keep = *v;
  *v = keep + h;
  double lp = loss(nm, W, x, r);
  *v = keep - h;
  double lm = loss(nm, W, x, r);
  *v = keep;
  return (lp - lm) / (2 * h);
}

static void check_close(double num, double ana, const char *what, int i, int kind) {
  if (fabs(num - ana) > 2e-2 * fmax(fabs(num), fabs(ana)) + 2e-3)
    fail_msg("%s %s[%d]: numeric %g, analytic %g", jem_norm_names[kind], what, i, num, ana);
}

static void test_kernel_gradients(void **state) {
  (void)state;
  for (int kind = JEM_NORM_BATCH; kind < JEM_NUM_NORMS; kind++) {
    float W[4 * C], x[LEN], r[LEN], dx[LEN] = {0}, dW[4 * C] = {0};
    jem__norm nm = setup(kind, W, x, r, 11 + (uint64_t)kind);
    jem__norm_backward(dx, r, x, &nm, W, N, HW, dW);
    for (int i = 0; i < LEN; i++) check_close(central(&nm, W, x, r, &x[i]), dx[i], "dx", i, kind);
    /* weight and bias; the running statistics are constants */
    for (int i = 0; i < 2 * C; i++) check_close(central(&nm, W, x, r, &W[i]), dW[i], "dW", i, kind);
    assert_true(dW[2 * C] == 0.0f && dW[3 * C] == 0.0f);
    /* backward accumulates: twice gives twice */
    float dx2[LEN], dW2[4 * C];
    memcpy(dx2, dx, sizeof dx);
    memcpy(dW2, dW, sizeof dW);
    jem__norm_backward(dx2, r, x, &nm, W, N, HW, dW2);
    for (int i = 0; i < LEN; i++) assert_true(fabsf(dx2[i] - 2 * dx[i]) <= 1e-5f * (1 + fabsf(dx[i])));
    for (int i = 0; i < 2 * C; i++) assert_true(fabsf(dW2[i] - 2 * dW[i]) <= 1e-5f * (1 + fabsf(dW[i])));
  }
}

/* Images never interact (eval semantics): image 1 alone gives the same. */
static void test_kernel_per_image(void **state) {
  (void)state;
  for (int kind = JEM_NORM_BATCH; kind < JEM_NUM_NORMS; kind++) {
    float W[4 * C], x[LEN], r[LEN], y[LEN], x1[C * HW], y1[C * HW];
    jem__norm nm = setup(kind, W, x, r, 5);
    jem__norm_forward(y, x, &nm, W, N, HW);
    for (int c = 0; c < C; c++) memcpy(x1 + c * HW, x + (c * N + 1) * HW, sizeof(float) * HW);
    jem__norm_forward(y1, x1, &nm, W, 1, HW);
    for (int c = 0; c < C; c++)
      for (int j = 0; j < HW; j++) assert_true(fabsf(y1[c * HW + j] - y[(c * N + 1) * HW + j]) < 1e-5f);
  }
}

/* ------------------------------------------------------------------------ */
/* Whole models from PyTorch checkpoints                                    */

static const struct { const char *file; int norm; } MODELS[] = {
  {"batch-zip", JEM_NORM_BATCH}, {"instance-zip", JEM_NORM_INSTANCE},
  {"layer-zip", JEM_NORM_LAYER}, {"act-zip", JEM_NORM_ACT}, {"none-zip", JEM_NORM_NONE},
};

static jem_model *load_model(const char *file, int norm, json_t **ref) {
  char path[256];
  size_t len;
  snprintf(path, sizeof path, REF "%s.pt.gz", file);
  unsigned char *b = read_gz(path, &len);
  jem_tl_file *f = NULL;
  char err[512] = "";
  if (jem_torch_load_mem(&f, b, len, err, sizeof err)) fail_msg("%s: %s", path, err);
  free(b);
  jem_arch a = {10, 1, 3, 32, 4, 0.2f, norm};
  jem_model *m = NULL;
  if (jem_model_create(&m, &a, err, sizeof err)) fail_msg("create: %s", err);
  for (int p = 0; p < m->n_params; p++) {
    char name[128];
    snprintf(name, sizeof name, "model_state_dict/%s", m->params[p].name);
    const jem_tl_tensor *t = jem_torch_find(f, name);
    if (!t) fail_msg("%s: no %s", file, name);
    assert_int_equal(t->numel, m->params[p].numel);
    memcpy(m->weights + m->params[p].offset, t->data, t->numel * sizeof(float));
  }
  jem_torch_free(f);
  snprintf(path, sizeof path, REF "%s.json.gz", file);
  b = read_gz(path, &len);
  json_error_t je;
  *ref = json_loadb((const char *)b, len, 0, &je);
  free(b);
  assert_non_null(*ref);
  return m;
}

static float *load_x(int *n) {
  size_t len;
  unsigned char *b = read_gz(REF "x.npy.gz", &len);
  float *x = NULL;
  int nd, shape[4];
  char err[256];
  if (jem_npy_read_mem(b, len, &x, &nd, shape, err, sizeof err)) fail_msg("x.npy: %s", err);
  free(b);
  *n = shape[0];
  return x;
}

/* Cross-entropy parameter gradients (labels i % K, mean) against PyTorch's
 * in float64, for every norm tensor and a few biases: within 1e-3 relative,
 * or 3x PyTorch's own float32 error where the sum cancels badly. */
static void check_param_grads(jem_model *m, const json_t *ref, const float *x, int n,
                              const char *file) {
  jem_ws *ws = jem_ws_create(m, n, JEM_WS_TRAIN);
  assert_non_null(ws);
  const int K = m->arch.num_classes;
  float *logits = malloc(sizeof(float) * n * K), *dl = malloc(sizeof(float) * n * K);
  float *dW = calloc(m->n_weights, sizeof(float));
  jem_forward(ws, m, x, n, logits);
  for (int i = 0; i < n; i++) {
    jem_softmax(dl + i * K, logits + i * K, K, 1.0f);
    dl[i * K + i % K] -= 1.0f;
    for (int k = 0; k < K; k++) dl[i * K + k] /= (float)n;
  }
  jem_backward(ws, m, dl, dW, NULL);
  const char *name;
  json_t *g;
  int checked = 0, norm_tensors = 0;
  json_object_foreach(json_object_get(ref, "pgrad"), name, g) {
    const jem_param *p = jem_model_param(m, name);
    if (!p) fail_msg("%s: no parameter %s", file, name);
    assert_int_equal(json_array_size(g), p->numel);
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < p->numel; i++) {
      double rv = json_real_value(json_array_get(g, i)), v = dW[p->offset + i];
      d2 += (v - rv) * (v - rv);
      r2 += rv * rv;
    }
    double f32 = json_real_value(json_object_get(json_object_get(ref, "pgrad_f32_err"), name));
    if (sqrt(d2) > fmax(1e-3, 3 * f32) * sqrt(r2) + 1e-6)
      fail_msg("%s: %s differs by %g relative (PyTorch float32: %g)", file, name,
               sqrt(d2 / r2), f32);
    checked++;
    norm_tensors += strstr(name, ".bn") != NULL;
  }
  assert_true(checked >= 4);
  assert_true(m->arch.norm == JEM_NORM_NONE || norm_tensors >= 2 * 7);
  free(logits);
  free(dl);
  free(dW);
  jem_ws_free(ws);
}

/* d logsumexp f / dx of image 0 against PyTorch's (contracts.md: 1e-3). */
static void check_input_grad(jem_model *m, const json_t *ref, const float *x, const char *file) {
  const size_t css = 3 * 32 * 32;
  jem_ws *ws = jem_ws_create(m, 1, 0);
  float dx[3 * 32 * 32], z[4];
  jem_input_grad(ws, m, x, 1, NULL, z, dx);
  json_t *g = json_object_get(ref, "gx0");
  assert_int_equal(json_array_size(g), css);
  double d2 = 0, r2 = 0;
  for (size_t i = 0; i < css; i++) {
    double rv = json_real_value(json_array_get(g, i));
    d2 += (dx[i] - rv) * (dx[i] - rv);
    r2 += rv * rv;
  }
  if (!(sqrt(d2) <= 1e-3 * sqrt(r2)))
    fail_msg("%s: input gradient differs by %g relative", file, sqrt(d2 / r2));
  jem_ws_free(ws);
}

/* The model saves and loads with arch.norm and PyTorch's logits. */
static void check_save_load(const jem_model *m, const json_t *ref, const float *x, int n,
                            const char *file) {
  jem_model *m2 = NULL;
  char path[] = "/tmp/jem_test_norm_XXXXXX", err[256];
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
  if (jem_model_save(m, path, err, sizeof err)) fail_msg("save: %s", err);
  if (jem_model_load(&m2, path, err, sizeof err)) fail_msg("load: %s", err);
  unlink(path);
  assert_int_equal(m2->arch.norm, m->arch.norm);
  assert_string_equal(json_string_value(json_object_get(json_object_get(m2->meta, "arch"), "norm")),
                      jem_norm_names[m->arch.norm]);
  jem_ws *ws = jem_ws_create(m2, n, 0);
  float z[64];
  jem_forward(ws, m2, x, n, z);
  json_t *rl = json_object_get(ref, "logits");
  for (int i = 0; i < n; i++)
    for (int k = 0; k < 4; k++) {
      double r = json_real_value(json_array_get(json_array_get(rl, (size_t)i), (size_t)k));
      if (fabs(z[i * 4 + k] - r) > 1e-4 * fmax(1.0, fabs(r)))
        fail_msg("%s: logit %d,%d %g vs PyTorch %g", file, i, k, z[i * 4 + k], r);
    }
  jem_ws_free(ws);
  jem_model_free(m2);
}

static void test_models(void **state) {
  (void)state;
  int n;
  float *x = load_x(&n);
  for (size_t c = 0; c < sizeof MODELS / sizeof MODELS[0]; c++) {
    json_t *ref;
    jem_model *m = load_model(MODELS[c].file, MODELS[c].norm, &ref);
    check_param_grads(m, ref, x, n, MODELS[c].file);
    check_input_grad(m, ref, x, MODELS[c].file);
    check_save_load(m, ref, x, n, MODELS[c].file);
    jem_model_free(m);
    json_decref(ref);
  }
  free(x);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_kernel_gradients),
    cmocka_unit_test(test_kernel_per_image),
    cmocka_unit_test(test_models),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
