/* torchload.c - a reader for torch.save files: the zip and legacy formats
 * around the object pickle (read by the restricted unpickler in
 * torch_pickle.c) and the tensors collected from what it builds. */
#include "torch_pickle.h"

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define MAX_DEPTH 64
#define MAX_NAME 512

/* Element i of a little-endian array of type dt, as a float. */
static float elem(const unsigned char *base, int dt, size_t i) {
  const unsigned char *p = base + i * jem__tl_dtypes[dt].size;
  uint64_t u;
  switch (dt) {
    case DT_F32: { uint32_t b = (uint32_t)jem__rd_le(p, 4); float f; memcpy(&f, &b, 4); return f; }
    case DT_F64: { u = jem__rd_le(p, 8); double d; memcpy(&d, &u, 8); return (float)d; }
    case DT_F16: return jem__half_to_float((uint16_t)jem__rd_le(p, 2));
    case DT_BF16: { uint32_t b = (uint32_t)jem__rd_le(p, 2) << 16; float f; memcpy(&f, &b, 4); return f; }
    case DT_I64: return (float)(int64_t)jem__rd_le(p, 8);
    case DT_I32: return (float)(int32_t)(uint32_t)jem__rd_le(p, 4);
    case DT_I16: return (float)(int16_t)(uint16_t)jem__rd_le(p, 2);
    case DT_I8: return (float)(int8_t)p[0];
    case DT_BOOL: return p[0] ? 1.0f : 0.0f;
    default: return (float)p[0];
  }
}

/* ------------------------------------------------------------------------ */
/* Collecting the tensors                                                   */

typedef struct walk {
  tl *t;
  jem_tl_file *f;
  size_t cap;
  size_t visits, floats, max_floats;
  char path[MAX_NAME];
} walk;

static int emit(walk *w, const val *v, size_t plen) {
  tl *t = w->t;
  const storage *s = &t->st[v->i];
  if (!s->data)
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "tensor '%s': its storage's data is missing", w->path);
  size_t numel = 1;
  for (int d = 0; d < v->ndim; d++) numel *= (size_t)v->shape[d]; /* bounded at rebuild */
  /* the budget counts each tensor's name and bookkeeping too, so shared
   * references to tiny tensors cannot multiply memory either */
  const size_t cost = numel + plen / 4 + 32;
  if (cost > w->max_floats - w->floats)
    return jem__errf(t->err, t->errlen, JEM_ETOOBIG,
                     "tensor '%s': the tensors' total size exceeds the file's (shared storages)", w->path);
  w->floats += cost;
  if (w->f->n == (int)w->cap) {
    size_t nc = w->cap ? 2 * w->cap : 64;
    jem_tl_tensor *nt = realloc(w->f->t, nc * sizeof *nt);
    if (!nt) return JEM_ENOMEM;
    w->f->t = nt;
    w->cap = nc;
  }
  jem_tl_tensor *o = &w->f->t[w->f->n];
  memset(o, 0, sizeof *o);
  o->name = malloc(plen + 1);
  o->data = malloc((numel ? numel : 1) * sizeof(float));
  if (!o->name || !o->data) {
    free(o->name);
    free(o->data);
    return jem__errf(t->err, t->errlen, JEM_ENOMEM, "out of memory reading tensor '%s'", w->path);
  }
  w->f->n++;
  memcpy(o->name, w->path, plen + 1);
  o->dtype = jem__tl_dtypes[s->dtype].name;
  o->ndim = v->ndim;
  memcpy(o->shape, v->shape, sizeof o->shape);
  o->numel = numel;
  const unsigned char *base = s->data;
  int64_t idx[JEM_TL_MAX_DIM] = {0};
  for (size_t k = 0; k < numel; k++) {
    size_t e = v->view_off + (size_t)v->offset;
    for (int d = 0; d < v->ndim; d++) e += (size_t)(idx[d] * v->stride[d]);
    o->data[k] = elem(base, s->dtype, e);
    for (int d = v->ndim - 1; d >= 0; d--) {
      if (++idx[d] < v->shape[d]) break;
      idx[d] = 0;
    }
  }
  return 0;
}

static int collect(walk *w, const val *v, size_t plen, int depth) {
  tl *t = w->t;
  if (++w->visits > 4 * t->nvals + 1024 || depth > MAX_DEPTH)
    return jem__errf(t->err, t->errlen, JEM_EFORMAT,
                     "the object is nested too deeply, refers to itself or repeats an object too "
                     "often (at '%s')", w->path);
  if (v->kind == V_TENSOR) return emit(w, v, plen);
  if (v->kind != V_DICT && v->kind != V_LIST && v->kind != V_TUPLE) return 0;
  int dict = v->kind == V_DICT;
  for (size_t i = 0; i < v->n; i += dict ? 2 : 1) {
    char key[72];
    const char *k = key;
    size_t kl;
    if (!dict) {
      kl = (size_t)snprintf(key, sizeof key, "%zu", i);
    } else if (v->items[i]->kind == V_INT) {
      kl = (size_t)snprintf(key, sizeof key, "%lld", (long long)v->items[i]->i);
    } else if (v->items[i]->kind == V_STR && !memchr(v->items[i]->s, 0, v->items[i]->slen)) {
      k = (const char *)v->items[i]->s;
      kl = v->items[i]->slen;
    } else {
      return jem__errf(t->err, t->errlen, JEM_EFORMAT,
                       "a dict under '%s' has a key that is not a string or an integer", w->path);
    }
    size_t sep = plen ? 1 : 0;
    if (plen + sep + kl >= MAX_NAME)
      return jem__errf(t->err, t->errlen, JEM_EFORMAT, "a key path longer than %d bytes under '%.64s'",
                       MAX_NAME, w->path);
    if (sep) w->path[plen] = '/';
    memcpy(w->path + plen + sep, k, kl);
    w->path[plen + sep + kl] = 0;
    int rc = collect(w, v->items[i + (size_t)dict], plen + sep + kl, depth + 1);
    w->path[plen] = 0;
    if (rc) return rc;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* The legacy format                                                        */

static int load_legacy(tl *t, val **root) {
  static const unsigned char magic[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  size_t pos = 0;
  val *v;
  int rc;
  t->legacy = 1;
  if ((rc = jem__tl_unpickle(t, "the magic-number pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_BIGINT || v->slen != 10 || memcmp(v->s, magic, 10))
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "not a torch.save file: the first pickle is not PyTorch's magic number");
  if ((rc = jem__tl_unpickle(t, "the protocol pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_INT || v->i != 1001)
    return jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "legacy torch.save file: protocol version is not 1001");
  if ((rc = jem__tl_unpickle(t, "the system-info pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_DICT)
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "legacy torch.save file: the system info is not a dict");
  for (size_t i = 0; i + 1 < v->n; i += 2)
    if (jem__tl_str_is(v->items[i], "little_endian") && v->items[i + 1]->kind == V_BOOL && !v->items[i + 1]->i)
      return jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "legacy torch.save file written on a big-endian machine");
  if ((rc = jem__tl_unpickle(t, "the object pickle", t->buf, &pos, t->len, 1, root))) return rc;
  val *keys;
  if ((rc = jem__tl_unpickle(t, "the storage-key pickle", t->buf, &pos, t->len, 0, &keys))) return rc;
  if (keys->kind != V_LIST)
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "legacy torch.save file: the storage keys are not a list");
  for (size_t i = 0; i < keys->n; i++) {
    val *k = keys->items[i];
    storage *s = NULL;
    for (size_t j = 0; k->kind == V_STR && j < t->nst; j++)
      if (t->st[j].keylen == k->slen && !memcmp(t->st[j].key, k->s, k->slen)) s = &t->st[j];
    if (!s || s->data)
      return jem__errf(t->err, t->errlen, JEM_EFORMAT,
                       "legacy torch.save file: storage key %zu is unknown or repeated", i);
    if (t->len - pos < 8)
      return jem__errf(t->err, t->errlen, JEM_EFORMAT, "legacy torch.save file: truncated in storage %zu", i);
    uint64_t numel = jem__rd_le(t->buf + pos, 8);
    pos += 8;
    if (numel != s->numel || numel > (t->len - pos) / jem__tl_dtypes[s->dtype].size)
      return jem__errf(t->err, t->errlen, JEM_EFORMAT,
                       "legacy torch.save file: storage %zu has the wrong size or is truncated", i);
    s->data = t->buf + pos;
    pos += (size_t)numel * jem__tl_dtypes[s->dtype].size;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* The zip format                                                           */

typedef struct zentry {
  const unsigned char *name;
  size_t namelen;
  const unsigned char *data;   /* after inflating, if it was deflated */
  uint64_t size;
} zentry;

static int zerr(tl *t, const char *msg) {
  return jem__errf(t->err, t->errlen, JEM_EFORMAT, "torch.save zip file: %s", msg);
}

/* The entry's data: stored entries point into the file, deflated ones are
 * inflated into a buffer the tl owns. */
static int zip_data(tl *t, zentry *e, uint64_t lho, uint64_t csize, uint64_t usize, int method,
                    uint32_t crc) {
  if (lho > t->len || t->len - lho < 30 || jem__rd_le(t->buf + lho, 4) != 0x04034b50)
    return zerr(t, "a local header is missing");
  uint64_t start = lho + 30 + jem__rd_le(t->buf + lho + 26, 2) + jem__rd_le(t->buf + lho + 28, 2);
  if (start > t->len || csize > t->len - start) return zerr(t, "an entry runs past the end of the file");
  const unsigned char *src = t->buf + start;
  if (method == 0) {
    if (usize != csize) return zerr(t, "a stored entry whose sizes disagree");
    e->data = src;
  } else if (method == 8) {
    /* deflate expands at most ~1032:1; refuse claims beyond that */
    if (usize > (csize + 1) * 1032 || usize > ((uint64_t)1 << 36)) return zerr(t, "a deflated entry with an implausible size");
    unsigned char **no = realloc(t->owned, (t->nowned + 1) * sizeof *no);
    if (!no) return JEM_ENOMEM;
    t->owned = no;
    unsigned char *dst = malloc(usize ? (size_t)usize : 1);
    if (!dst) return jem__errf(t->err, t->errlen, JEM_ENOMEM, "out of memory inflating a zip entry");
    t->owned[t->nowned++] = dst;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -15) != Z_OK) return JEM_ENOMEM;
    int zr = Z_OK;
    uint64_t in_left = csize, out_left = usize;
    zs.next_in = (unsigned char *)(uintptr_t)src;
    zs.next_out = dst;
    while (zr == Z_OK) {
      uInt ci = in_left > (1u << 30) ? (1u << 30) : (uInt)in_left;
      uInt co = out_left > (1u << 30) ? (1u << 30) : (uInt)out_left;
      zs.avail_in = ci;
      zs.avail_out = co;
      zr = inflate(&zs, Z_NO_FLUSH);
      in_left -= ci - zs.avail_in;
      out_left -= co - zs.avail_out;
      if (zr == Z_BUF_ERROR || (zr == Z_OK && !in_left && !out_left)) break;
    }
    inflateEnd(&zs);
    if (zr != Z_STREAM_END || out_left) return zerr(t, "a deflated entry does not inflate to its size");
    e->data = dst;
  } else {
    return jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED,
                     "torch.save zip file: compression method %d (only stored and deflate)", method);
  }
  e->size = usize;
  /* crc32 takes a uInt length: feed it in slices */
  uLong c = crc32(0L, Z_NULL, 0);
  for (uint64_t off = 0; off < usize;) {
    uInt k = usize - off > (1u << 30) ? (1u << 30) : (uInt)(usize - off);
    c = crc32(c, e->data + off, k);
    off += k;
  }
  if ((uint32_t)c != crc) return zerr(t, "an entry's CRC-32 does not match (corrupt file)");
  return 0;
}

static int load_zip(tl *t, val **root) {
  const unsigned char *b = t->buf;
  size_t len = t->len;
  if (len < 22) return zerr(t, "too short");
  size_t eocd = len - 22, stop = len - 22 > 65535 ? len - 22 - 65535 : 0;
  while (jem__rd_le(b + eocd, 4) != 0x06054b50) {
    if (eocd == stop) return zerr(t, "no end-of-central-directory record (truncated?)");
    eocd--;
  }
  uint64_t count = jem__rd_le(b + eocd + 10, 2), cdsize = jem__rd_le(b + eocd + 12, 4),
           cdoff = jem__rd_le(b + eocd + 16, 4);
  if (count == 0xffff || cdsize == 0xffffffffu || cdoff == 0xffffffffu) {
    if (eocd < 20 || jem__rd_le(b + eocd - 20, 4) != 0x07064b50) return zerr(t, "zip64 locator missing");
    uint64_t z = jem__rd_le(b + eocd - 12, 8);
    if (z > len || len - z < 56 || jem__rd_le(b + z, 4) != 0x06064b50) return zerr(t, "zip64 end record missing");
    count = jem__rd_le(b + z + 32, 8);
    cdsize = jem__rd_le(b + z + 40, 8);
    cdoff = jem__rd_le(b + z + 48, 8);
  }
  if (cdoff > len || cdsize > len - cdoff || count > cdsize / 46) return zerr(t, "bad central directory bounds");
  zentry *ent = calloc(count ? (size_t)count : 1, sizeof *ent);
  if (!ent) return JEM_ENOMEM;
  int rc = 0;
  size_t p = (size_t)cdoff, cdend = (size_t)(cdoff + cdsize);
  for (uint64_t i = 0; i < count && !rc; i++) {
    if (cdend - p < 46 || jem__rd_le(b + p, 4) != 0x02014b50) {
      rc = zerr(t, "a central directory entry is malformed");
      break;
    }
    int flags = (int)jem__rd_le(b + p + 8, 2), method = (int)jem__rd_le(b + p + 10, 2);
    uint32_t crc = (uint32_t)jem__rd_le(b + p + 16, 4);
    uint64_t csize = jem__rd_le(b + p + 20, 4), usize = jem__rd_le(b + p + 24, 4), lho = jem__rd_le(b + p + 42, 4);
    size_t nl = (size_t)jem__rd_le(b + p + 28, 2), xl = (size_t)jem__rd_le(b + p + 30, 2),
           cl = (size_t)jem__rd_le(b + p + 32, 2);
    if (cdend - p - 46 < nl + xl + cl) {
      rc = zerr(t, "a central directory entry runs past the directory");
      break;
    }
    if (flags & 1) {
      rc = jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "torch.save zip file: encrypted entries");
      break;
    }
    /* zip64 extra field: the 8-byte values of the fields that read 0xffffffff */
    const unsigned char *x = b + p + 46 + nl, *xe = x + xl;
    while (xe - x >= 4) {
      size_t id = (size_t)jem__rd_le(x, 2), sz = (size_t)jem__rd_le(x + 2, 2);
      if ((size_t)(xe - x - 4) < sz) break;
      if (id == 1) {
        const unsigned char *q = x + 4, *qe = q + sz;
        uint64_t *fields[3] = {&usize, &csize, &lho};
        for (int f = 0; f < 3; f++)
          if (*fields[f] == 0xffffffffu) {
            if (qe - q < 8) break;
            *fields[f] = jem__rd_le(q, 8);
            q += 8;
          }
      }
      x += 4 + sz;
    }
    ent[i].name = b + p + 46;
    ent[i].namelen = nl;
    rc = zip_data(t, &ent[i], lho, csize, usize, method, crc);
    p += 46 + nl + xl + cl;
  }
  /* <dir>/data.pkl: the one entry of that name at the archive's top level */
  const zentry *pkl = NULL;
  size_t dirlen = 0;
  for (uint64_t i = 0; i < count && !rc; i++) {
    const unsigned char *slash = memchr(ent[i].name, '/', ent[i].namelen);
    if (slash && ent[i].namelen - (size_t)(slash - ent[i].name) == 9 && !memcmp(slash, "/data.pkl", 9)) {
      if (pkl) rc = zerr(t, "two data.pkl entries");
      pkl = &ent[i];
      dirlen = (size_t)(slash - ent[i].name);
    }
  }
  if (!rc && !pkl) rc = zerr(t, "no data.pkl entry (not a torch.save file?)");
  for (uint64_t i = 0; i < count && !rc; i++)
    if (ent[i].namelen == dirlen + 10 && !memcmp(ent[i].name, pkl->name, dirlen) &&
        !memcmp(ent[i].name + dirlen, "/byteorder", 10) &&
        !(ent[i].size == 6 && !memcmp(ent[i].data, "little", 6)))
      rc = jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "torch.save zip file: written on a big-endian machine");
  if (!rc) {
    size_t pos = 0;
    if (pkl->size > SIZE_MAX / 2) rc = zerr(t, "data.pkl too large");
    else rc = jem__tl_unpickle(t, "data.pkl", pkl->data, &pos, (size_t)pkl->size, 1, root);
  }
  /* storages: <dir>/data/<key> */
  for (size_t s = 0; s < t->nst && !rc; s++) {
    storage *st = &t->st[s];
    for (uint64_t i = 0; i < count; i++)
      if (ent[i].namelen == dirlen + 6 + st->keylen && !memcmp(ent[i].name, pkl->name, dirlen) &&
          !memcmp(ent[i].name + dirlen, "/data/", 6) &&
          !memcmp(ent[i].name + dirlen + 6, st->key, st->keylen)) {
        if (ent[i].size / jem__tl_dtypes[st->dtype].size < st->numel) {
          char k[72];
          rc = jem__errf(t->err, t->errlen, JEM_EFORMAT, "torch.save zip file: storage '%s' is shorter than its size",
                         jem__tl_safe(st->key, st->keylen, k));
        }
        st->data = ent[i].data;
      }
  }
  free(ent);
  return rc;
}

/* ------------------------------------------------------------------------ */

void jem_torch_free(jem_tl_file *f) {
  if (!f) return;
  for (int i = 0; i < f->n; i++) {
    free(f->t[i].name);
    free(f->t[i].data);
  }
  free(f->t);
  free(f);
}

const jem_tl_tensor *jem_torch_find(const jem_tl_file *f, const char *name) {
  for (int i = 0; i < f->n; i++)
    if (!strcmp(f->t[i].name, name)) return &f->t[i];
  return NULL;
}

int jem_torch_load_mem(jem_tl_file **out, const void *buf, size_t len, char *err, size_t errlen) {
  *out = NULL;
  if (err && errlen) err[0] = 0;
  tl t = {.buf = buf, .len = len, .max_vals = len + 64, .err = err, .errlen = errlen};
  val *root = NULL;
  int rc;
  const unsigned char *b = buf;
  if (len >= 4 && !memcmp(b, "PK\x03\x04", 4)) rc = load_zip(&t, &root);
  else if (len >= 2 && b[0] == 0x80 && b[1] >= 2) rc = load_legacy(&t, &root);
  else if (len >= 262 && !memcmp(b + 257, "ustar", 5))
    rc = jem__errf(err, errlen, JEM_EUNSUPPORTED, "a tar-format torch.save file (PyTorch before 0.4) is not supported");
  else rc = jem__errf(err, errlen, JEM_EFORMAT, "not a torch.save file (neither a zip archive nor a legacy pickle)");
  jem_tl_file *f = NULL;
  if (!rc && !(f = calloc(1, sizeof *f))) rc = JEM_ENOMEM;
  if (!rc) {
    f->format = t.legacy ? "legacy" : "zip";
    walk w = {.t = &t, .f = f, .max_floats = len + 65536};
    w.path[0] = 0;
    rc = collect(&w, root, 0, 0);
  }
  if (rc == JEM_ENOMEM && (!err || !err[0])) jem__errf(err, errlen, rc, "out of memory reading a torch.save file");
  while (t.all) {
    val *n = t.all->next;
    free(t.all->items);
    free(t.all);
    t.all = n;
  }
  for (size_t i = 0; i < t.nowned; i++) free(t.owned[i]);
  free(t.owned);
  free(t.st);
  if (rc) {
    jem_torch_free(f);
    return rc;
  }
  *out = f;
  return 0;
}
