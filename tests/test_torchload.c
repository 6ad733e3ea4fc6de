/* test_torchload.c - the torch.save reader: checkpoints written by PyTorch
 * itself (tests/ref/torch/, tests/ref/make_torch_ckpt.py) in both formats,
 * views and strided tensors, and hostile files built here byte by byte:
 * refused globals and opcodes, sizes past the data, cycles, truncation at
 * every length, corrupt zip entries.  Each must give an error, never a crash
 * (`make asan` runs this too). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <zlib.h>

#include "jem.h"
#include "testutil.h"
#include "torchload.h"

#define REF "tests/ref/torch/"

static jem_tl_file *load_ok(const unsigned char *b, size_t len) {
  jem_tl_file *f = NULL;
  char err[512] = "";
  int rc = jem_torch_load_mem(&f, b, len, err, sizeof err);
  if (rc) fail_msg("load failed: %s", err);
  assert_non_null(f);
  return f;
}

static jem_tl_file *load_file(const char *name) {
  char path[256];
  snprintf(path, sizeof path, REF "%s.pt.gz", name);
  size_t len;
  unsigned char *b = read_gz(path, &len);
  jem_tl_file *f = load_ok(b, len);
  free(b);
  return f;
}

/* Loading must fail with an error that contains want (if not NULL). */
static void load_bad(const unsigned char *b, size_t len, const char *want) {
  unsigned char *copy = malloc(len ? len : 1); /* exact size: ASan sees overreads */
  assert_non_null(copy);
  if (len) memcpy(copy, b, len);
  jem_tl_file *f = (jem_tl_file *)copy;
  char err[512] = "";
  int rc = jem_torch_load_mem(&f, copy, len, err, sizeof err);
  if (rc == 0) fail_msg("a bad file (%zu bytes) loaded; expected '%s'", len, want ? want : "");
  assert_true(rc < 0);
  assert_null(f);
  assert_true(err[0] != 0);
  if (want && !strstr(err, want)) fail_msg("error '%s' does not mention '%s'", err, want);
  free(copy);
}

static const jem_tl_tensor *get(const jem_tl_file *f, const char *name) {
  const jem_tl_tensor *t = jem_torch_find(f, name);
  if (!t) fail_msg("tensor %s not found", name);
  return t;
}

static void same_tensor(const jem_tl_tensor *a, const jem_tl_tensor *b) {
  assert_int_equal(a->ndim, b->ndim);
  for (int d = 0; d < a->ndim; d++) assert_int_equal(a->shape[d], b->shape[d]);
  assert_int_equal(a->numel, b->numel);
  assert_memory_equal(a->data, b->data, a->numel * sizeof(float));
}

/* ------------------------------------------------------------------------ */
/* Files written by PyTorch                                                 */

static void test_zip_and_legacy_agree(void **state) {
  (void)state;
  jem_tl_file *z = load_file("none-zip"), *l = load_file("none-legacy");
  assert_string_equal(z->format, "zip");
  assert_string_equal(l->format, "legacy");
  assert_int_equal(z->n, l->n);
  assert_true(z->n > 20);
  for (int i = 0; i < z->n; i++) same_tensor(&z->t[i], get(l, z->t[i].name));
  const jem_tl_tensor *w = get(z, "model_state_dict/f.conv1.weight");
  assert_string_equal(w->dtype, "float32");
  assert_int_equal(w->ndim, 4);
  assert_int_equal(w->shape[0], 16);
  assert_int_equal(w->shape[1], 3);
  const jem_tl_tensor *rb = get(z, "replay_buffer");
  assert_int_equal(rb->shape[0], 8);
  int nonzero = 0;
  for (size_t i = 0; i < rb->numel; i++) nonzero += rb->data[i] != 0.0f;
  assert_true(nonzero > (int)rb->numel / 2);
  jem_torch_free(z);
  jem_torch_free(l);
}

/* DataParallel prefixes, a view at an offset into a larger storage, a
 * permuted (non-contiguous) tensor, float64 and float16 storages. */
static void test_views_strides_dtypes(void **state) {
  (void)state;
  jem_tl_file *z = load_file("none-zip"), *dp = load_file("dp-legacy"), *b = load_file("bare-zip");
  const char *names[] = {"class_output.bias", "f.conv1.weight", "class_output.weight",
                         "f.conv1.bias", "f.layer3.0.conv2.weight"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    char a[128], c[128];
    snprintf(a, sizeof a, "model_state_dict/%s", names[i]);
    snprintf(c, sizeof c, "state_dict/module.%s", names[i]);
    same_tensor(get(z, a), get(dp, c));
    same_tensor(get(z, a), get(b, names[i]));
  }
  assert_string_equal(get(b, "class_output.bias")->dtype, "float64");
  assert_string_equal(get(b, "f.conv1.bias")->dtype, "float16");
  assert_null(jem_torch_find(dp, "epoch")); /* plain values are not tensors */
  jem_torch_free(z);
  jem_torch_free(dp);
  jem_torch_free(b);
}

static void test_norm_buffers(void **state) {
  (void)state;
  jem_tl_file *bn = load_file("batch-zip"), *act = load_file("act-zip");
  const jem_tl_tensor *nb = get(bn, "model_state_dict/f.bn1.num_batches_tracked");
  assert_string_equal(nb->dtype, "int64");
  assert_int_equal(nb->ndim, 0);
  assert_int_equal(nb->numel, 1);
  assert_true(nb->data[0] == 1234.0f);
  const jem_tl_tensor *in = get(act, "model_state_dict/f.layer2.0.bn1.initialized");
  assert_string_equal(in->dtype, "uint8");
  assert_true(in->data[0] == 1.0f);
  assert_int_equal(get(act, "model_state_dict/f.bn1.loc")->ndim, 4);
  jem_torch_free(bn);
  jem_torch_free(act);
}

/* ------------------------------------------------------------------------ */
/* Hand-built legacy files                                                  */

typedef struct bytes { unsigned char b[1 << 18]; size_t n; } bytes;

static void put(bytes *o, const void *p, size_t n) {
  assert_true(o->n + n <= sizeof o->b);
  memcpy(o->b + o->n, p, n);
  o->n += n;
}
static void op(bytes *o, int c) { unsigned char x = (unsigned char)c; put(o, &x, 1); }
static void str(bytes *o, const char *s) { /* BINUNICODE */
  uint32_t n = (uint32_t)strlen(s);
  unsigned char h[5] = {'X', (unsigned char)n, (unsigned char)(n >> 8), (unsigned char)(n >> 16),
                        (unsigned char)(n >> 24)};
  put(o, h, 5);
  put(o, s, n);
}
static void glob(bytes *o, const char *mod, const char *name) {
  op(o, 'c');
  put(o, mod, strlen(mod));
  op(o, '\n');
  put(o, name, strlen(name));
  op(o, '\n');
}
static void int1(bytes *o, int v) { op(o, 'K'); op(o, v); }
static void int4(bytes *o, int64_t v) {
  op(o, 'J');
  for (int i = 0; i < 4; i++) op(o, (int)((uint64_t)v >> (8 * i)) & 0xff);
}

typedef struct spec {
  const char *global_mod, *global_name; /* the rebuild function */
  const char *storage;                  /* storage class */
  int64_t numel;                        /* storage numel in the persistent id */
  int offset, ndim, size[2], stride[2];
  int stored_numel;                     /* floats actually written */
  int extra_op;                         /* an opcode inserted before STOP (0: none) */
  int repeat;                           /* > 0: "w" is a list of the tensor this often */
} spec;

static const spec GOOD = {"torch._utils", "_rebuild_tensor_v2", "FloatStorage", 4, 0, 2,
                          {2, 2}, {2, 1}, 4, 0, 0};

/* A legacy torch.save file of {"w": tensor} as the spec says. */
static size_t build(const spec *s, bytes *o) {
  static const unsigned char magic[] = {0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9,
                                        0x20, 0x6a, 0xa8, 0x50, 0x19, '.'};
  static const unsigned char proto[] = {0x80, 2, 'M', 0xe9, 0x03, '.'};
  static const unsigned char sysinfo[] = {0x80, 2, '}', '.'};
  o->n = 0;
  put(o, magic, sizeof magic);
  put(o, proto, sizeof proto);
  put(o, sysinfo, sizeof sysinfo);
  op(o, 0x80); op(o, 2);
  op(o, '}');
  str(o, "w");
  if (s->repeat) {
    op(o, ']');
    op(o, '(');
  }
  glob(o, s->global_mod, s->global_name);
  op(o, '(');
  op(o, '(');
  str(o, "storage");
  glob(o, "torch", s->storage);
  str(o, "0");
  str(o, "cpu");
  int4(o, s->numel);
  op(o, 'N');
  op(o, 't');
  op(o, 'Q');
  int1(o, s->offset);
  op(o, '(');
  for (int d = 0; d < s->ndim; d++) int1(o, s->size[d]);
  op(o, 't');
  op(o, '(');
  for (int d = 0; d < s->ndim; d++) int1(o, s->stride[d]);
  op(o, 't');
  op(o, 0x89);
  glob(o, "collections", "OrderedDict");
  op(o, ')');
  op(o, 'R');
  op(o, 't');
  op(o, 'R');
  if (s->repeat) { /* the same tensor again and again, through the memo */
    op(o, 'q');
    op(o, 0);
    for (int i = 1; i < s->repeat; i++) {
      op(o, 'h');
      op(o, 0);
    }
    op(o, 'e');
  }
  op(o, 's');
  if (s->extra_op) op(o, s->extra_op);
  op(o, '.');
  op(o, 0x80); op(o, 2); op(o, ']'); str(o, "0"); op(o, 'a'); op(o, '.');
  int64_t n = s->stored_numel;
  put(o, &n, 8); /* little-endian host */
  for (int i = 0; i < s->stored_numel; i++) {
    float v = (float)(i + 1);
    put(o, &v, 4);
  }
  return o->n;
}

static void test_hand_built(void **state) {
  (void)state;
  bytes o;
  build(&GOOD, &o);
  jem_tl_file *f = load_ok(o.b, o.n);
  assert_int_equal(f->n, 1);
  assert_string_equal(f->t[0].name, "w");
  const float want[4] = {1, 2, 3, 4};
  assert_memory_equal(f->t[0].data, want, sizeof want);
  jem_torch_free(f);

  spec t = GOOD; /* transposed view */
  t.stride[0] = 1;
  t.stride[1] = 2;
  build(&t, &o);
  f = load_ok(o.b, o.n);
  const float wt[4] = {1, 3, 2, 4};
  assert_memory_equal(f->t[0].data, wt, sizeof wt);
  jem_torch_free(f);

  spec v = GOOD; /* 1-d view at offset 1 */
  v.ndim = 1;
  v.offset = 1;
  v.size[0] = 3;
  v.stride[0] = 1;
  build(&v, &o);
  f = load_ok(o.b, o.n);
  const float wv[3] = {2, 3, 4};
  assert_int_equal(f->t[0].numel, 3);
  assert_memory_equal(f->t[0].data, wv, sizeof wv);
  jem_torch_free(f);

  spec d = GOOD; /* a double storage */
  d.storage = "DoubleStorage";
  d.stored_numel = 8; /* 4 doubles' worth of bytes written as 8 floats */
  d.numel = 4;
  build(&d, &o);
  /* the size word says 8 elements, the id 4: refused */
  load_bad(o.b, o.n, "wrong size");
}

static void test_hostile(void **state) {
  (void)state;
  bytes o;
  spec s;

  s = GOOD; s.global_mod = "os"; s.global_name = "system";
  build(&s, &o);
  load_bad(o.b, o.n, "os.system");
  s = GOOD; s.global_mod = "builtins"; s.global_name = "eval";
  build(&s, &o);
  load_bad(o.b, o.n, "builtins.eval");
  s = GOOD; s.storage = "QInt8Storage";
  build(&s, &o);
  load_bad(o.b, o.n, "torch.QInt8Storage");
  s = GOOD; s.extra_op = 0x81;
  build(&s, &o);
  load_bad(o.b, o.n, "NEWOBJ");
  s = GOOD; s.extra_op = 'i';
  build(&s, &o);
  load_bad(o.b, o.n, "INST");
  s = GOOD; s.size[0] = 3; /* reads past the storage */
  build(&s, &o);
  load_bad(o.b, o.n, "past the end");
  s = GOOD; s.offset = 200;
  build(&s, &o);
  load_bad(o.b, o.n, "past the end");
  s = GOOD; s.numel = (int64_t)1 << 30; /* storage claims more than the file */
  build(&s, &o);
  load_bad(o.b, o.n, "larger than the file");
  s = GOOD; s.numel = -5;
  build(&s, &o);
  load_bad(o.b, o.n, NULL);
  s = GOOD; s.stored_numel = 3; /* truncated storage */
  build(&s, &o);
  load_bad(o.b, o.n, NULL);
  s = GOOD; s.ndim = 1; s.size[0] = 100; s.stride[0] = 0; s.numel = 4; /* broadcast view */
  build(&s, &o);
  jem_tl_file *f = load_ok(o.b, o.n);
  assert_int_equal(f->t[0].numel, 100);
  jem_torch_free(f);

  s = GOOD; s.repeat = 3; /* a tensor shared three times is three tensors */
  build(&s, &o);
  f = load_ok(o.b, o.n);
  assert_int_equal(f->n, 3);
  assert_string_equal(f->t[2].name, "w/2");
  jem_torch_free(f);
  s = GOOD; s.repeat = 100000; /* ... but cannot multiply memory past the file's size */
  build(&s, &o);
  load_bad(o.b, o.n, "too often");

  /* every truncation of a good file */
  build(&GOOD, &o);
  for (size_t n = 0; n < o.n; n++) load_bad(o.b, n, NULL);

  /* a list that contains itself, through the memo */
  static const unsigned char hdr[] = {0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20,
                                      0x6a, 0xa8, 0x50, 0x19, '.', 0x80, 2, 'M', 0xe9, 0x03,
                                      '.', 0x80, 2, '}', '.'};
  bytes c = {.n = 0};
  put(&c, hdr, sizeof hdr);
  const unsigned char cyc[] = {0x80, 2, ']', 'q', 0, 'h', 0, 'a', '.', 0x80, 2, ']', '.'};
  put(&c, cyc, sizeof cyc);
  load_bad(c.b, c.n, "refers to itself");
  /* a memo index far beyond the pickle */
  c.n = sizeof hdr;
  const unsigned char memo[] = {0x80, 2, ']', 'r', 0xff, 0xff, 0xff, 0x7f, '.'};
  put(&c, memo, sizeof memo);
  load_bad(c.b, c.n, "memo");
  /* a fetch of a memo slot never stored */
  c.n = sizeof hdr;
  const unsigned char get_[] = {0x80, 2, 'h', 5, '.'};
  put(&c, get_, sizeof get_);
  load_bad(c.b, c.n, "never stored");
  /* a string longer than the pickle */
  c.n = sizeof hdr;
  const unsigned char longs[] = {0x80, 2, 'X', 0xff, 0xff, 0xff, 0xff, 'a', '.'};
  put(&c, longs, sizeof longs);
  load_bad(c.b, c.n, "longer");
  /* deep MARK nesting is bounded by the file's size, not a crash */
  c.n = sizeof hdr;
  op(&c, 0x80); op(&c, 2);
  for (int i = 0; i < 2000; i++) op(&c, '(');
  op(&c, '.');
  load_bad(c.b, c.n, NULL);

  load_bad((const unsigned char *)"", 0, "not a torch.save file");
  load_bad((const unsigned char *)"hello world", 11, "not a torch.save file");
}

/* Truncated and corrupted copies of the real checkpoints. */
static void test_damaged_real_files(void **state) {
  (void)state;
  const char *names[] = {"none-zip", "none-legacy"};
  for (int k = 0; k < 2; k++) {
    char path[256];
    snprintf(path, sizeof path, REF "%s.pt.gz", names[k]);
    size_t len;
    unsigned char *b = read_gz(path, &len);
    for (size_t i = 0; i < 300; i++) {
      size_t n = (size_t)((double)len * (double)i / 300.0);
      load_bad(b, n, NULL);
    }
    for (size_t n = len - 64; n < len; n++) load_bad(b, n, NULL);
    if (k == 0) { /* one flipped byte in the middle: the CRC catches it */
      b[len / 2] ^= 0x5a;
      load_bad(b, len, "CRC");
    }
    free(b);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_zip_and_legacy_agree),
    cmocka_unit_test(test_views_strides_dtypes),
    cmocka_unit_test(test_norm_buffers),
    cmocka_unit_test(test_hand_built),
    cmocka_unit_test(test_hostile),
    cmocka_unit_test(test_damaged_real_files),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
