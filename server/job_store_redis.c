/* job_store_redis.c - the Redis job store (--job-store redis://...): jobs
 * live in Redis, so every replica answers for every job, jobs outlive the
 * replica that accepted them, and an idle replica takes the next one.
 * Slightly long because the Lua scripts, the store thread and the handlers
 * share one state (R) that no other file should see.
 *
 * Keys (prefix "jemd:"):
 *   job:ID      hash: state, step, params (JSON), model, class_name,
 *               created/started/finished, reason, message, owner, init_x
 *               (the decoded init images, float32), and once succeeded
 *               samples (JSON), grid, npy, png:K.  Expires --job-ttl after
 *               the job ends.
 *   queue       list of queued ids (RPUSH on create, LPOP on claim)
 *   running     set of claimed ids
 *   lease:ID    the claiming replica's id, PX --job-lease-ms, renewed by
 *               that replica about every 100 ms
 *   jobs        sorted set of ids by creation time (listing)
 * Every step that reads and writes together is one Lua script, so claims,
 * take-overs, cancels and results are atomic.
 *
 * Work.  A store thread (one per replica) claims a job while this replica
 * runs fewer than --workers jobs and is not draining: first a claimed job
 * whose lease lapsed (its replica died: a take-over), else the queue's
 * head.  The job then runs in slices on this replica's workers exactly as
 * with the memory store (job_work.c), from the seed (and the stored init
 * images), so a take-over reruns it and gives the same bytes.  The thread
 * renews the leases of its jobs and writes their progress; it sees a
 * DELETE there (state no longer queued/running) and stops the chains.  When
 * a job ends, the thread writes its results, unless it ended meanwhile.
 *
 * Failures.  Every Redis call has a 1 s timeout; a failure drops the
 * connection, is counted (jem_job_store_errors_total), and job routes answer
 * 503 job_store_unavailable with Retry-After until a reconnect (with
 * backoff, 100 ms doubling to 5 s) succeeds.  Scoring never touches Redis.
 * A wrong password or user is a configuration error: startup fails.
 *
 * Models.  A job records the model it was created for and runs on it; a
 * replica that claims a job whose model it does not serve fails the job
 * with a message naming both (replicas sharing a store serve the same
 * models).
 */
#include "job_store.h"
#include "redis.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PREFIX "jemd:"
#define TICK_MS 100

/* ------------------------------------------------------------------------ */
/* Connections */

typedef struct rjob {
  srv_job_exec e;               /* first member: the scheduler hands back e.work */
  struct rjob *next;            /* the store thread's list */
  atomic_int ended;             /* done() will not resubmit: publish or drop */
  atomic_int step;              /* progress published by done() */
  int lost;                     /* the job ended elsewhere or the lease went: drop */
  uint64_t created_ns;
  int label;                    /* its model's metric label */
} rjob;

static struct {
  srv_redis to;
  char me[96];                  /* this replica's id: host:pid:random */
  srv_rconn http, bg;               /* handlers' connection, the store thread's */
  pthread_t thread;
  int thread_started;
  atomic_int stop;
  rjob *local;                  /* store thread only (and srv_jobs_free) */
  atomic_int n_local;           /* local jobs not yet ended */
  atomic_ullong takeovers;
  /* by model label (srv_metrics_model), then final state */
  atomic_ullong created[SRV_METRIC_MODELS], chain_steps[SRV_METRIC_MODELS],
      finished[SRV_METRIC_MODELS][SRV_JOB_NSTATES];
} R = {.http = {.mu = PTHREAD_MUTEX_INITIALIZER, .to = &R.to},
       .bg = {.mu = PTHREAD_MUTEX_INITIALIZER, .to = &R.to}};

static void unavailable(srv_job_ans *a, const char *err) {
  srv_job_ans_error(a, 503, "job_store_unavailable", "2",
                    "the job store is unavailable (%s); retry shortly", err);
}

/* ------------------------------------------------------------------------ */
/* The job record in a hash */

/* The fields srv_job_json needs, in this order (HMGET). */
static const char *const REC_FIELDS[] = {"state", "step", "params", "model", "class_name",
                                         "created", "started", "finished", "reason",
                                         "message", "samples"};
#define N_REC ((int)(sizeof REC_FIELDS / sizeof REC_FIELDS[0]))

static char *params_json(const srv_job_params *p) {
  json_t *o = json_pack("{s:i,s:i,s:i,s:i,s:b,s:f,s:f,s:I}", "n", p->n, "steps", p->steps, "y",
                        p->y, "init", p->init, "clamp", p->clamp, "step_size", p->step_size,
                        "noise", p->noise, "seed", (json_int_t)p->seed);
  char *s = o ? json_dumps(o, JSON_COMPACT) : NULL; /* doubles to 17 digits: exact */
  json_decref(o);
  return s;
}

static int params_parse(const char *s, srv_job_params *p) {
  json_t *o = s ? json_loads(s, 0, NULL) : NULL;
  json_int_t seed = 0;
  int clamp = 0;
  int bad = !o || json_unpack(o, "{s:i,s:i,s:i,s:i,s:b,s:F,s:F,s:I}", "n", &p->n, "steps",
                              &p->steps, "y", &p->y, "init", &p->init, "clamp", &clamp,
                              "step_size", &p->step_size, "noise", &p->noise, "seed", &seed);
  json_decref(o);
  p->clamp = clamp;
  p->seed = (uint64_t)seed;
  return bad || p->n < 1 || p->steps < 1 ? -1 : 0;
}

static void rargv_rec_fields(srv_rargv *a) {
  for (int i = 0; i < N_REC; i++) srv_ra_str(a, REC_FIELDS[i]);
}

/* Fills rec (and *samples, the parsed list, when asked and succeeded) from
 * an HMGET of REC_FIELDS starting at element off of r; -1 when the job
 * does not exist. */
static int rec_from(const redisReply *r, size_t off, const char *id, srv_job_rec *rec,
                    json_t **samples) {
  memset(rec, 0, sizeof *rec);
  const char *st = srv_rstr(r, off, NULL), *params = srv_rstr(r, off + 2, NULL);
  if (!st || params_parse(params, &rec->p)) return -1;
  snprintf(rec->id, sizeof rec->id, "%s", id);
  rec->state = (int)strtol(st, NULL, 10);
  if (rec->state < 0 || rec->state >= SRV_JOB_NSTATES) rec->state = SRV_JOB_FAILED;
  rec->step = (int)srv_rint(r, off + 1, 0);
  const char *s;
  if ((s = srv_rstr(r, off + 3, NULL))) snprintf(rec->model_name, sizeof rec->model_name, "%s", s);
  if ((s = srv_rstr(r, off + 4, NULL)) && s[0]) rec->class_name = strdup(s);
  double *t[3] = {&rec->created, &rec->started, &rec->finished};
  for (int i = 0; i < 3; i++)
    if ((s = srv_rstr(r, off + 5 + (size_t)i, NULL))) *t[i] = strtod(s, NULL);
  if ((s = srv_rstr(r, off + 8, NULL))) snprintf(rec->reason, sizeof rec->reason, "%s", s);
  if ((s = srv_rstr(r, off + 9, NULL))) snprintf(rec->message, sizeof rec->message, "%s", s);
  if (samples) {
    *samples = NULL;
    if (rec->state == SRV_JOB_SUCCEEDED && (s = srv_rstr(r, off + 10, NULL)))
      *samples = json_loads(s, 0, NULL);
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Scripts */

/* KEYS: job, queue, running, jobs; ARGV: max_queued, id, created, field, value, ... */
static const char CREATE_LUA[] =
    "local active = redis.call('LLEN', KEYS[2]) + redis.call('SCARD', KEYS[3])\n"
    "if active >= tonumber(ARGV[1]) then return active end\n"
    "redis.call('HSET', KEYS[1], unpack(ARGV, 4))\n"
    "redis.call('RPUSH', KEYS[2], ARGV[2])\n"
    "redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])\n"
    "return -1\n";

/* KEYS: queue, running; ARGV: me, lease_ms, now.  {id, 1 if a take-over}
 * or nil: a claimed job whose lease lapsed first, else the queue's head. */
static const char CLAIM_LUA[] =
    "local function take(id, over)\n"
    "  local job = 'jemd:job:' .. id\n"
    "  redis.call('SET', 'jemd:lease:' .. id, ARGV[1], 'PX', ARGV[2])\n"
    "  redis.call('HSET', job, 'state', 1, 'owner', ARGV[1], 'step', 0)\n"
    "  if not redis.call('HGET', job, 'started') then\n"
    "    redis.call('HSET', job, 'started', ARGV[3]) end\n"
    "  return {id, over}\n"
    "end\n"
    "for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do\n"
    "  if redis.call('EXISTS', 'jemd:lease:' .. id) == 0 then\n"
    "    local st = redis.call('HGET', 'jemd:job:' .. id, 'state')\n"
    "    if st == '0' or st == '1' then return take(id, 1) end\n"
    "    redis.call('SREM', KEYS[2], id)\n"
    "  end\n"
    "end\n"
    "while true do\n"
    "  local id = redis.call('LPOP', KEYS[1])\n"
    "  if not id then return nil end\n"
    "  if redis.call('HGET', 'jemd:job:' .. id, 'state') == '0' then\n"
    "    redis.call('SADD', KEYS[2], id)\n"
    "    return take(id, 0)\n"
    "  end\n"
    "end\n";

/* KEYS: job, lease; ARGV: me, lease_ms, step.  0 keep going, -1 the job
 * ended or is gone, -2 another replica holds the lease. */
static const char RENEW_LUA[] =
    "local st = redis.call('HGET', KEYS[1], 'state')\n"
    "if st ~= '0' and st ~= '1' then return -1 end\n"
    "local owner = redis.call('GET', KEYS[2])\n"
    "if owner and owner ~= ARGV[1] then return -2 end\n"
    "redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])\n"
    "redis.call('HSET', KEYS[1], 'step', ARGV[3])\n"
    "return 0\n";

/* KEYS: job, lease, running; ARGV: id, ttl, state, step, finished, reason,
 * message[, samples, grid, npy, png0, ...].  1 written, 0 ended meanwhile. */
static const char PUBLISH_LUA[] =
    "local st = redis.call('HGET', KEYS[1], 'state')\n"
    "if st ~= '0' and st ~= '1' then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'state', ARGV[3], 'step', ARGV[4], 'finished', ARGV[5],\n"
    "           'reason', ARGV[6], 'message', ARGV[7])\n"
    "if #ARGV >= 10 then\n"
    "  redis.call('HSET', KEYS[1], 'samples', ARGV[8], 'grid', ARGV[9], 'npy', ARGV[10])\n"
    "  for i = 11, #ARGV do redis.call('HSET', KEYS[1], 'png:' .. (i - 11), ARGV[i]) end\n"
    "end\n"
    "redis.call('HDEL', KEYS[1], 'init_x', 'owner')\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[2])\n"
    "redis.call('SREM', KEYS[3], ARGV[1])\n"
    "redis.call('DEL', KEYS[2])\n"
    "return 1\n";

/* KEYS: job, lease, running, queue, jobs; ARGV: id, finished, then the
 * record's fields.  The record as it was answered (canceled if it had not
 * ended), then the job is deleted; nil when it does not exist. */
static const char DELETE_LUA[] =
    "local st = redis.call('HGET', KEYS[1], 'state')\n"
    "if not st then redis.call('ZREM', KEYS[5], ARGV[1]) return nil end\n"
    "if st == '0' or st == '1' then\n"
    "  redis.call('HSET', KEYS[1], 'state', 4, 'finished', ARGV[2], 'reason', 'canceled',\n"
    "             'message', 'canceled by a DELETE request')\n"
    "end\n"
    "local rec = redis.call('HMGET', KEYS[1], unpack(ARGV, 3))\n"
    "redis.call('DEL', KEYS[1], KEYS[2])\n"
    "redis.call('SREM', KEYS[3], ARGV[1])\n"
    "redis.call('LREM', KEYS[4], 0, ARGV[1])\n"
    "redis.call('ZREM', KEYS[5], ARGV[1])\n"
    "return rec\n";

static void ra_eval(srv_rargv *a, const char *script, int nkeys) {
  srv_ra_str(a, "EVAL");
  srv_ra_str(a, script);
  srv_ra_fmt(a, "%d", nkeys);
}

/* ------------------------------------------------------------------------ */
/* Operations (HTTP threads, on R.http) */

/* A handler's command, on the handlers' connection. */
static redisReply *http_cmd(srv_rargv *ra, char *err, size_t errlen) {
  pthread_mutex_lock(&R.http.mu);
  redisReply *r = srv_rcmd(&R.http, ra, err, errlen);
  pthread_mutex_unlock(&R.http.mu);
  return r;
}

static void r_create(srv_model *sm, srv_samples_req *q, int admitted, srv_job_ans *a) {
  (void)admitted;
  const jem_model *m = sm->m;
  srv_job_params p = {q->n, q->steps, q->y, q->init, q->clamp, q->step_size, q->noise, q->seed};
  char id[33];
  size_t need = srv_job_estimate(m, p.n);
  char *params = params_json(&p);
  if (!params || srv_job_new_id(id)) {
    free(params);
    srv_samples_req_free(q);
    srv_model_put(sm);
    return srv_job_ans_error(a, 503, "out_of_memory", "1", "cannot create a job right now");
  }
  if (need > (size_t)srv_cfg.max_job_bytes) {
    free(params);
    srv_samples_req_free(q);
    srv_model_put(sm);
    a->reject = SRV_JOB_REJ_INVALID;
    a->metrics_reject = SRV_REJ_TOO_LARGE;
    return srv_job_ans_error(a, 422, "job_too_large",
                             NULL, "a job of %d samples needs about %zu bytes, more than "
                             "--max-job-bytes (%lld)", p.n, need, srv_cfg.max_job_bytes);
  }
  srv_job_rec rec;
  memset(&rec, 0, sizeof rec);
  memcpy(rec.id, id, sizeof id);
  rec.state = SRV_JOB_QUEUED;
  rec.p = p;
  rec.created = srv_wall_s();
  snprintf(rec.model_name, sizeof rec.model_name, "%s", sm->name); /* claim() runs it on it */
  rec.class_name = p.y >= 0 ? m->classes[p.y] : NULL;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  srv_rargv ra = {0};
  ra_eval(&ra, CREATE_LUA, 4);
  srv_ra_fmt(&ra, PREFIX "job:%s", id);
  srv_ra_str(&ra, PREFIX "queue");
  srv_ra_str(&ra, PREFIX "running");
  srv_ra_str(&ra, PREFIX "jobs");
  srv_ra_fmt(&ra, "%d", srv_cfg.max_queued_jobs);
  srv_ra_str(&ra, id);
  srv_ra_fmt(&ra, "%.6f", rec.created);
  srv_ra_str(&ra, "state");
  srv_ra_str(&ra, "0");
  srv_ra_str(&ra, "step");
  srv_ra_str(&ra, "0");
  srv_ra_str(&ra, "params");
  srv_ra_str(&ra, params);
  srv_ra_str(&ra, "model");
  srv_ra_str(&ra, rec.model_name);
  srv_ra_str(&ra, "created");
  srv_ra_fmt(&ra, "%.6f", rec.created);
  if (rec.class_name) {
    srv_ra_str(&ra, "class_name");
    srv_ra_str(&ra, rec.class_name);
  }
  if (q->x) { /* the decoded init images: a take-over starts from them too */
    srv_ra_str(&ra, "init_x");
    srv_ra_add(&ra, q->x, sizeof(float) * chw * (size_t)p.n);
  }
  char err[400];
  redisReply *r = http_cmd(&ra, err, sizeof err);
  free(params);
  srv_samples_req_free(q);
  if (!r) {
    srv_model_put(sm);
    return unavailable(a, err);
  }
  long long active = r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
  freeReplyObject(r);
  if (active >= 0) {
    srv_model_put(sm);
    a->reject = SRV_JOB_REJ_QUEUE_FULL;
    a->metrics_reject = SRV_REJ_QUEUE_FULL;
    return srv_job_ans_error(a, 429, "queue_full", "5",
                             "%lld jobs are queued or running (the limit, --max-queued-jobs); "
                             "retry later", active);
  }
  atomic_fetch_add(&R.created[sm->label], 1);
  srv_log(SRV_LOG_INFO, "msg=\"job created\" job=%s n=%d steps=%d class=%d init=%s seed=%llu "
          "store=redis", id, p.n, p.steps, p.y, srv_job_init_name(p.init),
          (unsigned long long)p.seed);
  a->status = 202;
  a->body = srv_job_json(&rec, NULL);
  a->retry_after = "1";
  snprintf(a->location, sizeof a->location, "/v1/jobs/%s", id);
  srv_model_put(sm);
}

static void not_found(srv_job_ans *a, const char *id) {
  srv_job_ans_error(a, 404, "job_not_found", NULL,
                    "no job %s (unknown, or expired after --job-ttl %d s)", id, srv_cfg.job_ttl);
}

/* The job object from an HMGET reply of REC_FIELDS. */
static void answer_rec(const redisReply *r, const char *id, srv_job_ans *a) {
  srv_job_rec rec;
  json_t *samples = NULL;
  if (rec_from(r, 0, id, &rec, &samples)) return not_found(a, id);
  a->status = 200;
  a->body = srv_job_json(&rec, samples);
  a->retry_after = SRV_JOB_TERMINAL(rec.state) ? NULL : "1";
  json_decref(samples);
  free(rec.class_name);
}

/* Runs ra, an HMGET of REC_FIELDS or a script answering one, and answers. */
static void answer_cmd(srv_rargv *ra, const char *id, srv_job_ans *a) {
  char err[400];
  redisReply *r = http_cmd(ra, err, sizeof err);
  if (!r) return unavailable(a, err);
  answer_rec(r, id, a);
  freeReplyObject(r);
}

static void r_get(const char *id, srv_job_ans *a) {
  srv_rargv ra = {0};
  srv_ra_str(&ra, "HMGET");
  srv_ra_fmt(&ra, PREFIX "job:%s", id);
  rargv_rec_fields(&ra);
  answer_cmd(&ra, id, a);
}

static void r_cancel(const char *id, srv_job_ans *a) {
  srv_rargv ra = {0};
  ra_eval(&ra, DELETE_LUA, 5);
  srv_ra_fmt(&ra, PREFIX "job:%s", id);
  srv_ra_fmt(&ra, PREFIX "lease:%s", id);
  srv_ra_str(&ra, PREFIX "running");
  srv_ra_str(&ra, PREFIX "queue");
  srv_ra_str(&ra, PREFIX "jobs");
  srv_ra_str(&ra, id);
  srv_ra_fmt(&ra, "%.6f", srv_wall_s());
  rargv_rec_fields(&ra);
  answer_cmd(&ra, id, a);
}

static void r_list(srv_job_ans *a) {
  char err[400];
  srv_rargv ra = {0};
  srv_ra_str(&ra, "ZRANGE");
  srv_ra_str(&ra, PREFIX "jobs");
  srv_ra_str(&ra, "0");
  srv_ra_str(&ra, "-1");
  pthread_mutex_lock(&R.http.mu);
  redisReply *ids = srv_rcmd(&R.http, &ra, err, sizeof err);
  json_t *arr = json_array();
  int count = 0, active = 0, failed = !ids;
  for (size_t i = 0; ids && i < ids->elements && !failed; i++) {
    const char *id = srv_rstr(ids, i, NULL);
    if (!id || !srv_job_id_valid(id)) continue;
    srv_rargv rb = {0};
    srv_ra_str(&rb, "HMGET");
    srv_ra_fmt(&rb, PREFIX "job:%s", id);
    rargv_rec_fields(&rb);
    redisReply *r = srv_rcmd(&R.http, &rb, err, sizeof err);
    srv_job_rec rec;
    if (!r) {
      failed = 1;
    } else if (rec_from(r, 0, id, &rec, NULL) == 0) {
      json_array_append_new(arr, srv_job_json(&rec, NULL));
      count++;
      active += !SRV_JOB_TERMINAL(rec.state);
      free(rec.class_name);
    } else { /* expired: forget it */
      srv_rargv rz = {0};
      srv_ra_str(&rz, "ZREM");
      srv_ra_str(&rz, PREFIX "jobs");
      srv_ra_str(&rz, id);
      redisReply *z = srv_rcmd(&R.http, &rz, err, sizeof err);
      if (z) freeReplyObject(z);
    }
    if (r) freeReplyObject(r);
  }
  pthread_mutex_unlock(&R.http.mu);
  if (ids) freeReplyObject(ids);
  if (failed) {
    json_decref(arr);
    return unavailable(a, err);
  }
  a->status = 200;
  a->body = json_pack("{s:o,s:i,s:i}", "jobs", arr, "count", count, "active", active);
}

static void free_reply(void *p) { freeReplyObject(p); }

static void r_result(const char *id, int what, long k, srv_job_ans *a) {
  srv_rargv ra = {0};
  srv_ra_str(&ra, "HMGET");
  srv_ra_fmt(&ra, PREFIX "job:%s", id);
  srv_ra_str(&ra, "state");
  srv_ra_str(&ra, "params");
  if (what == SRV_JOB_RES_GRID)
    srv_ra_str(&ra, "grid");
  else if (what == SRV_JOB_RES_NPY)
    srv_ra_str(&ra, "npy");
  else
    srv_ra_fmt(&ra, "png:%ld", k);
  char err[400];
  redisReply *r = http_cmd(&ra, err, sizeof err);
  if (!r) return unavailable(a, err);
  srv_job_params p;
  const char *st = srv_rstr(r, 0, NULL);
  if (!st || params_parse(srv_rstr(r, 1, NULL), &p)) {
    freeReplyObject(r);
    return not_found(a, id);
  }
  int state = (int)strtol(st, NULL, 10);
  if (state < 0 || state >= SRV_JOB_NSTATES) state = SRV_JOB_FAILED;
  size_t len = 0;
  const char *bytes = srv_rstr(r, 2, &len);
  if (state != SRV_JOB_SUCCEEDED) {
    freeReplyObject(r);
    return srv_job_ans_error(a, 409, "job_not_succeeded", SRV_JOB_TERMINAL(state) ? NULL : "1",
                             "job %s is %s; its samples exist once it has succeeded", id,
                             srv_job_state_names[state]);
  }
  if (k >= p.n || !bytes) {
    freeReplyObject(r);
    return srv_job_ans_error(a, 404, "sample_not_found", NULL,
                             "no sample %ld: job %s has samples 0 to %d", k, id, p.n - 1);
  }
  a->status = 200;
  a->bytes = bytes;
  a->len = len;
  a->release = free_reply;
  a->ctx = r;
}

/* ------------------------------------------------------------------------ */
/* The store thread: claims, leases, progress, results (on R.bg) */

static void rjob_done(srv_work *w, int canceled) {
  rjob *j = (rjob *)w;
  atomic_fetch_add(&R.chain_steps[j->label], j->e.chain_steps);
  j->e.chain_steps = 0;
  atomic_store(&j->step, j->e.step);
  if (!canceled && !j->e.final && !j->e.failed && !atomic_load(&j->e.cancel) &&
      srv_sched_submit(w) == 0)
    return;
  if (canceled) atomic_store(&j->e.cancel, 1); /* shutting down: not ours to finish */
  srv_job_exec_free_chains(&j->e);
  atomic_store(&j->ended, 1);
  atomic_fetch_sub(&R.n_local, 1);
}

static void rjob_free(rjob *j) {
  srv_job_exec_free_chains(&j->e);
  srv_job_result_free(&j->e.res);
  srv_model_put(j->e.sm);
  free(j);
}

/* Writes an ended job's outcome; 0 done (written, or ended elsewhere), -1
 * when Redis failed (try again next tick). */
static int publish(rjob *j) {
  int canceled = atomic_load(&j->e.cancel) && !j->e.final;
  if (j->lost || canceled) return 0; /* DELETE, another replica, or shutdown */
  int state = j->e.final ? SRV_JOB_SUCCEEDED : SRV_JOB_FAILED;
  srv_rargv ra = {0};
  ra_eval(&ra, PUBLISH_LUA, 3);
  srv_ra_fmt(&ra, PREFIX "job:%s", j->e.id);
  srv_ra_fmt(&ra, PREFIX "lease:%s", j->e.id);
  srv_ra_str(&ra, PREFIX "running");
  srv_ra_str(&ra, j->e.id);
  srv_ra_fmt(&ra, "%d", srv_cfg.job_ttl);
  srv_ra_fmt(&ra, "%d", state);
  srv_ra_fmt(&ra, "%d", j->e.step);
  srv_ra_fmt(&ra, "%.6f", srv_wall_s());
  srv_ra_str(&ra, state == SRV_JOB_FAILED ? "internal" : "");
  srv_ra_str(&ra, state == SRV_JOB_FAILED ? j->e.msg : "");
  char *samples = NULL;
  const srv_job_result *res = &j->e.res;
  if (state == SRV_JOB_SUCCEEDED) {
    samples = json_dumps(res->samples, JSON_COMPACT); /* 17 digits: reads back exactly */
    srv_ra_str(&ra, samples);
    srv_ra_add(&ra, res->grid, res->grid_len);
    srv_ra_add(&ra, res->npy, res->npy_len);
    for (int k = 0; k < res->n; k++) srv_ra_add(&ra, res->png[k], res->png_len[k]);
    if (!samples) ra.oom = 1;
  }
  char err[400];
  redisReply *r = srv_rcmd(&R.bg, &ra, err, sizeof err);
  free(samples);
  if (!r) {
    srv_log(SRV_LOG_WARN, "msg=\"cannot store a job's result yet\" job=%s error=\"%s\"",
            j->e.id, err);
    return -1;
  }
  if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) {
    atomic_fetch_add(&R.finished[j->label][state], 1);
    srv_log(SRV_LOG_INFO, "msg=\"job finished\" job=%s status=%s step=%d steps=%d seconds=%.3f "
            "store=redis", j->e.id, srv_job_state_names[state], j->e.step, j->e.p.steps,
            (double)(srv_now_ns() - j->created_ns) * 1e-9);
  }
  freeReplyObject(r);
  return 0;
}

static void renew(rjob *j) {
  srv_rargv ra = {0};
  ra_eval(&ra, RENEW_LUA, 2);
  srv_ra_fmt(&ra, PREFIX "job:%s", j->e.id);
  srv_ra_fmt(&ra, PREFIX "lease:%s", j->e.id);
  srv_ra_str(&ra, R.me);
  srv_ra_fmt(&ra, "%d", srv_cfg.job_lease_ms);
  srv_ra_fmt(&ra, "%d", atomic_load(&j->step));
  char err[400];
  redisReply *r = srv_rcmd(&R.bg, &ra, err, sizeof err);
  if (!r) return; /* keep computing; the lease may still hold when Redis is back */
  if (r->type == REDIS_REPLY_INTEGER && r->integer < 0) {
    srv_log(SRV_LOG_INFO, "msg=\"job stopped here: %s\" job=%s",
            r->integer == -1 ? "it ended or was deleted" : "another replica took it over",
            j->e.id);
    j->lost = 1;
    atomic_store(&j->e.cancel, 1);
  }
  freeReplyObject(r);
}

/* Marks a job this replica claimed but cannot run as failed. */
static void fail_claimed(const char *id, const char *why) {
  rjob tmp;
  memset(&tmp, 0, sizeof tmp);
  snprintf(tmp.e.id, sizeof tmp.e.id, "%s", id);
  tmp.e.failed = 1;
  snprintf(tmp.e.msg, sizeof tmp.e.msg, "%s", why);
  publish(&tmp);
}

/* Claims and starts one job; 1 when one was started. */
static int claim(void) {
  srv_rargv ra = {0};
  ra_eval(&ra, CLAIM_LUA, 2);
  srv_ra_str(&ra, PREFIX "queue");
  srv_ra_str(&ra, PREFIX "running");
  srv_ra_str(&ra, R.me);
  srv_ra_fmt(&ra, "%d", srv_cfg.job_lease_ms);
  srv_ra_fmt(&ra, "%.6f", srv_wall_s());
  char err[400], id[33];
  redisReply *r = srv_rcmd(&R.bg, &ra, err, sizeof err);
  if (!r) return 0;
  const char *s = srv_rstr(r, 0, NULL);
  int over = (int)srv_rint(r, 1, 0);
  int got = s && srv_job_id_valid(s);
  if (got) snprintf(id, sizeof id, "%s", s);
  freeReplyObject(r);
  if (!got) return 0;
  srv_rargv rb = {0};
  srv_ra_str(&rb, "HMGET");
  srv_ra_fmt(&rb, PREFIX "job:%s", id);
  srv_ra_str(&rb, "params");
  srv_ra_str(&rb, "init_x");
  srv_ra_str(&rb, "created");
  srv_ra_str(&rb, "model");
  r = srv_rcmd(&R.bg, &rb, err, sizeof err);
  if (!r) return 0; /* the lease lapses and someone claims it again */
  srv_job_params p;
  size_t xlen = 0;
  const char *xs = srv_rstr(r, 1, &xlen);
  const char *cr = srv_rstr(r, 2, NULL), *mn = srv_rstr(r, 3, NULL);
  /* the job runs on the model it was created for (replicas sharing a store
   * are meant to serve the same models); none named: the default */
  srv_model *sm = srv_model_find(mn && mn[0] ? mn : NULL);
  rjob *j = calloc(1, sizeof *j);
  char why_buf[sizeof j->e.msg];
  const char *why = NULL;
  float *x = NULL;
  if (params_parse(srv_rstr(r, 0, NULL), &p)) why = "the stored job is malformed";
  else if (!j) why = "out of memory";
  else if (!sm) {
    snprintf(why_buf, sizeof why_buf, "model '%s' is not loaded on replica %.40s, "
             "which claimed the job", mn && mn[0] ? mn : "(the default)", R.me);
    why = why_buf;
  }
  if (!why && p.init == JEM_SAMPLE_INIT_GIVEN) {
    const jem_model *m = sm->m;
    size_t want = sizeof(float) * (size_t)p.n * (size_t)m->arch.in_channels *
                  (size_t)m->arch.image_size * (size_t)m->arch.image_size;
    if (!xs || xlen != want)
      why = "the stored init images do not fit this replica's model";
    else if (!(x = malloc(want)))
      why = "out of memory";
    else
      memcpy(x, xs, want);
  }
  double created = cr ? strtod(cr, NULL) : 0;
  freeReplyObject(r);
  if (!why && srv_job_exec_init(&j->e, id, &p, sm, x)) why = "out of memory for the chains";
  x = NULL;
  if (why) {
    srv_log(SRV_LOG_ERROR, "msg=\"claimed job cannot run\" job=%s error=\"%s\"", id, why);
    fail_claimed(id, why);
    if (j) {
      j->e.sm = NULL;
      rjob_free(j);
    }
    srv_model_put(sm);
    return 0;
  }
  /* monotonic start for the duration in the log: now minus the job's age */
  double age = created > 0 ? srv_wall_s() - created : 0;
  j->created_ns = srv_now_ns() - (uint64_t)(age > 0 ? age * 1e9 : 0);
  j->label = sm->label;
  j->e.work.done = rjob_done;
  atomic_fetch_add(&R.n_local, 1);
  if (over) atomic_fetch_add(&R.takeovers, 1);
  srv_log(SRV_LOG_INFO, "msg=\"job claimed\" job=%s replica=%s takeover=%s", id, R.me,
          over ? "true" : "false");
  if (srv_sched_submit(&j->e.work)) { /* stopping: leave it to the lease */
    atomic_fetch_sub(&R.n_local, 1);
    rjob_free(j);
    return 0;
  }
  j->next = R.local;
  R.local = j;
  return 1;
}

/* One pass: results, leases and progress, then new work. */
static void tick(void) {
  char err[400];
  static int was_down;
  uint64_t tried = R.bg.next_try;
  if (srv_rconn_ensure(&R.bg, err, sizeof err)) {
    if (R.bg.next_try != tried) /* a real attempt, not the backoff: at most one per 5 s */
      srv_log(SRV_LOG_WARN, "msg=\"job store unavailable\" error=\"%s\"", err);
    was_down = 1;
    return;
  }
  if (was_down) srv_log(SRV_LOG_INFO, "msg=\"job store reachable again\" at=\"%s:%d\"",
                        R.to.host, R.to.port);
  was_down = 0;
  for (rjob **pp = &R.local; *pp;) {
    rjob *j = *pp;
    if (atomic_load(&j->ended)) {
      if (publish(j) == 0) {
        *pp = j->next;
        rjob_free(j);
        continue;
      }
    } else if (!j->lost) {
      renew(j);
    }
    pp = &j->next;
  }
  int cap = srv_cfg.workers > 0 ? srv_cfg.workers : 1;
  while (!srv_http_draining() && !atomic_load(&R.stop) && atomic_load(&R.n_local) < cap &&
         claim()) {
  }
}

static void *store_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&R.stop)) {
    pthread_mutex_lock(&R.bg.mu);
    tick();
    pthread_mutex_unlock(&R.bg.mu);
    usleep(TICK_MS * 1000);
  }
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Lifecycle and metrics */

static void r_metrics(srv_mbuf *b) {
  srv_mhead(b, "jem_job_store_up", "gauge",
            "1 while the Redis job store answers (0 after a failed call, until a reconnect).");
  srv_mprintf(b, "jem_job_store_up %d\n", atomic_load(&R.to.up));
  srv_mhead(b, "jem_job_store_errors_total", "counter", "Failed calls to the Redis job store.");
  srv_mprintf(b, "jem_job_store_errors_total %llu\n",
              (unsigned long long)atomic_load(&R.to.errors));
  srv_mhead(b, "jem_jobs_local", "gauge", "Jobs this replica runs now.");
  srv_mprintf(b, "jem_jobs_local %d\n", atomic_load(&R.n_local));
  int nm = srv_metrics_models();
  char ml[300];
  srv_mhead(b, "jem_jobs_created_total", "counter", "SGLD jobs accepted by this replica, by model.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    srv_mprintf(b, "jem_jobs_created_total{%s} %llu\n", ml,
                (unsigned long long)atomic_load(&R.created[mi]));
  }
  srv_mhead(b, "jem_jobs_finished_total", "counter",
            "SGLD jobs this replica ran to their end, by model and final status.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    for (int s = SRV_JOB_SUCCEEDED; s <= SRV_JOB_FAILED; s++)
      srv_mprintf(b, "jem_jobs_finished_total{%s,status=\"%s\"} %llu\n", ml,
                  srv_job_state_names[s], (unsigned long long)atomic_load(&R.finished[mi][s]));
  }
  srv_mhead(b, "jem_job_takeovers_total", "counter",
            "Jobs this replica took over after their replica's lease lapsed.");
  srv_mprintf(b, "jem_job_takeovers_total %llu\n", (unsigned long long)atomic_load(&R.takeovers));
  srv_mhead(b, "jem_sgld_chain_steps_total", "counter",
            "SGLD steps run, summed over chains, by model.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(ml, sizeof ml, "", mi);
    srv_mprintf(b, "jem_sgld_chain_steps_total{%s} %llu\n", ml,
                (unsigned long long)atomic_load(&R.chain_steps[mi]));
  }
}

static int r_start(void) {
  char err[400];
  if (srv_redis_parse_url(&R.to, srv_cfg.job_store, err, sizeof err)) {
    fprintf(stderr, "jemd: --job-store: %s\n", err);
    return -1;
  }
  char host[64] = "jemd";
  gethostname(host, sizeof host - 1);
  unsigned rnd = 0;
  srv_rand_bytes(&rnd, sizeof rnd);
  snprintf(R.me, sizeof R.me, "%s:%ld:%08x", host, (long)getpid(), rnd);
  pthread_mutex_lock(&R.bg.mu);
  int rc = srv_rconn_ensure(&R.bg, err, sizeof err);
  pthread_mutex_unlock(&R.bg.mu);
  if (rc == -2) {
    fprintf(stderr, "jemd: --job-store: %s\n", err);
    return -1;
  }
  if (rc)
    srv_log(SRV_LOG_WARN, "msg=\"job store unavailable at start; retrying\" error=\"%s\"", err);
  else
    srv_log(SRV_LOG_INFO, "msg=\"job store\" store=redis at=\"%s:%d\" db=%d replica=%s",
            R.to.host, R.to.port, R.to.db, R.me);
  if (pthread_create(&R.thread, NULL, store_thread, NULL)) {
    fprintf(stderr, "jemd: cannot start the job store's thread\n");
    return -1;
  }
  R.thread_started = 1;
  return 0;
}

static int r_active(void) { return atomic_load(&R.n_local); }

/* The drain deadline: stop claiming; jobs still running here are given
 * back (their leases dropped) so that another replica takes them at once,
 * and finished ones are written. */
static void r_shutdown(void) {
  atomic_store(&R.stop, 1);
  if (R.thread_started) pthread_join(R.thread, NULL);
  R.thread_started = 0;
  pthread_mutex_lock(&R.bg.mu);
  int given = 0;
  for (rjob *j = R.local; j; j = j->next) {
    if (atomic_load(&j->ended)) {
      publish(j);
      j->lost = 1; /* written (or not ours): never again */
      continue;
    }
    atomic_store(&j->e.cancel, 1);
    j->lost = 1;
    srv_rargv ra = {0};
    srv_ra_str(&ra, "DEL");
    srv_ra_fmt(&ra, PREFIX "lease:%s", j->e.id);
    char err[400];
    redisReply *r = srv_rcmd(&R.bg, &ra, err, sizeof err);
    if (r) freeReplyObject(r);
    given++;
  }
  pthread_mutex_unlock(&R.bg.mu);
  if (given)
    srv_log(SRV_LOG_WARN, "msg=\"gave unfinished jobs back to the store\" jobs=%d", given);
}

static void r_free(void) {
  /* the scheduler has stopped: every done() has come */
  while (R.local) {
    rjob *j = R.local;
    R.local = j->next;
    rjob_free(j);
  }
  srv_rconn_close(&R.http);
  srv_rconn_close(&R.bg);
}

static const char *r_state(void) { return atomic_load(&R.to.up) ? "ok" : "unavailable"; }

const srv_job_store srv_job_store_redis = {
    /* no admit: the queue bound is checked atomically on create */
    .name = "redis", .start = r_start, .create = r_create, .get = r_get, .cancel = r_cancel, .list = r_list, .result = r_result,
    .active = r_active, .shutdown = r_shutdown, .free = r_free, .metrics = r_metrics,
    .state = r_state,
};
