/* job_work.h - a job's SGLD chains as work items on the scheduler's pool
 * (server/job_work.c), whatever store keeps the job. */
#ifndef JEM_SRV_JOB_WORK_H
#define JEM_SRV_JOB_WORK_H

#include "srv.h"

/* A job's parameters, every default applied. */
typedef struct srv_job_params {
  int n, steps, y, init, clamp;
  double step_size, noise;
  uint64_t seed;
} srv_job_params;

/* What a succeeded job serves; immutable once made. */
typedef struct srv_job_result {
  int n;
  json_t *samples;              /* result.samples of the job object */
  unsigned char *grid, **png, *npy;
  size_t grid_len, *png_len, npy_len;
} srv_job_result;

void srv_job_result_free(srv_job_result *r);
/* Bytes a result holds, as charged against --max-job-bytes. */
size_t srv_job_result_bytes(const srv_job_result *r);
/* Upper bound of a job's chains and results for model m (without the
 * store's own record). */
size_t srv_job_estimate(const jem_model *m, int n);

/* One job's chains.  run() (a pool thread, exclusive use of one worker
 * slot) does one slice: single SGLD steps on the worker's workspace until
 * --job-slice-ms has passed (at least one step), checking cancel between
 * steps; the slice that does the last step also scores the samples and
 * encodes the grid PNG, one PNG per sample and the .npy, so HTTP threads
 * only copy bytes.  work.done is the store's: it publishes progress and
 * resubmits the work until final or failed.
 *
 * Step-level batching.  Jobs on the same model that wait for a slot at the
 * same time start together (work.batch_key, up to --max-batch chains; see
 * sched.c): their slice advances all their chains with one forward and
 * backward per step (in batches of the workspace's size), each job leaving
 * the batch when it has done its steps or is canceled.
 *
 * Determinism.  Chain i draws from the stream (seed, i) (jem_sample_init),
 * so a job's samples depend only on its parameters.  Running a chain k steps
 * in several slices gives the same numbers as one run, and the slices run
 * the workspace batch-invariant (jem_ws_set_batch_invariant): a chain's
 * numbers do not depend on the chains beside it, its own job's or others',
 * nor on the thread count, so a job gives the same bytes alone, batched
 * with others, on any replica, after a take-over and in `jem sample --seed S`. */
typedef struct srv_job_exec srv_job_exec;
struct srv_job_exec {
  srv_work work;                /* first member; work.done is set by the store */
  char id[33];
  srv_job_params p;
  srv_model *sm;                /* the model the chains run on (owner's reference) */
  float *x;                     /* [n, C, S, S] */
  jem_rng *rngs;
  int *ys;                      /* NULL when unconditional */
  int initialized;
  int step;                     /* steps done */
  int final, failed;            /* the last slice ended the job, or could not */
  uint64_t chain_steps;         /* chain-steps of the last slice */
  char msg[160];                /* why it failed */
  atomic_int cancel;            /* read by run() between steps */
  /* Called by run() first: 0 stops the slice (the job ended meanwhile). */
  int (*begin)(srv_job_exec *e);
  srv_job_result res;           /* made by the last slice */
};

/* Sets e up for the job id with parameters p on sm's model: takes x (the
 * decoded init images, or NULL) and allocates the rest; 0 or -1 (out of
 * memory; free with srv_job_exec_free_chains either way). */
int srv_job_exec_init(srv_job_exec *e, const char *id, const srv_job_params *p, srv_model *sm,
                      float *x);
void srv_job_exec_free_chains(srv_job_exec *e);

/* Checks once whether slices can run at a higher nice value (--job-nice). */
void srv_job_work_start(void);

#endif
