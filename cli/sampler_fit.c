/* sampler_fit.c - `jem calibrate`'s choice, by measurement, of the SGLD
 * settings that suit a model (metadata "sampler", the default of sample jobs
 * and `jem sample`).
 *
 * Criterion.  For each candidate step size (1, 0.3, 0.1, 0.03; noise 0.01,
 * 100 steps unless --sampler-steps says otherwise, clamped, as a job would
 * run them) K x c class-conditional chains
 * start as jobs start them and run; then
 *   confident = the fraction of samples the model itself classifies as the
 *               requested class with tempered confidence >= 0.9;
 *   r         = h(samples) / h(validation images), h the mean squared
 *               difference of horizontally and vertically adjacent pixels:
 *               the high-frequency energy that stripe artefacts add (too
 *               large a step) and that blur removes (too small a step);
 *   score     = confident * min(r, 1/r).
 * The highest score wins; ties go to the larger step, which mixes faster.
 * Class agreement alone cannot choose: chains start from buffer images the
 * model already assigns to their class, so every step size keeps them. */
#include "cli.h"
#include "jem.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIT_CONFIDENCE 0.9
#define FIT_SEED 1u
static const double fit_step_sizes[] = {1.0, 0.3, 0.1, 0.03};
#define FIT_NCAND ((int)(sizeof fit_step_sizes / sizeof fit_step_sizes[0]))

/* Mean squared difference of adjacent pixels (both directions) of n images. */
static double hf_energy(const float *x, int n, int C, int S) {
  double sum = 0.0;
  for (size_t p = 0; p < (size_t)n * C; p++) {
    const float *img = x + p * S * S;
    for (int i = 0; i < S; i++)
      for (int j = 0; j + 1 < S; j++) {
        double dh = img[i * S + j + 1] - img[i * S + j];
        double dv = img[(j + 1) * S + i] - img[j * S + i];
        sum += dh * dh + dv * dv;
      }
  }
  return sum / ((double)n * C * 2.0 * S * (S - 1));
}

int cli_fit_sampler(jem_model *m, jem_ws *ws, const float *ref, int n_ref, int per_class,
                    int steps, char *err, size_t errlen) {
  const int K = m->arch.num_classes, C = m->arch.in_channels, S = m->arch.image_size;
  const int n = K * per_class;
  const size_t chw = (size_t)C * S * S;
  float *x = malloc(sizeof(float) * (size_t)n * chw);
  float *logits = malloc(sizeof(float) * (size_t)n * K);
  float *conf = malloc(sizeof(float) * (size_t)n);
  int *label = malloc(sizeof(int) * (size_t)n), *ys = malloc(sizeof(int) * (size_t)n);
  jem_rng *rngs = malloc(sizeof(jem_rng) * (size_t)n);
  json_t *cands = json_array();
  int rc = 1;
  if (!x || !logits || !conf || !label || !ys || !rngs || !cands) {
    snprintf(err, errlen, "out of memory for %d sampler chains", n);
    goto done;
  }
  const int init = jem_sample_default_init(m);
  /* class-conditional chains start from buffer images of their class, as in jobs */
  if (init == JEM_SAMPLE_INIT_BUFFER && !m->replay_order && jem_replay_label(m, ws)) {
    snprintf(err, errlen, "out of memory labelling the replay buffer");
    goto done;
  }
  for (int i = 0; i < n; i++) ys[i] = i % K;
  const double h_ref = hf_energy(ref, n_ref, C, S);
  jem_sgld_params best;
  jem_sgld_defaults(&best);
  double best_score = -1.0;
  for (int c = 0; c < FIT_NCAND; c++) {
    jem_sgld_params p;
    jem_sgld_defaults(&p);
    p.step_size = (float)fit_step_sizes[c];
    jem_sample_init(m, x, n, init, ys, FIT_SEED, rngs);
    jem_sgld_run(ws, m, x, n, ys, steps, &p, rngs);
    const jem_scores sc = {.logits = logits, .label = label, .confidence = conf};
    jem_score_batch(ws, m, x, n, 0, &sc);
    int ok = 0;
    for (int i = 0; i < n; i++) ok += label[i] == ys[i] && conf[i] >= (float)FIT_CONFIDENCE;
    const double confident = (double)ok / n, r = hf_energy(x, n, C, S) / h_ref;
    const double score = isfinite(r) && r > 0 ? confident * fmin(r, 1.0 / r) : 0.0;
    fprintf(stderr, "jem calibrate: sampler step size %g: %.1f%% confident, high-frequency "
            "energy %.2fx the data's, score %.3f\n", (double)p.step_size, 100 * confident, r,
            score);
    json_array_append_new(cands, json_pack("{s:f,s:f,s:f,s:f}", "step_size",
                                           fit_step_sizes[c], "confident", confident,
                                           "hf_ratio", isfinite(r) ? r : -1.0, "score", score));
    if (score > best_score) {
      best_score = score;
      best = p;
    }
  }
  jem_sampler s = {.from_model = 1, .sgld = best, .steps = steps};
  json_t *block = jem_sampler_to_json(&s);
  json_object_del(block, "source");
  json_t *cal = json_pack(
      "{s:s,s:i,s:i,s:f,s:f,s:o}", "criterion",
      "score = (fraction of class-conditional samples the model classifies as their class "
      "with confidence >= 0.9) * min(r, 1/r), r = high-frequency energy (mean squared "
      "adjacent-pixel difference) of the samples over the validation images'; highest wins",
      "chains_per_class", per_class, "seed", (int)FIT_SEED, "confidence", FIT_CONFIDENCE,
      "hf_validation", h_ref, "candidates", cands);
  cands = NULL;
  if (!block || !cal) {
    json_decref(block);
    json_decref(cal);
    snprintf(err, errlen, "out of memory");
    goto done;
  }
  if (json_object_set_new(block, "calibration", cal) ||
      json_object_set_new(m->meta, "sampler", block)) {
    snprintf(err, errlen, "out of memory");
    goto done;
  }
  fprintf(stderr, "jem calibrate: sampler: step size %g, noise %g, %d steps, clamp on\n",
          (double)best.step_size, (double)best.noise, steps);
  rc = 0;
done:
  json_decref(cands);
  free(x);
  free(logits);
  free(conf);
  free(label);
  free(ys);
  free(rngs);
  return rc;
}
