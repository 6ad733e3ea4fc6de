/* cmd_train.c - `jem train`: train a JEM (or a cross-entropy baseline) on IDX
 * data with checkpoints, exact resume and a divergence guard. */
#include "args.h"
#include "cli.h"
#include "jem.h"
#include "metrics.h"
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
"Outlier exposure (Liu et al. 2020's energy-bounded loss; also with --baseline):\n"
"  --outliers SETS        comma-separated OOD sets (as jem calibrate's --tune-sets): each\n"
"                         iteration adds a batch of them and W * (mean relu(E_in - IN)^2\n"
"                         over the labelled batch + mean relu(OUT - E_out)^2 over them)\n"
"  --outlier-dir DIR      where the sets are (default data/ood)\n"
"  --oe-weight W          (default 0.1)  --oe-margins IN,OUT (default -10,-3; put IN\n"
"                         near the data's median energy, as `jem score` prints it)\n"
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

/* What the command line asks for besides the trainer's own config. */
typedef struct train_opts {
  jem_train_config c;
  const char *data_dir, *timg, *tlab, *classes_arg, *warm, *name;
  const char *outlier_dir;
  int n_valid, limit, valid_limit, depth, widen;
  int depth_set, widen_set, threads;
  int seed_i;
} train_opts;

/* 0, -1 after --help, or 2 (reported). */
static int parse_opts(int argc, char **argv, train_opts *o) {
  memset(o, 0, sizeof *o);
  jem_train_config *c = &o->c;
  jem_train_defaults(c);
  o->n_valid = JEM_VALID_N;
  o->depth = 10;
  o->widen = 1;
  o->seed_i = 1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return -1; }
    /* flags without a value */
    if (!strcmp(a, "--baseline")) { c->baseline = 1; continue; }
    if (!strcmp(a, "--no-flip")) { c->flip = 0; continue; }
    if (!strcmp(a, "--resume")) { c->resume = 1; continue; }
    if (!strcmp(a, "--sgld-clamp")) { c->sgld_clamp = 1; continue; }
    if (strncmp(a, "--", 2)) {
      return args_usage("train", "unexpected argument '%s'", a);
    }
    if (i + 1 >= argc) {
      return args_usage("train", "unknown option, or option without its value: '%s'", a);
    }
    const char *v = argv[++i];
    int bad = 0;
    if (!strcmp(a, "--run-dir")) c->run_dir = v;
    else if (!strcmp(a, "--data")) o->data_dir = v;
    else if (!strcmp(a, "--train-images")) o->timg = v;
    else if (!strcmp(a, "--train-labels")) o->tlab = v;
    else if (!strcmp(a, "--classes")) o->classes_arg = v;
    else if (!strcmp(a, "--valid")) bad = parse_int(a, v, 0, INT_MAX, &o->n_valid);
    else if (!strcmp(a, "--limit")) bad = parse_int(a, v, 1, INT_MAX, &o->limit);
    else if (!strcmp(a, "--valid-limit")) bad = parse_int(a, v, 1, INT_MAX, &o->valid_limit);
    else if (!strcmp(a, "--depth")) { bad = parse_int(a, v, 10, 1000, &o->depth); o->depth_set = 1; }
    else if (!strcmp(a, "--widen")) { bad = parse_int(a, v, 1, 64, &o->widen); o->widen_set = 1; }
    else if (!strcmp(a, "--warm-start")) o->warm = v;
    else if (!strcmp(a, "--name")) o->name = v;
    else if (!strcmp(a, "--out")) c->out = v;
    else if (!strcmp(a, "--replay-keep")) bad = parse_int(a, v, 0, 1000000, &c->replay_keep);
    else if (!strcmp(a, "--px-weight")) bad = parse_float(a, v, &c->px_weight);
    else if (!strcmp(a, "--energy-l2")) bad = parse_float(a, v, &c->energy_l2);
    else if (!strcmp(a, "--sigma")) bad = parse_float(a, v, &c->sigma);
    else if (!strcmp(a, "--crop")) bad = parse_int(a, v, 0, 8, &c->crop_pad);
    else if (!strcmp(a, "--sgld-steps")) bad = parse_int(a, v, 1, 10000, &c->sgld_steps);
    else if (!strcmp(a, "--sgld-step-size")) bad = parse_float(a, v, &c->sgld_step);
    else if (!strcmp(a, "--sgld-noise")) bad = parse_float(a, v, &c->sgld_noise);
    else if (!strcmp(a, "--buffer-size")) bad = parse_int(a, v, 1, 1000000, &c->buffer_size);
    else if (!strcmp(a, "--reinit")) bad = parse_float(a, v, &c->reinit);
    else if (!strcmp(a, "--buffer-init")) {
      if (!strcmp(v, "uniform")) c->buffer_init = JEM_BUFFER_UNIFORM;
      else if (!strcmp(v, "data")) c->buffer_init = JEM_BUFFER_DATA;
      else if (!strcmp(v, "gaussian")) c->buffer_init = JEM_BUFFER_GAUSSIAN;
      else {
        bad = args_usage("train", "--buffer-init expects uniform, data or gaussian, not '%s'", v);
      }
    }
    else if (!strcmp(a, "--px-ramp")) bad = parse_int(a, v, 0, INT_MAX, &c->px_ramp);
    else if (!strcmp(a, "--outliers")) c->outlier_sets = v;
    else if (!strcmp(a, "--outlier-dir")) o->outlier_dir = v;
    else if (!strcmp(a, "--oe-weight")) bad = parse_float(a, v, &c->oe_weight);
    else if (!strcmp(a, "--oe-margins")) {
      char *end;
      errno = 0;
      c->oe_margin_in = strtof(v, &end);
      if (errno || end == v || *end != ',') bad = 1;
      else {
        const char *w = end + 1;
        c->oe_margin_out = strtof(w, &end);
        if (errno || end == w || *end) bad = 1;
      }
      if (bad) bad = args_usage("train", "--oe-margins expects IN,OUT (two numbers), not '%s'", v);
    }
    else if (!strcmp(a, "--iterations")) bad = parse_int(a, v, 1, INT_MAX, &c->iterations);
    else if (!strcmp(a, "--batch")) bad = parse_int(a, v, 1, 4096, &c->batch);
    else if (!strcmp(a, "--lr")) bad = parse_float(a, v, &c->lr);
    else if (!strcmp(a, "--warmup")) bad = parse_int(a, v, 0, INT_MAX, &c->warmup);
    else if (!strcmp(a, "--schedule")) {
      if (!strcmp(v, "cosine")) c->schedule = JEM_LR_COSINE;
      else if (!strcmp(v, "step")) c->schedule = JEM_LR_STEP;
      else if (!strcmp(v, "const")) c->schedule = JEM_LR_CONST;
      else {
        bad = args_usage("train", "--schedule expects cosine, step or const, not '%s'", v);
      }
    }
    else if (!strcmp(a, "--decay-rate")) bad = parse_float(a, v, &c->decay_rate);
    else if (!strcmp(a, "--seed")) bad = parse_int(a, v, 0, INT_MAX, &o->seed_i);
    else if (!strcmp(a, "--threads")) bad = parse_int(a, v, 1, 256, &o->threads);
    else if (!strcmp(a, "--ckpt-every")) bad = parse_int(a, v, 1, INT_MAX, &c->ckpt_every);
    else if (!strcmp(a, "--log-every")) bad = parse_int(a, v, 1, INT_MAX, &c->log_every);
    else if (!strcmp(a, "--eval-every")) bad = parse_int(a, v, 0, INT_MAX, &c->eval_every);
    else if (!strcmp(a, "--stop-at")) bad = parse_int(a, v, 1, INT_MAX, &c->stop_at);
    else if (!strcmp(a, "--max-rollbacks")) bad = parse_int(a, v, 0, 100, &c->max_rollbacks);
    else {
      return args_usage("train", "unknown option, or option without its value: '%s'", a);
    }
    if (bad) return 2;
  }
  if ((o->depth - 4) % 6 != 0)
    return args_usage("train", "--depth %d is not of the form 6n+4 (10, 16, 22, ...)", o->depth);
  c->seed = (uint64_t)o->seed_i;
  if (!c->run_dir) {
    return args_usage("train", "--run-dir DIR is required");
  }
  if ((o->timg != NULL) != (o->tlab != NULL)) {
    return args_usage("train", "--train-images and --train-labels go together");
  }
  if (o->timg && o->data_dir) {
    return args_usage("train", "give either --data or --train-images/--train-labels");
  }
  if (c->baseline) c->replay_keep = 0;
  if (o->outlier_dir && !c->outlier_sets)
    return args_usage("train", "--outlier-dir needs --outliers");
  char err[512];
  if (jem_train_config_check(c, err, sizeof err)) {
    return args_usage("train", "%s", err);
  }
  return 0;
}

/* The training data and what it is: the files read (for the provenance),
 * and whether they are Fashion-MNIST or CIFAR-10 (for the class names). */
typedef struct train_data {
  jem_dataset train, valid;
  const char *timg, *tlab;
  char ip[1024], lp[1024];
  int fmnist, cifar;
} train_data;

/* Loads and splits the data (--valid, --limit, --valid-limit).  0 or 1
 * (reported). */
static int load_data(const train_opts *o, train_data *td) {
  char err[512];
  const char *d = NULL;
  td->timg = o->timg;
  td->tlab = o->tlab;
  td->fmnist = !o->timg;
  if (td->fmnist) {
    d = o->data_dir ? o->data_dir : getenv("JEM_FMNIST_DIR");
    if (!d || !*d) d = JEM_FMNIST_DIR_DEFAULT;
    td->cifar = jem_cifar10_dir(d);
    snprintf(td->ip, sizeof td->ip,
             td->cifar ? "%s/data_batch_N.bin" : "%s/train-images-idx3-ubyte.gz", d);
    snprintf(td->lp, sizeof td->lp,
             td->cifar ? "%s/data_batch_N.bin" : "%s/train-labels-idx1-ubyte.gz", d);
    td->timg = td->ip;
    td->tlab = td->lp;
  }
  jem_dataset all;
  if (td->cifar ? jem_fmnist_load(d, JEM_SPLIT_TRAIN_ALL, &all, err, sizeof err)
                : jem_dataset_load(&all, td->timg, td->tlab, 32, 0, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    return 1;
  }
  if (o->n_valid > 0) {
    if (o->n_valid >= all.n) {
      fprintf(stderr, "jem train: --valid %d leaves no training images (%d in all)\n",
              o->n_valid, all.n);
      jem_dataset_free(&all);
      return 1;
    }
    int bad = jem_dataset_split(&all, o->n_valid, JEM_VALID_SEED, &td->train, &td->valid, err,
                                sizeof err);
    jem_dataset_free(&all);
    if (bad) {
      fprintf(stderr, "jem train: %s\n", err);
      return 1;
    }
  } else {
    td->train = all;
  }
  jem_dataset *train = &td->train, *valid = &td->valid;
  if (o->limit && o->limit < train->n) train->n = o->limit; /* first N; buffers stay as allocated */
  if (o->valid_limit && o->valid_limit < valid->n) valid->n = o->valid_limit;
  return 0;
}

/* The number of classes: --classes (split into *cls), else Fashion-MNIST's
 * ten or the labels'.  -1 (reported) when unusable. */
static int class_count(const train_opts *o, const train_data *td, char ***cls,
                       char **cls_store) {
  int k = td->fmnist ? 10 : td->train.num_classes;
  if (o->classes_arg) {
    int nk = split_classes(o->classes_arg, cls, cls_store);
    if (nk < 0) {
      fprintf(stderr, "jem train: --classes has an empty name\n");
      return -1;
    }
    if (nk < td->train.num_classes) {
      fprintf(stderr, "jem train: --classes names %d classes but the labels go up to %d\n", nk,
              td->train.num_classes - 1);
      return -1;
    }
    k = nk;
  }
  if (k < 2) {
    fprintf(stderr, "jem train: the labels name only %d class\n", k);
    return -1;
  }
  return k;
}

/* The model to train: WRN-depth-widen with random weights, or a copy of
 * the --warm-start model (*wm, kept for its provenance).  0 or 1 (reported). */
static int make_model(const train_opts *o, const jem_dataset *train, int k, jem_model **m,
                      jem_model **wm) {
  char err[512];
  jem_arch arch = {o->depth, o->widen, train->c, 32, k, 0.2f, JEM_NORM_NONE};
  if (o->warm) {
    if (jem_model_load(wm, o->warm, err, sizeof err)) {
      fprintf(stderr, "jem train: --warm-start: %s\n", err);
      return 1;
    }
    const jem_arch *wa = &(*wm)->arch;
    if ((o->depth_set && wa->depth != o->depth) || (o->widen_set && wa->widen != o->widen)) {
      fprintf(stderr, "jem train: --warm-start model is WRN-%d-%d, not WRN-%d-%d\n",
              wa->depth, wa->widen, o->depth, o->widen);
      return 1;
    }
    arch = *wa;
    if (arch.in_channels != train->c || arch.num_classes != k || arch.image_size != 32) {
      fprintf(stderr, "jem train: --warm-start model takes %d channels and %d classes; "
              "the data has %d channels and %d classes\n", arch.in_channels, arch.num_classes,
              train->c, k);
      return 1;
    }
  }
  if (jem_model_create(m, &arch, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    return 1;
  }
  if (*wm) memcpy((*m)->weights, (*wm)->weights, (*m)->n_weights * sizeof(float));
  else jem_model_init_random(*m, o->c.seed);
  return 0;
}

/* Where the model comes from: the command, seed, commit, start time, BLAS,
 * data and the warm start's own provenance.  The trainer adds its config
 * and progress (core/train_ckpt.c). */
static json_t *provenance_json(int argc, char **argv, const train_opts *o,
                               const train_data *td, const jem_model *wm) {
  json_t *prov = json_object();
  /* --stop-at only splits a run into segments: leave it out. */
  char *cmd = args_command_line(argc, argv, "--stop-at");
  if (cmd) json_object_set_new(prov, "command", json_string(cmd));
  free(cmd);
  json_object_set_new(prov, "seed", json_integer(o->seed_i));
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
                      json_pack("{s:s,s:s,s:i,s:i,s:i}", "images", td->timg, "labels", td->tlab,
                                "train_images", td->train.n, "valid_images", td->valid.n,
                                "valid_seed", (int)JEM_VALID_SEED));
  if (wm) {
    json_t *w = json_pack("{s:s}", "path", o->warm);
    json_t *wp = json_object_get(wm->meta, "provenance");
    if (wp) json_object_set(w, "provenance", wp);
    json_object_set_new(prov, "warm_start", w);
  }
  return prov;
}

/* The model's metadata: name, class names, preprocessing, temperature 1
 * and the provenance.  0 or 1 (reported). */
static int set_meta(jem_model *m, const train_opts *o, const train_data *td, int k,
                    char **cls, json_t *prov) {
  const jem_dataset *train = &td->train;
  json_t *jc = json_array();
  for (int i = 0; i < k; i++) {
    char num[16];
    snprintf(num, sizeof num, "%d", i);
    const char *nm = cls ? cls[i] : td->cifar ? jem_cifar10_classes[i]
                                  : td->fmnist ? jem_fmnist_classes[i] : num;
    json_array_append_new(jc, json_string(nm));
  }
  const char *name = o->name ? o->name : td->cifar ? "cifar10-jem"
                                       : td->fmnist ? "fmnist-jem" : "model";
  json_object_set_new(m->meta, "name", json_string(name));
  json_object_set_new(m->meta, "classes", jc);
  json_object_set_new(m->meta, "preprocess",
                      json_pack("{s:i,s:[i,i],s:i,s:f,s:f,s:[f,f],s:b}", "channels", train->c,
                                "resize", train->src_s, train->src_s, "pad",
                                (32 - train->src_s) / 2, "pad_value", 0.0, "background", 0.0,
                                "range", -1.0, 1.0, "invert", 0));
  json_object_set_new(m->meta, "temperature", json_real(1.0));
  json_object_set(m->meta, "provenance", prov);
  char err[512];
  if (jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem train: metadata: %s\n", err);
    return 1;
  }
  return 0;
}

/* The --outliers sets, decoded for m and joined into one dataset.  0 or 1
 * (reported). */
static int load_outliers(const train_opts *o, const jem_model *m, jem_dataset *out) {
  const char *dir = o->outlier_dir ? o->outlier_dir : "data/ood";
  jem_dataset parts[JEM_OOD_NSETS];
  int n = 0, rc = 1;
  char err[512];
  char *list = strdup(o->c.outlier_sets), *save = NULL;
  if (!list) { fprintf(stderr, "jem train: out of memory\n"); return 1; }
  for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    if (n == JEM_OOD_NSETS) {
      fprintf(stderr, "jem train: --outliers: more than %d sets\n", JEM_OOD_NSETS);
      goto done;
    }
    if (jem_ood_set_load(dir, tok, m, 0, &parts[n], err, sizeof err)) {
      fprintf(stderr, "jem train: --outliers %s: %s%s\n", tok, err,
              strstr(err, "missing") ? " (make ood-sets builds them)" : "");
      goto done;
    }
    n++;
  }
  if (jem_dataset_concat(parts, n, out, err, sizeof err)) {
    fprintf(stderr, "jem train: --outliers: %s\n", err);
    goto done;
  }
  fprintf(stderr, "outlier exposure: %d images from %s\n", out->n, o->c.outlier_sets);
  rc = 0;
done:
  for (int i = 0; i < n; i++) jem_dataset_free(&parts[i]);
  free(list);
  return rc;
}

int cmd_train(int argc, char **argv) {
  train_opts o;
  int rc = parse_opts(argc, argv, &o);
  if (rc) return rc < 0 ? 0 : rc;
  if (o.threads > 0) jem_blas_set_threads(o.threads);
  jem_train_config *c = &o.c;

  train_data td;
  memset(&td, 0, sizeof td);
  if (load_data(&o, &td)) return 1;
  rc = 1;
  jem_model *m = NULL, *wm = NULL;
  char **cls = NULL, *cls_store = NULL;
  json_t *prov = NULL;
  jem_dataset outliers;
  memset(&outliers, 0, sizeof outliers);
  char err[512];
  int k = class_count(&o, &td, &cls, &cls_store);
  if (k < 0 || make_model(&o, &td.train, k, &m, &wm)) goto out;
  prov = provenance_json(argc, argv, &o, &td, wm);
  if (set_meta(m, &o, &td, k, cls, prov)) goto out;
  if (c->outlier_sets) {
    if (load_outliers(&o, m, &outliers)) goto out;
    c->outliers = &outliers;
  }

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  c->stop = &stop_flag;
  c->progress = stderr;
  jem_train_status st;
  if (jem_train_run(m, &td.train, td.valid.n ? &td.valid : NULL, c, &st, err, sizeof err)) {
    fprintf(stderr, "jem train: %s\n", err);
    goto out;
  }
  if (st.finished) {
    printf("%s\n", st.final_path);
    rc = 0;
  } else if (c->stop_at && st.iteration >= c->stop_at) {
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
  jem_dataset_free(&td.train);
  jem_dataset_free(&td.valid);
  jem_dataset_free(&outliers);
  return rc;
}
