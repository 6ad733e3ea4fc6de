/* modelref.c - the served model behind a refcount, so that SIGHUP can load a
 * new file and swap it in while batches still finish on the old one. */
#include "srv.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t cur_mu = PTHREAD_MUTEX_INITIALIZER;
static srv_model *cur;
static uint64_t next_gen = 1;

srv_model *srv_model_get(void) {
  pthread_mutex_lock(&cur_mu);
  srv_model *sm = cur;
  if (sm) atomic_fetch_add(&sm->refs, 1);
  pthread_mutex_unlock(&cur_mu);
  return sm;
}

void srv_model_put(srv_model *sm) {
  if (!sm) return;
  if (atomic_fetch_sub(&sm->refs, 1) == 1) {
    srv_log(SRV_LOG_DEBUG, "msg=\"model released\" generation=%llu",
            (unsigned long long)sm->gen);
    jem_model_free(sm->m);
    free(sm);
  }
}

int srv_model_ready(void) {
  pthread_mutex_lock(&cur_mu);
  int r = cur != NULL;
  pthread_mutex_unlock(&cur_mu);
  return r;
}

/* Loads first and swaps only on success: the old model keeps serving. */
int srv_model_load(const char *path, char *err, size_t errlen) {
  jem_model *m = NULL;
  int rc = jem_model_load(&m, path, err, errlen);
  if (rc) return rc;
  /* Class-conditional jobs start from buffer images of their class. */
  if (m->replay_n > 0) {
    const int b = jem_ws_batch_within(m, 64, 0, (size_t)srv_cfg.workspace_bytes);
    jem_ws *ws = jem_ws_create(m, b, 0);
    rc = ws ? jem_replay_label(m, ws) : JEM_ENOMEM;
    jem_ws_free(ws);
    if (rc) {
      jem_model_free(m);
      snprintf(err, errlen, "out of memory labelling the replay buffer");
      return rc;
    }
  }
  srv_model *sm = calloc(1, sizeof *sm);
  if (!sm) {
    jem_model_free(m);
    snprintf(err, errlen, "out of memory");
    return JEM_ENOMEM;
  }
  sm->m = m;
  atomic_init(&sm->refs, 1);
  snprintf(sm->path, sizeof sm->path, "%s", path);
  sm->loaded_at = srv_wall_s();
  pthread_mutex_lock(&cur_mu);
  sm->gen = next_gen++;
  srv_model *old = cur;
  cur = sm;
  pthread_mutex_unlock(&cur_mu);
  srv_model_put(old);
  return 0;
}

void srv_model_shutdown(void) {
  pthread_mutex_lock(&cur_mu);
  srv_model *old = cur;
  cur = NULL;
  pthread_mutex_unlock(&cur_mu);
  srv_model_put(old);
}
