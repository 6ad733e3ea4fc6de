/* cmd_eval.c - `jem eval`: accuracy, calibration, OOD detection, samples,
 * Frechet distance and PGD robustness of a model.  Options, then one stage
 * per section of the report, each filling its part of an eval_report;
 * eval_json.c and eval_md.c write report.json/.md from it, eval_draw.c the
 * PNGs. */
#include "args.h"
#include "cli.h"
#include "eval_report.h"
#include "jem.h"
#include "metrics.h"
#include "train.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

const char *const eval_init_names[] = {"noise", "buffer", "gaussian"};
const char *const eval_init_descriptions[] = {
    "U(-1,1) noise", "replay buffer",
    "a draw of the chain's class Gaussian fitted to the training split (JEM++'s informative "
    "initialisation; `samples_*_init.png` show the starts)"};
const char *const eval_var_names[NVAR] = {"ood_high", "ood_low", "two_sided"};

static void usage(FILE *f) {
  fprintf(f,
    "usage: jem eval MODEL [options]\n"
    "\n"
    "Evaluates MODEL on Fashion-MNIST: test accuracy and NLL (and validation\n"
    "accuracy, for choosing among checkpoints), ECE (20 bins) before and after\n"
    "temperature scaling (T fitted on the 5k validation split), a\n"
    "reliability diagram, OOD AUROC/AUPR/FPR95 for each score (energy, grad_norm,\n"
    "max_softmax, energy_complexity when the model has its weight, mahalanobis\n"
    "when it has its feature Gaussian) on each OOD set one- and two-sided, and\n"
    "the share of each set the model's verdict flags, class-conditional and\n"
    "unconditional SGLD sample grids, the Frechet distance between test and sample\n"
    "features, and accuracy under PGD L-inf/L2 attacks.  Writes report.md,\n"
    "report.json and PNGs into --out-dir.\n"
    "\n"
    "options:\n"
    "  --data-dir DIR        Fashion-MNIST IDX files, or CIFAR-10 binary files\n"
    "                        (data_batch_N.bin, test_batch.bin) (default $JEM_FMNIST_DIR or\n"
    "                        " JEM_FMNIST_DIR_DEFAULT ")\n"
    "  --ood-dir DIR         OOD sets from scripts/make_ood_sets.py (default data/ood);\n"
    "                        missing sets are skipped and listed in the report\n"
    "  --out-dir DIR         output directory (default eval-out)\n"
    "  --limit N             only the first N test, validation and OOD images\n"
    "  --ood-limit N         only the first N images of each OOD set (default: all,\n"
    "                        or --limit)\n"
    "  --seed S              seed for noise, SGLD chains and PGD starts (default 0)\n"
    "  --batch B             batch size (default 100)\n"
    "  --data-noise SIGMA    add N(0,SIGMA^2) to every input as JEM's eval code\n"
    "                        does with 0.03 (default 0: deterministic, as served)\n"
    "  --no-grad             skip the gradient-norm score\n"
    "  --sample-steps K      SGLD steps for samples (default 100; 0 = no samples)\n"
    "  --sample-step-size A  SGLD step size for samples (default 1, as jemd's jobs)\n"
    "  --sample-noise S      SGLD noise for samples (default 0.01, as jemd's jobs)\n"
    "  --samples-per-class N class-conditional chains per class (default 10)\n"
    "  --fid-samples N       unconditional samples for the Frechet distance\n"
    "                        (default 1000)\n"
    "  --fid-model MODEL     also measure Frechet distances in this network's features\n"
    "                        and classify the class-conditional samples with it, so\n"
    "                        that different models' samples meet one fixed judge\n"
    "  --sample-init MODE    buffer | noise | gaussian (default: buffer if the model has\n"
    "                        one); buffer starts chain i (class i mod K for unconditional\n"
    "                        chains) from a buffer image the model classifies as its\n"
    "                        class; gaussian from a draw of its class's Gaussian fitted\n"
    "                        to the training split (JEM++'s informative init), and also\n"
    "                        writes the starts, samples_*_init.png\n"
    "  --no-attack           skip the PGD attacks\n"
    "  --attack-limit N      test images attacked (default 1000)\n"
    "  --attack-steps K      PGD steps (default 10; step = 2.5 eps / K)\n"
    "  --linf R,R,...        L-inf radii in [0,1] pixel units (default 0.01,0.03,0.1)\n"
    "  --l2 R,R,...          L2 radii in [0,1] pixel units (default 0.5,1,2)\n"
    "  --threads N           OpenBLAS threads (default: OpenBLAS's choice)\n"
    "  -h, --help            this text\n");
}

/* ------------------------------------------------------------------------ */
/* Option parsing                                                           */

static int parse_list(const char *opt, const char *v, float *out, int *n) {
  *n = 0;
  const char *p = v;
  while (*p) {
    if (*n >= EVAL_MAX_RADII) {
      return args_usage("eval", "%s takes at most %d radii", opt, EVAL_MAX_RADII);
    }
    char *end;
    errno = 0;
    double x = strtod(p, &end);
    if (errno || end == p || !(x > 0.0 && x <= 100.0) || (*end && *end != ',')) {
      return args_usage("eval", "%s expects positive numbers separated by commas, not '%s'",
              opt, v);
    }
    out[(*n)++] = (float)x;
    p = *end ? end + 1 : end;
  }
  return 0;
}

static int parse_opts(int argc, char **argv, eval_opts *o) {
  memset(o, 0, sizeof *o);
  o->data_dir = NULL;
  o->ood_dir = "data/ood";
  o->out_dir = "eval-out";
  o->batch = 100;
  o->sample_steps = 100;
  o->sample_step_size = 1.0f;
  o->sample_noise = 0.01f;
  o->samples_per_class = 10;
  o->fid_samples = 1000;
  o->sample_init = -1;
  o->attack = 1;
  o->attack_limit = 1000;
  o->attack_steps = 10;
  o->n_linf = 3;
  o->linf[0] = 0.01f; o->linf[1] = 0.03f; o->linf[2] = 0.1f;
  o->n_l2 = 3;
  o->l2[0] = 0.5f; o->l2[1] = 1.0f; o->l2[2] = 2.0f;
  int rc = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return -1;
    }
    if (a[0] != '-' || !a[1]) {
      if (o->model) {
        return args_usage("eval", "one MODEL only ('%s' and '%s')", o->model, a);
      }
      o->model = a;
      continue;
    }
    /* flags without a value */
    if (!strcmp(a, "--no-attack")) { o->attack = 0; continue; }
    if (!strcmp(a, "--no-grad")) { o->no_grad = 1; continue; }
    if (i + 1 >= argc) {
      return args_usage("eval", "unknown option, or option without its value: '%s'", a);
    }
    const char *v = argv[++i];
    if (!strcmp(a, "--data-dir")) o->data_dir = v;
    else if (!strcmp(a, "--ood-dir")) o->ood_dir = v;
    else if (!strcmp(a, "--out-dir")) o->out_dir = v;
    else if (!strcmp(a, "--limit")) rc = args_int("eval", a, v, 2, 1 << 30, &o->limit);
    else if (!strcmp(a, "--ood-limit")) rc = args_int("eval", a, v, 2, 1 << 30, &o->ood_limit);
    else if (!strcmp(a, "--seed")) rc = args_u64("eval", a, v, &o->seed);
    else if (!strcmp(a, "--batch")) rc = args_int("eval", a, v, 1, 4096, &o->batch);
    else if (!strcmp(a, "--data-noise")) rc = args_float("eval", a, v, 0.0f, 10.0f, &o->data_noise);
    else if (!strcmp(a, "--sample-steps")) rc = args_int("eval", a, v, 0, 100000, &o->sample_steps);
    else if (!strcmp(a, "--sample-step-size"))
      rc = args_float("eval", a, v, 1e-6f, 100.0f, &o->sample_step_size);
    else if (!strcmp(a, "--sample-noise")) rc = args_float("eval", a, v, 0.0f, 10.0f, &o->sample_noise);
    else if (!strcmp(a, "--fid-model")) o->fid_model = v;
    else if (!strcmp(a, "--samples-per-class")) rc = args_int("eval", a, v, 1, 100, &o->samples_per_class);
    else if (!strcmp(a, "--fid-samples")) rc = args_int("eval", a, v, 0, 100000, &o->fid_samples);
    else if (!strcmp(a, "--sample-init")) {
      if (!strcmp(v, "buffer")) o->sample_init = SAMPLE_BUFFER;
      else if (!strcmp(v, "noise")) o->sample_init = SAMPLE_NOISE;
      else if (!strcmp(v, "gaussian")) o->sample_init = SAMPLE_GAUSSIAN;
      else {
        rc = args_usage("eval", "--sample-init expects buffer, noise or gaussian, not '%s'", v);
      }
    }
    else if (!strcmp(a, "--attack-limit")) rc = args_int("eval", a, v, 1, 1 << 30, &o->attack_limit);
    else if (!strcmp(a, "--attack-steps")) rc = args_int("eval", a, v, 1, 10000, &o->attack_steps);
    else if (!strcmp(a, "--linf")) rc = parse_list(a, v, o->linf, &o->n_linf);
    else if (!strcmp(a, "--l2")) rc = parse_list(a, v, o->l2, &o->n_l2);
    else if (!strcmp(a, "--threads")) rc = args_int("eval", a, v, 1, 256, &o->threads);
    else {
      return args_usage("eval", "unknown option, or option without its value: '%s'", a);
    }
    if (rc) return rc;
  }
  if (!o->model) {
    fprintf(stderr, "jem eval: missing MODEL\n");
    usage(stderr);
    return 2;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

double eval_now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int mkdir_p(const char *path) {
  char buf[4096];
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof buf) return -1;
  memcpy(buf, path, n + 1);
  for (size_t i = 1; i <= n; i++) {
    if (buf[i] == '/' || buf[i] == 0) {
      char c = buf[i];
      buf[i] = 0;
      if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
      buf[i] = c;
    }
  }
  return 0;
}

static double mean_f(const float *v, int n) {
  double s = 0;
  int c = 0;
  for (int i = 0; i < n; i++)
    if (!isnan(v[i])) { s += v[i]; c++; }
  return c ? s / c : NAN;
}

static double std_f(const float *v, int n) {
  double mu = mean_f(v, n), s = 0;
  int c = 0;
  for (int i = 0; i < n; i++)
    if (!isnan(v[i])) { s += (v[i] - mu) * (v[i] - mu); c++; }
  return c > 1 ? sqrt(s / (c - 1)) : NAN;
}

/* Transforms raw values into in-distribution-ness (higher = more ID):
 * V_HIGH: high values are OOD (s = -v); V_LOW: low values are OOD (s = v);
 * V_TWO: two-sided, s = -|percentile(v) - 0.5| against the validation
 * quantiles q. */
static void orient(const float *v, int n, int variant, const float *q, int nq, double *out) {
  for (int i = 0; i < n; i++) {
    if (variant == V_HIGH) out[i] = -(double)v[i];
    else if (variant == V_LOW) out[i] = v[i];
    else out[i] = -fabs((double)jem_ood_percentile(q, nq, v[i]) - 0.5);
  }
}

/* Fills x [n, chw] with the chains' starting images (rngs already seeded);
 * chain i starts from class ys[i]'s Gaussian, or from a buffer image the
 * model classifies as ys[i] (labelled buffer; any image if none is). */
static void chain_starts(int init, const jem_class_gauss *g, const jem_model *m, float *x,
                         int n, const int *ys, jem_rng *rngs) {
  const size_t chw =
      (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  if (init == SAMPLE_BUFFER)
    jem_sgld_init_buffer(m, x, n, 0.0f, ys, rngs);
  else if (init == SAMPLE_NOISE)
    jem_sgld_init_noise(x, n, chw, rngs);
  else
    for (int i = 0; i < n; i++)
      jem_class_gauss_sample(g, ys[i] % g->classes, x + (size_t)i * chw, &rngs[i]);
}

/* A network that judges samples: Frechet distances to the test set in its
 * penultimate features, and the share of class-conditional chains it assigns to
 * their class.  The evaluated model judges its own samples; --fid-model adds a
 * fixed judge, so that two models' samples are measured with one ruler. */
typedef struct sample_judge {
  jem_model *m;
  jem_ws *ws;
  const float *test_feat; /* [nt, F] */
  int nt, F;
} sample_judge;

/* Frechet distance between the test set and the n images x; NaN (reported) on failure. */
static double judge_frechet(const sample_judge *j, const float *x, int n, float noise,
                            uint64_t seed, const char *what) {
  if (!j->m || n < 2) return NAN;
  char err[512];
  double d = NAN;
  jem_set_scores s = {0};
  if (jem_eval_score_set(j->ws, j->m, x, n, 0, 1, noise, seed, &s, err, sizeof err) ||
      jem_frechet_features(j->test_feat, j->nt, s.feat, n, j->F, &d, err, sizeof err)) {
    fprintf(stderr, "  Frechet distance (%s): %s\n", what, err);
    d = NAN;
  }
  jem_set_scores_free(&s);
  return d;
}

/* Share of the n = classes * per_class chains (rows = classes) that the judge
 * classifies as their class; per_class_out[c] (may be NULL; out_cap entries)
 * gets each row's. */
static double judge_agreement(const sample_judge *j, const float *x, int classes,
                              int per_class, double *per_class_out, int out_cap) {
  if (!j->m) return NAN;
  char err[512];
  jem_set_scores s = {0};
  if (jem_eval_score_set(j->ws, j->m, x, classes * per_class, 0, 0, 0.0f, 0, &s, err,
                         sizeof err)) {
    fprintf(stderr, "  class agreement: %s\n", err);
    return NAN;
  }
  const int K = s.k;
  int agree = 0;
  for (int c = 0; c < classes; c++) {
    int a = 0;
    for (int i = 0; i < per_class; i++) {
      const float *z = s.logits + (size_t)(c * per_class + i) * K;
      int best = 0;
      for (int q = 1; q < K; q++)
        if (z[q] > z[best]) best = q;
      a += best == c;
    }
    if (per_class_out && c < out_cap) per_class_out[c] = (double)a / per_class;
    agree += a;
  }
  jem_set_scores_free(&s);
  return (double)agree / (classes * per_class);
}

/* ------------------------------------------------------------------------ */
/* Stages                                                                   */

/* One run: what the stages share, and the report they fill.  Each stage
 * returns 0, or -1 after printing why. */
typedef struct eval_run {
  eval_opts o;
  eval_report r;
  jem_model *m;
  jem_ws *ws;
  int K, C, S;
  size_t chw;
  int want_grad;
  jem_dataset test, valid;
  jem_set_scores st, sv;          /* test and validation scores */
  float *vq[JEM_NUM_SCORES];      /* validation quantiles (1001) of each score scored */
  jem_class_gauss gauss;          /* --sample-init gaussian */
  jem_model *ref_model;           /* --fid-model */
  jem_ws *ref_ws;
  jem_set_scores ref_test;
  sample_judge judges[2];         /* the model, and --fid-model (m NULL without) */
  float *xs;                      /* sample chains */
  jem_rng *rngs;
  int *ys;
} eval_run;

#define EVAL_QUANTILES 1001

/* The model, its workspace, the output directory, the data, and the
 * reference judge (loaded before the long work). */
static int stage_load(eval_run *E) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  char err[512];
  if (jem_model_load(&E->m, o->model, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    return -1;
  }
  const jem_model *m = r->m = E->m;
  const int K = E->K = m->arch.num_classes, C = E->C = m->arch.in_channels,
            S = E->S = m->arch.image_size;
  E->chw = (size_t)C * S * S;
  if (!(E->ws = jem_ws_create(E->m, o->batch, JEM_WS_FIXED_WEIGHTS))) {
    fprintf(stderr, "jem eval: cannot allocate a workspace for batch %d\n", o->batch);
    return -1;
  }
  if (mkdir_p(o->out_dir)) {
    fprintf(stderr, "jem eval: cannot create %s: %s\n", o->out_dir, strerror(errno));
    return -1;
  }
  if (jem_fmnist_load(o->data_dir, JEM_SPLIT_TEST, &E->test, err, sizeof err) ||
      jem_fmnist_load(o->data_dir, JEM_SPLIT_VALID, &E->valid, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    return -1;
  }
  const jem_dataset *test = &E->test, *valid = &E->valid;
  if (test->c != C || test->s != S || test->num_classes > K) {
    fprintf(stderr, "jem eval: the data (%d channels, %dx%d, %d classes) does not fit the "
            "model (%d channels, %dx%d, %d classes)\n", test->c, test->s, test->s,
            test->num_classes, C, S, S, K);
    return -1;
  }
  r->nt = o->limit && o->limit < test->n ? o->limit : test->n;
  r->nv = o->limit && o->limit < valid->n ? o->limit : valid->n;
  E->want_grad = !o->no_grad;
  /* the rule this run applies: without the gradient, the model's no-gradient rule */
  r->rule_txt = m->ood.rule;
  if (m->ood.present) {
    float probe[JEM_NUM_SCORES] = {0};
    probe[JEM_SCORE_GRAD_NORM] = E->want_grad ? 0.0f : NAN;
    jem_ood_rule_for(&m->ood, probe, &r->rule_txt);
  }
  fprintf(stderr, "jem eval: %s, %d test and %d validation images\n", o->model, r->nt, r->nv);
  if (!o->fid_model) return 0;
  if (jem_model_load(&E->ref_model, o->fid_model, err, sizeof err)) {
    fprintf(stderr, "jem eval: --fid-model: %s\n", err);
    return -1;
  }
  const jem_arch *ra = &E->ref_model->arch;
  if (ra->in_channels != C || ra->image_size != S || ra->num_classes != K) {
    fprintf(stderr, "jem eval: --fid-model %s takes %d channels, %dx%d, %d classes; the "
            "model %d, %dx%d, %d\n", o->fid_model, ra->in_channels, ra->image_size,
            ra->image_size, ra->num_classes, C, S, S, K);
    return -1;
  }
  if (!(E->ref_ws = jem_ws_create(E->ref_model, o->batch, JEM_WS_FIXED_WEIGHTS)) ||
      jem_eval_score_set(E->ref_ws, E->ref_model, test->x, r->nt, 0, 1, o->data_noise,
                         o->seed * 16 + 1, &E->ref_test, err, sizeof err)) {
    fprintf(stderr, "jem eval: --fid-model: %s\n", E->ref_ws ? err : "out of memory");
    return -1;
  }
  E->judges[1] = (sample_judge){E->ref_model, E->ref_ws, E->ref_test.feat, r->nt,
                                E->ref_test.nfeat};
  return 0;
}

/* Scores of the test and validation images; accuracy, NLL, temperature,
 * ECE, and the reliability diagram. */
static int stage_classify(eval_run *E) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  const int K = E->K, nt = r->nt, nv = r->nv;
  char err[512];
  const double t0 = eval_now_s();
  if (jem_eval_score_set(E->ws, E->m, E->test.x, nt, E->want_grad, 1, o->data_noise,
                         o->seed * 16 + 1, &E->st, err, sizeof err) ||
      jem_eval_score_set(E->ws, E->m, E->valid.x, nv, E->want_grad, 0, o->data_noise,
                         o->seed * 16 + 2, &E->sv, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    return -1;
  }
  const float *lt = E->st.logits, *lv = E->sv.logits;
  const int *yt = E->test.y, *yv = E->valid.y;
  r->acc = jem_accuracy(lt, yt, nt, K);
  /* for choosing among checkpoints without looking at the test set */
  r->acc_valid = jem_accuracy(lv, yv, nv, K);
  r->nll = jem_nll(lt, yt, nt, K, 1.0);
  r->tfit = jem_fit_temperature(lv, yv, nv, K);
  r->nll_t = jem_nll(lt, yt, nt, K, r->tfit);
  if (jem_ece(lt, yt, nt, K, 1.0, EVAL_ECE_BINS, &r->cb, err, sizeof err) ||
      jem_ece(lt, yt, nt, K, r->tfit, EVAL_ECE_BINS, &r->ca, err, sizeof err) ||
      jem_ece(lt, yt, nt, K, E->m->temperature, EVAL_ECE_BINS, &r->cm, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    return -1;
  }
  r->t_clf = eval_now_s() - t0;
  fprintf(stderr, "  accuracy %.2f%% (validation %.2f%%)  NLL %.4f  ECE %.2f%% -> %.2f%% at "
          "T=%.3f (%.1f s)\n", 100 * r->acc, 100 * r->acc_valid, r->nll, 100 * r->cb.ece,
          100 * r->ca.ece, r->tfit, r->t_clf);
  return eval_draw_reliability(o->out_dir, &r->cb, &r->ca, r->tfit);
}

/* OOD set k (loaded if present) against the test set: each score's metrics
 * in each reading, and the verdict rule's.  pos and rule_pos [nt] are
 * scratch and the test set's rule statistics.  1 when the set is missing. */
static int ood_set(eval_run *E, int k, double *pos, const double *rule_pos) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  const jem_model *m = E->m;
  const int nt = r->nt;
  char err[512];
  jem_dataset od = {0};
  int olim = o->ood_limit ? o->ood_limit : o->limit;
  if (o->ood_limit && o->limit && o->limit < olim) olim = o->limit;
  int lrc = jem_ood_set_load(o->ood_dir, jem_ood_set_names[k], m, olim, &od, err, sizeof err);
  if (lrc == JEM_EIO && strstr(err, "missing")) {
    fprintf(stderr, "  skipping OOD set %s: %s\n", jem_ood_set_names[k], err);
    size_t l = strlen(r->missing);
    snprintf(r->missing + l, sizeof r->missing - l, "%s%s", l ? ", " : "",
             jem_ood_set_names[k]);
    return 1;
  }
  if (lrc || od.c != E->C) {
    fprintf(stderr, "jem eval: OOD set %s: %s\n", jem_ood_set_names[k],
            lrc ? err : "channel count differs from the model's");
    jem_dataset_free(&od);
    return -1;
  }
  jem_set_scores so = {0};
  double *neg = NULL;
  if (jem_eval_score_set(E->ws, E->m, od.x, od.n, E->want_grad, 0, o->data_noise,
                         o->seed * 16 + 3 + (uint64_t)k, &so, err, sizeof err) ||
      !(neg = malloc(sizeof(double) * (size_t)od.n))) {
    fprintf(stderr, "jem eval: %s\n", neg ? err : "out of memory");
    jem_set_scores_free(&so);
    jem_dataset_free(&od);
    return -1;
  }
  eval_ood_set *R = &r->oods[r->n_ood++];
  R->name = jem_ood_set_names[k];
  R->n = od.n;
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    R->mean[s] = mean_f(so.score[s], od.n);
    for (int vv = 0; vv < NVAR; vv++) {
      R->mt[s][vv] = (jem_ood_metrics){NAN, NAN, NAN, NAN};
      if (!E->vq[s]) continue;
      orient(E->st.score[s], nt, vv, E->vq[s], EVAL_QUANTILES, pos);
      orient(so.score[s], od.n, vv, E->vq[s], EVAL_QUANTILES, neg);
      jem_ood_metrics_compute(pos, nt, neg, od.n, &R->mt[s][vv], err, sizeof err);
    }
  }
  R->rule_detect = NAN;
  R->rule = (jem_ood_metrics){NAN, NAN, NAN, NAN};
  if (m->ood.present) {
    int det = 0;
    for (int i = 0; i < od.n; i++) {
      float v[JEM_NUM_SCORES];
      for (int s = 0; s < JEM_NUM_SCORES; s++) v[s] = so.score[s][i];
      jem_ood_result res;
      jem_ood_eval(&m->ood, v, 0.95f, &res);
      det += res.is_ood == 1;
      neg[i] = jem_ood_rule_stat(&m->ood, v);
    }
    R->rule_detect = (double)det / od.n;
    jem_ood_metrics_compute(rule_pos, nt, neg, od.n, &R->rule, err, sizeof err);
  }
  free(neg);
  jem_set_scores_free(&so);
  jem_dataset_free(&od);
  fprintf(stderr, "  OOD %-17s AUROC", R->name);
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    fprintf(stderr, " %s %.3f", jem_score_names[s], R->mt[s][r->conventional[s]].auroc);
  fprintf(stderr, " (conventional one-sided); verdict %.2f%%\n", 100 * R->rule_detect);
  return 0;
}

/* Validation quantiles of each score this run has, the test set's score
 * statistics and verdicts, then each OOD set. */
static int stage_ood(eval_run *E) {
  eval_report *r = &E->r;
  const jem_model *m = E->m;
  const int nt = r->nt;
  char err[512];
  const double t0 = eval_now_s();
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    r->conventional[s] = jem_score_conventional_side[s] > 0 ? V_HIGH : V_LOW;
    r->test_mean[s] = mean_f(E->st.score[s], nt);
    r->test_std[s] = std_f(E->st.score[s], nt);
    if (s == JEM_SCORE_GRAD_NORM && !E->want_grad) continue;
    if (s == JEM_SCORE_ENERGY_COMPLEXITY && isnan(m->ood.complexity_weight)) continue;
    if (s == JEM_SCORE_MAHALANOBIS && !m->feat_mean) continue;
    if (!(E->vq[s] = malloc(sizeof(float) * EVAL_QUANTILES)) ||
        jem_quantiles(E->sv.score[s], r->nv, EVAL_QUANTILES, E->vq[s], err, sizeof err)) {
      fprintf(stderr, "jem eval: validation quantiles of %s: %s\n", jem_score_names[s],
              E->vq[s] ? err : "out of memory");
      return -1;
    }
  }
  double *pos = malloc(sizeof(double) * (size_t)nt);
  double *rule_pos = malloc(sizeof(double) * (size_t)nt);
  if (!pos || !rule_pos) {
    free(pos);
    free(rule_pos);
    fprintf(stderr, "jem eval: out of memory\n");
    return -1;
  }
  r->rule_tpr = NAN;
  if (m->ood.present) {
    int acc_n = 0;
    for (int i = 0; i < nt; i++) {
      float v[JEM_NUM_SCORES];
      for (int s = 0; s < JEM_NUM_SCORES; s++) v[s] = E->st.score[s][i];
      jem_ood_result res;
      jem_ood_eval(&m->ood, v, 0.95f, &res);
      acc_n += res.is_ood == 0;
      rule_pos[i] = jem_ood_rule_stat(&m->ood, v);
    }
    r->rule_tpr = (double)acc_n / nt;
  }
  int rc = 0;
  for (int k = 0; k < JEM_OOD_NSETS && rc >= 0; k++) rc = ood_set(E, k, pos, rule_pos);
  free(pos);
  free(rule_pos);
  r->t_ood = eval_now_s() - t0;
  return rc < 0 ? -1 : 0;
}

/* Class-conditional chains (SGLD on f(x)[y], rows = classes) and
 * unconditional ones (SGLD on logsumexp f(x)), their grids, and what each
 * judge makes of them. */
static int run_chains(eval_run *E) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  const jem_model *m = E->m;
  const int K = E->K, spc = o->samples_per_class;
  eval_judged *g = r->judged;
  r->n_cond = K * spc;
  r->n_unc = o->fid_samples;
  if (o->limit && r->n_unc > o->limit) r->n_unc = o->limit;
  const int n_cond = r->n_cond, n_unc = r->n_unc;
  int nmax = n_cond > n_unc ? n_cond : n_unc;
  E->xs = malloc(sizeof(float) * (size_t)nmax * E->chw);
  E->rngs = malloc(sizeof(jem_rng) * (size_t)nmax);
  E->ys = malloc(sizeof(int) * (size_t)nmax);
  if (!E->xs || !E->rngs || !E->ys) {
    fprintf(stderr, "jem eval: out of memory for %d chains\n", nmax);
    return -1;
  }
  float *xs = E->xs;
  for (int i = 0; i < n_cond; i++) {
    jem_rng_seed(&E->rngs[i], o->seed, (uint64_t)i);
    E->ys[i] = i / spc;
  }
  chain_starts(r->init, &E->gauss, m, xs, n_cond, E->ys, E->rngs);
  if (r->init == SAMPLE_GAUSSIAN &&
      eval_draw_grid(o->out_dir, "samples_conditional_init.png", m, xs, n_cond, spc))
    return -1;
  for (int j = 0; j < 2; j++)
    g[j].agree_start = judge_agreement(&E->judges[j], xs, K, spc, NULL, 0);
  jem_sgld_run(E->ws, E->m, xs, n_cond, E->ys, o->sample_steps, &r->sp, E->rngs);
  if (eval_draw_grid(o->out_dir, "samples_conditional.png", m, xs, n_cond, spc)) return -1;
  for (int j = 0; j < 2; j++)
    g[j].agree_samp = judge_agreement(&E->judges[j], xs, K, spc,
                                      j ? NULL : r->per_class_agree, EVAL_MAX_CLASSES);
  if (n_unc <= 0) return 0;
  for (int i = 0; i < n_unc; i++) jem_rng_seed(&E->rngs[i], o->seed + 1, (uint64_t)i);
  for (int i = 0; i < n_unc; i++) E->ys[i] = i % K; /* classes of the starts */
  chain_starts(r->init, &E->gauss, m, xs, n_unc, E->ys, E->rngs);
  const int ng = n_unc < 100 ? n_unc : 100; /* the grids show the first 100 */
  if (r->init == SAMPLE_GAUSSIAN &&
      eval_draw_grid(o->out_dir, "samples_unconditional_init.png", m, xs, ng, 10))
    return -1;
  for (int j = 0; j < 2; j++)
    g[j].fd_start = judge_frechet(&E->judges[j], xs, n_unc, 0.0f, 0, "starts");
  jem_sgld_run(E->ws, E->m, xs, n_unc, NULL, o->sample_steps, &r->sp, E->rngs);
  if (eval_draw_grid(o->out_dir, "samples_unconditional.png", m, xs, ng, 10)) return -1;
  for (int j = 0; j < 2; j++)
    g[j].fd_samp = judge_frechet(&E->judges[j], xs, n_unc, 0.0f, 0, "samples");
  return 0;
}

/* Samples (when --sample-steps > 0) and the Frechet distances of the
 * validation images and the replay buffer. */
static int stage_samples(eval_run *E) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  jem_model *m = E->m;
  char err[512];
  const double t0 = eval_now_s();
  r->init = o->sample_init >= 0 ? o->sample_init
            : m->replay_n > 0 ? SAMPLE_BUFFER : SAMPLE_NOISE;
  if (r->init == SAMPLE_BUFFER && m->replay_n <= 0) {
    fprintf(stderr, "jem eval: --sample-init buffer, but the model has no replay buffer\n");
    return -1;
  }
  if (r->init == SAMPLE_BUFFER && o->sample_steps > 0 && jem_replay_label(m, E->ws)) {
    fprintf(stderr, "jem eval: out of memory labelling the replay buffer\n");
    return -1;
  }
  if (r->init == SAMPLE_GAUSSIAN && o->sample_steps > 0) {
    jem_dataset tr = {0};
    int bad = jem_fmnist_load(o->data_dir, JEM_SPLIT_TRAIN, &tr, err, sizeof err) ||
              jem_class_gauss_fit(&E->gauss, &tr, err, sizeof err);
    jem_dataset_free(&tr);
    if (bad) {
      fprintf(stderr, "jem eval: class Gaussians: %s\n", err);
      return -1;
    }
  }
  E->judges[0] = (sample_judge){m, E->ws, E->st.feat, r->nt, E->st.nfeat};
  eval_judged *g = r->judged;
  for (int j = 0; j < 2; j++) {
    g[j] = (eval_judged){E->judges[j].m != NULL, E->judges[j].F, NAN, NAN, NAN, NAN, NAN, NAN};
  }
  for (int c = 0; c < EVAL_MAX_CLASSES; c++) r->per_class_agree[c] = NAN;
  jem_sgld_defaults(&r->sp);
  r->sp.step_size = o->sample_step_size;
  r->sp.noise = o->sample_noise;
  r->sp.clamp = 1; /* as the server's default; images must stay in range */
  if (o->sample_steps > 0 && run_chains(E)) return -1;
  for (int j = 0; j < 2; j++) {
    g[j].fd_valid = judge_frechet(&E->judges[j], E->valid.x, r->nv, o->data_noise,
                                  o->seed * 16 + 2, "validation");
    int nr = m->replay_n;
    if (o->limit && nr > o->limit) nr = o->limit;
    g[j].fd_replay = judge_frechet(&E->judges[j], m->replay, nr, 0.0f, 0, "replay buffer");
  }
  r->t_samp = eval_now_s() - t0;
  if (o->sample_steps > 0)
    fprintf(stderr, "  samples: class agreement %.1f%% (starts %.1f%%), Frechet test-vs-samples "
            "%.3f (starts %.3f), test-vs-valid %.3f (%.1f s)\n", 100 * g[0].agree_samp,
            100 * g[0].agree_start, g[0].fd_samp, g[0].fd_start, g[0].fd_valid, r->t_samp);
  if (o->sample_steps > 0 && o->fid_model)
    fprintf(stderr, "  samples judged by %s: class agreement %.1f%% (starts %.1f%%), Frechet "
            "test-vs-samples %.3f (starts %.3f), test-vs-valid %.3f\n", o->fid_model,
            100 * g[1].agree_samp, 100 * g[1].agree_start, g[1].fd_samp, g[1].fd_start,
            g[1].fd_valid);
  return 0;
}

/* PGD L-inf and L2 at each radius on the first --attack-limit test images. */
static int stage_attacks(eval_run *E) {
  const eval_opts *o = &E->o;
  eval_report *r = &E->r;
  char err[512];
  const double t0 = eval_now_s();
  r->na = 0;
  r->clean_sub = NAN;
  if (!o->attack) {
    r->t_att = eval_now_s() - t0;
    return 0;
  }
  const int na = r->na = o->attack_limit < r->nt ? o->attack_limit : r->nt;
  float *xa = malloc(sizeof(float) * (size_t)na * E->chw);
  int *okv = malloc(sizeof(int) * (size_t)na);
  int rc = 0;
  if (!xa || !okv) {
    fprintf(stderr, "jem eval: out of memory for the attacks\n");
    rc = -1;
    goto out;
  }
  r->clean_sub = jem_accuracy(E->st.logits, E->test.y, na, E->K);
  const int pad = (E->S - 28) / 2 > 0 ? (E->S - 28) / 2 : 0;
  for (int norm = 0; norm < 2; norm++) {
    int nr = norm ? o->n_l2 : o->n_linf;
    for (int k = 0; k < nr; k++) {
      float rad = norm ? o->l2[k] : o->linf[k];
      jem_pgd_params pp = {norm ? JEM_PGD_L2 : JEM_PGD_LINF, 2.0f * rad,
                           2.5f * 2.0f * rad / o->attack_steps, o->attack_steps, pad, !norm};
      jem_rng rr;
      jem_rng_seed(&rr, o->seed + 7, (uint64_t)(norm * EVAL_MAX_RADII + k));
      if (jem_pgd_attack(E->ws, E->m, E->test.x, E->test.y, na, &pp, &rr, xa, okv, err,
                         sizeof err)) {
        fprintf(stderr, "jem eval: %s\n", err);
        rc = -1;
        goto out;
      }
      int ok = 0;
      for (int i = 0; i < na; i++) ok += okv[i];
      (norm ? r->rob_l2 : r->rob_linf)[k] = (double)ok / na;
      fprintf(stderr, "  PGD %s r=%g: accuracy %.2f%%\n", norm ? "L2" : "Linf", (double)rad,
              100.0 * ok / na);
    }
  }
  r->t_att = eval_now_s() - t0;
out:
  free(xa);
  free(okv);
  return rc;
}

static void eval_run_free(eval_run *E) {
  jem_class_gauss_free(&E->gauss);
  for (int s = 0; s < JEM_NUM_SCORES; s++) free(E->vq[s]);
  free(E->xs);
  free(E->rngs);
  free(E->ys);
  jem_set_scores_free(&E->st);
  jem_set_scores_free(&E->sv);
  jem_dataset_free(&E->test);
  jem_dataset_free(&E->valid);
  jem_ws_free(E->ws);
  jem_model_free(E->m);
  jem_set_scores_free(&E->ref_test);
  jem_ws_free(E->ref_ws);
  jem_model_free(E->ref_model);
  free(E);
}

int cmd_eval(int argc, char **argv) {
  eval_run *E = calloc(1, sizeof *E);
  if (!E) {
    fprintf(stderr, "jem eval: out of memory\n");
    return 1;
  }
  int rc = parse_opts(argc, argv, &E->o);
  if (rc) {
    free(E);
    return rc < 0 ? 0 : rc;
  }
  if (E->o.threads) jem_blas_set_threads(E->o.threads);
  E->r.o = &E->o;
  E->r.t_start = eval_now_s();
  int status = 1;
  if (!stage_load(E) && !stage_classify(E) && !stage_ood(E) && !stage_samples(E) &&
      !stage_attacks(E) && !eval_write_json(&E->r) && !eval_write_md(&E->r)) {
    fprintf(stderr, "jem eval: wrote %s/report.md and report.json (%.1f s)\n", E->o.out_dir,
            eval_now_s() - E->r.t_start);
    status = 0;
  }
  eval_run_free(E);
  return status;
}
