/* cmd_sample.c - `jem sample MODEL --n N --steps K ...`: SGLD samples as a PNG grid (+ .npy) and JSON lines. */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void sample_help(FILE *f) {
  fprintf(f,
          "usage: jem sample MODEL [--n N] [--steps K] [--class C] [--seed S] [--step-size A]\n"
          "                  [--noise S] [--init noise|buffer] [--clamp|--no-clamp]\n"
          "                  [--out grid.png] [--npy out.npy] [--batch B] [--threads N]\n\n"
          "Runs N SGLD chains for K steps, x <- x + A * d f~(x)/dx + S * N(0,1), with\n"
          "f~ = logsumexp f (unconditional) or f[C] (class-conditional), and prints one JSON\n"
          "object per sample: {index, energy, label, class, confidence}.  Chain i draws\n"
          "from its own random stream (seed, i), so the same seed gives the same samples\n"
          "(byte-identical PNG) here and in a jemd job with that seed.  --steps,\n"
          "--step-size, --noise and clamping default to the model's sampler settings\n"
          "(chosen by `jem calibrate`, shown by `jem info`), else to 100, 1.0, 0.01, on.\n\n"
          "  --n N           number of chains (1..4096, default 16)\n"
          "  --steps K       SGLD steps (0..100000)\n"
          "  --class C       class index or name (default: unconditional)\n"
          "  --seed S        random seed, 0 to 2^63-1 (default: random, printed on stderr)\n"
          "  --step-size A   step size of the gradient term\n"
          "  --noise S       standard deviation of the noise term\n"
          "  --init I        noise (uniform in [-1,1]) or buffer (the model's replay buffer;\n"
          "                  the default when it has one, else noise; with --class, an\n"
          "                  image the model classifies as C when the buffer has one;\n"
          "                  each chain starts from noise with probability 0.05)\n"
          "  --clamp         clamp to [-1,1] after every step\n"
          "  --no-clamp      do not clamp (as JEM's own training does)\n"
          "  --out FILE      write the samples as a PNG grid (ceil(sqrt(N)) columns)\n"
          "  --npy FILE      write the samples as a float32 [N,C,H,W] .npy array\n"
          "  --batch B       chains per forward/backward batch (default min(N, 64))\n"
          "  --threads N     BLAS threads\n"
          "  (the samples are the same bytes whatever --batch and --threads, and the\n"
          "  same as a jemd job's with the same parameters and seed)\n"
          "  -h, --help      this text\n");
}

static int write_all(const char *path, const unsigned char *buf, size_t len, char *err,
                     size_t errlen) {
  FILE *f = fopen(path, "wb");
  if (!f) {
    snprintf(err, errlen, "cannot create '%s': %s", path, strerror(errno));
    return 1;
  }
  size_t w = fwrite(buf, 1, len, f);
  int bad = w != len;
  if (fclose(f) != 0) bad = 1;
  if (bad) {
    snprintf(err, errlen, "cannot write '%s': %s", path, strerror(errno));
    return 1;
  }
  return 0;
}

/* Fails before the sampling, not after it, when `path` cannot be written;
 * leaves no file behind that was not there. */
static int check_writable(const char *path, char *err, size_t errlen) {
  int created = 1;
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0 && errno == EEXIST) {
    created = 0;
    fd = open(path, O_WRONLY | O_CLOEXEC);
  }
  if (fd < 0) {
    snprintf(err, errlen, "cannot write '%s': %s", path, strerror(errno));
    return 1;
  }
  close(fd);
  if (created) unlink(path);
  return 0;
}

static uint64_t random_seed(void) {
  uint64_t s = 0;
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
    close(fd);
  }
  if (!s) s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
  return s >> 11; /* below 2^53, so JSON clients keep it exact */
}

/* A class given as an index or as a name. */
static int parse_class(const jem_model *m, const char *s, int *y) {
  for (int i = 0; i < m->arch.num_classes; i++)
    if (!strcmp(m->classes[i], s)) {
      *y = i;
      return 0;
    }
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (*s && !*end && !errno && v >= 0 && v < m->arch.num_classes) {
    *y = (int)v;
    return 0;
  }
  return 1;
}

typedef struct sample_opts {
  const char *model;
  int n, steps, batch, threads, init, have_seed, clamp; /* steps, init, clamp < 0: the model's */
  float step_size, noise;                               /* < 0: the model's */
  const char *class_arg, *out_png, *out_npy;
  uint64_t seed;
} sample_opts;

/* 0, or the exit status (-1: --help shown, exit 0). */
static int parse_opts(int argc, char **argv, sample_opts *o) {
  static const struct option opts[] = {
    {"n", required_argument, NULL, 'n'},
    {"steps", required_argument, NULL, 'k'},
    {"class", required_argument, NULL, 'c'},
    {"seed", required_argument, NULL, 's'},
    {"step-size", required_argument, NULL, 'a'},
    {"noise", required_argument, NULL, 'z'},
    {"init", required_argument, NULL, 'i'},
    {"clamp", no_argument, NULL, 'C'},
    {"no-clamp", no_argument, NULL, 'N'},
    {"out", required_argument, NULL, 'o'},
    {"npy", required_argument, NULL, 'y'},
    {"batch", required_argument, NULL, 'b'},
    {"threads", required_argument, NULL, 'T'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
  };
  *o = (sample_opts){.n = 16, .steps = -1, .init = -1, .clamp = -1, .step_size = -1.0f,
                     .noise = -1.0f};
  int c;
  opterr = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'n': if (args_int("sample", "--n", optarg, 1, 4096, &o->n)) return 2; break;
      case 'k': if (args_int("sample", "--steps", optarg, 0, 100000, &o->steps)) return 2; break;
      case 'c': o->class_arg = optarg; break;
      case 's':
        if (args_u64("sample", "--seed", optarg, &o->seed)) return 2;
        if (o->seed > (uint64_t)INT64_MAX) /* a JSON integer, as jobs take it, is signed 64-bit */
          return args_usage("sample", "--seed expects an integer from 0 to 2^63-1, not '%s'",
                            optarg);
        o->have_seed = 1;
        break;
      case 'a':
        if (args_float("sample", "--step-size", optarg, 0, 1e6, &o->step_size)) return 2;
        break;
      case 'z': if (args_float("sample", "--noise", optarg, 0, 1e3, &o->noise)) return 2; break;
      case 'i':
        if (!strcmp(optarg, "noise")) o->init = JEM_SAMPLE_INIT_NOISE;
        else if (!strcmp(optarg, "buffer")) o->init = JEM_SAMPLE_INIT_BUFFER;
        else return args_usage("sample", "--init expects 'noise' or 'buffer', not '%s'", optarg);
        break;
      case 'C': o->clamp = 1; break;
      case 'N': o->clamp = 0; break;
      case 'o': o->out_png = optarg; break;
      case 'y': o->out_npy = optarg; break;
      case 'b': if (args_int("sample", "--batch", optarg, 1, 4096, &o->batch)) return 2; break;
      case 'T': if (args_int("sample", "--threads", optarg, 1, 1024, &o->threads)) return 2; break;
      case 'h': sample_help(stdout); return -1;
      default: return args_bad_option("sample", argc, argv);
    }
  }
  if (argc - optind != 1)
    return args_usage("sample", "expects exactly one MODEL file, got %d arguments", argc - optind);
  o->model = argv[optind];
  return 0;
}

/* The n samples x as --out's PNG grid and --npy's array. */
static int write_outputs(const sample_opts *o, const jem_model *m, const float *x, int n) {
  const int C = m->arch.in_channels, S = m->arch.image_size;
  char err[512];
  size_t len;
  int rc = 1;
  unsigned char *png = NULL, *npy = NULL;
  if (o->out_png) {
    int cols = (int)ceil(sqrt((double)n));
    png = jem_png_grid(x, n, C, S, cols, m->pre.range_lo, m->pre.range_hi, &len);
    if (!png) {
      fprintf(stderr, "jem sample: could not encode the PNG grid\n");
      goto done;
    }
    if (write_all(o->out_png, png, len, err, sizeof err)) {
      fprintf(stderr, "jem sample: %s\n", err);
      goto done;
    }
  }
  if (o->out_npy) {
    int shape[4] = {n, C, S, S};
    npy = jem_npy_encode(x, 4, shape, &len);
    if (!npy || write_all(o->out_npy, npy, len, err, sizeof err)) {
      fprintf(stderr, "jem sample: %s\n", npy ? err : "could not encode the .npy array");
      goto done;
    }
  }
  rc = 0;
done:
  free(png);
  free(npy);
  return rc;
}

/* One JSON line per sample: {index, energy, label, class, confidence}. */
static int print_samples(const jem_model *m, const float *energy, const int *label,
                         const float *conf, int n) {
  int status = 0;
  for (int i = 0; i < n; i++) {
    json_t *o = json_object();
    json_object_set_new(o, "index", json_integer(i));
    json_object_set_new(o, "energy", isfinite(energy[i]) ? json_real(args_f2d(energy[i])) : json_null());
    json_object_set_new(o, "label", json_integer(label[i]));
    json_object_set_new(o, "class", json_string(m->classes[label[i]]));
    json_object_set_new(o, "confidence", isfinite(conf[i]) ? json_real(args_f2d(conf[i])) : json_null());
    char *line = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(o);
    if (!line) {
      status = 1;
      continue;
    }
    puts(line);
    free(line);
  }
  return status;
}

int cmd_sample(int argc, char **argv) {
  sample_opts o;
  int rc = parse_opts(argc, argv, &o);
  if (rc) return rc < 0 ? 0 : rc;
  if (o.threads) jem_blas_set_threads(o.threads);

  char err[512];
  const char *outs[2] = {o.out_png, o.out_npy};
  for (int i = 0; i < 2; i++)
    if (outs[i] && check_writable(outs[i], err, sizeof err)) {
      fprintf(stderr, "jem sample: %s\n", err);
      return 1;
    }
  jem_model *m = NULL;
  if (jem_model_load(&m, o.model, err, sizeof err)) {
    fprintf(stderr, "jem sample: %s\n", err);
    return 1;
  }
  /* the model's sampler settings (jem calibrate's, else the defaults) fill in
   * what the command line leaves out */
  jem_sgld_params p = m->sampler.sgld;
  const int n = o.n, steps = o.steps < 0 ? m->sampler.steps : o.steps;
  if (o.step_size >= 0.0f) p.step_size = o.step_size;
  if (o.noise >= 0.0f) p.noise = o.noise;
  if (o.clamp >= 0) p.clamp = o.clamp;
  int status = 1, y = -1, init = o.init;
  int *ys = NULL;
  float *x = NULL, *logits = NULL, *energy = NULL, *conf = NULL;
  int *label = NULL;
  jem_rng *rngs = NULL;
  jem_ws *ws = NULL;
  if (o.class_arg && parse_class(m, o.class_arg, &y)) {
    status = args_usage("sample", "--class '%s' is neither a class name of this model nor an "
                        "index from 0 to %d", o.class_arg, m->arch.num_classes - 1);
    goto done;
  }
  if (init < 0) init = jem_sample_default_init(m);
  if (init == JEM_SAMPLE_INIT_BUFFER && !(m->replay && m->replay_n > 0)) {
    fprintf(stderr, "jem sample: --init buffer: the model has no replay buffer; use --init noise\n");
    goto done;
  }
  const int batch = o.batch ? o.batch : n < 64 ? n : 64;
  const int K = m->arch.num_classes;
  const size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  x = malloc((size_t)n * chw * sizeof(float));
  rngs = malloc((size_t)n * sizeof(jem_rng));
  logits = malloc((size_t)n * K * sizeof(float));
  energy = malloc((size_t)n * sizeof(float));
  conf = malloc((size_t)n * sizeof(float));
  label = malloc((size_t)n * sizeof(int));
  ys = y >= 0 ? malloc((size_t)n * sizeof(int)) : NULL;
  ws = jem_ws_create(m, batch, JEM_WS_FIXED_WEIGHTS);
  if (!x || !rngs || !logits || !energy || !conf || !label || (y >= 0 && !ys) || !ws) {
    fprintf(stderr, "jem sample: out of memory for %d chains\n", n);
    goto done;
  }
  if (ys)
    for (int i = 0; i < n; i++) ys[i] = y;
  uint64_t seed = o.seed;
  /* the same bytes whatever --batch and --threads, and as jemd's jobs */
  jem_ws_set_batch_invariant(ws, 1);
  if (!o.have_seed) {
    seed = random_seed();
    fprintf(stderr, "jem sample: seed %llu\n", (unsigned long long)seed);
  }

  /* class-conditional chains start from buffer images of their class */
  if (ys && init == JEM_SAMPLE_INIT_BUFFER && jem_replay_label(m, ws)) {
    fprintf(stderr, "jem sample: out of memory labelling the replay buffer\n");
    goto done;
  }
  jem_sample_init(m, x, n, init, ys, seed, rngs);
  jem_sgld_run(ws, m, x, n, ys, steps, &p, rngs);

  jem_scores sc;
  memset(&sc, 0, sizeof sc);
  sc.logits = logits;
  sc.score[JEM_SCORE_ENERGY] = energy;
  sc.label = label;
  sc.confidence = conf;
  jem_score_batch(ws, m, x, n, 0, &sc);
  if (!write_outputs(&o, m, x, n)) status = print_samples(m, energy, label, conf, n);

done:
  free(x);
  free(rngs);
  free(logits);
  free(energy);
  free(conf);
  free(label);
  free(ys);
  jem_ws_free(ws);
  jem_model_free(m);
  return status;
}
