/* job_store.h - where jobs live: the interface the /v1/samples and /v1/jobs
 * handlers (server/h_jobs.c) talk to, and what every store shares (the job
 * record, its JSON).  server/job_store.c holds the in-memory store; another
 * store (Redis) implements the same operations. */
#ifndef JEM_SRV_JOB_STORE_H
#define JEM_SRV_JOB_STORE_H

#include "jobs.h"
#include "job_work.h"

enum { SRV_JOB_QUEUED = 0, SRV_JOB_RUNNING, SRV_JOB_SUCCEEDED, SRV_JOB_FAILED,
       SRV_JOB_CANCELED, SRV_JOB_NSTATES };
extern const char *const srv_job_state_names[SRV_JOB_NSTATES];
#define SRV_JOB_TERMINAL(s) ((s) >= SRV_JOB_SUCCEEDED)

/* Why POST /v1/samples was refused (jem_jobs_rejected_total{reason}). */
enum { SRV_JOB_REJ_DRAINING = 0, SRV_JOB_REJ_QUEUE_FULL, SRV_JOB_REJ_STORE_FULL,
       SRV_JOB_REJ_INVALID, SRV_JOB_REJ_N };

/* What the job object shows. */
typedef struct srv_job_rec {
  char id[33];
  int state;
  int step;                     /* progress.step */
  srv_job_params p;
  char model_name[128];
  char *class_name;             /* params.class_name, NULL when unconditional */
  double created, started, finished; /* wall clock, 0 = not yet */
  char reason[32], message[200];
} srv_job_rec;

/* The job object of the API; samples (SUCCEEDED only) is result.samples,
 * NULL to leave it out (listings). */
json_t *srv_job_json(const srv_job_rec *j, const json_t *samples);
const char *srv_job_init_name(int init);

/* A store operation's answer, which h_jobs.c sends. */
typedef struct srv_job_ans {
  int status;                   /* HTTP status */
  const char *code;             /* status >= 400: the error code, msg its message */
  char msg[400];
  const char *retry_after;      /* a Retry-After value, or NULL */
  char location[64];            /* 202: the job's URL */
  int reject;                   /* a SRV_JOB_REJ_ reason to count, or -1 */
  int metrics_reject;           /* a SRV_REJ_ reason to count, or -1 */
  json_t *body;                 /* 2xx JSON (the handler sends and frees it) */
  /* result bytes: valid until release(ctx) */
  const void *bytes;
  size_t len;
  void (*release)(void *ctx);
  void *ctx;
} srv_job_ans;

/* Fills a with an error answer. */
void srv_job_ans_error(srv_job_ans *a, int status, const char *code, const char *retry_after,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));

enum { SRV_JOB_RES_GRID = 0, SRV_JOB_RES_SAMPLE, SRV_JOB_RES_NPY };

typedef struct srv_job_store {
  const char *name;
  int (*start)(void);
  /* A place among the queued jobs for a request whose init images decode on
   * a worker first: 0, or -1 with the 429 answer in a.  NULL (with unadmit)
   * when create checks the bound itself. */
  int (*admit)(srv_job_ans *a);
  void (*unadmit)(void);
  /* Stores and queues the job of a parsed, decoded request: 202 with the
   * job, or an error.  Owns sm and q; with admitted, the request's place. */
  void (*create)(srv_model *sm, srv_samples_req *q, int admitted, srv_job_ans *a);
  void (*get)(const char *id, srv_job_ans *a);
  void (*cancel)(const char *id, srv_job_ans *a);   /* DELETE */
  void (*list)(srv_job_ans *a);
  /* SRV_JOB_RES_*; k the sample of SRV_JOB_RES_SAMPLE */
  void (*result)(const char *id, int what, long k, srv_job_ans *a);
  int (*active)(void);
  void (*shutdown)(void);
  void (*free)(void);
  /* its metric families */
  void (*metrics)(srv_mbuf *b);
  /* "ok", or "unavailable" while the store cannot be reached */
  const char *(*state)(void);
} srv_job_store;

extern const srv_job_store srv_job_store_memory;
extern const srv_job_store srv_job_store_redis; /* job_store_redis.c */

#endif
