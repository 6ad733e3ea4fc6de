/* safetensors.c - load (fully validated, never trusting the file) and save
 * JEM models in the safetensors format with "jem" metadata. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_RANK 8
#define MAX_FILE_BYTES ((size_t)2 << 30) /* 2 GiB */

enum { DT_F32 = 0, DT_F16, DT_BF16 };
static const char *const dt_name[] = {"F32", "F16", "BF16"};
static const size_t dt_size[] = {4, 2, 2};

typedef struct st_tensor {
  const char *name;      /* owned by the header JSON */
  int dtype;
  int ndim;
  uint64_t shape[MAX_RANK];
  uint64_t numel;
  uint64_t begin, end;   /* relative to the data section */
} st_tensor;

/* A tensor name made safe for messages and logs: at most 80 bytes, control
 * characters replaced. */
static const char *pn(const char *s, char buf[96]) {
  size_t i = 0;
  for (; s[i] && i < 80; i++) buf[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
  if (s[i]) {
    memcpy(buf + i, "...", 3);
    i += 3;
  }
  buf[i] = 0;
  return buf;
}

static void shape_str(const uint64_t *shape, int ndim, char *buf, size_t cap) {
  size_t off = 0;
  off += (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && off < cap; i++)
    off += (size_t)snprintf(buf + off, cap - off, "%s%llu", i ? "," : "",
                            (unsigned long long)shape[i]);
  if (off < cap) snprintf(buf + off, cap - off, "]");
}

static uint64_t rd_le64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

float jem__half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  float f;
  if (ex == 0) {
    f = (float)man * 0x1p-24f; /* zero or subnormal, exact */
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (ex == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((ex + 112u) << 23) | (man << 13);
  }
  memcpy(&f, &bits, 4);
  return f;
}

/* Widens n elements of dtype dt at src (any alignment, little-endian) into
 * dst; returns the index of the first non-finite value, or n. */
static size_t convert(float *dst, const unsigned char *src, size_t n, int dt) {
  size_t bad = n;
  for (size_t i = 0; i < n; i++) {
    uint32_t bits;
    float f;
    if (dt == DT_F32) {
      const unsigned char *p = src + 4 * i;
      bits = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
      memcpy(&f, &bits, 4);
    } else {
      uint16_t h = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8);
      if (dt == DT_F16) {
        f = jem__half_to_float(h);
      } else {
        bits = (uint32_t)h << 16;
        memcpy(&f, &bits, 4);
      }
    }
    if (!isfinite(f) && bad == n) bad = i;
    dst[i] = f;
  }
  return bad;
}

/* Names appear in URLs; the default comes from a file name, so map anything
 * outside [A-Za-z0-9._-] to '_'. */
static void sanitize_name(const char *in, size_t n, char *out, size_t cap) {
  size_t j = 0;
  for (size_t i = 0; i < n && j + 1 < cap; i++) {
    unsigned char c = (unsigned char)in[i];
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '.' || c == '_' || c == '-';
    out[j++] = ok ? (char)c : '_';
  }
  out[j] = 0;
  if (j == 0) snprintf(out, cap, "model");
}

static int cmp_tensor(const void *a, const void *b) {
  const st_tensor *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return 0;
}

/* Parses one header entry {"dtype", "shape", "data_offsets"}. */
static int parse_entry(const char *name, const json_t *v, uint64_t data_len, st_tensor *t,
                       char *err, size_t errlen) {
  char nb[96], sb[200];
  t->name = name;
  if (!json_is_object(v))
    return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': header entry must be an object",
                     pn(name, nb));
  const char *key;
  size_t klen;
  json_t *val;
  json_object_keylen_foreach((json_t *)v, key, klen, val) {
    if (strlen(key) != klen || (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets")))
      return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': unknown key '%s'", pn(name, nb),
                       pn(key, sb));
  }
  const json_t *dt = json_object_get(v, "dtype");
  const json_t *sh = json_object_get(v, "shape");
  const json_t *of = json_object_get(v, "data_offsets");
  if (!dt || !sh || !of)
    return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': '%s' is missing", pn(name, nb),
                     !dt ? "dtype" : !sh ? "shape" : "data_offsets");
  if (!json_is_string(dt))
    return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': dtype must be a string",
                     pn(name, nb));
  const char *d = json_string_value(dt);
  t->dtype = -1;
  for (int i = 0; i < 3; i++)
    if (strcmp(d, dt_name[i]) == 0 && strlen(d) == json_string_length(dt)) t->dtype = i;
  if (t->dtype < 0)
    return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                     "tensor '%s': dtype %s is not supported (F32, F16 or BF16)", pn(name, nb),
                     pn(d, sb));

  if (!json_is_array(sh))
    return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': shape must be an array",
                     pn(name, nb));
  size_t nd = json_array_size(sh);
  if (nd > MAX_RANK)
    return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': rank %zu is above %d",
                     pn(name, nb), nd, MAX_RANK);
  t->ndim = (int)nd;
  uint64_t numel = 1;
  int overflow = 0;
  for (size_t i = 0; i < nd; i++) {
    const json_t *e = json_array_get(sh, i);
    if (!json_is_integer(e) || json_integer_value(e) < 0)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "tensor '%s': shape[%zu] must be a non-negative integer", pn(name, nb), i);
    t->shape[i] = (uint64_t)json_integer_value(e);
    if (__builtin_mul_overflow(numel, t->shape[i], &numel)) overflow = 1;
  }
  uint64_t bytes = 0;
  if (overflow || __builtin_mul_overflow(numel, (uint64_t)dt_size[t->dtype], &bytes)) {
    shape_str(t->shape, t->ndim, sb, sizeof sb);
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "tensor '%s': shape %s has more elements than 2^64 bytes can hold",
                     pn(name, nb), sb);
  }
  t->numel = numel;

  if (!json_is_array(of) || json_array_size(of) != 2 || !json_is_integer(json_array_get(of, 0)) ||
      !json_is_integer(json_array_get(of, 1)) || json_integer_value(json_array_get(of, 0)) < 0 ||
      json_integer_value(json_array_get(of, 1)) < 0)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "tensor '%s': data_offsets must be [BEGIN, END], two non-negative integers",
                     pn(name, nb));
  t->begin = (uint64_t)json_integer_value(json_array_get(of, 0));
  t->end = (uint64_t)json_integer_value(json_array_get(of, 1));
  if (t->end < t->begin)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "tensor '%s': data_offsets [%llu, %llu] end before they begin", pn(name, nb),
                     (unsigned long long)t->begin, (unsigned long long)t->end);
  if (t->end > data_len)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "tensor '%s': data_offsets [%llu, %llu] run past the end of the data "
                     "(%llu bytes)",
                     pn(name, nb), (unsigned long long)t->begin, (unsigned long long)t->end,
                     (unsigned long long)data_len);
  if (t->end - t->begin != bytes) {
    shape_str(t->shape, t->ndim, sb, sizeof sb);
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "tensor '%s': shape %s of %s needs %llu bytes, data_offsets span %llu",
                     pn(name, nb), sb, dt_name[t->dtype], (unsigned long long)bytes,
                     (unsigned long long)(t->end - t->begin));
  }
  return 0;
}

/* Returns the "jem" metadata object (new reference) or NULL with err set. */
static json_t *parse_metadata(const json_t *md, char *err, size_t errlen, int *rc) {
  char nb[96];
  *rc = JEM_EFORMAT;
  if (!md) {
    jem__errf(err, errlen, JEM_EFORMAT,
              "header has no __metadata__ (it must hold \"jem\" with the architecture)");
    return NULL;
  }
  if (!json_is_object(md)) {
    jem__errf(err, errlen, JEM_EFORMAT, "__metadata__ must be an object of strings");
    return NULL;
  }
  const char *key;
  size_t klen;
  json_t *val;
  json_object_keylen_foreach((json_t *)md, key, klen, val) {
    if (strlen(key) != klen) {
      jem__errf(err, errlen, JEM_EFORMAT, "__metadata__ key '%s...' contains a NUL byte",
                pn(key, nb));
      return NULL;
    }
    if (!json_is_string(val)) {
      jem__errf(err, errlen, JEM_EFORMAT, "__metadata__['%s'] must be a string", pn(key, nb));
      return NULL;
    }
  }
  const json_t *js = json_object_get(md, "jem");
  if (!js) {
    jem__errf(err, errlen, JEM_EFORMAT,
              "__metadata__ has no \"jem\" key (JSON with the architecture)");
    return NULL;
  }
  json_error_t je;
  json_t *meta = json_loadb(json_string_value(js), json_string_length(js),
                            JSON_REJECT_DUPLICATES, &je);
  if (!meta) {
    jem__errf(err, errlen, JEM_EFORMAT, "__metadata__[\"jem\"] is not valid JSON: %s (column %d)",
              je.text, je.column);
    return NULL;
  }
  if (!json_is_object(meta)) {
    json_decref(meta);
    jem__errf(err, errlen, JEM_EFORMAT, "__metadata__[\"jem\"] must be a JSON object");
    return NULL;
  }
  *rc = 0;
  return meta;
}

static int is_ignored(const char *name) {
  return strncmp(name, "f.linear.", 9) == 0 || strncmp(name, "energy_output.", 14) == 0;
}

static int shape_eq(const st_tensor *t, const jem_param *p) {
  if (t->ndim != p->ndim) return 0;
  for (int i = 0; i < p->ndim; i++)
    if (t->shape[i] != (uint64_t)p->shape[i]) return 0;
  return 1;
}

/* ------------------------------------------------------------------------ */
/* Loading, in stages: the header length, the tensor table and the layout
 * of the data section, the metadata and architecture, the tensors against
 * the architecture, then the model with its weights.                       */

/* What jem_model_load_mem has read so far. */
typedef struct st_load {
  const unsigned char *data;  /* the data section */
  uint64_t data_len;
  json_t *hdr;                /* the header JSON (owns the tensor names) */
  st_tensor *ts;              /* its tensors, sorted by offset */
  size_t nt;
  json_t *index;              /* tensor name -> index into ts */
  json_t *meta;               /* the "jem" metadata */
  jem_arch arch;
  const st_tensor *replay, *fmean, *fwhite; /* optional tensors, or NULL */
  char *err;
  size_t errlen;
} st_load;

/* The header length n of the file [b, b + len), checked against the file
 * before anything is parsed. */
static int read_header_len(const unsigned char *b, size_t len, uint64_t *n, char *err,
                           size_t errlen) {
  if (len < 8)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "file is too short (%zu bytes) to hold the 8-byte header length", len);
  *n = rd_le64(b);
  /* An image or a text file given in the model's place reads as an absurd
   * header length: say what it is before judging the length. */
  if (len > 8 && b[8] != '{')
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "not a safetensors model file (its JSON header does not start with '{')");
  if (*n > JEM_MAX_HEADER_BYTES && *n > (uint64_t)(len - 8))
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "not a safetensors model file (header length %llu, file %zu bytes)",
                     (unsigned long long)*n, len);
  if (*n > JEM_MAX_HEADER_BYTES)
    return jem__errf(err, errlen, JEM_ETOOBIG,
                     "header length %llu exceeds the limit of %u bytes",
                     (unsigned long long)*n, (unsigned)JEM_MAX_HEADER_BYTES);
  if (*n > (uint64_t)(len - 8))
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "header length %llu runs past the end of the file (%zu bytes)",
                     (unsigned long long)*n, len);
  if (*n < 2)
    return jem__errf(err, errlen, JEM_EFORMAT, "header length %llu is too small for a JSON object",
                     (unsigned long long)*n);
  /* JSON text never holds a raw NUL, and jansson 2.14 takes '{"a": 1\0 }'
   * for {"a": 1}: refuse rather than read what other parsers would not. */
  if (memchr(b + 8, 0, (size_t)*n))
    return jem__errf(err, errlen, JEM_EFORMAT, "header contains a NUL byte");
  return 0;
}

/* The data section holds the tensors back to back: no gap, no overlap,
 * nothing after the last (L->ts sorted by offset). */
static int check_layout(const st_load *L) {
  const st_tensor *ts = L->ts;
  char nb[96], sb[200];
  uint64_t pos = 0;
  for (size_t i = 0; i < L->nt; i++) {
    if (ts[i].begin > pos) {
      if (i == 0)
        return jem__errf(L->err, L->errlen, JEM_EFORMAT,
                         "tensor '%s' begins at byte %llu: gap at the start of the data",
                         pn(ts[i].name, nb), (unsigned long long)ts[i].begin);
      return jem__errf(L->err, L->errlen, JEM_EFORMAT,
                       "gap of %llu bytes between tensor '%s' (ends at %llu) and tensor '%s' "
                       "(begins at %llu)",
                       (unsigned long long)(ts[i].begin - pos), pn(ts[i - 1].name, nb),
                       (unsigned long long)pos, pn(ts[i].name, sb),
                       (unsigned long long)ts[i].begin);
    }
    if (ts[i].begin < pos)
      return jem__errf(L->err, L->errlen, JEM_EFORMAT,
                       "tensor '%s' (bytes %llu..%llu) overlaps tensor '%s' (ends at %llu)",
                       pn(ts[i].name, nb), (unsigned long long)ts[i].begin,
                       (unsigned long long)ts[i].end, pn(ts[i - 1].name, sb),
                       (unsigned long long)pos);
    pos = ts[i].end;
  }
  if (pos != L->data_len)
    return jem__errf(L->err, L->errlen, JEM_EFORMAT,
                     "%llu trailing bytes after the last tensor (data section is %llu bytes)",
                     (unsigned long long)(L->data_len - pos), (unsigned long long)L->data_len);
  return 0;
}

/* The header JSON (n bytes at h) and its tensor entries, sorted by offset. */
static int read_tensors(st_load *L, const char *h, size_t n) {
  char nb[96];
  json_error_t je;
  L->hdr = json_loadb(h, n, JSON_REJECT_DUPLICATES, &je);
  if (!L->hdr)
    return jem__errf(L->err, L->errlen, JEM_EFORMAT, "header is not valid JSON: %s (byte %d)",
                     je.text, je.position);
  if (!json_is_object(L->hdr))
    return jem__errf(L->err, L->errlen, JEM_EFORMAT, "header JSON must be an object");
  const json_t *md = json_object_get(L->hdr, "__metadata__");
  L->nt = json_object_size(L->hdr) - (md ? 1 : 0);
  L->ts = calloc(L->nt ? L->nt : 1, sizeof *L->ts);
  if (!L->ts) return jem__errf(L->err, L->errlen, JEM_ENOMEM, "out of memory");
  size_t k = 0;
  const char *key;
  size_t klen;
  json_t *val;
  int rc;
  json_object_keylen_foreach(L->hdr, key, klen, val) {
    /* jansson allows "\u0000" in keys; a name that C sees cut short could
     * shadow another tensor, so refuse it */
    if (strlen(key) != klen)
      return jem__errf(L->err, L->errlen, JEM_EFORMAT, "tensor name '%s...' contains a NUL byte",
                       pn(key, nb));
    if (strcmp(key, "__metadata__") == 0) continue;
    if ((rc = parse_entry(key, val, L->data_len, &L->ts[k], L->err, L->errlen))) return rc;
    k++;
  }
  qsort(L->ts, L->nt, sizeof *L->ts, cmp_tensor);
  return check_layout(L);
}

/* The "jem" metadata and its architecture. */
static int read_arch(st_load *L) {
  int rc;
  L->meta = parse_metadata(json_object_get(L->hdr, "__metadata__"), L->err, L->errlen, &rc);
  if (!L->meta) return rc;
  const json_t *aj = json_object_get(L->meta, "arch");
  if (!aj) return jem__errf(L->err, L->errlen, JEM_EFORMAT, "metadata: \"arch\" is missing (required)");
  char why[200];
  if (jem_arch_from_json(aj, &L->arch, why, sizeof why))
    return jem__errf(L->err, L->errlen, JEM_EFORMAT, "metadata: %s", why);
  return 0;
}

/* Every tensor of the file that is not one of the architecture's n params
 * must be ignored, the replay buffer or the feature Gaussian, each with
 * its shape. */
static int check_extra(st_load *L, const jem_param *params, int n) {
  const jem_arch *arch = &L->arch;
  char nb[96], sb[200];
  int rc = 0;
  json_t *expected = json_object();
  if (!expected) return jem__errf(L->err, L->errlen, JEM_ENOMEM, "out of memory");
  for (int i = 0; i < n; i++) json_object_set_new(expected, params[i].name, json_true());
  const uint64_t K = (uint64_t)arch->num_classes, F = (uint64_t)64 * arch->widen;
  for (size_t i = 0; i < L->nt && !rc; i++) {
    const st_tensor *t = &L->ts[i];
    const char *name = t->name;
    if (json_object_get(expected, name) || is_ignored(name)) continue;
    if (strcmp(name, "replay_buffer") == 0) {
      if (t->ndim != 4 || t->shape[1] != (uint64_t)arch->in_channels ||
          t->shape[2] != (uint64_t)arch->image_size || t->shape[3] != (uint64_t)arch->image_size ||
          t->shape[0] > (uint64_t)INT32_MAX) {
        shape_str(t->shape, t->ndim, sb, sizeof sb);
        rc = jem__errf(L->err, L->errlen, JEM_ESHAPE,
                       "tensor 'replay_buffer': shape [N,%d,%d,%d] expected, file has %s",
                       arch->in_channels, arch->image_size, arch->image_size, sb);
      }
      L->replay = t;
      continue;
    }
    const int is_mean = strcmp(name, "ood.feature_mean") == 0;
    if (is_mean || strcmp(name, "ood.feature_whitener") == 0) {
      const uint64_t rows = is_mean ? K : F;
      if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != F) {
        shape_str(t->shape, t->ndim, sb, sizeof sb);
        rc = jem__errf(L->err, L->errlen, JEM_ESHAPE, "tensor '%s': shape [%llu,%llu] expected, "
                       "file has %s", name, (unsigned long long)rows, (unsigned long long)F, sb);
      }
      *(is_mean ? &L->fmean : &L->fwhite) = t;
      continue;
    }
    rc = jem__errf(L->err, L->errlen, JEM_EFORMAT,
                   "tensor '%s' is not part of a JEM WRN-%d-%d model (unknown name)",
                   pn(name, nb), arch->depth, arch->widen);
  }
  json_decref(expected);
  if (!rc && !L->fmean != !L->fwhite)
    rc = jem__errf(L->err, L->errlen, JEM_EFORMAT, "tensors 'ood.feature_mean' and "
                   "'ood.feature_whitener' come together; the file has only '%s'",
                   L->fmean ? "ood.feature_mean" : "ood.feature_whitener");
  return rc;
}

/* The architecture's parameters are all in the file, with their shapes;
 * then the other tensors (check_extra). */
static int check_params(st_load *L) {
  char sb[200], sb2[200];
  L->index = json_object();
  if (!L->index) return jem__errf(L->err, L->errlen, JEM_ENOMEM, "out of memory");
  for (size_t i = 0; i < L->nt; i++)
    if (json_object_set_new(L->index, L->ts[i].name, json_integer((json_int_t)i)))
      return jem__errf(L->err, L->errlen, JEM_ENOMEM, "out of memory");
  int np = jem_arch_params(&L->arch, NULL, 0);
  /* At most nt expected names can be present, so among the first nt+1 one
   * is missing: never build a table larger than the file justifies. */
  int cap = (size_t)np > L->nt ? (int)L->nt + 1 : np;
  jem_param *params = calloc((size_t)(cap > 0 ? cap : 1), sizeof *params);
  int rc = 0;
  if (!params || np <= 0)
    rc = jem__errf(L->err, L->errlen, np <= 0 ? JEM_EINTERNAL : JEM_ENOMEM,
                   np <= 0 ? "architecture has no parameters" : "out of memory");
  else
    jem_arch_params(&L->arch, params, cap);
  for (int i = 0; !rc && i < cap; i++) {
    json_t *ix = json_object_get(L->index, params[i].name);
    if (!ix) {
      rc = jem__errf(L->err, L->errlen, JEM_EFORMAT, "tensor '%s' is missing", params[i].name);
      break;
    }
    const st_tensor *t = &L->ts[json_integer_value(ix)];
    if (!shape_eq(t, &params[i])) {
      uint64_t es[4];
      for (int d = 0; d < params[i].ndim; d++) es[d] = (uint64_t)params[i].shape[d];
      shape_str(es, params[i].ndim, sb, sizeof sb);
      shape_str(t->shape, t->ndim, sb2, sizeof sb2);
      rc = jem__errf(L->err, L->errlen, JEM_ESHAPE, "tensor '%s': shape %s expected, file has %s",
                     params[i].name, sb, sb2);
    }
  }
  if (!rc) rc = check_extra(L, params, cap);
  free(params);
  return rc;
}

/* The weights, the replay buffer and the feature Gaussian into m, every
 * value finite. */
static int copy_tensors(const st_load *L, jem_model *m) {
  const unsigned char *data = L->data;
  char *err = L->err;
  const size_t errlen = L->errlen;
  for (int i = 0; i < m->n_params; i++) {
    const jem_param *p = &m->params[i];
    const st_tensor *t = &L->ts[json_integer_value(json_object_get(L->index, p->name))];
    size_t bad = convert(m->weights + p->offset, data + t->begin, p->numel, t->dtype);
    if (bad != p->numel)
      return jem__errf(err, errlen, JEM_EFORMAT, "tensor '%s': element %zu is not finite",
                       p->name, bad);
  }
  const st_tensor *replay = L->replay, *fmean = L->fmean, *fwhite = L->fwhite;
  if (replay && replay->numel > 0) {
    m->replay = jem__falloc((size_t)replay->numel);
    if (!m->replay)
      return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for the replay buffer");
    size_t bad = convert(m->replay, data + replay->begin, (size_t)replay->numel, replay->dtype);
    if (bad != replay->numel)
      return jem__errf(err, errlen, JEM_EFORMAT, "tensor 'replay_buffer': element %zu is not finite",
                       bad);
    m->replay_n = (int)replay->shape[0];
  }
  int rc = 0;
  if (fmean) {
    float *mean = jem__falloc((size_t)fmean->numel), *white = jem__falloc((size_t)fwhite->numel);
    if (!mean || !white)
      rc = jem__errf(err, errlen, JEM_ENOMEM, "out of memory for the feature Gaussian");
    else if (convert(mean, data + fmean->begin, (size_t)fmean->numel, fmean->dtype) != fmean->numel ||
             convert(white, data + fwhite->begin, (size_t)fwhite->numel, fwhite->dtype) != fwhite->numel)
      rc = jem__errf(err, errlen, JEM_EFORMAT, "the feature Gaussian has a value that is not finite");
    else
      rc = jem_model_set_feature_gauss(m, mean, white, err, errlen);
    free(mean);
    free(white);
  }
  return rc;
}

int jem_model_load_mem(jem_model **out, const void *buf, size_t len, const char *default_name,
                       char *err, size_t errlen) {
  if (!out) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_load_mem: NULL output");
  *out = NULL;
  if (!buf && len) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_load_mem: NULL buffer");
  const unsigned char *b = buf;
  uint64_t n = 0;
  int rc = read_header_len(b, len, &n, err, errlen);
  if (rc) return rc;
  st_load L = {.data = b + 8 + n, .data_len = (uint64_t)(len - 8 - n), .err = err,
               .errlen = errlen};
  jem_model *m = NULL;
  if (!(rc = read_tensors(&L, (const char *)b + 8, (size_t)n)) && !(rc = read_arch(&L)) &&
      !(rc = check_params(&L)) && !(rc = jem_model_create(&m, &L.arch, err, errlen)) &&
      !(rc = copy_tensors(&L, m))) {
    /* the metadata, with defaults */
    const char *dn = default_name ? default_name : "model";
    sanitize_name(dn, strlen(dn), m->name, sizeof m->name);
    json_decref(m->meta);
    m->meta = L.meta;
    L.meta = NULL;
    rc = jem_model_apply_meta(m, err, errlen);
  }
  if (!rc) {
    *out = m;
    m = NULL;
  }
  jem_model_free(m);
  free(L.ts);
  json_decref(L.index);
  json_decref(L.meta);
  json_decref(L.hdr);
  return rc;
}

int jem_model_load(jem_model **out, const char *path, char *err, size_t errlen) {
  if (!out) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_load: NULL output");
  *out = NULL;
  unsigned char *buf = NULL;
  size_t len = 0;
  char why[240];
  int rc = jem_read_file(path, MAX_FILE_BYTES, &buf, &len, err, errlen);
  if (rc) return rc;
  /* default name: the file's basename without its extension */
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  const char *dot = strrchr(base, '.');
  size_t bl = dot && dot != base ? (size_t)(dot - base) : strlen(base);
  char name[128];
  sanitize_name(base, bl, name, sizeof name);
  rc = jem_model_load_mem(out, buf, len, name, why, sizeof why);
  free(buf);
  if (rc) return jem__errf(err, errlen, rc, "%s: %s", path, why);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Saving                                                                   */

static int write_all(int fd, const void *p, size_t n) {
  const unsigned char *c = p;
  while (n) {
    ssize_t w = write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    c += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Writes floats as little-endian F32 through a small staging buffer. */
static int write_floats(int fd, const float *x, size_t n) {
  unsigned char buf[16384];
  size_t i = 0;
  while (i < n) {
    size_t c = n - i < sizeof buf / 4 ? n - i : sizeof buf / 4;
    for (size_t j = 0; j < c; j++) {
      uint32_t bits;
      memcpy(&bits, &x[i + j], 4);
      buf[4 * j] = (unsigned char)bits;
      buf[4 * j + 1] = (unsigned char)(bits >> 8);
      buf[4 * j + 2] = (unsigned char)(bits >> 16);
      buf[4 * j + 3] = (unsigned char)(bits >> 24);
    }
    if (write_all(fd, buf, c * 4)) return -1;
    i += c;
  }
  return 0;
}

static size_t first_nonfinite(const float *x, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!isfinite(x[i])) return i;
  return n;
}

static int add_tensor(json_t *hdr, const char *name, const int *shape, int ndim, uint64_t *off,
                      size_t numel) {
  json_t *sh = json_array();
  for (int i = 0; i < ndim; i++) json_array_append_new(sh, json_integer(shape[i]));
  json_t *e = json_pack("{s:s, s:o, s:[I,I]}", "dtype", "F32", "shape", sh, "data_offsets",
                        (json_int_t)*off, (json_int_t)(*off + numel * 4));
  *off += numel * 4;
  return e ? json_object_set_new(hdr, name, e) : -1;
}

int jem_model_save(const jem_model *m, const char *path, char *err, size_t errlen) {
  if (!m || !path || !*path) return jem__errf(err, errlen, JEM_EINVAL, "jem_model_save: bad argument");
  char why[240];
  int rc = jem__meta_check(m, why, sizeof why);
  if (rc) return jem__errf(err, errlen, rc, "refusing to save '%s': %s", path, why);
  for (int i = 0; i < m->n_params; i++) {
    const jem_param *p = &m->params[i];
    size_t bad = first_nonfinite(m->weights + p->offset, p->numel);
    if (bad != p->numel)
      return jem__errf(err, errlen, JEM_EINVAL,
                       "refusing to save '%s': tensor '%s' element %zu is not finite", path,
                       p->name, bad);
  }
  const size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  const size_t rn = m->replay && m->replay_n > 0 ? (size_t)m->replay_n * chw : 0;
  if (rn && first_nonfinite(m->replay, rn) != rn)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "refusing to save '%s': the replay buffer has a non-finite value", path);

  /* header: metadata first, then the tensors in canonical order */
  char *mj = json_dumps(m->meta, JSON_COMPACT | JSON_SORT_KEYS);
  json_t *hdr = json_object();
  int bad = !mj || !hdr;
  if (!bad) bad = json_object_set_new(hdr, "__metadata__", json_pack("{s:s}", "jem", mj));
  free(mj);
  uint64_t off = 0;
  for (int i = 0; i < m->n_params && !bad; i++)
    bad = add_tensor(hdr, m->params[i].name, m->params[i].shape, m->params[i].ndim, &off,
                     m->params[i].numel);
  if (rn && !bad) {
    int rs[4] = {m->replay_n, m->arch.in_channels, m->arch.image_size, m->arch.image_size};
    bad = add_tensor(hdr, "replay_buffer", rs, 4, &off, rn);
  }
  const int K = m->arch.num_classes, F = 64 * m->arch.widen;
  if (m->feat_mean && !bad) {
    int ms[2] = {K, F}, ws[2] = {F, F};
    bad = add_tensor(hdr, "ood.feature_mean", ms, 2, &off, (size_t)K * F) ||
          add_tensor(hdr, "ood.feature_whitener", ws, 2, &off, (size_t)F * F);
  }
  char *hs = bad ? NULL : json_dumps(hdr, JSON_COMPACT);
  json_decref(hdr);
  if (!hs) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory building the header");
  size_t hl = strlen(hs);
  size_t padded = (hl + 7) & ~(size_t)7; /* data starts 8-aligned */
  unsigned char lenb[8];
  for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)padded >> (8 * i));

  size_t pl = strlen(path);
  char *tmp = malloc(pl + 5);
  if (!tmp) {
    free(hs);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
  }
  memcpy(tmp, path, pl);
  memcpy(tmp + pl, ".tmp", 5);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int e = errno;
    rc = jem__errf(err, errlen, JEM_EIO, "cannot create '%s': %s", tmp, strerror(e));
    free(hs);
    free(tmp);
    return rc;
  }
  static const char spaces[9] = "        ";
  int werr = write_all(fd, lenb, 8) || write_all(fd, hs, hl) ||
             write_all(fd, spaces, padded - hl);
  free(hs);
  for (int i = 0; i < m->n_params && !werr; i++)
    werr = write_floats(fd, m->weights + m->params[i].offset, m->params[i].numel);
  if (rn && !werr) werr = write_floats(fd, m->replay, rn);
  if (m->feat_mean && !werr)
    werr = write_floats(fd, m->feat_mean, (size_t)K * F) ||
           write_floats(fd, m->feat_whiten, (size_t)F * F);
  if (!werr) werr = fsync(fd);
  int e = errno;
  if (close(fd) && !werr) {
    werr = 1;
    e = errno;
  }
  if (!werr && rename(tmp, path)) {
    werr = 1;
    e = errno;
  }
  if (werr) {
    rc = jem__errf(err, errlen, JEM_EIO, "cannot write '%s': %s", path, strerror(e));
    unlink(tmp);
    free(tmp);
    return rc;
  }
  free(tmp);
  /* make the rename durable */
  char *dir = strdup(path);
  if (dir) {
    char *slash = strrchr(dir, '/');
    const char *d = slash ? (slash == dir ? "/" : (*slash = 0, dir)) : ".";
    int dfd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)fsync(dfd);
      close(dfd);
    }
    free(dir);
  }
  return 0;
}
