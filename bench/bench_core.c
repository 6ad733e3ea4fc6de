/* bench_core.c - images/s of the core: forward and energy gradient (forward +
 * input gradient, as jem_score_batch computes it) at batch 1 and 64, with 1
 * and 2 BLAS threads; one JSON object per line on stdout.  (One training
 * iteration is timed by bench_train.c.)
 *
 * usage: bench_core [MODEL.safetensors] [--arch D-K-C-N] [--seconds S]
 *                   [--batches 1,64] [--threads 1,2]
 *                   [--figures forward,energy_grad] [--warmup N]
 * Without MODEL or --arch: models/fmnist-jem.safetensors if it exists, else
 * a random WRN-10-1 on 1x32x32 with 10 classes (seed 1). */
#include "jem.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL "models/fmnist-jem.safetensors"
#define MAX_LIST 8

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_core [MODEL.safetensors] [--arch DEPTH-WIDEN-CHANNELS-CLASSES]\n"
          "                  [--seconds S] [--batches 1,64] [--threads 1,2]\n"
          "                  [--figures forward,energy_grad] [--warmup N]\n"

          "Measures forward and energy-gradient images/s of the core.  Without a\n"
          "model: " DEFAULT_MODEL " if present, else a random WRN-10-1-1-10.\n"
          "Warm-up: 3 runs and 0.3 s, or N runs with --warmup N (0: none).\n"

          "Prints one JSON object per line.\n");
}

/* "1,64" -> {1, 64}; returns the count or -1. */
static int parse_list(const char *s, int *out) {
  int n = 0;
  while (*s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || errno || v < 1 || v > 4096 || n == MAX_LIST) return -1;
    out[n++] = (int)v;
    s = end;
    if (*s == ',') s++;
    else if (*s) return -1;
  }
  return n;
}

typedef struct result {
  double img_s;
  long iters;
  double secs;
  double cpu_s; /* CPU time of the process (all threads) over the same runs */
} result;

/* Process CPU seconds: on a machine shared with other work, images per CPU
 * second of a one-thread run stay close to the idle figure while wall-clock
 * figures drop. */
static double cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Runs the figure repeatedly: warm-up (at least warm_runs runs and
 * warm_secs s), then as many runs as fit in `seconds` (at least one). */
static result measure(jem_ws *ws, const jem_model *m, const float *x, int batch,
                      int grad, double seconds, int warm_runs, double warm_secs,
                      float *logits, float *energy, float *gnorm) {
  jem_scores s = {.logits = logits, .score[JEM_SCORE_ENERGY] = energy,
                  .score[JEM_SCORE_GRAD_NORM] = grad ? gnorm : NULL};
  double t0 = now();
  for (int i = 0; i < warm_runs || now() - t0 < warm_secs; i++)
    jem_score_batch(ws, m, x, batch, grad, &s);
  long it = 0;
  const double c0 = cpu_now();
  t0 = now();
  double t;
  do {
    jem_score_batch(ws, m, x, batch, grad, &s);
    it++;
    t = now() - t0;
  } while (t < seconds);
  result r = {.img_s = (double)it * batch / t, .iters = it, .secs = t,
              .cpu_s = cpu_now() - c0};
  return r;
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  const char *model_path = NULL;
  const char *arch_spec = NULL;
  double seconds = 2.0;
  int batches[MAX_LIST] = {1, 64}, nb = 2;
  int threads[MAX_LIST] = {1, 2}, nt = 2;
  int want_fig[2] = {1, 1};
  int warm_runs = 3;
  double warm_secs = 0.3;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--arch") && i + 1 < argc) {
      arch_spec = argv[++i];
    } else if (!strcmp(a, "--warmup") && i + 1 < argc) {
      char *end;
      long v = strtol(argv[++i], &end, 10);
      if (*end || v < 0 || v > 1000) {
        fprintf(stderr, "bench_core: --warmup wants 0..1000 runs\n");
        return 2;
      }
      warm_runs = (int)v;
      warm_secs = 0.0;
    } else if (!strcmp(a, "--seconds") && i + 1 < argc) {
      char *end;
      seconds = strtod(argv[++i], &end);
      if (*end || !(seconds >= 0 && seconds <= 600)) {
        fprintf(stderr, "bench_core: --seconds wants a number in [0, 600]\n");
        return 2;
      }
    } else if (!strcmp(a, "--batches") && i + 1 < argc) {
      if ((nb = parse_list(argv[++i], batches)) < 1) {
        fprintf(stderr, "bench_core: --batches wants a list like 1,64\n");
        return 2;
      }
    } else if (!strcmp(a, "--threads") && i + 1 < argc) {
      if ((nt = parse_list(argv[++i], threads)) < 1) {
        fprintf(stderr, "bench_core: --threads wants a list like 1,2\n");
        return 2;
      }
    } else if (!strcmp(a, "--figures") && i + 1 < argc) {
      const char *f = argv[++i];
      want_fig[0] = want_fig[1] = 0;
      while (*f) {
        size_t len = strcspn(f, ",");
        if (len == 7 && !strncmp(f, "forward", 7)) want_fig[0] = 1;
        else if (len == 11 && !strncmp(f, "energy_grad", 11)) want_fig[1] = 1;
        else {
          fprintf(stderr, "bench_core: --figures wants forward and/or energy_grad\n");
          return 2;
        }
        f += len;
        if (*f == ',') f++;
      }
    } else if (a[0] == '-') {
      fprintf(stderr, "bench_core: unknown option '%s'\n", a);
      usage(stderr);
      return 2;
    } else if (!model_path) {
      model_path = a;
    } else {
      fprintf(stderr, "bench_core: more than one model given\n");
      return 2;
    }
  }
  if (model_path && arch_spec) {
    fprintf(stderr, "bench_core: give a model file or --arch, not both\n");
    return 2;
  }
  if (!model_path && !arch_spec && access(DEFAULT_MODEL, R_OK) == 0) model_path = DEFAULT_MODEL;

  jem_model *m = NULL;
  char err[512];
  if (model_path) {
    if (jem_model_load(&m, model_path, err, sizeof err)) {
      fprintf(stderr, "bench_core: %s\n", err);
      return 1;
    }
  } else {
    jem_arch a = {.depth = 10, .widen = 1, .in_channels = 1, .image_size = 32,
                  .num_classes = 10, .leak = 0.2f};
    if (arch_spec && sscanf(arch_spec, "%d-%d-%d-%d", &a.depth, &a.widen,
                            &a.in_channels, &a.num_classes) != 4) {
      fprintf(stderr, "bench_core: --arch wants DEPTH-WIDEN-CHANNELS-CLASSES, e.g. 10-1-1-10\n");
      return 2;
    }
    if (jem_model_create(&m, &a, err, sizeof err)) {
      fprintf(stderr, "bench_core: %s\n", err);
      return 2;
    }
    jem_model_init_random(m, 1);
  }

  const jem_arch *a = &m->arch;
  const size_t chw = (size_t)a->in_channels * a->image_size * a->image_size;
  int maxb = 1;
  for (int i = 0; i < nb; i++)
    if (batches[i] > maxb) maxb = batches[i];
  size_t used = 0;
  for (int i = 0; i < m->n_params; i++) used += m->params[i].numel;

  float *x = malloc(sizeof(float) * chw * (size_t)maxb);
  float *logits = malloc(sizeof(float) * (size_t)a->num_classes * (size_t)maxb);
  float *energy = malloc(sizeof(float) * (size_t)maxb);
  float *gnorm = malloc(sizeof(float) * (size_t)maxb);
  jem_ws *ws = jem_ws_create(m, maxb, JEM_WS_FIXED_WEIGHTS); /* as jemd's workers */
  if (!x || !logits || !energy || !gnorm || !ws) {
    fprintf(stderr, "bench_core: out of memory\n");
    return 1;
  }
  /* inputs like preprocessed images: U(-1,1), fixed seed */
  jem_rng r;
  jem_rng_seed(&r, 7, 0);
  for (size_t j = 0; j < chw * (size_t)maxb; j++) x[j] = 2.0f * jem_rng_uniform(&r) - 1.0f;

  printf("{\"kind\": \"info\", \"blas_core\": \"%s\", \"model\": \"%s\", "
         "\"arch\": {\"depth\": %d, \"widen\": %d, \"in_channels\": %d, "
         "\"image_size\": %d, \"num_classes\": %d}, \"params\": %zu, "
         "\"seconds\": %g}\n",
         jem_blas_core(), model_path ? model_path : "random", a->depth, a->widen,
         a->in_channels, a->image_size, a->num_classes, used, seconds);
  fflush(stdout);

  static const char *const fig[2] = {"forward", "energy_grad"};
  for (int g = 0; g < 2; g++) {
    if (!want_fig[g]) continue;
    for (int bi = 0; bi < nb; bi++) {
      result best = {0};
      int best_t = 0;
      for (int ti = 0; ti < nt; ti++) {
        jem_blas_set_threads(threads[ti]);
        result res = measure(ws, m, x, batches[bi], g, seconds, warm_runs, warm_secs, logits,
                             energy, gnorm);
        printf("{\"kind\": \"measure\", \"figure\": \"%s\", \"batch\": %d, "
               "\"threads\": %d, \"img_s\": %.2f, \"iters\": %ld, \"seconds\": %.3f, "
               "\"cpu_seconds\": %.3f}\n",
               fig[g], batches[bi], threads[ti], res.img_s, res.iters, res.secs, res.cpu_s);
        fflush(stdout);
        if (res.img_s > best.img_s) {
          best = res;
          best_t = threads[ti];
        }
      }
      printf("{\"kind\": \"best\", \"figure\": \"%s\", \"batch\": %d, \"threads\": %d, "
             "\"img_s\": %.2f}\n",
             fig[g], batches[bi], best_t, best.img_s);
      fprintf(stderr, "bench_core: %-12s batch %3d: %9.1f img/s (%d BLAS thread%s)\n",
              fig[g], batches[bi], best.img_s, best_t, best_t == 1 ? "" : "s");
      fflush(stdout);
    }
  }
  /* keep the results observable so nothing is optimised away */
  if (!(energy[0] == energy[0])) fprintf(stderr, "bench_core: warning: NaN energy\n");

  jem_ws_free(ws);
  free(x);
  free(logits);
  free(energy);
  free(gnorm);
  jem_model_free(m);
  return 0;
}
