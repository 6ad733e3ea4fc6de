/* h_jobs.c - the SGLD job routes: POST /v1/samples (validate on the HTTP
 * thread; large init images decode on a worker first, as in h_classify.c)
 * and /v1/jobs (poll, cancel, list, result files), answered by the job store
 * (job_store.h). */
#include "job_store.h"

#include <ctype.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const srv_job_store *S = &srv_job_store_memory;

static const char *const rej_names[SRV_JOB_REJ_N] = {"draining", "queue_full", "store_full",
                                                     "invalid_request"};
static atomic_ullong rejected[SRV_JOB_REJ_N];

static void reject(int reason) {
  if (reason >= 0 && reason < SRV_JOB_REJ_N) atomic_fetch_add(&rejected[reason], 1);
}

#define ANS_INIT {.reject = -1, .metrics_reject = -1}

/* Sends a store's answer: the error, the JSON body (with Location and
 * Retry-After as given), or the result bytes as ctype. */
static enum MHD_Result send_answer(srv_req *r, srv_job_ans *a, const char *ctype,
                                   const char *const *extra) {
  reject(a->reject);
  srv_metrics_reject(a->metrics_reject);
  const char *h[8];
  int k = 0;
  if (a->location[0]) {
    h[k++] = "Location";
    h[k++] = a->location;
  }
  if (a->retry_after) {
    h[k++] = "Retry-After";
    h[k++] = a->retry_after;
  }
  for (int i = 0; extra && extra[i] && k < 6; i++) h[k++] = extra[i];
  h[k] = NULL;
  if (a->status >= 400) return srv_respond_error_h(r, a->status, a->code, h, "%s", a->msg);
  if (a->body) return srv_respond_json_h(r, a->status, a->body, h);
  enum MHD_Result res = srv_respond(r, a->status, ctype, a->bytes, a->len, h);
  if (a->release) a->release(a->ctx);
  return res;
}

static int media_is_json(const char *ct) {
  while (*ct == ' ') ct++;
  size_t n = strcspn(ct, ";");
  while (n && ct[n - 1] == ' ') n--;
  return (n == 16 && !strncasecmp(ct, "application/json", 16)) ||
         (n > 5 && !strncasecmp(ct + n - 5, "+json", 5) && memchr(ct, '/', n));
}

/* The answer to a request that srv_samples_parse or the decode refused. */
static enum MHD_Result refuse_request(srv_req *r, int st, const char *code, const char *err) {
  reject(SRV_JOB_REJ_INVALID);
  srv_metrics_reject(st == 413 ? SRV_REJ_TOO_LARGE
                     : st == 415 ? SRV_REJ_UNSUPPORTED
                                 : SRV_REJ_BAD_REQUEST);
  const char *h[] = {"Retry-After", "1", NULL};
  return srv_respond_error_h(r, st, code, st == 503 ? h : NULL, "%s", err);
}

static enum MHD_Result draining(srv_req *r) {
  const char *h[] = {"Retry-After", "5", NULL};
  return srv_respond_error_h(r, 503, "draining", h,
                             "the server is shutting down and takes no new jobs");
}

/* Creates the job of a parsed and decoded request; owns sm and q, and with
 * admitted, the request's place among the queued jobs. */
static enum MHD_Result create_job(srv_req *r, srv_model *sm, srv_samples_req *q, int admitted) {
  if (!q->has_seed) {
    uint64_t s = 0;
    if (srv_rand_bytes(&s, sizeof s)) s = srv_now_ns();
    q->seed = s >> 11; /* below 2^53: exact in every JSON client */
  }
  srv_job_ans a = ANS_INIT;
  S->create(sm, q, admitted, &a);
  return send_answer(r, &a, NULL, NULL);
}

/* Large init images, decoded on a worker while the request is suspended. */
typedef struct init_decode {
  srv_samples_req q;            /* q.dec is the worker-side decode */
  srv_req *r;
  srv_model *sm;
  int admitted;                 /* holds a place among the queued jobs */
} init_decode;

static void init_decode_free(void *p) {
  init_decode *d = p;
  if (d->admitted && S->unadmit) S->unadmit();
  srv_samples_req_free(&d->q);
  srv_model_put(d->sm);
  free(d);
}

static void init_decode_finish(srv_decode *dec) {
  init_decode *d = (init_decode *)((char *)dec - offsetof(init_decode, q.dec));
  srv_req_resume(d->r);
}

/* HTTP thread, after the decode: create the job or answer why not. */
static enum MHD_Result init_decode_resume(srv_req *r) {
  init_decode *d = r->data;
  if (d->q.dec.client_gone) {
    srv_metrics_reject(SRV_REJ_CLIENT_GONE);
    return MHD_NO; /* close */
  }
  if (d->q.dec.canceled) return draining(r);
  if (d->q.dec.status) return refuse_request(r, d->q.dec.status, d->q.dec.code, d->q.dec.err);
  srv_model *sm = d->sm;
  d->sm = NULL; /* create_job owns it, q and the place now */
  d->admitted = 0;
  return create_job(r, sm, &d->q, 1);
}

/* Suspends r while a worker decodes q's init images; owns sm and q. */
static enum MHD_Result decode_then_create(srv_req *r, srv_model *sm, srv_samples_req *q,
                                          const jem_image_limits *lim) {
  srv_job_ans a = ANS_INIT;
  if (S->admit && S->admit(&a)) { /* no use decoding: answer now */
    srv_samples_req_free(q);
    srv_model_put(sm);
    return send_answer(r, &a, NULL, NULL);
  }
  init_decode *d = calloc(1, sizeof *d);
  if (!d) {
    if (S->unadmit) S->unadmit();
    srv_samples_req_free(q);
    srv_model_put(sm);
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "out_of_memory", h, "cannot create a job right now");
  }
  d->admitted = 1;
  d->r = r;
  d->sm = sm;
  d->q = *q;
  r->data = d;
  r->data_free = init_decode_free;
  const char *code;
  char err[512];
  int st = srv_samples_decode(&d->q, sm->m, lim, 0, &code, err, sizeof err); /* set up only */
  if (st) return refuse_request(r, st, code, err);
  d->q.dec.conn_fd = srv_req_fd(r);
  d->q.dec.finish = init_decode_finish;
  r->on_resume = init_decode_resume;
  srv_req_suspend(r);
  if (srv_decode_submit(&d->q.dec)) {
    d->q.dec.canceled = 1;
    srv_req_resume(r);
  }
  return MHD_YES;
}

/* The "model" a job body names ("" when none).  The model must be known
 * before the body is parsed (its sampler settings are the defaults, its
 * class names the valid classes), so a body that mentions "model" is parsed
 * once more here.  -1 with the message in name when "model" is no string. */
static int job_model_name(srv_req *r, char *name, size_t cap) {
  name[0] = '\0';
  if (!r->body_len || !strstr(r->body, "\"model\"")) return 0;
  int st = 0;
  char err[256];
  json_t *j = srv_json_parse(r->body, r->body_len, &st, err, sizeof err);
  json_t *v = json_is_object(j) ? json_object_get(j, "model") : NULL;
  int rc = 0;
  if (v && !json_is_string(v)) {
    snprintf(name, cap, "'model' must be a string (a name from GET /v1/models)");
    rc = -1;
  } else if (v) {
    snprintf(name, cap, "%s", json_string_value(v));
  }
  json_decref(j); /* a malformed body is srv_samples_parse's to report */
  return rc;
}

enum MHD_Result srv_h_samples_create(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  if (srv_http_draining()) {
    reject(SRV_JOB_REJ_DRAINING);
    srv_metrics_reject(SRV_REJ_DRAINING);
    return draining(r);
  }
  const char *ct = srv_req_header(r, "Content-Type");
  if (r->body_len > 0 && ct && !media_is_json(ct)) {
    reject(SRV_JOB_REJ_INVALID);
    srv_metrics_reject(SRV_REJ_UNSUPPORTED);
    return srv_respond_error(r, 415, "unsupported_media_type",
                             "Content-Type '%.64s' is not accepted; send application/json%s", ct,
                             strncasecmp(ct, "application/x-www-form-urlencoded", 33) ? ""
                             : " (curl -d sends form data: add -H 'Content-Type: application/json')");
  }
  char name[SRV_MODEL_NAME_MAX];
  enum MHD_Result res;
  if (job_model_name(r, name, sizeof name)) return refuse_request(r, 400, "invalid_type", name);
  srv_model *sm = srv_model_for(r, name[0] ? name : NULL, &res);
  if (!sm) return res;
  const jem_model *m = sm->m;
  jem_image_limits lim;
  srv_image_limits(&lim);
  srv_samples_req q;
  const char *code;
  char err[512];
  int st = srv_samples_parse(r->body ? r->body : "", r->body_len, m, srv_cfg.max_samples,
                             srv_cfg.max_steps, &lim, &q, &code, err, sizeof err);
  if (st) {
    srv_model_put(sm);
    return refuse_request(r, st, code, err);
  }
  if (q.pixels > SRV_DECODE_INLINE_PIXELS) return decode_then_create(r, sm, &q, &lim);
  if ((st = srv_samples_decode(&q, m, &lim, INT_MAX, &code, err, sizeof err))) {
    srv_model_put(sm);
    return refuse_request(r, st, code, err);
  }
  return create_job(r, sm, &q, 0);
}

/* The {id} of the route, or NULL after answering 404. */
static const char *route_id(srv_req *r, enum MHD_Result *res) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) {
    *res = MHD_YES;
    return NULL;
  }
  if (r->n_params < 1 || !srv_job_id_valid(r->params[0])) {
    *res = srv_respond_error(r, 404, "job_not_found",
                             "no such job (ids are 32 lowercase hex digits)");
    return NULL;
  }
  return r->params[0];
}

/* GET and DELETE /v1/jobs/{id}: the job object, its last state for DELETE. */
static enum MHD_Result job_op(srv_req *r, void (*op)(const char *id, srv_job_ans *a)) {
  enum MHD_Result res;
  const char *id = route_id(r, &res);
  if (!id) return res;
  srv_job_ans a = ANS_INIT;
  op(id, &a);
  if (op == S->cancel) a.retry_after = NULL; /* the job is gone: nothing to poll */
  return send_answer(r, &a, NULL, NULL);
}

enum MHD_Result srv_h_job_get(srv_req *r) { return job_op(r, S->get); }
enum MHD_Result srv_h_job_delete(srv_req *r) { return job_op(r, S->cancel); }

enum MHD_Result srv_h_jobs_list(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  if (!srv_auth_enabled())
    return srv_respond_error(r, 403, "listing_disabled",
                             "listing jobs needs an API key: start jemd with --api-key-file "
                             "and send 'Authorization: Bearer <key>'");
  srv_job_ans a = ANS_INIT;
  S->list(&a);
  return send_answer(r, &a, NULL, NULL);
}

/* Shared by the three result routes: 404 / 409, or the bytes. */
static enum MHD_Result send_result(srv_req *r, int what) {
  enum MHD_Result res;
  const char *id = route_id(r, &res);
  if (!id) return res;
  long k = 0;
  if (what == SRV_JOB_RES_SAMPLE) {
    const char *s = r->n_params >= 2 ? r->params[1] : "";
    size_t len = strlen(s);
    /* canonical decimal only, so each sample has one URL */
    int ok = len >= 1 && len <= 6 && (len == 1 || s[0] != '0');
    for (size_t i = 0; ok && i < len; i++) ok = isdigit((unsigned char)s[i]) != 0;
    if (!ok)
      return srv_respond_error(r, 404, "sample_not_found",
                               "no sample '%.32s': samples are numbered 0, 1, ...", s);
    k = strtol(s, NULL, 10);
  }
  srv_job_ans a = ANS_INIT;
  S->result(id, what, k, &a);
  if (what == SRV_JOB_RES_NPY) {
    const char *h[] = {"Content-Disposition", "attachment; filename=\"samples.npy\"", NULL};
    return send_answer(r, &a, "application/octet-stream", a.status == 200 ? h : NULL);
  }
  return send_answer(r, &a, "image/png", NULL);
}

enum MHD_Result srv_h_job_grid(srv_req *r) { return send_result(r, SRV_JOB_RES_GRID); }
enum MHD_Result srv_h_job_sample(srv_req *r) { return send_result(r, SRV_JOB_RES_SAMPLE); }
enum MHD_Result srv_h_job_npy(srv_req *r) { return send_result(r, SRV_JOB_RES_NPY); }

/* ------------------------------------------------------------------------ */
/* Lifecycle and metrics */

static void render_metrics(srv_mbuf *b) {
  S->metrics(b);
  srv_mhead(b, "jem_jobs_rejected_total", "counter",
            "POST /v1/samples requests refused, by reason.");
  for (int i = 0; i < SRV_JOB_REJ_N; i++)
    srv_mprintf(b, "jem_jobs_rejected_total{reason=\"%s\"} %llu\n", rej_names[i],
                (unsigned long long)atomic_load(&rejected[i]));
}

int srv_jobs_start(void) {
  if (!strcmp(srv_cfg.job_store, "memory")) {
    S = &srv_job_store_memory;
  } else if (!strncmp(srv_cfg.job_store, "redis://", 8)) {
    S = &srv_job_store_redis;
  } else {
    fprintf(stderr, "jemd: --job-store: expected memory or redis://[user:password@]host:port"
            "[/db], not '%.100s'\n", srv_cfg.job_store);
    return -1;
  }
  srv_job_work_start();
  srv_metrics_register(render_metrics);
  return S->start();
}

int srv_jobs_active(void) { return S->active(); }
const char *srv_jobs_store(const char **state) {
  *state = S->state();
  return S->name;
}
void srv_jobs_shutdown(void) { S->shutdown(); }
void srv_jobs_free(void) { S->free(); }
