/* forward.c - the forward and backward passes of the Wide-ResNet over a
 * workspace's slices, and the input gradient of logsumexp or a class logit. */
#include "net.h"

#include <string.h>

/* A layer's cached Winograd transform (of its weights, or with flipped != 0
 * of its input gradient's flipped weights), or NULL: none kept.  A wide
 * layer's come from the model (jem__net_wide). */
static const float *wino_of(const jem_ws *ws, const jem__conv *c, int flipped) {
  const size_t nw = ws->wide ? jem__conv_wide_floats(c) : 0;
  if (nw) return ws->wide + c->wide_off + (flipped ? jem__conv_wide_grad_off(c) : 0);
  const size_t nu = ws->wino ? jem__conv_wino_floats(c) : 0;
  return nu ? ws->wino + c->wu_off + (flipped ? nu : 0) : NULL;
}

/* Whether a layer's input gradient alone runs on the direct kernel or, for
 * a wide stride-1 layer with its transforms, on Winograd
 * (jem__conv_input_grad). */
static int ig_fast(const jem_ws *ws, const jem__conv *c) {
  return jem__conv_fast(c) || (ws->wide && c->stride == 1 && jem__conv_wide(c));
}

/* din += the input gradient of c with respect to its (activated) input,
 * without parameter gradients: a strided wide layer's packed product, else
 * im2col + sgemm. */
static void conv_din_add(const jem_ws *ws, float *din, const float *dout, const float *W,
                         const float *wf, const jem__conv *c, int n, float *col,
                         size_t col_cap) {
  if (ws->wide && jem__conv_wide(c) && c->stride == 2)
    jem__conv_wide_input_grad_add(din, dout, wino_of(ws, c, 1), c, n, col, col_cap);
  else
    jem__conv_backward(dout, NULL, W + c->w_off, wf, c, n, 1, 0.0f, NULL, NULL, din, col,
                       col_cap);
}

/* Weights derived from m's for the direct kernel: the flipped, transposed 3x3
 * weights of the input gradients and, where the workspace keeps them, the
 * Winograd transforms.  A plain workspace flips the layers now on the direct
 * kernel in every jem_backward (the weights may have changed since); a
 * JEM_WS_FIXED_WEIGHTS one derives all 3x3 layers (the direct kernel may be
 * switched on later) once per model, in jem_forward. */
static void derive_weights(jem_ws *ws, const jem_model *m) {
  const int fixed = (ws->flags & JEM_WS_FIXED_WEIGHTS) != 0;
  const jem_net *net = m->net;
  for (int i = -1; i < net->nblocks; i++) {
    const jem__conv *cs[2] = {i < 0 ? &net->stem : &net->blocks[i].c1,
                              i < 0 ? NULL : &net->blocks[i].c2};
    for (int j = 0; j < 2; j++) {
      const jem__conv *c = cs[j];
      if (!c || !jem__conv_fast_shape(c) || (!fixed && !jem__conv_fast(c))) continue;
      float *wf = ws->wflip + c->wf_off;
      jem__conv_flip(wf, m->weights + c->w_off, c);
      const size_t nu = ws->wino ? jem__conv_wino_floats(c) : 0;
      if (nu) {
        jem__conv_wino_weights(ws->wino + c->wu_off, m->weights + c->w_off, c->cin, c->cout);
        jem__conv_wino_weights(ws->wino + c->wu_off + nu, wf, c->cout, c->cin);
      }
    }
  }
  if (fixed) {
    if (!(ws->flags & JEM_WS_NO_WIDE_TRANSFORMS)) ws->wide = jem__net_wide(m);
    ws->derived_uid = m->uid;
  }
}

static void sub_forward(jem_ws *ws, int si, int tid) {
  (void)tid;
  jem_sub *s = &ws->sub[si];
  const int n = s->n;
  if (n == 0) return;
  const jem_model *m = ws->m;
  const jem_net *net = m->net;
  const float *W = m->weights;
  const float leak = net->leak;
  const int hw = net->size * net->size;
  const size_t css = (size_t)net->in_c * hw;
  jem__to_cnhw(s->x, ws->jx + (size_t)s->n0 * css, n, net->in_c, hw);
#define WU(c) wino_of(ws, c, 0)
  jem__conv_forward(s->a[0], s->x, W + net->stem.w_off, WU(&net->stem), W + net->stem.b_off,
                    &net->stem, n, 0, leak, 0, s->col, s->col_cap);
  for (int b = 0; b < net->nblocks; b++) {
    const jem__block *B = &net->blocks[b];
    const float *in1 = s->a[b], *in2 = s->u[b]; /* what the LeakyReLUs see */
    if (net->norm) {
      jem__norm_forward(s->t1[b], s->a[b], &B->n1, W, n, B->c1.hin * B->c1.win);
      in1 = s->t1[b];
    }
    jem__conv_forward(s->u[b], in1, W + B->c1.w_off, WU(&B->c1), W + B->c1.b_off,
                      &B->c1, n, 1, leak, 0, s->col, s->col_cap);
    if (net->norm) {
      jem__norm_forward(s->t2[b], s->u[b], &B->n2, W, n, B->c2.hin * B->c2.win);
      in2 = s->t2[b];
    }
    if (B->has_sc) {
      jem__conv_forward(s->a[b + 1], s->a[b], W + B->sc.w_off, NULL,
                        W + B->sc.b_off, &B->sc, n, 0, leak, 0, s->col,
                        s->col_cap);
    } else {
      memcpy(s->a[b + 1], s->a[b],
             sizeof(float) * (size_t)B->c1.cin * B->c1.hin * B->c1.win * n);
    }
    jem__conv_forward(s->a[b + 1], in2, W + B->c2.w_off, WU(&B->c2), W + B->c2.b_off,
                      &B->c2, n, 1, leak, 1, s->col, s->col_cap);
  }
#undef WU
  float *feat = ws->feat + (size_t)s->n0 * net->feat;
  const float *last = s->a[net->nblocks];
  if (net->norm) {
    jem__norm_forward(s->th, last, &net->head, W, n, net->last_hw);
    last = s->th;
  }
  jem__pool_forward(feat, last, net->feat, n, net->last_hw, leak);
  jem__linear_forward(ws->jlogits + (size_t)s->n0 * net->k, feat,
                      W + net->lin_w, W + net->lin_b, n, net->feat, net->k);
}

/* Backward of out = conv(lrelu(t)) with t = norm(in) (as the forward kept
 * it), given dout: din = dL/din (overwritten; din may be dout), tmp (in's
 * size) gets dL/dt on the way; the conv's and the norm's parameter
 * gradients accumulate into dW when it is not NULL.  wf, wuf: the flipped
 * weights and their Winograd transform (or NULL), for the direct kernel. */
static void conv_norm_backward(const jem_ws *ws, float *din, float *tmp, const float *dout,
                               const float *in, const float *t, const jem__conv *c,
                               const jem__norm *nm, const float *W, const float *wf,
                               const float *wuf, float *dW, float leak, int n, float *col,
                               size_t col_cap) {
  const size_t len = (size_t)c->cin * c->hin * c->win * n;
  if (!dW && ig_fast(ws, c)) { /* input gradient only: the direct kernel */
    jem__conv_input_grad(tmp, dout, NULL, leak, wf, wuf, c, n, col, col_cap);
  } else if (!dW) {
    memset(tmp, 0, sizeof(float) * len);
    conv_din_add(ws, tmp, dout, W, wf, c, n, col, col_cap);
  } else {
    memset(tmp, 0, sizeof(float) * len);
    jem__conv_backward(dout, t, W + c->w_off, wf, c, n, 1, leak, dW ? dW + c->w_off : NULL,
                       dW ? dW + c->b_off : NULL, tmp, col, col_cap);
  }
  jem__lrelu_backward(tmp, t, len, leak);
  memset(din, 0, sizeof(float) * len);
  jem__norm_backward(din, tmp, in, nm, W, n, c->hin * c->win, dW);
}

static void sub_backward(jem_ws *ws, int si, int tid) {
  jem_sub *s = &ws->sub[si];
  const int n = s->n;
  if (n == 0) return;
  const jem_model *m = ws->m;
  const jem_net *net = m->net;
  const float *W = m->weights;
  const float leak = net->leak;
  const int nb = net->nblocks;
  const int hw = net->size * net->size;
  const size_t css = (size_t)net->in_c * hw;
  /* the caller's thread accumulates straight into the caller's buffer, a
   * helper into its private one, which the caller adds afterwards */
  float *dW = NULL;
  if (ws->jdw) {
    if (tid == 0) {
      dW = ws->jdw;
    } else {
      jem_helper *h = &ws->helpers[tid - 1];
      if (!h->dw_used) {
        memset(h->dw, 0, sizeof(float) * m->n_weights);
        h->dw_used = 1;
      }
      dW = h->dw;
    }
  }
#define DW(off) (dW ? dW + (off) : NULL)
#define WF(c) (jem__conv_fast_shape(c) ? ws->wflip + (c)->wf_off : NULL)
  const float *dlogits = ws->jdlogits + (size_t)s->n0 * net->k;
  const float *feat = ws->feat + (size_t)s->n0 * net->feat;
  memset(s->dfeat, 0, sizeof(float) * (size_t)net->feat * n);
  jem__linear_backward(dlogits, feat, W + net->lin_w, n, net->feat, net->k,
                       DW(net->lin_w), DW(net->lin_b), s->dfeat);
  float *gcur = s->g[0];
  memset(gcur, 0, sizeof(float) * (size_t)net->feat * net->last_hw * n);
  jem__pool_backward(gcur, s->dfeat, net->norm ? s->th : s->a[nb], net->feat, n,
                     net->last_hw, leak);
  if (net->norm) {
    memset(s->g[1], 0, sizeof(float) * (size_t)net->feat * net->last_hw * n);
    jem__norm_backward(s->g[1], gcur, s->a[nb], &net->head, W, n, net->last_hw, dW);
    gcur = s->g[1];
  }
  for (int b = nb - 1; b >= 0; b--) {
    const jem__block *B = &net->blocks[b];
    float *gv = NULL, *ga = NULL;
    for (int i = 0; i < 3; i++) {
      if (s->g[i] == gcur) continue;
      if (!gv) gv = s->g[i]; else ga = s->g[i];
    }
    const size_t ulen = (size_t)B->c2.cin * B->c2.hin * B->c2.win * n;
    const size_t alen = (size_t)B->c1.cin * B->c1.hin * B->c1.win * n;
    if (net->norm) {
      /* back through conv2 to u, then conv1 to a; plus the shortcut's share */
      conv_norm_backward(ws, ga, gv, gcur, s->u[b], s->t2[b], &B->c2, &B->n2, W, WF(&B->c2),
                         wino_of(ws, &B->c2, 1), dW, leak, n, s->col, s->col_cap);
      conv_norm_backward(ws, ga, gv, ga, s->a[b], s->t1[b], &B->c1, &B->n1, W, WF(&B->c1),
                         wino_of(ws, &B->c1, 1), dW, leak, n, s->col, s->col_cap);
      if (B->has_sc)
        jem__conv_backward(gcur, s->a[b], W + B->sc.w_off, NULL, &B->sc, n, 0, leak,
                           DW(B->sc.w_off), DW(B->sc.b_off), ga, s->col, s->col_cap);
      else
        for (size_t i = 0; i < alen; i++) ga[i] += gcur[i];
      gcur = ga;
      continue;
    }
    if (!dW) {
      /* input gradient only, on the direct kernel or Winograd where they
       * run: the LeakyReLU'(u) gate rides along with conv1's padded copy and
       * nothing is zeroed; a strided wide conv2 adds into a zeroed gv */
      if (ig_fast(ws, &B->c2)) {
        jem__conv_input_grad(gv, gcur, NULL, leak, WF(&B->c2), wino_of(ws, &B->c2, 1),
                             &B->c2, n, s->col, s->col_cap);
      } else {
        memset(gv, 0, sizeof(float) * ulen);
        conv_din_add(ws, gv, gcur, W, WF(&B->c2), &B->c2, n, s->col, s->col_cap);
      }
      if (ig_fast(ws, &B->c1)) {
        jem__conv_input_grad(ga, gv, s->u[b], leak, WF(&B->c1), wino_of(ws, &B->c1, 1),
                             &B->c1, n, s->col, s->col_cap);
      } else {
        jem__lrelu_backward(gv, s->u[b], ulen, leak);
        memset(ga, 0, sizeof(float) * alen);
        conv_din_add(ws, ga, gv, W, WF(&B->c1), &B->c1, n, s->col, s->col_cap);
      }
      if (B->has_sc) {
        jem__lrelu_backward(ga, s->a[b], alen, leak);
        jem__conv_backward(gcur, s->a[b], W + B->sc.w_off, NULL, &B->sc, n, 0,
                           leak, NULL, NULL, ga, s->col, s->col_cap);
      } else {
        jem__lrelu_backward_add(ga, s->a[b], gcur, alen, leak);
      }
      gcur = ga;
      continue;
    }
    /* conv2: gradient with respect to lrelu(u), then u */
    memset(gv, 0, sizeof(float) * ulen);
    jem__conv_backward(gcur, s->u[b], W + B->c2.w_off, WF(&B->c2), &B->c2, n, 1, leak,
                       DW(B->c2.w_off), DW(B->c2.b_off), gv, s->col, s->col_cap);
    jem__lrelu_backward(gv, s->u[b], ulen, leak);
    /* conv1: gradient with respect to lrelu(a), then a */
    memset(ga, 0, sizeof(float) * alen);
    jem__conv_backward(gv, s->a[b], W + B->c1.w_off, WF(&B->c1), &B->c1, n, 1, leak,
                       DW(B->c1.w_off), DW(B->c1.b_off), ga, s->col, s->col_cap);
    /* shortcut on the raw block input */
    if (B->has_sc) {
      jem__lrelu_backward(ga, s->a[b], alen, leak);
      jem__conv_backward(gcur, s->a[b], W + B->sc.w_off, NULL, &B->sc, n, 0, leak,
                         DW(B->sc.w_off), DW(B->sc.b_off), ga, s->col,
                         s->col_cap);
    } else {
      jem__lrelu_backward_add(ga, s->a[b], gcur, alen, leak);
    }
    gcur = ga;
  }
  /* stem */
  float *gx = NULL;
  if (ws->jdx) gx = gcur == s->g[0] ? s->g[1] : s->g[0];
  if (gx && !dW && jem__conv_fast(&net->stem)) {
    jem__conv_input_grad(gx, gcur, NULL, leak, WF(&net->stem), wino_of(ws, &net->stem, 1),
                         &net->stem, n, s->col, s->col_cap);
  } else {
    if (gx) memset(gx, 0, sizeof(float) * css * n);
    jem__conv_backward(gcur, s->x, W + net->stem.w_off, WF(&net->stem),
                       &net->stem, n, 0, leak, DW(net->stem.w_off),
                       DW(net->stem.b_off), gx, s->col, s->col_cap);
  }
  if (gx) jem__from_cnhw_acc(ws->jdx + (size_t)s->n0 * css, gx, n, net->in_c, hw);
#undef WF
#undef DW
}

void jem_forward(jem_ws *ws, const jem_model *m, const float *x, int n,
                 float *logits) {
  jem__ws_check(ws, m);
  JEM_ASSERT(x && logits && n >= 1 && n <= ws->max_batch);
  if ((ws->flags & JEM_WS_FIXED_WEIGHTS) && ws->derived_uid != m->uid) derive_weights(ws, m);
  ws->n = n;
  ws->m = m;
  /* ceil(n / SLICE_IMAGES) balanced contiguous slices, the first n % used
   * of them one image larger; the remaining slices stay empty */
  const int used = (n + SLICE_IMAGES - 1) / SLICE_IMAGES;
  const int base = n / used, rem = n % used;
  for (int si = 0, n0 = 0; si < ws->nsub; si++) {
    jem_sub *s = &ws->sub[si];
    s->n0 = n0;
    s->n = si < used ? base + (si < rem) : 0;
    JEM_ASSERT(s->n <= s->cap);
    n0 += s->n;
  }
  ws->jx = x;
  ws->jlogits = logits;
  jem__ws_run(ws, sub_forward, jem__threads(), used);
  ws->jx = NULL;
  ws->jlogits = NULL;
}

void jem_backward(jem_ws *ws, const jem_model *m, const float *dlogits,
                  float *dweights, float *dx) {
  jem__ws_check(ws, m);
  JEM_ASSERT(dlogits);
  JEM_ASSERT(ws->n >= 1 && ws->m == m); /* needs a forward on this ws first */
  JEM_ASSERT(!dweights || (ws->flags & JEM_WS_TRAIN));
  if (!dweights && !dx) return;
  ws->jdlogits = dlogits;
  ws->jdw = dweights;
  ws->jdx = dx;
  if (!(ws->flags & JEM_WS_FIXED_WEIGHTS)) derive_weights(ws, m);
  for (int i = 0; i < ws->nhelpers; i++) ws->helpers[i].dw_used = 0;
  jem__ws_run(ws, sub_backward, jem__threads(), (ws->n + SLICE_IMAGES - 1) / SLICE_IMAGES);
  if (dweights)
    for (int i = 0; i < ws->nhelpers; i++) {
      const jem_helper *h = &ws->helpers[i];
      if (!h->dw_used) continue;
      for (size_t j = 0; j < m->n_weights; j++) dweights[j] += h->dw[j];
    }
  ws->jdlogits = NULL;
  ws->jdw = NULL;
  ws->jdx = NULL;
}

void jem_input_grad(jem_ws *ws, const jem_model *m, const float *x, int n,
                    const int *y, float *logits, float *dx) {
  jem__ws_check(ws, m);
  JEM_ASSERT(x && dx && n >= 1 && n <= ws->max_batch);
  const int k = m->net->k;
  jem_forward(ws, m, x, n, ws->logits);
  for (int i = 0; i < n; i++) {
    const float *z = ws->logits + (size_t)i * k;
    float *d = ws->dlogits + (size_t)i * k;
    if (y && y[i] >= 0) {
      JEM_ASSERT(y[i] < k);
      memset(d, 0, sizeof(float) * (size_t)k);
      d[y[i]] = 1.0f;
    } else {
      jem_softmax(d, z, k, 1.0f); /* d logsumexp / d z = softmax(z) */
    }
  }
  memset(dx, 0, sizeof(float) * (size_t)n * m->net->in_c * m->net->size *
                    m->net->size);
  jem_backward(ws, m, ws->dlogits, NULL, dx);
  if (logits && logits != ws->logits)
    memcpy(logits, ws->logits, sizeof(float) * (size_t)n * k);
}

