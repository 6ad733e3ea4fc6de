/* cmd_calibrate.c - `jem calibrate`: fits the temperature and the OOD
 * statistics (validation quantiles + verdict rule) into a model's metadata. */
#include "args.h"
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

#define MAX_TUNE JEM_OOD_NSETS
#define FIT_MIN 1000 /* training images of the feature Gaussian with --limit */

typedef struct cal_opts {
  const char *model, *out, *data_dir, *ood_dir;
  const char *tune[MAX_TUNE];
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

/* Scores of one set, as [n][JEM_NUM_SCORES] rows for jem_ood_eval. */
typedef struct score_rows {
  const char *name;
  int n;
  float (*v)[JEM_NUM_SCORES];
  float *bits;       /* [n] compressed lengths, for energy_complexity */
} score_rows;

/* The rows of set x (scored into s), and each image's compressed length:
 * calibrate is the one consumer of the lengths themselves. */
static int rows_from(const jem_model *m, const float *x, const jem_set_scores *s,
                     const char *name, score_rows *out) {
  const size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  out->name = name;
  out->n = s->n;
  out->v = malloc(sizeof *out->v * (size_t)(s->n > 0 ? s->n : 1));
  out->bits = malloc(sizeof *out->bits * (size_t)(s->n > 0 ? s->n : 1));
  if (!out->v || !out->bits) return -1;
  for (int i = 0; i < s->n; i++) {
    for (int k = 0; k < JEM_NUM_SCORES; k++) out->v[i][k] = s->score[k][i];
    out->bits[i] = jem_input_complexity_bits(m, x + (size_t)i * chw);
  }
  return 0;
}

static void rows_free(score_rows *r) {
  free(r->v);
  free(r->bits);
  r->v = NULL;
  r->bits = NULL;
}

/* Sets energy_complexity = energy - w * bits in every row. */
static void rows_set_complexity(score_rows *r, double w) {
  for (int i = 0; i < r->n; i++)
    r->v[i][JEM_SCORE_ENERGY_COMPLEXITY] =
        (float)((double)r->v[i][JEM_SCORE_ENERGY] - w * (double)r->bits[i]);
}

/* A per-row statistic, higher = more in-distribution. */
typedef double (*row_stat)(const void *ctx, const float row[JEM_NUM_SCORES]);

/* Mean AUROC of stat (validation positive) over the sets; per_set, if not
 * NULL, gets each set's AUROC. */
static double mean_auroc(row_stat stat, const void *ctx, const score_rows *id,
                         const score_rows *sets, int nsets, double *per_set) {
  double *pos = malloc(sizeof(double) * (size_t)id->n), tot = 0.0;
  if (!pos) return NAN;
  for (int i = 0; i < id->n; i++) pos[i] = stat(ctx, id->v[i]);
  for (int k = 0; k < nsets; k++) {
    double *neg = malloc(sizeof(double) * (size_t)sets[k].n);
    double a = NAN;
    if (neg) {
      for (int i = 0; i < sets[k].n; i++) neg[i] = stat(ctx, sets[k].v[i]);
      a = jem_auroc(pos, id->n, neg, sets[k].n);
    }
    free(neg);
    if (per_set) per_set[k] = a;
    tot += a;
  }
  free(pos);
  return tot / nsets;
}

/* energy_complexity, high values OOD. */
static double complexity_stat(const void *ctx, const float row[JEM_NUM_SCORES]) {
  (void)ctx;
  return -(double)row[JEM_SCORE_ENERGY_COMPLEXITY];
}

/* The continuous verdict of the rule in ctx (a jem_ood_stats). */
static double rule_stat(const void *ctx, const float row[JEM_NUM_SCORES]) {
  return jem_ood_rule_stat(ctx, row);
}

/* The weight w of energy_complexity (Serra et al., ICLR 2020: the energy
 * minus the input's compressed length): the one, on a log grid from 1e-4 to
 * 0.1 nats per bit (and 0, the plain energy), with the best mean AUROC over
 * the tuning sets with high values OOD.  A JEM's energy has no absolute
 * scale (the energy L2 term sets it), so the weight cannot be ln 2 as for
 * a normalised likelihood.  Leaves every row's energy_complexity at the
 * chosen weight and appends each candidate to fit. */
static double fit_complexity_weight(score_rows *id, score_rows *sets, int nsets, json_t *fit) {
  double best_w = 0.0, best_a = -1.0;
  for (int i = -1; i <= 24; i++) {
    const double w = i < 0 ? 0.0 : 1e-4 * pow(10.0, i / 8.0);
    rows_set_complexity(id, w);
    for (int k = 0; k < nsets; k++) rows_set_complexity(&sets[k], w);
    const double a = mean_auroc(complexity_stat, NULL, id, sets, nsets, NULL);
    json_array_append_new(fit, json_pack("{s:f,s:f}", "weight", w, "mean_auroc", a));
    if (a > best_a + 1e-9) {
      best_a = a;
      best_w = w;
    }
  }
  rows_set_complexity(id, best_w);
  for (int k = 0; k < nsets; k++) rows_set_complexity(&sets[k], best_w);
  return best_w;
}

/* Fraction of rows flagged OOD by the rule at tpr. */
static double flagged(const jem_ood_stats *st, const score_rows *r, float tpr) {
  int f = 0;
  for (int i = 0; i < r->n; i++) {
    jem_ood_result res;
    jem_ood_eval(st, r->v[i], tpr, &res);
    f += res.is_ood == 1;
  }
  return r->n ? (double)f / r->n : NAN;
}

/* The verdict rule chosen among subsets of scores. */
typedef struct rule_choice {
  int mask;          /* bit k: score k is used */
  double obj;        /* mean fraction of tuning images flagged */
  double min;        /* the smallest such fraction over the sets */
  double tpr;        /* fraction of validation images accepted */
} rule_choice;

/* Among the non-empty subsets of `allowed` scores (each on its side[]), the
 * one whose verdict flags the largest share of the worst-caught tuning set
 * at tpr (the promise is about every family, not the average); within 0.1
 * point the larger mean wins, then the rule with fewer scores.  Appends
 * every candidate to cands when it is not NULL.  Uses st as scratch. */
static void choose_subset(jem_ood_stats *st, const int side[JEM_NUM_SCORES], int allowed,
                          int exact, const score_rows *id, const score_rows *sets, int nsets,
                          float tpr, json_t *cands, rule_choice *best) {
  best->mask = 0;
  best->obj = -1;
  best->min = best->tpr = NAN;
  st->has_nograd = 0;
  for (int mask = 1; mask < (1 << JEM_NUM_SCORES); mask++) {
    if ((mask & ~allowed) || (exact && mask != allowed)) continue;
    int used = 0, best_used = 0;
    for (int k = 0; k < JEM_NUM_SCORES; k++) {
      st->side[k] = (mask >> k & 1) ? side[k] : 0;
      used += mask >> k & 1;
      best_used += best->mask >> k & 1;
    }
    double tot = 0, mn = 1;
    for (int t = 0; t < nsets; t++) {
      double f = flagged(st, &sets[t], tpr);
      tot += f;
      if (f < mn) mn = f;
    }
    double obj = tot / nsets, acc_id = 1.0 - flagged(st, id, tpr);
    const int tie_min = fabs(mn - best->min) <= 1e-3, tie_obj = fabs(obj - best->obj) <= 1e-3;
    if (best->mask == 0 || (!tie_min && mn > best->min) ||
        (tie_min && !tie_obj && obj > best->obj) || (tie_min && tie_obj && used < best_used))
      *best = (rule_choice){mask, obj, mn, acc_id};
    if (!cands) continue;
    json_t *c = json_object();
    json_t *names = json_array();
    for (int k = 0; k < JEM_NUM_SCORES; k++)
      if (mask >> k & 1) json_array_append_new(names, json_string(jem_score_names[k]));
    json_object_set_new(c, "scores", names);
    json_object_set_new(c, "mean_detected", json_real(obj));
    json_object_set_new(c, "min_detected", json_real(mn));
    json_object_set_new(c, "valid_accepted", json_real(acc_id));
    json_array_append_new(cands, c);
  }
}

/* Steps 0 to 2 on the tuning sets other than sets[skip] (skip -1: all of
 * them): the complexity weight, with the quantiles of energy_complexity at
 * it; the side of each score; the subset of scores, and the one without the
 * gradient.  Leaves st with every score's quantiles and the chosen weight,
 * and every row's energy_complexity at it.  cfit and cands (may be NULL) get
 * the candidates.  -1 when out of memory or no quantiles. */
typedef struct selection {
  double weight;
  int side[JEM_NUM_SCORES];
  double side_auc[JEM_NUM_SCORES][3];
  rule_choice main_rule, nograd_rule;
} selection;

static int select_rule(jem_ood_stats *st, score_rows *id, score_rows *all, int nall, int skip,
                       int fixed, float tpr, int nq, json_t *cfit, json_t *cands, int verbose,
                       selection *sel) {
  score_rows sets[MAX_TUNE];
  int nsets = 0;
  for (int t = 0; t < nall; t++)
    if (t != skip) sets[nsets++] = all[t];
  json_t *fit = cfit ? cfit : json_array();
  sel->weight = fit_complexity_weight(id, sets, nsets, fit);
  if (!cfit) json_decref(fit);
  for (int t = 0; t < nall; t++) rows_set_complexity(&all[t], sel->weight);
  float *ec = malloc(sizeof(float) * (size_t)id->n);
  for (int i = 0; ec && i < id->n; i++) ec[i] = id->v[i][JEM_SCORE_ENERGY_COMPLEXITY];
  char err[128];
  int bad = !ec || jem_quantiles(ec, id->n, nq, st->q[JEM_SCORE_ENERGY_COMPLEXITY], err,
                                 sizeof err);
  free(ec);
  if (bad) return -1;
  st->nq[JEM_SCORE_ENERGY_COMPLEXITY] = nq;
  st->complexity_weight = (float)sel->weight;

  static const int sides[3] = {1, -1, 2};
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    sel->side[k] = 1;
    double bestv = -1;
    for (int j = 0; j < 3; j++) {
      for (int q = 0; q < JEM_NUM_SCORES; q++) st->side[q] = 0;
      st->side[k] = sides[j];
      sel->side_auc[k][j] = mean_auroc(rule_stat, st, id, sets, nsets, NULL);
      if (sel->side_auc[k][j] > bestv + 1e-9) {
        bestv = sel->side_auc[k][j];
        sel->side[k] = sides[j];
      }
    }
    if (fixed) /* a fixed rule reads each score on its defined side */
      sel->side[k] = jem_score_conventional_side[k];
    if (verbose)
      fprintf(stderr, "  %-17s mean AUROC high %.4f  low %.4f  two-sided %.4f -> %s\n",
              jem_score_names[k], sel->side_auc[k][0], sel->side_auc[k][1],
              sel->side_auc[k][2], jem_ood_side_name(sel->side[k]));
  }
  const int all_scores = fixed ? fixed : (1 << JEM_NUM_SCORES) - 1;
  const int nograd = all_scores & ~(1 << JEM_SCORE_GRAD_NORM);
  choose_subset(st, sel->side, all_scores, fixed != 0, id, sets, nsets, tpr, cands,
                &sel->main_rule);
  choose_subset(st, sel->side, nograd ? nograd : all_scores, fixed != 0, id, sets, nsets, tpr,
                NULL, &sel->nograd_rule);
  return 0;
}

/* The rule's description, stored in the metadata and served with verdicts;
 * a long list of tuning sets may be cut short. */
static void describe_rule(char *buf, size_t size, const char *prefix,
                          const int side[JEM_NUM_SCORES], int fixed, const char *tune_txt,
                          int has_mnist) {
  char used_txt[192] = "";
  int n_used = 0;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    if (!side[k]) continue;
    size_t l = strlen(used_txt);
    snprintf(used_txt + l, sizeof used_txt - l, "%s%s %s", n_used ? ", " : "",
             jem_score_names[k], jem_ood_side_name(side[k]));
    n_used++;
  }
  int len = snprintf(buf, size,
                     "%sOOD if any of [%s] leaves its validation band at level 1-(1-tpr)/%d; "
                     "%s on validation vs %s%s", prefix, used_txt, n_used,
                     fixed ? "scores and sides fixed, energy_complexity's weight fitted"
                           : "sides and scores chosen",
                     tune_txt, has_mnist ? "" : " (not MNIST)");
  if (len >= (int)size) fprintf(stderr, "jem calibrate: note: a rule description was shortened\n");
}

int cmd_calibrate(int argc, char **argv) {
  cal_opts o;
  int rc = parse_opts(argc, argv, &o);
  if (rc) return rc < 0 ? 0 : rc;
  if (o.threads) jem_blas_set_threads(o.threads);
  char err[512];
  int status = 1;
  jem_model *m = NULL;
  jem_ws *ws = NULL;
  jem_dataset valid = {0};
  jem_set_scores sv = {0};
  score_rows id = {0}, sets[MAX_TUNE];
  int nsets = 0;
  jem_ood_stats *st = calloc(1, sizeof *st), *best = calloc(1, sizeof *best);
  json_t *loo = NULL;
  memset(sets, 0, sizeof sets);

  if (!st || !best) {
    fprintf(stderr, "jem calibrate: out of memory\n");
    goto done;
  }
  if (jem_model_load(&m, o.model, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: %s\n", err);
    goto done;
  }
  const int K = m->arch.num_classes, S = m->arch.image_size;
  if (!(ws = jem_ws_create(m, o.batch, JEM_WS_FIXED_WEIGHTS))) {
    fprintf(stderr, "jem calibrate: cannot allocate a workspace for batch %d\n", o.batch);
    goto done;
  }
  if (jem_fmnist_load(o.data_dir, JEM_SPLIT_VALID, &valid, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: %s\n", err);
    goto done;
  }
  if (valid.c != m->arch.in_channels || valid.s != S || valid.num_classes > K) {
    fprintf(stderr, "jem calibrate: the validation data does not fit the model\n");
    goto done;
  }
  const int nv = o.limit && o.limit < valid.n ? o.limit : valid.n;
  if (o.sampler_only) goto sampler; /* the rest of the metadata stays as it is */

  for (int t = 0; t < o.n_tune; t++) { /* fail before the slow part: one image of each */
    jem_dataset probe = {0};
    int bad = jem_ood_set_load(o.ood_dir, o.tune[t], m, 1, &probe, err, sizeof err);
    jem_dataset_free(&probe);
    if (bad) {
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", o.tune[t], err);
      goto done;
    }
  }

  /* ---- the feature Gaussian, on the training split ---- */
  {
    jem_dataset train = {0};
    jem_set_scores sf = {0};
    int bad = jem_fmnist_load(o.data_dir, JEM_SPLIT_TRAIN, &train, err, sizeof err);
    /* every class needs images, so a --limit run still takes a few thousand */
    const int lim = o.limit && o.limit < FIT_MIN ? FIT_MIN : o.limit;
    const int nt = lim && lim < train.n ? lim : train.n;
    if (!bad) bad = jem_eval_score_set(ws, m, train.x, nt, 0, 1, 0.0f, 0, &sf, err, sizeof err);
    if (!bad) bad = jem_model_fit_feature_gauss(m, sf.feat, train.y, nt, err, sizeof err);
    jem_set_scores_free(&sf);
    jem_dataset_free(&train);
    if (bad) {
      fprintf(stderr, "jem calibrate: %s\n", err);
      goto done;
    }
    fprintf(stderr, "jem calibrate: feature Gaussian fitted on %d training images\n", nt);
  }

  /* ---- temperature ---- */
  if (jem_eval_score_set(ws, m, valid.x, nv, 1, 0, 0.0f, 0, &sv, err, sizeof err) ||
      rows_from(m, valid.x, &sv, "valid", &id)) {
    fprintf(stderr, "jem calibrate: %s\n", err);
    goto done;
  }
  const double T = jem_fit_temperature(sv.logits, valid.y, nv, K);
  const double nll1 = jem_nll(sv.logits, valid.y, nv, K, 1.0);
  const double nllT = jem_nll(sv.logits, valid.y, nv, K, T);
  jem_calib c1, cT;
  if (jem_ece(sv.logits, valid.y, nv, K, 1.0, 20, &c1, err, sizeof err) ||
      jem_ece(sv.logits, valid.y, nv, K, T, 20, &cT, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: %s\n", err);
    goto done;
  }
  fprintf(stderr, "jem calibrate: %d validation images; T = %.4f (NLL %.4f -> %.4f, "
          "ECE %.2f%% -> %.2f%%)\n", nv, T, nll1, nllT, 100 * c1.ece, 100 * cT.ece);

  /* ---- quantiles ---- */
  st->present = 1;
  st->default_tpr = o.tpr;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    if (k == JEM_SCORE_ENERGY_COMPLEXITY) continue; /* after its weight: select_rule */
    if (jem_quantiles(sv.score[k], nv, o.nq, st->q[k], err, sizeof err)) {
      fprintf(stderr, "jem calibrate: %s: %s\n", jem_score_names[k], err);
      goto done;
    }
    st->nq[k] = o.nq;
  }

  /* ---- tuning sets ---- */
  for (int t = 0; t < o.n_tune; t++) {
    jem_dataset od = {0};
    jem_set_scores so = {0};
    int tl = o.tune_limit ? o.tune_limit : o.limit;
    if (o.tune_limit && o.limit && o.limit < tl) tl = o.limit;
    if (jem_ood_set_load(o.ood_dir, o.tune[t], m, tl, &od, err, sizeof err)) {
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", o.tune[t], err);
      goto done;
    }
    int bad = od.c != m->arch.in_channels ||
              jem_eval_score_set(ws, m, od.x, od.n, 1, 0, 0.0f, 0, &so, err, sizeof err) ||
              rows_from(m, od.x, &so, o.tune[t], &sets[nsets]);
    jem_set_scores_free(&so);
    jem_dataset_free(&od);
    if (bad) {
      rows_free(&sets[nsets]);
      fprintf(stderr, "jem calibrate: tuning set %s: %s\n", o.tune[t],
              err[0] ? err : "does not fit the model");
      goto done;
    }
    nsets++;
  }

  /* ---- leave one out: each tuning set judged by a rule chosen without it ---- */
  loo = json_array();
  selection sel;
  if (o.leave_one_out && nsets > 1) {
    fprintf(stderr, "jem calibrate: leave-one-out, each set flagged by the rule chosen "
            "without it (tpr %.2f):\n", (double)o.tpr);
    for (int f = 0; f < nsets; f++) {
      if (select_rule(st, &id, sets, nsets, f, o.rule_mask, o.tpr, o.nq, NULL, NULL, 0, &sel))
        goto oom;
      for (int k = 0; k < JEM_NUM_SCORES; k++)
        st->side[k] = (sel.main_rule.mask >> k & 1) ? sel.side[k] : 0;
      st->has_nograd = 0;
      const double det = flagged(st, &sets[f], o.tpr);
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
      fprintf(stderr, "  %-17s %6.2f%%  [%s]\n", sets[f].name, 100 * det, used);
      json_array_append_new(loo, json_pack("{s:s,s:i,s:f,s:o,s:f}", "set", sets[f].name,
                                           "n", sets[f].n, "detected", det, "rule", names,
                                           "valid_accepted", sel.main_rule.tpr));
    }
  }

  /* ---- the rule, chosen on every tuning set ---- */
  json_t *cfit = json_array(), *cands = json_array();
  if (select_rule(st, &id, sets, nsets, -1, o.rule_mask, o.tpr, o.nq, cfit, cands, 1, &sel)) {
    json_decref(cfit);
    json_decref(cands);
    goto oom;
  }
  const double cw = sel.weight;
  fprintf(stderr, "jem calibrate: energy_complexity weight %.3g nats per bit\n", cw);
  rule_choice main_rule = sel.main_rule, nograd_rule = sel.nograd_rule;
  *best = *st;
  best->has_nograd = 1;
  for (int k = 0; k < JEM_NUM_SCORES; k++) {
    best->side[k] = (main_rule.mask >> k & 1) ? sel.side[k] : 0;
    best->side_nograd[k] = (nograd_rule.mask >> k & 1) ? sel.side[k] : 0;
  }

  /* ---- rule text ---- */
  char tune_txt[256] = "";
  int has_mnist = 0;
  for (int t = 0; t < nsets; t++) {
    size_t l = strlen(tune_txt);
    snprintf(tune_txt + l, sizeof tune_txt - l, "%s%s", t ? "," : "", sets[t].name);
    has_mnist |= !strcmp(sets[t].name, "mnist");
  }
  if (has_mnist)
    fprintf(stderr, "jem calibrate: warning: the rule is tuned on the MNIST set; MNIST "
            "figures from jem eval will overstate it\n");
  describe_rule(best->rule, sizeof best->rule, "", best->side, o.rule_mask, tune_txt, has_mnist);
  describe_rule(best->rule_nograd, sizeof best->rule_nograd, "without the gradient score: ",
                best->side_nograd, o.rule_mask, tune_txt, has_mnist);
  fprintf(stderr, "jem calibrate: rule: %s\n  tuning sets flagged at tpr %.2f: mean %.2f%%, "
          "min %.2f%%; validation accepted %.2f%%\n", best->rule, (double)o.tpr,
          100 * main_rule.obj, 100 * main_rule.min, 100 * main_rule.tpr);
  fprintf(stderr, "jem calibrate: rule %s\n  tuning sets flagged: mean %.2f%%, min %.2f%%; "
          "validation accepted %.2f%%\n", best->rule_nograd, 100 * nograd_rule.obj,
          100 * nograd_rule.min, 100 * nograd_rule.tpr);

  /* ---- metadata ---- */
  {
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
    json_object_set_new(ood, "complexity_weight", json_real((float)cw));
    json_object_set_new(ood, "tpr", json_real(o.tpr));
    json_object_set_new(ood, "rule", json_string(best->rule));
    json_object_set_new(ood, "rule_nograd", json_string(best->rule_nograd));
    json_object_set_new(m->meta, "ood", ood);
    json_object_set_new(m->meta, "temperature", json_real((float)T));

    json_t *prov = json_object_get(m->meta, "provenance");
    if (!json_is_object(prov)) {
      prov = json_object();
      json_object_set_new(m->meta, "provenance", prov);
    }
    json_t *cal = json_object();
    char when[32];
    time_t now = time(NULL);
    struct tm tmv;
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tmv));
    json_object_set_new(cal, "date", json_string(when));
    json_object_set_new(cal, "n_valid", json_integer(nv));
    json_object_set_new(cal, "valid_split", json_string("fixed 5k split of the training set, seed 1234"));
    json_object_set_new(cal, "temperature", json_real(T));
    json_object_set_new(cal, "valid_nll", json_real(nll1));
    json_object_set_new(cal, "valid_nll_tempered", json_real(nllT));
    json_object_set_new(cal, "valid_ece", json_real(c1.ece));
    json_object_set_new(cal, "valid_ece_tempered", json_real(cT.ece));
    json_t *ts = json_array();
    for (int t = 0; t < nsets; t++) {
      json_t *e = json_object();
      json_object_set_new(e, "set", json_string(sets[t].name));
      json_object_set_new(e, "n", json_integer(sets[t].n));
      json_array_append_new(ts, e);
    }
    json_object_set_new(cal, "tuning_sets", ts);
    json_t *sa = json_object();
    for (int k = 0; k < JEM_NUM_SCORES; k++) {
      json_t *e = json_object();
      json_object_set_new(e, "high", json_real(sel.side_auc[k][0]));
      json_object_set_new(e, "low", json_real(sel.side_auc[k][1]));
      json_object_set_new(e, "two-sided", json_real(sel.side_auc[k][2]));
      json_object_set_new(sa, jem_score_names[k], e);
    }
    json_object_set_new(cal, "side_mean_auroc", sa);
    json_object_set_new(cal, "subsets", cands);
    json_object_set_new(cal, "complexity_weight_fit", cfit);
    cfit = NULL;
    cands = NULL;
    json_object_set_new(cal, "leave_one_out", loo);
    loo = NULL;
    json_object_set_new(cal, "chosen_mean_detected", json_real(main_rule.obj));
    json_object_set_new(cal, "chosen_min_detected", json_real(main_rule.min));
    json_object_set_new(cal, "chosen_valid_accepted", json_real(main_rule.tpr));
    json_object_set_new(cal, "nograd_mean_detected", json_real(nograd_rule.obj));
    json_object_set_new(cal, "nograd_valid_accepted", json_real(nograd_rule.tpr));
    json_object_set_new(prov, "calibration", cal);
  }
  json_decref(cands);
  json_decref(cfit);
  json_decref(loo);
  loo = NULL;
  if (jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: the new metadata does not apply: %s\n", err);
    goto done;
  }

sampler: /* ---- sampler settings, judged with the temperature just fitted ---- */
  if (cli_fit_sampler(m, ws, valid.x, nv, o.sampler_chains, o.sampler_steps, err, sizeof err) ||
      jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: sampler settings: %s\n", err);
    goto done;
  }
  if (jem_model_save(m, o.out, err, sizeof err)) {
    fprintf(stderr, "jem calibrate: %s\n", err);
    goto done;
  }
  fprintf(stderr, "jem calibrate: wrote %s\n", o.out);
  status = 0;
  goto done;
oom:
  fprintf(stderr, "jem calibrate: out of memory\n");
done:
  json_decref(loo);
  for (int t = 0; t < nsets; t++) rows_free(&sets[t]);
  rows_free(&id);
  free(st);
  free(best);
  jem_set_scores_free(&sv);
  jem_dataset_free(&valid);
  jem_ws_free(ws);
  jem_model_free(m);
  return status;
}
