/* cmd_train.c - `jem train`: train a JEM (or a cross-entropy baseline) on IDX
 * data with checkpoints, exact resume and a divergence guard. */
#include "args.h"
#include "cli.h"
#include "jem.h"
#include "train.h"

#include <errno.h>
#include <float.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f) {
  fprintf(f,
"usage: jem train --run-dir DIR [OPTIONS]\n"
"\n"
"Trains a Wide-ResNet JEM (Grathwohl et al. 2020) on IDX data: cross-entropy on\n"
"one minibatch plus mean E(x_data) - mean E(x_sgld) on an independent one, with\n"
"persistent SGLD chains in a replay buffer; Adam with linear warmup.  Writes\n"
"checkpoints, log.csv, best.safetensors (best validation accuracy) and the final\n"
"model into DIR.  With --resume an interrupted run continues exactly where its\n"
"last checkpoint left it (the other flags must describe the same run).\n"
"\n"
"Data (default: Fashion-MNIST from $JEM_FMNIST_DIR or " JEM_FMNIST_DIR_DEFAULT "):\n"
"  --data DIR             directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz,\n"
"                         or with CIFAR-10's data_batch_{1..5}.bin (the binary format)\n"
"  --train-images FILE    other IDX images ([N,H,W] or [N,C,H,W], gzip or raw)\n"
"  --train-labels FILE    its IDX labels\n"
"  --classes A,B,...      class names (default: Fashion-MNIST's or CIFAR-10's with --data,\n"
"                         else 0..K-1)\n"
"  --valid N              images split off for validation (default 5000, fixed seed 1234)\n"
"  --limit N              use only the first N training images\n"
"  --valid-limit N        validate on only the first N validation images\n"
"Model:\n"
"  --depth D --widen K    WRN-D-K (default 10, 1); D = 6n+4\n"
"  --warm-start MODEL     start from these weights (e.g. a cross-entropy model)\n"
"  --name NAME            model name in the metadata (default fmnist-jem, cifar10-jem\n"
"                         or model)\n"
"  --out FILE             final model (default DIR/model.safetensors)\n"
"  --replay-keep N        replay-buffer images kept in the final file (default 500)\n"
"Objective:\n"
"  --baseline             cross-entropy only (same network; no SGLD)\n"
"  --px-weight W          weight of the energy term (default 1)\n"
"  --energy-l2 L          L * (mean E_data^2 + mean E_sgld^2) (default 0; ~0.1 helps stability)\n"
"  --sigma S              Gaussian noise on data images (default 0.03)\n"
"  --crop P               random shifts up to P pixels (default 2; 0 off)\n"
"  --no-flip              no random horizontal flips\n"
"SGLD:\n"
"  --sgld-steps K         steps per iteration (default 20)\n"
"  --sgld-step-size A     (default 1)     --sgld-noise S   (default 0.01)\n"
"  --sgld-clamp           clamp chains to [-1,1] after each step (official JEM: no)\n"
"  --buffer-size N        replay buffer (default 10000)  --reinit P (default 0.05)\n"
"  --buffer-init I        uniform (default, as official JEM: U(-1,1)), data (training\n"
"                         images + sigma noise; gentler after a warm start) or gaussian\n"
"                         (draws of per-class Gaussians fitted to the training images,\n"
"                         also for every restart: JEM++'s informative initialisation)\n"
"  --px-ramp N            ramp the energy terms in linearly over N iterations (default 0)\n"
"Optimiser:\n"
"  --iterations N         (default 10000)  --batch B (default 64)\n"
"  --lr LR                peak Adam learning rate (default 1e-4)\n"
"  --warmup N             linear warmup iterations (default 1000)\n"
"  --schedule S           cosine (default, to 0 at the end), step (x decay at 80%%, 90%%), const\n"
"  --decay-rate R         for --schedule step (default 0.3)\n"
"Run:\n"
"  --seed S               (default 1)  --threads N  BLAS threads\n"
"  --ckpt-every N         (default 500)  --log-every N (default 50)  --eval-every N (default 1000)\n"
"  --resume               continue from DIR's checkpoint if there is one\n"
"  --stop-at N            checkpoint and stop at iteration N (the schedule still uses --iterations)\n"
"  --max-rollbacks N      divergence rollbacks allowed (default 3); each halves the lr\n"
"  -h, --help             this text\n"
"\n"
"SIGINT/SIGTERM checkpoint and stop.  Exit status: 0 finished (or --stop-at reached),\n"
"1 failure or interrupted, 2 usage error.\n");
}

static volatile int stop_flag = 0;
static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}

/* Option values: args.c's strict parsers, with train's own ranges. */
static int parse_int(const char *flag, const char *v, long lo, long hi, int *out) {
  return args_int("train", flag, v, lo, hi, out);
}

/* Any finite number: jem_train_config_check judges the ranges together. */
static int parse_float(const char *flag, const char *v, float *out) {
  char *end;
  errno = 0;
  double x = strtod(v, &end);
  if (errno || end == v || *end || !isfinite(x) || fabs(x) > FLT_MAX)
    return args_usage("train", "%s expects a number, not '%s'", flag, v);
  *out = (float)x;
  return 0;
}

/* Splits "a,b,c" into k names (malloc'd copy in *store). */
static int split_classes(const char *s, char ***names, char **store) {
  *store = strdup(s);
  if (!*store) return -1;
  int k = 1;
  for (const char *p = s; *p; p++) k += *p == ',';
  *names = calloc((size_t)k, sizeof(char *));
  if (!*names) return -1;
  int i = 0;
  char *save = NULL;
  for (char *tok = strtok_r(*store, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
    (*names)[i++] = tok;
  return i == k ? k : -1; /* empty names are refused */
}

int cmd_train(int argc, char **argv) {
  jem_train_config c;
  jem_train_defaults(&c);
  const char *data_dir = NULL, *timg = NULL, *tlab = NULL, *classes_arg = NULL;
  const char *warm = NULL, *name = NULL;
  int n_valid = JEM_VALID_N, limit = 0, valid_limit = 0, depth = 10, widen = 1;
  int depth_set = 0, widen_set = 0, threads = 0;
  int seed_i = 1;

  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
    /* flags without a value */
    if (!strcmp(a, "--baseline")) { c.baseline = 1; continue; }
    if (!strcmp(a, "--no-flip")) { c.flip = 0; continue; }
    if (!strcmp(a, "--resume")) { c.resume = 1; continue; }
    if (!strcmp(a, "--sgld-clamp")) { c.sgld_clamp = 1; continue; }
    if (strncmp(a, "--", 2)) {
      return args_usage("train", "unexpected argument '%s'", a);
    }
    if (i + 1 >= argc) {
      return args_usage("train", "unknown option, or option without its value: '%s'", a);
    }
    const char *v = argv[++i];
    int bad = 0;
    if (!strcmp(a, "--run-dir")) c.run_dir = v;
    else if (!strcmp(a, "--data")) data_dir = v;
    else if (!strcmp(a, "--train-images")) timg = v;
    else if (!strcmp(a, "--train-labels")) tlab = v;
    else if (!strcmp(a, "--classes")) classes_arg = v;
    else if (!strcmp(a, "--valid")) bad = parse_int(a, v, 0, INT_MAX, &n_valid);
    else if (!strcmp(a, "--limit")) bad = parse_int(a, v, 1, INT_MAX, &limit);
    else if (!strcmp(a, "--valid-limit")) bad = parse_int(a, v, 1, INT_MAX, &valid_limit);
    else if (!strcmp(a, "--depth")) { bad = parse_int(a, v, 10, 1000, &depth); depth_set = 1; }
    else if (!strcmp(a, "--widen")) { bad = parse_int(a, v, 1, 64, &widen); widen_set = 1; }
    else if (!strcmp(a, "--warm-start")) warm = v;
    else if (!strcmp(a, "--name")) name = v;
    else if (!strcmp(a, "--out")) c.out = v;
    else if (!strcmp(a, "--replay-keep")) bad = parse_int(a, v, 0, 1000000, &c.replay_keep);
    else if (!strcmp(a, "--px-weight")) bad = parse_float(a, v, &c.px_weight);
    else if (!strcmp(a, "--energy-l2")) bad = parse_float(a, v, &c.energy_l2);
    else if (!strcmp(a, "--sigma")) bad = parse_float(a, v, &c.sigma);
    else if (!strcmp(a, "--crop")) bad = parse_int(a, v, 0, 8, &c.crop_pad);
    else if (!strcmp(a, "--sgld-steps")) bad = parse_int(a, v, 1, 10000, &c.sgld_steps);
    else if (!strcmp(a, "--sgld-step-size")) bad = parse_float(a, v, &c.sgld_step);
    else if (!strcmp(a, "--sgld-noise")) bad = parse_float(a, v, &c.sgld_noise);
    else if (!strcmp(a, "--buffer-size")) bad = parse_int(a, v, 1, 1000000, &c.buffer_size);
    else if (!strcmp(a, "--reinit")) bad = parse_float(a, v, &c.reinit);
    else if (!strcmp(a, "--buffer-init")) {
      if (!strcmp(v, "uniform")) c.buffer_init = JEM_BUFFER_UNIFORM;
      else if (!strcmp(v, "data")) c.buffer_init = JEM_BUFFER_DATA;
      else if (!strcmp(v, "gaussian")) c.buffer_init = JEM_BUFFER_GAUSSIAN;
      else {
        bad = args_usage("train", "--buffer-init expects uniform, data or gaussian, not '%s'", v);
      }
    }
    else if (!strcmp(a, "--px-ramp")) bad = parse_int(a, v, 0, INT_MAX, &c.px_ramp);
    else if (!strcmp(a, "--iterations")) bad = parse_int(a, v, 1, INT_MAX, &c.iterations);
    else if (!strcmp(a, "--batch")) bad = parse_int(a, v, 1, 4096, &c.batch);
    else if (!strcmp(a, "--lr")) bad = parse_float(a, v, &c.lr);
    else if (!strcmp(a, "--warmup")) bad = parse_int(a, v, 0, INT_MAX, &c.warmup);
    else if (!strcmp(a, "--schedule")) {
      if (!strcmp(v, "cosine")) c.schedule = JEM_LR_COSINE;
      else if (!strcmp(v, "step")) c.schedule = JEM_LR_STEP;
      else if (!strcmp(v, "const")) c.schedule = JEM_LR_CONST;
      else {
        bad = args_usage("train", "--schedule expects cosine, step or const, not '%s'", v);
      }
    }
    else if (!strcmp(a, "--decay-rate")) bad = parse_float(a, v, &c.decay_rate);
    else if (!strcmp(a, "--seed")) bad = parse_int(a, v, 0, INT_MAX, &seed_i);
    else if (!strcmp(a, "--threads")) bad = parse_int(a, v, 1, 256, &threads);
    else if (!strcmp(a, "--ckpt-every")) bad = parse_int(a, v, 1, INT_MAX, &c.ckpt_every);
    else if (!strcmp(a, "--log-every")) bad = parse_int(a, v, 1, INT_MAX, &c.log_every);
    else if (!strcmp(a, "--eval-every")) bad = parse_int(a, v, 0, INT_MAX, &c.eval_every);
    else if (!strcmp(a, "--stop-at")) bad = parse_int(a, v, 1, INT_MAX, &c.stop_at);
    else if (!strcmp(a, "--max-rollbacks")) bad = parse_int(a, v, 0, 100, &c.max_rollbacks);
    else {
      return args_usage("train", "unknown option, or option without its value: '%s'", a);
    }
    if (bad) return 2;
  }
  if ((depth - 4) % 6 != 0)
    return args_usage("train", "--depth %d is not of the form 6n+4 (10, 16, 22, ...)", depth);
  c.seed = (uint64_t)seed_i;
  if (!c.run_dir) {
    return args_usage("train", "--run-dir DIR is required");
  }
  if ((timg != NULL) != (tlab != NULL)) {
    return args_usage("train", "--train-images and --train-labels go together");
  }
  if (timg && data_dir) {
    return args_usage("train", "give either --data or --train-images/--train-labels");
  }
  if (c.baseline) c.replay_keep = 0;
  char err[512];
  if (jem_train_config_check(&c, err, sizeof err)) {
    return args_usage("train", "%s", err);
  }
  if (threads > 0) jem_blas_set_threads(threads);

  /* ---- data ---- */
  int fmnist = !timg, cifar = 0;
  char ip[1024], lp[1024];
  const char *d = NULL;
  if (fmnist) {
    d = data_dir ? data_dir : getenv("JEM_FMNIST_DIR");
    if (!d || !*d) d = JEM_FMNIST_DIR_DEFAULT;
    cifar = jem_cifar10_dir(d);
    snprintf(ip, sizeof ip, cifar ? "%s/data_batch_N.bin" : "%s/train-images-idx3-ubyte.gz", d);
    snprintf(lp, sizeof lp, cifar ? "%s/data_batch_N.bin" : "%s/train-labels-idx1-ubyte.gz", d);
    timg = ip;
    tlab = lp;
  }
  jem_dataset all, train, valid;
  memset(&train, 0, sizeof train);
  memset(&valid, 0, sizeof valid);
  if (cifar ? jem_fmnist_load(d, JEM_SPLIT_TRAIN_ALL, &all, err, sizeof err)
            : jem_dataset_load(&all, timg, tlab, 32, 0, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    return 1;
  }
  int rc = 1;
  jem_model *m = NULL, *wm = NULL;
  char **cls = NULL, *cls_store = NULL;
  json_t *prov = NULL;
  if (n_valid > 0) {
    if (n_valid >= all.n) {
      fprintf(stderr, "jem train: --valid %d leaves no training images (%d in all)\n", n_valid, all.n);
      goto out;
    }
    if (jem_dataset_split(&all, n_valid, JEM_VALID_SEED, &train, &valid, err, sizeof err)) {
      fprintf(stderr, "jem train: %s\n", err);
      goto out;
    }
    jem_dataset_free(&all);
  } else {
    train = all;
    memset(&all, 0, sizeof all);
  }
  if (limit && limit < train.n) train.n = limit; /* first N; buffers stay as allocated */
  if (valid_limit && valid_limit < valid.n) valid.n = valid_limit;

  int k = fmnist ? 10 : train.num_classes;
  if (classes_arg) {
    int nk = split_classes(classes_arg, &cls, &cls_store);
    if (nk < 0) {
      fprintf(stderr, "jem train: --classes has an empty name\n");
      goto out;
    }
    if (nk < train.num_classes) {
      fprintf(stderr, "jem train: --classes names %d classes but the labels go up to %d\n", nk,
              train.num_classes - 1);
      goto out;
    }
    k = nk;
  }
  if (k < 2) {
    fprintf(stderr, "jem train: the labels name only %d class\n", k);
    goto out;
  }

  /* ---- model ---- */
  jem_arch arch = {depth, widen, train.c, 32, k, 0.2f, JEM_NORM_NONE};
  if (warm) {
    if (jem_model_load(&wm, warm, err, sizeof err)) {
      fprintf(stderr, "jem train: --warm-start: %s\n", err);
      goto out;
    }
    if ((depth_set && wm->arch.depth != depth) || (widen_set && wm->arch.widen != widen)) {
      fprintf(stderr, "jem train: --warm-start model is WRN-%d-%d, not WRN-%d-%d\n",
              wm->arch.depth, wm->arch.widen, depth, widen);
      goto out;
    }
    arch = wm->arch;
    if (arch.in_channels != train.c || arch.num_classes != k || arch.image_size != 32) {
      fprintf(stderr, "jem train: --warm-start model takes %d channels and %d classes; "
              "the data has %d channels and %d classes\n", arch.in_channels, arch.num_classes,
              train.c, k);
      goto out;
    }
  }
  if (jem_model_create(&m, &arch, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    goto out;
  }
  if (wm) memcpy(m->weights, wm->weights, m->n_weights * sizeof(float));
  else jem_model_init_random(m, c.seed);

  /* ---- metadata ---- */
  json_t *jc = json_array();
  for (int i = 0; i < k; i++) {
    char num[16];
    snprintf(num, sizeof num, "%d", i);
    const char *nm = cls ? cls[i] : cifar ? jem_cifar10_classes[i] : fmnist ? jem_fmnist_classes[i] : num;
    json_array_append_new(jc, json_string(nm));
  }
  json_object_set_new(m->meta, "name", json_string(name ? name : cifar ? "cifar10-jem" : fmnist ? "fmnist-jem" : "model"));
  json_object_set_new(m->meta, "classes", jc);
  json_object_set_new(m->meta, "preprocess",
                      json_pack("{s:i,s:[i,i],s:i,s:f,s:f,s:[f,f],s:b}", "channels", train.c,
                                "resize", train.src_s, train.src_s, "pad", (32 - train.src_s) / 2,
                                "pad_value", 0.0, "background", 0.0, "range", -1.0, 1.0,
                                "invert", 0));
  json_object_set_new(m->meta, "temperature", json_real(1.0));
  prov = json_object();
  {
    /* --stop-at only splits a run into segments: leave it out. */
    char *cmd = args_command_line(argc, argv, "--stop-at");
    if (cmd) json_object_set_new(prov, "command", json_string(cmd));
    free(cmd);
    json_object_set_new(prov, "seed", json_integer(seed_i));
    char *gc = args_git_commit();
    if (gc) { json_object_set_new(prov, "git_commit", json_string(gc)); free(gc); }
    char ts[32];
    time_t now = time(NULL);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    json_object_set_new(prov, "started_at", json_string(ts));
    json_object_set_new(prov, "trainer", json_string("jem train " JEM_VERSION " (C, OpenBLAS)"));
    json_object_set_new(prov, "blas_core", json_string(jem_blas_core()));
    json_object_set_new(prov, "blas_threads", json_integer(jem_blas_threads()));
    json_object_set_new(prov, "data",
                        json_pack("{s:s,s:s,s:i,s:i,s:i}", "images", timg, "labels", tlab,
                                  "train_images", train.n, "valid_images", valid.n,
                                  "valid_seed", (int)JEM_VALID_SEED));
    if (wm) {
      json_t *w = json_pack("{s:s}", "path", warm);
      json_t *wp = json_object_get(wm->meta, "provenance");
      if (wp) json_object_set(w, "provenance", wp);
      json_object_set_new(prov, "warm_start", w);
    }
  }
  json_object_set(m->meta, "provenance", prov);
  if (jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem train: metadata: %s\n", err);
    goto out;
  }

  /* ---- run ---- */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  c.stop = &stop_flag;
  c.progress = stderr;
  jem_train_status st;
  if (jem_train_run(m, &train, valid.n ? &valid : NULL, &c, &st, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    goto out;
  }
  if (st.finished) {
    printf("%s\n", st.final_path);
    rc = 0;
  } else if (c.stop_at && st.iteration >= c.stop_at) {
    rc = 0;
  } else {
    fprintf(stderr, "jem train: interrupted at iteration %d; resume with --resume\n", st.iteration);
    rc = 1;
  }

out:
  json_decref(prov);
  free(cls);
  free(cls_store);
  jem_model_free(m);
  jem_model_free(wm);
  jem_dataset_free(&all);
  jem_dataset_free(&train);
  jem_dataset_free(&valid);
  return rc;
}
