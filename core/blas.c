/* blas.c - OpenBLAS core selection (re-exec with OPENBLAS_CORETYPE when the
 * library picked a slower kernel set than the CPU supports) and threads. */
#include "conv.h"
#include "internal.h"

#include <stdatomic.h>

#include <cblas.h>
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define REEXEC_GUARD "JEM_BLAS_REEXEC"

/* Kernel levels: 0 generic/SSE, 1 AVX2+FMA, 2 AVX-512 (F, BW, VL, DQ). */
static int cpu_level(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  (void)hi;
  const int os_avx = (lo & 0x6) == 0x6;         /* XMM and YMM state */
  const int os_avx512 = (lo & 0xe6) == 0xe6;    /* plus opmask, ZMM halves */
  if (!os_avx) return 0;
  if (__get_cpuid_max(0, NULL) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const int avx2 = (b >> 5) & 1;
  const int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1,
            vl = (b >> 31) & 1;
  if (f && dq && bw && vl && os_avx512 && avx2 && fma) return 2;
  if (avx2 && fma) return 1;
  return 0;
}

/* Level of the kernels behind an OpenBLAS core name. */
static int core_level(const char *name) {
  static const char *const l2[] = {"SkylakeX", "Cooperlake", "SapphireRapids"};
  static const char *const l1[] = {"Haswell", "Zen"};
  if (!name) return 0;
  for (size_t i = 0; i < sizeof l2 / sizeof *l2; i++)
    if (strcasecmp(name, l2[i]) == 0) return 2;
  for (size_t i = 0; i < sizeof l1 / sizeof *l1; i++)
    if (strcasecmp(name, l1[i]) == 0) return 1;
  return 0;
}

int jem_blas_setup(int argc, char **argv) {
  /* the core parallelises over images itself (see jem_ws_create) */
  jem__blas_single_thread();
  const char *guard = getenv(REEXEC_GUARD);
  if (guard) {
    /* we are the re-executed process: never loop, and keep children clean */
    unsetenv(REEXEC_GUARD);
    return 0;
  }
  const int want = cpu_level();
  const char *forced = getenv("OPENBLAS_CORETYPE");
  if (forced) { /* the user's choice wins, but say when it cannot run here */
    if (core_level(forced) > want)
      fprintf(stderr, "jem: warning: OPENBLAS_CORETYPE=%s needs %s, which this CPU lacks; "
                      "expect a crash (illegal instruction) in matrix code\n",
              forced, core_level(forced) == 2 ? "AVX-512" : "AVX2 and FMA");
    return 0;
  }
  const char *have = openblas_get_corename();
  if (want == 0 || core_level(have) >= want) return 0;
  const char *core = want == 2 ? "SkylakeX" : "Haswell";
  if (argc < 1 || !argv || !argv[0]) {
    fprintf(stderr, "jem: warning: OpenBLAS uses the %s kernels on a CPU that "
                    "supports %s; cannot re-exec without argv\n",
            have ? have : "unknown", core);
    return 0;
  }
  setenv("OPENBLAS_CORETYPE", core, 1);
  setenv(REEXEC_GUARD, "1", 1);
  execv("/proc/self/exe", argv);
  /* still here: exec failed; run on with the slower kernels */
  fprintf(stderr, "jem: warning: re-exec with OPENBLAS_CORETYPE=%s failed; "
                  "OpenBLAS keeps the slower %s kernels\n",
          core, have ? have : "unknown");
  unsetenv(REEXEC_GUARD);
  unsetenv("OPENBLAS_CORETYPE");
  return 0;
}

const char *jem_blas_core(void) {
  const char *name = openblas_get_corename();
  return name ? name : "unknown";
}

/* Threads the core computes with; 0 = never set (use every CPU).  The core
 * parallelises over the images of a batch (see jem_ws_create), so OpenBLAS
 * itself runs single-threaded once a count is chosen. */
static atomic_int g_threads;

static int cpu_count(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

void jem_blas_set_threads(int n) {
  if (n < 1) n = 1;
  if (n > 256) n = 256;
  atomic_store(&g_threads, n);
  openblas_set_num_threads(1);
}

int jem_blas_threads(void) { return jem__threads(); }

int jem__threads(void) {
  int n = atomic_load(&g_threads);
  return n > 0 ? n : cpu_count();
}

void jem__blas_single_thread(void) {
  if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
}
