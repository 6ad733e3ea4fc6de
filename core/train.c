/* train.c - the JEM trainer: cross-entropy + persistent-SGLD energy loss with a
 * replay buffer, Adam, and the run: logging, validation, checkpoints at
 * intervals and a divergence guard that rolls back to the last one.  The
 * files (checkpoints, state, provenance) live in train_ckpt.c. */
#include "train.h"
#include "internal.h"
#include "trainer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

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

/* A class for a restarted chain: uniform over the classes. */
static int random_class(const jem__trainer *t, jem_rng *r) {
  return (int)(((uint64_t)jem_rng_u32(r) * (uint64_t)t->gauss.classes) >> 32);
}

static uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t s = a ^ (b * 0x9E3779B97F4A7C15ull);
  return jem_splitmix64(&s);
}

/* The epoch's order of the training set for loader `which`, a pure function
 * of (seed_eff, which, epoch), so resume only needs (epoch, pos). */
void jem__train_make_perm(jem__trainer *t, int which) {
  jem__train_loader *l = &t->ld[which];
  int n = t->tr->n;
  for (int i = 0; i < n; i++) l->perm[i] = i;
  uint64_t st = mix(mix(t->seed_eff, 101 + (uint64_t)which), (uint64_t)l->epoch);
  for (int i = n - 1; i > 0; i--) {
    int j = (int)(jem_splitmix64(&st) % (uint64_t)(i + 1));
    int tmp = l->perm[i]; l->perm[i] = l->perm[j]; l->perm[j] = tmp;
  }
}

static void reseed_streams(jem__trainer *t) {
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

static void trainer_free(jem__trainer *t) {
  jem_ws_free(t->ws);
  free(t->grad); free(t->am); free(t->av); free(t->buf); free(t->x);
  free(t->logits); free(t->dlogits); free(t->ylab); free(t->bidx);
  free(t->chain); free(t->ld[0].perm); free(t->ld[1].perm);
  jem_class_gauss_free(&t->gauss);
}
/* ------------------------------------------------------------------------ */
/* One iteration                                                            */

typedef struct step_stats {
  double loss, ce, px, l2, acc, e_data, e_sample, lr;
  double oe, e_out; /* outlier-exposure term and mean outlier energy */
} step_stats;

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
        jem_class_gauss_sample(&t->gauss, random_class(t, &t->brng), dst, &t->brng);
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
static void loss_and_dlogits(jem__trainer *t, int rows, step_stats *ss) {
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

/* One iteration.  Returns 0, or 1 when it diverged (nothing was updated). */
static int step(jem__trainer *t, step_stats *ss) {
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

float jem_eval_accuracy(jem_ws *ws, const jem_model *m, const jem_dataset *d,
                        float *nll) {
  const int K = m->arch.num_classes, mb = jem_ws_max_batch(ws);
  const size_t chw = (size_t)d->c * d->s * d->s;
  float *z = malloc(sizeof(float) * (size_t)mb * K);
  if (!z || !d->y || d->n == 0) { free(z); if (nll) *nll = NAN; return NAN; }
  long correct = 0;
  double tot = 0;
  for (int i0 = 0; i0 < d->n; i0 += mb) {
    int n = d->n - i0 < mb ? d->n - i0 : mb;
    jem_forward(ws, m, d->x + (size_t)i0 * chw, n, z);
    for (int i = 0; i < n; i++) {
      const float *zi = z + (size_t)i * K;
      int am = 0;
      for (int k = 1; k < K; k++) if (zi[k] > zi[am]) am = k;
      correct += am == d->y[i0 + i];
      tot += jem_logsumexp(zi, K) - zi[d->y[i0 + i]];
    }
  }
  free(z);
  if (nll) *nll = (float)(tot / d->n);
  return (float)correct / d->n;
}

/* ------------------------------------------------------------------------ */
/* The run                                                                  */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fmt_dur(char *out, size_t cap, double s) {
  if (!isfinite(s) || s < 0) { snprintf(out, cap, "?"); return; }
  long v = (long)(s + 0.5);
  if (v >= 3600) snprintf(out, cap, "%ldh%02ldm", v / 3600, (v % 3600) / 60);
  else if (v >= 60) snprintf(out, cap, "%ldm%02lds", v / 60, v % 60);
  else snprintf(out, cap, "%lds", v);
}

static FILE *open_csv(const jem__trainer *t) {
  char p[1024];
  jem__train_path(t, p, sizeof p, "log.csv");
  struct stat sb;
  int fresh = stat(p, &sb) != 0 || sb.st_size == 0;
  FILE *f = fopen(p, "a");
  if (f && fresh)
    fprintf(f, "iteration,epoch,lr,loss,ce,px,l2,train_acc,e_data,e_sample,"
               "it_per_s,val_acc,val_nll,wall_s,event\n");
  return f;
}

static int make_dir(const char *d, char *err, size_t errlen) {
  if (mkdir(d, 0755) && errno != EEXIST)
    return jem__errf(err, errlen, JEM_EIO, "cannot create run directory %s: %s", d, strerror(errno));
  struct stat sb;
  if (stat(d, &sb) || !S_ISDIR(sb.st_mode))
    return jem__errf(err, errlen, JEM_EIO, "%s is not a directory", d);
  return 0;
}

static int run_validation(jem__trainer *t, FILE *csv, char *err, size_t errlen) {
  if (!t->va || !t->va->y) return 0;
  float nll;
  float acc = jem_eval_accuracy(t->ws, t->m, t->va, &nll);
  t->last_val = acc;
  int best = !(acc <= t->best_val); /* also when best_val is NaN */
  if (best) t->best_val = acc;
  if (t->c.progress)
    fprintf(t->c.progress, "it %d: validation accuracy %.4f nll %.4f%s\n", t->iter,
            (double)acc, (double)nll, best ? " (best)" : "");
  if (csv) {
    fprintf(csv, "%d,,,,,,,,,,,%.5f,%.5f,%.1f,val\n", t->iter, (double)acc, (double)nll, t->wall_s);
    fflush(csv);
  }
  if (best) {
    char bp[1024];
    jem__train_path(t, bp, sizeof bp, "best.safetensors");
    return jem__train_save_model(t, bp, t->c.replay_keep, err, errlen);
  }
  return 0;
}

/* The inputs jem_train_run accepts. */
static int check_inputs(const jem_model *m, const jem_dataset *train,
                        const jem_dataset *valid, const jem_train_config *cfg, char *err,
                        size_t errlen) {
  int rc = jem_train_config_check(cfg, err, errlen);
  if (rc) return rc;
  if (!m || !train || !train->y || !train->x)
    return jem__errf(err, errlen, JEM_EINVAL, "a model and a labelled training set are required");
  if (train->c != m->arch.in_channels || train->s != m->arch.image_size)
    return jem__errf(err, errlen, JEM_ESHAPE,
                     "training images are %dx%dx%d but the model takes %dx%dx%d", train->c,
                     train->s, train->s, m->arch.in_channels, m->arch.image_size, m->arch.image_size);
  if (valid && (valid->c != train->c || valid->s != train->s))
    return jem__errf(err, errlen, JEM_ESHAPE, "validation images differ in shape from training images");
  if (train->num_classes > m->arch.num_classes)
    return jem__errf(err, errlen, JEM_ESHAPE, "labels go up to %d but the model has %d classes",
                     train->num_classes - 1, m->arch.num_classes);
  if (train->n < cfg->batch)
    return jem__errf(err, errlen, JEM_EINVAL, "%d training images, fewer than one batch (%d)",
                     train->n, cfg->batch);
  if (cfg->outliers && (cfg->outliers->c != train->c || cfg->outliers->s != train->s))
    return jem__errf(err, errlen, JEM_ESHAPE, "outlier images differ in shape from training images");
  if (m->arch.num_classes > 1024)
    return jem__errf(err, errlen, JEM_EUNSUPPORTED, "more than 1024 classes");
  return 0;
}

/* Everything a trainer allocates, once, before the first iteration; the
 * per-class Gaussians for JEM_BUFFER_GAUSSIAN.  On failure t is freed. */
static int trainer_init(jem__trainer *t, jem_model *m, const jem_dataset *train,
                        const jem_dataset *valid, const jem_train_config *cfg, char *err,
                        size_t errlen) {
  memset(t, 0, sizeof *t);
  t->m = m;
  t->tr = train;
  t->va = valid;
  t->c = *cfg;
  t->B = cfg->batch;
  t->K = m->arch.num_classes;
  t->C = m->arch.in_channels;
  t->S = m->arch.image_size;
  t->chw = (size_t)t->C * t->S * t->S;
  t->nw = m->n_weights;
  t->rows = (cfg->baseline ? t->B : 3 * t->B) + (cfg->outliers ? t->B : 0);
  t->ws = jem_ws_create(m, t->rows, JEM_WS_TRAIN);
  t->grad = jem__falloc(t->nw);
  t->am = jem__falloc(t->nw);
  t->av = jem__falloc(t->nw);
  t->x = jem__falloc((size_t)t->rows * t->chw);
  t->logits = jem__falloc((size_t)t->rows * t->K);
  t->dlogits = jem__falloc((size_t)t->rows * t->K);
  t->ylab = malloc(sizeof(int) * (size_t)t->B);
  t->bidx = malloc(sizeof(int) * (size_t)t->B);
  t->chain = calloc((size_t)t->B, sizeof(jem_rng));
  t->ld[0].perm = malloc(sizeof(int) * (size_t)train->n);
  t->ld[1].perm = malloc(sizeof(int) * (size_t)train->n);
  if (!cfg->baseline) t->buf = jem__falloc((size_t)cfg->buffer_size * t->chw);
  if (!t->ws || !t->grad || !t->am || !t->av || !t->x || !t->logits || !t->dlogits ||
      !t->ylab || !t->bidx || !t->chain || !t->ld[0].perm || !t->ld[1].perm ||
      (!cfg->baseline && !t->buf)) {
    trainer_free(t);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory setting up training");
  }
  if (!cfg->baseline && cfg->buffer_init == JEM_BUFFER_GAUSSIAN) {
    int rc = jem_class_gauss_fit(&t->gauss, train, err, errlen);
    if (rc < 0) { trainer_free(t); return rc; }
  }
  t->seed_eff = mix(cfg->seed, 0x4A454D);
  t->lr_scale = 1.0f;
  t->best_val = NAN;
  t->last_val = NAN;
  return 0;
}

/* A fresh run: random streams, data order and the replay buffer's first
 * images (per-class Gaussian draws, noisy training images or uniform
 * noise). */
static void fresh_start(jem__trainer *t) {
  const jem_train_config *cfg = &t->c;
  reseed_streams(t);
  for (int i = 0; i < 2; i++) jem__train_make_perm(t, i);
  if (!t->buf) return;
  jem_rng r;
  jem_rng_seed(&r, t->seed_eff, 3);
  size_t nb = (size_t)cfg->buffer_size * t->chw;
  if (t->gauss.classes > 0) {
    for (int i = 0; i < cfg->buffer_size; i++)
      jem_class_gauss_sample(&t->gauss, random_class(t, &r), t->buf + (size_t)i * t->chw, &r);
  } else if (cfg->buffer_init == JEM_BUFFER_DATA) {
    for (int i = 0; i < cfg->buffer_size; i++) {
      int k = (int)(((uint64_t)jem_rng_u32(&r) * (uint64_t)t->tr->n) >> 32);
      float *dst = t->buf + (size_t)i * t->chw;
      const float *src = t->tr->x + (size_t)k * t->chw;
      for (size_t j = 0; j < t->chw; j++) dst[j] = src[j] + cfg->sigma * jem_rng_normal(&r);
    }
  } else {
    for (size_t i = 0; i < nb; i++) t->buf[i] = 2.0f * jem_rng_uniform(&r) - 1.0f;
  }
}

/* Resumes from the run directory's checkpoint (with cfg->resume, when it
 * has one), else starts afresh in a directory that must have none.
 * *resumed_from: the iteration resumed from, or -1. */
static int start(jem__trainer *t, int *resumed_from, char *err, size_t errlen) {
  *resumed_from = -1;
  if (t->c.resume) {
    int rc = jem__train_load_checkpoint(t, err, errlen);
    if (rc < 0) return rc;
    if (rc == 0) {
      *resumed_from = t->iter;
      t->resumes++;
    }
  } else if (jem__train_ckpt_exists(t)) {
    return jem__errf(err, errlen, JEM_EINVAL,
                     "%s already holds a checkpoint: resume it or use another run directory",
                     t->c.run_dir);
  }
  if (*resumed_from < 0) fresh_start(t);
  return 0;
}

/* The divergence guard: back to the last checkpoint with half the learning
 * rate and fresh random streams, the new guard state persisted at once.
 * Gives up after cfg->max_rollbacks. */
static int rollback(jem__trainer *t, const step_stats *ss, FILE *csv, char *err,
                    size_t errlen) {
  const jem_train_config *cfg = &t->c;
  FILE *out = cfg->progress;
  int at = t->iter, rc;
  t->rollbacks++;
  if (t->rollbacks > cfg->max_rollbacks) {
    rc = jem__errf(err, errlen, JEM_EINTERNAL,
                   "training diverged at iteration %d (loss %g, E_data %g, E_sample %g) "
                   "after %d rollbacks; giving up", at, ss->loss, ss->e_data, ss->e_sample,
                   cfg->max_rollbacks);
    fprintf(csv, "%d,,,%g,,,,,%g,%g,,,,%.1f,gave_up\n", at, ss->loss, ss->e_data,
            ss->e_sample, t->wall_s);
    return rc;
  }
  int rb = t->rollbacks;
  float scale = t->lr_scale * 0.5f;
  uint64_t seed = mix(t->seed_eff, 0xB0BA + (uint64_t)rb);
  double wall = t->wall_s;
  int resumes = t->resumes;
  if ((rc = jem__train_load_checkpoint(t, err, errlen)) != 0) {
    if (rc > 0) rc = jem__errf(err, errlen, JEM_EINTERNAL, "no checkpoint to roll back to");
    return rc;
  }
  t->rollbacks = rb;
  t->lr_scale = scale;
  t->seed_eff = seed;
  t->wall_s = wall;
  t->resumes = resumes;
  reseed_streams(t);
  for (int i = 0; i < 2; i++) jem__train_make_perm(t, i);
  if (out) {
    fprintf(out, "DIVERGED at iteration %d (loss %g, E_data %g, E_sample %g): rollback %d/%d "
            "to iteration %d, lr scale now %g, new seed\n", at, ss->loss, ss->e_data,
            ss->e_sample, rb, cfg->max_rollbacks, t->iter, (double)scale);
    fflush(out);
  }
  fprintf(csv, "%d,,,%g,,,,,%g,%g,,,,%.1f,rollback_to_%d\n", at, ss->loss, ss->e_data,
          ss->e_sample, t->wall_s, t->iter);
  fflush(csv);
  return jem__train_checkpoint(t, err, errlen);
}

/* Progress between log lines: the sums of the iterations' statistics (the
 * last learning rate in sum[7]) and the iteration rate, smoothed. */
typedef struct log_window {
  double sum[10]; /* loss ce px l2 acc e_data e_sample lr oe e_out */
  int n;
  double t0;   /* start of the window */
  double rate; /* it/s, exponentially smoothed; NaN before the first line */
} log_window;

static void window_reset(log_window *w) {
  memset(w->sum, 0, sizeof w->sum);
  w->n = 0;
  w->t0 = now_s();
}

static void window_add(log_window *w, const step_stats *ss) {
  w->sum[0] += ss->loss; w->sum[1] += ss->ce; w->sum[2] += ss->px; w->sum[3] += ss->l2;
  w->sum[4] += ss->acc; w->sum[5] += ss->e_data; w->sum[6] += ss->e_sample; w->sum[7] = ss->lr;
  w->sum[8] += ss->oe; w->sum[9] += ss->e_out;
  w->n++;
}

/* One progress line and one log.csv row with the window's means; starts
 * the next window. */
static void window_log(jem__trainer *t, log_window *w, FILE *csv) {
  const jem_train_config *cfg = &t->c;
  FILE *out = cfg->progress;
  double *acc = w->sum;
  double tw = now_s();
  double r = w->n / (tw - w->t0 > 1e-9 ? tw - w->t0 : 1e-9);
  w->rate = isfinite(w->rate) ? 0.7 * w->rate + 0.3 * r : r;
  w->t0 = tw;
  double eta = (cfg->iterations - t->iter) / w->rate;
  char es[32];
  fmt_dur(es, sizeof es, eta);
  const int iters_per_epoch = t->tr->n / t->B;
  double ep = (double)t->iter / (iters_per_epoch > 0 ? iters_per_epoch : 1);
  for (int k = 0; k < 10; k++)
    if (k != 7) acc[k] /= w->n;
  if (out) {
    if (cfg->baseline)
      fprintf(out, "it %d/%d ep %.2f lr %.2e loss %.4f acc %.3f | %.2f it/s ETA %s\n", t->iter,
              cfg->iterations, ep, acc[7], acc[0], acc[4], r, es);
    else
      fprintf(out, "it %d/%d ep %.2f lr %.2e loss %.4f ce %.4f px %.4f l2 %.4f acc %.3f "
              "E_data %.3f E_sample %.3f | %.3f it/s ETA %s\n", t->iter, cfg->iterations, ep,
              acc[7], acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], r, es);
    if (cfg->outliers)
      fprintf(out, "  outliers: oe %.4f E_out %.3f\n", acc[8], acc[9]);
    fflush(out);
  }
  fprintf(csv, "%d,%.4f,%.4e,%.5f,%.5f,%.5f,%.5f,%.4f,%.4f,%.4f,%.4f,,,%.1f,\n", t->iter, ep,
          acc[7], acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], r, t->wall_s);
  fflush(csv);
  memset(w->sum, 0, sizeof w->sum);
  w->n = 0;
}

/* Iterations up to cfg->iterations (or --stop-at, or *cfg->stop), with
 * logging, validation, checkpoints and the divergence guard. */
static int train_loop(jem__trainer *t, FILE *csv, char *err, size_t errlen) {
  const jem_train_config *cfg = &t->c;
  int rc;
  int target = cfg->iterations;
  if (cfg->stop_at > 0 && cfg->stop_at < target) target = cfg->stop_at;
  log_window w;
  window_reset(&w);
  w.rate = NAN;
  double t_last = w.t0;
  while (t->iter < target) {
    if (cfg->stop && *cfg->stop) break;
    step_stats ss;
    int diverged = step(t, &ss);
    double tn = now_s();
    t->wall_s += tn - t_last;
    t_last = tn;
    if (diverged) {
      if ((rc = rollback(t, &ss, csv, err, errlen))) return rc;
      window_reset(&w);
      continue;
    }
    window_add(&w, &ss);
    if (t->iter % cfg->log_every == 0 || t->iter == target) window_log(t, &w, csv);
    int do_eval = cfg->eval_every > 0 && t->iter % cfg->eval_every == 0 && t->iter < cfg->iterations;
    if (do_eval && (rc = run_validation(t, csv, err, errlen))) return rc;
    if (t->iter % cfg->ckpt_every == 0 && t->iter < cfg->iterations &&
        (rc = jem__train_checkpoint(t, err, errlen)))
      return rc;
    if (do_eval) w.t0 = now_s(); /* keep eval time out of it/s */
  }
  return 0;
}

/* Stopped or finished: the state on disk is this one, then the final model
 * (finished) or a usable snapshot (stopped), and the status. */
static int finish(jem__trainer *t, FILE *csv, int resumed_from, jem_train_status *st,
                  char *err, size_t errlen) {
  const jem_train_config *cfg = &t->c;
  FILE *out = cfg->progress;
  int rc;
  int finished = t->iter >= cfg->iterations;
  if (finished && (rc = run_validation(t, csv, err, errlen))) return rc;
  if (!jem__train_ckpt_current(t) && (rc = jem__train_checkpoint(t, err, errlen))) return rc;
  if (st) memset(st, 0, sizeof *st);
  if (finished) {
    char fp[1024];
    if (cfg->out) snprintf(fp, sizeof fp, "%s", cfg->out);
    else jem__train_path(t, fp, sizeof fp, "model.safetensors");
    if ((rc = jem__train_save_model(t, fp, cfg->replay_keep, err, errlen))) return rc;
    if (st) snprintf(st->final_path, sizeof st->final_path, "%s", fp);
    if (out) {
      char ws[32];
      fmt_dur(ws, sizeof ws, t->wall_s);
      fprintf(out, "finished %d iterations in %s (%d rollbacks); validation accuracy %.4f; "
              "model written to %s\n", t->iter, ws, t->rollbacks, (double)t->last_val, fp);
    }
  } else {
    /* A usable snapshot (small buffer, full metadata) of where it stands. */
    char lp[1024];
    jem__train_path(t, lp, sizeof lp, "latest.safetensors");
    if ((rc = jem__train_save_model(t, lp, cfg->baseline ? 0 : cfg->replay_keep, err, errlen)))
      return rc;
    if (out)
      fprintf(out, "stopped at iteration %d; checkpoint in %s (resume with --resume), "
              "snapshot %s\n", t->iter, cfg->run_dir, lp);
  }
  if (st) {
    st->iteration = t->iter;
    st->finished = finished;
    st->rollbacks = t->rollbacks;
    st->resumed_from = resumed_from;
    st->lr_scale = t->lr_scale;
    st->val_acc = t->last_val;
    st->best_val_acc = t->best_val;
    st->wall_s = t->wall_s;
  }
  return 0;
}

int jem_train_run(jem_model *m, const jem_dataset *train,
                  const jem_dataset *valid, const jem_train_config *cfg,
                  jem_train_status *st, char *err, size_t errlen) {
  int rc = check_inputs(m, train, valid, cfg, err, errlen);
  if (rc || (rc = make_dir(cfg->run_dir, err, errlen))) return rc;
  jem__trainer T, *t = &T;
  if ((rc = trainer_init(t, m, train, valid, cfg, err, errlen))) return rc;
  int resumed_from;
  if ((rc = start(t, &resumed_from, err, errlen))) {
    trainer_free(t);
    return rc;
  }
  FILE *out = cfg->progress;
  FILE *csv = open_csv(t);
  if (!csv) {
    trainer_free(t);
    return jem__errf(err, errlen, JEM_EIO, "cannot write %s/log.csv: %s", cfg->run_dir, strerror(errno));
  }
  if (out) {
    if (resumed_from >= 0)
      fprintf(out, "resumed from iteration %d (rollbacks %d, lr scale %g, %.0f s trained)\n",
              resumed_from, t->rollbacks, (double)t->lr_scale, t->wall_s);
    fprintf(out, "%s: %d training images, %d validation, %s, %d parameters, batch %d\n",
            cfg->baseline ? "cross-entropy baseline" : "JEM", train->n, valid ? valid->n : 0,
            m->name, (int)t->nw, t->B);
    fflush(out);
  }
  /* Always have a checkpoint to roll back to. */
  if ((resumed_from < 0 && (rc = jem__train_checkpoint(t, err, errlen))) ||
      (rc = train_loop(t, csv, err, errlen)) ||
      (rc = finish(t, csv, resumed_from, st, err, errlen))) {
    if (out) fprintf(out, "training failed at iteration %d: %s\n", t->iter, err ? err : "");
    fclose(csv);
    if (st) {
      memset(st, 0, sizeof *st);
      st->iteration = t->iter;
      st->rollbacks = t->rollbacks;
      st->resumed_from = resumed_from;
    }
    trainer_free(t);
    return rc;
  }
  fclose(csv);
  trainer_free(t);
  return 0;
}
