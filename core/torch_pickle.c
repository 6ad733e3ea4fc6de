/* torch_pickle.c - the restricted unpickler of the torch.save reader: the
 * opcodes of protocols 2 to 5 that plain data needs, a few allowed globals,
 * storages by persistent id; it builds values and never executes anything
 * (core/torchload.h says what is accepted). */
#include "torch_pickle.h"

#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const jem__tl_dtype jem__tl_dtypes[N_DTYPES] = {
  [DT_F32] = {"FloatStorage", "float32", 4},   [DT_F64] = {"DoubleStorage", "float64", 8},
  [DT_F16] = {"HalfStorage", "float16", 2},    [DT_BF16] = {"BFloat16Storage", "bfloat16", 2},
  [DT_I64] = {"LongStorage", "int64", 8},      [DT_I32] = {"IntStorage", "int32", 4},
  [DT_I16] = {"ShortStorage", "int16", 2},     [DT_I8] = {"CharStorage", "int8", 1},
  [DT_U8] = {"ByteStorage", "uint8", 1},       [DT_BOOL] = {"BoolStorage", "bool", 1},
};

static const char *const kind_name[] = {"None", "bool", "int", "int", "float", "str", "bytes",
                                        "list", "tuple", "dict", "global", "storage", "tensor"};

enum { G_ODICT, G_REBUILD_TENSOR, G_REBUILD_PARAM, G_STORAGE };

#define MAX_MEMO ((size_t)1 << 24)
#define MAX_STACK ((size_t)1 << 20)

/* ------------------------------------------------------------------------ */
/* Values                                                                   */

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

int jem__tl_str_is(const val *v, const char *s) {
  return v && v->kind == V_STR && v->slen == strlen(s) && !memcmp(v->s, s, v->slen);
}

const char *jem__tl_safe(const unsigned char *s, size_t n, char buf[72]) {
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
    if (ml == 5 && !memcmp(mod, "torch", 5) && nl == strlen(jem__tl_dtypes[d].storage) &&
        !memcmp(name, jem__tl_dtypes[d].storage, nl)) {
      if (!(v = mkval(u->t, V_GLOBAL))) return push(u, NULL);
      v->i = G_STORAGE;
      v->dtype = d;
    }
  if (!v) {
    char a[72], b[72];
    return fail(u, JEM_EUNSUPPORTED,
                "refuses the pickle global %s.%s (only OrderedDict, tensor and storage "
                "types are accepted; nothing in the file is executed)",
                jem__tl_safe(mod, ml, a), jem__tl_safe(name, nl, b));
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
  if (!jem__tl_str_is(pid->items[0], "storage")) {
    char a[72];
    return fail(u, JEM_EUNSUPPORTED, "refuses the persistent id kind '%s' (only storages)",
                jem__tl_safe(pid->items[0]->s, pid->items[0]->slen, a));
  }
  size_t want = t->legacy ? 6 : 5;
  if (pid->n != want) return fail(u, JEM_EFORMAT, "a storage persistent id with the wrong number of fields");
  val *ty = pid->items[1], *key = pid->items[2], *num = pid->items[4];
  if (ty->kind != V_GLOBAL || ty->i != G_STORAGE || key->kind != V_STR || num->kind != V_INT ||
      num->i < 0 || key->slen == 0 || key->slen > 64)
    return fail(u, JEM_EFORMAT, "a storage persistent id with a bad type, key or size");
  if ((uint64_t)num->i > t->len / jem__tl_dtypes[ty->dtype].size)
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

/* Runs one pickle from u->p to its STOP; *out gets the result.  One case
 * per accepted opcode, kept in one switch so that it reads as the table of
 * what the unpickler accepts (the longer steps are functions above). */
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
        uint64_t x = jem__rd_le(u->p, w);
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
          uint64_t x = n ? jem__rd_le(u->p, (int)n) : 0;
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
        uint64_t len = jem__rd_le(u->p, w);
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
          idx = jem__rd_le(u->p, w);
          u->p += w;
        }
        if ((rc = memo_put(u, idx))) return rc;
        break;
      }
      case 'h': case 'j': { /* BINGET, LONG_BINGET */
        int w = op == 'h' ? 1 : 4;
        if ((rc = need(u, (size_t)w))) return rc;
        uint64_t idx = jem__rd_le(u->p, w);
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

int jem__tl_unpickle(tl *t, const char *what, const unsigned char *p0, size_t *pos,
                     size_t end, int persid, val **out) {
  up u = {.t = t, .what = what, .p0 = p0, .p = p0 + *pos, .end = p0 + end, .persid = persid};
  int rc = unpickle(&u, out);
  *pos = (size_t)(u.p - p0);
  up_free(&u);
  return rc;
}
