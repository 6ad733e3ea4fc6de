/* srv.h - internal interfaces of jemd, the HTTP scoring daemon (server/). */
#ifndef JEM_SRV_H
#define JEM_SRV_H

#include "jem.h"

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#ifndef JEMD_DATADIR
#define JEMD_DATADIR "/usr/local/share/jemd"
#endif

/* ------------------------------------------------------------------------ */
/* Configuration (server/config.c): one table gives flags, JEMD_* variables,
 * defaults, validation and --help. */

typedef struct srv_config {
  char host[256];
  int port;
  char model[16384];            /* --model paths, '\n'-separated; "" until resolved */
  char model_dir[4096];         /* --model-dir */
  char default_model[128];      /* --default-model */
  int workers;                  /* compute workers (libuv pool threads) */
  int blas_threads;             /* OpenBLAS threads per call, 0 = auto */
  int http_threads;             /* MHD epoll thread-pool size */
  int max_batch;                /* images per jem_score_batch call */
  long long workspace_bytes;    /* scratch per worker: caps the workspace's batch */
  int wide_transforms;          /* wide layers on the model's packed transforms */
  int max_delay_us;             /* how long a partial batch may wait */
  int queue_size;               /* queued images before 503 */
  long long max_body_bytes;
  long long max_buffered_bytes; /* request bodies of all connections together */
  long long max_json_elements;  /* values in one JSON body (containers weigh more) */
  long long max_image_pixels;
  int max_image_side;
  int max_images;               /* images in one request */
  long long max_request_pixels; /* header-declared pixels of all a request's images */
  int max_json_depth;           /* nesting of JSON arrays/objects */
  int max_connections;
  int max_connections_per_ip;
  int probe_port;               /* -1 = none */
  int reload_timeout;           /* seconds a SIGHUP reload may take */
  int timeout;                  /* inactivity timeout, seconds */
  int request_deadline;         /* whole-request wall clock, seconds */
  int drain_seconds;
  int drain_delay;              /* seconds to keep accepting after SIGTERM */
  char api_key_file[4096];
  int protect_scoring;
  int log_level;
  char log_level_name[16];
  char cors_origins[4096];      /* '\n'-separated; "" = no CORS headers */
  /* SGLD jobs (server/h_jobs.c, job_store.c, job_work.c) */
  int max_samples;              /* n per job */
  int max_steps;                /* steps per job */
  int max_queued_jobs;          /* queued + running jobs before 429 */
  int max_jobs;                 /* stored jobs, finished ones included */
  long long max_job_bytes;      /* chains + results of stored jobs */
  int job_ttl;                  /* seconds a finished job is kept */
  int job_slice_ms;             /* SGLD time per scheduler slice */
  int job_nice;                 /* nice value added while a slice runs */
  char job_store[1024];         /* "memory" or a redis:// URL */
  int job_lease_ms;             /* Redis store: a running job's lease */
} srv_config;

extern srv_config srv_cfg;

/* Parses the environment then argv (flags win).  Returns 0 to run, or 1 when
 * the process should exit with *status (--help, --version, usage error). */
int srv_config_parse(int argc, char **argv, int *status);
void srv_config_usage(FILE *f);
/* Fills srv_cfg.model when it and --model-dir are empty: models/fmnist-jem.safetensors in the
 * working directory, then JEMD_DATADIR/models/; -1 (with a message naming
 * both) when neither is readable. */
int srv_config_resolve_model(void);

/* ------------------------------------------------------------------------ */
/* Logging (server/log.c): logfmt lines on stderr. */

enum { SRV_LOG_ERROR = 0, SRV_LOG_WARN, SRV_LOG_INFO, SRV_LOG_DEBUG };
void srv_log_(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define srv_log(level, ...) \
  do { if ((level) <= srv_cfg.log_level) srv_log_((level), __VA_ARGS__); } while (0)
/* Copies s into out (cap bytes) with logfmt quoting when needed. */
void srv_log_quote(char *out, size_t cap, const char *s);

/* ------------------------------------------------------------------------ */
/* Time */

uint64_t srv_now_ns(void);    /* CLOCK_MONOTONIC */
double srv_wall_s(void);      /* CLOCK_REALTIME */

/* ------------------------------------------------------------------------ */
/* systemd notification (server/sdnotify.c); no-op without $NOTIFY_SOCKET. */

int srv_sd_notify(const char *state);
uint64_t srv_sd_watchdog_ns(void);  /* 0 = no watchdog */

/* ------------------------------------------------------------------------ */
/* The model repository (server/modelref.c): models by name, each
 * refcounted so that SIGHUP or a repository load can swap it while batches
 * still run on the old one. */

#define SRV_MAX_MODELS 64
#define SRV_MODEL_NAME_MAX 128

typedef struct srv_model {
  jem_model *m;
  atomic_int refs;
  uint64_t gen;                 /* 1, 2, ... per successful load, unique across models */
  char name[SRV_MODEL_NAME_MAX]; /* what clients call it: the file stem, or with a
                                    single --model its metadata name */
  char path[4096];
  double loaded_at;             /* wall clock */
  int label;                    /* srv_metrics_model(name) */
} srv_model;

/* Loads the models of --model / --model-dir (every one must load) and
 * picks the default; -1 and err otherwise. */
int srv_models_init(char *err, size_t errlen);
/* SIGHUP: loads the --model files again and rescans --model-dir (new,
 * changed and removed files).  Returns the number of failures (err: the
 * last); a model whose file fails keeps serving its old version. */
int srv_models_rescan(char *err, size_t errlen);
/* POST /v2/repository/models/{name}/load: (re)loads a known model, or
 * DIR/name.safetensors under --model-dir.  0, 1 unknown name, -1 failed,
 * -2 another load still running after --reload-timeout. */
int srv_model_repo_load(const char *name, char *err, size_t errlen);
int srv_model_repo_unload(const char *name);          /* 0, -1 unknown, -2 as load */
srv_model *srv_model_find(const char *name);  /* new reference; NULL name = the default;
                                                 NULL when unknown or unloaded */
srv_model *srv_model_get(void);       /* the default model (new reference) or NULL */
/* Why name (NULL: the default) has no loaded model, in msg; the status to
 * answer: 503 for the default, 404 for a named one. */
int srv_model_missing(const char *name, char *msg, size_t cap);
void srv_model_put(srv_model *sm);    /* NULL ok */
void srv_model_default(char *out, size_t cap);  /* the default model's name */
/* New references to the loaded models, in repository order; their count. */
int srv_models_list(srv_model **out, int cap);
void srv_model_shutdown(void);        /* drops every model (never waits for a load) */
int srv_model_ready(void);            /* 1 when any model is loaded */
int srv_model_name_ok(const char *s); /* letters, digits, . _ - (not first .) */

typedef struct srv_model_status {     /* one row of the repository index */
  char name[SRV_MODEL_NAME_MAX];
  char reason[256];
  int ready, is_default;
  uint64_t gen;
  double loaded_at;
} srv_model_status;
int srv_models_index(srv_model_status *out, int cap);
/* Counts a SIGHUP reload's result (jem_model_reloads_total). */
void srv_model_count_reload(int ok);

/* ------------------------------------------------------------------------ */
/* Scheduler (server/sched.c).  See the comment at the top of sched.c. */

/* Workspaces a worker keeps, one per model generation, so that batches
 * alternating between models reuse theirs instead of rebuilding. */
#define SRV_WORKER_WS 4
typedef struct srv_worker {
  int index;                    /* 0 .. workers-1 (slot, not thread) */
  struct {
    jem_ws *ws;                 /* for model generation gen, max_batch images */
    uint64_t gen, used;         /* used: the worker's tick of its last use */
  } ws[SRV_WORKER_WS];          /* ws NULL: free */
  uint64_t tick;
  float *xbuf;                  /* gather buffer, max_batch * C*S*S */
  size_t xbuf_len;
} srv_worker;

/* The workspace of this worker for model sm: the one it keeps for sm's
 * generation, else a new one, after dropping the least recently used
 * until the kept ones and the new one fit --workspace-bytes together (a
 * lone workspace may take all of it).  NULL on out of memory. */
jem_ws *srv_worker_ws(srv_worker *wk, const srv_model *sm);
/* Frees every workspace the worker keeps. */
void srv_worker_free_ws(srv_worker *wk);

enum { SRV_WORK_SCORE = 0, SRV_WORK_JOB = 1, SRV_WORK_KINDS };

typedef struct srv_work srv_work;
struct srv_work {
  int kind;                     /* SRV_WORK_JOB for background work (jobs, large decodes) */
  /* Runs on a pool thread with exclusive use of wk.  Keep it short (one
   * slice): the scheduler cannot preempt it. */
  void (*run)(srv_work *w, srv_worker *wk);
  /* Runs on the scheduler's loop thread after run(), or with canceled=1
   * instead of run() when the scheduler stops.  May call srv_sched_submit
   * again (next slice).  Owns w from then on. */
  void (*done)(srv_work *w, int canceled);
  /* Step-level batching (SGLD jobs): items with the same non-NULL
   * batch_key and run_group start together in one slot, as many as fit
   * in --max-batch by batch_size (at least one), and run_group(items,
   * count, wk) runs them all instead of run(); done() is still called for
   * each.  NULL batch_key: never grouped. */
  const void *batch_key;
  int batch_size;
  void (*run_group)(srv_work **items, int count, srv_worker *wk);
  /* scheduler-owned */
  srv_work *next_;
  uint64_t enq_ns_;
};

/* Scoring task: one HTTP request's images.  Allocated by the handler. */
typedef struct srv_task srv_task;
enum { SRV_TASK_QUEUED = 0, SRV_TASK_DONE, SRV_TASK_CANCELED, SRV_TASK_SHUTDOWN,
       SRV_TASK_FAILED };
struct srv_task {
  srv_model *model;             /* reference held by the task */
  int n;
  int want_grad;
  float *x;                     /* [n, C, S, S] model input */
  /* outputs, [n,K] or [n] */
  float *logits, *probs, *confidence;
  float *score[JEM_NUM_SCORES]; /* as jem_scores: NaN where not computed */
  int *label;
  /* progress (loop thread only) */
  int next_img, done_img, running;
  atomic_int state;
  uint64_t t_enq, t_first, t_done;
  int conn_fd;                  /* checked for a client hang-up while queued */
  /* Called once on the loop thread when the task is DONE, CANCELED (client
   * gone), SHUTDOWN or FAILED.  Resumes the HTTP connection. */
  void (*complete)(srv_task *t);
  void *owner;
  srv_task *next_;
};

int srv_sched_start(void);
/* Reserves queue room for n images; 0 or -1 when the queue is full. */
int srv_sched_reserve(int n);
void srv_sched_unreserve(int n);
/* Queues a task whose room was reserved.  -1 when the scheduler stopped
 * (the reservation is released; complete() is not called). */
int srv_sched_score(srv_task *t);
/* Queues background work (jobs); -1 when stopping. */
int srv_sched_submit(srv_work *w);
/* Images admitted and not yet in a batch (decoding or queued). */
int srv_sched_queued_images(void);
/* 1 when the client of connection fd hung up (a non-blocking poll). */
int srv_conn_gone(int fd);
int srv_sched_running(void);
/* Cancels queued work (SHUTDOWN), waits for running work, stops the loop. */
void srv_sched_stop(void);
/* Allocates the task's output arrays for model m; 0 or -1. */
int srv_task_alloc(srv_task *t, const jem_model *m, int n);
void srv_task_free(srv_task *t);

/* ------------------------------------------------------------------------ */
/* Metrics (server/metrics.c): a registry of render functions, one per
 * subsystem (http.c, sched.c, modelref.c, h_classify.c, h_jobs.c), each
 * rendering its own families with these helpers. */

enum { SRV_REJ_QUEUE_FULL = 0, SRV_REJ_TOO_LARGE, SRV_REJ_UNAUTHORIZED,
       SRV_REJ_BAD_REQUEST, SRV_REJ_UNSUPPORTED, SRV_REJ_CLIENT_GONE,
       SRV_REJ_DEADLINE, SRV_REJ_DRAINING, SRV_REJ_STORE_FULL, SRV_REJ_BODY_BUDGET,
       SRV_REJ_COUNT };

void srv_metrics_init(void);
/* Counts a request refused or dropped (jem_rejected_requests_total);
 * out-of-range reasons are ignored. */
void srv_metrics_reject(int reason);

typedef struct srv_mbuf srv_mbuf;
void srv_mprintf(srv_mbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv_mhead(srv_mbuf *b, const char *name, const char *type, const char *help);
/* A label value with backslash, double quote and newline escaped. */
void srv_mlabel(char *out, size_t cap, const char *s);

#define SRV_HIST_MAX 24
typedef struct srv_hist {
  const double *le;             /* upper bounds, nb of them */
  int nb;
  uint64_t counts[SRV_HIST_MAX + 1]; /* the last is +Inf */
  double sum;
  pthread_mutex_t mu;
} srv_hist;
void srv_hist_init(srv_hist *h, const double *le, int nb);
void srv_hist_obs(srv_hist *h, double v); /* NaN is not observed */
int srv_hist_empty(srv_hist *h);
/* One histogram's series; labels is "" or `a="x",b="y"`. */
void srv_mhist(srv_mbuf *b, const char *name, const char *labels, srv_hist *h);
#define SRV_NB(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* Model names as the `model` label.  Families that carry it keep one
 * counter or histogram per label index: 0 is no model (label left out),
 * then every name the repository has loaded, in order of first use, and
 * past SRV_METRIC_MODELS - 2 names one shared "(other)" (a name no model
 * can have), so series stay bounded.  Indexes never change. */
#define SRV_METRIC_MODELS (SRV_MAX_MODELS + 2)
int srv_metrics_model(const char *name);       /* the index of name; 0 for NULL or "" */
int srv_metrics_models(void);                  /* indexes in use: 1 + names (+ other) */
const char *srv_metrics_model_name(int index); /* "" for 0 */
/* `model="NAME"` for index (label-escaped), with sep before it; "" for 0. */
void srv_mlabel_model(char *out, size_t cap, const char *sep, int index);

/* Adds a subsystem's families to /metrics, rendered in registration order
 * (a function registered twice renders once; up to 16). */
void srv_metrics_register(void (*render)(srv_mbuf *b));
/* Prometheus text format 0.0.4; malloc'd. */
char *srv_metrics_render(size_t *len);

/* ------------------------------------------------------------------------ */
/* HTTP (server/http.c) and routes (server/routes.c) */

typedef struct srv_req srv_req;
typedef enum MHD_Result (*srv_handler)(srv_req *r);

enum {
  SRV_R_V2 = 1,         /* errors as {"error": "..."} (Open Inference Protocol) */
  SRV_R_BODY = 2,       /* collects a request body */
  SRV_R_SCORING = 4,    /* needs the API key under --protect-scoring */
  SRV_R_AUTH = 8,       /* always needs the API key when one is configured */
  SRV_R_PROBE = 16,     /* also served on --probe-port */
};

typedef struct srv_route {
  const char *method;   /* "GET", "POST", "DELETE" */
  const char *pattern;  /* "/v2/models/{name}/infer"; also the metrics label */
  int flags;
  srv_handler fn;
} srv_route;

extern const srv_route srv_routes[];
extern const int srv_n_routes;

#define SRV_MAX_PARAMS 4
#define SRV_PARAM_MAX 256

enum { SRV_REQ_NEW = 0, SRV_REQ_BODY, SRV_REQ_WAITING, SRV_REQ_RESUMED,
       SRV_REQ_RESPONDED };

struct srv_req {
  struct MHD_Connection *conn;
  const srv_route *route;
  int route_idx;                /* index in srv_routes, -1 = none */
  int model_label;              /* the model that answered, for metrics (0 = none) */
  const char *method;
  const char *url;
  char id[48];
  uint64_t t_start;
  int state;
  /* body */
  char *body;
  size_t body_len, body_cap;
  size_t body_seen;             /* including discarded bytes */
  size_t body_expect;           /* Content-Length + 1, 0 when chunked */
  size_t budget;                /* bytes taken from --max-buffered-bytes */
  int body_refused;             /* 413 (too large) or 503 (budget), once seen */
  int uri_error;                /* found by the URI callback, answered first */
  int probe;                    /* arrived on --probe-port */
  struct json_ahead *ahead;     /* a large JSON body's parse on a worker */
  /* path parameters, in pattern order */
  char params[SRV_MAX_PARAMS][SRV_PARAM_MAX];
  int n_params;
  /* response bookkeeping */
  int status;
  size_t bytes_out;
  int close_conn;
  /* async work: on_resume builds the response after srv_req_resume */
  enum MHD_Result (*on_resume)(srv_req *r);
  void *data;
  void (*data_free)(void *data);
};

/* Starts MHD serving the routes of table (n of them); returns 0 and fills
 * *port with the bound port, and *probe_port with --probe-port's (-1 when
 * there is none). */
int srv_http_start(const srv_route *table, int n, int *port, int *probe_port);
/* Requests whose headers are in and whose answer is not yet sent. */
int srv_http_inflight(void);
void srv_http_stop(void);
/* SIGTERM's two phases: during the delay every route but job creation is
 * served; while closing, requests with a body (scoring, new jobs) get 503. */
enum { SRV_DRAIN_DELAY = 1, SRV_DRAIN_CLOSING = 2 };
int srv_http_draining(void);
void srv_http_set_drain_phase(int phase);

/* Responses (call only from a handler / on_resume). */
enum MHD_Result srv_respond(srv_req *r, int status, const char *ctype,
                            const void *body, size_t len,
                            const char *const *headers /* name,value,...,NULL */);
/* Steals body. */
enum MHD_Result srv_respond_json(srv_req *r, int status, json_t *body);
enum MHD_Result srv_respond_json_h(srv_req *r, int status, json_t *body,
                                   const char *const *headers);
/* Error in the route's style; code is snake_case. */
enum MHD_Result srv_respond_error(srv_req *r, int status, const char *code,
                                  const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
enum MHD_Result srv_respond_error_h(srv_req *r, int status, const char *code,
                                    const char *const *headers,
                                    const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Suspends r (from its handler) until srv_req_resume (any thread); then
 * r->on_resume runs on an HTTP thread. */
void srv_req_suspend(srv_req *r);
int srv_req_fd(srv_req *r); /* the connection's socket, or -1 */
void srv_req_resume(srv_req *r);

const char *srv_req_header(srv_req *r, const char *name);
const char *srv_req_query(srv_req *r, const char *name);
/* Fails (and responds 400) when a query parameter is not in allowed. */
int srv_req_check_query(srv_req *r, const char *const *allowed);
/* API key check (server/auth.c) for a route with these flags: SRV_R_AUTH, or
 * SRV_R_SCORING under --protect-scoring, needs authorization (the header's
 * value, NULL when absent) to carry a key; 0 when allowed. */
int srv_auth_check(int route_flags, const char *authorization);
int srv_auth_load(const char *path, char *err, size_t errlen);
int srv_auth_enabled(void);

/* Route lookup in table (server/parse.c): returns the index of the route
 * for (method, path), filling r's parameters, -1 when no pattern matches
 * (404), -2 when the path matches with other methods (405; allow gets
 * "GET, HEAD"). */
int srv_route_match(const srv_route *table, int n, const char *method, const char *path,
                    srv_req *r, char *allow, size_t allow_cap);

/* The first look at a request (server/http_check.c).  A query with more
 * pairs than SRV_MAX_QUERY_PAIRS is refused: MHD stores every pair in the
 * connection's 64 KiB memory pool and, once the pool is full (about 1,000
 * pairs), drops the connection without any answer. */
#define SRV_MAX_QUERY_PAIRS 100
enum { SRV_URI_OK = 0, SRV_URI_TOO_MANY_PARAMS, SRV_URI_ENCODED_SLASH }; /* srv_req.uri_error */
/* MHD's URI log callback: allocates the request record (NULL on OOM). */
void *srv_http_on_uri(void *cls, const char *uri, struct MHD_Connection *c);
/* Why r's framing is refused (and *status: 400 or 501), or NULL. */
const char *srv_http_framing_error(srv_req *r, const char *version, int *status);
/* 1 when a client's X-Request-Id may be echoed as ours. */
int srv_http_valid_id(const char *s);
/* MHD's unescape callback: every %HH but %00, which stays literal. */
size_t srv_http_unescape(void *cls, struct MHD_Connection *c, char *s);

/* Request deadline sweep and giving freed heap back, called by main()
 * about every 250 ms. */
void srv_http_tick(void);

/* ------------------------------------------------------------------------ */
/* Handlers */

/* A request whose images declare more pixels than this in all is decoded on
 * a worker (background work), not on the HTTP thread (h_classify.c, h_jobs.c). */
#define SRV_DECODE_INLINE_PIXELS (1ll << 20)

/* Scoring plumbing shared by /v1/classify and /v2 infer (h_classify.c):
 * reserve queue room (503 + Retry-After when full), suspend, queue; the
 * request owns ctx (freed with ctx_free_fn) and on_resume answers.  With
 * prepare (not NULL), that worker-side decode runs first and its finish()
 * queues the task with srv_sched_score, or releases the reservation and
 * resumes. */
typedef struct srv_decode srv_decode;
enum MHD_Result srv_score_submit(srv_req *r, srv_task *t, void *ctx,
                                 void (*ctx_free_fn)(void *),
                                 enum MHD_Result (*on_resume)(srv_req *), srv_decode *prepare);
/* Answers for a task that did not finish (client gone, shutdown, failure);
 * returns 1 when it answered, with *res set. */
int srv_score_unfinished(srv_req *r, srv_task *t, enum MHD_Result *res);
/* Records a scored task in the scoring metrics (jem_scored_images_total,
 * jem_energy, and jem_ood_score from ood[t->n] unless NULL). */
void srv_score_observe(const srv_task *t, const jem_ood_result *ood);
/* Registers the scoring metrics; main() calls it before srv_http_start. */
void srv_classify_start(void);
json_t *srv_jreal(double v);  /* null for NaN/inf */

/* The model a request names (NULL: the default), or NULL after answering
 * 404 model_not_found (503 model_not_loaded for the default) in the
 * route's error shape.  Inline so that the repository (modelref.c) never
 * calls the HTTP layer: the handlers do (no call circle, test_layout). */
static inline srv_model *srv_model_for(srv_req *r, const char *name, enum MHD_Result *res) {
  srv_model *sm = srv_model_find(name);
  if (sm) {
    r->model_label = sm->label;
    return sm;
  }
  char msg[512];
  int status = srv_model_missing(name, msg, sizeof msg);
  const char *h[] = {"Retry-After", "5", NULL};
  *res = srv_respond_error_h(r, status, status == 503 ? "model_not_loaded" : "model_not_found",
                             status == 503 ? h : NULL, "%s", msg);
  return NULL;
}

enum MHD_Result srv_h_healthz(srv_req *r);
enum MHD_Result srv_h_readyz(srv_req *r);
enum MHD_Result srv_h_metrics(srv_req *r);
enum MHD_Result srv_h_models(srv_req *r);
enum MHD_Result srv_h_classify(srv_req *r);
enum MHD_Result srv_h_v2_live(srv_req *r);
enum MHD_Result srv_h_v2_ready(srv_req *r);
enum MHD_Result srv_h_v2_server(srv_req *r);
enum MHD_Result srv_h_v2_model(srv_req *r);
enum MHD_Result srv_h_v2_model_ready(srv_req *r);
enum MHD_Result srv_h_v2_infer(srv_req *r);
enum MHD_Result srv_h_v2_repo_index(srv_req *r);
enum MHD_Result srv_h_v2_repo_load(srv_req *r);
enum MHD_Result srv_h_v2_repo_unload(srv_req *r);
enum MHD_Result srv_h_model(srv_req *r);
/* GET of a file built into jemd (the page, its script and style, the spec) */
enum MHD_Result srv_h_asset(srv_req *r);

/* The files built into jemd: the table is generated at build time from
 * openapi.yaml and web/ by scripts/embed.c (see the Makefile). */
typedef struct srv_asset {
  const char *url;              /* "/", "/ui/app.js", "/openapi.yaml" */
  const char *ctype;
  const unsigned char *data;
  long len;
} srv_asset;
extern const srv_asset srv_assets[];
extern const int srv_n_assets;

/* ------------------------------------------------------------------------ */
/* Request parsing, exposed for the fuzzers (no daemon needed). */

#define SRV_JSON_MAX_DEPTH 64 /* the default of --max-json-depth */
#define SRV_JSON_MAX_ELEMENTS (1ll << 20) /* the default of --max-json-elements */
#define SRV_JSON_CONTAINER_WEIGHT 8

/* 0 when buf's nesting stays <= max_depth and its weight (each ',' 1, each
 * '[' or '{' SRV_JSON_CONTAINER_WEIGHT) <= max_elements; -1 too deep, -2 too
 * many values.  A cheap pass before parsing; does not validate the JSON. */
int srv_json_scan(const char *buf, size_t len, int max_depth, long long max_elements);
/* A JSON body at least this large is parsed on a worker before its
 * handler runs (http.c), not on an HTTP thread. */
#define SRV_JSON_AHEAD_BYTES (256 * 1024)
/* Hands a parse done ahead (tree or failure, with srv_json_parse's status
 * and err) to the next srv_json_parse of exactly (buf, len) on this thread;
 * srv_json_ahead_clear drops it if no handler asked.  j is stolen. */
void srv_json_ahead(const char *buf, size_t len, json_t *j, int status, const char *err);
void srv_json_ahead_clear(void);

/* srv_json_scan's depth check alone: 0 or -1. */
int srv_json_depth_ok(const char *buf, size_t len, int max_depth);
/* json_loadb with the daemon's flags after srv_json_scan (--max-json-depth
 * and --max-json-elements, the SRV_JSON_ defaults when unset).  NULL and err
 * on failure, with *status 400 (malformed, too deep), 413 (too many values)
 * or 422 (valid JSON with a number beyond int64/double); 0 on success. */
json_t *srv_json_parse(const char *buf, size_t len, int *status, char *err, size_t errlen);

/* Strict base64 (standard alphabet, optional padding, optional
 * "data:...;base64," prefix).  Returns malloc'd bytes or NULL. */
unsigned char *srv_b64_decode(const char *s, size_t len, size_t *out_len);

typedef struct srv_blob { const unsigned char *p; size_t len; unsigned char *owned; } srv_blob;

/* POST /v1/classify JSON body: {"images": ["<base64>", ...]}.  Returns 0
 * and malloc'd blobs (free with srv_blobs_free) or an HTTP status with the
 * error code (invalid_json, unknown_field, ...) and a message in err. */
int srv_classify_parse_json(const char *body, size_t len, int max_images,
                            srv_blob **imgs, int *n, const char **code, char *err,
                            size_t errlen);
void srv_blobs_free(srv_blob *b, int n);
/* The daemon's per-image limits (--max-body-bytes, --max-image-side,
 * --max-image-pixels) for jem_image_dims and jem_image_to_input. */
void srv_image_limits(jem_image_limits *l);
/* Adds one image's header-declared pixels to *total (a request's running
 * sum, checked against --max-request-pixels before anything is decoded, and
 * compared with SRV_DECODE_INLINE_PIXELS to choose where to decode).  -1 and
 * 413's message in err once the sum passes the limit; a bad header adds
 * nothing (the decoder reports it). */
int srv_request_pixels_add(long long *total, const void *img, size_t len,
                           const jem_image_limits *lim, char *err, size_t errlen);

/* multipart/form-data: boundary from the Content-Type value, then the parts
 * (pointing into body).  Return 0 or an HTTP status with err. */
int srv_multipart_boundary(const char *ctype, char *out, size_t cap,
                           char *err, size_t errlen);
int srv_multipart_parse(const char *body, size_t len, const char *boundary,
                        int max_parts, srv_blob **parts, int *n,
                        char *err, size_t errlen);

/* Open Inference Protocol v2 infer request. */
typedef struct srv_v2_req {
  char id[256];
  int has_id;
  int n;                        /* batch */
  float *x;                     /* [n, C, H, W] */
  int want[4];                  /* logits, probs, energy, grad_norm */
  int binary[4];                /* answer that output as raw bytes */
} srv_v2_req;
/* Returns 0 or an HTTP status (400/413/422) with err.  json_len is the
 * Inference-Header-Content-Length (binary tensor extension: the JSON header
 * is body[0..json_len), the input tensor's little-endian bytes follow), or
 * len for a plain JSON body. */
int srv_v2_parse_infer(const char *body, size_t len, size_t json_len, int c, int s, int max_n,
                       srv_v2_req *out, char *err, size_t errlen);
void srv_v2_req_free(srv_v2_req *q);


/* ------------------------------------------------------------------------ */
/* Decoding a request's encoded images into a model input tensor
 * (server/decode.c), shared by /v1/classify and job init images: all at once
 * on the HTTP thread, or one image per slice on a worker for requests past
 * SRV_DECODE_INLINE_PIXELS, so scoring batches run in between. */
enum { SRV_DECODE_PLAIN = 0,    /* errors name no image (one raw image body) */
       SRV_DECODE_IMAGE,        /* "image 3: ..." */
       SRV_DECODE_INIT };       /* "init.images[3]: ..." */
struct srv_decode {
  srv_work work;                /* the worker-side decode */
  const jem_model *m;
  jem_image_limits lim;
  srv_blob *imgs;               /* owned; freed once all are decoded */
  int n_imgs, n_decoded;
  float *x;                     /* [n_imgs, C, S, S], not owned */
  int naming;                   /* SRV_DECODE_PLAIN, _IMAGE or _INIT */
  int conn_fd;                  /* a worker stops once this client hung up */
  /* outcome: status 0 while all is well, else the HTTP status of the
   * answer (400 invalid_image, 413 image_too_large, 415 unsupported_image,
   * 503 out_of_memory) with its code and message */
  int status;
  const char *code;
  char err[600];
  int client_gone, canceled;
  /* Loop thread, once, after the worker-side decode ended: all decoded,
   * failed, client gone, or canceled (the scheduler stopped). */
  void (*finish)(srv_decode *d);
};
/* Decodes up to max more images (INT_MAX: the rest) on the calling thread:
 * 0 when all are decoded (imgs freed), 1 when some remain, -1 on failure. */
int srv_decode_run(srv_decode *d, int max);
/* Decodes the rest on workers; -1 (nothing queued) when the scheduler stops. */
int srv_decode_submit(srv_decode *d);
void srv_decode_free(srv_decode *d); /* the encoded images */

#endif
