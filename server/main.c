/* main.c - PLACEHOLDER until the daemon lands. */
#include "jem.h"

#include <stdio.h>

int main(int argc, char **argv) {
  jem_blas_setup(argc, argv);
  fprintf(stderr, "jemd: not built yet\n");
  return 1;
}
