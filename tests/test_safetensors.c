/* test_safetensors.c - model files: round trip, metadata defaults, F16/BF16,
 * ignored tensors, and many malformed files rejected with a clear message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "jem.h"

/* ------------------------------------------------------------------------ */
/* Fixture: a WRN-10-1 model on 1x32x32, 10 classes, with full metadata and a
 * replay buffer, saved once; its bytes are the base of every mutation. */

static char g_dir[64];
static jem_model *g_model;
static unsigned char *g_file;
static size_t g_len;

static const char *k_meta =
    "{\"arch\": {\"family\": \"wrn\", \"depth\": 10, \"widen\": 1, \"in_channels\": 1,"
    " \"image_size\": 32, \"num_classes\": 10, \"norm\": \"none\", \"leak\": 0.2},"
    " \"name\": \"fmnist-test\","
    " \"classes\": [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\","
    "   \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"],"
    " \"temperature\": 1.25,"
    " \"preprocess\": {\"channels\": 1, \"resize\": [28, 28], \"pad\": 2, \"pad_value\": 0.0,"
    "   \"background\": 0.0, \"range\": [-1, 1], \"invert\": false},"
    " \"ood\": {\"scores\": {\"energy\": {\"quantiles\": [-5, -4, -3.5, -1], \"side\": \"high\"},"
    "   \"grad_norm\": {\"quantiles\": [0.1, 0.2, 0.2, 0.7], \"side\": \"two-sided\"},"
    "   \"max_softmax\": {\"quantiles\": [0.3, 0.9, 1, 1], \"side\": \"unused\"}},"
    "   \"tpr\": 0.9, \"rule\": \"energy high or grad_norm two-sided\"},"
    " \"provenance\": {\"seed\": 7, \"note\": \"unit test\"}}";

#define ARCH_ONLY                                                                    \
  "{\"arch\": {\"family\": \"wrn\", \"depth\": 10, \"widen\": 1, \"in_channels\": 1," \
  " \"image_size\": 32, \"num_classes\": 10, \"norm\": \"none\", \"leak\": 0.2}}"

static int group_setup(void **state) {
  (void)state;
  snprintf(g_dir, sizeof g_dir, "/tmp/jem_st_XXXXXX");
  if (!mkdtemp(g_dir)) return -1;
  jem_arch a = {10, 1, 1, 32, 10, 0.2f, JEM_NORM_NONE};
  char err[256];
  if (jem_model_create(&g_model, &a, err, sizeof err)) {
    fprintf(stderr, "create: %s\n", err);
    return -1;
  }
  jem_model_init_random(g_model, 1234);
  json_error_t je;
  json_t *meta = json_loads(k_meta, JSON_REJECT_DUPLICATES, &je);
  if (!meta) return -1;
  json_decref(g_model->meta);
  g_model->meta = meta;
  if (jem_model_apply_meta(g_model, err, sizeof err)) {
    fprintf(stderr, "apply_meta: %s\n", err);
    return -1;
  }
  g_model->replay_n = 3;
  g_model->replay = malloc(3 * 32 * 32 * sizeof(float));
  for (int i = 0; i < 3 * 32 * 32; i++) g_model->replay[i] = (float)((i * 37) % 200) / 100.0f - 1.0f;
  char path[128];
  snprintf(path, sizeof path, "%s/base.safetensors", g_dir);
  if (jem_model_save(g_model, path, err, sizeof err)) {
    fprintf(stderr, "save: %s\n", err);
    return -1;
  }
  if (jem_read_file(path, 1u << 26, &g_file, &g_len, err, sizeof err)) return -1;
  return 0;
}

static int group_teardown(void **state) {
  (void)state;
  jem_model_free(g_model);
  free(g_file);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  return system(cmd) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------------ */
/* File surgery: split a file into its header JSON and data, and put a file
 * back together from a header and data (offsets as given). */

typedef struct buf {
  unsigned char *p;
  size_t n;
} buf;

static json_t *file_header(const unsigned char *f, size_t len, const unsigned char **data,
                           size_t *dlen) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | f[i];
  json_error_t je;
  json_t *h = json_loadb((const char *)f + 8, (size_t)n, 0, &je);
  assert_non_null(h);
  *data = f + 8 + n;
  *dlen = len - 8 - (size_t)n;
  return h;
}

static buf file_raw(const char *hdr, size_t hl, const unsigned char *data, size_t dlen) {
  buf b;
  b.n = 8 + hl + dlen;
  b.p = malloc(b.n ? b.n : 1);
  for (int i = 0; i < 8; i++) b.p[i] = (unsigned char)((uint64_t)hl >> (8 * i));
  memcpy(b.p + 8, hdr, hl);
  if (dlen) memcpy(b.p + 8 + hl, data, dlen);
  return b;
}

static buf file_from(json_t *hdr, const unsigned char *data, size_t dlen) {
  char *s = json_dumps(hdr, JSON_COMPACT);
  buf b = file_raw(s, strlen(s), data, dlen);
  free(s);
  return b;
}

/* Tensors listed in data order, with their bytes, for rebuilding files with
 * recomputed contiguous offsets. */
typedef struct tens {
  char name[64];
  char dtype[8];
  json_t *shape;
  unsigned char *bytes;
  size_t n;
} tens;

typedef struct tlist {
  tens t[64];
  int n;
  char *jem; /* __metadata__["jem"] */
} tlist;

static void tlist_from_base(tlist *L) {
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  memset(L, 0, sizeof *L);
  L->jem = strdup(json_string_value(json_object_get(json_object_get(h, "__metadata__"), "jem")));
  /* saved files are in canonical order with increasing offsets */
  const char *key;
  json_t *v;
  json_object_foreach(h, key, v) {
    if (strcmp(key, "__metadata__") == 0) continue;
    tens *t = &L->t[L->n++];
    snprintf(t->name, sizeof t->name, "%s", key);
    snprintf(t->dtype, sizeof t->dtype, "%s", json_string_value(json_object_get(v, "dtype")));
    t->shape = json_deep_copy(json_object_get(v, "shape"));
    json_t *o = json_object_get(v, "data_offsets");
    size_t b0 = (size_t)json_integer_value(json_array_get(o, 0));
    size_t b1 = (size_t)json_integer_value(json_array_get(o, 1));
    t->n = b1 - b0;
    t->bytes = malloc(t->n ? t->n : 1);
    memcpy(t->bytes, data + b0, t->n);
  }
  json_decref(h);
}

static tens *tl_find(tlist *L, const char *name) {
  for (int i = 0; i < L->n; i++)
    if (strcmp(L->t[i].name, name) == 0) return &L->t[i];
  fail_msg("no tensor %s", name);
  return NULL;
}

static void tl_add(tlist *L, const char *name, const char *dtype, const char *shape,
                   const void *bytes, size_t n) {
  tens *t = &L->t[L->n++];
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
  t->shape = json_loads(shape, 0, NULL);
  t->bytes = malloc(n ? n : 1);
  if (n) memcpy(t->bytes, bytes, n);
  t->n = n;
}

static json_t *tl_header(const tlist *L, unsigned char **data, size_t *dlen) {
  json_t *h = json_object();
  if (L->jem) json_object_set_new(h, "__metadata__", json_pack("{s:s}", "jem", L->jem));
  size_t off = 0;
  for (int i = 0; i < L->n; i++) off += L->t[i].n;
  *data = malloc(off ? off : 1);
  *dlen = off;
  off = 0;
  for (int i = 0; i < L->n; i++) {
    const tens *t = &L->t[i];
    json_object_set_new(h, t->name,
                        json_pack("{s:s,s:O,s:[I,I]}", "dtype", t->dtype, "shape", t->shape,
                                  "data_offsets", (json_int_t)off, (json_int_t)(off + t->n)));
    memcpy(*data + off, t->bytes, t->n);
    off += t->n;
  }
  return h;
}

static buf tl_file(const tlist *L) {
  unsigned char *data;
  size_t dlen;
  json_t *h = tl_header(L, &data, &dlen);
  buf b = file_from(h, data, dlen);
  json_decref(h);
  free(data);
  return b;
}

static void tl_free(tlist *L) {
  for (int i = 0; i < L->n; i++) {
    json_decref(L->t[i].shape);
    free(L->t[i].bytes);
  }
  free(L->jem);
}

/* ------------------------------------------------------------------------ */
/* Expectations                                                             */

static void expect_fail_buf(const void *p, size_t n, const char *fragment, int line) {
  jem_model *m = (jem_model *)0x1;
  char err[512] = "";
  int rc = jem_model_load_mem(&m, p, n, "x", err, sizeof err);
  if (rc == 0) {
    jem_model_free(m);
    fail_msg("line %d: loaded, expected an error containing \"%s\"", line, fragment);
  }
  assert_true(rc < 0);
  assert_null(m);
  if (!strstr(err, fragment))
    fail_msg("line %d: error \"%s\" lacks \"%s\"", line, err, fragment);
}
#define EXPECT_FAIL(b, frag)                             \
  do {                                                   \
    buf b_ = (b);                                        \
    expect_fail_buf(b_.p, b_.n, (frag), __LINE__);       \
    free(b_.p);                                          \
  } while (0)

static jem_model *load_ok(const void *p, size_t n) {
  jem_model *m = NULL;
  char err[512] = "";
  int rc = jem_model_load_mem(&m, p, n, "dflt", err, sizeof err);
  if (rc) fail_msg("load failed: %s", err);
  return m;
}

/* Base file with __metadata__["jem"] replaced. */
static buf with_jem(const char *jem) {
  tlist L;
  tlist_from_base(&L);
  free(L.jem);
  L.jem = jem ? strdup(jem) : NULL;
  buf b = tl_file(&L);
  tl_free(&L);
  return b;
}

/* Base file with the metadata's key `key` set to the JSON `value` (or deleted
 * when value is NULL). */
static buf with_meta_key(const char *key, const char *value) {
  json_t *m = json_loads(k_meta, 0, NULL);
  if (value) json_object_set_new(m, key, json_loads(value, JSON_DECODE_ANY, NULL));
  else json_object_del(m, key);
  char *s = json_dumps(m, JSON_COMPACT);
  json_decref(m);
  buf b = with_jem(s);
  free(s);
  return b;
}

static buf with_arch_key(const char *key, const char *value) {
  json_t *m = json_loads(k_meta, 0, NULL);
  json_t *a = json_object_get(m, "arch");
  if (value) json_object_set_new(a, key, json_loads(value, JSON_DECODE_ANY, NULL));
  else json_object_del(a, key);
  char *s = json_dumps(m, JSON_COMPACT);
  json_decref(m);
  buf b = with_jem(s);
  free(s);
  return b;
}

/* Base file with the header entry of tensor `name` changed: key set to the
 * JSON value (offsets kept as they are). */
static buf with_entry(const char *name, const char *key, const char *value) {
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  json_t *e = json_object_get(h, name);
  assert_non_null(e);
  json_object_set_new(e, key, json_loads(value, JSON_DECODE_ANY, NULL));
  buf b = file_from(h, data, dlen);
  json_decref(h);
  return b;
}

/* ------------------------------------------------------------------------ */
/* Valid files                                                              */

static void assert_same_model(const jem_model *a, const jem_model *b) {
  assert_int_equal(a->n_params, b->n_params);
  assert_int_equal(a->n_weights, b->n_weights);
  assert_memory_equal(a->weights, b->weights, a->n_weights * sizeof(float));
  assert_memory_equal(&a->arch, &b->arch, sizeof a->arch);
  assert_string_equal(a->name, b->name);
  for (int i = 0; i < a->arch.num_classes; i++) assert_string_equal(a->classes[i], b->classes[i]);
  assert_true(a->temperature == b->temperature);
  assert_memory_equal(&a->pre, &b->pre, sizeof a->pre);
  assert_int_equal(a->ood.present, b->ood.present);
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    assert_int_equal(a->ood.nq[s], b->ood.nq[s]);
    assert_int_equal(a->ood.side[s], b->ood.side[s]);
    assert_memory_equal(a->ood.q[s], b->ood.q[s], (size_t)a->ood.nq[s] * sizeof(float));
  }
  assert_true(a->ood.default_tpr == b->ood.default_tpr);
  assert_string_equal(a->ood.rule, b->ood.rule);
  assert_true(json_equal(a->meta, b->meta));
  assert_int_equal(a->replay_n, b->replay_n);
  if (a->replay_n)
    assert_memory_equal(a->replay, b->replay, (size_t)a->replay_n * 32 * 32 * sizeof(float));
}

static void test_round_trip(void **state) {
  (void)state;
  jem_model *m = load_ok(g_file, g_len);
  assert_same_model(g_model, m);
  assert_string_equal(m->name, "fmnist-test");
  assert_string_equal(m->classes[9], "Ankle boot");
  assert_true(m->temperature == 1.25f);
  assert_int_equal(m->pre.resize_w, 28);
  assert_int_equal(m->pre.pad, 2);
  assert_int_equal(m->ood.present, 1);
  assert_int_equal(m->ood.side[JEM_SCORE_ENERGY], 1);
  assert_int_equal(m->ood.side[JEM_SCORE_GRAD_NORM], 2);
  assert_int_equal(m->ood.side[JEM_SCORE_MAX_SOFTMAX], 0);
  assert_true(m->ood.default_tpr == 0.9f);
  assert_non_null(jem_model_param(m, "f.layer3.0.shortcut.0.weight"));
  assert_null(jem_model_param(m, "f.layer1.0.shortcut.0.weight"));

  /* saving the loaded model gives the same bytes; loading from a path works */
  char path[128], err[256];
  snprintf(path, sizeof path, "%s/again.safetensors", g_dir);
  assert_int_equal(jem_model_save(m, path, err, sizeof err), 0);
  unsigned char *f2;
  size_t n2;
  assert_int_equal(jem_read_file(path, 1u << 26, &f2, &n2, err, sizeof err), 0);
  assert_int_equal(n2, g_len);
  assert_memory_equal(f2, g_file, g_len);
  free(f2);
  struct stat st;
  char tmp[140];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  assert_int_equal(stat(tmp, &st), -1); /* renamed away */
  jem_model *m2 = NULL;
  assert_int_equal(jem_model_load(&m2, path, err, sizeof err), 0);
  assert_same_model(m, m2);
  jem_model_free(m2);
  jem_model_free(m);
}

static void test_header_layout(void **state) {
  (void)state;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | g_file[i];
  assert_int_equal(n % 8, 0);           /* data starts 8-aligned */
  assert_int_equal(g_file[8], '{');
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  /* canonical order: conv1 first, class_output then replay last */
  const char *first = NULL, *last = NULL;
  const char *key;
  json_t *v;
  json_object_foreach(h, key, v) {
    if (strcmp(key, "__metadata__") == 0) continue;
    if (!first) first = key;
    last = key;
    assert_string_equal(json_string_value(json_object_get(v, "dtype")), "F32");
  }
  assert_string_equal(first, "f.conv1.weight");
  assert_string_equal(last, "replay_buffer");
  json_decref(h);
}

static void test_defaults_when_only_arch(void **state) {
  (void)state;
  buf b = with_jem(ARCH_ONLY);
  jem_model *m = load_ok(b.p, b.n);
  assert_string_equal(m->name, "dflt");
  assert_string_equal(m->classes[0], "0");
  assert_string_equal(m->classes[9], "9");
  assert_true(m->temperature == 1.0f);
  assert_int_equal(m->pre.channels, 1);
  assert_int_equal(m->pre.resize_w, 32);
  assert_int_equal(m->pre.resize_h, 32);
  assert_int_equal(m->pre.pad, 0);
  assert_true(m->pre.range_lo == -1.0f && m->pre.range_hi == 1.0f);
  assert_int_equal(m->pre.invert, 0);
  assert_int_equal(m->ood.present, 0);
  assert_true(m->arch.leak == 0.2f);
  jem_model_free(m);

  /* default name from the path: basename without extension, sanitised */
  char path[160], err[256];
  snprintf(path, sizeof path, "%s/my model.v1.safetensors", g_dir);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(b.p, 1, b.n, f), b.n);
  fclose(f);
  assert_int_equal(jem_model_load(&m, path, err, sizeof err), 0);
  assert_string_equal(m->name, "my_model.v1");
  jem_model_free(m);
  free(b.p);
}

static void test_create_defaults(void **state) {
  (void)state;
  jem_arch a = {16, 2, 3, 32, 4, 0.2f, JEM_NORM_NONE};
  jem_model *m = NULL;
  char err[256];
  assert_int_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  assert_string_equal(m->name, "model");
  assert_string_equal(m->classes[3], "3");
  assert_int_equal(m->pre.channels, 3);
  json_t *aj = json_object_get(m->meta, "arch");
  assert_non_null(aj);
  assert_int_equal(json_integer_value(json_object_get(aj, "depth")), 16);
  assert_true(json_real_value(json_object_get(aj, "leak")) == 0.2); /* shortest decimal */
  for (size_t i = 0; i < m->n_weights; i++) assert_true(m->weights[i] == 0.0f);
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  /* apply_meta is all-or-nothing */
  json_object_set_new(m->meta, "name", json_string("renamed"));
  json_object_set_new(m->meta, "temperature", json_real(-2));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_string_equal(m->name, "model");
  assert_true(m->temperature == 1.0f);
  json_object_set_new(m->meta, "temperature", json_real(2));
  assert_int_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_string_equal(m->name, "renamed");
  /* a class name with an embedded NUL (possible when built in code) */
  json_t *cl = json_array();
  for (int i = 0; i < 3; i++) json_array_append_new(cl, json_string(i ? "ok" : "x"));
  json_array_append_new(cl, json_stringn("j\0k", 3));
  json_array_set_new(cl, 1, json_string("y"));
  json_object_set_new(m->meta, "classes", cl);
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "classes[3] must be a non-empty string of at most 255 bytes without NUL"));
  json_object_del(m->meta, "classes");
  /* the arch in the metadata must stay the model's */
  json_object_set_new(json_object_get(m->meta, "arch"), "widen", json_integer(1));
  assert_int_not_equal(jem_model_apply_meta(m, err, sizeof err), 0);
  assert_non_null(strstr(err, "arch differs"));
  /* saving refuses invalid metadata and non-finite weights */
  char path[128];
  snprintf(path, sizeof path, "%s/bad.safetensors", g_dir);
  assert_int_not_equal(jem_model_save(m, path, err, sizeof err), 0);
  json_object_set_new(json_object_get(m->meta, "arch"), "widen", json_integer(2));
  m->weights[5] = NAN;
  assert_int_not_equal(jem_model_save(m, path, err, sizeof err), 0);
  assert_non_null(strstr(err, "not finite"));
  m->weights[5] = 0.0f;
  assert_int_equal(jem_model_save(m, path, err, sizeof err), 0);
  jem_model_free(m);
  jem_model_free(NULL);

  a.depth = 11;
  assert_int_not_equal(jem_model_create(&m, &a, err, sizeof err), 0);
  assert_null(m);
}

static void test_ignored_tensors(void **state) {
  (void)state;
  tlist L;
  tlist_from_base(&L);
  float w[640] = {0}, e[1] = {3};
  tl_add(&L, "f.linear.weight", "F32", "[10,64]", w, sizeof w);
  tl_add(&L, "f.linear.bias", "F32", "[10]", w, 40);
  tl_add(&L, "energy_output.weight", "F32", "[1,64]", w, 256);
  tl_add(&L, "energy_output.bias", "F32", "[1]", e, 4);
  buf b = tl_file(&L);
  jem_model *m = load_ok(b.p, b.n);
  assert_memory_equal(m->weights, g_model->weights, g_model->n_weights * sizeof(float));
  jem_model_free(m);
  free(b.p);
  tl_free(&L);
}

static uint16_t f2bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

static void test_f16_bf16_widening(void **state) {
  (void)state;
  tlist L;
  tlist_from_base(&L);
  /* f.conv1.bias has 16 values: as F16 with known bit patterns */
  static const uint16_t h[16] = {0x3c00, 0xc100, 0x3800, 0x0001, 0x7bff, 0x0000, 0x8000,
                                 0x3555, 0x0400, 0x03ff, 0xbc00, 0x4000, 0x4200, 0x5640,
                                 0x2e66, 0xfbff};
  const float want[16] = {1.0f, -2.5f, 0.5f, 0x1p-24f, 65504.0f, 0.0f, -0.0f,
                          0.333251953125f, 0x1p-14f, 0x3ffp-24f, -1.0f, 2.0f, 3.0f, 100.0f,
                          0.0999755859375f, -65504.0f};
  unsigned char hb[32];
  for (int i = 0; i < 16; i++) {
    hb[2 * i] = (unsigned char)h[i];
    hb[2 * i + 1] = (unsigned char)(h[i] >> 8);
  }
  tens *t = tl_find(&L, "f.conv1.bias");
  free(t->bytes);
  t->bytes = malloc(32);
  memcpy(t->bytes, hb, 32);
  t->n = 32;
  strcpy(t->dtype, "F16");
  /* class_output.bias as BF16 */
  const float bfv[10] = {1.5f, -3.0f, 0.15625f, 1e30f, -1e-30f, 7.0f, 0.0f, 256.0f, -0.5f, 2.0f};
  unsigned char bb[20];
  for (int i = 0; i < 10; i++) {
    uint16_t v = f2bf16(bfv[i]);
    bb[2 * i] = (unsigned char)v;
    bb[2 * i + 1] = (unsigned char)(v >> 8);
  }
  t = tl_find(&L, "class_output.bias");
  free(t->bytes);
  t->bytes = malloc(20);
  memcpy(t->bytes, bb, 20);
  t->n = 20;
  strcpy(t->dtype, "BF16");
  buf b = tl_file(&L);
  jem_model *m = load_ok(b.p, b.n);
  const jem_param *p = jem_model_param(m, "f.conv1.bias");
  for (int i = 0; i < 16; i++) {
    if (!(m->weights[p->offset + (size_t)i] == want[i]))
      fail_msg("F16 %d: %g != %g", i, (double)m->weights[p->offset + (size_t)i], (double)want[i]);
  }
  assert_true(signbit(m->weights[p->offset + 6]));
  p = jem_model_param(m, "class_output.bias");
  for (int i = 0; i < 10; i++) {
    uint32_t u;
    memcpy(&u, &bfv[i], 4);
    u &= 0xffff0000u;
    float expect;
    memcpy(&expect, &u, 4);
    assert_true(m->weights[p->offset + (size_t)i] == expect);
  }
  /* other tensors untouched */
  p = jem_model_param(m, "f.layer2.0.conv2.weight");
  assert_memory_equal(m->weights + p->offset, g_model->weights + p->offset, p->numel * 4);
  jem_model_free(m);
  free(b.p);

  /* an F16 infinity is refused */
  t = tl_find(&L, "f.conv1.bias");
  t->bytes[2] = 0x00;
  t->bytes[3] = 0x7c;
  EXPECT_FAIL(tl_file(&L), "tensor 'f.conv1.bias': element 1 is not finite");
  tl_free(&L);
}

static void test_replay_optional(void **state) {
  (void)state;
  tlist L;
  tlist_from_base(&L);
  L.n--; /* drop replay_buffer (last) */
  json_decref(L.t[L.n].shape);
  free(L.t[L.n].bytes);
  buf b = tl_file(&L);
  jem_model *m = load_ok(b.p, b.n);
  assert_int_equal(m->replay_n, 0);
  assert_null(m->replay);
  jem_model_free(m);
  free(b.p);
  /* empty replay buffer is accepted as none */
  tl_add(&L, "replay_buffer", "F32", "[0,1,32,32]", NULL, 0);
  b = tl_file(&L);
  m = load_ok(b.p, b.n);
  assert_int_equal(m->replay_n, 0);
  jem_model_free(m);
  free(b.p);
  tl_free(&L);
}

/* ------------------------------------------------------------------------ */
/* Malformed files                                                          */

static void test_bad_framing(void **state) {
  (void)state;
  unsigned char small[7] = {1, 0, 0, 0, 0, 0, 0};
  expect_fail_buf(small, sizeof small, "too short", __LINE__);
  expect_fail_buf(small, 0, "too short", __LINE__);
  /* truncated: the last tensor runs past the end */
  expect_fail_buf(g_file, g_len - 100, "run past the end of the data", __LINE__);
  /* truncated into the header */
  expect_fail_buf(g_file, 64, "runs past the end of the file", __LINE__);

  unsigned char *c = malloc(g_len);
  memcpy(c, g_file, g_len);
  /* header length past the end */
  uint64_t n = g_len - 7;
  for (int i = 0; i < 8; i++) c[i] = (unsigned char)(n >> (8 * i));
  expect_fail_buf(c, g_len, "runs past the end of the file", __LINE__);
  /* huge header lengths, larger than the file: not safetensors at all */
  memset(c, 0xff, 8);
  expect_fail_buf(c, g_len, "not a safetensors model file", __LINE__);
  n = (uint64_t)JEM_MAX_HEADER_BYTES + 1;
  for (int i = 0; i < 8; i++) c[i] = (unsigned char)(n >> (8 * i));
  expect_fail_buf(c, g_len, "not a safetensors model file", __LINE__);
  n = 100000001; /* the reference reader's limit + 1 */
  for (int i = 0; i < 8; i++) c[i] = (unsigned char)(n >> (8 * i));
  expect_fail_buf(c, g_len, "not a safetensors model file", __LINE__);
  /* a header over the limit in a file large enough to hold it */
  size_t big_len = (size_t)JEM_MAX_HEADER_BYTES + 64;
  unsigned char *big = calloc(1, big_len);
  assert_non_null(big);
  n = (uint64_t)JEM_MAX_HEADER_BYTES + 1;
  for (int i = 0; i < 8; i++) big[i] = (unsigned char)(n >> (8 * i));
  big[8] = '{';
  expect_fail_buf(big, big_len, "exceeds the limit", __LINE__);
  free(big);
  /* what a newcomer passes by mistake: an image, a README */
  static const unsigned char png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13};
  expect_fail_buf(png, sizeof png, "not a safetensors model file", __LINE__);
  static const char readme[] = "# jemd \xe2\x80\x94 serve a Joint Energy-based Model";
  expect_fail_buf(readme, sizeof readme - 1, "not a safetensors model file", __LINE__);
  n = 0;
  memset(c, 0, 8);
  expect_fail_buf(c, g_len, "too small", __LINE__);
  free(c);

  /* header not JSON, not an object, with NUL, invalid UTF-8, trailing junk */
  EXPECT_FAIL(file_raw("{not json}", 10, NULL, 0), "not valid JSON");
  EXPECT_FAIL(file_raw("[1, 2, 3]", 9, NULL, 0), "does not start with '{'");
  EXPECT_FAIL(file_raw(" {}", 3, NULL, 0), "does not start with '{'");
  EXPECT_FAIL(file_raw("{\"a\\u0000\": 1}", 14, NULL, 0), "not valid JSON");
  EXPECT_FAIL(file_raw("{\"a\": \"\xff\xfe\"}", 11, NULL, 0), "not valid JSON");
  EXPECT_FAIL(file_raw("{} x", 4, NULL, 0), "not valid JSON");
  EXPECT_FAIL(file_raw("{\"a\": 1\0 }", 10, NULL, 0), "header contains a NUL byte");
  EXPECT_FAIL(file_raw("{\"__metadata__\": {\"jem\": \"{}\"}}\0\0\0\0", 36, NULL, 0),
              "header contains a NUL byte");
  /* empty header object: no metadata */
  EXPECT_FAIL(file_raw("{}      ", 8, NULL, 0), "no __metadata__");
  /* 2049-deep nesting is refused by the parser, not the stack */
  static char deep[2 + 3000 * 2 + 10];
  size_t k = 0;
  deep[k++] = '{';
  memcpy(deep + k, "\"a\":", 4);
  k += 4;
  for (int i = 0; i < 3000; i++) deep[k++] = '[';
  for (int i = 0; i < 3000; i++) deep[k++] = ']';
  deep[k++] = '}';
  EXPECT_FAIL(file_raw(deep, k, NULL, 0), "not valid JSON");
}

static void test_duplicate_keys(void **state) {
  (void)state;
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  char *s = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  /* duplicate the first tensor entry by hand: {"__metadata__":...,"f.conv1.weight":{...},... */
  char *p = strstr(s, "\"f.conv1.weight\":");
  assert_non_null(p);
  char *q = strstr(p, "},") + 2;
  size_t elen = (size_t)(q - p);
  size_t sl = strlen(s);
  char *d = malloc(sl + elen + 1);
  memcpy(d, s, (size_t)(q - s));
  memcpy(d + (q - s), p, elen);
  memcpy(d + (q - s) + elen, q, sl - (size_t)(q - s) + 1);
  EXPECT_FAIL(file_raw(d, strlen(d), data, dlen), "duplicate");
  free(d);
  free(s);
  /* duplicate key inside the jem metadata */
  EXPECT_FAIL(with_jem("{\"arch\": 1, \"arch\": 2}"), "duplicate");
}

static void test_bad_offsets(void **state) {
  (void)state;
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  json_t *o = json_object_get(json_object_get(h, "f.conv1.bias"), "data_offsets");
  json_int_t b0 = json_integer_value(json_array_get(o, 0));
  json_int_t b1 = json_integer_value(json_array_get(o, 1));

  /* overlap: f.conv1.bias moved 4 bytes back into f.conv1.weight */
  json_array_set_new(o, 0, json_integer(b0 - 4));
  json_array_set_new(o, 1, json_integer(b1 - 4));
  EXPECT_FAIL(file_from(h, data, dlen), "overlaps");
  /* end before begin */
  json_array_set_new(o, 0, json_integer(b1));
  json_array_set_new(o, 1, json_integer(b0));
  EXPECT_FAIL(file_from(h, data, dlen), "end before they begin");
  /* offsets not integers / negative / wrong arity */
  json_array_set_new(o, 0, json_integer(-8));
  EXPECT_FAIL(file_from(h, data, dlen), "non-negative integers");
  json_array_set_new(o, 0, json_real((double)b0));
  EXPECT_FAIL(file_from(h, data, dlen), "data_offsets must be");
  json_array_set_new(o, 0, json_integer(b0));
  json_array_append_new(o, json_integer(b1));
  EXPECT_FAIL(file_from(h, data, dlen), "data_offsets must be");
  json_array_remove(o, 2);
  /* past the end of the data */
  json_array_set_new(o, 0, json_integer((json_int_t)dlen));
  json_array_set_new(o, 1, json_integer((json_int_t)dlen + 64));
  EXPECT_FAIL(file_from(h, data, dlen), "run past the end of the data");
  json_array_set_new(o, 0, json_integer(b0));
  json_array_set_new(o, 1, json_integer(b1));
  json_decref(h);

  /* gap: an extra 4 bytes before the last tensor */
  tlist L;
  tlist_from_base(&L);
  unsigned char *d2;
  size_t dl2;
  h = tl_header(&L, &d2, &dl2);
  json_t *ro = json_object_get(json_object_get(h, "replay_buffer"), "data_offsets");
  json_int_t r0 = json_integer_value(json_array_get(ro, 0));
  json_int_t r1 = json_integer_value(json_array_get(ro, 1));
  unsigned char *d3 = calloc(dl2 + 4, 1);
  memcpy(d3, d2, (size_t)r0);
  memcpy(d3 + r0 + 4, d2 + r0, (size_t)(r1 - r0));
  json_array_set_new(ro, 0, json_integer(r0 + 4));
  json_array_set_new(ro, 1, json_integer(r1 + 4));
  EXPECT_FAIL(file_from(h, d3, dl2 + 4), "gap of 4 bytes");
  free(d3);
  json_decref(h);
  free(d2);

  /* trailing bytes */
  unsigned char *t = malloc(g_len + 4);
  memcpy(t, g_file, g_len);
  memset(t + g_len, 0, 4);
  expect_fail_buf(t, g_len + 4, "4 trailing bytes", __LINE__);
  free(t);
  tl_free(&L);
}

static void test_bad_entries(void **state) {
  (void)state;
  EXPECT_FAIL(with_entry("f.conv1.weight", "dtype", "\"I32\""),
              "tensor 'f.conv1.weight': dtype I32 is not supported");
  EXPECT_FAIL(with_entry("f.conv1.weight", "dtype", "\"F64\""), "dtype F64 is not supported");
  EXPECT_FAIL(with_entry("f.conv1.weight", "dtype", "3"), "dtype must be a string");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[16,1,3,2]"),
              "tensor 'f.conv1.weight': shape [16,1,3,2] of F32 needs 384 bytes, data_offsets "
              "span 576");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[4294967296,4294967296,16]"),
              "more elements than");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[4611686018427387904]"),
              "more elements than");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[16,-1,3,3]"), "non-negative integer");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[16,1.0,3,3]"), "non-negative integer");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "[1,1,1,1,1,1,1,1,1]"), "rank 9");
  EXPECT_FAIL(with_entry("f.conv1.weight", "shape", "\"16x1x3x3\""), "shape must be an array");
  EXPECT_FAIL(with_entry("f.conv1.weight", "extra", "1"), "unknown key 'extra'");

  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  json_object_del(json_object_get(h, "f.conv1.weight"), "dtype");
  EXPECT_FAIL(file_from(h, data, dlen), "'dtype' is missing");
  json_object_set_new(h, "f.conv1.weight", json_integer(3));
  EXPECT_FAIL(file_from(h, data, dlen), "header entry must be an object");
  json_decref(h);

  /* a misaligned F32 tensor is fine (copied, never cast): F16 conv1.bias
   * (32 bytes) makes everything after it 4-misaligned relative to 8 */
  tlist L;
  tlist_from_base(&L);
  tens *t = tl_find(&L, "f.conv1.weight");
  /* a 2-byte empty-ish BF16 tensor in front shifts all later tensors by 2 */
  tl_add(&L, "energy_output.bias", "BF16", "[1]", "\0\0", 2);
  tens tmp = L.t[L.n - 1];
  memmove(&L.t[1], &L.t[0], sizeof(tens) * (size_t)(L.n - 1));
  L.t[0] = tmp;
  (void)t;
  buf b = tl_file(&L);
  jem_model *m = load_ok(b.p, b.n);
  assert_memory_equal(m->weights, g_model->weights, g_model->n_weights * sizeof(float));
  jem_model_free(m);
  free(b.p);
  /* and a NaN weight is refused */
  t = tl_find(&L, "f.layer2.0.conv1.weight");
  memcpy(t->bytes + 8, "\0\0\xc0\x7f", 4);
  EXPECT_FAIL(tl_file(&L), "tensor 'f.layer2.0.conv1.weight': element 2 is not finite");
  tl_free(&L);
}

static void test_bad_tensor_set(void **state) {
  (void)state;
  tlist L;
  /* missing tensor (renamed to an ignored name so the layout stays valid) */
  tlist_from_base(&L);
  strcpy(tl_find(&L, "class_output.bias")->name, "energy_output.bias");
  EXPECT_FAIL(tl_file(&L), "tensor 'class_output.bias' is missing");
  tl_free(&L);
  /* removed entirely */
  tlist_from_base(&L);
  tens *t = tl_find(&L, "f.layer1.0.conv2.weight");
  json_decref(t->shape);
  free(t->bytes);
  memmove(t, t + 1, sizeof(tens) * (size_t)(L.n - (t - L.t) - 1));
  L.n--;
  EXPECT_FAIL(tl_file(&L), "tensor 'f.layer1.0.conv2.weight' is missing");
  tl_free(&L);
  /* wrong shape with the same element count */
  tlist_from_base(&L);
  t = tl_find(&L, "f.layer1.0.conv1.weight");
  json_decref(t->shape);
  t->shape = json_loads("[16,8,6,3]", 0, NULL);
  EXPECT_FAIL(tl_file(&L),
              "tensor 'f.layer1.0.conv1.weight': shape [16,16,3,3] expected, file has [16,8,6,3]");
  tl_free(&L);
  /* unknown tensor name */
  tlist_from_base(&L);
  strcpy(tl_find(&L, "replay_buffer")->name, "f.layer4.0.conv1.weight");
  EXPECT_FAIL(tl_file(&L), "tensor 'f.layer4.0.conv1.weight' is not part of a JEM WRN-10-1");
  tl_free(&L);
  /* control characters in names are not echoed */
  tlist_from_base(&L);
  strcpy(tl_find(&L, "replay_buffer")->name, "evil\nname");
  EXPECT_FAIL(tl_file(&L), "tensor 'evil?name' is not part");
  tl_free(&L);
  /* replay buffer with the wrong image shape */
  tlist_from_base(&L);
  t = tl_find(&L, "replay_buffer");
  json_decref(t->shape);
  t->shape = json_loads("[3,1,16,64]", 0, NULL);
  EXPECT_FAIL(tl_file(&L), "tensor 'replay_buffer': shape [N,1,32,32] expected, file has [3,1,16,64]");
  tl_free(&L);
  /* metadata arch disagreeing with the tensors */
  json_t *m = json_loads(k_meta, 0, NULL);
  json_object_set_new(json_object_get(m, "arch"), "num_classes", json_integer(5));
  json_object_del(m, "classes");
  char *s = json_dumps(m, JSON_COMPACT);
  EXPECT_FAIL(with_jem(s), "tensor 'class_output.weight': shape [5,64] expected, file has [10,64]");
  free(s);
  json_object_set_new(json_object_get(m, "arch"), "num_classes", json_integer(10));
  json_object_set_new(json_object_get(m, "arch"), "widen", json_integer(2));
  s = json_dumps(m, JSON_COMPACT);
  EXPECT_FAIL(with_jem(s), "tensor 'f.layer1.0.conv1.weight': shape [32,16,3,3] expected");
  free(s);
  /* a large architecture against a tiny file names the first missing tensor */
  json_object_set_new(json_object_get(m, "arch"), "widen", json_integer(64));
  json_object_set_new(json_object_get(m, "arch"), "depth", json_integer(994));
  s = json_dumps(m, JSON_COMPACT);
  EXPECT_FAIL(with_jem(s), "tensor 'f.layer1.0.conv1.weight': shape [1024,16,3,3] expected");
  free(s);
  json_object_set_new(json_object_get(m, "arch"), "widen", json_integer(1));
  s = json_dumps(m, JSON_COMPACT);
  EXPECT_FAIL(with_jem(s), "tensor 'f.layer1.1.conv1.weight' is missing");
  free(s);
  json_decref(m);
}

static void test_bad_metadata(void **state) {
  (void)state;
  /* __metadata__ itself */
  const unsigned char *data;
  size_t dlen;
  json_t *h = file_header(g_file, g_len, &data, &dlen);
  json_t *md = json_object_get(h, "__metadata__");
  json_object_set_new(md, "other", json_integer(1));
  EXPECT_FAIL(file_from(h, data, dlen), "__metadata__['other'] must be a string");
  json_object_set_new(md, "other", json_string("fine"));
  json_object_del(md, "jem");
  EXPECT_FAIL(file_from(h, data, dlen), "no \"jem\" key");
  json_object_set_new(h, "__metadata__", json_string("x"));
  EXPECT_FAIL(file_from(h, data, dlen), "__metadata__ must be an object");
  json_object_del(h, "__metadata__");
  EXPECT_FAIL(file_from(h, data, dlen), "no __metadata__");
  json_decref(h);

  EXPECT_FAIL(with_jem("{\"arch\": "), "__metadata__[\"jem\"] is not valid JSON");
  EXPECT_FAIL(with_jem("[1]"), "must be a JSON object");
  EXPECT_FAIL(with_jem("{\"name\": \"x\"}"), "\"arch\" is missing");
  EXPECT_FAIL(with_jem("{\"arch\": [10]}"), "arch must be an object");

  /* arch values */
  EXPECT_FAIL(with_arch_key("depth", "11"), "arch.depth 11");
  EXPECT_FAIL(with_arch_key("depth", "10.0"), "arch.depth must be a JSON integer");
  EXPECT_FAIL(with_arch_key("depth", "\"10\""), "arch.depth must be a JSON integer");
  EXPECT_FAIL(with_arch_key("depth", "99999999999"), "arch.depth = 99999999999 is out of range");
  EXPECT_FAIL(with_arch_key("family", "\"resnet\""), "arch.family must be \"wrn\"");
  EXPECT_FAIL(with_arch_key("in_channels", "2"), "arch.in_channels 2");
  EXPECT_FAIL(with_arch_key("image_size", "28"), "arch.image_size 28");
  EXPECT_FAIL(with_arch_key("norm", "\"group\""), "arch.norm must be \"none\", \"batch\"");
  EXPECT_FAIL(with_arch_key("norm", "1"), "arch.norm must be");
  {
    buf b = with_arch_key("norm", NULL); /* left out: none */
    jem_model *m = load_ok(b.p, b.n);
    assert_int_equal(m->arch.norm, JEM_NORM_NONE);
    jem_model_free(m);
    free(b.p);
  }
  /* a norm whose tensors the file lacks */
  EXPECT_FAIL(with_arch_key("norm", "\"batch\""), "tensor 'f.layer1.0.bn1.weight' is missing");
  EXPECT_FAIL(with_arch_key("leak", "\"0.2\""), "arch.leak must be a number");
  EXPECT_FAIL(with_arch_key("leak", "1e300"), "arch.leak must be a finite number");
  EXPECT_FAIL(with_arch_key("num_classes", "0"), "arch.num_classes");
  EXPECT_FAIL(with_arch_key("widen", NULL), "arch.widen is missing");
  EXPECT_FAIL(with_arch_key("dropout", "0.0"), "arch: unknown key 'dropout'");

  /* name, classes, temperature */
  EXPECT_FAIL(with_meta_key("name", "\"a/b\""), "name \"a/b\": only");
  EXPECT_FAIL(with_meta_key("name", "\"\""), "name must have 1 to 127");
  EXPECT_FAIL(with_meta_key("name", "7"), "name must be a string");
  EXPECT_FAIL(with_meta_key("classes", "[\"a\", \"b\", \"c\"]"),
              "classes has 3 names, arch.num_classes is 10");
  EXPECT_FAIL(with_meta_key("classes", "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",1]"),
              "classes[9] must be a string");
  EXPECT_FAIL(with_meta_key("classes", "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"a\"]"),
              "classes[9] \"a\" is a duplicate");
  EXPECT_FAIL(with_meta_key("classes", "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"\"]"),
              "classes[9] must be a non-empty string");
  EXPECT_FAIL(with_meta_key("classes", "\"abc\""), "classes must be an array");
  EXPECT_FAIL(with_meta_key("temperature", "-1"), "temperature -1 must be > 0");
  EXPECT_FAIL(with_meta_key("temperature", "0"), "temperature 0 must be > 0");
  EXPECT_FAIL(with_meta_key("temperature", "\"NaN\""), "temperature must be a number");
  EXPECT_FAIL(with_meta_key("temperature", "1e60"), "temperature must be a finite number");

  /* preprocess */
  EXPECT_FAIL(with_meta_key("preprocess", "{\"channels\": 3}"),
              "preprocess.channels 3 must equal arch.in_channels 1");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"resize\": [28, 28]}"),
              "preprocess.resize [28, 28] + 2 * preprocess.pad 0 must equal arch.image_size 32");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"resize\": [28.0, 28]}"),
              "preprocess.resize[0] must be a JSON integer");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"resize\": [0, 0], \"pad\": 16}"),
              "preprocess.pad = 16 is out of range");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"range\": [1, -1]}"),
              "preprocess.range [1, -1] must have low < high");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"range\": [0]}"), "preprocess.range must be an array of 2");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"invert\": 1}"), "preprocess.invert must be true or false");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"pad_value\": 2}"), "preprocess.pad_value 2 must be in [0, 1]");
  EXPECT_FAIL(with_meta_key("preprocess", "{\"mean\": 0.5}"), "preprocess: unknown key 'mean'");
  EXPECT_FAIL(with_meta_key("preprocess", "[]"), "preprocess must be an object");

  /* ood */
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [3, 2, 1], \"side\": \"high\"}}}"),
              "ood.scores.energy.quantiles must be ascending");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [3], \"side\": \"high\"}}}"),
              "ood.scores.energy.quantiles has 1 values, expected 2 to 1001");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, \"2\"], \"side\": \"high\"}}}"),
              "ood.scores.energy.quantiles[1] must be a number");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, 1e39], \"side\": \"high\"}}}"),
              "ood.scores.energy.quantiles[1] must be finite");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, 2], \"side\": \"up\"}}}"),
              "ood.scores.energy.side \"up\" must be one of");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, 2]}}}"),
              "ood.scores.energy.side must be one of");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"entropy\": {\"quantiles\": [1, 2], \"side\": \"high\"}}}"),
              "ood.scores: unknown score 'entropy'");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, 2], \"side\": \"high\"}}, \"tpr\": 1}"),
              "ood.tpr 1 must be in (0, 1)");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {}}"), "ood.scores has no scores");
  EXPECT_FAIL(with_meta_key("ood", "{\"tpr\": 0.9}"), "ood.scores is missing");
  EXPECT_FAIL(with_meta_key("ood", "{\"scores\": {\"energy\": {\"quantiles\": [1, 2], \"side\": \"high\"}}, \"rule\": 5}"),
              "ood.rule must be a string");

  /* a 1001-quantile table is fine, 1002 is not */
  json_t *q = json_array();
  for (int i = 0; i < 1002; i++) json_array_append_new(q, json_real(i * 0.01));
  json_t *o = json_pack("{s:{s:{s:O,s:s}}}", "scores", "grad_norm", "quantiles", q, "side", "low");
  char *s = json_dumps(o, JSON_COMPACT);
  EXPECT_FAIL(with_meta_key("ood", s), "has 1002 values");
  free(s);
  json_array_remove(q, 0);
  json_object_set(json_object_get(json_object_get(o, "scores"), "grad_norm"), "quantiles", q);
  s = json_dumps(o, JSON_COMPACT);
  buf b = with_meta_key("ood", s);
  jem_model *m = load_ok(b.p, b.n);
  assert_int_equal(m->ood.nq[JEM_SCORE_GRAD_NORM], 1001);
  assert_int_equal(m->ood.nq[JEM_SCORE_ENERGY], 0);
  assert_int_equal(m->ood.side[JEM_SCORE_GRAD_NORM], -1);
  assert_true(m->ood.default_tpr == 0.95f);
  assert_non_null(strstr(m->ood.rule, "grad_norm low"));
  jem_model_free(m);
  free(b.p);
  free(s);
  json_decref(o);
  json_decref(q);
}

static void test_read_file_errors(void **state) {
  (void)state;
  unsigned char *p = (unsigned char *)0x1;
  size_t n = 7;
  char err[256];
  char path[128];
  snprintf(path, sizeof path, "%s/does-not-exist.safetensors", g_dir);
  assert_int_equal(jem_read_file(path, 100, &p, &n, err, sizeof err), JEM_EIO);
  assert_non_null(strstr(err, "No such file"));
  assert_null(p);
  assert_int_equal(jem_read_file(g_dir, 100, &p, &n, err, sizeof err), JEM_EIO);
  assert_non_null(strstr(err, "is a directory"));
  snprintf(path, sizeof path, "%s/base.safetensors", g_dir);
  assert_int_equal(jem_read_file(path, 100, &p, &n, err, sizeof err), JEM_ETOOBIG);
  assert_non_null(strstr(err, "too large"));
  jem_model *m = NULL;
  snprintf(path, sizeof path, "%s/none.safetensors", g_dir);
  assert_int_not_equal(jem_model_load(&m, path, err, sizeof err), 0);
  assert_null(m);
  assert_non_null(strstr(err, "none.safetensors"));
  /* empty file */
  snprintf(path, sizeof path, "%s/empty.safetensors", g_dir);
  FILE *f = fopen(path, "wb");
  fclose(f);
  assert_int_equal(jem_read_file(path, 100, &p, &n, err, sizeof err), 0);
  assert_int_equal(n, 0);
  free(p);
  assert_int_not_equal(jem_model_load(&m, path, err, sizeof err), 0);
  assert_non_null(strstr(err, "too short"));
  /* saving into a missing directory fails cleanly */
  snprintf(path, sizeof path, "%s/no/such/dir/x.safetensors", g_dir);
  assert_int_equal(jem_model_save(g_model, path, err, sizeof err), JEM_EIO);
  assert_non_null(strstr(err, "cannot create"));
}

/* Every prefix of a valid file is rejected without a crash (ASan checks the
 * reads); a sample of single-byte corruptions never crashes either. */
static void test_prefixes_and_flips(void **state) {
  (void)state;
  char err[256];
  for (size_t n = 0; n < g_len; n += (n < 4096 ? 1 : 997)) {
    unsigned char *c = malloc(n ? n : 1); /* exact-size copy so ASan sees overreads */
    memcpy(c, g_file, n);
    jem_model *m = NULL;
    assert_int_not_equal(jem_model_load_mem(&m, c, n, "p", err, sizeof err), 0);
    assert_null(m);
    free(c);
  }
  uint64_t hl = 0;
  for (int i = 7; i >= 0; i--) hl = (hl << 8) | g_file[i];
  unsigned char *c = malloc(g_len);
  for (size_t i = 0; i < 8 + hl; i += 3) {
    memcpy(c, g_file, g_len);
    c[i] ^= (unsigned char)(0x5a + i);
    jem_model *m = NULL;
    if (jem_model_load_mem(&m, c, g_len, "p", err, sizeof err) == 0) jem_model_free(m);
  }
  free(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trip),
      cmocka_unit_test(test_header_layout),
      cmocka_unit_test(test_defaults_when_only_arch),
      cmocka_unit_test(test_create_defaults),
      cmocka_unit_test(test_ignored_tensors),
      cmocka_unit_test(test_f16_bf16_widening),
      cmocka_unit_test(test_replay_optional),
      cmocka_unit_test(test_bad_framing),
      cmocka_unit_test(test_duplicate_keys),
      cmocka_unit_test(test_bad_offsets),
      cmocka_unit_test(test_bad_entries),
      cmocka_unit_test(test_bad_tensor_set),
      cmocka_unit_test(test_bad_metadata),
      cmocka_unit_test(test_read_file_errors),
      cmocka_unit_test(test_prefixes_and_flips),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
