/* job_store.c - the in-memory job store (the default, --job-store memory):
 * a bounded list of jobs (--max-jobs, --max-job-bytes, --job-ttl) in this
 * process, each running its chains on this process's workers; and the job
 * object every store shows.
 *
 * Life of a job.  The HTTP thread parses and validates the request, takes a
 * model reference, allocates the chains and puts the job in the store
 * (QUEUED) and in the scheduler's background queue.  Each run() does one
 * slice (job_work.c); done() (loop thread) publishes progress and resubmits
 * the job at the back of the queue, which interleaves the slices of
 * concurrent jobs and lets scoring batches in between (see sched.c for the
 * fairness rules).
 *
 * Ownership.  A job submitted to the scheduler (in_sched) is never freed:
 * DELETE, shutdown and expiry only mark it (canceled, removed from the
 * store), and done() frees the chains and, if the store dropped it, the job.
 * The job holds a model reference while its chains may still run, so SIGHUP
 * never pulls the model from under it; the last done() drops it (the job
 * keeps copies of the names it shows), so finished jobs do not keep an old
 * model alive until they expire.  Handlers that send result bytes hold a
 * reference (refs) while they copy.  Everything else is under one mutex. */
#include "job_store.h"

#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *const srv_job_state_names[SRV_JOB_NSTATES] = {"queued", "running", "succeeded",
                                                          "failed", "canceled"};

void srv_job_ans_error(srv_job_ans *a, int status, const char *code, const char *retry_after,
                       const char *fmt, ...) {
  a->status = status;
  a->code = code;
  a->retry_after = retry_after;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(a->msg, sizeof a->msg, fmt, ap);
  va_end(ap);
}

/* ------------------------------------------------------------------------ */
/* The job object */

static json_t *jtime(double t) {
  if (t <= 0) return json_null();
  time_t s = (time_t)t;
  int ms = (int)((t - (double)s) * 1000.0);
  if (ms < 0) ms = 0;
  if (ms > 999) ms = 999;
  struct tm tm;
  if (!gmtime_r(&s, &tm)) return json_null();
  char buf[48];
  snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
           tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  return json_string(buf);
}

const char *srv_job_init_name(int init) {
  return init == JEM_SAMPLE_INIT_BUFFER ? "buffer"
         : init == JEM_SAMPLE_INIT_GIVEN ? "images"
                                         : "noise";
}

json_t *srv_job_json(const srv_job_rec *j, const json_t *samples) {
  const srv_job_params *p = &j->p;
  json_t *params = json_object();
  json_object_set_new(params, "n", json_integer(p->n));
  json_object_set_new(params, "steps", json_integer(p->steps));
  json_object_set_new(params, "class", p->y >= 0 ? json_integer(p->y) : json_null());
  json_object_set_new(params, "class_name", j->class_name ? json_string(j->class_name)
                                                         : json_null());
  json_object_set_new(params, "step_size", srv_jreal(p->step_size)); /* a model's float: 0.1 */
  json_object_set_new(params, "noise", srv_jreal(p->noise));
  json_object_set_new(params, "init", json_string(srv_job_init_name(p->init)));
  json_object_set_new(params, "clamp", json_boolean(p->clamp));
  json_object_set_new(params, "seed", json_integer((json_int_t)p->seed));
  json_t *o = json_object();
  json_object_set_new(o, "id", json_string(j->id));
  json_object_set_new(o, "status", json_string(srv_job_state_names[j->state]));
  json_object_set_new(o, "progress", json_pack("{s:i,s:i}", "step", j->step, "steps", p->steps));
  json_object_set_new(o, "params", params);
  json_object_set_new(o, "model", json_string(j->model_name));
  json_object_set_new(o, "created_at", jtime(j->created));
  json_object_set_new(o, "started_at", jtime(j->started));
  json_object_set_new(o, "finished_at", jtime(j->finished));
  if (j->state == SRV_JOB_FAILED || j->state == SRV_JOB_CANCELED)
    json_object_set_new(o, "error", json_pack("{s:s,s:s}", "reason", j->reason, "message",
                                              j->message));
  else
    json_object_set_new(o, "error", json_null());
  char url[128];
  snprintf(url, sizeof url, "/v1/jobs/%s", j->id);
  json_object_set_new(o, "url", json_string(url));
  if (j->state == SRV_JOB_SUCCEEDED) {
    json_t *res = json_object();
    /* a copy: the stored list stays untouched while others dump theirs */
    if (samples) json_object_set_new(res, "samples", json_deep_copy(samples));
    snprintf(url, sizeof url, "/v1/jobs/%s/grid.png", j->id);
    json_object_set_new(res, "grid_url", json_string(url));
    snprintf(url, sizeof url, "/v1/jobs/%s/samples.npy", j->id);
    json_object_set_new(res, "npy_url", json_string(url));
    json_object_set_new(o, "result", res);
  } else {
    json_object_set_new(o, "result", json_null());
  }
  return o;
}

/* ------------------------------------------------------------------------ */
/* The store */

typedef struct job {
  srv_job_exec e;               /* first member: the scheduler hands back e.work */
  srv_job_rec rec;              /* published under the mutex */
  struct job *prev, *next;      /* store list, oldest first */
  int in_sched;                 /* submitted, done() still to come */
  int refs;                     /* handlers copying result bytes */
  int removed;                  /* no longer in the store */
  size_t bytes;                 /* charged to the store */
  uint64_t created_ns, finished_ns; /* monotonic: TTL and durations */
  int label;                    /* its model's metric label */
} job;

static const double dur_le[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};

static struct {
  pthread_mutex_t mu;
  job *head, *tail;
  int count, active;
  int decoding;                 /* admitted requests whose init images decode on a worker */
  size_t bytes;
  /* by model label (srv_metrics_model), then final state */
  unsigned long long created[SRV_METRIC_MODELS], finished[SRV_METRIC_MODELS][SRV_JOB_NSTATES],
      chain_steps[SRV_METRIC_MODELS];
  srv_hist dur[SRV_METRIC_MODELS][SRV_JOB_NSTATES]; /* creation to end */
} J = {.mu = PTHREAD_MUTEX_INITIALIZER};

static size_t result_bytes(const job *j) { return sizeof(job) + srv_job_result_bytes(&j->e.res); }

static void charge_locked(job *j, size_t bytes) {
  J.bytes = J.bytes - j->bytes + bytes;
  j->bytes = bytes;
}

static void job_free(job *j) {
  if (!j) return;
  srv_job_exec_free_chains(&j->e);
  srv_job_result_free(&j->e.res);
  free(j->rec.class_name);
  srv_model_put(j->e.sm);
  free(j);
}

static void finish_locked(job *j, int state, const char *reason, const char *message) {
  if (SRV_JOB_TERMINAL(j->rec.state)) return;
  j->rec.state = state;
  j->rec.finished = srv_wall_s();
  j->finished_ns = srv_now_ns();
  if (reason) snprintf(j->rec.reason, sizeof j->rec.reason, "%s", reason);
  if (message) snprintf(j->rec.message, sizeof j->rec.message, "%s", message);
  J.active--;
  J.finished[j->label][state]++;
  double d = (double)(j->finished_ns - j->created_ns) * 1e-9;
  srv_hist_obs(&J.dur[j->label][state], d);
  srv_log(SRV_LOG_INFO, "msg=\"job finished\" job=%s status=%s step=%d steps=%d seconds=%.3f%s%s",
          j->rec.id, srv_job_state_names[state], j->rec.step, j->rec.p.steps, d, reason ? " reason=" : "",
          reason ? reason : "");
}

/* Unlinks j; returns 1 when the caller must free it (after unlocking). */
static int remove_locked(job *j) {
  if (j->prev)
    j->prev->next = j->next;
  else
    J.head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    J.tail = j->prev;
  j->prev = j->next = NULL;
  j->removed = 1;
  J.count--;
  J.bytes -= j->bytes;
  j->bytes = 0;
  return !j->in_sched && j->refs == 0;
}

typedef struct free_list { job *items[64]; int n; } free_list;

/* Collects a job to free after the mutex is released (model puts may free a
 * whole model); frees at once if the list is full. */
static void defer_free(free_list *fl, job *j) {
  if (fl->n < (int)(sizeof fl->items / sizeof fl->items[0]))
    fl->items[fl->n++] = j;
  else
    job_free(j);
}

static void run_frees(free_list *fl) {
  for (int i = 0; i < fl->n; i++) job_free(fl->items[i]);
  fl->n = 0;
}

/* Drops finished jobs past their TTL (monotonic clock). */
static void sweep_locked(uint64_t now, free_list *fl) {
  uint64_t ttl = (uint64_t)srv_cfg.job_ttl * 1000000000ull;
  job *j = J.head;
  while (j) {
    job *nx = j->next;
    if (SRV_JOB_TERMINAL(j->rec.state) && now - j->finished_ns >= ttl) {
      srv_log(SRV_LOG_DEBUG, "msg=\"job expired\" job=%s", j->rec.id);
      if (remove_locked(j)) defer_free(fl, j);
    }
    j = nx;
  }
}

/* Makes room for one more job of `need` bytes by evicting finished jobs,
 * oldest first.  0 when there is room. */
static int make_room_locked(size_t need, free_list *fl) {
  job *j = J.head;
  while (j && (J.count + 1 > srv_cfg.max_jobs ||
               J.bytes + need > (size_t)srv_cfg.max_job_bytes)) {
    job *nx = j->next;
    if (SRV_JOB_TERMINAL(j->rec.state)) {
      srv_log(SRV_LOG_INFO, "msg=\"job evicted to make room\" job=%s", j->rec.id);
      if (remove_locked(j)) defer_free(fl, j);
    }
    j = nx;
  }
  return J.count + 1 > srv_cfg.max_jobs || J.bytes + need > (size_t)srv_cfg.max_job_bytes;
}

static job *find_locked(const char *id) {
  for (job *j = J.head; j; j = j->next)
    if (!memcmp(j->rec.id, id, 33)) return j;
  return NULL;
}
/* ------------------------------------------------------------------------ */
/* Work: begin() and done() around each slice of job_work.c */

static int job_begin(srv_job_exec *e) {
  job *j = (job *)e;
  pthread_mutex_lock(&J.mu);
  if (j->rec.state == SRV_JOB_QUEUED) {
    j->rec.state = SRV_JOB_RUNNING;
    j->rec.started = srv_wall_s();
  }
  int go = j->rec.state == SRV_JOB_RUNNING;
  pthread_mutex_unlock(&J.mu);
  return go;
}

/* An ended job no longer needs its chains nor its model (mutex held);
 * returns the model reference to put after unlocking. */
static srv_model *job_ended_locked(job *j, free_list *fl) {
  srv_job_exec_free_chains(&j->e);
  if (j->rec.state != SRV_JOB_SUCCEEDED) srv_job_result_free(&j->e.res);
  srv_model *put = j->e.sm;
  j->e.sm = NULL;
  if (!j->removed) charge_locked(j, result_bytes(j));
  if (j->removed && j->refs == 0) defer_free(fl, j);
  return put;
}

static void job_done(srv_work *w, int canceled) {
  job *j = (job *)w;
  free_list fl = {.n = 0};
  srv_model *put = NULL;
  pthread_mutex_lock(&J.mu);
  J.chain_steps[j->label] += j->e.chain_steps;
  j->e.chain_steps = 0;
  j->in_sched = 0;
  int resubmit = 0;
  /* A job canceled while its slice ran keeps the progress it had when the
   * cancel was answered: the step that slice was in does not count. */
  if (!SRV_JOB_TERMINAL(j->rec.state)) {
    j->rec.step = j->e.step;
    if (canceled)
      finish_locked(j, SRV_JOB_CANCELED, "shutdown",
                    "the server shut down before the job finished");
    else if (j->e.failed)
      finish_locked(j, SRV_JOB_FAILED, "internal", j->e.msg);
    else if (j->e.final)
      finish_locked(j, SRV_JOB_SUCCEEDED, NULL, NULL);
    else
      resubmit = 1;
  }
  if (resubmit)
    j->in_sched = 1;
  else
    put = job_ended_locked(j, &fl);
  pthread_mutex_unlock(&J.mu);
  if (resubmit && srv_sched_submit(w)) {
    /* the scheduler is stopping */
    pthread_mutex_lock(&J.mu);
    j->in_sched = 0;
    finish_locked(j, SRV_JOB_CANCELED, "shutdown", "the server shut down before the job finished");
    put = job_ended_locked(j, &fl);
    pthread_mutex_unlock(&J.mu);
  }
  run_frees(&fl);
  srv_model_put(put);
}

/* ------------------------------------------------------------------------ */
/* Operations */

static void queue_full(srv_job_ans *a, int active) {
  a->reject = SRV_JOB_REJ_QUEUE_FULL;
  a->metrics_reject = SRV_REJ_QUEUE_FULL;
  srv_job_ans_error(a, 429, "queue_full", "5",
                    "%d jobs are queued or running (the limit, --max-queued-jobs); retry later",
                    active);
}

static int mem_admit(srv_job_ans *a) {
  /* the queue check and the place it grants are one step: concurrent
   * requests cannot all pass it and be refused only after decoding */
  pthread_mutex_lock(&J.mu);
  int active = J.active + J.decoding, full = active >= srv_cfg.max_queued_jobs;
  if (!full) J.decoding++;
  pthread_mutex_unlock(&J.mu);
  if (full) queue_full(a, active);
  return full ? -1 : 0;
}

static void mem_unadmit(void) {
  pthread_mutex_lock(&J.mu);
  J.decoding--;
  pthread_mutex_unlock(&J.mu);
}

static void mem_create(srv_model *sm, srv_samples_req *q, int admitted, srv_job_ans *a) {
  const jem_model *m = sm->m;
  job *j = calloc(1, sizeof *j);
  char id[33];
  if (!j || srv_job_new_id(id)) {
    if (admitted) mem_unadmit();
    free(j);
    srv_samples_req_free(q);
    srv_model_put(sm);
    srv_job_ans_error(a, 503, "out_of_memory", "1", "cannot create a job right now");
    return;
  }
  srv_job_params p = {q->n, q->steps, q->y, q->init, q->clamp, q->step_size, q->noise, q->seed};
  int oom = srv_job_exec_init(&j->e, id, &p, sm, q->x);
  q->x = NULL;
  srv_samples_req_free(q);
  j->e.work.done = job_done;
  j->e.begin = job_begin;
  memcpy(j->rec.id, id, sizeof id);
  j->rec.p = p;
  snprintf(j->rec.model_name, sizeof j->rec.model_name, "%s", sm->name);
  j->label = sm->label;
  if (p.y >= 0 && !(j->rec.class_name = strdup(m->classes[p.y]))) oom = 1;
  if (oom) {
    if (admitted) mem_unadmit();
    job_free(j);
    srv_job_ans_error(a, 503, "out_of_memory", "1", "out of memory for %d chains", p.n);
    return;
  }
  size_t need = sizeof(job) + srv_job_estimate(m, p.n);
  if (need > (size_t)srv_cfg.max_job_bytes) {
    if (admitted) mem_unadmit();
    job_free(j);
    a->reject = SRV_JOB_REJ_INVALID;
    a->metrics_reject = SRV_REJ_TOO_LARGE;
    srv_job_ans_error(a, 422, "job_too_large", NULL,
                      "a job of %d samples needs about %zu bytes, more than --max-job-bytes "
                      "(%lld)", p.n, need, srv_cfg.max_job_bytes);
    return;
  }
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  double now = srv_wall_s();
  sweep_locked(srv_now_ns(), &fl);
  int why = -1;
  J.decoding -= admitted; /* its place becomes the job's, in this same step */
  if (J.active + J.decoding >= srv_cfg.max_queued_jobs)
    why = SRV_JOB_REJ_QUEUE_FULL;
  else if (make_room_locked(need, &fl))
    why = SRV_JOB_REJ_STORE_FULL;
  if (why >= 0) {
    int active = J.active, count = J.count;
    size_t bytes = J.bytes;
    pthread_mutex_unlock(&J.mu);
    run_frees(&fl);
    job_free(j);
    if (why == SRV_JOB_REJ_QUEUE_FULL) {
      queue_full(a, active);
    } else {
      a->reject = SRV_JOB_REJ_STORE_FULL;
      a->metrics_reject = SRV_REJ_STORE_FULL;
      srv_job_ans_error(a, 429, "store_full", "5",
                        "the job store is full (%d jobs, %zu bytes; limits --max-jobs %d, "
                        "--max-job-bytes %lld); retry later", count, bytes, srv_cfg.max_jobs,
                        srv_cfg.max_job_bytes);
    }
    return;
  }
  j->rec.created = now;
  j->created_ns = srv_now_ns();
  j->rec.state = SRV_JOB_QUEUED;
  j->in_sched = 1;
  j->bytes = need;
  J.bytes += need;
  j->prev = J.tail;
  if (J.tail)
    J.tail->next = j;
  else
    J.head = j;
  J.tail = j;
  J.count++;
  J.active++;
  J.created[j->label]++;
  json_t *o = srv_job_json(&j->rec, NULL);
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  srv_log(SRV_LOG_INFO, "msg=\"job created\" job=%s n=%d steps=%d class=%d init=%s seed=%llu",
          id, p.n, p.steps, p.y, srv_job_init_name(p.init), (unsigned long long)p.seed);
  if (srv_sched_submit(&j->e.work)) {
    json_decref(o);
    pthread_mutex_lock(&J.mu);
    j->in_sched = 0;
    finish_locked(j, SRV_JOB_CANCELED, "shutdown", "the server is shutting down");
    int f = remove_locked(j);
    pthread_mutex_unlock(&J.mu);
    if (f) job_free(j);
    srv_job_ans_error(a, 503, "draining", "5", "the server is shutting down and takes no new jobs");
    return;
  }
  a->status = 202;
  a->body = o;
  a->retry_after = "1";
  snprintf(a->location, sizeof a->location, "/v1/jobs/%s", id);
}

static void not_found(srv_job_ans *a, const char *id) {
  srv_job_ans_error(a, 404, "job_not_found", NULL,
                    "no job %s (unknown, or expired after --job-ttl %d s)", id, srv_cfg.job_ttl);
}

/* The job object with its samples (mutex held); Retry-After while it runs. */
static void answer_job_locked(const job *j, srv_job_ans *a) {
  a->status = 200;
  a->body = srv_job_json(&j->rec, j->e.res.samples);
  a->retry_after = SRV_JOB_TERMINAL(j->rec.state) ? NULL : "1";
}

static void mem_get(const char *id, srv_job_ans *a) {
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  if (j) answer_job_locked(j, a);
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) not_found(a, id);
}

static void mem_cancel(const char *id, srv_job_ans *a) {
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  if (j) {
    if (!SRV_JOB_TERMINAL(j->rec.state)) {
      /* the worker stops at its next step; done() frees the chains */
      atomic_store(&j->e.cancel, 1);
      finish_locked(j, SRV_JOB_CANCELED, "canceled", "canceled by a DELETE request");
    }
    /* DELETE removes the resource, finished or not: the answer is its last
     * state, and later requests for it or its results get 404 */
    answer_job_locked(j, a);
    if (remove_locked(j)) defer_free(&fl, j);
  }
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) not_found(a, id);
}

static void mem_list(srv_job_ans *a) {
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  json_t *arr = json_array();
  for (job *j = J.head; j; j = j->next) json_array_append_new(arr, srv_job_json(&j->rec, NULL));
  a->status = 200;
  a->body = json_pack("{s:o,s:i,s:i}", "jobs", arr, "count", J.count, "active", J.active);
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
}

static void release_result(void *p) {
  job *j = p;
  pthread_mutex_lock(&J.mu);
  int f = --j->refs == 0 && j->removed && !j->in_sched;
  pthread_mutex_unlock(&J.mu);
  if (f) job_free(j);
}

static void mem_result(const char *id, int what, long k, srv_job_ans *a) {
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  int state = j ? j->rec.state : -1, n = j ? j->rec.p.n : 0;
  if (j && state == SRV_JOB_SUCCEEDED && k < n) j->refs++;
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) return not_found(a, id);
  if (state != SRV_JOB_SUCCEEDED)
    return srv_job_ans_error(a, 409, "job_not_succeeded", SRV_JOB_TERMINAL(state) ? NULL : "1",
                             "job %s is %s; its samples exist once it has succeeded", id,
                             srv_job_state_names[state]);
  if (k >= n)
    return srv_job_ans_error(a, 404, "sample_not_found", NULL,
                             "no sample %ld: job %s has samples 0 to %d", k, id, n - 1);
  /* results are immutable while refs > 0 */
  const srv_job_result *r = &j->e.res;
  a->status = 200;
  a->bytes = what == SRV_JOB_RES_NPY ? r->npy : what == SRV_JOB_RES_GRID ? r->grid : r->png[k];
  a->len = what == SRV_JOB_RES_NPY    ? r->npy_len
           : what == SRV_JOB_RES_GRID ? r->grid_len
                                      : r->png_len[k];
  a->release = release_result;
  a->ctx = j;
}

/* ------------------------------------------------------------------------ */
/* Lifecycle and metrics */

static int mem_start(void) {
  for (int mi = 0; mi < SRV_METRIC_MODELS; mi++)
    for (int s = 0; s < SRV_JOB_NSTATES; s++) srv_hist_init(&J.dur[mi][s], dur_le, SRV_NB(dur_le));
  return 0;
}

static int mem_active(void) {
  pthread_mutex_lock(&J.mu);
  int n = J.active;
  pthread_mutex_unlock(&J.mu);
  return n;
}

static void mem_shutdown(void) {
  const char *reason = "shutdown";
  int n = 0;
  pthread_mutex_lock(&J.mu);
  for (job *j = J.head; j; j = j->next)
    if (!SRV_JOB_TERMINAL(j->rec.state)) {
      atomic_store(&j->e.cancel, 1);
      finish_locked(j, SRV_JOB_CANCELED, reason,
                    "the server shut down before the job finished (drain deadline)");
      n++;
    }
  pthread_mutex_unlock(&J.mu);
  if (n) srv_log(SRV_LOG_WARN, "msg=\"canceled unfinished jobs\" jobs=%d reason=%s", n, reason);
}

static void mem_free(void) {
  pthread_mutex_lock(&J.mu);
  job *j = J.head;
  J.head = J.tail = NULL;
  J.count = 0;
  J.bytes = 0;
  pthread_mutex_unlock(&J.mu);
  /* the scheduler has stopped: no run() or done() is left */
  while (j) {
    job *nx = j->next;
    job_free(j);
    j = nx;
  }
}

static void mem_metrics(srv_mbuf *b) {
  int by_state[SRV_JOB_NSTATES] = {0};
  pthread_mutex_lock(&J.mu);
  for (job *j = J.head; j; j = j->next) by_state[j->rec.state]++;
  srv_mprintf(b, "# HELP jem_jobs Stored SGLD jobs by state.\n# TYPE jem_jobs gauge\n");
  for (int s = 0; s < SRV_JOB_NSTATES; s++)
    srv_mprintf(b, "jem_jobs{state=\"%s\"} %d\n", srv_job_state_names[s], by_state[s]);
  srv_mprintf(b, "# HELP jem_job_store_bytes Memory charged to stored jobs (chains and results).\n"
             "# TYPE jem_job_store_bytes gauge\njem_job_store_bytes %zu\n", J.bytes);
  int nm = srv_metrics_models();
  char ml[300], lab[400];
  srv_mhead(b, "jem_jobs_created_total", "counter", "SGLD jobs accepted, by model.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    srv_mprintf(b, "jem_jobs_created_total{%s} %llu\n", ml, J.created[mi]);
  }
  srv_mhead(b, "jem_jobs_finished_total", "counter",
            "SGLD jobs that ended, by model and final status.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    for (int s = SRV_JOB_SUCCEEDED; s < SRV_JOB_NSTATES; s++)
      srv_mprintf(b, "jem_jobs_finished_total{%s,status=\"%s\"} %llu\n", ml,
                  srv_job_state_names[s], J.finished[mi][s]);
  }
  srv_mhead(b, "jem_sgld_chain_steps_total", "counter",
            "SGLD steps run, summed over chains, by model.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    srv_mprintf(b, "jem_sgld_chain_steps_total{%s} %llu\n", ml, J.chain_steps[mi]);
  }
  srv_mhead(b, "jem_job_duration_seconds", "histogram",
            "Time from creation to the end of a job, by model and final status.");
  for (int mi = 1; mi < nm; mi++)
    for (int s = SRV_JOB_SUCCEEDED; s < SRV_JOB_NSTATES; s++) {
      if (srv_hist_empty(&J.dur[mi][s])) continue;
      srv_mlabel_model(ml, sizeof ml, "", mi);
      snprintf(lab, sizeof lab, "%s,status=\"%s\"", ml, srv_job_state_names[s]);
      srv_mhist(b, "jem_job_duration_seconds", lab, &J.dur[mi][s]);
    }
  pthread_mutex_unlock(&J.mu);
}

static const char *mem_state(void) { return "ok"; }

const srv_job_store srv_job_store_memory = {
    .name = "memory",
    .start = mem_start,
    .admit = mem_admit,
    .unadmit = mem_unadmit,
    .create = mem_create,
    .get = mem_get,
    .cancel = mem_cancel,
    .list = mem_list,
    .result = mem_result,
    .active = mem_active,
    .shutdown = mem_shutdown,
    .free = mem_free,
    .metrics = mem_metrics,
    .state = mem_state,
};
