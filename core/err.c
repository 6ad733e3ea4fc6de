/* err.c - error codes, their names and messages, and the always-on assert. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *jem_strerror(int code) {
  switch (code) {
#define XX(name, val, msg) case JEM_##name: return msg;
    JEM_ERRNO_MAP(XX)
#undef XX
  }
  return "unknown error";
}

const char *jem_err_name(int code) {
  switch (code) {
#define XX(name, val, msg) case JEM_##name: return #name;
    JEM_ERRNO_MAP(XX)
#undef XX
  }
  return "EUNKNOWN";
}

void jem__assert_fail(const char *expr, const char *file, int line) {
  fprintf(stderr, "jem: assertion failed: %s (%s:%d)\n", expr, file, line);
  abort();
}

int jem__errf(char *err, size_t errlen, int code, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

float *jem__falloc(size_t n) {
  size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
  if (bytes == 0) bytes = 64;
  float *p = aligned_alloc(64, bytes);
  if (p) memset(p, 0, bytes);
  return p;
}
