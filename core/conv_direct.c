/* conv_direct.c - the direct 3x3 convolution kernels (padding 1, stride 1 or
 * 2) with AVX2+FMA: the padded copies of an image they read, forward, the
 * weight gradient and the stride-2 input gradient by phases.  conv.c decides
 * when they run. */
#include "conv_kern.h"
#include "internal.h"

#include <string.h>

/* Direct 3x3 convolution (padding 1, stride 1 or 2) with AVX2+FMA.
 *
 * im2col copies every input nine times and OpenBLAS then packs the copy once
 * more; at the small channel counts of a WRN-10 those passes cost as much as
 * the arithmetic.  This kernel reads a zero-padded copy of one image (made
 * once, with the activation applied) and keeps a tile of 2 output channels x
 * 32 pixels in 8 registers.  Every output pixel is summed in the same order
 * (ci, ky, kx) whatever the batch, so results do not depend on batching. */

/* pad[ch, H+2, W+2] = zero border around f(src[ch][img]) where src is CNHW
 * with n images and f is the identity, LeakyReLU, or (PAD_GATE) the product
 * with LeakyReLU'(gate), gate laid out like src. */
void jem__pad_image(float *pad, const float *src, const float *gate, int ch,
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
/* jem__pad_image_s2 for w a multiple of 16 on AVX2: 16 input floats per step,
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
void jem__pad_image_s2(float *pad, const float *src, const float *gate,
                         int ch, int n, int img, int h, int w, int mode,
                         float leak) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (w % 16 == 0 && jem__cpu_avx2_fma()) {
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
/* Offset of tap t = 3 ky + kx in the padded input (see jem__pad_image_s2). */
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

__attribute__((target("avx2,fma"))) void
jem__conv3x3_image(float *out, size_t ocs, const float *pad, const float *w,
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

__attribute__((target("avx2,fma"))) void
jem__conv3x3_dw_image(float *dw, const float *dout, size_t ocs, const float *pad,
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
void jem__conv3x3_dw_image(float *dw, const float *dout, size_t ocs,
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
void jem__conv3x3_image(float *out, size_t ocs, const float *pad,
                          const float *w, const float *b, int cin, int cout,
                          int H, int W, int stride, int accumulate) {
  (void)out; (void)ocs; (void)pad; (void)w; (void)b; (void)cin; (void)cout;
  (void)H; (void)W; (void)stride; (void)accumulate;
  JEM_ASSERT(!"direct kernel not built for this CPU");
}
#endif

/* Floats of scratch the stride-2 input gradient needs: the padded dout of one
 * image and its four phase results. */
size_t jem__s2_grad_scratch(const jem__conv *c) {
  return (size_t)c->cout * (c->hout + 2) * (c->wout + 2) +
         (size_t)c->cin * c->hin * c->win;
}

/* din[cin, n, 2Ho, 2Wo] += input gradient of a 3x3 stride-2 convolution
 * given dout [cout, n, Ho, Wo] and wt[ci][co][t] = w[co][ci][t].  Input pixel
 * (2j+py, 2i+px) only meets taps ky = 1 (py = 0) or ky in {0, 2} (py = 1),
 * and likewise for x, so each of the four phases of din is a small
 * convolution of dout: 1, 2, 2 and 4 taps, computed by the direct kernel
 * and interleaved back. */
void jem__conv3x3_s2_input_grad(float *din, const float *dout,
                                  const float *gate, float leak,
                                  const float *wt, const jem__conv *c, int n,
                                  float *scratch, int overwrite) {
  const int Ho = c->hout, Wo = c->wout, Hi = c->hin, Wi = c->win;
  const int wp = Wo + 2;
  const size_t pho = (size_t)Ho * Wo, hwi = (size_t)Hi * Wi;
  float *pad = scratch;
  float *ph = scratch + (size_t)c->cout * (Ho + 2) * wp; /* [4][cin][Ho*Wo] */
  for (int img = 0; img < n; img++) {
    jem__pad_image(pad, dout, gate, c->cout, n, img, Ho, Wo,
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
