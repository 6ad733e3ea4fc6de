/* meta.c - model creation and freeing, and the "jem" metadata: arch, name,
 * classes, temperature, preprocessing and OOD statistics, with defaults. */
#include "internal.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CLASS_NAME 255

/* ------------------------------------------------------------------------ */
/* Small JSON helpers: every problem names the key path.                    */

static int get_int(const json_t *v, const char *path, long long lo, long long hi,
                   int *out, char *err, size_t errlen) {
  if (!json_is_integer(v))
    return jem__errf(err, errlen, JEM_EFORMAT, "%s must be a JSON integer", path);
  json_int_t x = json_integer_value(v);
  if (x < lo || x > hi)
    return jem__errf(err, errlen, JEM_EFORMAT, "%s = %lld is out of range [%lld, %lld]",
                     path, (long long)x, lo, hi);
  *out = (int)x;
  return 0;
}

/* A finite number (integer or real) that is also finite as a float. */
static int get_float(const json_t *v, const char *path, float *out, char *err,
                     size_t errlen) {
  if (!json_is_number(v))
    return jem__errf(err, errlen, JEM_EFORMAT, "%s must be a number", path);
  double d = json_number_value(v);
  float f = (float)d;
  if (!isfinite(d) || !isfinite(f))
    return jem__errf(err, errlen, JEM_EFORMAT, "%s must be a finite number", path);
  *out = f;
  return 0;
}

static int check_keys(const json_t *obj, const char *path, const char *const *allowed,
                      char *err, size_t errlen) {
  const char *key;
  size_t klen;
  json_t *val;
  json_object_keylen_foreach((json_t *)obj, key, klen, val) {
    if (strlen(key) != klen)
      return jem__errf(err, errlen, JEM_EFORMAT, "%s: a key contains a NUL byte", path);
    int ok = 0;
    for (const char *const *a = allowed; *a; a++)
      if (strcmp(*a, key) == 0) ok = 1;
    if (!ok) return jem__errf(err, errlen, JEM_EFORMAT, "%s: unknown key '%.64s'", path, key);
  }
  return 0;
}

/* Shortest decimal that reads back as the same float, as a JSON real, so
 * 0.2f is stored as 0.2 rather than 0.20000000298023224. */
static json_t *float_real(float f) {
  char buf[64];
  for (int prec = 6; prec <= 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
    if (strtof(buf, NULL) == f) break;
  }
  return json_real(strtod(buf, NULL));
}

/* ------------------------------------------------------------------------ */
/* Architecture                                                             */

int jem_arch_from_json(const json_t *j, jem_arch *a, char *err, size_t errlen) {
  static const char *const keys[] = {"family", "depth", "widen", "in_channels",
                                     "image_size", "num_classes", "norm", "leak", NULL};
  if (!a) return jem__errf(err, errlen, JEM_EINVAL, "jem_arch_from_json: NULL arch");
  if (!json_is_object(j)) return jem__errf(err, errlen, JEM_EFORMAT, "arch must be an object");
  int rc = check_keys(j, "arch", keys, err, errlen);
  if (rc) return rc;
  for (int i = 0; keys[i]; i++) /* norm may be left out: none */
    if (!json_object_get(j, keys[i]) && strcmp(keys[i], "norm"))
      return jem__errf(err, errlen, JEM_EFORMAT, "arch.%s is missing", keys[i]);

  const json_t *fam = json_object_get(j, "family");
  if (!json_is_string(fam) || strcmp(json_string_value(fam), "wrn") != 0 ||
      json_string_length(fam) != 3)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "arch.family must be \"wrn\" (the JEM Wide-ResNet), got %s%.32s%s",
                     json_is_string(fam) ? "\"" : "",
                     json_is_string(fam) ? json_string_value(fam) : "a non-string",
                     json_is_string(fam) ? "\"" : "");
  const json_t *norm = json_object_get(j, "norm");
  jem_arch t;
  memset(&t, 0, sizeof t);
  t.norm = !norm ? JEM_NORM_NONE
          : json_is_string(norm) && strlen(json_string_value(norm)) == json_string_length(norm)
              ? jem_norm_from_name(json_string_value(norm))
              : -1;
  if (t.norm < 0)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "arch.norm must be \"none\", \"batch\", \"instance\", \"layer\" or \"act\", got %s%.32s%s",
                     json_is_string(norm) ? "\"" : "",
                     json_is_string(norm) ? json_string_value(norm) : "a non-string",
                     json_is_string(norm) ? "\"" : "");

  if ((rc = get_int(json_object_get(j, "depth"), "arch.depth", 1, INT_MAX, &t.depth, err, errlen)) ||
      (rc = get_int(json_object_get(j, "widen"), "arch.widen", 1, INT_MAX, &t.widen, err, errlen)) ||
      (rc = get_int(json_object_get(j, "in_channels"), "arch.in_channels", 1, INT_MAX,
                    &t.in_channels, err, errlen)) ||
      (rc = get_int(json_object_get(j, "image_size"), "arch.image_size", 1, INT_MAX,
                    &t.image_size, err, errlen)) ||
      (rc = get_int(json_object_get(j, "num_classes"), "arch.num_classes", 1, INT_MAX,
                    &t.num_classes, err, errlen)) ||
      (rc = get_float(json_object_get(j, "leak"), "arch.leak", &t.leak, err, errlen)))
    return rc;

  char why[200];
  why[0] = 0;
  rc = jem_arch_validate(&t, why, sizeof why);
  /* jem_arch_validate's messages already name the key (arch.depth ...) */
  if (rc) return jem__errf(err, errlen, rc < 0 ? rc : JEM_EFORMAT, "%s", why);
  *a = t;
  return 0;
}

json_t *jem_arch_to_json(const jem_arch *a) {
  if (!a) return NULL;
  json_t *o = json_object();
  if (!o) return NULL;
  int bad = 0;
  bad |= json_object_set_new(o, "family", json_string("wrn"));
  bad |= json_object_set_new(o, "depth", json_integer(a->depth));
  bad |= json_object_set_new(o, "widen", json_integer(a->widen));
  bad |= json_object_set_new(o, "in_channels", json_integer(a->in_channels));
  bad |= json_object_set_new(o, "image_size", json_integer(a->image_size));
  bad |= json_object_set_new(o, "num_classes", json_integer(a->num_classes));
  bad |= json_object_set_new(o, "norm", json_string(jem_norm_names[a->norm]));
  bad |= json_object_set_new(o, "leak", float_real(a->leak));
  if (bad) {
    json_decref(o);
    return NULL;
  }
  return o;
}

/* ------------------------------------------------------------------------ */
/* Model lifetime                                                           */

static void free_classes(char **classes, int k) {
  if (!classes) return;
  for (int i = 0; i < k; i++) free(classes[i]);
  free(classes);
}

static void default_sampler(jem_sampler *s) {
  memset(s, 0, sizeof *s);
  jem_sgld_defaults(&s->sgld);
  s->steps = JEM_SAMPLER_STEPS;
}

static void default_preprocess(const jem_arch *a, jem_preprocess *p) {
  memset(p, 0, sizeof *p);
  p->channels = a->in_channels;
  p->resize_w = p->resize_h = a->image_size;
  p->pad = 0;
  p->pad_value = 0.0f;
  p->background = 0.0f;
  p->range_lo = -1.0f;
  p->range_hi = 1.0f;
  p->invert = 0;
}

static char **default_classes(int k) {
  char **c = calloc((size_t)k, sizeof *c);
  if (!c) return NULL;
  for (int i = 0; i < k; i++) {
    char buf[16];
    snprintf(buf, sizeof buf, "%d", i);
    c[i] = strdup(buf);
    if (!c[i]) {
      free_classes(c, i);
      return NULL;
    }
  }
  return c;
}

int jem_model_create(jem_model **out, const jem_arch *a, char *err, size_t errlen) {
  if (!out || !a) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_create: NULL argument");
  *out = NULL;
  int rc = jem_arch_validate(a, err, errlen);
  if (rc) return rc < 0 ? rc : JEM_EINVAL;

  int n = jem_arch_params(a, NULL, 0);
  if (n <= 0) return jem__errf(err, errlen, JEM_EINTERNAL, "architecture has no parameters");

  jem_model *m = calloc(1, sizeof *m);
  if (!m) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
  static atomic_uint_fast64_t next_uid = 1;
  m->uid = atomic_fetch_add(&next_uid, 1);
  m->arch = *a;
  m->params = calloc((size_t)n, sizeof *m->params);
  if (!m->params) goto oom;
  if (jem_arch_params(a, m->params, n) != n) {
    jem_model_free(m);
    return jem__errf(err, errlen, JEM_EINTERNAL, "parameter table size changed");
  }
  m->n_params = n;
  size_t total = 0;
  for (int i = 0; i < n; i++) {
    size_t end = m->params[i].offset + m->params[i].numel;
    if (end < m->params[i].offset) {
      jem_model_free(m);
      return jem__errf(err, errlen, JEM_ETOOBIG, "parameter table overflows");
    }
    if (end > total) total = end;
  }
  if (total > SIZE_MAX / sizeof(float) - 64) {
    jem_model_free(m);
    return jem__errf(err, errlen, JEM_ETOOBIG, "too many parameters (%zu)", total);
  }
  m->n_weights = total;
  m->weights = jem__falloc(total);
  if (!m->weights) goto oom;

  snprintf(m->name, sizeof m->name, "model");
  m->classes = default_classes(a->num_classes);
  if (!m->classes) goto oom;
  m->temperature = 1.0f;
  default_preprocess(a, &m->pre);
  memset(&m->ood, 0, sizeof m->ood);
  m->ood.default_tpr = 0.95f;
  m->ood.complexity_weight = NAN;
  default_sampler(&m->sampler);

  m->meta = json_object();
  if (!m->meta) goto oom;
  json_t *aj = jem_arch_to_json(a);
  if (!aj || json_object_set_new(m->meta, "arch", aj)) goto oom;

  rc = jem__net_build(m, err, errlen);
  if (rc) {
    jem_model_free(m);
    return rc < 0 ? rc : JEM_EINTERNAL;
  }
  *out = m;
  return 0;

oom:
  jem_model_free(m);
  return jem__errf(err, errlen, JEM_ENOMEM, "out of memory creating the model");
}

void jem_model_free(jem_model *m) {
  if (!m) return;
  if (m->net) jem__net_free(m->net);
  free(m->params);
  free(m->weights);
  free_classes(m->classes, m->arch.num_classes);
  free(m->replay);
  free(m->replay_order);
  free(m->replay_first);
  free(m->feat_mean);
  free(m->feat_whiten);
  free(m->feat_wmean);
  json_decref(m->meta);
  free(m);
}

int jem_model_set_feature_gauss(jem_model *m, const float *mean, const float *whiten,
                                char *err, size_t errlen) {
  if (!m) return jem__errf(err, errlen, JEM_EINVAL, "feature Gaussian: NULL model");
  const size_t K = (size_t)m->arch.num_classes, F = (size_t)64 * m->arch.widen;
  float *nm = NULL, *nw = NULL, *nwm = NULL;
  if (mean) {
    if (!whiten) return jem__errf(err, errlen, JEM_EINVAL, "feature Gaussian: whitener missing");
    for (size_t i = 0; i < K * F; i++)
      if (!isfinite(mean[i]))
        return jem__errf(err, errlen, JEM_EFORMAT, "feature Gaussian: mean[%zu] is not finite", i);
    for (size_t r = 0; r < F; r++)
      for (size_t c = 0; c < F; c++) {
        const float w = whiten[r * F + c];
        if (!isfinite(w) || (c > r && w != 0.0f) || (c == r && !(w > 0.0f)))
          return jem__errf(err, errlen, JEM_EFORMAT,
                           "feature Gaussian: the whitener must be lower triangular with a "
                           "positive diagonal and finite (element [%zu,%zu] = %g)",
                           r, c, (double)w);
      }
    nm = jem__falloc(K * F);
    nw = jem__falloc(F * F);
    nwm = jem__falloc(K * F);
    if (!nm || !nw || !nwm) {
      free(nm);
      free(nw);
      free(nwm);
      return jem__errf(err, errlen, JEM_ENOMEM, "feature Gaussian: out of memory");
    }
    memcpy(nm, mean, K * F * sizeof *nm);
    memcpy(nw, whiten, F * F * sizeof *nw);
    for (size_t k = 0; k < K; k++) /* W mean_k, once, so a score costs one GEMM */
      for (size_t r = 0; r < F; r++) {
        double acc = 0.0;
        for (size_t c = 0; c <= r; c++) acc += (double)nw[r * F + c] * nm[k * F + c];
        nwm[k * F + r] = (float)acc;
      }
  }
  free(m->feat_mean);
  free(m->feat_whiten);
  free(m->feat_wmean);
  m->feat_mean = nm;
  m->feat_whiten = nw;
  m->feat_wmean = nwm;
  return 0;
}

const jem_param *jem_model_param(const jem_model *m, const char *name) {
  if (!m || !name) return NULL;
  for (int i = 0; i < m->n_params; i++)
    if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Metadata                                                                 */

/* Names appear in URLs (/v2/models/{name}), so keep them to a safe set. */
static int name_char_ok(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == '-';
}

static int parse_name(const json_t *v, char *out, size_t cap, char *err, size_t errlen) {
  if (!json_is_string(v)) return jem__errf(err, errlen, JEM_EFORMAT, "name must be a string");
  const char *s = json_string_value(v);
  size_t n = json_string_length(v);
  if (n == 0 || n >= cap)
    return jem__errf(err, errlen, JEM_EFORMAT, "name must have 1 to %zu characters", cap - 1);
  for (size_t i = 0; i < n; i++)
    if (!name_char_ok((unsigned char)s[i]))
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "name \"%.64s\": only A-Z a-z 0-9 . _ - are allowed (it appears in URLs)",
                       s);
  memcpy(out, s, n + 1);
  return 0;
}

static int parse_classes(const json_t *v, int k, char ***out, char *err, size_t errlen) {
  if (!json_is_array(v))
    return jem__errf(err, errlen, JEM_EFORMAT, "classes must be an array of strings");
  if (json_array_size(v) != (size_t)k)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "classes has %zu names, arch.num_classes is %d", json_array_size(v), k);
  json_t *seen = json_object();
  char **c = calloc((size_t)k, sizeof *c);
  if (!seen || !c) {
    json_decref(seen);
    free(c);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
  }
  int rc = 0;
  for (int i = 0; i < k && !rc; i++) {
    const json_t *s = json_array_get(v, (size_t)i);
    if (!json_is_string(s)) {
      rc = jem__errf(err, errlen, JEM_EFORMAT, "classes[%d] must be a string", i);
      break;
    }
    const char *str = json_string_value(s);
    size_t n = json_string_length(s);
    if (n == 0 || n > MAX_CLASS_NAME || strlen(str) != n) {
      rc = jem__errf(err, errlen, JEM_EFORMAT,
                     "classes[%d] must be a non-empty string of at most %d bytes without NUL",
                     i, MAX_CLASS_NAME);
      break;
    }
    for (size_t j = 0; j < n; j++)
      if ((unsigned char)str[j] < 0x20 || str[j] == 0x7f) {
        rc = jem__errf(err, errlen, JEM_EFORMAT, "classes[%d] contains a control character", i);
        break;
      }
    if (rc) break;
    if (json_object_get(seen, str)) {
      rc = jem__errf(err, errlen, JEM_EFORMAT, "classes[%d] \"%.64s\" is a duplicate", i, str);
      break;
    }
    if (json_object_set_new(seen, str, json_true()) || !(c[i] = strdup(str)))
      rc = jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
  }
  json_decref(seen);
  if (rc) {
    free_classes(c, k);
    return rc;
  }
  *out = c;
  return 0;
}

static int parse_pair(const json_t *v, const char *path, int integers, double out[2],
                      char *err, size_t errlen) {
  if (!json_is_array(v) || json_array_size(v) != 2)
    return jem__errf(err, errlen, JEM_EFORMAT, "%s must be an array of 2 %s", path,
                     integers ? "integers" : "numbers");
  for (size_t i = 0; i < 2; i++) {
    const json_t *e = json_array_get(v, i);
    if (integers ? !json_is_integer(e) : !json_is_number(e))
      return jem__errf(err, errlen, JEM_EFORMAT, "%s[%zu] must be a %s", path, i,
                       integers ? "JSON integer" : "number");
    out[i] = json_number_value(e);
    if (!isfinite(out[i]) || !isfinite((float)out[i]))
      return jem__errf(err, errlen, JEM_EFORMAT, "%s[%zu] must be finite", path, i);
  }
  return 0;
}

static int parse_preprocess(const json_t *v, const jem_arch *a, jem_preprocess *p,
                            char *err, size_t errlen) {
  static const char *const keys[] = {"channels", "resize", "pad", "pad_value",
                                     "background", "range", "invert", NULL};
  if (!json_is_object(v)) return jem__errf(err, errlen, JEM_EFORMAT, "preprocess must be an object");
  int rc = check_keys(v, "preprocess", keys, err, errlen);
  if (rc) return rc;
  default_preprocess(a, p);
  const json_t *e;

  if ((e = json_object_get(v, "channels"))) {
    if ((rc = get_int(e, "preprocess.channels", 1, 4, &p->channels, err, errlen))) return rc;
    if (p->channels != a->in_channels)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "preprocess.channels %d must equal arch.in_channels %d", p->channels,
                       a->in_channels);
  }
  if ((e = json_object_get(v, "pad"))) {
    if ((rc = get_int(e, "preprocess.pad", 0, (a->image_size - 1) / 2, &p->pad, err, errlen)))
      return rc;
  }
  p->resize_w = p->resize_h = a->image_size - 2 * p->pad;
  if ((e = json_object_get(v, "resize"))) {
    double r[2];
    if ((rc = parse_pair(e, "preprocess.resize", 1, r, err, errlen))) return rc;
    if (r[0] < 1 || r[1] < 1 || r[0] > a->image_size || r[1] > a->image_size)
      return jem__errf(err, errlen, JEM_EFORMAT, "preprocess.resize [%g, %g] out of range [1, %d]",
                       r[0], r[1], a->image_size);
    p->resize_w = (int)r[0];
    p->resize_h = (int)r[1];
  }
  if (p->resize_w + 2 * p->pad != a->image_size || p->resize_h + 2 * p->pad != a->image_size)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "preprocess.resize [%d, %d] + 2 * preprocess.pad %d must equal "
                     "arch.image_size %d",
                     p->resize_w, p->resize_h, p->pad, a->image_size);
  if ((e = json_object_get(v, "pad_value"))) {
    if ((rc = get_float(e, "preprocess.pad_value", &p->pad_value, err, errlen))) return rc;
    if (p->pad_value < 0.0f || p->pad_value > 1.0f)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "preprocess.pad_value %g must be in [0, 1] (before range mapping)",
                       (double)p->pad_value);
  }
  if ((e = json_object_get(v, "background"))) {
    if ((rc = get_float(e, "preprocess.background", &p->background, err, errlen))) return rc;
    if (p->background < 0.0f || p->background > 1.0f)
      return jem__errf(err, errlen, JEM_EFORMAT, "preprocess.background %g must be in [0, 1]",
                       (double)p->background);
  }
  if ((e = json_object_get(v, "range"))) {
    double r[2];
    if ((rc = parse_pair(e, "preprocess.range", 0, r, err, errlen))) return rc;
    if (!((float)r[0] < (float)r[1]))
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "preprocess.range [%g, %g] must have low < high", r[0], r[1]);
    p->range_lo = (float)r[0];
    p->range_hi = (float)r[1];
  }
  if ((e = json_object_get(v, "invert"))) {
    if (!json_is_boolean(e))
      return jem__errf(err, errlen, JEM_EFORMAT, "preprocess.invert must be true or false");
    p->invert = json_is_true(e);
  }
  return 0;
}

/* "high" / "low" / "two-sided" / "unused" at path -> +1 / -1 / 2 / 0. */
static int parse_side(const json_t *v, const char *path, int *out, char *err, size_t errlen) {
  const char *sd = json_is_string(v) ? json_string_value(v) : NULL;
  if (sd && strcmp(sd, "high") == 0) *out = 1;
  else if (sd && strcmp(sd, "low") == 0) *out = -1;
  else if (sd && strcmp(sd, "two-sided") == 0) *out = 2;
  else if (sd && strcmp(sd, "unused") == 0) *out = 0;
  else if (sd)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "%s \"%.32s\" must be one of \"high\", \"low\", \"two-sided\", "
                     "\"unused\"", path, sd);
  else
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "%s must be one of \"high\", \"low\", \"two-sided\", \"unused\"", path);
  return 0;
}

/* A rule's description: the stored string, or one made from its sides. */
static int parse_rule_text(const json_t *e, const char *path, const int side[JEM_NUM_SCORES],
                           char *buf, size_t size, char *err, size_t errlen) {
  if (e) {
    if (!json_is_string(e) || json_string_length(e) >= size ||
        strlen(json_string_value(e)) != json_string_length(e))
      return jem__errf(err, errlen, JEM_EFORMAT, "%s must be a string of at most %zu bytes",
                       path, size - 1);
    memcpy(buf, json_string_value(e), json_string_length(e) + 1);
    return 0;
  }
  size_t off = (size_t)snprintf(buf, size, "OOD when any of:");
  int any = 0;
  for (int i = 0; i < JEM_NUM_SCORES && off < size; i++) {
    if (!side[i]) continue;
    off += (size_t)snprintf(buf + off, size - off, "%s %s %s", any ? "," : "",
                            jem_score_names[i], jem_ood_side_name(side[i]));
    any = 1;
  }
  if (!any) snprintf(buf, size, "no score is used: verdict unknown");
  return 0;
}

static int parse_ood(const json_t *v, jem_ood_stats *s, char *err, size_t errlen) {
  static const char *const keys[] = {"scores", "tpr", "rule", "rule_nograd",
                                     "complexity_weight", NULL};
  static const char *const score_keys[] = {"quantiles", "side", "side_nograd", NULL};
  char path[96];
  if (!json_is_object(v)) return jem__errf(err, errlen, JEM_EFORMAT, "ood must be an object");
  int rc = check_keys(v, "ood", keys, err, errlen);
  if (rc) return rc;
  memset(s, 0, sizeof *s);
  s->default_tpr = 0.95f;
  s->complexity_weight = NAN;

  const json_t *scores = json_object_get(v, "scores");
  if (!scores) return jem__errf(err, errlen, JEM_EFORMAT, "ood.scores is missing");
  if (!json_is_object(scores))
    return jem__errf(err, errlen, JEM_EFORMAT, "ood.scores must be an object");
  if (json_object_size(scores) == 0)
    return jem__errf(err, errlen, JEM_EFORMAT, "ood.scores has no scores");
  const char *key;
  size_t klen;
  json_t *sv;
  json_object_keylen_foreach((json_t *)scores, key, klen, sv) {
    int idx = -1;
    if (strlen(key) != klen)
      return jem__errf(err, errlen, JEM_EFORMAT, "ood.scores: a key contains a NUL byte");
    for (int i = 0; i < JEM_NUM_SCORES; i++)
      if (strcmp(key, jem_score_names[i]) == 0) idx = i;
    if (idx < 0)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "ood.scores: unknown score '%.64s' (known: energy, grad_norm, "
                       "max_softmax, energy_complexity, mahalanobis)",
                       key);
    snprintf(path, sizeof path, "ood.scores.%s", key);
    if (!json_is_object(sv)) return jem__errf(err, errlen, JEM_EFORMAT, "%s must be an object", path);
    if ((rc = check_keys(sv, path, score_keys, err, errlen))) return rc;

    char spath[128];
    snprintf(spath, sizeof spath, "%s.side", path);
    if ((rc = parse_side(json_object_get(sv, "side"), spath, &s->side[idx], err, errlen)))
      return rc;
    const json_t *ng = json_object_get(sv, "side_nograd");
    if (ng) {
      snprintf(spath, sizeof spath, "%s.side_nograd", path);
      if ((rc = parse_side(ng, spath, &s->side_nograd[idx], err, errlen))) return rc;
      s->has_nograd = 1;
    }

    const json_t *q = json_object_get(sv, "quantiles");
    if (!json_is_array(q))
      return jem__errf(err, errlen, JEM_EFORMAT, "%s.quantiles must be an array of numbers", path);
    size_t nq = json_array_size(q);
    if (nq < 2 || nq > JEM_OOD_MAX_QUANTILES)
      return jem__errf(err, errlen, JEM_EFORMAT, "%s.quantiles has %zu values, expected 2 to %d",
                       path, nq, JEM_OOD_MAX_QUANTILES);
    for (size_t i = 0; i < nq; i++) {
      const json_t *e = json_array_get(q, i);
      if (!json_is_number(e))
        return jem__errf(err, errlen, JEM_EFORMAT, "%s.quantiles[%zu] must be a number", path, i);
      double d = json_number_value(e);
      float f = (float)d;
      if (!isfinite(d) || !isfinite(f))
        return jem__errf(err, errlen, JEM_EFORMAT, "%s.quantiles[%zu] must be finite", path, i);
      if (i > 0 && f < s->q[idx][i - 1])
        return jem__errf(err, errlen, JEM_EFORMAT,
                         "%s.quantiles must be ascending: [%zu] = %g < [%zu] = %g", path, i,
                         (double)f, i - 1, (double)s->q[idx][i - 1]);
      s->q[idx][i] = f;
    }
    s->nq[idx] = (int)nq;
  }

  const json_t *e;
  if ((e = json_object_get(v, "complexity_weight"))) {
    if ((rc = get_float(e, "ood.complexity_weight", &s->complexity_weight, err, errlen)))
      return rc;
    if (!(s->complexity_weight >= 0.0f) || !isfinite(s->complexity_weight))
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "ood.complexity_weight %g must be finite and >= 0",
                       (double)s->complexity_weight);
  }
  if (s->nq[JEM_SCORE_ENERGY_COMPLEXITY] && isnan(s->complexity_weight))
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "ood.scores.energy_complexity needs ood.complexity_weight");
  if ((e = json_object_get(v, "tpr"))) {
    if ((rc = get_float(e, "ood.tpr", &s->default_tpr, err, errlen))) return rc;
    if (!(s->default_tpr > 0.0f && s->default_tpr < 1.0f))
      return jem__errf(err, errlen, JEM_EFORMAT, "ood.tpr %g must be in (0, 1)",
                       (double)s->default_tpr);
  }
  if ((rc = parse_rule_text(json_object_get(v, "rule"), "ood.rule", s->side, s->rule,
                            sizeof s->rule, err, errlen)))
    return rc;
  e = json_object_get(v, "rule_nograd");
  if (e && !s->has_nograd)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "ood.rule_nograd needs ood.scores.*.side_nograd");
  if (s->has_nograd &&
      (rc = parse_rule_text(e, "ood.rule_nograd", s->side_nograd, s->rule_nograd,
                            sizeof s->rule_nograd, err, errlen)))
    return rc;
  s->present = 1;
  return 0;
}

/* The ranges are the job API's (POST /v1/samples) so that a model's own
 * settings are always a valid request. */
static int parse_sampler(const json_t *v, jem_sampler *s, char *err, size_t errlen) {
  static const char *const keys[] = {"step_size", "noise", "steps", "clamp", "calibration",
                                     NULL};
  if (!json_is_object(v)) return jem__errf(err, errlen, JEM_EFORMAT, "sampler must be an object");
  int rc = check_keys(v, "sampler", keys, err, errlen);
  if (rc) return rc;
  const json_t *e;
  if (!(e = json_object_get(v, "step_size")) ||
      (rc = get_float(e, "sampler.step_size", &s->sgld.step_size, err, errlen)))
    return rc ? rc : jem__errf(err, errlen, JEM_EFORMAT, "sampler.step_size is missing");
  if (!(e = json_object_get(v, "noise")) ||
      (rc = get_float(e, "sampler.noise", &s->sgld.noise, err, errlen)))
    return rc ? rc : jem__errf(err, errlen, JEM_EFORMAT, "sampler.noise is missing");
  if (!(s->sgld.step_size >= 0.0f && s->sgld.step_size <= 1e6f) ||
      !(s->sgld.noise >= 0.0f && s->sgld.noise <= 1e3f))
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "sampler: step_size must be in [0, 1e6] and noise in [0, 1000]");
  if (!(e = json_object_get(v, "steps")) ||
      (rc = get_int(e, "sampler.steps", 1, 100000, &s->steps, err, errlen)))
    return rc ? rc : jem__errf(err, errlen, JEM_EFORMAT, "sampler.steps is missing");
  if (!json_is_boolean(e = json_object_get(v, "clamp")))
    return jem__errf(err, errlen, JEM_EFORMAT, "sampler.clamp must be true or false");
  s->sgld.clamp = json_is_true(e);
  s->from_model = 1;
  return 0;
}

json_t *jem_sampler_to_json(const jem_sampler *s) {
  return json_pack("{s:o,s:o,s:i,s:b,s:s}", "step_size", float_real(s->sgld.step_size), "noise",
                   float_real(s->sgld.noise), "steps", s->steps, "clamp", s->sgld.clamp,
                   "source", s->from_model ? "model" : "default");
}

/* Everything apply_meta derives, parsed but not yet committed. */
typedef struct meta_parsed {
  char name[sizeof(((jem_model *)0)->name)];
  float temperature;
  jem_sampler sampler;
  jem_preprocess pre;
  jem_ood_stats *ood; /* ~12 KB: keep it off the stack */
  char **classes;
} meta_parsed;

static int meta_parse(const jem_model *m, meta_parsed *p, char *err, size_t errlen) {
  memset(p, 0, sizeof *p);
  const json_t *meta = m->meta;
  if (!json_is_object(meta))
    return jem__errf(err, errlen, JEM_EFORMAT, "metadata must be a JSON object");

  char why[240];
  why[0] = 0;
  int rc = 0;
  jem_arch a;
  const json_t *e = json_object_get(meta, "arch");
  if (!e) return jem__errf(err, errlen, JEM_EFORMAT, "metadata: \"arch\" is missing (required)");
  if ((rc = jem_arch_from_json(e, &a, why, sizeof why)))
    return jem__errf(err, errlen, rc, "metadata: %s", why);
  if (a.depth != m->arch.depth || a.widen != m->arch.widen ||
      a.in_channels != m->arch.in_channels || a.image_size != m->arch.image_size ||
      a.num_classes != m->arch.num_classes || a.leak != m->arch.leak || a.norm != m->arch.norm)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "metadata: arch differs from the model's architecture");

  memcpy(p->name, m->name, sizeof p->name);
  p->name[sizeof p->name - 1] = 0;
  if ((e = json_object_get(meta, "name")) &&
      (rc = parse_name(e, p->name, sizeof p->name, why, sizeof why)))
    return jem__errf(err, errlen, rc, "metadata: %s", why);

  p->temperature = 1.0f;
  if ((e = json_object_get(meta, "temperature"))) {
    if ((rc = get_float(e, "temperature", &p->temperature, why, sizeof why)))
      return jem__errf(err, errlen, rc, "metadata: %s", why);
    if (!(p->temperature > 0.0f))
      return jem__errf(err, errlen, JEM_EFORMAT, "metadata: temperature %g must be > 0",
                       (double)p->temperature);
  }

  default_preprocess(&m->arch, &p->pre);
  if ((e = json_object_get(meta, "preprocess")) &&
      (rc = parse_preprocess(e, &m->arch, &p->pre, why, sizeof why)))
    return jem__errf(err, errlen, rc, "metadata: %s", why);

  p->ood = calloc(1, sizeof *p->ood);
  if (!p->ood) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
  p->ood->default_tpr = 0.95f;
  p->ood->complexity_weight = NAN;
  if ((e = json_object_get(meta, "ood")) && (rc = parse_ood(e, p->ood, why, sizeof why)))
    return jem__errf(err, errlen, rc, "metadata: %s", why);
  if (p->ood->nq[JEM_SCORE_MAHALANOBIS] && !m->feat_mean)
    return jem__errf(err, errlen, JEM_EFORMAT, "metadata: ood.scores.mahalanobis needs the "
                     "tensors ood.feature_mean and ood.feature_whitener");

  default_sampler(&p->sampler);
  if ((e = json_object_get(meta, "sampler")) &&
      (rc = parse_sampler(e, &p->sampler, why, sizeof why)))
    return jem__errf(err, errlen, rc, "metadata: %s", why);

  if ((e = json_object_get(meta, "classes")))
    rc = parse_classes(e, m->arch.num_classes, &p->classes, why, sizeof why);
  else if (!(p->classes = default_classes(m->arch.num_classes)))
    rc = jem__errf(why, sizeof why, JEM_ENOMEM, "out of memory");
  if (rc) return jem__errf(err, errlen, rc, "metadata: %s", why);
  return 0;
}

static void meta_parsed_free(meta_parsed *p, int k) {
  free(p->ood);
  free_classes(p->classes, k);
  memset(p, 0, sizeof *p);
}

int jem__meta_check(const jem_model *m, char *err, size_t errlen) {
  if (!m) return jem__errf(err, errlen, JEM_EINVAL, "NULL model");
  meta_parsed p;
  int rc = meta_parse(m, &p, err, errlen);
  meta_parsed_free(&p, m->arch.num_classes);
  return rc;
}

int jem_model_apply_meta(jem_model *m, char *err, size_t errlen) {
  if (!m) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_apply_meta: NULL model");
  meta_parsed p;
  int rc = meta_parse(m, &p, err, errlen);
  if (rc) {
    meta_parsed_free(&p, m->arch.num_classes);
    return rc;
  }
  /* everything parsed: commit */
  memcpy(m->name, p.name, sizeof m->name);
  free_classes(m->classes, m->arch.num_classes);
  m->classes = p.classes;
  p.classes = NULL;
  m->temperature = p.temperature;
  m->pre = p.pre;
  m->ood = *p.ood;
  m->sampler = p.sampler;
  meta_parsed_free(&p, m->arch.num_classes);
  return 0;
}
