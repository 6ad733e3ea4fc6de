/* fuzz_multipart.c - libFuzzer harness for jemd's multipart/form-data
 * parser: the first line is the Content-Type parameter text after
 * "multipart/form-data; ", the rest is the body. */
#include "../server/srv.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *nl = memchr(data, '\n', size);
  size_t hl = nl ? (size_t)(nl - data) : size;
  if (hl > 200) hl = 200;
  char ct[256] = "multipart/form-data; ";
  size_t pre = strlen(ct);
  memcpy(ct + pre, data, hl);
  ct[pre + hl] = '\0';
  char boundary[80], err[256];
  if (srv_multipart_boundary(ct, boundary, sizeof boundary, err, sizeof err) != 0) return 0;
  size_t off = nl ? (size_t)(nl - data) + 1 : size;
  size_t blen = size - off;
  char *body = malloc(blen ? blen : 1); /* exact size: reads past it are caught */
  if (!body) return 0;
  memcpy(body, data + off, blen);
  srv_blob *parts = NULL;
  int n = 0;
  if (srv_multipart_parse(body, blen, boundary, 32, &parts, &n, err, sizeof err) == 0) {
    for (int i = 0; i < n; i++) {
      const char *p = (const char *)parts[i].p;
      if (p < body || p + parts[i].len > body + blen) abort();
    }
    free(parts);
  }
  free(body);
  return 0;
}
