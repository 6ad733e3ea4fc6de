/* torchload.c - a reader for torch.save files (zip and legacy formats) with a
 * restricted unpickler that builds plain data and never executes anything. */
#include "torchload.h"

#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ------------------------------------------------------------------------ */
/* Element types                                                            */

enum { DT_F32, DT_F64, DT_F16, DT_BF16, DT_I64, DT_I32, DT_I16, DT_I8, DT_U8, DT_BOOL };
static const struct {
  const char *storage, *name;
  size_t size;
} dtypes[] = {
  [DT_F32] = {"FloatStorage", "float32", 4},   [DT_F64] = {"DoubleStorage", "float64", 8},
  [DT_F16] = {"HalfStorage", "float16", 2},    [DT_BF16] = {"BFloat16Storage", "bfloat16", 2},
  [DT_I64] = {"LongStorage", "int64", 8},      [DT_I32] = {"IntStorage", "int32", 4},
  [DT_I16] = {"ShortStorage", "int16", 2},     [DT_I8] = {"CharStorage", "int8", 1},
  [DT_U8] = {"ByteStorage", "uint8", 1},       [DT_BOOL] = {"BoolStorage", "bool", 1},
};
#define N_DTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))

static uint64_t rd_le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/* Element i of a little-endian array of type dt, as a float. */
static float elem(const unsigned char *base, int dt, size_t i) {
  const unsigned char *p = base + i * dtypes[dt].size;
  uint64_t u;
  switch (dt) {
    case DT_F32: { uint32_t b = (uint32_t)rd_le(p, 4); float f; memcpy(&f, &b, 4); return f; }
    case DT_F64: { u = rd_le(p, 8); double d; memcpy(&d, &u, 8); return (float)d; }
    case DT_F16: return jem__half_to_float((uint16_t)rd_le(p, 2));
    case DT_BF16: { uint32_t b = (uint32_t)rd_le(p, 2) << 16; float f; memcpy(&f, &b, 4); return f; }
    case DT_I64: return (float)(int64_t)rd_le(p, 8);
    case DT_I32: return (float)(int32_t)(uint32_t)rd_le(p, 4);
    case DT_I16: return (float)(int16_t)(uint16_t)rd_le(p, 2);
    case DT_I8: return (float)(int8_t)p[0];
    case DT_BOOL: return p[0] ? 1.0f : 0.0f;
    default: return (float)p[0];
  }
}

/* ------------------------------------------------------------------------ */
/* Values the unpickler builds                                              */

enum { V_NONE, V_BOOL, V_INT, V_BIGINT, V_FLOAT, V_STR, V_BYTES, V_LIST, V_TUPLE, V_DICT,
       V_GLOBAL, V_STORAGE, V_TENSOR };
static const char *const kind_name[] = {"None", "bool", "int", "int", "float", "str", "bytes",
                                        "list", "tuple", "dict", "global", "storage", "tensor"};

enum { G_ODICT, G_REBUILD_TENSOR, G_REBUILD_PARAM, G_STORAGE };

typedef struct val val;
struct val {
  int kind;
  int64_t i;                  /* INT, BOOL; GLOBAL: G_*; STORAGE: table index */
  int dtype;                  /* GLOBAL G_STORAGE */
  double f;
  const unsigned char *s;     /* STR, BYTES, BIGINT: into the file */
  size_t slen;
  val **items;                /* LIST, TUPLE; DICT: key, value, key, value ... */
  size_t n, cap;
  /* STORAGE: a view [view_off, view_off + view_len) of the table's storage;
   * TENSOR: storage index plus the view's offset and length */
  size_t view_off, view_len;
  int64_t offset, shape[JEM_TL_MAX_DIM], stride[JEM_TL_MAX_DIM];
  int ndim;
  val *next;                  /* every value, for freeing */
};

typedef struct storage {
  const unsigned char *key;
  size_t keylen;
  int dtype;
  size_t numel;
  const unsigned char *data;  /* NULL until located */
} storage;

typedef struct tl {
  const unsigned char *buf;
  size_t len;
  int legacy;
  val *all;
  size_t nvals, max_vals;
  storage *st;
  size_t nst, stcap;
  unsigned char **owned;      /* inflated zip entries */
  size_t nowned;
  char *err;
  size_t errlen;
} tl;

#define MAX_MEMO ((size_t)1 << 24)
#define MAX_STACK ((size_t)1 << 20)
#define MAX_DEPTH 64
#define MAX_NAME 512

static val *mkval(tl *t, int kind) {
  if (t->nvals >= t->max_vals) return NULL;
  val *v = calloc(1, sizeof *v);
  if (!v) return NULL;
  v->kind = kind;
  v->next = t->all;
  t->all = v;
  t->nvals++;
  return v;
}

static int push_item(val *c, val *x) {
  if (c->n == c->cap) {
    size_t nc = c->cap ? 2 * c->cap : 4;
    val **ni = realloc(c->items, nc * sizeof *ni);
    if (!ni) return -1;
    c->items = ni;
    c->cap = nc;
  }
  c->items[c->n++] = x;
  return 0;
}

static int str_is(const val *v, const char *s) {
  return v && v->kind == V_STR && v->slen == strlen(s) && !memcmp(v->s, s, v->slen);
}

/* A string from the file made safe for a message: at most 60 bytes, no
 * control characters. */
static const char *safe(const unsigned char *s, size_t n, char buf[72]) {
  size_t i = 0;
  for (; i < n && i < 60; i++) buf[i] = (s[i] < 0x20 || s[i] == 0x7f) ? '?' : (char)s[i];
  if (i < n) {
    memcpy(buf + i, "...", 3);
    i += 3;
  }
  buf[i] = 0;
  return buf;
}

/* ------------------------------------------------------------------------ */
/* The restricted unpickler                                                 */

typedef struct up {
  tl *t;
  const char *what;            /* "data.pkl", "the object pickle", ... */
  const unsigned char *p0, *p, *end;
  val **stack;
  size_t sp, scap;
  size_t *marks;
  size_t nmarks, mcap;
  val **memo;
  size_t memocap, nmemo;
  int persid;                  /* persistent ids allowed (the object pickle) */
} up;

static int fail(up *u, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(up *u, int code, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return jem__errf(u->t->err, u->t->errlen, code, "%s, byte %zu of %s: %s",
                   u->t->legacy ? "legacy torch.save file" : "torch.save zip file",
                   (size_t)(u->p - u->p0), u->what, msg);
}

static int push(up *u, val *v) {
  if (!v) return fail(u, JEM_ENOMEM, "out of memory, or more objects than the file has bytes");
  if (u->sp == u->scap) {
    if (u->scap >= MAX_STACK) return fail(u, JEM_ETOOBIG, "the pickle stack exceeds its limit");
    size_t nc = u->scap ? 2 * u->scap : 64;
    val **ns = realloc(u->stack, nc * sizeof *ns);
    if (!ns) return fail(u, JEM_ENOMEM, "out of memory");
    u->stack = ns;
    u->scap = nc;
  }
  u->stack[u->sp++] = v;
  return 0;
}

static int need(up *u, size_t n) {
  return (size_t)(u->end - u->p) >= n ? 0 : fail(u, JEM_EFORMAT, "the pickle ends inside an opcode's argument");
}

static size_t mark_base(up *u) { return u->nmarks ? u->marks[u->nmarks - 1] : 0; }

/* Values above the last MARK become a new list-like value of `kind`. */
static int pop_mark(up *u, size_t *base) {
  if (!u->nmarks) return fail(u, JEM_EFORMAT, "an opcode needs a MARK and there is none");
  *base = u->marks[--u->nmarks];
  return 0;
}

static int memo_put(up *u, uint64_t idx) {
  if (!u->sp) return fail(u, JEM_EFORMAT, "memo store with an empty stack");
  if (idx >= MAX_MEMO || idx > (uint64_t)(u->end - u->p0) + 256)
    return fail(u, JEM_ETOOBIG, "a memo index beyond the pickle's size");
  if (idx >= u->memocap) {
    size_t nc = u->memocap ? u->memocap : 64;
    while (nc <= idx) nc *= 2;
    val **nm = realloc(u->memo, nc * sizeof *nm);
    if (!nm) return fail(u, JEM_ENOMEM, "out of memory");
    memset(nm + u->memocap, 0, (nc - u->memocap) * sizeof *nm);
    u->memo = nm;
    u->memocap = nc;
  }
  if (!u->memo[idx]) u->nmemo++;
  u->memo[idx] = u->stack[u->sp - 1];
  return 0;
}

static int memo_get(up *u, uint64_t idx) {
  if (idx >= u->memocap || !u->memo[idx])
    return fail(u, JEM_EFORMAT, "a memo fetch of an index never stored");
  return push(u, u->memo[idx]);
}

static int find_global(up *u, const unsigned char *mod, size_t ml, const unsigned char *name,
                       size_t nl) {
  static const struct { const char *mod, *name; int g; } allowed[] = {
    {"collections", "OrderedDict", G_ODICT},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAM},
  };
  val *v = NULL;
  for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
    if (ml == strlen(allowed[i].mod) && !memcmp(mod, allowed[i].mod, ml) &&
        nl == strlen(allowed[i].name) && !memcmp(name, allowed[i].name, nl)) {
      if (!(v = mkval(u->t, V_GLOBAL))) return push(u, NULL);
      v->i = allowed[i].g;
    }
  for (int d = 0; !v && d < N_DTYPES; d++)
    if (ml == 5 && !memcmp(mod, "torch", 5) && nl == strlen(dtypes[d].storage) &&
        !memcmp(name, dtypes[d].storage, nl)) {
      if (!(v = mkval(u->t, V_GLOBAL))) return push(u, NULL);
      v->i = G_STORAGE;
      v->dtype = d;
    }
  if (!v) {
    char a[72], b[72];
    return fail(u, JEM_EUNSUPPORTED,
                "refuses the pickle global %s.%s (only OrderedDict, tensor and storage "
                "types are accepted; nothing in the file is executed)",
                safe(mod, ml, a), safe(name, nl, b));
  }
  return push(u, v);
}

/* A storage named by a persistent id: ('storage', type, key, location, numel)
 * in the zip format, plus view metadata (None or (key, offset, size)) in the
 * legacy one. */
static int persistent_load(up *u, val *pid) {
  tl *t = u->t;
  if (!u->persid) return fail(u, JEM_EFORMAT, "a persistent id outside the object pickle");
  if (pid->kind != V_TUPLE || pid->n < 1 || pid->items[0]->kind != V_STR)
    return fail(u, JEM_EFORMAT, "a persistent id that is not a ('storage', ...) tuple");
  if (!str_is(pid->items[0], "storage")) {
    char a[72];
    return fail(u, JEM_EUNSUPPORTED, "refuses the persistent id kind '%s' (only storages)",
                safe(pid->items[0]->s, pid->items[0]->slen, a));
  }
  size_t want = t->legacy ? 6 : 5;
  if (pid->n != want) return fail(u, JEM_EFORMAT, "a storage persistent id with the wrong number of fields");
  val *ty = pid->items[1], *key = pid->items[2], *num = pid->items[4];
  if (ty->kind != V_GLOBAL || ty->i != G_STORAGE || key->kind != V_STR || num->kind != V_INT ||
      num->i < 0 || key->slen == 0 || key->slen > 64)
    return fail(u, JEM_EFORMAT, "a storage persistent id with a bad type, key or size");
  if ((uint64_t)num->i > t->len / dtypes[ty->dtype].size)
    return fail(u, JEM_EFORMAT, "a storage larger than the file");
  size_t idx = 0;
  while (idx < t->nst && !(t->st[idx].keylen == key->slen && !memcmp(t->st[idx].key, key->s, key->slen)))
    idx++;
  if (idx == t->nst) {
    if (t->nst == t->stcap) {
      size_t nc = t->stcap ? 2 * t->stcap : 16;
      storage *ns = realloc(t->st, nc * sizeof *ns);
      if (!ns) return fail(u, JEM_ENOMEM, "out of memory");
      t->st = ns;
      t->stcap = nc;
    }
    t->st[idx] = (storage){key->s, key->slen, ty->dtype, (size_t)num->i, NULL};
    t->nst++;
  } else if (t->st[idx].dtype != ty->dtype || t->st[idx].numel != (size_t)num->i) {
    return fail(u, JEM_EFORMAT, "one storage key with two types or sizes");
  }
  val *s = mkval(t, V_STORAGE);
  if (!s) return push(u, NULL);
  s->i = (int64_t)idx;
  s->view_off = 0;
  s->view_len = (size_t)num->i;
  val *vm = t->legacy ? pid->items[5] : NULL;
  if (vm && vm->kind != V_NONE) {
    if (vm->kind != V_TUPLE || vm->n != 3 || vm->items[1]->kind != V_INT ||
        vm->items[2]->kind != V_INT || vm->items[1]->i < 0 || vm->items[2]->i < 0 ||
        (uint64_t)vm->items[1]->i > (uint64_t)num->i ||
        (uint64_t)vm->items[2]->i > (uint64_t)num->i - (uint64_t)vm->items[1]->i)
      return fail(u, JEM_EFORMAT, "a storage view outside its storage");
    s->view_off = (size_t)vm->items[1]->i;
    s->view_len = (size_t)vm->items[2]->i;
  }
  return push(u, s);
}

/* A tuple of ints into out[] (at most JEM_TL_MAX_DIM, each in [0, 2^40]). */
static int int_tuple(const val *v, int64_t *out, int *n) {
  if (v->kind != V_TUPLE || v->n > JEM_TL_MAX_DIM) return -1;
  for (size_t i = 0; i < v->n; i++) {
    if (v->items[i]->kind != V_INT || v->items[i]->i < 0 || v->items[i]->i > ((int64_t)1 << 40))
      return -1;
    out[i] = v->items[i]->i;
  }
  *n = (int)v->n;
  return 0;
}

/* _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]) */
static int rebuild_tensor(up *u, val *args) {
  if (args->kind != V_TUPLE || (args->n != 6 && args->n != 7))
    return fail(u, JEM_EFORMAT, "_rebuild_tensor_v2 with the wrong arguments");
  val *st = args->items[0], *off = args->items[1];
  val *r = mkval(u->t, V_TENSOR);
  if (!r) return push(u, NULL);
  int ns = 0;
  if (st->kind != V_STORAGE || off->kind != V_INT || off->i < 0 ||
      int_tuple(args->items[2], r->shape, &r->ndim) || int_tuple(args->items[3], r->stride, &ns) ||
      ns != r->ndim)
    return fail(u, JEM_EFORMAT, "_rebuild_tensor_v2 with a bad storage, offset, size or stride");
  /* The last element read, offset + sum (size-1)*stride, must lie in the
   * view; sizes and strides are at most 2^40 and there are at most 8 of
   * them, so the sum stays far below 2^63. */
  uint64_t last = (uint64_t)off->i, numel = 1;
  for (int d = 0; d < r->ndim; d++) {
    if (r->shape[d] == 0) numel = 0;
    else {
      last += (uint64_t)(r->shape[d] - 1) * (uint64_t)r->stride[d];
      if (numel) {
        numel *= (uint64_t)r->shape[d];
        if (numel > u->t->len) return fail(u, JEM_EFORMAT, "a tensor with more elements than the file has bytes");
      }
    }
  }
  if (numel && last >= st->view_len)
    return fail(u, JEM_EFORMAT, "a tensor that reads past the end of its storage");
  r->i = st->i;
  r->view_off = st->view_off;
  r->view_len = st->view_len;
  r->offset = off->i;
  return push(u, r);
}

static int reduce(up *u) {
  if (u->sp < 2 || u->sp - 2 < mark_base(u)) return fail(u, JEM_EFORMAT, "REDUCE needs two values");
  val *args = u->stack[--u->sp], *fn = u->stack[--u->sp];
  if (fn->kind != V_GLOBAL || args->kind != V_TUPLE)
    return fail(u, JEM_EUNSUPPORTED, "REDUCE of a %s is not allowed", kind_name[fn->kind]);
  switch (fn->i) {
    case G_ODICT:
      if (args->n) return fail(u, JEM_EFORMAT, "OrderedDict with arguments");
      return push(u, mkval(u->t, V_DICT));
    case G_REBUILD_TENSOR: return rebuild_tensor(u, args);
    case G_REBUILD_PARAM:
      if (args->n != 3 || args->items[0]->kind != V_TENSOR)
        return fail(u, JEM_EFORMAT, "_rebuild_parameter with the wrong arguments");
      return push(u, args->items[0]);
    default: return fail(u, JEM_EUNSUPPORTED, "a storage class is called, not allowed");
  }
}

static const char *opname(int op) {
  static const struct { int op; const char *name; } names[] = {
    {'I', "INT"}, {'L', "LONG"}, {'S', "STRING"}, {'V', "UNICODE"}, {'F', "FLOAT"},
    {'P', "PERSID"}, {'g', "GET"}, {'p', "PUT"}, {'o', "OBJ"}, {'i', "INST"},
    {0x81, "NEWOBJ"}, {0x92, "NEWOBJ_EX"}, {0x82, "EXT1"}, {0x83, "EXT2"}, {0x84, "EXT4"},
    {0x8b, "LONG4"}, {0x8f, "EMPTY_SET"}, {0x90, "ADDITEMS"}, {0x91, "FROZENSET"},
    {0x96, "BYTEARRAY8"}, {0x97, "NEXT_BUFFER"}, {0x98, "READONLY_BUFFER"}, {'l', "LIST"},
    {'d', "DICT"}, {'c', "GLOBAL"}, {0x93, "STACK_GLOBAL"}, {'R', "REDUCE"}, {'b', "BUILD"},
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (names[i].op == op) return names[i].name;
  return "unknown";
}

/* Runs one pickle from u->p to its STOP; *out gets the result. */
static int unpickle(up *u, val **out) {
  tl *t = u->t;
  int rc;
  for (;;) {
    if (u->p >= u->end) return fail(u, JEM_EFORMAT, "the pickle ends before its STOP opcode");
    int op = *u->p++;
    val *v = NULL;
    size_t base = 0, n;
    switch (op) {
      case 0x80: /* PROTO */
        if ((rc = need(u, 1))) return rc;
        if (*u->p < 2 || *u->p > 5) return fail(u, JEM_EUNSUPPORTED, "pickle protocol outside 2..5");
        u->p++;
        break;
      case 0x95: /* FRAME: a length hint only */
        if ((rc = need(u, 8))) return rc;
        u->p += 8;
        break;
      case '.': /* STOP */
        if (u->sp != 1 || u->nmarks) return fail(u, JEM_EFORMAT, "STOP with %s values left on the stack", u->sp ? "extra" : "no");
        *out = u->stack[0];
        u->sp = 0;
        return 0;
      case '(': /* MARK */
        if (u->nmarks == u->mcap) {
          if (u->mcap >= MAX_STACK) return fail(u, JEM_ETOOBIG, "too many open MARKs");
          size_t nc = u->mcap ? 2 * u->mcap : 16;
          size_t *nm = realloc(u->marks, nc * sizeof *nm);
          if (!nm) return fail(u, JEM_ENOMEM, "out of memory");
          u->marks = nm;
          u->mcap = nc;
        }
        u->marks[u->nmarks++] = u->sp;
        break;
      case 'N': if ((rc = push(u, mkval(t, V_NONE)))) return rc; break;
      case 0x88: case 0x89: /* NEWTRUE, NEWFALSE */
        if (!(v = mkval(t, V_BOOL))) return push(u, NULL);
        v->i = op == 0x88;
        if ((rc = push(u, v))) return rc;
        break;
      case 'J': case 'K': case 'M': { /* BININT, BININT1, BININT2 */
        int w = op == 'J' ? 4 : op == 'K' ? 1 : 2;
        if ((rc = need(u, (size_t)w))) return rc;
        if (!(v = mkval(t, V_INT))) return push(u, NULL);
        uint64_t x = rd_le(u->p, w);
        v->i = w == 4 ? (int64_t)(int32_t)(uint32_t)x : (int64_t)x;
        u->p += w;
        if ((rc = push(u, v))) return rc;
        break;
      }
      case 0x8a: { /* LONG1: little-endian two's complement of n bytes */
        if ((rc = need(u, 1))) return rc;
        n = *u->p++;
        if ((rc = need(u, n))) return rc;
        if (n <= 8) {
          if (!(v = mkval(t, V_INT))) return push(u, NULL);
          uint64_t x = n ? rd_le(u->p, (int)n) : 0;
          if (n && n < 8 && (u->p[n - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * n);
          v->i = (int64_t)x;
        } else {
          if (!(v = mkval(t, V_BIGINT))) return push(u, NULL);
          v->s = u->p;
          v->slen = n;
        }
        u->p += n;
        if ((rc = push(u, v))) return rc;
        break;
      }
      case 'G': { /* BINFLOAT, big-endian */
        if ((rc = need(u, 8))) return rc;
        uint64_t x = 0;
        for (int i = 0; i < 8; i++) x = (x << 8) | u->p[i];
        if (!(v = mkval(t, V_FLOAT))) return push(u, NULL);
        memcpy(&v->f, &x, 8);
        u->p += 8;
        if ((rc = push(u, v))) return rc;
        break;
      }
      case 'X': case 0x8c: case 0x8d: case 'T': case 'U': /* str */
      case 'B': case 'C': case 0x8e: { /* bytes */
        int w = (op == 0x8c || op == 'U' || op == 'C') ? 1 : (op == 0x8d || op == 0x8e) ? 8 : 4;
        if ((rc = need(u, (size_t)w))) return rc;
        uint64_t len = rd_le(u->p, w);
        u->p += w;
        if (len > (uint64_t)(u->end - u->p)) return fail(u, JEM_EFORMAT, "a string longer than the rest of the pickle");
        int is_bytes = op == 'B' || op == 'C' || op == 0x8e;
        if (!(v = mkval(t, is_bytes ? V_BYTES : V_STR))) return push(u, NULL);
        v->s = u->p;
        v->slen = (size_t)len;
        u->p += len;
        if ((rc = push(u, v))) return rc;
        break;
      }
      case ')': if ((rc = push(u, mkval(t, V_TUPLE)))) return rc; break;
      case ']': if ((rc = push(u, mkval(t, V_LIST)))) return rc; break;
      case '}': if ((rc = push(u, mkval(t, V_DICT)))) return rc; break;
      case 0x85: case 0x86: case 0x87: case 't': { /* TUPLE1..3, TUPLE */
        if (op == 't') {
          if ((rc = pop_mark(u, &base))) return rc;
        } else {
          n = (size_t)(op - 0x84);
          if (u->sp < mark_base(u) + n) return fail(u, JEM_EFORMAT, "a TUPLE opcode with too few values");
          base = u->sp - n;
        }
        if (!(v = mkval(t, V_TUPLE))) return push(u, NULL);
        for (size_t i = base; i < u->sp; i++)
          if (push_item(v, u->stack[i])) return push(u, NULL);
        u->sp = base;
        if ((rc = push(u, v))) return rc;
        break;
      }
      case 'a': case 'e': case 's': case 'u': { /* APPEND(S), SETITEM(S) */
        if (op == 'a' || op == 's') {
          n = op == 'a' ? 1 : 2;
          if (u->sp < mark_base(u) + n + 1) return fail(u, JEM_EFORMAT, "APPEND/SETITEM with too few values");
          base = u->sp - n;
        } else {
          if ((rc = pop_mark(u, &base))) return rc;
          if (base == 0 || base - 1 < mark_base(u)) return fail(u, JEM_EFORMAT, "APPENDS/SETITEMS with no container");
        }
        val *c = u->stack[base - 1];
        int dict = op == 's' || op == 'u';
        if (c->kind != (dict ? V_DICT : V_LIST) || (dict && (u->sp - base) % 2))
          return fail(u, JEM_EFORMAT, "%s on a %s", dict ? "SETITEM(S)" : "APPEND(S)", kind_name[c->kind]);
        for (size_t i = base; i < u->sp; i++)
          if (push_item(c, u->stack[i])) return push(u, NULL);
        u->sp = base;
        break;
      }
      case 'q': case 'r': case 0x94: { /* BINPUT, LONG_BINPUT, MEMOIZE */
        uint64_t idx = u->nmemo; /* MEMOIZE: the memo's length, as pickle.py */
        if (op != 0x94) {
          int w = op == 'q' ? 1 : 4;
          if ((rc = need(u, (size_t)w))) return rc;
          idx = rd_le(u->p, w);
          u->p += w;
        }
        if ((rc = memo_put(u, idx))) return rc;
        break;
      }
      case 'h': case 'j': { /* BINGET, LONG_BINGET */
        int w = op == 'h' ? 1 : 4;
        if ((rc = need(u, (size_t)w))) return rc;
        uint64_t idx = rd_le(u->p, w);
        u->p += w;
        if ((rc = memo_get(u, idx))) return rc;
        break;
      }
      case '0': /* POP */
        if (u->sp <= mark_base(u)) {
          if (!u->nmarks) return fail(u, JEM_EFORMAT, "POP on an empty stack");
          u->nmarks--; /* pops the mark, like pickle.py */
        } else {
          u->sp--;
        }
        break;
      case '1': /* POP_MARK */
        if ((rc = pop_mark(u, &base))) return rc;
        u->sp = base;
        break;
      case '2': /* DUP */
        if (u->sp <= mark_base(u)) return fail(u, JEM_EFORMAT, "DUP on an empty stack");
        if ((rc = push(u, u->stack[u->sp - 1]))) return rc;
        break;
      case 'c': { /* GLOBAL "module\nname\n" */
        const unsigned char *m = u->p, *nl1 = memchr(m, '\n', (size_t)(u->end - m));
        const unsigned char *nm = nl1 ? nl1 + 1 : NULL;
        const unsigned char *nl2 = nm ? memchr(nm, '\n', (size_t)(u->end - nm)) : NULL;
        if (!nl2) return fail(u, JEM_EFORMAT, "GLOBAL without its two lines");
        u->p = nl2 + 1;
        if ((rc = find_global(u, m, (size_t)(nl1 - m), nm, (size_t)(nl2 - nm)))) return rc;
        break;
      }
      case 0x93: { /* STACK_GLOBAL */
        if (u->sp < mark_base(u) + 2) return fail(u, JEM_EFORMAT, "STACK_GLOBAL needs two values");
        val *nm = u->stack[--u->sp], *m = u->stack[--u->sp];
        if (m->kind != V_STR || nm->kind != V_STR) return fail(u, JEM_EFORMAT, "STACK_GLOBAL of non-strings");
        if ((rc = find_global(u, m->s, m->slen, nm->s, nm->slen))) return rc;
        break;
      }
      case 'R': if ((rc = reduce(u))) return rc; break;
      case 'b': { /* BUILD: the state of an OrderedDict (its _metadata) is dropped */
        if (u->sp < mark_base(u) + 2) return fail(u, JEM_EFORMAT, "BUILD needs two values");
        val *obj = u->stack[u->sp - 2];
        if (obj->kind != V_DICT && obj->kind != V_TENSOR)
          return fail(u, JEM_EUNSUPPORTED, "BUILD on a %s is not allowed", kind_name[obj->kind]);
        u->sp--;
        break;
      }
      case 'Q': /* BINPERSID */
        if (u->sp <= mark_base(u)) return fail(u, JEM_EFORMAT, "BINPERSID on an empty stack");
        if ((rc = persistent_load(u, u->stack[--u->sp]))) return rc;
        break;
      default: {
        char code[40];
        snprintf(code, sizeof code, "0x%02x", op);
        return fail(u, JEM_EUNSUPPORTED, "refuses pickle opcode %s (%s)", code, opname(op));
      }
    }
  }
}

static void up_free(up *u) {
  free(u->stack);
  free(u->marks);
  free(u->memo);
}

/* Unpickles [*pos, end) of the file; advances *pos past the STOP. */
static int run_pickle(tl *t, const char *what, const unsigned char *p0, size_t *pos, size_t end,
                      int persid, val **out) {
  up u = {.t = t, .what = what, .p0 = p0, .p = p0 + *pos, .end = p0 + end, .persid = persid};
  int rc = unpickle(&u, out);
  *pos = (size_t)(u.p - p0);
  up_free(&u);
  return rc;
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
  o->dtype = dtypes[s->dtype].name;
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
  if ((rc = run_pickle(t, "the magic-number pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_BIGINT || v->slen != 10 || memcmp(v->s, magic, 10))
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "not a torch.save file: the first pickle is not PyTorch's magic number");
  if ((rc = run_pickle(t, "the protocol pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_INT || v->i != 1001)
    return jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "legacy torch.save file: protocol version is not 1001");
  if ((rc = run_pickle(t, "the system-info pickle", t->buf, &pos, t->len, 0, &v))) return rc;
  if (v->kind != V_DICT)
    return jem__errf(t->err, t->errlen, JEM_EFORMAT, "legacy torch.save file: the system info is not a dict");
  for (size_t i = 0; i + 1 < v->n; i += 2)
    if (str_is(v->items[i], "little_endian") && v->items[i + 1]->kind == V_BOOL && !v->items[i + 1]->i)
      return jem__errf(t->err, t->errlen, JEM_EUNSUPPORTED, "legacy torch.save file written on a big-endian machine");
  if ((rc = run_pickle(t, "the object pickle", t->buf, &pos, t->len, 1, root))) return rc;
  val *keys;
  if ((rc = run_pickle(t, "the storage-key pickle", t->buf, &pos, t->len, 0, &keys))) return rc;
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
    uint64_t numel = rd_le(t->buf + pos, 8);
    pos += 8;
    if (numel != s->numel || numel > (t->len - pos) / dtypes[s->dtype].size)
      return jem__errf(t->err, t->errlen, JEM_EFORMAT,
                       "legacy torch.save file: storage %zu has the wrong size or is truncated", i);
    s->data = t->buf + pos;
    pos += (size_t)numel * dtypes[s->dtype].size;
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
  if (lho > t->len || t->len - lho < 30 || rd_le(t->buf + lho, 4) != 0x04034b50)
    return zerr(t, "a local header is missing");
  uint64_t start = lho + 30 + rd_le(t->buf + lho + 26, 2) + rd_le(t->buf + lho + 28, 2);
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
  while (rd_le(b + eocd, 4) != 0x06054b50) {
    if (eocd == stop) return zerr(t, "no end-of-central-directory record (truncated?)");
    eocd--;
  }
  uint64_t count = rd_le(b + eocd + 10, 2), cdsize = rd_le(b + eocd + 12, 4),
           cdoff = rd_le(b + eocd + 16, 4);
  if (count == 0xffff || cdsize == 0xffffffffu || cdoff == 0xffffffffu) {
    if (eocd < 20 || rd_le(b + eocd - 20, 4) != 0x07064b50) return zerr(t, "zip64 locator missing");
    uint64_t z = rd_le(b + eocd - 12, 8);
    if (z > len || len - z < 56 || rd_le(b + z, 4) != 0x06064b50) return zerr(t, "zip64 end record missing");
    count = rd_le(b + z + 32, 8);
    cdsize = rd_le(b + z + 40, 8);
    cdoff = rd_le(b + z + 48, 8);
  }
  if (cdoff > len || cdsize > len - cdoff || count > cdsize / 46) return zerr(t, "bad central directory bounds");
  zentry *ent = calloc(count ? (size_t)count : 1, sizeof *ent);
  if (!ent) return JEM_ENOMEM;
  int rc = 0;
  size_t p = (size_t)cdoff, cdend = (size_t)(cdoff + cdsize);
  for (uint64_t i = 0; i < count && !rc; i++) {
    if (cdend - p < 46 || rd_le(b + p, 4) != 0x02014b50) {
      rc = zerr(t, "a central directory entry is malformed");
      break;
    }
    int flags = (int)rd_le(b + p + 8, 2), method = (int)rd_le(b + p + 10, 2);
    uint32_t crc = (uint32_t)rd_le(b + p + 16, 4);
    uint64_t csize = rd_le(b + p + 20, 4), usize = rd_le(b + p + 24, 4), lho = rd_le(b + p + 42, 4);
    size_t nl = (size_t)rd_le(b + p + 28, 2), xl = (size_t)rd_le(b + p + 30, 2),
           cl = (size_t)rd_le(b + p + 32, 2);
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
      size_t id = (size_t)rd_le(x, 2), sz = (size_t)rd_le(x + 2, 2);
      if ((size_t)(xe - x - 4) < sz) break;
      if (id == 1) {
        const unsigned char *q = x + 4, *qe = q + sz;
        uint64_t *fields[3] = {&usize, &csize, &lho};
        for (int f = 0; f < 3; f++)
          if (*fields[f] == 0xffffffffu) {
            if (qe - q < 8) break;
            *fields[f] = rd_le(q, 8);
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
    else rc = run_pickle(t, "data.pkl", pkl->data, &pos, (size_t)pkl->size, 1, root);
  }
  /* storages: <dir>/data/<key> */
  for (size_t s = 0; s < t->nst && !rc; s++) {
    storage *st = &t->st[s];
    for (uint64_t i = 0; i < count; i++)
      if (ent[i].namelen == dirlen + 6 + st->keylen && !memcmp(ent[i].name, pkl->name, dirlen) &&
          !memcmp(ent[i].name + dirlen, "/data/", 6) &&
          !memcmp(ent[i].name + dirlen + 6, st->key, st->keylen)) {
        if (ent[i].size / dtypes[st->dtype].size < st->numel) {
          char k[72];
          rc = jem__errf(t->err, t->errlen, JEM_EFORMAT, "torch.save zip file: storage '%s' is shorter than its size",
                         safe(st->key, st->keylen, k));
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
