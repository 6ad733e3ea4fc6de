/* test_image.c - PNG/JPEG decoding and preprocessing (valid files of every
 * kind, exact pixel values), rejection of malformed and hostile inputs with
 * the right code, and the PNG grid writer round trip. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zlib.h>

#include "jem.h"

#define DATA "tests/data/images/"
#define S 32

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */

static unsigned char *load(const char *name, size_t *len) {
  char path[256], err[256];
  snprintf(path, sizeof path, DATA "%s", name);
  unsigned char *buf = NULL;
  int rc = jem_read_file(path, 1 << 24, &buf, len, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  assert_int_equal(rc, 0);
  return buf;
}

/* Identity geometry for the 32x32 test images: channels c, range [0,1]. */
static jem_preprocess pre_ident(int c, float bg) {
  jem_preprocess p;
  memset(&p, 0, sizeof p);
  p.channels = c;
  p.resize_w = p.resize_h = S;
  p.pad = 0;
  p.pad_value = 0;
  p.background = bg;
  p.range_lo = 0;
  p.range_hi = 1;
  p.invert = 0;
  return p;
}

static int decode(const char *name, const jem_preprocess *p, int size, float *out,
                  char *err, size_t errlen) {
  size_t len;
  unsigned char *b = load(name, &len);
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  int rc = jem_image_to_input(b, len, p, size, &lim, out, err, errlen);
  free(b);
  return rc;
}

static int decode_mem(const void *b, size_t len, char *err, size_t errlen) {
  jem_preprocess p = pre_ident(1, 0);
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  float out[S * S];
  err[0] = 0;
  return jem_image_to_input(b, len, &p, S, &lim, out, err, errlen);
}

#define AT(out, c, y, x) (out)[((size_t)(c) * S + (size_t)(y)) * S + (size_t)(x)]

/* The formulas of make_images.py, as [0,1] doubles. */
static double f_grey(int x, int y) { return (4 * x + 3 * y) / 255.0; }
static double f_rgb(int c, int x, int y) {
  int v = c == 0 ? 8 * x : c == 1 ? 8 * y : 4 * (x + y);
  return v / 255.0;
}
static double f_alpha(int x) { return (8 * x) / 255.0; }
static const unsigned char palette[16][3] = {
#define P(i) {(unsigned char)((i) * 16), (unsigned char)(255 - (i) * 16), (unsigned char)(((i) * 97) % 256)}
  P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7),
  P(8), P(9), P(10), P(11), P(12), P(13), P(14), P(15)
#undef P
};

/* The same double expression as the preprocessing for alpha compositing. */
static float over(double v, double a, double bg) {
  return a == 1.0 ? (float)v : (float)(v * a + bg * (1.0 - a));
}

static void expect_exact_rgb(const float *out, double (*f)(int, int, int), const char *name) {
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) {
        float want = (float)f(c, x, y), got = AT(out, c, y, x);
        if (got != want) {
          fprintf(stderr, "%s: c=%d y=%d x=%d got %.9g want %.9g\n", name, c, y, x, got, want);
          fail();
        }
      }
}

/* ------------------------------------------------------------------------ */
/* valid PNGs: exact values                                                 */

static void test_png_grey8(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  const char *files[] = {"grey8.png", "interlaced_grey.png"};
  for (int k = 0; k < 2; k++) {
    jem_preprocess p = pre_ident(1, 0);
    assert_int_equal(decode(files[k], &p, S, out, err, sizeof err), 0);
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) assert_true(AT(out, 0, y, x) == (float)f_grey(x, y));
    p = pre_ident(3, 0); /* grey replicated to 3 channels */
    assert_int_equal(decode(files[k], &p, S, out, err, sizeof err), 0);
    for (int c = 0; c < 3; c++)
      for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) assert_true(AT(out, c, y, x) == (float)f_grey(x, y));
  }
  /* invert and a [-1,1] range */
  jem_preprocess p = pre_ident(1, 0);
  p.invert = 1;
  p.range_lo = -1;
  p.range_hi = 1;
  assert_int_equal(decode("grey8.png", &p, S, out, err, sizeof err), 0);
  for (int y = 0; y < S; y++)
    for (int x = 0; x < S; x++)
      assert_true(AT(out, 0, y, x) == (float)(-1.0 + 2.0 * (1.0 - f_grey(x, y))));
}

static void test_png_grey_alpha(void **state) {
  (void)state;
  char err[256];
  float out[S * S];
  for (int b = 0; b < 2; b++) {
    jem_preprocess p = pre_ident(1, (float)b);
    assert_int_equal(decode("grey_alpha.png", &p, S, out, err, sizeof err), 0);
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++)
        assert_true(AT(out, 0, y, x) == over(f_grey(x, y), f_alpha(x), b));
  }
  /* grey with a tRNS colour key: only pixel (0,0), value 0, is transparent */
  jem_preprocess p = pre_ident(1, 1.0f);
  assert_int_equal(decode("grey_trns.png", &p, S, out, err, sizeof err), 0);
  assert_true(AT(out, 0, 0, 0) == 1.0f);
  assert_true(AT(out, 0, 0, 1) == (float)f_grey(1, 0));
  assert_true(AT(out, 0, 5, 7) == (float)f_grey(7, 5));
}

static void test_png_rgb(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  const char *files[] = {"rgb.png", "interlaced.png"};
  for (int k = 0; k < 2; k++) {
    jem_preprocess p = pre_ident(3, 0);
    assert_int_equal(decode(files[k], &p, S, out, err, sizeof err), 0);
    expect_exact_rgb(out, f_rgb, files[k]);
  }
  /* RGB -> grey by BT.601 luma */
  jem_preprocess p = pre_ident(1, 0);
  assert_int_equal(decode("rgb.png", &p, S, out, err, sizeof err), 0);
  for (int y = 0; y < S; y++)
    for (int x = 0; x < S; x++) {
      double l = 0.299 * f_rgb(0, x, y) + 0.587 * f_rgb(1, x, y) + 0.114 * f_rgb(2, x, y);
      if (x == 0 && y == 0) l = 0; /* R=G=B=0 is taken as is */
      assert_true(fabsf(AT(out, 0, y, x) - (float)l) <= 1e-6f);
    }
  assert_true(fabsf(AT(out, 0, 3, 5) - (float)((0.299 * 40 + 0.587 * 24 + 0.114 * 32) / 255)) < 1e-6f);
}

static double g_bg;
static double f_rgba(int c, int x, int y) {
  return (double)over(f_rgb(c, x, y), f_alpha(x), g_bg);
}

static void test_png_rgba(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(3, 0.5f);
  g_bg = 0.5;
  assert_int_equal(decode("rgba.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_rgba, "rgba.png");
  /* fully transparent column 0 becomes the background */
  for (int y = 0; y < S; y++) assert_true(AT(out, 1, y, 0) == 0.5f);
}

static double f_rgb16(int c, int x, int y) {
  int v = c == 0 ? 2000 * x : c == 1 ? 2000 * y : 1000 * (x + y);
  return v / 65535.0;
}
static double f_rgba16(int c, int x, int y) {
  return (double)over(f_rgb16(c, x, y), 2000 * x / 65535.0, g_bg);
}

static void test_png_16bit(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(1, 0);
  assert_int_equal(decode("grey16.png", &p, S, out, err, sizeof err), 0);
  for (int y = 0; y < S; y++)
    for (int x = 0; x < S; x++) assert_true(AT(out, 0, y, x) == (float)((2000 * x + 100 * y) / 65535.0));
  p = pre_ident(3, 0);
  assert_int_equal(decode("rgb16.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_rgb16, "rgb16.png");
  g_bg = 1.0;
  p = pre_ident(3, 1.0f);
  assert_int_equal(decode("rgba16.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_rgba16, "rgba16.png");
}

static double f_pal(int c, int x, int y) {
  return palette[x / 8 + 4 * (y / 8)][c] / 255.0;
}
static double f_pal_trns(int c, int x, int y) {
  int i = x / 8 + 4 * (y / 8);
  double a = i == 0 ? 0.0 : i == 1 ? 128 / 255.0 : 1.0;
  return (double)over(palette[i][c] / 255.0, a, g_bg);
}

static void test_png_palette(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(3, 0);
  assert_int_equal(decode("palette.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_pal, "palette.png");
  assert_int_equal(decode("palette_pil.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_pal, "palette_pil.png");
  g_bg = 0.25;
  p = pre_ident(3, 0.25f);
  assert_int_equal(decode("palette_trns.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_pal_trns, "palette_trns.png");
}

/* ------------------------------------------------------------------------ */
/* JPEG (lossy: compared with a tolerance)                                  */

static void jpeg_close(const char *name, int c, double (*f)(int, int, int), double mean_tol,
                       double max_tol) {
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(c, 0);
  int rc = decode(name, &p, S, out, err, sizeof err);
  if (rc) fprintf(stderr, "%s: %s\n", name, err);
  assert_int_equal(rc, 0);
  double sum = 0, mx = 0;
  for (int ch = 0; ch < c; ch++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) {
        double d = fabs(AT(out, ch, y, x) - f(ch, x, y));
        sum += d;
        if (d > mx) mx = d;
      }
  double mean = sum / (c * S * S);
  if (mean > mean_tol || mx > max_tol)
    fprintf(stderr, "%s: mean abs error %.4f, max %.4f\n", name, mean, mx);
  assert_true(mean <= mean_tol);
  assert_true(mx <= max_tol);
}

static double f_grey3(int c, int x, int y) { (void)c; return f_grey(x, y); }

static void test_jpeg(void **state) {
  (void)state;
  jpeg_close("baseline.jpg", 3, f_rgb, 0.01, 0.06);
  jpeg_close("progressive.jpg", 3, f_rgb, 0.01, 0.06);
  jpeg_close("subsampled.jpg", 3, f_rgb, 0.02, 0.12);
  jpeg_close("cmyk.jpg", 3, f_rgb, 0.02, 0.12);
  jpeg_close("grey.jpg", 1, f_grey3, 0.01, 0.06);
  jpeg_close("grey.jpg", 3, f_grey3, 0.01, 0.06);
}

/* ------------------------------------------------------------------------ */
/* resizing                                                                 */

static void test_resize(void **state) {
  (void)state;
  char err[256];
  float out[S * S];
  /* 300x200, left half white: area average to 32x32 splits at column 16 */
  jem_preprocess p = pre_ident(1, 0);
  assert_int_equal(decode("large.png", &p, S, out, err, sizeof err), 0);
  for (int y = 0; y < S; y++)
    for (int x = 0; x < S; x++) assert_true(AT(out, 0, y, x) == (x < 16 ? 1.0f : 0.0f));
  /* to 20x20 + pad 6: column 9 covers source [135,150) -> 1; column 10 [150,165) -> 0 */
  p.resize_w = p.resize_h = 20;
  p.pad = 6;
  p.pad_value = 0.5f;
  assert_int_equal(decode("large.png", &p, S, out, err, sizeof err), 0);
  assert_true(AT(out, 0, 0, 0) == 0.5f);
  assert_true(AT(out, 0, 6, 6) == 1.0f);
  assert_true(AT(out, 0, 10, 6 + 9) == 1.0f);
  assert_true(AT(out, 0, 10, 6 + 10) == 0.0f);
  assert_true(AT(out, 0, 31, 31) == 0.5f);
  /* to 7x7 + pad: column 3 covers [128.57,171.43) -> 21.43/42.86 = 0.5 white */
  p.resize_w = p.resize_h = 7;
  p.pad = 0;
  float small[7 * 7];
  assert_int_equal(decode("large.png", &p, 7, small, err, sizeof err), 0);
  assert_true(fabsf(small[3] - 0.5f) < 1e-6f);
  assert_true(small[2] == 1.0f && small[4] == 0.0f);
  /* 1x1 upscaled to 32x32 */
  p = pre_ident(3, 0);
  float out3[3 * S * S];
  assert_int_equal(decode("tiny.png", &p, S, out3, err, sizeof err), 0);
  for (int i = 0; i < 3 * S * S; i++) assert_true(out3[i] == (float)(200 / 255.0));
  /* upscaling 32 -> 64 keeps each source pixel's value (2x2 blocks) */
  p = pre_ident(1, 0);
  p.resize_w = p.resize_h = 64;
  float *big = malloc(64 * 64 * sizeof(float));
  assert_int_equal(decode("grey8.png", &p, 64, big, err, sizeof err), 0);
  for (int y = 0; y < 64; y++)
    for (int x = 0; x < 64; x++) assert_true(big[y * 64 + x] == (float)f_grey(x / 2, y / 2));
  free(big);
  /* non-square resize is rejected when it does not fit the model input */
  p = pre_ident(1, 0);
  p.resize_w = 30;
  assert_int_equal(decode("grey8.png", &p, S, out, err, sizeof err), JEM_EINVAL);
  assert_non_null(strstr(err, "resize"));
  p = pre_ident(2, 0);
  assert_int_equal(decode("grey8.png", &p, S, out, err, sizeof err), JEM_EINVAL);
}

/* A real Fashion-MNIST test image: 28x28 -> pad 2 -> [-1,1] must equal the
 * IDX pixels mapped the same way, exactly. */
static void test_fmnist(void **state) {
  (void)state;
  gzFile f = gzopen("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", "rb");
  assert_non_null(f); /* Debian package dataset-fashion-mnist (make deps) */
  unsigned char hdr[16], px[28 * 28];
  assert_int_equal(gzread(f, hdr, 16), 16);
  assert_int_equal(gzread(f, px, sizeof px), (int)sizeof px);
  gzclose(f);
  jem_preprocess p;
  memset(&p, 0, sizeof p);
  p.channels = 1;
  p.resize_w = p.resize_h = 28;
  p.pad = 2;
  p.pad_value = 0;
  p.range_lo = -1;
  p.range_hi = 1;
  float out[S * S];
  char err[256];
  assert_int_equal(decode("fmnist0.png", &p, S, out, err, sizeof err), 0);
  int nonzero = 0;
  for (int y = 0; y < S; y++)
    for (int x = 0; x < S; x++) {
      float want = -1.0f;
      if (y >= 2 && y < 30 && x >= 2 && x < 30) {
        unsigned v = px[(y - 2) * 28 + (x - 2)];
        nonzero += v != 0;
        want = (float)(-1.0 + 2.0 * (v / 255.0));
      }
      assert_true(AT(out, 0, y, x) == want);
    }
  assert_true(nonzero > 100); /* really an image */
}

/* ------------------------------------------------------------------------ */
/* bad inputs                                                               */

static void put32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

/* Appends a chunk with a correct CRC; returns the new length. */
static size_t add_chunk(unsigned char *b, size_t pos, const char *type, const void *data,
                        uint32_t len, uint32_t claimed) {
  put32(b + pos, claimed);
  memcpy(b + pos + 4, type, 4);
  if (len) memcpy(b + pos + 8, data, len);
  uLong crc = crc32(0L, b + pos + 4, 4 + len);
  put32(b + pos + 8 + len, (uint32_t)crc);
  return pos + 12 + len;
}

static size_t png_header(unsigned char *b, uint32_t w, uint32_t h, int depth, int ctype) {
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  memcpy(b, sig, 8);
  unsigned char ihdr[13] = {0};
  put32(ihdr, w);
  put32(ihdr + 4, h);
  ihdr[8] = (unsigned char)depth;
  ihdr[9] = (unsigned char)ctype;
  return add_chunk(b, 8, "IHDR", ihdr, 13, 13);
}

static void expect_rc(const void *b, size_t len, int want, const char *needle) {
  char err[512];
  int rc = decode_mem(b, len, err, sizeof err);
  if (rc != want || (needle && !strstr(err, needle)))
    fprintf(stderr, "expected %s (\"%s\"), got %s: %s\n", jem_err_name(want),
            needle ? needle : "", jem_err_name(rc), err);
  assert_int_equal(rc, want);
  assert_true(strlen(err) > 10); /* a sentence, not nothing */
  if (needle) assert_non_null(strstr(err, needle));
}

static void test_bad_small(void **state) {
  (void)state;
  unsigned char b[64] = {0};
  expect_rc(b, 0, JEM_EFORMAT, "empty");
  b[0] = 0x89;
  expect_rc(b, 1, JEM_EFORMAT, "PNG signature");
  b[0] = 'x';
  expect_rc(b, 1, JEM_EUNSUPPORTED, "not a PNG or JPEG");
  memcpy(b, "\x89PNG", 4);
  expect_rc(b, 4, JEM_EFORMAT, "truncated");
  memcpy(b, "\xff\xd8", 2);
  expect_rc(b, 2, JEM_EFORMAT, "JPEG");
  memcpy(b, "\xff\xd8\xff", 3);
  expect_rc(b, 3, JEM_EFORMAT, "JPEG");
  /* the 10-byte GIF of stb #1876 */
  memcpy(b, "GIF89a\xff\xff\xff\xff", 10);
  expect_rc(b, 10, JEM_EUNSUPPORTED, "GIF");
  /* the 18-byte TGA of stb #1996 (claims 23169x23169) */
  static const unsigned char tga[18] = {0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0x81, 0x5a, 0x81, 0x5a, 32, 0};
  expect_rc(tga, sizeof tga, JEM_EUNSUPPORTED, "TGA");
  memcpy(b, "BM\x3a\0\0\0\0\0\0\0\x36\0\0\0", 14);
  expect_rc(b, 54, JEM_EUNSUPPORTED, "BMP");
  memcpy(b, "RIFF\0\0\0\0WEBPVP8 ", 16);
  expect_rc(b, 16, JEM_EUNSUPPORTED, "WebP");
  expect_rc("\x93NUMPY\x01\x00", 8, JEM_EUNSUPPORTED, "NumPy");
  expect_rc("P6\n1 1\n255\n\0\0\0", 14, JEM_EUNSUPPORTED, "PNM");
  expect_rc("#?RADIANCE\n", 11, JEM_EUNSUPPORTED, "HDR");
  expect_rc("\x53\x80\xf6\x34\0\0\0\0", 8, JEM_EUNSUPPORTED, "PIC");
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void test_bad_png(void **state) {
  (void)state;
  unsigned char b[4096];
  /* the 41-byte PNG claiming 10000x10000: refused from the header, at once */
  size_t n = png_header(b, 10000, 10000, 8, 6);
  n = add_chunk(b, n, "IDAT", "\x78\x9c", 2, 2) - 6; /* 41 bytes, cut short */
  assert_int_equal(n, 41);
  double t0 = now_s();
  expect_rc(b, n, JEM_ETOOBIG, "10000x10000");
  assert_true(now_s() - t0 < 0.05);
  /* 1 x 16,000,000 */
  n = png_header(b, 1, 16000000, 8, 0);
  expect_rc(b, n, JEM_ETOOBIG, "16000000");
  /* 4096x4096: each side allowed, the area is not */
  n = png_header(b, 4096, 4096, 8, 0);
  expect_rc(b, n, JEM_ETOOBIG, "pixels");
  /* zero width */
  n = png_header(b, 0, 5, 8, 0);
  expect_rc(b, n, JEM_EFORMAT, "empty image");
  /* bad colour type / depth */
  n = png_header(b, 4, 4, 16, 3);
  n = add_chunk(b, n, "IEND", NULL, 0, 0);
  expect_rc(b, n, JEM_EFORMAT, "bit depth");
  n = png_header(b, 4, 4, 8, 5);
  expect_rc(b, n, JEM_EFORMAT, "colour type");
  /* an IDAT claiming 2^31 bytes, and one claiming 2^31-1 (past the end) */
  n = png_header(b, 4, 4, 8, 0);
  size_t m = add_chunk(b, n, "IDAT", "\x78\x9c", 2, 0x80000000u);
  expect_rc(b, m, JEM_EFORMAT, "2^31");
  m = add_chunk(b, n, "IDAT", "\x78\x9c", 2, 0x7fffffffu);
  expect_rc(b, m, JEM_EFORMAT, "remain");
  /* no IEND / no IDAT */
  m = add_chunk(b, n, "IDAT", "\x78\x9c", 2, 2);
  expect_rc(b, m, JEM_EFORMAT, "IEND");
  m = add_chunk(b, n, "IEND", NULL, 0, 0);
  expect_rc(b, m, JEM_EFORMAT, "IDAT");
  /* corrupt zlib: a well-formed chunk list with garbage compressed data */
  static const unsigned char junk[16] = {0x78, 0x9c, 0xff, 0xff, 0xff, 0xff, 0x13, 0x37,
                                         0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3};
  m = add_chunk(b, n, "IDAT", junk, 16, 16);
  m = add_chunk(b, m, "IEND", NULL, 0, 0);
  expect_rc(b, m, JEM_EFORMAT, "could not decode");
  /* valid zlib holding too few bytes for the image */
  unsigned char raw[3] = {0, 1, 2}, z[64];
  uLongf zl = sizeof z;
  assert_int_equal(compress(z, &zl, raw, sizeof raw), Z_OK);
  m = add_chunk(b, n, "IDAT", z, (uint32_t)zl, (uint32_t)zl);
  m = add_chunk(b, m, "IEND", NULL, 0, 0);
  expect_rc(b, m, JEM_EFORMAT, "could not decode");
  /* a file truncated in its data, and one missing the last byte */
  size_t len;
  unsigned char *f = load("rgb.png", &len);
  expect_rc(f, len / 2, JEM_EFORMAT, "remain");
  expect_rc(f, len - 1, JEM_EFORMAT, "IEND");
  /* the body over the byte limit */
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  lim.max_bytes = 100;
  jem_preprocess p = pre_ident(3, 0);
  float out[3 * S * S];
  char err[256];
  assert_int_equal(jem_image_to_input(f, len, &p, S, &lim, out, err, sizeof err), JEM_ETOOBIG);
  /* stricter per-axis and area limits than the defaults */
  jem_image_limits_default(&lim);
  lim.max_side = 16;
  assert_int_equal(jem_image_to_input(f, len, &p, S, &lim, out, err, sizeof err), JEM_ETOOBIG);
  jem_image_limits_default(&lim);
  lim.max_pixels = 1000;
  assert_int_equal(jem_image_to_input(f, len, &p, S, &lim, out, err, sizeof err), JEM_ETOOBIG);
  free(f);
}

/* Finds marker `m` in a JPEG; returns its offset (at the 0xFF) or 0. */
static size_t find_marker(const unsigned char *b, size_t len, unsigned char m) {
  for (size_t i = 2; i + 1 < len; i++)
    if (b[i] == 0xff && b[i + 1] == m) return i;
  return 0;
}

static void test_bad_jpeg(void **state) {
  (void)state;
  size_t len;
  unsigned char *f = load("baseline.jpg", &len);
  unsigned char *c = malloc(len);
  /* a Huffman table whose code counts overflow the code space */
  memcpy(c, f, len);
  size_t dht = find_marker(c, len, 0xc4);
  assert_true(dht > 0);
  for (int i = 0; i < 16; i++) c[dht + 5 + i] = 0xff;
  expect_rc(c, len, JEM_EFORMAT, "Huffman");
  /* counts within 256 but not a valid prefix code (stb rejects it) */
  memcpy(c, f, len);
  {
    int total = 0; /* same total, so the segment stays well-formed */
    for (int i = 0; i < 16; i++) total += c[dht + 5 + i], c[dht + 5 + i] = 0;
    assert_true(total > 3 && total - 3 < 256);
    c[dht + 5] = 3; /* three codes of length 1 cannot exist */
    c[dht + 6] = (unsigned char)(total - 3);
  }
  expect_rc(c, len, JEM_EFORMAT, "could not decode");
  /* a wrong table class */
  memcpy(c, f, len);
  c[dht + 4] = 0x25;
  expect_rc(c, len, JEM_EFORMAT, "Huffman");
  /* a lossless (SOF3) frame */
  memcpy(c, f, len);
  size_t sof = find_marker(c, len, 0xc0);
  assert_true(sof > 0);
  c[sof + 1] = 0xc3;
  expect_rc(c, len, JEM_EUNSUPPORTED, "lossless");
  /* 12-bit samples */
  memcpy(c, f, len);
  c[sof + 4] = 12;
  expect_rc(c, len, JEM_EUNSUPPORTED, "12-bit");
  /* a huge frame */
  memcpy(c, f, len);
  c[sof + 5] = 0x40; c[sof + 6] = 0x00; /* height 16384 */
  expect_rc(c, len, JEM_ETOOBIG, "16384");
  c[sof + 5] = 0x08; c[sof + 6] = 0x00; c[sof + 7] = 0x08; c[sof + 8] = 0x01;
  expect_rc(c, len, JEM_ETOOBIG, "pixels"); /* 2049x2048: fine per axis, not in area */
  /* a segment length past the end */
  memcpy(c, f, len);
  c[sof + 2] = 0xff; c[sof + 3] = 0xff;
  expect_rc(c, len, JEM_EFORMAT, "length");
  /* no frame header at all */
  expect_rc(f, 20, JEM_EFORMAT, "frame header");
  free(c);
  /* thousands of scans (CPU bomb): SOI, the original headers up to the
   * first SOS, then 300 empty scans */
  size_t sos = find_marker(f, len, 0xda);
  assert_true(sos > 0);
  size_t big = sos + 300 * 10 + 2;
  unsigned char *bomb = malloc(big);
  memcpy(bomb, f, sos);
  size_t pos = sos;
  for (int i = 0; i < 300; i++) {
    static const unsigned char scan[10] = {0xff, 0xda, 0, 8, 1, 1, 0, 0, 63, 0};
    memcpy(bomb + pos, scan, 10);
    pos += 10;
  }
  bomb[pos++] = 0xff;
  bomb[pos++] = 0xd9;
  expect_rc(bomb, pos, JEM_ETOOBIG, "scans");
  free(bomb);
  free(f);
}

/* Every prefix and many single-byte corruptions of every valid file: any
 * outcome but a crash (ASan builds check memory safety too) and only the
 * documented codes. */
static const char *valid_files[] = {
  "grey8.png", "grey_alpha.png", "grey_trns.png", "rgb.png", "rgba.png", "interlaced.png",
  "interlaced_grey.png", "grey16.png", "rgb16.png", "rgba16.png", "palette.png",
  "palette_trns.png", "palette_pil.png", "baseline.jpg", "progressive.jpg", "grey.jpg",
  "cmyk.jpg", "subsampled.jpg", "large.png", "tiny.png", "fmnist0.png",
};
#define N_VALID (sizeof valid_files / sizeof valid_files[0])

static void check_codes(int rc) {
  assert_true(rc == 0 || rc == JEM_EFORMAT || rc == JEM_EUNSUPPORTED || rc == JEM_ETOOBIG);
}

static void test_mutations(void **state) {
  (void)state;
  char err[512];
  uint32_t seed = 12345;
  for (size_t k = 0; k < N_VALID; k++) {
    size_t len;
    unsigned char *f = load(valid_files[k], &len);
    size_t step = len / 150 + 1;
    for (size_t cut = 0; cut < len; cut += step) check_codes(decode_mem(f, cut, err, sizeof err));
    unsigned char *c = malloc(len);
    for (int t = 0; t < 150; t++) {
      memcpy(c, f, len);
      for (int j = 0; j < 3; j++) {
        seed = seed * 1664525u + 1013904223u;
        size_t at = (seed >> 8) % len;
        seed = seed * 1664525u + 1013904223u;
        c[at] = (unsigned char)(seed >> 24);
      }
      check_codes(decode_mem(c, len, err, sizeof err));
    }
    free(c);
    free(f);
  }
}

static void test_all_valid_decode(void **state) {
  (void)state;
  char err[256];
  float out[3 * S * S];
  for (size_t k = 0; k < N_VALID; k++)
    for (int ch = 1; ch <= 3; ch += 2) {
      jem_preprocess p = pre_ident(ch, 0);
      int rc = decode(valid_files[k], &p, S, out, err, sizeof err);
      if (rc) fprintf(stderr, "%s: %s\n", valid_files[k], err);
      assert_int_equal(rc, 0);
      for (int i = 0; i < ch * S * S; i++) assert_true(out[i] >= 0.0f && out[i] <= 1.0f);
    }
}

/* Two threads decoding at once get the same results as one (the allocation
 * budget and stb's failure text are per thread). */
typedef struct { int ok; } thr_arg;
static void *thr_main(void *arg) {
  thr_arg *a = arg;
  char err[256];
  float ref[N_VALID][3 * S * S], out[3 * S * S];
  jem_preprocess p = pre_ident(3, 0.5f);
  a->ok = 1;
  for (size_t k = 0; k < N_VALID; k++)
    if (decode(valid_files[k], &p, S, ref[k], err, sizeof err)) a->ok = 0;
  for (int r = 0; r < 10; r++)
    for (size_t k = 0; k < N_VALID; k++) {
      if (decode(valid_files[k], &p, S, out, err, sizeof err)) a->ok = 0;
      if (memcmp(out, ref[k], sizeof out)) a->ok = 0;
    }
  return NULL;
}

static void test_threads(void **state) {
  (void)state;
  pthread_t t[2];
  thr_arg a[2];
  for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&t[i], NULL, thr_main, &a[i]), 0);
  for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
  assert_true(a[0].ok && a[1].ok);
}

/* ------------------------------------------------------------------------ */
/* PNG grid                                                                 */

static void grid_roundtrip(int n, int c, int s, int cols, int border, int gw, float lo,
                           float hi) {
  size_t count = (size_t)n * c * s * s;
  float *x = malloc(count * sizeof(float));
  for (size_t i = 0; i < count; i++) x[i] = lo + (hi - lo) * (float)((i * 37) % 101) / 100.0f;
  x[0] = lo - 5; /* clipped */
  x[1] = hi + 5;
  size_t len = 0, len2 = 0;
  unsigned char *png = jem_png_grid(x, n, c, s, cols, lo, hi, &len);
  unsigned char *png2 = jem_png_grid(x, n, c, s, cols, lo, hi, &len2);
  assert_non_null(png);
  assert_true(len == len2 && !memcmp(png, png2, len)); /* deterministic */
  /* decode it back with the same decoder, identity geometry, [0,1] */
  jem_preprocess p;
  memset(&p, 0, sizeof p);
  p.channels = c;
  p.resize_w = p.resize_h = gw;
  p.range_lo = 0;
  p.range_hi = 1;
  float *img = malloc((size_t)c * gw * gw * sizeof(float));
  char err[256];
  int rc = jem_image_to_input(png, len, &p, gw, NULL, img, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  assert_int_equal(rc, 0);
  for (int k = 0; k < n; k++) {
    int y0 = border + (k / cols) * (s + border), x0 = border + (k % cols) * (s + border);
    for (int ch = 0; ch < c; ch++)
      for (int y = 0; y < s; y++)
        for (int xx = 0; xx < s; xx++) {
          float v = x[(((size_t)k * c + ch) * s + y) * s + xx];
          double t = ((double)v - lo) / ((double)hi - lo) * 255.0;
          long u = t <= 0 ? 0 : t >= 255 ? 255 : lrint(t);
          float got = img[((size_t)ch * gw + (y0 + y)) * gw + (x0 + xx)];
          assert_true(got == (float)(u / 255.0));
        }
  }
  if (border) { /* the corner is border */
    for (int ch = 0; ch < c; ch++) assert_true(img[(size_t)ch * gw * gw] == 1.0f);
  }
  free(img);
  free(png);
  free(png2);
  free(x);
}

static void test_png_grid(void **state) {
  (void)state;
  /* 4 grey 14x14 images in 2 columns: 2*14 + 3*2 = 34 square */
  grid_roundtrip(4, 1, 14, 2, 2, 34, -1, 1);
  /* 3 RGB 8x8 images in 3 columns, 1 row -> 3*8+4*2 = 32 wide, 12 high: not
   * square, so only check it encodes; then 9 in 3x3 = 32x32 */
  grid_roundtrip(9, 3, 8, 3, 2, 32, 0, 1);
  /* one image, no border */
  grid_roundtrip(1, 1, 32, 1, 0, 32, -1, 1);
  grid_roundtrip(1, 3, 5, 1, 0, 5, -2, 3);
  size_t len;
  float x[4] = {0};
  assert_null(jem_png_grid(x, 0, 1, 2, 1, -1, 1, &len));
  assert_null(jem_png_grid(x, 1, 2, 2, 1, -1, 1, &len));
  assert_null(jem_png_grid(x, 1, 1, 2, 1, 1, 1, &len));
  /* NaN is written as the lowest value, not undefined behaviour */
  x[0] = NAN;
  unsigned char *png = jem_png_grid(x, 1, 1, 2, 1, -1, 1, &len);
  assert_non_null(png);
  free(png);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_png_grey8),
    cmocka_unit_test(test_png_grey_alpha),
    cmocka_unit_test(test_png_rgb),
    cmocka_unit_test(test_png_rgba),
    cmocka_unit_test(test_png_16bit),
    cmocka_unit_test(test_png_palette),
    cmocka_unit_test(test_jpeg),
    cmocka_unit_test(test_resize),
    cmocka_unit_test(test_fmnist),
    cmocka_unit_test(test_bad_small),
    cmocka_unit_test(test_bad_png),
    cmocka_unit_test(test_bad_jpeg),
    cmocka_unit_test(test_all_valid_decode),
    cmocka_unit_test(test_mutations),
    cmocka_unit_test(test_threads),
    cmocka_unit_test(test_png_grid),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
