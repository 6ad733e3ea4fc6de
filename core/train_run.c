/* train_run.c - the JEM trainer's run (jem_train_run): allocation, a fresh
 * start or a resume, the iterations (train.c) with progress lines, log.csv
 * and validation, checkpoints at intervals (train_ckpt.c) and a divergence
 * guard that rolls back to the last one. */
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

static void trainer_free(jem__trainer *t) {
  jem_ws_free(t->ws);
  free(t->grad); free(t->am); free(t->av); free(t->buf); free(t->x);
  free(t->logits); free(t->dlogits); free(t->ylab); free(t->bidx);
  free(t->chain); free(t->ld[0].perm); free(t->ld[1].perm);
  jem_class_gauss_free(&t->gauss);
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
  t->seed_eff = jem__train_mix(cfg->seed, 0x4A454D);
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
  jem__train_reseed(t);
  for (int i = 0; i < 2; i++) jem__train_make_perm(t, i);
  if (!t->buf) return;
  jem_rng r;
  jem_rng_seed(&r, t->seed_eff, 3);
  size_t nb = (size_t)cfg->buffer_size * t->chw;
  if (t->gauss.classes > 0) {
    for (int i = 0; i < cfg->buffer_size; i++)
      jem_class_gauss_sample(&t->gauss, jem__train_random_class(t, &r),
                             t->buf + (size_t)i * t->chw, &r);
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
static int rollback(jem__trainer *t, const jem__step_stats *ss, FILE *csv, char *err,
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
  uint64_t seed = jem__train_mix(t->seed_eff, 0xB0BA + (uint64_t)rb);
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
  jem__train_reseed(t);
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

static void window_add(log_window *w, const jem__step_stats *ss) {
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
    jem__step_stats ss;
    int diverged = jem__train_step(t, &ss);
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
