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

/* ------------------------------------------------------------------------ */
/* EXIF orientation                                                         */

/* make_images.py's orient(), the upright picture: 32 wide, 16 high, so at
 * 32x32 every row shows twice (exactly: the area resize copies it). */
static double f_orient(int c, int x, int y) {
  y /= 2;
  int v = c == 0 ? 8 * x : c == 1 ? 16 * y : 4 * x + 8 * y;
  return v / 255.0;
}
static double f_orient_luma(int c, int x, int y) {
  (void)c;
  return 0.299 * f_orient(0, x, y) + 0.587 * f_orient(1, x, y) + 0.114 * f_orient(2, x, y);
}

/* orient_N.jpg holds orient() stored for EXIF Orientation N (5-8 stored 16
 * wide and 32 high); make_images.py checked that PIL's
 * ImageOps.exif_transpose gives orient() back from each, so matching
 * f_orient here is matching PIL. */
static void test_exif_files(void **state) {
  (void)state;
  for (int n = 1; n <= 8; n++) {
    char name[32];
    snprintf(name, sizeof name, "orient_%d.jpg", n);
    jpeg_close(name, 3, f_orient, 0.01, 0.06);
    jpeg_close(name, 1, f_orient_luma, 0.01, 0.06);
  }
  /* PIL's PNG eXIf chunk: lossless, so exact */
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(3, 0);
  assert_int_equal(decode("orient_6.png", &p, S, out, err, sizeof err), 0);
  expect_exact_rgb(out, f_orient, "orient_6.png");
}

static void tput16(unsigned char *p, unsigned v, int le) {
  p[le ? 0 : 1] = (unsigned char)v;
  p[le ? 1 : 0] = (unsigned char)(v >> 8);
}
static void tput32(unsigned char *p, uint32_t v, int le) {
  for (int i = 0; i < 4; i++) p[le ? i : 3 - i] = (unsigned char)(v >> (8 * i));
}

/* A minimal EXIF TIFF block: header ("II" little- or "MM" big-endian, 42,
 * IFD0 at 8), IFD0 with one entry (0x0112, SHORT, count 1, value v) and a
 * zero next-IFD link.  26 bytes; the field offsets are used below:
 * 0 order, 2 magic, 4 IFD0 offset, 8 count, 10 tag, 12 type, 14 value
 * count, 18 value, 22 next IFD. */
#define TIFF_LEN 26
static void tiff_orient(unsigned char *t, int le, unsigned v) {
  memset(t, 0, TIFF_LEN);
  t[0] = t[1] = le ? 'I' : 'M';
  tput16(t + 2, 42, le);
  tput32(t + 4, 8, le);
  tput16(t + 8, 1, le);
  tput16(t + 10, 0x0112, le);
  tput16(t + 12, 3, le);
  tput32(t + 14, 1, le);
  tput16(t + 18, v, le);
}

/* SOI, one APPn segment (marker 0xE0+app) holding id then t, then `rest`
 * (the rest of a JPEG after its SOI, or nothing).  The buffer is exactly
 * that long, so under ASan a read past the segment at the end is caught. */
static unsigned char *jpeg_app(int app, const char *id, size_t idlen, const unsigned char *t,
                               size_t n, const unsigned char *rest, size_t restlen,
                               size_t *outlen) {
  size_t seg = 2 + idlen + n;
  assert_true(seg <= 65535);
  *outlen = 2 + 2 + seg + restlen;
  unsigned char *b = malloc(*outlen);
  b[0] = 0xff;
  b[1] = 0xd8;
  b[2] = 0xff;
  b[3] = (unsigned char)(0xe0 + app);
  b[4] = (unsigned char)(seg >> 8);
  b[5] = (unsigned char)seg;
  if (idlen) memcpy(b + 6, id, idlen);
  if (n) memcpy(b + 6 + idlen, t, n);
  if (restlen) memcpy(b + 6 + idlen + n, rest, restlen);
  return b;
}

/* Display pixel (x, y) of an S x S image stored with orientation o is
 * stored pixel (sx, sy).  (The PIL-made files above check the same table
 * on non-square images.) */
static void stored_xy(int o, int x, int y, int *sx, int *sy) {
  int m = S - 1;
  switch (o) {
    case 2: *sx = m - x; *sy = y; break;
    case 3: *sx = m - x; *sy = m - y; break;
    case 4: *sx = x; *sy = m - y; break;
    case 5: *sx = y; *sy = x; break;
    case 6: *sx = y; *sy = m - x; break;
    case 7: *sx = m - y; *sy = m - x; break;
    case 8: *sx = m - y; *sy = x; break;
    default: *sx = x; *sy = y; break;
  }
}

/* Decodes b (32x32, RGB) and checks that it is exactly ref turned by o. */
static void expect_oriented(const unsigned char *b, size_t len, const float *ref, int o,
                            const char *what) {
  char err[256];
  float out[3 * S * S];
  jem_preprocess p = pre_ident(3, 0);
  int rc = jem_image_to_input(b, len, &p, S, NULL, out, err, sizeof err);
  if (rc) fprintf(stderr, "%s: %s\n", what, err);
  assert_int_equal(rc, 0);
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) {
        int sx, sy;
        stored_xy(o, x, y, &sx, &sy);
        if (AT(out, c, y, x) != AT(ref, c, sy, sx)) {
          fprintf(stderr, "%s: orientation %d, c=%d y=%d x=%d: %g, want %g\n", what, o, c, y,
                  x, AT(out, c, y, x), AT(ref, c, sy, sx));
          fail();
        }
      }
}

static float ref_baseline[3 * S * S]; /* baseline.jpg as stored */

static void load_ref_baseline(void) {
  char err[256];
  jem_preprocess p = pre_ident(3, 0);
  assert_int_equal(decode("baseline.jpg", &p, S, ref_baseline, err, sizeof err), 0);
}

/* baseline.jpg with an APPn segment after SOI: decoded as orientation o. */
static void expect_app(int app, const char *id, size_t idlen, const unsigned char *t, size_t n,
                       int o, const char *what) {
  size_t len, jlen;
  unsigned char *f = load("baseline.jpg", &len);
  unsigned char *j = jpeg_app(app, id, idlen, t, n, f + 2, len - 2, &jlen);
  expect_oriented(j, jlen, ref_baseline, o, what);
  free(j);
  /* the same segment at the very end of the data: the file is refused
   * (no frame header) after the EXIF block has been read, out of bounds
   * under ASan if the reader overran it */
  j = jpeg_app(app, id, idlen, t, n, NULL, 0, &jlen);
  char err[256];
  assert_int_equal(decode_mem(j, jlen, err, sizeof err), JEM_EFORMAT);
  free(j);
  free(f);
}

#define EXIF_ID "Exif\0\0", 6

/* rgb.png (or any PNG) with an eXIf chunk holding t right after IHDR. */
static unsigned char *png_exif(const char *name, const unsigned char *t, size_t n,
                               size_t *outlen) {
  size_t len;
  unsigned char *f = load(name, &len);
  unsigned char *b = malloc(len + 12 + n);
  memcpy(b, f, 33); /* signature + IHDR */
  size_t pos = add_chunk(b, 33, "eXIf", t, (uint32_t)n, (uint32_t)n);
  memcpy(b + pos, f + 33, len - 33);
  *outlen = pos + len - 33;
  free(f);
  return b;
}

static void test_exif_orientations(void **state) {
  (void)state;
  load_ref_baseline();
  unsigned char t[TIFF_LEN];
  char what[64];
  float ref_png[3 * S * S];
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) AT(ref_png, c, y, x) = (float)f_rgb(c, x, y);
  for (int le = 0; le <= 1; le++)
    for (int o = 1; o <= 8; o++) {
      tiff_orient(t, le, (unsigned)o);
      snprintf(what, sizeof what, "JPEG APP1 %s %d", le ? "II" : "MM", o);
      expect_app(1, EXIF_ID, t, TIFF_LEN, o, what);
      size_t len;
      unsigned char *b = png_exif("rgb.png", t, TIFF_LEN, &len);
      snprintf(what, sizeof what, "PNG eXIf %s %d", le ? "II" : "MM", o);
      expect_oriented(b, len, ref_png, o, what);
      free(b);
    }
  /* 16-bit pixels (8 bytes each) */
  float ref16[3 * S * S];
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) AT(ref16, c, y, x) = (float)f_rgb16(c, x, y);
  for (int o = 2; o <= 8; o += 3) {
    tiff_orient(t, 1, (unsigned)o);
    size_t len;
    unsigned char *b = png_exif("rgb16.png", t, TIFF_LEN, &len);
    expect_oriented(b, len, ref16, o, "rgb16.png");
    free(b);
  }
  /* a non-square image: large.png is 300x200 with its left half white; a
   * quarter turn makes it 200x300 with the white half at the top (6: turned
   * clockwise, 5: transposed) or at the bottom (8, 7) */
  char err[256];
  float out[S * S];
  for (int o = 5; o <= 8; o++) {
    tiff_orient(t, 0, (unsigned)o);
    size_t len;
    unsigned char *b = png_exif("large.png", t, TIFF_LEN, &len);
    jem_preprocess p = pre_ident(1, 0);
    assert_int_equal(jem_image_to_input(b, len, &p, S, NULL, out, err, sizeof err), 0);
    int white_top = o == 5 || o == 6;
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++)
        assert_true(AT(out, 0, y, x) == ((y < 16) == white_top ? 1.0f : 0.0f));
    /* the limits hold for the turned image: 300 > 250 wide is still refused */
    jem_image_limits lim;
    jem_image_limits_default(&lim);
    lim.max_side = 250;
    assert_int_equal(jem_image_to_input(b, len, &p, S, &lim, out, err, sizeof err),
                     JEM_ETOOBIG);
    free(b);
  }
  /* a PNG eXIf chunk that kept JPEG's "Exif\0\0" prefix is read too */
  unsigned char pre[6 + TIFF_LEN];
  memcpy(pre, "Exif\0\0", 6);
  tiff_orient(pre + 6, 1, 3);
  size_t len;
  unsigned char *b = png_exif("rgb.png", pre, sizeof pre, &len);
  expect_oriented(b, len, ref_png, 3, "eXIf with prefix");
  free(b);
  /* the orientation entry after other entries (whose offsets are not
   * followed, even when they point nowhere) */
  unsigned char t3[8 + 2 + 3 * 12 + 4];
  memset(t3, 0, sizeof t3);
  memcpy(t3, "MM\0\x2a\0\0\0\x08\0\x03", 10);
  memcpy(t3 + 10, "\x01\x0f\x00\x02\x00\x00\x00\x20\xff\xff\xff\x00", 12); /* Make, ASCII, 32 bytes at a bad offset */
  memcpy(t3 + 22, "\x01\x10\x00\x02\x00\x00\x00\x20\x00\x00\x00\x09", 12); /* Model, at offset 9 */
  memcpy(t3 + 34, "\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00", 12); /* Orientation 8 */
  expect_app(1, EXIF_ID, t3, sizeof t3, 8, "three entries");
}

static void test_exif_malformed(void **state) {
  (void)state;
  load_ref_baseline();
  unsigned char t[TIFF_LEN];
  /* every truncation of a valid block: the entry is whole from 22 bytes */
  for (int le = 0; le <= 1; le++)
    for (size_t n = 0; n <= TIFF_LEN; n++) {
      tiff_orient(t, le, 6);
      expect_app(1, EXIF_ID, t, n, n >= 22 ? 6 : 1, "truncated");
    }
  /* an APP1 whose "Exif" id itself is cut short, or slightly wrong */
  tiff_orient(t, 1, 6);
  expect_app(1, "Exif", 4, NULL, 0, 1, "id only");
  expect_app(1, "Exif\0", 5, NULL, 0, 1, "short id");
  expect_app(1, "Exif\0\1", 6, t, TIFF_LEN, 1, "wrong id");
  expect_app(1, "exif\0\0", 6, t, TIFF_LEN, 1, "lower-case id");
  /* EXIF in APP0 or APP2 is not EXIF */
  expect_app(0, EXIF_ID, t, TIFF_LEN, 1, "APP0");
  expect_app(2, EXIF_ID, t, TIFF_LEN, 1, "APP2");
  struct { size_t at; int le; unsigned char bytes[4]; size_t n; const char *what; } bad[] = {
    {0, 1, "IM", 2, "byte order IM"},
    {0, 1, "MI", 2, "byte order MI"},
    {0, 1, "XX", 2, "byte order XX"},
    {0, 1, "MM", 2, "II data said to be MM"},
    {2, 1, {43, 0}, 2, "magic 43"},
    {2, 0, {0, 43}, 2, "magic 43 MM"},
    {4, 1, {0xff, 0xff, 0xff, 0xff}, 4, "IFD offset 2^32-1"},
    {4, 1, {0xff, 0xff, 0xff, 0x7f}, 4, "IFD offset 2^31-1"},
    {4, 0, {0x80, 0, 0, 0}, 4, "IFD offset 2^31 MM"},
    {4, 1, {25, 0, 0, 0}, 4, "IFD offset n-1"},
    {4, 1, {24, 0, 0, 0}, 4, "IFD offset n-2 (count 0)"},
    {4, 1, {15, 0, 0, 0}, 4, "IFD offset leaves no whole entry"},
    {4, 1, {4, 0, 0, 0}, 4, "IFD offset inside the header"},
    {4, 1, {0, 0, 0, 0}, 4, "IFD offset 0"},
    {8, 1, {0xff, 0xff}, 2, "entry count 65535"},
    {8, 0, {0x01, 0x01}, 2, "entry count 257"},
    {8, 1, {2, 0}, 2, "entry count 2, one present"},
    {8, 1, {0, 0}, 2, "entry count 0"},
    {10, 1, {0x13, 0x01}, 2, "another tag"},
    {12, 1, {4, 0}, 2, "type LONG"},
    {12, 1, {1, 0}, 2, "type BYTE"},
    {14, 1, {2, 0, 0, 0}, 4, "value count 2"},
    {14, 1, {0, 0, 0, 0}, 4, "value count 0"},
    {14, 0, {0xff, 0xff, 0xff, 0xff}, 4, "value count 2^32-1"},
    {18, 1, {0, 0}, 2, "orientation 0"},
    {18, 1, {9, 0}, 2, "orientation 9"},
    {18, 0, {0, 9}, 2, "orientation 9 MM"},
    {18, 1, {0xff, 0xff}, 2, "orientation 65535"},
    {18, 1, {6, 1}, 2, "orientation 262"},
    {18, 0, {6, 0}, 2, "orientation 6 in the wrong half (MM)"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    tiff_orient(t, bad[i].le, 6);
    memcpy(t + bad[i].at, bad[i].bytes, bad[i].n);
    expect_app(1, EXIF_ID, t, TIFF_LEN, 1, bad[i].what);
  }
  /* an IFD of 257 whole entries, the orientation last: more than the reader
   * believes (256 and fewer are read) */
  size_t big_n = 8 + 2 + 257 * 12 + 4;
  unsigned char *big = calloc(1, big_n);
  for (int count = 256; count <= 257; count++) {
    memcpy(big, "II\x2a\0\x08\0\0\0", 8);
    tput16(big + 8, (unsigned)count, 1);
    for (int k = 0; k < count; k++) {
      unsigned char *e = big + 10 + (size_t)k * 12;
      tput16(e, k == count - 1 ? 0x0112 : 0x9000 + (unsigned)k, 1);
      tput16(e + 2, 3, 1);
      tput32(e + 4, 1, 1);
      tput16(e + 8, 3, 1);
    }
    expect_app(1, EXIF_ID, big, 8 + 2 + (size_t)count * 12 + 4, count == 256 ? 3 : 1,
               "many entries");
  }
  free(big);
  /* an XMP APP1 first, then the EXIF one: the EXIF one counts; of two EXIF
   * segments the first counts */
  size_t len, jlen;
  unsigned char *f = load("baseline.jpg", &len);
  tiff_orient(t, 0, 3);
  unsigned char *inner = jpeg_app(1, EXIF_ID, t, TIFF_LEN, f + 2, len - 2, &jlen);
  static const char xmp[] = "http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>";
  size_t j2len;
  unsigned char *j2 = jpeg_app(1, xmp, sizeof xmp - 1, NULL, 0, inner + 2, jlen - 2, &j2len);
  expect_oriented(j2, j2len, ref_baseline, 3, "XMP then EXIF");
  free(j2);
  tiff_orient(t, 0, 6);
  j2 = jpeg_app(1, EXIF_ID, t, TIFF_LEN, inner + 2, jlen - 2, &j2len);
  expect_oriented(j2, j2len, ref_baseline, 6, "two EXIF segments");
  free(j2);
  free(inner);
  /* EXIF after the first scan (before EOI) is ignored */
  assert_true(f[len - 2] == 0xff && f[len - 1] == 0xd9);
  unsigned char *late = malloc(len + 4 + 6 + TIFF_LEN);
  memcpy(late, f, len - 2);
  size_t pos = len - 2;
  late[pos++] = 0xff;
  late[pos++] = 0xe1;
  late[pos++] = 0;
  late[pos++] = 2 + 6 + TIFF_LEN;
  memcpy(late + pos, "Exif\0\0", 6);
  pos += 6;
  memcpy(late + pos, t, TIFF_LEN);
  pos += TIFF_LEN;
  late[pos++] = 0xff;
  late[pos++] = 0xd9;
  expect_oriented(late, pos, ref_baseline, 1, "EXIF after the scan");
  free(late);
  /* an APP1 segment longer than the file is a truncated JPEG */
  j2 = jpeg_app(1, EXIF_ID, t, TIFF_LEN, f + 2, len - 2, &j2len);
  j2[4] = 0xff;
  j2[5] = 0xf0;
  expect_rc(j2, j2len, JEM_EFORMAT, "length");
  free(j2);
  free(f);
  /* PNG: a bad orientation, and two eXIf chunks (the first counts) */
  float ref_png[3 * S * S];
  for (int c = 0; c < 3; c++)
    for (int y = 0; y < S; y++)
      for (int x = 0; x < S; x++) AT(ref_png, c, y, x) = (float)f_rgb(c, x, y);
  tiff_orient(t, 1, 9);
  unsigned char *b = png_exif("rgb.png", t, TIFF_LEN, &len);
  expect_oriented(b, len, ref_png, 1, "PNG orientation 9");
  free(b);
  b = png_exif("rgb.png", t, 5, &len);
  expect_oriented(b, len, ref_png, 1, "PNG truncated eXIf");
  free(b);
  tiff_orient(t, 1, 2);
  b = png_exif("rgb.png", t, TIFF_LEN, &len);
  unsigned char *b2 = malloc(len + 12 + TIFF_LEN);
  memcpy(b2, b, 33);
  tiff_orient(t, 1, 4);
  pos = add_chunk(b2, 33, "eXIf", t, TIFF_LEN, TIFF_LEN);
  memcpy(b2 + pos, b + 33, len - 33);
  expect_oriented(b2, pos + len - 33, ref_png, 4, "two eXIf chunks");
  free(b2);
  free(b);
}

/* Random bytes in place of orient_6.jpg's EXIF block: never an error or a
 * crash, whatever orientation comes out. */
static void test_exif_mutations(void **state) {
  (void)state;
  size_t len;
  unsigned char *f = load("orient_6.jpg", &len);
  size_t app1 = find_marker(f, len, 0xe1);
  assert_true(app1 > 0 && !memcmp(f + app1 + 4, "Exif\0\0", 6));
  size_t seg = (size_t)f[app1 + 2] << 8 | f[app1 + 3];
  size_t t0 = app1 + 10, tn = seg - 8; /* the TIFF block */
  unsigned char *c = malloc(len);
  char err[512];
  uint32_t seed = 777;
  for (int i = 0; i < 3000; i++) {
    memcpy(c, f, len);
    int k = 1 + i % 4;
    for (int j = 0; j < k; j++) {
      seed = seed * 1664525u + 1013904223u;
      size_t at = t0 + (seed >> 8) % tn;
      seed = seed * 1664525u + 1013904223u;
      /* small values often, so offsets and counts land in range */
      c[at] = (unsigned char)(i & 1 ? seed >> 24 : (seed >> 24) % 16);
    }
    int rc = decode_mem(c, len, err, sizeof err);
    if (rc) fprintf(stderr, "mutation %d: %s\n", i, err);
    assert_int_equal(rc, 0);
  }
  free(c);
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
  "orient_1.jpg", "orient_2.jpg", "orient_3.jpg", "orient_4.jpg", "orient_5.jpg",
  "orient_6.jpg", "orient_7.jpg", "orient_8.jpg", "orient_6.png",
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
    cmocka_unit_test(test_exif_files),
    cmocka_unit_test(test_exif_orientations),
    cmocka_unit_test(test_exif_malformed),
    cmocka_unit_test(test_exif_mutations),
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
