/* eval.c - scoring whole sets and PGD L-inf / L2 attacks on the cross-entropy
 * loss (for `jem eval` and `jem calibrate`). */
#include "internal.h"
#include "metrics.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

static float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Is pixel (r, c) of an s x s image inside the unpadded region? */
static int inside(int r, int c, int s, int pad) {
  return r >= pad && r < s - pad && c >= pad && c < s - pad;
}

/* Projects xa onto {x + d : d in eps-ball} and [-1,1], fixed border kept. */
static void project(float *xa, const float *x, int c, int s, int pad, int norm,
                    float eps) {
  const size_t ss = (size_t)s * s;
  if (norm == JEM_PGD_L2) {
    double n2 = 0.0;
    for (int ch = 0; ch < c; ch++)
      for (size_t j = 0; j < ss; j++) {
        double d = (double)xa[ch * ss + j] - x[ch * ss + j];
        n2 += d * d;
      }
    double nrm = sqrt(n2);
    float scale = nrm > eps ? (float)(eps / nrm) : 1.0f;
    for (size_t j = 0; j < (size_t)c * ss; j++)
      xa[j] = clampf(x[j] + (xa[j] - x[j]) * scale, -1.0f, 1.0f);
  } else {
    for (size_t j = 0; j < (size_t)c * ss; j++)
      xa[j] = clampf(clampf(xa[j], x[j] - eps, x[j] + eps), -1.0f, 1.0f);
  }
  /* the padding is preprocessing, not image content: keep it exact */
  for (int ch = 0; ch < c; ch++)
    for (int r = 0; r < s; r++)
      for (int col = 0; col < s; col++)
        if (!inside(r, col, s, pad)) xa[ch * ss + (size_t)r * s + col] = x[ch * ss + (size_t)r * s + col];
}

int jem_pgd_attack(jem_ws *ws, const jem_model *m, const float *x,
                   const int *y, int n, const jem_pgd_params *p,
                   jem_rng *rng, float *xadv, int *correct, char *err,
                   size_t errlen) {
  if (!ws || !m || !x || !y || !p || !xadv || n < 0)
    return jem__errf(err, errlen, JEM_EINVAL, "pgd: NULL argument");
  if (p->norm != JEM_PGD_LINF && p->norm != JEM_PGD_L2)
    return jem__errf(err, errlen, JEM_EINVAL, "pgd: norm %d (want 0 = L-inf or 2 = L2)",
                     p->norm);
  if (!(p->eps >= 0.0f) || !(p->step >= 0.0f) || p->steps < 0)
    return jem__errf(err, errlen, JEM_EINVAL, "pgd: eps, step and steps must be >= 0");
  if (p->random_start && !rng)
    return jem__errf(err, errlen, JEM_EINVAL, "pgd: random start needs an rng");
  const int c = m->arch.in_channels, s = m->arch.image_size, k = m->arch.num_classes;
  if (p->pad < 0 || 2 * p->pad >= s)
    return jem__errf(err, errlen, JEM_EINVAL, "pgd: pad %d too large for %dx%d images",
                     p->pad, s, s);
  const size_t chw = (size_t)c * s * s;
  const int mb = jem_ws_max_batch(ws);
  float *logits = malloc((size_t)mb * k * sizeof *logits);
  float *dlog = malloc((size_t)mb * k * sizeof *dlog);
  float *g = malloc((size_t)mb * chw * sizeof *g);
  if (!logits || !dlog || !g) {
    free(logits);
    free(dlog);
    free(g);
    return jem__errf(err, errlen, JEM_ENOMEM, "pgd: out of memory");
  }
  memcpy(xadv, x, (size_t)n * chw * sizeof *xadv);
  if (p->random_start && p->norm == JEM_PGD_LINF && p->eps > 0.0f) {
    for (int i = 0; i < n; i++) {
      float *xa = xadv + (size_t)i * chw;
      for (size_t j = 0; j < chw; j++) xa[j] += p->eps * (2.0f * jem_rng_uniform(rng) - 1.0f);
      project(xa, x + (size_t)i * chw, c, s, p->pad, p->norm, p->eps);
    }
  }
  for (int i0 = 0; i0 < n; i0 += mb) {
    const int b = n - i0 < mb ? n - i0 : mb;
    float *xa = xadv + (size_t)i0 * chw;
    const float *x0 = x + (size_t)i0 * chw;
    for (int step = 0; step < p->steps && p->eps > 0.0f; step++) {
      jem_forward(ws, m, xa, b, logits);
      for (int i = 0; i < b; i++) {
        /* d CE / d logits = softmax - onehot */
        jem_softmax(dlog + (size_t)i * k, logits + (size_t)i * k, k, 1.0f);
        dlog[(size_t)i * k + y[i0 + i]] -= 1.0f;
      }
      memset(g, 0, (size_t)b * chw * sizeof *g);
      jem_backward(ws, m, dlog, NULL, g);
      for (int i = 0; i < b; i++) {
        float *xi = xa + (size_t)i * chw;
        const float *gi = g + (size_t)i * chw;
        if (p->norm == JEM_PGD_LINF) {
          for (size_t j = 0; j < chw; j++)
            xi[j] += p->step * (float)((gi[j] > 0.0f) - (gi[j] < 0.0f));
        } else {
          /* normalise over the attackable pixels only */
          double n2 = 0.0;
          for (int ch = 0; ch < c; ch++)
            for (int r = p->pad; r < s - p->pad; r++)
              for (int col = p->pad; col < s - p->pad; col++) {
                double v = gi[(size_t)ch * s * s + (size_t)r * s + col];
                n2 += v * v;
              }
          if (n2 > 0.0) {
            float sc = (float)(p->step / sqrt(n2));
            for (size_t j = 0; j < chw; j++) xi[j] += sc * gi[j];
          }
        }
        project(xi, x0 + (size_t)i * chw, c, s, p->pad, p->norm, p->eps);
      }
    }
    if (correct) {
      jem_forward(ws, m, xa, b, logits);
      for (int i = 0; i < b; i++) {
        const float *z = logits + (size_t)i * k;
        int best = 0;
        for (int j = 1; j < k; j++)
          if (z[j] > z[best]) best = j;
        correct[i0 + i] = best == y[i0 + i];
      }
    }
  }
  free(logits);
  free(dlog);
  free(g);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Scoring a whole set                                                      */

void jem_set_scores_free(jem_set_scores *s) {
  if (!s) return;
  free(s->logits);
  for (int i = 0; i < JEM_NUM_SCORES; i++) free(s->score[i]);
  free(s->feat);
  memset(s, 0, sizeof *s);
}

int jem_eval_score_set(jem_ws *ws, const jem_model *m, const float *x, int n,
                       int want_grad, int want_feat, float noise, uint64_t seed,
                       jem_set_scores *out, char *err, size_t errlen) {
  if (!ws || !m || !out || (n > 0 && !x) || n < 0)
    return jem__errf(err, errlen, JEM_EINVAL, "score set: bad arguments");
  memset(out, 0, sizeof *out);
  const int k = m->arch.num_classes, mb = jem_ws_max_batch(ws);
  const int nfeat = 64 * m->arch.widen;
  const size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  out->n = n;
  out->k = k;
  out->nfeat = want_feat ? nfeat : 0;
  const size_t nn = n > 0 ? (size_t)n : 1;
  out->logits = malloc(nn * k * sizeof(float));
  for (int i = 0; i < JEM_NUM_SCORES; i++) out->score[i] = malloc(nn * sizeof(float));
  if (want_feat) out->feat = malloc(nn * nfeat * sizeof(float));
  float *buf = noise > 0.0f ? malloc((size_t)mb * chw * sizeof(float)) : NULL;
  int oom = !out->logits || (want_feat && !out->feat) || (noise > 0.0f && !buf);
  for (int i = 0; i < JEM_NUM_SCORES; i++) oom |= !out->score[i];
  if (oom) {
    free(buf);
    jem_set_scores_free(out);
    return jem__errf(err, errlen, JEM_ENOMEM, "score set: out of memory for %d images", n);
  }
  for (int i0 = 0; i0 < n; i0 += mb) {
    const int b = n - i0 < mb ? n - i0 : mb;
    const float *xc = x + (size_t)i0 * chw;
    if (buf) {
      for (int i = 0; i < b; i++) {
        jem_rng r;
        jem_rng_seed(&r, seed, (uint64_t)(i0 + i));
        for (size_t j = 0; j < chw; j++)
          buf[(size_t)i * chw + j] = xc[(size_t)i * chw + j] + noise * jem_rng_normal(&r);
      }
      xc = buf;
    }
    jem_scores sc = {0};
    sc.logits = out->logits + (size_t)i0 * k;
    for (int s = 0; s < JEM_NUM_SCORES; s++) sc.score[s] = out->score[s] + i0;
    jem_score_batch(ws, m, xc, b, want_grad, &sc);
    if (want_feat) {
      /* features are defined after a plain forward pass on this ws */
      float *lg = malloc((size_t)b * k * sizeof *lg);
      if (!lg) {
        free(buf);
        jem_set_scores_free(out);
        return jem__errf(err, errlen, JEM_ENOMEM, "score set: out of memory");
      }
      jem_forward(ws, m, xc, b, lg);
      free(lg);
      memcpy(out->feat + (size_t)i0 * nfeat, jem_ws_features(ws),
             (size_t)b * nfeat * sizeof(float));
    }
  }
  free(buf);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* OOD sets                                                                 */

const char *const jem_ood_set_names[JEM_OOD_NSETS] = {
    "mnist", "uniform", "gaussian", "vflip", "interp", "constant", "letters",
    "photos-skimage", "photos-wallpapers", "illustrations", "icons", "procedural", "text"};

/* A grey IDX set for a colour model: each image's plane repeated. */
static int grey_to_colour(jem_dataset *d, int channels, const char *name, char *err,
                          size_t errlen) {
  if (d->c != 1 || channels <= 1) return 0;
  const size_t hw = (size_t)d->s * d->s;
  float *x = jem__falloc((size_t)d->n * channels * hw);
  if (!x) {
    jem_dataset_free(d);
    return jem__errf(err, errlen, JEM_ENOMEM, "ood set %s: out of memory", name);
  }
  for (int i = 0; i < d->n; i++)
    for (int c = 0; c < channels; c++)
      memcpy(x + ((size_t)i * channels + c) * hw, d->x + (size_t)i * hw, hw * sizeof(float));
  free(d->x);
  d->x = x;
  d->c = channels;
  return 0;
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A folder of PNG/JPEG files, each decoded and preprocessed exactly as a
 * request body is (jem_image_to_input with the model's preprocessing and the
 * default limits), in file-name order. */
static int load_image_dir(const char *dir, const jem_model *m, int max_items,
                          jem_dataset *out, char *err, size_t errlen) {
  DIR *d = opendir(dir);
  if (!d) return jem__errf(err, errlen, JEM_EIO, "%s: cannot open", dir);
  char **names = NULL;
  int n = 0, cap = 0, rc = 0;
  for (struct dirent *e; (e = readdir(d));) {
    const char *dot = strrchr(e->d_name, '.');
    if (e->d_name[0] == '.' || !dot ||
        (strcmp(dot, ".png") && strcmp(dot, ".jpg") && strcmp(dot, ".jpeg")))
      continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 256;
      char **grown = realloc(names, (size_t)cap * sizeof *names);
      if (!grown) { rc = JEM_ENOMEM; break; }
      names = grown;
    }
    if (!(names[n] = strdup(e->d_name))) { rc = JEM_ENOMEM; break; }
    n++;
  }
  closedir(d);
  if (!rc && n == 0) rc = jem__errf(err, errlen, JEM_EFORMAT, "%s: no .png or .jpg files", dir);
  else if (rc) jem__errf(err, errlen, rc, "%s: out of memory listing files", dir);
  if (!rc) {
    qsort(names, (size_t)n, sizeof *names, by_name);
    const int keep = max_items > 0 && max_items < n ? max_items : n;
    const int C = m->arch.in_channels, S = m->arch.image_size;
    const size_t chw = (size_t)C * S * S;
    memset(out, 0, sizeof *out);
    out->x = jem__falloc((size_t)keep * chw);
    if (!out->x) rc = jem__errf(err, errlen, JEM_ENOMEM, "%s: out of memory", dir);
    jem_image_limits lim;
    jem_image_limits_default(&lim);
    for (int i = 0; !rc && i < keep; i++) {
      char path[4096], why[256];
      unsigned char *buf = NULL;
      size_t len = 0;
      int pl = snprintf(path, sizeof path, "%s/%s", dir, names[i]);
      rc = pl < 0 || (size_t)pl >= sizeof path
               ? jem__errf(why, sizeof why, JEM_EINVAL, "path too long")
               : jem_read_file(path, lim.max_bytes, &buf, &len, why, sizeof why);
      if (!rc) rc = jem_image_to_input(buf, len, &m->pre, S, &lim, out->x + (size_t)i * chw,
                                       why, sizeof why);
      free(buf);
      if (rc) jem__errf(err, errlen, rc, "%s: %s", path, why);
    }
    out->n = keep;
    out->c = C;
    out->s = S;
    out->src_s = S;
    if (rc) jem_dataset_free(out);
  }
  for (int i = 0; i < n; i++) free(names[i]);
  free(names);
  return rc;
}

int jem_ood_set_load(const char *dir, const char *name, const jem_model *m,
                     int max_items, jem_dataset *out, char *err, size_t errlen) {
  if (!dir || !name || !m || !out)
    return jem__errf(err, errlen, JEM_EINVAL, "ood set: NULL argument");
  char path[4096];
  int len = snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte.gz", dir, name);
  if (len < 0 || (size_t)len >= sizeof path)
    return jem__errf(err, errlen, JEM_EINVAL, "ood set: path too long");
  struct stat st;
  if (stat(path, &st) == 0) {
    int rc = jem_dataset_load(out, path, NULL, m->arch.image_size, max_items, err, errlen);
    return rc ? rc : grey_to_colour(out, m->arch.in_channels, name, err, errlen);
  }
  snprintf(path, sizeof path, "%s/%s", dir, name);
  if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
    return load_image_dir(path, m, max_items, out, err, errlen);
  return jem__errf(err, errlen, JEM_EIO, "%s: missing (build the OOD sets with `make "
                   "ood-sets`, or scripts/make_ood_sets.py)", path);
}

double jem_ood_rule_stat(const jem_ood_stats *s, const float value[JEM_NUM_SCORES]) {
  if (!s || !s->present || !value) return NAN;
  double best = NAN;
  const int *side = jem_ood_rule_for(s, value, NULL);
  for (int i = 0; i < JEM_NUM_SCORES; i++) {
    if (side[i] == 0 || s->nq[i] < 2 || isnan(value[i])) continue;
    double p = jem_ood_percentile(s->q[i], s->nq[i], value[i]);
    double tail = side[i] == 1 ? 1.0 - p : side[i] == -1 ? p : 2.0 * fmin(p, 1.0 - p);
    if (isnan(best) || tail < best) best = tail;
  }
  return best;
}
