/* fuzz_image.c - libFuzzer harness: the image decode + preprocess path with the default limits. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "jem.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Exercise both output layouts and a resize that is neither identity nor
   * an integer ratio; the input bytes choose, so the corpus covers both. */
  static float out[3 * 32 * 32];
  jem_preprocess p;
  memset(&p, 0, sizeof p);
  p.channels = (size & 1) ? 3 : 1;
  p.resize_w = p.resize_h = (size & 2) ? 28 : 32;
  p.pad = (32 - p.resize_w) / 2;
  p.background = 0.5f;
  p.range_lo = -1;
  p.range_hi = 1;
  p.invert = (size & 4) != 0;
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  char err[256];
  int rc = jem_image_to_input(data, size, &p, 32, &lim, out, err, sizeof err);
  if (rc != 0 && rc != JEM_EFORMAT && rc != JEM_EUNSUPPORTED && rc != JEM_ETOOBIG)
    __builtin_trap(); /* only the documented codes */
  if (rc == 0)
    for (size_t i = 0; i < (size_t)p.channels * 32 * 32; i++)
      if (!(out[i] >= -1.0f && out[i] <= 1.0f)) __builtin_trap();
  return 0;
}
