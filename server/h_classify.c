/* h_classify.c - POST /v1/classify: validate on the HTTP thread, decode,
 * queue for a batch, and build the JSON answer after the worker is done.
 *
 * Where images are decoded.  A request whose images declare at most
 * SRV_DECODE_INLINE_PIXELS pixels in all (any ordinary upload) is decoded on the
 * HTTP thread: it takes microseconds to milliseconds.  A larger one (up to
 * --max-request-pixels) can take seconds, and an HTTP thread serves many
 * connections, so it is decoded on a worker as background work instead; the
 * HTTP threads keep answering /healthz and small requests meanwhile.  Job
 * init images take the same two paths (h_jobs.c), through decode.c. */
#include "srv.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct score_ctx {
  srv_decode dec;       /* first member: its finish() gets the context back */
  srv_task *t;
  int single;           /* one raw image body: answer one object */
  int top_k;            /* 0 = not asked */
  float tpr;
  srv_req *r;
} score_ctx;

static void ctx_free(void *p) {
  score_ctx *c = p;
  if (!c) return;
  srv_task_free(c->t);
  srv_decode_free(&c->dec);
  free(c);
}

static void task_complete(srv_task *t) { srv_req_resume((srv_req *)t->owner); }

/* Shared tail of the scoring handlers: reserve room, suspend, queue the task
 * (or first the work that prepares it, which queues it when done). */
enum MHD_Result srv_score_submit(srv_req *r, srv_task *t, void *ctx, void (*ctx_free_fn)(void *),
                                 enum MHD_Result (*on_resume)(srv_req *), srv_decode *prepare) {
  r->data = ctx;
  r->data_free = ctx_free_fn;
  if (srv_sched_reserve(t->n)) {
    srv_metrics_reject(SRV_REJ_QUEUE_FULL);
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "queue_full", h,
                               "the scoring queue is full (%d images); retry shortly",
                               srv_cfg.queue_size);
  }
  t->conn_fd = srv_req_fd(r);
  t->owner = r;
  t->complete = task_complete;
  r->on_resume = on_resume;
  srv_req_suspend(r);
  if (prepare ? srv_decode_submit(prepare) : srv_sched_score(t)) {
    if (prepare) srv_sched_unreserve(t->n); /* srv_sched_score released it itself */
    atomic_store(&t->state, SRV_TASK_SHUTDOWN);
    srv_req_resume(r);
  }
  return MHD_YES;
}

/* Common answers for tasks that did not finish; 1 when it answered. */
int srv_score_unfinished(srv_req *r, srv_task *t, enum MHD_Result *res) {
  int st = atomic_load(&t->state);
  if (st == SRV_TASK_DONE) return 0;
  if (st == SRV_TASK_CANCELED) {
    *res = MHD_NO; /* the client is gone: close */
    return 1;
  }
  const char *h[] = {"Retry-After", "1", NULL};
  if (st == SRV_TASK_SHUTDOWN) {
    srv_metrics_reject(SRV_REJ_DRAINING);
    *res = srv_respond_error_h(r, 503, "shutting_down", h, "the server is shutting down");
  } else {
    *res = srv_respond_error_h(r, 503, "compute_failed", h,
                               "the worker could not run the batch (out of memory?)");
  }
  return 1;
}

/* ------------------------------------------------------------------------ */

static json_t *farr(const float *v, int n) {
  json_t *a = json_array();
  for (int i = 0; a && i < n; i++) json_array_append_new(a, srv_jreal(v[i]));
  return a;
}

/* One image's answer, from the task's outputs and its verdict. */
static json_t *result_json(const jem_model *m, const srv_task *t, int i, int top_k,
                           const jem_ood_result *res) {
  int k = m->arch.num_classes;
  const float *probs = t->probs + (size_t)i * (size_t)k;
  int label = t->label[i];
  json_t *o = json_object();
  json_object_set_new(o, "label", json_integer(label));
  json_object_set_new(o, "class", json_string(m->classes[label]));
  json_object_set_new(o, "confidence", srv_jreal(t->confidence[i]));
  json_object_set_new(o, "probs", farr(probs, k));
  if (top_k > 0) {
    int idx[1024];
    int kk = k < 1024 ? k : 1024;
    for (int c = 0; c < kk; c++) idx[c] = c;
    for (int a = 1; a < kk; a++) { /* insertion sort: K is small */
      int x = idx[a], b = a - 1;
      while (b >= 0 && probs[idx[b]] < probs[x]) {
        idx[b + 1] = idx[b];
        b--;
      }
      idx[b + 1] = x;
    }
    json_t *tk = json_array();
    for (int c = 0; c < top_k && c < kk; c++)
      json_array_append_new(tk, json_pack("{s:i,s:s,s:o}", "label", idx[c], "class",
                                          m->classes[idx[c]], "prob",
                                          srv_jreal(probs[idx[c]])));
    json_object_set_new(o, "top_k", tk);
  }
  json_object_set_new(o, "logits", farr(t->logits + (size_t)i * (size_t)k, k));
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    json_object_set_new(o, jem_score_names[s], srv_jreal(t->score[s][i]));
  json_t *scores = json_object();
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    json_object_set_new(scores, jem_score_names[s],
                        json_pack("{s:o,s:o}", "value", srv_jreal(t->score[s][i]), "percentile",
                                  srv_jreal(res->percentile[s])));
  json_t *ood = json_object();
  json_object_set_new(ood, "is_ood", res->is_ood < 0 ? json_null() : json_boolean(res->is_ood));
  json_object_set_new(ood, "tpr", srv_jreal(res->tpr));
  json_object_set_new(ood, "rule", res->rule ? json_string(res->rule) : json_null());
  json_object_set_new(ood, "scores", scores);
  json_object_set_new(o, "ood", ood);
  return o;
}

/* ------------------------------------------------------------------------ */
/* Scoring metrics, recorded once per answered task */

static const double energy_le[] = {-100, -50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100};
static const double pct_le[] = {0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1};
/* per model label (srv_metrics_model) */
static srv_hist energy_hist[SRV_METRIC_MODELS], pct_hist[SRV_METRIC_MODELS][JEM_NUM_SCORES];
static atomic_ullong scored_images[SRV_METRIC_MODELS];

static void render_metrics(srv_mbuf *b) {
  int nm = srv_metrics_models();
  char lab[400];
  srv_mhead(b, "jem_scored_images_total", "counter",
            "Images scored and returned to clients, by model.");
  for (int mi = 1; mi < nm; mi++) {
    srv_mlabel_model(lab, sizeof lab, "", mi);
    srv_mprintf(b, "jem_scored_images_total{%s} %llu\n", lab,
                (unsigned long long)atomic_load(&scored_images[mi]));
  }
  srv_mhead(b, "jem_energy", "histogram",
            "Energy (-logsumexp of the logits) of scored images, by model.");
  for (int mi = 1; mi < nm; mi++) {
    if (srv_hist_empty(&energy_hist[mi])) continue;
    srv_mlabel_model(lab, sizeof lab, "", mi);
    srv_mhist(b, "jem_energy", lab, &energy_hist[mi]);
  }
  srv_mhead(b, "jem_ood_score", "histogram",
            "In-distribution percentile of each OOD score of scored images, by model (models "
            "with statistics).");
  for (int mi = 1; mi < nm; mi++)
    for (int s = 0; s < JEM_NUM_SCORES; s++) {
      if (srv_hist_empty(&pct_hist[mi][s])) continue;
      srv_mlabel_model(lab, sizeof lab, "", mi);
      size_t n = strlen(lab);
      snprintf(lab + n, sizeof lab - n, ",score=\"%s\"", jem_score_names[s]);
      srv_mhist(b, "jem_ood_score", lab, &pct_hist[mi][s]);
    }
}

void srv_classify_start(void) {
  for (int mi = 0; mi < SRV_METRIC_MODELS; mi++) {
    srv_hist_init(&energy_hist[mi], energy_le, SRV_NB(energy_le));
    for (int s = 0; s < JEM_NUM_SCORES; s++)
      srv_hist_init(&pct_hist[mi][s], pct_le, SRV_NB(pct_le));
  }
  srv_metrics_register(render_metrics);
}

void srv_score_observe(const srv_task *t, const jem_ood_result *ood) {
  int mi = t->model->label;
  atomic_fetch_add(&scored_images[mi], (unsigned long long)t->n);
  for (int i = 0; i < t->n; i++) {
    srv_hist_obs(&energy_hist[mi], t->score[JEM_SCORE_ENERGY][i]);
    if (ood) /* no statistics: NaN percentiles, left out */
      for (int s = 0; s < JEM_NUM_SCORES; s++)
        srv_hist_obs(&pct_hist[mi][s], ood[i].percentile[s]);
  }
}

static enum MHD_Result decode_error(srv_req *r, const srv_decode *d) {
  srv_metrics_reject(d->status == 415 ? SRV_REJ_UNSUPPORTED
                     : d->status == 413 ? SRV_REJ_TOO_LARGE
                     : d->status == 503 ? -1 : SRV_REJ_BAD_REQUEST);
  const char *h[] = {"Retry-After", "1", NULL};
  return srv_respond_error_h(r, d->status, d->code, d->status == 503 ? h : NULL, "%s", d->err);
}

/* Loop thread, after the worker-side decode: queue the decoded task for
 * scoring, or wake the request to answer the decoding error (or the
 * shutdown). */
static void decode_finish(srv_decode *d) {
  score_ctx *c = (score_ctx *)d;
  srv_task *t = c->t;
  if (d->canceled || d->status || d->client_gone) {
    srv_sched_unreserve(t->n);
    if (d->canceled) atomic_store(&t->state, SRV_TASK_SHUTDOWN);
    if (d->client_gone) {
      srv_metrics_reject(SRV_REJ_CLIENT_GONE);
      srv_log(SRV_LOG_INFO, "msg=\"client gone, dropping work before it was decoded\" images=%d",
              t->n);
      atomic_store(&t->state, SRV_TASK_CANCELED);
    }
    srv_req_resume(c->r);
    return;
  }
  if (srv_sched_score(t)) {
    atomic_store(&t->state, SRV_TASK_SHUTDOWN);
    srv_req_resume(c->r);
  }
}

static enum MHD_Result classify_respond(srv_req *r) {
  score_ctx *c = r->data;
  srv_task *t = c->t;
  enum MHD_Result res;
  if (c->dec.status) return decode_error(r, &c->dec);
  if (srv_score_unfinished(r, t, &res)) return res;
  const jem_model *m = t->model->m;
  /* the verdicts and the metrics, once; then the answer is a pure function */
  jem_ood_result *ood = calloc((size_t)t->n, sizeof *ood);
  if (!ood) {
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "out_of_memory", h, "out of memory");
  }
  for (int i = 0; i < t->n; i++) {
    float vals[JEM_NUM_SCORES];
    for (int s = 0; s < JEM_NUM_SCORES; s++) vals[s] = t->score[s][i];
    jem_ood_eval(&m->ood, vals, c->tpr, &ood[i]);
  }
  srv_score_observe(t, ood);
  json_t *o;
  if (c->single) {
    o = result_json(m, t, 0, c->top_k, &ood[0]);
  } else {
    json_t *arr = json_array();
    for (int i = 0; i < t->n; i++)
      json_array_append_new(arr, result_json(m, t, i, c->top_k, &ood[i]));
    o = json_pack("{s:o}", "results", arr);
  }
  free(ood);
  return srv_respond_json(r, 200, o);
}

/* Media type of a Content-Type value, lowercased, without parameters. */
static void media_type(const char *ct, char *out, size_t cap) {
  size_t o = 0;
  while (*ct == ' ') ct++;
  for (; *ct && *ct != ';' && *ct != ' ' && o + 1 < cap; ct++)
    out[o++] = (char)tolower((unsigned char)*ct);
  out[o] = '\0';
}

static int parse_int(const char *s, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end) return -1;
  *out = v;
  return 0;
}

/* What the query string asks for. */
typedef struct classify_query {
  long top_k;     /* 0 = not asked */
  int want_grad;
  float tpr;
} classify_query;

/* ?top_k, ?grad and ?tpr for model m: 0, or 1 after answering 400. */
static int parse_query(srv_req *r, const jem_model *m, classify_query *q, enum MHD_Result *res) {
  const char *v;
  q->top_k = 0;
  q->want_grad = 1;
  q->tpr = m->ood.present ? m->ood.default_tpr : 0.95f;
  if ((v = srv_req_query(r, "top_k"))) {
    if (parse_int(v, &q->top_k) || q->top_k < 1 || q->top_k > m->arch.num_classes) {
      *res = srv_respond_error(r, 400, "invalid_parameter",
                               "top_k must be an integer from 1 to %d", m->arch.num_classes);
      return 1;
    }
  }
  if ((v = srv_req_query(r, "grad"))) {
    /* the spellings clients send: JSON's, Python's str(bool), 1/0 */
    if (!strcasecmp(v, "true") || !strcmp(v, "1")) {
      q->want_grad = 1;
    } else if (!strcasecmp(v, "false") || !strcmp(v, "0")) {
      q->want_grad = 0;
    } else {
      *res = srv_respond_error(r, 400, "invalid_parameter",
                               "grad must be true or false (any letter case) or 1 or 0");
      return 1;
    }
  }
  if ((v = srv_req_query(r, "tpr"))) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    q->tpr = (float)x; /* judged as the float it is used as: 1e-300 is 0, 0.999999999 is 1 */
    if (errno || end == v || *end || !(q->tpr > 0.0f && q->tpr < 1.0f)) {
      *res = srv_respond_error(r, 400, "invalid_parameter",
                               "tpr must be a number strictly between 0 and 1 "
                               "(from about 1e-38 to 0.99999994)");
      return 1;
    }
  }
  return 0;
}

/* What body_images found: images, or an answer given (a bad request the
 * caller counts, or an unsupported type counted here), or no memory. */
enum { BODY_OK, BODY_BAD, BODY_UNSUPPORTED, BODY_OOM };

/* The images of the body, by its Content-Type: one raw image (*single), a
 * multipart form or {"images": [...]}. */
static int body_images(srv_req *r, srv_blob **imgs, int *n, int *single, enum MHD_Result *res) {
  char err[512];
  const char *ct = srv_req_header(r, "Content-Type");
  if (!ct) {
    srv_metrics_reject(SRV_REJ_UNSUPPORTED);
    *res = srv_respond_error(r, 415, "unsupported_media_type",
                             "missing Content-Type; send image/png, image/jpeg, "
                             "multipart/form-data or application/json");
    return BODY_UNSUPPORTED;
  }
  char mt[64];
  media_type(ct, mt, sizeof mt);
  if (r->body_len == 0) {
    *res = srv_respond_error(r, 400, "empty_body", "the request body is empty");
    return BODY_BAD;
  }
  if (!strcmp(mt, "image/png") || !strcmp(mt, "image/jpeg") || !strcmp(mt, "image/jpg")) {
    *imgs = calloc(1, sizeof **imgs);
    if (!*imgs) return BODY_OOM;
    (*imgs)[0].p = (const unsigned char *)r->body;
    (*imgs)[0].len = r->body_len;
    *n = 1;
    *single = 1;
  } else if (!strcmp(mt, "multipart/form-data")) {
    char boundary[80];
    int st = srv_multipart_boundary(ct, boundary, sizeof boundary, err, sizeof err);
    if (!st)
      st = srv_multipart_parse(r->body, r->body_len, boundary, srv_cfg.max_images, imgs, n,
                               err, sizeof err);
    if (st) {
      *res = srv_respond_error(r, st, st == 413 ? "too_many_images" : "invalid_multipart", "%s",
                               err);
      return BODY_BAD;
    }
  } else if (!strcmp(mt, "application/json")) {
    const char *code = NULL;
    int st = srv_classify_parse_json(r->body, r->body_len, srv_cfg.max_images, imgs, n, &code,
                                     err, sizeof err);
    if (st) {
      *res = srv_respond_error(r, st, code, "%s", err);
      return BODY_BAD;
    }
  } else {
    /* `curl -d @image.png` sends form data, and drops the file's CR and LF
     * bytes on the way: name the fix, not just the type. */
    const char *hint = !strcmp(mt, "application/x-www-form-urlencoded")
                           ? " (curl -d sends that and strips CR/LF bytes from the file: use "
                             "--data-binary @FILE -H 'Content-Type: image/png')"
                           : "";
    srv_metrics_reject(SRV_REJ_UNSUPPORTED);
    *res = srv_respond_error(r, 415, "unsupported_media_type",
                             "Content-Type '%.64s' is not accepted%s; send image/png, image/jpeg, "
                             "multipart/form-data or application/json",
                             mt, hint);
    return BODY_UNSUPPORTED;
  }
  return BODY_OK;
}

enum MHD_Result srv_h_classify(srv_req *r) {
  static const char *const allowed[] = {"top_k", "grad", "tpr", "model", NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  /* POST /v1/models/{name}/classify, or ?model=NAME, else the default */
  const char *name = srv_req_query(r, "model");
  enum MHD_Result res;
  if (r->n_params == 1) {
    if (name) {
      srv_metrics_reject(SRV_REJ_BAD_REQUEST);
      return srv_respond_error(r, 400, "invalid_parameter",
                               "the path names the model; leave out ?model=");
    }
    name = r->params[0];
  }
  srv_model *sm = srv_model_for(r, name, &res);
  if (!sm) return res;
  const jem_model *m = sm->m;
  char err[512];
  classify_query q;
  score_ctx *c = NULL;
  srv_blob *imgs = NULL;
  int n = 0, single = 0;
  if (parse_query(r, m, &q, &res)) goto reject;
  switch (body_images(r, &imgs, &n, &single, &res)) {
    case BODY_BAD: goto reject;
    case BODY_UNSUPPORTED: goto out;
    case BODY_OOM: goto oom;
    default: break;
  }
  c = calloc(1, sizeof *c);
  if (!c) goto oom;
  c->t = calloc(1, sizeof *c->t);
  if (!c->t || srv_task_alloc(c->t, m, n)) goto oom;
  c->t->model = sm; /* the task owns the reference now */
  sm = NULL;
  c->t->want_grad = q.want_grad;
  c->single = single;
  c->top_k = (int)q.top_k;
  c->tpr = q.tpr;
  c->dec.imgs = imgs; /* the context owns them from here */
  c->dec.n_imgs = n;
  imgs = NULL;
  c->dec.m = m;
  c->dec.x = c->t->x;
  c->dec.naming = single ? SRV_DECODE_PLAIN : SRV_DECODE_IMAGE;
  c->dec.finish = decode_finish;
  c->r = r;
  srv_image_limits(&c->dec.lim);
  long long pixels = 0;
  for (int i = 0; i < n; i++) {
    if (srv_request_pixels_add(&pixels, c->dec.imgs[i].p, c->dec.imgs[i].len, &c->dec.lim, err,
                               sizeof err) == 0)
      continue;
    srv_metrics_reject(SRV_REJ_TOO_LARGE);
    res = srv_respond_error(r, 413, "request_too_large", "%s", err);
    ctx_free(c);
    return res;
  }
  if (pixels > SRV_DECODE_INLINE_PIXELS) {
    c->dec.conn_fd = srv_req_fd(r);
    return srv_score_submit(r, c->t, c, ctx_free, classify_respond, &c->dec);
  }
  c->dec.conn_fd = -1;
  if (srv_decode_run(&c->dec, INT_MAX)) {
    res = decode_error(r, &c->dec);
    ctx_free(c);
    return res;
  }
  return srv_score_submit(r, c->t, c, ctx_free, classify_respond, NULL);

oom:
  ctx_free(c);
  c = NULL;
  {
    const char *h[] = {"Retry-After", "1", NULL};
    res = srv_respond_error_h(r, 503, "out_of_memory", h, "out of memory");
  }
  goto out;
reject:
  srv_metrics_reject(SRV_REJ_BAD_REQUEST);
out:
  srv_blobs_free(imgs, n);
  srv_model_put(sm);
  return res;
}
