/* testutil.h - helpers shared by the cmocka tests (include after <cmocka.h>). */
#ifndef JEM_TESTUTIL_H
#define JEM_TESTUTIL_H

#include <stdlib.h>
#include <unistd.h>

#include <zlib.h>

/* Whole (optionally gzip-compressed) file into a malloc'd buffer. */
static __attribute__((unused)) unsigned char *read_gz(const char *path, size_t *len) {
  gzFile f = gzopen(path, "rb");
  if (!f) {
    char cwd[512];
    fail_msg("cannot open %s (cwd %s): run the tests from the repository root",
             path, getcwd(cwd, sizeof cwd) ? cwd : "?");
  }
  size_t cap = 1 << 16, n = 0;
  unsigned char *buf = malloc(cap);
  assert_non_null(buf);
  for (;;) {
    if (n == cap) {
      cap *= 2;
      buf = realloc(buf, cap);
      assert_non_null(buf);
    }
    int got = gzread(f, buf + n, (unsigned)(cap - n));
    if (got < 0) fail_msg("%s: gzip read error", path);
    if (got == 0) break;
    n += (size_t)got;
  }
  gzclose(f);
  *len = n;
  return buf;
}

#endif
