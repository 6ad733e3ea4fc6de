/* test_sgld.c - random streams and the SGLD sampler: distribution sanity,
 * determinism, independence of batching, energy descent, clamping. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "jem.h"

#define NCH 4  /* chains in most tests */

typedef struct fixture {
  jem_model *m;
  size_t chw;
} fixture;

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */

static void seed_all(jem_rng *r, int n, uint64_t seed) {
  for (int i = 0; i < n; i++) jem_rng_seed(&r[i], seed, (uint64_t)i);
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
  float d = 0.0f;
  for (size_t i = 0; i < n; i++) {
    float e = fabsf(a[i] - b[i]);
    if (e > d || isnan(e)) d = e;
  }
  return d;
}

static float max_abs(const float *a, size_t n) {
  float d = 0.0f;
  for (size_t i = 0; i < n; i++)
    if (fabsf(a[i]) > d) d = fabsf(a[i]);
  return d;
}

/* energies (-logsumexp) and, when y != NULL, f[y] of n images */
static void energies(const fixture *f, const float *x, int n, const int *y,
                     float *e, float *fy) {
  jem_ws *ws = jem_ws_create(f->m, n, 0);
  assert_non_null(ws);
  int k = f->m->arch.num_classes;
  float *logits = malloc(sizeof(float) * (size_t)n * k);
  assert_non_null(logits);
  jem_forward(ws, f->m, x, n, logits);
  for (int i = 0; i < n; i++) {
    if (e) e[i] = -jem_logsumexp(logits + (size_t)i * k, k);
    if (fy) fy[i] = logits[(size_t)i * k + y[i]];
  }
  free(logits);
  jem_ws_free(ws);
}

/* Runs `steps` SGLD steps on n chains from U(-1,1) starts (seed), with a
 * workspace of max_batch; x receives the result. */
static void sample(const fixture *f, float *x, int n, const int *y, int steps,
                   const jem_sgld_params *p, uint64_t seed, int max_batch) {
  jem_rng r[16];
  assert_true(n <= 16);
  seed_all(r, n, seed);
  jem_sgld_init_noise(x, n, f->chw, r);
  jem_ws *ws = jem_ws_create(f->m, max_batch, 0);
  assert_non_null(ws);
  jem_sgld_run(ws, f->m, x, n, y, steps, p, r);
  jem_ws_free(ws);
}

/* ------------------------------------------------------------------------ */
/* fixture: a random WRN-10-1, 1x32x32, 10 classes, with weights scaled so
 * that gradients have the size of a trained model's (default init gives
 * logits ~0.2 and tiny input gradients) */

static int setup(void **state) {
  fixture *f = calloc(1, sizeof *f);
  if (!f) return -1;
  jem_arch a = {.depth = 10, .widen = 1, .in_channels = 1, .image_size = 32,
                .num_classes = 10, .leak = 0.2f};
  char err[256];
  if (jem_model_create(&f->m, &a, err, sizeof err) != 0) {
    fprintf(stderr, "jem_model_create: %s\n", err);
    free(f);
    return -1;
  }
  jem_model_init_random(f->m, 11);
  for (int i = 0; i < f->m->n_params; i++) {
    const jem_param *p = &f->m->params[i];
    float gain = 1.0f;
    if (p->ndim == 4) gain = 2.0f;
    if (!strcmp(p->name, "class_output.weight")) gain = 4.0f;
    for (size_t j = 0; j < p->numel; j++) f->m->weights[p->offset + j] *= gain;
  }
  f->chw = (size_t)a.in_channels * a.image_size * a.image_size;
  *state = f;
  return 0;
}

static int teardown(void **state) {
  fixture *f = *state;
  jem_model_free(f->m);
  free(f);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* random streams                                                           */

static void test_rng_reproducible(void **state) {
  (void)state;
  jem_rng a, b, c, d;
  jem_rng_seed(&a, 42, 3);
  jem_rng_seed(&b, 42, 3);
  jem_rng_seed(&c, 42, 4);   /* other stream */
  jem_rng_seed(&d, 43, 3);   /* other seed */
  int same_c = 0, same_d = 0;
  for (int i = 0; i < 1000; i++) {
    uint32_t va = jem_rng_u32(&a), vb = jem_rng_u32(&b);
    assert_int_equal(va, vb);
    uint32_t vc = jem_rng_u32(&c), vd = jem_rng_u32(&d);
    same_c += va == vc;
    same_d += va == vd;
  }
  assert_true(same_c < 3);
  assert_true(same_d < 3);

  /* normals, with the cached spare, replay exactly after re-seeding */
  float n1[101], n2[101];
  jem_rng_seed(&a, 7, 0);
  for (int i = 0; i < 101; i++) n1[i] = jem_rng_normal(&a);
  jem_rng_seed(&a, 7, 0);
  for (int i = 0; i < 101; i++) n2[i] = jem_rng_normal(&a);
  assert_memory_equal(n1, n2, sizeof n1);

  /* the generator core is PCG-XSH-RR 64/32: the reference implementation's
   * pcg32_srandom(42, 54) sequence */
  const uint32_t ref[6] = {0xa15c02b7u, 0x7b47f409u, 0xba1d3330u,
                           0x83d2f293u, 0xbfa4784bu, 0xcbed606eu};
  a.inc = (54u << 1) | 1u;
  a.state = 0;
  (void)jem_rng_u32(&a);
  a.state += 42;
  (void)jem_rng_u32(&a);
  for (int i = 0; i < 6; i++) assert_int_equal(jem_rng_u32(&a), ref[i]);

  /* pinned values of the seeding: a change here changes every seeded sample
   * users have made, so it must be deliberate */
  jem_rng_seed(&a, 0, 0);
  assert_int_equal(jem_rng_u32(&a), 0x91f4247du);
  assert_int_equal(jem_rng_u32(&a), 0xf43f6a89u);
  jem_rng_seed(&a, 12345, 7);
  assert_true(jem_rng_uniform(&a) == 0.592270494f);
  /* normals go through libm: allow its last-bit differences */
  assert_true(fabsf(jem_rng_normal(&a) - 1.36593103f) < 1e-6f);
  assert_true(fabsf(jem_rng_normal(&a) + 0.644494712f) < 1e-6f);
}

static void test_rng_streams_distinct(void **state) {
  (void)state;
  /* first two outputs of 2000 streams of seed 5 and of 2000 other seeds on
   * stream 5: no repeats expected among 64-bit values */
  enum { M = 2000 };
  uint64_t *v = malloc(sizeof(uint64_t) * 2 * M);
  assert_non_null(v);
  for (int i = 0; i < M; i++) {
    jem_rng r;
    jem_rng_seed(&r, 5, (uint64_t)i);
    v[i] = (uint64_t)jem_rng_u32(&r) << 32 | jem_rng_u32(&r);
    jem_rng_seed(&r, 10000 + (uint64_t)i, 5);
    v[M + i] = (uint64_t)jem_rng_u32(&r) << 32 | jem_rng_u32(&r);
  }
  for (int i = 0; i < 2 * M; i++)
    for (int j = i + 1; j < 2 * M; j++)
      if (v[i] == v[j]) fail_msg("streams %d and %d start identically", i, j);
  free(v);
}

static void test_rng_distributions(void **state) {
  (void)state;
  enum { M = 100000 };
  jem_rng r;
  jem_rng_seed(&r, 2024, 1);
  double s = 0, s2 = 0, lo = 1, hi = 0;
  int bins[10] = {0};
  for (int i = 0; i < M; i++) {
    float u = jem_rng_uniform(&r);
    assert_true(u >= 0.0f && u < 1.0f);
    s += u;
    s2 += (double)u * u;
    if (u < lo) lo = u;
    if (u > hi) hi = u;
    bins[(int)(u * 10.0f)]++;
  }
  double mean = s / M, var = s2 / M - mean * mean;
  /* standard errors: mean 0.0009, var 0.00027 */
  assert_true(fabs(mean - 0.5) < 0.005);
  assert_true(fabs(var - 1.0 / 12.0) < 0.002);
  assert_true(lo < 1e-3 && hi > 1 - 1e-3);
  for (int b = 0; b < 10; b++) assert_true(abs(bins[b] - M / 10) < 600);

  s = s2 = 0;
  double s3 = 0, s4 = 0;
  int within1 = 0;
  for (int i = 0; i < M; i++) {
    double z = jem_rng_normal(&r);
    assert_true(isfinite(z));
    s += z;
    s2 += z * z;
    s3 += z * z * z;
    s4 += z * z * z * z;
    within1 += fabs(z) < 1.0;
  }
  mean = s / M;
  var = s2 / M - mean * mean;
  assert_true(fabs(mean) < 0.015);           /* se 0.0032 */
  assert_true(fabs(var - 1.0) < 0.02);       /* se 0.0045 */
  assert_true(fabs(s3 / M) < 0.05);          /* skewness, se 0.008 */
  assert_true(fabs(s4 / M - 3.0) < 0.15);    /* kurtosis, se 0.025 */
  assert_true(fabs((double)within1 / M - 0.682689) < 0.01);
}

/* ------------------------------------------------------------------------ */
/* initialisation                                                           */

static void test_init_noise(void **state) {
  fixture *f = *state;
  float *x = malloc(sizeof(float) * NCH * f->chw);
  float *one = malloc(sizeof(float) * f->chw);
  assert_non_null(x);
  assert_non_null(one);
  jem_rng r[NCH];
  seed_all(r, NCH, 99);
  jem_sgld_init_noise(x, NCH, f->chw, r);
  double s = 0;
  for (size_t j = 0; j < NCH * f->chw; j++) {
    assert_true(x[j] >= -1.0f && x[j] < 1.0f);
    s += x[j];
  }
  assert_true(fabs(s / (NCH * f->chw)) < 0.05);
  /* chain 2 alone, from its own stream, starts identically */
  jem_rng r2;
  jem_rng_seed(&r2, 99, 2);
  jem_sgld_init_noise(one, 1, f->chw, &r2);
  assert_memory_equal(one, x + 2 * f->chw, sizeof(float) * f->chw);
  assert_true(memcmp(x, x + f->chw, sizeof(float) * f->chw) != 0);
  free(one);
  free(x);
}

static int buffer_index(const float *buf, int nbuf, const float *img, size_t chw) {
  for (int b = 0; b < nbuf; b++)
    if (!memcmp(buf + (size_t)b * chw, img, sizeof(float) * chw)) return b;
  return -1;
}

static void test_init_buffer(void **state) {
  fixture *f = *state;
  enum { NBUF = 5, NC = 64 };
  jem_model *m = f->m;
  float *buf = malloc(sizeof(float) * NBUF * f->chw);
  float *x = malloc(sizeof(float) * NC * f->chw);
  assert_non_null(buf);
  assert_non_null(x);
  /* buffer images out of the noise range so they cannot be mistaken */
  for (int b = 0; b < NBUF; b++)
    for (size_t j = 0; j < f->chw; j++) buf[(size_t)b * f->chw + j] = 2.0f + b + 0.001f * (float)j;
  jem_rng r[NC];

  /* no buffer: always noise */
  seed_all(r, NC, 1);
  jem_sgld_init_buffer(m, x, NC, 0.0f, NULL, r);
  for (size_t j = 0; j < NC * f->chw; j++) assert_true(x[j] >= -1.0f && x[j] < 1.0f);

  float *saved = m->replay;
  int saved_n = m->replay_n;
  m->replay = buf;
  m->replay_n = NBUF;

  /* reinit 0: every chain is a buffer image, and several are used */
  seed_all(r, NC, 1);
  jem_sgld_init_buffer(m, x, NC, 0.0f, NULL, r);
  int used[NBUF] = {0};
  for (int i = 0; i < NC; i++) {
    int b = buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw);
    assert_true(b >= 0);
    used[b]++;
  }
  for (int b = 0; b < NBUF; b++) assert_true(used[b] > 0);

  /* reinit 1: never a buffer image */
  seed_all(r, NC, 1);
  jem_sgld_init_buffer(m, x, NC, 1.0f, NULL, r);
  for (int i = 0; i < NC; i++)
    assert_int_equal(buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw), -1);

  /* reinit 0.5: a mix, reproducible, chain i independent of the others */
  seed_all(r, NC, 3);
  jem_sgld_init_buffer(m, x, NC, 0.5f, NULL, r);
  int from_buf = 0;
  for (int i = 0; i < NC; i++)
    from_buf += buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw) >= 0;
  assert_true(from_buf > 10 && from_buf < NC - 10);
  float *one = malloc(sizeof(float) * f->chw);
  assert_non_null(one);
  for (int i = 0; i < NC; i += 9) {
    jem_rng ri;
    jem_rng_seed(&ri, 3, (uint64_t)i);
    jem_sgld_init_buffer(m, one, 1, 0.5f, NULL, &ri);
    assert_memory_equal(one, x + (size_t)i * f->chw, sizeof(float) * f->chw);
  }

  m->replay = saved;
  m->replay_n = saved_n;
  free(one);
  free(x);
  free(buf);
}

/* A labelled buffer: jem_replay_label groups the images by the model's own
 * argmax, and a class-conditional chain starts only from its class's images
 * (or, for a class with none, from any image). */
static void test_init_buffer_by_class(void **state) {
  fixture *f = *state;
  enum { NBUF = 48, NC = 60, K = 10 };
  jem_model *m = f->m;
  float *buf = malloc(sizeof(float) * NBUF * f->chw);
  float *x = malloc(sizeof(float) * NC * f->chw);
  float logits[NBUF * K];
  int label[NBUF], y[NC];
  jem_ws *ws = jem_ws_create(m, 16, 0);
  assert_non_null(buf);
  assert_non_null(x);
  assert_non_null(ws);
  jem_rng r[NC];
  seed_all(r, NBUF, 21);
  jem_sgld_init_noise(buf, NBUF, f->chw, r);
  for (int i0 = 0; i0 < NBUF; i0 += 16) jem_forward(ws, m, buf + i0 * f->chw, 16, logits + i0 * K);
  int count[K] = {0};
  for (int i = 0; i < NBUF; i++) {
    label[i] = 0;
    for (int c = 1; c < K; c++)
      if (logits[i * K + c] > logits[i * K + label[i]]) label[i] = c;
    count[label[i]]++;
  }
  int have = 0, empty = -1, nclasses = 0;
  for (int c = 0; c < K; c++) {
    if (count[c] > count[have]) have = c;
    if (!count[c] && empty < 0) empty = c;
    nclasses += count[c] > 0;
  }
  /* else the checks below say nothing (this fixture: 3 classes, 37 of 48 in one) */
  assert_true(nclasses >= 2 && empty >= 0);

  float *saved = m->replay;
  int saved_n = m->replay_n;
  m->replay = buf;
  m->replay_n = NBUF;
  assert_int_equal(jem_replay_label(m, ws), 0);
  assert_non_null(m->replay_first);
  assert_int_equal(m->replay_first[0], 0);
  assert_int_equal(m->replay_first[K], NBUF);
  for (int c = 0; c < K; c++) {
    assert_int_equal(m->replay_first[c + 1] - m->replay_first[c], count[c]);
    for (int k = m->replay_first[c]; k < m->replay_first[c + 1]; k++)
      assert_int_equal(label[m->replay_order[k]], c);
  }

  /* chains of class `have` take only its images, several of them */
  for (int i = 0; i < NC; i++) y[i] = have;
  seed_all(r, NC, 5);
  jem_sgld_init_buffer(m, x, NC, 0.0f, y, r);
  int used[NBUF] = {0};
  for (int i = 0; i < NC; i++) {
    int b = buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw);
    assert_true(b >= 0);
    assert_int_equal(label[b], have);
    used[b] = 1;
  }
  int distinct = 0;
  for (int b = 0; b < NBUF; b++) distinct += used[b];
  assert_true(distinct >= 2);
  /* a class without images, and unconditional chains: the whole buffer */
  for (int i = 0; i < NC; i++) y[i] = empty;
  seed_all(r, NC, 5);
  jem_sgld_init_buffer(m, x, NC, 0.0f, y, r);
  for (int i = 0; i < NC; i++)
    assert_true(buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw) >= 0);
  seed_all(r, NC, 5);
  jem_sgld_init_buffer(m, x, NC, 0.0f, NULL, r);
  memset(used, 0, sizeof used);
  for (int i = 0; i < NC; i++) used[label[buffer_index(buf, NBUF, x + (size_t)i * f->chw, f->chw)]] = 1;
  int classes_seen = 0;
  for (int c = 0; c < K; c++) classes_seen += used[c];
  assert_true(classes_seen >= 2);

  free(m->replay_order);
  free(m->replay_first);
  m->replay_order = m->replay_first = NULL;
  m->replay = saved;
  m->replay_n = saved_n;
  jem_ws_free(ws);
  free(x);
  free(buf);
}

/* ------------------------------------------------------------------------ */
/* sampling                                                                 */

static void test_sgld_defaults(void **state) {
  (void)state;
  jem_sgld_params p;
  memset(&p, 0xff, sizeof p);
  jem_sgld_defaults(&p);
  assert_true(p.step_size == 1.0f);
  assert_true(p.noise == 0.01f);
  assert_int_equal(p.clamp, 1); /* sampling images: kept in range */
}

static void test_sgld_deterministic(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *a = malloc(sizeof(float) * len), *b = malloc(sizeof(float) * len),
        *c = malloc(sizeof(float) * len);
  assert_non_null(a);
  assert_non_null(b);
  assert_non_null(c);
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  sample(f, a, NCH, NULL, 5, &p, 1234, NCH);
  sample(f, b, NCH, NULL, 5, &p, 1234, NCH);
  assert_memory_equal(a, b, sizeof(float) * len);  /* bit-identical */
  for (size_t j = 0; j < len; j++) assert_true(isfinite(a[j]));

  sample(f, c, NCH, NULL, 5, &p, 1235, NCH);
  /* another seed: every chain differs */
  for (int i = 0; i < NCH; i++)
    assert_true(memcmp(a + i * f->chw, c + i * f->chw, sizeof(float) * f->chw) != 0);

  /* the chains actually moved away from their starting noise */
  jem_rng r[NCH];
  seed_all(r, NCH, 1234);
  jem_sgld_init_noise(c, NCH, f->chw, r);
  assert_true(max_abs_diff(a, c, len) > 0.01f);
  free(a);
  free(b);
  free(c);
}

/* Chains are independent: running 4 together, in chunks of 2 or 3 by a
 * smaller workspace, or as two separate calls of 2 gives the same chains up
 * to the rounding of differently shaped GEMMs. */
static void test_sgld_batching_independent(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *all = malloc(sizeof(float) * len), *chunk2 = malloc(sizeof(float) * len),
        *chunk3 = malloc(sizeof(float) * len), *sep = malloc(sizeof(float) * len);
  assert_non_null(all);
  assert_non_null(chunk2);
  assert_non_null(chunk3);
  assert_non_null(sep);
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  const int ys[NCH] = {0, 3, 7, 9};

  for (int cond = 0; cond < 2; cond++) {
    const int *y = cond ? ys : NULL;
    sample(f, all, NCH, y, 6, &p, 77, NCH);
    sample(f, chunk2, NCH, y, 6, &p, 77, 2);
    sample(f, chunk3, NCH, y, 6, &p, 77, 3);

    /* separately: chains 0-1 and 2-3, each call with its own rngs */
    jem_rng r[NCH];
    seed_all(r, NCH, 77);
    jem_sgld_init_noise(sep, NCH, f->chw, r);
    jem_ws *ws = jem_ws_create(f->m, 2, 0);
    assert_non_null(ws);
    jem_sgld_run(ws, f->m, sep, 2, y, 6, &p, r);
    jem_sgld_run(ws, f->m, sep + 2 * f->chw, 2, y ? y + 2 : NULL, 6, &p, r + 2);
    jem_ws_free(ws);

    float scale = fmaxf(1.0f, max_abs(all, len));
    float d2 = max_abs_diff(all, chunk2, len) / scale;
    float d3 = max_abs_diff(all, chunk3, len) / scale;
    float ds = max_abs_diff(all, sep, len) / scale;
    print_message("  %s: max diff 4 vs 2+2 chunks %.2g, 3+1 %.2g, separate %.2g\n",
                  cond ? "class-conditional" : "unconditional", d2, d3, ds);
    assert_true(d2 <= 1e-4f);
    assert_true(d3 <= 1e-4f);
    assert_true(ds <= 1e-4f);
  }
  free(all);
  free(chunk2);
  free(chunk3);
  free(sep);
}

static void test_sgld_energy_decreases(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *x = malloc(sizeof(float) * len);
  assert_non_null(x);
  jem_rng r[NCH];
  seed_all(r, NCH, 5);
  jem_sgld_init_noise(x, NCH, f->chw, r);
  jem_sgld_params p = {.step_size = 0.01f, .noise = 0.0f, .clamp = 0};
  jem_ws *ws = jem_ws_create(f->m, NCH, 0);
  assert_non_null(ws);
  float e0[NCH], e[NCH], prev[NCH];
  energies(f, x, NCH, NULL, e0, NULL);
  memcpy(prev, e0, sizeof prev);
  for (int s = 0; s < 5; s++) {
    jem_sgld_run(ws, f->m, x, NCH, NULL, 1, &p, r);
    energies(f, x, NCH, NULL, e, NULL);
    for (int i = 0; i < NCH; i++) assert_true(e[i] < prev[i]);
    memcpy(prev, e, sizeof prev);
  }
  print_message("  energy of chain 0: %.4f -> %.4f after 5 steps\n", e0[0], e[0]);
  jem_ws_free(ws);
  free(x);
}

static void test_sgld_class_conditional(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *x = malloc(sizeof(float) * len);
  assert_non_null(x);
  const int y[NCH] = {1, 4, 4, 8};
  jem_rng r[NCH];
  seed_all(r, NCH, 6);
  jem_sgld_init_noise(x, NCH, f->chw, r);
  jem_sgld_params p = {.step_size = 0.01f, .noise = 0.0f, .clamp = 0};
  float f0[NCH], f1[NCH];
  energies(f, x, NCH, y, NULL, f0);
  jem_ws *ws = jem_ws_create(f->m, NCH, 0);
  assert_non_null(ws);
  jem_sgld_run(ws, f->m, x, NCH, y, 5, &p, r);
  jem_ws_free(ws);
  energies(f, x, NCH, y, NULL, f1);
  for (int i = 0; i < NCH; i++) assert_true(f1[i] > f0[i]);
  print_message("  f[y] of chain 0: %.4f -> %.4f\n", f0[0], f1[0]);
  free(x);
}

static void test_sgld_clamp(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *x = malloc(sizeof(float) * len);
  assert_non_null(x);
  /* large steps and noise leave [-1,1] without the clamp ... */
  jem_sgld_params p = {.step_size = 5.0f, .noise = 0.5f, .clamp = 0};
  sample(f, x, NCH, NULL, 3, &p, 8, NCH);
  int outside = 0;
  for (size_t j = 0; j < len; j++) outside += x[j] < -1.0f || x[j] > 1.0f;
  assert_true(outside > 0);
  /* ... and stay inside with it */
  p.clamp = 1;
  sample(f, x, NCH, NULL, 3, &p, 8, NCH);
  int at_bound = 0;
  for (size_t j = 0; j < len; j++) {
    assert_true(x[j] >= -1.0f && x[j] <= 1.0f);
    at_bound += x[j] == -1.0f || x[j] == 1.0f;
  }
  assert_true(at_bound > 0);
  free(x);
}

/* One step is exactly x + step_size * grad + noise * N(0,1) with the normals
 * of chain i drawn in order from rngs[i]. */
static void test_sgld_step_formula(void **state) {
  fixture *f = *state;
  size_t len = NCH * f->chw;
  float *x = malloc(sizeof(float) * len), *want = malloc(sizeof(float) * len),
        *g = malloc(sizeof(float) * len);
  assert_non_null(x);
  assert_non_null(want);
  assert_non_null(g);
  const int y[NCH] = {2, 2, 5, 0};
  for (int cond = 0; cond < 2; cond++) {
    jem_rng r[NCH], copy[NCH];
    seed_all(r, NCH, 21);
    jem_sgld_init_noise(x, NCH, f->chw, r);
    memcpy(copy, r, sizeof r);
    jem_sgld_params p = {.step_size = 0.7f, .noise = 0.05f, .clamp = 0};
    jem_ws *ws = jem_ws_create(f->m, NCH, 0);
    assert_non_null(ws);
    jem_input_grad(ws, f->m, x, NCH, cond ? y : NULL, NULL, g);
    for (int i = 0; i < NCH; i++)
      for (size_t j = 0; j < f->chw; j++) {
        size_t o = (size_t)i * f->chw + j;
        want[o] = x[o] + p.step_size * g[o] + p.noise * jem_rng_normal(&copy[i]);
      }
    jem_sgld_run(ws, f->m, x, NCH, cond ? y : NULL, 1, &p, r);
    jem_ws_free(ws);
    assert_true(max_abs_diff(x, want, len) <= 1e-6f);
    /* the streams advanced by exactly one normal per pixel */
    for (int i = 0; i < NCH; i++)
      assert_int_equal(jem_rng_u32(&r[i]), jem_rng_u32(&copy[i]));
  }
  free(x);
  free(want);
  free(g);
}

static void test_sgld_zero_steps(void **state) {
  fixture *f = *state;
  size_t len = 2 * f->chw;
  float *x = malloc(sizeof(float) * len), *x0 = malloc(sizeof(float) * len);
  assert_non_null(x);
  assert_non_null(x0);
  jem_rng r[2];
  seed_all(r, 2, 9);
  jem_sgld_init_noise(x, 2, f->chw, r);
  memcpy(x0, x, sizeof(float) * len);
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  jem_ws *ws = jem_ws_create(f->m, 2, 0);
  assert_non_null(ws);
  jem_sgld_run(ws, f->m, x, 2, NULL, 0, &p, r);
  assert_memory_equal(x, x0, sizeof(float) * len);
  jem_sgld_run(ws, f->m, x, 0, NULL, 3, &p, r);
  assert_memory_equal(x, x0, sizeof(float) * len);
  jem_ws_free(ws);
  free(x);
  free(x0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_rng_reproducible),
    cmocka_unit_test(test_rng_streams_distinct),
    cmocka_unit_test(test_rng_distributions),
    cmocka_unit_test(test_init_noise),
    cmocka_unit_test(test_init_buffer),
    cmocka_unit_test(test_init_buffer_by_class),
    cmocka_unit_test(test_sgld_defaults),
    cmocka_unit_test(test_sgld_deterministic),
    cmocka_unit_test(test_sgld_batching_independent),
    cmocka_unit_test(test_sgld_energy_decreases),
    cmocka_unit_test(test_sgld_class_conditional),
    cmocka_unit_test(test_sgld_clamp),
    cmocka_unit_test(test_sgld_step_formula),
    cmocka_unit_test(test_sgld_zero_steps),
  };
  return cmocka_run_group_tests_name("sgld", tests, setup, teardown);
}
