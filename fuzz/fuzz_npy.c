/* fuzz_npy.c - libFuzzer harness: the NumPy .npy reader (header dictionary, sizes, dtypes). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "jem.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  float *x = NULL;
  int nd = 0, shape[4];
  char err[256];
  int rc = jem_npy_read_mem(data, size, &x, &nd, shape, err, sizeof err);
  if (rc == 0) {
    if (!x || nd < 1 || nd > 4) __builtin_trap();
    size_t n = 1;
    for (int i = 0; i < nd; i++) n *= (size_t)shape[i];
    volatile float sink = 0;
    for (size_t i = 0; i < n; i++) sink += x[i]; /* every element must be readable */
    (void)sink;
    /* what was read encodes and reads back */
    size_t len;
    unsigned char *e = jem_npy_encode(x, nd, shape, &len);
    if (!e) __builtin_trap();
    float *y = NULL;
    int nd2, s2[4];
    if (jem_npy_read_mem(e, len, &y, &nd2, s2, err, sizeof err) || nd2 != nd) __builtin_trap();
    free(y);
    free(e);
  } else if (x) {
    __builtin_trap(); /* failure leaves no allocation behind */
  }
  free(x);
  return 0;
}
