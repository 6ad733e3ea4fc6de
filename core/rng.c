/* rng.c - PCG32 random streams (one per seed and stream id) for SGLD chains. */
#include "internal.h"

#include <math.h>

/* PCG-XSH-RR 64/32 (O'Neill 2014): a 64-bit LCG whose increment selects one
 * of 2^63 streams, output through a xorshift and a data-dependent rotation.
 * Only integer arithmetic, so every platform draws the same numbers. */
#define PCG_MULT 6364136223846793005ULL

/* SplitMix64 finaliser: spreads nearby seeds (0, 1, 2, ...) over the state
 * space so that small user seeds do not give similar starting states. */
static uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void jem_rng_seed(jem_rng *r, uint64_t seed, uint64_t stream) {
  JEM_ASSERT(r);
  /* Distinct streams get distinct (odd) increments, hence different
   * sequences; the starting state also depends on both, so chain k of seed S
   * and chain k+1 of seed S do not start from related points. */
  r->inc = (stream << 1) | 1u;
  r->state = 0;
  (void)jem_rng_u32(r);
  r->state += mix64(seed ^ mix64(stream));
  (void)jem_rng_u32(r);
  r->has_spare = 0;
  r->spare = 0.0f;
}

uint32_t jem_rng_u32(jem_rng *r) {
  uint64_t old = r->state;
  r->state = old * PCG_MULT + r->inc;
  uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
  uint32_t rot = (uint32_t)(old >> 59);
  return (xorshifted >> rot) | (xorshifted << ((32u - rot) & 31u));
}

float jem_rng_uniform(jem_rng *r) {
  /* 24 random bits: every value is exactly representable and < 1. */
  return (float)(jem_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

float jem_rng_normal(jem_rng *r) {
  if (r->has_spare) {
    r->has_spare = 0;
    return r->spare;
  }
  /* Box-Muller in double: u1 in (0,1] so log(u1) is finite; the only
   * platform dependence left is libm's last-bit rounding of log/sin/cos,
   * which the final float conversion almost always absorbs. */
  double u1 = ((double)jem_rng_u32(r) + 1.0) * (1.0 / 4294967296.0);
  double u2 = (double)jem_rng_u32(r) * (1.0 / 4294967296.0);
  double rad = sqrt(-2.0 * log(u1));
  double th = 6.283185307179586476925286766559 * u2;
  r->spare = (float)(rad * sin(th));
  r->has_spare = 1;
  return (float)(rad * cos(th));
}
