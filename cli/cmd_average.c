/* cmd_average.c - `jem average MODEL MODEL... --out PATH`: the mean of the
 * parameters of checkpoints of one run (stochastic weight averaging,
 * Izmailov et al., UAI 2018: averaging points along the end of a schedule
 * lands nearer the centre of a flat optimum than any one of them), or with
 * --weights a weighted mean, e.g. of a fine-tuned model and the model it was
 * fine-tuned from (WiSE-FT, Wortsman et al., CVPR 2022: the interpolation
 * keeps much of both endpoints' strengths). */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_MODELS 64

static void average_help(FILE *f) {
  fprintf(f,
    "usage: jem average MODEL MODEL... --out PATH [--weights W,W,...]\n"
    "\n"
    "Writes the element-wise mean of the parameters of 2..%d models of the same\n"
    "architecture and classes (e.g. the last checkpoints of a training run:\n"
    "stochastic weight averaging).  Name, classes, preprocessing and replay buffer\n"
    "come from the first MODEL.  Its temperature and OOD statistics described the\n"
    "first model only, so they are dropped: run `jem calibrate` on the result.\n"
    "Its provenance is new: the command, and in averaged_from each input's path,\n"
    "weight and own provenance.\n"
    "\n"
    "  --out PATH            the averaged model (required)\n"
    "  --weights W,W,...     one non-negative weight per MODEL, in order, normalised\n"
    "                        to sum 1 (default: all equal); e.g. `A B --weights 3,1`\n"
    "                        is 0.75 A + 0.25 B, an interpolation of the two\n"
    "  -h, --help            this text\n", MAX_MODELS);
}

/* Same network and labels: the parameter tables then match entry by entry. */
static int same_model(const jem_model *a, const jem_model *b) {
  if (memcmp(&a->arch, &b->arch, sizeof a->arch) || a->n_weights != b->n_weights) return 0;
  for (int k = 0; k < a->arch.num_classes; k++)
    if (strcmp(a->classes[k], b->classes[k])) return 0;
  return 1;
}

/* "W,W,..." -> exactly n finite non-negative weights and their sum, which
 * must be positive. */
static int parse_weights(const char *s, int n, double *w, double *total) {
  const char *p = s;
  *total = 0;
  for (int i = 0; i < n; i++) {
    char *end;
    w[i] = strtod(p, &end);
    if (end == p || !(w[i] >= 0 && w[i] <= 1e6) || (*end != ',' && *end != '\0') ||
        (*end == '\0') != (i == n - 1))
      return args_usage("average", "--weights wants %d comma-separated numbers in [0, 1e6], "
                        "one per MODEL, got '%s'", n, s);
    *total += w[i];
    p = end + 1;
  }
  if (!(*total > 0)) return args_usage("average", "--weights must not all be 0");
  return 0;
}

/* A provenance of its own: the averaged model was made by this command, not
 * by the first input's training run, so its figures (iterations, val_acc...)
 * must not be inherited.  averaged_from lists each input's path, weight
 * (normalised), iterations when known and its whole provenance.  The
 * first input's replay_buffer record stays: its buffer came along. */
static int note_provenance(jem_model *out, jem_model **ms, const char *cmdline, char **paths,
                           const double *w, double total, int n) {
  json_t *first = json_object_get(ms[0]->meta, "provenance");
  json_t *buf = json_object_get(first, "replay_buffer");
  json_t *prov = json_object();
  json_t *list = json_array();
  if (!prov || !list || json_object_set_new(prov, "averaged_from", list) ||
      (buf && json_object_set(prov, "replay_buffer", buf))) {
    json_decref(prov);
    return -1;
  }
  for (int i = 0; i < n; i++) {
    json_t *p = json_object_get(ms[i]->meta, "provenance");
    json_t *it = json_object_get(p, "iterations");
    json_t *e = json_pack("{s:o,s:f}", "path", args_json_text(paths[i]), "weight", w[i] / total);
    if (json_array_append_new(list, e) ||
        (json_is_integer(it) && json_object_set(e, "iterations", it)) ||
        (p && json_object_set(e, "provenance", p))) {
      json_decref(prov);
      return -1;
    }
  }
  if (cmdline) json_object_set_new(prov, "command", args_json_text(cmdline));
  char *gc = args_git_commit();
  if (gc) json_object_set_new(prov, "git_commit", json_string(gc));
  free(gc);
  char ts[32];
  time_t now = time(NULL);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
  json_object_set_new(prov, "created_at", json_string(ts));
  json_object_set_new(prov, "tool", json_string("jem average " JEM_VERSION));
  return json_object_set_new(out->meta, "provenance", prov);
}

static int average(int argc, char **argv, const char *cmdline) {
  static const struct option opts[] = {
    {"out", required_argument, 0, 'o'}, {"weights", required_argument, 0, 'w'},
    {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
  const char *out = NULL, *weights = NULL;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'o': out = optarg; break;
      case 'w': weights = optarg; break;
      case 'h': average_help(stdout); return 0;
      default: return args_bad_option("average", argc, argv);
    }
  }
  const int n = argc - optind;
  if (n < 2 || n > MAX_MODELS)
    return args_usage("average", "expects 2..%d MODEL files, got %d", MAX_MODELS, n);
  if (!out) return args_usage("average", "--out PATH is required");
  double w[MAX_MODELS], total = n;
  for (int i = 0; i < n; i++) w[i] = 1;
  if (weights && parse_weights(weights, n, w, &total)) return 2;

  jem_model *ms[MAX_MODELS] = {0};
  double *sum = NULL;
  char err[512] = "";
  int status = 1;
  for (int i = 0; i < n; i++) {
    if (jem_model_load(&ms[i], argv[optind + i], err, sizeof err)) {
      fprintf(stderr, "jem average: %s\n", err);
      goto done;
    }
    if (i && !same_model(ms[0], ms[i])) {
      fprintf(stderr, "jem average: %s and %s differ in architecture or classes\n",
              argv[optind], argv[optind + i]);
      goto done;
    }
  }
  jem_model *m = ms[0];
  if (!(sum = calloc(m->n_weights, sizeof *sum))) {
    fprintf(stderr, "jem average: out of memory\n");
    goto done;
  }
  /* in double, so the mean does not depend on the order of the inputs */
  for (int i = 0; i < n; i++)
    for (size_t j = 0; j < m->n_weights; j++) sum[j] += w[i] * ms[i]->weights[j];
  for (size_t j = 0; j < m->n_weights; j++) m->weights[j] = (float)(sum[j] / total);

  /* the first model's calibration describes its weights, not the mean's */
  json_object_del(m->meta, "ood");
  if (jem_model_set_feature_gauss(m, NULL, NULL, err, sizeof err) ||
      json_object_set_new(m->meta, "temperature", json_real(1.0)) ||
      note_provenance(m, ms, cmdline, argv + optind, w, total, n) ||
      jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem average: metadata: %s\n", err[0] ? err : "out of memory");
    goto done;
  }
  if (jem_model_save(m, out, err, sizeof err)) {
    fprintf(stderr, "jem average: %s\n", err);
    goto done;
  }
  fprintf(stderr, "jem average: wrote %s, the %smean of %d models (temperature 1, no OOD "
          "statistics: run `jem calibrate`)\n", out, weights ? "weighted " : "", n);
  status = 0;
done:
  free(sum);
  for (int i = 0; i < n && i < MAX_MODELS; i++) jem_model_free(ms[i]);
  return status;
}

int cmd_average(int argc, char **argv) {
  /* as typed: getopt_long permutes argv */
  char *cmdline = args_command_line(argc, argv, NULL);
  int status = average(argc, argv, cmdline);
  free(cmdline);
  return status;
}
