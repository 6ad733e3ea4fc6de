/* cmd_eval.c - `jem eval`: accuracy, calibration, OOD detection, samples,
 * Frechet distance and PGD robustness of a model; writes report.md/.json. */
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
#include <sys/stat.h>
#include <time.h>

#include <stb/stb_easy_font.h>

#define MAX_RADII 8

/* Where the sample chains start. */
enum { SAMPLE_NOISE = 0, SAMPLE_BUFFER, SAMPLE_GAUSSIAN };
static const char *const init_names[] = {"noise", "buffer", "gaussian"};
static const char *const init_descriptions[] = {
    "U(-1,1) noise", "replay buffer",
    "a draw of the chain's class Gaussian fitted to the training split (JEM++'s informative "
    "initialisation; `samples_*_init.png` show the starts)"};

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
  float linf[MAX_RADII], l2[MAX_RADII];
  int no_grad;
  int threads;
} eval_opts;

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
    if (*n >= MAX_RADII) {
      return args_usage("eval", "%s takes at most %d radii", opt, MAX_RADII);
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

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* JSON number, or null for NaN/inf (JSON has neither). */
static json_t *num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

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

static int write_file(const char *dir, const char *name, const void *data, size_t len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) {
    fprintf(stderr, "jem eval: cannot write %s: %s\n", path, strerror(errno));
    return -1;
  }
  size_t w = fwrite(data, 1, len, f);
  int bad = fclose(f) != 0 || w != len;
  if (bad) fprintf(stderr, "jem eval: error writing %s\n", path);
  return bad ? -1 : 0;
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

static const char *fmt_num(char buf[32], double v) {
  if (isnan(v)) snprintf(buf, 32, "n/a");
  else snprintf(buf, 32, "%.4g", v);
  return buf;
}

/* ------------------------------------------------------------------------ */
/* Reliability diagram                                                      */

static void fill_rect(float *img, int S, int x0, int y0, int x1, int y1, const float rgb[3],
                      float alpha) {
  if (x0 < 0) x0 = 0;
  if (y0 < 0) y0 = 0;
  if (x1 > S) x1 = S;
  if (y1 > S) y1 = S;
  for (int c = 0; c < 3; c++)
    for (int y = y0; y < y1; y++)
      for (int x = x0; x < x1; x++) {
        float *p = img + (size_t)c * S * S + (size_t)y * S + x;
        *p = (1.0f - alpha) * *p + alpha * rgb[c];
      }
}

/* Text with stb_easy_font (axis-aligned quads), scaled by `scale`. */
static void draw_text(float *img, int S, int x, int y, int scale, const char *text) {
  static float vbuf[4 * 4 * 600]; /* 600 quads, 16 bytes per vertex */
  char t[128];
  snprintf(t, sizeof t, "%s", text);
  int quads = stb_easy_font_print(0, 0, t, NULL, vbuf, (int)sizeof vbuf);
  const float black[3] = {0, 0, 0};
  for (int q = 0; q < quads; q++) {
    const float *v0 = vbuf + (size_t)q * 16, *v2 = v0 + 8;
    int qx0 = x + (int)lroundf(v0[0]) * scale, qy0 = y + (int)lroundf(v0[1]) * scale;
    int qx1 = x + (int)lroundf(v2[0]) * scale, qy1 = y + (int)lroundf(v2[1]) * scale;
    fill_rect(img, S, qx0, qy0, qx1, qy1, black, 1.0f);
  }
}

/* One panel: accuracy bars per confidence bin, the gap to the diagonal in
 * red, the diagonal, a frame, and a title line. */
static void draw_reliability(float *img, int S, const jem_calib *c, const char *title) {
  for (size_t i = 0; i < (size_t)3 * S * S; i++) img[i] = 1.0f;
  const int m = 24, top = 28, W = S - 2 * m, H = S - top - m;
  const float grid[3] = {0.85f, 0.85f, 0.85f}, blue[3] = {0.20f, 0.40f, 0.80f},
              red[3] = {0.90f, 0.25f, 0.25f}, dark[3] = {0.2f, 0.2f, 0.2f};
  for (int g = 1; g < 4; g++) {
    fill_rect(img, S, m + g * W / 4, top, m + g * W / 4 + 1, top + H, grid, 1.0f);
    fill_rect(img, S, m, top + g * H / 4, m + W, top + g * H / 4 + 1, grid, 1.0f);
  }
  for (int b = 0; b < c->nbins; b++) {
    if (!c->count[b]) continue;
    int x0 = m + b * W / c->nbins + 1, x1 = m + (b + 1) * W / c->nbins - 1;
    int ya = top + H - (int)lround(c->acc[b] * H);
    int yc = top + H - (int)lround(c->conf[b] * H);
    fill_rect(img, S, x0, ya, x1, top + H, blue, 1.0f);
    if (yc < ya) fill_rect(img, S, x0, yc, x1, ya, red, 0.6f);
    else fill_rect(img, S, x0, ya, x1, yc, red, 0.6f);
  }
  for (int i = 0; i < W; i++) /* diagonal: accuracy == confidence */
    fill_rect(img, S, m + i, top + H - i * H / W - 1, m + i + 1, top + H - i * H / W + 1, dark, 1.0f);
  fill_rect(img, S, m, top, m + W, top + 1, dark, 1.0f);
  fill_rect(img, S, m, top + H, m + W, top + H + 1, dark, 1.0f);
  fill_rect(img, S, m, top, m + 1, top + H, dark, 1.0f);
  fill_rect(img, S, m + W - 1, top, m + W, top + H, dark, 1.0f);
  draw_text(img, S, m, 6, 2, title);
  draw_text(img, S, m, top + H + 6, 1, "x: confidence  blue: accuracy  red: gap");
}

/* ------------------------------------------------------------------------ */
/* OOD tables                                                               */

/* Transforms raw values into in-distribution-ness (higher = more ID):
 * variant 0: high values are OOD (s = -v); 1: low values are OOD (s = v);
 * 2: two-sided, s = -|percentile(v) - 0.5| against the validation
 * quantiles q. */
enum { V_HIGH = 0, V_LOW, V_TWO, NVAR };
static const char *const var_names[NVAR] = {"ood_high", "ood_low", "two_sided"};

static void orient(const float *v, int n, int variant, const float *q, int nq, double *out) {
  for (int i = 0; i < n; i++) {
    if (variant == V_HIGH) out[i] = -(double)v[i];
    else if (variant == V_LOW) out[i] = v[i];
    else out[i] = -fabs((double)jem_ood_percentile(q, nq, v[i]) - 0.5);
  }
}

static json_t *metrics_json(const jem_ood_metrics *mm) {
  json_t *o = json_object();
  json_object_set_new(o, "auroc", num(mm->auroc));
  json_object_set_new(o, "aupr_in", num(mm->aupr_in));
  json_object_set_new(o, "aupr_out", num(mm->aupr_out));
  json_object_set_new(o, "fpr95", num(mm->fpr95));
  return o;
}

/* The conventional direction of each score (jem_score_conventional_side). */
static int conventional[JEM_NUM_SCORES];

/* ------------------------------------------------------------------------ */
/* Main                                                                     */

typedef struct ood_result {
  const char *name;
  int n;
  jem_ood_metrics mt[JEM_NUM_SCORES][NVAR];
  double mean[JEM_NUM_SCORES];
  double rule_detect;    /* fraction flagged at tpr .95 by the model's rule */
  jem_ood_metrics rule;  /* metrics of jem_ood_rule_stat */
} ood_result;

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

/* Writes images x [n, chw] in [-1,1] as a PNG grid out_dir/name. */
static int write_grid(const char *out_dir, const char *name, const jem_model *m,
                      const float *x, int n, int per_row) {
  size_t len = 0;
  unsigned char *png = jem_png_grid(x, n, m->arch.in_channels, m->arch.image_size, per_row,
                                    -1.0f, 1.0f, &len);
  int rc = !png || write_file(out_dir, name, png, len);
  free(png);
  return rc;
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

int cmd_eval(int argc, char **argv) {
  eval_opts o;
  int rc = parse_opts(argc, argv, &o);
  if (rc) return rc < 0 ? 0 : rc;
  if (o.threads) jem_blas_set_threads(o.threads);
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    conventional[s] = jem_score_conventional_side[s] > 0 ? V_HIGH : V_LOW;
  const double t_start = now_s();
  char err[512];
  int status = 1;

  jem_model *m = NULL;
  jem_ws *ws = NULL;
  jem_dataset test = {0}, valid = {0};
  jem_class_gauss gauss = {0};
  jem_set_scores st = {0}, sv = {0};
  json_t *rep = json_object();
  float *vq[JEM_NUM_SCORES] = {0};
  ood_result *oods = calloc(JEM_OOD_NSETS, sizeof *oods);
  int n_ood = 0;
  char missing[256] = "";
  float *xs = NULL, *xa = NULL;
  jem_rng *rngs = NULL;
  int *ys = NULL, *okv = NULL;
  FILE *md = NULL;
  jem_model *ref_model = NULL; /* --fid-model */
  jem_ws *ref_ws = NULL;
  jem_set_scores ref_test = {0};

  if (!rep || !oods) {
    fprintf(stderr, "jem eval: out of memory\n");
    goto done;
  }
  if (jem_model_load(&m, o.model, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    goto done;
  }
  const int K = m->arch.num_classes, C = m->arch.in_channels, S = m->arch.image_size;
  const size_t chw = (size_t)C * S * S;
  if (!(ws = jem_ws_create(m, o.batch, JEM_WS_FIXED_WEIGHTS))) {
    fprintf(stderr, "jem eval: cannot allocate a workspace for batch %d\n", o.batch);
    goto done;
  }
  if (mkdir_p(o.out_dir)) {
    fprintf(stderr, "jem eval: cannot create %s: %s\n", o.out_dir, strerror(errno));
    goto done;
  }

  /* ---- data ---- */
  if (jem_fmnist_load(o.data_dir, JEM_SPLIT_TEST, &test, err, sizeof err) ||
      jem_fmnist_load(o.data_dir, JEM_SPLIT_VALID, &valid, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    goto done;
  }
  if (test.c != C || test.s != S || test.num_classes > K) {
    fprintf(stderr, "jem eval: the data (%d channels, %dx%d, %d classes) does not fit the "
            "model (%d channels, %dx%d, %d classes)\n", test.c, test.s, test.s,
            test.num_classes, C, S, S, K);
    goto done;
  }
  const int nt = o.limit && o.limit < test.n ? o.limit : test.n;
  const int nv = o.limit && o.limit < valid.n ? o.limit : valid.n;
  const int want_grad = !o.no_grad;
  /* the rule this run applies: without the gradient, the model's no-gradient rule */
  const char *rule_txt = m->ood.rule;
  if (m->ood.present) {
    float probe[JEM_NUM_SCORES] = {0};
    probe[JEM_SCORE_GRAD_NORM] = want_grad ? 0.0f : NAN;
    jem_ood_rule_for(&m->ood, probe, &rule_txt);
  }
  fprintf(stderr, "jem eval: %s, %d test and %d validation images\n", o.model, nt, nv);
  /* the reference judge of the samples (--fid-model), loaded before the long work */
  sample_judge ref = {0};
  if (o.fid_model) {
    if (jem_model_load(&ref_model, o.fid_model, err, sizeof err)) {
      fprintf(stderr, "jem eval: --fid-model: %s\n", err);
      goto done;
    }
    if (ref_model->arch.in_channels != C || ref_model->arch.image_size != S ||
        ref_model->arch.num_classes != K) {
      fprintf(stderr, "jem eval: --fid-model %s takes %d channels, %dx%d, %d classes; the "
              "model %d, %dx%d, %d\n", o.fid_model, ref_model->arch.in_channels,
              ref_model->arch.image_size, ref_model->arch.image_size,
              ref_model->arch.num_classes, C, S, S, K);
      goto done;
    }
    if (!(ref_ws = jem_ws_create(ref_model, o.batch, JEM_WS_FIXED_WEIGHTS)) ||
        jem_eval_score_set(ref_ws, ref_model, test.x, nt, 0, 1, o.data_noise, o.seed * 16 + 1,
                           &ref_test, err, sizeof err)) {
      fprintf(stderr, "jem eval: --fid-model: %s\n", ref_ws ? err : "out of memory");
      goto done;
    }
    ref = (sample_judge){ref_model, ref_ws, ref_test.feat, nt, ref_test.nfeat};
  }

  /* ---- classification and calibration ---- */
  double t0 = now_s();
  if (jem_eval_score_set(ws, m, test.x, nt, want_grad, 1, o.data_noise, o.seed * 16 + 1, &st,
                         err, sizeof err) ||
      jem_eval_score_set(ws, m, valid.x, nv, want_grad, 0, o.data_noise, o.seed * 16 + 2, &sv,
                         err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    goto done;
  }
  const double acc = jem_accuracy(st.logits, test.y, nt, K);
  /* for choosing among checkpoints without looking at the test set */
  const double acc_valid = jem_accuracy(sv.logits, valid.y, nv, K);
  const double nll = jem_nll(st.logits, test.y, nt, K, 1.0);
  const double tfit = jem_fit_temperature(sv.logits, valid.y, nv, K);
  const double nll_t = jem_nll(st.logits, test.y, nt, K, tfit);
  jem_calib cb, ca, cm;
  if (jem_ece(st.logits, test.y, nt, K, 1.0, 20, &cb, err, sizeof err) ||
      jem_ece(st.logits, test.y, nt, K, tfit, 20, &ca, err, sizeof err) ||
      jem_ece(st.logits, test.y, nt, K, m->temperature, 20, &cm, err, sizeof err)) {
    fprintf(stderr, "jem eval: %s\n", err);
    goto done;
  }
  const double t_clf = now_s() - t0;
  fprintf(stderr, "  accuracy %.2f%% (validation %.2f%%)  NLL %.4f  ECE %.2f%% -> %.2f%% at "
          "T=%.3f (%.1f s)\n", 100 * acc, 100 * acc_valid, nll, 100 * cb.ece, 100 * ca.ece,
          tfit, t_clf);
  {
    const int P = 256;
    float *img = malloc(sizeof(float) * 2 * 3 * P * P);
    if (img) {
      char title[64];
      snprintf(title, sizeof title, "T=1  ECE %.2f%%", 100 * cb.ece);
      draw_reliability(img, P, &cb, title);
      snprintf(title, sizeof title, "T=%.2f  ECE %.2f%%", tfit, 100 * ca.ece);
      draw_reliability(img + (size_t)3 * P * P, P, &ca, title);
      size_t len = 0;
      unsigned char *png = jem_png_grid(img, 2, 3, P, 2, 0.0f, 1.0f, &len);
      free(img);
      if (!png || write_file(o.out_dir, "reliability.png", png, len)) {
        free(png);
        goto done;
      }
      free(png);
    }
  }

  /* ---- OOD ---- */
  t0 = now_s();
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    if (s == JEM_SCORE_GRAD_NORM && !want_grad) continue;
    if (s == JEM_SCORE_ENERGY_COMPLEXITY && isnan(m->ood.complexity_weight)) continue;
    if (s == JEM_SCORE_MAHALANOBIS && !m->feat_mean) continue;
    if (!(vq[s] = malloc(sizeof(float) * 1001)) ||
        jem_quantiles(sv.score[s], nv, 1001, vq[s], err, sizeof err)) {
      fprintf(stderr, "jem eval: validation quantiles of %s: %s\n", jem_score_names[s],
              vq[s] ? err : "out of memory");
      goto done;
    }
  }
  double *pos = malloc(sizeof(double) * (size_t)nt);
  double *rule_pos = malloc(sizeof(double) * (size_t)nt);
  double rule_tpr = NAN;
  if (!pos || !rule_pos) {
    free(pos);
    free(rule_pos);
    fprintf(stderr, "jem eval: out of memory\n");
    goto done;
  }
  if (m->ood.present) {
    int acc_n = 0;
    for (int i = 0; i < nt; i++) {
      float v[JEM_NUM_SCORES];
      for (int s = 0; s < JEM_NUM_SCORES; s++) v[s] = st.score[s][i];
      jem_ood_result r;
      jem_ood_eval(&m->ood, v, 0.95f, &r);
      acc_n += r.is_ood == 0;
      rule_pos[i] = jem_ood_rule_stat(&m->ood, v);
    }
    rule_tpr = (double)acc_n / nt;
  }
  for (int k = 0; k < JEM_OOD_NSETS; k++) {
    jem_dataset od = {0};
    int olim = o.ood_limit ? o.ood_limit : o.limit;
    if (o.ood_limit && o.limit && o.limit < olim) olim = o.limit;
    int lrc = jem_ood_set_load(o.ood_dir, jem_ood_set_names[k], m, olim, &od, err, sizeof err);
    if (lrc == JEM_EIO && strstr(err, "missing")) {
      fprintf(stderr, "  skipping OOD set %s: %s\n", jem_ood_set_names[k], err);
      size_t l = strlen(missing);
      snprintf(missing + l, sizeof missing - l, "%s%s", l ? ", " : "", jem_ood_set_names[k]);
      continue;
    }
    if (lrc || od.c != C) {
      fprintf(stderr, "jem eval: OOD set %s: %s\n", jem_ood_set_names[k],
              lrc ? err : "channel count differs from the model's");
      jem_dataset_free(&od);
      free(pos);
      free(rule_pos);
      goto done;
    }
    jem_set_scores so = {0};
    if (jem_eval_score_set(ws, m, od.x, od.n, want_grad, 0, o.data_noise,
                           o.seed * 16 + 3 + (uint64_t)k, &so, err, sizeof err)) {
      fprintf(stderr, "jem eval: %s\n", err);
      jem_dataset_free(&od);
      free(pos);
      free(rule_pos);
      goto done;
    }
    ood_result *R = &oods[n_ood++];
    R->name = jem_ood_set_names[k];
    R->n = od.n;
    double *neg = malloc(sizeof(double) * (size_t)od.n);
    for (int s = 0; s < JEM_NUM_SCORES && neg; s++) {
      R->mean[s] = mean_f(so.score[s], od.n);
      for (int vv = 0; vv < NVAR; vv++) {
        R->mt[s][vv] = (jem_ood_metrics){NAN, NAN, NAN, NAN};
        if (!vq[s]) continue;
        orient(st.score[s], nt, vv, vq[s], 1001, pos);
        orient(so.score[s], od.n, vv, vq[s], 1001, neg);
        jem_ood_metrics_compute(pos, nt, neg, od.n, &R->mt[s][vv], err, sizeof err);
      }
    }
    R->rule_detect = NAN;
    R->rule = (jem_ood_metrics){NAN, NAN, NAN, NAN};
    if (m->ood.present && neg) {
      int det = 0;
      for (int i = 0; i < od.n; i++) {
        float v[JEM_NUM_SCORES];
        for (int s = 0; s < JEM_NUM_SCORES; s++) v[s] = so.score[s][i];
        jem_ood_result r;
        jem_ood_eval(&m->ood, v, 0.95f, &r);
        det += r.is_ood == 1;
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
      fprintf(stderr, " %s %.3f", jem_score_names[s], R->mt[s][conventional[s]].auroc);
    fprintf(stderr, " (conventional one-sided); verdict %.2f%%\n", 100 * R->rule_detect);
  }
  free(pos);
  free(rule_pos);
  const double t_ood = now_s() - t0;

  /* ---- samples and Frechet distance ---- */
  t0 = now_s();
  const int F = st.nfeat;
  const int init = o.sample_init >= 0 ? o.sample_init
                   : m->replay_n > 0 ? SAMPLE_BUFFER : SAMPLE_NOISE;
  if (init == SAMPLE_BUFFER && m->replay_n <= 0) {
    fprintf(stderr, "jem eval: --sample-init buffer, but the model has no replay buffer\n");
    goto done;
  }
  if (init == SAMPLE_BUFFER && o.sample_steps > 0 && jem_replay_label(m, ws)) {
    fprintf(stderr, "jem eval: out of memory labelling the replay buffer\n");
    goto done;
  }
  if (init == SAMPLE_GAUSSIAN && o.sample_steps > 0) {
    jem_dataset tr = {0};
    int bad = jem_fmnist_load(o.data_dir, JEM_SPLIT_TRAIN, &tr, err, sizeof err) ||
              jem_class_gauss_fit(&gauss, &tr, err, sizeof err);
    jem_dataset_free(&tr);
    if (bad) {
      fprintf(stderr, "jem eval: class Gaussians: %s\n", err);
      goto done;
    }
  }
  sample_judge own = {m, ws, st.feat, nt, F};
  const sample_judge *judges[2] = {&own, &ref};
  /* per judge: class agreement of the conditional starts and samples, and the
   * Frechet distances of the unconditional starts and samples, the validation
   * images (the real-vs-real floor) and the replay buffer */
  double agree_start[2] = {NAN, NAN}, agree_samp[2] = {NAN, NAN};
  double fd_start[2] = {NAN, NAN}, fd_samp[2] = {NAN, NAN}, fd_valid[2] = {NAN, NAN},
         fd_replay[2] = {NAN, NAN};
  double per_class_agree[256];
  int n_cond = 0, n_unc = 0;
  jem_sgld_params sp;
  jem_sgld_defaults(&sp);
  sp.step_size = o.sample_step_size;
  sp.noise = o.sample_noise;
  sp.clamp = 1; /* as the server's default; images must stay in range */
  if (o.sample_steps > 0) {
    const int spc = o.samples_per_class;
    n_cond = K * spc;
    n_unc = o.fid_samples;
    if (o.limit && n_unc > o.limit) n_unc = o.limit;
    int nmax = n_cond > n_unc ? n_cond : n_unc;
    xs = malloc(sizeof(float) * (size_t)nmax * chw);
    rngs = malloc(sizeof(jem_rng) * (size_t)nmax);
    ys = malloc(sizeof(int) * (size_t)nmax);
    if (!xs || !rngs || !ys) {
      fprintf(stderr, "jem eval: out of memory for %d chains\n", nmax);
      goto done;
    }
    /* class-conditional: SGLD on f(x)[y], rows = classes */
    for (int i = 0; i < n_cond; i++) {
      jem_rng_seed(&rngs[i], o.seed, (uint64_t)i);
      ys[i] = i / spc;
    }
    chain_starts(init, &gauss, m, xs, n_cond, ys, rngs);
    if (init == SAMPLE_GAUSSIAN &&
        write_grid(o.out_dir, "samples_conditional_init.png", m, xs, n_cond, spc))
      goto done;
    for (int j = 0; j < 2; j++)
      agree_start[j] = judge_agreement(judges[j], xs, K, spc, NULL, 0);
    jem_sgld_run(ws, m, xs, n_cond, ys, o.sample_steps, &sp, rngs);
    if (write_grid(o.out_dir, "samples_conditional.png", m, xs, n_cond, spc)) goto done;
    for (int j = 0; j < 2; j++)
      agree_samp[j] = judge_agreement(judges[j], xs, K, spc, j ? NULL : per_class_agree, 256);

    /* unconditional: SGLD on logsumexp f(x) */
    if (n_unc > 0) {
      for (int i = 0; i < n_unc; i++) jem_rng_seed(&rngs[i], o.seed + 1, (uint64_t)i);
      for (int i = 0; i < n_unc; i++) ys[i] = i % K; /* classes of the starts */
      chain_starts(init, &gauss, m, xs, n_unc, ys, rngs);
      const int ng = n_unc < 100 ? n_unc : 100; /* the grids show the first 100 */
      if (init == SAMPLE_GAUSSIAN &&
          write_grid(o.out_dir, "samples_unconditional_init.png", m, xs, ng, 10))
        goto done;
      for (int j = 0; j < 2; j++)
        fd_start[j] = judge_frechet(judges[j], xs, n_unc, 0.0f, 0, "starts");
      jem_sgld_run(ws, m, xs, n_unc, NULL, o.sample_steps, &sp, rngs);
      if (write_grid(o.out_dir, "samples_unconditional.png", m, xs, ng, 10)) goto done;
      for (int j = 0; j < 2; j++)
        fd_samp[j] = judge_frechet(judges[j], xs, n_unc, 0.0f, 0, "samples");
    }
  }
  for (int j = 0; j < 2; j++) {
    fd_valid[j] = judge_frechet(judges[j], valid.x, nv, o.data_noise, o.seed * 16 + 2,
                                "validation");
    int nr = m->replay_n;
    if (o.limit && nr > o.limit) nr = o.limit;
    fd_replay[j] = judge_frechet(judges[j], m->replay, nr, 0.0f, 0, "replay buffer");
  }
  const double cond_agree = agree_samp[0];
  const double t_samp = now_s() - t0;
  if (o.sample_steps > 0)
    fprintf(stderr, "  samples: class agreement %.1f%% (starts %.1f%%), Frechet test-vs-samples "
            "%.3f (starts %.3f), test-vs-valid %.3f (%.1f s)\n", 100 * cond_agree,
            100 * agree_start[0], fd_samp[0], fd_start[0], fd_valid[0], t_samp);
  if (o.sample_steps > 0 && o.fid_model)
    fprintf(stderr, "  samples judged by %s: class agreement %.1f%% (starts %.1f%%), Frechet "
            "test-vs-samples %.3f (starts %.3f), test-vs-valid %.3f\n", o.fid_model,
            100 * agree_samp[1], 100 * agree_start[1], fd_samp[1], fd_start[1], fd_valid[1]);

  /* ---- PGD ---- */
  t0 = now_s();
  int na = 0;
  double clean_sub = NAN, rob_linf[MAX_RADII], rob_l2[MAX_RADII];
  if (o.attack) {
    na = o.attack_limit < nt ? o.attack_limit : nt;
    xa = malloc(sizeof(float) * (size_t)na * chw);
    okv = malloc(sizeof(int) * (size_t)na);
    if (!xa || !okv) {
      fprintf(stderr, "jem eval: out of memory for the attacks\n");
      goto done;
    }
    clean_sub = jem_accuracy(st.logits, test.y, na, K);
    const int pad = (S - 28) / 2 > 0 ? (S - 28) / 2 : 0;
    for (int norm = 0; norm < 2; norm++) {
      int nr = norm ? o.n_l2 : o.n_linf;
      for (int r = 0; r < nr; r++) {
        float rad = norm ? o.l2[r] : o.linf[r];
        jem_pgd_params pp = {norm ? JEM_PGD_L2 : JEM_PGD_LINF, 2.0f * rad,
                             2.5f * 2.0f * rad / o.attack_steps, o.attack_steps, pad, !norm};
        jem_rng rr;
        jem_rng_seed(&rr, o.seed + 7, (uint64_t)(norm * MAX_RADII + r));
        if (jem_pgd_attack(ws, m, test.x, test.y, na, &pp, &rr, xa, okv, err, sizeof err)) {
          fprintf(stderr, "jem eval: %s\n", err);
          goto done;
        }
        int ok = 0;
        for (int i = 0; i < na; i++) ok += okv[i];
        (norm ? rob_l2 : rob_linf)[r] = (double)ok / na;
        fprintf(stderr, "  PGD %s r=%g: accuracy %.2f%%\n", norm ? "L2" : "Linf", (double)rad,
                100.0 * ok / na);
      }
    }
  }
  const double t_att = now_s() - t0;

  /* ---- report.json ---- */
  {
    json_t *jm = json_object();
    json_object_set_new(jm, "path", json_string(o.model));
    json_object_set_new(jm, "name", json_string(m->name));
    json_object_set_new(jm, "arch", jem_arch_to_json(&m->arch));
    json_object_set_new(jm, "parameters", json_integer((json_int_t)m->n_weights));
    json_object_set_new(jm, "temperature", num(m->temperature));
    json_object_set_new(jm, "has_ood_stats", json_boolean(m->ood.present));
    json_object_set_new(jm, "replay_n", json_integer(m->replay_n));
    json_object_set_new(rep, "model", jm);

    json_t *js = json_object();
    json_object_set_new(js, "n_test", json_integer(nt));
    json_object_set_new(js, "n_valid", json_integer(nv));
    json_object_set_new(js, "limit", json_integer(o.limit));
    json_object_set_new(js, "ood_limit", json_integer(o.ood_limit));
    json_object_set_new(js, "seed", json_integer((json_int_t)o.seed));
    json_object_set_new(js, "data_noise", num(o.data_noise));
    json_object_set_new(js, "batch", json_integer(o.batch));
    json_object_set_new(js, "blas_core", json_string(jem_blas_core()));
    json_object_set_new(rep, "settings", js);

    json_t *jc = json_object();
    json_object_set_new(jc, "accuracy", num(acc));
    json_object_set_new(jc, "nll", num(nll));
    json_object_set_new(jc, "valid_accuracy", num(acc_valid));
    json_object_set_new(jc, "temperature_fitted", num(tfit));
    json_object_set_new(jc, "nll_tempered", num(nll_t));
    json_object_set_new(jc, "ece_bins", json_integer(20));
    json_object_set_new(jc, "ece", num(cb.ece));
    json_object_set_new(jc, "ece_tempered", num(ca.ece));
    json_object_set_new(jc, "ece_model_temperature", num(cm.ece));
    json_object_set_new(jc, "mce", num(cb.mce));
    json_object_set_new(jc, "mce_tempered", num(ca.mce));
    const jem_calib *cals[2] = {&cb, &ca};
    const char *cn[2] = {"bins", "bins_tempered"};
    for (int w = 0; w < 2; w++) {
      json_t *arr = json_array();
      for (int b = 0; b < 20; b++) {
        json_t *e = json_object();
        json_object_set_new(e, "lo", json_real(b / 20.0));
        json_object_set_new(e, "hi", json_real((b + 1) / 20.0));
        json_object_set_new(e, "count", json_integer(cals[w]->count[b]));
        /* empty bins have no mean: null */
        json_object_set_new(e, "confidence", cals[w]->count[b] ? num(cals[w]->conf[b]) : json_null());
        json_object_set_new(e, "accuracy", cals[w]->count[b] ? num(cals[w]->acc[b]) : json_null());
        json_array_append_new(arr, e);
      }
      json_object_set_new(jc, cn[w], arr);
    }
    json_object_set_new(jc, "reliability_png", json_string("reliability.png"));
    json_object_set_new(rep, "classification", jc);

    json_t *jo = json_object(), *sets = json_object(), *ids = json_object();
    for (int s = 0; s < JEM_NUM_SCORES; s++) {
      json_t *e = json_object();
      json_object_set_new(e, "mean", num(mean_f(st.score[s], nt)));
      json_object_set_new(e, "std", num(std_f(st.score[s], nt)));
      json_object_set_new(ids, jem_score_names[s], e);
    }
    json_object_set_new(jo, "test_scores", ids);
    json_object_set_new(jo, "positive_class", json_string("in-distribution (Fashion-MNIST test)"));
    json_object_set_new(jo, "variants", json_string(
        "ood_high: high raw values are OOD; ood_low: low raw values are OOD; two_sided: "
        "|validation percentile - 0.5|"));
    for (int r = 0; r < n_ood; r++) {
      json_t *e = json_object(), *sc = json_object();
      json_object_set_new(e, "n", json_integer(oods[r].n));
      for (int s = 0; s < JEM_NUM_SCORES; s++) {
        json_t *se = json_object();
        json_object_set_new(se, "mean", num(oods[r].mean[s]));
        for (int vv = 0; vv < NVAR; vv++)
          json_object_set_new(se, var_names[vv], metrics_json(&oods[r].mt[s][vv]));
        json_object_set_new(se, "conventional", json_string(var_names[conventional[s]]));
        json_object_set_new(sc, jem_score_names[s], se);
      }
      json_object_set_new(e, "scores", sc);
      if (m->ood.present) {
        json_t *re = metrics_json(&oods[r].rule);
        json_object_set_new(re, "detected_at_tpr95", num(oods[r].rule_detect));
        json_object_set_new(e, "rule", re);
      }
      json_object_set_new(sets, oods[r].name, e);
    }
    json_object_set_new(jo, "sets", sets);
    json_object_set_new(jo, "missing_sets", json_string(missing));
    if (m->ood.present) {
      json_t *re = json_object();
      json_object_set_new(re, "description", json_string(rule_txt));
      json_object_set_new(re, "test_tpr_at_0.95", num(rule_tpr));
      json_object_set_new(jo, "rule", re);
    }
    json_object_set_new(rep, "ood", jo);

    json_t *jsm = json_object();
    json_object_set_new(jsm, "steps", json_integer(o.sample_steps));
    json_object_set_new(jsm, "init", json_string(init_names[init]));
    json_object_set_new(jsm, "step_size", num(sp.step_size));
    json_object_set_new(jsm, "noise", num(sp.noise));
    json_object_set_new(jsm, "clamp", json_boolean(sp.clamp));
    json_object_set_new(jsm, "n_conditional", json_integer(n_cond));
    json_object_set_new(jsm, "n_unconditional", json_integer(n_unc));
    json_object_set_new(jsm, "conditional_agreement", num(cond_agree));
    if (o.sample_steps > 0) {
      json_t *pa = json_array();
      for (int c = 0; c < K && c < 256; c++) json_array_append_new(pa, num(per_class_agree[c]));
      json_object_set_new(jsm, "conditional_agreement_per_class", pa);
      json_object_set_new(jsm, "conditional_png", json_string("samples_conditional.png"));
      if (n_unc > 0)
        json_object_set_new(jsm, "unconditional_png", json_string("samples_unconditional.png"));
      if (init == SAMPLE_GAUSSIAN) {
        json_object_set_new(jsm, "conditional_init_png", json_string("samples_conditional_init.png"));
        if (n_unc > 0)
          json_object_set_new(jsm, "unconditional_init_png",
                              json_string("samples_unconditional_init.png"));
      }
    }
    json_object_set_new(jsm, "conditional_agreement_starts", num(agree_start[0]));
    for (int j = 0; j < 2; j++) {
      if (!judges[j]->m) continue;
      json_t *fd = json_object();
      if (j) {
        json_object_set_new(fd, "model", json_string(o.fid_model));
        json_object_set_new(fd, "conditional_agreement", num(agree_samp[1]));
        json_object_set_new(fd, "conditional_agreement_starts", num(agree_start[1]));
      }
      json_object_set_new(fd, "feature_dim", json_integer(judges[j]->F));
      json_object_set_new(fd, "test_vs_samples", num(fd_samp[j]));
      json_object_set_new(fd, "test_vs_starts", num(fd_start[j]));
      json_object_set_new(fd, "test_vs_valid", num(fd_valid[j]));
      json_object_set_new(fd, "test_vs_replay_buffer", num(fd_replay[j]));
      json_object_set_new(jsm, j ? "reference" : "frechet", fd);
    }
    json_object_set_new(rep, "samples", jsm);

    json_t *ja = json_object();
    json_object_set_new(ja, "enabled", json_boolean(o.attack));
    json_object_set_new(ja, "n", json_integer(na));
    json_object_set_new(ja, "steps", json_integer(o.attack_steps));
    json_object_set_new(ja, "radius_units", json_string(
        "[0,1] pixel units (model-space radius is twice this); the 2-pixel padding is "
        "never perturbed"));
    json_object_set_new(ja, "clean_accuracy", num(clean_sub));
    for (int norm = 0; norm < 2; norm++) {
      json_t *arr = json_array();
      int nr = o.attack ? (norm ? o.n_l2 : o.n_linf) : 0;
      for (int r = 0; r < nr; r++) {
        json_t *e = json_object();
        json_object_set_new(e, "radius", num(norm ? o.l2[r] : o.linf[r]));
        json_object_set_new(e, "accuracy", num(norm ? rob_l2[r] : rob_linf[r]));
        json_array_append_new(arr, e);
      }
      json_object_set_new(ja, norm ? "l2" : "linf", arr);
    }
    json_object_set_new(rep, "robustness", ja);

    json_t *jt = json_object();
    json_object_set_new(jt, "classification_s", num(t_clf));
    json_object_set_new(jt, "ood_s", num(t_ood));
    json_object_set_new(jt, "samples_s", num(t_samp));
    json_object_set_new(jt, "attacks_s", num(t_att));
    json_object_set_new(jt, "total_s", num(now_s() - t_start));
    json_object_set_new(rep, "timing", jt);

    char path[4096];
    snprintf(path, sizeof path, "%s/report.json", o.out_dir);
    if (json_dump_file(rep, path, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(6))) {
      fprintf(stderr, "jem eval: cannot write %s\n", path);
      goto done;
    }
  }

  /* ---- report.md ---- */
  {
    char path[4096];
    snprintf(path, sizeof path, "%s/report.md", o.out_dir);
    if (!(md = fopen(path, "w"))) {
      fprintf(stderr, "jem eval: cannot write %s: %s\n", path, strerror(errno));
      goto done;
    }
    fprintf(md, "# jem eval: %s\n\n", m->name);
    fprintf(md, "Model `%s` (WRN-%d-%d, %zu parameters, stored temperature %.4g, OOD "
            "statistics: %s, replay buffer: %d images).  Test images: %d, validation "
            "images: %d%s, data noise sigma %.3g, seed %llu.\n\n", o.model, m->arch.depth,
            m->arch.widen, m->n_weights, (double)m->temperature, m->ood.present ? "yes" : "no",
            m->replay_n, nt, nv, o.limit ? " (--limit)" : "", (double)o.data_noise, (unsigned long long)o.seed);
    fprintf(md, "## Classification and calibration\n\n");
    fprintf(md, "| metric | value |\n|---|---|\n");
    fprintf(md, "| test accuracy | %.2f%% |\n| test NLL | %.4f |\n", 100 * acc, nll);
    fprintf(md, "| validation accuracy | %.2f%% |\n", 100 * acc_valid);
    fprintf(md, "| temperature fitted on validation | %.4f |\n| test NLL at fitted T | %.4f |\n",
            tfit, nll_t);
    fprintf(md, "| ECE (20 bins), T = 1 | %.2f%% |\n| ECE, fitted T | %.2f%% |\n", 100 * cb.ece,
            100 * ca.ece);
    fprintf(md, "| ECE, model's stored T = %.4g | %.2f%% |\n| MCE, T = 1 / fitted T | %.2f%% / "
            "%.2f%% |\n\n", (double)m->temperature, 100 * cm.ece, 100 * cb.mce, 100 * ca.mce);
    fprintf(md, "Reliability diagram: `reliability.png` (left T = 1, right fitted T).\n\n");

    fprintf(md, "## OOD detection\n\nAUROC / AUPR-in / FPR at 95%% TPR, in-distribution "
            "(Fashion-MNIST test) as the positive class.  `high`: high values are OOD, "
            "`low`: low values are OOD, `two`: two-sided on the validation percentile.  "
            "Conventional directions: energy high, grad_norm high, max_softmax low, "
            "energy_complexity high (the energy minus the model's complexity_weight, "
            "in nats per bit, times the input's deflate length; Serra et al., ICLR 2020), "
            "mahalanobis high (squared distance of the penultimate features to the nearest "
            "class mean under the training features' shared covariance; Lee et al., "
            "NeurIPS 2018).");
    if (isnan(m->ood.complexity_weight))
      fprintf(md, "  This model has no complexity_weight: energy_complexity is not scored.\n\n");
    else
      fprintf(md, "  complexity_weight: %.3g.\n\n", (double)m->ood.complexity_weight);
    fprintf(md, "Mean test scores:");
    for (int s = 0; s < JEM_NUM_SCORES; s++)
      fprintf(md, "%s %s %.4g", s ? "," : "", jem_score_names[s], mean_f(st.score[s], nt));
    fprintf(md, ".\n\n");
    fprintf(md, "| set | n | score | mean | AUROC high | AUROC low | AUROC two | AUPR-in "
            "(conv.) | FPR95 (conv.) | FPR95 two |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (int r = 0; r < n_ood; r++)
      for (int s = 0; s < JEM_NUM_SCORES; s++) {
        const ood_result *R = &oods[r];
        fprintf(md, "| %s | %d | %s | %.4g | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f |\n",
                R->name, R->n, jem_score_names[s], R->mean[s], R->mt[s][V_HIGH].auroc,
                R->mt[s][V_LOW].auroc, R->mt[s][V_TWO].auroc, R->mt[s][conventional[s]].aupr_in,
                R->mt[s][conventional[s]].fpr95, R->mt[s][V_TWO].fpr95);
      }
    if (missing[0]) fprintf(md, "\nMissing OOD sets (not evaluated): %s.\n", missing);
    if (m->ood.present) {
      fprintf(md, "\nCalibrated verdict rule of the model: \"%s\".  At TPR 0.95 it accepts "
              "%.2f%% of the test set.\n\n| set | detected | rule AUROC | rule FPR95 |\n"
              "|---|---|---|---|\n", rule_txt, 100 * rule_tpr);
      for (int r = 0; r < n_ood; r++)
        fprintf(md, "| %s | %.2f%% | %.3f | %.3f |\n", oods[r].name, 100 * oods[r].rule_detect,
                oods[r].rule.auroc, oods[r].rule.fpr95);
    } else {
      fprintf(md, "\nThe model has no OOD statistics (run `jem calibrate`).\n");
    }

    fprintf(md, "\n## Samples\n\n");
    if (o.sample_steps > 0) {
      fprintf(md, "SGLD, %d steps (step %.3g, noise %.3g, clamped to [-1,1]), init: %s.  "
              "`samples_conditional.png`: one row per class (SGLD on f(x)[y]), %d per class; "
              "the classifier assigns %.1f%% of them to their class (%.1f%% of their starts).  "
              "`samples_unconditional.png`: SGLD on logsumexp f(x).\n\n", o.sample_steps,
              (double)sp.step_size, (double)sp.noise, init_descriptions[init],
              o.samples_per_class, 100 * cond_agree, 100 * agree_start[0]);
    } else {
      fprintf(md, "Sampling skipped (--sample-steps 0).\n\n");
    }
    for (int j = 0; j < 2; j++) {
      if (!judges[j]->m) continue;
      if (j)
        fprintf(md, "\nJudged by the reference network `%s`: it assigns %.1f%% of the "
                "class-conditional samples to their class (%.1f%% of their starts).  ",
                o.fid_model, 100 * agree_samp[1], 100 * agree_start[1]);
      fprintf(md, "Frechet distance in %s %d penultimate features (lower is closer to the "
              "test set):\n\n| compared with test | distance |\n|---|---|\n",
              j ? "its" : "the model's", judges[j]->F);
      char f1[32], f2[32], f3[32], f4[32];
      fprintf(md, "| %d unconditional samples | %s |\n| their starts | %s |\n| validation "
              "images (real-vs-real floor) | %s |\n| replay buffer (%d images) | %s |\n", n_unc,
              fmt_num(f1, fd_samp[j]), fmt_num(f2, fd_start[j]), fmt_num(f3, fd_valid[j]),
              m->replay_n, fmt_num(f4, fd_replay[j]));
    }

    fprintf(md, "\n## Robustness (PGD on the cross-entropy)\n\n");
    if (o.attack) {
      fprintf(md, "%d test images, %d steps of 2.5*eps/%d; radii in [0,1] pixel units (twice "
              "that in model space), padding never perturbed; L-inf with a random start.  "
              "Clean accuracy on this subset: %.2f%%.\n\n| attack | radius | accuracy |\n"
              "|---|---|---|\n", na, o.attack_steps, o.attack_steps, 100 * clean_sub);
      for (int r = 0; r < o.n_linf; r++)
        fprintf(md, "| L-inf | %g | %.2f%% |\n", (double)o.linf[r], 100 * rob_linf[r]);
      for (int r = 0; r < o.n_l2; r++)
        fprintf(md, "| L2 | %g | %.2f%% |\n", (double)o.l2[r], 100 * rob_l2[r]);
    } else {
      fprintf(md, "Skipped (--no-attack).\n");
    }
    fprintf(md, "\nWall time: %.1f s (classification %.1f, OOD %.1f, samples %.1f, attacks "
            "%.1f).\n", now_s() - t_start, t_clf, t_ood, t_samp, t_att);
    if (fclose(md) != 0) {
      md = NULL;
      fprintf(stderr, "jem eval: error writing %s\n", path);
      goto done;
    }
    md = NULL;
  }
  fprintf(stderr, "jem eval: wrote %s/report.md and report.json (%.1f s)\n", o.out_dir,
          now_s() - t_start);
  status = 0;

done:
  if (md) fclose(md);
  jem_class_gauss_free(&gauss);
  for (int s = 0; s < JEM_NUM_SCORES; s++) free(vq[s]);
  free(oods);
  free(xs);
  free(xa);
  free(rngs);
  free(ys);
  free(okv);
  jem_set_scores_free(&st);
  jem_set_scores_free(&sv);
  jem_dataset_free(&test);
  jem_dataset_free(&valid);
  json_decref(rep);
  jem_ws_free(ws);
  jem_model_free(m);
  jem_set_scores_free(&ref_test);
  jem_ws_free(ref_ws);
  jem_model_free(ref_model);
  return status;
}
