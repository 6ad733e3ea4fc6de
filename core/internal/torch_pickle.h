/* torch_pickle.h - what the torch.save reader (core/torchload.c) and its
 * restricted unpickler (core/torch_pickle.c) share: element types, the
 * values the unpickler builds, the storages they name and the reader's
 * state.  Internal. */
#ifndef JEM_TORCH_PICKLE_H
#define JEM_TORCH_PICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "torchload.h"

/* ------------------------------------------------------------------------ */
/* Element types                                                            */

enum { DT_F32, DT_F64, DT_F16, DT_BF16, DT_I64, DT_I32, DT_I16, DT_I8, DT_U8, DT_BOOL,
       N_DTYPES };
typedef struct jem__tl_dtype {
  const char *storage, *name; /* "FloatStorage", "float32" */
  size_t size;                /* bytes of one element */
} jem__tl_dtype;
extern const jem__tl_dtype jem__tl_dtypes[N_DTYPES];

/* An n-byte little-endian unsigned integer. */
static inline uint64_t jem__rd_le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/* ------------------------------------------------------------------------ */
/* Values the unpickler builds                                              */

enum { V_NONE, V_BOOL, V_INT, V_BIGINT, V_FLOAT, V_STR, V_BYTES, V_LIST, V_TUPLE, V_DICT,
       V_GLOBAL, V_STORAGE, V_TENSOR };

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

/* The reader's state: the file, every value built (freed by the reader), the
 * storage table, buffers of inflated zip entries, the error buffer. */
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

/* Unpickles [*pos, end) of p0 (the file, or an inflated zip entry);
 * advances *pos past the STOP; *out gets the root value, owned by t.
 * Persistent ids (storages) only with persid != 0: the object pickle.
 * what names the pickle in error messages. */
int jem__tl_unpickle(tl *t, const char *what, const unsigned char *p0, size_t *pos,
                     size_t end, int persid, val **out);

/* v is the string s. */
int jem__tl_str_is(const val *v, const char *s);

/* A string from the file made safe for a message: at most 60 bytes, no
 * control characters. */
const char *jem__tl_safe(const unsigned char *s, size_t n, char buf[72]);

#endif
