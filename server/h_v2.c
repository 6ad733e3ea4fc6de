/* h_v2.c - the Open Inference Protocol v2 (KServe) subset: server and model
 * metadata, health, and POST /v2/models/{name}/infer on FP32 NCHW input. */
#include "srv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct v2_ctx {
  srv_task *t;
  srv_v2_req q;
} v2_ctx;

static void v2_ctx_free(void *p) {
  v2_ctx *c = p;
  if (!c) return;
  srv_task_free(c->t);
  srv_v2_req_free(&c->q);
  free(c);
}

/* The model named in the path (and its version, "1", when the route has
 * /versions/{v}), or NULL after answering 404/503. */
static srv_model *named_model(srv_req *r, enum MHD_Result *res) {
  if (r->n_params > 1 && strcmp(r->params[1], "1") != 0) {
    *res = srv_respond_error(r, 404, "model_not_found", "model '%.100s' has no version "
                             "'%.20s' (its only version is 1)", r->params[0], r->params[1]);
    return NULL;
  }
  return srv_model_for(r, r->params[0], res);
}

enum MHD_Result srv_h_v2_live(srv_req *r) {
  return srv_respond_json(r, 200, json_pack("{s:b}", "live", 1));
}

enum MHD_Result srv_h_v2_ready(srv_req *r) {
  int ready = srv_model_ready() && !srv_http_draining();
  return srv_respond_json(r, ready ? 200 : 503, json_pack("{s:b}", "ready", ready));
}

enum MHD_Result srv_h_v2_server(srv_req *r) {
  return srv_respond_json(r, 200, json_pack("{s:s,s:s,s:[s,s]}", "name", "jemd", "version",
                                            JEM_VERSION, "extensions", "binary_tensor_data",
                                            "model_repository"));
}

enum MHD_Result srv_h_v2_model(srv_req *r) {
  enum MHD_Result res;
  srv_model *sm = named_model(r, &res);
  if (!sm) return res;
  const jem_arch *a = &sm->m->arch;
  json_t *o = json_pack(
      "{s:s,s:[s],s:s,s:[{s:s,s:s,s:[i,i,i,i]}],"
      "s:[{s:s,s:s,s:[i,i]},{s:s,s:s,s:[i,i]},{s:s,s:s,s:[i]},{s:s,s:s,s:[i]}]}",
      "name", sm->name, "versions", "1", "platform", "jemd_c",
      "inputs", "name", "input", "datatype", "FP32", "shape", -1, a->in_channels,
      a->image_size, a->image_size,
      "outputs", "name", "logits", "datatype", "FP32", "shape", -1, a->num_classes,
      "name", "probs", "datatype", "FP32", "shape", -1, a->num_classes,
      "name", "energy", "datatype", "FP32", "shape", -1,
      "name", "grad_norm", "datatype", "FP32", "shape", -1);
  srv_model_put(sm);
  return srv_respond_json(r, 200, o);
}

enum MHD_Result srv_h_v2_model_ready(srv_req *r) {
  enum MHD_Result res;
  srv_model *sm = named_model(r, &res);
  if (!sm) return res;
  int ready = !srv_http_draining();
  json_t *o = json_pack("{s:s,s:b}", "name", sm->name, "ready", ready);
  srv_model_put(sm);
  return srv_respond_json(r, ready ? 200 : 503, o);
}

typedef struct binbuf {
  unsigned char *p;
  size_t len;
} binbuf;

/* One output tensor; binary ones append their little-endian bytes to bb. */
static json_t *tensor(const char *name, const float *v, int n, int k, int binary, binbuf *bb) {
  json_t *shape = k > 1 || !strcmp(name, "logits") || !strcmp(name, "probs")
                      ? json_pack("[i,i]", n, k)
                      : json_pack("[i]", n);
  if (binary) {
    size_t bytes = sizeof(float) * (size_t)n * (size_t)k;
    unsigned char *np = realloc(bb->p, bb->len + bytes);
    if (!np) {
      json_decref(shape);
      return NULL;
    }
    bb->p = np;
    for (size_t i = 0; i < (size_t)n * (size_t)k; i++) {
      uint32_t u;
      memcpy(&u, &v[i], sizeof u);
      unsigned char *q = bb->p + bb->len + 4 * i;
      q[0] = (unsigned char)u, q[1] = (unsigned char)(u >> 8), q[2] = (unsigned char)(u >> 16),
      q[3] = (unsigned char)(u >> 24);
    }
    bb->len += bytes;
    return json_pack("{s:s,s:s,s:o,s:{s:I}}", "name", name, "datatype", "FP32", "shape", shape,
                     "parameters", "binary_data_size", (json_int_t)bytes);
  }
  json_t *data = json_array();
  for (int i = 0; i < n * k; i++) json_array_append_new(data, srv_jreal(v[i]));
  return json_pack("{s:s,s:s,s:o,s:o}", "name", name, "datatype", "FP32", "shape", shape,
                   "data", data);
}

static enum MHD_Result infer_respond(srv_req *r) {
  v2_ctx *c = r->data;
  srv_task *t = c->t;
  enum MHD_Result res;
  if (srv_score_unfinished(r, t, &res)) return res;
  const jem_model *m = t->model->m;
  int k = m->arch.num_classes;
  json_t *outs = json_array();
  binbuf bb = {NULL, 0};
  const srv_v2_req *q = &c->q;
  if (q->want[0]) json_array_append_new(outs, tensor("logits", t->logits, t->n, k, q->binary[0], &bb));
  if (q->want[1]) json_array_append_new(outs, tensor("probs", t->probs, t->n, k, q->binary[1], &bb));
  if (q->want[2]) json_array_append_new(outs, tensor("energy", t->score[JEM_SCORE_ENERGY], t->n, 1, q->binary[2], &bb));
  if (q->want[3])
    json_array_append_new(outs, tensor("grad_norm", t->score[JEM_SCORE_GRAD_NORM], t->n, 1, q->binary[3], &bb));
  srv_score_observe(t, NULL); /* no OOD verdicts on this route */
  json_t *o = json_pack("{s:s,s:s,s:o}", "model_name", t->model->name, "model_version", "1",
                        "outputs", outs);
  if (c->q.has_id) json_object_set_new(o, "id", json_string(c->q.id));
  if (!bb.p) return srv_respond_json(r, 200, o);
  /* binary tensor extension: JSON header, then the raw outputs in order */
  char *js = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_REAL_PRECISION(9));
  json_decref(o);
  size_t jl = js ? strlen(js) : 0;
  unsigned char *all = js ? malloc(jl + bb.len) : NULL;
  if (!all) {
    free(js);
    free(bb.p);
    return srv_respond_error(r, 503, "out_of_memory", "out of memory");
  }
  memcpy(all, js, jl);
  memcpy(all + jl, bb.p, bb.len);
  char hl[32];
  snprintf(hl, sizeof hl, "%zu", jl);
  const char *h[] = {"Inference-Header-Content-Length", hl, NULL};
  enum MHD_Result res2 = srv_respond(r, 200, "application/octet-stream", all, jl + bb.len, h);
  free(js);
  free(bb.p);
  free(all);
  return res2;
}

enum MHD_Result srv_h_v2_infer(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  enum MHD_Result res;
  srv_model *sm = named_model(r, &res);
  if (!sm) return res;
  const char *ct = srv_req_header(r, "Content-Type");
  if (ct && strncasecmp(ct, "application/json", 16) != 0 &&
      strncasecmp(ct, "application/octet-stream", 24) != 0) {
    srv_model_put(sm);
    srv_metrics_reject(SRV_REJ_UNSUPPORTED);
    return srv_respond_error(r, 415, "unsupported_media_type",
                             "Content-Type must be application/json (or "
                             "application/octet-stream with the binary tensor extension)");
  }
  const jem_model *m = sm->m;
  char err[512];
  v2_ctx *c = calloc(1, sizeof *c);
  if (!c) {
    srv_model_put(sm);
    return srv_respond_error(r, 503, "out_of_memory", "out of memory");
  }
  size_t json_len = r->body_len;
  const char *ihcl = srv_req_header(r, "Inference-Header-Content-Length");
  if (ihcl) {
    char *end;
    unsigned long long v = strtoull(ihcl, &end, 10);
    if (end == ihcl || *end || v > r->body_len) {
      srv_model_put(sm);
      v2_ctx_free(c);
      return srv_respond_error(r, 400, "invalid_request",
                               "bad Inference-Header-Content-Length '%.32s'", ihcl);
    }
    json_len = (size_t)v;
  }
  int st = srv_v2_parse_infer(r->body ? r->body : "", r->body_len, json_len, m->arch.in_channels,
                              m->arch.image_size, srv_cfg.max_images, &c->q, err, sizeof err);
  if (st) {
    srv_model_put(sm);
    v2_ctx_free(c);
    srv_metrics_reject(st == 413 ? SRV_REJ_TOO_LARGE : SRV_REJ_BAD_REQUEST);
    return srv_respond_error(r, st, "invalid_request", "%s", err);
  }
  c->t = calloc(1, sizeof *c->t);
  if (!c->t || srv_task_alloc(c->t, m, c->q.n)) {
    srv_model_put(sm);
    v2_ctx_free(c);
    return srv_respond_error(r, 503, "out_of_memory", "out of memory");
  }
  /* the parsed tensor becomes the task input */
  free(c->t->x);
  c->t->x = c->q.x;
  c->q.x = NULL;
  c->t->model = sm;
  c->t->want_grad = c->q.want[3];
  return srv_score_submit(r, c->t, c, v2_ctx_free, infer_respond, NULL);
}

/* ------------------------------------------------------------------------ */
/* Model repository extension */

/* POST /v2/repository/index: every model the repository knows, loaded or
 * not; a body {"ready": true} keeps the loaded ones only. */
enum MHD_Result srv_h_v2_repo_index(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  int only_ready = 0;
  size_t i = 0;
  while (i < r->body_len && strchr(" \t\r\n", r->body[i])) i++;
  if (i < r->body_len) {
    int st = 0;
    char err[256];
    json_t *j = srv_json_parse(r->body, r->body_len, &st, err, sizeof err);
    if (!j) return srv_respond_error(r, st, "invalid_request", "%s", err);
    json_t *rd = json_object_get(j, "ready");
    int ok = json_is_object(j) && (!rd || json_is_boolean(rd)) &&
             json_object_size(j) == (rd ? 1u : 0u);
    only_ready = rd && json_is_true(rd);
    json_decref(j);
    if (!ok)
      return srv_respond_error(r, 400, "invalid_request",
                               "the body is empty or {\"ready\": true|false}");
  }
  srv_model_status *st = malloc(SRV_MAX_MODELS * sizeof *st);
  if (!st) return srv_respond_error(r, 503, "out_of_memory", "out of memory");
  int n = srv_models_index(st, SRV_MAX_MODELS);
  json_t *arr = json_array();
  for (int k = 0; k < n; k++)
    if (st[k].ready || !only_ready)
      json_array_append_new(arr, json_pack("{s:s,s:s,s:s,s:s}", "name", st[k].name, "version",
                                           "1", "state", st[k].ready ? "READY" : "UNAVAILABLE",
                                           "reason", st[k].reason));
  free(st);
  return srv_respond_json(r, 200, arr);
}

/* POST /v2/repository/models/{name}/load and .../unload */
enum MHD_Result srv_h_v2_repo_load(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  char err[512];
  int rc = srv_model_repo_load(r->params[0], err, sizeof err);
  if (rc == 0 || rc == -1) r->model_label = srv_metrics_model(r->params[0]); /* a known name */
  if (rc > 0) return srv_respond_error(r, 404, "model_not_found", "%s", err);
  if (rc == -2) {
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "busy", h, "%s", err);
  }
  if (rc < 0)
    return srv_respond_error(r, 400, "load_failed", "cannot load model '%.100s': %s",
                             r->params[0], err);
  return srv_respond_json(r, 200, json_object());
}

enum MHD_Result srv_h_v2_repo_unload(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  int rc = srv_model_repo_unload(r->params[0]);
  if (rc == 0) r->model_label = srv_metrics_model(r->params[0]);
  if (rc == -2) {
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "busy", h, "another load has not ended within "
                               "--reload-timeout");
  }
  if (rc)
    return srv_respond_error(r, 404, "model_not_found", "no model named '%.100s'", r->params[0]);
  return srv_respond_json(r, 200, json_object());
}
