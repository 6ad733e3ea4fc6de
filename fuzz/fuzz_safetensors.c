/* fuzz_safetensors.c - libFuzzer harness for the model loader (jem_model_load_mem).
 *
 * The first input byte picks a mode, so that small inputs also reach the
 * deep paths (a valid WRN-10-1 file needs ~300 KB of weights):
 *   0: the rest of the input is the whole file;
 *   1: the rest is the JSON header, followed by an all-zero data section of
 *      exactly the F32 weights of WRN-10-1 (1 channel, 10 classes);
 *   2: as 1, plus one 1x32x32 replay image.
 * Seeds: fuzz/gen_safetensors_seeds.py writes fuzz/corpus/safetensors/. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jem.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t weights_bytes(void) {
  static size_t bytes;
  if (!bytes) {
    jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
    jem_param p[64];
    int n = jem_arch_params(&a, p, 64);
    for (int i = 0; i < n && i < 64; i++) bytes += p[i].numel * sizeof(float);
  }
  return bytes;
}

static void check_model(const jem_model *m) {
  if (!m->classes || !m->weights || !m->params || !m->meta) __builtin_trap();
  if (!(m->temperature > 0.0f) || !m->name[0]) __builtin_trap();
  for (int i = 0; i < m->arch.num_classes; i++)
    if (!m->classes[i] || !m->classes[i][0]) __builtin_trap();
  if (m->replay_n < 0 || (m->replay_n > 0 && !m->replay)) __builtin_trap();
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    if (m->ood.nq[s] < 0 || m->ood.nq[s] > JEM_OOD_MAX_QUANTILES) __builtin_trap();
    for (int i = 1; i < m->ood.nq[s]; i++)
      if (!(m->ood.q[s][i] >= m->ood.q[s][i - 1])) __builtin_trap();
  }
  for (size_t i = 0; i < m->n_weights; i++)
    if (m->weights[i] != m->weights[i]) __builtin_trap(); /* NaN got through */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  int mode = data[0] % 3;
  const uint8_t *in = data + 1;
  size_t n = size - 1;
  unsigned char *file;
  size_t len;
  if (mode == 0) {
    len = n;
    file = malloc(len ? len : 1); /* exact size: ASan sees any overread */
    if (!file) return 0;
    if (n) memcpy(file, in, n);
  } else {
    size_t dl = weights_bytes() + (mode == 2 ? 32 * 32 * sizeof(float) : 0);
    len = 8 + n + dl;
    file = calloc(len, 1);
    if (!file) return 0;
    for (int i = 0; i < 8; i++) file[i] = (unsigned char)((uint64_t)n >> (8 * i));
    if (n) memcpy(file + 8, in, n);
  }
  jem_model *m = (jem_model *)file; /* must be overwritten */
  char err[512];
  int rc = jem_model_load_mem(&m, file, len, "fuzz", err, sizeof err);
  if (rc > 0) __builtin_trap();
  if (rc == 0) {
    if (!m) __builtin_trap();
    check_model(m);
    jem_model_free(m);
  } else {
    if (m || !err[0]) __builtin_trap();
  }
  free(file);
  return 0;
}
