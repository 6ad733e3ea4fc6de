/* http.c - libmicrohttpd glue: daemon setup, limits, body collection,
 * suspend/resume, responses, the access log and the request deadline. */
#include "srv.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <malloc.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static struct MHD_Daemon *D, *P; /* P: the probe port's daemon (--probe-port) */
static atomic_int draining;
static atomic_ullong req_counter;
static unsigned int id_prefix;

/* Per-connection record for the whole-request deadline (MHD's own timeout
 * only measures inactivity, so a client trickling bytes would never hit it). */
typedef struct conn_rec {
  struct conn_rec *prev, *next;
  int fd;
  uint64_t req_start;           /* accept, or end of the previous request */
  int waiting;                  /* suspended for compute: not the client's fault */
  int killed;
} conn_rec;

static pthread_mutex_t conns_mu = PTHREAD_MUTEX_INITIALIZER;
static conn_rec *conns;

/* Request bodies buffered by all connections together, bounded by
 * --max-buffered-bytes: without it the ceiling was max-connections x
 * max-body-bytes (8 GiB with the defaults), far past deploy/'s memory limit.
 * A request takes its share before its body is read (all of Content-Length,
 * or each growth of a chunked body's buffer) and returns it when it ends. */
static atomic_llong body_bytes;
/* Set when a large body was freed; the main thread's tick then gives the
 * freed heap back to the system (glibc keeps it otherwise). */
static atomic_int trim_wanted;

static int budget_take(srv_req *r, size_t n) {
  long long cur = atomic_load(&body_bytes);
  do {
    if (cur + (long long)n > srv_cfg.max_buffered_bytes) return -1;
  } while (!atomic_compare_exchange_weak(&body_bytes, &cur, cur + (long long)n));
  r->budget += n;
  return 0;
}

static void body_free(srv_req *r) {
  if (r->body_cap >= (1u << 20)) atomic_store(&trim_wanted, 1);
  free(r->body);
  r->body = NULL;
  r->body_len = r->body_cap = 0;
  atomic_fetch_sub(&body_bytes, (long long)r->budget);
  r->budget = 0;
}

static char *render_body_bytes(void) {
  char *s = malloc(256);
  if (s)
    snprintf(s, 256,
             "# HELP jem_request_body_bytes Request body bytes buffered by all connections "
             "(limit: --max-buffered-bytes).\n# TYPE jem_request_body_bytes gauge\n"
             "jem_request_body_bytes %lld\n", (long long)atomic_load(&body_bytes));
  return s;
}

/* 0 serving; SRV_DRAIN_DELAY after SIGTERM (readiness 503, new jobs 503);
 * SRV_DRAIN_CLOSING once the delay is over (new work of any kind 503). */
int srv_http_draining(void) { return atomic_load(&draining) != 0; }
void srv_http_set_drain_phase(int phase) { atomic_store(&draining, phase); }

static conn_rec *rec_of(struct MHD_Connection *c) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
  return ci ? (conn_rec *)ci->socket_context : NULL;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
  (void)cls;
  if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
    conn_rec *rec = calloc(1, sizeof *rec);
    if (!rec) return;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    rec->fd = ci ? ci->connect_fd : -1;
    pthread_mutex_lock(&conns_mu);
    rec->req_start = srv_now_ns();
    rec->next = conns;
    if (conns) conns->prev = rec;
    conns = rec;
    pthread_mutex_unlock(&conns_mu);
    *socket_context = rec;
  } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
    conn_rec *rec = *socket_context;
    if (!rec) return;
    /* MHD closes the socket after this callback, so the sweeper never
     * touches a reused descriptor */
    pthread_mutex_lock(&conns_mu);
    if (rec->prev)
      rec->prev->next = rec->next;
    else
      conns = rec->next;
    if (rec->next) rec->next->prev = rec->prev;
    pthread_mutex_unlock(&conns_mu);
    free(rec);
    *socket_context = NULL;
  }
}

/* Called about every 250 ms by main(): shuts down connections whose current
 * request has taken longer than --request-deadline to arrive.  MHD then sees
 * the socket fail and closes it on its own thread. */
void srv_http_tick(void) {
  uint64_t lim = (uint64_t)srv_cfg.request_deadline * 1000000000ull;
  pthread_mutex_lock(&conns_mu);
  /* read the clock under the lock: a connection stamped by another thread
   * after an earlier reading would look 2^64 ns old and be cut (seen in CI) */
  uint64_t now = srv_now_ns();
  for (conn_rec *r = conns; r; r = r->next) {
    if (r->waiting || r->killed || r->fd < 0) continue;
    if (now > r->req_start && now - r->req_start > lim) {
      r->killed = 1;
      shutdown(r->fd, SHUT_RDWR);
      srv_metrics_reject(SRV_REJ_DEADLINE);
      srv_log(SRV_LOG_INFO, "msg=\"request deadline exceeded, closing connection\" "
              "deadline_s=%d", srv_cfg.request_deadline);
    }
  }
  pthread_mutex_unlock(&conns_mu);
  if (atomic_exchange(&trim_wanted, 0)) malloc_trim(0);
}

/* ------------------------------------------------------------------------ */
/* Responses */

static int is_v2(const srv_req *r) {
  if (r->route) return (r->route->flags & SRV_R_V2) != 0;
  return r->url && !strncmp(r->url, "/v2", 3) && (r->url[3] == '\0' || r->url[3] == '/');
}

/* ------------------------------------------------------------------------ */
/* CORS (--cors-origin) */

/* The Access-Control-Allow-Origin value for the request's Origin: "*" when
 * any origin is allowed, the origin itself when it is listed, else NULL. */
static const char *cors_allow(srv_req *r) {
  const char *list = srv_cfg.cors_origins;
  if (!list[0] || !r->conn) return NULL;
  const char *origin = srv_req_header(r, "Origin");
  if (!origin) return NULL;
  size_t olen = strlen(origin);
  for (const char *p = list; *p;) {
    size_t n = strcspn(p, "\n");
    if (n == 1 && *p == '*') return "*";
    if (n == olen && !memcmp(p, origin, n)) return origin;
    p += n + (p[n] != '\0');
  }
  return NULL;
}

/* An OPTIONS preflight on a route (allow: its methods): 204 with the
 * Access-Control-Allow-* headers, or 403 for an origin not allowed. */
static enum MHD_Result preflight(srv_req *r, const char *allow) {
  if (!cors_allow(r))
    return srv_respond_error(r, 403, "origin_not_allowed",
                             "cross-origin requests from this Origin are not allowed "
                             "(jemd --cors-origin)");
  const char *h[] = {"Access-Control-Allow-Methods", allow,
                     "Access-Control-Allow-Headers",
                     "Authorization, Content-Type, Inference-Header-Content-Length, X-Request-Id",
                     "Access-Control-Max-Age", "600", NULL};
  return srv_respond(r, 204, NULL, "", 0, h);
}

enum MHD_Result srv_respond(srv_req *r, int status, const char *ctype, const void *body,
                            size_t len, const char *const *headers) {
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
  if (!resp) return MHD_NO;
  if (ctype) MHD_add_response_header(resp, "Content-Type", ctype);
  MHD_add_response_header(resp, "X-Request-Id", r->id);
  MHD_add_response_header(resp, "Cache-Control", "no-store");
  MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
  for (int i = 0; headers && headers[i] && headers[i + 1]; i += 2)
    MHD_add_response_header(resp, headers[i], headers[i + 1]);
  const char *origin = cors_allow(r);
  if (origin) {
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", origin);
    MHD_add_response_header(resp, "Access-Control-Expose-Headers",
                            "X-Request-Id, Location, Retry-After, WWW-Authenticate, "
                            "Inference-Header-Content-Length");
  }
  if (srv_cfg.cors_origins[0]) MHD_add_response_header(resp, "Vary", "Origin");
  if (atomic_load(&draining) || r->close_conn)
    MHD_add_response_header(resp, "Connection", "close");
  enum MHD_Result ok = MHD_queue_response(r->conn, (unsigned)status, resp);
  MHD_destroy_response(resp);
  r->status = status;
  r->bytes_out = len;
  r->state = SRV_REQ_RESPONDED;
  return ok;
}

enum MHD_Result srv_respond_json(srv_req *r, int status, json_t *body) {
  return srv_respond_json_h(r, status, body, NULL);
}

enum MHD_Result srv_respond_json_h(srv_req *r, int status, json_t *body,
                                   const char *const *headers) {
  char *s = body ? json_dumps(body, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_REAL_PRECISION(9))
                 : NULL;
  json_decref(body);
  if (!s) {
    static const char oom[] = "{\"error\": {\"code\": \"internal\", \"message\": \"out of memory\"}}";
    return srv_respond(r, 500, "application/json", oom, sizeof oom - 1, NULL);
  }
  size_t len = strlen(s);
  enum MHD_Result ok = srv_respond(r, status, "application/json", s, len, headers);
  free(s);
  return ok;
}

/* The shortest decimal that reads back as the same float, so 0.95f is sent
 * as 0.95 and not 0.949999988079071; dumped with JSON_REAL_PRECISION(9). */
json_t *srv_jreal(double v) {
  if (!isfinite(v)) return json_null();
  float f = (float)v;
  if ((double)f != v) return json_real(v); /* a genuine double */
  char buf[32];
  for (int prec = 6; prec <= 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
    if (strtof(buf, NULL) == f) break;
  }
  return json_real(strtod(buf, NULL));
}

static enum MHD_Result verror(srv_req *r, int status, const char *code,
                              const char *const *headers, const char *fmt, va_list ap)
    __attribute__((format(printf, 5, 0)));
static enum MHD_Result verror(srv_req *r, int status, const char *code,
                              const char *const *headers, const char *fmt, va_list ap) {
  char raw[512], msg[512];
  vsnprintf(raw, sizeof raw, fmt, ap);
  jem_utf8_clean(msg, sizeof msg, raw); /* messages echo paths and names; JSON needs UTF-8 */
  json_t *body;
  if (is_v2(r))
    body = json_pack("{s:s}", "error", msg);
  else
    body = json_pack("{s:{s:s,s:s}}", "error", "code", code, "message", msg);
  char *s = body ? json_dumps(body, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
  json_decref(body);
  if (!s) /* out of memory: still answer, in the route family's shape */
    s = strdup(is_v2(r) ? "{\"error\":\"internal error\"}"
                        : "{\"error\":{\"code\":\"internal\",\"message\":\"internal error\"}}");
  if (!s) return MHD_NO;
  enum MHD_Result ok = srv_respond(r, status, "application/json", s, strlen(s), headers);
  free(s);
  srv_log(SRV_LOG_DEBUG, "msg=\"request refused\" id=%s status=%d code=%s", r->id, status, code);
  return ok;
}

enum MHD_Result srv_respond_error(srv_req *r, int status, const char *code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  enum MHD_Result ok = verror(r, status, code, NULL, fmt, ap);
  va_end(ap);
  return ok;
}

enum MHD_Result srv_respond_error_h(srv_req *r, int status, const char *code,
                                    const char *const *headers, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  enum MHD_Result ok = verror(r, status, code, headers, fmt, ap);
  va_end(ap);
  return ok;
}

int srv_req_fd(srv_req *r) {
  conn_rec *rec = rec_of(r->conn);
  return rec ? rec->fd : -1;
}

void srv_req_suspend(srv_req *r) {
  conn_rec *rec = rec_of(r->conn);
  if (rec) {
    pthread_mutex_lock(&conns_mu);
    rec->waiting = 1;
    pthread_mutex_unlock(&conns_mu);
  }
  r->state = SRV_REQ_WAITING;
  MHD_suspend_connection(r->conn);
}

void srv_req_resume(srv_req *r) {
  conn_rec *rec = rec_of(r->conn);
  if (rec) {
    pthread_mutex_lock(&conns_mu);
    rec->waiting = 0;
    rec->req_start = srv_now_ns(); /* the response is ours to send now */
    pthread_mutex_unlock(&conns_mu);
  }
  r->state = SRV_REQ_RESUMED;
  MHD_resume_connection(r->conn);
}

const char *srv_req_header(srv_req *r, const char *name) {
  return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

const char *srv_req_query(srv_req *r, const char *name) {
  return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

typedef struct qcheck {
  const char *const *allowed;
  unsigned seen;      /* bit i: allowed[i] was given */
  char bad[160];
} qcheck;

/* Every query parameter must be a known name, given once, with a value
 * free of NUL bytes: "?top_k" or "top_k=3%00" is an error, not a default. */
static enum MHD_Result q_iter(void *cls, enum MHD_ValueKind kind, const char *key,
                              size_t key_size, const char *value, size_t value_size) {
  (void)kind;
  qcheck *q = cls;
  char name[64];
  jem_utf8_clean(name, sizeof name, key);
  for (int i = 0; q->allowed && q->allowed[i] && i < 32; i++) {
    if (strlen(key) != key_size || strcmp(key, q->allowed[i]) != 0) continue;
    if (!value || strlen(value) != value_size)
      snprintf(q->bad, sizeof q->bad, "query parameter '%s' needs a value (and no NUL)", name);
    else if (q->seen >> i & 1)
      snprintf(q->bad, sizeof q->bad, "query parameter '%s' is given twice", name);
    q->seen |= 1u << i;
    return q->bad[0] ? MHD_NO : MHD_YES;
  }
  snprintf(q->bad, sizeof q->bad, "unknown query parameter '%s'", name);
  return MHD_NO;
}

int srv_req_check_query(srv_req *r, const char *const *allowed) {
  qcheck q = {allowed, 0, {0}};
  MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, q_iter, &q);
  if (!q.bad[0]) return 0;
  srv_metrics_reject(SRV_REJ_BAD_REQUEST);
  srv_respond_error(r, 400, "invalid_parameter", "%s", q.bad);
  return -1;
}

/* ------------------------------------------------------------------------ */
/* The access handler */

/* A query with more pairs than this is refused: MHD stores every pair in the
 * connection's 64 KiB memory pool and, once the pool is full (about 1,000
 * pairs), drops the connection without any answer. */
#define MAX_QUERY_PAIRS 100

enum { URI_OK = 0, URI_TOO_MANY_PARAMS, URI_ENCODED_SLASH };

/* MHD's URI log callback: the first look at a request, before MHD splits
 * and unescapes its query.  Returns the request record (MHD stores it as
 * the request's context). */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c) {
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
      r->uri_error = URI_ENCODED_SLASH;
  if (q) {
    size_t pairs = 1;
    for (const char *p = q; *p; p++) pairs += *p == '&';
    if (pairs > MAX_QUERY_PAIRS) {
      /* cut the query before MHD parses it; uri points into MHD's own
       * (writable) read buffer, and first_call answers 400 */
      ((char *)q)[1] = '\0';
      r->uri_error = URI_TOO_MANY_PARAMS;
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
static const char *framing_error(srv_req *r, const char *version, int *status) {
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

static int valid_id(const char *s) {
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

static enum MHD_Result refuse_closing(srv_req *r, int status, int reason, const char *code,
                                      const char *retry_after, const char *msg) {
  srv_metrics_reject(reason);
  r->close_conn = 1;
  const char *h[] = {"Retry-After", retry_after, NULL};
  return srv_respond_error_h(r, status, code, retry_after ? h : NULL, "%s", msg);
}

static enum MHD_Result body_too_large(srv_req *r) {
  char msg[128];
  snprintf(msg, sizeof msg, "request body exceeds the limit of %lld bytes",
           srv_cfg.max_body_bytes);
  return refuse_closing(r, 413, SRV_REJ_TOO_LARGE, "body_too_large", NULL, msg);
}

static enum MHD_Result budget_full(srv_req *r) {
  char msg[160];
  snprintf(msg, sizeof msg, "the server holds too many request bodies (--max-buffered-bytes "
           "%lld); retry later", srv_cfg.max_buffered_bytes);
  return refuse_closing(r, 503, SRV_REJ_BODY_BUDGET, "server_busy", "1", msg);
}

static enum MHD_Result first_call(srv_req *r, const char *version) {
  const char *rid = srv_req_header(r, "X-Request-Id");
  if (rid && valid_id(rid))
    snprintf(r->id, sizeof r->id, "%s", rid);
  else
    snprintf(r->id, sizeof r->id, "%08x-%llu", id_prefix,
             (unsigned long long)atomic_fetch_add(&req_counter, 1) + 1);
  int fst;
  const char *why = framing_error(r, version, &fst);
  if (why)
    return refuse_closing(r, fst, SRV_REJ_BAD_REQUEST,
                          fst == 501 ? "not_implemented" : "bad_request", NULL, why);
  if (r->uri_error == URI_TOO_MANY_PARAMS) {
    char msg[96];
    snprintf(msg, sizeof msg, "more than %d query parameters", MAX_QUERY_PAIRS);
    return refuse_closing(r, 400, SRV_REJ_BAD_REQUEST, "invalid_parameter", NULL, msg);
  }
  if (r->uri_error == URI_ENCODED_SLASH) {
    srv_metrics_reject(SRV_REJ_BAD_REQUEST);
    return srv_respond_error(r, 400, "invalid_path",
                             "an encoded '/' (%%2F) in the path is not accepted");
  }
  char allow[128];
  int idx = srv_route_match(r->method, r->url, r, allow, sizeof allow);
  if (idx >= 0 && r->probe && !(srv_routes[idx].flags & SRV_R_PROBE))
    return srv_respond_error(r, 404, "not_found", "the probe port serves only /healthz, "
                             "/readyz, /metrics and /v2/health/*, not %.200s", r->url);
  if (idx == -1)
    return srv_respond_error(r, 404, "not_found", "no such route: %.200s", r->url);
  if (idx == -2 && !strcmp(r->method, "OPTIONS") && srv_cfg.cors_origins[0] &&
      srv_req_header(r, "Origin") && srv_req_header(r, "Access-Control-Request-Method"))
    return preflight(r, allow);
  if (idx == -2) {
    const char *h[] = {"Allow", allow, NULL};
    return srv_respond_error_h(r, 405, "method_not_allowed",
                               h, "%s is not allowed on %.200s (allowed: %s)", r->method,
                               r->url, allow);
  }
  r->route_idx = idx;
  r->route = &srv_routes[idx];
  if (srv_auth_check(r)) {
    srv_metrics_reject(SRV_REJ_UNAUTHORIZED);
    const char *h[] = {"WWW-Authenticate", "Bearer realm=\"jemd\"", NULL};
    return srv_respond_error_h(r, 401, "unauthorized", h,
                               "this route needs 'Authorization: Bearer <key>'");
  }
  if (atomic_load(&draining) == SRV_DRAIN_CLOSING && (r->route->flags & SRV_R_BODY)) {
    /* the listener stays open through the drain so that clients get this
     * answer (and can still poll their jobs), not a refused connection */
    srv_metrics_reject(SRV_REJ_DRAINING);
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "draining", h, "the server is shutting down");
  }
  const char *cl = srv_req_header(r, "Content-Length");
  if (cl) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(cl, &end, 10);
    if (errno || end == cl || (*end && *end != ' ') || n > (unsigned long long)srv_cfg.max_body_bytes)
      return body_too_large(r);
    /* the whole body's share of the budget, before any of it is read */
    if (n > 0 && (r->route->flags & SRV_R_BODY)) {
      if (budget_take(r, (size_t)n + 1)) return budget_full(r);
      r->body_expect = (size_t)n + 1;
    }
  }
  r->state = SRV_REQ_BODY;
  return MHD_YES;
}

static enum MHD_Result take_body(srv_req *r, const char *data, size_t n) {
  uint64_t lim = (uint64_t)srv_cfg.request_deadline * 1000000000ull;
  if (srv_now_ns() - r->t_start > lim) {
    srv_metrics_reject(SRV_REJ_DEADLINE);
    return MHD_NO;
  }
  r->body_seen += n;
  /* A refused body (and any body of a route that takes none) is read and
   * dropped so that the answer can follow it; the request deadline bounds
   * how long that may take. */
  if (r->body_refused || !(r->route->flags & SRV_R_BODY)) return MHD_YES;
  size_t cap = (size_t)srv_cfg.max_body_bytes;
  if (r->body_len + n > cap) {
    r->body_refused = 413;
    body_free(r);
    return MHD_YES;
  }
  if (r->body_len + n + 1 > r->body_cap) {
    size_t nc = r->body_expect; /* Content-Length + 1, taken from the budget already */
    if (nc < r->body_len + n + 1) {
      nc = r->body_cap ? r->body_cap : 16384;
      while (nc < r->body_len + n + 1) nc *= 2;
      if (nc > cap + 1) nc = cap + 1;
    }
    if (nc > r->budget && budget_take(r, nc - r->budget)) { /* a chunked body grows */
      r->body_refused = 503;
      body_free(r);
      return MHD_YES;
    }
    char *nb = realloc(r->body, nc);
    if (!nb) return MHD_NO;
    r->body = nb;
    r->body_cap = nc;
  }
  memcpy(r->body + r->body_len, data, n);
  r->body_len += n;
  r->body[r->body_len] = '\0';
  return MHD_YES;
}

/* A large JSON body is parsed on a worker (background work, between scoring
 * batches) while the connection is suspended: parsing 7 MB of numbers takes
 * about half a second, which on an HTTP thread would stall every other
 * connection it serves.  The handler then runs as usual and its
 * srv_json_parse receives the finished tree. */
typedef struct json_ahead {
  srv_work work;
  srv_req *r;
  json_t *j;
  int ran, status;
  char err[256];
} json_ahead;

static void ahead_run(srv_work *w, srv_worker *wk) {
  (void)wk;
  json_ahead *a = (json_ahead *)w;
  a->j = srv_json_parse(a->r->body, a->r->body_len, &a->status, a->err, sizeof a->err);
  a->ran = 1;
}

static void ahead_done(srv_work *w, int canceled) {
  (void)canceled; /* then the handler parses (and answers 503: no scheduler) */
  srv_req_resume(((json_ahead *)w)->r);
}

static enum MHD_Result ahead_resume(srv_req *r) {
  json_ahead *a = r->ahead;
  r->ahead = NULL;
  if (a->ran) srv_json_ahead(r->body, r->body_len, a->j, a->status, a->err);
  free(a);
  enum MHD_Result res = r->route->fn(r);
  srv_json_ahead_clear(); /* a handler that did not ask (wrong media type, ...) */
  return res;
}

/* 1 when r's body is parsed ahead on a worker (r is suspended). */
static int parse_ahead(srv_req *r) {
  const char *p = r->body;
  if (r->body_len < SRV_JSON_AHEAD_BYTES) return 0;
  while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
  if (*p != '{' && *p != '[') return 0;
  json_ahead *a = calloc(1, sizeof *a);
  if (!a) return 0;
  a->work.kind = SRV_WORK_JOB;
  a->work.run = ahead_run;
  a->work.done = ahead_done;
  a->r = r;
  r->ahead = a;
  r->on_resume = ahead_resume;
  srv_req_suspend(r);
  if (srv_sched_submit(&a->work)) srv_req_resume(r); /* stopping: parse inline */
  return 1;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
  srv_req *r = *con_cls;
  if (!r) return MHD_NO; /* on_uri could not allocate it */
  if (!r->conn) { /* the headers are in */
    atomic_fetch_add(srv_metrics_inflight(), 1);
    r->conn = conn;
    r->method = method;
    r->url = url;
    r->probe = cls != NULL;
    return first_call(r, version);
  }
  if (r->state == SRV_REQ_RESPONDED) {
    /* a response was queued early (413, 404, ...): discard the body */
    *upload_data_size = 0;
    return MHD_YES;
  }
  if (*upload_data_size) {
    size_t n = *upload_data_size;
    *upload_data_size = 0;
    return take_body(r, upload_data, n);
  }
  if (r->state == SRV_REQ_BODY) {
    if (r->body_refused == 413) return body_too_large(r);
    if (r->body_refused) return budget_full(r);
    r->state = SRV_REQ_RESPONDED;
    if (parse_ahead(r)) return MHD_YES;
    return r->route->fn(r);
  }
  if (r->state == SRV_REQ_RESUMED) {
    r->state = SRV_REQ_RESPONDED;
    return r->on_resume(r);
  }
  return MHD_NO;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)cls;
  srv_req *r = *con_cls;
  conn_rec *rec = rec_of(conn);
  if (rec) {
    pthread_mutex_lock(&conns_mu);
    rec->req_start = srv_now_ns();
    rec->waiting = 0;
    pthread_mutex_unlock(&conns_mu);
  }
  if (!r) return;
  *con_cls = NULL;
  if (!r->conn) { /* closed before its headers were in: never a request */
    free(r);
    return;
  }
  double lat = (double)(srv_now_ns() - r->t_start) * 1e-9;
  int status = r->status;
  if (!status || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) {
    /* nginx's 499: the client went away before the answer was sent */
    if (!status || toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT ||
        toe == MHD_REQUEST_TERMINATED_READ_ERROR)
      status = 499;
  }
  srv_metrics_request(r->route_idx, status, lat);
  atomic_fetch_sub(srv_metrics_inflight(), 1);
  if (SRV_LOG_INFO <= srv_cfg.log_level) {
    char path[300], client[64] = "-";
    srv_log_quote(path, sizeof path, r->url ? r->url : "");
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
      const struct sockaddr *sa = ci->client_addr;
      if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, client, sizeof client);
      else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, client,
                  sizeof client);
    }
    srv_log_(SRV_LOG_INFO,
             "msg=access id=%s client=%s method=%s route=%s path=%s status=%d "
             "latency_ms=%.3f bytes_in=%zu bytes_out=%zu",
             r->id, client, r->method ? r->method : "-",
             r->route ? r->route->pattern : "unmatched", path, status, lat * 1e3,
             r->body_seen, r->bytes_out);
  }
  if (r->data_free) r->data_free(r->data);
  free(r->ahead);
  body_free(r);
  free(r);
}

/* MHD's logger signature carries no format attribute; fmt is MHD's own. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
static void mhd_logger(void *cls, const char *fmt, va_list ap) {
  (void)cls;
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
#pragma GCC diagnostic pop
  size_t n = strlen(msg);
  while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
  char q[600];
  srv_log_quote(q, sizeof q, msg);
  srv_log(SRV_LOG_DEBUG, "msg=microhttpd detail=%s", q);
}

/* ------------------------------------------------------------------------ */
/* Daemon lifecycle */

/* MHD's own unescaping turns %00 into a NUL that silently cuts a path or a
 * query value short (/metrics%00 would serve /metrics).  This one decodes
 * every %HH but %00, which stays literal, so such a path matches no route
 * and such a value fails its parse. */
static int hex_digit(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static size_t unescape_no_nul(void *cls, struct MHD_Connection *c, char *s) {
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

/* One MHD daemon on ss with port; the probe daemon (probe=1) is small and
 * apart, so that /healthz and /readyz answer while the main port's
 * connections are all taken. */
static struct MHD_Daemon *start_daemon(const struct sockaddr_storage *ss, int v6, int port,
                                       int probe) {
  struct sockaddr_storage a = *ss;
  if (v6)
    ((struct sockaddr_in6 *)&a)->sin6_port = htons((uint16_t)port);
  else
    ((struct sockaddr_in *)&a)->sin_port = htons((uint16_t)port);
  unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
  if (v6) flags |= MHD_USE_IPv6;
  return MHD_start_daemon(
      flags, 0, NULL, NULL, on_request, probe ? (void *)&P : NULL,
      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&a,
      MHD_OPTION_THREAD_POOL_SIZE, probe ? 1u : (unsigned)srv_cfg.http_threads,
      MHD_OPTION_CONNECTION_LIMIT, probe ? 32u : (unsigned)srv_cfg.max_connections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, probe ? 0u : (unsigned)srv_cfg.max_connections_per_ip,
      MHD_OPTION_CONNECTION_TIMEOUT, probe ? 5u : (unsigned)srv_cfg.timeout,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536,
      MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)1024,
      MHD_OPTION_URI_LOG_CALLBACK, on_uri, NULL,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
      MHD_OPTION_NOTIFY_CONNECTION, on_connection, NULL,
      MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
      MHD_OPTION_UNESCAPE_CALLBACK, unescape_no_nul, NULL,
      MHD_OPTION_END);
}

static int bound_port(struct MHD_Daemon *d, int asked) {
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
  return di ? di->port : asked;
}

int srv_http_start(int *port, int *probe_port) {
  struct addrinfo hints, *ai = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  int gai = getaddrinfo(srv_cfg.host, NULL, &hints, &ai);
  if (gai || !ai) {
    srv_log(SRV_LOG_ERROR, "msg=\"cannot resolve --host\" host=%s error=\"%s\"", srv_cfg.host,
            gai_strerror(gai));
    return -1;
  }
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
  int v6 = ai->ai_family == AF_INET6;
  freeaddrinfo(ai);
  id_prefix = (unsigned)getpid() ^ (unsigned)(srv_now_ns() & 0xffffffffu);
  /* Every connection holds a socket: make room for --max-connections plus
   * the probe port and the files jemd opens, as far as the hard limit lets. */
  struct rlimit rl;
  rlim_t want = (rlim_t)srv_cfg.max_connections + 128;
  if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < want) {
    rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want)
      srv_log(SRV_LOG_WARN, "msg=\"the open-file limit is below --max-connections + 128\" "
              "limit=%llu max_connections=%d", (unsigned long long)rl.rlim_cur,
              srv_cfg.max_connections);
  }
  /* Large blocks (request bodies, decoded images) from mmap, so that free()
   * returns them to the system at once; glibc would otherwise raise this
   * threshold after the first such free and keep them in the heap.  One
   * arena: malloc_trim gives back the main arena's free top, not that of
   * the per-thread arenas, where a JSON tree parsed on a worker and freed on
   * an HTTP thread stayed resident (64 MB after three 900k-value bodies,
   * 9 MB with one arena).  Hot paths do not allocate (workspaces), and the
   * per-thread caches keep most small allocations off the arena lock. */
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_ARENA_MAX, 1);
  srv_metrics_register(render_body_bytes);
  D = start_daemon(&ss, v6, srv_cfg.port, 0);
  if (D && srv_cfg.probe_port >= 0) {
    P = start_daemon(&ss, v6, srv_cfg.probe_port, 1);
    if (!P) {
      int e = errno;
      MHD_stop_daemon(D);
      D = NULL;
      errno = e;
    }
  }
  if (!D) {
    srv_log(SRV_LOG_ERROR, "msg=\"cannot start the HTTP server\" host=%s port=%d probe_port=%d "
            "error=\"%s\"", srv_cfg.host, srv_cfg.port, srv_cfg.probe_port, strerror(errno));
    return -1;
  }
  *port = bound_port(D, srv_cfg.port);
  *probe_port = P ? bound_port(P, srv_cfg.probe_port) : -1;
  return 0;
}

void srv_http_stop(void) {
  if (D) MHD_stop_daemon(D);
  if (P) MHD_stop_daemon(P);
  D = P = NULL;
  pthread_mutex_lock(&conns_mu);
  while (conns) {
    conn_rec *n = conns->next;
    free(conns);
    conns = n;
  }
  pthread_mutex_unlock(&conns_mu);
}
