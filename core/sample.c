/* sample.c - SGLD chain set-up shared by `jem sample` and the daemon's jobs, so both give the same samples for a seed. */
#include "internal.h"

#include <string.h>

void jem_sample_init(const jem_model *m, float *x, int n, int init, const int *y,
                     uint64_t seed, jem_rng *rngs) {
  JEM_ASSERT(m && n >= 0 && (n == 0 || (x && rngs)));
  JEM_ASSERT(init == JEM_SAMPLE_INIT_NOISE || init == JEM_SAMPLE_INIT_BUFFER ||
             init == JEM_SAMPLE_INIT_GIVEN);
  /* Chain i owns stream (seed, i): its start and its noise do not depend on
   * how many chains run beside it. */
  for (int i = 0; i < n; i++) jem_rng_seed(&rngs[i], seed, (uint64_t)i);
  size_t chw = (size_t)m->arch.in_channels * (size_t)m->arch.image_size *
               (size_t)m->arch.image_size;
  if (init == JEM_SAMPLE_INIT_NOISE)
    jem_sgld_init_noise(x, n, chw, rngs);
  else if (init == JEM_SAMPLE_INIT_BUFFER)
    jem_sgld_init_buffer(m, x, n, JEM_SAMPLE_REINIT, y, rngs);
  /* JEM_SAMPLE_INIT_GIVEN: x already holds the starting images. */
}

int jem_sample_default_init(const jem_model *m) {
  return m && m->replay && m->replay_n > 0 ? JEM_SAMPLE_INIT_BUFFER : JEM_SAMPLE_INIT_NOISE;
}
