/* modelref.c - the model repository: every served model behind a refcount,
 * by name, so that SIGHUP (or POST /v2/repository/...) can load a file and
 * swap it in while requests in flight still finish on the old one. */
#include "srv.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* One name in the repository.  Lookups take mu briefly; loads (slow: a
 * file read) run under load_mu only, so they never block lookups, and one
 * at a time. */
typedef struct entry {
  char name[SRV_MODEL_NAME_MAX];
  char path[4096];
  int from_dir;                 /* found in --model-dir (a rescan may drop it) */
  int meta_name;                /* a single --model: named by its metadata, which a
                                   reload may change (as before repositories) */
  int unloaded;                 /* POST .../unload: kept out until loaded again */
  srv_model *cur;               /* NULL: unloaded or never loaded */
  char reason[256];             /* why cur is NULL, or the last failed reload */
  struct stat st;               /* of the file cur was loaded from */
} entry;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;
static entry *E[SRV_MAX_MODELS];
static int nE;
static char def_name[SRV_MODEL_NAME_MAX];
static uint64_t next_gen = 1;   /* under mu; unique across models (workspaces key on it) */
static int stopped;             /* under mu: srv_model_shutdown ran, loads are discarded */

void srv_model_put(srv_model *sm) {
  if (!sm) return;
  if (atomic_fetch_sub(&sm->refs, 1) == 1) {
    srv_log(SRV_LOG_DEBUG, "msg=\"model released\" model=\"%s\" generation=%llu", sm->name,
            (unsigned long long)sm->gen);
    jem_model_free(sm->m);
    free(sm);
  }
}

static entry *find_locked(const char *name) {
  for (int i = 0; i < nE; i++)
    if (!strcmp(E[i]->name, name)) return E[i];
  return NULL;
}

srv_model *srv_model_find(const char *name) {
  pthread_mutex_lock(&mu);
  entry *e = find_locked(name ? name : def_name);
  srv_model *sm = e ? e->cur : NULL;
  if (sm) atomic_fetch_add(&sm->refs, 1);
  pthread_mutex_unlock(&mu);
  return sm;
}

srv_model *srv_model_get(void) { return srv_model_find(NULL); }

int srv_model_missing(const char *name, char *msg, size_t cap) {
  pthread_mutex_lock(&mu);
  entry *e = find_locked(name ? name : def_name);
  char why[256], def[SRV_MODEL_NAME_MAX];
  snprintf(why, sizeof why, "%s", e ? e->reason : "");
  snprintf(def, sizeof def, "%s", def_name);
  pthread_mutex_unlock(&mu);
  if (!name) {
    snprintf(msg, cap, "the default model '%s' is not loaded%s%s", def, why[0] ? ": " : "", why);
    return 503;
  }
  if (e)
    snprintf(msg, cap, "model '%s' is not loaded: %s", name, why[0] ? why : "unloaded");
  else
    snprintf(msg, cap, "no model named '%.100s' (GET /v1/models lists them)", name);
  return 404;
}

int srv_models_list(srv_model **out, int cap) {
  int n = 0;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < nE && n < cap; i++)
    if (E[i]->cur) {
      atomic_fetch_add(&E[i]->cur->refs, 1);
      out[n++] = E[i]->cur;
    }
  pthread_mutex_unlock(&mu);
  return n;
}

void srv_model_default(char *out, size_t cap) {
  pthread_mutex_lock(&mu);
  snprintf(out, cap, "%s", def_name);
  pthread_mutex_unlock(&mu);
}

int srv_model_ready(void) {
  pthread_mutex_lock(&mu);
  int r = 0;
  for (int i = 0; i < nE; i++) r |= E[i]->cur != NULL;
  pthread_mutex_unlock(&mu);
  return r;
}

int srv_models_index(srv_model_status *out, int cap) {
  pthread_mutex_lock(&mu);
  int n = 0;
  for (int i = 0; i < nE && n < cap; i++, n++) {
    srv_model_status *s = &out[n];
    snprintf(s->name, sizeof s->name, "%s", E[i]->name);
    snprintf(s->reason, sizeof s->reason, "%s", E[i]->cur ? "" : E[i]->reason);
    s->ready = E[i]->cur != NULL;
    s->is_default = !strcmp(E[i]->name, def_name);
    s->gen = E[i]->cur ? E[i]->cur->gen : 0;
    s->loaded_at = E[i]->cur ? E[i]->cur->loaded_at : 0;
  }
  pthread_mutex_unlock(&mu);
  return n;
}

static atomic_ullong reloads[2]; /* SIGHUP results: ok, error */

void srv_model_count_reload(int ok) { atomic_fetch_add(&reloads[ok ? 0 : 1], 1); }

/* The repository's families for /metrics: one series per model, labelled
 * model="NAME". */
static void render_metrics(srv_mbuf *b) {
  srv_model_status *ms = malloc(SRV_MAX_MODELS * sizeof *ms);
  int nm = ms ? srv_models_index(ms, SRV_MAX_MODELS) : 0;
  char l[512];
  srv_mhead(b, "jem_model_info", "gauge", "Each loaded model; the value is always 1.");
  for (int i = 0; i < nm; i++) {
    srv_model *sm = ms[i].ready ? srv_model_find(ms[i].name) : NULL;
    if (!sm) continue;
    srv_mlabel(l, sizeof l, sm->name);
    srv_mprintf(b, "jem_model_info{model=\"%s\",name=\"%s\",arch=\"wrn-%d-%d\","
                "generation=\"%llu\",default=\"%s\"} 1\n", l, l, sm->m->arch.depth,
                sm->m->arch.widen, (unsigned long long)sm->gen,
                ms[i].is_default ? "true" : "false");
    srv_model_put(sm);
  }
  srv_mhead(b, "jem_model_loaded", "gauge", "1 when the model is loaded, 0 when the repository "
            "knows it but it is not (unloaded, or its file failed to load).");
  for (int i = 0; i < nm; i++) {
    srv_mlabel(l, sizeof l, ms[i].name);
    srv_mprintf(b, "jem_model_loaded{model=\"%s\"} %d\n", l, ms[i].ready);
  }
  srv_mhead(b, "jem_model_load_timestamp_seconds", "gauge", "When each loaded model was loaded.");
  for (int i = 0; i < nm; i++) {
    srv_mlabel(l, sizeof l, ms[i].name);
    if (ms[i].ready)
      srv_mprintf(b, "jem_model_load_timestamp_seconds{model=\"%s\"} %.3f\n", l,
                  ms[i].loaded_at);
  }
  free(ms);
  srv_mhead(b, "jem_model_reloads_total", "counter", "Model reloads (SIGHUP) by result.");
  srv_mprintf(b, "jem_model_reloads_total{result=\"ok\"} %llu\n",
              (unsigned long long)atomic_load(&reloads[0]));
  srv_mprintf(b, "jem_model_reloads_total{result=\"error\"} %llu\n",
              (unsigned long long)atomic_load(&reloads[1]));
}

/* ------------------------------------------------------------------------ */
/* Loading (under load_mu) */

/* Reads path into a new srv_model named name; NULL and err on failure. */
static srv_model *load_file(const char *name, const char *path, char *err, size_t errlen) {
  jem_model *m = NULL;
  if (jem_model_load(&m, path, err, errlen)) return NULL;
  /* Class-conditional jobs start from buffer images of their class. */
  if (m->replay_n > 0) {
    const int b = jem_ws_batch_within(m, 64, 0, (size_t)srv_cfg.workspace_bytes);
    jem_ws *ws = jem_ws_create(m, b, 0);
    int rc = ws ? jem_replay_label(m, ws) : JEM_ENOMEM;
    jem_ws_free(ws);
    if (rc) {
      jem_model_free(m);
      snprintf(err, errlen, "out of memory labelling the replay buffer");
      return NULL;
    }
  }
  srv_model *sm = calloc(1, sizeof *sm);
  if (!sm) {
    jem_model_free(m);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  sm->m = m;
  atomic_init(&sm->refs, 1);
  snprintf(sm->name, sizeof sm->name, "%s", name ? name : m->name);
  snprintf(sm->path, sizeof sm->path, "%s", path);
  sm->loaded_at = srv_wall_s();
  sm->label = srv_metrics_model(sm->name);
  return sm;
}

/* Makes sm (loaded from the file st describes) e's model. */
static void install(entry *e, srv_model *sm, const struct stat *st) {
  pthread_mutex_lock(&mu);
  if (stopped) { /* a reload that outlived the drain */
    pthread_mutex_unlock(&mu);
    srv_model_put(sm);
    return;
  }
  if (e->meta_name && strcmp(e->name, sm->name)) {
    if (!strcmp(def_name, e->name)) snprintf(def_name, sizeof def_name, "%s", sm->name);
    snprintf(e->name, sizeof e->name, "%s", sm->name);
  }
  sm->gen = next_gen++;
  srv_model *old = e->cur;
  e->cur = sm;
  e->st = *st;
  e->unloaded = 0;
  e->reason[0] = '\0';
  pthread_mutex_unlock(&mu);
  srv_model_put(old);
  srv_log(SRV_LOG_INFO, "msg=\"model loaded\" model=\"%s\" path=\"%s\" arch=wrn-%d-%d "
          "classes=%d ood_stats=%s generation=%llu", sm->name, sm->path, sm->m->arch.depth,
          sm->m->arch.widen, sm->m->arch.num_classes, sm->m->ood.present ? "yes" : "no",
          (unsigned long long)sm->gen);
}

/* Loads e's file and swaps it in; on failure the old model stays (and the
 * reason is kept for the index).  0 or -1 with err. */
static int reload_entry(entry *e, char *err, size_t errlen) {
  struct stat st;
  if (stat(e->path, &st)) {
    snprintf(err, errlen, "%s: %s", e->path, strerror(errno));
  } else {
    srv_model *sm = load_file(e->meta_name ? NULL : e->name, e->path, err, errlen);
    if (sm) {
      install(e, sm, &st);
      return 0;
    }
  }
  pthread_mutex_lock(&mu);
  snprintf(e->reason, sizeof e->reason, "%s", err);
  pthread_mutex_unlock(&mu);
  return -1;
}

static entry *add_entry(const char *name, const char *path, int from_dir) {
  if (nE >= SRV_MAX_MODELS) return NULL;
  entry *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  snprintf(e->name, sizeof e->name, "%s", name);
  snprintf(e->path, sizeof e->path, "%s", path);
  e->from_dir = from_dir;
  snprintf(e->reason, sizeof e->reason, "loading");
  pthread_mutex_lock(&mu);
  E[nE++] = e;
  pthread_mutex_unlock(&mu);
  return e;
}

static void drop_entry(entry *e) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < nE; i++)
    if (E[i] == e) {
      memmove(&E[i], &E[i + 1], (size_t)(nE - i - 1) * sizeof E[0]);
      nE--;
      break;
    }
  srv_model *old = e->cur;
  pthread_mutex_unlock(&mu);
  srv_model_put(old);
  free(e);
}

int srv_model_name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n >= SRV_MODEL_NAME_MAX || s[0] == '.') return 0;
  for (size_t i = 0; i < n; i++)
    if (!(isalnum((unsigned char)s[i]) || strchr("._-", s[i]))) return 0;
  return 1;
}

/* The stem of path (its file name without ".safetensors"). */
static void stem(char *out, size_t cap, const char *path) {
  const char *b = strrchr(path, '/');
  b = b ? b + 1 : path;
  size_t n = strlen(b);
  if (n > 12 && !strcmp(b + n - 12, ".safetensors")) n -= 12;
  snprintf(out, cap, "%.*s", (int)n, b);
}

/* The directory's *.safetensors files, sorted; n of them in names (malloc'd). */
static int scan_dir(const char *dir, char (**names)[SRV_MODEL_NAME_MAX], int *n, char *err,
                    size_t errlen) {
  DIR *d = opendir(dir);
  *names = NULL;
  *n = 0;
  if (!d) {
    snprintf(err, errlen, "--model-dir %s: %s", dir, strerror(errno));
    return -1;
  }
  struct dirent *de;
  int cap = 0;
  while ((de = readdir(d))) {
    size_t len = strlen(de->d_name);
    if (len <= 12 || strcmp(de->d_name + len - 12, ".safetensors") || de->d_name[0] == '.')
      continue;
    char nm[SRV_MODEL_NAME_MAX];
    stem(nm, sizeof nm, de->d_name);
    if (!srv_model_name_ok(nm) || len - 12 >= SRV_MODEL_NAME_MAX) {
      srv_log(SRV_LOG_WARN, "msg=\"--model-dir: file skipped, its name is not a model name "
              "(letters, digits, . _ -)\" file=\"%.200s\"", de->d_name);
      continue;
    }
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      void *p = realloc(*names, (size_t)cap * sizeof **names);
      if (!p) break;
      *names = p;
    }
    memcpy((*names)[(*n)++], nm, sizeof nm);
  }
  closedir(d);
  qsort(*names, (size_t)*n, sizeof **names, (int (*)(const void *, const void *))strcmp);
  return 0;
}

/* DIR/name.safetensors; a path too long to hold ends up "" (no such file). */
static void dir_path(char *out, size_t cap, const char *name) {
  int n = snprintf(out, cap, "%s/%s.safetensors", srv_cfg.model_dir, name);
  if (n < 0 || (size_t)n >= cap) out[0] = '\0';
}

int srv_models_init(char *err, size_t errlen) {
  srv_metrics_register(render_metrics);
  pthread_mutex_lock(&load_mu);
  int rc = -1;
  /* one --model and no directory: the model keeps its own name (its
   * metadata's), as before repositories existed; else names are file stems */
  int single = srv_cfg.model_dir[0] == '\0' && !strchr(srv_cfg.model, '\n');
  for (const char *p = srv_cfg.model; *p;) {
    size_t n = strcspn(p, "\n");
    char path[4096], name[SRV_MODEL_NAME_MAX];
    snprintf(path, sizeof path, "%.*s", (int)n, p);
    p += n + (p[n] != '\0');
    struct stat st;
    srv_model *sm = NULL;
    if (single) {
      if (stat(path, &st)) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto out;
      }
      if (!(sm = load_file(NULL, path, err, errlen))) goto out;
      snprintf(name, sizeof name, "%s", sm->name);
    } else {
      stem(name, sizeof name, path);
      if (!srv_model_name_ok(name)) {
        snprintf(err, errlen, "--model %s: several models are named by their file names "
                 "without .safetensors, and '%s' is not a model name (letters, digits, . _ -)",
                 path, name);
        goto out;
      }
    }
    if (find_locked(name)) {
      snprintf(err, errlen, "two models named '%s' (%s and %s)", name, find_locked(name)->path,
               path);
      goto out;
    }
    entry *e = add_entry(name, path, 0);
    if (!e) {
      srv_model_put(sm);
      snprintf(err, errlen, "more than %d models", SRV_MAX_MODELS);
      goto out;
    }
    e->meta_name = single;
    if (sm)
      install(e, sm, &st);
    else if (reload_entry(e, err, errlen))
      goto out;
  }
  if (srv_cfg.model_dir[0]) {
    char (*names)[SRV_MODEL_NAME_MAX];
    int n;
    if (scan_dir(srv_cfg.model_dir, &names, &n, err, errlen)) goto out;
    for (int i = 0; i < n; i++) {
      char path[4096];
      dir_path(path, sizeof path, names[i]);
      if (find_locked(names[i])) {
        snprintf(err, errlen, "two models named '%s' (%s and %s)", names[i],
                 find_locked(names[i])->path, path);
        free(names);
        goto out;
      }
      entry *e = add_entry(names[i], path, 1);
      if (!e || reload_entry(e, err, errlen)) {
        if (!e) snprintf(err, errlen, "more than %d models", SRV_MAX_MODELS);
        free(names);
        goto out;
      }
    }
    free(names);
  }
  if (!nE) {
    snprintf(err, errlen, "--model-dir %s holds no *.safetensors file", srv_cfg.model_dir);
    goto out;
  }
  if (srv_cfg.default_model[0]) {
    if (!find_locked(srv_cfg.default_model)) {
      snprintf(err, errlen, "--default-model '%s' is not among the models (", srv_cfg.default_model);
      for (int i = 0; i < nE; i++) {
        size_t u = strlen(err);
        snprintf(err + u, errlen - u, "%s%s", i ? ", " : "", E[i]->name);
      }
      size_t u = strlen(err);
      snprintf(err + u, errlen - u, ")");
      goto out;
    }
    snprintf(def_name, sizeof def_name, "%s", srv_cfg.default_model);
  } else {
    snprintf(def_name, sizeof def_name, "%s", E[0]->name);
  }
  rc = 0;
out:
  pthread_mutex_unlock(&load_mu);
  return rc;
}

int srv_models_rescan(char *err, size_t errlen) {
  pthread_mutex_lock(&load_mu);
  int failed = 0;
  err[0] = '\0';
  char e1[512];
  /* --model files: loaded again (as SIGHUP always did), unless unloaded */
  for (int i = 0; i < nE; i++) {
    entry *e = E[i];
    if (e->from_dir || e->unloaded) continue;
    if (reload_entry(e, e1, sizeof e1)) {
      failed++;
      snprintf(err, errlen, "%s: %s", e->name, e1);
    }
  }
  if (srv_cfg.model_dir[0]) {
    char (*names)[SRV_MODEL_NAME_MAX];
    int n;
    if (scan_dir(srv_cfg.model_dir, &names, &n, e1, sizeof e1)) {
      snprintf(err, errlen, "%s", e1);
      pthread_mutex_unlock(&load_mu);
      return failed + 1;
    }
    /* removed files leave; changed ones are loaded again; new ones join */
    for (int i = nE - 1; i >= 0; i--) {
      entry *e = E[i];
      if (!e->from_dir) continue;
      if (!bsearch(e->name, names, (size_t)n, sizeof *names,
                   (int (*)(const void *, const void *))strcmp)) {
        srv_log(SRV_LOG_INFO, "msg=\"model removed\" model=\"%s\"", e->name);
        drop_entry(e);
      }
    }
    for (int i = 0; i < n; i++) {
      char path[4096];
      dir_path(path, sizeof path, names[i]);
      entry *e = find_locked(names[i]);
      if (e && !e->from_dir) continue; /* a --model of that name wins */
      struct stat st;
      if (e && (e->unloaded || (!stat(path, &st) && e->cur && st.st_ino == e->st.st_ino &&
                                st.st_dev == e->st.st_dev && st.st_size == e->st.st_size &&
                                st.st_mtim.tv_sec == e->st.st_mtim.tv_sec &&
                                st.st_mtim.tv_nsec == e->st.st_mtim.tv_nsec)))
        continue; /* unchanged, or unloaded on purpose */
      if (!e && !(e = add_entry(names[i], path, 1))) {
        snprintf(err, errlen, "more than %d models", SRV_MAX_MODELS);
        failed++;
        break;
      }
      if (reload_entry(e, e1, sizeof e1)) {
        failed++;
        snprintf(err, errlen, "%s: %s", e->name, e1);
      }
    }
    free(names);
  }
  pthread_mutex_unlock(&load_mu);
  return failed;
}

/* load_mu for a repository call: a reload stuck on its file (a FIFO, a hung
 * mount) holds it, and an HTTP thread must not wait for that forever. */
static int lock_for_call(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += srv_cfg.reload_timeout;
  return pthread_mutex_timedlock(&load_mu, &ts);
}

int srv_model_repo_load(const char *name, char *err, size_t errlen) {
  if (lock_for_call()) {
    snprintf(err, errlen, "another load has not ended within --reload-timeout");
    return -2;
  }
  int rc = -1;
  entry *e = find_locked(name);
  if (!e && srv_cfg.model_dir[0] && srv_model_name_ok(name)) {
    char path[4096];
    dir_path(path, sizeof path, name);
    struct stat st;
    if (!stat(path, &st) && !(e = add_entry(name, path, 1)))
      snprintf(err, errlen, "more than %d models", SRV_MAX_MODELS);
  }
  if (!e)
    rc = 1, snprintf(err, errlen, "no model named '%.100s'%s", name,
                     srv_cfg.model_dir[0] ? " here or in --model-dir" : "");
  else
    rc = reload_entry(e, err, errlen);
  pthread_mutex_unlock(&load_mu);
  return rc;
}

int srv_model_repo_unload(const char *name) {
  if (lock_for_call()) return -2;
  pthread_mutex_lock(&mu);
  entry *e = find_locked(name);
  srv_model *old = NULL;
  if (e) {
    old = e->cur;
    e->cur = NULL;
    e->unloaded = 1;
    snprintf(e->reason, sizeof e->reason, "unloaded");
  }
  pthread_mutex_unlock(&mu);
  pthread_mutex_unlock(&load_mu);
  srv_model_put(old);
  if (e) srv_log(SRV_LOG_INFO, "msg=\"model unloaded\" model=\"%s\"", name);
  return e ? 0 : -1;
}

/* Drops every model without waiting for a load in progress (it may be stuck
 * on its file): the entries stay allocated for it, and what it loads is
 * discarded. */
void srv_model_shutdown(void) {
  srv_model *old[SRV_MAX_MODELS];
  pthread_mutex_lock(&mu);
  stopped = 1;
  for (int i = 0; i < nE; i++) {
    old[i] = E[i]->cur;
    E[i]->cur = NULL;
  }
  int n = nE;
  pthread_mutex_unlock(&mu);
  for (int i = 0; i < n; i++) srv_model_put(old[i]);
}
