/* cmd_buffer.c - `jem buffer MODEL`: replaces a model's replay buffer (the
 * starting images of sampling jobs) with draws of per-class Gaussians. */
#include "args.h"
#include "cli.h"
#include "jem.h"
#include "train.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUFFER 65536

static void buffer_help(FILE *f) {
  fprintf(f,
    "usage: jem buffer MODEL [--size N] [--seed S] [--data DIR |\n"
    "                  --train-images FILE --train-labels FILE] [--out PATH]\n"
    "\n"
    "Replaces MODEL's replay buffer, the starting images of jemd's sampling jobs and\n"
    "of `jem sample --init buffer`, with N draws of per-class Gaussians (mean and\n"
    "full covariance of each class's training images, plus a 1e-3 ridge; JEM++'s\n"
    "informative initialisation), N/K per class, clamped to [-1,1].  A\n"
    "class-conditional chain starts from a buffer image the model classifies as its\n"
    "class, so each chain starts near its class.  Weights and metadata are kept;\n"
    "provenance.replay_buffer records how the buffer was made.\n"
    "\n"
    "  --size N              buffer images, 0..%d (default 500; 0 removes the buffer)\n"
    "  --seed S              random seed (default 1)\n"
    "  --data DIR            Fashion-MNIST IDX files (default $JEM_FMNIST_DIR or\n"
    "                        " JEM_FMNIST_DIR_DEFAULT "): the 55k training\n"
    "                        split, without the validation images\n"
    "  --train-images FILE   other IDX images (with --train-labels FILE), all used\n"
    "  --out PATH            write here instead of overwriting MODEL\n"
    "  --threads N           OpenBLAS threads (the covariance products)\n"
    "  -h, --help            this text\n", MAX_BUFFER);
}

/* Records the buffer's making in provenance.replay_buffer (replacing any). */
static int note_provenance(jem_model *m, int size, uint64_t seed, const char *source) {
  json_t *prov = json_object_get(m->meta, "provenance");
  if (!json_is_object(prov)) {
    prov = json_object();
    if (!prov || json_object_set_new(m->meta, "provenance", prov)) return -1;
  }
  json_t *b = size > 0 ? json_pack("{s:s, s:i, s:I, s:s}", "init", "gaussian", "size", size,
                                   "seed", (json_int_t)seed, "data", source)
                       : json_pack("{s:s}", "init", "none");
  return b ? json_object_set_new(prov, "replay_buffer", b) : -1;
}

int cmd_buffer(int argc, char **argv) {
  static const struct option opts[] = {
    {"size", required_argument, 0, 'n'},   {"seed", required_argument, 0, 's'},
    {"data", required_argument, 0, 'd'},   {"train-images", required_argument, 0, 'i'},
    {"train-labels", required_argument, 0, 'l'}, {"out", required_argument, 0, 'o'},
    {"threads", required_argument, 0, 'T'}, {"help", no_argument, 0, 'h'},
    {0, 0, 0, 0}};
  int size = 500, threads = 0;
  uint64_t seed = 1;
  const char *data_dir = NULL, *timg = NULL, *tlab = NULL, *out = NULL;
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'n': if (args_int("buffer", "--size", optarg, 0, MAX_BUFFER, &size)) return 2; break;
      case 's': if (args_u64("buffer", "--seed", optarg, &seed)) return 2; break;
      case 'd': data_dir = optarg; break;
      case 'i': timg = optarg; break;
      case 'l': tlab = optarg; break;
      case 'o': out = optarg; break;
      case 'T': if (args_int("buffer", "--threads", optarg, 1, 1024, &threads)) return 2; break;
      case 'h': buffer_help(stdout); return 0;
      default: return args_bad_option("buffer", argc, argv);
    }
  }
  if (argc - optind != 1)
    return args_usage("buffer", "expects exactly one MODEL file, got %d arguments", argc - optind);
  if (!timg != !tlab) return args_usage("buffer", "--train-images and --train-labels go together");
  if (timg && data_dir) return args_usage("buffer", "give either --data or --train-images/--train-labels");
  const char *model = argv[optind];
  if (!out) out = model;
  if (threads) jem_blas_set_threads(threads);

  jem_model *m = NULL;
  jem_dataset ds = {0};
  jem_class_gauss g = {0};
  float *buf = NULL;
  char err[512];
  int status = 1;
  if (jem_model_load(&m, model, err, sizeof err)) {
    fprintf(stderr, "jem buffer: %s\n", err);
    return 1;
  }
  const int K = m->arch.num_classes;
  const size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  char source[1024];
  if (size > 0) {
    int bad = timg ? jem_dataset_load(&ds, timg, tlab, m->arch.image_size, 0, err, sizeof err)
                   : jem_fmnist_load(data_dir, JEM_SPLIT_TRAIN, &ds, err, sizeof err);
    if (bad) {
      fprintf(stderr, "jem buffer: %s\n", err);
      goto done;
    }
    snprintf(source, sizeof source, "%s", timg ? timg : data_dir ? data_dir : "fashion-mnist");
    if (ds.c != m->arch.in_channels || ds.s != m->arch.image_size || ds.num_classes != K) {
      fprintf(stderr, "jem buffer: the training images are [%d,%d,%d] in %d classes; the model "
              "takes [%d,%d,%d] in %d classes\n", ds.c, ds.s, ds.s, ds.num_classes,
              m->arch.in_channels, m->arch.image_size, m->arch.image_size, K);
      goto done;
    }
    if (jem_class_gauss_fit(&g, &ds, err, sizeof err)) {
      fprintf(stderr, "jem buffer: class Gaussians: %s\n", err);
      goto done;
    }
    if (!(buf = malloc(sizeof(float) * (size_t)size * chw))) {
      fprintf(stderr, "jem buffer: out of memory for %d images\n", size);
      goto done;
    }
    /* image i is class i % K, from its own stream (seed, i) */
    for (int i = 0; i < size; i++) {
      jem_rng r;
      jem_rng_seed(&r, seed, (uint64_t)i);
      jem_class_gauss_sample(&g, i % K, buf + (size_t)i * chw, &r);
    }
  }
  free(m->replay);
  m->replay = buf;
  m->replay_n = size;
  buf = NULL;
  if (note_provenance(m, size, seed, size > 0 ? source : "")) {
    fprintf(stderr, "jem buffer: out of memory for the metadata\n");
    goto done;
  }
  if (jem_model_save(m, out, err, sizeof err)) {
    fprintf(stderr, "jem buffer: %s\n", err);
    goto done;
  }
  if (size > 0)
    fprintf(stderr, "jem buffer: wrote %s with %d per-class Gaussian draws (%d classes)\n", out,
            size, K);
  else
    fprintf(stderr, "jem buffer: wrote %s without a replay buffer\n", out);
  status = 0;
done:
  free(buf);
  jem_class_gauss_free(&g);
  jem_dataset_free(&ds);
  jem_model_free(m);
  return status;
}
