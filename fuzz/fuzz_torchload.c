/* fuzz_torchload.c - libFuzzer harness: the torch.save reader (zip and legacy
 * formats, the restricted unpickler, storages, views and strides).
 * Seeds: fuzz/gen_torchload_seeds.py writes fuzz/corpus/torchload/. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jem.h"
#include "torchload.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  unsigned char *file = malloc(size ? size : 1); /* exact size: ASan sees any overread */
  if (!file) return 0;
  if (size) memcpy(file, data, size);
  jem_tl_file *f = (jem_tl_file *)file; /* must be overwritten */
  char err[512];
  int rc = jem_torch_load_mem(&f, file, size, err, sizeof err);
  if (rc > 0) __builtin_trap();
  if (rc == 0) {
    if (!f || f->n < 0 || (f->n && !f->t)) __builtin_trap();
    for (int i = 0; i < f->n; i++) {
      const jem_tl_tensor *t = &f->t[i];
      size_t n = 1;
      for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
      if (!t->name || !t->data || !t->dtype || n != t->numel) __builtin_trap();
      if (jem_torch_find(f, t->name) == NULL) __builtin_trap();
      volatile float sink = 0;
      for (size_t k = 0; k < n; k++) sink += t->data[k]; /* every element is readable */
      (void)sink;
    }
    jem_torch_free(f);
  } else if (f || !err[0]) {
    __builtin_trap();
  }
  free(file);
  return 0;
}
