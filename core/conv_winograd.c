/* conv_winograd.c - Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions
 * with AVX2+FMA: weight, input and output transforms and the 16 products
 * (with AVX-512, on conv_wide.c's micro-kernels).  conv.c decides when it
 * runs (jem__wino_use). */
#include "conv_kern.h"
#include "internal.h"

#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions.
 *
 * Each 2x2 block of outputs ("tile") comes from a 4x4 patch of the padded
 * input: out = A^T [ (G g G^T) .* (B^T d B) ] A.  The 16 products of a tile
 * summed over the input channels are 16 independent matrix products
 *   M[e][co][t] = sum_ci U[e][co][ci] V[e][ci][t]     (e = 0..15)
 * with 16 multiplies per 4 outputs instead of 36: 2.25x fewer FMAs than the
 * direct kernel, for input/output transforms that cost a few adds per value.
 * The tiles of all the images of a slice are concatenated (an 8x8 map has
 * only 16), and processed in blocks of whole tile rows whose V and M stay in
 * L2.  A tile's outputs depend only on its own patch and the weights, summed
 * in a fixed order: results do not depend on batching or threads. */

/* Blocking plan for a cin -> cout convolution of H x W maps over n images:
 * blocks of rb global tile rows (all images' tile rows concatenated), which
 * either split one image (rb divides its tile rows) or hold ipb whole
 * images.  All sizes in floats. */
typedef struct wino_plan {
  int tr, tw;          /* tile rows and tiles per row of one image */
  int rb, ipb;         /* tile rows per block, images padded per block */
  size_t pad, u, v, m; /* scratch: padded images, U, V and M of a block */
} wino_plan;

/* Floats of V plus M per block aimed for: about 128 KB, well inside L2 with
 * U next to it. */
#ifndef WINO_BLOCK_FLOATS
#define WINO_BLOCK_FLOATS (32 * 1024)
#endif

int jem__wino_shape_ok(int H, int W) {
  /* 8 tiles per vector: W/2 a multiple of 8, or two rows of 4 tiles */
  if (H < 2 || H % 2 || W < 8 || W % 2 || W > 64) return 0;
  if (W == 8) return H % 4 == 0;
  return (W / 2) % 8 == 0;
}


static wino_plan wino_make_plan(int cin, int cout, int H, int W, int n) {
  wino_plan p;
  p.tr = H / 2;
  p.tw = W / 2;
  size_t per_tile = (size_t)16 * (cin + cout);
  size_t want = WINO_BLOCK_FLOATS / per_tile / (size_t)p.tw; /* tile rows */
  /* at least 32 tiles, so that the GEMM runs on its widest strips */
  if (want * (size_t)p.tw < 32) want = (32 + (size_t)p.tw - 1) / (size_t)p.tw;
  const int step = W == 8 ? 2 : 1; /* tile rows per 8-tile group */
  if (want >= (size_t)p.tr) {
    p.ipb = (int)(want / (size_t)p.tr);
    if (p.ipb > n) p.ipb = n;
    p.rb = p.ipb * p.tr;
  } else {
    /* the largest divisor of tr (a multiple of step) not above want */
    int rb = step;
    for (int d = step; d <= (int)want; d += step)
      if (p.tr % d == 0) rb = d;
    p.rb = rb;
    p.ipb = 1;
  }
  const size_t tb = (size_t)p.rb * p.tw;
  p.pad = (size_t)p.ipb * cin * (H + 2) * (W + 2);
  p.u = 16 * jem__wide_mat_floats(cin, cout);
  p.v = 16 * jem__wino_ld((size_t)cin * tb);
  p.m = 16 * jem__wino_ld((size_t)cout * tb);
  return p;
}

size_t jem__wino_scratch(int cin, int cout, int H, int W, int n) {
  if (!jem__wino_shape_ok(H, W)) return 0;
  wino_plan p = wino_make_plan(cin, cout, H, W, n);
  return p.pad + p.u + p.v + p.m + 4 * 16; /* + 64-byte alignment of each */
}

/* Whether a cin -> cout stride-1 layer of this shape runs on Winograd:
 * mode 1 (jem__conv_set_fast) picks per shape (see the measurements in wino_pays), 2 never,
 * 3 always where the shape allows. */
static int wino_pays(int cin, int cout, int H, int W, int n);
int jem__wino_use(int cin, int cout, int H, int W, int n) {
  int mode = jem__conv_mode();
  if (mode == 0 || mode == 2 || !jem__wino_shape_ok(H, W) || !jem__cpu_avx2_fma())
    return 0;
  return mode == 3 || wino_pays(cin, cout, H, W, n);
}

static inline float *align16f(float *p) {
  return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

#if defined(__x86_64__) && defined(__GNUC__)

/* Where pair p = co * cin + ci of a product goes in its block of U:
 * row-major, or in the micro-kernels' panels (JEM__WIDE_MR channels of co,
 * column ci; co may lie past cout, in the last panel's zero rows). */
static inline size_t u_at(size_t p, int cin, int packed) {
  if (!packed) return p;
  const size_t co = p / (size_t)cin, ci = p % (size_t)cin;
  return (co / JEM__WIDE_MR * (size_t)cin + ci) * JEM__WIDE_MR + co % JEM__WIDE_MR;
}

/* U[e] = (G g G^T)[e] for g = w[co][ci] (3x3), eight (co, ci) pairs per
 * vector (consecutive in w). */
__attribute__((target("avx2,fma"))) void
jem__wino_weights(float *U, const float *w, int cin, int cout, int packed) {
  const size_t np = (size_t)cin * cout;
  const size_t ue = packed ? jem__wide_mat_floats(cin, cout) : np;
  size_t p = 0;
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256i idx = _mm256_setr_epi32(0, 9, 18, 27, 36, 45, 54, 63);
  for (; p + 8 <= np; p += 8) {
    const float *src = w + p * 9;
    __m256 g[9];
    for (int k = 0; k < 9; k++) g[k] = _mm256_i32gather_ps(src + k, idx, 4);
    /* rows of G g: g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2 (gk = kernel row k) */
    __m256 r[4][3];
    for (int x = 0; x < 3; x++) {
      __m256 a = g[x], b = g[3 + x], c = g[6 + x];
      __m256 ac = _mm256_add_ps(a, c);
      r[0][x] = a;
      r[1][x] = _mm256_mul_ps(half, _mm256_add_ps(ac, b));
      r[2][x] = _mm256_mul_ps(half, _mm256_sub_ps(ac, b));
      r[3][x] = c;
    }
    __m256 o[16];
    for (int y = 0; y < 4; y++) {
      __m256 a = r[y][0], b = r[y][1], c = r[y][2];
      __m256 ac = _mm256_add_ps(a, c);
      o[4 * y + 0] = a;
      o[4 * y + 1] = _mm256_mul_ps(half, _mm256_add_ps(ac, b));
      o[4 * y + 2] = _mm256_mul_ps(half, _mm256_sub_ps(ac, b));
      o[4 * y + 3] = c;
    }
    if (!packed) {
      for (int e = 0; e < 16; e++) _mm256_storeu_ps(U + (size_t)e * ue + p, o[e]);
      continue;
    }
    size_t at[8];
    float t[8];
    for (int l = 0; l < 8; l++) at[l] = u_at(p + (size_t)l, cin, 1);
    for (int e = 0; e < 16; e++) {
      _mm256_storeu_ps(t, o[e]);
      for (int l = 0; l < 8; l++) U[(size_t)e * ue + at[l]] = t[l];
    }
  }
  for (; p < np; p++) { /* the same arithmetic, one pair at a time */
    const float *g = w + p * 9;
    float r[4][3];
    for (int x = 0; x < 3; x++) {
      float a = g[x], b = g[3 + x], c = g[6 + x], ac = a + c;
      r[0][x] = a;
      r[1][x] = 0.5f * (ac + b);
      r[2][x] = 0.5f * (ac - b);
      r[3][x] = c;
    }
    const size_t at = u_at(p, cin, packed);
    for (int y = 0; y < 4; y++) {
      float a = r[y][0], b = r[y][1], c = r[y][2], ac = a + c;
      U[(size_t)(4 * y + 0) * ue + at] = a;
      U[(size_t)(4 * y + 1) * ue + at] = 0.5f * (ac + b);
      U[(size_t)(4 * y + 2) * ue + at] = 0.5f * (ac - b);
      U[(size_t)(4 * y + 3) * ue + at] = c;
    }
  }
  if (!packed) return;
  /* the last panel's rows past cout: zeros, which the kernels multiply */
  for (int e = 0; e < 16; e++)
    for (size_t p0 = np; p0 < ue; p0++) U[(size_t)e * ue + u_at(p0, cin, 1)] = 0.0f;
}

/* V[e][ci][t0 + 0..7] = (B^T d B)[e] for 8 tiles, given the 16 patch values
 * d[i][j] (row i, column j of the 4x4 patch), each a vector over the tiles. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
wino_in_store(float *V, size_t ve, __m256 d[4][4]) {
  __m256 r[4][4];
  for (int i = 0; i < 4; i++) { /* d B, row by row */
    r[i][0] = _mm256_sub_ps(d[i][0], d[i][2]);
    r[i][1] = _mm256_add_ps(d[i][1], d[i][2]);
    r[i][2] = _mm256_sub_ps(d[i][2], d[i][1]);
    r[i][3] = _mm256_sub_ps(d[i][1], d[i][3]);
  }
  for (int j = 0; j < 4; j++) { /* B^T (d B), column by column */
    _mm256_storeu_ps(V + (size_t)(0 + j) * ve, _mm256_sub_ps(r[0][j], r[2][j]));
    _mm256_storeu_ps(V + (size_t)(4 + j) * ve, _mm256_add_ps(r[1][j], r[2][j]));
    _mm256_storeu_ps(V + (size_t)(8 + j) * ve, _mm256_sub_ps(r[2][j], r[1][j]));
    _mm256_storeu_ps(V + (size_t)(12 + j) * ve, _mm256_sub_ps(r[1][j], r[3][j]));
  }
}

/* Input transform of tile rows [lr0, lr0 + rows) of one padded image (layout
 * of jem__pad_image_s2: each padded row as its even then its odd columns, so
 * patch column j of tile tx is E[tx], O[tx], E[tx+1], O[tx+1]: plain loads)
 * into V (e stride ve, channel stride tb) from local tile tbase on. */
__attribute__((target("avx2,fma"))) void
jem__wino_input(float *V, size_t ve, size_t tb, size_t tbase, const float *pad,
           int cin, int H, int W, int ty0, int rows) {
  const int wp = W + 2, half = W / 2 + 1, tw = W / 2;
  const size_t plane = (size_t)(H + 2) * wp;
  for (int ci = 0; ci < cin; ci++) {
    const float *pc = pad + ci * plane;
    float *vc = V + ci * tb + tbase;
    if (W == 8) {
      /* 4 tiles per row: a vector holds tile rows ty and ty + 1 */
      for (int r = 0; r < rows; r += 2) {
        __m256 d[4][4];
        for (int i = 0; i < 4; i++) {
          const float *e0 = pc + (size_t)(2 * (ty0 + r) + i) * wp, *e1 = e0 + 2 * wp;
          d[i][0] = _mm256_set_m128(_mm_loadu_ps(e1), _mm_loadu_ps(e0));
          d[i][1] = _mm256_set_m128(_mm_loadu_ps(e1 + half), _mm_loadu_ps(e0 + half));
          d[i][2] = _mm256_set_m128(_mm_loadu_ps(e1 + 1), _mm_loadu_ps(e0 + 1));
          d[i][3] = _mm256_set_m128(_mm_loadu_ps(e1 + half + 1), _mm_loadu_ps(e0 + half + 1));
        }
        wino_in_store(vc + (size_t)r * 4, ve, d);
      }
      continue;
    }
    for (int r = 0; r < rows; r++) {
      const float *row = pc + (size_t)(2 * (ty0 + r)) * wp;
      for (int tx = 0; tx < tw; tx += 8) {
        __m256 d[4][4];
        for (int i = 0; i < 4; i++) {
          const float *e = row + (size_t)i * wp + tx;
          d[i][0] = _mm256_loadu_ps(e);
          d[i][1] = _mm256_loadu_ps(e + half);
          d[i][2] = _mm256_loadu_ps(e + 1);
          d[i][3] = _mm256_loadu_ps(e + half + 1);
        }
        wino_in_store(vc + (size_t)r * tw + tx, ve, d);
      }
    }
  }
}

/* Without AVX-512: M[co][t] = sum_ci U[co][ci] V[ci][t] for MR channels x
 * 8*NV tiles of a packed panel (u: the panel's column 0 at row co), kept in
 * MR*NV registers: 3 x 4 = 12 accumulators, 3 broadcast weights and one
 * input vector fill the 16 registers exactly (4 loads and 3 broadcasts per
 * 12 FMAs); holding all 4 input vectors at once would spill.  On narrow
 * layers (16 to 64 input channels) these measured 3 to 10% faster than
 * conv_wide.c's AVX2 kernels; the sums are the same, bit for bit. */
#define WINO_GEMM_TILE(MR, NV)                                                 \
  __attribute__((target("avx2,fma"), always_inline)) static inline void       \
  wino_gemm_##MR##x##NV(float *m, size_t ldm, const float *u, const float *v, \
                        size_t ldv, int k) {                                  \
    __m256 acc[MR][NV];                                                        \
    _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                       \
      _Pragma("GCC unroll 8") for (int b = 0; b < NV; b++)                     \
        acc[a][b] = _mm256_setzero_ps();                                       \
    for (int ci = 0; ci < k; ci++) {                                           \
      __m256 s[MR];                                                            \
      _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                     \
        s[a] = _mm256_broadcast_ss(u + (size_t)ci * JEM__WIDE_MR + a);         \
      _Pragma("GCC unroll 8") for (int b = 0; b < NV; b++) {                   \
        /* one register for the input vector, loaded once (see KEEP) */        \
        __m256 x = _mm256_loadu_ps(v + (size_t)ci * ldv + 8 * b);              \
        __asm__("" : "+x"(x));                                                 \
        _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                   \
          acc[a][b] = _mm256_fmadd_ps(s[a], x, acc[a][b]);                     \
      }                                                                        \
    }                                                                          \
    _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                       \
      _Pragma("GCC unroll 8") for (int b = 0; b < NV; b++)                     \
        _mm256_storeu_ps(m + (size_t)a * ldm + 8 * b, acc[a][b]);              \
  }
WINO_GEMM_TILE(3, 4)
WINO_GEMM_TILE(2, 4)
WINO_GEMM_TILE(1, 4)
WINO_GEMM_TILE(3, 2)
WINO_GEMM_TILE(2, 2)
WINO_GEMM_TILE(1, 2)
WINO_GEMM_TILE(3, 1)
WINO_GEMM_TILE(2, 1)
WINO_GEMM_TILE(1, 1)
#undef WINO_GEMM_TILE

/* The 16 products of a block: M[e] (cout x nt) = U[e] (cout x cin, packed)
 * V[e] (cin x nt), nt a multiple of 8: on conv_wide.c's micro-kernels with
 * AVX-512, else on the kernels above, tiles in strips of 32 (then 16, 8). */
__attribute__((target("avx2,fma"))) static void
wino_gemm(float *M, const float *U, const float *V, int cin, int cout, size_t tb, int nt) {
  const size_t me = jem__wino_ld((size_t)cout * tb), ve = jem__wino_ld((size_t)cin * tb);
  const size_t ue = jem__wide_mat_floats(cin, cout);
  if (jem__wide_avx512()) {
    for (int e = 0; e < 16; e++)
      jem__wide_product(M + e * me, tb, U + e * ue, V + e * ve, tb, cin, cout, nt);
    return;
  }
  for (int e = 0; e < 16; e++) {
    const float *ue_ = U + e * ue, *ve_ = V + e * ve;
    float *me_ = M + e * me;
    int t = 0;
    /* row co of the panels: 3 rows never straddle two (12 = 4 x 3) */
#define UROW(co) (ue_ + u_at((size_t)(co) * cin, cin, 1))
#define STRIP(NV)                                                                        \
  for (; t + 8 * (NV) <= nt; t += 8 * (NV)) {                                            \
    int co = 0;                                                                          \
    for (; co + 3 <= cout; co += 3)                                                      \
      wino_gemm_3x##NV(me_ + co * tb + t, tb, UROW(co), ve_ + t, tb, cin);               \
    if (cout - co == 2)                                                                  \
      wino_gemm_2x##NV(me_ + co * tb + t, tb, UROW(co), ve_ + t, tb, cin);               \
    else if (cout - co == 1)                                                             \
      wino_gemm_1x##NV(me_ + co * tb + t, tb, UROW(co), ve_ + t, tb, cin);               \
  }
    STRIP(4)
    STRIP(2)
    STRIP(1)
#undef STRIP
#undef UROW
  }
}

/* Output transform: for every channel and 8 tiles, Y = A^T M A (2x2 per
 * tile) + bias, written (or added) to out [cout][n][H][W]. */
__attribute__((target("avx2,fma"))) void
jem__wino_output(float *out, const float *M, size_t me, const float *b, int cout, int n,
                 int H, int W, size_t tb, int img, int ty0, int rows,
                 int accumulate) {
  const size_t hw = (size_t)H * W;
  const int tw = W / 2, step = W == 8 ? 2 : 1, gw = W == 8 ? 4 : 8;
  for (int co = 0; co < cout; co++) {
    const __m256 bias = _mm256_set1_ps(b ? b[co] : 0.0f);
    const float *mc = M + co * tb;
    /* rows of the block may cover several images (ipb > 1) */
    for (int r = 0; r < rows; r += step) {
      const int gy = ty0 + r, im = img + gy / (H / 2), ty = gy % (H / 2);
      float *o = out + ((size_t)co * n + im) * hw + (size_t)(2 * ty) * W;
      for (int tx = 0; tx < tw; tx += gw) {
        const float *mt = mc + (size_t)r * tw + tx;
        __m256 s0[4], s1[4];
        for (int i = 0; i < 4; i++) { /* M A, row by row */
          __m256 m0 = _mm256_loadu_ps(mt + (size_t)(4 * i + 0) * me);
          __m256 m1 = _mm256_loadu_ps(mt + (size_t)(4 * i + 1) * me);
          __m256 m2 = _mm256_loadu_ps(mt + (size_t)(4 * i + 2) * me);
          __m256 m3 = _mm256_loadu_ps(mt + (size_t)(4 * i + 3) * me);
          s0[i] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
          s1[i] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
        }
        __m256 y[2][2]; /* A^T (M A) */
        y[0][0] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]), bias);
        y[0][1] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]), bias);
        y[1][0] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3]), bias);
        y[1][1] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3]), bias);
        for (int dy = 0; dy < 2; dy++) {
          /* interleave the two columns: tiles 0-3 then 4-7 as 8 pixels each */
          __m256 lo = _mm256_unpacklo_ps(y[dy][0], y[dy][1]);
          __m256 hi = _mm256_unpackhi_ps(y[dy][0], y[dy][1]);
          __m256 p0 = _mm256_permute2f128_ps(lo, hi, 0x20);
          __m256 p1 = _mm256_permute2f128_ps(lo, hi, 0x31);
          /* W == 8: the second half is the next tile row, 2 rows down */
          float *q0 = o + (size_t)dy * W + 2 * tx;
          float *q1 = W == 8 ? q0 + 2 * W : q0 + 8;
          if (accumulate) {
            p0 = _mm256_add_ps(p0, _mm256_loadu_ps(q0));
            p1 = _mm256_add_ps(p1, _mm256_loadu_ps(q1));
          }
          _mm256_storeu_ps(q0, p0);
          _mm256_storeu_ps(q1, p1);
        }
      }
    }
  }
}

/* out[cout, n, H, W] (+)= b + conv3x3(f(in)), f as in jem__pad_image_s2, on
 * Winograd F(2x2, 3x3); scratch: jem__wino_scratch(cin, cout, H, W, n) floats.
 * wu: w already transformed (jem__conv_wino_weights), or NULL to transform
 * it here. */
__attribute__((target("avx2,fma"))) void
jem__conv3x3_wino(float *out, const float *in, const float *gate, const float *w,
                  const float *wu, const float *b, int cin, int cout, int H, int W,
                  int n, int mode, float leak, int accumulate, float *scratch) {
  const wino_plan p = wino_make_plan(cin, cout, H, W, n);
  float *pad = align16f(scratch);
  float *Ubuf = align16f(pad + p.pad);
  float *V = align16f(Ubuf + p.u);
  float *M = align16f(V + p.v);
  const size_t tb = (size_t)p.rb * p.tw, hw = (size_t)H * W;
  const size_t plane = (size_t)cin * (H + 2) * (W + 2);
  const float *U = wu;
  if (!U) {
    jem__wino_weights(Ubuf, w, cin, cout, 1);
    U = Ubuf;
  }
  const int total = n * p.tr;
  for (int r0 = 0; r0 < total; r0 += p.rb) {
    const int img = r0 / p.tr, ty0 = r0 % p.tr;
    const int rows = total - r0 < p.rb ? total - r0 : p.rb;
    const int nimg = (rows + p.tr - 1) / p.tr; /* > 1 only when ipb > 1 */
    if (ty0 == 0)
      for (int i = 0; i < nimg; i++)
        jem__pad_image_s2(pad + i * plane, in, gate, cin, n, img + i, H, W, mode, leak);
    for (int i = 0; i < nimg; i++) {
      const int ta = i == 0 ? ty0 : 0;
      const int tr = nimg > 1 ? p.tr : rows;
      jem__wino_input(V, jem__wino_ld((size_t)cin * tb), tb, (size_t)i * p.tr * p.tw,
                 pad + i * plane, cin, H, W, ta, tr);
    }
    (void)hw;
    wino_gemm(M, U, V, cin, cout, tb, rows * p.tw);
    jem__wino_output(out, M, jem__wino_ld((size_t)cout * tb), b, cout, n, H, W, tb, img, ty0, rows, accumulate);
  }
}

#else
void jem__conv3x3_wino(float *out, const float *in, const float *gate,
                         const float *w, const float *wu, const float *b,
                         int cin, int cout, int H, int W, int n, int mode,
                         float leak, int accumulate, float *scratch) {
  (void)out; (void)in; (void)gate; (void)w; (void)wu; (void)b; (void)cin; (void)cout;
  (void)H; (void)W; (void)n; (void)mode; (void)leak; (void)accumulate;
  (void)scratch;
  JEM_ASSERT(!"Winograd kernel not built for this CPU");
}
void jem__wino_weights(float *U, const float *w, int cin, int cout, int packed) {
  (void)U; (void)w; (void)cin; (void)cout; (void)packed;
  JEM_ASSERT(!"Winograd kernel not built for this CPU");
}
#endif

/* Per-shape choice, from timings of one layer on a 2-core AMD EPYC (AVX2,
 * 512 KB L2), slice of 8 images, direct -> Winograd: 16->16 at 32x32 455 ->
 * 390 us, 32->32 at 16x16 435 -> 295, 64->64 at 8x8 490 -> 275, 32->64 at
 * 16x16 865 -> 530.  With 1 or 16 channels on a side (the stem and its
 * input gradient) the transforms cost more than the products save (2-4x
 * slower), and a lone 8x8 image (16 tiles) runs the GEMM on narrow strips:
 * 61 -> 73 us for 64->64, a tie at two images.  The choice depends on the
 * slice's image count n, never on threads. */
static int wino_pays(int cin, int cout, int H, int W, int n) {
  return cin >= 8 && cout >= 8 && (size_t)n * (H / 2) * (W / 2) >= 32;
}

size_t jem__conv_wino_floats(const jem__conv *c) {
  /* by shape alone, not jem__conv_set_fast's mode: workspaces are planned
   * with it */
  if (c->stride != 1 || !jem__conv_fast_shape(c) || !jem__wino_shape_ok(c->hout, c->wout)) return 0;
  /* either direction's (the input gradient's swaps cin and cout) */
  const size_t fwd = jem__wide_mat_floats(c->cin, c->cout), back = jem__wide_mat_floats(c->cout, c->cin);
  return 16 * (fwd > back ? fwd : back);
}

void jem__conv_wino_weights(float *wu, const float *w, int cin, int cout) {
#if defined(__x86_64__) && defined(__GNUC__)
  jem__wino_weights(wu, w, cin, cout, 1);
#else
  (void)wu; (void)w; (void)cin; (void)cout;
  JEM_ASSERT(!"Winograd kernel not built for this CPU");
#endif
}
