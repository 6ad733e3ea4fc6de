/* cmd_average.c - `jem average MODEL MODEL... --out PATH`: the mean of the
 * parameters of checkpoints of one run (stochastic weight averaging,
 * Izmailov et al., UAI 2018: averaging points along the end of a schedule
 * lands nearer the centre of a flat optimum than any one of them). */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 64

static void average_help(FILE *f) {
  fprintf(f,
    "usage: jem average MODEL MODEL... --out PATH\n"
    "\n"
    "Writes the element-wise mean of the parameters of 2..%d models of the same\n"
    "architecture and classes (e.g. the last checkpoints of a training run:\n"
    "stochastic weight averaging).  Name, classes, preprocessing and replay buffer\n"
    "come from the first MODEL.  Its temperature and OOD statistics described the\n"
    "first model only, so they are dropped: run `jem calibrate` on the result.\n"
    "provenance.averaged_from lists the inputs.\n"
    "\n"
    "  --out PATH            the averaged model (required)\n"
    "  -h, --help            this text\n", MAX_MODELS);
}

/* Same network and labels: the parameter tables then match entry by entry. */
static int same_model(const jem_model *a, const jem_model *b) {
  if (memcmp(&a->arch, &b->arch, sizeof a->arch) || a->n_weights != b->n_weights) return 0;
  for (int k = 0; k < a->arch.num_classes; k++)
    if (strcmp(a->classes[k], b->classes[k])) return 0;
  return 1;
}

/* provenance.averaged_from = [{path, iterations}] (iterations when known) */
static int note_provenance(jem_model *out, jem_model **ms, char **paths, int n) {
  json_t *prov = json_object_get(out->meta, "provenance");
  if (!json_is_object(prov)) {
    prov = json_object();
    if (!prov || json_object_set_new(out->meta, "provenance", prov)) return -1;
  }
  json_t *list = json_array();
  if (!list || json_object_set_new(prov, "averaged_from", list)) return -1;
  for (int i = 0; i < n; i++) {
    json_t *e = json_pack("{s:s}", "path", paths[i]);
    json_t *it = json_object_get(json_object_get(ms[i]->meta, "provenance"), "iterations");
    if (!e || (json_is_integer(it) && json_object_set(e, "iterations", it)) ||
        json_array_append_new(list, e))
      return -1;
  }
  return 0;
}

int cmd_average(int argc, char **argv) {
  static const struct option opts[] = {
    {"out", required_argument, 0, 'o'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
  const char *out = NULL;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'o': out = optarg; break;
      case 'h': average_help(stdout); return 0;
      default: return args_bad_option("average", argc, argv);
    }
  }
  const int n = argc - optind;
  if (n < 2 || n > MAX_MODELS)
    return args_usage("average", "expects 2..%d MODEL files, got %d", MAX_MODELS, n);
  if (!out) return args_usage("average", "--out PATH is required");

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
    for (size_t j = 0; j < m->n_weights; j++) sum[j] += ms[i]->weights[j];
  for (size_t j = 0; j < m->n_weights; j++) m->weights[j] = (float)(sum[j] / n);

  json_object_del(m->meta, "ood");
  if (json_object_set_new(m->meta, "temperature", json_real(1.0)) ||
      note_provenance(m, ms, argv + optind, n) || jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem average: metadata: %s\n", err[0] ? err : "out of memory");
    goto done;
  }
  if (jem_model_save(m, out, err, sizeof err)) {
    fprintf(stderr, "jem average: %s\n", err);
    goto done;
  }
  fprintf(stderr, "jem average: wrote %s, the mean of %d models (temperature 1, no OOD "
          "statistics: run `jem calibrate`)\n", out, n);
  status = 0;
done:
  free(sum);
  for (int i = 0; i < n && i < MAX_MODELS; i++) jem_model_free(ms[i]);
  return status;
}
