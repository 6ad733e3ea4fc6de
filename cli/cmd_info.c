/* cmd_info.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_info(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem info: not built yet\n");
  return 1;
}
