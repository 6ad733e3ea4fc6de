/* test_npy.c - NumPy .npy reading (v1/v2/v3, f4/f8, malformed headers and
 * sizes) and writing (round trip, numpy's exact bytes). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jem.h"

/* Builds a .npy: version, header dict text (padded with spaces + '\n' to a
 * multiple of 64 like numpy), then `dlen` data bytes from `d`. */
static unsigned char *mk(int major, const char *dict, const void *d, size_t dlen, size_t *len) {
  size_t pre = major == 1 ? 10 : 12, hl = strlen(dict) + 1;
  size_t total = (pre + hl + 63) / 64 * 64;
  hl = total - pre;
  *len = total + dlen;
  unsigned char *b = malloc(*len + 1);
  memcpy(b, "\x93NUMPY", 6);
  b[6] = (unsigned char)major;
  b[7] = 0;
  if (major == 1) {
    b[8] = (unsigned char)hl;
    b[9] = (unsigned char)(hl >> 8);
  } else {
    b[8] = (unsigned char)hl;
    b[9] = (unsigned char)(hl >> 8);
    b[10] = 0;
    b[11] = 0;
  }
  memset(b + pre, ' ', hl);
  memcpy(b + pre, dict, strlen(dict));
  b[total - 1] = '\n';
  if (dlen) memcpy(b + total, d, dlen);
  return b;
}

static int rd(const unsigned char *b, size_t len, float **x, int *nd, int sh[4], char *err) {
  err[0] = 0;
  return jem_npy_read_mem(b, len, x, nd, sh, err, 256);
}

static void test_read_versions(void **state) {
  (void)state;
  float v[6] = {0, 1.5f, -2, 3.25f, 1e-7f, -1e30f};
  char err[256];
  for (int major = 1; major <= 3; major++) {
    size_t len;
    unsigned char *b = mk(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", v,
                          sizeof v, &len);
    float *x = NULL;
    int nd, sh[4];
    assert_int_equal(rd(b, len, &x, &nd, sh, err), 0);
    assert_int_equal(nd, 2);
    assert_int_equal(sh[0], 2);
    assert_int_equal(sh[1], 3);
    assert_memory_equal(x, v, sizeof v);
    free(x);
    free(b);
  }
  /* other key orders, double quotes, no trailing comma, 1-d and 4-d */
  size_t len;
  unsigned char *b = mk(1, "{\"shape\": (6,), \"fortran_order\": False, \"descr\": \"<f4\"}", v,
                        sizeof v, &len);
  float *x = NULL;
  int nd, sh[4];
  assert_int_equal(rd(b, len, &x, &nd, sh, err), 0);
  assert_int_equal(nd, 1);
  assert_int_equal(sh[0], 6);
  free(x);
  free(b);
  b = mk(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 1, 3), }", v, sizeof v, &len);
  assert_int_equal(rd(b, len, &x, &nd, sh, err), 0);
  assert_int_equal(nd, 4);
  assert_int_equal(sh[3], 3);
  free(x);
  free(b);
}

static void test_read_f8_and_big_endian(void **state) {
  (void)state;
  double d[3] = {0.5, -3.0, 1e10};
  char err[256];
  size_t len;
  unsigned char *b = mk(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", d,
                        sizeof d, &len);
  float *x = NULL;
  int nd, sh[4];
  assert_int_equal(rd(b, len, &x, &nd, sh, err), 0);
  assert_true(x[0] == 0.5f && x[1] == -3.0f && x[2] == 1e10f);
  free(x);
  free(b);
  unsigned char be[8] = {0x3f, 0xc0, 0, 0, 0xc0, 0x20, 0, 0}; /* 1.5, -2.5 */
  b = mk(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", be, 8, &len);
  assert_int_equal(rd(b, len, &x, &nd, sh, err), 0);
  assert_true(x[0] == 1.5f && x[1] == -2.5f);
  free(x);
  free(b);
}

static void expect_bad(const char *dict, size_t dlen, int major, int code, const char *needle) {
  unsigned char data[64] = {0};
  size_t len;
  unsigned char *b = mk(major, dict, data, dlen, &len);
  float *x = (float *)1;
  int nd, sh[4];
  char err[256];
  int rc = rd(b, len, &x, &nd, sh, err);
  if (rc != code || !strstr(err, needle))
    fprintf(stderr, "dict %s: want %s '%s', got %s '%s'\n", dict, jem_err_name(code), needle,
            jem_err_name(rc), err);
  assert_int_equal(rc, code);
  assert_non_null(strstr(err, needle));
  assert_null(x);
  free(b);
}

static void test_read_bad(void **state) {
  (void)state;
  expect_bad("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", 8, 1, JEM_EUNSUPPORTED, "float32");
  expect_bad("{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", 4, 1, JEM_EUNSUPPORTED, "<f2");
  expect_bad("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8, 1, JEM_EUNSUPPORTED, "structured");
  expect_bad("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16, 1, JEM_EUNSUPPORTED, "Fortran");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4, 1, JEM_ESHAPE, "scalar");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }", 4, 1, JEM_ESHAPE, "4 dimensions");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", 0, 1, JEM_ESHAPE, "empty");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 8, 1, JEM_EFORMAT, "need 12");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 16, 2, JEM_EFORMAT, "need 12");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999,), }", 4, 1, JEM_ETOOBIG, "2^31");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2147483647, 2147483647, 2147483647, 2147483647), }",
             4, 1, JEM_ETOOBIG, "overflow");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", 4, 1, JEM_EFORMAT, "non-integer");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': [2], }", 8, 1, JEM_EFORMAT, "tuple");
  expect_bad("{'descr': '<f4', 'fortran_order': False}", 8, 1, JEM_EFORMAT, "lacks");
  expect_bad("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }", 8, 1, JEM_EFORMAT, "True/False");
  expect_bad("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8, 1, JEM_EFORMAT, "unknown key");
  expect_bad("['descr', '<f4']", 8, 1, JEM_EFORMAT, "dictionary");
  expect_bad("{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", 8, 1, JEM_EFORMAT, "malformed");
  expect_bad("{'descr: '<f4', 'fortran_order': False, 'shape': (2,)}", 8, 1, JEM_EFORMAT, "malformed");

  /* preamble problems */
  char err[256];
  float *x = NULL;
  int nd, sh[4];
  assert_int_equal(rd((const unsigned char *)"", 0, &x, &nd, sh, err), JEM_EFORMAT);
  assert_int_equal(rd((const unsigned char *)"\x89PNG\r\n\x1a\n\0\0\0\0", 12, &x, &nd, sh, err), JEM_EFORMAT);
  assert_non_null(strstr(err, "magic"));
  assert_int_equal(rd((const unsigned char *)"\x93NUMPY\x04\x00\x10\x00", 10, &x, &nd, sh, err), JEM_EUNSUPPORTED);
  assert_int_equal(rd((const unsigned char *)"\x93NUMPY\x01\x00\xff\x00{", 11, &x, &nd, sh, err), JEM_EFORMAT);
  assert_non_null(strstr(err, "claims"));
  assert_int_equal(rd((const unsigned char *)"\x93NUMPY\x02\x00\xff\xff\xff\xff{", 13, &x, &nd, sh, err), JEM_EFORMAT);
  /* every prefix of a valid file fails cleanly */
  float v[4] = {1, 2, 3, 4};
  size_t len;
  unsigned char *b = mk(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", v, sizeof v, &len);
  for (size_t cut = 0; cut < len; cut++) {
    x = NULL;
    assert_int_not_equal(rd(b, cut, &x, &nd, sh, err), 0);
    assert_null(x);
  }
  free(b);
}

static void test_encode(void **state) {
  (void)state;
  /* numpy 1.24's np.save bytes for a float32 array of shape (2, 3) */
  float v[6] = {1, 2, 3, 4, 5, 6};
  int shape[2] = {2, 3};
  size_t len;
  unsigned char *b = jem_npy_encode(v, 2, shape, &len);
  assert_non_null(b);
  assert_int_equal(len, 128 + sizeof v);
  static const char hdr[] =
      "\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  assert_memory_equal(b, hdr, sizeof hdr - 1);
  for (size_t i = sizeof hdr - 1; i < 127; i++) assert_int_equal(b[i], ' ');
  assert_int_equal(b[127], '\n');
  /* round trips, 1-d to 4-d */
  int shapes[4][4] = {{5, 0, 0, 0}, {2, 3, 0, 0}, {1, 2, 3, 0}, {2, 1, 4, 4}};
  for (int nd = 1; nd <= 4; nd++) {
    size_t numel = 1;
    for (int i = 0; i < nd; i++) numel *= (size_t)shapes[nd - 1][i];
    float *data = malloc(numel * sizeof(float));
    for (size_t i = 0; i < numel; i++) data[i] = (float)i * 0.5f - 3;
    size_t l;
    unsigned char *e = jem_npy_encode(data, nd, shapes[nd - 1], &l);
    assert_non_null(e);
    assert_int_equal((l - numel * 4) % 64, 0);
    float *x;
    int got_nd, sh[4];
    char err[256];
    assert_int_equal(jem_npy_read_mem(e, l, &x, &got_nd, sh, err, sizeof err), 0);
    assert_int_equal(got_nd, nd);
    for (int i = 0; i < nd; i++) assert_int_equal(sh[i], shapes[nd - 1][i]);
    assert_memory_equal(x, data, numel * sizeof(float));
    free(x);
    free(e);
    free(data);
  }
  assert_null(jem_npy_encode(v, 0, shape, &len));
  assert_null(jem_npy_encode(v, 5, shape, &len));
  free(b);
}

static void test_read_file(void **state) {
  (void)state;
  float v[3] = {7, 8, 9};
  int shape[1] = {3};
  size_t len;
  unsigned char *b = jem_npy_encode(v, 1, shape, &len);
  char path[] = "/tmp/jem_test_npy_XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, b, len), (ssize_t)len);
  close(fd);
  float *x;
  int nd, sh[4];
  char err[256];
  assert_int_equal(jem_npy_read(path, &x, &nd, sh, err, sizeof err), 0);
  assert_true(x[2] == 9);
  free(x);
  /* a truncated file names the path */
  assert_int_equal(truncate(path, (off_t)len - 1), 0);
  assert_int_equal(jem_npy_read(path, &x, &nd, sh, err, sizeof err), JEM_EFORMAT);
  assert_non_null(strstr(err, path));
  unlink(path);
  assert_int_not_equal(jem_npy_read(path, &x, &nd, sh, err, sizeof err), 0);
  free(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_read_versions),
    cmocka_unit_test(test_read_f8_and_big_endian),
    cmocka_unit_test(test_read_bad),
    cmocka_unit_test(test_encode),
    cmocka_unit_test(test_read_file),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
