/* test_batch_invariance.c - an image's logits, energy and input gradients
 * (of the energy and of a class logit) are bit for bit the same whether it is
 * scored alone or inside batches of other sizes and neighbours: what lets a
 * daemon advance the SGLD chains of concurrent jobs in one batch without
 * changing any job's bytes.  On the shipped model and on random models whose
 * widths send layers down every convolution path (direct kernel, Winograd,
 * wide-layer Winograd, im2col + sgemm, 1x1 in place), with one thread and
 * with lent threads. */
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

#define POOL 17 /* distinct images */

/* Batch sizes tried: inside one slice, exactly one, across slices. */
static const int SIZES[] = {2, 3, 5, 8, 9, 17};

static size_t chw(const jem_model *m) {
  return (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
}

typedef struct ref {
  float *x, *logits, *dxe, *dxy; /* per image: alone */
  int *y;
} ref;

/* Everything differing from the lone-image reference, as a count. */
typedef struct diff {
  long bad;
  double worst;
} diff;

static void cmp(diff *d, const float *a, const float *b, size_t n) {
  if (!memcmp(a, b, sizeof(float) * n)) return;
  for (size_t i = 0; i < n; i++) {
    if (!memcmp(&a[i], &b[i], sizeof(float))) continue;
    d->bad++;
    double e = fabs((double)a[i] - (double)b[i]);
    if (e > d->worst) d->worst = e;
  }
}

/* Scores the pool images alone with ws, into r. */
static void make_ref(jem_ws *ws, const jem_model *m, ref *r) {
  const size_t css = chw(m);
  const int K = m->arch.num_classes;
  for (int i = 0; i < POOL; i++) {
    jem_input_grad(ws, m, r->x + i * css, 1, NULL, r->logits + (size_t)i * K,
                   r->dxe + i * css);
    jem_input_grad(ws, m, r->x + i * css, 1, &r->y[i], NULL, r->dxy + i * css);
  }
}

/* Every batch size, with neighbours picked by a stride through the pool:
 * image j of the batch is pool image (start + j * step) % POOL. */
static diff run_batches(jem_ws *ws, const jem_model *m, const ref *r) {
  const size_t css = chw(m);
  const int K = m->arch.num_classes;
  const int bmax = SIZES[sizeof SIZES / sizeof *SIZES - 1];
  float *x = malloc(sizeof(float) * css * bmax), *lg = malloc(sizeof(float) * K * bmax);
  float *dx = malloc(sizeof(float) * css * bmax);
  int idx[POOL], y[POOL];
  assert_non_null(x);
  assert_non_null(lg);
  assert_non_null(dx);
  diff d = {0, 0.0};
  for (size_t t = 0; t < sizeof SIZES / sizeof *SIZES; t++) {
    const int n = SIZES[t];
    for (int pass = 0; pass < 2; pass++) {
      const int start = (int)t * 5 + pass * 11, step = pass ? 7 : 1;
      for (int j = 0; j < n; j++) {
        idx[j] = (start + j * step) % POOL;
        y[j] = r->y[idx[j]];
        memcpy(x + j * css, r->x + idx[j] * css, sizeof(float) * css);
      }
      jem_input_grad(ws, m, x, n, NULL, lg, dx);
      diff before = d;
      for (int j = 0; j < n; j++) {
        cmp(&d, lg + (size_t)j * K, r->logits + (size_t)idx[j] * K, (size_t)K);
        float e1 = -jem_logsumexp(lg + (size_t)j * K, K);
        float e0 = -jem_logsumexp(r->logits + (size_t)idx[j] * K, K);
        cmp(&d, &e1, &e0, 1);
        cmp(&d, dx + j * css, r->dxe + idx[j] * css, css);
      }
      jem_input_grad(ws, m, x, n, y, NULL, dx);
      for (int j = 0; j < n; j++) cmp(&d, dx + j * css, r->dxy + idx[j] * css, css);
      if (d.bad != before.bad)
        print_message("  batch %2d (step %d): %ld values differ so far, worst %.3g\n", n, step,
                      d.bad, d.worst);
    }
  }
  free(x);
  free(lg);
  free(dx);
  return d;
}

/* jem_score_batch of the whole pool against each image alone: every score
 * (Mahalanobis too, where the model has its statistics), logits, tempered
 * probabilities. */
static diff score_check(jem_ws *ws, const jem_model *m, const ref *r) {
  const size_t css = chw(m);
  const int K = m->arch.num_classes;
  float all[JEM_NUM_SCORES][POOL], one[JEM_NUM_SCORES];
  float *lg = malloc(sizeof(float) * K * POOL), *pr = malloc(sizeof(float) * K * POOL);
  float *lg1 = malloc(sizeof(float) * K), *pr1 = malloc(sizeof(float) * K);
  assert_true(lg && pr && lg1 && pr1);
  jem_scores s = {.logits = lg, .probs = pr}, s1 = {.logits = lg1, .probs = pr1};
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    s.score[k] = all[k];
    s1.score[k] = &one[k];
  }
  diff d = {0, 0.0};
  jem_score_batch(ws, m, r->x, POOL, 1, &s);
  for (int i = 0; i < POOL; i++) {
    jem_score_batch(ws, m, r->x + i * css, 1, 1, &s1);
    for (int k = 0; k < JEM_NUM_SCORES; k++) cmp(&d, &one[k], &all[k][i], 1);
    cmp(&d, lg1, lg + (size_t)i * K, (size_t)K);
    cmp(&d, pr1, pr + (size_t)i * K, (size_t)K);
  }
  free(lg);
  free(pr);
  free(lg1);
  free(pr1);
  return d;
}

static void check_model(const jem_model *m, const char *what) {
  const size_t css = chw(m);
  const int K = m->arch.num_classes;
  ref r;
  r.x = malloc(sizeof(float) * css * POOL);
  r.logits = malloc(sizeof(float) * K * POOL);
  r.dxe = malloc(sizeof(float) * css * POOL);
  r.dxy = malloc(sizeof(float) * css * POOL);
  r.y = malloc(sizeof(int) * POOL);
  assert_true(r.x && r.logits && r.dxe && r.dxy && r.y);
  unsigned st = 97;
  ref_fill(r.x, css * POOL, &st, -1, 1);
  for (int i = 0; i < POOL; i++) r.y[i] = (i * 3) % K;
  /* as the daemon's workers run: fixed weights, one thread, then lent threads */
  for (int thr = 1; thr <= 2; thr++) {
    jem_blas_set_threads(thr);
    jem_ws *ws = jem_ws_create(m, 32, JEM_WS_FIXED_WEIGHTS);
    assert_non_null(ws);
    jem_ws_set_batch_invariant(ws, 1);
    make_ref(ws, m, &r);
    diff d = run_batches(ws, m, &r), ds = score_check(ws, m, &r);
    if (d.bad)
      fail_msg("%s, %d thread(s): %ld values differ from the image scored alone (worst %.3g)",
               what, thr, d.bad, d.worst);
    if (ds.bad)
      fail_msg("%s, %d thread(s): %ld scores differ from the image scored alone (worst %.3g)",
               what, thr, ds.bad, ds.worst);
    jem_ws_free(ws);
  }
  free(r.x);
  free(r.logits);
  free(r.dxe);
  free(r.dxy);
  free(r.y);
}

static void test_shipped_model(void **state) {
  (void)state;
  jem_model *m = NULL;
  char err[256] = "";
  if (jem_model_load(&m, "models/fmnist-jem.safetensors", err, sizeof err))
    fail_msg("models/fmnist-jem.safetensors: %s (run from the repository root)", err);
  check_model(m, "shipped model");
  jem_model_free(m);
}

/* Random models whose widths exercise the other paths: WRN-10-3 on three
 * channels (192-channel 3x3 layers too big for the direct kernel: wide
 * layers, on Winograd with the packed micro-kernels, and a strided one on
 * im2col + sgemm; Winograd-sized middle layers), WRN-10-1 and an
 * instance-norm WRN-10-3 (wide layers' input gradients through a norm). */
static void test_random_models(void **state) {
  (void)state;
  const jem_arch archs[] = {
      {10, 3, 3, 32, 7, 0.2f, JEM_NORM_NONE},
      {10, 1, 1, 32, 10, 0.1f, JEM_NORM_NONE},
      {10, 3, 3, 32, 5, 0.2f, JEM_NORM_INSTANCE},
  };
  for (size_t a = 0; a < sizeof archs / sizeof *archs; a++) {
    jem_model *m = NULL;
    char err[256] = "", what[64];
    if (jem_model_create(&m, &archs[a], err, sizeof err)) fail_msg("jem_model_create: %s", err);
    jem_model_init_random(m, 1000 + a);
    snprintf(what, sizeof what, "WRN-%d-%d (%d channels, norm %d)", archs[a].depth,
             archs[a].widen, archs[a].in_channels, archs[a].norm);
    check_model(m, what);
    jem_model_free(m);
  }
}

/* Each convolution path forced everywhere it applies: im2col + sgemm only,
 * the direct kernel without Winograd, Winograd wherever the shape allows. */
static void test_every_conv_path(void **state) {
  (void)state;
  const jem_arch a = {10, 2, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256] = "", what[64];
  if (jem_model_create(&m, &a, err, sizeof err)) fail_msg("jem_model_create: %s", err);
  jem_model_init_random(m, 77);
  const int modes[] = {0, 2, 3};
  for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) {
    jem__conv_set_fast(modes[i]);
    snprintf(what, sizeof what, "WRN-10-2, convolution mode %d", modes[i]);
    check_model(m, what);
  }
  jem__conv_set_fast(1);
  jem_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_shipped_model),
      cmocka_unit_test(test_random_models),
      cmocka_unit_test(test_every_conv_path),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
