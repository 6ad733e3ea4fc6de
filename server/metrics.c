/* metrics.c - the /metrics registry: every subsystem registers a function
 * that renders its own metric families (Prometheus text exposition format
 * 0.0.4, `jem_` prefix, base units) with the helpers here; this file adds
 * the build info, the rejected-request counters every subsystem pushes, and
 * the process metrics.  It calls no other server file. */
#include "srv.h"

#include <dirent.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

struct srv_mbuf {
  char *p;
  size_t len, cap;
  int oom;
};

void srv_mprintf(srv_mbuf *b, const char *fmt, ...) {
  if (b->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->oom = 1;
      return;
    }
    if ((size_t)n < b->cap - b->len) {
      b->len += (size_t)n;
      return;
    }
    size_t nc = b->cap * 2 + (size_t)n;
    char *np = realloc(b->p, nc);
    if (!np) {
      b->oom = 1;
      return;
    }
    b->p = np;
    b->cap = nc;
  }
}

void srv_mlabel(char *out, size_t cap, const char *s) {
  size_t o = 0;
  for (; *s && o + 3 < cap; s++) {
    if (*s == '\\' || *s == '"') {
      out[o++] = '\\';
      out[o++] = *s;
    } else if (*s == '\n') {
      out[o++] = '\\';
      out[o++] = 'n';
    } else {
      out[o++] = *s;
    }
  }
  out[o] = '\0';
}

void srv_mhead(srv_mbuf *b, const char *name, const char *type, const char *help) {
  srv_mprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* ------------------------------------------------------------------------ */
/* Histograms */

void srv_hist_init(srv_hist *h, const double *le, int nb) {
  memset(h, 0, sizeof *h);
  h->le = le;
  h->nb = nb < SRV_HIST_MAX ? nb : SRV_HIST_MAX;
  pthread_mutex_init(&h->mu, NULL);
}

void srv_hist_obs(srv_hist *h, double v) {
  if (!h->le || v != v) return;
  int i = 0;
  while (i < h->nb && v > h->le[i]) i++;
  pthread_mutex_lock(&h->mu);
  h->counts[i]++;
  h->sum += v;
  pthread_mutex_unlock(&h->mu);
}

int srv_hist_empty(srv_hist *h) {
  int any = 0;
  pthread_mutex_lock(&h->mu);
  for (int i = 0; i <= h->nb; i++) any |= h->counts[i] != 0;
  pthread_mutex_unlock(&h->mu);
  return !any;
}

void srv_mhist(srv_mbuf *b, const char *name, const char *labels, srv_hist *h) {
  pthread_mutex_lock(&h->mu);
  uint64_t cum = 0;
  const char *sep = labels[0] ? "," : "";
  for (int i = 0; i < h->nb; i++) {
    cum += h->counts[i];
    srv_mprintf(b, "%s_bucket{%s%sle=\"%.17g\"} %llu\n", name, labels, sep, h->le[i],
                (unsigned long long)cum);
  }
  cum += h->counts[h->nb];
  srv_mprintf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
              (unsigned long long)cum);
  if (labels[0])
    srv_mprintf(b, "%s_sum{%s} %.17g\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
                (unsigned long long)cum);
  else
    srv_mprintf(b, "%s_sum %.17g\n%s_count %llu\n", name, h->sum, name,
                (unsigned long long)cum);
  pthread_mutex_unlock(&h->mu);
}

/* ------------------------------------------------------------------------ */
/* Model labels.  A name is written once, before n counts it, and never
 * changes: readers below n need no lock. */

#define OTHER "(other)"
static struct {
  char name[SRV_METRIC_MODELS][SRV_MODEL_NAME_MAX];
  atomic_int n;
  pthread_mutex_t mu;
} L = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER};

int srv_metrics_model(const char *name) {
  if (!name || !name[0]) return 0;
  pthread_mutex_lock(&L.mu);
  int n = atomic_load(&L.n), i = 1;
  while (i < n && strcmp(L.name[i], name) != 0) i++;
  if (i == n && n == SRV_METRIC_MODELS) {
    i = n - 1; /* full: the last is "(other)" */
  } else if (i == n) {
    snprintf(L.name[i], sizeof L.name[i], "%s", n == SRV_METRIC_MODELS - 1 ? OTHER : name);
    atomic_store(&L.n, n + 1);
  }
  pthread_mutex_unlock(&L.mu);
  return i;
}

int srv_metrics_models(void) { return atomic_load(&L.n); }

const char *srv_metrics_model_name(int index) {
  return index > 0 && index < atomic_load(&L.n) ? L.name[index] : "";
}

void srv_mlabel_model(char *out, size_t cap, const char *sep, int index) {
  char v[2 * SRV_MODEL_NAME_MAX];
  srv_mlabel(v, sizeof v, srv_metrics_model_name(index));
  if (v[0])
    snprintf(out, cap, "%smodel=\"%s\"", sep, v);
  else if (cap)
    out[0] = '\0';
}

/* ------------------------------------------------------------------------ */
/* The registry */

#define MAX_SECTIONS 16
static struct {
  double start_time;
  void (*render[MAX_SECTIONS])(srv_mbuf *b);
  int n;
  pthread_mutex_t mu;
  atomic_ullong rejected[SRV_REJ_COUNT];
} M = {.mu = PTHREAD_MUTEX_INITIALIZER};

static const char *const rej_names[SRV_REJ_COUNT] = {
    "queue_full", "too_large", "unauthorized", "bad_request", "unsupported_media_type",
    "client_gone", "deadline", "draining", "store_full", "body_budget"};

void srv_metrics_init(void) { M.start_time = srv_wall_s(); }

void srv_metrics_register(void (*render)(srv_mbuf *b)) {
  pthread_mutex_lock(&M.mu);
  int i = 0;
  while (i < M.n && M.render[i] != render) i++;
  if (i == M.n && M.n < MAX_SECTIONS) M.render[M.n++] = render;
  pthread_mutex_unlock(&M.mu);
}

void srv_metrics_reject(int reason) {
  if (reason >= 0 && reason < SRV_REJ_COUNT) atomic_fetch_add(&M.rejected[reason], 1);
}

static void process_metrics(srv_mbuf *b) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) {
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
    srv_mhead(b, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
    srv_mprintf(b, "process_cpu_seconds_total %.6f\n", cpu);
  }
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    unsigned long long size = 0, rss = 0;
    if (fscanf(f, "%llu %llu", &size, &rss) == 2) {
      long page = sysconf(_SC_PAGESIZE);
      srv_mhead(b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
      srv_mprintf(b, "process_resident_memory_bytes %llu\n", rss * (unsigned long long)page);
      srv_mhead(b, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
      srv_mprintf(b, "process_virtual_memory_bytes %llu\n", size * (unsigned long long)page);
    }
    fclose(f);
  }
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
      if (e->d_name[0] != '.') n++;
    closedir(d);
    srv_mhead(b, "process_open_fds", "gauge", "Number of open file descriptors.");
    srv_mprintf(b, "process_open_fds %d\n", n - 1);
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    srv_mhead(b, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
    srv_mprintf(b, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
  }
  srv_mhead(b, "process_start_time_seconds", "gauge",
       "Start time of the process since unix epoch in seconds.");
  srv_mprintf(b, "process_start_time_seconds %.3f\n", M.start_time);
}

char *srv_metrics_render(size_t *len) {
  srv_mbuf b = {malloc(16384), 0, 16384, 0};
  if (!b.p) return NULL;
  char l1[512], l2[512];
  srv_mhead(&b, "jem_build_info", "gauge", "Build information; the value is always 1.");
  srv_mlabel(l1, sizeof l1, JEM_VERSION);
  srv_mlabel(l2, sizeof l2, jem_blas_core() ? jem_blas_core() : "unknown");
  srv_mprintf(&b, "jem_build_info{version=\"%s\",blas_core=\"%s\"} 1\n", l1, l2);
  srv_mhead(&b, "jem_rejected_requests_total", "counter",
            "Requests refused or dropped, by reason.");
  for (int i = 0; i < SRV_REJ_COUNT; i++)
    srv_mprintf(&b, "jem_rejected_requests_total{reason=\"%s\"} %llu\n", rej_names[i],
                (unsigned long long)atomic_load(&M.rejected[i]));
  pthread_mutex_lock(&M.mu);
  int n = M.n;
  pthread_mutex_unlock(&M.mu);
  for (int i = 0; i < n; i++) M.render[i](&b); /* registered once, never removed */
  process_metrics(&b);
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  *len = b.len;
  return b.p;
}
