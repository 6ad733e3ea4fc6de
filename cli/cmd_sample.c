/* cmd_sample.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_sample(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem sample: not built yet\n");
  return 1;
}
