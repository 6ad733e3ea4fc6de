/* http.c - libmicrohttpd glue: daemon setup, limits, body collection,
 * suspend/resume, responses (CORS headers and preflights included), the
 * access log and the request deadline.  Slightly long because MHD's
 * callbacks share per-request state and the drain flag that no other file
 * should see (the pure request checks live in http_check.c). */
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
static const srv_route *routes;   /* the table main() gave srv_http_start */
static int n_routes;
static atomic_int draining;
static atomic_int inflight;       /* requests whose headers are in, not yet completed */
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

/* ------------------------------------------------------------------------ */
/* Metrics: requests by route, model and status, their latency, and the
 * gauges of this file */

#define MAX_CODE 600
/* One route row's requests for one model label: counts by status, latency. */
typedef struct req_series {
  atomic_ullong count[MAX_CODE];
  srv_hist dur;
} req_series;
/* [(n_routes+1) * SRV_METRIC_MODELS], row 0 = no route; each made on first
 * use, since most routes never name a model. */
static _Atomic(req_series *) *series;
static pthread_mutex_t series_mu = PTHREAD_MUTEX_INITIALIZER;
static const double lat_le[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                0.1, 0.25, 0.5, 1, 2.5, 5, 10};

static req_series *series_at(int row, int label) {
  _Atomic(req_series *) *slot = &series[(size_t)row * SRV_METRIC_MODELS + (size_t)label];
  req_series *s = atomic_load(slot);
  if (s) return s;
  pthread_mutex_lock(&series_mu);
  s = atomic_load(slot);
  if (!s && (s = calloc(1, sizeof *s))) {
    srv_hist_init(&s->dur, lat_le, SRV_NB(lat_le));
    atomic_store(slot, s);
  }
  pthread_mutex_unlock(&series_mu);
  return s;
}

static void count_request(int route_idx, int label, int status, double seconds) {
  if (!series) return;
  int row = route_idx < 0 || route_idx >= n_routes ? 0 : route_idx + 1;
  if (label < 0 || label >= SRV_METRIC_MODELS) label = 0;
  if (status < 100 || status >= MAX_CODE) status = 500;
  req_series *s = series_at(row, label);
  if (!s) return;
  atomic_fetch_add(&s->count[status], 1);
  srv_hist_obs(&s->dur, seconds);
}

/* One template can serve several methods (GET and DELETE /v1/jobs/{id}), so
 * the method is part of every series' identity. */
static void row_labels(int row, int label, char *out, size_t cap) {
  char route[512], model[300];
  srv_mlabel(route, sizeof route, row == 0 ? "unmatched" : routes[row - 1].pattern);
  srv_mlabel_model(model, sizeof model, ",", label);
  snprintf(out, cap, "method=\"%s\",route=\"%s\"%s", row == 0 ? "other" : routes[row - 1].method,
           route, model);
}

static void render_metrics(srv_mbuf *b) {
  srv_mhead(b, "jem_draining", "gauge", "1 while the daemon drains after SIGTERM.");
  srv_mprintf(b, "jem_draining %d\n", srv_http_draining());
  srv_mhead(b, "jem_inflight_requests", "gauge", "HTTP requests being processed.");
  srv_mprintf(b, "jem_inflight_requests %d\n", srv_http_inflight());
  srv_mhead(b, "jem_request_body_bytes", "gauge",
            "Request body bytes buffered by all connections (limit: --max-buffered-bytes).");
  srv_mprintf(b, "jem_request_body_bytes %lld\n", (long long)atomic_load(&body_bytes));
  if (!series) return;
  int nm = srv_metrics_models();
  char lab[1024];
  srv_mhead(b, "jem_http_requests_total", "counter",
            "HTTP requests by method, route template, model (where one answered) and status "
            "code.");
  for (int row = 0; row <= n_routes; row++)
    for (int mi = 0; mi < nm; mi++) {
      req_series *s = atomic_load(&series[(size_t)row * SRV_METRIC_MODELS + (size_t)mi]);
      if (!s) continue;
      row_labels(row, mi, lab, sizeof lab);
      for (int c = 0; c < MAX_CODE; c++) {
        unsigned long long v = atomic_load(&s->count[c]);
        if (v) srv_mprintf(b, "jem_http_requests_total{%s,code=\"%d\"} %llu\n", lab, c, v);
      }
    }
  srv_mhead(b, "jem_request_duration_seconds", "histogram",
            "Time from request headers to response, by method, route template and model.");
  for (int row = 0; row <= n_routes; row++)
    for (int mi = 0; mi < nm; mi++) {
      req_series *s = atomic_load(&series[(size_t)row * SRV_METRIC_MODELS + (size_t)mi]);
      if (!s || srv_hist_empty(&s->dur)) continue;
      row_labels(row, mi, lab, sizeof lab);
      srv_mhist(b, "jem_request_duration_seconds", lab, &s->dur);
    }
}

int srv_http_inflight(void) { return atomic_load(&inflight); }

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
  if (rid && srv_http_valid_id(rid))
    snprintf(r->id, sizeof r->id, "%s", rid);
  else
    snprintf(r->id, sizeof r->id, "%08x-%llu", id_prefix,
             (unsigned long long)atomic_fetch_add(&req_counter, 1) + 1);
  int fst;
  const char *why = srv_http_framing_error(r, version, &fst);
  if (why)
    return refuse_closing(r, fst, SRV_REJ_BAD_REQUEST,
                          fst == 501 ? "not_implemented" : "bad_request", NULL, why);
  if (r->uri_error == SRV_URI_TOO_MANY_PARAMS) {
    char msg[96];
    snprintf(msg, sizeof msg, "more than %d query parameters", SRV_MAX_QUERY_PAIRS);
    return refuse_closing(r, 400, SRV_REJ_BAD_REQUEST, "invalid_parameter", NULL, msg);
  }
  if (r->uri_error == SRV_URI_ENCODED_SLASH) {
    srv_metrics_reject(SRV_REJ_BAD_REQUEST);
    return srv_respond_error(r, 400, "invalid_path",
                             "an encoded '/' (%%2F) in the path is not accepted");
  }
  char allow[128];
  int idx = srv_route_match(routes, n_routes, r->method, r->url, r, allow, sizeof allow);
  if (idx >= 0 && r->probe && !(routes[idx].flags & SRV_R_PROBE))
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
  r->route = &routes[idx];
  if (srv_auth_check(r->route->flags, srv_req_header(r, "Authorization"))) {
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
  if (!r) return MHD_NO; /* srv_http_on_uri could not allocate it */
  if (!r->conn) { /* the headers are in */
    atomic_fetch_add(&inflight, 1);
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
  count_request(r->route_idx, r->model_label, status, lat);
  atomic_fetch_sub(&inflight, 1);
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
      MHD_OPTION_URI_LOG_CALLBACK, srv_http_on_uri, NULL,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
      MHD_OPTION_NOTIFY_CONNECTION, on_connection, NULL,
      MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
      MHD_OPTION_UNESCAPE_CALLBACK, srv_http_unescape, NULL,
      MHD_OPTION_END);
}

static int bound_port(struct MHD_Daemon *d, int asked) {
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
  return di ? di->port : asked;
}

int srv_http_start(const srv_route *table, int n_table, int *port, int *probe_port) {
  routes = table;
  n_routes = n_table;
  series = calloc((size_t)(n_routes + 1) * SRV_METRIC_MODELS, sizeof *series);
  srv_metrics_register(render_metrics);
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
