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

/* Length of the valid UTF-8 sequence at p (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF), or 0 if there is none. */
static size_t utf8_seq_len(const unsigned char *p) {
  if (p[0] < 0x80) return 1;
  size_t n = p[0] >= 0xc2 && p[0] <= 0xdf ? 2 : p[0] >= 0xe0 && p[0] <= 0xef ? 3
             : p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : 0;
  for (size_t i = 1; i < n; i++) /* stops at the NUL: it is no continuation byte */
    if ((p[i] & 0xc0) != 0x80) return 0;
  if (n == 3 && ((p[0] == 0xe0 && p[1] < 0xa0) || (p[0] == 0xed && p[1] > 0x9f))) return 0;
  if (n == 4 && ((p[0] == 0xf0 && p[1] < 0x90) || (p[0] == 0xf4 && p[1] > 0x8f))) return 0;
  return n;
}

size_t jem_utf8_clean(char *dst, size_t cap, const char *src) {
  static const char replacement[] = "\xef\xbf\xbd"; /* U+FFFD */
  size_t o = 0;
  if (!cap) return 0;
  for (const unsigned char *p = (const unsigned char *)src; *p;) {
    size_t n = utf8_seq_len(p);
    const char *from = n ? (const char *)p : replacement;
    size_t len = n ? n : 3;
    if (o + len >= cap) break;
    memcpy(dst + o, from, len);
    o += len;
    p += n ? n : 1;
  }
  dst[o] = '\0';
  return o;
}
