/* multipart.c - a small multipart/form-data parser over a fully received,
 * size-capped body (RFC 7578 / RFC 2046), written here instead of using
 * MHD_PostProcessor so that it can be fuzzed in isolation. */
#include "srv.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_PART_HEADERS 8192

static int bchar(unsigned char c) {
  return isalnum(c) || strchr("'()+_,-./:=? ", c) != NULL;
}

int srv_multipart_boundary(const char *ctype, char *out, size_t cap, char *err,
                           size_t errlen) {
  const char *p = ctype;
  while (*p == ' ') p++;
  if (strncasecmp(p, "multipart/form-data", 19) != 0) {
    snprintf(err, errlen, "not multipart/form-data");
    return 415;
  }
  p += 19;
  for (;;) {
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '\0') break;
    if (*p != ';') {
      snprintf(err, errlen, "malformed Content-Type parameters");
      return 400;
    }
    p++;
    while (*p == ' ' || *p == '\t') p++;
    const char *name = p;
    while (*p && *p != '=' && *p != ';') p++;
    size_t nl = (size_t)(p - name);
    while (nl && (name[nl - 1] == ' ' || name[nl - 1] == '\t')) nl--;
    if (*p != '=') {
      snprintf(err, errlen, "malformed Content-Type parameter");
      return 400;
    }
    p++;
    char val[128];
    size_t vl = 0;
    if (*p == '"') {
      p++;
      while (*p && *p != '"') {
        if (*p == '\\' && p[1]) p++;
        if (vl + 1 >= sizeof val) {
          snprintf(err, errlen, "multipart boundary longer than 70 characters");
          return 400;
        }
        val[vl++] = *p++;
      }
      if (*p != '"') {
        snprintf(err, errlen, "unterminated quoted parameter in Content-Type");
        return 400;
      }
      p++;
    } else {
      while (*p && *p != ';' && *p != ' ' && *p != '\t') {
        if (vl + 1 >= sizeof val) {
          snprintf(err, errlen, "multipart boundary longer than 70 characters");
          return 400;
        }
        val[vl++] = *p++;
      }
    }
    val[vl] = '\0';
    if (nl == 8 && !strncasecmp(name, "boundary", 8)) {
      if (vl == 0 || vl > 70 || val[vl - 1] == ' ') {
        snprintf(err, errlen, "multipart boundary must be 1 to 70 characters");
        return 400;
      }
      for (size_t i = 0; i < vl; i++)
        if (!bchar((unsigned char)val[i])) {
          snprintf(err, errlen, "multipart boundary holds a character RFC 2046 forbids");
          return 400;
        }
      if (vl + 1 > cap) return 400;
      memcpy(out, val, vl + 1);
      return 0;
    }
  }
  snprintf(err, errlen, "multipart/form-data without a boundary parameter");
  return 400;
}

static const char *find(const char *hay, size_t hl, const char *needle, size_t nl) {
  if (nl == 0 || hl < nl) return NULL;
  const char *end = hay + hl - nl;
  for (const char *p = hay; p <= end; p++) {
    p = memchr(p, needle[0], (size_t)(end - p) + 1);
    if (!p) return NULL;
    if (!memcmp(p, needle, nl)) return p;
  }
  return NULL;
}

int srv_multipart_parse(const char *body, size_t len, const char *boundary, int max_parts,
                        srv_blob **parts, int *n, char *err, size_t errlen) {
  *parts = NULL;
  *n = 0;
  char delim[80];
  size_t bl = strlen(boundary);
  if (bl == 0 || bl > 70) {
    snprintf(err, errlen, "bad multipart boundary");
    return 400;
  }
  /* "\r\n--boundary"; the first delimiter may start the body */
  delim[0] = '\r';
  delim[1] = '\n';
  delim[2] = '-';
  delim[3] = '-';
  memcpy(delim + 4, boundary, bl);
  size_t dl = bl + 4;
  const char *p;
  if (len >= dl - 2 && !memcmp(body, delim + 2, dl - 2)) {
    p = body + dl - 2;
  } else {
    const char *f = find(body, len, delim, dl);
    if (!f) {
      snprintf(err, errlen, "multipart body does not contain its boundary");
      return 400;
    }
    p = f + dl;
  }
  const char *end = body + len;
  srv_blob *out = NULL;
  int cnt = 0, cap = 0;
  for (;;) {
    /* after a delimiter: "--" ends the body, else optional blanks + CRLF */
    if (end - p >= 2 && p[0] == '-' && p[1] == '-') break;
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n') {
      snprintf(err, errlen, "malformed multipart delimiter line");
      goto bad;
    }
    p += 2;
    size_t room = (size_t)(end - p);
    const char *hend = find(p, room < MAX_PART_HEADERS ? room : MAX_PART_HEADERS, "\r\n\r\n", 4);
    const char *content;
    if (room >= 2 && p[0] == '\r' && p[1] == '\n') {
      content = p + 2; /* a part without headers */
    } else if (hend) {
      content = hend + 4;
    } else {
      snprintf(err, errlen, "multipart part headers missing or longer than %d bytes",
               MAX_PART_HEADERS);
      goto bad;
    }
    const char *next = find(content, (size_t)(end - content), delim, dl);
    if (!next) {
      snprintf(err, errlen, "multipart body ends without its closing boundary");
      goto bad;
    }
    if (cnt >= max_parts) {
      snprintf(err, errlen, "more than %d parts in one request", max_parts);
      free(out);
      return 413;
    }
    if (cnt == cap) {
      int nc = cap ? cap * 2 : 4;
      srv_blob *nb = realloc(out, sizeof *nb * (size_t)nc);
      if (!nb) {
        snprintf(err, errlen, "out of memory");
        free(out);
        return 503;
      }
      out = nb;
      cap = nc;
    }
    out[cnt].p = (const unsigned char *)content;
    out[cnt].len = (size_t)(next - content);
    out[cnt].owned = NULL;
    cnt++;
    p = next + dl;
  }
  if (cnt == 0) {
    snprintf(err, errlen, "multipart body holds no part");
    free(out);
    return 422;
  }
  *parts = out;
  *n = cnt;
  return 0;
bad:
  free(out);
  return 400;
}
