/* sched.c - bounded queue, dynamic batching and the compute worker pool.
 *
 * Shape.  One libuv loop runs on its own thread ("the loop thread") and owns
 * all scheduling decisions; compute runs on libuv's thread pool through
 * uv_queue_work, sized to --workers (UV_THREADPOOL_SIZE is set before the
 * pool starts).  Each in-flight work item holds one worker slot (srv_worker:
 * a jem_ws per recent model plus gather/scatter buffers), so at most
 * --workers items run at once and a slot is never shared.
 *
 * Scoring.  HTTP threads decode a request's images into an srv_task,
 * reserve queue room (srv_sched_reserve; the queue counts images and is
 * bounded by --queue-size, so a full queue answers 503 instead of growing),
 * suspend the connection and queue the task (srv_sched_score).  A request
 * too large to decode there quickly is decoded first as background work
 * (below), one image per slice, whose last done() queues the task
 * (h_classify.c).  When a slot is free the loop thread forms a batch
 * Triton-style: it starts at once when --max-batch images are waiting, when
 * no other batch is running (an idle pool adds no latency), or when the
 * oldest image has waited --max-delay-us; otherwise it arms a timer for the
 * rest of the delay.  So under load, while one batch computes, the next one
 * fills up instead of leaving with the first image that arrived (eager
 * dispatch would keep batches at 1-2 images and lose the GEMM efficiency).  A batch takes images
 * in FIFO order from tasks with the same model and the same want_grad, up to
 * --max-batch images; a large task may be split across batches.  The worker
 * gathers the inputs into one contiguous tensor, calls jem_score_batch once
 * and scatters the per-image results back, so an image's result does not
 * depend on its neighbours (every per-image quantity is computed row by
 * row).  When all of a task's images are done, task->complete() runs on the
 * loop thread and resumes the HTTP connection; JSON is built on the HTTP
 * thread, never here.
 *
 * Dropping work.  Every 50 ms the loop thread polls the sockets of queued
 * tasks; a client that hung up (POLLRDHUP/POLLHUP) has its task removed and
 * completed as SRV_TASK_CANCELED.  srv_sched_stop() completes whatever is
 * still queued as SRV_TASK_SHUTDOWN and waits for running items.
 *
 * Background work (for SGLD jobs).  Anything that is not scoring is an
 * srv_work: a kind, a run() executed on a pool thread with exclusive use of
 * a worker slot, and a done() executed back on the loop thread (or with
 * canceled=1 at shutdown).  Long jobs must cut themselves into slices: run()
 * does one slice (e.g. a few SGLD steps), done() records progress and
 * resubmits with srv_sched_submit() until finished.  Items that can share
 * batches (SGLD jobs on one model: the same batch_key) start together in
 * one slot, up to --max-batch by batch_size, and one run_group() runs them;
 * after a group's slice every item's done() runs before the next pump, so a
 * resubmitted group meets the items that queued meanwhile and they all start
 * together (step-level batching, job_work.h).  Fairness: scoring goes
 * first, background items may occupy at most max(1, workers - 1) slots (so
 * with two or more workers a slot is always left for scoring), and when both
 * are ready a background item is still started after every 4 score batches,
 * so jobs progress under sustained scoring load.  A scoring request therefore
 * waits for at most one slice on a single-worker daemon and never queues
 * behind jobs otherwise (jobs still share the CPUs).  Keep slices around
 * 10-50 ms.
 *
 * Models.  Tasks carry a srv_model reference (background items should hold
 * their own, from srv_model_get()); srv_worker_ws() keeps a workspace per
 * model generation in each slot (up to SRV_WORKER_WS, within
 * --workspace-bytes together), so batches alternating between two models
 * rebuild nothing, and a new generation (after SIGHUP) gets a new one while
 * the old one ages out.  The old model is freed when its last reference
 * goes.
 *
 * Threads and BLAS.  OpenBLAS threading is process-wide: main() sets
 * workers * blas_threads <= CPUs (default one BLAS thread per worker and one
 * worker per CPU), so concurrent batches never oversubscribe the cores.
 */
#include "srv.h"

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#ifndef POLLRDHUP
#define POLLRDHUP 0x2000
#endif

typedef struct seg {
  srv_task *t;
  int off, cnt;
} seg;

typedef struct slot {
  srv_worker wk;
  uv_work_t req;
  int busy;
  int kind;
  srv_work *job;                /* background item, or the first of a group */
  srv_work **group;             /* max_batch entries: the items of a job group */
  int ngroup;
  /* score batch */
  srv_model *model;
  int want_grad;
  int n;
  int nseg;
  seg *segs;                    /* max_batch entries */
  int failed;
  uint64_t t_start, t_end;
  /* per-slot outputs for the gathered batch */
  int out_k;
  float *logits, *probs, *confidence;
  float *score[JEM_NUM_SCORES];
  int *label;
} slot;

static struct {
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t delay_timer, sweep_timer;
  uv_thread_t thread;
  int started;
  pthread_mutex_t mu;
  srv_task *sq_head, *sq_tail;  /* scoring queue (tasks with images left) */
  int sq_images;                /* undispatched images in sq */
  int sq_tasks;
  atomic_int reserved;          /* reserved + undispatched images */
  srv_work *jq_head, *jq_tail;  /* background queue */
  slot *slots;
  int n_slots, n_free;
  int running_score, running_jobs;
  int score_streak;
  int stop_req, stopping, closed;
} S;

/* ------------------------------------------------------------------------ */
/* Metrics */

static const double lat_le[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                0.1, 0.25, 0.5, 1, 2.5, 5, 10};
static const double batch_le[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
static srv_hist queue_dur, compute_dur, batch_hist, group_hist;

static void render_metrics(srv_mbuf *b) {
  srv_mhead(b, "jem_workers", "gauge", "Compute workers.");
  srv_mprintf(b, "jem_workers %d\n", srv_cfg.workers);
  srv_mhead(b, "jem_queue_duration_seconds", "histogram",
            "Time a scoring request waited in the queue before its first batch started.");
  srv_mhist(b, "jem_queue_duration_seconds", "", &queue_dur);
  srv_mhead(b, "jem_compute_duration_seconds", "histogram",
            "Time from a scoring request's first batch start to its last batch end.");
  srv_mhist(b, "jem_compute_duration_seconds", "", &compute_dur);
  srv_mhead(b, "jem_batch_size", "histogram", "Images per dynamic batch.");
  srv_mhist(b, "jem_batch_size", "", &batch_hist);
  srv_mhead(b, "jem_job_group_size", "histogram",
            "Jobs whose SGLD chains advanced together in one slice (step-level batching).");
  srv_mhist(b, "jem_job_group_size", "", &group_hist);
  srv_mhead(b, "jem_queue_depth", "gauge",
            "Images admitted and not yet in a batch (being decoded or queued).");
  srv_mprintf(b, "jem_queue_depth %d\n", srv_sched_queued_images());
  srv_mhead(b, "jem_running_work_items", "gauge",
            "Batches, job slices and large decodes running on workers.");
  srv_mprintf(b, "jem_running_work_items %d\n", srv_sched_running());
}

/* ------------------------------------------------------------------------ */
/* Tasks */

int srv_task_alloc(srv_task *t, const jem_model *m, int n) {
  size_t k = (size_t)m->arch.num_classes;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  t->n = n;
  t->x = malloc(sizeof(float) * chw * (size_t)n);
  t->logits = malloc(sizeof(float) * k * (size_t)n);
  t->probs = malloc(sizeof(float) * k * (size_t)n);
  t->confidence = malloc(sizeof(float) * (size_t)n);
  t->label = malloc(sizeof(int) * (size_t)n);
  int oom = 0;
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    oom |= !(t->score[s] = malloc(sizeof(float) * (size_t)n));
  atomic_init(&t->state, SRV_TASK_QUEUED);
  t->conn_fd = -1;
  if (oom || !t->x || !t->logits || !t->probs || !t->confidence || !t->label) return -1;
  return 0;
}

void srv_task_free(srv_task *t) {
  if (!t) return;
  free(t->x);
  free(t->logits);
  free(t->probs);
  for (int s = 0; s < JEM_NUM_SCORES; s++) free(t->score[s]);
  free(t->confidence);
  free(t->label);
  srv_model_put(t->model);
  free(t);
}

/* ------------------------------------------------------------------------ */
/* Worker slots */

jem_ws *srv_worker_ws(srv_worker *wk, const srv_model *sm) {
  wk->tick++;
  for (int i = 0; i < SRV_WORKER_WS; i++)
    if (wk->ws[i].ws && wk->ws[i].gen == sm->gen) {
      wk->ws[i].used = wk->tick;
      return wk->ws[i].ws;
    }
  /* a big model runs the batch in chunks rather than outgrow the memory */
  const size_t cap = (size_t)srv_cfg.workspace_bytes;
  const int flags =
      JEM_WS_FIXED_WEIGHTS | (srv_cfg.wide_transforms ? 0 : JEM_WS_NO_WIDE_TRANSFORMS);
  const int b = jem_ws_batch_within(sm->m, srv_cfg.max_batch, flags, cap);
  const size_t need = jem_ws_plan_bytes(sm->m, b, flags);
  /* make room first (a free entry, and the bytes), oldest use first; the
   * entries of models reloaded or gone are never used again and go first */
  for (;;) {
    size_t kept = 0;
    int n = 0, lru = -1;
    for (int i = 0; i < SRV_WORKER_WS; i++) {
      if (!wk->ws[i].ws) continue;
      kept += jem_ws_bytes(wk->ws[i].ws);
      n++;
      if (lru < 0 || wk->ws[i].used < wk->ws[lru].used) lru = i;
    }
    if (n == 0 || (n < SRV_WORKER_WS && kept + need <= cap)) break;
    jem_ws_free(wk->ws[lru].ws);
    wk->ws[lru].ws = NULL;
  }
  int e = 0;
  while (wk->ws[e].ws) e++;
  jem_ws *ws = jem_ws_create(sm->m, b, flags);
  srv_log(SRV_LOG_DEBUG, "msg=\"workspace created\" worker=%d model=\"%s\" generation=%llu "
          "images=%d bytes=%zu", wk->index, sm->name, (unsigned long long)sm->gen, b, need);
  if (ws && b < srv_cfg.max_batch)
    srv_log(SRV_LOG_INFO, "msg=\"workspace capped\" images=%d max_batch=%d bytes=%zu", b,
            srv_cfg.max_batch, jem_ws_bytes(ws));
  wk->ws[e].ws = ws;
  wk->ws[e].gen = sm->gen;
  wk->ws[e].used = wk->tick;
  return ws;
}

void srv_worker_free_ws(srv_worker *wk) {
  for (int i = 0; i < SRV_WORKER_WS; i++) {
    jem_ws_free(wk->ws[i].ws);
    wk->ws[i].ws = NULL;
  }
}

/* Makes the slot's gather/scatter buffers fit model m. */
static int slot_buffers(slot *s, const jem_model *m) {
  size_t mb = (size_t)srv_cfg.max_batch;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  if (s->wk.xbuf_len < mb * chw) {
    free(s->wk.xbuf);
    s->wk.xbuf = malloc(sizeof(float) * mb * chw);
    s->wk.xbuf_len = s->wk.xbuf ? mb * chw : 0;
    if (!s->wk.xbuf) return -1;
  }
  if (s->out_k != m->arch.num_classes) {
    size_t k = (size_t)m->arch.num_classes;
    free(s->logits);
    free(s->probs);
    s->logits = malloc(sizeof(float) * mb * k);
    s->probs = malloc(sizeof(float) * mb * k);
    s->out_k = (s->logits && s->probs) ? (int)k : 0;
    if (!s->out_k) return -1;
  }
  if (!s->label) {
    s->confidence = malloc(sizeof(float) * mb);
    s->label = malloc(sizeof(int) * mb);
    for (int i = 0; i < JEM_NUM_SCORES; i++) s->score[i] = malloc(sizeof(float) * mb);
  }
  int oom = !s->confidence || !s->label;
  for (int i = 0; i < JEM_NUM_SCORES; i++) oom |= !s->score[i];
  return oom ? -1 : 0;
}

/* Pool thread: gather, one jem_score_batch, scatter. */
static void score_work(uv_work_t *req) {
  slot *s = req->data;
  const jem_model *m = s->model->m;
  s->t_start = srv_now_ns();
  s->failed = 0;
  jem_ws *ws = srv_worker_ws(&s->wk, s->model);
  if (!ws || slot_buffers(s, m)) {
    s->failed = 1;
    s->t_end = srv_now_ns();
    return;
  }
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  size_t k = (size_t)m->arch.num_classes;
  int pos = 0;
  for (int i = 0; i < s->nseg; i++) {
    seg *g = &s->segs[i];
    memcpy(s->wk.xbuf + (size_t)pos * chw, g->t->x + (size_t)g->off * chw,
           sizeof(float) * chw * (size_t)g->cnt);
    pos += g->cnt;
  }
  jem_scores sc = {s->logits, s->probs, s->label, s->confidence, {0}};
  memcpy(sc.score, s->score, sizeof sc.score);
  jem_score_batch(ws, m, s->wk.xbuf, s->n, s->want_grad, &sc);
  pos = 0;
  for (int i = 0; i < s->nseg; i++) {
    seg *g = &s->segs[i];
    srv_task *t = g->t;
    size_t c = (size_t)g->cnt, o = (size_t)g->off, p = (size_t)pos;
    memcpy(t->logits + o * k, s->logits + p * k, sizeof(float) * c * k);
    memcpy(t->probs + o * k, s->probs + p * k, sizeof(float) * c * k);
    memcpy(t->confidence + o, s->confidence + p, sizeof(float) * c);
    for (int j = 0; j < JEM_NUM_SCORES; j++)
      memcpy(t->score[j] + o, s->score[j] + p, sizeof(float) * c);
    memcpy(t->label + o, s->label + p, sizeof(int) * c);
    pos += g->cnt;
  }
  s->t_end = srv_now_ns();
}

static void job_work(uv_work_t *req) {
  slot *s = req->data;
  if (s->job->batch_key)
    s->job->run_group(s->group, s->ngroup, &s->wk);
  else
    s->job->run(s->job, &s->wk);
}

/* ------------------------------------------------------------------------ */
/* Loop thread */

typedef struct done_list {
  srv_task *tasks;              /* linked through next_ */
  srv_work *jobs;               /* canceled jobs, linked through next_ */
} done_list;

static void pump(done_list *dl);

static void finish_lists(done_list *dl) {
  while (dl->tasks) {
    srv_task *t = dl->tasks;
    dl->tasks = t->next_;
    t->next_ = NULL;
    if (!t->t_done) t->t_done = srv_now_ns();
    if (atomic_load(&t->state) == SRV_TASK_DONE) {
      srv_hist_obs(&queue_dur, (double)(t->t_first - t->t_enq) * 1e-9);
      srv_hist_obs(&compute_dur, (double)(t->t_done - t->t_first) * 1e-9);
    }
    t->complete(t);
  }
  while (dl->jobs) {
    srv_work *w = dl->jobs;
    dl->jobs = w->next_;
    w->next_ = NULL;
    w->done(w, 1);
  }
}

/* Unlinks t from the scoring queue (mu held). */
static void sq_remove(srv_task *t) {
  srv_task *prev = NULL;
  for (srv_task *p = S.sq_head; p; prev = p, p = p->next_) {
    if (p != t) continue;
    if (prev)
      prev->next_ = p->next_;
    else
      S.sq_head = p->next_;
    if (S.sq_tail == p) S.sq_tail = prev;
    p->next_ = NULL;
    S.sq_tasks--;
    return;
  }
}

/* Ends a queued task early with state st (mu held). */
static void cancel_task(srv_task *t, int st, done_list *dl) {
  int left = t->n - t->next_img;
  sq_remove(t);
  S.sq_images -= left;
  atomic_fetch_sub(&S.reserved, left);
  t->next_img = t->n;
  atomic_store(&t->state, st);
  if (t->running == 0) {
    t->next_ = dl->tasks;
    dl->tasks = t;
  }
}

static void after_score(uv_work_t *req, int status) {
  (void)status;
  slot *s = req->data;
  done_list dl = {0, 0};
  pthread_mutex_lock(&S.mu);
  for (int i = 0; i < s->nseg; i++) {
    srv_task *t = s->segs[i].t;
    t->done_img += s->segs[i].cnt;
    t->running--;
    if (s->failed && atomic_load(&t->state) == SRV_TASK_QUEUED)
      atomic_store(&t->state, SRV_TASK_FAILED);
    if (t->running == 0 && t->next_img == t->n) {
      int st = atomic_load(&t->state);
      if (st == SRV_TASK_QUEUED && t->done_img == t->n) atomic_store(&t->state, SRV_TASK_DONE);
      if (st == SRV_TASK_FAILED && t->next_img > t->done_img) {
        /* a failed task still queued elsewhere: cancel_task handled it */
      }
      t->t_done = s->t_end;
      t->next_ = dl.tasks;
      dl.tasks = t;
    }
  }
  srv_hist_obs(&batch_hist, s->n);
  srv_model_put(s->model);
  s->model = NULL;
  s->busy = 0;
  S.n_free++;
  S.running_score--;
  pump(&dl);
  pthread_mutex_unlock(&S.mu);
  finish_lists(&dl);
}

static void after_job(uv_work_t *req, int status) {
  (void)status;
  slot *s = req->data;
  srv_work *w = s->job;
  const int grouped = w->batch_key != NULL, count = grouped ? s->ngroup : 1;
  done_list dl = {0, 0};
  pthread_mutex_lock(&S.mu);
  if (grouped) srv_hist_obs(&group_hist, count);
  s->job = NULL;
  s->busy = 0;
  S.n_free++;
  S.running_jobs--;
  pthread_mutex_unlock(&S.mu);
  /* done() may resubmit the item: the pump waits for every item of the
   * group, so that they start again together with whatever queued meanwhile
   * (instead of the waiting ones taking the slot alone, and the two groups
   * alternating for ever) */
  for (int i = 0; i < count; i++) {
    srv_work *wi = grouped ? s->group[i] : w;
    wi->done(wi, 0);
  }
  /* done() may have submitted more work */
  pthread_mutex_lock(&S.mu);
  pump(&dl);
  pthread_mutex_unlock(&S.mu);
  finish_lists(&dl);
}

static slot *take_slot(void) {
  for (int i = 0; i < S.n_slots; i++)
    if (!S.slots[i].busy) {
      S.slots[i].busy = 1;
      S.n_free--;
      return &S.slots[i];
    }
  return NULL;
}

/* Forms one batch from the queue head (mu held). */
static void start_score(uint64_t now) {
  slot *s = take_slot();
  srv_task *h = S.sq_head;
  s->kind = SRV_WORK_SCORE;
  s->model = h->model;
  atomic_fetch_add(&s->model->refs, 1);
  s->want_grad = h->want_grad;
  s->n = 0;
  s->nseg = 0;
  srv_task *prev = NULL, *t = S.sq_head;
  while (t && s->n < srv_cfg.max_batch) {
    srv_task *nx = t->next_;
    if (t->model == h->model && t->want_grad == h->want_grad) {
      int cnt = t->n - t->next_img;
      if (cnt > srv_cfg.max_batch - s->n) cnt = srv_cfg.max_batch - s->n;
      s->segs[s->nseg++] = (seg){t, t->next_img, cnt};
      t->next_img += cnt;
      t->running++;
      if (!t->t_first) t->t_first = now;
      s->n += cnt;
      if (t->next_img == t->n) {
        if (prev)
          prev->next_ = nx;
        else
          S.sq_head = nx;
        if (S.sq_tail == t) S.sq_tail = prev;
        t->next_ = NULL;
        S.sq_tasks--;
        t = nx;
        continue;
      }
    }
    prev = t;
    t = nx;
  }
  S.sq_images -= s->n;
  atomic_fetch_sub(&S.reserved, s->n);
  S.running_score++;
  s->req.data = s;
  uv_queue_work(&S.loop, &s->req, score_work, after_score);
}

/* Unlinks w, whose predecessor in the background queue is prev (mu held). */
static void jq_unlink(srv_work *prev, srv_work *w) {
  if (prev)
    prev->next_ = w->next_;
  else
    S.jq_head = w->next_;
  if (S.jq_tail == w) S.jq_tail = prev;
  w->next_ = NULL;
}

/* Starts the head of the background queue; a batchable head takes along the
 * queued items that can share its batches, in queue order, while their
 * sizes fit in --max-batch (mu held). */
static void start_job(void) {
  slot *s = take_slot();
  srv_work *w = S.jq_head;
  jq_unlink(NULL, w);
  s->ngroup = 0;
  if (w->batch_key) {
    int size = w->batch_size;
    s->group[s->ngroup++] = w;
    srv_work *prev = NULL, *q = S.jq_head;
    while (q && s->ngroup < srv_cfg.max_batch) {
      srv_work *nx = q->next_;
      if (q->batch_key == w->batch_key && q->run_group == w->run_group &&
          size + q->batch_size <= srv_cfg.max_batch) {
        jq_unlink(prev, q);
        s->group[s->ngroup++] = q;
        size += q->batch_size;
      } else {
        prev = q;
      }
      q = nx;
    }
  }
  s->kind = SRV_WORK_JOB;
  s->job = w;
  S.running_jobs++;
  s->req.data = s;
  uv_queue_work(&S.loop, &s->req, job_work, after_job);
}

static void maybe_close(void);
static void on_delay(uv_timer_t *h);

/* Starts whatever may start now (mu held). */
static void pump(done_list *dl) {
  (void)dl;
  if (S.closed) return;
  int job_cap = S.n_slots > 1 ? S.n_slots - 1 : 1;
  uint64_t delay = (uint64_t)srv_cfg.max_delay_us * 1000ull;
  for (;;) {
    if (S.n_free == 0) break;
    uint64_t now = srv_now_ns();
    /* an idle pool starts at once (no added latency at low load); while a
     * batch runs, a partial batch waits up to the delay to fill */
    int score_ready = S.sq_head && !S.stopping &&
                      (S.sq_images >= srv_cfg.max_batch || S.running_score == 0 ||
                       now - S.sq_head->t_enq >= delay);
    int job_ready = S.jq_head && !S.stopping && S.running_jobs < job_cap;
    if (score_ready && job_ready) {
      if (S.score_streak >= 4) {
        S.score_streak = 0;
        start_job();
      } else {
        S.score_streak++;
        start_score(now);
      }
    } else if (score_ready) {
      S.score_streak++;
      start_score(now);
    } else if (job_ready) {
      S.score_streak = 0;
      start_job();
    } else {
      break;
    }
  }
  if (S.sq_head && S.n_free > 0 && !S.stopping && S.running_score > 0) {
    uint64_t now = srv_now_ns(), waited = now - S.sq_head->t_enq;
    uint64_t left = waited < delay ? delay - waited : 0;
    uv_timer_start(&S.delay_timer, on_delay, (left + 999999ull) / 1000000ull, 0);
  }
  if (S.stopping) maybe_close();
}

static void on_delay(uv_timer_t *h) {
  (void)h;
  done_list dl = {0, 0};
  pthread_mutex_lock(&S.mu);
  pump(&dl);
  pthread_mutex_unlock(&S.mu);
  finish_lists(&dl);
}

/* Drops queued tasks whose client hung up (loop thread, every 50 ms). */
static void on_sweep(uv_timer_t *h) {
  (void)h;
  done_list dl = {0, 0};
  pthread_mutex_lock(&S.mu);
  srv_task *t = S.sq_head;
  while (t) {
    srv_task *nx = t->next_;
    if (srv_conn_gone(t->conn_fd)) {
      srv_metrics_reject(SRV_REJ_CLIENT_GONE);
      srv_log(SRV_LOG_INFO, "msg=\"client gone, dropping queued work\" images=%d",
              t->n - t->next_img);
      cancel_task(t, SRV_TASK_CANCELED, &dl);
    }
    t = nx;
  }
  pthread_mutex_unlock(&S.mu);
  finish_lists(&dl);
}

static void close_cb(uv_handle_t *h) { (void)h; }

/* Closes the loop's handles once nothing runs (mu held, stopping). */
static void maybe_close(void) {
  if (S.closed || S.running_score || S.running_jobs) return;
  S.closed = 1;
  uv_close((uv_handle_t *)&S.wake, close_cb);
  uv_close((uv_handle_t *)&S.delay_timer, close_cb);
  uv_close((uv_handle_t *)&S.sweep_timer, close_cb);
}

static void on_wake(uv_async_t *h) {
  (void)h;
  done_list dl = {0, 0};
  pthread_mutex_lock(&S.mu);
  if (S.stop_req && !S.stopping) {
    S.stopping = 1;
    while (S.sq_head) cancel_task(S.sq_head, SRV_TASK_SHUTDOWN, &dl);
    while (S.jq_head) {
      srv_work *w = S.jq_head;
      S.jq_head = w->next_;
      w->next_ = dl.jobs;
      dl.jobs = w;
    }
    S.jq_tail = NULL;
  }
  pump(&dl);
  pthread_mutex_unlock(&S.mu);
  finish_lists(&dl);
}

static void loop_main(void *arg) {
  (void)arg;
  uv_run(&S.loop, UV_RUN_DEFAULT);
}

int srv_sched_start(void) {
  char n[16];
  snprintf(n, sizeof n, "%d", srv_cfg.workers);
  /* libuv reads this once, when the pool first starts */
  setenv("UV_THREADPOOL_SIZE", n, 1);
  memset(&S, 0, sizeof S);
  pthread_mutex_init(&S.mu, NULL);
  srv_hist_init(&queue_dur, lat_le, SRV_NB(lat_le));
  srv_hist_init(&compute_dur, lat_le, SRV_NB(lat_le));
  srv_hist_init(&batch_hist, batch_le, SRV_NB(batch_le));
  srv_hist_init(&group_hist, batch_le, SRV_NB(batch_le));
  srv_metrics_register(render_metrics);
  atomic_init(&S.reserved, 0);
  S.n_slots = S.n_free = srv_cfg.workers;
  S.slots = calloc((size_t)S.n_slots, sizeof(slot));
  if (!S.slots) return -1;
  for (int i = 0; i < S.n_slots; i++) {
    S.slots[i].wk.index = i;
    S.slots[i].segs = calloc((size_t)srv_cfg.max_batch, sizeof(seg));
    S.slots[i].group = calloc((size_t)srv_cfg.max_batch, sizeof(srv_work *));
    if (!S.slots[i].segs || !S.slots[i].group) return -1;
  }
  if (uv_loop_init(&S.loop) || uv_async_init(&S.loop, &S.wake, on_wake) ||
      uv_timer_init(&S.loop, &S.delay_timer) || uv_timer_init(&S.loop, &S.sweep_timer))
    return -1;
  uv_timer_start(&S.sweep_timer, on_sweep, 50, 50);
  if (uv_thread_create(&S.thread, loop_main, NULL)) return -1;
  S.started = 1;
  return 0;
}

int srv_sched_reserve(int n) {
  int cur = atomic_load(&S.reserved);
  do {
    if (cur + n > srv_cfg.queue_size) return -1;
  } while (!atomic_compare_exchange_weak(&S.reserved, &cur, cur + n));
  return 0;
}

void srv_sched_unreserve(int n) { atomic_fetch_sub(&S.reserved, n); }

int srv_sched_score(srv_task *t) {
  pthread_mutex_lock(&S.mu);
  if (S.stop_req || !S.started) {
    pthread_mutex_unlock(&S.mu);
    atomic_fetch_sub(&S.reserved, t->n);
    return -1;
  }
  t->t_enq = srv_now_ns();
  t->next_img = t->done_img = t->running = 0;
  t->next_ = NULL;
  if (S.sq_tail)
    S.sq_tail->next_ = t;
  else
    S.sq_head = t;
  S.sq_tail = t;
  S.sq_images += t->n;
  S.sq_tasks++;
  pthread_mutex_unlock(&S.mu);
  uv_async_send(&S.wake);
  return 0;
}

int srv_sched_submit(srv_work *w) {
  pthread_mutex_lock(&S.mu);
  if (S.stop_req || !S.started) {
    pthread_mutex_unlock(&S.mu);
    return -1;
  }
  w->enq_ns_ = srv_now_ns();
  w->next_ = NULL;
  if (S.jq_tail)
    S.jq_tail->next_ = w;
  else
    S.jq_head = w;
  S.jq_tail = w;
  pthread_mutex_unlock(&S.mu);
  uv_async_send(&S.wake);
  return 0;
}

/* Admitted images not yet in a batch: queued ones and those of requests
 * still being decoded (their room is reserved), as queue_full counts them. */
int srv_sched_queued_images(void) { return atomic_load(&S.reserved); }

int srv_conn_gone(int fd) {
  if (fd < 0) return 0;
  struct pollfd pf = {.fd = fd, .events = POLLRDHUP, .revents = 0};
  return poll(&pf, 1, 0) > 0 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

int srv_sched_running(void) {
  pthread_mutex_lock(&S.mu);
  int n = S.running_score + S.running_jobs;
  pthread_mutex_unlock(&S.mu);
  return n;
}

void srv_sched_stop(void) {
  if (!S.started) return;
  pthread_mutex_lock(&S.mu);
  S.stop_req = 1;
  pthread_mutex_unlock(&S.mu);
  uv_async_send(&S.wake);
  uv_thread_join(&S.thread);
  uv_loop_close(&S.loop);
  for (int i = 0; i < S.n_slots; i++) {
    slot *s = &S.slots[i];
    srv_worker_free_ws(&s->wk);
    free(s->wk.xbuf);
    free(s->segs);
    free(s->group);
    free(s->logits);
    free(s->probs);
    for (int j = 0; j < JEM_NUM_SCORES; j++) free(s->score[j]);
    free(s->confidence);
    free(s->label);
  }
  free(S.slots);
  S.slots = NULL;
  S.started = 0;
}
