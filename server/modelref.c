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
static atomic_ullong reloads[2]; /* ok, error */

void srv_model_count_reload(int ok) { atomic_fetch_add(&reloads[ok ? 0 : 1], 1); }

static void render_metrics(srv_mbuf *b) {
  srv_model *sm = srv_model_get();
  srv_mhead(b, "jem_model_info", "gauge", "The served model; the value is always 1.");
  if (sm) {
    char name[512];
    srv_mlabel(name, sizeof name, sm->m->name);
    srv_mprintf(b, "jem_model_info{name=\"%s\",arch=\"wrn-%d-%d\",generation=\"%llu\"} 1\n",
                name, sm->m->arch.depth, sm->m->arch.widen, (unsigned long long)sm->gen);
  }
  srv_mhead(b, "jem_model_loaded", "gauge", "1 when a model is loaded.");
  srv_mprintf(b, "jem_model_loaded %d\n", sm ? 1 : 0);
  srv_mhead(b, "jem_model_load_timestamp_seconds", "gauge", "When the served model was loaded.");
  srv_mprintf(b, "jem_model_load_timestamp_seconds %.3f\n", sm ? sm->loaded_at : 0.0);
  srv_model_put(sm);
  srv_mhead(b, "jem_model_reloads_total", "counter", "Model reloads (SIGHUP) by result.");
  srv_mprintf(b, "jem_model_reloads_total{result=\"ok\"} %llu\n",
              (unsigned long long)atomic_load(&reloads[0]));
  srv_mprintf(b, "jem_model_reloads_total{result=\"error\"} %llu\n",
              (unsigned long long)atomic_load(&reloads[1]));
}

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
  srv_metrics_register(render_metrics);
  jem_model *m = NULL;
  int rc = jem_model_load(&m, path, err, errlen);
  if (rc) return rc;
  /* Class-conditional jobs start from buffer images of their class. */
  if (m->replay_n > 0) {
    jem_ws *ws = jem_ws_create(m, 64, 0);
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
