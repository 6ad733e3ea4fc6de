/* workspace.c - workspaces: the one scratch block planned for a batch size,
 * its slices and the helper threads that run them (and lend themselves to
 * the layers of a lone slice, jem__par). */
#include "net.h"

#include <stdlib.h>
#include <string.h>

/* Cap of an im2col buffer in floats: larger batches are convolved in chunks
 * of images so that the buffer stays about the size of an L2 cache. */
#ifndef JEM_COL_CAP
#define JEM_COL_CAP ((size_t)1 << 18)
#endif

/* ------------------------------------------------------------------------ */
/* Planning                                                                 */

static size_t col_need(const jem_net *net, int nb) {
  size_t need = jem__conv_col_need(&net->stem, nb, JEM_COL_CAP);
  for (int b = 0; b < net->nblocks; b++) {
    const jem__block *B = &net->blocks[b];
    need = jem__umax(need, jem__conv_col_need(&B->c1, nb, JEM_COL_CAP));
    need = jem__umax(need, jem__conv_col_need(&B->c2, nb, JEM_COL_CAP));
    if (B->has_sc && !jem__conv_direct(&B->sc, 0))
      need = jem__umax(need, jem__conv_col_need(&B->sc, nb, JEM_COL_CAP));
  }
  return need;
}

/* Rounds a float count up to a multiple of 16 (64 bytes). */
static size_t al16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Floats that one slice of `cap` images needs; with base != NULL, also points
 * the slice's buffers into base. */
static size_t plan_sub(const jem_net *net, jem_sub *s, int cap, float *base) {
  const size_t N = (size_t)cap;
  const size_t css = (size_t)net->in_c * net->size * net->size;
  size_t off = 0;
#define TAKE(dst, count)                 \
  do {                                   \
    size_t c_ = al16(count);             \
    if (base) (dst) = base + off;        \
    off += c_;                           \
  } while (0)
  TAKE(s->x, css * N);
  TAKE(s->a[0], (size_t)net->stem.cout * jem__conv_hwo(&net->stem) * N);
  for (int b = 0; b < net->nblocks; b++) {
    const jem__block *B = &net->blocks[b];
    TAKE(s->a[b + 1], (size_t)B->c2.cout * jem__conv_hwo(&B->c2) * N);
    TAKE(s->u[b], (size_t)B->c1.cout * jem__conv_hwo(&B->c1) * N);
    if (net->norm) {
      TAKE(s->t1[b], (size_t)B->c1.cin * B->c1.hin * B->c1.win * N);
      TAKE(s->t2[b], (size_t)B->c2.cin * B->c2.hin * B->c2.win * N);
    }
  }
  if (net->norm) TAKE(s->th, (size_t)net->feat * net->last_hw * N);
  for (int i = 0; i < 3; i++) TAKE(s->g[i], net->max_act * N);
  const size_t cc = col_need(net, cap);
  TAKE(s->col, cc);
  TAKE(s->dfeat, (size_t)net->feat * N);
#undef TAKE
  if (base) {
    s->cap = cap;
    s->col_cap = cc;
  }
  return off;
}

/* ------------------------------------------------------------------------ */
/* Threads                                                                  */

/* Takes slices (or a layer's parts) until none is left: a thread slowed
 * down by other work on its CPU simply ends up running fewer of them. */
static void run_work(jem_ws *ws, int tid) {
  for (;;) {
    int i = atomic_fetch_add_explicit(&ws->next, 1, memory_order_relaxed);
    if (ws->job == JOB_PARTS) {
      if (i >= ws->par_parts) return;
      ws->par_fn(ws->par_arg, i, ws->par_parts);
    } else {
      if (i >= ws->nsub) return;
      jem__set_batch_invariant(ws->invariant); /* for the kernels on this thread */
      ws->slice_fn(ws, i, tid);
    }
  }
}

static void *helper_loop(void *arg) {
  jem_helper *h = arg;
  jem_ws *ws = h->ws;
  unsigned seen = 0;
  for (;;) {
    pthread_mutex_lock(&ws->mu);
    while (ws->gen == seen) pthread_cond_wait(&ws->go, &ws->mu);
    seen = ws->gen;
    const int job = ws->job, active = ws->active;
    pthread_mutex_unlock(&ws->mu);
    if (job == JOB_STOP) return NULL;
    if (h->tid < active) run_work(ws, h->tid);
    pthread_mutex_lock(&ws->mu);
    if (--ws->pending == 0) pthread_cond_signal(&ws->done);
    pthread_mutex_unlock(&ws->mu);
  }
}

/* Runs `job` with `active` threads (the caller being thread 0), which take
 * its slices or parts first come, first served. */
static void dispatch(jem_ws *ws, int job, int active) {
  pthread_mutex_lock(&ws->mu);
  ws->job = job;
  ws->active = active;
  ws->pending = ws->nhelpers;
  atomic_store_explicit(&ws->next, 0, memory_order_relaxed);
  ws->gen++;
  pthread_cond_broadcast(&ws->go);
  pthread_mutex_unlock(&ws->mu);
  run_work(ws, 0);
  pthread_mutex_lock(&ws->mu);
  while (ws->pending > 0) pthread_cond_wait(&ws->done, &ws->mu);
  pthread_mutex_unlock(&ws->mu);
}

/* The workspace whose idle threads the calling thread may lend to its
 * layers (jem__par), or NULL. */
static _Thread_local jem_ws *tl_lender;

void jem__par(jem__par_fn fn, void *arg, int parts) {
  jem_ws *ws = tl_lender;
  int active = ws ? ws->nhelpers + 1 : 1;
  if (active > parts) active = parts;
  if (active <= 1) {
    for (int i = 0; i < parts; i++) fn(arg, i, parts);
    return;
  }
  const int job = ws->job; /* the lone slice's, running on this thread */
  ws->par_fn = fn;
  ws->par_arg = arg;
  ws->par_parts = parts;
  dispatch(ws, JOB_PARTS, active);
  ws->job = job;
}

/* A lone slice runs on the caller's thread, which lends the other threads
 * to its layers (jem__par): one image per thread would leave them idle. */
void jem__ws_run(jem_ws *ws, jem__slice_fn fn, int threads, int used) {
  int active = threads < 1 ? 1 : threads;
  if (active > ws->nhelpers + 1) active = ws->nhelpers + 1;
  if (active > used) active = used;
  ws->slice_fn = fn;
  if (active <= 1) {
    ws->job = JOB_SLICES;
    if (used == 1 && threads > 1 && ws->nhelpers > 0) tl_lender = ws;
    jem__set_batch_invariant(ws->invariant);
    for (int si = 0; si < ws->nsub; si++) fn(ws, si, 0);
    tl_lender = NULL;
    return;
  }
  dispatch(ws, JOB_SLICES, active);
}

static void stop_helpers(jem_ws *ws) {
  if (ws->nhelpers > 0) {
    pthread_mutex_lock(&ws->mu);
    ws->job = JOB_STOP;
    ws->gen++;
    pthread_cond_broadcast(&ws->go);
    pthread_mutex_unlock(&ws->mu);
    for (int i = 0; i < ws->nhelpers; i++) pthread_join(ws->helpers[i].th, NULL);
  }
  ws->nhelpers = 0;
}

/* ------------------------------------------------------------------------ */
/* Creation                                                                 */

/* Threads a workspace for max_batch images runs with: all of them even for
 * one image, whose slice lends the others to its layers (jem__par). */
static int ws_threads(int max_batch) {
  (void)max_batch;
  int nthr = jem__threads();
  if (nthr > 64) nthr = 64;
  return nthr < 1 ? 1 : nthr;
}

/* Floats of a workspace's scratch block (ws_bytes: plus its header). */
static size_t ws_floats(const jem_model *m, int max_batch, int flags, int nthr,
                        size_t *head) {
  const jem_net *net = m->net;
  const size_t N = (size_t)max_batch;
  const int nb = net->nblocks;
  const int nsub = (max_batch + SLICE_IMAGES - 1) / SLICE_IMAGES;
  *head = sizeof(jem_ws) + sizeof(jem_sub) * (size_t)nsub +
          sizeof(float *) * (size_t)(4 * nb + 1) * (size_t)nsub +
          sizeof(jem_helper) * (size_t)nthr;
  const size_t css = (size_t)net->in_c * net->size * net->size;
  const int cap = max_batch < SLICE_IMAGES ? max_batch : SLICE_IMAGES;
  jem_sub plan = {0};
  size_t total = (size_t)nsub * plan_sub(net, &plan, cap, NULL);
  /* helpers' private parameter gradients */
  if ((flags & JEM_WS_TRAIN) && nthr > 1) total += (size_t)(nthr - 1) * al16(m->n_weights);
  total += 2 * al16((size_t)net->feat * N);
  total += 3 * al16((size_t)net->k * N);
  total += al16(css * N);
  total += al16(net->wf_total);
  if (flags & JEM_WS_FIXED_WEIGHTS) total += al16(net->wu_total);
  return total;
}

size_t jem_ws_plan_bytes(const jem_model *m, int max_batch, int flags) {
  JEM_ASSERT(m && m->net && max_batch >= 1);
  size_t head, total = ws_floats(m, max_batch, flags, ws_threads(max_batch), &head);
  return total * sizeof(float) + head;
}

int jem_ws_batch_within(const jem_model *m, int max_batch, int flags, size_t bytes) {
  JEM_ASSERT(m && m->net && max_batch >= 1);
  int b = max_batch;
  for (;;) {
    if (b == 1 || jem_ws_plan_bytes(m, b, flags) <= bytes) return b;
    /* whole slices while there are several, then image by image */
    b = b > SLICE_IMAGES ? (b - 1) / SLICE_IMAGES * SLICE_IMAGES : b - 1;
  }
}

jem_ws *jem_ws_create(const jem_model *m, int max_batch, int flags) {
  if (!m || !m->net || max_batch < 1) return NULL;
  const jem_net *net = m->net;
  const size_t N = (size_t)max_batch;
  const int nb = net->nblocks;
  const int nthr = ws_threads(max_batch);
  const int nsub = (max_batch + SLICE_IMAGES - 1) / SLICE_IMAGES;
  size_t head;
  const size_t total = ws_floats(m, max_batch, flags, nthr, &head);
  /* one allocation for the struct, slices, pointer tables and helpers */
  jem_ws *ws = calloc(1, head);
  if (!ws) return NULL;
  ws->sub = (jem_sub *)(ws + 1);
  float **ptrs = (float **)(ws->sub + nsub);
  ws->helpers = (jem_helper *)(ptrs + (size_t)(4 * nb + 1) * nsub);
  ws->max_batch = max_batch;
  ws->flags = flags;
  ws->in_c = net->in_c;
  ws->size = net->size;
  ws->k = net->k;
  ws->nfeat = net->feat;
  ws->nblocks = nb;
  ws->norm = net->norm;
  ws->max_act = net->max_act;
  ws->n_weights = m->n_weights;
  ws->nsub = nsub;

  const size_t css = (size_t)net->in_c * net->size * net->size;
  const int cap = max_batch < SLICE_IMAGES ? max_batch : SLICE_IMAGES;
  for (int si = 0; si < nsub; si++) {
    jem_sub *s = &ws->sub[si];
    s->a = ptrs + (size_t)(4 * nb + 1) * si;
    s->u = s->a + nb + 1;
    s->t1 = s->u + nb;
    s->t2 = s->t1 + nb;
  }
  const int with_dw = (flags & JEM_WS_TRAIN) && nthr > 1;
  ws->mem = jem__falloc(total);
  if (!ws->mem) {
    free(ws);
    return NULL;
  }
  ws->bytes = total * sizeof(float) + head;
  float *p = ws->mem;
  for (int si = 0; si < nsub; si++) {
    jem_sub *s = &ws->sub[si];
    p += plan_sub(net, s, cap, p);
  }
  for (int i = 0; with_dw && i < nthr - 1; i++) {
    ws->helpers[i].dw = p;
    p += al16(m->n_weights);
  }
  ws->feat = p; p += al16((size_t)net->feat * N);
  ws->fwhite = p; p += al16((size_t)net->feat * N);
  ws->logits = p; p += al16((size_t)net->k * N);
  ws->dlogits = p; p += al16((size_t)net->k * N);
  ws->probs = p; p += al16((size_t)net->k * N);
  ws->dx = p; p += al16(css * N);
  ws->wflip = p; p += al16(net->wf_total);
  if (flags & JEM_WS_FIXED_WEIGHTS) {
    ws->wino = p;
    p += al16(net->wu_total);
  }
  JEM_ASSERT((size_t)(p - ws->mem) == total);

  if (nthr > 1) {
    /* the slices are the parallelism: OpenBLAS runs single-threaded inside */
    jem__blas_single_thread();
    if (pthread_mutex_init(&ws->mu, NULL) == 0) {
      if (pthread_cond_init(&ws->go, NULL) == 0) {
        if (pthread_cond_init(&ws->done, NULL) == 0) {
          ws->sync_ok = 1;
        } else {
          pthread_cond_destroy(&ws->go);
          pthread_mutex_destroy(&ws->mu);
        }
      } else {
        pthread_mutex_destroy(&ws->mu);
      }
    }
    for (int i = 0; ws->sync_ok && i < nthr - 1; i++) {
      jem_helper *h = &ws->helpers[ws->nhelpers];
      h->ws = ws;
      h->tid = i + 1;
      /* a helper that fails to start only costs parallelism */
      if (pthread_create(&h->th, NULL, helper_loop, h) != 0) break;
      ws->nhelpers++;
    }
  }
  return ws;
}

void jem_ws_free(jem_ws *ws) {
  if (!ws) return;
  stop_helpers(ws);
  if (ws->sync_ok) {
    pthread_cond_destroy(&ws->done);
    pthread_cond_destroy(&ws->go);
    pthread_mutex_destroy(&ws->mu);
  }
  free(ws->mem);
  free(ws);
}

int jem_ws_max_batch(const jem_ws *ws) { return ws ? ws->max_batch : 0; }
int jem_ws_set_batch_invariant(jem_ws *ws, int on) {
  const int was = ws->invariant;
  ws->invariant = on != 0;
  return was;
}
size_t jem_ws_bytes(const jem_ws *ws) { return ws ? ws->bytes : 0; }
const float *jem_ws_features(const jem_ws *ws) { return ws ? ws->feat : NULL; }

float *jem__ws_input_scratch(jem_ws *ws) { return ws->dx; }

void jem__ws_check(const jem_ws *ws, const jem_model *m) {
  JEM_ASSERT(ws && m && m->net && m->weights);
  const jem_net *net = m->net;
  JEM_ASSERT(ws->in_c == net->in_c && ws->size == net->size &&
             ws->k == net->k && ws->nfeat == net->feat &&
             ws->nblocks == net->nblocks && ws->norm == net->norm &&
             ws->max_act == net->max_act &&
             ws->n_weights == m->n_weights);
}

