/* http.c - libmicrohttpd glue: daemon setup, limits, body collection,
 * suspend/resume, responses, the access log and the request deadline. */
#include "srv.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct MHD_Daemon *D;
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
}

/* ------------------------------------------------------------------------ */
/* Responses */

static int is_v2(const srv_req *r) {
  if (r->route) return (r->route->flags & SRV_R_V2) != 0;
  return r->url && !strncmp(r->url, "/v2", 3) && (r->url[3] == '\0' || r->url[3] == '/');
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

static enum MHD_Result first_call(srv_req *r) {
  const char *rid = srv_req_header(r, "X-Request-Id");
  if (rid && valid_id(rid))
    snprintf(r->id, sizeof r->id, "%s", rid);
  else
    snprintf(r->id, sizeof r->id, "%08x-%llu", id_prefix,
             (unsigned long long)atomic_fetch_add(&req_counter, 1) + 1);
  char allow[128];
  int idx = srv_route_match(r->method, r->url, r, allow, sizeof allow);
  if (idx == -1)
    return srv_respond_error(r, 404, "not_found", "no such route: %.200s", r->url);
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
    if (errno || end == cl || (*end && *end != ' ') || n > (unsigned long long)srv_cfg.max_body_bytes) {
      srv_metrics_reject(SRV_REJ_TOO_LARGE);
      r->close_conn = 1;
      return srv_respond_error(r, 413, "body_too_large",
                               "request body exceeds the limit of %lld bytes",
                               srv_cfg.max_body_bytes);
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
  size_t cap = (size_t)srv_cfg.max_body_bytes;
  if (r->body_too_big) {
    /* drain so that a 413 can be sent, but not forever */
    return r->body_seen > cap * 2 + (1u << 20) ? MHD_NO : MHD_YES;
  }
  if (r->body_len + n > cap) {
    r->body_too_big = 1;
    free(r->body);
    r->body = NULL;
    r->body_len = r->body_cap = 0;
    return MHD_YES;
  }
  if (r->body_len + n + 1 > r->body_cap) {
    size_t nc = r->body_cap ? r->body_cap : 16384;
    while (nc < r->body_len + n + 1) nc *= 2;
    if (nc > cap + 1) nc = cap + 1;
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

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
  (void)cls;
  (void)version;
  srv_req *r = *con_cls;
  if (!r) {
    r = calloc(1, sizeof *r);
    if (!r) return MHD_NO;
    *con_cls = r;
    r->conn = conn;
    r->method = method;
    r->url = url;
    r->route_idx = -1;
    r->t_start = srv_now_ns();
    atomic_fetch_add(srv_metrics_inflight(), 1);
    return first_call(r);
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
    if (r->body_too_big) {
      srv_metrics_reject(SRV_REJ_TOO_LARGE);
      r->close_conn = 1;
      return srv_respond_error(r, 413, "body_too_large",
                               "request body exceeds the limit of %lld bytes",
                               srv_cfg.max_body_bytes);
    }
    r->state = SRV_REQ_RESPONDED;
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
  free(r->body);
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

int srv_http_start(int *port) {
  struct addrinfo hints, *ai = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", srv_cfg.port);
  int gai = getaddrinfo(srv_cfg.host, portstr, &hints, &ai);
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
  unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
  if (v6) flags |= MHD_USE_IPv6;
  D = MHD_start_daemon(
      flags, 0, NULL, NULL, on_request, NULL,
      MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
      MHD_OPTION_THREAD_POOL_SIZE, (unsigned)srv_cfg.http_threads,
      MHD_OPTION_CONNECTION_LIMIT, (unsigned)srv_cfg.max_connections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)srv_cfg.max_connections_per_ip,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)srv_cfg.timeout,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536,
      MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)1024,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
      MHD_OPTION_NOTIFY_CONNECTION, on_connection, NULL,
      MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
      MHD_OPTION_UNESCAPE_CALLBACK, unescape_no_nul, NULL,
      MHD_OPTION_END);
  if (!D) {
    srv_log(SRV_LOG_ERROR, "msg=\"cannot start the HTTP server\" host=%s port=%d error=\"%s\"",
            srv_cfg.host, srv_cfg.port, strerror(errno));
    return -1;
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(D, MHD_DAEMON_INFO_BIND_PORT);
  *port = di ? di->port : srv_cfg.port;
  return 0;
}

void srv_http_stop(void) {
  if (D) MHD_stop_daemon(D);
  D = NULL;
  pthread_mutex_lock(&conns_mu);
  while (conns) {
    conn_rec *n = conns->next;
    free(conns);
    conns = n;
  }
  pthread_mutex_unlock(&conns_mu);
}
