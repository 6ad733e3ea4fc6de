/* config.c - jemd's settings: one table gives each flag, its JEMD_*
 * environment variable, default, range and help line (redis-style). */
#include "srv.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

srv_config srv_cfg;

/* Repeatable flags keep their values '\n'-separated: OPT_ORIGINS (its
 * variable takes a comma- or space-separated list) and OPT_PATHS (its
 * variable holds one path). */
enum { OPT_STR, OPT_INT, OPT_LL, OPT_BOOL, OPT_LEVEL, OPT_ORIGINS, OPT_PATHS };

typedef struct opt {
  const char *flag;     /* without "--" */
  const char *env;
  int type;
  size_t off;           /* into srv_config */
  size_t size;          /* for strings */
  const char *def;
  long long min, max;
  const char *metavar;
  const char *help;
} opt;

#define F(field) offsetof(srv_config, field), sizeof(((srv_config *)0)->field)

static const opt opts[] = {
  {"host", "JEMD_HOST", OPT_STR, F(host), "127.0.0.1", 0, 0, "ADDR",
   "address to listen on (0.0.0.0 or :: for every interface)"},
  {"port", "JEMD_PORT", OPT_INT, F(port), "8080", 0, 65535, "N",
   "TCP port; 0 picks a free one and logs it"},
  {"model", "JEMD_MODEL", OPT_PATHS, F(model), "", 0, 0, "PATH",
   "model file; repeatable (then each is named by its file name without .safetensors); "
   "default when neither this nor --model-dir is given: models/fmnist-jem.safetensors, then "
   JEMD_DATADIR "/models/"},
  {"model-dir", "JEMD_MODEL_DIR", OPT_STR, F(model_dir), "", 0, 0, "DIR",
   "serve every *.safetensors file in DIR, named by its file name without .safetensors; "
   "SIGHUP rescans it (added, removed and changed files)"},
  {"default-model", "JEMD_DEFAULT_MODEL", OPT_STR, F(default_model), "", 0, 0, "NAME",
   "the model of routes that name none (default: the first --model, else the first file "
   "of --model-dir by name)"},
  {"workers", "JEMD_WORKERS", OPT_INT, F(workers), "0", 0, 256, "N",
   "compute workers; 0 = number of CPUs"},
  {"blas-threads", "JEMD_BLAS_THREADS", OPT_INT, F(blas_threads), "0", 0, 256, "N",
   "OpenBLAS threads (process-wide); 0 = max(1, CPUs / workers)"},
  {"http-threads", "JEMD_HTTP_THREADS", OPT_INT, F(http_threads), "2", 1, 64, "N",
   "HTTP threads (libmicrohttpd epoll thread pool)"},
  {"max-batch", "JEMD_MAX_BATCH", OPT_INT, F(max_batch), "64", 1, 1024, "N",
   "most images in one dynamic batch"},
  {"workspace-bytes", "JEMD_WORKSPACE_BYTES", OPT_LL, F(workspace_bytes), "268435456",
   16777216, 1ll << 40, "BYTES", "scratch memory of each compute worker, which keeps a "
   "workspace for each of up to 4 recent models within it; a model that needs more for "
   "--max-batch images runs each batch in chunks that fit (no slower while a chunk holds 8 "
   "images per BLAS thread)"},
  {"wide-transforms", "JEMD_WIDE_TRANSFORMS", OPT_BOOL, F(wide_transforms), "true", 0, 1, NULL,
   "run 3x3 layers of 160 channels and up on Winograd transforms packed once per model and "
   "shared by the workers (WRN-28-10: 664 MB, 4.4x the classify throughput measured "
   "with 2 workers); "
   "--wide-transforms=false keeps them on im2col, without that memory"},
  {"max-delay-us", "JEMD_MAX_DELAY_US", OPT_INT, F(max_delay_us), "2000", 0, 10000000, "US",
   "while a batch runs, how long the next partial batch may wait to fill up "
   "(an idle pool starts at once; 1 ms timer resolution)"},
  {"queue-size", "JEMD_QUEUE_SIZE", OPT_INT, F(queue_size), "1024", 1, 1000000, "N",
   "images waiting for a worker before new requests get 503 (/readyz: 503 from 90%)"},
  {"max-body-bytes", "JEMD_MAX_BODY_BYTES", OPT_LL, F(max_body_bytes), "8388608", 1,
   1ll << 32, "BYTES", "largest request body (413 above it)"},
  {"max-buffered-bytes", "JEMD_MAX_BUFFERED_BYTES", OPT_LL, F(max_buffered_bytes), "536870912",
   1024, 1ll << 40, "BYTES", "request bodies of all connections together; past it new bodies "
   "get 503 with Retry-After before they are read (default: a quarter of deploy/'s 2 GiB)"},
  {"max-image-pixels", "JEMD_MAX_IMAGE_PIXELS", OPT_LL, F(max_image_pixels), "4194304",
   1, 1ll << 28, "N", "largest decoded image area, checked before decoding"},
  {"max-image-side", "JEMD_MAX_IMAGE_SIDE", OPT_INT, F(max_image_side), "8192", 1,
   1 << 16, "N", "largest image width or height"},
  {"max-images", "JEMD_MAX_IMAGES", OPT_INT, F(max_images), "256", 1, 100000, "N",
   "most images in one request"},
  {"max-request-pixels", "JEMD_MAX_REQUEST_PIXELS", OPT_LL, F(max_request_pixels), "67108864",
   1, 1ll << 34, "N", "most pixels (by the image headers) in all of one request's images; "
   "a request over 1,048,576 is decoded on a worker, one image at a time between scoring "
   "batches, not on an HTTP thread"},
  {"max-json-depth", "JEMD_MAX_JSON_DEPTH", OPT_INT, F(max_json_depth), "64", 1, 1024, "N",
   "deepest nesting of arrays and objects in a JSON body"},
  {"max-json-elements", "JEMD_MAX_JSON_ELEMENTS", OPT_LL, F(max_json_elements), "1048576", 16,
   1ll << 32, "N", "most values in a JSON body, counted before parsing; an object or array "
   "counts 8 (parsed, it costs that much more memory)"},
  {"max-connections", "JEMD_MAX_CONNECTIONS", OPT_INT, F(max_connections), "1024", 1,
   1000000, "N", "open connections in total"},
  {"max-connections-per-ip", "JEMD_MAX_CONNECTIONS_PER_IP", OPT_INT,
   F(max_connections_per_ip), "128", 0, 1000000, "N",
   "open connections per client address (0 = no limit)"},
  {"probe-port", "JEMD_PROBE_PORT", OPT_INT, F(probe_port), "-1", -1, 65535, "N",
   "also serve /healthz, /readyz, /metrics and /v2/health/* (only) on this port, with "
   "connections of its own, so probes answer when the main port's are all taken; -1 = off, "
   "0 picks a free one and logs it"},
  {"timeout", "JEMD_TIMEOUT", OPT_INT, F(timeout), "30", 1, 86400, "S",
   "close a connection idle for this long"},
  {"request-deadline", "JEMD_REQUEST_DEADLINE", OPT_INT, F(request_deadline), "60", 1,
   86400, "S", "longest time a client may take to send one request"},
  {"reload-timeout", "JEMD_RELOAD_TIMEOUT", OPT_INT, F(reload_timeout), "60", 1, 3600, "S",
   "a SIGHUP reload (on its own thread) taking longer is given up as failed"},
  {"drain-seconds", "JEMD_DRAIN_SECONDS", OPT_INT, F(drain_seconds), "30", 0, 86400, "S",
   "on SIGTERM, after the delay, wait this long for admitted work and jobs (new work gets 503)"},
  {"drain-delay", "JEMD_DRAIN_DELAY", OPT_INT, F(drain_delay), "0", 0, 3600, "S",
   "on SIGTERM, first keep serving this long (readiness and new jobs 503)"},
  {"api-key-file", "JEMD_API_KEY_FILE", OPT_STR, F(api_key_file), "", 0, 0, "PATH",
   "file of bearer tokens (one per line) for job routes and model load/unload"},
  {"protect-scoring", "JEMD_PROTECT_SCORING", OPT_BOOL, F(protect_scoring), "false", 0, 1,
   NULL, "require the API key on scoring routes too"},
  {"max-samples", "JEMD_MAX_SAMPLES", OPT_INT, F(max_samples), "64", 1, 4096, "N",
   "most chains (samples) in one SGLD job"},
  {"max-steps", "JEMD_MAX_STEPS", OPT_INT, F(max_steps), "2000", 1, 1000000, "N",
   "most SGLD steps in one job"},
  {"max-queued-jobs", "JEMD_MAX_QUEUED_JOBS", OPT_INT, F(max_queued_jobs), "8", 1, 100000,
   "N", "queued + running jobs before POST /v1/samples gets 429"},
  {"max-jobs", "JEMD_MAX_JOBS", OPT_INT, F(max_jobs), "256", 1, 1000000, "N",
   "jobs kept, finished ones too (oldest finished evicted first)"},
  {"max-job-bytes", "JEMD_MAX_JOB_BYTES", OPT_LL, F(max_job_bytes), "268435456", 1024,
   1ll << 40, "BYTES", "memory for stored jobs' chains and results (429 when full)"},
  {"job-ttl", "JEMD_JOB_TTL", OPT_INT, F(job_ttl), "3600", 1, 30 * 86400, "S",
   "seconds a finished job and its images are kept (then 404)"},
  {"job-slice-ms", "JEMD_JOB_SLICE_MS", OPT_INT, F(job_slice_ms), "20", 1, 60000, "MS",
   "SGLD time of one job slice before it yields the worker (>= 1 step)"},
  {"job-nice", "JEMD_JOB_NICE", OPT_INT, F(job_nice), "10", 0, 19, "N",
   "nice value added to a worker thread during a job slice (0 = off)"},
  {"job-store", "JEMD_JOB_STORE", OPT_STR, F(job_store), "memory", 0, 0, "URL",
   "where jobs live: memory (this process) or redis://[user:password@]host:port[/db], "
   "shared by every replica so that any of them answers for any job and runs the next"},
  {"job-lease-ms", "JEMD_JOB_LEASE_MS", OPT_INT, F(job_lease_ms), "5000", 300, 600000, "MS",
   "Redis store: a replica renews its running jobs' leases; another takes a job over once "
   "its lease has lapsed this long"},
  {"cors-origin", "JEMD_CORS_ORIGIN", OPT_ORIGINS, F(cors_origins), "", 0, 0, "ORIGIN",
   "let web pages from ORIGIN (scheme://host[:port], or * for any) call the API: OPTIONS "
   "preflights get 204 and answers carry Access-Control-Allow-Origin; repeatable"},
  {"log-level", "JEMD_LOG_LEVEL", OPT_LEVEL, F(log_level_name), "info", 0, 0, "LEVEL",
   "error, warn, info or debug"},
};
#define N_OPTS ((int)(sizeof opts / sizeof opts[0]))

void srv_config_usage(FILE *f) {
  fprintf(f,
          "usage: jemd [OPTIONS]\n"
          "Serves JEM models over HTTP: /v1/classify, the Open Inference Protocol v2,\n"
          "sample jobs, a page at /, /healthz, /readyz and /metrics.  Every option can\n"
          "also be set with its environment variable; a flag wins over the environment.\n\n");
  for (int i = 0; i < N_OPTS; i++) {
    const opt *o = &opts[i];
    char left[64];
    if (o->metavar)
      snprintf(left, sizeof left, "--%s %s", o->flag, o->metavar);
    else
      snprintf(left, sizeof left, "--%s", o->flag);
    fprintf(f, "  %-30s %s\n  %-30s [%s; default: %s]\n", left, o->help, "", o->env,
            o->def[0] ? o->def : "none");
  }
  fprintf(f, "  %-30s %s\n  %-30s %s\n", "--version", "print the version and exit",
          "--help", "print this help and exit");
  fprintf(f,
          "\nSignals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the --model files and\n"
          "rescans --model-dir (a model whose new file fails to load keeps serving the old).\n");
}

static int parse_bool(const char *v, int *out) {
  if (!strcasecmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
      !strcasecmp(v, "on")) {
    *out = 1;
    return 0;
  }
  if (!strcasecmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") ||
      !strcasecmp(v, "off")) {
    *out = 0;
    return 0;
  }
  return -1;
}

/* A --cors-origin value: "*" or scheme://host[:port] as browsers send it in
 * Origin (no path, no trailing slash), so that matching is a string compare. */
static int origin_ok(const char *v, size_t n) {
  if (n == 1 && v[0] == '*') return 1;
  size_t s = !strncmp(v, "http://", 7) ? 7 : !strncmp(v, "https://", 8) ? 8 : 0;
  if (!s || n <= s) return 0;
  for (size_t i = s; i < n; i++)
    if (!(isalnum((unsigned char)v[i]) || strchr("-.:[]", v[i]))) return 0;
  return 1;
}

/* Appends v to o's list: each comma- or space-separated item for
 * OPT_ORIGINS, v whole for OPT_PATHS. */
static int list_add(const opt *o, const char *v, char *err, size_t errlen) {
  char *list = (char *)&srv_cfg + o->off;
  for (const char *p = v; *p;) {
    size_t n = o->type == OPT_PATHS ? strlen(p) : strcspn(p, ", \t\n");
    if (o->type == OPT_PATHS && strchr(p, '\n')) {
      snprintf(err, errlen, "a path with a newline is not accepted");
      return -1;
    }
    if (n) {
      if (o->type == OPT_ORIGINS && !origin_ok(p, n)) {
        snprintf(err, errlen, "'%.*s' is not * or scheme://host[:port] (http or https, no "
                 "path)", (int)(n > 200 ? 200 : n), p);
        return -1;
      }
      size_t used = strlen(list);
      if (used + n + 2 > o->size) {
        snprintf(err, errlen, "too many values (at most %zu bytes in all)", o->size - 2);
        return -1;
      }
      if (used) list[used++] = '\n';
      memcpy(list + used, p, n);
      list[used + n] = '\0';
    }
    p += n;
    if (*p) p++;
  }
  return 0;
}

/* Stores value v for o; writes why not into err. */
static int set_opt(const opt *o, const char *v, char *err, size_t errlen) {
  char *base = (char *)&srv_cfg;
  switch (o->type) {
  case OPT_STR:
  case OPT_LEVEL: {
    if (strlen(v) >= o->size) {
      snprintf(err, errlen, "value too long (at most %zu bytes)", o->size - 1);
      return -1;
    }
    if (o->type == OPT_LEVEL) {
      static const char *const names[] = {"error", "warn", "info", "debug"};
      int lv = -1;
      for (int i = 0; i < 4; i++)
        if (!strcasecmp(v, names[i])) lv = i;
      if (lv < 0) {
        snprintf(err, errlen, "'%s' is not one of error, warn, info, debug", v);
        return -1;
      }
      srv_cfg.log_level = lv;
    }
    memcpy(base + o->off, v, strlen(v) + 1);
    return 0;
  }
  case OPT_INT:
  case OPT_LL: {
    errno = 0;
    char *end;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end) {
      snprintf(err, errlen, "'%s' is not an integer", v);
      return -1;
    }
    if (x < o->min || x > o->max) {
      snprintf(err, errlen, "%lld is outside [%lld, %lld]", x, o->min, o->max);
      return -1;
    }
    if (o->type == OPT_INT)
      *(int *)(base + o->off) = (int)x;
    else
      *(long long *)(base + o->off) = x;
    return 0;
  }
  case OPT_ORIGINS:
  case OPT_PATHS:
    return list_add(o, v, err, errlen);
  case OPT_BOOL: {
    int b;
    if (parse_bool(v, &b)) {
      snprintf(err, errlen, "'%s' is not a boolean (true/false)", v);
      return -1;
    }
    *(int *)(base + o->off) = b;
    return 0;
  }
  }
  return -1;
}

static const opt *find_opt(const char *name, size_t len) {
  for (int i = 0; i < N_OPTS; i++)
    if (strlen(opts[i].flag) == len && !strncmp(opts[i].flag, name, len)) return &opts[i];
  return NULL;
}

int srv_config_parse(int argc, char **argv, int *status) {
  char err[256];
  memset(&srv_cfg, 0, sizeof srv_cfg);
  for (int i = 0; i < N_OPTS; i++)
    if (set_opt(&opts[i], opts[i].def, err, sizeof err)) {
      fprintf(stderr, "jemd: internal: bad default for --%s: %s\n", opts[i].flag, err);
      *status = 1;
      return 1;
    }
  for (int i = 0; i < N_OPTS; i++) {
    const char *v = getenv(opts[i].env);
    if (v && set_opt(&opts[i], v, err, sizeof err)) {
      fprintf(stderr, "jemd: %s: %s\n", opts[i].env, err);
      *status = 2;
      return 1;
    }
  }
  unsigned char flagged[N_OPTS] = {0}; /* a list flag replaces its variable's values */
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      srv_config_usage(stdout);
      *status = 0;
      return 1;
    }
    if (!strcmp(a, "--version")) {
      printf("jemd %s\n", JEM_VERSION);
      *status = 0;
      return 1;
    }
    if (strncmp(a, "--", 2) != 0) {
      fprintf(stderr, "jemd: unexpected argument '%s' (try --help)\n", a);
      *status = 2;
      return 1;
    }
    const char *name = a + 2;
    const char *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const opt *o = find_opt(name, nlen);
    if (!o) {
      fprintf(stderr, "jemd: unknown option '%.*s' (try --help)\n", (int)nlen + 2, a);
      *status = 2;
      return 1;
    }
    const char *v;
    if (eq)
      v = eq + 1;
    else if (o->type == OPT_BOOL)
      v = "true";
    else if (i + 1 < argc)
      v = argv[++i];
    else {
      fprintf(stderr, "jemd: --%s needs a value (try --help)\n", o->flag);
      *status = 2;
      return 1;
    }
    if ((o->type == OPT_ORIGINS || o->type == OPT_PATHS) && !flagged[o - opts]++)
      *((char *)&srv_cfg + o->off) = '\0';
    if (set_opt(o, v, err, sizeof err)) {
      fprintf(stderr, "jemd: --%s: %s\n", o->flag, err);
      *status = 2;
      return 1;
    }
  }
  if (srv_cfg.queue_size < srv_cfg.max_images) { /* such a request could never be queued */
    fprintf(stderr, "jemd: --queue-size %d is below --max-images %d; a request of %d images "
                    "would always get 503\n", srv_cfg.queue_size, srv_cfg.max_images,
            srv_cfg.max_images);
    *status = 2;
    return 1;
  }
  if (srv_cfg.max_buffered_bytes <= srv_cfg.max_body_bytes) {
    fprintf(stderr, "jemd: --max-buffered-bytes %lld must be above --max-body-bytes %lld, or "
                    "a body of the largest size would always get 503\n",
            srv_cfg.max_buffered_bytes, srv_cfg.max_body_bytes);
    *status = 2;
    return 1;
  }
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (cpus < 1) cpus = 1;
  if (srv_cfg.workers == 0) srv_cfg.workers = (int)(cpus > 64 ? 64 : cpus);
  if (srv_cfg.blas_threads == 0) {
    long b = cpus / srv_cfg.workers;
    srv_cfg.blas_threads = b < 1 ? 1 : (int)b;
  }
  return 0;
}

static int readable(const char *p) { return access(p, R_OK) == 0; }

int srv_config_resolve_model(void) {
  if (srv_cfg.model[0] || srv_cfg.model_dir[0]) return 0;
  const char *a = "models/fmnist-jem.safetensors";
  const char *b = JEMD_DATADIR "/models/fmnist-jem.safetensors";
  if (!readable(a) && !readable(b)) {
    fprintf(stderr, "jemd: no model: neither %s (in the working directory) nor %s is "
                    "readable; give one with --model PATH\n", a, b);
    return -1;
  }
  snprintf(srv_cfg.model, sizeof srv_cfg.model, "%s", readable(a) ? a : b);
  return 0;
}
