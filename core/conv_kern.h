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

#endif
