/* npy.c - NumPy .npy reading (v1/v2/v3, float32 or float64, C order) and float32 writing. */
#include "internal.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAX_HEADER 65536 /* numpy itself refuses headers above 10000 bytes by default */

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "npy.c assumes a little-endian host");

/* ------------------------------------------------------------------------ */
/* Header dictionary parser                                                 */

/* The header is a Python dict literal, e.g.
 *   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
 * parsed here strictly: string keys, and string / bool / int-tuple values. */
typedef struct npy_cur { const char *p, *end; } npy_cur;

static void skip_ws(npy_cur *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
    c->p++;
}

static int eat(npy_cur *c, char ch) {
  skip_ws(c);
  if (c->p < c->end && *c->p == ch) {
    c->p++;
    return 1;
  }
  return 0;
}

/* A quoted string into out (NUL-terminated, truncated check). */
static int parse_str(npy_cur *c, char *out, size_t cap) {
  skip_ws(c);
  if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return 0;
  char q = *c->p++;
  size_t n = 0;
  while (c->p < c->end && *c->p != q) {
    if (*c->p == '\\' || n + 1 >= cap) return 0;
    out[n++] = *c->p++;
  }
  if (c->p >= c->end) return 0;
  c->p++;
  out[n] = 0;
  return 1;
}

static int parse_word(npy_cur *c, const char *w) {
  skip_ws(c);
  size_t n = strlen(w);
  if ((size_t)(c->end - c->p) >= n && !memcmp(c->p, w, n)) {
    c->p += n;
    return 1;
  }
  return 0;
}

/* (d0, d1, ...) with 0..4 entries and an optional trailing comma. */
static int parse_shape(npy_cur *c, int *ndim, long long dims[4], char *err, size_t errlen) {
  if (!eat(c, '('))
    return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: 'shape' is not a tuple");
  *ndim = 0;
  for (;;) {
    if (eat(c, ')')) return 0;
    skip_ws(c);
    if (c->p >= c->end || !isdigit((unsigned char)*c->p))
      return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: 'shape' holds a non-integer");
    long long v = 0;
    while (c->p < c->end && isdigit((unsigned char)*c->p)) {
      v = v * 10 + (*c->p++ - '0');
      if (v > INT32_MAX)
        return jem__errf(err, errlen, JEM_ETOOBIG, ".npy header: a dimension exceeds 2^31-1");
    }
    if (c->p < c->end && *c->p == 'L') c->p++; /* Python 2 longs */
    if (*ndim == 4)
      return jem__errf(err, errlen, JEM_ESHAPE, ".npy array has more than 4 dimensions");
    dims[(*ndim)++] = v;
    if (eat(c, ',')) continue;
    if (eat(c, ')')) return 0;
    return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: malformed 'shape' tuple");
  }
}

/* ------------------------------------------------------------------------ */
/* Reading                                                                  */

static int rd_le16(const unsigned char *p) { return p[0] | p[1] << 8; }
static uint32_t rd_le32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int jem_npy_read_mem(const void *buf, size_t len, float **data, int *ndim, int shape[4],
                     char *err, size_t errlen) {
  if (!data || !ndim || !shape) return jem__errf(err, errlen, JEM_EINVAL, "jem_npy_read_mem: NULL output");
  *data = NULL;
  *ndim = 0;
  const unsigned char *b = buf;
  if (!b || len < 10 || memcmp(b, "\x93NUMPY", 6) != 0)
    return jem__errf(err, errlen, JEM_EFORMAT, "not a NumPy .npy file (no \\x93NUMPY magic)");
  int major = b[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = (size_t)rd_le16(b + 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (len < 12) return jem__errf(err, errlen, JEM_EFORMAT, ".npy file is truncated in its header");
    hlen = rd_le32(b + 8);
    hstart = 12;
  } else {
    return jem__errf(err, errlen, JEM_EUNSUPPORTED, ".npy format version %d.%d is not supported",
                     major, b[7]);
  }
  if (hlen > NPY_MAX_HEADER)
    return jem__errf(err, errlen, JEM_EFORMAT, ".npy header is %zu bytes (limit %d)", hlen,
                     NPY_MAX_HEADER);
  if (hlen > len - hstart)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     ".npy header claims %zu bytes but the file has %zu after the preamble",
                     hlen, len - hstart);

  npy_cur c = {(const char *)b + hstart, (const char *)b + hstart + hlen};
  char descr[16] = "";
  int have_descr = 0, have_fortran = 0, have_shape = 0, fortran = 0, nd = 0;
  long long dims[4] = {0};
  if (!eat(&c, '{')) return jem__errf(err, errlen, JEM_EFORMAT, ".npy header is not a dictionary");
  for (;;) {
    if (eat(&c, '}')) break;
    char key[32];
    if (!parse_str(&c, key, sizeof key) || !eat(&c, ':'))
      return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: malformed dictionary");
    if (!strcmp(key, "descr")) {
      if (!parse_str(&c, descr, sizeof descr))
        return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                         ".npy dtype is not a simple type (structured arrays are not supported)");
      have_descr = 1;
    } else if (!strcmp(key, "fortran_order")) {
      if (parse_word(&c, "False")) fortran = 0;
      else if (parse_word(&c, "True")) fortran = 1;
      else return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: 'fortran_order' is not True/False");
      have_fortran = 1;
    } else if (!strcmp(key, "shape")) {
      int rc = parse_shape(&c, &nd, dims, err, errlen);
      if (rc) return rc;
      have_shape = 1;
    } else {
      return jem__errf(err, errlen, JEM_EFORMAT, ".npy header has an unknown key '%s'", key);
    }
    if (eat(&c, ',')) continue;
    if (eat(&c, '}')) break;
    return jem__errf(err, errlen, JEM_EFORMAT, ".npy header: malformed dictionary");
  }
  if (!have_descr || !have_fortran || !have_shape)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     ".npy header lacks one of 'descr', 'fortran_order', 'shape'");
  if (fortran)
    return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                     ".npy array is in Fortran order; save it C-contiguous (np.ascontiguousarray)");
  size_t item;
  int big = 0, dbl = 0;
  if (!strcmp(descr, "<f4") || !strcmp(descr, "=f4")) item = 4;
  else if (!strcmp(descr, ">f4")) item = 4, big = 1;
  else if (!strcmp(descr, "<f8") || !strcmp(descr, "=f8")) item = 8, dbl = 1;
  else if (!strcmp(descr, ">f8")) item = 8, dbl = 1, big = 1;
  else
    return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                     ".npy dtype '%s' is not supported; use float32 ('<f4')", descr);
  if (nd < 1)
    return jem__errf(err, errlen, JEM_ESHAPE, ".npy array is a scalar; 1 to 4 dimensions are needed");
  size_t numel = 1;
  for (int i = 0; i < nd; i++) {
    if (dims[i] == 0)
      return jem__errf(err, errlen, JEM_ESHAPE, ".npy array is empty (dimension %d is 0)", i);
    if (numel > SIZE_MAX / (size_t)dims[i] / item)
      return jem__errf(err, errlen, JEM_ETOOBIG, ".npy array size overflows");
    numel *= (size_t)dims[i];
  }
  size_t need = numel * item, have = len - hstart - hlen;
  if (have != need)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     ".npy data is %zu bytes but shape and dtype '%s' need %zu", have, descr,
                     need);
  float *out = malloc(numel ? numel * sizeof(float) : 1);
  if (!out) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory reading a .npy array");
  const unsigned char *d = b + hstart + hlen;
  for (size_t i = 0; i < numel; i++) {
    unsigned char t[8];
    for (size_t k = 0; k < item; k++) t[k] = big ? d[i * item + item - 1 - k] : d[i * item + k];
    if (dbl) {
      double v;
      memcpy(&v, t, 8);
      out[i] = (float)v;
    } else {
      memcpy(&out[i], t, 4);
    }
  }
  *data = out;
  *ndim = nd;
  for (int i = 0; i < 4; i++) shape[i] = i < nd ? (int)dims[i] : 1;
  return 0;
}

int jem_npy_read(const char *path, float **data, int *ndim, int shape[4], char *err,
                 size_t errlen) {
  unsigned char *buf = NULL;
  size_t len = 0;
  int rc = jem_read_file(path, (size_t)1 << 32, &buf, &len, err, errlen);
  if (rc) return rc;
  char sub[200];
  rc = jem_npy_read_mem(buf, len, data, ndim, shape, sub, sizeof sub);
  free(buf);
  if (rc) return jem__errf(err, errlen, rc, "%s: %s", path, sub);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Writing                                                                  */

unsigned char *jem_npy_encode(const float *data, int ndim, const int *shape, size_t *out_len) {
  if (out_len) *out_len = 0;
  if (!data || !shape || ndim < 1 || ndim > 4) return NULL;
  char dict[160];
  int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
  size_t numel = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return NULL;
    if (shape[i] && numel > SIZE_MAX / sizeof(float) / (size_t)shape[i]) return NULL;
    numel *= (size_t)shape[i];
    n += snprintf(dict + n, sizeof dict - (size_t)n, i ? ", %d" : "%d", shape[i]);
  }
  n += snprintf(dict + n, sizeof dict - (size_t)n, ndim == 1 ? ",), }" : "), }");
  /* pad with spaces so that the data starts on a 64-byte boundary */
  size_t hl = (size_t)n + 1, total = 10 + hl;
  size_t padded = (total + 63) / 64 * 64;
  hl = padded - 10;
  size_t len = padded + numel * sizeof(float);
  unsigned char *b = malloc(len);
  if (!b) return NULL;
  memcpy(b, "\x93NUMPY\x01\x00", 8);
  b[8] = (unsigned char)(hl & 255);
  b[9] = (unsigned char)(hl >> 8);
  memcpy(b + 10, dict, (size_t)n);
  memset(b + 10 + n, ' ', hl - (size_t)n - 1);
  b[padded - 1] = '\n';
  /* little-endian on the hosts this builds for (x86-64, aarch64) */
  memcpy(b + padded, data, numel * sizeof(float));
  if (out_len) *out_len = len;
  return b;
}
