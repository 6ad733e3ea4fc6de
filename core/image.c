/* image.c - hardened PNG/JPEG decoding, preprocessing into model input, and PNG grid output. */
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Allocation budget for stb_image                                           */

/* stb_image (Debian's v2.27) allocates from sizes found in the file.  Every
 * allocation goes through these functions, which charge a per-thread budget
 * set by the decode call, so a hostile file cannot make one decode take more
 * than the budget even if a header check were missed.  Blocks are zeroed, so
 * a decoder bug cannot leak stale heap contents into the output. */
typedef struct img_hdr { size_t size; size_t pad; } img_hdr; /* keeps 16-byte alignment */

static _Thread_local size_t img_used;
static _Thread_local size_t img_cap;
/* Set when the budget refused a block; reset before each decode, so that a
 * failure is blamed on the budget only when this image hit it (stb's own
 * failure reason outlives the decode that set it). */
static _Thread_local int img_refused;

static void *img_malloc(size_t n) {
  if (n > img_cap - img_used || n > SIZE_MAX - sizeof(img_hdr)) {
    img_refused = 1;
    return NULL;
  }
  img_hdr *h = calloc(1, sizeof(img_hdr) + n);
  if (!h) return NULL;
  h->size = n;
  img_used += n;
  return h + 1;
}

static void img_free(void *p) {
  if (!p) return;
  img_hdr *h = (img_hdr *)p - 1;
  img_used -= h->size;
  free(h);
}

static void *img_realloc(void *p, size_t n) {
  if (!p) return img_malloc(n);
  img_hdr *h = (img_hdr *)p - 1;
  size_t old = h->size;
  if (n > old && (n - old > img_cap - img_used || n > SIZE_MAX - sizeof(img_hdr))) {
    img_refused = 1;
    return NULL;
  }
  img_hdr *nh = realloc(h, sizeof(img_hdr) + n);
  if (!nh) return NULL;
  if (n > old) memset((unsigned char *)(nh + 1) + old, 0, n - old);
  img_used = img_used - old + n;
  nh->size = n;
  return nh + 1;
}

/* Only PNG and JPEG are compiled in: every other stb loader (GIF, TGA, PIC,
 * PSD, HDR, PNM) is where the open CVEs live.  This is the only translation
 * unit that compiles stb_image; libstb.so is never linked. */
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC /* no stbi_ symbols leave this file */
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#define STBI_MAX_DIMENSIONS (1 << 16) /* our own limits (jem_image_limits) come first */
#define STBI_MALLOC(sz) img_malloc(sz)
#define STBI_REALLOC(p, sz) img_realloc(p, sz)
#define STBI_FREE(p) img_free(p)
#define STBI_ASSERT(x) ((void)0) /* never abort the process on a bad file */

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#define STBI_WRITE_NO_STDIO
#define STBIW_ASSERT(x) JEM_ASSERT(x)

/* With STB_*_STATIC, GCC reports the loaders compiled out (GIF, HDR, ...)
 * as "declared static but never defined" at the end of the file, where a
 * push/pop would no longer apply; so that one warning is off file-wide. */
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-prototypes"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

/* ------------------------------------------------------------------------ */
/* Limits                                                                    */

#define IMG_MAX_JPEG_SCANS 100 /* progressive JPEGs use ~10 (mozjpeg a few more); more is a CPU bomb */

void jem_image_limits_default(jem_image_limits *l) {
  l->max_bytes = (size_t)8 << 20;
  l->max_side = 8192;
  l->max_pixels = 4194304;
}

/* ------------------------------------------------------------------------ */
/* Sniffing and header validation                                            */

static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

enum { FMT_PNG = 1, FMT_JPEG = 2 };

static uint32_t be32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static unsigned be16(const unsigned char *p) { return (unsigned)p[0] << 8 | p[1]; }

static int starts(const unsigned char *b, size_t len, const char *magic, size_t n) {
  return len >= n && memcmp(b, magic, n) == 0;
}

/* Names what a non-PNG/JPEG buffer looks like, for the error message. */
static const char *guess_format(const unsigned char *b, size_t len) {
  /* the PNG signature holds CR LF and LF to catch exactly this */
  if (starts(b, len, "\x89PNG", 4))
    return "a PNG whose CR and LF bytes were stripped, as by curl -d: send the file with "
           "--data-binary and Content-Type image/png";
  if (starts(b, len, "GIF87a", 6) || starts(b, len, "GIF89a", 6)) return "a GIF image";
  if (starts(b, len, "BM", 2)) return "a BMP image";
  if (len >= 12 && starts(b, len, "RIFF", 4) && !memcmp(b + 8, "WEBP", 4)) return "a WebP image";
  if (starts(b, len, "II*\0", 4) || starts(b, len, "MM\0*", 4)) return "a TIFF image";
  if (starts(b, len, "8BPS", 4)) return "a Photoshop (PSD) image";
  if (starts(b, len, "#?RADIANCE", 10) || starts(b, len, "#?RGBE", 6)) return "a Radiance HDR image";
  if (starts(b, len, "\x53\x80\xf6\x34", 4)) return "a Softimage PIC image";
  if (starts(b, len, "qoif", 4)) return "a QOI image";
  if (len >= 12 && !memcmp(b + 4, "ftyp", 4)) return "an ISO media file (AVIF/HEIC/MP4)";
  if (starts(b, len, "%PDF", 4)) return "a PDF document";
  if (starts(b, len, "\x1f\x8b", 2)) return "gzip data";
  if (starts(b, len, "PK\x03\x04", 4)) return "a ZIP archive";
  if (starts(b, len, "\x93NUMPY", 6)) return "a NumPy .npy array";
  if (len >= 2 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7') return "a PNM/PAM image";
  if (starts(b, len, "<", 1) || starts(b, len, "{", 1) || starts(b, len, "[", 1))
    return "text (XML/SVG/HTML or JSON)";
  /* TGA has no magic: a plausible header (colour-map type 0/1, image type
   * 1,2,3,9,10,11) is reported as such. */
  if (len >= 18 && b[1] <= 1 &&
      (b[2] == 1 || b[2] == 2 || b[2] == 3 || b[2] == 9 || b[2] == 10 || b[2] == 11))
    return "possibly a TGA image";
  return "data of an unknown format";
}

typedef struct img_info {
  int fmt;
  int w, h;
  int bits;      /* 16 for 16-bit PNGs, else 8 */
  int orient;    /* EXIF orientation 1..8 (1 when absent or malformed) */
} img_info;

/* ------------------------------------------------------------------------ */
/* EXIF orientation                                                          */

/* Phone cameras store the sensor's pixel grid and record in EXIF tag 0x0112
 * (Orientation) how to turn it upright.  Only that one tag is read.  The EXIF
 * block is a little TIFF file: "II" (little-endian) or "MM" (big-endian), the
 * number 42, then the offset of IFD0, a 16-bit entry count followed by
 * 12-byte entries (tag, type, count, 4-byte value or offset).  Only IFD0 is
 * read and no offsets inside it are followed (no next-IFD link, no sub-IFDs),
 * so there is nothing to loop on; every read is checked against the block's
 * size, and an IFD claiming more entries than fit, or more than
 * EXIF_MAX_ENTRIES, is not believed.  Anything unexpected gives 1, the
 * stored orientation, never an error: the pixels are still good. */
#define EXIF_MAX_ENTRIES 256 /* cameras write ~10-30 in IFD0 */

static unsigned tiff16(const unsigned char *p, int le) {
  return le ? (unsigned)p[0] | (unsigned)p[1] << 8 : (unsigned)p[0] << 8 | p[1];
}
static uint32_t tiff32(const unsigned char *p, int le) {
  return le ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24
            : be32(p);
}

/* t, n: the TIFF-structured block (after "Exif\0\0" in a JPEG APP1 segment,
 * or a PNG eXIf chunk's data).  Returns 1..8. */
static int exif_orientation(const unsigned char *t, size_t n) {
  if (n < 8) return 1;
  int le;
  if (t[0] == 'I' && t[1] == 'I') le = 1;
  else if (t[0] == 'M' && t[1] == 'M') le = 0;
  else return 1;
  if (tiff16(t + 2, le) != 42) return 1;
  uint32_t ifd = tiff32(t + 4, le);
  if (ifd < 8 || ifd > n - 2) return 1; /* inside the header, or no room for the count */
  size_t count = tiff16(t + ifd, le);
  if (count > EXIF_MAX_ENTRIES || count > (n - ifd - 2) / 12) return 1;
  for (size_t i = 0; i < count; i++) {
    const unsigned char *e = t + ifd + 2 + i * 12;
    if (tiff16(e, le) != 0x0112) continue;
    /* one SHORT, held in the first two bytes of the value field */
    if (tiff16(e + 2, le) != 3 || tiff32(e + 4, le) != 1) return 1;
    unsigned v = tiff16(e + 8, le);
    return v >= 1 && v <= 8 ? (int)v : 1;
  }
  return 1;
}

static int check_dims(const char *what, long long w, long long h,
                      const jem_image_limits *lim, char *err, size_t errlen) {
  if (w <= 0 || h <= 0)
    return jem__errf(err, errlen, JEM_EFORMAT, "%s header gives an empty image (%lldx%lld)",
                     what, w, h);
  if (w > lim->max_side || h > lim->max_side)
    return jem__errf(err, errlen, JEM_ETOOBIG,
                     "%s is %lldx%lld pixels; each side may be at most %d", what, w, h,
                     lim->max_side);
  if ((unsigned long long)w * (unsigned long long)h > (unsigned long long)lim->max_pixels)
    return jem__errf(err, errlen, JEM_ETOOBIG,
                     "%s is %lldx%lld = %lld pixels; the limit is %zu pixels", what, w, h,
                     w * h, lim->max_pixels);
  return 0;
}

/* Walks the PNG chunk list: IHDR first with sane values, every chunk length
 * within 2^31-1 and within the data, up to IEND.  stb_image v2.27 trusts
 * chunk lengths when growing its IDAT buffer, so this runs before stb. */
static int png_check(const unsigned char *b, size_t len, const jem_image_limits *lim,
                     img_info *info, char *err, size_t errlen) {
  if (len < 8 + 8 + 13 + 4)
    return jem__errf(err, errlen, JEM_EFORMAT, "PNG data is truncated (%zu bytes, no complete IHDR chunk)", len);
  if (be32(b + 8) != 13 || memcmp(b + 12, "IHDR", 4) != 0)
    return jem__errf(err, errlen, JEM_EFORMAT, "PNG does not start with a valid IHDR chunk");
  uint32_t w = be32(b + 16), h = be32(b + 20);
  int depth = b[24], ctype = b[25];
  int rc = check_dims("PNG image", w, h, lim, err, errlen);
  if (rc) return rc;
  int ok_depth;
  switch (ctype) {
    case 0: ok_depth = depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16; break;
    case 3: ok_depth = depth == 1 || depth == 2 || depth == 4 || depth == 8; break;
    case 2: case 4: case 6: ok_depth = depth == 8 || depth == 16; break;
    default:
      return jem__errf(err, errlen, JEM_EFORMAT, "PNG has an invalid colour type %d", ctype);
  }
  if (!ok_depth)
    return jem__errf(err, errlen, JEM_EFORMAT, "PNG colour type %d cannot have bit depth %d",
                     ctype, depth);
  if (b[26] != 0 || b[27] != 0 || b[28] > 1)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "PNG IHDR has an invalid compression, filter or interlace method");

  size_t pos = 8;
  int n_idat = 0, n_exif = 0;
  info->orient = 1;
  for (;;) {
    if (len - pos < 12)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "PNG data is truncated at byte %zu (no IEND chunk)", pos);
    uint32_t clen = be32(b + pos);
    char type[5];
    for (int i = 0; i < 4; i++) {
      unsigned char c = b[pos + 4 + i];
      type[i] = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ? (char)c : '?';
    }
    type[4] = 0;
    if (clen > 0x7fffffffu)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "PNG chunk '%s' at byte %zu claims %u bytes (more than 2^31-1)", type,
                       pos, clen);
    if ((size_t)clen > len - pos - 12)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "PNG chunk '%s' at byte %zu claims %u bytes but only %zu remain", type,
                       pos, clen, len - pos - 12);
    if (!memcmp(type, "IDAT", 4)) n_idat++;
    if (!memcmp(type, "eXIf", 4) && n_exif++ == 0) { /* PNG allows one; the first counts */
      const unsigned char *d = b + pos + 8;
      size_t dn = clen;
      if (dn >= 6 && !memcmp(d, "Exif\0\0", 6)) { /* some writers keep JPEG's prefix */
        d += 6;
        dn -= 6;
      }
      info->orient = exif_orientation(d, dn);
    }
    pos += 12 + (size_t)clen;
    if (!memcmp(type, "IEND", 4)) break;
  }
  if (n_idat == 0)
    return jem__errf(err, errlen, JEM_EFORMAT, "PNG has no image data (no IDAT chunk)");
  info->fmt = FMT_PNG;
  info->w = (int)w;
  info->h = (int)h;
  info->bits = depth == 16 ? 16 : 8;
  return 0;
}

/* Walks the JPEG marker segments: finds the frame header (SOF0/1/2, the
 * kinds stb_image decodes) and checks its size before anything is decoded,
 * and counts scans so a progressive file cannot make us decode thousands. */
static int jpeg_check(const unsigned char *b, size_t len, const jem_image_limits *lim,
                      img_info *info, char *err, size_t errlen) {
  size_t pos = 2;
  int have_sof = 0, scans = 0, have_exif = 0;
  info->orient = 1;
  while (pos < len) {
    if (b[pos] != 0xff) { /* entropy-coded data (or junk, which stb skips too) */
      pos++;
      continue;
    }
    while (pos < len && b[pos] == 0xff) pos++; /* fill bytes */
    if (pos >= len) break;
    unsigned m = b[pos++];
    if (m == 0x00 || (m >= 0xd0 && m <= 0xd7) || m == 0x01) continue; /* stuffing, RSTn, TEM */
    if (m == 0xd9) break;                                              /* EOI */
    if (m == 0xd8)
      return jem__errf(err, errlen, JEM_EFORMAT, "JPEG has a second start-of-image marker");
    if (len - pos < 2)
      return jem__errf(err, errlen, JEM_EFORMAT, "JPEG data is truncated inside marker 0x%02X", m);
    unsigned seglen = be16(b + pos);
    if (seglen < 2 || seglen > len - pos)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "JPEG marker 0x%02X at byte %zu has length %u but %zu bytes remain", m,
                       pos - 2, seglen, len - pos);
    if (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) {
      if (m != 0xc0 && m != 0xc1 && m != 0xc2)
        return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                         "JPEG uses an unsupported coding process (SOF%u: lossless, "
                         "hierarchical or arithmetic-coded); only baseline and progressive "
                         "Huffman JPEGs are supported", m - 0xc0);
      if (have_sof)
        return jem__errf(err, errlen, JEM_EFORMAT, "JPEG has more than one frame header");
      if (seglen < 8)
        return jem__errf(err, errlen, JEM_EFORMAT, "JPEG frame header is too short");
      unsigned prec = b[pos + 2], h = be16(b + pos + 3), w = be16(b + pos + 5);
      unsigned nc = b[pos + 7];
      if (h == 0)
        return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                         "JPEG defines its height later in the file (DNL), which is not supported");
      int rc = check_dims("JPEG image", w, h, lim, err, errlen);
      if (rc) return rc;
      if (prec != 8)
        return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                         "JPEG has %u-bit samples; only 8-bit JPEGs are supported", prec);
      if (nc != 1 && nc != 3 && nc != 4)
        return jem__errf(err, errlen, JEM_EFORMAT, "JPEG has %u colour components", nc);
      info->w = (int)w;
      info->h = (int)h;
      have_sof = 1;
    } else if (m == 0xc4) {
      /* stb v2.27 builds Huffman tables without checking that the 16 code
       * counts add up to at most 256 and overruns its size list (fixed in
       * v2.28): every table is checked here first. */
      size_t q = pos + 2, end = pos + seglen;
      while (q < end) {
        if (end - q < 17)
          return jem__errf(err, errlen, JEM_EFORMAT, "JPEG Huffman table at byte %zu is truncated", q);
        unsigned tc = b[q] >> 4, th = b[q] & 15, total = 0;
        if (tc > 1 || th > 3)
          return jem__errf(err, errlen, JEM_EFORMAT,
                           "JPEG Huffman table at byte %zu has an invalid class/id 0x%02X", q, b[q]);
        for (int i = 1; i <= 16; i++) total += b[q + (size_t)i];
        if (total > 256)
          return jem__errf(err, errlen, JEM_EFORMAT,
                           "JPEG Huffman table at byte %zu declares %u codes (at most 256)", q, total);
        if (end - q - 17 < total)
          return jem__errf(err, errlen, JEM_EFORMAT, "JPEG Huffman table at byte %zu is truncated", q);
        q += 17 + total;
      }
    } else if (m == 0xe1 && !scans && !have_exif && seglen >= 2 + 6 &&
               !memcmp(b + pos + 2, "Exif\0\0", 6)) {
      /* the first APP1 "Exif\0\0" segment before the first scan (others,
       * e.g. XMP's APP1, are skipped); its length was checked above */
      have_exif = 1;
      info->orient = exif_orientation(b + pos + 2 + 6, seglen - 2 - 6);
    } else if (m == 0xda) {
      if (!have_sof)
        return jem__errf(err, errlen, JEM_EFORMAT, "JPEG scan starts before the frame header");
      if (++scans > IMG_MAX_JPEG_SCANS)
        return jem__errf(err, errlen, JEM_ETOOBIG, "JPEG has more than %d scans",
                         IMG_MAX_JPEG_SCANS);
    }
    pos += seglen;
  }
  if (!have_sof)
    return jem__errf(err, errlen, JEM_EFORMAT, "JPEG has no frame header (truncated or corrupt)");
  if (!scans)
    return jem__errf(err, errlen, JEM_EFORMAT, "JPEG has no image data (no scan)");
  info->fmt = FMT_JPEG;
  info->bits = 8;
  return 0;
}

static int sniff_and_check(const unsigned char *b, size_t len, const jem_image_limits *lim,
                           img_info *info, char *err, size_t errlen) {
  if (len == 0) return jem__errf(err, errlen, JEM_EFORMAT, "image data is empty (0 bytes)");
  if (len > lim->max_bytes)
    return jem__errf(err, errlen, JEM_ETOOBIG, "image data is %zu bytes; the limit is %zu",
                     len, lim->max_bytes);
  if (len >= 8 && !memcmp(b, png_sig, 8)) return png_check(b, len, lim, info, err, errlen);
  if (len < 8 && !memcmp(b, png_sig, len))
    return jem__errf(err, errlen, JEM_EFORMAT, "PNG signature is truncated (%zu bytes)", len);
  if (len >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff)
    return jpeg_check(b, len, lim, info, err, errlen);
  if (len < 3 && b[0] == 0xff && (len == 1 || b[1] == 0xd8))
    return jem__errf(err, errlen, JEM_EFORMAT, "JPEG data is truncated (%zu bytes)", len);
  return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                   "image is not a PNG or JPEG (it looks like %s); only PNG and JPEG are "
                   "accepted", guess_format(b, len));
}

/* The header checks shared by jem_image_dims and jem_image_to_input, with
 * the default limits when lim is NULL. */
static int probe(const void *buf, size_t len, const jem_image_limits *lim, img_info *info,
                 char *err, size_t errlen) {
  jem_image_limits def;
  if (!lim) {
    jem_image_limits_default(&def);
    lim = &def;
  }
  if (!buf && len) return jem__errf(err, errlen, JEM_EINVAL, "image buffer is NULL");
  memset(info, 0, sizeof *info);
  return sniff_and_check(buf, len, lim, info, err, errlen);
}

int jem_image_dims(const void *buf, size_t len, const jem_image_limits *lim, int *w, int *h,
                   char *err, size_t errlen) {
  img_info info;
  int rc = probe(buf, len, lim, &info, err, errlen);
  if (rc) return rc;
  *w = info.w;
  *h = info.h;
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Preprocessing                                                             */

/* Area-average resampling weights along one axis, exact in integers:
 * destination pixel j covers [j*n, (j+1)*n) and source pixel i covers
 * [i*m, (i+1)*m) in units of 1/(n*m) of the image; the weight is the overlap
 * divided by n.  When n == m every weight is exactly 1. */
typedef struct axis_w { int first, count; } axis_w;

static double overlap_w(long long j, long long i, long long n, long long m) {
  long long lo = j * n > i * m ? j * n : i * m;
  long long hi = (j + 1) * n < (i + 1) * m ? (j + 1) * n : (i + 1) * m;
  return (double)(hi - lo) / (double)n;
}

static axis_w axis_span(long long j, long long n, long long m) {
  axis_w a;
  a.first = (int)(j * n / m);
  int last = (int)(((j + 1) * n - 1) / m);
  a.count = last - a.first + 1;
  return a;
}

static int check_pre(const jem_preprocess *p, int image_size, int *rw, int *rh, char *err,
                     size_t errlen) {
  if (p->channels != 1 && p->channels != 3)
    return jem__errf(err, errlen, JEM_EINVAL, "preprocess channels must be 1 or 3, not %d",
                     p->channels);
  if (image_size < 1 || p->pad < 0 || 2 * p->pad >= image_size)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "preprocess pad %d does not fit the model input size %d", p->pad,
                     image_size);
  *rw = p->resize_w > 0 ? p->resize_w : image_size - 2 * p->pad;
  *rh = p->resize_h > 0 ? p->resize_h : image_size - 2 * p->pad;
  if (*rw + 2 * p->pad != image_size || *rh + 2 * p->pad != image_size)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "preprocess resize %dx%d plus padding %d does not give the model input "
                     "size %d", *rw, *rh, p->pad, image_size);
  if (!isfinite(p->range_lo) || !isfinite(p->range_hi) || !isfinite(p->pad_value) ||
      !isfinite(p->background))
    return jem__errf(err, errlen, JEM_EINVAL, "preprocess values must be finite numbers");
  return 0;
}

/* Decoded pixels, RGBA, 8 or 16 bits per sample. */
typedef struct pixels {
  const unsigned char *p8;
  const uint16_t *p16;
  int w, h;
} pixels;

/* Source row y -> C values per pixel in [0,1]: alpha composited over the
 * background, then grey (BT.601 luma unless R=G=B) or RGB. */
static void source_row(const pixels *px, int y, int c, double bg, double *row) {
  for (int x = 0; x < px->w; x++) {
    size_t k = ((size_t)y * (size_t)px->w + (size_t)x) * 4;
    double v[4];
    int opaque;
    if (px->p16) {
      for (int i = 0; i < 4; i++) v[i] = px->p16[k + i] / 65535.0;
      opaque = px->p16[k + 3] == 65535;
    } else {
      for (int i = 0; i < 4; i++) v[i] = px->p8[k + i] / 255.0;
      opaque = px->p8[k + 3] == 255;
    }
    if (!opaque) /* skipped when opaque so that exact values stay exact */
      for (int i = 0; i < 3; i++) v[i] = v[i] * v[3] + bg * (1.0 - v[3]);
    if (c == 1) {
      row[x] = (v[0] == v[1] && v[1] == v[2]) ? v[0]
                                              : 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
    } else {
      for (int i = 0; i < 3; i++) row[(size_t)x * 3 + (size_t)i] = v[i];
    }
  }
}

/* Resize (area average), invert, pad, and map [0,1] -> [lo,hi] into out. */
static int preprocess(const pixels *px, const jem_preprocess *p, int image_size, int rw,
                      int rh, float *out, char *err, size_t errlen) {
  int c = p->channels, w = px->w, h = px->h;
  double *row = malloc((size_t)w * (size_t)c * sizeof(double));
  double *hb = malloc((size_t)h * (size_t)rw * (size_t)c * sizeof(double));
  if (!row || !hb) {
    free(row);
    free(hb);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory while resizing a %dx%d image", w, h);
  }
  /* horizontal pass, row by row */
  for (int y = 0; y < h; y++) {
    source_row(px, y, c, p->background, row);
    double *dst = hb + (size_t)y * (size_t)rw * (size_t)c;
    for (int j = 0; j < rw; j++) {
      axis_w a = axis_span(j, w, rw);
      for (int ch = 0; ch < c; ch++) {
        double acc = 0;
        for (int i = a.first; i < a.first + a.count; i++)
          acc += row[(size_t)i * (size_t)c + (size_t)ch] * overlap_w(j, i, w, rw);
        dst[(size_t)j * (size_t)c + (size_t)ch] = acc;
      }
    }
  }
  double lo = p->range_lo, hi = p->range_hi;
  size_t plane = (size_t)image_size * (size_t)image_size;
  float padv = (float)(lo + (hi - lo) * (double)p->pad_value);
  for (int ch = 0; ch < c; ch++)
    for (size_t k = 0; k < plane; k++) out[(size_t)ch * plane + k] = padv;
  /* vertical pass */
  for (int jy = 0; jy < rh; jy++) {
    axis_w a = axis_span(jy, h, rh);
    for (int jx = 0; jx < rw; jx++) {
      for (int ch = 0; ch < c; ch++) {
        double acc = 0;
        for (int i = a.first; i < a.first + a.count; i++)
          acc += hb[((size_t)i * (size_t)rw + (size_t)jx) * (size_t)c + (size_t)ch] *
                 overlap_w(jy, i, h, rh);
        if (acc < 0) acc = 0;
        if (acc > 1) acc = 1;
        if (p->invert) acc = 1.0 - acc;
        size_t o = (size_t)ch * plane + (size_t)(jy + p->pad) * (size_t)image_size +
                   (size_t)(jx + p->pad);
        out[o] = (float)(lo + (hi - lo) * acc);
      }
    }
  }
  free(row);
  free(hb);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Orientation                                                               */

/* Swaps n bytes, in pieces through a small buffer. */
static void swap_bytes(unsigned char *a, unsigned char *b, size_t n) {
  unsigned char t[256];
  while (n) {
    size_t k = n < sizeof t ? n : sizeof t;
    memcpy(t, a, k);
    memcpy(a, b, k);
    memcpy(b, t, k);
    a += k;
    b += k;
    n -= k;
  }
}

/* Swaps two pixels of ps (4 or 8) bytes. */
static void swap_px(unsigned char *a, unsigned char *b, size_t ps) {
  if (ps == 4) {
    uint32_t x, y;
    memcpy(&x, a, 4);
    memcpy(&y, b, 4);
    memcpy(a, &y, 4);
    memcpy(b, &x, 4);
  } else {
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, b, 8);
    memcpy(a, &y, 8);
    memcpy(b, &x, 8);
  }
}

/* Turns decoded pixels (w x h, ps bytes each) upright for EXIF orientation o,
 * the transform PIL's ImageOps.exif_transpose applies:
 *   2 mirror left-right   3 rotate 180       4 flip top-bottom
 *   5 transpose           6 rotate 90 cw     7 transverse     8 rotate 90 ccw
 * 2-4 work in place.  5-8 swap width and height, so they write into one new
 * buffer of the same size (from the decode budget) that replaces *data.
 * The header checks still hold afterwards: the area is unchanged and both
 * sides were checked against the same per-side limit.  Returns 0, or -1 when
 * the new buffer cannot be had (*data is then unchanged). */
static int orient_pixels(unsigned char **data, int *w, int *h, size_t ps, int o) {
  unsigned char *d = *data;
  size_t iw = (size_t)*w, ih = (size_t)*h, row = iw * ps;
  switch (o) {
    case 2:
      for (size_t y = 0; y < ih; y++)
        for (size_t x = 0; x < iw / 2; x++)
          swap_px(d + y * row + x * ps, d + y * row + (iw - 1 - x) * ps, ps);
      return 0;
    case 3: {
      size_t n = iw * ih;
      for (size_t i = 0; i < n / 2; i++) swap_px(d + i * ps, d + (n - 1 - i) * ps, ps);
      return 0;
    }
    case 4:
      for (size_t y = 0; y < ih / 2; y++) swap_bytes(d + y * row, d + (ih - 1 - y) * row, row);
      return 0;
    case 5: case 6: case 7: case 8:
      break;
    default:
      return 0;
  }
  unsigned char *t = img_malloc(iw * ih * ps);
  if (!t) return -1;
  size_t ow = ih, oh = iw; /* output size */
  /* Output pixel (x, y) comes from source (sx, sy): sx runs along the output
   * rows and sy along its columns, forwards or backwards.  Done in 32x32
   * tiles so that the strided side stays in cache. */
  int sx_rev = o == 7 || o == 8, sy_rev = o == 6 || o == 7;
  for (size_t by = 0; by < oh; by += 32)
    for (size_t bx = 0; bx < ow; bx += 32)
      for (size_t y = by; y < oh && y < by + 32; y++) {
        size_t sx = sx_rev ? iw - 1 - y : y, xe = bx + 32 < ow ? bx + 32 : ow;
        unsigned char *dst = t + y * ow * ps;
        const unsigned char *src = d + sx * ps;
        /* constant sizes, so each copy is one load and store */
        if (ps == 4)
          for (size_t x = bx; x < xe; x++)
            memcpy(dst + x * 4, src + (sy_rev ? ih - 1 - x : x) * row, 4);
        else
          for (size_t x = bx; x < xe; x++)
            memcpy(dst + x * 8, src + (sy_rev ? ih - 1 - x : x) * row, 8);
      }
  img_free(d);
  *data = t;
  *w = (int)ow;
  *h = (int)oh;
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Decode                                                                    */

int jem_image_to_input(const void *buf, size_t len, const jem_preprocess *p, int image_size,
                       const jem_image_limits *lim, float *out, char *err, size_t errlen) {
  int rw = 0, rh = 0;
  int rc = check_pre(p, image_size, &rw, &rh, err, errlen);
  if (rc) return rc;
  const unsigned char *b = buf;
  img_info info;
  rc = probe(buf, len, lim, &info, err, errlen);
  if (rc) return rc;
  if (len > INT_MAX) /* stb takes an int length; max_bytes is far below */
    return jem__errf(err, errlen, JEM_ETOOBIG, "image data is %zu bytes", len);

  /* Budget: raw scanlines, interlace passes, colour conversion and output
   * at up to 8 bytes per sample, plus the compressed data copies. */
  size_t area = (size_t)info.w * (size_t)info.h;
  img_used = 0;
  img_refused = 0;
  img_cap = area * 48 + 4 * len + ((size_t)8 << 20);

  int w = 0, h = 0, n = 0;
  pixels px;
  memset(&px, 0, sizeof px);
  unsigned char *data;
  /* 16-bit PNGs are decoded at 16 bits: stb's own 16->8 conversion
   * (stbi__convert_16_to_8) overflows its buffer in v2.27.  Always 4
   * components (RGBA) requested, whatever the file holds. */
  if (info.bits == 16)
    data = (unsigned char *)stbi_load_16_from_memory(b, (int)len, &w, &h, &n, 4);
  else
    data = stbi_load_from_memory(b, (int)len, &w, &h, &n, 4);
  if (!data) {
    /* stb's own reasons ("bad png sig", ...) are not for clients (security.md) */
    int budget = img_refused;
    img_cap = 0;
    if (budget)
      return jem__errf(err, errlen, JEM_ETOOBIG,
                       "the %s image needs more memory to decode than its %dx%d size allows",
                       info.fmt == FMT_PNG ? "PNG" : "JPEG", info.w, info.h);
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "could not decode the %s image data (corrupt or truncated)",
                     info.fmt == FMT_PNG ? "PNG" : "JPEG");
  }
  if (w != info.w || h != info.h) {
    stbi_image_free(data);
    img_cap = 0;
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "decoded image size %dx%d differs from its header (%dx%d)", w, h,
                     info.w, info.h);
  }
  if (orient_pixels(&data, &w, &h, info.bits == 16 ? 8 : 4, info.orient)) {
    stbi_image_free(data);
    img_cap = 0;
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory while rotating a %dx%d image",
                     info.w, info.h);
  }
  if (info.bits == 16)
    px.p16 = (const uint16_t *)(const void *)data;
  else
    px.p8 = data;
  px.w = w;
  px.h = h;
  rc = preprocess(&px, p, image_size, rw, rh, out, err, errlen);
  stbi_image_free(data);
  img_cap = 0;
  return rc;
}

/* ------------------------------------------------------------------------ */
/* PNG output                                                                */

typedef struct png_sink { unsigned char *buf; size_t len; int failed; } png_sink;

static void png_write(void *ctx, void *data, int size) {
  png_sink *s = ctx;
  if (s->failed || size <= 0) return;
  unsigned char *nb = realloc(s->buf, s->len + (size_t)size);
  if (!nb) {
    s->failed = 1;
    return;
  }
  memcpy(nb + s->len, data, (size_t)size);
  s->buf = nb;
  s->len += (size_t)size;
}

#define GRID_BORDER 2
#define GRID_BORDER_VALUE 255

unsigned char *jem_png_grid(const float *x, int n, int c, int s, int cols, float lo, float hi,
                            size_t *out_len) {
  if (out_len) *out_len = 0;
  if (!x || n < 1 || (c != 1 && c != 3) || s < 1 || cols < 1 || !(hi > lo) ||
      s > 65536)
    return NULL;
  if (cols > n) cols = n;
  int rows = (n + cols - 1) / cols;
  int border = (n == 1 && cols == 1) ? 0 : GRID_BORDER;
  long long gw = (long long)cols * s + (long long)(cols + 1) * border;
  long long gh = (long long)rows * s + (long long)(rows + 1) * border;
  if (gw > 32768 || gh > 32768) return NULL;
  size_t npx = (size_t)gw * (size_t)gh * (size_t)c;
  unsigned char *img = malloc(npx);
  if (!img) return NULL;
  memset(img, GRID_BORDER_VALUE, npx);
  size_t plane = (size_t)s * (size_t)s;
  for (int k = 0; k < n; k++) {
    int r = k / cols, q = k % cols;
    long long y0 = border + (long long)r * (s + border), x0 = border + (long long)q * (s + border);
    const float *src = x + (size_t)k * (size_t)c * plane;
    for (int y = 0; y < s; y++)
      for (int xx = 0; xx < s; xx++)
        for (int ch = 0; ch < c; ch++) {
          float v = src[(size_t)ch * plane + (size_t)y * (size_t)s + (size_t)xx];
          double t = ((double)v - lo) / ((double)hi - lo) * 255.0;
          unsigned char u;
          if (!(t > 0)) u = 0; /* also NaN */
          else if (t >= 255) u = 255;
          else u = (unsigned char)lrint(t);
          img[(((size_t)(y0 + y)) * (size_t)gw + (size_t)(x0 + xx)) * (size_t)c + (size_t)ch] = u;
        }
  }
  png_sink sink = {NULL, 0, 0};
  int ok = stbi_write_png_to_func(png_write, &sink, (int)gw, (int)gh, c, img, (int)gw * c);
  free(img);
  if (!ok || sink.failed) {
    free(sink.buf);
    return NULL;
  }
  if (out_len) *out_len = sink.len;
  return sink.buf;
}
