/* conv_kern.h - what the convolution files share (internal to conv.c,
 * conv_direct.c and conv_winograd.c): the LeakyReLU helpers, the padded
 * copies of an image, and the entry points of the direct and Winograd
 * kernels, which conv.c dispatches to. */
#ifndef JEM_CONV_KERN_H
#define JEM_CONV_KERN_H

#include "conv.h"

#include <stddef.h>
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

/* [lo, hi) of part `part` of `parts` over total (jem__par's parts). */
static inline void jem__part_range(int total, int part, int parts, int *lo, int *hi) {
  *lo = (int)((long long)total * part / parts);
  *hi = (int)((long long)total * (part + 1) / parts);
}

/* jem__conv_set_fast's mode (0..3), and whether the CPU (and OS) run AVX2
 * and FMA. */
int jem__conv_mode(void);
int jem__cpu_avx2_fma(void);

/* Floats of the padded copy of one image with `ch` channels. */
static inline size_t jem__pad_size(const jem__conv *c, int ch) {
  return (size_t)ch * (c->hin + 2) * (c->win + 2);
}

enum { PAD_PLAIN, PAD_LRELU, PAD_GATE };

/* pad[ch, H+2, W+2] = zero border around f(src[ch][img]) where src is CNHW
 * with n images and f is the identity, LeakyReLU, or (PAD_GATE) the product
 * with LeakyReLU'(gate), gate laid out like src. */
void jem__pad_image(float *pad, const float *src, const float *gate, int ch,
                    int n, int img, int h, int w, int mode, float leak);
/* The same for stride 2 and Winograd: each padded row stored as its even
 * then its odd columns (see conv_direct.c). */
void jem__pad_image_s2(float *pad, const float *src, const float *gate,
                       int ch, int n, int img, int h, int w, int mode,
                       float leak);

/* Direct kernel, one padded image: out[co][H*W] (channel stride ocs) =
 * (accumulate ? out : 0) + b + conv3x3 with the given stride. */
void jem__conv3x3_image(float *out, size_t ocs, const float *pad,
                        const float *w, const float *b, int cin, int cout,
                        int H, int W, int stride, int accumulate);
/* dw[co][ci][3][3] += the weight gradient of one image given its dout
 * (channel stride ocs) and padded input. */
void jem__conv3x3_dw_image(float *dw, const float *dout, size_t ocs,
                           const float *pad, int cin, int cout, int H, int W,
                           int stride);
/* The stride-2 input gradient by phases: din[cin, n, 2Ho, 2Wo] (+)= (or =
 * with overwrite) the gradient given dout (times LeakyReLU'(gate) when gate
 * is not NULL) and wt[ci][co][t] = w[co][ci][t]; scratch of
 * jem__s2_grad_scratch floats. */
size_t jem__s2_grad_scratch(const jem__conv *c);
void jem__conv3x3_s2_input_grad(float *din, const float *dout,
                                const float *gate, float leak,
                                const float *wt, const jem__conv *c, int n,
                                float *scratch, int overwrite);

/* Winograd F(2x2, 3x3): whether a cin -> cout stride-1 layer on H x W maps
 * runs on it for a slice of n images, the scratch it needs, and the
 * convolution out[cout, n, H, W] (+)= b + conv3x3(f(in)) with f as in
 * jem__pad_image_s2 (wu: w's transform, or NULL). */
int jem__wino_use(int cin, int cout, int H, int W, int n);
size_t jem__wino_scratch(int cin, int cout, int H, int W, int n);
void jem__conv3x3_wino(float *out, const float *in, const float *gate,
                       const float *w, const float *wu, const float *b,
                       int cin, int cout, int H, int W, int n, int mode,
                       float leak, int accumulate, float *scratch);

/* The parts of the Winograd pass that conv_wide.c shares.  Shapes Winograd
 * tiles (8 tiles per vector); the distance between the 16 planes of V or M
 * for a plane of `plane` floats (the transforms touch all 16 at once, and a
 * power-of-two distance would put them all in one L1 set: one extra cache
 * line spreads them). */
int jem__wino_shape_ok(int H, int W);
static inline size_t jem__wino_ld(size_t plane) {
  return ((plane + 15) & ~(size_t)15) + 16;
}
/* V[e][ci][tbase + ...] (e stride ve, channel stride tb) = input transform
 * of tile rows [ty0, ty0 + rows) of one padded image (jem__pad_image_s2's
 * layout) with cin channels. */
void jem__wino_input(float *V, size_t ve, size_t tb, size_t tbase, const float *pad,
                     int cin, int H, int W, int ty0, int rows);
/* out[cout, n, H, W] (+)= b + output transform of M[e][co][t] (e stride me,
 * channel stride tb) for global tile rows [ty0, ty0 + rows) of the block
 * starting at image img. */
void jem__wino_output(float *out, const float *M, size_t me, const float *b, int cout,
                      int n, int H, int W, size_t tb, int img, int ty0, int rows,
                      int accumulate);

/* Output channels per panel of the packed GEMM micro-kernels (conv_wide.c),
 * which run the products of both Winograd passes: A (R x K) packed panel by
 * panel, the JEM__WIDE_MR values of row block p and column k at
 * A[(p * K + k) * JEM__WIDE_MR + 0..JEM__WIDE_MR), rows past R zero. */
#define JEM__WIDE_MR 12
/* M[i][0..nt) = sum_k A(i, k) V[k][0..nt) for i < R in one pass over k
 * (each value one FMA per k, in order), nt a multiple of 8. */
void jem__wide_product(float *M, size_t ldm, const float *A, const float *V, size_t ldv, int K,
                       int R, int nt);
/* Whether the micro-kernels run on AVX-512 (the CPU has it and tests have
 * not forced AVX2). */
int jem__wide_avx512(void);
/* U[e] (16 products) = the F(2x2, 3x3) transform of the 3x3 weights
 * w[cout][cin][3][3]: row-major U[e][co][ci] (e stride cin * cout), or
 * with packed != 0 in the micro-kernels' panels over co
 * (e stride jem__wide_mat_floats(cin, cout)). */
void jem__wino_weights(float *U, const float *w, int cin, int cout, int packed);

/* Winograd for wide layers (conv_wide.c): weights too big for L2, on packed
 * GEMM micro-kernels.  u: the layer's packed transforms (jem__wide_weights);
 * with transposed != 0 the call is the layer's input gradient (cin and cout
 * are then the layer's cout and cin).  The map alone picks the algorithm,
 * so results do not depend on the batch.  Scratch:
 * jem__wide_scratch(cin, cout, H, W, n) floats. */
size_t jem__wide_scratch(int cin, int cout, int H, int W, int n);
/* A stride-1 layer's packed transforms (forward and input gradient, of
 * F(4x4,3x3) or F(2x2,3x3) as its map needs), in floats, and filled
 * from w[cout][cin][3][3]. */
size_t jem__wide_weights_floats(int cin, int cout, int H, int W);
void jem__wide_weights(float *dst, const float *w, int cin, int cout, int H, int W);
/* One matrix A (r x k, A(i, kk) = src[kk*sk + i*sr]) packed for the
 * micro-kernels (jem__wide_mat_floats), and M[i][0..nt) (+ with add)= sum_k
 * A(i, kk) V[kk][0..nt) for the panels of 12 rows in part `part` of `parts`
 * (nt a multiple of 8): the product of the strided wide layers. */
size_t jem__wide_mat_floats(int k, int r);
void jem__wide_pack_mat(float *dst, const float *src, int k, int r, size_t sk, size_t sr);
void jem__wide_gemm(float *M, size_t ldm, const float *A, const float *V, size_t ldv,
                    int K, int R, int nt, int add, int part, int parts);
void jem__conv3x3_wide(float *out, const float *in, const float *gate, const float *u,
                       const float *b, int cin, int cout, int H, int W, int n, int mode,
                       float leak, int accumulate, int transposed, float *scratch);

#endif
