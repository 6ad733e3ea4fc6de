/* test_train.c - the trainer on a tiny synthetic set: cross-entropy learns,
 * JEM losses stay finite, checkpoint/resume is bit-identical, the divergence
 * guard rolls back (and gives up after its limit), bad resumes are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "train.h"

/* 10 classes; class k is a bright 6x6 square at a class-specific place on a
 * dark background, plus a little per-image noise. */
static void make_data(jem_dataset *d, int n, uint64_t seed) {
  memset(d, 0, sizeof *d);
  d->n = n;
  d->c = 1;
  d->s = 32;
  d->src_s = 32;
  d->num_classes = 10;
  d->x = calloc((size_t)n * 1024, sizeof(float));
  d->y = calloc((size_t)n, sizeof(int));
  assert_non_null(d->x);
  assert_non_null(d->y);
  jem_rng r;
  jem_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) {
    int k = i % 10;
    d->y[i] = k;
    float *x = d->x + (size_t)i * 1024;
    int r0 = 4 + (k / 5) * 14, c0 = 3 + (k % 5) * 5;
    for (int p = 0; p < 1024; p++) x[p] = -0.9f + 0.1f * jem_rng_uniform(&r);
    for (int a = 0; a < 6; a++)
      for (int b = 0; b < 6; b++) x[(r0 + a) * 32 + c0 + b] = 0.8f;
  }
}

static jem_model *make_model(void) {
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  jem_model_init_random(m, 7);
  return m;
}


static char *tmpdir(void) {
  char *d = strdup("/tmp/jem_test_train_XXXXXX");
  assert_non_null(mkdtemp(d));
  return d;
}

/* Run directories are flat: remove their files, then the directory. */
static void rmdir_all(char *d) {
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
  free(d);
}

static void small_config(jem_train_config *c, const char *dir) {
  jem_train_defaults(c);
  c->run_dir = dir;
  c->batch = 8;
  c->sgld_steps = 3;
  c->buffer_size = 64;
  c->replay_keep = 16;
  c->warmup = 2;
  c->lr = 1e-3f;
  c->energy_l2 = 0.1f;
  c->ckpt_every = 2;
  c->log_every = 1;
  c->eval_every = 0;
  c->progress = NULL;
}

/* 40 cross-entropy steps at a constant rate, without augmentation. */
static void ce_config(jem_train_config *c) {
  c->baseline = 1;
  c->iterations = 40;
  c->lr = 4e-3f;
  c->schedule = JEM_LR_CONST;
  c->sigma = 0;
  c->crop_pad = 0;
  c->flip = 0;
  c->ckpt_every = 100;
}

static void test_ce_learns(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d;
  make_data(&d, 40, 1);
  jem_model *m = make_model();
  jem_ws *ws = jem_ws_create(m, 40, 0);
  float nll0;
  jem_eval_accuracy(ws, m, &d, &nll0);
  char *dir = tmpdir();
  jem_train_config c;
  small_config(&c, dir);
  ce_config(&c);
  c.eval_every = 20;
  jem_train_status st;
  char err[256];
  int rc = jem_train_run(m, &d, &d, &c, &st, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  assert_int_equal(rc, 0);
  assert_true(st.finished);
  float nll1;
  float acc = jem_eval_accuracy(ws, m, &d, &nll1);
  fprintf(stderr, "CE overfit: nll %.3f -> %.3f, accuracy %.2f\n", (double)nll0,
          (double)nll1, (double)acc);
  assert_true(nll1 < 0.5f * nll0);
  assert_true(acc >= 0.7f);
  assert_float_equal(st.val_acc, acc, 1e-6);
  /* the final file loads and carries provenance */
  jem_model *back = NULL;
  assert_int_equal(jem_model_load(&back, st.final_path, err, sizeof err), 0);
  assert_memory_equal(back->weights, m->weights, m->n_weights * sizeof(float));
  jem_model_free(back);
  jem_ws_free(ws);
  jem_model_free(m);
  jem_dataset_free(&d);
  rmdir_all(dir);
}

static void test_jem_finite_and_files(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d;
  make_data(&d, 40, 2);
  jem_model *m = make_model();
  char *dir = tmpdir();
  jem_train_config c;
  small_config(&c, dir);
  c.iterations = 4;
  /* the warm-start options: data-initialised buffer, ramp, clamped chains */
  c.buffer_init = JEM_BUFFER_DATA;
  c.px_ramp = 3;
  c.sgld_clamp = 1;
  jem_train_status st;
  char err[256];
  assert_int_equal(jem_train_run(m, &d, &d, &c, &st, err, sizeof err), 0);
  assert_int_equal(st.iteration, 4);
  for (size_t i = 0; i < m->n_weights; i++) assert_true(isfinite(m->weights[i]));
  char p[512];
  snprintf(p, sizeof p, "%s/log.csv", dir);
  FILE *f = fopen(p, "r");
  assert_non_null(f);
  char line[512];
  int rows = 0;
  assert_non_null(fgets(line, sizeof line, f));
  assert_non_null(strstr(line, "e_sample"));
  while (fgets(line, sizeof line, f)) {
    if (strstr(line, ",val")) continue;
    double loss = NAN;
    int it;
    assert_int_equal(sscanf(line, "%d,%*[^,],%*[^,],%lf", &it, &loss), 2);
    assert_true(isfinite(loss));
    rows++;
  }
  fclose(f);
  assert_int_equal(rows, 4);
  /* the final model holds replay_keep buffer images */
  jem_model *back = NULL;
  assert_int_equal(jem_model_load(&back, st.final_path, err, sizeof err), 0);
  assert_int_equal(back->replay_n, 16);
  for (size_t i = 0; i < (size_t)16 * 1024; i++) assert_true(isfinite(back->replay[i]));
  jem_model_free(back);
  jem_model_free(m);
  jem_dataset_free(&d);
  rmdir_all(dir);
}

/* 2N iterations straight == N, stop, resume, N more: bit for bit. */
static void test_resume_bit_identical(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d;
  make_data(&d, 40, 3); /* 5 batches of 8: the run crosses epochs */
  char err[256];
  jem_train_status st;
  jem_train_config c;

  char *d1 = tmpdir();
  jem_model *a = make_model();
  small_config(&c, d1);
  c.iterations = 8;
  c.ckpt_every = 3;
  assert_int_equal(jem_train_run(a, &d, NULL, &c, &st, err, sizeof err), 0);

  char *d2 = tmpdir();
  jem_model *b = make_model();
  small_config(&c, d2);
  c.iterations = 8;
  c.ckpt_every = 3;
  c.stop_at = 4;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), 0);
  assert_int_equal(st.iteration, 4);
  assert_false(st.finished);
  assert_memory_not_equal(a->weights, b->weights, a->n_weights * sizeof(float));
  jem_model_free(b);
  b = make_model(); /* a fresh process would start from scratch too */
  c.stop_at = 0;
  c.resume = 1;
  int rc = jem_train_run(b, &d, NULL, &c, &st, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  assert_int_equal(rc, 0);
  assert_int_equal(st.resumed_from, 4);
  assert_true(st.finished);
  assert_memory_equal(a->weights, b->weights, a->n_weights * sizeof(float));
  /* the replay buffers agree too */
  char p1[512], p2[512];
  snprintf(p1, sizeof p1, "%s/ckpt-00000008.safetensors", d1);
  snprintf(p2, sizeof p2, "%s/ckpt-00000008.safetensors", d2);
  jem_model *ma = NULL, *mb = NULL;
  assert_int_equal(jem_model_load(&ma, p1, err, sizeof err), 0);
  assert_int_equal(jem_model_load(&mb, p2, err, sizeof err), 0);
  assert_int_equal(ma->replay_n, 64);
  assert_memory_equal(ma->replay, mb->replay, (size_t)64 * 1024 * sizeof(float));
  jem_model_free(ma);
  jem_model_free(mb);

  /* a different setup must not resume this checkpoint */
  c.batch = 4;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "different setup"));
  c.batch = 8;
  /* without --resume an existing run directory is refused */
  c.resume = 0;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "already holds a checkpoint"));
  /* a corrupt state file is detected */
  snprintf(p2, sizeof p2, "%s/ckpt-00000008.state", d2);
  FILE *f = fopen(p2, "r+b");
  assert_non_null(f);
  fseek(f, 100, SEEK_SET);
  fputc(0x5a, f);
  fclose(f);
  c.resume = 1;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), JEM_EFORMAT);
  assert_non_null(strstr(err, "checksum"));

  jem_model_free(a);
  jem_model_free(b);
  jem_dataset_free(&d);
  rmdir_all(d1);
  rmdir_all(d2);
}

/* Per-class Gaussians: the fit recovers known means and covariances, and
 * draws reproduce them (2x2 "images", two classes, correlated pixels). */
static void test_class_gauss_moments(void **state) {
  (void)state;
  const int n = 40000;
  const double A[2][4][4] = {
      {{.20, 0, 0, 0}, {.10, .15, 0, 0}, {0, .05, .10, 0}, {-.05, 0, .02, .12}},
      {{.10, 0, 0, 0}, {-.08, .10, 0, 0}, {.02, 0, .20, 0}, {0, .03, -.04, .05}}};
  const double mu[2][4] = {{.1, -.2, .3, 0}, {-.3, .2, 0, .1}};
  jem_dataset d = {0};
  d.n = n, d.c = 1, d.s = 2, d.src_s = 2, d.num_classes = 2;
  d.x = calloc((size_t)n * 4, sizeof(float));
  d.y = calloc((size_t)n, sizeof(int));
  assert_non_null(d.x);
  assert_non_null(d.y);
  jem_rng r;
  jem_rng_seed(&r, 5, 0);
  for (int i = 0; i < n; i++) {
    int k = d.y[i] = i & 1;
    double z[4];
    for (int j = 0; j < 4; j++) z[j] = jem_rng_normal(&r);
    for (int a = 0; a < 4; a++) {
      double v = mu[k][a];
      for (int b = 0; b < 4; b++) v += A[k][a][b] * z[b];
      d.x[(size_t)i * 4 + a] = (float)v;
    }
  }
  jem_class_gauss g;
  char err[256];
  assert_int_equal(jem_class_gauss_fit(&g, &d, err, sizeof err), 0);
  assert_int_equal(g.classes, 2);
  assert_int_equal((int)g.d, 4);
  for (int k = 0; k < 2; k++) {
    const float *L = g.chol + (size_t)k * 16;
    for (int a = 0; a < 4; a++) {
      assert_float_equal(g.mean[k * 4 + a], mu[k][a], 0.01);
      for (int b = 0; b <= a; b++) {
        double want = 0, got = 0;
        for (int q = 0; q < 4; q++) want += A[k][a][q] * A[k][b][q], got += L[a * 4 + q] * L[b * 4 + q];
        if (a == b) want += 1e-3; /* the ridge */
        assert_float_equal(got, want, 0.004);
      }
    }
    /* draws: sample mean and covariance */
    const int m = 40000;
    double s1[4] = {0}, s2[4][4] = {{0}};
    float x[4];
    for (int i = 0; i < m; i++) {
      jem_class_gauss_sample(&g, k, x, &r);
      for (int a = 0; a < 4; a++) {
        assert_true(x[a] >= -1.0f && x[a] <= 1.0f);
        s1[a] += x[a];
        for (int b = 0; b < 4; b++) s2[a][b] += (double)x[a] * x[b];
      }
    }
    for (int a = 0; a < 4; a++) {
      assert_float_equal(s1[a] / m, mu[k][a], 0.01);
      for (int b = 0; b <= a; b++) {
        double want = a == b ? 1e-3 : 0;
        for (int q = 0; q < 4; q++) want += A[k][a][q] * A[k][b][q];
        assert_float_equal(s2[a][b] / m - s1[a] / m * s1[b] / m, want, 0.004);
      }
    }
  }
  jem_class_gauss_free(&g);
  assert_null(g.chol);
  /* too large for full covariances: refused before anything is allocated */
  jem_dataset big = {0};
  float px[1] = {0};
  int py[1] = {0};
  big.n = 1, big.c = 1, big.s = 65, big.num_classes = 2, big.x = px, big.y = py;
  assert_int_equal(jem_class_gauss_fit(&g, &big, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "at most 4096"));
  big.s = 64, big.num_classes = 20;
  assert_int_equal(jem_class_gauss_fit(&g, &big, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "GiB"));
  /* unlabelled data is refused */
  free(d.y);
  d.y = NULL;
  assert_int_equal(jem_class_gauss_fit(&g, &d, err, sizeof err), JEM_EINVAL);
  jem_dataset_free(&d);
}

/* Gaussian chain starts (buffer and restarts) keep the exact resume. */
static void test_gaussian_init_resumes(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d;
  make_data(&d, 40, 4);
  char err[256];
  jem_train_status st;
  jem_train_config c;
  char *d1 = tmpdir(), *d2 = tmpdir();
  jem_model *a = make_model(), *b = make_model();
  small_config(&c, d1);
  c.iterations = 6;
  c.ckpt_every = 3;
  c.buffer_init = JEM_BUFFER_GAUSSIAN;
  c.reinit = 0.5f; /* restarts in every iteration */
  c.sgld_clamp = 1;
  assert_int_equal(jem_train_run(a, &d, NULL, &c, &st, err, sizeof err), 0);
  for (size_t i = 0; i < a->n_weights; i++) assert_true(isfinite(a->weights[i]));
  c.run_dir = d2;
  c.stop_at = 3;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), 0);
  jem_model_free(b);
  b = make_model();
  c.stop_at = 0;
  c.resume = 1;
  assert_int_equal(jem_train_run(b, &d, NULL, &c, &st, err, sizeof err), 0);
  assert_int_equal(st.resumed_from, 3);
  assert_memory_equal(a->weights, b->weights, a->n_weights * sizeof(float));
  jem_model_free(a);
  jem_model_free(b);
  jem_dataset_free(&d);
  rmdir_all(d1);
  rmdir_all(d2);
}

static void test_rollback(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d;
  make_data(&d, 40, 4);
  char err[256];
  jem_train_status st;
  jem_train_config c;

  char *d1 = tmpdir();
  jem_model *m = make_model();
  small_config(&c, d1);
  c.iterations = 5;
  c.inject_at = 3;
  c.inject_count = 1;
  int rc = jem_train_run(m, &d, NULL, &c, &st, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  assert_int_equal(rc, 0);
  assert_true(st.finished);
  assert_int_equal(st.rollbacks, 1);
  assert_float_equal(st.lr_scale, 0.5f, 0);
  char p[512], line[512];
  snprintf(p, sizeof p, "%s/log.csv", d1);
  FILE *f = fopen(p, "r");
  assert_non_null(f);
  int found = 0;
  while (fgets(line, sizeof line, f))
    if (strstr(line, "rollback_to_2")) found = 1; /* last checkpoint: it 2 */
  fclose(f);
  assert_true(found);
  /* the guard state (rollbacks, halved lr) survives a resume */
  jem_model_free(m);
  m = make_model();
  c.resume = 1;
  c.inject_count = 0;
  assert_int_equal(jem_train_run(m, &d, NULL, &c, &st, err, sizeof err), 0);
  assert_int_equal(st.resumed_from, 5);
  assert_int_equal(st.rollbacks, 1);
  assert_float_equal(st.lr_scale, 0.5f, 0);
  jem_model_free(m);
  rmdir_all(d1);

  /* more divergences than allowed: gives up with a clear error */
  char *d2 = tmpdir();
  m = make_model();
  small_config(&c, d2);
  c.iterations = 5;
  c.inject_at = 1;
  c.inject_count = 10;
  c.max_rollbacks = 3;
  rc = jem_train_run(m, &d, NULL, &c, &st, err, sizeof err);
  assert_int_equal(rc, JEM_EINTERNAL);
  assert_non_null(strstr(err, "diverged"));
  assert_int_equal(st.rollbacks, 4);
  jem_model_free(m);
  rmdir_all(d2);
  jem_dataset_free(&d);
}

static void test_config_errors(void **state) {
  (void)state;
  jem_train_config c;
  char err[256];
  jem_train_defaults(&c);
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "run directory"));
  c.run_dir = "/tmp/x";
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), 0);
  c.lr = -1;
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), JEM_EINVAL);
  c.lr = 1e-4f;
  c.buffer_size = 10;
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), JEM_EINVAL);
  c.baseline = 1; /* no buffer needed */
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), 0);
  /* shape mismatch between data and model */
  jem_dataset d;
  make_data(&d, 16, 5);
  d.c = 3;
  jem_model *m = make_model();
  assert_int_equal(jem_train_run(m, &d, NULL, &c, NULL, err, sizeof err), JEM_ESHAPE);
  d.c = 1;
  jem_model_free(m);
  jem_dataset_free(&d);
}

/* Mean energy -logsumexp f(x) of a dataset's images. */
static double mean_energy(const jem_model *m, const jem_dataset *d) {
  jem_ws *ws = jem_ws_create(m, d->n, 0);
  float *z = malloc(sizeof(float) * (size_t)d->n * 10);
  assert_non_null(ws);
  assert_non_null(z);
  jem_forward(ws, m, d->x, d->n, z);
  double e = 0;
  for (int i = 0; i < d->n; i++) e += -jem_logsumexp(z + (size_t)i * 10, 10);
  free(z);
  jem_ws_free(ws);
  return e / d->n;
}

/* Outlier exposure: the same run with and without outliers (uniform
 * noise images); with them, the outliers' energy ends above the data's, by
 * more than without, and the classifier still learns. */
static void test_outlier_exposure(void **state) {
  (void)state;
  jem_blas_set_threads(1);
  jem_dataset d, o;
  make_data(&d, 40, 1);
  make_data(&o, 40, 9);
  jem_rng r;
  jem_rng_seed(&r, 3, 0);
  for (size_t i = 0; i < (size_t)o.n * 1024; i++) o.x[i] = 2.0f * jem_rng_uniform(&r) - 1.0f;
  double gap[2];
  for (int with = 0; with < 2; with++) {
    jem_model *m = make_model();
    char *dir = tmpdir();
    jem_train_config c;
    small_config(&c, dir);
    ce_config(&c);
    if (with) {
      c.outliers = &o;
      c.outlier_sets = "noise";
      c.oe_margin_in = -2.0f;
      c.oe_margin_out = 2.0f;
      c.oe_weight = 0.001f; /* heavier weights trade accuracy in 40 steps */
    }
    jem_train_status st;
    char err[256];
    int rc = jem_train_run(m, &d, NULL, &c, &st, err, sizeof err);
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    gap[with] = mean_energy(m, &o) - mean_energy(m, &d);
    jem_ws *ws = jem_ws_create(m, 40, 0);
    float nll;
    float acc = jem_eval_accuracy(ws, m, &d, &nll);
    fprintf(stderr, "outliers %s: training accuracy %.2f\n", with ? "on" : "off", (double)acc);
    assert_true(acc >= 0.7f);
    jem_ws_free(ws);
    rmdir_all(dir);
    jem_model_free(m);
  }
  fprintf(stderr, "E(outliers) - E(data): %.2f without, %.2f with outlier exposure\n",
          gap[0], gap[1]);
  assert_true(gap[1] > gap[0] + 1.0);
  assert_true(gap[1] > 2.0);
  /* Refused: margins out of order; outliers of another shape. */
  jem_train_config c;
  jem_train_defaults(&c);
  c.run_dir = "/tmp/x";
  c.baseline = 1;
  c.outliers = &o;
  c.oe_margin_in = 1.0f;
  c.oe_margin_out = 0.0f;
  char err[256];
  assert_int_equal(jem_train_config_check(&c, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "margins"));
  jem_train_defaults(&c);
  c.run_dir = "/tmp/x";
  c.baseline = 1;
  c.batch = 8;
  c.outliers = &o;
  o.s = 28;
  jem_model *m = make_model();
  assert_int_equal(jem_train_run(m, &d, NULL, &c, NULL, err, sizeof err), JEM_ESHAPE);
  o.s = 32;
  jem_model_free(m);
  jem_dataset_free(&o);
  jem_dataset_free(&d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_config_errors),
    cmocka_unit_test(test_ce_learns),
    cmocka_unit_test(test_jem_finite_and_files),
    cmocka_unit_test(test_resume_bit_identical),
    cmocka_unit_test(test_rollback),
    cmocka_unit_test(test_class_gauss_moments),
    cmocka_unit_test(test_gaussian_init_resumes),
    cmocka_unit_test(test_outlier_exposure),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
