/* fileio.c - read a whole file into memory with a size cap and clear errors. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Reads until EOF or until more than `max_bytes` arrived; works for regular
 * files and for pipes (whose size fstat cannot tell). */
int jem_read_file(const char *path, size_t max_bytes, unsigned char **buf,
                  size_t *len, char *err, size_t errlen) {
  if (!buf || !len) return jem__errf(err, errlen, JEM_EINVAL, "jem_read_file: NULL output");
  *buf = NULL;
  *len = 0;
  if (!path || !*path) return jem__errf(err, errlen, JEM_EINVAL, "empty file name");

  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return jem__errf(err, errlen, JEM_EIO, "cannot open '%s': %s", path, strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return jem__errf(err, errlen, JEM_EIO, "cannot stat '%s': %s", path, strerror(e));
  }
  if (S_ISDIR(st.st_mode)) {
    close(fd);
    return jem__errf(err, errlen, JEM_EIO, "'%s' is a directory, not a file", path);
  }
  size_t cap;
  if (S_ISREG(st.st_mode)) {
    if ((unsigned long long)st.st_size > (unsigned long long)max_bytes) {
      close(fd);
      return jem__errf(err, errlen, JEM_ETOOBIG,
                       "'%s' is too large: %lld bytes, the limit is %zu", path,
                       (long long)st.st_size, max_bytes);
    }
    cap = (size_t)st.st_size + 1; /* +1 so a file that grew is noticed */
  } else {
    cap = 65536;
  }
  if (cap > max_bytes && max_bytes < SIZE_MAX) cap = max_bytes + 1;
  if (cap == 0) cap = 1;

  unsigned char *p = malloc(cap);
  if (!p) {
    close(fd);
    return jem__errf(err, errlen, JEM_ENOMEM, "out of memory reading '%s' (%zu bytes)", path, cap);
  }
  size_t n = 0;
  for (;;) {
    if (n == cap) {
      if (n > max_bytes) break;
      size_t ncap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
      if (max_bytes < SIZE_MAX && ncap > max_bytes + 1) ncap = max_bytes + 1;
      unsigned char *q = realloc(p, ncap);
      if (!q) {
        free(p);
        close(fd);
        return jem__errf(err, errlen, JEM_ENOMEM, "out of memory reading '%s'", path);
      }
      p = q;
      cap = ncap;
    }
    ssize_t r = read(fd, p + n, cap - n);
    if (r < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      free(p);
      close(fd);
      return jem__errf(err, errlen, JEM_EIO, "error reading '%s': %s", path, strerror(e));
    }
    if (r == 0) break;
    n += (size_t)r;
  }
  close(fd);
  if (n > max_bytes) {
    free(p);
    return jem__errf(err, errlen, JEM_ETOOBIG, "'%s' is too large: more than %zu bytes",
                     path, max_bytes);
  }
  *buf = p;
  *len = n;
  return 0;
}
