/* eval_report.h - `jem eval`'s report.  cmd_eval.c runs the stages that fill an
 * eval_report (classification, OOD, samples, attacks); eval_json.c and
 * eval_md.c write it out as report.json and report.md; eval_draw.c draws
 * the PNGs.  The writers only read the report. */
#ifndef JEM_CLI_EVAL_REPORT_H
#define JEM_CLI_EVAL_REPORT_H

#include "jem.h"
#include "metrics.h"

#include <stddef.h>
#include <stdint.h>

#define EVAL_MAX_RADII 8
#define EVAL_ECE_BINS 20
#define EVAL_MAX_CLASSES 256 /* per-class agreement entries kept */

/* Where the sample chains start. */
enum { SAMPLE_NOISE = 0, SAMPLE_BUFFER, SAMPLE_GAUSSIAN };
extern const char *const eval_init_names[];
extern const char *const eval_init_descriptions[];

/* The ways an OOD score is read (see orient() in cmd_eval.c):
 * high raw values are OOD, low raw values are OOD, or two-sided. */
enum { V_HIGH = 0, V_LOW, V_TWO, NVAR };
extern const char *const eval_var_names[NVAR];

typedef struct eval_opts {
  const char *model;
  const char *data_dir;
  const char *ood_dir;
  const char *out_dir;
  int limit, ood_limit;
  uint64_t seed;
  int batch;
  float data_noise;
  int sample_steps;
  float sample_step_size, sample_noise;
  const char *fid_model; /* reference network for Frechet distances, or NULL */
  int samples_per_class;
  int fid_samples;
  int sample_init; /* -1 auto, then SAMPLE_NOISE/_BUFFER/_GAUSSIAN */
  int attack;
  int attack_limit;
  int attack_steps;
  int n_linf, n_l2;
  float linf[EVAL_MAX_RADII], l2[EVAL_MAX_RADII];
  int no_grad;
  int threads;
} eval_opts;

/* One OOD set against the test set. */
typedef struct eval_ood_set {
  const char *name;
  int n;
  jem_ood_metrics mt[JEM_NUM_SCORES][NVAR];
  double mean[JEM_NUM_SCORES];
  double rule_detect;    /* fraction flagged at tpr .95 by the model's rule */
  jem_ood_metrics rule;  /* metrics of jem_ood_rule_stat */
} eval_ood_set;

/* What one network that judges the samples found (judge 0: the evaluated
 * model; judge 1: --fid-model): class agreement of the conditional starts
 * and samples, and Frechet distances to the test set of the unconditional
 * starts and samples, the validation images (the real-vs-real floor) and
 * the replay buffer. */
typedef struct eval_judged {
  int present;
  int F; /* feature dimension */
  double agree_start, agree_samp;
  double fd_start, fd_samp, fd_valid, fd_replay;
} eval_judged;

typedef struct eval_report {
  const eval_opts *o;
  const jem_model *m;
  int nt, nv;                 /* test and validation images */
  double t_start;             /* eval_now_s() at the start */
  /* classification and calibration */
  double acc, acc_valid, nll, tfit, nll_t;
  jem_calib cb, ca, cm;       /* T = 1, fitted T, the model's stored T */
  double t_clf;
  /* OOD */
  int conventional[JEM_NUM_SCORES]; /* V_HIGH or V_LOW */
  double test_mean[JEM_NUM_SCORES], test_std[JEM_NUM_SCORES];
  const char *rule_txt;       /* the verdict rule this run applies */
  double rule_tpr;            /* share of the test set it accepts */
  eval_ood_set oods[JEM_OOD_NSETS];
  int n_ood;
  char missing[256];          /* sets not found, comma-separated */
  double t_ood;
  /* samples */
  int init;                   /* SAMPLE_* */
  jem_sgld_params sp;
  int n_cond, n_unc;
  double per_class_agree[EVAL_MAX_CLASSES];
  eval_judged judged[2];
  double t_samp;
  /* PGD */
  int na;                     /* images attacked */
  double clean_sub;           /* clean accuracy on them */
  double rob_linf[EVAL_MAX_RADII], rob_l2[EVAL_MAX_RADII];
  double t_att;
} eval_report;

double eval_now_s(void);

/* report.json and report.md under r->o->out_dir.  0, or -1 (reported). */
int eval_write_json(const eval_report *r);
int eval_write_md(const eval_report *r);

/* eval_draw.c: reliability.png (T = 1 and fitted T side by side), and a
 * PNG grid of images x [n, chw] in [-1,1] as out_dir/name.  0 or -1
 * (reported). */
int eval_draw_reliability(const char *out_dir, const jem_calib *cb, const jem_calib *ca,
                          double tfit);
int eval_draw_grid(const char *out_dir, const char *name, const jem_model *m, const float *x,
                   int n, int per_row);

#endif
