/* test_ood.c - in-distribution percentiles, the OOD verdict rule for each side,
 * NaN handling, models without statistics, and the "ood" metadata parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jem.h"
#include "metrics.h"

#define NEAR(a, b) assert_true(fabs((double)(a) - (double)(b)) < 1e-6)

static void test_score_names(void **state) {
  (void)state;
  assert_string_equal(jem_score_names[JEM_SCORE_ENERGY], "energy");
  assert_string_equal(jem_score_names[JEM_SCORE_GRAD_NORM], "grad_norm");
  assert_string_equal(jem_score_names[JEM_SCORE_MAX_SOFTMAX], "max_softmax");
}

static void test_percentile_basic(void **state) {
  (void)state;
  const float q[5] = {0, 1, 2, 3, 4}; /* probabilities 0, .25, .5, .75, 1 */
  NEAR(jem_ood_percentile(q, 5, -1.0f), 0.0);
  NEAR(jem_ood_percentile(q, 5, 0.0f), 0.0);
  NEAR(jem_ood_percentile(q, 5, 0.5f), 0.125);
  NEAR(jem_ood_percentile(q, 5, 2.0f), 0.5);
  NEAR(jem_ood_percentile(q, 5, 3.5f), 0.875);
  NEAR(jem_ood_percentile(q, 5, 4.0f), 1.0);
  NEAR(jem_ood_percentile(q, 5, 9.0f), 1.0);
  NEAR(jem_ood_percentile(q, 5, INFINITY), 1.0);
  NEAR(jem_ood_percentile(q, 5, -INFINITY), 0.0);
  assert_true(isnan(jem_ood_percentile(q, 5, NAN)));
  assert_true(isnan(jem_ood_percentile(q, 1, 0.0f)));
  assert_true(isnan(jem_ood_percentile(NULL, 5, 0.0f)));
  /* uneven spacing: interpolation is within the bracketing pair */
  const float u[3] = {-10, 0, 100};
  NEAR(jem_ood_percentile(u, 3, -5.0f), 0.25);
  NEAR(jem_ood_percentile(u, 3, 50.0f), 0.75);
  /* extreme values do not overflow the interpolation */
  const float w[2] = {-3e38f, 3e38f};
  NEAR(jem_ood_percentile(w, 2, 0.0f), 0.5);
}

static void test_percentile_ties_monotone(void **state) {
  (void)state;
  const float q[5] = {0, 1, 1, 1, 2};
  NEAR(jem_ood_percentile(q, 5, 1.0f), 0.5); /* mid-rank of the tied run */
  NEAR(jem_ood_percentile(q, 5, 0.5f), 0.125);
  NEAR(jem_ood_percentile(q, 5, 1.5f), 0.875);
  const float flat[3] = {1, 1, 1};
  NEAR(jem_ood_percentile(flat, 3, 1.0f), 0.5);
  NEAR(jem_ood_percentile(flat, 3, 0.999f), 0.0);
  NEAR(jem_ood_percentile(flat, 3, 1.001f), 1.0);
  const float top[4] = {0.2f, 0.9f, 1, 1}; /* saturated max_softmax */
  NEAR(jem_ood_percentile(top, 4, 1.0f), 5.0 / 6.0);

  /* sweep: non-decreasing and within [0,1] */
  const float r[7] = {-2, -1, -1, 0, 0.5f, 0.5f, 3};
  float prev = -1.0f;
  for (int i = 0; i <= 2000; i++) {
    float v = -3.0f + 7.0f * (float)i / 2000.0f;
    float p = jem_ood_percentile(r, 7, v);
    assert_true(p >= 0.0f && p <= 1.0f);
    if (p < prev) fail_msg("not monotone at %g: %g < %g", (double)v, (double)p, (double)prev);
    prev = p;
  }
}

/* Quantiles 0, 0.01, ..., 1 make a value its own percentile. */
static void identity_stats(jem_ood_stats *s, int se, int sg, int sm) {
  memset(s, 0, sizeof *s);
  s->present = 1;
  s->default_tpr = 0.95f;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    s->nq[k] = 101;
    for (int i = 0; i <= 100; i++) s->q[k][i] = (float)i / 100.0f;
  }
  s->side[JEM_SCORE_ENERGY] = se;
  s->side[JEM_SCORE_GRAD_NORM] = sg;
  s->side[JEM_SCORE_MAX_SOFTMAX] = sm;
}

static int verdict(const jem_ood_stats *s, float e, float g, float m, float tpr) {
  float v[JEM_NUM_SCORES] = {e, g, m};
  jem_ood_result r;
  jem_ood_eval(s, v, tpr, &r);
  return r.is_ood;
}

static void test_verdict_sides(void **state) {
  (void)state;
  jem_ood_stats *s = malloc(sizeof *s);
  /* one high-side score: t' = tpr */
  identity_stats(s, 1, 0, 0);
  assert_int_equal(verdict(s, 0.96f, 0.99f, 0.001f, 0.95f), 1);
  assert_int_equal(verdict(s, 0.94f, 0.99f, 0.001f, 0.95f), 0); /* unused scores ignored */
  assert_int_equal(verdict(s, 0.01f, 0.5f, 0.5f, 0.95f), 0);    /* low values fine */
  assert_int_equal(verdict(s, 0.94f, 0.5f, 0.5f, 0.90f), 1);    /* tpr per call */
  /* low side */
  identity_stats(s, -1, 0, 0);
  assert_int_equal(verdict(s, 0.04f, 0, 0, 0.95f), 1);
  assert_int_equal(verdict(s, 0.06f, 0, 0, 0.95f), 0);
  assert_int_equal(verdict(s, 0.99f, 0, 0, 0.95f), 0);
  /* two-sided: tails of 0.025 each */
  identity_stats(s, 2, 0, 0);
  assert_int_equal(verdict(s, 0.02f, 0, 0, 0.95f), 1);
  assert_int_equal(verdict(s, 0.03f, 0, 0, 0.95f), 0);
  assert_int_equal(verdict(s, 0.97f, 0, 0, 0.95f), 0);
  assert_int_equal(verdict(s, 0.98f, 0, 0, 0.95f), 1);
  /* three scores used: t' = 1 - 0.05/3 = 0.98333 */
  identity_stats(s, 1, 2, -1);
  assert_int_equal(verdict(s, 0.98f, 0.5f, 0.5f, 0.95f), 0);
  assert_int_equal(verdict(s, 0.99f, 0.5f, 0.5f, 0.95f), 1);
  assert_int_equal(verdict(s, 0.5f, 0.005f, 0.5f, 0.95f), 1);  /* below 0.00833 */
  assert_int_equal(verdict(s, 0.5f, 0.01f, 0.5f, 0.95f), 0);
  assert_int_equal(verdict(s, 0.5f, 0.995f, 0.5f, 0.95f), 1); /* above 0.99167 */
  assert_int_equal(verdict(s, 0.5f, 0.99f, 0.5f, 0.95f), 0);
  assert_int_equal(verdict(s, 0.5f, 0.5f, 0.01f, 0.95f), 1);  /* below 0.01667 */
  assert_int_equal(verdict(s, 0.5f, 0.5f, 0.02f, 0.95f), 0);
  free(s);
}

static void test_verdict_nan_and_tpr(void **state) {
  (void)state;
  jem_ood_stats *s = malloc(sizeof *s);
  identity_stats(s, 1, 2, -1);
  float v[JEM_NUM_SCORES] = {0.98f, NAN, 0.5f};
  jem_ood_result r;
  /* grad skipped: two scores used, t' = 0.975, so 0.98 is now OOD */
  jem_ood_eval(s, v, 0.95f, &r);
  assert_int_equal(r.is_ood, 1);
  assert_true(isnan(r.percentile[JEM_SCORE_GRAD_NORM]));
  assert_true(isnan(r.value[JEM_SCORE_GRAD_NORM]));
  NEAR(r.percentile[JEM_SCORE_ENERGY], 0.98);
  NEAR(r.tpr, 0.95);
  /* every used score missing: unknown */
  float allnan[JEM_NUM_SCORES] = {NAN, NAN, NAN};
  jem_ood_eval(s, allnan, 0.95f, &r);
  assert_int_equal(r.is_ood, -1);
  /* an unused score still gets its percentile */
  identity_stats(s, 1, 0, 0);
  float w[JEM_NUM_SCORES] = {0.2f, 0.7f, 0.3f};
  jem_ood_eval(s, w, 0.95f, &r);
  NEAR(r.percentile[JEM_SCORE_GRAD_NORM], 0.7);
  assert_int_equal(r.is_ood, 0);
  /* invalid tpr falls back to the model's default */
  s->default_tpr = 0.8f;
  float hi[JEM_NUM_SCORES] = {0.85f, 0, 0};
  jem_ood_eval(s, hi, 0.0f, &r);
  NEAR(r.tpr, 0.8);
  assert_int_equal(r.is_ood, 1);
  jem_ood_eval(s, hi, NAN, &r);
  NEAR(r.tpr, 0.8);
  jem_ood_eval(s, hi, 1.5f, &r);
  NEAR(r.tpr, 0.8);
  jem_ood_eval(s, hi, 0.9f, &r);
  assert_int_equal(r.is_ood, 0);
  /* no quantiles for a used score: left out */
  identity_stats(s, 1, 1, 0);
  s->nq[JEM_SCORE_GRAD_NORM] = 0;
  float g[JEM_NUM_SCORES] = {0.5f, 1e9f, 0.5f};
  jem_ood_eval(s, g, 0.95f, &r);
  assert_int_equal(r.is_ood, 0);
  assert_true(isnan(r.percentile[JEM_SCORE_GRAD_NORM]));
  free(s);
}

static void test_no_stats(void **state) {
  (void)state;
  jem_ood_stats *s = calloc(1, sizeof *s);
  float v[JEM_NUM_SCORES] = {-3.0f, 0.5f, 0.9f};
  jem_ood_result r;
  jem_ood_eval(s, v, 0.95f, &r);
  assert_int_equal(r.is_ood, -1);
  for (int i = 0; i < JEM_NUM_SCORES; i++) {
    assert_true(isnan(r.percentile[i]));
    assert_true(r.value[i] == v[i]);
  }
  NEAR(r.tpr, 0.95);
  jem_ood_eval(NULL, v, 0.5f, &r);
  assert_int_equal(r.is_ood, -1);
  NEAR(r.tpr, 0.5);
  jem_ood_eval(NULL, v, -1.0f, &r);
  NEAR(r.tpr, 0.95);
  free(s);
}

/* A rule that needs the gradient switches to the no-gradient rule when the
 * gradient score is missing, and says which rule it applied. */
static void test_verdict_nograd_rule(void **state) {
  (void)state;
  jem_ood_stats *s = malloc(sizeof *s);
  identity_stats(s, 0, -1, 0); /* main rule: grad_norm low alone */
  strcpy(s->rule, "main");
  jem_ood_result r;
  /* no fallback stored: the verdict is unknown without the gradient */
  float v[JEM_NUM_SCORES] = {0.99f, NAN, 0.5f};
  jem_ood_eval(s, v, 0.95f, &r);
  assert_int_equal(r.is_ood, -1);
  assert_string_equal(r.rule, "main");
  /* fallback: energy high */
  s->has_nograd = 1;
  s->side_nograd[JEM_SCORE_ENERGY] = 1;
  strcpy(s->rule_nograd, "nograd");
  jem_ood_eval(s, v, 0.95f, &r);
  assert_int_equal(r.is_ood, 1);
  assert_string_equal(r.rule, "nograd");
  v[0] = 0.9f;
  jem_ood_eval(s, v, 0.95f, &r);
  assert_int_equal(r.is_ood, 0);
  NEAR(jem_ood_rule_stat(s, v), 0.1);
  /* with the gradient the main rule applies, and energy is not used */
  float w[JEM_NUM_SCORES] = {0.99f, 0.5f, 0.5f};
  jem_ood_eval(s, w, 0.95f, &r);
  assert_int_equal(r.is_ood, 0);
  assert_string_equal(r.rule, "main");
  w[1] = 0.01f;
  jem_ood_eval(s, w, 0.95f, &r);
  assert_int_equal(r.is_ood, 1);
  NEAR(jem_ood_rule_stat(s, w), 0.01);
  /* a main rule without the gradient never switches */
  identity_stats(s, 1, 0, 0);
  s->has_nograd = 1;
  s->side_nograd[JEM_SCORE_MAX_SOFTMAX] = -1;
  float x[JEM_NUM_SCORES] = {0.5f, NAN, 0.01f};
  jem_ood_eval(s, x, 0.95f, &r);
  assert_int_equal(r.is_ood, 0);
  assert_ptr_equal(r.rule, s->rule);
  free(s);
}

/* The metadata parser fills jem_ood_stats, which then drives verdicts. */
static void test_meta_ood(void **state) {
  (void)state;
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  assert_int_equal(m->ood.present, 0);
  json_t *ood = json_loads(
      "{\"scores\": {\"energy\": {\"quantiles\": [-6, -5, -4, -3, -2], \"side\": \"high\"},"
      " \"grad_norm\": {\"quantiles\": [0.5, 1, 2], \"side\": \"two-sided\"}},"
      " \"tpr\": 0.9}",
      0, NULL);
  assert_non_null(ood);
  json_object_set_new(m->meta, "ood", ood);
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_int_equal(m->ood.present, 1);
  assert_int_equal(m->ood.nq[JEM_SCORE_ENERGY], 5);
  assert_int_equal(m->ood.nq[JEM_SCORE_GRAD_NORM], 3);
  assert_int_equal(m->ood.nq[JEM_SCORE_MAX_SOFTMAX], 0);
  assert_int_equal(m->ood.side[JEM_SCORE_GRAD_NORM], 2);
  assert_true(m->ood.default_tpr == 0.9f);
  assert_non_null(strstr(m->ood.rule, "energy high"));
  assert_non_null(strstr(m->ood.rule, "grad_norm two-sided"));

  float v[JEM_NUM_SCORES] = {-4.0f, 1.0f, 0.9f};
  jem_ood_result r;
  jem_ood_eval(&m->ood, v, 0.0f, &r); /* 0 -> the model's tpr */
  NEAR(r.tpr, 0.9);
  NEAR(r.percentile[JEM_SCORE_ENERGY], 0.5);
  NEAR(r.percentile[JEM_SCORE_GRAD_NORM], 0.5);
  assert_true(isnan(r.percentile[JEM_SCORE_MAX_SOFTMAX]));
  assert_int_equal(r.is_ood, 0);
  v[0] = -2.1f; /* percentile 0.975 > t' = 0.95 */
  jem_ood_eval(&m->ood, v, 0.0f, &r);
  assert_int_equal(r.is_ood, 1);

  /* a bad edit leaves the previous statistics in place */
  json_object_set_new(json_object_get(json_object_get(json_object_get(m->meta, "ood"), "scores"),
                                      "energy"),
                      "side", json_string("sideways"));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "ood.scores.energy.side"));
  assert_int_equal(m->ood.present, 1);
  json_object_del(m->meta, "ood");
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_int_equal(m->ood.present, 0);

  /* the no-gradient rule: sides per score, and its description */
  ood = json_loads(
      "{\"scores\": {\"energy\": {\"quantiles\": [-6, -5, -4, -3, -2], \"side\": \"unused\","
      " \"side_nograd\": \"high\"},"
      " \"grad_norm\": {\"quantiles\": [0.5, 1, 2], \"side\": \"low\","
      " \"side_nograd\": \"unused\"}},"
      " \"rule\": \"grad rule\", \"rule_nograd\": \"energy rule\"}",
      0, NULL);
  assert_non_null(ood);
  json_object_set_new(m->meta, "ood", ood);
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_int_equal(m->ood.has_nograd, 1);
  assert_int_equal(m->ood.side_nograd[JEM_SCORE_ENERGY], 1);
  assert_string_equal(m->ood.rule_nograd, "energy rule");
  float nv[JEM_NUM_SCORES] = {-2.1f, NAN, 0.5f};
  jem_ood_eval(&m->ood, nv, 0.95f, &r);
  assert_int_equal(r.is_ood, 1);
  assert_string_equal(r.rule, "energy rule");
  /* without a stored description one is made from the sides */
  json_object_del(json_object_get(m->meta, "ood"), "rule_nograd");
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(m->ood.rule_nograd, "energy high"));
  /* bad side, and a description without sides, are refused */
  json_t *en = json_object_get(json_object_get(json_object_get(m->meta, "ood"), "scores"),
                               "energy");
  json_object_set_new(en, "side_nograd", json_integer(3));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "ood.scores.energy.side_nograd"));
  json_object_del(en, "side_nograd");
  json_object_del(json_object_get(json_object_get(json_object_get(m->meta, "ood"), "scores"),
                                  "grad_norm"), "side_nograd");
  json_object_set_new(json_object_get(m->meta, "ood"), "rule_nograd", json_string("x"));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "rule_nograd"));
  jem_model_free(m);
}

/* The compressed length orders images by complexity, is deterministic, and
 * feeds energy_complexity only when the model has a weight; the weight is
 * checked when the metadata is applied. */
static void test_complexity(void **state) {
  (void)state;
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  enum { N = 32 * 32 };
  static float flat[N], stroke[N], noise[N];
  uint64_t r = 12345;
  for (int i = 0; i < N; i++) {
    flat[i] = -1.0f;
    stroke[i] = (i % 32 == 16 || i / 32 == 16) ? 1.0f : -1.0f; /* a cross on black */
    r = r * 6364136223846793005ull + 1442695040888963407ull;
    noise[i] = (float)((r >> 40) & 0xffff) / 32768.0f - 1.0f;
  }
  const float bf = jem_input_complexity_bits(m, flat);
  const float bs = jem_input_complexity_bits(m, stroke);
  const float bn = jem_input_complexity_bits(m, noise);
  assert_true(bf > 0.0f && bf < bs && bs < bn);
  assert_true(bn > 8.0f * N * 0.9f); /* noise barely compresses */
  assert_true(jem_input_complexity_bits(m, noise) == bn);
  /* values outside the range are clamped, not wrapped */
  static float big[N], white[N];
  for (int i = 0; i < N; i++) {
    big[i] = i % 2 ? 5.0f : -7.0f;
    white[i] = i % 2 ? 1.0f : -1.0f;
  }
  assert_true(jem_input_complexity_bits(m, big) == jem_input_complexity_bits(m, white));

  assert_true(isnan(m->ood.complexity_weight));
  assert_true(isnan(jem_energy_complexity(m, -10.0f, bs)));
  json_t *ood = json_loads(
      "{\"scores\": {\"energy_complexity\": {\"quantiles\": [-30, -20, -10], \"side\": \"high\"}},"
      " \"complexity_weight\": 0.01}", 0, NULL);
  json_object_set_new(m->meta, "ood", ood);
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  NEAR(m->ood.complexity_weight, 0.01);
  NEAR(jem_energy_complexity(m, -10.0f, 1000.0f), -20.0);
  assert_non_null(strstr(m->ood.rule, "energy_complexity high"));

  /* jem_score_batch fills it for a batch, from the same lengths */
  jem_ws *ws = jem_ws_create(m, 2, 0);
  assert_non_null(ws);
  static float x2[2 * N];
  memcpy(x2, flat, sizeof flat);
  memcpy(x2 + N, noise, sizeof noise);
  float en[2], ec[2];
  jem_scores sc = {.score[JEM_SCORE_ENERGY] = en, .score[JEM_SCORE_ENERGY_COMPLEXITY] = ec};
  jem_score_batch(ws, m, x2, 2, 0, &sc);
  assert_true(fabs((double)ec[0] - ((double)en[0] - 0.01 * bf)) < 1e-3);
  assert_true(fabs((double)ec[1] - ((double)en[1] - 0.01 * bn)) < 1e-3);
  jem_ws_free(ws);

  /* a negative weight, and quantiles without a weight, are refused by name */
  json_object_set_new(json_object_get(m->meta, "ood"), "complexity_weight", json_real(-1.0));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "ood.complexity_weight"));
  json_object_del(json_object_get(m->meta, "ood"), "complexity_weight");
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "needs ood.complexity_weight"));
  NEAR(m->ood.complexity_weight, 0.01); /* the last good metadata stays */
  jem_model_free(m);
}

/* The feature Gaussian: jem_model_fit_feature_gauss against a direct
 * double-precision fit (W Sigma W^T = I, W lower triangular, the distances
 * equal (f - mean_k)^T Sigma^-1 (f - mean_k) by an independent solve); the
 * score is the nearest class's distance, the same with and without the
 * gradient, NaN without a Gaussian; it survives a save and load; bad
 * tensors and metadata are refused by name. */
static void test_feature_gauss(void **state) {
  (void)state;
  jem_arch a = {10, 1, 1, 32, 3, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  jem_model_init_random(m, 5);
  enum { F = 64, K = 3, N = 600 };
  static float feat[N * F];
  static int y[N];
  uint64_t r = 99;
  for (int i = 0; i < N; i++) {
    y[i] = i % K;
    double common = 0;
    for (int j = 0; j < F; j++) {
      r = r * 6364136223846793005ull + 1442695040888963407ull;
      double u = (double)((r >> 40) & 0xffff) / 65536.0 - 0.5;
      if (j == 0) common = u;
      feat[i * F + j] = (float)(u * (1 + j % 5) + 0.7 * common + (j == y[i]) * 2.0);
    }
  }
  assert_int_equal(jem_model_fit_feature_gauss(m, feat, y, N, err, sizeof err), 0);
  /* the reference covariance, with the same relative ridge */
  static double mean[K][F], cov[F][F];
  int cnt[K] = {0};
  for (int i = 0; i < N; i++) {
    cnt[y[i]]++;
    for (int j = 0; j < F; j++) mean[y[i]][j] += feat[i * F + j];
  }
  for (int k = 0; k < K; k++)
    for (int j = 0; j < F; j++) mean[k][j] /= cnt[k];
  for (int i = 0; i < N; i++)
    for (int p = 0; p < F; p++)
      for (int q = 0; q < F; q++)
        cov[p][q] += (feat[i * F + p] - mean[y[i]][p]) * (feat[i * F + q] - mean[y[i]][q]) / N;
  double tr = 0;
  for (int p = 0; p < F; p++) tr += cov[p][p];
  for (int p = 0; p < F; p++) cov[p][p] += 1e-6 * tr / F;
  for (int k = 0; k < K; k++)
    for (int j = 0; j < F; j++) assert_true(fabs(m->feat_mean[k * F + j] - mean[k][j]) < 1e-5);
  const float *W = m->feat_whiten;
  for (int p = 0; p < F; p++) {
    assert_true(W[p * F + p] > 0);
    for (int q = p + 1; q < F; q++) assert_true(W[p * F + q] == 0.0f);
  }
  double worst = 0; /* W Sigma W^T = I */
  for (int p = 0; p < F; p++)
    for (int q = 0; q < F; q++) {
      double v = 0;
      for (int i = 0; i < F; i++)
        for (int j = 0; j < F; j++) v += W[p * F + i] * cov[i][j] * W[q * F + j];
      worst = fmax(worst, fabs(v - (p == q)));
    }
  assert_true(worst < 1e-3);

  /* scores of random inputs: the nearest class mean under Sigma^-1, by
   * Gaussian elimination on Sigma (no whitener involved) */
  enum { B = 3 };
  const size_t css = 32 * 32;
  static float x[B * 32 * 32];
  for (size_t i = 0; i < B * css; i++) {
    r = r * 6364136223846793005ull + 1442695040888963407ull;
    x[i] = (float)((r >> 40) & 0xffff) / 32768.0f - 1.0f;
  }
  jem_ws *ws = jem_ws_create(m, B, 0);
  float lg[B * K], d0[B], d1[B];
  jem_forward(ws, m, x, B, lg);
  static float f[B * F];
  memcpy(f, jem_ws_features(ws), sizeof f);
  jem_scores sc = {.score[JEM_SCORE_MAHALANOBIS] = d0};
  jem_score_batch(ws, m, x, B, 0, &sc);
  sc.score[JEM_SCORE_MAHALANOBIS] = d1;
  jem_score_batch(ws, m, x, B, 1, &sc);
  for (int i = 0; i < B; i++) {
    double best = INFINITY;
    for (int k = 0; k < K; k++) {
      static double A[F][F + 1];
      for (int p = 0; p < F; p++) {
        for (int q = 0; q < F; q++) A[p][q] = cov[p][q];
        A[p][F] = f[i * F + p] - mean[k][p];
      }
      for (int c = 0; c < F; c++) /* no pivoting needed: SPD */
        for (int p = c + 1; p < F; p++) {
          double t = A[p][c] / A[c][c];
          for (int q = c; q <= F; q++) A[p][q] -= t * A[c][q];
        }
      double sol[F], d = 0;
      for (int p = F - 1; p >= 0; p--) {
        double v = A[p][F];
        for (int q = p + 1; q < F; q++) v -= A[p][q] * sol[q];
        sol[p] = v / A[p][p];
        d += sol[p] * (f[i * F + p] - mean[k][p]);
      }
      best = fmin(best, d);
    }
    assert_true(fabs(d0[i] - best) <= 1e-3 * fmax(1.0, best));
    assert_true(d0[i] == d1[i]);
  }

  /* a save and a load keep it bit for bit */
  char path[] = "/tmp/jem-test-fgXXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
  assert_int_equal(jem_model_save(m, path, err, sizeof err), 0);
  jem_model *m2 = NULL;
  assert_int_equal(jem_model_load(&m2, path, err, sizeof err), 0);
  assert_memory_equal(m2->feat_mean, m->feat_mean, sizeof(float) * K * F);
  assert_memory_equal(m2->feat_whiten, m->feat_whiten, sizeof(float) * F * F);
  jem_model_free(m2);

  /* metadata with a mahalanobis band needs the tensors */
  json_object_set_new(m->meta, "ood", json_loads(
      "{\"scores\": {\"mahalanobis\": {\"quantiles\": [1, 2, 3], \"side\": \"high\"}}}", 0, NULL));
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(m->ood.rule, "mahalanobis high"));
  assert_int_equal(jem_model_set_feature_gauss(m, NULL, NULL, err, sizeof err), 0);
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "ood.feature_mean"));
  /* without a Gaussian the score is NaN */
  jem_score_batch(ws, m, x, B, 0, &sc);
  for (int i = 0; i < B; i++) assert_true(isnan(d1[i]));
  /* a whitener that is not lower triangular, and fits that cannot work */
  static float bad[F * F];
  for (int p = 0; p < F; p++) bad[p * F + p] = 1.0f;
  bad[1] = 0.5f;
  assert_int_not_equal(jem_model_set_feature_gauss(m, feat, bad, err, sizeof err), 0);
  assert_non_null(strstr(err, "lower triangular"));
  y[0] = K;
  assert_int_not_equal(jem_model_fit_feature_gauss(m, feat, y, N, err, sizeof err), 0);
  assert_non_null(strstr(err, "label"));
  for (int i = 0; i < N; i++) y[i] = 0;
  assert_int_not_equal(jem_model_fit_feature_gauss(m, feat, y, N, err, sizeof err), 0);
  assert_non_null(strstr(err, "no image of class 1"));
  jem_ws_free(ws);
  jem_model_free(m);
  unlink(path);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_score_names),
      cmocka_unit_test(test_percentile_basic),
      cmocka_unit_test(test_percentile_ties_monotone),
      cmocka_unit_test(test_verdict_sides),
      cmocka_unit_test(test_verdict_nan_and_tpr),
      cmocka_unit_test(test_no_stats),
      cmocka_unit_test(test_verdict_nograd_rule),
      cmocka_unit_test(test_meta_ood),
      cmocka_unit_test(test_complexity),
      cmocka_unit_test(test_feature_gauss),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
