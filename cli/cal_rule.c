/* cal_rule.c - `jem calibrate`'s choice of the OOD verdict rule: the weight
 * of energy_complexity, each score's side and the subset of scores, all by
 * their AUROC or detection on the tuning sets against the validation split
 * (cal_rule.h). */
#include "cal_rule.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cal_rows_from(const jem_model *m, const float *x, const jem_set_scores *s,
                  const char *name, cal_rows *out) {
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

void cal_rows_free(cal_rows *r) {
  free(r->v);
  free(r->bits);
  r->v = NULL;
  r->bits = NULL;
}

/* Sets energy_complexity = energy - w * bits in every row. */
static void rows_set_complexity(cal_rows *r, double w) {
  for (int i = 0; i < r->n; i++)
    r->v[i][JEM_SCORE_ENERGY_COMPLEXITY] =
        (float)((double)r->v[i][JEM_SCORE_ENERGY] - w * (double)r->bits[i]);
}

/* A per-row statistic, higher = more in-distribution. */
typedef double (*row_stat)(const void *ctx, const float row[JEM_NUM_SCORES]);

/* Mean AUROC of stat (validation positive) over the sets; per_set, if not
 * NULL, gets each set's AUROC. */
static double mean_auroc(row_stat stat, const void *ctx, const cal_rows *id,
                         const cal_rows *sets, int nsets, double *per_set) {
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
static double fit_complexity_weight(cal_rows *id, cal_rows *sets, int nsets, json_t *fit) {
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

double cal_flagged(const jem_ood_stats *st, const cal_rows *r, float tpr) {
  int f = 0;
  for (int i = 0; i < r->n; i++) {
    jem_ood_result res;
    jem_ood_eval(st, r->v[i], tpr, &res);
    f += res.is_ood == 1;
  }
  return r->n ? (double)f / r->n : NAN;
}

/* Among the non-empty subsets of `allowed` scores (each on its side[]), the
 * one whose verdict flags the largest share of the worst-caught tuning set
 * at tpr (the promise is about every family, not the average); within 0.1
 * point the larger mean wins, then the rule with fewer scores.  Appends
 * every candidate to cands when it is not NULL.  Uses st as scratch. */
static void choose_subset(jem_ood_stats *st, const int side[JEM_NUM_SCORES], int allowed,
                          int exact, const cal_rows *id, const cal_rows *sets, int nsets,
                          float tpr, json_t *cands, cal_rule_choice *best) {
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
      double f = cal_flagged(st, &sets[t], tpr);
      tot += f;
      if (f < mn) mn = f;
    }
    double obj = tot / nsets, acc_id = 1.0 - cal_flagged(st, id, tpr);
    const int tie_min = fabs(mn - best->min) <= 1e-3, tie_obj = fabs(obj - best->obj) <= 1e-3;
    if (best->mask == 0 || (!tie_min && mn > best->min) ||
        (tie_min && !tie_obj && obj > best->obj) || (tie_min && tie_obj && used < best_used))
      *best = (cal_rule_choice){mask, obj, mn, acc_id};
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

int cal_select_rule(jem_ood_stats *st, cal_rows *id, cal_rows *all, int nall, int skip,
                    int fixed, float tpr, int nq, json_t *cfit, json_t *cands, int verbose,
                    cal_selection *sel) {
  cal_rows sets[CAL_MAX_TUNE];
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

void cal_describe_rule(char *buf, size_t size, const char *prefix,
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
