/* cmd_calibrate.c - `jem calibrate`: fits the temperature and the OOD
 * statistics (validation quantiles + verdict rule) into a model's metadata.
 * The stages below fill a cal_run in order; the rule itself is chosen in
 * cal_rule.c, the sampler settings in sampler_fit.c. */
#include "args.h"
#include "cal_rule.h"
#include "cli.h"
#include "jem.h"
#include "metrics.h"
#include "train.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FIT_MIN 1000 /* training images of the feature Gaussian with --limit */

typedef struct cal_opts {
  const char *model, *out, *data_dir, *ood_dir;
  const char *tune[CAL_MAX_TUNE];
  int n_tune;
  int limit, tune_limit, nq, batch, threads, leave_one_out;
  int rule_mask;     /* the rule's scores; 0: chosen among all subsets */
  int sampler_only, sampler_chains, sampler_steps;
  float tpr;
} cal_opts;

static void usage(FILE *f) {
  fprintf(f,
    "usage: jem calibrate MODEL [options]\n"
    "\n"
    "Fits the temperature (minimum NLL on the 5k Fashion-MNIST validation split) and\n"
    "the OOD statistics: the class-conditional Gaussian of the penultimate features\n"
    "(means and one shared covariance, on the 55k training split) behind the\n"
    "mahalanobis score; for each score (energy, grad_norm, max_softmax,\n"
    "energy_complexity, mahalanobis) the quantiles of its validation values; and a\n"
    "verdict rule.  Everything is chosen on the validation split against the\n"
    "tuning OOD sets only (default: uniform, gaussian, constant, letters,\n"
    "photos-skimage, photos-wallpapers, illustrations, icons, procedural, text;\n"
    "never the MNIST set the report uses):\n"
    "  0. the weight w of energy_complexity = energy - w * (the input's deflate\n"
    "     length in bits), Serra et al. (ICLR 2020): the w on a log grid from\n"
    "     1e-4 to 0.1 (or 0) with the best mean AUROC, high values OOD;\n"
    "  1. per score, the side (high, low, two-sided) with the best mean AUROC;\n"
    "  2. the rule: OOD when any of its scores leaves its band at level\n"
    "     1-(1-tpr)/n_used.  By default its scores are fixed, energy_complexity\n"
    "     and mahalanobis, each high (--rule), so that no OOD family chooses them;\n"
    "     with --rule auto, the subset of scores that flags the largest share of\n"
    "     the worst-caught tuning set at the target TPR (then the larger mean,\n"
    "     then fewer scores), on the sides of step 1;\n"
    "  3. the same choice without grad_norm: the rule for inputs scored without\n"
    "     the gradient (jemd's grad=false, jem score --no-grad).\n"
    "With --leave-one-out, first runs steps 0 to 2 once per tuning set without\n"
    "it and reports the share of that set the resulting rule flags: the figure\n"
    "for a family that played no part in choosing its rule.\n"
    "Then the sampler settings that sample jobs and `jem sample` default to: for\n"
    "step sizes 1, 0.3, 0.1 and 0.03 (noise 0.01, 100 steps, clamped), class-\n"
    "conditional chains run as jobs run them and the step size with the best score\n"
    "wins: score = (fraction of samples the model classifies as their class with\n"
    "confidence >= 0.9) * min(r, 1/r), r = the samples' high-frequency energy (mean\n"
    "squared adjacent-pixel difference) over the validation images'.\n"
    "Writes the feature Gaussian (tensors ood.feature_mean, ood.feature_whitener),\n"
    "\"temperature\", \"ood\" (with complexity_weight), \"sampler\" and\n"
    "provenance.calibration (with the leave-one-out table) into the model.\n"
    "\n"
    "options:\n"
    "  --out PATH         write here instead of overwriting MODEL\n"
    "  --data-dir DIR     Fashion-MNIST IDX files, or CIFAR-10 binary files\n"
    "                     (data_batch_N.bin, test_batch.bin) (default $JEM_FMNIST_DIR or\n"
    "                     " JEM_FMNIST_DIR_DEFAULT ")\n"
    "  --ood-dir DIR      tuning sets from scripts/make_ood_sets.py (default data/ood)\n"
    "  --tune-sets LIST   comma-separated tuning sets (default above)\n"
    "  --leave-one-out    report each tuning set against a rule chosen without it\n"
    "  --rule SCORES      the rule's scores, comma-separated, or auto (default\n"
    "                     energy_complexity,mahalanobis)\n"
    "  --tpr P            target true-positive rate of the rule (default 0.95)\n"
    "  --quantiles N      stored quantiles per score, 2..%d (default %d)\n"
    "  --limit N          only the first N validation and tuning images, and the\n"
    "                     first max(N, 1000) training images\n"
    "  --tune-limit N     only the first N images of each tuning set\n"
    "  --sampler-only     choose the sampler settings only; leave everything else\n"
    "  --sampler-chains C chains per class and step size (default 4)\n"
    "  --sampler-steps K  SGLD steps of those chains, stored as the model's\n"
    "                     default number of steps (default 100)\n"
    "  --batch B          batch size (default 100)\n"
    "  --threads N        OpenBLAS threads\n"
    "  -h, --help         this text\n", JEM_OOD_MAX_QUANTILES, JEM_OOD_MAX_QUANTILES);
}

static int parse_sets(const char *v, cal_opts *o) {
  o->n_tune = 0;
  char buf[512];
  if (strlen(v) >= sizeof buf) {
    return args_usage("calibrate", "--tune-sets is too long");
  }
  strcpy(buf, v);
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int k = -1;
    for (int i = 0; i < JEM_OOD_NSETS; i++)
      if (!strcmp(tok, jem_ood_set_names[i])) k = i;
    if (k < 0) {
      fprintf(stderr, "jem calibrate: unknown tuning set '%s' (known:", tok);
      for (int i = 0; i < JEM_OOD_NSETS; i++)
        fprintf(stderr, "%s %s", i ? "," : "", jem_ood_set_names[i]);
      fprintf(stderr, ")\n");
      return 2;
    }
    for (int i = 0; i < o->n_tune; i++)
      if (o->tune[i] == jem_ood_set_names[k]) k = -1;
    if (k >= 0) o->tune[o->n_tune++] = jem_ood_set_names[k];
  }
  if (!o->n_tune) {
    return args_usage("calibrate", "--tune-sets is empty");
  }
  return 0;
}

/* --rule: "auto" or a comma-separated list of score names. */
static int parse_rule(const char *v, cal_opts *o) {
  if (!strcmp(v, "auto")) {
    o->rule_mask = 0;
    return 0;
  }
  char buf[256];
  if (strlen(v) >= sizeof buf) return args_usage("calibrate", "--rule is too long");
  strcpy(buf, v);
  int mask = 0;
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int k = -1;
    for (int i = 0; i < JEM_NUM_SCORES; i++)
      if (!strcmp(tok, jem_score_names[i])) k = i;
    if (k < 0)
      return args_usage("calibrate", "--rule: unknown score '%s' (energy, grad_norm, "
                        "max_softmax, energy_complexity, mahalanobis, or auto)", tok);
    mask |= 1 << k;
  }
  if (!mask) return args_usage("calibrate", "--rule is empty");
  o->rule_mask = mask;
  return 0;
}

static int parse_opts(int argc, char **argv, cal_opts *o) {
  memset(o, 0, sizeof *o);
  o->ood_dir = "data/ood";
  o->nq = JEM_OOD_MAX_QUANTILES;
  o->batch = 100;
  o->sampler_chains = 4;
  o->sampler_steps = JEM_SAMPLER_STEPS;
  o->tpr = 0.95f;
  o->rule_mask = 1 << JEM_SCORE_ENERGY_COMPLEXITY | 1 << JEM_SCORE_MAHALANOBIS;
  static const char *const def[] = {"uniform", "gaussian", "constant", "letters",
                                    "photos-skimage", "photos-wallpapers", "illustrations",
                                    "icons", "procedural", "text"};
  for (size_t i = 0; i < sizeof def / sizeof *def; i++)
    for (int k = 0; k < JEM_OOD_NSETS; k++)
      if (!strcmp(def[i], jem_ood_set_names[k])) o->tune[o->n_tune++] = jem_ood_set_names[k];
  int rc = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return -1;
    }
    if (!strcmp(a, "--leave-one-out")) {
      o->leave_one_out = 1;
      continue;
    }
    if (!strcmp(a, "--sampler-only")) {
      o->sampler_only = 1;
      continue;
    }
    if (a[0] != '-' || !a[1]) {
      if (o->model) {
        return args_usage("calibrate", "one MODEL only ('%s' and '%s')", o->model, a);
      }
      o->model = a;
      continue;
    }
    if (i + 1 >= argc) {
      return args_usage("calibrate", "unknown option, or option without its value: '%s'", a);
    }
    const char *v = argv[++i];
    if (!strcmp(a, "--out")) o->out = v;
    else if (!strcmp(a, "--data-dir")) o->data_dir = v;
    else if (!strcmp(a, "--ood-dir")) o->ood_dir = v;
    else if (!strcmp(a, "--tune-sets")) rc = parse_sets(v, o);
    else if (!strcmp(a, "--rule")) rc = parse_rule(v, o);
    else if (!strcmp(a, "--limit")) rc = args_int("calibrate", a, v, 10, 1 << 30, &o->limit);
    else if (!strcmp(a, "--tune-limit")) rc = args_int("calibrate", a, v, 10, 1 << 30, &o->tune_limit);
    else if (!strcmp(a, "--quantiles")) rc = args_int("calibrate", a, v, 2, JEM_OOD_MAX_QUANTILES, &o->nq);
    else if (!strcmp(a, "--batch")) rc = args_int("calibrate", a, v, 1, 4096, &o->batch);
    else if (!strcmp(a, "--threads")) rc = args_int("calibrate", a, v, 1, 256, &o->threads);
    else if (!strcmp(a, "--sampler-chains")) rc = args_int("calibrate", a, v, 1, 64, &o->sampler_chains);
    else if (!strcmp(a, "--sampler-steps")) rc = args_int("calibrate", a, v, 1, 2000, &o->sampler_steps);
    else if (!strcmp(a, "--tpr")) {
      rc = args_float("calibrate", a, v, 0.5, 1.0, &o->tpr);
      if (!rc && !(o->tpr > 0.5f && o->tpr < 1.0f))
        rc = args_usage("calibrate", "--tpr expects a number strictly between 0.5 and 1, not '%s'", v);
    } else {
      return args_usage("calibrate", "unknown option, or option without its value: '%s'", a);
    }
    if (rc) return rc;
  }
  if (!o->model) {
    fprintf(stderr, "jem calibrate: missing MODEL\n");
    usage(stderr);
    return 2;
  }
  if (!o->out) o->out = o->model;
  return 0;
}

/* One run: what the stages share.  Each stage returns 0, or 1 after
 * printing why. */
typedef struct cal_run {
  cal_opts o;
  char err[512];
  jem_model *m;
  jem_ws *ws;
  jem_dataset valid;
  int nv;                         /* validation images used */
  jem_set_scores sv;              /* their scores */
  cal_rows id, sets[CAL_MAX_TUNE]; /* validation and tuning rows */
  int nsets;
  jem_ood_stats st, best;         /* scratch, and the statistics stored */
  double T, nll1, nllT;           /* temperature, NLL at 1 and at T */
  jem_calib c1, cT;               /* ECE at 1 and at T */
  cal_selection sel;              /* the rule chosen on every tuning set */
  json_t *loo, *cfit, *cands;     /* provenance: leave-one-out, candidates */
} cal_run;

static int fail(cal_run *C, const char *what) {
  fprintf(stderr, "jem calibrate: %s%s%s\n", what ? what : "", what ? ": " : "", C->err);
  return 1;
}

/* The model, a workspace, the validation split. */
static int stage_load(cal_run *C) {
  const cal_opts *o = &C->o;
  if (jem_model_load(&C->m, o->model, C->err, sizeof C->err)) return fail(C, NULL);
  if (!(C->ws = jem_ws_create(C->m, o->batch, JEM_WS_FIXED_WEIGHTS))) {
    fprintf(stderr, "jem calibrate: cannot allocate a workspace for batch %d\n", o->batch);
    return 1;
  }
  if (jem_fmnist_load(o->data_dir, JEM_SPLIT_VALID, &C->valid, C->err, sizeof C->err))
    return fail(C, NULL);
  if (C->valid.c != C->m->arch.in_channels || C->valid.s != C->m->arch.image_size ||
      C->valid.num_classes > C->m->arch.num_classes) {
    fprintf(stderr, "jem calibrate: the validation data does not fit the model\n");
    return 1;
  }
  C->nv = o->limit && o->limit < C->valid.n ? o->limit : C->valid.n;
  return 0;
}

/* One image of each tuning set, to fail before the slow part. */
static int stage_probe(cal_run *C) {
  for (int t = 0; t < C->o.n_tune; t++) {
    jem_dataset probe = {0};
    int bad = jem_ood_set_load(C->o.ood_dir, C->o.tune[t], C->m, 1, &probe, C->err,
                               sizeof C->err);
    jem_dataset_free(&probe);
    if (bad) {
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", C->o.tune[t], C->err);
      return 1;
    }
  }
  return 0;
}

/* The feature Gaussian (behind the mahalanobis score), on the training
 * split. */
static int stage_feature_gauss(cal_run *C) {
  jem_dataset train = {0};
  jem_set_scores sf = {0};
  int bad = jem_fmnist_load(C->o.data_dir, JEM_SPLIT_TRAIN, &train, C->err, sizeof C->err);
  /* every class needs images, so a --limit run still takes a few thousand */
  const int lim = C->o.limit && C->o.limit < FIT_MIN ? FIT_MIN : C->o.limit;
  const int nt = lim && lim < train.n ? lim : train.n;
  if (!bad)
    bad = jem_eval_score_set(C->ws, C->m, train.x, nt, 0, 1, 0.0f, 0, &sf, C->err,
                             sizeof C->err);
  if (!bad) bad = jem_model_fit_feature_gauss(C->m, sf.feat, train.y, nt, C->err, sizeof C->err);
  jem_set_scores_free(&sf);
  jem_dataset_free(&train);
  if (bad) return fail(C, NULL);
  fprintf(stderr, "jem calibrate: feature Gaussian fitted on %d training images\n", nt);
  return 0;
}

/* The validation scores, and the temperature with the least NLL on them. */
static int stage_temperature(cal_run *C) {
  const int K = C->m->arch.num_classes, nv = C->nv;
  const jem_dataset *v = &C->valid;
  if (jem_eval_score_set(C->ws, C->m, v->x, nv, 1, 0, 0.0f, 0, &C->sv, C->err, sizeof C->err) ||
      cal_rows_from(C->m, v->x, &C->sv, "valid", &C->id))
    return fail(C, NULL);
  C->T = jem_fit_temperature(C->sv.logits, v->y, nv, K);
  C->nll1 = jem_nll(C->sv.logits, v->y, nv, K, 1.0);
  C->nllT = jem_nll(C->sv.logits, v->y, nv, K, C->T);
  if (jem_ece(C->sv.logits, v->y, nv, K, 1.0, 20, &C->c1, C->err, sizeof C->err) ||
      jem_ece(C->sv.logits, v->y, nv, K, C->T, 20, &C->cT, C->err, sizeof C->err))
    return fail(C, NULL);
  fprintf(stderr, "jem calibrate: %d validation images; T = %.4f (NLL %.4f -> %.4f, "
          "ECE %.2f%% -> %.2f%%)\n", nv, C->T, C->nll1, C->nllT, 100 * C->c1.ece,
          100 * C->cT.ece);
  return 0;
}

/* Each score's validation quantiles (energy_complexity's come with its
 * weight, in cal_select_rule). */
static int stage_quantiles(cal_run *C) {
  jem_ood_stats *st = &C->st;
  st->present = 1;
  st->default_tpr = C->o.tpr;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    if (k == JEM_SCORE_ENERGY_COMPLEXITY) continue;
    if (jem_quantiles(C->sv.score[k], C->nv, C->o.nq, st->q[k], C->err, sizeof C->err))
      return fail(C, jem_score_names[k]);
    st->nq[k] = C->o.nq;
  }
  return 0;
}

/* The tuning sets' scores. */
static int stage_tune_sets(cal_run *C) {
  const cal_opts *o = &C->o;
  for (int t = 0; t < o->n_tune; t++) {
    jem_dataset od = {0};
    jem_set_scores so = {0};
    int tl = o->tune_limit ? o->tune_limit : o->limit;
    if (o->tune_limit && o->limit && o->limit < tl) tl = o->limit;
    if (jem_ood_set_load(o->ood_dir, o->tune[t], C->m, tl, &od, C->err, sizeof C->err)) {
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", o->tune[t], C->err);
      return 1;
    }
    int bad = od.c != C->m->arch.in_channels ||
              jem_eval_score_set(C->ws, C->m, od.x, od.n, 1, 0, 0.0f, 0, &so, C->err,
                                 sizeof C->err) ||
              cal_rows_from(C->m, od.x, &so, o->tune[t], &C->sets[C->nsets]);
    jem_set_scores_free(&so);
    jem_dataset_free(&od);
    if (bad) {
      cal_rows_free(&C->sets[C->nsets]);
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", o->tune[t],
              C->err[0] ? C->err : "does not fit the model");
      return 1;
    }
    C->nsets++;
  }
  return 0;
}

static int out_of_memory(void) {
  fprintf(stderr, "jem calibrate: out of memory\n");
  return 1;
}

/* --leave-one-out: each tuning set judged by a rule chosen without it. */
static int stage_leave_one_out(cal_run *C) {
  const cal_opts *o = &C->o;
  jem_ood_stats *st = &C->st;
  C->loo = json_array();
  if (!o->leave_one_out || C->nsets < 2) return 0;
  fprintf(stderr, "jem calibrate: leave-one-out, each set flagged by the rule chosen "
          "without it (tpr %.2f):\n", (double)o->tpr);
  for (int f = 0; f < C->nsets; f++) {
    cal_selection sel;
    if (cal_select_rule(st, &C->id, C->sets, C->nsets, f, o->rule_mask, o->tpr, o->nq, NULL,
                        NULL, 0, &sel))
      return out_of_memory();
    for (int k = 0; k < JEM_NUM_SCORES; k++)
      st->side[k] = (sel.main_rule.mask >> k & 1) ? sel.side[k] : 0;
    st->has_nograd = 0;
    const double det = cal_flagged(st, &C->sets[f], o->tpr);
    json_t *names = json_array();
    char used[160] = "";
    for (int k = 0; k < JEM_NUM_SCORES; k++) {
      if (!st->side[k]) continue;
      json_array_append_new(names, json_pack("{s:s,s:s}", "score", jem_score_names[k],
                                             "side", jem_ood_side_name(st->side[k])));
      size_t l = strlen(used);
      snprintf(used + l, sizeof used - l, "%s%s %s", l ? ", " : "", jem_score_names[k],
               jem_ood_side_name(st->side[k]));
    }
    fprintf(stderr, "  %-17s %6.2f%%  [%s]\n", C->sets[f].name, 100 * det, used);
    json_array_append_new(C->loo, json_pack("{s:s,s:i,s:f,s:o,s:f}", "set", C->sets[f].name,
                                            "n", C->sets[f].n, "detected", det, "rule", names,
                                            "valid_accepted", sel.main_rule.tpr));
  }
  return 0;
}

/* The rule, chosen on every tuning set, into C->best with its text. */
static int stage_rule(cal_run *C) {
  const cal_opts *o = &C->o;
  const cal_selection *sel = &C->sel;
  C->cfit = json_array();
  C->cands = json_array();
  if (cal_select_rule(&C->st, &C->id, C->sets, C->nsets, -1, o->rule_mask, o->tpr, o->nq,
                      C->cfit, C->cands, 1, &C->sel))
    return out_of_memory();
  fprintf(stderr, "jem calibrate: energy_complexity weight %.3g nats per bit\n", sel->weight);
  const cal_rule_choice *main_rule = &sel->main_rule, *nograd_rule = &sel->nograd_rule;
  jem_ood_stats *best = &C->best;
  *best = C->st;
  best->has_nograd = 1;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    best->side[k] = (main_rule->mask >> k & 1) ? sel->side[k] : 0;
    best->side_nograd[k] = (nograd_rule->mask >> k & 1) ? sel->side[k] : 0;
  }

  char tune_txt[256] = "";
  int has_mnist = 0;
  for (int t = 0; t < C->nsets; t++) {
    size_t l = strlen(tune_txt);
    snprintf(tune_txt + l, sizeof tune_txt - l, "%s%s", t ? "," : "", C->sets[t].name);
    has_mnist |= !strcmp(C->sets[t].name, "mnist");
  }
  if (has_mnist)
    fprintf(stderr, "jem calibrate: warning: the rule is tuned on the MNIST set; MNIST "
            "figures from jem eval will overstate it\n");
  cal_describe_rule(best->rule, sizeof best->rule, "", best->side, o->rule_mask, tune_txt,
                    has_mnist);
  cal_describe_rule(best->rule_nograd, sizeof best->rule_nograd, "without the gradient score: ",
                    best->side_nograd, o->rule_mask, tune_txt, has_mnist);
  fprintf(stderr, "jem calibrate: rule: %s\n  tuning sets flagged at tpr %.2f: mean %.2f%%, "
          "min %.2f%%; validation accepted %.2f%%\n", best->rule, (double)o->tpr,
          100 * main_rule->obj, 100 * main_rule->min, 100 * main_rule->tpr);
  fprintf(stderr, "jem calibrate: rule %s\n  tuning sets flagged: mean %.2f%%, min %.2f%%; "
          "validation accepted %.2f%%\n", best->rule_nograd, 100 * nograd_rule->obj,
          100 * nograd_rule->min, 100 * nograd_rule->tpr);
  return 0;
}

/* The metadata's "ood" object: each score's quantiles and sides, the
 * weight, the target TPR and the rules. */
static json_t *ood_json(const cal_run *C) {
  const jem_ood_stats *best = &C->best;
  json_t *ood = json_object(), *scores = json_object();
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    json_t *e = json_object(), *q = json_array();
    for (int i = 0; i < best->nq[k]; i++) json_array_append_new(q, json_real(best->q[k][i]));
    json_object_set_new(e, "quantiles", q);
    json_object_set_new(e, "side", json_string(jem_ood_side_name(best->side[k])));
    json_object_set_new(e, "side_nograd", json_string(jem_ood_side_name(best->side_nograd[k])));
    json_object_set_new(scores, jem_score_names[k], e);
  }
  json_object_set_new(ood, "scores", scores);
  json_object_set_new(ood, "complexity_weight", json_real((float)C->sel.weight));
  json_object_set_new(ood, "tpr", json_real(C->o.tpr));
  json_object_set_new(ood, "rule", json_string(best->rule));
  json_object_set_new(ood, "rule_nograd", json_string(best->rule_nograd));
  return ood;
}

/* provenance.calibration: the date, the temperature fit, the tuning sets and
 * how the rule was chosen (takes C's candidate and leave-one-out arrays). */
static json_t *calibration_json(cal_run *C) {
  const cal_selection *sel = &C->sel;
  json_t *cal = json_object();
  char when[32];
  time_t now = time(NULL);
  struct tm tmv;
  strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tmv));
  json_object_set_new(cal, "date", json_string(when));
  json_object_set_new(cal, "n_valid", json_integer(C->nv));
  json_object_set_new(cal, "valid_split", json_string("fixed 5k split of the training set, seed 1234"));
  json_object_set_new(cal, "temperature", json_real(C->T));
  json_object_set_new(cal, "valid_nll", json_real(C->nll1));
  json_object_set_new(cal, "valid_nll_tempered", json_real(C->nllT));
  json_object_set_new(cal, "valid_ece", json_real(C->c1.ece));
  json_object_set_new(cal, "valid_ece_tempered", json_real(C->cT.ece));
  json_t *ts = json_array();
  for (int t = 0; t < C->nsets; t++) {
    json_t *e = json_object();
    json_object_set_new(e, "set", json_string(C->sets[t].name));
    json_object_set_new(e, "n", json_integer(C->sets[t].n));
    json_array_append_new(ts, e);
  }
  json_object_set_new(cal, "tuning_sets", ts);
  json_t *sa = json_object();
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    json_t *e = json_object();
    json_object_set_new(e, "high", json_real(sel->side_auc[k][0]));
    json_object_set_new(e, "low", json_real(sel->side_auc[k][1]));
    json_object_set_new(e, "two-sided", json_real(sel->side_auc[k][2]));
    json_object_set_new(sa, jem_score_names[k], e);
  }
  json_object_set_new(cal, "side_mean_auroc", sa);
  json_object_set_new(cal, "subsets", C->cands);
  json_object_set_new(cal, "complexity_weight_fit", C->cfit);
  json_object_set_new(cal, "leave_one_out", C->loo);
  C->cands = C->cfit = C->loo = NULL;
  json_object_set_new(cal, "chosen_mean_detected", json_real(sel->main_rule.obj));
  json_object_set_new(cal, "chosen_min_detected", json_real(sel->main_rule.min));
  json_object_set_new(cal, "chosen_valid_accepted", json_real(sel->main_rule.tpr));
  json_object_set_new(cal, "nograd_mean_detected", json_real(sel->nograd_rule.obj));
  json_object_set_new(cal, "nograd_valid_accepted", json_real(sel->nograd_rule.tpr));
  return cal;
}

/* "ood", "temperature" and provenance.calibration into the model. */
static int stage_metadata(cal_run *C) {
  json_t *meta = C->m->meta;
  json_object_set_new(meta, "ood", ood_json(C));
  json_object_set_new(meta, "temperature", json_real((float)C->T));
  json_t *prov = json_object_get(meta, "provenance");
  if (!json_is_object(prov)) {
    prov = json_object();
    json_object_set_new(meta, "provenance", prov);
  }
  json_object_set_new(prov, "calibration", calibration_json(C));
  if (jem_model_apply_meta(C->m, C->err, sizeof C->err))
    return fail(C, "the new metadata does not apply");
  return 0;
}

/* The sampler settings, judged with the temperature just fitted. */
static int stage_sampler(cal_run *C) {
  if (cli_fit_sampler(C->m, C->ws, C->valid.x, C->nv, C->o.sampler_chains, C->o.sampler_steps,
                      C->err, sizeof C->err) ||
      jem_model_apply_meta(C->m, C->err, sizeof C->err))
    return fail(C, "sampler settings");
  return 0;
}

static int stage_save(cal_run *C) {
  if (jem_model_save(C->m, C->o.out, C->err, sizeof C->err)) return fail(C, NULL);
  fprintf(stderr, "jem calibrate: wrote %s\n", C->o.out);
  return 0;
}

static void cal_run_free(cal_run *C) {
  json_decref(C->loo);
  json_decref(C->cfit);
  json_decref(C->cands);
  for (int t = 0; t < C->nsets; t++) cal_rows_free(&C->sets[t]);
  cal_rows_free(&C->id);
  jem_set_scores_free(&C->sv);
  jem_dataset_free(&C->valid);
  jem_ws_free(C->ws);
  jem_model_free(C->m);
  free(C);
}

int cmd_calibrate(int argc, char **argv) {
  cal_run *C = calloc(1, sizeof *C);
  if (!C) return out_of_memory();
  int rc = parse_opts(argc, argv, &C->o);
  if (rc) {
    free(C);
    return rc < 0 ? 0 : rc;
  }
  if (C->o.threads) jem_blas_set_threads(C->o.threads);
  /* --sampler-only leaves the rest of the metadata as it is */
  const int status =
      stage_load(C) ||
      (!C->o.sampler_only &&
       (stage_probe(C) || stage_feature_gauss(C) || stage_temperature(C) ||
        stage_quantiles(C) || stage_tune_sets(C) || stage_leave_one_out(C) ||
        stage_rule(C) || stage_metadata(C))) ||
      stage_sampler(C) || stage_save(C);
  cal_run_free(C);
  return status;
}
