/* jobs.c - on-demand SGLD sampling as asynchronous jobs: POST /v1/samples,
 * the /v1/jobs routes, the bounded job store (caps, TTL) and the work items
 * that run the chains on the scheduler's pool in time slices.
 *
 * Life of a job.  The HTTP thread parses and validates the request, takes a
 * model reference, allocates the chains and puts the job in the store
 * (QUEUED) and in the scheduler's background queue.  run() (pool thread,
 * exclusive use of one worker slot) does one slice: single SGLD steps on the
 * worker's workspace until --job-slice-ms has passed (at least one step),
 * checking the cancel flag between steps; the slice that does the last step
 * also scores the samples and encodes the grid PNG, one PNG per sample and
 * the .npy, so HTTP threads only copy bytes.  done() (loop thread) publishes
 * progress and resubmits the job at the back of the queue, which interleaves
 * the slices of concurrent jobs and lets scoring batches in between (see
 * sched.c for the fairness rules).
 *
 * Ownership.  A job submitted to the scheduler (in_sched) is never freed:
 * DELETE, shutdown and expiry only mark it (canceled, removed from the
 * store), and done() frees the chains and, if the store dropped it, the job.
 * The job holds a model reference while its chains may still run, so SIGHUP
 * never pulls the model from under it; the last done() drops it (the job
 * keeps copies of the names it shows), so finished jobs do not keep an old
 * model alive until they expire.
 * Handlers that send result bytes hold a reference (refs) while they copy.
 * Everything else is under one mutex.
 *
 * Determinism.  Chain i draws from the stream (seed, i) (jem_sample_init),
 * so a job's samples depend only on its parameters.  Running a chain k steps
 * in several jem_sgld_run calls gives the same numbers as one call, and a job
 * runs on a workspace of the capacity `jem sample` uses (min(n, 64)), so the
 * PNGs and the .npy are byte-identical to `jem sample --seed S --threads T`
 * with T the daemon's BLAS threads (one per worker by default; the core's
 * batch split and OpenBLAS's sums depend on the thread count).  Jobs are not
 * batched with each other: each runs its own GEMMs. */
#include "jobs.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Request parsing */

void srv_samples_req_free(srv_samples_req *q) {
  if (!q) return;
  free(q->x);
  q->x = NULL;
  srv_blobs_free(q->imgs, q->n_imgs);
  q->imgs = NULL;
  q->n_imgs = 0;
}

static int fail(const char **code, const char *c, int status) {
  *code = c;
  return status;
}

/* Base64-decodes init.images into q->imgs and adds up the pixels their
 * headers declare (q->pixels, bounded by --max-request-pixels); the images
 * themselves are decoded by srv_samples_decode.  Returns 0 or a status. */
static int parse_images(json_t *imgs, const jem_image_limits *lim, int n, srv_samples_req *q,
                        const char **code, char *err, size_t errlen) {
  q->imgs = calloc((size_t)n, sizeof *q->imgs);
  if (!q->imgs) {
    snprintf(err, errlen, "out of memory for %d images", n);
    return fail(code, "out_of_memory", 503);
  }
  for (int i = 0; i < n; i++) {
    json_t *s = json_array_get(imgs, (size_t)i);
    size_t blen = 0;
    unsigned char *bytes = srv_b64_decode(json_string_value(s), json_string_length(s), &blen);
    if (!bytes) {
      snprintf(err, errlen, "init.images[%d] is not valid base64", i);
      return fail(code, "invalid_base64", 400);
    }
    q->imgs[q->n_imgs++] = (srv_blob){bytes, blen, bytes};
    if (srv_request_pixels_add(&q->pixels, bytes, blen, lim, err, errlen))
      return fail(code, "request_too_large", 413);
  }
  return 0;
}

int srv_samples_decode(srv_samples_req *q, const jem_model *m, const jem_image_limits *lim,
                       int max_images, const char **code, char *err, size_t errlen) {
  if (q->init != JEM_SAMPLE_INIT_GIVEN || !q->imgs) return 0;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  if (!q->x && !(q->x = malloc(sizeof(float) * chw * (size_t)q->n))) {
    snprintf(err, errlen, "out of memory for %d images", q->n);
    srv_samples_req_free(q);
    return fail(code, "out_of_memory", 503);
  }
  for (int done = 0; q->n_decoded < q->n_imgs && done < max_images; done++) {
    int i = q->n_decoded;
    char ierr[256];
    int rc = jem_image_to_input(q->imgs[i].p, q->imgs[i].len, &m->pre, m->arch.image_size, lim,
                                q->x + (size_t)i * chw, ierr, sizeof ierr);
    if (rc == 0) {
      q->n_decoded++;
      continue;
    }
    snprintf(err, errlen, "init.images[%d]: %s", i, ierr);
    srv_samples_req_free(q);
    if (rc == JEM_EUNSUPPORTED) return fail(code, "unsupported_image", 415);
    if (rc == JEM_ETOOBIG) return fail(code, "image_too_large", 413);
    if (rc == JEM_ENOMEM) return fail(code, "out_of_memory", 503);
    return fail(code, "invalid_image", 400);
  }
  if (q->n_decoded == q->n_imgs) { /* decoded: the encoded bytes can go */
    srv_blobs_free(q->imgs, q->n_imgs);
    q->imgs = NULL;
    q->n_imgs = 0;
  }
  return 0;
}

static const char *json_type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  default: return "null";
  }
}

/* An integer field in [lo, hi]: 400 for another type, 422 out of range. */
static int int_field(json_t *v, const char *name, long long lo, long long hi, int *out,
                     const char **code, char *err, size_t errlen) {
  if (!json_is_integer(v)) {
    snprintf(err, errlen, "'%s' must be an integer, not %s", name, json_type_name(v));
    return fail(code, "invalid_type", 400);
  }
  long long x = json_integer_value(v);
  if (x < lo || x > hi) {
    snprintf(err, errlen, "'%s' must be from %lld to %lld, got %lld", name, lo, hi, x);
    return fail(code, "out_of_range", 422);
  }
  *out = (int)x;
  return 0;
}

static int num_field(json_t *v, const char *name, double lo, double hi, double *out,
                     const char **code, char *err, size_t errlen) {
  if (!json_is_number(v)) {
    snprintf(err, errlen, "'%s' must be a number, not %s", name, json_type_name(v));
    return fail(code, "invalid_type", 400);
  }
  double x = json_number_value(v);
  if (!isfinite(x) || x < lo || x > hi) {
    snprintf(err, errlen, "'%s' must be from %g to %g, got %.17g", name, lo, hi, x);
    return fail(code, "out_of_range", 422);
  }
  *out = x;
  return 0;
}

/* s in double quotes, escaped as srv_log_quote does (which quotes only when needed). */
static void dquote(char *out, size_t cap, const char *s) {
  char t[100];
  srv_log_quote(t, sizeof t, s);
  if (t[0] == '"')
    snprintf(out, cap, "%s", t);
  else
    snprintf(out, cap, "\"%s\"", t);
}

/* "'class' "x" is not a class name of this model (...); its classes: "a", ..."
 * (cut short with "..." when they do not fit), so a client can correct a
 * guessed name such as "trouser" without another request. */
static void unknown_class(const jem_model *m, const char *s, char *err, size_t errlen) {
  char name[104];
  dquote(name, sizeof name, s);
  size_t used = (size_t)snprintf(err, errlen, "'class' %s is not a class name of this model "
                                 "(or use an index from 0 to %d); its classes:", name,
                                 m->arch.num_classes - 1);
  for (int k = 0; k < m->arch.num_classes && used < errlen; k++) {
    dquote(name, sizeof name, m->classes[k]);
    size_t room = errlen - used;
    if (strlen(name) + 3 + 5 > room) { /* ", ", the NUL, and room for " ..." */
      snprintf(err + used, room, " ...");
      return;
    }
    used += (size_t)snprintf(err + used, room, "%s%s", k ? ", " : " ", name);
  }
}

int srv_samples_parse(const char *body, size_t len, const jem_model *m, int max_n,
                      int max_steps, const jem_image_limits *lim, srv_samples_req *out,
                      const char **code, char *err, size_t errlen) {
  static const char *const known[] = {"n", "steps", "class", "step_size", "noise",
                                      "init", "clamp", "seed", NULL};
  memset(out, 0, sizeof *out);
  out->n = 16 < max_n ? 16 : max_n;
  /* the model's own sampler settings (jem calibrate), else contracts.md's */
  const jem_sampler *sp = &m->sampler;
  out->steps = sp->steps < max_steps ? sp->steps : max_steps;
  out->y = -1;
  out->step_size = sp->sgld.step_size;
  out->noise = sp->sgld.noise;
  out->init = jem_sample_default_init(m);
  out->clamp = sp->sgld.clamp;
  *code = "ok";
  err[0] = '\0';
  size_t i = 0;
  while (i < len && (body[i] == ' ' || body[i] == '\t' || body[i] == '\r' || body[i] == '\n'))
    i++;
  if (i == len) return 0; /* no body: every default */
  int st = 0;
  json_t *j = srv_json_parse(body, len, &st, err, errlen);
  if (!j)
    return fail(code, st == 422 ? "out_of_range" : st == 413 ? "json_too_large" : "invalid_json",
                st);
  json_t *imgs = NULL;
  const char *key;
  json_t *v;
  if (!json_is_object(j)) {
    snprintf(err, errlen, "expected a JSON object such as {\"n\": 16, \"steps\": 100}, not %s",
             json_type_name(j));
    st = fail(code, "invalid_json", 400);
    goto out;
  }
  json_object_foreach(j, key, v) {
    int ok = 0;
    for (int k = 0; known[k]; k++) ok |= !strcmp(key, known[k]);
    if (!ok) {
      char q[80];
      srv_log_quote(q, sizeof q, key);
      snprintf(err, errlen, "unknown field %s (accepted: n, steps, class, step_size, noise, "
               "init, clamp, seed)", q);
      st = fail(code, "unknown_field", 400);
      goto out;
    }
  }
  int n_given = 0;
  if ((v = json_object_get(j, "n"))) {
    if ((st = int_field(v, "n", 1, max_n, &out->n, code, err, errlen))) goto out;
    n_given = 1;
  }
  if ((v = json_object_get(j, "steps")) &&
      (st = int_field(v, "steps", 1, max_steps, &out->steps, code, err, errlen)))
    goto out;
  if ((v = json_object_get(j, "class")) && !json_is_null(v)) {
    int K = m->arch.num_classes;
    if (json_is_integer(v)) {
      long long y = json_integer_value(v);
      if (y < 0 || y >= K) {
        snprintf(err, errlen, "'class' %lld is not a class index of this model (0 to %d)", y,
                 K - 1);
        st = fail(code, "unknown_class", 422);
        goto out;
      }
      out->y = (int)y;
    } else if (json_is_string(v)) {
      const char *s = json_string_value(v);
      for (int k = 0; k < K && out->y < 0; k++)
        if (strlen(m->classes[k]) == json_string_length(v) && !strcmp(m->classes[k], s))
          out->y = k;
      if (out->y < 0) {
        unknown_class(m, s, err, errlen);
        st = fail(code, "unknown_class", 422);
        goto out;
      }
    } else {
      snprintf(err, errlen, "'class' must be null, a class index or a class name, not %s",
               json_type_name(v));
      st = fail(code, "invalid_type", 400);
      goto out;
    }
  }
  if ((v = json_object_get(j, "step_size")) &&
      (st = num_field(v, "step_size", 0.0, 1e6, &out->step_size, code, err, errlen)))
    goto out;
  if ((v = json_object_get(j, "noise")) &&
      (st = num_field(v, "noise", 0.0, 1e3, &out->noise, code, err, errlen)))
    goto out;
  if ((v = json_object_get(j, "clamp"))) {
    if (!json_is_boolean(v)) {
      snprintf(err, errlen, "'clamp' must be true or false, not %s", json_type_name(v));
      st = fail(code, "invalid_type", 400);
      goto out;
    }
    out->clamp = json_is_true(v);
  }
  if ((v = json_object_get(j, "seed"))) {
    if (!json_is_integer(v)) {
      snprintf(err, errlen, "'seed' must be a non-negative integer, not %s", json_type_name(v));
      st = fail(code, "invalid_type", 400);
      goto out;
    }
    if (json_integer_value(v) < 0) {
      snprintf(err, errlen, "'seed' must be a non-negative integer, got %lld",
               (long long)json_integer_value(v));
      st = fail(code, "out_of_range", 422);
      goto out;
    }
    out->seed = (uint64_t)json_integer_value(v);
    out->has_seed = 1;
  }
  if ((v = json_object_get(j, "init"))) {
    if (json_is_string(v)) {
      const char *s = json_string_value(v);
      if (!strcmp(s, "noise")) {
        out->init = JEM_SAMPLE_INIT_NOISE;
      } else if (!strcmp(s, "buffer")) {
        if (!(m->replay && m->replay_n > 0)) {
          snprintf(err, errlen, "'init' \"buffer\": this model has no replay buffer; use "
                   "\"noise\" or {\"images\": [...]}");
          st = fail(code, "out_of_range", 422);
          goto out;
        }
        out->init = JEM_SAMPLE_INIT_BUFFER;
      } else {
        char q[96];
        srv_log_quote(q, sizeof q, s);
        snprintf(err, errlen, "'init' %s is not \"noise\", \"buffer\" or {\"images\": [...]}", q);
        st = fail(code, "out_of_range", 422);
        goto out;
      }
    } else if (json_is_object(v)) {
      json_object_foreach(v, key, imgs) {
        if (strcmp(key, "images") != 0) {
          char q[80];
          srv_log_quote(q, sizeof q, key);
          snprintf(err, errlen, "unknown field init.%s (only \"images\" is accepted)", q);
          st = fail(code, "unknown_field", 400);
          goto out;
        }
      }
      imgs = json_object_get(v, "images");
      if (!json_is_array(imgs)) {
        snprintf(err, errlen, "'init' must hold \"images\": an array of base64 PNG or JPEG "
                 "strings");
        st = fail(code, "invalid_type", 400);
        goto out;
      }
      size_t cnt = json_array_size(imgs);
      for (size_t k = 0; k < cnt; k++)
        if (!json_is_string(json_array_get(imgs, k))) {
          snprintf(err, errlen, "init.images[%zu] must be a base64 string, not %s", k,
                   json_type_name(json_array_get(imgs, k)));
          st = fail(code, "invalid_type", 400);
          goto out;
        }
      if (cnt < 1 || cnt > (size_t)max_n) {
        snprintf(err, errlen, "init.images must hold from 1 to %d images, got %zu", max_n, cnt);
        st = fail(code, "out_of_range", 422);
        goto out;
      }
      if (n_given && (size_t)out->n != cnt) {
        snprintf(err, errlen, "'n' is %d but init.images holds %zu images; give n equal to "
                 "their count or leave it out", out->n, cnt);
        st = fail(code, "out_of_range", 422);
        goto out;
      }
      out->n = (int)cnt;
      out->init = JEM_SAMPLE_INIT_GIVEN;
    } else {
      snprintf(err, errlen, "'init' must be \"noise\", \"buffer\" or {\"images\": [...]}, not "
               "%s", json_type_name(v));
      st = fail(code, "invalid_type", 400);
      goto out;
    }
  }
  if (out->init == JEM_SAMPLE_INIT_GIVEN &&
      (st = parse_images(imgs, lim, out->n, out, code, err, errlen)))
    goto out;
out:
  json_decref(j);
  if (st) srv_samples_req_free(out);
  return st;
}

/* ------------------------------------------------------------------------ */
/* Ids */

static int rand_bytes(void *p, size_t n) {
  unsigned char *b = p;
  while (n) {
    ssize_t got = getrandom(b, n, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    b += got;
    n -= (size_t)got;
  }
  return 0;
}

int srv_job_new_id(char out[33]) {
  unsigned char b[16];
  if (rand_bytes(b, sizeof b)) return -1;
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 16; i++) {
    out[2 * i] = hex[b[i] >> 4];
    out[2 * i + 1] = hex[b[i] & 15];
  }
  out[32] = '\0';
  return 0;
}

int srv_job_id_valid(const char *s) {
  for (int i = 0; i < 32; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return s[32] == '\0';
}

/* ------------------------------------------------------------------------ */
/* The store */

enum { J_QUEUED = 0, J_RUNNING, J_SUCCEEDED, J_FAILED, J_CANCELED, J_NSTATES };
static const char *const state_names[J_NSTATES] = {"queued", "running", "succeeded",
                                                   "failed", "canceled"};
#define TERMINAL(s) ((s) >= J_SUCCEEDED)

enum { REJ_DRAINING = 0, REJ_QUEUE_FULL, REJ_STORE_FULL, REJ_INVALID, REJ_N };
static const char *const rej_names[REJ_N] = {"draining", "queue_full", "store_full",
                                             "invalid_request"};

typedef struct job {
  srv_work work;                /* first member: the scheduler hands it back */
  struct job *prev, *next;      /* store list, oldest first */
  char id[33];
  int state;
  atomic_int cancel;            /* read by run() between steps */
  int in_sched;                 /* submitted, done() still to come */
  int refs;                     /* handlers copying result bytes */
  int removed;                  /* no longer in the store */
  srv_model *sm;                /* held while the chains may run (SIGHUP-safe) */
  char model_name[128];         /* copies, so a finished job needs no model */
  char *class_name;             /* params.class_name, NULL when unconditional */
  char **label_name;            /* class name of each sample's label (results) */
  /* parameters */
  int n, steps, y, init, clamp;
  double step_size, noise;
  uint64_t seed;
  /* chains: used by run() only, between a submit and its done() */
  float *x;
  jem_rng *rngs;
  int *ys;
  int initialized, wstep, wfinal, wfailed;
  uint64_t wchain;              /* chain-steps of the last slice */
  char wmsg[160];
  /* published under the mutex */
  int step;
  size_t bytes;                 /* charged to the store */
  double created, started, finished; /* wall clock, 0 = not yet */
  uint64_t created_ns, finished_ns;  /* monotonic: TTL and durations */
  char reason[32], message[200];
  /* results, immutable once SUCCEEDED */
  float *energy, *conf;
  int *label;
  unsigned char *grid, **png, *npy;
  size_t grid_len, *png_len, npy_len;
} job;

static const double dur_le[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
#define N_DUR ((int)(sizeof dur_le / sizeof dur_le[0]))

static struct {
  pthread_mutex_t mu;
  job *head, *tail;
  int count, active;
  int decoding;                 /* admitted requests whose init images decode on a worker */
  size_t bytes;
  unsigned long long created, finished[J_NSTATES], chain_steps, rejected[REJ_N];
  unsigned long long dur_counts[J_NSTATES][N_DUR + 1];
  double dur_sum[J_NSTATES];
} J = {.mu = PTHREAD_MUTEX_INITIALIZER};

static size_t chw_of(const jem_model *m) {
  return (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
}

static int grid_cols(int n) {
  int c = (int)ceil(sqrt((double)n));
  return c < 1 ? 1 : c;
}

/* Upper bound of an 8-bit PNG from stb_image_write: its deflate may grow
 * literal-heavy data by 1/8, plus headers. */
static size_t png_bound(size_t w, size_t h, size_t c) {
  size_t raw = h * (w * c + 1);
  return raw + raw / 8 + 1024;
}

static size_t job_estimate(const jem_model *m, int n) {
  size_t chw = chw_of(m), S = (size_t)m->arch.image_size, C = (size_t)m->arch.in_channels;
  size_t xb = sizeof(float) * chw * (size_t)n;
  size_t cols = (size_t)grid_cols(n), rows = ((size_t)n + cols - 1) / cols;
  size_t chains = xb + sizeof(jem_rng) * (size_t)n + sizeof(int) * (size_t)n;
  size_t results = xb + 128 + png_bound(cols * S + (cols + 1) * 2, rows * S + (rows + 1) * 2, C) +
                   (size_t)n * (png_bound(S, S, C) + 2 * sizeof(float) + sizeof(int) +
                                sizeof(void *) + sizeof(size_t));
  return sizeof(job) + chains + results;
}

static size_t result_bytes(const job *j) {
  size_t b = sizeof(job) + j->npy_len + j->grid_len;
  if (j->png)
    for (int k = 0; k < j->n; k++) b += j->png_len[k];
  if (j->energy)
    b += (size_t)j->n * (2 * sizeof(float) + sizeof(int) + sizeof(void *) + sizeof(size_t));
  return b;
}

static void charge_locked(job *j, size_t bytes) {
  J.bytes = J.bytes - j->bytes + bytes;
  j->bytes = bytes;
}

static void free_chains(job *j) {
  free(j->x);
  free(j->rngs);
  free(j->ys);
  j->x = NULL;
  j->rngs = NULL;
  j->ys = NULL;
}

static void free_results(job *j) {
  free(j->energy);
  free(j->conf);
  free(j->label);
  free(j->grid);
  free(j->npy);
  if (j->png)
    for (int k = 0; k < j->n; k++) free(j->png[k]);
  free(j->png);
  free(j->png_len);
  if (j->label_name) free(j->label_name[0]); /* one block holds every name */
  free(j->label_name);
  j->label_name = NULL;
  j->energy = j->conf = NULL;
  j->label = NULL;
  j->grid = j->npy = NULL;
  j->png = NULL;
  j->png_len = NULL;
}

static void job_free(job *j) {
  if (!j) return;
  free_chains(j);
  free_results(j);
  free(j->class_name);
  srv_model_put(j->sm);
  free(j);
}

static void finish_locked(job *j, int state, const char *reason, const char *message) {
  if (TERMINAL(j->state)) return;
  j->state = state;
  j->finished = srv_wall_s();
  j->finished_ns = srv_now_ns();
  if (reason) snprintf(j->reason, sizeof j->reason, "%s", reason);
  if (message) snprintf(j->message, sizeof j->message, "%s", message);
  J.active--;
  J.finished[state]++;
  double d = (double)(j->finished_ns - j->created_ns) * 1e-9;
  int b = 0;
  while (b < N_DUR && d > dur_le[b]) b++;
  J.dur_counts[state][b]++;
  J.dur_sum[state] += d;
  srv_log(SRV_LOG_INFO, "msg=\"job finished\" job=%s status=%s step=%d steps=%d seconds=%.3f%s%s",
          j->id, state_names[state], j->step, j->steps, d, reason ? " reason=" : "",
          reason ? reason : "");
}

/* Unlinks j; returns 1 when the caller must free it (after unlocking). */
static int remove_locked(job *j) {
  if (j->prev)
    j->prev->next = j->next;
  else
    J.head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    J.tail = j->prev;
  j->prev = j->next = NULL;
  j->removed = 1;
  J.count--;
  J.bytes -= j->bytes;
  j->bytes = 0;
  return !j->in_sched && j->refs == 0;
}

typedef struct free_list { job *items[64]; int n; } free_list;

/* Collects a job to free after the mutex is released (model puts may free a
 * whole model); frees at once if the list is full. */
static void defer_free(free_list *fl, job *j) {
  if (fl->n < (int)(sizeof fl->items / sizeof fl->items[0]))
    fl->items[fl->n++] = j;
  else
    job_free(j);
}

static void run_frees(free_list *fl) {
  for (int i = 0; i < fl->n; i++) job_free(fl->items[i]);
  fl->n = 0;
}

/* Drops finished jobs past their TTL (monotonic clock). */
static void sweep_locked(uint64_t now, free_list *fl) {
  uint64_t ttl = (uint64_t)srv_cfg.job_ttl * 1000000000ull;
  job *j = J.head;
  while (j) {
    job *nx = j->next;
    if (TERMINAL(j->state) && now - j->finished_ns >= ttl) {
      srv_log(SRV_LOG_DEBUG, "msg=\"job expired\" job=%s", j->id);
      if (remove_locked(j)) defer_free(fl, j);
    }
    j = nx;
  }
}

/* Makes room for one more job of `need` bytes by evicting finished jobs,
 * oldest first.  0 when there is room. */
static int make_room_locked(size_t need, free_list *fl) {
  job *j = J.head;
  while (j && (J.count + 1 > srv_cfg.max_jobs ||
               J.bytes + need > (size_t)srv_cfg.max_job_bytes)) {
    job *nx = j->next;
    if (TERMINAL(j->state)) {
      srv_log(SRV_LOG_INFO, "msg=\"job evicted to make room\" job=%s", j->id);
      if (remove_locked(j)) defer_free(fl, j);
    }
    j = nx;
  }
  return J.count + 1 > srv_cfg.max_jobs || J.bytes + need > (size_t)srv_cfg.max_job_bytes;
}

static job *find_locked(const char *id) {
  for (job *j = J.head; j; j = j->next)
    if (!memcmp(j->id, id, 33)) return j;
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* CPU priority.  Scoring and jobs share the cores, so a slice runs at a
 * higher nice value (--job-nice) on its pool thread: under contention the
 * scoring threads get most of the CPU, while an idle machine still gives the
 * job everything.  The thread must be able to come back to its nice value
 * afterwards (root, CAP_SYS_NICE or RLIMIT_NICE >= 20 - nice); srv_jobs_start
 * checks that once on a scratch thread, else slices run at normal priority. */

static int nice_ok;

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static void *nice_probe(void *arg) {
  pid_t t = my_tid();
  errno = 0;
  int base = getpriority(PRIO_PROCESS, (id_t)t);
  if (errno == 0 && setpriority(PRIO_PROCESS, (id_t)t, base + 1) == 0)
    *(int *)arg = setpriority(PRIO_PROCESS, (id_t)t, base) == 0;
  return NULL;
}

/* Raises this thread's nice value; returns the value to restore, or
 * -1000 when nothing changed. */
static int nice_enter(void) {
  if (!nice_ok || srv_cfg.job_nice <= 0) return -1000;
  errno = 0;
  int base = getpriority(PRIO_PROCESS, (id_t)my_tid());
  if (errno) return -1000;
  int to = base + srv_cfg.job_nice > 19 ? 19 : base + srv_cfg.job_nice;
  if (to == base || setpriority(PRIO_PROCESS, (id_t)my_tid(), to) != 0) return -1000;
  return base;
}

static void nice_leave(int base) {
  if (base != -1000) setpriority(PRIO_PROCESS, (id_t)my_tid(), base);
}

/* ------------------------------------------------------------------------ */
/* Work: run() on a pool thread, done() on the loop thread */

static void job_finalize(job *j, jem_ws *ws, const jem_model *m) {
  int n = j->n, C = m->arch.in_channels, S = m->arch.image_size;
  size_t chw = chw_of(m);
  j->energy = malloc(sizeof(float) * (size_t)n);
  j->conf = malloc(sizeof(float) * (size_t)n);
  j->label = malloc(sizeof(int) * (size_t)n);
  j->png = calloc((size_t)n, sizeof *j->png);
  j->png_len = calloc((size_t)n, sizeof *j->png_len);
  if (!j->energy || !j->conf || !j->label || !j->png || !j->png_len) goto oom;
  jem_scores sc;
  memset(&sc, 0, sizeof sc);
  sc.score[JEM_SCORE_ENERGY] = j->energy;
  sc.label = j->label;
  sc.confidence = j->conf;
  jem_score_batch(ws, m, j->x, n, 0, &sc);
  float lo = m->pre.range_lo, hi = m->pre.range_hi;
  j->grid = jem_png_grid(j->x, n, C, S, grid_cols(n), lo, hi, &j->grid_len);
  if (!j->grid) goto oom;
  for (int k = 0; k < n; k++) {
    j->png[k] = jem_png_grid(j->x + (size_t)k * chw, 1, C, S, 1, lo, hi, &j->png_len[k]);
    if (!j->png[k]) goto oom;
  }
  int shape[4] = {n, C, S, S};
  j->npy = jem_npy_encode(j->x, 4, shape, &j->npy_len);
  if (!j->npy) goto oom;
  /* copy the label names so the finished job can let the model go */
  size_t total = 0;
  for (int k = 0; k < n; k++) {
    int lab = j->label[k];
    total += (lab >= 0 && lab < m->arch.num_classes ? strlen(m->classes[lab]) : 0) + 1;
  }
  j->label_name = calloc((size_t)n, sizeof *j->label_name);
  char *names = malloc(total);
  if (!j->label_name || !names) {
    free(names);
    goto oom;
  }
  for (int k = 0; k < n; k++) {
    int lab = j->label[k];
    const char *c = lab >= 0 && lab < m->arch.num_classes ? m->classes[lab] : "";
    size_t len = strlen(c) + 1;
    memcpy(names, c, len);
    j->label_name[k] = names;
    names += len;
  }
  j->wfinal = 1;
  return;
oom:
  j->wfailed = 1;
  snprintf(j->wmsg, sizeof j->wmsg, "out of memory while encoding the samples");
}

static void job_run(srv_work *w, srv_worker *wk) {
  job *j = (job *)w;
  j->wchain = 0;
  pthread_mutex_lock(&J.mu);
  if (j->state == J_QUEUED) {
    j->state = J_RUNNING;
    j->started = srv_wall_s();
  }
  int go = j->state == J_RUNNING;
  pthread_mutex_unlock(&J.mu);
  if (!go) return;
  const jem_model *m = j->sm->m;
  /* The slot's own workspace: the core's results depend only on the batch
   * size, so this gives the same bytes as `jem sample` with the same seed. */
  jem_ws *ws = srv_worker_ws(wk, j->sm);
  if (!ws) {
    j->wfailed = 1;
    snprintf(j->wmsg, sizeof j->wmsg, "out of memory for the worker's workspace");
    return;
  }
  if (!j->initialized) {
    /* seeds chain i with (seed, i); GIVEN keeps the decoded images */
    jem_sample_init(m, j->x, j->n, j->init, j->ys, j->seed, j->rngs);
    j->initialized = 1;
  }
  jem_sgld_params p;
  jem_sgld_defaults(&p);
  p.step_size = (float)j->step_size;
  p.noise = (float)j->noise;
  p.clamp = j->clamp;
  int nice_base = nice_enter();
  uint64_t end = srv_now_ns() + (uint64_t)srv_cfg.job_slice_ms * 1000000ull;
  while (j->wstep < j->steps) {
    jem_sgld_run(ws, m, j->x, j->n, j->ys, 1, &p, j->rngs);
    j->wstep++;
    j->wchain += (uint64_t)j->n;
    if (atomic_load(&j->cancel) || srv_now_ns() >= end) break;
  }
  if (j->wstep == j->steps && !atomic_load(&j->cancel)) job_finalize(j, ws, m);
  nice_leave(nice_base);
}

static void job_done(srv_work *w, int canceled) {
  job *j = (job *)w;
  free_list fl = {.n = 0};
  srv_model *put = NULL;        /* an ended job no longer needs its model */
  pthread_mutex_lock(&J.mu);
  J.chain_steps += j->wchain;
  j->wchain = 0;
  j->in_sched = 0;
  int resubmit = 0;
  /* A job canceled while its slice ran keeps the progress it had when the
   * cancel was answered: the step that slice was in does not count. */
  if (!TERMINAL(j->state)) {
    j->step = j->wstep;
    if (canceled)
      finish_locked(j, J_CANCELED, "shutdown", "the server shut down before the job finished");
    else if (j->wfailed)
      finish_locked(j, J_FAILED, "internal", j->wmsg);
    else if (j->wfinal)
      finish_locked(j, J_SUCCEEDED, NULL, NULL);
    else
      resubmit = 1;
  }
  if (resubmit) {
    j->in_sched = 1;
  } else {
    free_chains(j);
    if (j->state != J_SUCCEEDED) free_results(j);
    put = j->sm;
    j->sm = NULL;
    if (!j->removed) charge_locked(j, result_bytes(j));
    if (j->removed && j->refs == 0) defer_free(&fl, j);
  }
  pthread_mutex_unlock(&J.mu);
  if (resubmit && srv_sched_submit(w)) {
    /* the scheduler is stopping */
    pthread_mutex_lock(&J.mu);
    j->in_sched = 0;
    finish_locked(j, J_CANCELED, "shutdown", "the server shut down before the job finished");
    free_chains(j);
    free_results(j);
    put = j->sm;
    j->sm = NULL;
    if (!j->removed) charge_locked(j, result_bytes(j));
    if (j->removed && j->refs == 0) defer_free(&fl, j);
    pthread_mutex_unlock(&J.mu);
  }
  run_frees(&fl);
  srv_model_put(put);
}

/* ------------------------------------------------------------------------ */
/* JSON */

static json_t *jtime(double t) {
  if (t <= 0) return json_null();
  time_t s = (time_t)t;
  int ms = (int)((t - (double)s) * 1000.0);
  if (ms < 0) ms = 0;
  if (ms > 999) ms = 999;
  struct tm tm;
  if (!gmtime_r(&s, &tm)) return json_null();
  char buf[48];
  snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
           tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  return json_string(buf);
}

static const char *init_name(int init) {
  return init == JEM_SAMPLE_INIT_BUFFER ? "buffer"
         : init == JEM_SAMPLE_INIT_GIVEN ? "images"
                                         : "noise";
}

/* The job object (mutex held). */
static json_t *job_json(const job *j, int with_result) {
  json_t *params = json_object();
  json_object_set_new(params, "n", json_integer(j->n));
  json_object_set_new(params, "steps", json_integer(j->steps));
  json_object_set_new(params, "class", j->y >= 0 ? json_integer(j->y) : json_null());
  json_object_set_new(params, "class_name", j->class_name ? json_string(j->class_name)
                                                         : json_null());
  json_object_set_new(params, "step_size", srv_jreal(j->step_size)); /* a model's float: 0.1 */
  json_object_set_new(params, "noise", srv_jreal(j->noise));
  json_object_set_new(params, "init", json_string(init_name(j->init)));
  json_object_set_new(params, "clamp", json_boolean(j->clamp));
  json_object_set_new(params, "seed", json_integer((json_int_t)j->seed));
  json_t *o = json_object();
  json_object_set_new(o, "id", json_string(j->id));
  json_object_set_new(o, "status", json_string(state_names[j->state]));
  json_object_set_new(o, "progress", json_pack("{s:i,s:i}", "step", j->step, "steps", j->steps));
  json_object_set_new(o, "params", params);
  json_object_set_new(o, "model", json_string(j->model_name));
  json_object_set_new(o, "created_at", jtime(j->created));
  json_object_set_new(o, "started_at", jtime(j->started));
  json_object_set_new(o, "finished_at", jtime(j->finished));
  if (j->state == J_FAILED || j->state == J_CANCELED)
    json_object_set_new(o, "error", json_pack("{s:s,s:s}", "reason", j->reason, "message",
                                              j->message));
  else
    json_object_set_new(o, "error", json_null());
  char url[128];
  snprintf(url, sizeof url, "/v1/jobs/%s", j->id);
  json_object_set_new(o, "url", json_string(url));
  if (j->state == J_SUCCEEDED) {
    json_t *res = json_object();
    if (with_result) {
      json_t *arr = json_array();
      for (int k = 0; k < j->n; k++) {
        int lab = j->label[k];
        snprintf(url, sizeof url, "/v1/jobs/%s/samples/%d.png", j->id, k);
        json_array_append_new(
            arr, json_pack("{s:i,s:o,s:i,s:s,s:o,s:s}", "index", k, "energy",
                           srv_jreal(j->energy[k]), "label", lab, "class",
                           j->label_name[k],
                           "confidence", srv_jreal(j->conf[k]), "url", url));
      }
      json_object_set_new(res, "samples", arr);
    }
    snprintf(url, sizeof url, "/v1/jobs/%s/grid.png", j->id);
    json_object_set_new(res, "grid_url", json_string(url));
    snprintf(url, sizeof url, "/v1/jobs/%s/samples.npy", j->id);
    json_object_set_new(res, "npy_url", json_string(url));
    json_object_set_new(o, "result", res);
  } else {
    json_object_set_new(o, "result", json_null());
  }
  return o;
}

/* Sends a JSON body with extra headers (steals body). */
static enum MHD_Result respond_json_h(srv_req *r, int status, json_t *body,
                                      const char *const *headers) {
  char *s = body ? json_dumps(body, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_REAL_PRECISION(9))
                 : NULL;
  json_decref(body);
  if (!s) return srv_respond_error(r, 500, "internal", "out of memory");
  enum MHD_Result ok = srv_respond(r, status, "application/json", s, strlen(s), headers);
  free(s);
  return ok;
}

/* Answers with the job object; non-terminal jobs carry Retry-After. */
static enum MHD_Result respond_job(srv_req *r, int status, json_t *o, int terminal,
                                   const char *location) {
  const char *h[7];
  int k = 0;
  if (location) {
    h[k++] = "Location";
    h[k++] = location;
  }
  if (!terminal) {
    h[k++] = "Retry-After";
    h[k++] = "1";
  }
  h[k] = NULL;
  return respond_json_h(r, status, o, h);
}

/* ------------------------------------------------------------------------ */
/* Handlers */

static void reject(int reason) {
  pthread_mutex_lock(&J.mu);
  J.rejected[reason]++;
  pthread_mutex_unlock(&J.mu);
}

static int media_is_json(const char *ct) {
  while (*ct == ' ') ct++;
  size_t n = strcspn(ct, ";");
  while (n && ct[n - 1] == ' ') n--;
  return (n == 16 && !strncasecmp(ct, "application/json", 16)) ||
         (n > 5 && !strncasecmp(ct + n - 5, "+json", 5) && memchr(ct, '/', n));
}

static enum MHD_Result jobs_queue_full(srv_req *r, int active) {
  const char *h[] = {"Retry-After", "5", NULL};
  return srv_respond_error_h(r, 429, "queue_full", h,
                             "%d jobs are queued or running (the limit, --max-queued-jobs); "
                             "retry later", active);
}

/* The answer to a request that srv_samples_parse or srv_samples_decode refused. */
static enum MHD_Result refuse_request(srv_req *r, int st, const char *code, const char *err) {
  reject(REJ_INVALID);
  srv_metrics_reject(st == 413 ? SRV_REJ_TOO_LARGE
                     : st == 415 ? SRV_REJ_UNSUPPORTED
                                 : SRV_REJ_BAD_REQUEST);
  const char *h[] = {"Retry-After", "1", NULL};
  return srv_respond_error_h(r, st, code, st == 503 ? h : NULL, "%s", err);
}

static enum MHD_Result create_job(srv_req *r, srv_model *sm, srv_samples_req q, int admitted);

/* Large init images, decoded on a worker while the request is suspended. */
typedef struct init_decode {
  srv_work work;
  srv_req *r;
  srv_model *sm;
  srv_samples_req q;
  jem_image_limits lim;
  int conn_fd;
  int canceled, client_gone, st;
  int admitted;                 /* holds a place in J.decoding */
  const char *code;
  char err[512];
} init_decode;

/* Gives back a place in J.decoding (admitted = 1) that no job will take. */
static void decoding_end(int admitted) {
  if (!admitted) return;
  pthread_mutex_lock(&J.mu);
  J.decoding--;
  pthread_mutex_unlock(&J.mu);
}

static void init_decode_free(void *p) {
  init_decode *d = p;
  decoding_end(d->admitted);
  srv_samples_req_free(&d->q);
  srv_model_put(d->sm);
  free(d);
}

static void init_decode_run(srv_work *w, srv_worker *wk) {
  (void)wk;
  init_decode *d = (init_decode *)w;
  if (srv_conn_gone(d->conn_fd)) { /* nobody would learn of the job */
    d->client_gone = 1;
    return;
  }
  /* one image per slice: scoring batches run between slices */
  d->st = srv_samples_decode(&d->q, d->sm->m, &d->lim, 1, &d->code, d->err, sizeof d->err);
}

static void init_decode_done(srv_work *w, int canceled) {
  init_decode *d = (init_decode *)w;
  d->canceled = canceled;
  if (!canceled && !d->client_gone && !d->st && d->q.imgs) { /* more to decode */
    if (srv_sched_submit(&d->work) == 0) return;
    d->canceled = 1;
  }
  srv_req_resume(d->r);
}

/* HTTP thread, after the decode: create the job or answer why not. */
static enum MHD_Result init_decode_resume(srv_req *r) {
  init_decode *d = r->data;
  if (d->client_gone) {
    srv_metrics_reject(SRV_REJ_CLIENT_GONE);
    return MHD_NO; /* close */
  }
  if (d->canceled) {
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "draining", h,
                               "the server is shutting down and takes no new jobs");
  }
  if (d->st) return refuse_request(r, d->st, d->code, d->err);
  srv_model *sm = d->sm;
  srv_samples_req q = d->q;
  d->sm = NULL; /* create_job owns both, and the place in J.decoding, now */
  memset(&d->q, 0, sizeof d->q);
  d->admitted = 0;
  return create_job(r, sm, q, 1);
}

enum MHD_Result srv_h_samples_create(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  if (srv_http_draining()) {
    reject(REJ_DRAINING);
    srv_metrics_reject(SRV_REJ_DRAINING);
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "draining", h,
                               "the server is shutting down and takes no new jobs");
  }
  const char *ct = srv_req_header(r, "Content-Type");
  if (r->body_len > 0 && ct && !media_is_json(ct)) {
    reject(REJ_INVALID);
    srv_metrics_reject(SRV_REJ_UNSUPPORTED);
    return srv_respond_error(r, 415, "unsupported_media_type",
                             "Content-Type '%.64s' is not accepted; send application/json%s", ct,
                             strncasecmp(ct, "application/x-www-form-urlencoded", 33) ? ""
                             : " (curl -d sends form data: add -H 'Content-Type: application/json')");
  }
  srv_model *sm = srv_model_get();
  if (!sm) {
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "model_not_loaded", h, "no model is loaded");
  }
  const jem_model *m = sm->m;
  jem_image_limits lim;
  srv_image_limits(&lim);
  srv_samples_req q;
  const char *code;
  char err[512];
  int st = srv_samples_parse(r->body ? r->body : "", r->body_len, m, srv_cfg.max_samples,
                             srv_cfg.max_steps, &lim, &q, &code, err, sizeof err);
  if (st) {
    srv_model_put(sm);
    return refuse_request(r, st, code, err);
  }
  if (q.pixels > SRV_DECODE_INLINE_PIXELS) { /* as in h_classify.c */
    /* the queue check and the place it grants are one step: concurrent
     * requests cannot all pass it and be refused only after decoding */
    pthread_mutex_lock(&J.mu);
    int active = J.active + J.decoding, full = active >= srv_cfg.max_queued_jobs;
    if (full)
      J.rejected[REJ_QUEUE_FULL]++;
    else
      J.decoding++;
    pthread_mutex_unlock(&J.mu);
    if (full) { /* no use decoding: answer now */
      srv_samples_req_free(&q);
      srv_model_put(sm);
      srv_metrics_reject(SRV_REJ_QUEUE_FULL);
      return jobs_queue_full(r, active);
    }
    init_decode *d = calloc(1, sizeof *d);
    if (d) d->admitted = 1;
    if (!d) {
      decoding_end(1);
      srv_samples_req_free(&q);
      srv_model_put(sm);
      const char *h[] = {"Retry-After", "1", NULL};
      return srv_respond_error_h(r, 503, "out_of_memory", h, "cannot create a job right now");
    }
    d->work.kind = SRV_WORK_JOB;
    d->work.run = init_decode_run;
    d->work.done = init_decode_done;
    d->r = r;
    d->sm = sm;
    d->q = q;
    d->lim = lim;
    d->conn_fd = srv_req_fd(r);
    r->data = d;
    r->data_free = init_decode_free;
    r->on_resume = init_decode_resume;
    srv_req_suspend(r);
    if (srv_sched_submit(&d->work)) {
      d->canceled = 1;
      srv_req_resume(r);
    }
    return MHD_YES;
  }
  if ((st = srv_samples_decode(&q, m, &lim, INT_MAX, &code, err, sizeof err))) {
    srv_model_put(sm);
    return refuse_request(r, st, code, err);
  }
  return create_job(r, sm, q, 0);
}

/* Creates, stores and queues the job of a parsed and decoded request; owns
 * sm and q, and with admitted, the request's place in J.decoding. */
static enum MHD_Result create_job(srv_req *r, srv_model *sm, srv_samples_req q, int admitted) {
  const jem_model *m = sm->m;
  if (!q.has_seed) {
    uint64_t s = 0;
    if (rand_bytes(&s, sizeof s)) s = srv_now_ns();
    q.seed = s >> 11; /* below 2^53: exact in every JSON client */
  }
  job *j = calloc(1, sizeof *j);
  char id[33];
  if (!j || srv_job_new_id(id)) {
    decoding_end(admitted);
    free(j);
    srv_samples_req_free(&q);
    srv_model_put(sm);
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "out_of_memory", h, "cannot create a job right now");
  }
  size_t chw = chw_of(m);
  memcpy(j->id, id, sizeof id);
  j->work.kind = SRV_WORK_JOB;
  j->work.run = job_run;
  j->work.done = job_done;
  atomic_init(&j->cancel, 0);
  j->sm = sm;
  snprintf(j->model_name, sizeof j->model_name, "%s", m->name);
  if (q.y >= 0) j->class_name = strdup(m->classes[q.y]);
  j->n = q.n;
  j->steps = q.steps;
  j->y = q.y;
  j->init = q.init;
  j->clamp = q.clamp;
  j->step_size = q.step_size;
  j->noise = q.noise;
  j->seed = q.seed;
  j->x = q.x ? q.x : malloc(sizeof(float) * chw * (size_t)q.n);
  q.x = NULL;
  j->rngs = malloc(sizeof(jem_rng) * (size_t)q.n);
  if (q.y >= 0) {
    j->ys = malloc(sizeof(int) * (size_t)q.n);
    if (j->ys)
      for (int i = 0; i < q.n; i++) j->ys[i] = q.y;
  }
  if (!j->x || !j->rngs || (q.y >= 0 && (!j->ys || !j->class_name))) {
    decoding_end(admitted);
    job_free(j);
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 503, "out_of_memory", h, "out of memory for %d chains", q.n);
  }
  size_t need = job_estimate(m, q.n);
  if (need > (size_t)srv_cfg.max_job_bytes) {
    decoding_end(admitted);
    job_free(j);
    reject(REJ_INVALID);
    srv_metrics_reject(SRV_REJ_TOO_LARGE);
    return srv_respond_error(r, 422, "job_too_large",
                             "a job of %d samples needs about %zu bytes, more than "
                             "--max-job-bytes (%lld)", q.n, need, srv_cfg.max_job_bytes);
  }
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  double now = srv_wall_s();
  sweep_locked(srv_now_ns(), &fl);
  int why = -1;
  J.decoding -= admitted; /* its place becomes the job's, in this same step */
  if (J.active + J.decoding >= srv_cfg.max_queued_jobs)
    why = REJ_QUEUE_FULL;
  else if (make_room_locked(need, &fl))
    why = REJ_STORE_FULL;
  if (why >= 0) {
    J.rejected[why]++;
    int active = J.active, count = J.count;
    size_t bytes = J.bytes;
    pthread_mutex_unlock(&J.mu);
    run_frees(&fl);
    job_free(j);
    srv_metrics_reject(why == REJ_QUEUE_FULL ? SRV_REJ_QUEUE_FULL : SRV_REJ_STORE_FULL);
    if (why == REJ_QUEUE_FULL) return jobs_queue_full(r, active);
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 429, "store_full", h,
                               "the job store is full (%d jobs, %zu bytes; limits "
                               "--max-jobs %d, --max-job-bytes %lld); retry later",
                               count, bytes, srv_cfg.max_jobs, srv_cfg.max_job_bytes);
  }
  j->created = now;
  j->created_ns = srv_now_ns();
  j->state = J_QUEUED;
  j->in_sched = 1;
  j->bytes = need;
  J.bytes += need;
  j->prev = J.tail;
  if (J.tail)
    J.tail->next = j;
  else
    J.head = j;
  J.tail = j;
  J.count++;
  J.active++;
  J.created++;
  json_t *o = job_json(j, 1);
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  srv_log(SRV_LOG_INFO, "msg=\"job created\" job=%s n=%d steps=%d class=%d init=%s seed=%llu",
          j->id, j->n, j->steps, j->y, init_name(j->init), (unsigned long long)j->seed);
  if (srv_sched_submit(&j->work)) {
    json_decref(o);
    pthread_mutex_lock(&J.mu);
    j->in_sched = 0;
    finish_locked(j, J_CANCELED, "shutdown", "the server is shutting down");
    int f = remove_locked(j);
    pthread_mutex_unlock(&J.mu);
    if (f) job_free(j);
    const char *h[] = {"Retry-After", "5", NULL};
    return srv_respond_error_h(r, 503, "draining", h,
                               "the server is shutting down and takes no new jobs");
  }
  char loc[64];
  snprintf(loc, sizeof loc, "/v1/jobs/%s", id);
  return respond_job(r, 202, o, 0, loc);
}

/* The {id} of the route, or NULL after answering 404. */
static const char *route_id(srv_req *r, enum MHD_Result *res) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) {
    *res = MHD_YES;
    return NULL;
  }
  if (r->n_params < 1 || !srv_job_id_valid(r->params[0])) {
    *res = srv_respond_error(r, 404, "job_not_found",
                             "no such job (ids are 32 lowercase hex digits)");
    return NULL;
  }
  return r->params[0];
}

static enum MHD_Result not_found(srv_req *r, const char *id) {
  return srv_respond_error(r, 404, "job_not_found",
                           "no job %s (unknown, or expired after --job-ttl %d s)", id,
                           srv_cfg.job_ttl);
}

enum MHD_Result srv_h_job_get(srv_req *r) {
  enum MHD_Result res;
  const char *id = route_id(r, &res);
  if (!id) return res;
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  json_t *o = j ? job_json(j, 1) : NULL;
  int terminal = j ? TERMINAL(j->state) : 1;
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) return not_found(r, id);
  return respond_job(r, 200, o, terminal, NULL);
}

enum MHD_Result srv_h_job_delete(srv_req *r) {
  enum MHD_Result res;
  const char *id = route_id(r, &res);
  if (!id) return res;
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  json_t *o = NULL;
  if (j) {
    if (!TERMINAL(j->state)) {
      /* the worker stops at its next step; done() frees the chains */
      atomic_store(&j->cancel, 1);
      finish_locked(j, J_CANCELED, "canceled", "canceled by a DELETE request");
    }
    /* DELETE removes the resource, finished or not: the answer is its last
     * state, and later requests for it or its results get 404 */
    o = job_json(j, 1);
    if (remove_locked(j)) defer_free(&fl, j);
  }
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) return not_found(r, id);
  return respond_job(r, 200, o, 1, NULL);
}

enum MHD_Result srv_h_jobs_list(srv_req *r) {
  static const char *const allowed[] = {NULL};
  if (srv_req_check_query(r, allowed)) return MHD_YES;
  if (!srv_auth_enabled())
    return srv_respond_error(r, 403, "listing_disabled",
                             "listing jobs needs an API key: start jemd with --api-key-file "
                             "and send 'Authorization: Bearer <key>'");
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  json_t *arr = json_array();
  for (job *j = J.head; j; j = j->next) json_array_append_new(arr, job_json(j, 0));
  json_t *o = json_pack("{s:o,s:i,s:i}", "jobs", arr, "count", J.count, "active", J.active);
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  return srv_respond_json(r, 200, o);
}

enum { RES_GRID = 0, RES_SAMPLE, RES_NPY };

/* Shared by the three result routes: 404 / 409, or the bytes. */
static enum MHD_Result send_result(srv_req *r, int what) {
  enum MHD_Result res;
  const char *id = route_id(r, &res);
  if (!id) return res;
  long k = -1;
  if (what == RES_SAMPLE) {
    const char *s = r->n_params >= 2 ? r->params[1] : "";
    size_t len = strlen(s);
    /* canonical decimal only, so each sample has one URL */
    int ok = len >= 1 && len <= 6 && (len == 1 || s[0] != '0');
    for (size_t i = 0; ok && i < len; i++) ok = isdigit((unsigned char)s[i]) != 0;
    if (!ok)
      return srv_respond_error(r, 404, "sample_not_found",
                               "no sample '%.32s': samples are numbered 0, 1, ...", s);
    k = strtol(s, NULL, 10);
  }
  free_list fl = {.n = 0};
  pthread_mutex_lock(&J.mu);
  sweep_locked(srv_now_ns(), &fl);
  job *j = find_locked(id);
  int state = j ? j->state : -1, n = j ? j->n : 0;
  if (j && state == J_SUCCEEDED && k < n) j->refs++;
  pthread_mutex_unlock(&J.mu);
  run_frees(&fl);
  if (!j) return not_found(r, id);
  if (state != J_SUCCEEDED) {
    const char *h[] = {"Retry-After", "1", NULL};
    return srv_respond_error_h(r, 409, "job_not_succeeded", TERMINAL(state) ? NULL : h,
                               "job %s is %s; its samples exist once it has succeeded", id,
                               state_names[state]);
  }
  if (k >= n)
    return srv_respond_error(r, 404, "sample_not_found",
                             "no sample %ld: job %s has samples 0 to %d", k, id, n - 1);
  /* results are immutable while refs > 0; srv_respond copies them */
  if (what == RES_NPY) {
    const char *h[] = {"Content-Disposition", "attachment; filename=\"samples.npy\"", NULL};
    res = srv_respond(r, 200, "application/octet-stream", j->npy, j->npy_len, h);
  } else if (what == RES_GRID) {
    res = srv_respond(r, 200, "image/png", j->grid, j->grid_len, NULL);
  } else {
    res = srv_respond(r, 200, "image/png", j->png[k], j->png_len[k], NULL);
  }
  pthread_mutex_lock(&J.mu);
  int f = --j->refs == 0 && j->removed && !j->in_sched;
  pthread_mutex_unlock(&J.mu);
  if (f) job_free(j);
  return res;
}

enum MHD_Result srv_h_job_grid(srv_req *r) { return send_result(r, RES_GRID); }
enum MHD_Result srv_h_job_sample(srv_req *r) { return send_result(r, RES_SAMPLE); }
enum MHD_Result srv_h_job_npy(srv_req *r) { return send_result(r, RES_NPY); }

/* ------------------------------------------------------------------------ */
/* Lifecycle and metrics */

int srv_jobs_start(void) {
  pthread_t t;
  if (srv_cfg.job_nice > 0 && pthread_create(&t, NULL, nice_probe, &nice_ok) == 0)
    pthread_join(t, NULL);
  if (srv_cfg.job_nice > 0 && !nice_ok)
    srv_log(SRV_LOG_WARN, "msg=\"job slices run at normal CPU priority: a thread cannot restore "
            "its nice value (needs CAP_SYS_NICE or RLIMIT_NICE >= 20)\" job_nice=%d",
            srv_cfg.job_nice);
  return 0;
}

int srv_jobs_active(void) {
  pthread_mutex_lock(&J.mu);
  int n = J.active;
  pthread_mutex_unlock(&J.mu);
  return n;
}

void srv_jobs_shutdown(void) {
  const char *reason = "shutdown";
  int n = 0;
  pthread_mutex_lock(&J.mu);
  for (job *j = J.head; j; j = j->next)
    if (!TERMINAL(j->state)) {
      atomic_store(&j->cancel, 1);
      finish_locked(j, J_CANCELED, reason,
                    "the server shut down before the job finished (drain deadline)");
      n++;
    }
  pthread_mutex_unlock(&J.mu);
  if (n) srv_log(SRV_LOG_WARN, "msg=\"canceled unfinished jobs\" jobs=%d reason=%s", n, reason);
}

void srv_jobs_free(void) {
  pthread_mutex_lock(&J.mu);
  job *j = J.head;
  J.head = J.tail = NULL;
  J.count = 0;
  J.bytes = 0;
  pthread_mutex_unlock(&J.mu);
  /* the scheduler has stopped: no run() or done() is left */
  while (j) {
    job *nx = j->next;
    job_free(j);
    j = nx;
  }
}

char *srv_jobs_metrics_render(void) {
  char *p = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&p, &len);
  if (!f) return NULL;
  int by_state[J_NSTATES] = {0};
  pthread_mutex_lock(&J.mu);
  for (job *j = J.head; j; j = j->next) by_state[j->state]++;
  fprintf(f, "# HELP jem_jobs Stored SGLD jobs by state.\n# TYPE jem_jobs gauge\n");
  for (int s = 0; s < J_NSTATES; s++)
    fprintf(f, "jem_jobs{state=\"%s\"} %d\n", state_names[s], by_state[s]);
  fprintf(f, "# HELP jem_job_store_bytes Memory charged to stored jobs (chains and results).\n"
             "# TYPE jem_job_store_bytes gauge\njem_job_store_bytes %zu\n", J.bytes);
  fprintf(f, "# HELP jem_jobs_created_total SGLD jobs accepted.\n"
             "# TYPE jem_jobs_created_total counter\njem_jobs_created_total %llu\n", J.created);
  fprintf(f, "# HELP jem_jobs_finished_total SGLD jobs that ended, by final status.\n"
             "# TYPE jem_jobs_finished_total counter\n");
  for (int s = J_SUCCEEDED; s < J_NSTATES; s++)
    fprintf(f, "jem_jobs_finished_total{status=\"%s\"} %llu\n", state_names[s], J.finished[s]);
  fprintf(f, "# HELP jem_jobs_rejected_total POST /v1/samples requests refused, by reason.\n"
             "# TYPE jem_jobs_rejected_total counter\n");
  for (int i = 0; i < REJ_N; i++)
    fprintf(f, "jem_jobs_rejected_total{reason=\"%s\"} %llu\n", rej_names[i], J.rejected[i]);
  fprintf(f, "# HELP jem_sgld_chain_steps_total SGLD steps run, summed over chains.\n"
             "# TYPE jem_sgld_chain_steps_total counter\njem_sgld_chain_steps_total %llu\n",
          J.chain_steps);
  fprintf(f, "# HELP jem_job_duration_seconds Time from creation to the end of a job, by "
             "final status.\n# TYPE jem_job_duration_seconds histogram\n");
  for (int s = J_SUCCEEDED; s < J_NSTATES; s++) {
    unsigned long long cum = 0;
    for (int b = 0; b < N_DUR; b++) {
      cum += J.dur_counts[s][b];
      fprintf(f, "jem_job_duration_seconds_bucket{status=\"%s\",le=\"%g\"} %llu\n",
              state_names[s], dur_le[b], cum);
    }
    cum += J.dur_counts[s][N_DUR];
    fprintf(f, "jem_job_duration_seconds_bucket{status=\"%s\",le=\"+Inf\"} %llu\n",
            state_names[s], cum);
    fprintf(f, "jem_job_duration_seconds_sum{status=\"%s\"} %.17g\n", state_names[s],
            J.dur_sum[s]);
    fprintf(f, "jem_job_duration_seconds_count{status=\"%s\"} %llu\n", state_names[s], cum);
  }
  pthread_mutex_unlock(&J.mu);
  if (fclose(f) != 0) {
    free(p);
    return NULL;
  }
  return p;
}
