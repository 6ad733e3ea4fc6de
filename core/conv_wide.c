/* conv_wide.c - Winograd for wide 3x3 layers, whose weights do not fit in
 * L2 (160 to 640 channels in the paper's WRN-28-10): F(4x4, 3x3) or
 * F(2x2, 3x3) (conv_winograd.c's transforms) by map size (see wide_f4),
 * with the products on register-blocked GEMM micro-kernels (AVX-512 where
 * the CPU has it, else AVX2), split over the threads a lone slice lends
 * (jem__par).  The same micro-kernels serve the strided wide layers'
 * im2col products (jem__wide_gemm) and, with AVX-512, the narrow layers'
 * Winograd products (jem__wide_product).
 *
 * The ne (16 or 36) products of a block of tiles are M[e] (cout x nt) =
 * A[e] (cout x cin) V[e] (cin x nt).  A micro-kernel keeps 12 output
 * channels x 32 tiles in registers and reads A as a packed panel: the 12
 * values of input channel k at a[12*k + 0..11], one sequential stream.  The
 * model keeps each wide layer's transforms packed for both directions
 * (jem__net_wide): forward from U^T[e][ci][co]; for the input gradient from
 * the transform of the flipped kernels as pairs (co, ci).  Nothing is packed
 * per call: at batch 1 the 8x8 layers read each 26 MB transform once for 16
 * tiles, and only sequential reads, prefetched (WIDE_PF), keep that near
 * the memory's speed.
 *
 * Every output value is a sum over the input channels in index order, one
 * FMA per channel (in passes of WIDE_KC channels for jem__wide_gemm),
 * whatever the kernel width, ISA, block or thread: results do not depend on
 * the batch, the threads or AVX-512 vs AVX2. */
#include "conv_kern.h"
#include "internal.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define WIDE_MR JEM__WIDE_MR

/* How far ahead (floats) the micro-kernels prefetch their A panel: 8 KB.
 * The panels of a product, and the products of a layer, lie one after
 * another, so this runs on into the next.  At batch 1 A streams from
 * memory and the hardware prefetcher alone left the kernels waiting on it
 * (measured: 101 against 180 GFLOP/s for a 640-channel 8x8 layer's
 * products on one core). */
#define WIDE_PF 2048

/* Floats of V per product aimed for in a block: 320 KB, so that V[e] stays
 * in L2 while every 12-channel panel of A[e] runs over it. */
#ifndef WIDE_V_FLOATS
#define WIDE_V_FLOATS (80 * 1024)
#endif

/* F(4x4, 3x3) where the map allows it (4x4 output tiles, 8 a vector: maps
 * 16 wide, or a multiple of 32), else F(2x2, 3x3): 36 products per 16
 * outputs instead of 64, for transforms 2.25 times the size.  Measured on
 * WRN-28-10's 16x16 layers, F(4x4, 3x3) is the faster at every batch (20%
 * at batch 1 on one core), so each map has one algorithm, whatever the
 * batch.  8x8 maps (4 tiles an image) keep F(2x2, 3x3). */
static int wide_f4(int H, int W) {
  if (H % 4 || W > 64) return 0;
  return W == 16 ? H % 8 == 0 : W % 32 == 0;
}

/* Floats of a row of pad4's layout: the padded row's columns by
 * their index mod 4, each phase q = W/4 + 2 long. */
static int pad4_row(int W) { return 4 * (W / 4 + 2); }

typedef struct wide_plan {
  int f4, ne, t;       /* F(4x4,3x3)?, products (16 or 36), tile side (2 or 4) */
  int tr, tw;          /* tile rows and tiles per row of one image */
  int rb, ipb;         /* tile rows per block, images padded per block */
  size_t tb;           /* tiles per block */
  size_t plane;        /* floats of one channel's padded copy */
  size_t pad, v, m;    /* scratch floats: padded images, V and M */
} wide_plan;

static wide_plan wide_make_plan(int cin, int cout, int H, int W, int n, int f4) {
  wide_plan p;
  p.f4 = f4;
  p.ne = p.f4 ? 36 : 16;
  p.t = p.f4 ? 4 : 2;
  p.tr = H / p.t;
  p.tw = W / p.t;
  size_t want = WIDE_V_FLOATS / (size_t)cin / (size_t)p.tw; /* tile rows */
  const int step = p.tw == 4 ? 2 : 1; /* tile rows per 8-tile group */
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
  p.plane = (size_t)(H + 2) * (p.f4 ? (size_t)pad4_row(W) : (size_t)(W + 2));
  p.pad = (size_t)p.ipb * cin * p.plane;
  p.v = (size_t)p.ne * jem__wino_ld((size_t)cin * p.tb);
  p.m = (size_t)p.ne * jem__wino_ld((size_t)cout * p.tb);
  return p;
}

size_t jem__wide_scratch(int cin, int cout, int H, int W, int n) {
  if (!jem__wino_shape_ok(H, W)) return 0;
  const wide_plan p = wide_make_plan(cin, cout, H, W, n, wide_f4(H, W));
  return p.pad + p.v + p.m + 3 * 16; /* + 64-byte alignment of each */
}

/* Tests: 0 picks the kernels by CPU, 1 forces the AVX2 ones. */
static atomic_int g_force_avx2;
void jem__wide_force_avx2(int on) { atomic_store(&g_force_avx2, on != 0); }

int jem__wide_avx512(void) {
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

size_t jem__wide_weights_floats(int cin, int cout, int H, int W) {
  const size_t both = jem__wide_mat_floats(cin, cout) + jem__wide_mat_floats(cout, cin);
  return (wide_f4(H, W) ? 36 : 16) * both;
}

/* The packed transform a call reads in the block of jem__wide_weights: the
 * forward one, then the input gradient's.  cin, cout: the call's. */
static const float *wide_u(const float *u, int ne, int transposed, int cin, int cout) {
  return transposed ? u + (size_t)ne * jem__wide_mat_floats(cout, cin) : u;
}

void jem__wide_pack_mat(float *dst, const float *src, int k, int r, size_t sk, size_t sr) {
  const size_t rp = jem__wide_mat_floats(k, r) / (size_t)k;
  for (size_t p0 = 0; p0 < rp; p0 += WIDE_MR) {
    float *dp = dst + p0 * k;
    for (int kk = 0; kk < k; kk++)
      for (size_t i = 0; i < WIDE_MR; i++) /* rows past r: zeros, never stored */
        dp[(size_t)kk * WIDE_MR + i] = p0 + i < (size_t)r ? src[kk * sk + (p0 + i) * sr] : 0.0f;
  }
}

/* u[e][k][r] (ne products, k-major) packed product by product. */
static void wide_pack(float *dst, const float *u, int ne, int k, int r) {
  for (int e = 0; e < ne; e++)
    jem__wide_pack_mat(dst + e * jem__wide_mat_floats(k, r), u + (size_t)e * k * r, k, r,
                       (size_t)r, 1);
}

/* o[0..5] (stride so) = G (a, b, c) of F(4x4, 3x3) (Lavin and Gray 2016,
 * interpolation points 0, +-1, +-2). */
static void g6(float *o, size_t so, float a, float b, float c) {
  o[0] = a / 4.0f;
  o[so] = -(a + b + c) / 6.0f;
  o[2 * so] = -(a - b + c) / 6.0f;
  o[3 * so] = a / 24.0f + b / 12.0f + c / 6.0f;
  o[4 * so] = a / 24.0f - b / 12.0f + c / 6.0f;
  o[5 * so] = c;
}

/* u[e][p] = (G g G^T)[e] of F(4x4, 3x3) for the 3x3 kernels g = w + 9p. */
static void wino4_weights(float *u, const float *w, size_t np) {
  for (size_t p = 0; p < np; p++) {
    const float *g = w + 9 * p;
    float r[6][3], o[6][6];
    for (int x = 0; x < 3; x++) g6(&r[0][x], 3, g[x], g[3 + x], g[6 + x]); /* G g */
    for (int y = 0; y < 6; y++) g6(o[y], 1, r[y][0], r[y][1], r[y][2]);    /* (G g) G^T */
    for (int e = 0; e < 36; e++) u[(size_t)e * np + p] = o[e / 6][e % 6];
  }
}

void jem__wide_weights(float *dst, const float *w, int cin, int cout, int H, int W) {
  const size_t pairs = (size_t)cin * cout;
  const int f4 = wide_f4(H, W), ne = f4 ? 36 : 16;
  float *wt = malloc(sizeof(float) * 9 * pairs), *u = malloc(sizeof(float) * ne * pairs);
  JEM_ASSERT(wt && u);
  /* forward: U^T, the transform of the weights as pairs (ci, co) */
  for (int co = 0; co < cout; co++)
    for (int ci = 0; ci < cin; ci++)
      memcpy(wt + ((size_t)ci * cout + co) * 9, w + ((size_t)co * cin + ci) * 9,
             sizeof(float) * 9);
  if (f4)
    wino4_weights(u, wt, pairs);
  else
    jem__wino_weights(u, wt, cout, cin, 0);
  wide_pack(dst, u, ne, cin, cout);
  /* input gradient: the flipped kernels as pairs (co, ci) */
  for (size_t p = 0; p < pairs; p++)
    for (int k = 0; k < 9; k++) wt[9 * p + k] = w[9 * p + 8 - k];
  if (f4)
    wino4_weights(u, wt, pairs);
  else
    jem__wino_weights(u, wt, cin, cout, 0);
  wide_pack(dst + (size_t)ne * jem__wide_mat_floats(cin, cout), u, ne, cout, cin);
  free(wt);
  free(u);
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
    _mm_prefetch((const char *)(ak + WIDE_PF), _MM_HINT_T0);
    const __m512 x0 = _mm512_loadu_ps(vk), x1 = _mm512_loadu_ps(vk + 16);
    _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) {
      const __m512 s = _mm512_set1_ps(ak[r]);
      acc[r][0] = _mm512_fmadd_ps(s, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(s, x1, acc[r][1]);
    }
  }
  /* Unrolled with constant indices: a loop to `rows` would make GCC keep
   * acc in memory, storing all of it every k (measured: 3x slower). */
  _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) {
    if (r >= rows) break;
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
    _mm_prefetch((const char *)(ak + WIDE_PF), _MM_HINT_T0);
    const __m512 x = _mm512_maskz_loadu_ps(mask, v + (size_t)k * ldv);
    _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ak[r]), x, acc[r]);
  }
  _Pragma("GCC unroll 12") for (int r = 0; r < WIDE_MR; r++) { /* as above */
    if (r >= rows) break;
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
    _mm_prefetch((const char *)(ak + WIDE_PF), _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(vk), x1 = _mm256_loadu_ps(vk + 8);
    _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) {
      const __m256 s = _mm256_broadcast_ss(ak + r);
      acc[r][0] = _mm256_fmadd_ps(s, x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(s, x1, acc[r][1]);
    }
  }
  _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) { /* as in wide_k512_32 */
    if (r >= rows) break;
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
    _mm_prefetch((const char *)(ak + WIDE_PF), _MM_HINT_T0);
    const __m256 x = _mm256_loadu_ps(v + (size_t)k * ldv);
    _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + r), x, acc[r]);
  }
  _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) {
    if (r >= rows) break;
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

void jem__wide_product(float *M, size_t ldm, const float *A, const float *V, size_t ldv, int K,
                       int R, int nt) {
  const int avx512 = jem__wide_avx512();
  for (int r0 = 0; r0 < R; r0 += WIDE_MR) {
    const int rows = R - r0 < WIDE_MR ? R - r0 : WIDE_MR;
    wide_panel(M + (size_t)r0 * ldm, ldm, A + (size_t)r0 * K, V, ldv, K, rows, nt, 0, avx512);
  }
}

/* Input channels per pass of jem__wide_gemm: the V rows a pass reads (up
 * to 256 x 256 floats) stay in L2 while every panel runs over them; an
 * im2col matrix (2,880 or 5,760 rows in WRN-28-10) would not. */
#define WIDE_KC 256

void jem__wide_gemm(float *M, size_t ldm, const float *A, const float *V, size_t ldv,
                    int K, int R, int nt, int add, int part, int parts) {
  const int avx512 = jem__wide_avx512();
  int p0, p1;
  jem__part_range((R + WIDE_MR - 1) / WIDE_MR, part, parts, &p0, &p1);
  for (int k0 = 0; k0 < K; k0 += WIDE_KC) {
    const int kn = K - k0 < WIDE_KC ? K - k0 : WIDE_KC;
    for (int p = p0; p < p1; p++) {
      const int r0 = p * WIDE_MR, rows = R - r0 < WIDE_MR ? R - r0 : WIDE_MR;
      wide_panel(M + (size_t)r0 * ldm, ldm, A + (size_t)r0 * K + (size_t)k0 * WIDE_MR,
                 V + (size_t)k0 * ldv, ldv, kn, rows, nt, add || k0 > 0, avx512);
    }
  }
}

/* pad[ch][H+2][pad4_row(W)] = the zero-bordered f(src[ch][img]) (f as in
 * jem__pad_image_s2) with each padded row stored by column index mod 4, so
 * that column j of F(4x4,3x3) patch tx is one plain load over 8 tiles. */
static void pad4(float *pad, const float *src, const float *gate, int ch, int n, int img,
                 int H, int W, int mode, float leak) {
  const int q = W / 4 + 2, rs = 4 * q;
  const size_t plane = (size_t)(H + 2) * rs, hw = (size_t)H * W;
  float row[66]; /* W <= 64 */
  for (int ci = 0; ci < ch; ci++) {
    float *p = pad + ci * plane;
    const size_t off = ((size_t)ci * n + img) * hw;
    memset(p, 0, sizeof(float) * rs);
    memset(p + (size_t)(H + 1) * rs, 0, sizeof(float) * rs);
    for (int y = 0; y < H; y++) {
      const float *s = src + off + (size_t)y * W;
      row[0] = row[W + 1] = 0.0f;
      if (mode == PAD_LRELU)
        lrelu_copy(row + 1, s, W, leak);
      else if (mode == PAD_GATE)
        gate_copy(row + 1, s, gate + off + (size_t)y * W, (size_t)W, leak);
      else
        memcpy(row + 1, s, sizeof(float) * W);
      float *d = p + (size_t)(y + 1) * rs;
      memset(d, 0, sizeof(float) * rs);
      for (int c = 0; c < W + 2; c++) d[(c & 3) * q + (c >> 2)] = row[c];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)

/* B^T x of F(4x4, 3x3) for six vectors (one patch row or column). */
__attribute__((target("avx2,fma"), always_inline)) static inline void
bt6(__m256 r[6], const __m256 x[6]) {
  const __m256 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f);
  const __m256 two = _mm256_set1_ps(2.0f);
  const __m256 t0 = _mm256_sub_ps(x[4], x[2]);           /* d4 - d2 */
  const __m256 t1 = _mm256_sub_ps(x[3], x[1]);           /* d3 - d1 */
  const __m256 t2 = _mm256_fnmadd_ps(four, x[2], x[4]);  /* d4 - 4 d2 */
  const __m256 t3 = _mm256_fnmadd_ps(four, x[1], x[3]);  /* d3 - 4 d1 */
  r[0] = _mm256_fmadd_ps(four, x[0], _mm256_fnmadd_ps(five, x[2], x[4]));
  r[1] = _mm256_add_ps(t2, t3);
  r[2] = _mm256_sub_ps(t2, t3);
  r[3] = _mm256_fmadd_ps(two, t1, t0);
  r[4] = _mm256_fnmadd_ps(two, t1, t0);
  r[5] = _mm256_fmadd_ps(four, x[1], _mm256_fnmadd_ps(five, x[3], x[5]));
}

/* V[e][ci][tbase + ...] = B^T d B of F(4x4, 3x3) for tile rows [ty0, ty0 +
 * rows) of one image padded by pad4 (cin channels). */
__attribute__((target("avx2,fma"))) static void
w4_input(float *V, size_t ve, size_t tb, size_t tbase, const float *pad, int cin, int H,
         int W, int ty0, int rows) {
  const int q = W / 4 + 2, rs = 4 * q, tw = W / 4;
  const size_t plane = (size_t)(H + 2) * rs;
  for (int ci = 0; ci < cin; ci++) {
    const float *pc = pad + ci * plane;
    float *vc = V + ci * tb + tbase;
    for (int r = 0; r < rows; r += tw == 4 ? 2 : 1) {
      for (int tx = 0; tx < tw; tx += 8) {
        __m256 c[6][6];
        for (int i = 0; i < 6; i++) {
          const float *e0 = pc + (size_t)(4 * (ty0 + r) + i) * rs + tx;
          __m256 d[6];
          if (tw == 4) { /* two tile rows of 4: the second 4 rows down */
            const float *e1 = e0 + 4 * rs;
            for (int j = 0; j < 4; j++)
              d[j] = _mm256_set_m128(_mm_loadu_ps(e1 + j * q), _mm_loadu_ps(e0 + j * q));
            d[4] = _mm256_set_m128(_mm_loadu_ps(e1 + 1), _mm_loadu_ps(e0 + 1));
            d[5] = _mm256_set_m128(_mm_loadu_ps(e1 + q + 1), _mm_loadu_ps(e0 + q + 1));
          } else {
            for (int j = 0; j < 4; j++) d[j] = _mm256_loadu_ps(e0 + j * q);
            d[4] = _mm256_loadu_ps(e0 + 1);
            d[5] = _mm256_loadu_ps(e0 + q + 1);
          }
          bt6(c[i], d); /* d B, row i */
        }
        float *vt = vc + (size_t)r * tw + tx;
        for (int j = 0; j < 6; j++) { /* B^T (d B), column j */
          __m256 col[6], o[6];
          for (int i = 0; i < 6; i++) col[i] = c[i][j];
          bt6(o, col);
          for (int i = 0; i < 6; i++) _mm256_storeu_ps(vt + (size_t)(6 * i + j) * ve, o[i]);
        }
      }
    }
  }
}

/* A^T m of F(4x4, 3x3): six vectors to four. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
at6(__m256 y[4], const __m256 m[6]) {
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f);
  const __m256 eight = _mm256_set1_ps(8.0f);
  const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
  const __m256 c = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
  y[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);
  y[1] = _mm256_fmadd_ps(two, d, b);
  y[2] = _mm256_fmadd_ps(four, c, a);
  y[3] = _mm256_add_ps(_mm256_fmadd_ps(eight, d, b), m[5]);
}

/* out[cout, n, H, W] (+)= b + A^T M A of F(4x4, 3x3) for global tile rows
 * [ty0, ty0 + rows) of the block starting at image img. */
__attribute__((target("avx2,fma"))) static void
w4_output(float *out, const float *M, size_t me, const float *b, int cout, int n, int H,
          int W, size_t tb, int img, int ty0, int rows, int accumulate) {
  const size_t hw = (size_t)H * W;
  const int tw = W / 4, tr = H / 4, step = tw == 4 ? 2 : 1;
  for (int co = 0; co < cout; co++) {
    const __m256 bias = _mm256_set1_ps(b ? b[co] : 0.0f);
    const float *mc = M + co * tb;
    for (int r = 0; r < rows; r += step) {
      const int gy = ty0 + r, im = img + gy / tr, ty = gy % tr;
      float *o = out + ((size_t)co * n + im) * hw + (size_t)(4 * ty) * W;
      for (int tx = 0; tx < tw; tx += 8) {
        const float *mt = mc + (size_t)r * tw + tx;
        __m256 s[6][4];
        for (int i = 0; i < 6; i++) { /* M A, row i */
          __m256 m[6];
          for (int j = 0; j < 6; j++) m[j] = _mm256_loadu_ps(mt + (size_t)(6 * i + j) * me);
          at6(s[i], m);
        }
        for (int x = 0; x < 4; x++) { /* A^T (M A), column x */
          __m256 col[6], y[4];
          for (int i = 0; i < 6; i++) col[i] = s[i][x];
          at6(y, col);
          for (int yy = 0; yy < 4; yy++) s[yy][x] = _mm256_add_ps(y[yy], bias);
        }
        for (int yy = 0; yy < 4; yy++) {
          /* 4 columns x 8 tiles -> each tile's 4 pixels, tiles in order */
          const __m256 t0 = _mm256_unpacklo_ps(s[yy][0], s[yy][1]);
          const __m256 t1 = _mm256_unpackhi_ps(s[yy][0], s[yy][1]);
          const __m256 t2 = _mm256_unpacklo_ps(s[yy][2], s[yy][3]);
          const __m256 t3 = _mm256_unpackhi_ps(s[yy][2], s[yy][3]);
          const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44); /* tiles 0 | 4 */
          const __m256 u1 = _mm256_shuffle_ps(t0, t2, 0xee); /* tiles 1 | 5 */
          const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44); /* tiles 2 | 6 */
          const __m256 u3 = _mm256_shuffle_ps(t1, t3, 0xee); /* tiles 3 | 7 */
          __m256 p[4] = {_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u2, u3, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31), _mm256_permute2f128_ps(u2, u3, 0x31)};
          float *q0 = o + (size_t)yy * W + 4 * tx;
          /* tw == 4: tiles 4-7 are the next tile row, 4 rows down */
          float *dst[4] = {q0, q0 + 8, tw == 4 ? q0 + 4 * W : q0 + 16,
                           tw == 4 ? q0 + 4 * W + 8 : q0 + 24};
          for (int k = 0; k < 4; k++) {
            if (accumulate) p[k] = _mm256_add_ps(p[k], _mm256_loadu_ps(dst[k]));
            _mm256_storeu_ps(dst[k], p[k]);
          }
        }
      }
    }
  }
}

#endif

/* One block of a wide convolution, run in parts (jem__par). */
typedef struct wide_job {
  const wide_plan *p;
  float *out, *pad, *V, *M;
  const float *in, *gate, *u, *b;
  int cin, cout, H, W, n, mode, accumulate;
  float leak;
  int img, ty0, rows, nimg, pad_new; /* the block */
} wide_job;

/* Parts split the channels (prep, output) or the products (GEMM) by shape
 * alone. */
#define WIDE_PARTS 4

/* Input channels [lo, hi): padded copies of the block's images (when the
 * block starts them), then their input transform. */
static void wide_prep_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  jem__part_range(j->cin, part, parts, &lo, &hi);
  if (hi == lo) return;
  const size_t cplane = p->plane, plane = (size_t)j->cin * cplane;
  const size_t hw = (size_t)j->H * j->W, coff = (size_t)lo * j->n * hw;
  const size_t ve = jem__wino_ld((size_t)j->cin * p->tb);
  const float *gate = j->gate ? j->gate + coff : NULL;
  for (int i = 0; i < j->nimg; i++) {
    float *pad = j->pad + i * plane + (size_t)lo * cplane;
    if (j->pad_new && p->f4)
      pad4(pad, j->in + coff, gate, hi - lo, j->n, j->img + i, j->H, j->W, j->mode, j->leak);
    else if (j->pad_new)
      jem__pad_image_s2(pad, j->in + coff, gate, hi - lo, j->n, j->img + i, j->H, j->W,
                        j->mode, j->leak);
    const int ta = i == 0 ? j->ty0 : 0, tr = j->nimg > 1 ? p->tr : j->rows;
    float *V = j->V + (size_t)lo * p->tb;
    const size_t tbase = (size_t)i * p->tr * p->tw;
    if (p->f4)
      w4_input(V, ve, p->tb, tbase, pad, hi - lo, j->H, j->W, ta, tr);
    else
      jem__wino_input(V, ve, p->tb, tbase, pad, hi - lo, j->H, j->W, ta, tr);
  }
}

/* Products [lo, hi) of the 16 or 36. */
static void wide_gemm_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  jem__part_range(p->ne, part, parts, &lo, &hi);
  const size_t ve = jem__wino_ld((size_t)j->cin * p->tb);
  const size_t me = jem__wino_ld((size_t)j->cout * p->tb);
  const size_t ue = jem__wide_mat_floats(j->cin, j->cout);
  for (int e = lo; e < hi; e++)
    jem__wide_product(j->M + e * me, p->tb, j->u + (size_t)e * ue, j->V + e * ve, p->tb, j->cin,
                      j->cout, j->rows * p->tw);
}

/* Output channels [lo, hi): the output transform into out. */
static void wide_out_part(void *arg, int part, int parts) {
  const wide_job *j = arg;
  const wide_plan *p = j->p;
  int lo, hi;
  jem__part_range(j->cout, part, parts, &lo, &hi);
  if (hi == lo) return;
  const size_t hw = (size_t)j->H * j->W, me = jem__wino_ld((size_t)j->cout * p->tb);
  float *out = j->out + (size_t)lo * j->n * hw;
  const float *M = j->M + (size_t)lo * p->tb, *b = j->b ? j->b + lo : NULL;
  if (p->f4)
    w4_output(out, M, me, b, hi - lo, j->n, j->H, j->W, p->tb, j->img, j->ty0, j->rows,
              j->accumulate);
  else
    jem__wino_output(out, M, me, b, hi - lo, j->n, j->H, j->W, p->tb, j->img, j->ty0,
                     j->rows, j->accumulate);
}

void jem__conv3x3_wide(float *out, const float *in, const float *gate, const float *u,
                       const float *b, int cin, int cout, int H, int W, int n, int mode,
                       float leak, int accumulate, int transposed, float *scratch) {
  const wide_plan p = wide_make_plan(cin, cout, H, W, n, wide_f4(H, W));
  wide_job j = {.p = &p, .out = out, .in = in, .gate = mode == PAD_GATE ? gate : NULL,
                .u = wide_u(u, p.ne, transposed, cin, cout), .b = b, .cin = cin,
                .cout = cout, .H = H, .W = W, .n = n, .mode = mode,
                .accumulate = accumulate, .leak = leak};
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
