/* jobs.h - SGLD sampling jobs in jemd: request parsing (server/job_parse.c,
 * also used by fuzz/fuzz_samples_json.c), the /v1/samples and /v1/jobs
 * handlers (server/h_jobs.c) and the lifecycle hooks main.c calls.  The job
 * store is behind server/job_store.h, the chains' work in server/job_work.h. */
#ifndef JEM_SRV_JOBS_H
#define JEM_SRV_JOBS_H

#include "srv.h"

/* A parsed POST /v1/samples body with every default applied. */
typedef struct srv_samples_req {
  int n;                /* chains */
  int steps;
  int y;                /* class index, -1 = unconditional */
  double step_size, noise;
  int init;             /* JEM_SAMPLE_INIT_NOISE, _BUFFER or _GIVEN */
  int clamp;
  int has_seed;
  uint64_t seed;
  /* _GIVEN: the encoded images (dec.imgs) and the pixels their headers
   * declare, until srv_samples_decode turns them into x [n, C, S, S] */
  srv_decode dec;
  long long pixels;
  float *x;             /* malloc'd */
} srv_samples_req;

/* Parses and validates a POST /v1/samples body against model m and the caps
 * (no daemon needed).  An empty body means every default.  Returns 0, or an
 * HTTP status (400 malformed / wrong type / unknown field, 413 image too
 * large, 415 not an image, 422 out of range or unknown class, 503 out of
 * memory) with a snake_case *code and a sentence in err.  init.images are
 * checked by their headers only; srv_samples_decode decodes them.  On
 * success free the result with srv_samples_req_free. */
int srv_samples_parse(const char *body, size_t len, const jem_model *m, int max_n,
                      int max_steps, const jem_image_limits *lim, srv_samples_req *out,
                      const char **code, char *err, size_t errlen);
/* Decodes up to max_images more of a parsed request's init.images into q->x
 * (INT_MAX: all; nothing to do for other inits), so a worker can decode a
 * large request in slices (0: only set q->dec up for srv_decode_submit); the
 * encoded images are freed (q->dec.imgs NULL) once all are decoded.  0, or a
 * status and code as above with q freed. */
int srv_samples_decode(srv_samples_req *q, const jem_model *m, const jem_image_limits *lim,
                       int max_images, const char **code, char *err, size_t errlen);
void srv_samples_req_free(srv_samples_req *q);

/* 128 random bits as 32 lowercase hex digits (+ NUL); 0 or -1. */
int srv_job_new_id(char out[33]);
/* 1 when s has the shape of a job id (32 lowercase hex digits). */
int srv_job_id_valid(const char *s);
/* n random bytes from the kernel; 0 or -1. */
int srv_rand_bytes(void *p, size_t n);

/* Route handlers (server/routes.c). */
enum MHD_Result srv_h_samples_create(srv_req *r);
enum MHD_Result srv_h_jobs_list(srv_req *r);
enum MHD_Result srv_h_job_get(srv_req *r);
enum MHD_Result srv_h_job_delete(srv_req *r);
enum MHD_Result srv_h_job_grid(srv_req *r);
enum MHD_Result srv_h_job_sample(srv_req *r);
enum MHD_Result srv_h_job_npy(srv_req *r);

/* Lifecycle, called by main() in this order:
 *   srv_jobs_start()     after the scheduler starts, before HTTP: opens the
 *                        job store; non-zero aborts startup.
 *   srv_jobs_active()    jobs this process queued or runs; the drain waits
 *                        (up to --drain-seconds) while it or the in-flight
 *                        request count is > 0.
 *   srv_jobs_shutdown()  at the drain deadline, before srv_sched_stop():
 *                        marks every unfinished job canceled with reason
 *                        "shutdown"; running slices stop at their next step.
 *   srv_jobs_free()      after the scheduler and HTTP stopped: frees every
 *                        stored job. */
int srv_jobs_start(void);
int srv_jobs_active(void);
/* The job store's kind ("memory", "redis"); *state "ok" or "unavailable". */
const char *srv_jobs_store(const char **state);
void srv_jobs_shutdown(void);
void srv_jobs_free(void);

#endif
