/* conv.c - layer kernels on C,N,H,W activations: which 3x3 convolutions run
 * on the direct kernel (conv_direct.c), on Winograd (conv_winograd.c) or,
 * for wide layers, on the packed micro-kernels (conv_wide.c), im2col +
 * sgemm as the general path, LeakyReLU, 8x8 average pool and the linear
 * head, forward and backward. */
#include "conv_kern.h"
#include "internal.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* d[i] += s[i] for i < n. */
static inline void add_to(float *d, const float *src, size_t n) {
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4)
    _mm_storeu_ps(d + i, _mm_add_ps(_mm_loadu_ps(d + i), _mm_loadu_ps(src + i)));
#endif
  for (; i < n; i++) d[i] += src[i];
}

/* Which layers run on the direct kernel or Winograd. */

#define FAST_MAX_WEIGHTS (96 * 1024) /* floats: keep the weights in L2 */

static atomic_int g_fast = 1;
static _Thread_local int tl_invariant;

void jem__set_batch_invariant(int on) { tl_invariant = on != 0; }
int jem__batch_invariant(void) { return tl_invariant; }

void jem__conv_set_fast(int on) {
  atomic_store(&g_fast, on >= 0 && on <= 3 ? on : 1);
}

int jem__cpu_avx2_fma(void) {
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
int jem__conv_fast_shape(const jem__conv *c) {
  if (c->k != 3 || c->pad != 1) return 0;
  if (c->stride != 1 && c->stride != 2) return 0;
  if (c->wout != 8 && c->wout != 16 && c->wout != 32) return 0;
  if (c->hout % (32 / c->wout) != 0) return 0;
  if (c->hin != c->stride * c->hout || c->win != c->stride * c->wout) return 0;
  if ((size_t)c->cin * c->cout * 9 > FAST_MAX_WEIGHTS) return 0;
  return jem__cpu_avx2_fma();
}

int jem__conv_mode(void) { return atomic_load_explicit(&g_fast, memory_order_relaxed); }

int jem__conv_wide_shape(const jem__conv *c) {
  if (c->k != 3 || c->pad != 1 || c->cin < 8 || c->cout < 8) return 0;
  if ((size_t)c->cin * c->cout * 9 <= FAST_MAX_WEIGHTS || !jem__cpu_avx2_fma()) return 0;
  if (c->stride == 2) /* im2col, the product on the micro-kernels (8 columns a vector) */
    return (c->hout * c->wout) % 8 == 0;
  if (c->stride != 1 || c->hin != c->hout || c->win != c->wout) return 0;
  return jem__wino_shape_ok(c->hout, c->wout);
}

int jem__conv_wide(const jem__conv *c) {
  const int mode = jem__conv_mode();
  return (mode == 1 || mode == 3) && jem__conv_wide_shape(c);
}

size_t jem__conv_wide_grad_off(const jem__conv *c) {
  /* a stride-1 layer's block is read from its start: jem__conv3x3_wide picks
   * the part it needs */
  if (c->stride != 2 || !jem__conv_wide_shape(c)) return 0;
  return jem__wide_mat_floats(jem__conv_rows(c), c->cout);
}

size_t jem__conv_wide_floats(const jem__conv *c) {
  if (!jem__conv_wide_shape(c)) return 0;
  if (c->stride == 2)
    return jem__wide_mat_floats(jem__conv_rows(c), c->cout) +
           jem__wide_mat_floats(c->cout, jem__conv_rows(c));
  return jem__wide_weights_floats(c->cin, c->cout, c->hout, c->wout);
}

void jem__conv_wide_weights(float *dst, const float *w, const jem__conv *c) {
  if (c->stride == 2) {
    /* forward: W (cout x rows); input gradient: W^T (rows x cout) */
    const size_t rows = (size_t)jem__conv_rows(c);
    jem__wide_pack_mat(dst, w, (int)rows, c->cout, 1, rows);
    jem__wide_pack_mat(dst + jem__conv_wide_grad_off(c), w, c->cout, (int)rows, rows, 1);
    return;
  }
  jem__wide_weights(dst, w, c->cin, c->cout, c->hout, c->wout);
}

int jem__conv_fast(const jem__conv *c) {
  return jem__conv_mode() && jem__conv_fast_shape(c);
}

void jem__conv_flip(float *wf, const float *w, const jem__conv *c) {
  JEM_ASSERT(c->k == 3);
  /* stride 1: flipped taps (a plain convolution); stride 2: taps kept, the
   * phase decomposition in jem__conv3x3_s2_input_grad picks them one by one */
  const int flip = c->stride == 1;
  for (int co = 0; co < c->cout; co++)
    for (int ci = 0; ci < c->cin; ci++)
      for (int k = 0; k < 9; k++)
        wf[((size_t)ci * c->cout + co) * 9 + k] =
            w[((size_t)co * c->cin + ci) * 9 + (flip ? 8 - k : k)];
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
  const int decide_n = tl_invariant ? JEM__INVARIANT_N : n;
  if (c->stride == 1 && jem__wino_use(cin, cout, Ho, Wo, decide_n)) {
    JEM_ASSERT(jem__wino_scratch(cin, cout, Ho, Wo, n) <= cap);
    jem__conv3x3_wino(out, in, gate, w, wu, b, cin, cout, Ho, Wo, n, mode,
                      leak, accumulate, pad);
    return;
  }
  JEM_ASSERT(jem__pad_size(c, cin) <= cap);
  for (int i = 0; i < n; i++) {
    if (c->stride == 2)
      jem__pad_image_s2(pad, in, gate, cin, n, i, c->hin, c->win, mode, leak);
    else
      jem__pad_image(pad, in, gate, cin, n, i, c->hin, c->win, mode, leak);
    jem__conv3x3_image(out + (size_t)i * hwo, ocs, pad, w, b, cin, cout, Ho,
                       Wo, c->stride, accumulate);
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

/* Images per chunk: as many as fit in cap floats of im2col, at least one;
 * one in batch-invariant mode. */
static int chunk_images(const jem__conv *c, int n, size_t cap) {
  if (tl_invariant) return 1;
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
    size_t p = c->stride == 1 ? jem__pad_size(c, c->cin > c->cout ? c->cin : c->cout)
                              : jem__pad_size(c, c->cin);
    if (c->stride == 2 && jem__s2_grad_scratch(c) > p) p = jem__s2_grad_scratch(c);
    if (c->stride == 1) {
      /* Winograd scratch for both directions whenever the shape allows it,
       * whatever the per-shape choice, so that switching never overflows */
      size_t wf = jem__wino_scratch(c->cin, c->cout, c->hout, c->wout, n);
      size_t wb = jem__wino_scratch(c->cout, c->cin, c->hout, c->wout, n);
      if (wf > p) p = wf;
      if (wb > p) p = wb;
    }
    if (p > need) need = p;
  }
  if (c->stride == 1 && jem__conv_wide_shape(c)) {
    /* whatever the mode, as for Winograd above */
    size_t wf = jem__wide_scratch(c->cin, c->cout, c->hout, c->wout, n);
    size_t wb = jem__wide_scratch(c->cout, c->cin, c->hout, c->wout, n);
    if (wf > need) need = wf;
    if (wb > need) need = wb;
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

/* im2col_rows for 3x3 stride-2 layers on even maps up to 64 wide: each
 * input plane is padded once, f applied, in jem__pad_image_s2's layout (a
 * row's even columns, then its odd ones), from which every tap's output row
 * is one contiguous copy (taps kx = 0, 1, 2 read E[x], O[x], E[x + 1]).
 * The column-by-column loop spent most of its time on 8-wide rows. */
static void im2col_rows_s2(float *col, const float *in, const jem__conv *c, int n, int n0,
                           int nc, int act, float leak, int ci0, int ci1) {
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const int wp = wi + 2, half = wi / 2 + 1;
  const size_t hwo = (size_t)ho * wo, ld = (size_t)nc * hwo;
  float pad[66 * 66];
  for (int ci = ci0; ci < ci1; ci++)
    for (int j = 0; j < nc; j++) {
      jem__pad_image_s2(pad, in + (size_t)ci * n * hi * wi, NULL, 1, n, n0 + j, hi, wi,
                        act ? PAD_LRELU : PAD_PLAIN, leak);
      for (int ky = 0; ky < 3; ky++)
        for (int kx = 0; kx < 3; kx++) {
          float *dst = col + ((size_t)(ci * 3 + ky) * 3 + kx) * ld + (size_t)j * hwo;
          const float *src = pad + (size_t)ky * wp + (kx == 1 ? half : kx / 2);
          for (int oy = 0; oy < ho; oy++)
            memcpy(dst + (size_t)oy * wo, src + (size_t)(2 * oy) * wp, sizeof(float) * wo);
        }
    }
}

/* jem__im2col for the rows of input channels [ci0, ci1) only. */
static void im2col_rows(float *col, const float *in, const jem__conv *c, int n,
                        int n0, int nc, int act, float leak, int ci0, int ci1) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  if (k == 3 && s == 2 && p == 1 && hi == 2 * ho && wi == 2 * wo && hi <= 64 && wi <= 64) {
    im2col_rows_s2(col, in, c, n, n0, nc, act, leak, ci0, ci1);
    return;
  }
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = ci0; ci < ci1; ci++) {
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

void jem__im2col(float *col, const float *in, const jem__conv *c, int n,
                 int n0, int nc, int act, float leak) {
  im2col_rows(col, in, c, n, n0, nc, act, leak, 0, c->cin);
}

/* jem__col2im for input channels [ci0, ci1) only: they read only their own
 * rows of col and write only their own channels of in. */
static void col2im_rows(float *in, const float *col, const jem__conv *c, int n,
                        int n0, int nc, int ci0, int ci1) {
  const int k = c->k, s = c->stride, p = c->pad;
  const int hi = c->hin, wi = c->win, ho = c->hout, wo = c->wout;
  const size_t hwi = (size_t)hi * wi, hwo = (size_t)ho * wo;
  const size_t ld = (size_t)nc * hwo;
  for (int ci = ci0; ci < ci1; ci++) {
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

void jem__col2im(float *in, const float *col, const jem__conv *c, int n,
                 int n0, int nc) {
  col2im_rows(in, col, c, n, n0, nc, 0, c->cin);
}

/* ------------------------------------------------------------------------ */
/* The im2col + sgemm path in parts.  A layer's products are split along
 * their rows (output channels forward, input channels for the input
 * gradient) into parts that jem__par may run on several threads.  The split
 * depends on the layer's shape alone, never on the threads: each part is the
 * same sgemm call whoever runs it, so results do not depend on threads. */

/* Parts of a product with `rows` rows and `flops` multiply-adds: big enough
 * to be worth a thread's wake-up (about 10 us against 1 ms of work). */
static int row_parts(int rows, double flops) {
  if (flops < 4e6) return 1;
  return rows >= 128 ? 4 : rows >= 64 ? 2 : 1;
}

typedef struct conv_job {
  const jem__conv *c;
  float *out;               /* forward: out; input gradient: din */
  const float *in;          /* forward: in; input gradient: dout */
  const float *w, *b;
  float *col;
  int n, n0, m, act, accumulate, bias;
  int per_image;            /* 1x1 read in place: one product per image */
  float leak;
  const float *wu;          /* a strided wide layer's packed W (or W^T) */
} conv_job;

/* Forward, part i: for its output channels the bias (on the first chunk),
 * for its input channels the chunk's im2col rows. */
static void fwd_prep_part(void *arg, int part, int parts) {
  const conv_job *j = arg;
  const jem__conv *c = j->c;
  const size_t ldo = (size_t)j->n * jem__conv_hwo(c);
  int lo, hi;
  if (j->bias) {
    jem__part_range(c->cout, part, parts, &lo, &hi);
    for (int co = lo; co < hi; co++) {
      float *o = j->out + (size_t)co * ldo, bv = j->b ? j->b[co] : 0.0f;
      if (j->accumulate) {
        for (size_t i = 0; i < ldo; i++) o[i] += bv;
      } else {
        for (size_t i = 0; i < ldo; i++) o[i] = bv;
      }
    }
  }
  if (j->col) {
    jem__part_range(c->cin, part, parts, &lo, &hi);
    im2col_rows(j->col, j->in, c, j->n, j->n0, j->m, j->act, j->leak, lo, hi);
  }
}

/* Forward, part i: out[its channels, chunk] += W[its channels] x col (or x
 * in for a 1x1 layer read in place). */
static void fwd_gemm_part(void *arg, int part, int parts) {
  const conv_job *j = arg;
  const jem__conv *c = j->c;
  const int hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)j->n * hwo;
  int lo, hi;
  jem__part_range(c->cout, part, parts, &lo, &hi);
  if (hi == lo) return;
  if (!j->col) { /* 1x1, in place: the whole batch, or image by image */
    const int step = j->per_image ? hwo : (int)ldo;
    for (size_t c0 = 0; c0 < ldo; c0 += (size_t)step)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, step, c->cin, 1.0f,
                  j->w + (size_t)lo * c->cin, c->cin, j->in + c0, (int)ldo, 1.0f,
                  j->out + (size_t)lo * ldo + c0, (int)ldo);
    return;
  }
  const int rows = jem__conv_rows(c), cols = j->m * hwo;
  if (j->wu) { /* a strided wide layer: panels of 12 channels, not [lo, hi) */
    jem__wide_gemm(j->out + (size_t)j->n0 * hwo, ldo, j->wu, j->col, (size_t)cols, rows,
                   c->cout, cols, 1, part, parts);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, cols, rows,
              1.0f, j->w + (size_t)lo * rows, rows, j->col, cols, 1.0f,
              j->out + (size_t)lo * ldo + (size_t)j->n0 * hwo, (int)ldo);
}

/* Strided wide layer, input gradient part i: col = W^T x dout on panels of
 * 12 rows of col; then (wide_col2im_part) col2im by input channels. */
static void wide_din_gemm_part(void *arg, int part, int parts) {
  const conv_job *j = arg;
  const jem__conv *c = j->c;
  const int hwo = jem__conv_hwo(c), cols = j->m * hwo;
  jem__wide_gemm(j->col, (size_t)cols, j->wu, j->in + (size_t)j->n0 * hwo,
                 (size_t)j->n * hwo, c->cout, jem__conv_rows(c), cols, 0, part, parts);
}

static void wide_col2im_part(void *arg, int part, int parts) {
  const conv_job *j = arg;
  int lo, hi;
  jem__part_range(j->c->cin, part, parts, &lo, &hi);
  if (hi > lo) col2im_rows(j->out, j->col, j->c, j->n, j->n0, j->m, lo, hi);
}

void jem__conv_wide_input_grad_add(float *din, const float *dout, const float *wug,
                                   const jem__conv *c, int n, float *col, size_t col_cap) {
  JEM_ASSERT(c->stride == 2 && jem__conv_wide(c) && wug && n >= 1);
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  conv_job j = {.c = c, .out = din, .in = dout, .col = col, .n = n, .wu = wug};
  for (int n0 = 0; n0 < n; n0 += nc) {
    j.n0 = n0;
    j.m = n - n0 < nc ? n - n0 : nc;
    const int parts = row_parts(c->cin, (double)rows * c->cout * j.m * hwo);
    jem__par(wide_din_gemm_part, &j, parts);
    jem__par(wide_col2im_part, &j, parts);
  }
}

/* Input gradient, part i: for its input channels, col rows = W^T x dout and
 * then their col2im (or din += W^T x dout for a 1x1 layer read in place). */
static void din_part(void *arg, int part, int parts) {
  const conv_job *j = arg;
  const jem__conv *c = j->c;
  const int hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)j->n * hwo;
  int lo, hi;
  jem__part_range(c->cin, part, parts, &lo, &hi);
  if (hi == lo) return;
  if (!j->col) {
    const int step = j->per_image ? hwo : (int)ldo;
    for (size_t c0 = 0; c0 < ldo; c0 += (size_t)step)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, step, c->cout, 1.0f,
                  j->w + lo, c->cin, j->in + c0, (int)ldo, 1.0f,
                  j->out + (size_t)lo * ldo + c0, (int)ldo);
    return;
  }
  const int kk = c->k * c->k, rows = jem__conv_rows(c), cols = j->m * hwo;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (hi - lo) * kk, cols,
              c->cout, 1.0f, j->w + (size_t)lo * kk, rows,
              j->in + (size_t)j->n0 * hwo, (int)ldo, 0.0f,
              j->col + (size_t)lo * kk * cols, cols);
  col2im_rows(j->out, j->col, c, j->n, j->n0, j->m, lo, hi);
}

void jem__conv_forward(float *out, const float *in, const float *w,
                       const float *wu, const float *b, const jem__conv *c,
                       int n, int act, float leak, int accumulate, float *col,
                       size_t col_cap) {
  const int rows = jem__conv_rows(c), hwo = jem__conv_hwo(c);
  const size_t ldo = (size_t)n * hwo;
  JEM_ASSERT(n >= 1);
  if (wu && c->stride == 1 && jem__conv_wide(c)) {
    JEM_ASSERT(jem__wide_scratch(c->cin, c->cout, c->hout, c->wout, n) <= col_cap);
    jem__conv3x3_wide(out, in, NULL, wu, b, c->cin, c->cout, c->hout, c->wout, n,
                      act ? PAD_LRELU : PAD_PLAIN, leak, accumulate, 0, col);
    return;
  }
  if (jem__conv_fast(c)) {
    JEM_ASSERT(jem__pad_size(c, c->cin) <= col_cap);
    conv3x3_direct(out, in, NULL, w, wu, b, c->cin, c->cout, c, n,
                   act ? PAD_LRELU : PAD_PLAIN, leak, accumulate, col, col_cap);
    return;
  }
  conv_job j = {.c = c, .out = out, .in = in, .w = w, .b = b, .n = n,
                .act = act, .accumulate = accumulate, .bias = 1,
                .per_image = tl_invariant, .leak = leak,
                .wu = wu && c->stride == 2 && jem__conv_wide(c) ? wu : NULL};
  if (jem__conv_direct(c, act)) { /* 1x1 read in place: one product */
    const int parts = row_parts(c->cout, (double)c->cout * c->cin * (tl_invariant ? (size_t)hwo : ldo));
    jem__par(fwd_prep_part, &j, parts);
    jem__par(fwd_gemm_part, &j, parts);
    return;
  }
  const int nc = chunk_images(c, n, col_cap);
  JEM_ASSERT((size_t)nc * rows * hwo <= col_cap);
  j.col = col;
  for (int n0 = 0; n0 < n; n0 += nc) {
    j.n0 = n0;
    j.m = n - n0 < nc ? n - n0 : nc;
    const int parts = row_parts(c->cout, (double)c->cout * rows * j.m * hwo);
    jem__par(fwd_prep_part, &j, parts);
    jem__par(fwd_gemm_part, &j, parts);
    j.bias = 0;
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
      JEM_ASSERT(jem__pad_size(c, c->cout) <= col_cap);
      conv3x3_direct(din, dout, NULL, wf, NULL, NULL, c->cout, c->cin, c, n,
                     PAD_PLAIN, leak, 1, col, col_cap);
    } else {
      JEM_ASSERT(jem__s2_grad_scratch(c) <= col_cap);
      jem__conv3x3_s2_input_grad(din, dout, NULL, leak, wf, c, n, col, 0);
    }
    din = NULL;
    if (!dw) return;
  }
  if (dw && jem__conv_fast(c)) {
    /* weight gradient image by image from the padded (activated) input */
    JEM_ASSERT(jem__pad_size(c, c->cin) <= col_cap);
    const size_t hw = (size_t)c->hout * c->wout;
    for (int i = 0; i < n; i++) {
      if (c->stride == 2)
        jem__pad_image_s2(col, in, NULL, c->cin, n, i, c->hin, c->win,
                          act ? PAD_LRELU : PAD_PLAIN, leak);
      else
        jem__pad_image(col, in, NULL, c->cin, n, i, c->hin, c->win,
                       act ? PAD_LRELU : PAD_PLAIN, leak);
      jem__conv3x3_dw_image(dw, dout + (size_t)i * hw, ldo, col, c->cin,
                            c->cout, c->hout, c->wout, c->stride);
    }
    dw = NULL;
    if (!din) return;
  }
  if (jem__conv_direct(c, act)) {
    if (dw)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, c->cin,
                  (int)ldo, 1.0f, dout, (int)ldo, in, (int)ldo, 1.0f, dw,
                  c->cin);
    if (din) {
      conv_job j = {.c = c, .out = din, .in = dout, .w = w, .n = n, .per_image = tl_invariant};
      jem__par(din_part, &j, row_parts(c->cin, (double)c->cin * c->cout *
                                                   (tl_invariant ? (size_t)hwo : ldo)));
    }
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
      conv_job j = {.c = c, .out = din, .in = dout, .w = w, .col = col, .n = n,
                    .n0 = n0, .m = m};
      jem__par(din_part, &j, row_parts(c->cin, (double)rows * c->cout * m * hwo));
    }
  }
}

void jem__conv_input_grad(float *din, const float *dout, const float *gate,
                          float leak, const float *wf, const float *wuf,
                          const jem__conv *c, int n, float *col, size_t col_cap) {
  const int mode = gate ? PAD_GATE : PAD_PLAIN;
  if (c->stride == 1 && jem__conv_wide(c)) {
    JEM_ASSERT(wuf && n >= 1);
    JEM_ASSERT(jem__wide_scratch(c->cout, c->cin, c->hout, c->wout, n) <= col_cap);
    jem__conv3x3_wide(din, dout, gate, wuf, NULL, c->cout, c->cin, c->hout, c->wout, n,
                      mode, leak, 0, 1, col);
    return;
  }
  JEM_ASSERT(jem__conv_fast(c) && wf && n >= 1);
  if (c->stride == 1) {
    JEM_ASSERT(jem__pad_size(c, c->cout) <= col_cap);
    conv3x3_direct(din, dout, gate, wf, wuf, NULL, c->cout, c->cin, c, n, mode,
                   leak, 0, col, col_cap);
  } else {
    JEM_ASSERT(jem__s2_grad_scratch(c) <= col_cap);
    jem__conv3x3_s2_input_grad(din, dout, gate, leak, wf, c, n, col, 1);
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

/* y[j] = b[j] + sum_f x[f] w[j, f] for one row, summed in index order. */
static void linear_row(float *y, const float *x, const float *w, const float *b, int f,
                       int k) {
  for (int j = 0; j < k; j++) {
    const float *wj = w + (size_t)j * f;
    float s = 0.0f;
    for (int i = 0; i < f; i++) s += x[i] * wj[i];
    y[j] = (b ? b[j] : 0.0f) + s;
  }
}

void jem__linear_forward(float *y, const float *x, const float *w,
                         const float *b, int n, int f, int k) {
  if (tl_invariant) {
    for (int i = 0; i < n; i++) linear_row(y + (size_t)i * k, x + (size_t)i * f, w, b, f, k);
    return;
  }
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
  if (dx && tl_invariant) {
    /* dx[i, :] += sum_j dy[i, j] w[j, :], classes in index order */
    for (int i = 0; i < n; i++)
      for (int j = 0; j < k; j++) {
        const float g = dy[(size_t)i * k + j], *wj = w + (size_t)j * f;
        float *d = dx + (size_t)i * f;
        for (int q = 0; q < f; q++) d[q] += g * wj[q];
      }
  } else if (dx) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, f, k, 1.0f, dy,
                k, w, f, 1.0f, dx, f);
  }
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
