/* conv_wide.c - Winograd F(2x2, 3x3) for wide 3x3 stride-1 layers, whose
 * weights do not fit in L2 (160 to 640 channels in the paper's WRN-28-10):
 * conv_winograd.c's transforms with the 16 products on register-blocked
 * GEMM micro-kernels (AVX-512 where the CPU has it, else AVX2), split over
 * the threads a lone slice lends (jem__par).
 *
 * The 16 products of a block of tiles are M[e] (cout x nt) = A[e] (cout x
 * cin) V[e] (cin x nt).  A micro-kernel keeps 12 output channels x 32 tiles
 * in registers and reads A as a packed panel: the 12 values of input
 * channel k at a[12*k + 0..11], one sequential stream.  The model keeps each
 * wide layer's transform packed for both directions (jem__net_wide):
 * forward from U^T[e][ci][co]; for the input gradient the flipped,
 * transposed weights' transform is U[e'][co][ci] (e' = e with rows and
 * columns 0 and 3 swapped, see wide_perm).  Nothing is packed per call: at
 * batch 1 the 8x8 layers read each 26 MB transform once for 16 tiles, and
 * only sequential reads keep that near the memory's speed.
 *
 * Every output value is a sum over the input channels in index order, one
 * FMA per channel, whatever the kernel width, ISA, block or thread: results
 * do not depend on the batch, the threads or AVX-512 vs AVX2. */
#include "conv_kern.h"
#include "internal.h"

#include <stdatomic.h>
#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define WIDE_MR 12 /* output channels per micro-kernel */

/* Floats of V per product aimed for in a block: 320 KB, so that V[e] stays
 * in L2 while every 12-channel panel of A[e] runs over it. */
#ifndef WIDE_V_FLOATS
#define WIDE_V_FLOATS (80 * 1024)
#endif

typedef struct wide_plan {
  int tr, tw;          /* tile rows and tiles per row of one image */
  int rb, ipb;         /* tile rows per block, images padded per block */
  size_t tb;           /* tiles per block */
  size_t pad, v, m;    /* scratch floats: padded images, V and M */
} wide_plan;

static wide_plan wide_make_plan(int cin, int cout, int H, int W, int n) {
  wide_plan p;
  p.tr = H / 2;
  p.tw = W / 2;
  size_t want = WIDE_V_FLOATS / (size_t)cin / (size_t)p.tw; /* tile rows */
  const int step = W == 8 ? 2 : 1; /* tile rows per 8-tile group */
  if (want < (size_t)step) want = (size_t)step;
  if (want >= (size_t)p.tr) {
    p.ipb = (int)(want / (size_t)p.tr);
    if (p.ipb > n) p.ipb = n;
    p.rb = p.ipb * p.tr;
  } else {
    int rb = step; /* the largest divisor of tr (a multiple of step) <= want */
    for (int d = step; d <= (int)want; d += step)
      if (p.tr % d == 0) rb = d;
    p.rb = rb;
    p.ipb = 1;
  }
  p.tb = (size_t)p.rb * p.tw;
  p.pad = (size_t)p.ipb * cin * (H + 2) * (W + 2);
  p.v = 16 * jem__wino_ld((size_t)cin * p.tb);
  p.m = 16 * jem__wino_ld((size_t)cout * p.tb);
  return p;
}

size_t jem__wide_scratch(int cin, int cout, int H, int W, int n) {
  if (!jem__wino_shape_ok(H, W)) return 0;
  wide_plan p = wide_make_plan(cin, cout, H, W, n);
  return p.pad + p.v + p.m + 3 * 16; /* + 64-byte alignment of each */
}

/* The product whose transform serves product e of the input gradient: the
 * flipped kernel's transform is the forward one with its rows and columns
 * 0 and 3 swapped (G J = P G for the column reversal J). */
static int wide_perm(int e) {
  static const int p[4] = {3, 1, 2, 0};
  return 4 * p[e / 4] + p[e % 4];
}

/* Tests: 0 picks the kernels by CPU, 1 forces the AVX2 ones. */
static atomic_int g_force_avx2;
void jem__wide_force_avx2(int on) { atomic_store(&g_force_avx2, on != 0); }

static int wide_avx512(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  static atomic_int cached = -1;
  int v = atomic_load_explicit(&cached, memory_order_relaxed);
  if (v < 0) {
    __builtin_cpu_init(); /* libgcc checks that the OS saves the ZMM state */
    v = __builtin_cpu_supports("avx512f");
    atomic_store_explicit(&cached, v, memory_order_relaxed);
  }
  return v && !atomic_load_explicit(&g_force_avx2, memory_order_relaxed);
#else
  return 0;
#endif
}

size_t jem__wide_mat_floats(int k, int r) {
  return (size_t)k * ((size_t)(r + WIDE_MR - 1) / WIDE_MR * WIDE_MR);
}

size_t jem__wide_packed_floats(int k, int r) { return 16 * jem__wide_mat_floats(k, r); }

void jem__wide_pack_mat(float *dst, const float *src, int k, int r, size_t sk, size_t sr) {
  const size_t rp = jem__wide_mat_floats(k, r) / (size_t)k;
  for (size_t p0 = 0; p0 < rp; p0 += WIDE_MR) {
    float *dp = dst + p0 * k;
    for (int kk = 0; kk < k; kk++)
      for (size_t i = 0; i < WIDE_MR; i++) /* rows past r: zeros, never stored */
        dp[(size_t)kk * WIDE_MR + i] = p0 + i < (size_t)r ? src[kk * sk + (p0 + i) * sr] : 0.0f;
  }
}

void jem__wide_pack(float *dst, const float *u, int k, int r) {
  for (int e = 0; e < 16; e++)
    jem__wide_pack_mat(dst + e * jem__wide_mat_floats(k, r), u + (size_t)e * k * r, k, r,
                       (size_t)r, 1);
}

static inline float *align16f(float *p) {
  return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

#if defined(__x86_64__) && defined(__GNUC__)

/* m[r][0..32) = sum_k a[k*lda + r] v[k*ldv + 0..32) for r < rows (<= 12):
 * 24 accumulators, two input vectors and one broadcast in registers. */
__attribute__((target("avx512f"))) static void
wide_k512_32(float *m, size_t ldm, const float *a, size_t lda, const float *v,
             size_t ldv, int K, int rows, int add) {
  __m512 acc[WIDE_MR][2];
  _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int k = 0; k < K; k++) {
    const float *vk = v + (size_t)k * ldv, *ak = a + (size_t)k * lda;
    const __m512 x0 = _mm512_loadu_ps(vk), x1 = _mm512_loadu_ps(vk + 16);
    _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) {
      const __m512 s = _mm512_set1_ps(ak[r]);
      acc[r][0] = _mm512_fmadd_ps(s, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(s, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; r++) {
    float *mr = m + (size_t)r * ldm;
    if (add) {
      acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_loadu_ps(mr));
      acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_loadu_ps(mr + 16));
    }
    _mm512_storeu_ps(mr, acc[r][0]);
    _mm512_storeu_ps(mr + 16, acc[r][1]);
  }
}

/* The same for 16 tiles, or 8 (mask 0xff). */
__attribute__((target("avx512f"))) static void
wide_k512_16(float *m, size_t ldm, const float *a, size_t lda, const float *v,
             size_t ldv, int K, int rows, int add, __mmask16 mask) {
  __m512 acc[WIDE_MR];
  _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) acc[r] = _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    const float *ak = a + (size_t)k * lda;
    const __m512 x = _mm512_maskz_loadu_ps(mask, v + (size_t)k * ldv);
    _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ak[r]), x, acc[r]);
  }
  for (int r = 0; r < rows; r++) {
    float *mr = m + (size_t)r * ldm;
    if (add) acc[r] = _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(mask, mr));
    _mm512_mask_storeu_ps(mr, mask, acc[r]);
  }
}

/* AVX2: 6 channels x 16 tiles (12 accumulators), or 6 x 8; a 12-channel
 * panel is two calls. */
__attribute__((target("avx2,fma"))) static void
wide_k256_16(float *m, size_t ldm, const float *a, size_t lda, const float *v,
             size_t ldv, int K, int rows, int add) {
  __m256 acc[6][2];
  _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) {
    acc[r][0] = _mm256_setzero_ps();
    acc[r][1] = _mm256_setzero_ps();
  }
  for (int k = 0; k < K; k++) {
    const float *vk = v + (size_t)k * ldv, *ak = a + (size_t)k * lda;
    const __m256 x0 = _mm256_loadu_ps(vk), x1 = _mm256_loadu_ps(vk + 8);
    _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) {
      const __m256 s = _mm256_broadcast_ss(ak + r);
      acc[r][0] = _mm256_fmadd_ps(s, x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(s, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; r++) {
    float *mr = m + (size_t)r * ldm;
    if (add) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(mr));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(mr + 8));
    }
    _mm256_storeu_ps(mr, acc[r][0]);
    _mm256_storeu_ps(mr + 8, acc[r][1]);
  }
}

__attribute__((target("avx2,fma"))) static void
wide_k256_8(float *m, size_t ldm, const float *a, size_t lda, const float *v,
            size_t ldv, int K, int rows, int add) {
  __m256 acc[6];
  _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) acc[r] = _mm256_setzero_ps();
  for (int k = 0; k < K; k++) {
    const float *ak = a + (size_t)k * lda;
    const __m256 x = _mm256_loadu_ps(v + (size_t)k * ldv);
    _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + r), x, acc[r]);
  }
  for (int r = 0; r < rows; r++) {
    float *mr = m + (size_t)r * ldm;
    if (add) acc[r] = _mm256_add_ps(acc[r], _mm256_loadu_ps(mr));
    _mm256_storeu_ps(mr, acc[r]);
  }
}

/* M (+)= A (rows x K, a packed panel) x V (K x nt) for one panel of at most
 * 12 rows, nt a multiple of 8. */
static void wide_panel(float *M, size_t ldm, const float *A, const float *V, size_t ldv,
                       int K, int rows, int nt, int add, int avx512) {
  const size_t lda = WIDE_MR;
  int t = 0;
  if (avx512) {
    for (; t + 32 <= nt; t += 32) wide_k512_32(M + t, ldm, A, lda, V + t, ldv, K, rows, add);
    for (; t < nt; t += 16)
      wide_k512_16(M + t, ldm, A, lda, V + t, ldv, K, rows, add,
                   nt - t >= 16 ? (__mmask16)0xffff : (__mmask16)0x00ff);
    return;
  }
  for (int h = 0; h < rows; h += 6) {
    const int hr = rows - h < 6 ? rows - h : 6;
    float *Mh = M + (size_t)h * ldm;
    const float *Ah = A + h;
    for (t = 0; t + 16 <= nt; t += 16)
      wide_k256_16(Mh + t, ldm, Ah, lda, V + t, ldv, K, hr, add);
    if (t < nt) wide_k256_8(Mh + t, ldm, Ah, lda, V + t, ldv, K, hr, add);
  }
}

void jem__wide_gemm(float *M, size_t ldm, const float *A, const float *V, size_t ldv,
                    int K, int R, int nt, int add, int part, int parts) {
  const int panels = (R + WIDE_MR - 1) / WIDE_MR, avx512 = wide_avx512();
  const int p0 = (int)((long long)panels * part / parts);
  const int p1 = (int)((long long)panels * (part + 1) / parts);
  for (int p = p0; p < p1; p++) {
    const int r0 = p * WIDE_MR, rows = R - r0 < WIDE_MR ? R - r0 : WIDE_MR;
    wide_panel(M + (size_t)r0 * ldm, ldm, A + (size_t)r0 * K, V, ldv, K, rows, nt, add,
               avx512);
  }
}

/* One block of a wide convolution, run in parts (jem__par). */
typedef struct wide_job {
  const wide_plan *p;
  float *out, *pad, *V, *M;
  const float *in, *gate, *u, *b;
  int cin, cout, H, W, n, mode, transposed, accumulate;
  float leak;
  int img, ty0, rows, nimg, pad_new; /* the block */
} wide_job;

/* Parts split the channels (prep, output) or the 16 products (GEMM) by
 * shape alone. */
#define WIDE_PARTS 4

static void part_range(int total, int part, int parts, int *lo, int *hi) {
  *lo = (int)((long long)total * part / parts);
  *hi = (int)((long long)total * (part + 1) / parts);
}

/* Input channels [lo, hi): padded copies of the block's images (when the
 * block starts them), then their input transform. */
static void wide_prep_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  part_range(j->cin, part, parts, &lo, &hi);
  if (hi == lo) return;
  const size_t cplane = (size_t)(j->H + 2) * (j->W + 2), plane = (size_t)j->cin * cplane;
  const size_t hw = (size_t)j->H * j->W, coff = (size_t)lo * j->n * hw;
  const size_t ve = jem__wino_ld((size_t)j->cin * p->tb);
  for (int i = 0; i < j->nimg; i++) {
    float *pad = j->pad + i * plane + (size_t)lo * cplane;
    if (j->pad_new)
      jem__pad_image_s2(pad, j->in + coff, j->gate ? j->gate + coff : NULL, hi - lo, j->n,
                        j->img + i, j->H, j->W, j->mode, j->leak);
    const int ta = i == 0 ? j->ty0 : 0, tr = j->nimg > 1 ? p->tr : j->rows;
    jem__wino_input(j->V + (size_t)lo * p->tb, ve, p->tb, (size_t)i * p->tr * p->tw, pad,
                    hi - lo, j->H, j->W, ta, tr);
  }
}

/* Products [lo, hi) of the 16. */
static void wide_gemm_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  part_range(16, part, parts, &lo, &hi);
  const size_t ve = jem__wino_ld((size_t)j->cin * p->tb);
  const size_t me = jem__wino_ld((size_t)j->cout * p->tb);
  const size_t ue = jem__wide_packed_floats(j->cin, j->cout) / 16;
  const int nt = j->rows * p->tw, avx512 = wide_avx512();
  for (int e = lo; e < hi; e++) {
    const float *A = j->u + (size_t)(j->transposed ? wide_perm(e) : e) * ue;
    for (int r0 = 0; r0 < j->cout; r0 += WIDE_MR) {
      const int rows = j->cout - r0 < WIDE_MR ? j->cout - r0 : WIDE_MR;
      wide_panel(j->M + e * me + (size_t)r0 * p->tb, p->tb, A + (size_t)r0 * j->cin,
                 j->V + e * ve, p->tb, j->cin, rows, nt, 0, avx512);
    }
  }
}

/* Output channels [lo, hi): the output transform into out. */
static void wide_out_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  part_range(j->cout, part, parts, &lo, &hi);
  if (hi == lo) return;
  const size_t hw = (size_t)j->H * j->W;
  jem__wino_output(j->out + (size_t)lo * j->n * hw, j->M + (size_t)lo * p->tb,
                   jem__wino_ld((size_t)j->cout * p->tb), j->b ? j->b + lo : NULL, hi - lo,
                   j->n, j->H, j->W, p->tb, j->img, j->ty0, j->rows, j->accumulate);
}

void jem__conv3x3_wide(float *out, const float *in, const float *gate, const float *u,
                       const float *b, int cin, int cout, int H, int W, int n, int mode,
                       float leak, int accumulate, int transposed, float *scratch) {
  const wide_plan p = wide_make_plan(cin, cout, H, W, n);
  wide_job j = {.p = &p, .out = out, .in = in, .gate = mode == PAD_GATE ? gate : NULL,
                .u = u, .b = b, .cin = cin, .cout = cout, .H = H, .W = W, .n = n,
                .mode = mode, .transposed = transposed, .accumulate = accumulate,
                .leak = leak};
  j.pad = align16f(scratch);
  j.V = align16f(j.pad + p.pad);
  j.M = align16f(j.V + p.v);
  const int total = n * p.tr;
  for (int r0 = 0; r0 < total; r0 += p.rb) {
    j.img = r0 / p.tr;
    j.ty0 = r0 % p.tr;
    j.rows = total - r0 < p.rb ? total - r0 : p.rb;
    j.nimg = (j.rows + p.tr - 1) / p.tr; /* > 1 only when ipb > 1 */
    j.pad_new = j.ty0 == 0;
    jem__par(wide_prep_part, &j, WIDE_PARTS);
    jem__par(wide_gemm_part, &j, WIDE_PARTS);
    jem__par(wide_out_part, &j, WIDE_PARTS);
  }
}

#else
void jem__conv3x3_wide(float *out, const float *in, const float *gate, const float *u,
                       const float *b, int cin, int cout, int H, int W, int n, int mode,
                       float leak, int accumulate, int transposed, float *scratch) {
  (void)out; (void)in; (void)gate; (void)u; (void)b; (void)cin; (void)cout; (void)H;
  (void)W; (void)n; (void)mode; (void)leak; (void)accumulate; (void)transposed;
  (void)scratch;
  JEM_ASSERT(!"Winograd kernel not built for this CPU");
}
#endif
