/* cmd_init.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_init(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem init: not built yet\n");
  return 1;
}
