/* job_parse.c - POST /v1/samples bodies: parsing and validation against
 * the model and the caps (no daemon needed: fuzz/fuzz_samples_json.c), the
 * init images' decode, job ids and default seeds. */
#include "jobs.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

void srv_samples_req_free(srv_samples_req *q) {
  if (!q) return;
  free(q->x);
  q->x = NULL;
  srv_decode_free(&q->dec);
}

static int fail(const char **code, const char *c, int status) {
  *code = c;
  return status;
}

/* Base64-decodes init.images into q->dec.imgs and adds up the pixels their
 * headers declare (q->pixels, bounded by --max-request-pixels); the images
 * themselves are decoded by srv_samples_decode.  Returns 0 or a status. */
static int parse_images(json_t *imgs, const jem_image_limits *lim, int n, srv_samples_req *q,
                        const char **code, char *err, size_t errlen) {
  q->dec.imgs = calloc((size_t)n, sizeof *q->dec.imgs);
  if (!q->dec.imgs) {
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
    q->dec.imgs[q->dec.n_imgs++] = (srv_blob){bytes, blen, bytes};
    if (srv_request_pixels_add(&q->pixels, bytes, blen, lim, err, errlen))
      return fail(code, "request_too_large", 413);
  }
  return 0;
}

int srv_samples_decode(srv_samples_req *q, const jem_model *m, const jem_image_limits *lim,
                       int max_images, const char **code, char *err, size_t errlen) {
  if (q->init != JEM_SAMPLE_INIT_GIVEN || !q->dec.imgs) return 0;
  size_t chw = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  if (!q->x && !(q->x = malloc(sizeof(float) * chw * (size_t)q->n))) {
    snprintf(err, errlen, "out of memory for %d images", q->n);
    srv_samples_req_free(q);
    return fail(code, "out_of_memory", 503);
  }
  q->dec.m = m;
  q->dec.lim = *lim;
  q->dec.x = q->x;
  q->dec.naming = SRV_DECODE_INIT;
  if (srv_decode_run(&q->dec, max_images) >= 0) return 0;
  snprintf(err, errlen, "%s", q->dec.err);
  *code = q->dec.code;
  int st = q->dec.status;
  srv_samples_req_free(q);
  return st;
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

/* 'class': an index or a name of m's classes into *y (null: none). */
static int class_field(const json_t *v, const jem_model *m, int *y, const char **code, char *err,
                       size_t errlen) {
  int K = m->arch.num_classes;
  if (json_is_integer(v)) {
    long long c = json_integer_value(v);
    if (c < 0 || c >= K) {
      snprintf(err, errlen, "'class' %lld is not a class index of this model (0 to %d)", c,
               K - 1);
      return fail(code, "unknown_class", 422);
    }
    *y = (int)c;
    return 0;
  }
  if (json_is_string(v)) {
    const char *s = json_string_value(v);
    for (int k = 0; k < K && *y < 0; k++)
      if (strlen(m->classes[k]) == json_string_length(v) && !strcmp(m->classes[k], s)) *y = k;
    if (*y < 0) {
      unknown_class(m, s, err, errlen);
      return fail(code, "unknown_class", 422);
    }
    return 0;
  }
  snprintf(err, errlen, "'class' must be null, a class index or a class name, not %s",
           json_type_name(v));
  return fail(code, "invalid_type", 400);
}

/* 'seed': a non-negative integer. */
static int seed_field(const json_t *v, srv_samples_req *out, const char **code, char *err,
                      size_t errlen) {
  if (!json_is_integer(v)) {
    snprintf(err, errlen, "'seed' must be a non-negative integer, not %s", json_type_name(v));
    return fail(code, "invalid_type", 400);
  }
  if (json_integer_value(v) < 0) {
    snprintf(err, errlen, "'seed' must be a non-negative integer, got %lld",
             (long long)json_integer_value(v));
    return fail(code, "out_of_range", 422);
  }
  out->seed = (uint64_t)json_integer_value(v);
  out->has_seed = 1;
  return 0;
}

/* init.images: 1 to max_n base64 strings (*imgs), as many as 'n' when it
 * was given. */
static int init_images(json_t *v, int max_n, int n_given, srv_samples_req *out, json_t **imgs,
                       const char **code, char *err, size_t errlen) {
  const char *key;
  json_t *e;
  json_object_foreach(v, key, e) {
    if (strcmp(key, "images") != 0) {
      char q[80];
      srv_log_quote(q, sizeof q, key);
      snprintf(err, errlen, "unknown field init.%s (only \"images\" is accepted)", q);
      return fail(code, "unknown_field", 400);
    }
  }
  *imgs = json_object_get(v, "images");
  if (!json_is_array(*imgs)) {
    snprintf(err, errlen, "'init' must hold \"images\": an array of base64 PNG or JPEG "
             "strings");
    return fail(code, "invalid_type", 400);
  }
  size_t cnt = json_array_size(*imgs);
  for (size_t k = 0; k < cnt; k++)
    if (!json_is_string(json_array_get(*imgs, k))) {
      snprintf(err, errlen, "init.images[%zu] must be a base64 string, not %s", k,
               json_type_name(json_array_get(*imgs, k)));
      return fail(code, "invalid_type", 400);
    }
  if (cnt < 1 || cnt > (size_t)max_n) {
    snprintf(err, errlen, "init.images must hold from 1 to %d images, got %zu", max_n, cnt);
    return fail(code, "out_of_range", 422);
  }
  if (n_given && (size_t)out->n != cnt) {
    snprintf(err, errlen, "'n' is %d but init.images holds %zu images; give n equal to "
             "their count or leave it out", out->n, cnt);
    return fail(code, "out_of_range", 422);
  }
  out->n = (int)cnt;
  out->init = JEM_SAMPLE_INIT_GIVEN;
  return 0;
}

/* 'init': "noise", "buffer" (when m has a replay buffer) or
 * {"images": [...]} (init_images). */
static int init_field(json_t *v, const jem_model *m, int max_n, int n_given, srv_samples_req *out,
                      json_t **imgs, const char **code, char *err, size_t errlen) {
  if (json_is_object(v)) return init_images(v, max_n, n_given, out, imgs, code, err, errlen);
  if (!json_is_string(v)) {
    snprintf(err, errlen, "'init' must be \"noise\", \"buffer\" or {\"images\": [...]}, not "
             "%s", json_type_name(v));
    return fail(code, "invalid_type", 400);
  }
  const char *s = json_string_value(v);
  if (!strcmp(s, "noise")) {
    out->init = JEM_SAMPLE_INIT_NOISE;
  } else if (!strcmp(s, "buffer")) {
    if (!(m->replay && m->replay_n > 0)) {
      snprintf(err, errlen, "'init' \"buffer\": this model has no replay buffer; use "
               "\"noise\" or {\"images\": [...]}");
      return fail(code, "out_of_range", 422);
    }
    out->init = JEM_SAMPLE_INIT_BUFFER;
  } else {
    char q[96];
    srv_log_quote(q, sizeof q, s);
    snprintf(err, errlen, "'init' %s is not \"noise\", \"buffer\" or {\"images\": [...]}", q);
    return fail(code, "out_of_range", 422);
  }
  return 0;
}

int srv_samples_parse(const char *body, size_t len, const jem_model *m, int max_n,
                      int max_steps, const jem_image_limits *lim, srv_samples_req *out,
                      const char **code, char *err, size_t errlen) {
  static const char *const known[] = {"n", "steps", "class", "step_size", "noise",
                                      "init", "clamp", "seed", "model", NULL};
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
               "init, clamp, seed, model)", q);
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
  if ((v = json_object_get(j, "class")) && !json_is_null(v) &&
      (st = class_field(v, m, &out->y, code, err, errlen)))
    goto out;
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
  if ((v = json_object_get(j, "seed")) && (st = seed_field(v, out, code, err, errlen)))
    goto out;
  if ((v = json_object_get(j, "init")) &&
      (st = init_field(v, m, max_n, n_given, out, &imgs, code, err, errlen)))
    goto out;
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

int srv_rand_bytes(void *p, size_t n) {
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
  if (srv_rand_bytes(b, sizeof b)) return -1;
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

