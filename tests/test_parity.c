/* test_parity.c - the core against PyTorch: logits, energies, input and
 * parameter gradients on golden files written by tests/ref/make_golden.py.
 *
 * The files are gzip-compressed (.gz) and found relative to the repository
 * root, where `make unit` runs the tests.  Tolerances (contracts.md):
 *   logits, energies:   max|a-b| / max(1, max|b|)  <= 1e-4
 *   input gradients:    ||g-g_ref|| / ||g_ref||     <= 1e-3
 *   parameter gradients (CrossEntropy, mean over the batch): same, per tensor */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <zlib.h>

#include "jem.h"
#include "testutil.h"

#define REF_DIR "tests/ref"
#define TOL_VALUE 1e-4
#define TOL_GRAD 1e-3

typedef struct gold_case {
  const char *name;
  int depth, widen, in_channels, num_classes;
  int has_pgrad, has_gx_y;
} gold_case;

static const gold_case CASES[] = {
  {"wrn10-1-c1-k10", 10, 1, 1, 10, 1, 1},
  {"wrn16-1-c3-k7", 16, 1, 3, 7, 0, 0},
  {"wrn10-2-c1-k5", 10, 2, 1, 5, 0, 1},  /* stride-1 1x1 shortcut in layer1 */
};

/* ------------------------------------------------------------------------ */
/* reading the golden files                                                 */


/* Minimal .npy reader for the files make_golden.py writes: little-endian
 * <f4 or <i4, C order.  Returns the data (malloc'd), fills shape/ndim. */
static void *read_npy(const char *dir, const char *file, char dtype,
                      int shape[4], int *ndim, size_t *count) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s.gz", dir, file);
  size_t len;
  unsigned char *b = read_gz(path, &len);
  if (len < 10 || memcmp(b, "\x93NUMPY", 6)) fail_msg("%s: not a .npy file", path);
  size_t hl, ho;
  if (b[6] == 1) {
    hl = b[8] | (size_t)b[9] << 8;
    ho = 10;
  } else {
    if (len < 12) fail_msg("%s: truncated", path);
    hl = b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
    ho = 12;
  }
  if (ho + hl > len) fail_msg("%s: header past the end", path);
  char *h = calloc(1, hl + 1);
  assert_non_null(h);
  memcpy(h, b + ho, hl);
  char want[8];
  snprintf(want, sizeof want, "'<%c4'", dtype);
  if (!strstr(h, want)) fail_msg("%s: dtype is not %s: %s", path, want, h);
  if (strstr(h, "'fortran_order': True")) fail_msg("%s: Fortran order", path);
  const char *s = strstr(h, "'shape': (");
  if (!s) fail_msg("%s: no shape: %s", path, h);
  s += 10;
  *ndim = 0;
  size_t n = 1;
  while (*s && *s != ')') {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s) break;
    if (*ndim >= 4) fail_msg("%s: too many dimensions", path);
    shape[(*ndim)++] = (int)v;
    n *= (size_t)v;
    s = end;
    while (*s == ',' || *s == ' ') s++;
  }
  free(h);
  if (ho + hl + 4 * n != len) fail_msg("%s: %zu bytes of data, expected %zu", path,
                                       len - ho - hl, 4 * n);
  void *data = malloc(4 * n + 4);
  assert_non_null(data);
  memcpy(data, b + ho + hl, 4 * n);
  free(b);
  *count = n;
  return data;
}

static float *read_f32(const char *dir, const char *file, size_t want) {
  int shape[4], ndim;
  size_t n;
  float *d = read_npy(dir, file, 'f', shape, &ndim, &n);
  if (n != want) fail_msg("%s/%s: %zu values, expected %zu", dir, file, n, want);
  return d;
}

/* ------------------------------------------------------------------------ */
/* comparisons                                                              */

static double rel_max(const float *a, const float *b, size_t n) {
  double d = 0, m = 1;
  for (size_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - b[i]);
    if (e > d || isnan(e)) d = isnan(e) ? INFINITY : e;
    if (fabs(b[i]) > m) m = fabs(b[i]);
  }
  return d / m;
}

static double rel_norm(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double e = (double)a[i] - b[i];
    num += e * e;
    den += (double)b[i] * b[i];
  }
  if (isnan(num)) return INFINITY;
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void check_value(const char *what, const char *cs, const float *a,
                        const float *b, size_t n) {
  double r = rel_max(a, b, n);
  print_message("  %-16s %-28s max rel %.3g\n", cs, what, r);
  if (!(r <= TOL_VALUE)) fail_msg("%s: %s differs from PyTorch: %.3g > %g", cs, what, r, TOL_VALUE);
}

static void check_grad(const char *what, const char *cs, const float *a,
                       const float *b, size_t n, int quiet) {
  double r = rel_norm(a, b, n);
  if (!quiet) print_message("  %-16s %-28s rel norm %.3g\n", cs, what, r);
  if (!(r <= TOL_GRAD)) fail_msg("%s: %s differs from PyTorch: %.3g > %g", cs, what, r, TOL_GRAD);
}

/* ------------------------------------------------------------------------ */

/* Loads model.safetensors.gz through a temporary uncompressed file, so the
 * path-based loader is the one under test. */
static jem_model *load_model(const char *dir) {
  char path[512];
  snprintf(path, sizeof path, "%s/model.safetensors.gz", dir);
  size_t len;
  unsigned char *buf = read_gz(path, &len);
  char tmp[] = "/tmp/jem-parity-XXXXXX";
  int fd = mkstemp(tmp);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, buf, len), (ssize_t)len);
  close(fd);
  jem_model *m = NULL;
  char err[512];
  int rc = jem_model_load(&m, tmp, err, sizeof err);
  unlink(tmp);
  if (rc != 0) fail_msg("%s: jem_model_load failed: %s", path, err);

  /* the in-memory loader agrees */
  jem_model *m2 = NULL;
  rc = jem_model_load_mem(&m2, buf, len, "x", err, sizeof err);
  if (rc != 0) fail_msg("%s: jem_model_load_mem failed: %s", path, err);
  assert_int_equal(m2->n_weights, m->n_weights);
  assert_memory_equal(m2->weights, m->weights, sizeof(float) * m->n_weights);
  jem_model_free(m2);
  free(buf);
  return m;
}

/* The golden feature Gaussian (make_golden.py's make_feature_gauss). */
static void set_feature_gauss(jem_model *m, const char *dir, int k) {
  const size_t F = (size_t)64 * m->arch.widen;
  float *mean = read_f32(dir, "feat_mean.npy", (size_t)k * F);
  float *white = read_f32(dir, "feat_whiten.npy", F * F);
  char err[256];
  if (jem_model_set_feature_gauss(m, mean, white, err, sizeof err))
    fail_msg("%s: jem_model_set_feature_gauss: %s", dir, err);
  free(mean);
  free(white);
}

static void run_case(const gold_case *c) {
  char dir[256];
  snprintf(dir, sizeof dir, "%s/%s", REF_DIR, c->name);
  jem_model *m = load_model(dir);
  const char *cs = c->name;

  /* metadata and architecture as written by the script */
  assert_int_equal(m->arch.depth, c->depth);
  assert_int_equal(m->arch.widen, c->widen);
  assert_int_equal(m->arch.in_channels, c->in_channels);
  assert_int_equal(m->arch.num_classes, c->num_classes);
  assert_int_equal(m->arch.image_size, 32);
  assert_true(fabsf(m->arch.leak - 0.2f) < 1e-7f);
  assert_true(fabsf(m->temperature - 1.5f) < 1e-7f);
  char want_name[128];
  snprintf(want_name, sizeof want_name, "golden-%s", c->name);
  assert_string_equal(m->name, want_name);
  assert_null(m->replay);

  int shape[4], ndim;
  size_t n_x;
  float *x = read_npy(dir, "x.npy", 'f', shape, &ndim, &n_x);
  assert_int_equal(ndim, 4);
  const int n = shape[0], k = c->num_classes;
  const size_t chw = (size_t)c->in_channels * 32 * 32;
  assert_int_equal(n_x, (size_t)n * chw);
  size_t n_y;
  int *y = read_npy(dir, "y.npy", 'i', shape, &ndim, &n_y);
  assert_int_equal(n_y, (size_t)n);
  float *ref_logits = read_f32(dir, "logits.npy", (size_t)n * k);
  float *ref_energy = read_f32(dir, "energy.npy", (size_t)n);
  float *ref_gx = read_f32(dir, "gx_lse.npy", (size_t)n * chw);

  float *logits = calloc((size_t)n * k, sizeof(float));
  float *energy = calloc((size_t)n, sizeof(float));
  float *gnorm = calloc((size_t)n, sizeof(float));
  float *ref_gnorm = calloc((size_t)n, sizeof(float));
  float *probs = calloc((size_t)n * k, sizeof(float));
  float *ref_probs = calloc((size_t)n * k, sizeof(float));
  float *dx = calloc((size_t)n * chw, sizeof(float));
  assert_non_null(logits);
  assert_non_null(energy);
  assert_non_null(gnorm);
  assert_non_null(ref_gnorm);
  assert_non_null(probs);
  assert_non_null(ref_probs);
  assert_non_null(dx);

  jem_ws *ws = jem_ws_create(m, n, JEM_WS_TRAIN);
  assert_non_null(ws);

  /* forward */
  jem_forward(ws, m, x, n, logits);
  check_value("logits (forward)", cs, logits, ref_logits, (size_t)n * k);

  /* scores, with a workspace smaller than the batch (chunks of 3) */
  jem_ws *ws3 = jem_ws_create(m, 3, 0);
  assert_non_null(ws3);
  float *maha = calloc((size_t)n, sizeof(float));
  assert_non_null(maha);
  set_feature_gauss(m, dir, k);
  jem_scores sc = {.logits = logits, .probs = probs, .score[JEM_SCORE_ENERGY] = energy, .score[JEM_SCORE_GRAD_NORM] = gnorm,
                   .score[JEM_SCORE_MAHALANOBIS] = maha};
  memset(logits, 0, sizeof(float) * (size_t)n * k);
  jem_score_batch(ws3, m, x, n, 1, &sc);
  jem_ws_free(ws3);
  check_value("logits (score, chunks 3)", cs, logits, ref_logits, (size_t)n * k);
  check_value("energy", cs, energy, ref_energy, (size_t)n);
  /* mahalanobis: C's GEMM on the whitener against PyTorch's float64
   * quadratic form on the precision W^T W */
  float *ref_maha = read_f32(dir, "maha.npy", (size_t)n);
  check_value("mahalanobis", cs, maha, ref_maha, (size_t)n);
  free(ref_maha);
  free(maha);
  for (int i = 0; i < n; i++) {
    double s = 0;
    for (size_t j = 0; j < chw; j++) s += (double)ref_gx[i * chw + j] * ref_gx[i * chw + j];
    ref_gnorm[i] = (float)sqrt(s);
    /* tempered probabilities from the reference logits, T = 1.5 */
    double mx = -INFINITY, z = 0;
    for (int j = 0; j < k; j++) mx = fmax(mx, ref_logits[i * k + j] / 1.5);
    for (int j = 0; j < k; j++) z += exp(ref_logits[i * k + j] / 1.5 - mx);
    for (int j = 0; j < k; j++) ref_probs[i * k + j] = (float)(exp(ref_logits[i * k + j] / 1.5 - mx) / z);
  }
  check_grad("grad_norm", cs, gnorm, ref_gnorm, (size_t)n, 0);
  check_value("probs (T=1.5)", cs, probs, ref_probs, (size_t)n * k);

  /* input gradient of sum_i logsumexp f(x_i): whole batch, then each image */
  jem_input_grad(ws, m, x, n, NULL, logits, dx);
  check_value("logits (input_grad)", cs, logits, ref_logits, (size_t)n * k);
  check_grad("d logsumexp / dx", cs, dx, ref_gx, (size_t)n * chw, 0);
  for (int i = 0; i < n; i++)
    check_grad("d logsumexp / dx (image)", cs, dx + i * chw, ref_gx + i * chw, chw, 1);

  /* class-conditional: d f[y] / dx */
  if (c->has_gx_y) {
    float *ref_gy = read_f32(dir, "gx_y.npy", (size_t)n * chw);
    jem_input_grad(ws, m, x, n, y, NULL, dx);
    check_grad("d f[y] / dx", cs, dx, ref_gy, (size_t)n * chw, 0);
    for (int i = 0; i < n; i++)
      check_grad("d f[y] / dx (image)", cs, dx + i * chw, ref_gy + i * chw, chw, 1);
    free(ref_gy);
  }

  /* parameter gradients of CrossEntropy(f(x), y), mean over the batch */
  if (c->has_pgrad) {
    float *ref_pg = read_f32(dir, "pgrad.npy", m->n_weights);
    float *dw = calloc(m->n_weights, sizeof(float));
    float *dlogits = calloc((size_t)n * k, sizeof(float));
    assert_non_null(dw);
    assert_non_null(dlogits);
    jem_forward(ws, m, x, n, logits);
    for (int i = 0; i < n; i++) {
      jem_softmax(dlogits + i * k, logits + i * k, k, 1.0f);
      dlogits[i * k + y[i]] -= 1.0f;
      for (int j = 0; j < k; j++) dlogits[i * k + j] /= (float)n;
    }
    jem_backward(ws, m, dlogits, dw, NULL);

    /* pgrad.txt: "name numel" per tensor, in pgrad.npy's order */
    char path[512];
    snprintf(path, sizeof path, "%s/pgrad.txt.gz", dir);
    size_t tl;
    char *txt = (char *)read_gz(path, &tl);
    txt = realloc(txt, tl + 1);
    assert_non_null(txt);
    txt[tl] = 0;
    size_t off = 0;
    int tensors = 0;
    double worst = 0;
    const char *worst_name = "";
    char *save = NULL;
    for (char *line = strtok_r(txt, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
      char name[128];
      size_t numel;
      if (sscanf(line, "%127s %zu", name, &numel) != 2) fail_msg("%s: bad line '%s'", path, line);
      const jem_param *p = jem_model_param(m, name);
      if (!p) fail_msg("%s: the core has no parameter %s", cs, name);
      assert_int_equal(p->numel, numel);
      if (off + numel > m->n_weights) fail_msg("%s: pgrad.npy too short", cs);
      double r = rel_norm(dw + p->offset, ref_pg + off, numel);
      if (r > worst) {
        worst = r;
        worst_name = p->name;
      }
      if (!(r <= TOL_GRAD))
        fail_msg("%s: gradient of %s differs from PyTorch: rel norm %.3g > %g", cs, name, r, TOL_GRAD);
      off += numel;
      tensors++;
    }
    print_message("  %-16s %-28s worst rel norm %.3g (%s), %d tensors\n", cs,
                  "d CE / d params", worst, worst_name, tensors);
    /* every parameter the core uses has a reference gradient */
    assert_int_equal(tensors, m->n_params);
    assert_int_equal(off, m->n_weights);
    free(txt);
    free(dlogits);
    free(dw);
    free(ref_pg);
  }

  jem_ws_free(ws);
  free(x);
  free(y);
  free(ref_logits);
  free(ref_energy);
  free(ref_gx);
  free(logits);
  free(energy);
  free(gnorm);
  free(ref_gnorm);
  free(probs);
  free(ref_probs);
  free(dx);
  jem_model_free(m);
}

static void test_parity_wrn10(void **state) {
  (void)state;
  run_case(&CASES[0]);
}

static void test_parity_wrn16_rgb(void **state) {
  (void)state;
  run_case(&CASES[1]);
}

static void test_parity_wrn10_widen2(void **state) {
  (void)state;
  run_case(&CASES[2]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_parity_wrn10),
    cmocka_unit_test(test_parity_wrn16_rgb),
    cmocka_unit_test(test_parity_wrn10_widen2),
  };
  return cmocka_run_group_tests_name("parity with PyTorch", tests, NULL, NULL);
}
