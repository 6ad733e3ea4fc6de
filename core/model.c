/* model.c - the JEM Wide-ResNet: architecture checks, parameter table, layer
 * plan and random initialisation.  The workspace that runs the plan is in
 * workspace.c, the passes in forward.c, the per-image scores in score.c. */
#include "net.h"

#include <math.h>
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

void jem__net_free(jem_net *net) {
  if (!net) return;
  free(atomic_load(&net->wide));
  free(net->blocks);
  free(net);
}

const float *jem__net_wide(const jem_model *m) {
  jem_net *net = m->net;
  if (!net->wide_total) return NULL;
  float *have = atomic_load(&net->wide);
  if (have) return have;
  float *buf = jem__falloc(net->wide_total);
  if (!buf) return NULL;
  for (int i = 0; i < net->nblocks; i++) {
    const jem__conv *cs[2] = {&net->blocks[i].c1, &net->blocks[i].c2};
    for (int j = 0; j < 2; j++)
      if (jem__conv_wide_floats(cs[j]))
        jem__conv_wide_weights(buf + cs[j]->wide_off, m->weights + cs[j]->w_off, cs[j]);
  }
  /* two threads may build it at once: the first to publish wins */
  if (!atomic_compare_exchange_strong(&net->wide, &have, buf)) {
    free(buf);
    return have;
  }
  return buf;
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
  net->max_act = jem__umax((size_t)a->in_channels * s * s, (size_t)16 * s * s);
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
      net->max_act = jem__umax(net->max_act, (size_t)in * s * s);
      net->max_act = jem__umax(net->max_act, (size_t)o * s * s);
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
        c->wide_off = net->wide_total;
        net->wide_total += jem__conv_wide_floats(c);
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
