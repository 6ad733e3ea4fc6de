/* cmd_eval.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_eval(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem eval: not built yet\n");
  return 1;
}
