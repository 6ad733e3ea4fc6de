/* test_sample.c - the shared SGLD job set-up (jem_sample_init): per-chain
 * streams, the three init modes, and that running the steps in pieces (as
 * the daemon does to report progress) gives the same bytes as one call. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "jem.h"

#define CHW (1 * 32 * 32)

static jem_model *tiny_model(void) {
  jem_arch a = {.depth = 10, .widen = 1, .in_channels = 1, .image_size = 32,
                .num_classes = 3, .leak = 0.2f};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  jem_model_init_random(m, 11);
  return m;
}

static void test_init_modes(void **state) {
  (void)state;
  jem_model *m = tiny_model();
  enum { N = 6 };
  float *x = malloc(sizeof(float) * N * CHW), *x2 = malloc(sizeof(float) * 2 * CHW);
  jem_rng r[N], r2[2];
  assert_int_equal(jem_sample_default_init(m), JEM_SAMPLE_INIT_NOISE);
  jem_sample_init(m, x, N, JEM_SAMPLE_INIT_NOISE, NULL, 77, r);
  for (int i = 0; i < N * CHW; i++) assert_true(x[i] >= -1.0f && x[i] <= 1.0f);
  /* chain i depends only on (seed, i) */
  jem_sample_init(m, x2, 2, JEM_SAMPLE_INIT_NOISE, NULL, 77, r2);
  assert_memory_equal(x, x2, sizeof(float) * 2 * CHW);
  assert_memory_not_equal(x, x + CHW, sizeof(float) * CHW);
  for (int i = 0; i < 2; i++) assert_int_equal(jem_rng_u32(&r[i]), jem_rng_u32(&r2[i]));
  /* GIVEN keeps the images and only seeds */
  for (int i = 0; i < 2 * CHW; i++) x2[i] = 0.25f;
  jem_sample_init(m, x2, 2, JEM_SAMPLE_INIT_GIVEN, NULL, 77, r2);
  for (int i = 0; i < 2 * CHW; i++) assert_true(x2[i] == 0.25f);
  /* BUFFER takes replay images (or, rarely, noise) */
  m->replay_n = 3;
  m->replay = malloc(sizeof(float) * 3 * CHW);
  for (int k = 0; k < 3; k++)
    for (int j = 0; j < CHW; j++) m->replay[k * CHW + j] = 0.1f * (float)(k + 1);
  assert_int_equal(jem_sample_default_init(m), JEM_SAMPLE_INIT_BUFFER);
  jem_sample_init(m, x, N, JEM_SAMPLE_INIT_BUFFER, NULL, 5, r);
  int from_buffer = 0;
  for (int i = 0; i < N; i++) {
    float v = x[i * CHW];
    int same = 1;
    for (int j = 0; j < CHW; j++) same &= x[i * CHW + j] == v;
    from_buffer += same && (v == 0.1f || v == 0.2f || v == 0.3f);
  }
  assert_true(from_buffer >= N - 2);
  free(x);
  free(x2);
  jem_model_free(m);
}

static void test_steps_in_pieces(void **state) {
  (void)state;
  jem_model *m = tiny_model();
  enum { N = 3 };
  jem_ws *ws = jem_ws_create(m, N, 0);
  assert_non_null(ws);
  float *a = malloc(sizeof(float) * N * CHW), *b = malloc(sizeof(float) * N * CHW);
  jem_rng ra[N], rb[N];
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  p.clamp = 1;
  int y[N] = {0, 1, 2};
  jem_sample_init(m, a, N, JEM_SAMPLE_INIT_NOISE, NULL, 123, ra);
  jem_sgld_run(ws, m, a, N, y, 6, &p, ra);
  jem_sample_init(m, b, N, JEM_SAMPLE_INIT_NOISE, NULL, 123, rb);
  jem_sgld_run(ws, m, b, N, y, 2, &p, rb);
  jem_sgld_run(ws, m, b, N, y, 1, &p, rb);
  jem_sgld_run(ws, m, b, N, y, 3, &p, rb);
  assert_memory_equal(a, b, sizeof(float) * N * CHW);
  /* and the steps did something */
  jem_sample_init(m, b, N, JEM_SAMPLE_INIT_NOISE, NULL, 123, rb);
  assert_memory_not_equal(a, b, sizeof(float) * N * CHW);
  free(a);
  free(b);
  jem_ws_free(ws);
  jem_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_init_modes),
    cmocka_unit_test(test_steps_in_pieces),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
