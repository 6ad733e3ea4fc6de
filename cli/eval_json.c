/* eval_json.c - `jem eval`'s report.json, written from the eval_report. */
#include "eval_report.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>

/* JSON number, or null for NaN/inf (JSON has neither). */
static json_t *num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

static json_t *metrics_json(const jem_ood_metrics *mm) {
  json_t *o = json_object();
  json_object_set_new(o, "auroc", num(mm->auroc));
  json_object_set_new(o, "aupr_in", num(mm->aupr_in));
  json_object_set_new(o, "aupr_out", num(mm->aupr_out));
  json_object_set_new(o, "fpr95", num(mm->fpr95));
  return o;
}

static json_t *model_json(const eval_report *r) {
  const jem_model *m = r->m;
  json_t *jm = json_object();
  json_object_set_new(jm, "path", json_string(r->o->model));
  json_object_set_new(jm, "name", json_string(m->name));
  json_object_set_new(jm, "arch", jem_arch_to_json(&m->arch));
  json_object_set_new(jm, "parameters", json_integer((json_int_t)m->n_weights));
  json_object_set_new(jm, "temperature", num(m->temperature));
  json_object_set_new(jm, "has_ood_stats", json_boolean(m->ood.present));
  json_object_set_new(jm, "replay_n", json_integer(m->replay_n));
  return jm;
}

static json_t *settings_json(const eval_report *r) {
  const eval_opts *o = r->o;
  json_t *js = json_object();
  json_object_set_new(js, "n_test", json_integer(r->nt));
  json_object_set_new(js, "n_valid", json_integer(r->nv));
  json_object_set_new(js, "limit", json_integer(o->limit));
  json_object_set_new(js, "ood_limit", json_integer(o->ood_limit));
  json_object_set_new(js, "seed", json_integer((json_int_t)o->seed));
  json_object_set_new(js, "data_noise", num(o->data_noise));
  json_object_set_new(js, "batch", json_integer(o->batch));
  json_object_set_new(js, "blas_core", json_string(jem_blas_core()));
  return js;
}

static json_t *classification_json(const eval_report *r) {
  json_t *jc = json_object();
  json_object_set_new(jc, "accuracy", num(r->acc));
  json_object_set_new(jc, "nll", num(r->nll));
  json_object_set_new(jc, "valid_accuracy", num(r->acc_valid));
  json_object_set_new(jc, "temperature_fitted", num(r->tfit));
  json_object_set_new(jc, "nll_tempered", num(r->nll_t));
  json_object_set_new(jc, "ece_bins", json_integer(EVAL_ECE_BINS));
  json_object_set_new(jc, "ece", num(r->cb.ece));
  json_object_set_new(jc, "ece_tempered", num(r->ca.ece));
  json_object_set_new(jc, "ece_model_temperature", num(r->cm.ece));
  json_object_set_new(jc, "mce", num(r->cb.mce));
  json_object_set_new(jc, "mce_tempered", num(r->ca.mce));
  const jem_calib *cals[2] = {&r->cb, &r->ca};
  const char *cn[2] = {"bins", "bins_tempered"};
  for (int w = 0; w < 2; w++) {
    json_t *arr = json_array();
    for (int b = 0; b < EVAL_ECE_BINS; b++) {
      const jem_calib *c = cals[w];
      json_t *e = json_object();
      json_object_set_new(e, "lo", json_real((double)b / EVAL_ECE_BINS));
      json_object_set_new(e, "hi", json_real((double)(b + 1) / EVAL_ECE_BINS));
      json_object_set_new(e, "count", json_integer(c->count[b]));
      /* empty bins have no mean: null */
      json_object_set_new(e, "confidence", c->count[b] ? num(c->conf[b]) : json_null());
      json_object_set_new(e, "accuracy", c->count[b] ? num(c->acc[b]) : json_null());
      json_array_append_new(arr, e);
    }
    json_object_set_new(jc, cn[w], arr);
  }
  json_object_set_new(jc, "reliability_png", json_string("reliability.png"));
  return jc;
}

static json_t *ood_json(const eval_report *r) {
  const int rule = r->m->ood.present;
  json_t *jo = json_object(), *sets = json_object(), *ids = json_object();
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    json_t *e = json_object();
    json_object_set_new(e, "mean", num(r->test_mean[s]));
    json_object_set_new(e, "std", num(r->test_std[s]));
    json_object_set_new(ids, jem_score_names[s], e);
  }
  json_object_set_new(jo, "test_scores", ids);
  json_object_set_new(jo, "positive_class", json_string("in-distribution (Fashion-MNIST test)"));
  json_object_set_new(jo, "variants", json_string(
      "ood_high: high raw values are OOD; ood_low: low raw values are OOD; two_sided: "
      "|validation percentile - 0.5|"));
  for (int k = 0; k < r->n_ood; k++) {
    const eval_ood_set *R = &r->oods[k];
    json_t *e = json_object(), *sc = json_object();
    json_object_set_new(e, "n", json_integer(R->n));
    for (int s = 0; s < JEM_NUM_SCORES; s++) {
      json_t *se = json_object();
      json_object_set_new(se, "mean", num(R->mean[s]));
      for (int vv = 0; vv < NVAR; vv++)
        json_object_set_new(se, eval_var_names[vv], metrics_json(&R->mt[s][vv]));
      json_object_set_new(se, "conventional", json_string(eval_var_names[r->conventional[s]]));
      json_object_set_new(sc, jem_score_names[s], se);
    }
    json_object_set_new(e, "scores", sc);
    if (rule) {
      json_t *re = metrics_json(&R->rule);
      json_object_set_new(re, "detected_at_tpr95", num(R->rule_detect));
      json_object_set_new(e, "rule", re);
    }
    json_object_set_new(sets, R->name, e);
  }
  json_object_set_new(jo, "sets", sets);
  json_object_set_new(jo, "missing_sets", json_string(r->missing));
  if (rule) {
    json_t *re = json_object();
    json_object_set_new(re, "description", json_string(r->rule_txt));
    json_object_set_new(re, "test_tpr_at_0.95", num(r->rule_tpr));
    json_object_set_new(jo, "rule", re);
  }
  return jo;
}

static json_t *samples_json(const eval_report *r) {
  const eval_opts *o = r->o;
  json_t *jsm = json_object();
  json_object_set_new(jsm, "steps", json_integer(o->sample_steps));
  json_object_set_new(jsm, "init", json_string(eval_init_names[r->init]));
  json_object_set_new(jsm, "step_size", num(r->sp.step_size));
  json_object_set_new(jsm, "noise", num(r->sp.noise));
  json_object_set_new(jsm, "clamp", json_boolean(r->sp.clamp));
  json_object_set_new(jsm, "n_conditional", json_integer(r->n_cond));
  json_object_set_new(jsm, "n_unconditional", json_integer(r->n_unc));
  json_object_set_new(jsm, "conditional_agreement", num(r->judged[0].agree_samp));
  if (o->sample_steps > 0) {
    json_t *pa = json_array();
    for (int c = 0; c < r->m->arch.num_classes && c < EVAL_MAX_CLASSES; c++)
      json_array_append_new(pa, num(r->per_class_agree[c]));
    json_object_set_new(jsm, "conditional_agreement_per_class", pa);
    json_object_set_new(jsm, "conditional_png", json_string("samples_conditional.png"));
    if (r->n_unc > 0)
      json_object_set_new(jsm, "unconditional_png", json_string("samples_unconditional.png"));
    if (r->init == SAMPLE_GAUSSIAN) {
      json_object_set_new(jsm, "conditional_init_png", json_string("samples_conditional_init.png"));
      if (r->n_unc > 0)
        json_object_set_new(jsm, "unconditional_init_png",
                            json_string("samples_unconditional_init.png"));
    }
  }
  json_object_set_new(jsm, "conditional_agreement_starts", num(r->judged[0].agree_start));
  for (int j = 0; j < 2; j++) {
    const eval_judged *g = &r->judged[j];
    if (!g->present) continue;
    json_t *fd = json_object();
    if (j) {
      json_object_set_new(fd, "model", json_string(o->fid_model));
      json_object_set_new(fd, "conditional_agreement", num(g->agree_samp));
      json_object_set_new(fd, "conditional_agreement_starts", num(g->agree_start));
    }
    json_object_set_new(fd, "feature_dim", json_integer(g->F));
    json_object_set_new(fd, "test_vs_samples", num(g->fd_samp));
    json_object_set_new(fd, "test_vs_starts", num(g->fd_start));
    json_object_set_new(fd, "test_vs_valid", num(g->fd_valid));
    json_object_set_new(fd, "test_vs_replay_buffer", num(g->fd_replay));
    json_object_set_new(jsm, j ? "reference" : "frechet", fd);
  }
  return jsm;
}

static json_t *robustness_json(const eval_report *r) {
  const eval_opts *o = r->o;
  json_t *ja = json_object();
  json_object_set_new(ja, "enabled", json_boolean(o->attack));
  json_object_set_new(ja, "n", json_integer(r->na));
  json_object_set_new(ja, "steps", json_integer(o->attack_steps));
  json_object_set_new(ja, "radius_units", json_string(
      "[0,1] pixel units (model-space radius is twice this); the 2-pixel padding is "
      "never perturbed"));
  json_object_set_new(ja, "clean_accuracy", num(r->clean_sub));
  for (int norm = 0; norm < 2; norm++) {
    json_t *arr = json_array();
    int nr = o->attack ? (norm ? o->n_l2 : o->n_linf) : 0;
    for (int k = 0; k < nr; k++) {
      json_t *e = json_object();
      json_object_set_new(e, "radius", num(norm ? o->l2[k] : o->linf[k]));
      json_object_set_new(e, "accuracy", num(norm ? r->rob_l2[k] : r->rob_linf[k]));
      json_array_append_new(arr, e);
    }
    json_object_set_new(ja, norm ? "l2" : "linf", arr);
  }
  return ja;
}

static json_t *timing_json(const eval_report *r) {
  json_t *jt = json_object();
  json_object_set_new(jt, "classification_s", num(r->t_clf));
  json_object_set_new(jt, "ood_s", num(r->t_ood));
  json_object_set_new(jt, "samples_s", num(r->t_samp));
  json_object_set_new(jt, "attacks_s", num(r->t_att));
  json_object_set_new(jt, "total_s", num(eval_now_s() - r->t_start));
  return jt;
}

int eval_write_json(const eval_report *r) {
  json_t *rep = json_object();
  if (!rep) {
    fprintf(stderr, "jem eval: out of memory\n");
    return -1;
  }
  json_object_set_new(rep, "model", model_json(r));
  json_object_set_new(rep, "settings", settings_json(r));
  json_object_set_new(rep, "classification", classification_json(r));
  json_object_set_new(rep, "ood", ood_json(r));
  json_object_set_new(rep, "samples", samples_json(r));
  json_object_set_new(rep, "robustness", robustness_json(r));
  json_object_set_new(rep, "timing", timing_json(r));
  char path[4096];
  snprintf(path, sizeof path, "%s/report.json", r->o->out_dir);
  int rc = 0;
  if (json_dump_file(rep, path, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(6))) {
    fprintf(stderr, "jem eval: cannot write %s\n", path);
    rc = -1;
  }
  json_decref(rep);
  return rc;
}
