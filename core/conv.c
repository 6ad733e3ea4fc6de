/* conv.c - layer kernels on C,N,H,W activations: direct AVX2 3x3 convolution
 * with im2col + sgemm as the general path, LeakyReLU, 8x8 average pool and
 * the linear head, forward and backward. */
#include "conv.h"
#include "internal.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* LeakyReLU as max(v, leak*v), exact for 0 <= leak <= 1 (the architecture
 * check enforces it); branch-free, so it vectorises and never mispredicts. */
static inline float lrelu(float v, float leak) {
  float t = v * leak;
  return v > t ? v : t;
}

/* d[i] = lrelu(s[i]) for i < n. */
static inline void lrelu_copy(float *d, const float *src, int n, float leak) {
  int i = 0;
#if defined(__SSE2__)
  const __m128 lv = _mm_set1_ps(leak);
  for (; i + 4 <= n; i += 4) {
    __m128 v = _mm_loadu_ps(src + i);
    _mm_storeu_ps(d + i, _mm_max_ps(v, _mm_mul_ps(v, lv)));
  }
#endif
  for (; i < n; i++) d[i] = lrelu(src[i], leak);
}

/* d[i] += s[i] for i < n. */
static inline void add_to(float *d, const float *src, size_t n) {
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4)
    _mm_storeu_ps(d + i, _mm_add_ps(_mm_loadu_ps(d + i), _mm_loadu_ps(src + i)));
#endif
  for (; i < n; i++) d[i] += src[i];
}

/* ------------------------------------------------------------------------ */
/* Direct 3x3 convolution (padding 1, stride 1 or 2) with AVX2+FMA.
 *
 * im2col copies every input nine times and OpenBLAS then packs the copy once
 * more; at the small channel counts of a WRN-10 those passes cost as much as
 * the arithmetic.  This kernel reads a zero-padded copy of one image (made
 * once, with the activation applied) and keeps a tile of 2 output channels x
 * 32 pixels in 8 registers.  Every output pixel is summed in the same order
 * (ci, ky, kx) whatever the batch, so results do not depend on batching. */

#define FAST_MAX_WEIGHTS (96 * 1024) /* floats: keep the weights in L2 */

static atomic_int g_fast = 1;

void jem__conv_set_fast(int on) {
  atomic_store(&g_fast, on >= 0 && on <= 3 ? on : 1);
}

static int cpu_has_avx2_fma(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  /* libgcc's check also requires the OS to save the AVX state */
  static atomic_int cached = -1;
  int v = atomic_load_explicit(&cached, memory_order_relaxed);
  if (v < 0) {
    __builtin_cpu_init();
    v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    atomic_store_explicit(&cached, v, memory_order_relaxed);
  }
  return v;
#else
  return 0;
#endif
}

/* The layers the direct kernel handles, whatever jem__conv_set_fast says. */
static int fast_shape(const jem__conv *c) {
  if (c->k != 3 || c->pad != 1) return 0;
  if (c->stride != 1 && c->stride != 2) return 0;
  if (c->wout != 8 && c->wout != 16 && c->wout != 32) return 0;
  if (c->hout % (32 / c->wout) != 0) return 0;
  if (c->hin != c->stride * c->hout || c->win != c->stride * c->wout) return 0;
  if ((size_t)c->cin * c->cout * 9 > FAST_MAX_WEIGHTS) return 0;
  return cpu_has_avx2_fma();
}

int jem__conv_fast(const jem__conv *c) {
  return atomic_load_explicit(&g_fast, memory_order_relaxed) && fast_shape(c);
}

void jem__conv_flip(float *wf, const float *w, const jem__conv *c) {
  JEM_ASSERT(c->k == 3);
  /* stride 1: flipped taps (a plain convolution); stride 2: taps kept, the
   * phase decomposition in conv3x3_s2_input_grad picks them one by one */
  const int flip = c->stride == 1;
  for (int co = 0; co < c->cout; co++)
    for (int ci = 0; ci < c->cin; ci++)
      for (int k = 0; k < 9; k++)
        wf[((size_t)ci * c->cout + co) * 9 + k] =
            w[((size_t)co * c->cin + ci) * 9 + (flip ? 8 - k : k)];
}

/* Floats of the padded copy of one image with `ch` channels. */
static size_t pad_size(const jem__conv *c, int ch) {
  return (size_t)ch * (c->hin + 2) * (c->win + 2);
}

enum { PAD_PLAIN, PAD_LRELU, PAD_GATE };

/* d[i] = s[i] * (g[i] > 0 ? 1 : leak): a gradient through LeakyReLU. */
static inline void gate_copy(float *d, const float *src, const float *g, size_t n,
                             float leak) {
  /* branch-free select: the signs of activations are close to random */
  size_t i = 0;
#if defined(__SSE2__)
  const __m128 one = _mm_set1_ps(1.0f), lv = _mm_set1_ps(leak), zero = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) {
    __m128 mask = _mm_cmpgt_ps(_mm_loadu_ps(g + i), zero);
    __m128 f = _mm_or_ps(_mm_and_ps(mask, one), _mm_andnot_ps(mask, lv));
    _mm_storeu_ps(d + i, _mm_mul_ps(_mm_loadu_ps(src + i), f));
  }
#endif
  for (; i < n; i++) d[i] = src[i] * (g[i] > 0.0f ? 1.0f : leak);
}

/* pad[ch, H+2, W+2] = zero border around f(src[ch][img]) where src is CNHW
 * with n images and f is the identity, LeakyReLU, or (PAD_GATE) the product
 * with LeakyReLU'(gate), gate laid out like src. */
static void pad_image(float *pad, const float *src, const float *gate, int ch,
                      int n, int img, int h, int w, int mode, float leak) {
  const int wp = w + 2;
  const size_t plane = (size_t)(h + 2) * wp, hw = (size_t)h * w;
  for (int ci = 0; ci < ch; ci++) {
    float *p = pad + ci * plane;
    const float *s = src + ((size_t)ci * n + img) * hw;
    memset(p, 0, sizeof(float) * wp);
    memset(p + (size_t)(h + 1) * wp, 0, sizeof(float) * wp);
    for (int y = 0; y < h; y++) {
      float *row = p + (size_t)(y + 1) * wp;
      row[0] = 0.0f;
      row[w + 1] = 0.0f;
      if (mode == PAD_LRELU)
        lrelu_copy(row + 1, s + (size_t)y * w, w, leak);
      else if (mode == PAD_GATE)
        gate_copy(row + 1, s + (size_t)y * w,
                  gate + ((size_t)ci * n + img) * hw + (size_t)y * w, w, leak);
      else
        memcpy(row + 1, s + (size_t)y * w, sizeof(float) * w);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* pad_image_s2 for w a multiple of 16 on AVX2: 16 input floats per step,
 * and the gate applied on the way (no separate gated row), the same
 * arithmetic as the SSE path, so the same values. */
__attribute__((target("avx2,fma"))) static void
pad_image_s2_avx2(float *pad, const float *src, const float *gate, int ch,
                  int n, int img, int h, int w, int mode, float leak) {
  const int wp = w + 2, half = w / 2 + 1;
  const size_t plane = (size_t)(h + 2) * wp, hw = (size_t)h * w;
  const __m256 lv = _mm256_set1_ps(leak), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  for (int ci = 0; ci < ch; ci++) {
    float *p = pad + ci * plane;
    const size_t off = ((size_t)ci * n + img) * hw;
    const float *s = src + off, *gs = mode == PAD_GATE ? gate + off : NULL;
    memset(p, 0, sizeof(float) * wp);
    memset(p + (size_t)(h + 1) * wp, 0, sizeof(float) * wp);
    for (int y = 0; y < h; y++) {
      float *e = p + (size_t)(y + 1) * wp, *o = e + half;
      const float *r = s + (size_t)y * w;
      e[0] = 0.0f;
      o[half - 1] = 0.0f;
      for (int j = 0; j < w / 2; j += 8) {
        __m256 a = _mm256_loadu_ps(r + 2 * j), b = _mm256_loadu_ps(r + 2 * j + 8);
        if (mode == PAD_LRELU) {
          a = _mm256_max_ps(a, _mm256_mul_ps(a, lv));
          b = _mm256_max_ps(b, _mm256_mul_ps(b, lv));
        } else if (mode == PAD_GATE) {
          const float *g = gs + (size_t)y * w + 2 * j;
          __m256 ma = _mm256_cmp_ps(_mm256_loadu_ps(g), zero, _CMP_GT_OQ);
          __m256 mb = _mm256_cmp_ps(_mm256_loadu_ps(g + 8), zero, _CMP_GT_OQ);
          a = _mm256_mul_ps(a, _mm256_blendv_ps(lv, one, ma));
          b = _mm256_mul_ps(b, _mm256_blendv_ps(lv, one, mb));
        }
        /* per 128-bit lane: evens | odds of a and b, then lanes in order */
        __m256d ev = _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
        __m256d od = _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
        _mm256_storeu_ps(o + j, _mm256_castpd_ps(_mm256_permute4x64_pd(ev, _MM_SHUFFLE(3, 1, 2, 0))));
        _mm256_storeu_ps(e + 1 + j, _mm256_castpd_ps(_mm256_permute4x64_pd(od, _MM_SHUFFLE(3, 1, 2, 0))));
      }
    }
  }
}
#endif

/* For stride 2: each padded row P (W+2 wide) stored as its even columns
 * then its odd columns, E[j] = P[2j], O[j] = P[2j+1] (W/2+1 each), so that the
 * taps kx = 0, 1, 2 of output column x read E[x], O[x] and E[x+1]:
 * contiguous loads again. */
static void pad_image_s2(float *pad, const float *src, const float *gate,
                         int ch, int n, int img, int h, int w, int mode,
                         float leak) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (w % 16 == 0 && cpu_has_avx2_fma()) {
    pad_image_s2_avx2(pad, src, gate, ch, n, img, h, w, mode, leak);
    return;
  }
#endif
  const int wp = w + 2, half = w / 2 + 1;
  const size_t plane = (size_t)(h + 2) * wp, hw = (size_t)h * w;
  for (int ci = 0; ci < ch; ci++) {
    float *p = pad + ci * plane;
    const float *s = src + ((size_t)ci * n + img) * hw;
    memset(p, 0, sizeof(float) * wp);
    memset(p + (size_t)(h + 1) * wp, 0, sizeof(float) * wp);
    for (int y = 0; y < h; y++) {
      float *e = p + (size_t)(y + 1) * wp, *o = e + half;
      const float *r = s + (size_t)y * w;
      /* PAD_GATE (Winograd input gradient): the gated row, then as plain */
      float grow[64];
      if (mode == PAD_GATE) {
        JEM_ASSERT(w <= 64);
        gate_copy(grow, r, gate + ((size_t)ci * n + img) * hw + (size_t)y * w,
                  (size_t)w, leak);
        r = grow;
      }
      e[0] = 0.0f;
      o[half - 1] = 0.0f;
      /* e[1 + j] = f(r[2j + 1]), o[j] = f(r[2j]) for j < w/2 */
      int j = 0;
#if defined(__SSE2__)
      const __m128 lv = _mm_set1_ps(leak);
      for (; j + 4 <= w / 2; j += 4) {
        __m128 a = _mm_loadu_ps(r + 2 * j), b = _mm_loadu_ps(r + 2 * j + 4);
        if (mode == PAD_LRELU) {
          a = _mm_max_ps(a, _mm_mul_ps(a, lv));
          b = _mm_max_ps(b, _mm_mul_ps(b, lv));
        }
        _mm_storeu_ps(o + j, _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm_storeu_ps(e + 1 + j, _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
      }
#endif
      for (; j < w / 2; j++) {
        float ev = r[2 * j + 1], ov = r[2 * j];
        if (mode == PAD_LRELU) {
          ev = lrelu(ev, leak);
          ov = lrelu(ov, leak);
        }
        e[1 + j] = ev;
        o[j] = ov;
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* One image: out[co][HW] (channel stride ocs) = (acc ? out : 0) + b + conv.
 * W is a compile-time constant in each instance; a tile is 32 pixels (slots
 * 0..3 of 8): one row of 32, two rows of 16 or four rows of 8.  The slots are
 * spelled out so that the accumulators stay in registers. */
/* Loads each input vector once into a register: left alone, GCC folds the
 * load into every FMA that uses it, doubling or tripling the loads. */
#define KEEP(v) __asm__("" : "+x"(v))
#define SLOT_P(s) (((s) / (W / 8)) * SR * Wp + 8 * ((s) % (W / 8)))
#define SLOT_O(s) (((s) / (W / 8)) * W + 8 * ((s) % (W / 8)))
/* Offset of tap t = 3 ky + kx in the padded input (see pad_image_s2). */
#define TOFF(t) (((t) / 3) * Wp + (SR == 1 ? (t) % 3 : ((t) % 3 == 0 ? 0 : (t) % 3 == 1 ? W + 1 : 1)))
/* MR (1..3) output channels x 32 pixels: with MR = 3, 12 accumulators, the 3
 * broadcast weights of a tap and one input vector fill the 16 registers, and
 * 12 independent FMA chains cover the FMA latency (8 did not: 2 FMAs per
 * cycle x 4-5 cycles); 7 loads per 12 FMAs instead of 6 per 8.  o and w
 * point at the first of the MR channels (w: channel stride cin*9). */
__attribute__((target("avx2,fma"), always_inline)) static inline void
conv3x3_tile_mr(float *o, size_t ocs, const float *pt, size_t plane,
                const float *w, const float *b, int cin, const int MR,
                const int W, const int SR, int accumulate) {
  const int Wp = SR * W + 2;
  const size_t wcs = (size_t)cin * 9;
  __m256 acc[3][4];
  _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++) {
    const __m256 bv = _mm256_set1_ps(b ? b[a] : 0.0f);
    _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) {
      acc[a][s] = bv;
      if (accumulate)
        acc[a][s] = _mm256_add_ps(bv, _mm256_loadu_ps(o + a * ocs + SLOT_O(s)));
    }
  }
  for (int ci = 0; ci < cin; ci++) {
    const float *pc = pt + ci * plane, *wc = w + ci * 9;
    _Pragma("GCC unroll 9") for (int t = 0; t < 9; t++) {
      /* opaque: with two or four rows per tile, tap (ky + 2, kx) of slot 0
       * reads what tap (ky, kx) of a lower slot read, and GCC would keep
       * that vector live across taps, spilling accumulators */
      const float *pk = pc + TOFF(t);
      if (W < 32) __asm__("" : "+r"(pk));
      __m256 k[3];
      _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
        k[a] = _mm256_broadcast_ss(wc + a * wcs + t);
      _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) {
        __m256 x = _mm256_loadu_ps(pk + SLOT_P(s));
        KEEP(x);
        _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
          acc[a][s] = _mm256_fmadd_ps(k[a], x, acc[a][s]);
      }
    }
  }
  _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
    _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++)
      _mm256_storeu_ps(o + a * ocs + SLOT_O(s), acc[a][s]);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
conv3x3_tile_loop(float *out, size_t ocs, const float *pad, const float *w,
                  const float *b, int cin, int cout, int H, const int W,
                  const int SR, int accumulate) {
  /* H, W: output size; SR: stride (input rows per output row) */
  const int Wp = SR * W + 2, R = 32 / W;
  const size_t plane = (size_t)(SR * H + 2) * Wp, wcs = (size_t)cin * 9;
  for (int y0 = 0; y0 < H; y0 += R) {
    const float *pt = pad + (size_t)y0 * SR * Wp;
    float *ob = out + (size_t)y0 * W;
    int co = 0;
    for (; co + 3 <= cout; co += 3)
      conv3x3_tile_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs,
                      b ? b + co : NULL, cin, 3, W, SR, accumulate);
    /* each channel's sum runs in the same order whatever its group */
    if (cout - co == 2)
      conv3x3_tile_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs,
                      b ? b + co : NULL, cin, 2, W, SR, accumulate);
    else if (cout - co == 1)
      conv3x3_tile_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs,
                      b ? b + co : NULL, cin, 1, W, SR, accumulate);
  }
}
#undef SLOT_P
#undef SLOT_O
#undef TOFF
#undef KEEP

__attribute__((target("avx2,fma"))) static void
conv3x3_image(float *out, size_t ocs, const float *pad, const float *w,
              const float *b, int cin, int cout, int H, int W, int stride,
              int accumulate) {
#define CASE(WW, SS)                                                        \
  case WW * 4 + SS:                                                         \
    conv3x3_tile_loop(out, ocs, pad, w, b, cin, cout, H, WW, SS, accumulate); \
    break
  switch (W * 4 + stride) {
    CASE(32, 1); CASE(16, 1); CASE(8, 1);
    CASE(32, 2); CASE(16, 2); CASE(8, 2);
  default: JEM_ASSERT(!"unsupported shape for the direct kernel");
  }
#undef CASE
}
/* out[co][H*W] (channel stride ocs) = sum over the ntap taps of
 * w[co][ci][tt[k]] * pad[ci][y + ., x + .] at offset toff[k]: a 3x3 kernel
 * restricted to some taps, for the phases of a stride-2 input gradient.
 * MR (1..3) channels x 32 pixels per tile, as in conv3x3_tile_mr. */
#define KEEP(v) __asm__("" : "+x"(v))
#define SP(s) (((s) / (W / 8)) * Wp + 8 * ((s) % (W / 8)))
#define SO(s) (((s) / (W / 8)) * W + 8 * ((s) % (W / 8)))
__attribute__((target("avx2,fma"), always_inline)) static inline void
conv_taps_mr(float *o, size_t ocs, const float *pt, size_t plane,
             const float *w, int cin, const int MR, const int W, int ntap,
             const int *tt, const int *toff) {
  const int Wp = W + 2;
  const size_t wcs = (size_t)cin * 9;
  __m256 acc[3][4];
  _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
    _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++)
      acc[a][s] = _mm256_setzero_ps();
  for (int ci = 0; ci < cin; ci++) {
    const float *pc = pt + ci * plane, *wc = w + ci * 9;
    for (int k = 0; k < ntap; k++) {
      const float *pk = pc + toff[k];
      __m256 kv[3];
      _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
        kv[a] = _mm256_broadcast_ss(wc + a * wcs + tt[k]);
      _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) {
        __m256 x = _mm256_loadu_ps(pk + SP(s));
        KEEP(x);
        _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
          acc[a][s] = _mm256_fmadd_ps(kv[a], x, acc[a][s]);
      }
    }
  }
  _Pragma("GCC unroll 3") for (int a = 0; a < MR; a++)
    _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++)
      _mm256_storeu_ps(o + a * ocs + SO(s), acc[a][s]);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
conv_taps_loop(float *out, size_t ocs, const float *pad, const float *w,
               int cin, int cout, int H, const int W, int ntap, const int *tt,
               const int *toff) {
  const int Wp = W + 2, R = 32 / W;
  const size_t plane = (size_t)(H + 2) * Wp, wcs = (size_t)cin * 9;
  for (int y0 = 0; y0 < H; y0 += R) {
    const float *pt = pad + (size_t)y0 * Wp;
    float *ob = out + (size_t)y0 * W;
    int co = 0;
    for (; co + 3 <= cout; co += 3)
      conv_taps_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs, cin, 3, W,
                   ntap, tt, toff);
    if (cout - co == 2)
      conv_taps_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs, cin, 2, W,
                   ntap, tt, toff);
    else if (cout - co == 1)
      conv_taps_mr(ob + co * ocs, ocs, pt, plane, w + co * wcs, cin, 1, W,
                   ntap, tt, toff);
  }
}
#undef SP
#undef SO
#undef KEEP

__attribute__((target("avx2,fma"))) static void
conv_taps_image(float *out, size_t ocs, const float *pad, const float *w,
                int cin, int cout, int H, int W, int ntap, const int *tt,
                const int *toff) {
  switch (W) {
  case 32: conv_taps_loop(out, ocs, pad, w, cin, cout, H, 32, ntap, tt, toff); break;
  case 16: conv_taps_loop(out, ocs, pad, w, cin, cout, H, 16, ntap, tt, toff); break;
  case 8: conv_taps_loop(out, ocs, pad, w, cin, cout, H, 8, ntap, tt, toff); break;
  default: JEM_ASSERT(!"unsupported shape for the direct kernel");
  }
}
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

/* dw[co][ci][ky][kx] += sum over the pixels of one image of dout[co] times
 * the padded input shifted by the tap: the weight gradient as a correlation.
 * Two output channels x one kernel row (3 taps) = 6 accumulators that run
 * over the whole image before being reduced. */
#define KEEP(v) __asm__("" : "+x"(v))
#define SLOT_P(s) (((s) / (W / 8)) * SR * Wp + 8 * ((s) % (W / 8)))
#define SLOT_O(s) (((s) / (W / 8)) * W + 8 * ((s) % (W / 8)))
#define KXOFF(kx) (SR == 1 ? (kx) : ((kx) == 0 ? 0 : (kx) == 1 ? W + 1 : 1))
__attribute__((target("avx2,fma"), always_inline)) static inline void
conv3x3_dw_loop(float *dw, const float *dout, size_t ocs, const float *pad,
                int cin, int cout, int H, const int W, const int SR) {
  const int Wp = SR * W + 2, R = 32 / W;
  const size_t plane = (size_t)(SR * H + 2) * Wp;
  const int p0 = SLOT_P(0), p1 = SLOT_P(1), p2 = SLOT_P(2), p3 = SLOT_P(3);
  const int q0 = SLOT_O(0), q1 = SLOT_O(1), q2 = SLOT_O(2), q3 = SLOT_O(3);
  for (int co = 0; co < cout; co += 2) {
    const int two = co + 1 < cout;
    const float *d0 = dout + (size_t)co * ocs, *d1 = two ? d0 + ocs : d0;
    for (int ci = 0; ci < cin; ci++) {
      for (int ky = 0; ky < 3; ky++) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00;
        __m256 a10 = a00, a11 = a00, a12 = a00;
        for (int y0 = 0; y0 < H; y0 += R) {
          const float *pk = pad + ci * plane + ((size_t)y0 * SR + ky) * Wp;
          const float *e0 = d0 + (size_t)y0 * W, *e1 = d1 + (size_t)y0 * W;
#define DSLOT(p, q)                                                          \
  do {                                                                       \
    __m256 g0 = _mm256_loadu_ps(e0 + (q)), g1 = _mm256_loadu_ps(e1 + (q));   \
    KEEP(g0); KEEP(g1);                                                      \
    __m256 x = _mm256_loadu_ps(pk + (p) + KXOFF(0)); KEEP(x);                \
    a00 = _mm256_fmadd_ps(g0, x, a00); a10 = _mm256_fmadd_ps(g1, x, a10);    \
    x = _mm256_loadu_ps(pk + (p) + KXOFF(1)); KEEP(x);                       \
    a01 = _mm256_fmadd_ps(g0, x, a01); a11 = _mm256_fmadd_ps(g1, x, a11);    \
    x = _mm256_loadu_ps(pk + (p) + KXOFF(2)); KEEP(x);                       \
    a02 = _mm256_fmadd_ps(g0, x, a02); a12 = _mm256_fmadd_ps(g1, x, a12);    \
  } while (0)
          DSLOT(p0, q0); DSLOT(p1, q1); DSLOT(p2, q2); DSLOT(p3, q3);
#undef DSLOT
        }
        float *w0 = dw + ((size_t)co * cin + ci) * 9 + ky * 3;
        w0[0] += hsum8(a00);
        w0[1] += hsum8(a01);
        w0[2] += hsum8(a02);
        if (two) {
          float *w1 = w0 + (size_t)cin * 9;
          w1[0] += hsum8(a10);
          w1[1] += hsum8(a11);
          w1[2] += hsum8(a12);
        }
      }
    }
  }
}
#undef KEEP
#undef SLOT_P
#undef SLOT_O
#undef KXOFF

__attribute__((target("avx2,fma"))) static void
conv3x3_dw_image(float *dw, const float *dout, size_t ocs, const float *pad,
                 int cin, int cout, int H, int W, int stride) {
#define CASE(WW, SS)                                                  \
  case WW * 4 + SS:                                                   \
    conv3x3_dw_loop(dw, dout, ocs, pad, cin, cout, H, WW, SS);        \
    break
  switch (W * 4 + stride) {
    CASE(32, 1); CASE(16, 1); CASE(8, 1);
    CASE(32, 2); CASE(16, 2); CASE(8, 2);
  default: JEM_ASSERT(!"unsupported shape for the direct kernel");
  }
#undef CASE
}
#else
static void conv3x3_dw_image(float *dw, const float *dout, size_t ocs,
                             const float *pad, int cin, int cout, int H, int W,
                             int stride) {
  (void)dw; (void)dout; (void)ocs; (void)pad; (void)cin; (void)cout; (void)H;
  (void)W; (void)stride;
  JEM_ASSERT(!"direct kernel not built for this CPU");
}
static void conv_taps_image(float *out, size_t ocs, const float *pad,
                            const float *w, int cin, int cout, int H, int W,
                            int ntap, const int *tt, const int *toff) {
  (void)out; (void)ocs; (void)pad; (void)w; (void)cin; (void)cout; (void)H;
  (void)W; (void)ntap; (void)tt; (void)toff;
  JEM_ASSERT(!"direct kernel not built for this CPU");
}
static void conv3x3_image(float *out, size_t ocs, const float *pad,
                          const float *w, const float *b, int cin, int cout,
                          int H, int W, int stride, int accumulate) {
  (void)out; (void)ocs; (void)pad; (void)w; (void)b; (void)cin; (void)cout;
  (void)H; (void)W; (void)stride; (void)accumulate;
  JEM_ASSERT(!"direct kernel not built for this CPU");
}
#endif

/* ------------------------------------------------------------------------ */
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

static int wino_shape_ok(int H, int W) {
  /* 8 tiles per vector: W/2 a multiple of 8, or two rows of 4 tiles */
  if (H < 2 || H % 2 || W < 8 || W % 2 || W > 64) return 0;
  if (W == 8) return H % 4 == 0;
  return (W / 2) % 8 == 0;
}

/* Distance between the 16 planes of V or M: the transforms touch all 16 at
 * once, and a power-of-two distance (8 KB, say) would put them all in one L1
 * set; one extra cache line spreads them. */
static size_t wino_ld(size_t plane) { return ((plane + 15) & ~(size_t)15) + 16; }

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
  p.u = (size_t)16 * cin * cout;
  p.v = 16 * wino_ld((size_t)cin * tb);
  p.m = 16 * wino_ld((size_t)cout * tb);
  return p;
}

static size_t wino_scratch(int cin, int cout, int H, int W, int n) {
  if (!wino_shape_ok(H, W)) return 0;
  wino_plan p = wino_make_plan(cin, cout, H, W, n);
  return p.pad + p.u + p.v + p.m + 4 * 16; /* + 64-byte alignment of each */
}

/* Whether a cin -> cout stride-1 layer of this shape runs on Winograd:
 * g_fast 1 picks per shape (see the measurements in wino_pays), 2 never,
 * 3 always where the shape allows. */
static int wino_pays(int cin, int cout, int H, int W, int n);
static int wino_use(int cin, int cout, int H, int W, int n) {
  int mode = atomic_load_explicit(&g_fast, memory_order_relaxed);
  if (mode == 0 || mode == 2 || !wino_shape_ok(H, W) || !cpu_has_avx2_fma())
    return 0;
  return mode == 3 || wino_pays(cin, cout, H, W, n);
}

static inline float *align16f(float *p) {
  return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

#if defined(__x86_64__) && defined(__GNUC__)

/* U[e][co][ci] = (G g G^T)[e] for g = w[co][ci] (3x3), eight (co, ci) pairs
 * per vector: the pairs are consecutive in both w and U. */
__attribute__((target("avx2,fma"))) static void
wino_weights(float *U, const float *w, int cin, int cout) {
  const size_t np = (size_t)cin * cout;
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
    for (int y = 0; y < 4; y++) {
      __m256 a = r[y][0], b = r[y][1], c = r[y][2];
      __m256 ac = _mm256_add_ps(a, c);
      _mm256_storeu_ps(U + (size_t)(4 * y + 0) * np + p, a);
      _mm256_storeu_ps(U + (size_t)(4 * y + 1) * np + p, _mm256_mul_ps(half, _mm256_add_ps(ac, b)));
      _mm256_storeu_ps(U + (size_t)(4 * y + 2) * np + p, _mm256_mul_ps(half, _mm256_sub_ps(ac, b)));
      _mm256_storeu_ps(U + (size_t)(4 * y + 3) * np + p, c);
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
    for (int y = 0; y < 4; y++) {
      float a = r[y][0], b = r[y][1], c = r[y][2], ac = a + c;
      U[(size_t)(4 * y + 0) * np + p] = a;
      U[(size_t)(4 * y + 1) * np + p] = 0.5f * (ac + b);
      U[(size_t)(4 * y + 2) * np + p] = 0.5f * (ac - b);
      U[(size_t)(4 * y + 3) * np + p] = c;
    }
  }
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
 * of pad_image_s2: each padded row as its even then its odd columns, so
 * patch column j of tile tx is E[tx], O[tx], E[tx+1], O[tx+1]: plain loads)
 * into V (e stride ve, channel stride tb) from local tile tbase on. */
__attribute__((target("avx2,fma"))) static void
wino_input(float *V, size_t ve, size_t tb, size_t tbase, const float *pad,
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

/* M[co][t] = sum_ci U[co][ci] V[ci][t] for MR channels x 8*NV tiles, kept in
 * MR*NV registers: 3 x 4 = 12 accumulators, 3 broadcast weights and one
 * input vector fill the 16 registers exactly (4 loads and 3 broadcasts per
 * 12 FMAs); holding all 4 input vectors at once would spill. */
#define WINO_GEMM_TILE(MR, NV)                                                 \
  __attribute__((target("avx2,fma"), always_inline)) static inline void       \
  wino_gemm_##MR##x##NV(float *m, size_t ldm, const float *u, size_t ldu,     \
                        const float *v, size_t ldv, int k) {                  \
    __m256 acc[MR][NV];                                                        \
    _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                       \
      _Pragma("GCC unroll 8") for (int b = 0; b < NV; b++)                     \
        acc[a][b] = _mm256_setzero_ps();                                       \
    for (int ci = 0; ci < k; ci++) {                                           \
      __m256 s[MR];                                                            \
      _Pragma("GCC unroll 8") for (int a = 0; a < MR; a++)                     \
        s[a] = _mm256_broadcast_ss(u + (size_t)a * ldu + ci);                  \
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

/* The 16 products of a block: M[e] (cout x nt) = U[e] (cout x cin) V[e]
 * (cin x nt), nt a multiple of 8; tiles in strips of 32 (then 16, 8). */
__attribute__((target("avx2,fma"))) static void
wino_gemm(float *M, const float *U, const float *V, int cin, int cout,
          size_t tb, int nt) {
  const size_t me = wino_ld((size_t)cout * tb), ve = wino_ld((size_t)cin * tb);
  const size_t ue = (size_t)cout * cin;
  for (int e = 0; e < 16; e++) {
    const float *ue_ = U + e * ue, *ve_ = V + e * ve;
    float *me_ = M + e * me;
    int t = 0;
#define STRIP(NV)                                                           \
  for (; t + 8 * (NV) <= nt; t += 8 * (NV)) {                               \
    int co = 0;                                                             \
    for (; co + 3 <= cout; co += 3)                                         \
      wino_gemm_3x##NV(me_ + co * tb + t, tb, ue_ + (size_t)co * cin, cin,  \
                       ve_ + t, tb, cin);                                   \
    if (cout - co == 2)                                                     \
      wino_gemm_2x##NV(me_ + co * tb + t, tb, ue_ + (size_t)co * cin, cin,  \
                       ve_ + t, tb, cin);                                   \
    else if (cout - co == 1)                                                \
      wino_gemm_1x##NV(me_ + co * tb + t, tb, ue_ + (size_t)co * cin, cin,  \
                       ve_ + t, tb, cin);                                   \
  }
    STRIP(4)
    STRIP(2)
    STRIP(1)
#undef STRIP
  }
}

/* Output transform: for every channel and 8 tiles, Y = A^T M A (2x2 per
 * tile) + bias, written (or added) to out [cout][n][H][W]. */
__attribute__((target("avx2,fma"))) static void
wino_output(float *out, const float *M, const float *b, int cout, int n,
            int H, int W, size_t tb, int img, int ty0, int rows,
            int accumulate) {
  const size_t me = wino_ld((size_t)cout * tb), hw = (size_t)H * W;
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

/* out[cout, n, H, W] (+)= b + conv3x3(f(in)), f as in pad_image_s2, on
 * Winograd F(2x2, 3x3); scratch: wino_scratch(cin, cout, H, W, n) floats.
 * wu: w already transformed (jem__conv_wino_weights), or NULL to transform
 * it here. */
__attribute__((target("avx2,fma"))) static void
conv3x3_wino(float *out, const float *in, const float *gate, const float *w,
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
    wino_weights(Ubuf, w, cin, cout);
    U = Ubuf;
  }
  const int total = n * p.tr;
  for (int r0 = 0; r0 < total; r0 += p.rb) {
    const int img = r0 / p.tr, ty0 = r0 % p.tr;
    const int rows = total - r0 < p.rb ? total - r0 : p.rb;
    const int nimg = (rows + p.tr - 1) / p.tr; /* > 1 only when ipb > 1 */
    if (ty0 == 0)
      for (int i = 0; i < nimg; i++)
        pad_image_s2(pad + i * plane, in, gate, cin, n, img + i, H, W, mode, leak);
    for (int i = 0; i < nimg; i++) {
      const int ta = i == 0 ? ty0 : 0;
      const int tr = nimg > 1 ? p.tr : rows;
      wino_input(V, wino_ld((size_t)cin * tb), tb, (size_t)i * p.tr * p.tw,
                 pad + i * plane, cin, H, W, ta, tr);
    }
    (void)hw;
    wino_gemm(M, U, V, cin, cout, tb, rows * p.tw);
    wino_output(out, M, b, cout, n, H, W, tb, img, ty0, rows, accumulate);
  }
}

#else
static void conv3x3_wino(float *out, const float *in, const float *gate,
                         const float *w, const float *wu, const float *b,
                         int cin, int cout, int H, int W, int n, int mode,
                         float leak, int accumulate, float *scratch) {
  (void)out; (void)in; (void)gate; (void)w; (void)wu; (void)b; (void)cin; (void)cout;
  (void)H; (void)W; (void)n; (void)mode; (void)leak; (void)accumulate;
  (void)scratch;
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
  if (c->stride != 1 || !fast_shape(c) || !wino_shape_ok(c->hout, c->wout)) return 0;
  return (size_t)16 * c->cin * c->cout;
}

void jem__conv_wino_weights(float *wu, const float *w, int cin, int cout) {
#if defined(__x86_64__) && defined(__GNUC__)
  wino_weights(wu, w, cin, cout);
#else
  (void)wu; (void)w; (void)cin; (void)cout;
  JEM_ASSERT(!"Winograd kernel not built for this CPU");
#endif
}

/* out[cout, n, H, W] (+)= b + conv(f(in)) image by image through the direct
 * kernel, or on Winograd where that pays (wu: w's transform, or NULL); pad
 * holds one padded image. */
static void conv3x3_direct(float *out, const float *in, const float *gate,
                           const float *w, const float *wu,
                           const float *b, int cin, int cout, const jem__conv *c,
                           int n, int mode, float leak, int accumulate,
                           float *pad, size_t cap) {
  /* the transposed convolution (stride 1 only) swaps the channel counts
   * but keeps the map size */
  const int Ho = c->hout, Wo = c->wout;
  const size_t hwo = (size_t)Ho * Wo, ocs = (size_t)n * hwo;
  if (c->stride == 1 && wino_use(cin, cout, Ho, Wo, n)) {
    JEM_ASSERT(wino_scratch(cin, cout, Ho, Wo, n) <= cap);
    conv3x3_wino(out, in, gate, w, wu, b, cin, cout, Ho, Wo, n, mode, leak,
                 accumulate, pad);
    return;
  }
  JEM_ASSERT(pad_size(c, cin) <= cap);
  for (int i = 0; i < n; i++) {
    if (c->stride == 2)
      pad_image_s2(pad, in, gate, cin, n, i, c->hin, c->win, mode, leak);
    else
      pad_image(pad, in, gate, cin, n, i, c->hin, c->win, mode, leak);
    conv3x3_image(out + (size_t)i * hwo, ocs, pad, w, b, cin, cout, Ho, Wo,
                  c->stride, accumulate);
  }
}

/* Floats of scratch the stride-2 input gradient needs: the padded dout of one
 * image and its four phase results. */
static size_t s2_grad_scratch(const jem__conv *c) {
  return (size_t)c->cout * (c->hout + 2) * (c->wout + 2) +
         (size_t)c->cin * c->hin * c->win;
}

/* din[cin, n, 2Ho, 2Wo] += input gradient of a 3x3 stride-2 convolution
 * given dout [cout, n, Ho, Wo] and wt[ci][co][t] = w[co][ci][t].  Input pixel
 * (2j+py, 2i+px) only meets taps ky = 1 (py = 0) or ky in {0, 2} (py = 1),
 * and likewise for x, so each of the four phases of din is a small
 * convolution of dout: 1, 2, 2 and 4 taps, computed by the direct kernel
 * and interleaved back. */
static void conv3x3_s2_input_grad(float *din, const float *dout,
                                  const float *gate, float leak,
                                  const float *wt, const jem__conv *c, int n,
                                  float *scratch, int overwrite) {
  const int Ho = c->hout, Wo = c->wout, Hi = c->hin, Wi = c->win;
  const int wp = Wo + 2;
  const size_t pho = (size_t)Ho * Wo, hwi = (size_t)Hi * Wi;
  float *pad = scratch;
  float *ph = scratch + (size_t)c->cout * (Ho + 2) * wp; /* [4][cin][Ho*Wo] */
  for (int img = 0; img < n; img++) {
    pad_image(pad, dout, gate, c->cout, n, img, Ho, Wo,
              gate ? PAD_GATE : PAD_PLAIN, leak);
    for (int py = 0; py < 2; py++)
      for (int px = 0; px < 2; px++) {
        int tt[4], toff[4], nt = 0;
        for (int ky = 0; ky < 3; ky++) {
          if ((py == 0) != (ky == 1)) continue;
          const int dy = (py == 1 && ky == 0) ? 1 : 0;
          for (int kx = 0; kx < 3; kx++) {
            if ((px == 0) != (kx == 1)) continue;
            const int dx = (px == 1 && kx == 0) ? 1 : 0;
            tt[nt] = ky * 3 + kx;
            toff[nt] = (dy + 1) * wp + (dx + 1);
            nt++;
          }
        }
        conv_taps_image(ph + (size_t)(py * 2 + px) * c->cin * pho, pho, pad,
                        wt, c->cout, c->cin, Ho, Wo, nt, tt, toff);
      }
    for (int ci = 0; ci < c->cin; ci++) {
      float *d = din + ((size_t)ci * n + img) * hwi;
      const float *f00 = ph + (size_t)ci * pho, *f01 = f00 + (size_t)c->cin * pho;
      const float *f10 = f01 + (size_t)c->cin * pho, *f11 = f10 + (size_t)c->cin * pho;
      for (int j = 0; j < Ho; j++) {
        float *r0 = d + (size_t)(2 * j) * Wi, *r1 = r0 + Wi;
        const size_t o = (size_t)j * Wo;
        int i = 0;
        if (overwrite) {
#if defined(__SSE2__)
          for (; i + 4 <= Wo; i += 4) {
            __m128 e0 = _mm_loadu_ps(f00 + o + i), o0 = _mm_loadu_ps(f01 + o + i);
            __m128 e1 = _mm_loadu_ps(f10 + o + i), o1 = _mm_loadu_ps(f11 + o + i);
            _mm_storeu_ps(r0 + 2 * i, _mm_unpacklo_ps(e0, o0));
            _mm_storeu_ps(r0 + 2 * i + 4, _mm_unpackhi_ps(e0, o0));
            _mm_storeu_ps(r1 + 2 * i, _mm_unpacklo_ps(e1, o1));
            _mm_storeu_ps(r1 + 2 * i + 4, _mm_unpackhi_ps(e1, o1));
          }
#endif
          for (; i < Wo; i++) {
            r0[2 * i] = f00[o + i];
            r0[2 * i + 1] = f01[o + i];
            r1[2 * i] = f10[o + i];
            r1[2 * i + 1] = f11[o + i];
          }
          continue;
        }
#if defined(__SSE2__)
        for (; i + 4 <= Wo; i += 4) {
          __m128 e0 = _mm_loadu_ps(f00 + o + i), o0 = _mm_loadu_ps(f01 + o + i);
          __m128 e1 = _mm_loadu_ps(f10 + o + i), o1 = _mm_loadu_ps(f11 + o + i);
          float *a = r0 + 2 * i, *b = r1 + 2 * i;
          _mm_storeu_ps(a, _mm_add_ps(_mm_loadu_ps(a), _mm_unpacklo_ps(e0, o0)));
          _mm_storeu_ps(a + 4, _mm_add_ps(_mm_loadu_ps(a + 4), _mm_unpackhi_ps(e0, o0)));
          _mm_storeu_ps(b, _mm_add_ps(_mm_loadu_ps(b), _mm_unpacklo_ps(e1, o1)));
          _mm_storeu_ps(b + 4, _mm_add_ps(_mm_loadu_ps(b + 4), _mm_unpackhi_ps(e1, o1)));
        }
#endif
        for (; i < Wo; i++) {
          r0[2 * i] += f00[o + i];
          r0[2 * i + 1] += f01[o + i];
          r1[2 * i] += f10[o + i];
          r1[2 * i + 1] += f11[o + i];
        }
      }
    }
  }
}

/* Sum of n floats: float partial sums over blocks of 1024, added in double. */
static double row_sum(const float *g, size_t n) {
  double acc = 0.0;
  size_t i = 0;
#if defined(__SSE2__)
  while (i + 8 <= n) {
    size_t end = i + 1024 < n ? i + 1024 : n;
    __m128 s0 = _mm_setzero_ps(), s1 = _mm_setzero_ps();
    for (; i + 8 <= end; i += 8) {
      s0 = _mm_add_ps(s0, _mm_loadu_ps(g + i));
      s1 = _mm_add_ps(s1, _mm_loadu_ps(g + i + 4));
    }
    float t[4];
    _mm_storeu_ps(t, _mm_add_ps(s0, s1));
    acc += (double)t[0] + t[1] + t[2] + t[3];
  }
#endif
  for (; i < n; i++) acc += g[i];
  return acc;
}

int jem__conv_direct(const jem__conv *c, int act) {
  return c->k == 1 && c->stride == 1 && c->pad == 0 && !act;
}

/* Images per chunk: as many as fit in cap floats of im2col, at least one. */
static int chunk_images(const jem__conv *c, int n, size_t cap) {
  size_t per = (size_t)jem__conv_rows(c) * (size_t)jem__conv_hwo(c);
  size_t nc = per ? cap / per : (size_t)n;
  if (nc < 1) nc = 1;
  if (nc > (size_t)n) nc = (size_t)n;
  return (int)nc;
}

size_t jem__conv_col_need(const jem__conv *c, int n, size_t cap) {
  if (n < 1) n = 1;
  size_t need = (size_t)chunk_images(c, n, cap) * (size_t)jem__conv_rows(c) *
                (size_t)jem__conv_hwo(c);
  if (jem__conv_fast(c)) {
    size_t p = c->stride == 1 ? pad_size(c, c->cin > c->cout ? c->cin : c->cout)
                              : pad_size(c, c->cin);
    if (c->stride == 2 && s2_grad_scratch(c) > p) p = s2_grad_scratch(c);
    if (c->stride == 1) {
      /* Winograd scratch for both directions whenever the shape allows it,
       * whatever the per-shape choice, so that switching never overflows */
      size_t wf = wino_scratch(c->cin, c->cout, c->hout, c->wout, n);
      size_t wb = wino_scratch(c->cout, c->cin, c->hout, c->wout, n);
      if (wf > p) p = wf;
      if (wb > p) p = wb;
    }
    if (p > need) need = p;
  }
  return need;
}

/* Output columns [lo, hi) whose input column ox*s - p + kx lies inside. */
static void valid_range(int wo, int wi, int s, int p, int kx, int *lo, int *hi) {
  int a = p - kx; /* need ox*s >= a */
  int l = a <= 0 ? 0 : (a + s - 1) / s;
  int b = wi - 1 + p - kx; /* need ox*s <= b */
  int h = b < 0 ? 0 : b / s + 1;
  if (l > wo) l = wo;
  if (h > wo) h = wo;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

void jem__im2col(float *col, const float *in, const jem__conv *c, int n,
                 int n0, int nc, int act, float leak) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = 0; ci < c->cin; ci++) {
    for (int ky = 0; ky < k; ky++) {
      for (int kx = 0; kx < k; kx++) {
        float *row = col + ((size_t)(ci * k + ky) * k + kx) * ld;
        int lo, hix;
        valid_range(wo, wi, s, p, kx, &lo, &hix);
        for (int j = 0; j < nc; j++) {
          const float *src = in + ((size_t)ci * n + n0 + j) * hwi;
          float *dst = row + (size_t)j * hwo;
          for (int oy = 0; oy < ho; oy++) {
            float *d = dst + (size_t)oy * wo;
            int iy = oy * s - p + ky;
            if (iy < 0 || iy >= hi) {
              memset(d, 0, sizeof(float) * (size_t)wo);
              continue;
            }
            /* first valid input element; index arithmetic keeps the
             * pointer inside the row */
            const float *sr = src + (size_t)iy * wi + (lo * s - p + kx);
            for (int ox = 0; ox < lo; ox++) d[ox] = 0.0f;
            for (int ox = hix; ox < wo; ox++) d[ox] = 0.0f;
            float *dd = d + lo;
            const int cnt = hix - lo;
            if (s == 1) {
              if (act) {
                lrelu_copy(dd, sr, cnt, leak);
              } else if (cnt > 0) {
                memcpy(dd, sr, sizeof(float) * (size_t)cnt);
              }
            } else {
              if (act) {
                for (int i = 0; i < cnt; i++) dd[i] = lrelu(sr[i * s], leak);
              } else {
                for (int i = 0; i < cnt; i++) dd[i] = sr[i * s];
              }
            }
          }
        }
      }
    }
  }
}

void jem__col2im(float *in, const float *col, const jem__conv *c, int n,
                 int n0, int nc) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = 0; ci < c->cin; ci++) {
    for (int ky = 0; ky < k; ky++) {
      for (int kx = 0; kx < k; kx++) {
        const float *row = col + ((size_t)(ci * k + ky) * k + kx) * ld;
        int lo, hix;
        valid_range(wo, wi, s, p, kx, &lo, &hix);
        for (int j = 0; j < nc; j++) {
          float *dst = in + ((size_t)ci * n + n0 + j) * hwi;
          const float *src = row + (size_t)j * hwo;
          for (int oy = 0; oy < ho; oy++) {
            int iy = oy * s - p + ky;
            if (iy < 0 || iy >= hi) continue;
            const float *sr = src + (size_t)oy * wo + lo;
            float *d = dst + (size_t)iy * wi + (lo * s - p + kx);
            const int cnt = hix - lo;
            if (s == 1) {
              if (cnt > 0) add_to(d, sr, (size_t)cnt);
            } else {
              int i = 0;
#if defined(__SSE2__)
              if (s == 2) {
                /* d[2i] += sr[i]: interleave with zeros and add; stops one
                 * short so that d[2 cnt - 1] is never touched */
                const __m128 z = _mm_setzero_ps();
                for (; i + 4 < cnt; i += 4) {
                  __m128 t = _mm_loadu_ps(sr + i);
                  float *q = d + 2 * i;
                  _mm_storeu_ps(q, _mm_add_ps(_mm_loadu_ps(q), _mm_unpacklo_ps(t, z)));
                  _mm_storeu_ps(q + 4, _mm_add_ps(_mm_loadu_ps(q + 4), _mm_unpackhi_ps(t, z)));
                }
              }
#endif
              for (; i < cnt; i++) d[i * s] += sr[i];
            }
          }
        }
      }
    }
  }
}

void jem__conv_forward(float *out, const float *in, const float *w,
                       const float *wu, const float *b, const jem__conv *c,
                       int n, int act, float leak, int accumulate, float *col,
                       size_t col_cap) {
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)n * hwo;
  JEM_ASSERT(n >= 1);
  if (jem__conv_fast(c)) {
    JEM_ASSERT(pad_size(c, c->cin) <= col_cap);
    conv3x3_direct(out, in, NULL, w, wu, b, c->cin, c->cout, c, n,
                   act ? PAD_LRELU : PAD_PLAIN, leak, accumulate, col, col_cap);
    return;
  }
  for (int co = 0; co < c->cout; co++) {
    float *o = out + (size_t)co * ldo, bv = b ? b[co] : 0.0f;
    if (accumulate) {
      for (size_t i = 0; i < ldo; i++) o[i] += bv;
    } else {
      for (size_t i = 0; i < ldo; i++) o[i] = bv;
    }
  }
  if (jem__conv_direct(c, act)) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->cout, (int)ldo,
                c->cin, 1.0f, w, c->cin, in, (int)ldo, 1.0f, out, (int)ldo);
    return;
  }
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  for (int n0 = 0; n0 < n; n0 += nc) {
    int m = n - n0 < nc ? n - n0 : nc;
    jem__im2col(col, in, c, n, n0, m, act, leak);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->cout, m * hwo,
                rows, 1.0f, w, rows, col, m * hwo, 1.0f,
                out + (size_t)n0 * hwo, (int)ldo);
  }
}

void jem__conv_backward(const float *dout, const float *in, const float *w,
                        const float *wf, const jem__conv *c, int n, int act,
                        float leak, float *dw, float *db, float *din,
                        float *col, size_t col_cap) {
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)n * hwo;
  JEM_ASSERT(n >= 1);
  if (db)
    for (int co = 0; co < c->cout; co++) db[co] += (float)row_sum(dout + (size_t)co * ldo, ldo);
  if (!dw && !din) return;
  if (wf && din && jem__conv_fast(c)) {
    if (c->stride == 1) {
      /* the input gradient of a 3x3 stride-1 convolution is the convolution
       * of dout with the flipped, transposed weights */
      JEM_ASSERT(pad_size(c, c->cout) <= col_cap);
      conv3x3_direct(din, dout, NULL, wf, NULL, NULL, c->cout, c->cin, c, n,
                     PAD_PLAIN, leak, 1, col, col_cap);
    } else {
      JEM_ASSERT(s2_grad_scratch(c) <= col_cap);
      conv3x3_s2_input_grad(din, dout, NULL, leak, wf, c, n, col, 0);
    }
    din = NULL;
    if (!dw) return;
  }
  if (dw && jem__conv_fast(c)) {
    /* weight gradient image by image from the padded (activated) input */
    JEM_ASSERT(pad_size(c, c->cin) <= col_cap);
    const size_t hw = (size_t)c->hout * c->wout;
    for (int i = 0; i < n; i++) {
      if (c->stride == 2)
        pad_image_s2(col, in, NULL, c->cin, n, i, c->hin, c->win,
                     act ? PAD_LRELU : PAD_PLAIN, leak);
      else
        pad_image(col, in, NULL, c->cin, n, i, c->hin, c->win,
                  act ? PAD_LRELU : PAD_PLAIN, leak);
      conv3x3_dw_image(dw, dout + (size_t)i * hw, ldo, col, c->cin, c->cout,
                       c->hout, c->wout, c->stride);
    }
    dw = NULL;
    if (!din) return;
  }
  if (jem__conv_direct(c, act)) {
    if (dw)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, c->cin,
                  (int)ldo, 1.0f, dout, (int)ldo, in, (int)ldo, 1.0f, dw,
                  c->cin);
    if (din)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->cin, (int)ldo,
                  c->cout, 1.0f, w, c->cin, dout, (int)ldo, 1.0f, din,
                  (int)ldo);
    return;
  }
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  for (int n0 = 0; n0 < n; n0 += nc) {
    int m = n - n0 < nc ? n - n0 : nc;
    const float *g = dout + (size_t)n0 * hwo;
    if (dw) {
      jem__im2col(col, in, c, n, n0, m, act, leak);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, rows,
                  m * hwo, 1.0f, g, (int)ldo, col, m * hwo, 1.0f, dw, rows);
    }
    if (din) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, m * hwo,
                  c->cout, 1.0f, w, rows, g, (int)ldo, 0.0f, col, m * hwo);
      jem__col2im(din, col, c, n, n0, m);
    }
  }
}

void jem__conv_input_grad(float *din, const float *dout, const float *gate,
                          float leak, const float *wf, const float *wuf,
                          const jem__conv *c, int n, float *col, size_t col_cap) {
  JEM_ASSERT(jem__conv_fast(c) && wf && n >= 1);
  const int mode = gate ? PAD_GATE : PAD_PLAIN;
  if (c->stride == 1) {
    JEM_ASSERT(pad_size(c, c->cout) <= col_cap);
    conv3x3_direct(din, dout, gate, wf, wuf, NULL, c->cout, c->cin, c, n, mode,
                   leak, 0, col, col_cap);
  } else {
    JEM_ASSERT(s2_grad_scratch(c) <= col_cap);
    conv3x3_s2_input_grad(din, dout, gate, leak, wf, c, n, col, 1);
  }
}

void jem__lrelu_backward_add(float *g, const float *a, const float *add,
                             size_t len, float leak) {
  size_t i = 0;
#if defined(__SSE2__)
  const __m128 one = _mm_set1_ps(1.0f), lv = _mm_set1_ps(leak), zero = _mm_setzero_ps();
  for (; i + 4 <= len; i += 4) {
    __m128 mask = _mm_cmpgt_ps(_mm_loadu_ps(a + i), zero);
    __m128 f = _mm_or_ps(_mm_and_ps(mask, one), _mm_andnot_ps(mask, lv));
    __m128 v = _mm_mul_ps(_mm_loadu_ps(g + i), f);
    _mm_storeu_ps(g + i, _mm_add_ps(v, _mm_loadu_ps(add + i)));
  }
#endif
  for (; i < len; i++) g[i] = g[i] * (a[i] > 0.0f ? 1.0f : leak) + add[i];
}

void jem__lrelu_backward(float *g, const float *a, size_t len, float leak) {
  gate_copy(g, g, a, len, leak);
}

void jem__pool_forward(float *feat, const float *a, int c, int n, int hw,
                       float leak) {
  for (int ci = 0; ci < c; ci++) {
    for (int ni = 0; ni < n; ni++) {
      const float *r = a + ((size_t)ci * n + ni) * hw;
      float s = 0.0f;
      for (int i = 0; i < hw; i++) s += lrelu(r[i], leak);
      feat[(size_t)ni * c + ci] = s / (float)hw;
    }
  }
}

void jem__pool_backward(float *da, const float *dfeat, const float *a, int c,
                        int n, int hw, float leak) {
  for (int ci = 0; ci < c; ci++) {
    for (int ni = 0; ni < n; ni++) {
      size_t off = ((size_t)ci * n + ni) * hw;
      float g = dfeat[(size_t)ni * c + ci] / (float)hw;
      for (int i = 0; i < hw; i++)
        da[off + i] += a[off + i] > 0.0f ? g : g * leak;
    }
  }
}

void jem__linear_forward(float *y, const float *x, const float *w,
                         const float *b, int n, int f, int k) {
  for (int i = 0; i < n; i++)
    for (int j = 0; j < k; j++) y[(size_t)i * k + j] = b ? b[j] : 0.0f;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, k, f, 1.0f, x, f, w,
              f, 1.0f, y, k);
}

void jem__linear_backward(const float *dy, const float *x, const float *w,
                          int n, int f, int k, float *dw, float *db, float *dx) {
  if (db)
    for (int i = 0; i < n; i++)
      for (int j = 0; j < k; j++) db[j] += dy[(size_t)i * k + j];
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, f, n, 1.0f, dy, k,
                x, f, 1.0f, dw, f);
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, f, k, 1.0f, dy,
                k, w, f, 1.0f, dx, f);
}

void jem__to_cnhw(float *dst, const float *src, int n, int c, int hw) {
  for (int ni = 0; ni < n; ni++)
    for (int ci = 0; ci < c; ci++)
      memcpy(dst + ((size_t)ci * n + ni) * hw, src + ((size_t)ni * c + ci) * hw,
             sizeof(float) * (size_t)hw);
}

void jem__from_cnhw_acc(float *dst, const float *src, int n, int c, int hw) {
  for (int ni = 0; ni < n; ni++)
    for (int ci = 0; ci < c; ci++) {
      float *d = dst + ((size_t)ni * c + ci) * hw;
      const float *s = src + ((size_t)ci * n + ni) * hw;
      for (int i = 0; i < hw; i++) d[i] += s[i];
    }
}
