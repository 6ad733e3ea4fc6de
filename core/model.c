/* model.c - the JEM Wide-ResNet: architecture checks, parameter table, layer
 * plan, random init, workspaces, forward/backward passes and per-image scores. */
#include "conv.h"
#include "internal.h"
#include "norm.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Architecture                                                             */

#define MAX_DEPTH 1000
#define MAX_WIDEN 64
#define MAX_CLASSES 100000

int jem_arch_validate(const jem_arch *a, char *err, size_t errlen) {
  if (!a) return jem__errf(err, errlen, JEM_EINVAL, "architecture is missing");
  if (a->depth < 10 || a->depth > MAX_DEPTH || (a->depth - 4) % 6 != 0)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.depth %d is not of the form 6n+4 with 10 <= depth <= %d",
                     a->depth, MAX_DEPTH);
  if (a->widen < 1 || a->widen > MAX_WIDEN)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.widen %d is outside 1..%d", a->widen, MAX_WIDEN);
  if (a->in_channels != 1 && a->in_channels != 3)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.in_channels %d is not 1 or 3", a->in_channels);
  if (a->image_size != 32)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.image_size %d is not 32 (the last feature map must be 8x8)",
                     a->image_size);
  if (a->num_classes < 1 || a->num_classes > MAX_CLASSES)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.num_classes %d is outside 1..%d", a->num_classes,
                     MAX_CLASSES);
  if (!(a->leak >= 0.0f && a->leak <= 1.0f))
    return jem__errf(err, errlen, JEM_EINVAL,
                     "arch.leak %g is not a slope in [0, 1]", (double)a->leak);
  if (a->norm < 0 || a->norm >= JEM_NUM_NORMS)
    return jem__errf(err, errlen, JEM_EINVAL, "arch.norm %d is not a known norm", a->norm);
  return 0;
}

/* Appends one parameter to the table when there is room; returns count+1. */
static int add_param(jem_param *out, int cap, int count, size_t *off,
                     const char *name, int ndim, int d0, int d1, int d2, int d3) {
  size_t numel = (size_t)d0;
  if (ndim > 1) numel *= (size_t)d1;
  if (ndim > 2) numel *= (size_t)d2 * (size_t)d3;
  if (out && count < cap) {
    jem_param *p = &out[count];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = ndim > 1 ? d1 : 0;
    p->shape[2] = ndim > 2 ? d2 : 0;
    p->shape[3] = ndim > 2 ? d3 : 0;
    p->numel = numel;
    p->offset = *off;
  }
  *off += numel; /* packed back to back, in table order */
  return count + 1;
}

static int add_conv(jem_param *out, int cap, int count, size_t *off,
                    const char *prefix, int cout, int cin, int k) {
  char name[JEM_PARAM_NAME_MAX];
  snprintf(name, sizeof name, "%s.weight", prefix);
  count = add_param(out, cap, count, off, name, 4, cout, cin, k, k);
  snprintf(name, sizeof name, "%s.bias", prefix);
  return add_param(out, cap, count, off, name, 1, cout, 0, 0, 0);
}

/* The tensors of a norm layer over c channels (none without a norm). */
static int add_norm(jem_param *out, int cap, int count, size_t *off, const char *prefix,
                    int kind, int c) {
  const char *const *suf;
  const int nt = jem__norm_tensors(kind, &suf);
  char name[JEM_PARAM_NAME_MAX];
  for (int t = 0; t < nt; t++) {
    snprintf(name, sizeof name, "%s.%s", prefix, suf[t]);
    count = kind == JEM_NORM_ACT ? add_param(out, cap, count, off, name, 4, 1, c, 1, 1)
                                 : add_param(out, cap, count, off, name, 1, c, 0, 0, 0);
  }
  return count;
}

int jem_arch_params(const jem_arch *a, jem_param *out, int cap) {
  if (jem_arch_validate(a, NULL, 0)) return 0;
  const int n = (a->depth - 4) / 6, k = a->widen;
  const int widths[4] = {16, 16 * k, 32 * k, 64 * k};
  size_t off = 0;
  int count = 0;
  char prefix[JEM_PARAM_NAME_MAX];
  count = add_conv(out, cap, count, &off, "f.conv1", 16, a->in_channels, 3);
  int in = widths[0];
  for (int L = 1; L <= 3; L++) {
    for (int i = 0; i < n; i++) {
      int o = widths[L], stride = (L > 1 && i == 0) ? 2 : 1;
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.bn1", L, i);
      count = add_norm(out, cap, count, &off, prefix, a->norm, in);
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.conv1", L, i);
      count = add_conv(out, cap, count, &off, prefix, o, in, 3);
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.bn2", L, i);
      count = add_norm(out, cap, count, &off, prefix, a->norm, o);
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.conv2", L, i);
      count = add_conv(out, cap, count, &off, prefix, o, o, 3);
      if (stride != 1 || in != o) {
        snprintf(prefix, sizeof prefix, "f.layer%d.%d.shortcut.0", L, i);
        count = add_conv(out, cap, count, &off, prefix, o, in, 1);
      }
      in = o;
    }
  }
  count = add_norm(out, cap, count, &off, "f.bn1", a->norm, widths[3]);
  count = add_param(out, cap, count, &off, "class_output.weight", 2,
                    a->num_classes, widths[3], 0, 0);
  count = add_param(out, cap, count, &off, "class_output.bias", 1,
                    a->num_classes, 0, 0, 0);
  return count;
}

/* ------------------------------------------------------------------------ */
/* Layer plan                                                               */

typedef struct jem__block {
  jem__conv c1, c2, sc;
  jem__norm n1, n2;        /* before conv1 and conv2 (kind none: absent) */
  int has_sc;
} jem__block;

struct jem_net {
  int in_c, size, k, feat; /* input channels, image side, classes, 64*widen */
  float leak;
  int norm;                /* JEM_NORM_* */
  jem__norm head;          /* f.bn1, before the final LeakyReLU */
  jem__conv stem;
  int nblocks;
  jem__block *blocks;
  size_t lin_w, lin_b;
  int last_hw;             /* pixels of the last map (64) */
  size_t wf_total;         /* transposed-weight floats of the 3x3 convs */
  size_t wu_total;         /* Winograd-transform floats (forward + input grad) */
  size_t max_act;          /* largest activation per image, floats */
};

static const jem_param *find_param(const jem_model *m, const char *name) {
  for (int i = 0; i < m->n_params; i++)
    if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
  return NULL;
}

/* Looks up a parameter and checks its size against the plan. */
static int bind(const jem_model *m, const char *name, size_t numel,
                size_t *off, char *err, size_t errlen) {
  const jem_param *p = find_param(m, name);
  if (!p)
    return jem__errf(err, errlen, JEM_ESHAPE, "parameter %s is missing", name);
  if (p->numel != numel)
    return jem__errf(err, errlen, JEM_ESHAPE,
                     "parameter %s has %zu elements, expected %zu", name,
                     p->numel, numel);
  if (p->offset > m->n_weights || m->n_weights - p->offset < numel)
    return jem__errf(err, errlen, JEM_EINTERNAL,
                     "parameter %s lies outside the weight block", name);
  *off = p->offset;
  return 0;
}

static int bind_conv(const jem_model *m, jem__conv *c, const char *prefix,
                     char *err, size_t errlen) {
  char name[JEM_PARAM_NAME_MAX + 16];
  int rc;
  snprintf(name, sizeof name, "%s.weight", prefix);
  if ((rc = bind(m, name, (size_t)c->cout * c->cin * c->k * c->k, &c->w_off,
                 err, errlen)))
    return rc;
  snprintf(name, sizeof name, "%s.bias", prefix);
  return bind(m, name, (size_t)c->cout, &c->b_off, err, errlen);
}

/* Binds a norm layer's tensors (nothing for none). */
static int bind_norm(const jem_model *m, jem__norm *nm, const char *prefix, int c, char *err,
                     size_t errlen) {
  const char *const *suf;
  const int nt = jem__norm_tensors(m->arch.norm, &suf);
  size_t *offs[4] = {&nm->w_off, &nm->b_off, &nm->rm_off, &nm->rv_off};
  char name[JEM_PARAM_NAME_MAX + 16];
  nm->kind = m->arch.norm;
  nm->c = c;
  for (int t = 0; t < nt; t++) {
    snprintf(name, sizeof name, "%s.%s", prefix, suf[t]);
    int rc = bind(m, name, (size_t)c, offs[t], err, errlen);
    if (rc) return rc;
  }
  return 0;
}

static jem__conv make_conv(int cin, int cout, int k, int stride, int hin) {
  jem__conv c;
  memset(&c, 0, sizeof c);
  c.cin = cin;
  c.cout = cout;
  c.k = k;
  c.stride = stride;
  c.pad = k / 2;
  c.hin = c.win = hin;
  c.hout = c.wout = (hin + 2 * c.pad - k) / stride + 1;
  return c;
}

static size_t umax(size_t a, size_t b) { return a > b ? a : b; }

void jem__net_free(jem_net *net) {
  if (!net) return;
  free(net->blocks);
  free(net);
}

int jem__net_build(jem_model *m, char *err, size_t errlen) {
  int rc = jem_arch_validate(&m->arch, err, errlen);
  if (rc) return rc;
  const jem_arch *a = &m->arch;
  const int n = (a->depth - 4) / 6, k = a->widen;
  const int widths[4] = {16, 16 * k, 32 * k, 64 * k};
  jem_net *net = calloc(1, sizeof *net);
  if (!net) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for the layer plan");
  net->nblocks = 3 * n;
  net->blocks = calloc((size_t)net->nblocks, sizeof *net->blocks);
  if (!net->blocks) {
    free(net);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for the layer plan");
  }
  net->in_c = a->in_channels;
  net->size = a->image_size;
  net->k = a->num_classes;
  net->feat = widths[3];
  net->leak = a->leak;
  net->norm = a->norm;

  int s = a->image_size;
  net->stem = make_conv(a->in_channels, 16, 3, 1, s);
  net->max_act = umax((size_t)a->in_channels * s * s, (size_t)16 * s * s);
  if ((rc = bind_conv(m, &net->stem, "f.conv1", err, errlen))) goto fail;
  int in = widths[0], b = 0;
  char prefix[JEM_PARAM_NAME_MAX];
  for (int L = 1; L <= 3; L++) {
    for (int i = 0; i < n; i++, b++) {
      jem__block *B = &net->blocks[b];
      int o = widths[L], stride = (L > 1 && i == 0) ? 2 : 1;
      B->c1 = make_conv(in, o, 3, 1, s);
      B->c2 = make_conv(o, o, 3, stride, s);
      B->has_sc = stride != 1 || in != o;
      if (B->has_sc) B->sc = make_conv(in, o, 1, stride, s);
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.bn1", L, i);
      if ((rc = bind_norm(m, &B->n1, prefix, in, err, errlen))) goto fail;
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.bn2", L, i);
      if ((rc = bind_norm(m, &B->n2, prefix, o, err, errlen))) goto fail;
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.conv1", L, i);
      if ((rc = bind_conv(m, &B->c1, prefix, err, errlen))) goto fail;
      snprintf(prefix, sizeof prefix, "f.layer%d.%d.conv2", L, i);
      if ((rc = bind_conv(m, &B->c2, prefix, err, errlen))) goto fail;
      if (B->has_sc) {
        snprintf(prefix, sizeof prefix, "f.layer%d.%d.shortcut.0", L, i);
        if ((rc = bind_conv(m, &B->sc, prefix, err, errlen))) goto fail;
      }
      net->max_act = umax(net->max_act, (size_t)in * s * s);
      net->max_act = umax(net->max_act, (size_t)o * s * s);
      s = B->c2.hout;
      in = o;
    }
  }
  net->last_hw = s * s;
  /* room for the transposed (for stride 1 also flipped) weights of every 3x3
   * convolution whose input gradient may run on the direct kernel (the
   * others never read them: 146 MB a workspace for WRN-28-10) */
  {
    size_t wf = 0;
    jem__conv *all[3];
    for (int i = -1; i < net->nblocks; i++) {
      int cnt = 0;
      if (i < 0) {
        all[cnt++] = &net->stem;
      } else {
        all[cnt++] = &net->blocks[i].c1;
        all[cnt++] = &net->blocks[i].c2;
      }
      for (int j = 0; j < cnt; j++) {
        jem__conv *c = all[j];
        if (jem__conv_fast_shape(c)) {
          c->wf_off = wf;
          wf += (size_t)c->cin * c->cout * 9;
        }
        /* the Winograd transforms of w, then of the flipped weights */
        c->wu_off = net->wu_total;
        net->wu_total += 2 * jem__conv_wino_floats(c);
      }
    }
    net->wf_total = wf;
  }
  if (s != 8) {
    rc = jem__errf(err, errlen, JEM_EINVAL, "last feature map is %dx%d, not 8x8", s, s);
    goto fail;
  }
  if ((rc = bind_norm(m, &net->head, "f.bn1", widths[3], err, errlen))) goto fail;
  if ((rc = bind(m, "class_output.weight", (size_t)a->num_classes * widths[3],
                 &net->lin_w, err, errlen)))
    goto fail;
  if ((rc = bind(m, "class_output.bias", (size_t)a->num_classes, &net->lin_b,
                 err, errlen)))
    goto fail;
  jem__net_free(m->net);
  m->net = net;
  return 0;
fail:
  jem__net_free(net);
  return rc;
}

/* ------------------------------------------------------------------------ */
/* Random initialisation (PyTorch defaults)                                 */

static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void jem_model_init_random(jem_model *m, uint64_t seed) {
  JEM_ASSERT(m && m->weights);
  uint64_t st = seed ^ 0x6a656d2d696e6974ULL; /* "jem-init" */
  memset(m->weights, 0, m->n_weights * sizeof(float));
  for (int i = 0; i < m->n_params; i++) {
    const jem_param *p = &m->params[i];
    size_t fan_in = 0;
    const char *dot = strrchr(p->name, '.');
    if (dot && strcmp(dot, ".bias") == 0) {
      /* a bias takes the fan-in of its layer's weight */
      char wname[JEM_PARAM_NAME_MAX + 8];
      snprintf(wname, sizeof wname, "%.*s.weight", (int)(dot - p->name), p->name);
      const jem_param *w = find_param(m, wname);
      if (w && w->shape[0] > 0) fan_in = w->numel / (size_t)w->shape[0];
    } else if (p->shape[0] > 0) {
      fan_in = p->numel / (size_t)p->shape[0];
    }
    /* kaiming_uniform(a=sqrt(5)) gives bound sqrt(6/((1+5) fan_in)) = 1/sqrt(fan_in) */
    float bound = fan_in ? 1.0f / sqrtf((float)fan_in) : 0.0f;
    float *w = m->weights + p->offset;
    if (strstr(p->name, ".bn")) { /* norm layers start as the identity, as in PyTorch */
      const char *suf = strrchr(p->name, '.') + 1;
      const float v = !strcmp(suf, "weight") || !strcmp(suf, "running_var") ||
                      !strcmp(suf, "scale");
      for (size_t j = 0; j < p->numel; j++) w[j] = v;
      continue;
    }
    for (size_t j = 0; j < p->numel; j++) {
      float u = (float)(splitmix64(&st) >> 40) * (1.0f / 16777216.0f);
      w[j] = (2.0f * u - 1.0f) * bound;
    }
  }
}

/* ------------------------------------------------------------------------ */
/* Workspaces                                                               */

/* Cap of an im2col buffer in floats: larger batches are convolved in chunks
 * of images so that the buffer stays about the size of an L2 cache. */
#ifndef JEM_COL_CAP
#define JEM_COL_CAP ((size_t)1 << 18)
#endif

/* A batch is split into contiguous slices of images, each with its own
 * activations and scratch, run by the workspace's threads (the caller's
 * thread among them), each taking the next slice left.  Without normalisation
 * layers images never interact, so a slice is a complete small batch.  Slices
 * hold at most SLICE_IMAGES images so that a slice's activations stay in the
 * caches while it runs through the whole network.  The split depends only on
 * the batch size n -- never on the thread count or the workspace's max_batch
 * -- so a batch of n gives the same bits in `jem sample`, a daemon job and
 * any workspace big enough for it. */
#define SLICE_IMAGES 8
typedef struct jem_sub {
  int cap;               /* images this slice can hold */
  int n0, n;             /* its images in the last forward */
  float *x;              /* [C, n, S, S] */
  float **a;             /* nblocks+1 block inputs / outputs, CNHW */
  float **u;             /* nblocks conv1 outputs (pre-activation), CNHW */
  float **t1, **t2, *th; /* with a norm: norm1(a[b]), norm2(u[b]), f.bn1(a[nblocks]) */
  float *g[3];           /* gradient buffers, max_act * cap each */
  float *col;
  size_t col_cap;
  float *dfeat;          /* [cap, F] */
} jem_sub;

enum { JOB_FORWARD = 1, JOB_BACKWARD, JOB_PARTS, JOB_STOP };

typedef struct jem_helper {
  jem_ws *ws;
  int tid;
  pthread_t th;
  float *dw;             /* private parameter gradient (TRAIN) */
  int dw_used;           /* dw holds this job's gradient */
} jem_helper;

struct jem_ws {
  int max_batch, flags;
  int invariant;         /* jem_ws_set_batch_invariant */
  int n;                 /* batch of the last forward, 0 = none */
  const jem_model *m;    /* model of the last forward */
  /* plan signature, checked against the model at every call */
  int in_c, size, k, nfeat, nblocks, norm;
  size_t max_act, n_weights;
  size_t bytes;
  float *mem;            /* the one scratch block */
  float *feat;           /* [N, F] */
  float *fwhite;         /* [N, F] whitened features (mahalanobis) */
  float *logits, *dlogits, *probs; /* [N, K] */
  float *dx;             /* [N, C, S, S] for jem_score_batch */
  float *wflip;          /* transposed 3x3 weights (derive_weights) */
  /* JEM_WS_FIXED_WEIGHTS: wflip and the Winograd transforms (wino) derived
   * once per model, the one whose uid is derived_uid (0: none yet) */
  float *wino;
  uint64_t derived_uid;
  int nsub;
  jem_sub *sub;

  /* helper threads (threads - 1), started at creation, parked between jobs */
  int nhelpers;
  jem_helper *helpers;
  int sync_ok;           /* mutex and condition variables initialised */
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  unsigned gen;          /* bumped for every job */
  int pending;           /* helpers still busy with the current job */
  int active;            /* threads taking part in the current job */
  atomic_int next;       /* next slice (or part) to hand out */
  int job;
  /* JOB_PARTS: jem__par's parts of one layer of a lone slice */
  jem__par_fn par_fn;
  void *par_arg;
  int par_parts;
  /* job arguments */
  const float *jx;
  float *jlogits;
  const float *jdlogits;
  float *jdw, *jdx;
};

static size_t col_need(const jem_net *net, int nb) {
  size_t need = jem__conv_col_need(&net->stem, nb, JEM_COL_CAP);
  for (int b = 0; b < net->nblocks; b++) {
    const jem__block *B = &net->blocks[b];
    need = umax(need, jem__conv_col_need(&B->c1, nb, JEM_COL_CAP));
    need = umax(need, jem__conv_col_need(&B->c2, nb, JEM_COL_CAP));
    if (B->has_sc && !jem__conv_direct(&B->sc, 0))
      need = umax(need, jem__conv_col_need(&B->sc, nb, JEM_COL_CAP));
  }
  return need;
}

/* Rounds a float count up to a multiple of 16 (64 bytes). */
static size_t al16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Floats that one slice of `cap` images needs; with base != NULL, also points
 * the slice's buffers into base. */
static size_t plan_sub(const jem_net *net, jem_sub *s, int cap, float *base) {
  const size_t N = (size_t)cap;
  const size_t css = (size_t)net->in_c * net->size * net->size;
  size_t off = 0;
#define TAKE(dst, count)                 \
  do {                                   \
    size_t c_ = al16(count);             \
    if (base) (dst) = base + off;        \
    off += c_;                           \
  } while (0)
  TAKE(s->x, css * N);
  TAKE(s->a[0], (size_t)net->stem.cout * jem__conv_hwo(&net->stem) * N);
  for (int b = 0; b < net->nblocks; b++) {
    const jem__block *B = &net->blocks[b];
    TAKE(s->a[b + 1], (size_t)B->c2.cout * jem__conv_hwo(&B->c2) * N);
    TAKE(s->u[b], (size_t)B->c1.cout * jem__conv_hwo(&B->c1) * N);
    if (net->norm) {
      TAKE(s->t1[b], (size_t)B->c1.cin * B->c1.hin * B->c1.win * N);
      TAKE(s->t2[b], (size_t)B->c2.cin * B->c2.hin * B->c2.win * N);
    }
  }
  if (net->norm) TAKE(s->th, (size_t)net->feat * net->last_hw * N);
  for (int i = 0; i < 3; i++) TAKE(s->g[i], net->max_act * N);
  const size_t cc = col_need(net, cap);
  TAKE(s->col, cc);
  TAKE(s->dfeat, (size_t)net->feat * N);
#undef TAKE
  if (base) {
    s->cap = cap;
    s->col_cap = cc;
  }
  return off;
}

static void run_sub(jem_ws *ws, int si, int tid);

/* Takes slices (or a layer's parts) until none is left: a thread slowed
 * down by other work on its CPU simply ends up running fewer of them. */
static void run_work(jem_ws *ws, int tid) {
  for (;;) {
    int i = atomic_fetch_add_explicit(&ws->next, 1, memory_order_relaxed);
    if (ws->job == JOB_PARTS) {
      if (i >= ws->par_parts) return;
      ws->par_fn(ws->par_arg, i, ws->par_parts);
    } else {
      if (i >= ws->nsub) return;
      run_sub(ws, i, tid);
    }
  }
}

static void *helper_loop(void *arg) {
  jem_helper *h = arg;
  jem_ws *ws = h->ws;
  unsigned seen = 0;
  for (;;) {
    pthread_mutex_lock(&ws->mu);
    while (ws->gen == seen) pthread_cond_wait(&ws->go, &ws->mu);
    seen = ws->gen;
    const int job = ws->job, active = ws->active;
    pthread_mutex_unlock(&ws->mu);
    if (job == JOB_STOP) return NULL;
    if (h->tid < active) run_work(ws, h->tid);
    pthread_mutex_lock(&ws->mu);
    if (--ws->pending == 0) pthread_cond_signal(&ws->done);
    pthread_mutex_unlock(&ws->mu);
  }
}

/* Runs `job` with `active` threads (the caller being thread 0), which take
 * its slices or parts first come, first served. */
static void dispatch(jem_ws *ws, int job, int active) {
  pthread_mutex_lock(&ws->mu);
  ws->job = job;
  ws->active = active;
  ws->pending = ws->nhelpers;
  atomic_store_explicit(&ws->next, 0, memory_order_relaxed);
  ws->gen++;
  pthread_cond_broadcast(&ws->go);
  pthread_mutex_unlock(&ws->mu);
  run_work(ws, 0);
  pthread_mutex_lock(&ws->mu);
  while (ws->pending > 0) pthread_cond_wait(&ws->done, &ws->mu);
  pthread_mutex_unlock(&ws->mu);
}

/* The workspace whose idle threads the calling thread may lend to its
 * layers (jem__par), or NULL. */
static _Thread_local jem_ws *tl_lender;

void jem__par(jem__par_fn fn, void *arg, int parts) {
  jem_ws *ws = tl_lender;
  int active = ws ? ws->nhelpers + 1 : 1;
  if (active > parts) active = parts;
  if (active <= 1) {
    for (int i = 0; i < parts; i++) fn(arg, i, parts);
    return;
  }
  const int job = ws->job; /* the lone slice's, running on this thread */
  ws->par_fn = fn;
  ws->par_arg = arg;
  ws->par_parts = parts;
  dispatch(ws, JOB_PARTS, active);
  ws->job = job;
}

/* Runs `job` on the `used` non-empty slices with up to `threads` threads.
 * A lone slice runs on the caller's thread, which lends the other threads
 * to its layers (jem__par): one image per thread would leave them idle. */
static void run_job(jem_ws *ws, int job, int threads, int used) {
  int active = threads < 1 ? 1 : threads;
  if (active > ws->nhelpers + 1) active = ws->nhelpers + 1;
  if (active > used) active = used;
  if (active <= 1) {
    ws->job = job;
    if (used == 1 && threads > 1 && ws->nhelpers > 0) tl_lender = ws;
    for (int si = 0; si < ws->nsub; si++) run_sub(ws, si, 0);
    tl_lender = NULL;
    return;
  }
  dispatch(ws, job, active);
}

static void stop_helpers(jem_ws *ws) {
  if (ws->nhelpers > 0) {
    pthread_mutex_lock(&ws->mu);
    ws->job = JOB_STOP;
    ws->gen++;
    pthread_cond_broadcast(&ws->go);
    pthread_mutex_unlock(&ws->mu);
    for (int i = 0; i < ws->nhelpers; i++) pthread_join(ws->helpers[i].th, NULL);
  }
  ws->nhelpers = 0;
}

/* Threads a workspace for max_batch images runs with. */
static int ws_threads(int max_batch) {
  int nthr = jem__threads();
  if (nthr > 64) nthr = 64;
  if (nthr > max_batch) nthr = max_batch;
  return nthr < 1 ? 1 : nthr;
}

/* Floats of a workspace's scratch block (ws_bytes: plus its header). */
static size_t ws_floats(const jem_model *m, int max_batch, int flags, int nthr,
                        size_t *head) {
  const jem_net *net = m->net;
  const size_t N = (size_t)max_batch;
  const int nb = net->nblocks;
  const int nsub = (max_batch + SLICE_IMAGES - 1) / SLICE_IMAGES;
  *head = sizeof(jem_ws) + sizeof(jem_sub) * (size_t)nsub +
          sizeof(float *) * (size_t)(4 * nb + 1) * (size_t)nsub +
          sizeof(jem_helper) * (size_t)nthr;
  const size_t css = (size_t)net->in_c * net->size * net->size;
  const int cap = max_batch < SLICE_IMAGES ? max_batch : SLICE_IMAGES;
  jem_sub plan = {0};
  size_t total = (size_t)nsub * plan_sub(net, &plan, cap, NULL);
  /* helpers' private parameter gradients */
  if ((flags & JEM_WS_TRAIN) && nthr > 1) total += (size_t)(nthr - 1) * al16(m->n_weights);
  total += 2 * al16((size_t)net->feat * N);
  total += 3 * al16((size_t)net->k * N);
  total += al16(css * N);
  total += al16(net->wf_total);
  if (flags & JEM_WS_FIXED_WEIGHTS) total += al16(net->wu_total);
  return total;
}

int jem_ws_batch_within(const jem_model *m, int max_batch, int flags, size_t bytes) {
  JEM_ASSERT(m && m->net && max_batch >= 1);
  int b = max_batch;
  for (;;) {
    size_t head, total = ws_floats(m, b, flags, ws_threads(b), &head);
    if (b == 1 || total * sizeof(float) + head <= bytes) return b;
    /* whole slices while there are several, then image by image */
    b = b > SLICE_IMAGES ? (b - 1) / SLICE_IMAGES * SLICE_IMAGES : b - 1;
  }
}

jem_ws *jem_ws_create(const jem_model *m, int max_batch, int flags) {
  if (!m || !m->net || max_batch < 1) return NULL;
  const jem_net *net = m->net;
  const size_t N = (size_t)max_batch;
  const int nb = net->nblocks;
  const int nthr = ws_threads(max_batch);
  const int nsub = (max_batch + SLICE_IMAGES - 1) / SLICE_IMAGES;
  size_t head;
  const size_t total = ws_floats(m, max_batch, flags, nthr, &head);
  /* one allocation for the struct, slices, pointer tables and helpers */
  jem_ws *ws = calloc(1, head);
  if (!ws) return NULL;
  ws->sub = (jem_sub *)(ws + 1);
  float **ptrs = (float **)(ws->sub + nsub);
  ws->helpers = (jem_helper *)(ptrs + (size_t)(4 * nb + 1) * nsub);
  ws->max_batch = max_batch;
  ws->flags = flags;
  ws->in_c = net->in_c;
  ws->size = net->size;
  ws->k = net->k;
  ws->nfeat = net->feat;
  ws->nblocks = nb;
  ws->norm = net->norm;
  ws->max_act = net->max_act;
  ws->n_weights = m->n_weights;
  ws->nsub = nsub;

  const size_t css = (size_t)net->in_c * net->size * net->size;
  const int cap = max_batch < SLICE_IMAGES ? max_batch : SLICE_IMAGES;
  for (int si = 0; si < nsub; si++) {
    jem_sub *s = &ws->sub[si];
    s->a = ptrs + (size_t)(4 * nb + 1) * si;
    s->u = s->a + nb + 1;
    s->t1 = s->u + nb;
    s->t2 = s->t1 + nb;
  }
  const int with_dw = (flags & JEM_WS_TRAIN) && nthr > 1;
  ws->mem = jem__falloc(total);
  if (!ws->mem) {
    free(ws);
    return NULL;
  }
  ws->bytes = total * sizeof(float) + head;
  float *p = ws->mem;
  for (int si = 0; si < nsub; si++) {
    jem_sub *s = &ws->sub[si];
    p += plan_sub(net, s, cap, p);
  }
  for (int i = 0; with_dw && i < nthr - 1; i++) {
    ws->helpers[i].dw = p;
    p += al16(m->n_weights);
  }
  ws->feat = p; p += al16((size_t)net->feat * N);
  ws->fwhite = p; p += al16((size_t)net->feat * N);
  ws->logits = p; p += al16((size_t)net->k * N);
  ws->dlogits = p; p += al16((size_t)net->k * N);
  ws->probs = p; p += al16((size_t)net->k * N);
  ws->dx = p; p += al16(css * N);
  ws->wflip = p; p += al16(net->wf_total);
  if (flags & JEM_WS_FIXED_WEIGHTS) {
    ws->wino = p;
    p += al16(net->wu_total);
  }
  JEM_ASSERT((size_t)(p - ws->mem) == total);

  if (nthr > 1) {
    /* the slices are the parallelism: OpenBLAS runs single-threaded inside */
    jem__blas_single_thread();
    if (pthread_mutex_init(&ws->mu, NULL) == 0) {
      if (pthread_cond_init(&ws->go, NULL) == 0) {
        if (pthread_cond_init(&ws->done, NULL) == 0) {
          ws->sync_ok = 1;
        } else {
          pthread_cond_destroy(&ws->go);
          pthread_mutex_destroy(&ws->mu);
        }
      } else {
        pthread_mutex_destroy(&ws->mu);
      }
    }
    for (int i = 0; ws->sync_ok && i < nthr - 1; i++) {
      jem_helper *h = &ws->helpers[ws->nhelpers];
      h->ws = ws;
      h->tid = i + 1;
      /* a helper that fails to start only costs parallelism */
      if (pthread_create(&h->th, NULL, helper_loop, h) != 0) break;
      ws->nhelpers++;
    }
  }
  return ws;
}

void jem_ws_free(jem_ws *ws) {
  if (!ws) return;
  stop_helpers(ws);
  if (ws->sync_ok) {
    pthread_cond_destroy(&ws->done);
    pthread_cond_destroy(&ws->go);
    pthread_mutex_destroy(&ws->mu);
  }
  free(ws->mem);
  free(ws);
}

int jem_ws_max_batch(const jem_ws *ws) { return ws ? ws->max_batch : 0; }
int jem_ws_set_batch_invariant(jem_ws *ws, int on) {
  const int was = ws->invariant;
  ws->invariant = on != 0;
  return was;
}
size_t jem_ws_bytes(const jem_ws *ws) { return ws ? ws->bytes : 0; }
const float *jem_ws_features(const jem_ws *ws) { return ws ? ws->feat : NULL; }

float *jem__ws_input_scratch(jem_ws *ws) { return ws->dx; }

/* The workspace must have been planned for this model's architecture. */
static void check_ws(const jem_ws *ws, const jem_model *m) {
  JEM_ASSERT(ws && m && m->net && m->weights);
  const jem_net *net = m->net;
  JEM_ASSERT(ws->in_c == net->in_c && ws->size == net->size &&
             ws->k == net->k && ws->nfeat == net->feat &&
             ws->nblocks == net->nblocks && ws->norm == net->norm &&
             ws->max_act == net->max_act &&
             ws->n_weights == m->n_weights);
}

/* ------------------------------------------------------------------------ */
/* Forward and backward                                                     */

/* A layer's cached Winograd transform (of its weights, or with flipped != 0
 * of its input gradient's flipped weights), or NULL: none kept. */
static const float *wino_of(const jem_ws *ws, const jem__conv *c, int flipped) {
  const size_t nu = ws->wino ? jem__conv_wino_floats(c) : 0;
  return nu ? ws->wino + c->wu_off + (flipped ? nu : 0) : NULL;
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
  if (fixed) ws->derived_uid = m->uid;
}

static void sub_forward(jem_ws *ws, jem_sub *s) {
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
static void conv_norm_backward(float *din, float *tmp, const float *dout, const float *in,
                               const float *t, const jem__conv *c, const jem__norm *nm,
                               const float *W, const float *wf, const float *wuf, float *dW,
                               float leak, int n, float *col, size_t col_cap) {
  const size_t len = (size_t)c->cin * c->hin * c->win * n;
  if (!dW && jem__conv_fast(c)) { /* input gradient only: the direct kernel */
    jem__conv_input_grad(tmp, dout, NULL, leak, wf, wuf, c, n, col, col_cap);
  } else {
    memset(tmp, 0, sizeof(float) * len);
    jem__conv_backward(dout, t, W + c->w_off, wf, c, n, 1, leak, dW ? dW + c->w_off : NULL,
                       dW ? dW + c->b_off : NULL, tmp, col, col_cap);
  }
  jem__lrelu_backward(tmp, t, len, leak);
  memset(din, 0, sizeof(float) * len);
  jem__norm_backward(din, tmp, in, nm, W, n, c->hin * c->win, dW);
}

static void sub_backward(jem_ws *ws, jem_sub *s, int tid) {
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
      conv_norm_backward(ga, gv, gcur, s->u[b], s->t2[b], &B->c2, &B->n2, W, WF(&B->c2),
                         wino_of(ws, &B->c2, 1), dW, leak, n, s->col, s->col_cap);
      conv_norm_backward(ga, gv, ga, s->a[b], s->t1[b], &B->c1, &B->n1, W, WF(&B->c1),
                         wino_of(ws, &B->c1, 1), dW, leak, n, s->col, s->col_cap);
      if (B->has_sc)
        jem__conv_backward(gcur, s->a[b], W + B->sc.w_off, NULL, &B->sc, n, 0, leak,
                           DW(B->sc.w_off), DW(B->sc.b_off), ga, s->col, s->col_cap);
      else
        for (size_t i = 0; i < alen; i++) ga[i] += gcur[i];
      gcur = ga;
      continue;
    }
    if (!dW && jem__conv_fast(&B->c2) && jem__conv_fast(&B->c1)) {
      /* input gradient only, on the direct kernel: the LeakyReLU'(u) gate
       * rides along with conv1's padded copy and nothing is zeroed */
      jem__conv_input_grad(gv, gcur, NULL, leak, WF(&B->c2), wino_of(ws, &B->c2, 1),
                           &B->c2, n, s->col, s->col_cap);
      jem__conv_input_grad(ga, gv, s->u[b], leak, WF(&B->c1), wino_of(ws, &B->c1, 1),
                           &B->c1, n, s->col, s->col_cap);
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

static void run_sub(jem_ws *ws, int si, int tid) {
  jem__set_batch_invariant(ws->invariant); /* for the kernels on this thread */
  if (ws->job == JOB_FORWARD)
    sub_forward(ws, &ws->sub[si]);
  else if (ws->job == JOB_BACKWARD)
    sub_backward(ws, &ws->sub[si], tid);
}

void jem_forward(jem_ws *ws, const jem_model *m, const float *x, int n,
                 float *logits) {
  check_ws(ws, m);
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
  run_job(ws, JOB_FORWARD, jem__threads(), used);
  ws->jx = NULL;
  ws->jlogits = NULL;
}

void jem_backward(jem_ws *ws, const jem_model *m, const float *dlogits,
                  float *dweights, float *dx) {
  check_ws(ws, m);
  JEM_ASSERT(dlogits);
  JEM_ASSERT(ws->n >= 1 && ws->m == m); /* needs a forward on this ws first */
  JEM_ASSERT(!dweights || (ws->flags & JEM_WS_TRAIN));
  if (!dweights && !dx) return;
  ws->jdlogits = dlogits;
  ws->jdw = dweights;
  ws->jdx = dx;
  if (!(ws->flags & JEM_WS_FIXED_WEIGHTS)) derive_weights(ws, m);
  for (int i = 0; i < ws->nhelpers; i++) ws->helpers[i].dw_used = 0;
  run_job(ws, JOB_BACKWARD, jem__threads(), (ws->n + SLICE_IMAGES - 1) / SLICE_IMAGES);
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

/* ------------------------------------------------------------------------ */
/* Scores                                                                   */

float jem_logsumexp(const float *z, int k) {
  JEM_ASSERT(z && k >= 1);
  float mx = z[0];
  for (int i = 1; i < k; i++) {
    if (isnan(z[i])) return z[i];
    if (z[i] > mx) mx = z[i];
  }
  if (isnan(mx)) return mx;
  if (isinf(mx)) return mx; /* +inf, or every logit -inf */
  double s = 0.0;
  for (int i = 0; i < k; i++) s += exp((double)z[i] - (double)mx);
  return (float)((double)mx + log(s));
}

void jem_softmax(float *p, const float *z, int k, float temperature) {
  JEM_ASSERT(p && z && k >= 1 && temperature > 0.0f);
  double mx = -INFINITY;
  int has_nan = 0;
  for (int i = 0; i < k; i++) {
    double v = (double)z[i] / temperature;
    if (isnan(v)) has_nan = 1;
    if (v > mx) mx = v;
  }
  if (has_nan || isinf(mx)) {
    /* +inf logits share the mass; NaN (or all -inf) gives NaN */
    int ninf = 0;
    if (!has_nan && mx > 0)
      for (int i = 0; i < k; i++) ninf += isinf(z[i]) && z[i] > 0;
    for (int i = 0; i < k; i++)
      p[i] = ninf ? ((isinf(z[i]) && z[i] > 0) ? 1.0f / (float)ninf : 0.0f)
                  : NAN;
    return;
  }
  double s = 0.0;
  for (int i = 0; i < k; i++) s += exp((double)z[i] / temperature - mx);
  for (int i = 0; i < k; i++)
    p[i] = (float)(exp((double)z[i] / temperature - mx) / s);
}

void jem_input_grad(jem_ws *ws, const jem_model *m, const float *x, int n,
                    const int *y, float *logits, float *dx) {
  check_ws(ws, m);
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

/* out[i] = min_k |W f_i - W mean_k|^2 for the c images of the last forward. */
static void mahalanobis(jem_ws *ws, const jem_model *m, int c, float *out) {
  const int F = m->net->feat, K = m->net->k;
  if (!m->feat_whiten) {
    for (int i = 0; i < c; i++) out[i] = NAN;
    return;
  }
  /* batch-invariant: the same product for every row, whatever c */
  const int rows = ws->invariant ? 1 : c;
  for (int r0 = 0; r0 < c; r0 += rows)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, F, F, 1.0f,
                ws->feat + (size_t)r0 * F, F, m->feat_whiten, F, 0.0f,
                ws->fwhite + (size_t)r0 * F, F);
  for (int i = 0; i < c; i++) {
    const float *u = ws->fwhite + (size_t)i * F;
    double best = INFINITY;
    for (int k = 0; k < K; k++) {
      const float *w = m->feat_wmean + (size_t)k * F;
      double d = 0.0;
      for (int j = 0; j < F; j++) d += (double)(u[j] - w[j]) * (u[j] - w[j]);
      if (d < best) best = d;
    }
    out[i] = (float)best;
  }
}

void jem_score_batch(jem_ws *ws, const jem_model *m, const float *x, int n,
                     int want_grad, const jem_scores *out) {
  check_ws(ws, m);
  JEM_ASSERT(out && n >= 0 && (x || n == 0));
  const int k = m->net->k;
  const size_t css = (size_t)m->net->in_c * m->net->size * m->net->size;
  const float T = m->temperature > 0.0f ? m->temperature : 1.0f;
  for (int off = 0; off < n; off += ws->max_batch) {
    int c = n - off < ws->max_batch ? n - off : ws->max_batch;
    const float *xc = x + (size_t)off * css;
    if (want_grad)
      jem_input_grad(ws, m, xc, c, NULL, ws->logits, ws->dx);
    else
      jem_forward(ws, m, xc, c, ws->logits);
    float *const *sc = out->score;
    if (sc[JEM_SCORE_MAHALANOBIS]) mahalanobis(ws, m, c, sc[JEM_SCORE_MAHALANOBIS] + off);
    for (int i = 0; i < c; i++) {
      const size_t r = (size_t)off + i;
      const float *z = ws->logits + (size_t)i * k;
      float *p = ws->probs + (size_t)i * k;
      float lse = jem_logsumexp(z, k);
      int best = 0;
      for (int j = 1; j < k; j++)
        if (z[j] > z[best]) best = j;
      jem_softmax(p, z, k, T);
      if (out->logits) memcpy(out->logits + r * k, z, sizeof(float) * (size_t)k);
      if (out->probs) memcpy(out->probs + r * k, p, sizeof(float) * (size_t)k);
      if (out->label) out->label[r] = best;
      if (out->confidence) out->confidence[r] = p[best];
      if (sc[JEM_SCORE_ENERGY]) sc[JEM_SCORE_ENERGY][r] = -lse;
      if (sc[JEM_SCORE_MAX_SOFTMAX]) sc[JEM_SCORE_MAX_SOFTMAX][r] = expf(z[best] - lse);
      if (sc[JEM_SCORE_ENERGY_COMPLEXITY]) /* deflate only when the model has a weight */
        sc[JEM_SCORE_ENERGY_COMPLEXITY][r] =
            isnan(m->ood.complexity_weight)
                ? NAN
                : jem_energy_complexity(m, -lse, jem_input_complexity_bits(m, xc + (size_t)i * css));
      if (sc[JEM_SCORE_GRAD_NORM]) {
        double s = 0.0;
        const float *g = ws->dx + (size_t)i * css;
        for (size_t j = 0; want_grad && j < css; j++) s += (double)g[j] * g[j];
        sc[JEM_SCORE_GRAD_NORM][r] = want_grad ? (float)sqrt(s) : NAN;
      }
    }
  }
}
