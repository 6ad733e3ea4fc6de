/* cal_rule.h - how `jem calibrate` chooses its OOD verdict rule on the
 * validation split against the tuning sets (cli/cal_rule.c): the weight of
 * energy_complexity, each score's side, the subset of scores, and the
 * rule's description.  cmd_calibrate.c scores the sets and stores the
 * result. */
#ifndef JEM_CLI_CAL_RULE_H
#define JEM_CLI_CAL_RULE_H

#include "jem.h"
#include "metrics.h"

#include <jansson.h>
#include <stddef.h>

#define CAL_MAX_TUNE JEM_OOD_NSETS

/* Scores of one set, as [n][JEM_NUM_SCORES] rows for jem_ood_eval. */
typedef struct cal_rows {
  const char *name;
  int n;
  float (*v)[JEM_NUM_SCORES];
  float *bits;       /* [n] compressed lengths, for energy_complexity */
} cal_rows;

/* The rows of set x (scored into s), and each image's compressed length:
 * calibrate is the one consumer of the lengths themselves.  -1 when out of
 * memory (free with cal_rows_free either way). */
int cal_rows_from(const jem_model *m, const float *x, const jem_set_scores *s,
                  const char *name, cal_rows *out);
void cal_rows_free(cal_rows *r);

/* Fraction of rows flagged OOD by the rule at tpr. */
double cal_flagged(const jem_ood_stats *st, const cal_rows *r, float tpr);

/* The verdict rule chosen among subsets of scores. */
typedef struct cal_rule_choice {
  int mask;          /* bit k: score k is used */
  double obj;        /* mean fraction of tuning images flagged */
  double min;        /* the smallest such fraction over the sets */
  double tpr;        /* fraction of validation images accepted */
} cal_rule_choice;

/* What cal_select_rule chose. */
typedef struct cal_selection {
  double weight;                       /* energy_complexity's */
  int side[JEM_NUM_SCORES];            /* each score's best side */
  double side_auc[JEM_NUM_SCORES][3];  /* mean AUROC high, low, two-sided */
  cal_rule_choice main_rule, nograd_rule;
} cal_selection;

/* Steps 0 to 2 on the tuning sets other than all[skip] (skip -1: all of
 * them): the complexity weight, with the quantiles of energy_complexity at
 * it; the side of each score; the subset of scores (fixed: exactly these,
 * 0: chosen), and the one without the gradient.  Leaves st with every
 * score's quantiles and the chosen weight, and every row's
 * energy_complexity at it.  cfit and cands (may be NULL) get the
 * candidates; verbose prints each score's sides.  -1 when out of memory or
 * no quantiles. */
int cal_select_rule(jem_ood_stats *st, cal_rows *id, cal_rows *all, int nall, int skip,
                    int fixed, float tpr, int nq, json_t *cfit, json_t *cands, int verbose,
                    cal_selection *sel);

/* The rule's description, stored in the metadata and served with verdicts;
 * a long list of tuning sets may be cut short. */
void cal_describe_rule(char *buf, size_t size, const char *prefix,
                       const int side[JEM_NUM_SCORES], int fixed, const char *tune_txt,
                       int has_mnist);

#endif
