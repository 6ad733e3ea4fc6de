/* metrics.c - Prometheus counters, gauges and histograms for /metrics
 * (text exposition format 0.0.4, `jem_` prefix, base units). */
#include "srv.h"
#include "jobs.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <dirent.h>

typedef struct hist {
  const double *le;
  int nb;
  uint64_t *counts;   /* nb+1, the last is +Inf */
  double sum;
  pthread_mutex_t mu;
} hist;

static const double lat_le[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                0.1, 0.25, 0.5, 1, 2.5, 5, 10};
static const double batch_le[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
static const double energy_le[] = {-100, -50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100};
static const double pct_le[] = {0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1};
#define NB(a) ((int)(sizeof a / sizeof a[0]))

#define MAX_CODE 600
static struct {
  int ready;
  double start_time;
  atomic_ullong *req;           /* [(n_routes+1) * MAX_CODE], row 0 = no route */
  hist *req_dur;                /* n_routes+1 */
  hist queue_dur, compute_dur, batch, energy, pct[JEM_NUM_SCORES];
  atomic_ullong rejected[SRV_REJ_COUNT];
  atomic_ullong reloads[2];
  atomic_ullong images;
  atomic_int inflight;
} M;

static const char *const rej_names[SRV_REJ_COUNT] = {
    "queue_full", "too_large", "unauthorized", "bad_request", "unsupported_media_type",
    "client_gone", "deadline", "draining", "store_full", "body_budget"};

static void hist_init(hist *h, const double *le, int nb) {
  h->le = le;
  h->nb = nb;
  h->counts = calloc((size_t)nb + 1, sizeof(uint64_t));
  h->sum = 0;
  pthread_mutex_init(&h->mu, NULL);
}

static void hist_obs(hist *h, double v) {
  if (!h->counts || v != v) return;
  int i = 0;
  while (i < h->nb && v > h->le[i]) i++;
  pthread_mutex_lock(&h->mu);
  h->counts[i]++;
  h->sum += v;
  pthread_mutex_unlock(&h->mu);
}

void srv_metrics_init(void) {
  M.start_time = srv_wall_s();
  M.req = calloc((size_t)(srv_n_routes + 1) * MAX_CODE, sizeof(atomic_ullong));
  M.req_dur = calloc((size_t)srv_n_routes + 1, sizeof(hist));
  if (M.req_dur)
    for (int i = 0; i <= srv_n_routes; i++) hist_init(&M.req_dur[i], lat_le, NB(lat_le));
  hist_init(&M.queue_dur, lat_le, NB(lat_le));
  hist_init(&M.compute_dur, lat_le, NB(lat_le));
  hist_init(&M.batch, batch_le, NB(batch_le));
  hist_init(&M.energy, energy_le, NB(energy_le));
  for (int s = 0; s < JEM_NUM_SCORES; s++) hist_init(&M.pct[s], pct_le, NB(pct_le));
  M.ready = M.req && M.req_dur;
}

void srv_metrics_request(int route_idx, int status, double seconds) {
  if (!M.ready) return;
  int row = route_idx < 0 || route_idx >= srv_n_routes ? 0 : route_idx + 1;
  if (status < 100 || status >= MAX_CODE) status = 500;
  atomic_fetch_add(&M.req[(size_t)row * MAX_CODE + (size_t)status], 1);
  hist_obs(&M.req_dur[row], seconds);
}

static char *(*extra[8])(void);
static int n_extra;

void srv_metrics_register(char *(*render)(void)) {
  if (n_extra < 8) extra[n_extra++] = render;
}

void srv_metrics_reject(int reason) {
  if (reason >= 0 && reason < SRV_REJ_COUNT) atomic_fetch_add(&M.rejected[reason], 1);
}
void srv_metrics_queue_time(double s) { hist_obs(&M.queue_dur, s); }
void srv_metrics_compute_time(double s) { hist_obs(&M.compute_dur, s); }
void srv_metrics_batch(int n) { hist_obs(&M.batch, n); }
void srv_metrics_reload(int ok) { atomic_fetch_add(&M.reloads[ok ? 0 : 1], 1); }
atomic_int *srv_metrics_inflight(void) { return &M.inflight; }

void srv_metrics_scores(float energy, const float pct[JEM_NUM_SCORES]) {
  atomic_fetch_add(&M.images, 1);
  hist_obs(&M.energy, energy);
  for (int s = 0; s < JEM_NUM_SCORES; s++) hist_obs(&M.pct[s], pct[s]);
}

/* ------------------------------------------------------------------------ */
/* Rendering */

typedef struct buf {
  char *p;
  size_t len, cap;
  int oom;
} buf;

static void bprintf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(buf *b, const char *fmt, ...) {
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

/* Label value escaping: backslash, double quote, newline. */
static void esc(char *out, size_t cap, const char *s) {
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

static void head(buf *b, const char *name, const char *type, const char *help) {
  bprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void hist_render(buf *b, const char *name, const char *labels, hist *h) {
  pthread_mutex_lock(&h->mu);
  uint64_t cum = 0;
  const char *sep = labels[0] ? "," : "";
  for (int i = 0; i < h->nb; i++) {
    cum += h->counts[i];
    bprintf(b, "%s_bucket{%s%sle=\"%.17g\"} %llu\n", name, labels, sep, h->le[i],
            (unsigned long long)cum);
  }
  cum += h->counts[h->nb];
  bprintf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)cum);
  if (labels[0]) {
    bprintf(b, "%s_sum{%s} %.17g\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
            (unsigned long long)cum);
  } else {
    bprintf(b, "%s_sum %.17g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)cum);
  }
  pthread_mutex_unlock(&h->mu);
}

static const char *route_label(int row) {
  return row == 0 ? "unmatched" : srv_routes[row - 1].pattern;
}
/* One template can serve several methods (GET and DELETE /v1/jobs/{id}), so
 * the method is part of every series' identity. */
static const char *method_label(int row) {
  return row == 0 ? "other" : srv_routes[row - 1].method;
}

static void process_metrics(buf *b) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) {
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
    head(b, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
    bprintf(b, "process_cpu_seconds_total %.6f\n", cpu);
  }
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    unsigned long long size = 0, rss = 0;
    if (fscanf(f, "%llu %llu", &size, &rss) == 2) {
      long page = sysconf(_SC_PAGESIZE);
      head(b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
      bprintf(b, "process_resident_memory_bytes %llu\n", rss * (unsigned long long)page);
      head(b, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
      bprintf(b, "process_virtual_memory_bytes %llu\n", size * (unsigned long long)page);
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
    head(b, "process_open_fds", "gauge", "Number of open file descriptors.");
    bprintf(b, "process_open_fds %d\n", n - 1);
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    head(b, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
    bprintf(b, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
  }
  head(b, "process_start_time_seconds", "gauge",
       "Start time of the process since unix epoch in seconds.");
  bprintf(b, "process_start_time_seconds %.3f\n", M.start_time);
}

char *srv_metrics_render(size_t *len) {
  buf b = {malloc(16384), 0, 16384, 0};
  if (!b.p) return NULL;
  char l1[512], l2[512];

  head(&b, "jem_build_info", "gauge", "Build information; the value is always 1.");
  esc(l1, sizeof l1, JEM_VERSION);
  esc(l2, sizeof l2, jem_blas_core() ? jem_blas_core() : "unknown");
  bprintf(&b, "jem_build_info{version=\"%s\",blas_core=\"%s\"} 1\n", l1, l2);

  /* one series per model of the repository, labelled model="NAME" */
  srv_model_status *ms = malloc(SRV_MAX_MODELS * sizeof *ms);
  int nm = ms ? srv_models_index(ms, SRV_MAX_MODELS) : 0;
  head(&b, "jem_model_info", "gauge", "Each loaded model; the value is always 1.");
  for (int i = 0; i < nm; i++) {
    srv_model *sm = ms[i].ready ? srv_model_find(ms[i].name) : NULL;
    if (!sm) continue;
    char arch[64];
    snprintf(arch, sizeof arch, "wrn-%d-%d", sm->m->arch.depth, sm->m->arch.widen);
    esc(l1, sizeof l1, sm->name);
    bprintf(&b, "jem_model_info{model=\"%s\",name=\"%s\",arch=\"%s\",generation=\"%llu\","
            "default=\"%s\"} 1\n", l1, l1, arch, (unsigned long long)sm->gen,
            ms[i].is_default ? "true" : "false");
    srv_model_put(sm);
  }
  head(&b, "jem_model_loaded", "gauge", "1 when the model is loaded, 0 when the repository "
       "knows it but it is not (unloaded, or its file failed to load).");
  for (int i = 0; i < nm; i++) {
    esc(l1, sizeof l1, ms[i].name);
    bprintf(&b, "jem_model_loaded{model=\"%s\"} %d\n", l1, ms[i].ready);
  }
  head(&b, "jem_model_load_timestamp_seconds", "gauge", "When each loaded model was loaded.");
  for (int i = 0; i < nm; i++) {
    esc(l1, sizeof l1, ms[i].name);
    if (ms[i].ready)
      bprintf(&b, "jem_model_load_timestamp_seconds{model=\"%s\"} %.3f\n", l1, ms[i].loaded_at);
  }
  head(&b, "jem_model_scored_images_total", "counter",
       "Images scored by each model (across reloads).");
  for (int i = 0; i < nm; i++) {
    esc(l1, sizeof l1, ms[i].name);
    bprintf(&b, "jem_model_scored_images_total{model=\"%s\"} %llu\n", l1, ms[i].images);
  }
  free(ms);
  head(&b, "jem_model_reloads_total", "counter", "Model reloads (SIGHUP) by result.");
  bprintf(&b, "jem_model_reloads_total{result=\"ok\"} %llu\n",
          (unsigned long long)atomic_load(&M.reloads[0]));
  bprintf(&b, "jem_model_reloads_total{result=\"error\"} %llu\n",
          (unsigned long long)atomic_load(&M.reloads[1]));

  head(&b, "jem_draining", "gauge", "1 while the daemon drains after SIGTERM.");
  bprintf(&b, "jem_draining %d\n", srv_http_draining());
  head(&b, "jem_workers", "gauge", "Compute workers.");
  bprintf(&b, "jem_workers %d\n", srv_cfg.workers);

  head(&b, "jem_http_requests_total", "counter", "HTTP requests by method, route template and status code.");
  for (int row = 0; row <= srv_n_routes; row++) {
    esc(l1, sizeof l1, route_label(row));
    for (int c = 0; c < MAX_CODE; c++) {
      unsigned long long v = atomic_load(&M.req[(size_t)row * MAX_CODE + (size_t)c]);
      if (v)
        bprintf(&b, "jem_http_requests_total{method=\"%s\",route=\"%s\",code=\"%d\"} %llu\n",
                method_label(row), l1, c, v);
    }
  }
  head(&b, "jem_request_duration_seconds", "histogram",
       "Time from request headers to response, by method and route template.");
  for (int row = 0; row <= srv_n_routes; row++) {
    int any = 0;
    pthread_mutex_lock(&M.req_dur[row].mu);
    for (int i = 0; i <= M.req_dur[row].nb; i++) any |= M.req_dur[row].counts[i] != 0;
    pthread_mutex_unlock(&M.req_dur[row].mu);
    if (!any) continue;
    char lab[600];
    esc(l1, sizeof l1, route_label(row));
    snprintf(lab, sizeof lab, "method=\"%s\",route=\"%s\"", method_label(row), l1);
    hist_render(&b, "jem_request_duration_seconds", lab, &M.req_dur[row]);
  }
  head(&b, "jem_queue_duration_seconds", "histogram",
       "Time a scoring request waited in the queue before its first batch started.");
  hist_render(&b, "jem_queue_duration_seconds", "", &M.queue_dur);
  head(&b, "jem_compute_duration_seconds", "histogram",
       "Time from a scoring request's first batch start to its last batch end.");
  hist_render(&b, "jem_compute_duration_seconds", "", &M.compute_dur);
  head(&b, "jem_batch_size", "histogram", "Images per dynamic batch.");
  hist_render(&b, "jem_batch_size", "", &M.batch);

  head(&b, "jem_queue_depth", "gauge",
       "Images admitted and not yet in a batch (being decoded or queued).");
  bprintf(&b, "jem_queue_depth %d\n", srv_sched_queued_images());
  head(&b, "jem_running_work_items", "gauge",
       "Batches, job slices and large decodes running on workers.");
  bprintf(&b, "jem_running_work_items %d\n", srv_sched_running());
  head(&b, "jem_inflight_requests", "gauge", "HTTP requests being processed.");
  bprintf(&b, "jem_inflight_requests %d\n", atomic_load(&M.inflight));
  head(&b, "jem_rejected_requests_total", "counter", "Requests refused or dropped, by reason.");
  for (int i = 0; i < SRV_REJ_COUNT; i++)
    bprintf(&b, "jem_rejected_requests_total{reason=\"%s\"} %llu\n", rej_names[i],
            (unsigned long long)atomic_load(&M.rejected[i]));
  head(&b, "jem_scored_images_total", "counter", "Images scored and returned to clients.");
  bprintf(&b, "jem_scored_images_total %llu\n", (unsigned long long)atomic_load(&M.images));

  head(&b, "jem_energy", "histogram", "Energy (-logsumexp of the logits) of scored images.");
  hist_render(&b, "jem_energy", "", &M.energy);
  head(&b, "jem_ood_score", "histogram",
       "In-distribution percentile of each OOD score of scored images (models with statistics).");
  for (int s = 0; s < JEM_NUM_SCORES; s++) {
    char lab[64];
    snprintf(lab, sizeof lab, "score=\"%s\"", jem_score_names[s]);
    hist_render(&b, "jem_ood_score", lab, &M.pct[s]);
  }
  for (int i = 0; i < n_extra; i++) {
    char *t = extra[i]();
    if (t) bprintf(&b, "%s", t);
    free(t);
  }
  char *jobs_text = srv_jobs_metrics_render();
  if (jobs_text) bprintf(&b, "%s", jobs_text);
  free(jobs_text);
  process_metrics(&b);
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  *len = b.len;
  return b.p;
}
