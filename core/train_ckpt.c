/* train_ckpt.c - the trainer's files: checkpoints (the model and a state
 * file with everything else an exact resume needs, written atomically and
 * checksummed), the model's provenance metadata, and the saved models. */
#include "internal.h"
#include "trainer.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_MAGIC "JEMTRN01"
#define STATE_VERSION 1u


void jem__train_path(const jem__trainer *t, char *out, size_t cap, const char *name) {
  snprintf(out, cap, "%s/%s", t->c.run_dir, name);
}

/* Writes `len` bytes to path atomically: path.tmp, fsync, rename. */
static int write_atomic(const char *path, const void *data, size_t len,
                        char *err, size_t errlen) {
  char tmp[1100];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0)
    return jem__errf(err, errlen, JEM_EIO, "cannot write %s: %s", tmp, strerror(errno));
  const unsigned char *p = data;
  size_t done = 0;
  while (done < len) {
    ssize_t w = write(fd, p + done, len - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      unlink(tmp);
      return jem__errf(err, errlen, JEM_EIO, "writing %s: %s", tmp, strerror(e));
    }
    done += (size_t)w;
  }
  if (fsync(fd) || close(fd)) {
    unlink(tmp);
    return jem__errf(err, errlen, JEM_EIO, "writing %s: %s", tmp, strerror(errno));
  }
  if (rename(tmp, path)) {
    int e = errno;
    unlink(tmp);
    return jem__errf(err, errlen, JEM_EIO, "renaming %s: %s", tmp, strerror(e));
  }
  return 0;
}

/* A growable byte buffer for the state file. */
typedef struct bytes { unsigned char *p; size_t n, cap; int oom; } bytes;

static void put(bytes *b, const void *d, size_t n) {
  if (b->oom) return;
  if (b->n + n > b->cap) {
    size_t nc = b->cap ? b->cap : 4096;
    while (nc < b->n + n) nc *= 2;
    unsigned char *np = realloc(b->p, nc);
    if (!np) { b->oom = 1; return; }
    b->p = np;
    b->cap = nc;
  }
  memcpy(b->p + b->n, d, n);
  b->n += n;
}
static void put_u64(bytes *b, uint64_t v) { put(b, &v, 8); }
static void put_f64(bytes *b, double v) { put(b, &v, 8); }
static void put_rng(bytes *b, const jem_rng *r) {
  put_u64(b, r->state); put_u64(b, r->inc);
  put_u64(b, (uint64_t)r->has_spare);
  uint32_t s; memcpy(&s, &r->spare, 4); put_u64(b, s);
}

typedef struct reader { const unsigned char *p; size_t n, off; int bad; } reader;
static void get(reader *r, void *d, size_t n) {
  if (r->bad || r->n - r->off < n) { r->bad = 1; memset(d, 0, n); return; }
  memcpy(d, r->p + r->off, n);
  r->off += n;
}
static uint64_t get_u64(reader *r) { uint64_t v; get(r, &v, 8); return v; }
static double get_f64(reader *r) { double v; get(r, &v, 8); return v; }
static void get_rng(reader *r, jem_rng *g) {
  g->state = get_u64(r); g->inc = get_u64(r);
  g->has_spare = (int)get_u64(r);
  uint32_t s = (uint32_t)get_u64(r); memcpy(&g->spare, &s, 4);
}

static uint64_t fnv1a(const unsigned char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
  return h;
}

static uint64_t weights_hash(const jem__trainer *t) {
  return fnv1a((const unsigned char *)t->m->weights, t->nw * sizeof(float));
}

/* Structural settings a checkpoint must agree with to be resumed. */
static void put_fingerprint(bytes *b, const jem__trainer *t) {
  put_u64(b, (uint64_t)t->c.baseline);
  put_u64(b, (uint64_t)t->B);
  put_u64(b, (uint64_t)t->nw);
  put_u64(b, (uint64_t)(t->c.baseline ? 0 : t->c.buffer_size));
  put_u64(b, (uint64_t)t->tr->n);
}

static int write_state(jem__trainer *t, const char *path, char *err, size_t errlen) {
  bytes b = {0};
  put(&b, STATE_MAGIC, 8);
  put_u64(&b, STATE_VERSION);
  put_fingerprint(&b, t);
  put_u64(&b, (uint64_t)t->iter);
  put_u64(&b, (uint64_t)t->adam_t);
  for (int i = 0; i < 2; i++) { put_u64(&b, (uint64_t)t->ld[i].epoch); put_u64(&b, (uint64_t)t->ld[i].pos); }
  put_u64(&b, t->seed_eff);
  put_f64(&b, t->lr_scale);
  put_u64(&b, (uint64_t)t->rollbacks);
  put_f64(&b, t->wall_s);
  put_f64(&b, t->best_val);
  put_f64(&b, t->last_val);
  put_u64(&b, (uint64_t)t->resumes);
  put_u64(&b, weights_hash(t));
  put_rng(&b, &t->aug);
  put_rng(&b, &t->brng);
  for (int i = 0; i < t->B; i++) put_rng(&b, &t->chain[i]);
  put(&b, t->am, t->nw * sizeof(float));
  put(&b, t->av, t->nw * sizeof(float));
  put_u64(&b, fnv1a(b.p, b.n));
  if (b.oom) { free(b.p); return jem__errf(err, errlen, JEM_ENOMEM, "out of memory writing the trainer state"); }
  int rc = write_atomic(path, b.p, b.n, err, errlen);
  free(b.p);
  return rc;
}

static int read_state(jem__trainer *t, const char *path, char *err, size_t errlen) {
  unsigned char *data = NULL;
  size_t len = 0;
  int rc = jem_read_file(path, (size_t)1 << 31, &data, &len, err, errlen);
  if (rc) return rc;
  if (len < 16 || memcmp(data, STATE_MAGIC, 8)) {
    free(data);
    return jem__errf(err, errlen, JEM_EFORMAT, "%s is not a jem trainer state file", path);
  }
  uint64_t sum;
  memcpy(&sum, data + len - 8, 8);
  if (fnv1a(data, len - 8) != sum) {
    free(data);
    return jem__errf(err, errlen, JEM_EFORMAT, "%s: checksum mismatch (corrupt file)", path);
  }
  reader r = {data, len - 8, 8, 0};
  if (get_u64(&r) != STATE_VERSION) {
    free(data);
    return jem__errf(err, errlen, JEM_EUNSUPPORTED, "%s: unsupported state version", path);
  }
  bytes fp = {0};
  put_fingerprint(&fp, t);
  unsigned char *have = malloc(fp.n ? fp.n : 1);
  if (have) get(&r, have, fp.n);
  int same = have && !fp.oom && !r.bad && !memcmp(have, fp.p, fp.n);
  free(have);
  free(fp.p);
  if (!same) {
    free(data);
    return jem__errf(err, errlen, JEM_EINVAL,
                     "%s was written by a different setup (baseline flag, batch, "
                     "architecture, buffer size or training-set size differ)", path);
  }
  t->iter = (int)get_u64(&r);
  t->adam_t = (int64_t)get_u64(&r);
  for (int i = 0; i < 2; i++) { t->ld[i].epoch = (int)get_u64(&r); t->ld[i].pos = (int)get_u64(&r); }
  t->seed_eff = get_u64(&r);
  t->lr_scale = (float)get_f64(&r);
  t->rollbacks = (int)get_u64(&r);
  t->wall_s = get_f64(&r);
  t->best_val = (float)get_f64(&r);
  t->last_val = (float)get_f64(&r);
  t->resumes = (int)get_u64(&r);
  uint64_t wh = get_u64(&r);
  get_rng(&r, &t->aug);
  get_rng(&r, &t->brng);
  for (int i = 0; i < t->B; i++) get_rng(&r, &t->chain[i]);
  get(&r, t->am, t->nw * sizeof(float));
  get(&r, t->av, t->nw * sizeof(float));
  int bad = r.bad || r.off != r.n;
  free(data);
  if (bad) return jem__errf(err, errlen, JEM_EFORMAT, "%s: truncated or oversized state", path);
  if (wh != weights_hash(t))
    return jem__errf(err, errlen, JEM_EFORMAT,
                     "%s does not belong to the model checkpoint next to it", path);
  for (int i = 0; i < 2; i++) {
    if (t->ld[i].pos < 0 || t->ld[i].pos > t->tr->n || t->ld[i].epoch < 0)
      return jem__errf(err, errlen, JEM_EFORMAT, "%s: bad data position", path);
    jem__train_make_perm(t, i);
  }
  return 0;
}

static json_t *provenance(jem_model *m) {
  json_t *p = json_object_get(m->meta, "provenance");
  if (!json_is_object(p)) {
    p = json_object();
    if (!p || json_object_set_new(m->meta, "provenance", p)) return NULL;
  }
  return p;
}

static json_t *config_json(const jem__trainer *t) {
  const jem_train_config *c = &t->c;
  static const char *const sched[] = {"const", "step", "cosine"};
  json_t *o = json_object();
  if (!o) return NULL;
  json_object_set_new(o, "objective", json_string(c->baseline ? "cross-entropy" : "jem"));
  json_object_set_new(o, "batch", json_integer(c->batch));
  json_object_set_new(o, "iterations", json_integer(c->iterations));
  json_object_set_new(o, "lr", json_real(c->lr));
  json_object_set_new(o, "warmup", json_integer(c->warmup));
  json_object_set_new(o, "schedule", json_string(sched[c->schedule]));
  if (c->schedule == JEM_LR_STEP) json_object_set_new(o, "decay_rate", json_real(c->decay_rate));
  json_object_set_new(o, "adam_betas", json_pack("[f,f]", (double)c->beta1, (double)c->beta2));
  json_object_set_new(o, "sigma", json_real(c->sigma));
  json_object_set_new(o, "crop_pad", json_integer(c->crop_pad));
  json_object_set_new(o, "flip", json_boolean(c->flip));
  json_object_set_new(o, "seed", json_integer((json_int_t)c->seed));
  json_object_set_new(o, "train_images", json_integer(t->tr->n));
  if (!c->baseline) {
    json_object_set_new(o, "sgld_steps", json_integer(c->sgld_steps));
    json_object_set_new(o, "sgld_step_size", json_real(c->sgld_step));
    json_object_set_new(o, "sgld_noise", json_real(c->sgld_noise));
    json_object_set_new(o, "sgld_clamp", json_boolean(c->sgld_clamp));
    json_object_set_new(o, "buffer_size", json_integer(c->buffer_size));
    json_object_set_new(o, "reinit", json_real(c->reinit));
    json_object_set_new(o, "px_weight", json_real(c->px_weight));
    json_object_set_new(o, "energy_l2", json_real(c->energy_l2));
    json_object_set_new(o, "buffer_init",
                        json_string(c->buffer_init == JEM_BUFFER_DATA       ? "data"
                                    : c->buffer_init == JEM_BUFFER_GAUSSIAN ? "gaussian"
                                                                            : "uniform"));
    if (c->px_ramp) json_object_set_new(o, "px_ramp", json_integer(c->px_ramp));
  }
  if (c->outliers) {
    json_object_set_new(o, "outliers", json_string(c->outlier_sets ? c->outlier_sets : "?"));
    json_object_set_new(o, "outlier_images", json_integer(c->outliers->n));
    json_object_set_new(o, "oe_weight", json_real(c->oe_weight));
    json_object_set_new(o, "oe_margins", json_pack("[f,f]", (double)c->oe_margin_in,
                                                  (double)c->oe_margin_out));
  }
  return o;
}

static void update_provenance(jem__trainer *t) {
  json_t *p = provenance(t->m);
  if (!p) return;
  json_object_set_new(p, "train", config_json(t));
  json_object_set_new(p, "iterations", json_integer(t->iter));
  json_object_set_new(p, "wall_seconds", json_real(floor(t->wall_s)));
  json_object_set_new(p, "rollbacks", json_integer(t->rollbacks));
  json_object_set_new(p, "resumes", json_integer(t->resumes));
  if (isfinite(t->last_val)) json_object_set_new(p, "val_acc", json_real(t->last_val));
  if (isfinite(t->best_val)) json_object_set_new(p, "best_val_acc", json_real(t->best_val));
}

int jem__train_save_model(jem__trainer *t, const char *path, int keep, char *err, size_t errlen) {
  jem_model *m = t->m;
  float *old = m->replay;
  int old_n = m->replay_n;
  float *small = NULL;
  if (t->buf && keep < 0) {
    m->replay = t->buf;
    m->replay_n = t->c.buffer_size;
  } else if (t->buf && keep > 0) {
    small = jem__falloc((size_t)keep * t->chw);
    if (!small) return jem__errf(err, errlen, JEM_ENOMEM, "out of memory");
    for (int i = 0; i < keep; i++) {
      size_t j = (size_t)i * (size_t)t->c.buffer_size / (size_t)keep;
      memcpy(small + (size_t)i * t->chw, t->buf + j * t->chw, t->chw * sizeof(float));
    }
    m->replay = small;
    m->replay_n = keep;
  } else if (t->buf) {
    m->replay = NULL;
    m->replay_n = 0;
  }
  update_provenance(t);
  int rc = jem_model_save(m, path, err, errlen);
  m->replay = old;
  m->replay_n = old_n;
  free(small);
  return rc;
}

/* The first line of the pointer file run_dir/file into out ("" when the
 * file is missing or empty); -1 when there is no such file. */
static int read_pointer(const jem__trainer *t, const char *file, char *out, size_t cap) {
  char p[1024];
  jem__train_path(t, p, sizeof p, file);
  out[0] = 0;
  FILE *f = fopen(p, "r");
  if (!f) return -1;
  if (!fgets(out, (int)cap, f)) out[0] = 0;
  fclose(f);
  out[strcspn(out, "\n")] = 0;
  return 0;
}

int jem__train_ckpt_exists(const jem__trainer *t) {
  char p[1024];
  jem__train_path(t, p, sizeof p, "checkpoint");
  return access(p, F_OK) == 0;
}

int jem__train_ckpt_current(const jem__trainer *t) {
  char name[80], want[64];
  read_pointer(t, "checkpoint", name, sizeof name);
  snprintf(want, sizeof want, "ckpt-%08d", t->iter);
  return !strcmp(name, want);
}

int jem__train_checkpoint(jem__trainer *t, char *err, size_t errlen) {
  char name[64], mp[1024], sp[1024], ptr[1024];
  snprintf(name, sizeof name, "ckpt-%08d", t->iter);
  char f[128];
  snprintf(f, sizeof f, "%s.safetensors", name);
  jem__train_path(t, mp, sizeof mp, f);
  snprintf(f, sizeof f, "%s.state", name);
  jem__train_path(t, sp, sizeof sp, f);
  int rc = jem__train_save_model(t, mp, -1, err, errlen);
  if (!rc) rc = write_state(t, sp, err, errlen);
  if (rc) return rc;
  /* The pointer names a complete pair; it is replaced last. */
  char prev[64];
  read_pointer(t, "checkpoint", prev, sizeof prev);
  jem__train_path(t, ptr, sizeof ptr, "checkpoint");
  char line[80];
  int ln = snprintf(line, sizeof line, "%s\n", name);
  if ((rc = write_atomic(ptr, line, (size_t)ln, err, errlen))) return rc;
  /* Keep the previous pair as a fallback; remove older ones. */
  if (prev[0] && strcmp(prev, name)) {
    char keep_ptr[1024];
    jem__train_path(t, keep_ptr, sizeof keep_ptr, "checkpoint.prev");
    char old[80];
    read_pointer(t, "checkpoint.prev", old, sizeof old);
    if (old[0] && strcmp(old, name) && strcmp(old, prev) && !strncmp(old, "ckpt-", 5)) {
      snprintf(f, sizeof f, "%s.safetensors", old);
      jem__train_path(t, mp, sizeof mp, f);
      unlink(mp);
      snprintf(f, sizeof f, "%s.state", old);
      jem__train_path(t, sp, sizeof sp, f);
      unlink(sp);
    }
    ln = snprintf(line, sizeof line, "%s\n", prev);
    write_atomic(keep_ptr, line, (size_t)ln, NULL, 0);
  }
  return 0;
}

int jem__train_load_checkpoint(jem__trainer *t, char *err, size_t errlen) {
  char ptr[1024], name[80];
  jem__train_path(t, ptr, sizeof ptr, "checkpoint");
  if (read_pointer(t, "checkpoint", name, sizeof name)) return 1;
  if (strncmp(name, "ckpt-", 5) || strchr(name, '/'))
    return jem__errf(err, errlen, JEM_EFORMAT, "%s: bad checkpoint name '%s'", ptr, name);
  char f[128], mp[1024], sp[1024];
  snprintf(f, sizeof f, "%s.safetensors", name);
  jem__train_path(t, mp, sizeof mp, f);
  snprintf(f, sizeof f, "%s.state", name);
  jem__train_path(t, sp, sizeof sp, f);
  jem_model *ck = NULL;
  int rc = jem_model_load(&ck, mp, err, errlen);
  if (rc) return rc;
  const jem_arch *a = &ck->arch, *b = &t->m->arch;
  if (a->depth != b->depth || a->widen != b->widen || a->in_channels != b->in_channels ||
      a->image_size != b->image_size || a->num_classes != b->num_classes || a->leak != b->leak) {
    jem_model_free(ck);
    return jem__errf(err, errlen, JEM_ESHAPE, "%s has a different architecture", mp);
  }
  if (t->buf && (ck->replay_n != t->c.buffer_size || !ck->replay)) {
    jem_model_free(ck);
    return jem__errf(err, errlen, JEM_ESHAPE, "%s: replay buffer has %d images, expected %d",
                     mp, ck->replay_n, t->c.buffer_size);
  }
  memcpy(t->m->weights, ck->weights, t->nw * sizeof(float));
  if (t->buf) memcpy(t->buf, ck->replay, (size_t)t->c.buffer_size * t->chw * sizeof(float));
  json_t *meta = json_deep_copy(ck->meta);
  jem_model_free(ck);
  if (meta) {
    json_decref(t->m->meta);
    t->m->meta = meta;
    jem_model_apply_meta(t->m, NULL, 0);
  }
  return read_state(t, sp, err, errlen);
}
