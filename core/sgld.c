/* sgld.c - JEM's SGLD sampler: chain initialisation and Langevin steps. */
#include "internal.h"

#include <stdlib.h>

void jem_sgld_defaults(jem_sgld_params *p) {
  JEM_ASSERT(p);
  p->step_size = 1.0f;
  p->noise = 0.01f;
  p->clamp = 1; /* samples are images: keep them in the model's input range */
}

static size_t model_chw(const jem_model *m) {
  return (size_t)m->arch.in_channels * (size_t)m->arch.image_size *
         (size_t)m->arch.image_size;
}

static void fill_noise(float *x, size_t chw, jem_rng *r) {
  for (size_t j = 0; j < chw; j++) x[j] = 2.0f * jem_rng_uniform(r) - 1.0f;
}

void jem_sgld_init_noise(float *x, int n, size_t chw, jem_rng *rngs) {
  JEM_ASSERT(n >= 0 && (n == 0 || (x && rngs)));
  for (int i = 0; i < n; i++) fill_noise(x + (size_t)i * chw, chw, &rngs[i]);
}

void jem_sgld_init_buffer(const jem_model *m, float *x, int n, float reinit,
                          const int *y, jem_rng *rngs) {
  JEM_ASSERT(m && n >= 0 && (n == 0 || (x && rngs)));
  const size_t chw = model_chw(m);
  const int have = m->replay != NULL && m->replay_n > 0;
  for (int i = 0; i < n; i++) {
    jem_rng *r = &rngs[i];
    float *xi = x + (size_t)i * chw;
    /* Each chain draws its own decision and index from its own stream, so
     * chain i starts the same way however many chains run beside it. */
    float u = jem_rng_uniform(r);
    if (!have || u < reinit) {
      fill_noise(xi, chw, r);
      continue;
    }
    /* Candidates: the images of class y[i] when the buffer is labelled and
     * has some, else the whole buffer. */
    int first = 0, count = m->replay_n;
    const int *order = NULL;
    if (y && m->replay_first && y[i] >= 0 && y[i] < m->arch.num_classes &&
        m->replay_first[y[i] + 1] > m->replay_first[y[i]]) {
      first = m->replay_first[y[i]];
      count = m->replay_first[y[i] + 1] - first;
      order = m->replay_order;
    }
    /* Unbiased enough for buffers far below 2^32 images: multiply-shift. */
    int k = first + (int)(((uint64_t)jem_rng_u32(r) * (uint64_t)count) >> 32);
    if (order) k = order[k];
    const float *src = m->replay + (size_t)k * chw;
    for (size_t j = 0; j < chw; j++) xi[j] = src[j];
  }
}

int jem_replay_label(jem_model *m, jem_ws *ws) {
  JEM_ASSERT(m && ws);
  if (!m->replay || m->replay_n <= 0 || m->replay_first) return 0;
  const int n = m->replay_n, K = m->arch.num_classes;
  const int bmax = jem_ws_max_batch(ws);
  const size_t chw = model_chw(m);
  int *label = malloc(sizeof(int) * (size_t)n);
  int *order = malloc(sizeof(int) * (size_t)n);
  int *first = calloc((size_t)K + 1, sizeof(int));
  int *next = calloc((size_t)K, sizeof(int));
  float *logits = malloc(sizeof(float) * (size_t)bmax * (size_t)K);
  int rc = JEM_ENOMEM;
  if (!label || !order || !first || !next || !logits) goto done;
  /* labels by argmax: the same whatever batch size labels them */
  const int was = jem_ws_set_batch_invariant(ws, 1);
  for (int i0 = 0; i0 < n; i0 += bmax) {
    const int b = n - i0 < bmax ? n - i0 : bmax;
    jem_forward(ws, m, m->replay + (size_t)i0 * chw, b, logits);
    for (int i = 0; i < b; i++) {
      const float *z = logits + (size_t)i * K;
      int best = 0;
      for (int c = 1; c < K; c++)
        if (z[c] > z[best]) best = c;
      label[i0 + i] = best;
    }
  }
  jem_ws_set_batch_invariant(ws, was);
  /* counting sort, stable: class c's images in buffer order from first[c] */
  for (int i = 0; i < n; i++) first[label[i] + 1]++;
  for (int c = 0; c < K; c++) first[c + 1] += first[c];
  for (int i = 0; i < n; i++) order[first[label[i]] + next[label[i]]++] = i;
  m->replay_order = order;
  m->replay_first = first;
  order = first = NULL;
  rc = 0;
done:
  free(label);
  free(order);
  free(first);
  free(next);
  free(logits);
  return rc;
}

void jem_sgld_update(float *x, const float *g, size_t chw, const jem_sgld_params *p,
                     jem_rng *rng) {
  const float alpha = p->step_size, sigma = p->noise;
  for (size_t j = 0; j < chw; j++) {
    /* The normal is drawn even when sigma is 0 so that a stream's
     * position after a run depends only on the number of steps. */
    float v = x[j] + alpha * g[j] + sigma * jem_rng_normal(rng);
    if (p->clamp) v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    x[j] = v;
  }
}

/* steps SGLD steps on chains [0, b) of xc, whose rngs are r[0..b). */
static void run_chunk(jem_ws *ws, const jem_model *m, float *xc, int b,
                      const int *y, int steps, const jem_sgld_params *p,
                      jem_rng *r, float *g, size_t chw) {
  for (int s = 0; s < steps; s++) {
    jem_input_grad(ws, m, xc, b, y, NULL, g);
    for (int i = 0; i < b; i++)
      jem_sgld_update(xc + (size_t)i * chw, g + (size_t)i * chw, chw, p, &r[i]);
  }
}

void jem_sgld_run(jem_ws *ws, const jem_model *m, float *x, int n,
                  const int *y, int steps, const jem_sgld_params *p,
                  jem_rng *rngs) {
  JEM_ASSERT(ws && m && p);
  if (n <= 0 || steps <= 0) return;
  JEM_ASSERT(x && rngs);
  const size_t chw = model_chw(m);
  int bmax = jem_ws_max_batch(ws);
  JEM_ASSERT(bmax >= 1);
  if (bmax > n) bmax = n;

  /* The gradient goes to the workspace's planned input scratch: sampling
   * allocates nothing. */
  float *g = jem__ws_input_scratch(ws);

  /* Chunk by chunk, all steps for a chunk before the next: chains never
   * interact, and each draws its noise from its own stream in a fixed order. */
  for (int i0 = 0; i0 < n; i0 += bmax) {
    int b = n - i0 < bmax ? n - i0 : bmax;
    run_chunk(ws, m, x + (size_t)i0 * chw, b, y ? y + i0 : NULL, steps, p,
              rngs + i0, g, chw);
  }
}
