/* h_health.c - /healthz, /readyz, /metrics, /v1/models and /v1/models/{name}. */
#include "jobs.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum MHD_Result srv_h_healthz(srv_req *r) {
  return srv_respond_json(r, 200, json_pack("{s:s}", "status", "ok"));
}

enum MHD_Result srv_h_readyz(srv_req *r) {
  const char *h[] = {"Retry-After", "5", NULL};
  if (srv_http_draining())
    return srv_respond_error_h(r, 503, "draining", h, "the server is shutting down");
  srv_model *sm = srv_model_get();
  if (!sm) return srv_respond_error_h(r, 503, "model_not_loaded", h, "no model is loaded");
  /* A nearly full queue takes the instance out of a load balancer's rotation
   * before clients start getting 503 from /v1/classify; 90% leaves room for
   * requests already on their way. */
  if ((long)srv_sched_queued_images() * 10 >= (long)srv_cfg.queue_size * 9) {
    srv_model_put(sm);
    const char *h1[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "queue_full", h1, "the scoring queue is nearly full");
  }
  /* the job store does not decide readiness (scoring works without it),
   * but says where it stands */
  const char *store_state, *store = srv_jobs_store(&store_state);
  json_t *o = json_pack("{s:s,s:s,s:{s:s,s:s}}", "status", "ready", "model", sm->name,
                        "job_store", "kind", store, "state", store_state);
  srv_model_put(sm);
  return srv_respond_json(r, 200, o);
}

enum MHD_Result srv_h_metrics(srv_req *r) {
  size_t len = 0;
  char *text = srv_metrics_render(&len);
  if (!text) return srv_respond_error(r, 500, "internal", "out of memory");
  enum MHD_Result ok = srv_respond(r, 200, "text/plain; version=0.0.4; charset=utf-8", text,
                                   len, NULL);
  free(text);
  return ok;
}

static json_t *preprocess_json(const jem_preprocess *p) {
  return json_pack("{s:i,s:[i,i],s:i,s:o,s:o,s:[o,o],s:b}", "channels", p->channels, "resize",
                   p->resize_w, p->resize_h, "pad", p->pad, "pad_value", srv_jreal(p->pad_value),
                   "background", srv_jreal(p->background), "range", srv_jreal(p->range_lo),
                   srv_jreal(p->range_hi), "invert", p->invert);
}

/* One model as GET /v1/models describes it. */
static json_t *model_json(const srv_model *sm) {
  const jem_model *m = sm->m;
  const jem_arch *a = &m->arch;
  json_t *classes = json_array();
  for (int i = 0; i < a->num_classes; i++) json_array_append_new(classes, json_string(m->classes[i]));
  json_t *ood = json_object();
  json_object_set_new(ood, "present", json_boolean(m->ood.present));
  json_object_set_new(ood, "default_tpr", srv_jreal(m->ood.present ? m->ood.default_tpr : 0.95));
  json_object_set_new(ood, "rule", m->ood.present ? json_string(m->ood.rule) : json_null());
  json_object_set_new(ood, "rule_nograd", m->ood.present && m->ood.has_nograd
                                              ? json_string(m->ood.rule_nograd) : json_null());
  json_object_set_new(ood, "complexity_weight", m->ood.present && !isnan(m->ood.complexity_weight)
                                                    ? srv_jreal(m->ood.complexity_weight)
                                                    : json_null());
  json_t *sides = json_object();
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    json_object_set_new(sides, jem_score_names[s],
                        m->ood.present ? json_string(jem_ood_side_name(m->ood.side[s])) : json_null());
  json_object_set_new(ood, "scores", sides);
  json_t *arch = json_pack("{s:s,s:i,s:i,s:i,s:i,s:i,s:s,s:o}", "family", "wrn", "depth",
                           a->depth, "widen", a->widen, "in_channels", a->in_channels,
                           "image_size", a->image_size, "num_classes", a->num_classes, "norm",
                           jem_norm_names[a->norm], "leak", srv_jreal(a->leak));
  json_t *mo = json_pack("{s:s,s:o,s:o,s:[i,i,i],s:o,s:o,s:o,s:o,s:I,s:I,s:i}", "name",
                         sm->name, "architecture", arch, "classes", classes, "input_shape",
                         a->in_channels, a->image_size, a->image_size, "temperature",
                         srv_jreal(m->temperature), "preprocess", preprocess_json(&m->pre),
                         "ood", ood, "sampler", jem_sampler_to_json(&m->sampler),
                         "parameters", (json_int_t)m->n_weights, "generation",
                         (json_int_t)sm->gen, "max_batch", srv_cfg.max_batch);
  char def[SRV_MODEL_NAME_MAX];
  srv_model_default(def, sizeof def);
  json_object_set_new(mo, "default", json_boolean(!strcmp(sm->name, def)));
  return mo;
}

enum MHD_Result srv_h_models(srv_req *r) {
  srv_model *all[SRV_MAX_MODELS];
  int n = srv_models_list(all, SRV_MAX_MODELS);
  if (!n) {
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "model_not_loaded", h, "no model is loaded");
  }
  json_t *arr = json_array();
  for (int i = 0; i < n; i++) {
    json_array_append_new(arr, model_json(all[i]));
    srv_model_put(all[i]);
  }
  char def[SRV_MODEL_NAME_MAX];
  srv_model_default(def, sizeof def);
  return srv_respond_json(r, 200, json_pack("{s:o,s:s}", "models", arr, "default", def));
}

enum MHD_Result srv_h_model(srv_req *r) {
  enum MHD_Result res;
  srv_model *sm = srv_model_for(r, r->params[0], &res);
  if (!sm) return res;
  json_t *o = model_json(sm);
  srv_model_put(sm);
  return srv_respond_json(r, 200, o);
}
