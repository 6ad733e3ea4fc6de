/* data.c - IDX (MNIST-family) readers, datasets in model space, the fixed
 * validation split and the Fashion-MNIST loader. */
#include "train.h"
#include "internal.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

const char *const jem_fmnist_classes[10] = {
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

uint64_t jem_splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* ------------------------------------------------------------------------ */
/* IDX                                                                      */

void jem_idx_free(jem_idx *x) {
  if (!x) return;
  free(x->data);
  memset(x, 0, sizeof *x);
}

int jem_idx_parse(const void *buf, size_t len, size_t max_bytes, jem_idx *out,
                  char *err, size_t errlen) {
  const unsigned char *p = buf;
  memset(out, 0, sizeof *out);
  if (max_bytes == 0) max_bytes = JEM_IDX_MAX_BYTES;
  if (!p || len < 4)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "not an IDX file: %zu bytes, shorter than the 4-byte magic",
                     len);
  if (p[0] != 0 || p[1] != 0)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "not an IDX file: magic starts %02x %02x, expected 00 00",
                     p[0], p[1]);
  if (p[2] != 0x08)
    return jem__errf(err, errlen, JEM_EUNSUPPORTED,
                     "IDX data type 0x%02x is not supported (only 0x08, "
                     "unsigned byte)", p[2]);
  int ndim = p[3];
  if (ndim < 1 || ndim > JEM_IDX_MAX_DIMS)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "IDX file has %d dimensions (1..%d supported)", ndim,
                     JEM_IDX_MAX_DIMS);
  size_t hdr = 4 + 4 * (size_t)ndim;
  if (len < hdr)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "IDX header truncated: %zu bytes, need %zu for %d "
                     "dimensions", len, hdr, ndim);
  size_t count = 1;
  for (int i = 0; i < ndim; i++) {
    const unsigned char *d = p + 4 + 4 * i;
    uint32_t v = (uint32_t)d[0] << 24 | (uint32_t)d[1] << 16 |
                 (uint32_t)d[2] << 8 | d[3];
    if (v == 0 || v > INT_MAX)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "IDX dimension %d is %u (must be 1..%d)", i, v, INT_MAX);
    if (count > max_bytes / v)
      return jem__errf(err, errlen, JEM_ETOOBIG,
                       "IDX tensor is larger than the limit of %zu bytes",
                       max_bytes);
    count *= v;
    out->dims[i] = (int)v;
  }
  if (len - hdr != count)
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "IDX payload is %zu bytes but the header's dimensions "
                     "need %zu", len - hdr, count);
  out->data = malloc(count);
  if (!out->data) {
    memset(out, 0, sizeof *out);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory (%zu bytes)",
                     count);
  }
  memcpy(out->data, p + hdr, count);
  out->ndim = ndim;
  out->count = count;
  return 0;
}

int jem_idx_load(const char *path, size_t max_bytes, jem_idx *out, char *err,
                 size_t errlen) {
  memset(out, 0, sizeof *out);
  if (max_bytes == 0) max_bytes = JEM_IDX_MAX_BYTES;
  /* The payload plus the largest header; one byte more means too big. */
  size_t cap = max_bytes + 4 + 4 * JEM_IDX_MAX_DIMS;
  errno = 0;
  gzFile gz = gzopen(path, "rb"); /* reads raw files transparently */
  if (!gz)
    return jem__errf(err, errlen, JEM_EIO, "cannot open %s: %s", path,
                     errno ? strerror(errno) : "out of memory");
  gzbuffer(gz, 1 << 17);
  size_t size = 0, alloc = 1 << 16;
  unsigned char *buf = malloc(alloc);
  int rc = 0;
  if (!buf) {
    rc = jem__errf(err, errlen, JEM_ENOMEM, "out of memory reading %s", path);
    goto done;
  }
  for (;;) {
    if (size == alloc) {
      if (alloc > cap) {
        rc = jem__errf(err, errlen, JEM_ETOOBIG,
                       "%s: decompressed data exceeds the limit of %zu bytes",
                       path, max_bytes);
        goto done;
      }
      size_t na = alloc * 2;
      if (na > cap + 1) na = cap + 1;
      unsigned char *nb = realloc(buf, na);
      if (!nb) {
        rc = jem__errf(err, errlen, JEM_ENOMEM, "out of memory reading %s",
                       path);
        goto done;
      }
      buf = nb;
      alloc = na;
    }
    size_t want = alloc - size;
    if (want > (1u << 30)) want = 1u << 30;
    int got = gzread(gz, buf + size, (unsigned)want);
    if (got < 0) {
      int zerr;
      const char *msg = gzerror(gz, &zerr);
      rc = jem__errf(err, errlen, zerr == Z_ERRNO ? JEM_EIO : JEM_EFORMAT,
                     "%s: read failed: %s", path,
                     zerr == Z_ERRNO ? strerror(errno) : msg);
      goto done;
    }
    if (got == 0) break;
    size += (size_t)got;
  }
  {
    /* A truncated gzip stream ends the reads early with an error state. */
    int zerr;
    const char *msg = gzerror(gz, &zerr);
    if (zerr != Z_OK && zerr != Z_STREAM_END) {
      rc = jem__errf(err, errlen, JEM_EFORMAT, "%s: corrupt gzip data: %s",
                     path, msg);
      goto done;
    }
  }
  if (size > cap) {
    rc = jem__errf(err, errlen, JEM_ETOOBIG,
                   "%s: decompressed data exceeds the limit of %zu bytes", path,
                   max_bytes);
    goto done;
  }
  rc = jem_idx_parse(buf, size, max_bytes, out, err, errlen);
  if (rc && err && errlen) {
    /* Prefix the file name to the parser's sentence. */
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s: %s", path, err);
    snprintf(err, errlen, "%s", tmp);
  }
done:
  free(buf);
  gzclose(gz);
  return rc;
}

/* ------------------------------------------------------------------------ */
/* Datasets                                                                 */

void jem_dataset_free(jem_dataset *d) {
  if (!d) return;
  free(d->x);
  free(d->y);
  free(d->index);
  memset(d, 0, sizeof *d);
}

int jem_dataset_from_idx(jem_dataset *out, const jem_idx *im,
                         const jem_idx *lab, int image_size, int max_items,
                         char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  int n = im->dims[0], c, h, w, chw_order;
  if (im->ndim == 3) {
    c = 1; h = im->dims[1]; w = im->dims[2]; chw_order = 1;
  } else if (im->ndim == 4 && (im->dims[1] == 1 || im->dims[1] == 3)) {
    c = im->dims[1]; h = im->dims[2]; w = im->dims[3]; chw_order = 1;
  } else if (im->ndim == 4 && (im->dims[3] == 1 || im->dims[3] == 3)) {
    h = im->dims[1]; w = im->dims[2]; c = im->dims[3]; chw_order = 0;
  } else {
    return jem__errf(err, errlen, JEM_ESHAPE,
                     "images IDX must be [N,H,W], [N,C,H,W] or [N,H,W,C] "
                     "with C 1 or 3 (got %d dimensions)", im->ndim);
  }
  if (h != w)
    return jem__errf(err, errlen, JEM_ESHAPE,
                     "images must be square (got %dx%d)", h, w);
  if (image_size < 1 || h > image_size || (image_size - h) % 2)
    return jem__errf(err, errlen, JEM_ESHAPE,
                     "%dx%d images cannot be padded evenly to %dx%d", h, w,
                     image_size, image_size);
  if (lab) {
    if (lab->ndim != 1)
      return jem__errf(err, errlen, JEM_ESHAPE,
                       "labels IDX must have 1 dimension (got %d)", lab->ndim);
    if (lab->dims[0] != n)
      return jem__errf(err, errlen, JEM_ESHAPE,
                       "%d labels for %d images", lab->dims[0], n);
  }
  if (max_items > 0 && max_items < n) n = max_items;
  int s = image_size, pad = (s - h) / 2;
  size_t chw = (size_t)c * s * s;
  out->x = jem__falloc((size_t)n * chw);
  out->index = malloc((size_t)n * sizeof(int));
  if (lab) out->y = malloc((size_t)n * sizeof(int));
  if (!out->x || !out->index || (lab && !out->y)) {
    jem_dataset_free(out);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for %d images",
                     n);
  }
  out->n = n;
  out->c = c;
  out->s = s;
  out->src_s = h;
  for (int i = 0; i < n; i++) {
    float *dst = out->x + (size_t)i * chw;
    const unsigned char *src = im->data + (size_t)i * c * h * w;
    for (size_t k = 0; k < chw; k++) dst[k] = -1.0f; /* background */
    for (int ch = 0; ch < c; ch++)
      for (int r = 0; r < h; r++)
        for (int q = 0; q < w; q++) {
          unsigned v = chw_order ? src[((size_t)ch * h + r) * w + q]
                                 : src[((size_t)r * w + q) * c + ch];
          dst[((size_t)ch * s + r + pad) * s + q + pad] =
              (float)v * (2.0f / 255.0f) - 1.0f;
        }
    out->index[i] = i;
    if (lab) {
      out->y[i] = lab->data[i];
      if (out->y[i] + 1 > out->num_classes) out->num_classes = out->y[i] + 1;
    }
  }
  return 0;
}

int jem_dataset_load(jem_dataset *out, const char *images_path,
                     const char *labels_path, int image_size, int max_items,
                     char *err, size_t errlen) {
  jem_idx im, lab;
  memset(out, 0, sizeof *out);
  memset(&lab, 0, sizeof lab);
  int rc = jem_idx_load(images_path, 0, &im, err, errlen);
  if (rc) return rc;
  if (labels_path) {
    rc = jem_idx_load(labels_path, 0, &lab, err, errlen);
    if (rc) {
      jem_idx_free(&im);
      return rc;
    }
  }
  rc = jem_dataset_from_idx(out, &im, labels_path ? &lab : NULL, image_size,
                            max_items, err, errlen);
  if (rc && err && errlen) {
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s: %s", images_path, err);
    snprintf(err, errlen, "%s", tmp);
  }
  jem_idx_free(&im);
  jem_idx_free(&lab);
  return rc;
}

int jem_dataset_concat(const jem_dataset *parts, int nparts, jem_dataset *out,
                       char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  long total = 0;
  for (int p = 0; p < nparts; p++) {
    if (parts[p].c != parts[0].c || parts[p].s != parts[0].s)
      return jem__errf(err, errlen, JEM_ESHAPE, "images of different shapes cannot be joined");
    total += parts[p].n;
  }
  if (nparts < 1 || total < 1 || total > INT_MAX)
    return jem__errf(err, errlen, JEM_EINVAL, "nothing to join (%ld images)", total);
  size_t chw = (size_t)parts[0].c * parts[0].s * parts[0].s;
  out->x = jem__falloc((size_t)total * chw);
  if (!out->x) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for %ld images", total);
  out->n = (int)total;
  out->c = parts[0].c;
  out->s = parts[0].s;
  out->src_s = parts[0].src_s;
  size_t at = 0;
  for (int p = 0; p < nparts; p++) {
    memcpy(out->x + at, parts[p].x, (size_t)parts[p].n * chw * sizeof(float));
    at += (size_t)parts[p].n * chw;
  }
  return 0;
}

int jem_dataset_subset(const jem_dataset *src, const int *idx, int n,
                       jem_dataset *out, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  if (n < 0)
    return jem__errf(err, errlen, JEM_EINVAL, "negative subset size %d", n);
  size_t chw = (size_t)src->c * src->s * src->s;
  out->x = jem__falloc((size_t)(n ? n : 1) * chw);
  out->index = malloc((size_t)(n ? n : 1) * sizeof(int));
  if (src->y) out->y = malloc((size_t)(n ? n : 1) * sizeof(int));
  if (!out->x || !out->index || (src->y && !out->y)) {
    jem_dataset_free(out);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for %d images",
                     n);
  }
  out->n = n;
  out->c = src->c;
  out->s = src->s;
  out->src_s = src->src_s;
  out->num_classes = src->num_classes;
  for (int i = 0; i < n; i++) {
    int j = idx[i];
    if (j < 0 || j >= src->n) {
      jem_dataset_free(out);
      return jem__errf(err, errlen, JEM_EINVAL,
                       "subset index %d out of range 0..%d", j, src->n - 1);
    }
    memcpy(out->x + (size_t)i * chw, src->x + (size_t)j * chw,
           chw * sizeof(float));
    out->index[i] = src->index ? src->index[j] : j;
    if (src->y) out->y[i] = src->y[j];
  }
  return 0;
}

int jem_dataset_split(const jem_dataset *src, int n_valid, uint64_t seed,
                      jem_dataset *train, jem_dataset *valid, char *err,
                      size_t errlen) {
  if (train) memset(train, 0, sizeof *train);
  if (valid) memset(valid, 0, sizeof *valid);
  if (n_valid <= 0 || n_valid >= src->n)
    return jem__errf(err, errlen, JEM_EINVAL,
                     "validation size %d must be in 1..%d", n_valid,
                     src->n - 1);
  int n = src->n;
  int *perm = malloc((size_t)n * sizeof(int));
  unsigned char *is_valid = calloc((size_t)n, 1);
  int *tr = malloc((size_t)n * sizeof(int));
  int *va = malloc((size_t)n * sizeof(int));
  int rc = 0;
  if (!perm || !is_valid || !tr || !va) {
    rc = jem__errf(err, errlen, JEM_ENOMEM, "out of memory splitting %d", n);
    goto done;
  }
  for (int i = 0; i < n; i++) perm[i] = i;
  uint64_t st = seed;
  for (int i = n - 1; i > 0; i--) {
    /* Unbiased enough: 64-bit draw modulo i+1 <= 2^31 (bias < 2^-32). */
    int j = (int)(jem_splitmix64(&st) % (uint64_t)(i + 1));
    int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
  }
  for (int i = 0; i < n_valid; i++) is_valid[perm[i]] = 1;
  int ntr = 0, nva = 0;
  for (int i = 0; i < n; i++) {
    if (is_valid[i]) va[nva++] = i;
    else tr[ntr++] = i;
  }
  if (train && (rc = jem_dataset_subset(src, tr, ntr, train, err, errlen)))
    goto done;
  if (valid && (rc = jem_dataset_subset(src, va, nva, valid, err, errlen))) {
    if (train) jem_dataset_free(train);
    goto done;
  }
done:
  free(perm);
  free(is_valid);
  free(tr);
  free(va);
  return rc;
}

/* ------------------------------------------------------------------------ */
/* CIFAR-10 binary files                                                    */

const char *const jem_cifar10_classes[10] = {"airplane", "automobile", "bird", "cat", "deer",
                                             "dog", "frog", "horse", "ship", "truck"};

#define CIFAR_REC 3073 /* one label byte, then 3x32x32 pixel bytes, R, G, B planes */

int jem_cifar10_parse(jem_dataset *out, const unsigned char *const *bufs, const size_t *lens,
                      int nfiles, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  size_t n = 0;
  for (int f = 0; f < nfiles; f++) {
    if (lens[f] == 0 || lens[f] % CIFAR_REC)
      return jem__errf(err, errlen, JEM_EFORMAT,
                       "CIFAR-10 file %d has %zu bytes, not a positive multiple of %d (one "
                       "label byte and 3,072 pixel bytes per image)", f + 1, lens[f], CIFAR_REC);
    n += lens[f] / CIFAR_REC;
  }
  if (n == 0 || n > (size_t)1 << 24)
    return jem__errf(err, errlen, JEM_EFORMAT, "CIFAR-10: %zu images", n);
  const size_t chw = 3 * 32 * 32;
  out->x = jem__falloc(n * chw);
  out->y = malloc(n * sizeof(int));
  out->index = malloc(n * sizeof(int));
  if (!out->x || !out->y || !out->index) {
    jem_dataset_free(out);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory for %zu CIFAR-10 images", n);
  }
  size_t i = 0;
  for (int f = 0; f < nfiles; f++)
    for (size_t r = 0; r < lens[f] / CIFAR_REC; r++, i++) {
      const unsigned char *rec = bufs[f] + r * CIFAR_REC;
      if (rec[0] > 9) {
        jem_dataset_free(out);
        return jem__errf(err, errlen, JEM_EFORMAT,
                         "CIFAR-10 file %d, image %zu: label %d is not 0..9 (a CIFAR-100 "
                         "file has two label bytes)", f + 1, r, rec[0]);
      }
      out->y[i] = rec[0];
      out->index[i] = (int)i;
      for (size_t k = 0; k < chw; k++) out->x[i * chw + k] = (float)rec[1 + k] * (2.0f / 255.0f) - 1.0f;
    }
  out->n = (int)n;
  out->c = 3;
  out->s = 32;
  out->src_s = 32;
  out->num_classes = 10;
  return 0;
}

/* The CIFAR-10 files of dir for a split: data_batch_1..5.bin (those
 * present, at least one) or test_batch.bin.  Returns the count. */
static int cifar_files(const char *dir, int split, char paths[5][1024]) {
  int n = 0;
  struct stat st;
  if (split == JEM_SPLIT_TEST) {
    snprintf(paths[0], 1024, "%s/test_batch.bin", dir);
    return stat(paths[0], &st) == 0;
  }
  for (int b = 1; b <= 5; b++) {
    snprintf(paths[n], 1024, "%s/data_batch_%d.bin", dir, b);
    if (stat(paths[n], &st) == 0) n++;
  }
  return n;
}

int jem_cifar10_dir(const char *dir) {
  char p[5][1024];
  return dir && (cifar_files(dir, JEM_SPLIT_TRAIN, p) > 0 || cifar_files(dir, JEM_SPLIT_TEST, p) > 0);
}

static int cifar10_load(const char *dir, int split, jem_dataset *out, char *err, size_t errlen) {
  char paths[5][1024];
  unsigned char *bufs[5] = {0};
  size_t lens[5] = {0};
  const int nf = cifar_files(dir, split, paths);
  if (nf == 0)
    return jem__errf(err, errlen, JEM_EIO, "%s: no %s (CIFAR-10 binary files)", dir,
                     split == JEM_SPLIT_TEST ? "test_batch.bin" : "data_batch_N.bin");
  int rc = 0;
  for (int f = 0; f < nf && !rc; f++)
    rc = jem_read_file(paths[f], (size_t)1 << 30, &bufs[f], &lens[f], err, errlen);
  if (!rc) {
    rc = jem_cifar10_parse(out, (const unsigned char *const *)bufs, lens, nf, err, errlen);
    if (rc && err && errlen) {
      char tmp[512];
      snprintf(tmp, sizeof tmp, "%s: %s", dir, err);
      snprintf(err, errlen, "%s", tmp);
    }
  }
  for (int f = 0; f < nf; f++) free(bufs[f]);
  return rc;
}

int jem_fmnist_load(const char *dir, int split, jem_dataset *out, char *err,
                    size_t errlen) {
  memset(out, 0, sizeof *out);
  if (!dir) dir = getenv("JEM_FMNIST_DIR");
  if (!dir || !*dir) dir = JEM_FMNIST_DIR_DEFAULT;
  const int cifar = jem_cifar10_dir(dir);
  const char *pre;
  switch (split) {
    case JEM_SPLIT_TRAIN: case JEM_SPLIT_VALID: case JEM_SPLIT_TRAIN_ALL:
      pre = "train"; break;
    case JEM_SPLIT_TEST: pre = "t10k"; break;
    default:
      return jem__errf(err, errlen, JEM_EINVAL, "unknown split %d", split);
  }
  char ip[1024], lp[1024];
  snprintf(ip, sizeof ip, "%s/%s-images-idx3-ubyte.gz", dir, pre);
  snprintf(lp, sizeof lp, "%s/%s-labels-idx1-ubyte.gz", dir, pre);
  if (cifar) snprintf(ip, sizeof ip, "%s/data_batch_N.bin", dir);
  jem_dataset all;
  int rc = cifar ? cifar10_load(dir, split, &all, err, errlen)
                 : jem_dataset_load(&all, ip, lp, 32, 0, err, errlen);
  if (rc) return rc;
  if (all.num_classes > 10) {
    jem_dataset_free(&all);
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "%s: label above 9 in Fashion-MNIST labels", lp);
  }
  all.num_classes = 10;
  if (split == JEM_SPLIT_TRAIN_ALL || split == JEM_SPLIT_TEST) {
    *out = all;
    return 0;
  }
  if (all.n <= JEM_VALID_N) {
    jem_dataset_free(&all);
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "%s has %d images, too few for a %d-image validation "
                     "split", ip, all.n, JEM_VALID_N);
  }
  rc = jem_dataset_split(&all, JEM_VALID_N, JEM_VALID_SEED,
                         split == JEM_SPLIT_TRAIN ? out : NULL,
                         split == JEM_SPLIT_VALID ? out : NULL, err, errlen);
  if (!rc) out->num_classes = 10;
  jem_dataset_free(&all);
  return rc;
}
