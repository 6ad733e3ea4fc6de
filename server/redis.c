/* redis.c - jemd's Redis client (see redis.h). */
#include "redis.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void drop_conn(srv_rconn *rc) {
  if (rc->c) redisFree(rc->c);
  rc->c = NULL;
  uint64_t b = rc->backoff ? rc->backoff * 2 : 100000000ull;
  rc->backoff = b > 5000000000ull ? 5000000000ull : b;
  rc->next_try = srv_now_ns() + rc->backoff;
  atomic_store(&rc->to->up, 0);
}

/* Connects (AUTH, SELECT) when not connected and the backoff allows.  0, -1
 * when Redis cannot be reached, -2 when it refuses the credentials. */
int srv_rconn_ensure(srv_rconn *rc, char *err, size_t errlen) {
  srv_redis *to = rc->to;
  if (rc->c) return 0;
  if (srv_now_ns() < rc->next_try) {
    snprintf(err, errlen, "not connected (reconnecting with backoff)");
    return -1;
  }
  struct timeval tv = {1, 0};
  redisContext *c = redisConnectWithTimeout(to->host, to->port, tv);
  if (!c || c->err) {
    snprintf(err, errlen, "cannot connect to %s: %.100s", to->shown, c ? c->errstr : "out of memory");
    if (c) redisFree(c);
    atomic_fetch_add(&to->errors, 1);
    drop_conn(rc);
    return -1;
  }
  redisSetTimeout(c, tv);
  int rc_auth = 0;
  redisReply *r = NULL;
  if (to->pass[0])
    r = to->user[0] ? redisCommand(c, "AUTH %s %s", to->user, to->pass)
                  : redisCommand(c, "AUTH %s", to->pass);
  if (to->pass[0] && (!r || r->type == REDIS_REPLY_ERROR)) {
    snprintf(err, errlen, "%s refused the credentials: %.150s", to->shown,
             r ? r->str : c->errstr);
    rc_auth = r ? -2 : -1;
  }
  if (r) freeReplyObject(r);
  r = NULL;
  if (!rc_auth && to->db) {
    r = redisCommand(c, "SELECT %d", to->db);
    if (!r || r->type == REDIS_REPLY_ERROR) {
      snprintf(err, errlen, "%s: SELECT %d failed: %.100s", to->shown, to->db, r ? r->str : c->errstr);
      rc_auth = r ? -2 : -1;
    }
    if (r) freeReplyObject(r);
  }
  if (rc_auth) {
    redisFree(c);
    atomic_fetch_add(&to->errors, 1);
    drop_conn(rc);
    return rc_auth;
  }
  rc->c = c;
  rc->backoff = 0;
  atomic_store(&to->up, 1);
  return 0;
}


void srv_ra_add(srv_rargv *a, const void *p, size_t len) {
  if (a->oom) return;
  if (a->n == a->cap) {
    int nc = a->cap ? a->cap * 2 : 32;
    const char **v = realloc(a->v, sizeof *v * (size_t)nc);
    if (v) a->v = v;
    size_t *l = v ? realloc(a->len, sizeof *l * (size_t)nc) : NULL;
    if (l) a->len = l;
    if (!v || !l) {
      a->oom = 1;
      return;
    }
    a->cap = nc;
  }
  a->v[a->n] = p ? p : "";
  a->len[a->n++] = p ? len : 0;
}

void srv_ra_str(srv_rargv *a, const char *s) { srv_ra_add(a, s, s ? strlen(s) : 0); }

void srv_ra_fmt(srv_rargv *a, const char *fmt, ...) {
  char buf[64], *s = NULL;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap); /* ids, numbers and keys: short */
  va_end(ap);
  if (a->n_own < 16 && n >= 0 && (size_t)n < sizeof buf) s = strdup(buf);
  if (!s) {
    a->oom = 1;
    return;
  }
  a->own[a->n_own++] = s;
  srv_ra_str(a, s);
}

void srv_ra_free(srv_rargv *a) {
  free(a->v);
  free(a->len);
  for (int i = 0; i < a->n_own; i++) free(a->own[i]);
  memset(a, 0, sizeof *a);
}

/* Runs a's command on rc (connecting first); the reply, or NULL with err
 * (the failure counted; an I/O failure drops the connection).  Frees a. */
redisReply *srv_rcmd(srv_rconn *rc, srv_rargv *a, char *err, size_t errlen) {
  srv_redis *to = rc->to;
  redisReply *r = NULL;
  if (a->oom) {
    snprintf(err, errlen, "out of memory");
  } else if (srv_rconn_ensure(rc, err, errlen) == 0) {
    r = redisCommandArgv(rc->c, a->n, a->v, a->len);
    if (!r) {
      snprintf(err, errlen, "%s: %.100s", to->shown, rc->c->errstr[0] ? rc->c->errstr : "I/O error");
      atomic_fetch_add(&to->errors, 1);
      drop_conn(rc);
    } else if (r->type == REDIS_REPLY_ERROR) {
      snprintf(err, errlen, "%s: %.150s", to->shown, r->str);
      atomic_fetch_add(&to->errors, 1);
      if (!strncmp(r->str, "NOAUTH", 6) || !strncmp(r->str, "LOADING", 7)) drop_conn(rc);
      freeReplyObject(r);
      r = NULL;
    }
  }
  srv_ra_free(a);
  return r;
}

/* reply helpers: element i of an array reply as a string (NULL when nil) */
const char *srv_rstr(const redisReply *r, size_t i, size_t *len) {
  if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements) return NULL;
  const redisReply *e = r->element[i];
  if (e->type != REDIS_REPLY_STRING && e->type != REDIS_REPLY_STATUS) return NULL;
  if (len) *len = e->len;
  return e->str;
}

long long srv_rint(const redisReply *r, size_t i, long long def) {
  if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements) return def;
  const redisReply *e = r->element[i];
  if (e->type == REDIS_REPLY_INTEGER) return e->integer;
  if (e->type == REDIS_REPLY_STRING) return strtoll(e->str, NULL, 10);
  return def;
}

/* redis://[user:password@]host:port[/db] */
int srv_redis_parse_url(srv_redis *to, const char *url, char *err, size_t errlen) {
  const char *p = url + strlen("redis://");
  const char *at = strrchr(p, '@');
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (!colon) {
      snprintf(err, errlen, "expected redis://[user:password@]host:port[/db]: the part "
               "before '@' needs a ':' (use ':password@' for a password alone)");
      return -1;
    }
    snprintf(to->user, sizeof to->user, "%.*s", (int)(colon - p), p);
    snprintf(to->pass, sizeof to->pass, "%.*s", (int)(at - colon - 1), colon + 1);
    p = at + 1;
  }
  const char *slash = strchr(p, '/'), *end = slash ? slash : p + strlen(p);
  const char *colon = NULL;
  for (const char *c = p; c < end; c++)
    if (*c == ':') colon = c;
  char *e;
  long port = colon ? strtol(colon + 1, &e, 10) : 6379;
  if (colon && (e != end || port < 1 || port > 65535)) {
    snprintf(err, errlen, "bad port in the Redis URL");
    return -1;
  }
  const char *hend = colon ? colon : end;
  if (hend == p || (size_t)(hend - p) >= sizeof to->host) {
    snprintf(err, errlen, "expected redis://[user:password@]host:port[/db]: no host");
    return -1;
  }
  snprintf(to->host, sizeof to->host, "%.*s", (int)(hend - p), p);
  to->port = (int)port;
  to->db = 0;
  if (slash && slash[1]) {
    long db = strtol(slash + 1, &e, 10);
    if (*e || db < 0 || db > 1000000) {
      snprintf(err, errlen, "bad database number in the Redis URL");
      return -1;
    }
    to->db = (int)db;
  }
  snprintf(to->shown, sizeof to->shown, "redis %.100s:%d", to->host, to->port);
  return 0;
}

void srv_rconn_close(srv_rconn *rc) {
  if (rc->c) redisFree(rc->c);
  rc->c = NULL;
}
