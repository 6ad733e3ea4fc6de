/* test_noalloc.c - no heap allocation inside forward, backward, input_grad and
 * score_batch.  Linked with --wrap for malloc and friends (see the Makefile):
 * the wrappers count calls while armed and forward to the real allocator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "internal.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t s);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);
void *__real_aligned_alloc(size_t a, size_t n);
int __real_posix_memalign(void **p, size_t a, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t s);
void *__wrap_realloc(void *p, size_t n);
void __wrap_free(void *p);
void *__wrap_aligned_alloc(size_t a, size_t n);
int __wrap_posix_memalign(void **p, size_t a, size_t n);

static volatile int armed;
static volatile long n_calls;

void *__wrap_malloc(size_t n) {
  if (armed) n_calls++;
  return __real_malloc(n);
}
void *__wrap_calloc(size_t n, size_t s) {
  if (armed) n_calls++;
  return __real_calloc(n, s);
}
void *__wrap_realloc(void *p, size_t n) {
  if (armed) n_calls++;
  return __real_realloc(p, n);
}
void __wrap_free(void *p) {
  if (armed) n_calls++;
  __real_free(p);
}
void *__wrap_aligned_alloc(size_t a, size_t n) {
  if (armed) n_calls++;
  return __real_aligned_alloc(a, n);
}
int __wrap_posix_memalign(void **p, size_t a, size_t n) {
  if (armed) n_calls++;
  return __real_posix_memalign(p, a, n);
}

static void arm(void) { n_calls = 0; armed = 1; }
static long disarm(void) { armed = 0; return n_calls; }

static void *volatile sink;

/* The counter works: an allocation while armed is seen, also from the core. */
static void test_counter_sees_allocations(void **state) {
  (void)state;
  arm();
  sink = malloc(16);
  long c = disarm();
  free(sink);
  assert_int_equal(c, 1);
  arm();
  float *f = jem__falloc(100); /* core code goes through the wrapper too */
  c = disarm();
  free(f);
  assert_true(c >= 1);
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  arm();
  jem_ws *ws = jem_ws_create(m, 2, 0); /* planning allocates, by design */
  c = disarm();
  assert_true(c >= 1);
  jem_ws_free(ws);
  jem_model_free(m);
}

static void run_all(const jem_arch *a) {
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, a, err, sizeof err), 0);
  jem_model_init_random(m, 3);
  jem_blas_set_threads(2); /* the workspace runs two slices on two threads */
  const int nmax = 8, n = 19, K = a->num_classes;
  const size_t css = (size_t)a->in_channels * a->image_size * a->image_size;
  float *x = malloc(sizeof(float) * css * n), *dx = malloc(sizeof(float) * css * n);
  float *lg = malloc(sizeof(float) * (size_t)K * n), *dl = calloc((size_t)K * n, sizeof(float));
  float *dw = jem__falloc(m->n_weights);
  float *probs = malloc(sizeof(float) * (size_t)K * n), *en = malloc(sizeof(float) * n);
  float *gn = malloc(sizeof(float) * n), *ms = malloc(sizeof(float) * n);
  float *conf = malloc(sizeof(float) * n);
  int *label = malloc(sizeof(int) * n), *y = malloc(sizeof(int) * n);
  for (size_t i = 0; i < css * n; i++) x[i] = (float)((i * 37) % 200) / 100.0f - 1.0f;
  for (int i = 0; i < n; i++) { y[i] = i % K; dl[(size_t)i * K + i % K] = 1.0f; }
  jem_scores s = {lg, probs, label, conf, {[JEM_SCORE_ENERGY] = en, [JEM_SCORE_GRAD_NORM] = gn, [JEM_SCORE_MAX_SOFTMAX] = ms}};
  jem_ws *ws = jem_ws_create(m, nmax, JEM_WS_TRAIN);
  assert_non_null(ws);
  /* warm up once: OpenBLAS may set itself up on first use */
  jem_forward(ws, m, x, nmax, lg);
  jem_backward(ws, m, dl, dw, dx);

  arm();
  jem_forward(ws, m, x, nmax, lg);
  long c_fwd = disarm();
  arm();
  jem_backward(ws, m, dl, dw, dx);
  jem_backward(ws, m, dl, NULL, dx);
  jem_backward(ws, m, dl, dw, NULL);
  long c_bwd = disarm();
  arm();
  jem_input_grad(ws, m, x, nmax, NULL, lg, dx);
  jem_input_grad(ws, m, x, 3, y, NULL, dx);
  long c_in = disarm();
  arm();
  jem_score_batch(ws, m, x, n, 1, &s); /* n > max_batch: chunks */
  jem_score_batch(ws, m, x, n, 0, &s);
  long c_sc = disarm();
  jem_rng rngs[19];
  for (int i = 0; i < n; i++) jem_rng_seed(&rngs[i], 7, (uint64_t)i);
  jem_sgld_params sp;
  jem_sgld_defaults(&sp);
  sp.clamp = 1;
  arm();
  jem_sgld_run(ws, m, x, n, NULL, 2, &sp, rngs); /* n > max_batch: chunks */
  jem_sgld_run(ws, m, x, 5, y, 1, &sp, rngs);
  long c_sgld = disarm();
  assert_int_equal(c_sgld, 0);
  assert_int_equal(c_fwd, 0);
  assert_int_equal(c_bwd, 0);
  assert_int_equal(c_in, 0);
  assert_int_equal(c_sc, 0);

  jem_ws_free(ws);
  free(x); free(dx); free(lg); free(dl); free(dw); free(probs); free(en);
  free(gn); free(ms); free(conf); free(label); free(y);
  jem_model_free(m);
}

static void test_no_alloc_wrn10_1(void **state) {
  (void)state;
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  run_all(&a);
}

static void test_no_alloc_wrn10_2_rgb(void **state) {
  (void)state;
  jem_arch a = {10, 2, 3, 32, 5, 0.2f, JEM_NORM_NONE};
  run_all(&a);
}

static void test_no_alloc_norms(void **state) {
  (void)state;
  for (int norm = JEM_NORM_BATCH; norm < JEM_NUM_NORMS; norm++) {
    jem_arch a = {10, 1, 3, 32, 4, 0.2f, norm};
    run_all(&a);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_counter_sees_allocations),
      cmocka_unit_test(test_no_alloc_wrn10_1),
      cmocka_unit_test(test_no_alloc_wrn10_2_rgb),
      cmocka_unit_test(test_no_alloc_norms),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
