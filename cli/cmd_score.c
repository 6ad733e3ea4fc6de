/* cmd_score.c - PLACEHOLDER until its owner lands the real command. */
#include "cli.h"

#include <stdio.h>

int cmd_score(int argc, char **argv) {
  (void)argc;
  (void)argv;
  fprintf(stderr, "jem score: not built yet\n");
  return 1;
}
