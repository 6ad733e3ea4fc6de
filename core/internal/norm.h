/* norm.h - the official JEM normalisation layers (wideresnet.py get_norm),
 * forward and backward on CNHW activations (core/norm.c).  Internal.
 *
 * All run with eval-mode semantics, so images never interact and a batch
 * may be split into slices:
 *   batch     BatchNorm2d: y = (x - running_mean) / sqrt(running_var + eps) * w + b
 *   instance  InstanceNorm2d(affine): per image and channel over H*W
 *   layer     GroupNorm(1, C): per image over C*H*W, then per-channel w, b
 *   act       ActNorm(logdet=False): y = scale * (x + loc)
 * eps = 1e-5 (PyTorch's default for the first three); variances are biased. */
#ifndef JEM_NORM_H
#define JEM_NORM_H

#include <stddef.h>

#include "jem.h"

typedef struct jem__norm {
  int kind;           /* JEM_NORM_* */
  int c;              /* channels */
  size_t w_off, b_off;    /* weight, bias; act: scale, loc */
  size_t rm_off, rv_off;  /* batch: running_mean, running_var */
} jem__norm;

/* The tensors of one norm layer: suffixes, count (0 for none). */
int jem__norm_tensors(int kind, const char *const **suffixes);

/* y[C, n, hw] = norm(x[C, n, hw]); W: the model's weights. */
void jem__norm_forward(float *y, const float *x, const jem__norm *nm, const float *W, int n,
                       int hw);

/* Backward of jem__norm_forward given dy [C, n, hw]: dx += dL/dx (dx may
 * be NULL), and when dW is not NULL its weight and bias (act: scale, loc)
 * gradients accumulate there, at the offsets of W.  Running statistics are
 * constants (no gradient). */
void jem__norm_backward(float *dx, const float *dy, const float *x, const jem__norm *nm,
                        const float *W, int n, int hw, float *dW);

#endif
