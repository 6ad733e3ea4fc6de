/* train.c - the JEM trainer's configuration and one iteration:
 * cross-entropy + persistent-SGLD energy loss with a replay buffer (and
 * outlier exposure), Adam.  The run (logging, validation, checkpoints at
 * intervals, the divergence guard) is in train_run.c; its files
 * (checkpoints, state, provenance) in train_ckpt.c. */
#include "train.h"
#include "internal.h"
#include "trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void jem_train_defaults(jem_train_config *c) {
  memset(c, 0, sizeof *c);
  c->batch = 64;
  c->iterations = 10000;
  c->px_weight = 1.0f;
  c->energy_l2 = 0.0f;
  c->sigma = 0.03f;
  c->crop_pad = 2;
  c->flip = 1;
  c->sgld_steps = 20;
  c->sgld_step = 1.0f;
  c->sgld_noise = 0.01f;
  c->buffer_size = 10000;
  c->reinit = 0.05f;
  c->lr = 1e-4f;
  c->beta1 = 0.9f;
  c->beta2 = 0.999f;
  c->adam_eps = 1e-8f;
  c->warmup = 1000;
  c->schedule = JEM_LR_COSINE;
  c->decay_rate = 0.3f;
  c->seed = 1;
  c->ckpt_every = 500;
  c->log_every = 50;
  c->eval_every = 1000;
  c->replay_keep = 500;
  c->max_rollbacks = 3;
  c->loss_limit = 1e8f;
  c->energy_limit = 1e5f;
  c->oe_weight = 0.1f;
  c->oe_margin_in = -10.0f;
  c->oe_margin_out = -3.0f;
}

int jem_train_config_check(const jem_train_config *c, char *err,
                           size_t errlen) {
#define BAD(...) return jem__errf(err, errlen, JEM_EINVAL, __VA_ARGS__)
  if (c->batch < 1 || c->batch > 4096) BAD("batch %d must be in 1..4096", c->batch);
  if (c->iterations < 1) BAD("iterations %d must be >= 1", c->iterations);
  if (!(c->lr > 0 && c->lr < 10)) BAD("learning rate %g must be in (0, 10)", (double)c->lr);
  if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
    BAD("Adam betas must be in [0, 1)");
  if (!(c->adam_eps > 0)) BAD("Adam epsilon must be > 0");
  if (c->warmup < 0) BAD("warmup %d must be >= 0", c->warmup);
  if (c->schedule < JEM_LR_CONST || c->schedule > JEM_LR_COSINE) BAD("unknown lr schedule");
  if (!(c->decay_rate > 0 && c->decay_rate <= 1)) BAD("decay rate must be in (0, 1]");
  if (!(c->sigma >= 0 && c->sigma < 10)) BAD("data noise sigma %g must be in [0, 10)", (double)c->sigma);
  if (c->crop_pad < 0 || c->crop_pad > 8) BAD("crop padding %d must be in 0..8", c->crop_pad);
  if (!c->baseline) {
    if (c->sgld_steps < 1 || c->sgld_steps > 10000) BAD("SGLD steps %d must be in 1..10000", c->sgld_steps);
    if (!(c->sgld_step >= 0) || !isfinite(c->sgld_step)) BAD("SGLD step size must be finite and >= 0");
    if (!(c->sgld_noise >= 0) || !isfinite(c->sgld_noise)) BAD("SGLD noise must be finite and >= 0");
    if (c->buffer_size < c->batch || c->buffer_size > 1000000)
      BAD("replay buffer size %d must be in batch (%d)..1000000", c->buffer_size, c->batch);
    if (!(c->reinit >= 0 && c->reinit <= 1)) BAD("reinit probability must be in [0, 1]");
    if (!(c->energy_l2 >= 0) || !isfinite(c->energy_l2)) BAD("energy L2 weight must be finite and >= 0");
    if (!isfinite(c->px_weight)) BAD("p(x) weight must be finite");
    if (c->buffer_init != JEM_BUFFER_UNIFORM && c->buffer_init != JEM_BUFFER_DATA &&
        c->buffer_init != JEM_BUFFER_GAUSSIAN)
      BAD("unknown replay buffer initialisation");
    if (c->px_ramp < 0) BAD("energy-term ramp %d must be >= 0", c->px_ramp);
    if (c->replay_keep < 0 || c->replay_keep > c->buffer_size)
      BAD("replay images kept (%d) must be in 0..buffer size", c->replay_keep);
  }
  if (c->outliers || c->outlier_sets) {
    if (c->outliers && c->outliers->n < 1) BAD("the outlier set is empty");
    if (!(c->oe_weight >= 0) || !isfinite(c->oe_weight)) BAD("outlier weight must be finite and >= 0");
    if (!isfinite(c->oe_margin_in) || !isfinite(c->oe_margin_out) ||
        !(c->oe_margin_in < c->oe_margin_out))
      BAD("outlier margins must be finite with in < out (%g, %g)", (double)c->oe_margin_in,
          (double)c->oe_margin_out);
  }
  if (c->ckpt_every < 1) BAD("checkpoint interval must be >= 1");
  if (c->log_every < 1) BAD("log interval must be >= 1");
  if (c->eval_every < 0) BAD("eval interval must be >= 0");
  if (c->max_rollbacks < 0) BAD("max rollbacks must be >= 0");
  if (!(c->loss_limit > 0) || !(c->energy_limit > 0)) BAD("divergence limits must be > 0");
  if (!c->run_dir || !*c->run_dir) BAD("a run directory is required");
  if (strlen(c->run_dir) > 900) BAD("run directory path too long");
  if (c->stop_at < 0) BAD("stop_at must be >= 0");
  return 0;
#undef BAD
}

/* ------------------------------------------------------------------------ */
/* Trainer helpers                                                          */

int jem__train_random_class(const jem__trainer *t, jem_rng *r) {
  return (int)(((uint64_t)jem_rng_u32(r) * (uint64_t)t->gauss.classes) >> 32);
}

uint64_t jem__train_mix(uint64_t a, uint64_t b) {
  uint64_t s = a ^ (b * 0x9E3779B97F4A7C15ull);
  return jem_splitmix64(&s);
}

void jem__train_make_perm(jem__trainer *t, int which) {
  jem__train_loader *l = &t->ld[which];
  int n = t->tr->n;
  for (int i = 0; i < n; i++) l->perm[i] = i;
  uint64_t st = jem__train_mix(jem__train_mix(t->seed_eff, 101 + (uint64_t)which),
                               (uint64_t)l->epoch);
  for (int i = n - 1; i > 0; i--) {
    int j = (int)(jem_splitmix64(&st) % (uint64_t)(i + 1));
    int tmp = l->perm[i]; l->perm[i] = l->perm[j]; l->perm[j] = tmp;
  }
}

void jem__train_reseed(jem__trainer *t) {
  jem_rng_seed(&t->aug, t->seed_eff, 1);
  jem_rng_seed(&t->brng, t->seed_eff, 2);
  for (int i = 0; i < t->B; i++) jem_rng_seed(&t->chain[i], t->seed_eff, 1000 + (uint64_t)i);
}

/* Next index of loader `which`; batches never straddle epochs (drop_last). */
static void next_batch(jem__trainer *t, int which, int *idx) {
  jem__train_loader *l = &t->ld[which];
  if (l->pos + t->B > t->tr->n) {
    l->epoch++;
    l->pos = 0;
    jem__train_make_perm(t, which);
  }
  for (int i = 0; i < t->B; i++) idx[i] = l->perm[l->pos + i];
  l->pos += t->B;
}

/* dst = noise(flip(shift(src))): shift by (dy, dx) with background (-1)
 * filling, optional horizontal flip, plus sigma * N(0,1). */
static void augment(jem__trainer *t, float *dst, const float *src) {
  const int S = t->S, P = t->c.crop_pad;
  jem_rng *r = &t->aug;
  int dy = 0, dx = 0, f = 0;
  if (P > 0) {
    dy = (int)(jem_rng_u32(r) % (uint32_t)(2 * P + 1)) - P;
    dx = (int)(jem_rng_u32(r) % (uint32_t)(2 * P + 1)) - P;
  }
  if (t->c.flip) f = (int)(jem_rng_u32(r) >> 31);
  for (int ch = 0; ch < t->C; ch++) {
    const float *sp = src + (size_t)ch * S * S;
    float *dp = dst + (size_t)ch * S * S;
    for (int i = 0; i < S; i++) {
      int si = i + dy;
      for (int j = 0; j < S; j++) {
        int sj = (f ? S - 1 - j : j) + dx;
        float v = (si >= 0 && si < S && sj >= 0 && sj < S) ? sp[si * S + sj] : -1.0f;
        dp[i * S + j] = v;
      }
    }
  }
  if (t->c.sigma > 0)
    for (size_t k = 0; k < t->chw; k++) dst[k] += t->c.sigma * jem_rng_normal(r);
}

static float lr_at(const jem__trainer *t, int it) {
  const jem_train_config *c = &t->c;
  double lr = c->lr * (double)t->lr_scale;
  if (c->warmup > 0 && it < c->warmup) lr *= (double)(it + 1) / c->warmup;
  if (c->schedule == JEM_LR_COSINE) {
    int span = c->iterations - c->warmup;
    if (span > 0 && it >= c->warmup) {
      double p = (double)(it - c->warmup) / span;
      if (p > 1) p = 1;
      lr *= 0.5 * (1.0 + cos(M_PI * p));
    }
  } else if (c->schedule == JEM_LR_STEP) {
    if (it >= (int)(0.8 * c->iterations)) lr *= c->decay_rate;
    if (it >= (int)(0.9 * c->iterations)) lr *= c->decay_rate;
  }
  return (float)lr;
}

/* ------------------------------------------------------------------------ */
/* One iteration                                                            */

/* The rows of one iteration in t->x: the labelled batch (labels in
 * t->ylab) and, for JEM, an independent unlabelled batch and the SGLD
 * samples of B persistent chains (random buffer slots, some restarted),
 * written back to the buffer.  Returns the number of rows. */
static int draw_base_rows(jem__trainer *t) {
  const int B = t->B;
  const size_t chw = t->chw;
  const jem_train_config *c = &t->c;
  int idx[4096];
  next_batch(t, 0, idx);
  for (int i = 0; i < B; i++) {
    augment(t, t->x + (size_t)i * chw, t->tr->x + (size_t)idx[i] * chw);
    t->ylab[i] = t->tr->y[idx[i]];
  }
  if (c->baseline) return B;
  next_batch(t, 1, idx);
  for (int i = 0; i < B; i++)
    augment(t, t->x + (size_t)(B + i) * chw, t->tr->x + (size_t)idx[i] * chw);
  /* Persistent chains: random buffer slots, some restarted from noise. */
  float *xq = t->x + (size_t)2 * B * chw;
  for (int i = 0; i < B; i++) {
    int k = (int)(((uint64_t)jem_rng_u32(&t->brng) * (uint64_t)c->buffer_size) >> 32);
    t->bidx[i] = k;
    float *dst = xq + (size_t)i * chw;
    if (jem_rng_uniform(&t->brng) < c->reinit) {
      if (t->gauss.classes > 0)
        jem_class_gauss_sample(&t->gauss, jem__train_random_class(t, &t->brng), dst, &t->brng);
      else
        for (size_t j = 0; j < chw; j++) dst[j] = 2.0f * jem_rng_uniform(&t->brng) - 1.0f;
    } else {
      memcpy(dst, t->buf + (size_t)k * chw, chw * sizeof(float));
    }
  }
  jem_sgld_params sp = {c->sgld_step, c->sgld_noise, c->sgld_clamp ? 1 : 0};
  jem_sgld_run(t->ws, t->m, xq, B, NULL, c->sgld_steps, &sp, t->chain);
  for (int i = 0; i < B; i++)
    memcpy(t->buf + (size_t)t->bidx[i] * chw, xq + (size_t)i * chw, chw * sizeof(float));
  return 3 * B;
}

/* The base rows, then (outlier exposure) B outlier images drawn with
 * replacement, augmented like the data.  Returns the number of rows. */
static int draw_rows(jem__trainer *t) {
  int rows = draw_base_rows(t);
  const jem_dataset *o = t->c.outliers;
  if (!o) return rows;
  for (int i = 0; i < t->B; i++) {
    int k = (int)(((uint64_t)jem_rng_u32(&t->brng) * (uint64_t)o->n) >> 32);
    augment(t, t->x + (size_t)(rows + i) * t->chw, o->x + (size_t)k * t->chw);
  }
  return rows + t->B;
}

/* One forward over the rows, the loss and its statistics into ss, and
 * d loss / d logits into t->dlogits.  No normalisation layers, so the loss
 * gradient is the sum of per-row contributions. */
static void loss_and_dlogits(jem__trainer *t, int rows, jem__step_stats *ss) {
  const int B = t->B, K = t->K;
  const jem_train_config *c = &t->c;
  jem_forward(t->ws, t->m, t->x, rows, t->logits);
  float p[1024];
  double ce = 0, ed = 0, eq = 0, ed2 = 0, eq2 = 0, oe = 0, eo = 0;
  /* Energy terms' weights, ramped in after a warm start. */
  float ramp = 1.0f;
  if (c->px_ramp > 0 && t->iter < c->px_ramp) ramp = (float)(t->iter + 1) / c->px_ramp;
  const float pxw = ramp * c->px_weight, l2w = ramp * c->energy_l2;
  /* Outlier rows, when there are any, are the last B. */
  const int oe0 = c->outliers ? rows - B : rows;
  const float oew = c->outliers ? c->oe_weight : 0.0f;
  int correct = 0;
  for (int i = 0; i < rows; i++) {
    const float *z = t->logits + (size_t)i * K;
    float *dz = t->dlogits + (size_t)i * K;
    float lse = jem_logsumexp(z, K);
    float e = -lse; /* E = -lse, dE/dz = -p */
    float dLdE = 0.0f;
    jem_softmax(p, z, K, 1.0f);
    if (i < B) {
      int y = t->ylab[i];
      ce += lse - z[y];
      int am = 0;
      for (int k = 1; k < K; k++) if (z[k] > z[am]) am = k;
      correct += am == y;
      for (int k = 0; k < K; k++) dz[k] = (p[k] - (k == y)) / B;
      if (oew > 0) { /* outlier exposure: labelled energies below m_in */
        float h = fmaxf(e - c->oe_margin_in, 0.0f);
        oe += (double)h * h;
        dLdE = 2.0f * oew * h / B;
      }
    } else if (i >= oe0) { /* outliers: energies above m_out */
      float h = fmaxf(c->oe_margin_out - e, 0.0f);
      oe += (double)h * h;
      eo += e;
      dLdE = -2.0f * oew * h / B;
      for (int k = 0; k < K; k++) dz[k] = 0.0f;
    } else {
      /* Data rows: px_w*E + l2*E^2; sample rows: -px_w*E + l2*E^2; all
       * means over B. */
      float coef = i < 2 * B ? pxw : -pxw;
      dLdE = (coef + 2.0f * l2w * e) / B;
      for (int k = 0; k < K; k++) dz[k] = 0.0f;
      if (i < 2 * B) { ed += e; ed2 += (double)e * e; }
      else { eq += e; eq2 += (double)e * e; }
    }
    if (dLdE != 0.0f)
      for (int k = 0; k < K; k++) dz[k] -= dLdE * p[k];
  }
  ss->ce = ce / B;
  ss->acc = (double)correct / B;
  if (!c->baseline) {
    ss->e_data = ed / B;
    ss->e_sample = eq / B;
    ss->px = ss->e_data - ss->e_sample;
    ss->l2 = l2w * (ed2 / B + eq2 / B);
  } else {
    ss->e_data = ss->e_sample = NAN;
  }
  ss->oe = oew * oe / B;
  ss->e_out = c->outliers ? eo / B : NAN;
  ss->loss = ss->ce + pxw * ss->px + ss->l2 + ss->oe;
}

/* Adam (PyTorch's formulation) with learning rate lr on t->grad. */
static void adam_update(jem__trainer *t, double lr) {
  const jem_train_config *c = &t->c;
  t->adam_t++;
  const float b1 = c->beta1, b2 = c->beta2;
  const double bc1 = 1.0 - pow(b1, (double)t->adam_t);
  const double bc2 = 1.0 - pow(b2, (double)t->adam_t);
  const float step_size = (float)(lr / bc1);
  const float rbc2 = (float)(1.0 / sqrt(bc2));
  float *w = t->m->weights, *am = t->am, *av = t->av;
  const float *g = t->grad;
  for (size_t i = 0; i < t->nw; i++) {
    am[i] = b1 * am[i] + (1.0f - b1) * g[i];
    av[i] = b2 * av[i] + (1.0f - b2) * g[i] * g[i];
    float denom = sqrtf(av[i]) * rbc2 + c->adam_eps;
    w[i] -= step_size * am[i] / denom;
  }
}

int jem__train_step(jem__trainer *t, jem__step_stats *ss) {
  const jem_train_config *c = &t->c;
  memset(ss, 0, sizeof *ss);
  loss_and_dlogits(t, draw_rows(t), ss);
  ss->lr = lr_at(t, t->iter);
  if (c->inject_count > t->injected && t->iter == c->inject_at) {
    t->injected++;
    ss->loss = NAN;
  }
  if (!isfinite(ss->loss) || fabs(ss->loss) > c->loss_limit ||
      (!c->baseline && (!(fabs(ss->e_data) <= c->energy_limit) ||
                        !(fabs(ss->e_sample) <= c->energy_limit))))
    return 1;

  memset(t->grad, 0, t->nw * sizeof(float));
  jem_backward(t->ws, t->m, t->dlogits, t->grad, NULL);
  double gs = 0;
  for (size_t i = 0; i < t->nw; i++) gs += t->grad[i];
  if (!isfinite(gs)) return 1;
  adam_update(t, ss->lr);
  t->iter++;
  return 0;
}
