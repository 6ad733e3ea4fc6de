/* bench_train.c - seconds per JEM training iteration (batch 64, K SGLD steps)
 * in the core's trainer, with its two parts timed separately: the SGLD chains
 * (K input-gradient passes over 64 chains) and the loss pass (one forward and
 * parameter backward over 3x64 rows).  One JSON object per thread setting.
 *
 * usage: bench_train [--model PATH] [--depth 10] [--widen 1] [--k 20]
 *                    [--iters 3] [--threads 1,2]
 */
#include "jem.h"
#include "train.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void rm_dir(const char *d) {
  DIR *dir = opendir(d);
  if (dir) {
    struct dirent *e;
    char p[1024];
    while ((e = readdir(dir))) {
      if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
      snprintf(p, sizeof p, "%s/%s", d, e->d_name);
      remove(p);
    }
    closedir(dir);
  }
  remove(d);
}

/* Mean seconds per iteration of jem_train_run over `iters` iterations (the
 * trainer's own step clock: no set-up, checkpoint or final save). */
static double train_iter_s(const jem_model *m0, const jem_dataset *d, int k, int iters) {
  char dir[] = "/tmp/jem_bench_train_XXXXXX";
  if (!mkdtemp(dir)) return -1;
  jem_model *m = NULL;
  char err[512];
  if (jem_model_create(&m, &m0->arch, err, sizeof err)) return -1;
  memcpy(m->weights, m0->weights, sizeof(float) * m0->n_weights);
  jem_train_config c;
  jem_train_defaults(&c);
  c.iterations = iters;
  c.sgld_steps = k;
  c.warmup = 0;
  c.ckpt_every = 1 << 30;
  c.log_every = 1 << 30;
  c.eval_every = 0;
  c.replay_keep = 0;
  c.run_dir = dir;
  jem_train_status st;
  int rc = jem_train_run(m, d, NULL, &c, &st, err, sizeof err);
  jem_model_free(m);
  rm_dir(dir);
  if (rc) {
    fprintf(stderr, "bench_train: %s\n", err);
    return -1;
  }
  return st.wall_s / iters;
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  const char *model = NULL;
  int depth = 10, widen = 1, k = 20, iters = 3;
  int threads[8] = {1, 2}, nt = 2;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help")) {
      printf("usage: bench_train [--model PATH] [--depth 10] [--widen 1] [--k 20] "
             "[--iters 3] [--threads 1,2]\n");
      return 0;
    }
    if (!v) { fprintf(stderr, "bench_train: %s needs a value\n", a); return 2; }
    i++;
    if (!strcmp(a, "--model")) model = v;
    else if (!strcmp(a, "--depth")) depth = atoi(v);
    else if (!strcmp(a, "--widen")) widen = atoi(v);
    else if (!strcmp(a, "--k")) k = atoi(v);
    else if (!strcmp(a, "--iters")) iters = atoi(v);
    else if (!strcmp(a, "--threads")) {
      nt = 0;
      for (const char *p = v; *p && nt < 8;) {
        threads[nt++] = atoi(p);
        p = strchr(p, ',');
        if (!p) break;
        p++;
      }
    } else { fprintf(stderr, "bench_train: unknown option %s\n", a); return 2; }
  }
  if (k < 1 || iters < 1 || nt < 1) { fprintf(stderr, "bench_train: bad arguments\n"); return 2; }

  char err[512];
  jem_model *m = NULL;
  if (model) {
    if (jem_model_load(&m, model, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
  } else {
    jem_arch a = {depth, widen, 1, 32, 10, 0.2f, JEM_NORM_NONE};
    if (jem_model_create(&m, &a, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
    jem_model_init_random(m, 0);
  }
  const jem_arch *a = &m->arch;
  const int B = 64, K = a->num_classes;
  const size_t chw = (size_t)a->in_channels * a->image_size * a->image_size;

  /* Random data of the model's shape (timing does not depend on content). */
  enum { NDATA = 1024 };
  jem_dataset d = {.n = NDATA, .c = a->in_channels, .s = a->image_size,
                   .num_classes = K, .src_s = a->image_size};
  d.x = malloc(sizeof(float) * chw * NDATA);
  d.y = malloc(sizeof(int) * NDATA);
  float *x = malloc(sizeof(float) * chw * 3 * B);
  float *z = malloc(sizeof(float) * (size_t)3 * B * K);
  float *dz = malloc(sizeof(float) * (size_t)3 * B * K);
  float *g = calloc(m->n_weights, sizeof(float));
  jem_rng *chains = calloc(B, sizeof(jem_rng));
  jem_ws *ws = jem_ws_create(m, 3 * B, JEM_WS_TRAIN);
  if (!d.x || !d.y || !x || !z || !dz || !g || !chains || !ws) {
    fprintf(stderr, "bench_train: out of memory\n");
    return 1;
  }
  jem_rng r;
  jem_rng_seed(&r, 8, 0);
  for (size_t j = 0; j < chw * NDATA; j++) d.x[j] = 2.0f * jem_rng_uniform(&r) - 1.0f;
  for (int i = 0; i < NDATA; i++) d.y[i] = (int)(jem_rng_u32(&r) % (uint32_t)K);
  for (int i = 0; i < 3 * B * K; i++) dz[i] = (jem_rng_uniform(&r) - 0.5f) / B;

  for (int ti = 0; ti < nt; ti++) {
    jem_blas_set_threads(threads[ti]);
    jem_sgld_params sp;
    jem_sgld_defaults(&sp);
    sp.clamp = 0; /* as training (official JEM) and the PyTorch reference run it */
    /* warm-up, then timed */
    for (int i = 0; i < B; i++) jem_rng_seed(&chains[i], 1, (uint64_t)i);
    memcpy(x, d.x, sizeof(float) * chw * 3 * B);
    jem_sgld_run(ws, m, x, B, NULL, 1, &sp, chains);
    double t0 = now();
    for (int it = 0; it < iters; it++) jem_sgld_run(ws, m, x, B, NULL, k, &sp, chains);
    double sgld = (now() - t0) / iters;
    jem_forward(ws, m, x, 3 * B, z);
    jem_backward(ws, m, dz, g, NULL);
    t0 = now();
    for (int it = 0; it < iters; it++) {
      jem_forward(ws, m, x, 3 * B, z);
      jem_backward(ws, m, dz, g, NULL);
    }
    double lossp = (now() - t0) / iters;
    train_iter_s(m, &d, k, 1); /* warm-up */
    double full = train_iter_s(m, &d, k, iters);
    printf("{\"threads\": %d, \"depth\": %d, \"widen\": %d, \"k\": %d, \"batch\": %d, "
           "\"sgld_s\": %.4f, \"loss_pass_s\": %.4f, \"iter_s\": %.4f, \"blas_core\": \"%s\"}\n",
           threads[ti], a->depth, a->widen, k, B, sgld, lossp, full, jem_blas_core());
    fflush(stdout);
  }
  jem_ws_free(ws);
  jem_model_free(m);
  free(d.x); free(d.y); free(x); free(z); free(dz); free(g); free(chains);
  return 0;
}
