/* bench_core.c - images/s of the core: forward and energy gradient (forward +
 * input gradient, as jem_score_batch computes it) at batch 1 and 64, with 1
 * and 2 BLAS threads, and seconds per JEM training iteration (batch 64,
 * K=20, through jem_train_run); one JSON object per line on stdout.
 *
 * usage: bench_core [MODEL.safetensors] [--arch D-K-C-N] [--seconds S]
 *                   [--batches 1,64] [--threads 1,2] [--train-iters N]
 * Without MODEL or --arch: models/fmnist-jem.safetensors if it exists, else
 * a random WRN-10-1 on 1x32x32 with 10 classes (seed 1). */
#define _XOPEN_SOURCE 700 /* nftw */
#include "jem.h"
#include "train.h"

#include <errno.h>
#include <ftw.h>
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
          "                  [--train-iters N]\n"
          "Measures forward and energy-gradient images/s of the core.  Without a\n"
          "model: " DEFAULT_MODEL " if present, else a random WRN-10-1-1-10.\n"
          "--train-iters N (default 3, 0 = skip) times N JEM training iterations\n"
          "(batch 64, K=20 SGLD steps, buffer 10000) on random data.\n"
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
} result;

/* Runs the figure repeatedly: warm-up (at least 3 runs and 0.3 s), then as
 * many runs as fit in `seconds`. */
static result measure(jem_ws *ws, const jem_model *m, const float *x, int batch,
                      int grad, double seconds, float *logits, float *energy,
                      float *gnorm) {
  jem_scores s = {.logits = logits, .energy = energy, .grad_norm = grad ? gnorm : NULL};
  double t0 = now();
  for (int i = 0; i < 3 || now() - t0 < 0.3; i++) jem_score_batch(ws, m, x, batch, grad, &s);
  long it = 0;
  t0 = now();
  double t;
  do {
    jem_score_batch(ws, m, x, batch, grad, &s);
    it++;
    t = now() - t0;
  } while (t < seconds);
  result r = {.img_s = (double)it * batch / t, .iters = it, .secs = t};
  return r;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* Seconds of one jem_train_run of `iters` iterations on a copy of m0. */
static double train_run(const jem_model *m0, const jem_dataset *d, int iters,
                        const char *dir, char *err, size_t errlen) {
  jem_model *m = NULL;
  if (jem_model_create(&m, &m0->arch, err, errlen)) return -1;
  memcpy(m->weights, m0->weights, sizeof(float) * m0->n_weights);
  jem_train_config c;
  jem_train_defaults(&c);
  c.iterations = iters;
  c.warmup = 0;
  c.lr = 1e-4f;
  c.ckpt_every = 1000000;
  c.log_every = 1000000;
  c.eval_every = 0;
  c.run_dir = dir;
  c.resume = 0;
  c.progress = NULL;
  jem_train_status st;
  double t0 = now();
  int rc = jem_train_run(m, d, NULL, &c, &st, err, errlen);
  double t = now() - t0;
  jem_model_free(m);
  nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS); /* also removes dir */
  return rc ? -1 : t;
}

/* Seconds per JEM training iteration, batch 64, K=20: (T(1+n) - T(1)) / n,
 * so that set-up (buffer init) and the final save are not counted. */
static int bench_train(const jem_model *m, int n, const int *threads, int nt) {
  enum { NDATA = 1024 };
  const jem_arch *a = &m->arch;
  const size_t chw = (size_t)a->in_channels * a->image_size * a->image_size;
  jem_dataset d = {.n = NDATA, .c = a->in_channels, .s = a->image_size,
                   .num_classes = a->num_classes};
  d.x = malloc(sizeof(float) * chw * NDATA);
  d.y = malloc(sizeof(int) * NDATA);
  if (!d.x || !d.y) {
    fprintf(stderr, "bench_core: out of memory\n");
    return 1;
  }
  jem_rng r;
  jem_rng_seed(&r, 8, 0);
  for (size_t j = 0; j < chw * NDATA; j++) d.x[j] = 2.0f * jem_rng_uniform(&r) - 1.0f;
  for (int i = 0; i < NDATA; i++) d.y[i] = (int)(jem_rng_u32(&r) % (uint32_t)a->num_classes);

  char err[512];
  double best = 0;
  int best_t = 0, rc = 0;
  for (int ti = 0; ti < nt; ti++) {
    jem_blas_set_threads(threads[ti]);
    double t[2];
    for (int k = 0; k < 2 && !rc; k++) {
      char dir[] = "/tmp/jem-bench-train-XXXXXX";
      if (!mkdtemp(dir)) {
        fprintf(stderr, "bench_core: mkdtemp: %s\n", strerror(errno));
        rc = 1;
        break;
      }
      t[k] = train_run(m, &d, k ? 1 + n : 1, dir, err, sizeof err);
      if (t[k] < 0) {
        fprintf(stderr, "bench_core: training iteration failed: %s\n", err);
        rc = 1;
      }
    }
    if (rc) break;
    double per = (t[1] - t[0]) / n;
    printf("{\"kind\": \"measure\", \"figure\": \"train_iter\", \"batch\": 64, "
           "\"threads\": %d, \"s_per_iter\": %.4f, \"iters\": %d}\n",
           threads[ti], per, n);
    fflush(stdout);
    if (best == 0 || per < best) {
      best = per;
      best_t = threads[ti];
    }
  }
  if (!rc) {
    printf("{\"kind\": \"best\", \"figure\": \"train_iter\", \"batch\": 64, "
           "\"threads\": %d, \"s_per_iter\": %.4f}\n", best_t, best);
    fprintf(stderr, "bench_core: %-12s batch  64: %9.3f s/iteration (K=20, %d BLAS thread%s)\n",
            "train_iter", best, best_t, best_t == 1 ? "" : "s");
  }
  free(d.x);
  free(d.y);
  return rc;
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  const char *model_path = NULL;
  const char *arch_spec = NULL;
  double seconds = 2.0;
  int batches[MAX_LIST] = {1, 64}, nb = 2;
  int threads[MAX_LIST] = {1, 2}, nt = 2;
  int train_iters = 3;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--arch") && i + 1 < argc) {
      arch_spec = argv[++i];
    } else if (!strcmp(a, "--seconds") && i + 1 < argc) {
      char *end;
      seconds = strtod(argv[++i], &end);
      if (*end || !(seconds > 0 && seconds <= 600)) {
        fprintf(stderr, "bench_core: --seconds wants a number in (0, 600]\n");
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
    } else if (!strcmp(a, "--train-iters") && i + 1 < argc) {
      char *end;
      long v = strtol(argv[++i], &end, 10);
      if (*end || v < 0 || v > 1000) {
        fprintf(stderr, "bench_core: --train-iters wants a number in 0..1000\n");
        return 2;
      }
      train_iters = (int)v;
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
  jem_ws *ws = jem_ws_create(m, maxb, 0);
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
    for (int bi = 0; bi < nb; bi++) {
      result best = {0};
      int best_t = 0;
      for (int ti = 0; ti < nt; ti++) {
        jem_blas_set_threads(threads[ti]);
        result res = measure(ws, m, x, batches[bi], g, seconds, logits, energy, gnorm);
        printf("{\"kind\": \"measure\", \"figure\": \"%s\", \"batch\": %d, "
               "\"threads\": %d, \"img_s\": %.2f, \"iters\": %ld, \"seconds\": %.3f}\n",
               fig[g], batches[bi], threads[ti], res.img_s, res.iters, res.secs);
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
  int rc = train_iters > 0 ? bench_train(m, train_iters, threads, nt) : 0;

  /* keep the results observable so nothing is optimised away */
  if (!(energy[0] == energy[0])) fprintf(stderr, "bench_core: warning: NaN energy\n");

  jem_ws_free(ws);
  free(x);
  free(logits);
  free(energy);
  free(gnorm);
  jem_model_free(m);
  return rc;
}
