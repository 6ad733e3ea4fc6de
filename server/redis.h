/* redis.h - a small synchronous Redis client over hiredis for jemd
 * (server/redis.c): where Redis is, connections that reconnect with backoff
 * and count failures, binary-safe commands, reply accessors. */
#ifndef JEM_SRV_REDIS_H
#define JEM_SRV_REDIS_H

#include "srv.h"

#include <hiredis.h>

typedef struct srv_redis {
  char host[256];
  int port, db;
  char user[128], pass[256];    /* AUTH [user] pass when pass is set */
  char shown[128];              /* "redis host:port" for messages: no password */
  atomic_ullong errors;         /* failed calls, all connections */
  atomic_int up;                /* 0 after a failure, 1 after a (re)connect */
} srv_redis;

/* redis://[user:password@]host:port[/db]; 0 or -1 with err. */
int srv_redis_parse_url(srv_redis *to, const char *url, char *err, size_t errlen);

/* One connection; its user holds mu.  A failed call drops it; the next
 * connect waits a backoff (100 ms doubling to 5 s) and fails fast before. */
typedef struct srv_rconn {
  pthread_mutex_t mu;
  srv_redis *to;
  redisContext *c;
  uint64_t next_try, backoff;   /* monotonic ns */
} srv_rconn;

/* Connects (1 s timeouts, AUTH, SELECT) unless connected: 0, -1 when Redis
 * cannot be reached (or the backoff is not over), -2 when it refuses the
 * credentials or the database. */
int srv_rconn_ensure(srv_rconn *rc, char *err, size_t errlen);
void srv_rconn_close(srv_rconn *rc);

/* A command's arguments; binary-safe. */
typedef struct srv_rargv {
  int n, cap, oom;
  const char **v;
  size_t *len;
  char *own[16];                /* formatted strings to free */
  int n_own;
} srv_rargv;

void srv_ra_add(srv_rargv *a, const void *p, size_t len); /* borrowed bytes */
void srv_ra_str(srv_rargv *a, const char *s);
void srv_ra_fmt(srv_rargv *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv_ra_free(srv_rargv *a);
/* Runs a's command on rc (connecting first): the reply (an error reply is
 * a failure), or NULL with err, the failure counted.  Frees a. */
redisReply *srv_rcmd(srv_rconn *rc, srv_rargv *a, char *err, size_t errlen);
/* Element i of an array reply: a string (NULL when nil or absent; *len its
 * length when len is given), or an integer (def when absent). */
const char *srv_rstr(const redisReply *r, size_t i, size_t *len);
long long srv_rint(const redisReply *r, size_t i, long long def);

#endif
