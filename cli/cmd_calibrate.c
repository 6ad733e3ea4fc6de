/* cmd_calibrate.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_calibrate(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem calibrate: not built yet\n");
  return 1;
}
