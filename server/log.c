/* log.c - logfmt log lines on stderr, plus the daemon's clocks. */
#include "srv.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

uint64_t srv_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double srv_wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void srv_log_quote(char *out, size_t cap, const char *s) {
  size_t o = 0;
  int need = (s[0] == '\0');
  for (const char *p = s; *p; p++)
    if (*p == ' ' || *p == '"' || *p == '=' || (unsigned char)*p < 0x20 || *p == '\\')
      need = 1;
  if (cap == 0) return;
  if (!need) {
    snprintf(out, cap, "%s", s);
    return;
  }
  if (o + 1 < cap) out[o++] = '"';
  for (const char *p = s; *p && o + 5 < cap; p++) {
    unsigned char ch = (unsigned char)*p;
    if (ch == '"' || ch == '\\') {
      out[o++] = '\\';
      out[o++] = (char)ch;
    } else if (ch == '\n') {
      out[o++] = '\\';
      out[o++] = 'n';
    } else if (ch < 0x20) {
      o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
    } else {
      out[o++] = (char)ch;
    }
  }
  if (o + 1 < cap) out[o++] = '"';
  out[o < cap ? o : cap - 1] = '\0';
}

/* One line: ts=... level=... then the caller's logfmt fields. */
void srv_log_(int level, const char *fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char when[40];
  strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
  if (level < 0) level = 0;
  if (level > SRV_LOG_DEBUG) level = SRV_LOG_DEBUG;
  pthread_mutex_lock(&log_mu);
  fprintf(stderr, "ts=%s.%03ldZ level=%s %s\n", when, ts.tv_nsec / 1000000,
          level_names[level], msg);
  pthread_mutex_unlock(&log_mu);
}
