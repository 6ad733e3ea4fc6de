/* auth.c - bearer tokens from --api-key-file, compared in constant time. */
#include "srv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_KEYS 64
#define MAX_KEY_LEN 256

static char keys[MAX_KEYS][MAX_KEY_LEN + 1];
static int n_keys;

int srv_auth_enabled(void) { return n_keys > 0; }

/* One key per line; blank lines and lines starting with '#' are skipped. */
int srv_auth_load(const char *path, char *err, size_t errlen) {
  unsigned char *buf = NULL;
  size_t len = 0;
  int rc = jem_read_file(path, 1 << 20, &buf, &len, err, errlen);
  if (rc) return rc;
  n_keys = 0;
  size_t i = 0;
  while (i < len) {
    size_t j = i;
    while (j < len && buf[j] != '\n') j++;
    size_t a = i, b = j;
    while (a < b && (buf[a] == ' ' || buf[a] == '\t' || buf[a] == '\r')) a++;
    while (b > a && (buf[b - 1] == ' ' || buf[b - 1] == '\t' || buf[b - 1] == '\r')) b--;
    if (b > a && buf[a] != '#') {
      if (b - a > MAX_KEY_LEN || n_keys >= MAX_KEYS) {
        free(buf);
        snprintf(err, errlen, "%s: keys must be at most %d bytes, at most %d keys", path,
                 MAX_KEY_LEN, MAX_KEYS);
        return JEM_EINVAL;
      }
      memcpy(keys[n_keys], buf + a, b - a);
      keys[n_keys][b - a] = '\0';
      n_keys++;
    }
    i = j + 1;
  }
  free(buf);
  if (n_keys == 0) {
    snprintf(err, errlen, "%s holds no key", path);
    return JEM_EINVAL;
  }
  return 0;
}

static int ct_equal(const char *a, size_t alen, const char *b, size_t blen) {
  unsigned char d = (unsigned char)(alen != blen);
  size_t n = alen < blen ? alen : blen;
  for (size_t i = 0; i < n; i++) d |= (unsigned char)(a[i] ^ b[i]);
  return d == 0;
}

int srv_auth_check(int route_flags, const char *h) {
  if (!n_keys) return 0;
  int need = (route_flags & SRV_R_AUTH) ||
             ((route_flags & SRV_R_SCORING) && srv_cfg.protect_scoring);
  if (!need) return 0;
  if (!h || strncasecmp(h, "Bearer ", 7) != 0) return -1; /* scheme: any case (RFC 7235) */
  const char *tok = h + 7;
  while (*tok == ' ') tok++;
  size_t tl = strlen(tok);
  int ok = 0;
  for (int i = 0; i < n_keys; i++) ok |= ct_equal(tok, tl, keys[i], strlen(keys[i]));
  return ok ? 0 : -1;
}
