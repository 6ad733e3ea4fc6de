/* cmd_init.c - `jem init OUT ...`: write a randomly initialised model file (for tests and as a training start). */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void init_help(FILE *f) {
  fprintf(f,
          "usage: jem init OUT --classes N|--class-names a,b,c [--depth D] [--widen K]\n"
          "                [--in-channels C] [--image-size S] [--seed S] [--name NAME]\n\n"
          "Writes a model file OUT (safetensors) holding the JEM Wide-ResNet WRN-D-K with\n"
          "PyTorch's default random initialisation from SEED, and default metadata.\n\n"
          "  --depth D          6n+4 (default 10)\n"
          "  --widen K          widen factor (default 1)\n"
          "  --in-channels C    1 or 3 (default 1)\n"
          "  --image-size S     input side (default 32)\n"
          "  --classes N        number of classes, named \"0\"..\"N-1\"\n"
          "  --class-names L    comma-separated class names (sets the number of classes)\n"
          "  --seed S           initialisation seed (default 0)\n"
          "  --name NAME        model name (default: the file name without extension)\n"
          "  -h, --help         this text\n");
}

int cmd_init(int argc, char **argv) {
  static const struct option opts[] = {
    {"depth", required_argument, NULL, 'd'},
    {"widen", required_argument, NULL, 'w'},
    {"in-channels", required_argument, NULL, 'c'},
    {"image-size", required_argument, NULL, 'S'},
    {"classes", required_argument, NULL, 'k'},
    {"class-names", required_argument, NULL, 'K'},
    {"seed", required_argument, NULL, 's'},
    {"name", required_argument, NULL, 'n'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
  };
  jem_arch a;
  memset(&a, 0, sizeof a);
  a.depth = 10;
  a.widen = 1;
  a.in_channels = 1;
  a.image_size = 32;
  a.leak = 0.2f;
  int classes = 0, c;
  const char *names_arg = NULL, *name = NULL;
  uint64_t seed = 0;
  opterr = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'd': if (args_int("init", "--depth", optarg, 10, 1000, &a.depth)) return 2; break;
      case 'w': if (args_int("init", "--widen", optarg, 1, 64, &a.widen)) return 2; break;
      case 'c': if (args_int("init", "--in-channels", optarg, 1, 3, &a.in_channels)) return 2; break;
      case 'S': if (args_int("init", "--image-size", optarg, 1, 4096, &a.image_size)) return 2; break;
      case 'k': if (args_int("init", "--classes", optarg, 1, 100000, &classes)) return 2; break;
      case 'K': names_arg = optarg; break;
      case 's': if (args_u64("init", "--seed", optarg, &seed)) return 2; break;
      case 'n': name = optarg; break;
      case 'h': init_help(stdout); return 0;
      default: return args_bad_option("init", argc, argv);
    }
  }
  if (argc - optind != 1)
    return args_usage("init", "expects exactly one OUT file, got %d arguments", argc - optind);
  const char *out = argv[optind];
  json_t *names = NULL;
  if (names_arg) {
    int k = 0;
    const char *why = NULL;
    names = args_split_names(names_arg, &k, &why);
    if (!names) return args_usage("init", "--class-names has %s in '%s'", why, names_arg);
    if (classes && classes != k) {
      json_decref(names);
      return args_usage("init", "--classes %d disagrees with the %d --class-names", classes, k);
    }
    classes = k;
  }
  if (!classes) return args_usage("init", "needs --classes N or --class-names a,b,c");
  a.num_classes = classes;
  char err[512];
  if (jem_arch_validate(&a, err, sizeof err)) {
    json_decref(names);
    return args_usage("init", "%s", err);
  }

  jem_model *m = NULL;
  if (jem_model_create(&m, &a, err, sizeof err)) {
    json_decref(names);
    fprintf(stderr, "jem init: %s\n", err);
    return 1;
  }
  char nm[128];
  if (name) snprintf(nm, sizeof nm, "%s", name);
  else args_default_name(out, nm, sizeof nm);
  json_object_set_new(m->meta, "name", json_string(nm));
  if (names) json_object_set_new(m->meta, "classes", names);
  json_object_set_new(m->meta, "temperature", json_real(1.0));
  json_object_set_new(m->meta, "provenance",
                      json_pack("{s:s,s:s,s:I}", "tool", "jem init " JEM_VERSION, "init",
                                "random (PyTorch defaults)", "seed", (json_int_t)seed));
  int status = 1;
  if (jem_model_apply_meta(m, err, sizeof err)) {
    fprintf(stderr, "jem init: %s\n", err);
  } else {
    jem_model_init_random(m, seed);
    if (jem_model_save(m, out, err, sizeof err))
      fprintf(stderr, "jem init: %s\n", err);
    else
      status = 0;
  }
  jem_model_free(m);
  return status;
}
