/* http_check.c - the first look at a request, before any handler: the
 * URI (MHD's URI callback), the message framing (RFC 9112), the request id
 * a client may send, and the unescaping of paths and query values.  Pure
 * checks on what MHD parsed; http.c answers what they find. */
#include "srv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* MHD's URI log callback: the first look at a request, before MHD splits
 * and unescapes its query.  Returns the request record (MHD stores it as
 * the request's context). */
void *srv_http_on_uri(void *cls, const char *uri, struct MHD_Connection *c) {
  (void)cls;
  (void)c;
  srv_req *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->route_idx = -1;
  r->t_start = srv_now_ns();
  const char *q = strchr(uri, '?');
  size_t plen = q ? (size_t)(q - uri) : strlen(uri);
  /* %2F would be decoded into a '/' that routing then splits on: a proxy's
   * path rules and jemd would disagree about which route this is */
  for (size_t i = 0; i + 2 < plen; i++)
    if (uri[i] == '%' && uri[i + 1] == '2' && (uri[i + 2] == 'f' || uri[i + 2] == 'F'))
      r->uri_error = SRV_URI_ENCODED_SLASH;
  if (q) {
    size_t pairs = 1;
    for (const char *p = q; *p; p++) pairs += *p == '&';
    if (pairs > SRV_MAX_QUERY_PAIRS) {
      /* cut the query before MHD parses it; uri points into MHD's own
       * (writable) read buffer, and first_call answers 400 */
      ((char *)q)[1] = '\0';
      r->uri_error = SRV_URI_TOO_MANY_PARAMS;
    }
  }
  return r;
}

/* RFC 9110 token characters only.  MHD 0.9.75 appends an obs-fold
 * continuation line to the previous header's *name*, so a folded header
 * shows up as a name with a space or colon in it, or as "Content-Length3". */
static int is_token(const char *s, size_t n) {
  if (!n) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= 32 || c >= 127 || strchr("\"(),/:;<=>?@[\\]{}", c)) return 0;
  }
  return 1;
}

typedef struct framing {
  int n_cl, n_te, n_host, bad;
  const char *te;
} framing;

static enum MHD_Result framing_iter(void *cls, enum MHD_ValueKind kind, const char *key,
                                    size_t key_size, const char *value, size_t value_size) {
  (void)kind;
  (void)value_size;
  framing *f = cls;
  static const size_t cl_len = sizeof "Content-Length" - 1, te_len = sizeof "Transfer-Encoding" - 1;
  if (!is_token(key, key_size))
    f->bad = 1;
  else if (key_size >= cl_len && !strncasecmp(key, "Content-Length", cl_len)) {
    if (key_size != cl_len) f->bad = 1;
    f->n_cl++;
  } else if (key_size >= te_len && !strncasecmp(key, "Transfer-Encoding", te_len)) {
    if (key_size != te_len) f->bad = 1;
    f->n_te++;
    f->te = value;
  } else if (key_size == 4 && !strncasecmp(key, "Host", 4))
    f->n_host++;
  return MHD_YES;
}

/* RFC 9112 sections 3.2, 6.1 and 6.3: message framing two parties could read
 * differently (a proxy in front and jemd) is refused, and the connection
 * closed, so that no second request can hide in a body.  MHD itself answers
 * a malformed Content-Length value ("+3", "3, 3") with its own 400. */
const char *srv_http_framing_error(srv_req *r, const char *version, int *status) {
  framing f = {0, 0, 0, 0, NULL};
  MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, framing_iter, &f);
  int http11 = version && !strcmp(version, MHD_HTTP_VERSION_1_1);
  *status = 400;
  if (f.bad) return "malformed header line (a folded line or a bad header name)";
  if (f.n_te && f.n_cl) return "both Content-Length and Transfer-Encoding are given";
  if (f.n_cl > 1) return "Content-Length is given more than once";
  if (f.n_te && !http11) return "Transfer-Encoding needs HTTP/1.1";
  if (f.n_te > 1 || (f.n_te && strcasecmp(f.te, "chunked"))) {
    *status = 501;
    return "the only transfer coding accepted is 'chunked'";
  }
  if (http11 && f.n_host != 1)
    return f.n_host ? "more than one Host header" : "an HTTP/1.1 request needs a Host header";
  return NULL;
}

int srv_http_valid_id(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 40) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
          c == '-' || c == '_' || c == '.'))
      return 0;
  }
  return 1;
}

/* MHD's own unescaping turns %00 into a NUL that silently cuts a path or a
 * query value short (/metrics%00 would serve /metrics).  This one decodes
 * every %HH but %00, which stays literal, so such a path matches no route
 * and such a value fails its parse. */
static int hex_digit(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

size_t srv_http_unescape(void *cls, struct MHD_Connection *c, char *s) {
  (void)cls;
  (void)c;
  char *w = s;
  for (const char *r = s; *r;) {
    int hi = r[0] == '%' ? hex_digit(r[1]) : -1, lo = hi >= 0 ? hex_digit(r[2]) : -1;
    if (hi >= 0 && lo >= 0 && (hi | lo) != 0) {
      *w++ = (char)(hi << 4 | lo);
      r += 3;
    } else {
      *w++ = *r++;
    }
  }
  *w = '\0';
  return (size_t)(w - s);
}
