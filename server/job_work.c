/* job_work.c - a job's SGLD chains on the scheduler's pool: one slice per
 * run(), and the results the last slice makes (see job_work.h). */
#include "job_work.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static size_t chw_of(const jem_model *m) {
  return (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
}

static int grid_cols(int n) {
  int c = (int)ceil(sqrt((double)n));
  return c < 1 ? 1 : c;
}

/* Upper bound of an 8-bit PNG from stb_image_write: its deflate may grow
 * literal-heavy data by 1/8, plus headers. */
static size_t png_bound(size_t w, size_t h, size_t c) {
  size_t raw = h * (w * c + 1);
  return raw + raw / 8 + 1024;
}

/* per sample: energy, confidence, label, a name pointer and a PNG length */
#define PER_SAMPLE (2 * sizeof(float) + sizeof(int) + sizeof(void *) + sizeof(size_t))

size_t srv_job_estimate(const jem_model *m, int n) {
  size_t chw = chw_of(m), S = (size_t)m->arch.image_size, C = (size_t)m->arch.in_channels;
  size_t xb = sizeof(float) * chw * (size_t)n;
  size_t cols = (size_t)grid_cols(n), rows = ((size_t)n + cols - 1) / cols;
  size_t chains = xb + sizeof(jem_rng) * (size_t)n + sizeof(int) * (size_t)n;
  size_t results = xb + 128 + png_bound(cols * S + (cols + 1) * 2, rows * S + (rows + 1) * 2, C) +
                   (size_t)n * (png_bound(S, S, C) + PER_SAMPLE);
  return chains + results;
}

size_t srv_job_result_bytes(const srv_job_result *r) {
  size_t b = r->npy_len + r->grid_len;
  if (r->png)
    for (int k = 0; k < r->n; k++) b += r->png_len[k];
  if (r->samples) b += (size_t)r->n * PER_SAMPLE;
  return b;
}

void srv_job_result_free(srv_job_result *r) {
  json_decref(r->samples);
  free(r->grid);
  free(r->npy);
  if (r->png)
    for (int k = 0; k < r->n; k++) free(r->png[k]);
  free(r->png);
  free(r->png_len);
  memset(r, 0, sizeof *r);
}

static void exec_run(srv_work *w, srv_worker *wk);
static void exec_group(srv_work **items, int count, srv_worker *wk);

int srv_job_exec_init(srv_job_exec *e, const char *id, const srv_job_params *p, srv_model *sm,
                      float *x) {
  const jem_model *m = sm->m;
  snprintf(e->id, sizeof e->id, "%s", id);
  e->p = *p;
  e->sm = sm;
  atomic_init(&e->cancel, 0);
  e->work.kind = SRV_WORK_JOB;
  e->work.run = exec_run;
  /* jobs on the same model share their batches, step by step */
  e->work.batch_key = sm;
  e->work.batch_size = p->n;
  e->work.run_group = exec_group;
  e->x = x ? x : malloc(sizeof(float) * chw_of(m) * (size_t)p->n);
  e->rngs = malloc(sizeof(jem_rng) * (size_t)p->n);
  if (p->y >= 0) {
    e->ys = malloc(sizeof(int) * (size_t)p->n);
    if (e->ys)
      for (int i = 0; i < p->n; i++) e->ys[i] = p->y;
  }
  return e->x && e->rngs && (p->y < 0 || e->ys) ? 0 : -1;
}

void srv_job_exec_free_chains(srv_job_exec *e) {
  free(e->x);
  free(e->rngs);
  free(e->ys);
  e->x = NULL;
  e->rngs = NULL;
  e->ys = NULL;
}

/* ------------------------------------------------------------------------ */
/* CPU priority.  Scoring and jobs share the cores, so a slice runs at a
 * higher nice value (--job-nice) on its pool thread: under contention the
 * scoring threads get most of the CPU, while an idle machine still gives the
 * job everything.  The thread must be able to come back to its nice value
 * afterwards (root, CAP_SYS_NICE or RLIMIT_NICE >= 20 - nice); srv_job_work_start
 * checks that once on a scratch thread, else slices run at normal priority. */

static int nice_ok;

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static void *nice_probe(void *arg) {
  pid_t t = my_tid();
  errno = 0;
  int base = getpriority(PRIO_PROCESS, (id_t)t);
  if (errno == 0 && setpriority(PRIO_PROCESS, (id_t)t, base + 1) == 0)
    *(int *)arg = setpriority(PRIO_PROCESS, (id_t)t, base) == 0;
  return NULL;
}

/* Raises this thread's nice value; returns the value to restore, or
 * -1000 when nothing changed. */
static int nice_enter(void) {
  if (!nice_ok || srv_cfg.job_nice <= 0) return -1000;
  errno = 0;
  int base = getpriority(PRIO_PROCESS, (id_t)my_tid());
  if (errno) return -1000;
  int to = base + srv_cfg.job_nice > 19 ? 19 : base + srv_cfg.job_nice;
  if (to == base || setpriority(PRIO_PROCESS, (id_t)my_tid(), to) != 0) return -1000;
  return base;
}

static void nice_leave(int base) {
  if (base != -1000) setpriority(PRIO_PROCESS, (id_t)my_tid(), base);
}

void srv_job_work_start(void) {
  pthread_t t;
  if (srv_cfg.job_nice > 0 && pthread_create(&t, NULL, nice_probe, &nice_ok) == 0)
    pthread_join(t, NULL);
  if (srv_cfg.job_nice > 0 && !nice_ok)
    srv_log(SRV_LOG_WARN, "msg=\"job slices run at normal CPU priority: a thread cannot restore "
            "its nice value (needs CAP_SYS_NICE or RLIMIT_NICE >= 20)\" job_nice=%d",
            srv_cfg.job_nice);
}

/* ------------------------------------------------------------------------ */
/* Work: run() on a pool thread */

/* Scores the samples and encodes what the job serves; the sample list
 * carries the class names, so a finished job needs no model. */
static void finalize(srv_job_exec *e, jem_ws *ws, const jem_model *m) {
  int n = e->p.n, C = m->arch.in_channels, S = m->arch.image_size;
  size_t chw = chw_of(m);
  srv_job_result *r = &e->res;
  r->n = n;
  float *energy = malloc(sizeof(float) * (size_t)n), *conf = malloc(sizeof(float) * (size_t)n);
  int *label = malloc(sizeof(int) * (size_t)n);
  r->png = calloc((size_t)n, sizeof *r->png);
  r->png_len = calloc((size_t)n, sizeof *r->png_len);
  if (!energy || !conf || !label || !r->png || !r->png_len) goto oom;
  jem_scores sc;
  memset(&sc, 0, sizeof sc);
  sc.score[JEM_SCORE_ENERGY] = energy;
  sc.label = label;
  sc.confidence = conf;
  jem_score_batch(ws, m, e->x, n, 0, &sc);
  float lo = m->pre.range_lo, hi = m->pre.range_hi;
  r->grid = jem_png_grid(e->x, n, C, S, grid_cols(n), lo, hi, &r->grid_len);
  if (!r->grid) goto oom;
  for (int k = 0; k < n; k++) {
    r->png[k] = jem_png_grid(e->x + (size_t)k * chw, 1, C, S, 1, lo, hi, &r->png_len[k]);
    if (!r->png[k]) goto oom;
  }
  int shape[4] = {n, C, S, S};
  r->npy = jem_npy_encode(e->x, 4, shape, &r->npy_len);
  if (!r->npy) goto oom;
  if (!(r->samples = json_array())) goto oom;
  for (int k = 0; k < n; k++) {
    int lab = label[k];
    char url[128];
    snprintf(url, sizeof url, "/v1/jobs/%s/samples/%d.png", e->id, k);
    json_t *o = json_pack("{s:i,s:o,s:i,s:s,s:o,s:s}", "index", k, "energy",
                          srv_jreal(energy[k]), "label", lab, "class",
                          lab >= 0 && lab < m->arch.num_classes ? m->classes[lab] : "",
                          "confidence", srv_jreal(conf[k]), "url", url);
    if (json_array_append_new(r->samples, o)) goto oom;
  }
  free(energy);
  free(conf);
  free(label);
  e->final = 1;
  return;
oom:
  free(energy);
  free(conf);
  free(label);
  srv_job_result_free(r);
  e->failed = 1;
  snprintf(e->msg, sizeof e->msg, "out of memory while encoding the samples");
}

/* Chain k of a step's batch is chain i of job j of the group. */
typedef struct chain_ref {
  int j, i;
} chain_ref;

/* A slice's scratch for a group of jobs: the gradient and the references of
 * one batch, and each job's sampler settings. */
typedef struct group_buf {
  float *g;
  int *ys;
  chain_ref *refs;
  jem_sgld_params *par;
} group_buf;

/* One SGLD step for every chain of the n jobs in live, in batches of the
 * workspace's size gathered into wk's buffer; each chain then takes its step
 * with its job's settings and its own stream.  The workspace is
 * batch-invariant, so every chain gets the numbers it gets in a lone job. */
static void group_step(srv_job_exec **live, int n, const group_buf *gb, jem_ws *ws,
                       const jem_model *m, srv_worker *wk) {
  const size_t chw = chw_of(m);
  const int bmax = jem_ws_max_batch(ws);
  int b = 0;
  for (int j = 0; j < n; j++) {
    const srv_job_exec *e = live[j];
    for (int i = 0; i < e->p.n; i++) {
      memcpy(wk->xbuf + (size_t)b * chw, e->x + (size_t)i * chw, sizeof(float) * chw);
      gb->ys[b] = e->ys ? e->ys[i] : -1;
      gb->refs[b++] = (chain_ref){j, i};
      if (b < bmax && !(j == n - 1 && i == e->p.n - 1)) continue;
      jem_input_grad(ws, m, wk->xbuf, b, gb->ys, NULL, gb->g);
      for (int k = 0; k < b; k++) {
        const chain_ref r = gb->refs[k];
        srv_job_exec *ek = live[r.j];
        jem_sgld_update(ek->x + (size_t)r.i * chw, gb->g + (size_t)k * chw, chw, &gb->par[r.j],
                        &ek->rngs[r.i]);
      }
      b = 0;
    }
  }
}

static void group_buf_free(group_buf *gb) {
  free(gb->g);
  free(gb->ys);
  free(gb->refs);
  free(gb->par);
}

/* Marks the n jobs failed with msg. */
static void group_fail(srv_job_exec **es, int n, const char *msg) {
  for (int j = 0; j < n; j++) {
    es[j]->failed = 1;
    snprintf(es[j]->msg, sizeof es[j]->msg, "%s", msg);
  }
}

static jem_sgld_params sgld_params(const srv_job_exec *e) {
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  p.step_size = (float)e->p.step_size;
  p.noise = (float)e->p.noise;
  p.clamp = e->p.clamp;
  return p;
}

/* The steps of one slice for the n live jobs (initialised) on ws: single
 * SGLD steps for all their chains together until --job-slice-ms has passed
 * (at least one step).  A job leaves the batch when it has done its steps or
 * is canceled; the slice that does a job's last step also makes its
 * results.  run: room for n pointers. */
static void group_slice(srv_job_exec **live, int n, srv_job_exec **run, const group_buf *gb,
                        jem_ws *ws, const jem_model *m, srv_worker *wk) {
  uint64_t end = srv_now_ns() + (uint64_t)srv_cfg.job_slice_ms * 1000000ull;
  for (;;) {
    int nr = 0; /* the jobs still stepping, in group order, with their settings */
    for (int j = 0; j < n; j++)
      if (live[j]->step < live[j]->p.steps && !atomic_load(&live[j]->cancel)) {
        gb->par[nr] = sgld_params(live[j]);
        run[nr++] = live[j];
      }
    if (nr == 0) break;
    group_step(run, nr, gb, ws, m, wk);
    for (int j = 0; j < nr; j++) {
      run[j]->step++;
      run[j]->chain_steps += (uint64_t)run[j]->p.n;
    }
    if (srv_now_ns() >= end) break;
  }
  for (int j = 0; j < n; j++)
    if (live[j]->step == live[j]->p.steps && !atomic_load(&live[j]->cancel)) finalize(live[j], ws, m);
}

/* One slice of a group of jobs on the same model (one job alone is a group
 * of one); see group_slice. */
static void exec_group(srv_work **items, int count, srv_worker *wk) {
  srv_job_exec **live = malloc(sizeof *live * 2 * (size_t)count);
  group_buf gb = {0};
  int n = 0;
  for (int j = 0; j < count; j++) {
    srv_job_exec *e = (srv_job_exec *)items[j]; /* work is its first member */
    e->chain_steps = 0;
    if (e->begin && !e->begin(e)) continue; /* it ended meanwhile */
    if (!live) {
      group_fail(&e, 1, "out of memory for the job's slice");
      continue;
    }
    live[n++] = e;
  }
  if (n == 0) goto out;
  const jem_model *m = live[0]->sm->m;
  jem_ws *ws = srv_worker_ws(wk, live[0]->sm);
  if (!ws) {
    group_fail(live, n, "out of memory for the worker's workspace");
    goto out;
  }
  const size_t chw = chw_of(m), bmax = (size_t)jem_ws_max_batch(ws);
  gb.g = malloc(sizeof(float) * bmax * chw);
  gb.ys = malloc(sizeof(int) * bmax);
  gb.refs = malloc(sizeof(chain_ref) * bmax);
  gb.par = malloc(sizeof(jem_sgld_params) * (size_t)n);
  if (wk->xbuf_len < bmax * chw) { /* the scheduler's gather buffer, shared */
    free(wk->xbuf);
    wk->xbuf = malloc(sizeof(float) * bmax * chw);
    wk->xbuf_len = wk->xbuf ? bmax * chw : 0;
  }
  if (!gb.g || !gb.ys || !gb.refs || !gb.par || !wk->xbuf) {
    group_fail(live, n, "out of memory for the job's slice");
    goto out;
  }
  for (int j = 0; j < n; j++) {
    srv_job_exec *e = live[j];
    if (!e->initialized) {
      /* seeds chain i with (seed, i); GIVEN keeps the decoded images */
      jem_sample_init(m, e->x, e->p.n, e->p.init, e->ys, e->p.seed, e->rngs);
      e->initialized = 1;
    }
  }
  /* scoring batches on this workspace keep the faster plain mode */
  const int was = jem_ws_set_batch_invariant(ws, 1);
  int nice_base = nice_enter();
  group_slice(live, n, live + count, &gb, ws, m, wk);
  nice_leave(nice_base);
  jem_ws_set_batch_invariant(ws, was);
out:
  group_buf_free(&gb);
  free(live);
}

static void exec_run(srv_work *w, srv_worker *wk) { exec_group(&w, 1, wk); }
