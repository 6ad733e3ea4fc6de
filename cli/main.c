/* main.c - the `jem` command-line tool: dispatch to subcommands. */
#include "cli.h"
#include "jem.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

typedef struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} command;

static const command commands[] = {
  {"info", cmd_info, "show a model's architecture, parameters, classes, metadata"},
  {"score", cmd_score, "classify and score images or .npy tensors (JSON lines)"},
  {"sample", cmd_sample, "generate samples with SGLD (PNG grid + JSON lines)"},
  {"init", cmd_init, "write a randomly initialised model file"},
  {"train", cmd_train, "train a JEM (or a cross-entropy baseline) on IDX data"},
  {"eval", cmd_eval, "evaluate accuracy, calibration, OOD detection, samples"},
  {"calibrate", cmd_calibrate, "fit temperature and OOD statistics into a model"},
  {"buffer", cmd_buffer, "replace a model's replay buffer with per-class Gaussian draws"},
  {"import", cmd_import, "convert a checkpoint of the official PyTorch JEM code"},
  {"average", cmd_average, "average the parameters of checkpoints (weight averaging)"},
};

static void usage(FILE *f) {
  fprintf(f, "usage: jem COMMAND [ARGS...]\n\ncommands:\n");
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf(f, "\n`jem COMMAND --help` describes each command.\n"
             "Exit status: 0 success, 1 bad input or failure, 2 usage error.\n");
}

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(argv[1], "--version")) {
    printf("jem %s\n", JEM_VERSION);
    return 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp(argv[1], commands[i].name)) {
      int status = commands[i].run(argc - 1, argv + 1);
      /* results printed but never written (disk full, closed pipe) are a failure */
      if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "jem %s: writing the output failed: %s\n", argv[1],
                errno ? strerror(errno) : "write error");
        if (status == 0) status = 1;
      }
      return status;
    }
  fprintf(stderr, "jem: unknown command '%s'\n", argv[1]);
  usage(stderr);
  return 2;
}
