/* bench_decode_score.c - the core's in-process throughput for the work one
 * POST /v1/classify does: decode + preprocess a PNG/JPEG and score it with
 * the input gradient, in batches.  Baseline for `make bench-server`.
 *
 * usage: bench_decode_score MODEL IMAGE [--batch 64] [--seconds 5]
 *                           [--workers W] [--blas-threads T]
 * W threads each own a workspace and repeatedly decode `batch` copies of the
 * image and call jem_score_batch once; prints one JSON line with images/s. */
#include "jem.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct wctx {
  const jem_model *m;
  const unsigned char *img;
  size_t img_len;
  int batch;
  double until;
  long images;
  int failed;
} wctx;

static void *worker(void *arg) {
  wctx *w = arg;
  const jem_model *m = w->m;
  int k = m->arch.num_classes;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  size_t b = (size_t)w->batch;
  float *x = malloc(sizeof(float) * chw * b);
  float *lg = malloc(sizeof(float) * (size_t)k * b), *pr = malloc(sizeof(float) * (size_t)k * b);
  float *en = malloc(sizeof(float) * b), *gn = malloc(sizeof(float) * b);
  float *ms = malloc(sizeof(float) * b), *cf = malloc(sizeof(float) * b);
  int *lb = malloc(sizeof(int) * b);
  jem_ws *ws = jem_ws_create(m, w->batch, 0);
  if (!x || !lg || !pr || !en || !gn || !ms || !cf || !lb || !ws) {
    w->failed = 1;
    return NULL;
  }
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  char err[256];
  jem_scores s = {lg, pr, lb, cf, {[JEM_SCORE_ENERGY] = en, [JEM_SCORE_GRAD_NORM] = gn, [JEM_SCORE_MAX_SOFTMAX] = ms}};
  while (now() < w->until) {
    for (int i = 0; i < w->batch; i++)
      if (jem_image_to_input(w->img, w->img_len, &m->pre, m->arch.image_size, &lim,
                             x + (size_t)i * chw, err, sizeof err)) {
        fprintf(stderr, "bench_decode_score: %s\n", err);
        w->failed = 1;
        return NULL;
      }
    jem_score_batch(ws, m, x, w->batch, 1, &s);
    w->images += w->batch;
  }
  jem_ws_free(ws);
  free(x), free(lg), free(pr), free(en), free(gn), free(ms), free(cf), free(lb);
  return NULL;
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  if (argc < 3) {
    fprintf(stderr, "usage: bench_decode_score MODEL IMAGE [--batch N] [--seconds S] "
                    "[--workers W] [--blas-threads T]\n");
    return 2;
  }
  int batch = 64, workers = 1, threads = 1;
  double seconds = 5;
  for (int i = 3; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--workers")) workers = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--blas-threads")) threads = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "bench_decode_score: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (batch < 1 || batch > 4096 || workers < 1 || workers > 64 || threads < 1 || seconds <= 0) {
    fprintf(stderr, "bench_decode_score: bad option value\n");
    return 2;
  }
  char err[512];
  jem_model *m = NULL;
  if (jem_model_load(&m, argv[1], err, sizeof err)) {
    fprintf(stderr, "bench_decode_score: %s\n", err);
    return 1;
  }
  unsigned char *img = NULL;
  size_t len = 0;
  if (jem_read_file(argv[2], 64u << 20, &img, &len, err, sizeof err)) {
    fprintf(stderr, "bench_decode_score: %s\n", err);
    return 1;
  }
  jem_blas_set_threads(threads);
  wctx *w = calloc((size_t)workers, sizeof *w);
  pthread_t *th = calloc((size_t)workers, sizeof *th);
  if (!w || !th) return 1;
  /* warm-up: plan workspaces and fault pages in */
  double t0 = now();
  for (int i = 0; i < workers; i++) {
    w[i] = (wctx){m, img, len, batch, t0 + 0.3, 0, 0};
    pthread_create(&th[i], NULL, worker, &w[i]);
  }
  for (int i = 0; i < workers; i++) pthread_join(th[i], NULL);
  t0 = now();
  for (int i = 0; i < workers; i++) {
    w[i] = (wctx){m, img, len, batch, t0 + seconds, 0, 0};
    pthread_create(&th[i], NULL, worker, &w[i]);
  }
  long total = 0;
  int failed = 0;
  for (int i = 0; i < workers; i++) {
    pthread_join(th[i], NULL);
    total += w[i].images;
    failed |= w[i].failed;
  }
  double dt = now() - t0;
  if (failed) return 1;
  printf("{\"bench\": \"decode_score\", \"batch\": %d, \"workers\": %d, \"blas_threads\": %d, "
         "\"images\": %ld, \"seconds\": %.3f, \"img_s\": %.1f, \"blas_core\": \"%s\"}\n",
         batch, workers, jem_blas_threads(), total, dt, (double)total / dt, jem_blas_core());
  free(w);
  free(th);
  free(img);
  jem_model_free(m);
  return 0;
}
