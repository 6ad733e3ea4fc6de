/* conv.h - internal layer kernels of the core (convolution, LeakyReLU,
 * average pool, linear head) on activations stored channel-major: C,N,H,W.
 *
 * 3x3 convolutions with padding 1 and stride 1 or 2 run on a direct AVX2+FMA
 * kernel where the CPU has one (forward, input gradient and weight gradient),
 * wide ones (weights past L2) on Winograd or im2col with packed micro-kernels
 * when the caller keeps their packed weights (jem__conv_wide); everything
 * else, and every CPU, has the general path: im2col + sgemm.
 * Keeping activations as [C][N][H][W] ("CNHW") makes one convolution layer a
 * single matrix product over the whole batch:
 *   out[Cout, N*Ho*Wo] = W[Cout, Cin*k*k] x col[Cin*k*k, N*Ho*Wo]
 * The kernels may work on the batch in chunks of images so that the im2col
 * buffer stays cache-sized; a chunk is simply a column slice of that product.
 * Backward kernels ACCUMULATE into their gradient outputs (except
 * jem__conv_input_grad, which says so). */
#ifndef JEM_CONV_H
#define JEM_CONV_H

#include <stddef.h>

/* One convolution: square kernel k, stride, zero padding, with bias. */
typedef struct jem__conv {
  int cin, cout, k, stride, pad;
  int hin, win, hout, wout;
  size_t w_off, b_off; /* in floats, into the model's weights */
  size_t wf_off;        /* into the transposed-weight scratch (3x3 only) */
  size_t wu_off;        /* into a workspace's Winograd transforms (see
                         * jem__conv_wino_floats) */
  size_t wide_off;      /* into the model's wide-layer transforms (see
                         * jem__conv_wide_floats) */
} jem__conv;

/* Rows of the im2col matrix (Cin*k*k) and output pixels per image. */
static inline int jem__conv_rows(const jem__conv *c) { return c->cin * c->k * c->k; }
static inline int jem__conv_hwo(const jem__conv *c) { return c->hout * c->wout; }

/* Whether the layer reads its input in place (1x1, stride 1, no padding,
 * no fused activation) instead of through an im2col buffer. */
int jem__conv_direct(const jem__conv *c, int act);

/* Whether the layer runs on the direct 3x3 kernel (AVX2+FMA CPUs; 3x3,
 * padding 1, stride 1 or 2, output maps 8, 16 or 32 wide, L2-sized weights).
 * Its input gradient then also runs on it, given the weights from
 * jem__conv_flip. */
int jem__conv_fast(const jem__conv *c);
/* The layers the direct kernel handles, whatever jem__conv_set_fast says
 * (the only ones whose flipped weights, jem__conv_flip, are ever read). */
int jem__conv_fast_shape(const jem__conv *c);
/* Tests and benchmarks: 0 forces the im2col path everywhere, 1 restores the
 * default (stride-1 layers on Winograd F(2x2,3x3) or the direct kernel,
 * whichever measured faster for the shape), 2 the direct kernel only (no
 * Winograd), 3 Winograd wherever the shape allows it. */
void jem__conv_set_fast(int on);
/* Batch-invariant mode, per thread (the model sets it for the slices it
 * runs from its workspace's setting): while on, an image's results do not
 * depend, bit for bit, on the batch it is in.  Every choice that otherwise
 * follows the batch size is made for a fixed one: Winograd or the direct
 * kernel as for a full slice (JEM__INVARIANT_N images), sgemm on one image
 * at a time (OpenBLAS picks kernels, and so summation orders, by the matrix
 * sizes), and the linear head row by row in a fixed order. */
#define JEM__INVARIANT_N 8
void jem__set_batch_invariant(int on);
int jem__batch_invariant(void);

/* Weights of the transposed convolution (cin*cout*9 floats): for stride 1
 * wf[ci, co, ky, kx] = w[co, ci, 2-ky, 2-kx], for stride 2 the taps are not
 * flipped: wf[ci, co, ky, kx] = w[co, ci, ky, kx]. */
void jem__conv_flip(float *wf, const float *w, const jem__conv *c);

/* Floats of im2col scratch that jem__conv_forward/backward use for a batch
 * of n when allowed at most `cap` floats (at least one image's worth). */
size_t jem__conv_col_need(const jem__conv *c, int n, size_t cap);

/* col[rows, nc*Ho*Wo] = im2col of images n0..n0+nc-1 of in [Cin, n, Hi, Wi],
 * through LeakyReLU(leak) first when act != 0. */
void jem__im2col(float *col, const float *in, const jem__conv *c, int n,
                 int n0, int nc, int act, float leak);
/* in[Cin, n, Hi, Wi] (images n0..n0+nc-1) += col2im(col). */
void jem__col2im(float *in, const float *col, const jem__conv *c, int n,
                 int n0, int nc);

/* out[Cout, n, Ho, Wo] = (accumulate ? out : 0) + b + W * act(in).
 * act: 0 none, 1 LeakyReLU(leak) applied to the input on the fly.
 * wu: W's Winograd transform (jem__conv_wino_weights) when the caller keeps
 * one, else NULL (a layer that runs on Winograd then derives it per call).
 * col: scratch of col_cap floats (>= jem__conv_col_need(c, 1, ...)). */
void jem__conv_forward(float *out, const float *in, const float *w,
                       const float *wu, const float *b, const jem__conv *c,
                       int n, int act, float leak, int accumulate, float *col,
                       size_t col_cap);

/* Backward of jem__conv_forward given dout [Cout, n, Ho, Wo]:
 * dw [Cout, rows] += dout x col^T, db += row sums, din [Cin, n, Hi, Wi] +=
 * gradient with respect to act(in) (the caller applies the activation's
 * derivative).  dw/db/din may be NULL.  in is needed only when dw != NULL.
 * wf: the flipped weights (jem__conv_flip) when jem__conv_fast(c), letting
 * din use the direct kernel; NULL uses im2col. */
void jem__conv_backward(const float *dout, const float *in, const float *w,
                        const float *wf, const jem__conv *c, int n, int act,
                        float leak, float *dw, float *db, float *din,
                        float *col, size_t col_cap);

/* Input gradient on the direct kernel (requires jem__conv_fast(c) and wf
 * from jem__conv_flip; wuf: wf's Winograd transform, or NULL), or for a wide
 * layer (jem__conv_wide) on Winograd (wf unused; wuf: the U half of
 * jem__conv_wide_weights' output, required): din [Cin, n,
 * Hi, Wi] = (OVERWRITTEN) gradient with respect to act(in) given dout [Cout,
 * n, Ho, Wo] multiplied by LeakyReLU'(gate) when gate (laid out like dout) is
 * not NULL.  Fuses the activation's backward and skips zeroing din on the
 * input-gradient path. */
void jem__conv_input_grad(float *din, const float *dout, const float *gate,
                          float leak, const float *wf, const float *wuf,
                          const jem__conv *c, int n, float *col, size_t col_cap);

/* Floats of a layer's Winograd weight transform when the layer (stride-1 3x3
 * on the direct kernel, a map Winograd tiles) may run on Winograd, forward
 * or as its input gradient; else 0.  Whether a call does depends on its
 * image count. */
size_t jem__conv_wino_floats(const jem__conv *c);
/* wu (at most jem__conv_wino_floats) = the Winograd transform of 3x3
 * weights w[cout][cin][3][3], packed for the micro-kernels; for the input
 * gradient, pass the flipped weights with cin and cout swapped.  Only where
 * jem__conv_wino_floats > 0. */
void jem__conv_wino_weights(float *wu, const float *w, int cin, int cout);

/* Wide layers: 3x3 layers whose weights are too big for the direct kernel
 * (over 96K floats: 160 to 640 channels), on AVX2+FMA CPUs.  Given their
 * packed weights, stride-1 ones on maps Winograd tiles run on Winograd
 * F(2x2,3x3) with packed GEMM micro-kernels (conv_wide.c), forward and as
 * input gradient; stride-2 ones on im2col with the product on the same
 * micro-kernels (forward, and jem__conv_wide_input_grad_add).  Without
 * their packed weights both run on im2col + sgemm.  jem__conv_wide: whether they do
 * under jem__conv_set_fast's mode (1 and 3; 0 and 2 keep im2col);
 * jem__conv_wide_shape: by shape alone. */
int jem__conv_wide_shape(const jem__conv *c);
int jem__conv_wide(const jem__conv *c);
/* Floats of a wide layer's packed weights (0 for other layers), which
 * jem__conv_wide_weights fills from w[cout][cin][3][3]: the forward pass
 * reads them from the start, the input gradient from
 * jem__conv_wide_grad_off on (a strided layer's W^T; 0 for a stride-1
 * layer, whose block holds the transforms of both directions and of the
 * Winograd variants its map uses). */
size_t jem__conv_wide_floats(const jem__conv *c);
size_t jem__conv_wide_grad_off(const jem__conv *c);
void jem__conv_wide_weights(float *dst, const float *w, const jem__conv *c);
/* din [Cin, n, Hi, Wi] += the input gradient of a strided wide layer given
 * dout (not through any activation), from wug = its packed weights from
 * jem__conv_wide_grad_off on; col as for jem__conv_backward. */
void jem__conv_wide_input_grad_add(float *din, const float *dout, const float *wug,
                                   const jem__conv *c, int n, float *col, size_t col_cap);
/* Tests: 1 runs the wide layers on the AVX2 micro-kernels even where the
 * CPU has AVX-512 (the same bits), 0 restores the choice by CPU. */
void jem__wide_force_avx2(int on);

/* g[i] *= (a[i] > 0 ? 1 : leak) for i < len (PyTorch's LeakyReLU backward). */
void jem__lrelu_backward(float *g, const float *a, size_t len, float leak);
/* g[i] = g[i] * (a[i] > 0 ? 1 : leak) + add[i]. */
void jem__lrelu_backward_add(float *g, const float *a, const float *add,
                             size_t len, float leak);

/* feat[n, C] = mean over hw of LeakyReLU(a[C, n, hw]). */
void jem__pool_forward(float *feat, const float *a, int c, int n, int hw,
                       float leak);
/* da[C, n, hw] += dfeat[n, C] / hw * LeakyReLU'(a). */
void jem__pool_backward(float *da, const float *dfeat, const float *a, int c,
                        int n, int hw, float leak);

/* y[n, K] = x[n, F] W^T + b with W [K, F]. */
void jem__linear_forward(float *y, const float *x, const float *w,
                         const float *b, int n, int f, int k);
/* dw [K, F] += dy^T x, db += column sums of dy, dx [n, F] += dy W.
 * Any of dw/db/dx may be NULL. */
void jem__linear_backward(const float *dy, const float *x, const float *w,
                          int n, int f, int k, float *dw, float *db, float *dx);

/* Threads lent to one layer (workspace.c): while a batch too small to keep the
 * workspace's threads busy runs on the calling thread, jem__par(fn, arg,
 * parts) runs fn(arg, i, parts) for every i < parts spread over the idle
 * threads, and returns when all are done; otherwise (and outside a
 * workspace) it runs them in order on the calling thread.  Parts must write
 * disjoint memory. */
typedef void (*jem__par_fn)(void *arg, int part, int parts);
void jem__par(jem__par_fn fn, void *arg, int parts);

/* Threads (core/blas.c): how many threads a workspace uses, that is the
 * jem_blas_set_threads value, or the number of CPUs when never set; and
 * switching OpenBLAS to one thread (the workspaces parallelise themselves). */
int jem__threads(void);
void jem__blas_single_thread(void);

/* NCHW <-> CNHW. */
void jem__to_cnhw(float *dst, const float *src, int n, int c, int hw);
/* dst[n, c, hw] += src[c, n, hw]. */
void jem__from_cnhw_acc(float *dst, const float *src, int n, int c, int hw);

#endif
