/* test_data.c - IDX parsing (valid and malformed), gzip/raw loading, padding
 * to model space, and the fixed validation split. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "train.h"

/* Builds an IDX image: magic, dims, payload bytes = (i * 7) & 255. */
static unsigned char *make_idx(int ndim, const int *dims, size_t *len) {
  size_t count = 1;
  for (int i = 0; i < ndim; i++) count *= (size_t)dims[i];
  *len = 4 + 4 * (size_t)ndim + count;
  unsigned char *b = malloc(*len);
  b[0] = 0; b[1] = 0; b[2] = 8; b[3] = (unsigned char)ndim;
  for (int i = 0; i < ndim; i++) {
    b[4 + 4 * i] = (unsigned char)(dims[i] >> 24);
    b[5 + 4 * i] = (unsigned char)(dims[i] >> 16);
    b[6 + 4 * i] = (unsigned char)(dims[i] >> 8);
    b[7 + 4 * i] = (unsigned char)dims[i];
  }
  for (size_t i = 0; i < count; i++) b[4 + 4 * ndim + i] = (unsigned char)(i * 7);
  return b;
}

static void write_file(const char *path, const void *buf, size_t len, int gz) {
  if (gz) {
    gzFile f = gzopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(gzwrite(f, buf, (unsigned)len), (int)len);
    gzclose(f);
  } else {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, len, f), len);
    fclose(f);
  }
}

static void test_parse_valid(void **state) {
  (void)state;
  int dims[3] = {2, 3, 4};
  size_t len;
  unsigned char *b = make_idx(3, dims, &len);
  jem_idx x;
  char err[256];
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), 0);
  assert_int_equal(x.ndim, 3);
  assert_int_equal(x.dims[0], 2);
  assert_int_equal(x.dims[2], 4);
  assert_int_equal(x.count, 24);
  assert_int_equal(x.data[5], 35);
  jem_idx_free(&x);
  assert_null(x.data);
  free(b);
}

static void test_parse_malformed(void **state) {
  (void)state;
  int dims[3] = {2, 3, 4};
  size_t len;
  unsigned char *b = make_idx(3, dims, &len);
  jem_idx x;
  char err[256];
  /* too short for the magic */
  assert_int_equal(jem_idx_parse(b, 3, 0, &x, err, sizeof err), JEM_EFORMAT);
  /* header truncated */
  assert_int_equal(jem_idx_parse(b, 10, 0, &x, err, sizeof err), JEM_EFORMAT);
  assert_non_null(strstr(err, "truncated"));
  /* payload one byte short / one byte long */
  assert_int_equal(jem_idx_parse(b, len - 1, 0, &x, err, sizeof err),
                   JEM_EFORMAT);
  unsigned char *b2 = malloc(len + 1);
  memcpy(b2, b, len);
  b2[len] = 0;
  assert_int_equal(jem_idx_parse(b2, len + 1, 0, &x, err, sizeof err),
                   JEM_EFORMAT);
  free(b2);
  /* bad magic, unsupported dtype, bad ndim, zero dim */
  b[0] = 1;
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), JEM_EFORMAT);
  b[0] = 0;
  b[2] = 0x0D; /* float */
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err),
                   JEM_EUNSUPPORTED);
  assert_non_null(strstr(err, "0x0d"));
  b[2] = 8;
  b[3] = 0;
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), JEM_EFORMAT);
  b[3] = 9;
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), JEM_EFORMAT);
  b[3] = 3;
  b[7] = 0; /* dims[0] = 0 */
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), JEM_EFORMAT);
  /* huge dims must be refused before any allocation */
  b[4] = 0x7f; b[5] = 0xff; b[6] = 0xff; b[7] = 0xff;
  assert_int_equal(jem_idx_parse(b, len, 0, &x, err, sizeof err), JEM_ETOOBIG);
  b[4] = 0; b[5] = 0; b[6] = 0; b[7] = 2;
  /* explicit small limit */
  assert_int_equal(jem_idx_parse(b, len, 10, &x, err, sizeof err),
                   JEM_ETOOBIG);
  assert_int_equal(jem_idx_parse(b, len, 24, &x, err, sizeof err), 0);
  jem_idx_free(&x);
  free(b);
}

static void test_load_gz_raw_truncated(void **state) {
  (void)state;
  int dims[3] = {5, 28, 28};
  size_t len;
  unsigned char *b = make_idx(3, dims, &len);
  char raw[] = "/tmp/jem_test_data_XXXXXX";
  int fd = mkstemp(raw);
  assert_true(fd >= 0);
  close(fd);
  char gz[64];
  snprintf(gz, sizeof gz, "%s.gz", raw);
  jem_idx a, c;
  char err[256];
  write_file(raw, b, len, 0);
  write_file(gz, b, len, 1);
  assert_int_equal(jem_idx_load(raw, 0, &a, err, sizeof err), 0);
  assert_int_equal(jem_idx_load(gz, 0, &c, err, sizeof err), 0);
  assert_int_equal(a.count, 5 * 28 * 28);
  assert_memory_equal(a.data, c.data, a.count);
  jem_idx_free(&a);
  jem_idx_free(&c);
  /* limit smaller than the payload */
  assert_int_equal(jem_idx_load(gz, 100, &a, err, sizeof err), JEM_ETOOBIG);
  /* truncated gzip stream */
  FILE *f = fopen(gz, "rb");
  unsigned char zb[8192];
  size_t zn = fread(zb, 1, sizeof zb, f);
  fclose(f);
  assert_true(zn > 40);
  write_file(gz, zb, zn / 2, 0);
  int rc = jem_idx_load(gz, 0, &a, err, sizeof err);
  assert_true(rc == JEM_EFORMAT);
  assert_non_null(strstr(err, gz));
  /* missing file */
  assert_int_equal(jem_idx_load("/nonexistent/x.gz", 0, &a, err, sizeof err),
                   JEM_EIO);
  assert_non_null(strstr(err, "/nonexistent/x.gz"));
  unlink(raw);
  unlink(gz);
  free(b);
}

static void test_dataset_padding_and_layouts(void **state) {
  (void)state;
  char err[256];
  /* [N,H,W] 2 images of 2x2 into 4x4 */
  int d3[3] = {2, 2, 2};
  size_t len;
  unsigned char *b = make_idx(3, d3, &len);
  jem_idx im;
  assert_int_equal(jem_idx_parse(b, len, 0, &im, err, sizeof err), 0);
  im.data[0] = 255; im.data[1] = 0; im.data[2] = 51; im.data[3] = 102;
  int l1[1] = {2};
  size_t llen;
  unsigned char *lb = make_idx(1, l1, &llen);
  lb[8] = 3; lb[9] = 1;
  jem_idx lab;
  assert_int_equal(jem_idx_parse(lb, llen, 0, &lab, err, sizeof err), 0);
  jem_dataset ds;
  assert_int_equal(jem_dataset_from_idx(&ds, &im, &lab, 4, 0, err, sizeof err),
                   0);
  assert_int_equal(ds.n, 2);
  assert_int_equal(ds.c, 1);
  assert_int_equal(ds.s, 4);
  assert_int_equal(ds.num_classes, 4);
  assert_int_equal(ds.y[0], 3);
  assert_float_equal(ds.x[0], -1.0f, 1e-7);          /* padding */
  assert_float_equal(ds.x[5], 1.0f, 1e-6);           /* 255 at (1,1) */
  assert_float_equal(ds.x[6], -1.0f, 1e-6);          /* 0 at (1,2) */
  assert_float_equal(ds.x[9], 51 * 2.0f / 255 - 1, 1e-6);
  assert_float_equal(ds.x[15], -1.0f, 1e-7);
  jem_dataset_free(&ds);
  /* uneven padding and too large images are refused */
  assert_int_equal(jem_dataset_from_idx(&ds, &im, &lab, 5, 0, err, sizeof err),
                   JEM_ESHAPE);
  assert_int_equal(jem_dataset_from_idx(&ds, &im, &lab, 1, 0, err, sizeof err),
                   JEM_ESHAPE);
  /* label count mismatch */
  lab.dims[0] = 3;
  assert_int_equal(jem_dataset_from_idx(&ds, &im, &lab, 4, 0, err, sizeof err),
                   JEM_ESHAPE);
  assert_non_null(strstr(err, "labels"));
  lab.dims[0] = 2;
  /* max_items */
  assert_int_equal(jem_dataset_from_idx(&ds, &im, NULL, 2, 1, err, sizeof err),
                   0);
  assert_int_equal(ds.n, 1);
  assert_null(ds.y);
  jem_dataset_free(&ds);
  jem_idx_free(&im);
  free(b);

  /* [N,H,W,C] with C=3 vs [N,C,H,W] with C=3 hold the same pixels */
  int dhwc[4] = {1, 2, 2, 3}, dchw[4] = {1, 3, 2, 2};
  unsigned char *bh = make_idx(4, dhwc, &len);
  unsigned char *bc = make_idx(4, dchw, &len);
  jem_idx ih, ic;
  assert_int_equal(jem_idx_parse(bh, len, 0, &ih, err, sizeof err), 0);
  assert_int_equal(jem_idx_parse(bc, len, 0, &ic, err, sizeof err), 0);
  for (int ch = 0; ch < 3; ch++)
    for (int p = 0; p < 4; p++) {
      unsigned char v = (unsigned char)(10 * ch + p);
      ih.data[p * 3 + ch] = v;
      ic.data[ch * 4 + p] = v;
    }
  jem_dataset a, c;
  assert_int_equal(jem_dataset_from_idx(&a, &ih, NULL, 2, 0, err, sizeof err),
                   0);
  assert_int_equal(jem_dataset_from_idx(&c, &ic, NULL, 2, 0, err, sizeof err),
                   0);
  assert_int_equal(a.c, 3);
  assert_memory_equal(a.x, c.x, 12 * sizeof(float));
  jem_dataset_free(&a);
  jem_dataset_free(&c);
  /* [N,5,2,2] is neither layout */
  ic.dims[1] = 5;
  assert_int_equal(jem_dataset_from_idx(&c, &ic, NULL, 2, 0, err, sizeof err),
                   JEM_ESHAPE);
  /* labels with 2 dims */
  assert_int_equal(jem_dataset_from_idx(&c, &ih, &ih, 2, 0, err, sizeof err),
                   JEM_ESHAPE);
  jem_idx_free(&ih);
  jem_idx_free(&ic);
  jem_idx_free(&lab);
  free(bh);
  free(bc);
  free(lb);
}

static void test_split_deterministic(void **state) {
  (void)state;
  char err[256];
  int d3[3] = {100, 2, 2}, d1[1] = {100};
  size_t len, llen;
  unsigned char *b = make_idx(3, d3, &len), *lb = make_idx(1, d1, &llen);
  for (int i = 0; i < 100; i++) lb[8 + i] = (unsigned char)(i % 10);
  jem_idx im, lab;
  assert_int_equal(jem_idx_parse(b, len, 0, &im, err, sizeof err), 0);
  assert_int_equal(jem_idx_parse(lb, llen, 0, &lab, err, sizeof err), 0);
  jem_dataset all, t1, v1, t2, v2, v3;
  assert_int_equal(jem_dataset_from_idx(&all, &im, &lab, 2, 0, err, sizeof err),
                   0);
  assert_int_equal(jem_dataset_split(&all, 20, 1234, &t1, &v1, err, sizeof err),
                   0);
  assert_int_equal(jem_dataset_split(&all, 20, 1234, &t2, &v2, err, sizeof err),
                   0);
  assert_int_equal(jem_dataset_split(&all, 20, 99, NULL, &v3, err, sizeof err),
                   0);
  assert_int_equal(t1.n, 80);
  assert_int_equal(v1.n, 20);
  assert_memory_equal(v1.index, v2.index, 20 * sizeof(int));
  assert_memory_equal(t1.x, t2.x, 80 * 4 * sizeof(float));
  assert_memory_not_equal(v1.index, v3.index, 20 * sizeof(int));
  /* disjoint, covering, ascending, images and labels follow the index */
  int seen[100] = {0};
  for (int i = 0; i < 80; i++) seen[t1.index[i]]++;
  for (int i = 0; i < 20; i++) seen[v1.index[i]]++;
  for (int i = 0; i < 100; i++) assert_int_equal(seen[i], 1);
  for (int i = 1; i < 20; i++) assert_true(v1.index[i] > v1.index[i - 1]);
  for (int i = 0; i < 20; i++) {
    assert_int_equal(v1.y[i], v1.index[i] % 10);
    assert_memory_equal(v1.x + i * 4, all.x + v1.index[i] * 4,
                        4 * sizeof(float));
  }
  jem_dataset_free(&t2); jem_dataset_free(&v2); jem_dataset_free(&v3);
  jem_dataset_free(&v1);
  jem_dataset_free(&t1);
  assert_int_equal(jem_dataset_split(&all, 0, 1, &t1, NULL, err, sizeof err),
                   JEM_EINVAL);
  assert_int_equal(jem_dataset_split(&all, 100, 1, &t1, NULL, err, sizeof err),
                   JEM_EINVAL);
  jem_dataset_free(&all);
  jem_idx_free(&im);
  jem_idx_free(&lab);
  free(b);
  free(lb);
}

/* The real Fashion-MNIST files (skipped when the package is missing): only
 * the cheap test set plus a check of the split's sizes on the train set. */
/* CIFAR-10 binary records: label byte, then the R, G, B planes. */
static void test_cifar10(void **state) {
  (void)state;
  enum { REC = 3073 };
  static unsigned char a[2 * REC], b[REC];
  for (int r = 0; r < 2; r++) {
    a[r * REC] = (unsigned char)(r ? 9 : 3);
    for (int k = 0; k < 3072; k++) a[r * REC + 1 + k] = (unsigned char)((k / 1024) * 100 + r);
  }
  b[0] = 0;
  memset(b + 1, 255, 3072);
  const unsigned char *bufs[2] = {a, b};
  size_t lens[2] = {sizeof a, sizeof b};
  jem_dataset d;
  char err[256];
  assert_int_equal(jem_cifar10_parse(&d, bufs, lens, 2, err, sizeof err), 0);
  assert_int_equal(d.n, 3);
  assert_int_equal(d.c, 3);
  assert_int_equal(d.s, 32);
  assert_int_equal(d.num_classes, 10);
  assert_int_equal(d.y[0], 3);
  assert_int_equal(d.y[1], 9);
  assert_int_equal(d.y[2], 0);
  /* (p / 255 - 0.5) / 0.5; channel c of image 1 is 100 c + 1 */
  for (int c = 0; c < 3; c++)
    assert_float_equal(d.x[3072 + c * 1024 + 77], (100.0f * c + 1) / 127.5f - 1.0f, 1e-6);
  assert_float_equal(d.x[2 * 3072 + 5], 1.0f, 1e-6);
  jem_dataset_free(&d);

  lens[1] = REC - 1; /* a torn record */
  assert_int_equal(jem_cifar10_parse(&d, bufs, lens, 2, err, sizeof err), JEM_EFORMAT);
  assert_non_null(strstr(err, "multiple of 3073"));
  lens[1] = REC;
  b[0] = 10; /* CIFAR-100's coarse label byte */
  assert_int_equal(jem_cifar10_parse(&d, bufs, lens, 2, err, sizeof err), JEM_EFORMAT);
  assert_non_null(strstr(err, "label 10"));
  assert_null(d.x);
}

static void test_fmnist(void **state) {
  (void)state;
  char err[256];
  jem_dataset te;
  if (access(JEM_FMNIST_DIR_DEFAULT "/t10k-images-idx3-ubyte.gz", R_OK)) {
    skip();
    return;
  }
  assert_int_equal(jem_fmnist_load(NULL, JEM_SPLIT_TEST, &te, err, sizeof err),
                   0);
  assert_int_equal(te.n, 10000);
  assert_int_equal(te.s, 32);
  assert_int_equal(te.num_classes, 10);
  int counts[10] = {0};
  for (int i = 0; i < te.n; i++) counts[te.y[i]]++;
  for (int k = 0; k < 10; k++) assert_int_equal(counts[k], 1000);
  for (int r = 0; r < 32; r++) { /* 2-pixel border is background */
    assert_float_equal(te.x[r * 32 + 0], -1.0f, 0);
    assert_float_equal(te.x[r * 32 + 31], -1.0f, 0);
    assert_float_equal(te.x[1 * 32 + r], -1.0f, 0);
  }
  jem_dataset_free(&te);
  jem_dataset va;
  assert_int_equal(jem_fmnist_load(NULL, JEM_SPLIT_VALID, &va, err, sizeof err),
                   0);
  assert_int_equal(va.n, JEM_VALID_N);
  jem_dataset_free(&va);
  assert_int_equal(jem_fmnist_load("/nonexistent", JEM_SPLIT_TEST, &te, err,
                                   sizeof err), JEM_EIO);
  assert_non_null(strstr(err, "/nonexistent/t10k-images-idx3-ubyte.gz"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_parse_valid),
    cmocka_unit_test(test_cifar10),
    cmocka_unit_test(test_parse_malformed),
    cmocka_unit_test(test_load_gz_raw_truncated),
    cmocka_unit_test(test_dataset_padding_and_layouts),
    cmocka_unit_test(test_split_deterministic),
    cmocka_unit_test(test_fmnist),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
