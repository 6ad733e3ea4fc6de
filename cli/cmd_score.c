/* cmd_score.c - `jem score MODEL INPUT...`: classify and score PNG/JPEG images and .npy tensors, one JSON line each. */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCORE_MAX_FILE ((size_t)1 << 32) /* .npy batches may be large */

static void score_help(FILE *f) {
  fprintf(f,
          "usage: jem score MODEL INPUT... [--batch B] [--no-grad] [--tpr T] [--threads N]\n\n"
          "Classifies and scores each INPUT and prints one JSON object per line per image,\n"
          "in input order:\n"
          "  file, index (position inside a .npy, else 0), label, class, confidence (max\n"
          "  temperature-scaled probability), probs (temperature-scaled), logits (raw),\n"
          "  energy (-logsumexp of the logits), grad_norm (L2 norm of d logsumexp / dx over\n"
          "  the whole model input; null with --no-grad), max_softmax (untempered),\n"
          "  energy_complexity (energy minus the model's complexity_weight times the\n"
          "  input's deflate length in bits; null when the model has no weight),\n"
          "  mahalanobis (squared distance of the penultimate features to the nearest\n"
          "  class mean under the training features' covariance; null when the model has\n"
          "  no feature Gaussian), and ood {is_ood, tpr, rule, scores: {energy|grad_norm|\n"
          "  max_softmax|energy_complexity|mahalanobis: {value, percentile}}} when the\n"
          "  model has OOD statistics.\n\n"
          "INPUT is a PNG or JPEG (recognised by content, not by name), preprocessed as the\n"
          "model's metadata says, or a NumPy .npy float32/float64 array of shape [C,H,W] or\n"
          "[N,C,H,W] already in model space.  A bad input is reported on stderr with its\n"
          "name, the others are still scored, and the exit status is then 1.\n\n"
          "  --batch B       images per forward/backward batch (default 64)\n"
          "  --no-grad       skip the gradient score (forward pass only)\n"
          "  --tpr T         OOD verdict level, in (0,1) (default: the model's, 0.95)\n"
          "  --threads N     BLAS threads (default: OpenBLAS's choice)\n"
          "  --max-pixels P  refuse images with more pixels (default 67108864 = 8192^2,\n"
          "                  at most 268435456); any width or height up to 65536\n"
          "  -h, --help      this text\n\n"
          "Exit status: 0 all scored, 1 some input or the model failed, 2 usage error.\n");
}

typedef struct pending {
  const char *file;
  int index;
} pending;

typedef struct scorer {
  const jem_model *m;
  jem_ws *ws;
  int batch, want_grad;
  float tpr;
  size_t chw;
  int k;
  float *x;          /* [batch, C, S, S] */
  pending *who;      /* [batch] */
  int n;             /* filled */
  float *logits, *probs, *conf;
  float *score[JEM_NUM_SCORES];
  int *label;
  int failed_out;    /* output (JSON) failures */
} scorer;

static json_t *jreal(float v) { return isfinite(v) ? json_real(args_f2d(v)) : json_null(); }

static json_t *jarray(const float *v, int k) {
  json_t *a = json_array();
  for (int i = 0; i < k; i++) json_array_append_new(a, jreal(v[i]));
  return a;
}

static void flush(scorer *s) {
  if (s->n == 0) return;
  jem_scores out = {s->logits, s->probs, s->label, s->conf, {0}};
  memcpy(out.score, s->score, sizeof out.score);
  jem_score_batch(s->ws, s->m, s->x, s->n, s->want_grad, &out);
  const jem_model *m = s->m;
  for (int i = 0; i < s->n; i++) {
    int k = s->k;
    json_t *o = json_object();
    json_object_set_new(o, "file", args_json_text(s->who[i].file));
    json_object_set_new(o, "index", json_integer(s->who[i].index));
    json_object_set_new(o, "label", json_integer(s->label[i]));
    json_object_set_new(o, "class", json_string(m->classes[s->label[i]]));
    json_object_set_new(o, "confidence", jreal(s->conf[i]));
    json_object_set_new(o, "probs", jarray(s->probs + (size_t)i * k, k));
    json_object_set_new(o, "logits", jarray(s->logits + (size_t)i * k, k));
    float v[JEM_NUM_SCORES];
    for (int j = 0; j < JEM_NUM_SCORES; j++) {
      v[j] = s->score[j][i];
      json_object_set_new(o, jem_score_names[j], jreal(v[j]));
    }
    if (m->ood.present) {
      jem_ood_result r;
      jem_ood_eval(&m->ood, v, s->tpr, &r);
      json_t *ood = json_object();
      json_object_set_new(ood, "is_ood", r.is_ood < 0 ? json_null() : json_boolean(r.is_ood));
      json_object_set_new(ood, "tpr", jreal(r.tpr));
      json_object_set_new(ood, "rule", r.rule ? json_string(r.rule) : json_null());
      json_t *sc = json_object();
      for (int j = 0; j < JEM_NUM_SCORES; j++)
        json_object_set_new(sc, jem_score_names[j],
                            json_pack("{s:o,s:o}", "value", jreal(r.value[j]), "percentile",
                                      jreal(r.percentile[j])));
      json_object_set_new(ood, "scores", sc);
      json_object_set_new(o, "ood", ood);
    }
    char *line = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(o);
    if (!line) {
      fprintf(stderr, "jem score: %s[%d]: could not format the result\n", s->who[i].file,
              s->who[i].index);
      s->failed_out = 1;
      continue;
    }
    puts(line);
    free(line);
  }
  fflush(stdout);
  s->n = 0;
}

/* Adds one model-space image (chw floats) to the batch. */
static void add(scorer *s, const char *file, int index, const float *img) {
  memcpy(s->x + (size_t)s->n * s->chw, img, s->chw * sizeof(float));
  s->who[s->n].file = file;
  s->who[s->n].index = index;
  if (++s->n == s->batch) flush(s);
}

/* Scores one input file; returns 0 or prints why not and returns 1. */
static int score_file(scorer *s, const char *path, const jem_image_limits *lim) {
  const jem_model *m = s->m;
  unsigned char *buf = NULL;
  size_t len = 0;
  char err[512];
  if (jem_read_file(path, SCORE_MAX_FILE, &buf, &len, err, sizeof err)) {
    fprintf(stderr, "jem score: %s\n", err);
    return 1;
  }
  int C = m->arch.in_channels, S = m->arch.image_size;
  if (len >= 6 && !memcmp(buf, "\x93NUMPY", 6)) {
    float *data = NULL;
    int nd, sh[4];
    int rc = jem_npy_read_mem(buf, len, &data, &nd, sh, err, sizeof err);
    free(buf);
    if (rc) {
      fprintf(stderr, "jem score: %s: %s\n", path, err);
      return 1;
    }
    int n = nd == 4 ? sh[0] : 1;
    const int *chw = nd == 4 ? sh + 1 : sh;
    if ((nd != 3 && nd != 4) || chw[0] != C || chw[1] != S || chw[2] != S) {
      char got[64] = "";
      for (int i = 0; i < nd; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), i ? ", %d" : "%d", sh[i]);
      fprintf(stderr,
              "jem score: %s: array shape (%s) does not fit the model: expected (%d, %d, %d) "
              "or (N, %d, %d, %d)\n", path, got, C, S, S, C, S, S);
      free(data);
      return 1;
    }
    size_t total = (size_t)n * s->chw;
    for (size_t i = 0; i < total; i++)
      if (!isfinite(data[i])) {
        fprintf(stderr, "jem score: %s: element %zu (image %zu) is not a finite number\n", path,
                i, i / s->chw);
        free(data);
        return 1;
      }
    for (int i = 0; i < n; i++) add(s, path, i, data + (size_t)i * s->chw);
    free(data);
    return 0;
  }
  float *img = malloc(s->chw * sizeof(float));
  if (!img) {
    free(buf);
    fprintf(stderr, "jem score: %s: out of memory\n", path);
    return 1;
  }
  int rc = jem_image_to_input(buf, len, &m->pre, S, lim, img, err, sizeof err);
  free(buf);
  if (rc) {
    fprintf(stderr, "jem score: %s: %s\n", path, err);
    free(img);
    return 1;
  }
  add(s, path, 0, img);
  free(img);
  return 0;
}

int cmd_score(int argc, char **argv) {
  static const struct option opts[] = {
    {"batch", required_argument, NULL, 'b'},
    {"no-grad", no_argument, NULL, 'g'},
    {"tpr", required_argument, NULL, 't'},
    {"threads", required_argument, NULL, 'T'},
    {"max-pixels", required_argument, NULL, 'P'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
  };
  int batch = 64, want_grad = 1, threads = 0, c, max_pixels = 8192 * 8192;
  float tpr = NAN;
  opterr = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'b': if (args_int("score", "--batch", optarg, 1, 4096, &batch)) return 2; break;
      case 'g': want_grad = 0; break;
      case 't':
        if (args_float("score", "--tpr", optarg, 1e-6, 1 - 1e-6, &tpr)) return 2;
        break;
      case 'T': if (args_int("score", "--threads", optarg, 1, 1024, &threads)) return 2; break;
      case 'P':
        if (args_int("score", "--max-pixels", optarg, 1, 1 << 28, &max_pixels)) return 2;
        break;
      case 'h': score_help(stdout); return 0;
      default: return args_bad_option("score", argc, argv);
    }
  }
  if (argc - optind < 2)
    return args_usage("score", "expects a MODEL file and at least one INPUT");
  if (threads) jem_blas_set_threads(threads);

  const char *model_path = argv[optind];
  jem_model *m = NULL;
  char err[512];
  if (jem_model_load(&m, model_path, err, sizeof err)) {
    fprintf(stderr, "jem score: %s\n", err);
    return 1;
  }
  int n_inputs = argc - optind - 1;
  scorer s;
  memset(&s, 0, sizeof s);
  s.m = m;
  s.batch = batch;
  s.want_grad = want_grad;
  s.tpr = isnan(tpr) ? (m->ood.default_tpr > 0 ? m->ood.default_tpr : 0.95f) : tpr;
  s.k = m->arch.num_classes;
  s.chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  s.ws = jem_ws_create(m, batch, JEM_WS_FIXED_WEIGHTS);
  s.x = malloc((size_t)batch * s.chw * sizeof(float));
  s.who = malloc((size_t)batch * sizeof(pending));
  size_t bk = (size_t)batch * (size_t)s.k;
  s.logits = malloc(bk * sizeof(float));
  s.probs = malloc(bk * sizeof(float));
  s.conf = malloc((size_t)batch * sizeof(float));
  s.label = malloc((size_t)batch * sizeof(int));
  int oom = 0;
  for (int j = 0; j < JEM_NUM_SCORES; j++)
    oom |= !(s.score[j] = malloc((size_t)batch * sizeof(float)));
  int status = 0;
  if (oom || !s.ws || !s.x || !s.who || !s.logits || !s.probs || !s.conf || !s.label) {
    fprintf(stderr, "jem score: out of memory for batch size %d\n", batch);
    status = 1;
  } else {
    jem_image_limits lim;
    jem_image_limits_default(&lim);
    lim.max_bytes = (size_t)256 << 20;
    lim.max_pixels = (size_t)max_pixels;
    lim.max_side = 1 << 16; /* a local file: only its area is bounded */
    for (int i = 0; i < n_inputs; i++)
      if (score_file(&s, argv[optind + 1 + i], &lim)) status = 1;
    flush(&s);
    if (s.failed_out) status = 1;
  }
  free(s.x);
  free(s.who);
  free(s.logits);
  free(s.probs);
  for (int j = 0; j < JEM_NUM_SCORES; j++) free(s.score[j]);
  free(s.conf);
  free(s.label);
  jem_ws_free(s.ws);
  jem_model_free(m);
  return status;
}
