/* parse.c - request parsing shared by the handlers and the fuzzers: routes,
 * JSON with a depth cap, base64, the classify JSON body and the Open
 * Inference Protocol infer body. */
#include "srv.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One pass over the raw bytes, before jansson allocates anything: nesting
 * depth, and a weight for what the parse tree would cost, each ',' 1 (one
 * more value) and each '[' or '{' 8 (a container costs about eight times a
 * number once parsed: two million "{}" in 8 MB became ~900 MB).  Strings
 * are skipped.  0 when both stay within bounds, else -1 (depth) or -2. */
int srv_json_scan(const char *buf, size_t len, int max_depth, long long max_elements) {
  int depth = 0, in_str = 0;
  long long weight = 1;
  for (size_t i = 0; i < len; i++) {
    char c = buf[i];
    if (in_str) {
      if (c == '\\')
        i++;
      else if (c == '"')
        in_str = 0;
      continue;
    }
    if (c == '"') {
      in_str = 1;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return -1;
      weight += SRV_JSON_CONTAINER_WEIGHT;
    } else if (c == ']' || c == '}') {
      depth--;
    } else if (c == ',') {
      weight++;
    }
    if (weight > max_elements) return -2;
  }
  return 0;
}

int srv_json_depth_ok(const char *buf, size_t len, int max_depth) {
  return srv_json_scan(buf, len, max_depth, LLONG_MAX) == -1 ? -1 : 0;
}

static _Thread_local struct {
  const char *buf;
  size_t len;
  json_t *j;
  int status;
  char err[256];
} ahead;

void srv_json_ahead(const char *buf, size_t len, json_t *j, int status, const char *err) {
  srv_json_ahead_clear();
  ahead.buf = buf;
  ahead.len = len;
  ahead.j = j;
  ahead.status = status;
  snprintf(ahead.err, sizeof ahead.err, "%s", err ? err : "");
}

void srv_json_ahead_clear(void) {
  json_decref(ahead.j);
  ahead.j = NULL;
  ahead.buf = NULL;
}

json_t *srv_json_parse(const char *buf, size_t len, int *status, char *err, size_t errlen) {
  if (buf && buf == ahead.buf && len == ahead.len) { /* parsed on a worker already */
    json_t *j = ahead.j;
    *status = ahead.status;
    if (!j) snprintf(err, errlen, "%s", ahead.err);
    ahead.j = NULL;
    ahead.buf = NULL;
    return j;
  }
  *status = 400; /* for every failure but a number too large */
  if (len == 0) {
    snprintf(err, errlen, "empty body; expected JSON");
    return NULL;
  }
  int max_depth = srv_cfg.max_json_depth > 0 ? srv_cfg.max_json_depth : SRV_JSON_MAX_DEPTH;
  long long max_el = srv_cfg.max_json_elements > 0 ? srv_cfg.max_json_elements
                                                   : SRV_JSON_MAX_ELEMENTS;
  int sc = srv_json_scan(buf, len, max_depth, max_el);
  if (sc == -1) {
    snprintf(err, errlen, "JSON nested deeper than %d levels (--max-json-depth)", max_depth);
    return NULL;
  }
  if (sc == -2) {
    *status = 413;
    snprintf(err, errlen, "JSON with more than %lld values (--max-json-elements; an object "
             "or array counts %d)", max_el, SRV_JSON_CONTAINER_WEIGHT);
    return NULL;
  }
  json_error_t je;
  json_t *j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
  if (j) {
    *status = 0;
    return j;
  }
  if (json_error_code(&je) == json_error_numeric_overflow) { /* valid JSON, too big for us */
    *status = 422;
    snprintf(err, errlen, "number out of range at line %d column %d (%s): integers must "
             "lie within -2^63..2^63-1 and reals within +-1.8e308", je.line, je.column, je.text);
  } else {
    snprintf(err, errlen, "malformed JSON at line %d column %d: %s", je.line, je.column,
             je.text);
  }
  return NULL;
}

static int b64v(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

unsigned char *srv_b64_decode(const char *s, size_t len, size_t *out_len) {
  if (len >= 5 && !memcmp(s, "data:", 5)) {
    const char *comma = memchr(s, ',', len);
    if (!comma || comma - s < 12 || memcmp(comma - 7, ";base64", 7) != 0) return NULL;
    len -= (size_t)(comma + 1 - s);
    s = comma + 1;
  }
  while (len && s[len - 1] == '=') len--;
  if (len % 4 == 1) return NULL;
  unsigned char *out = malloc(len / 4 * 3 + 3);
  if (!out) return NULL;
  size_t o = 0;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < len; i++) {
    int v = b64v((unsigned char)s[i]);
    if (v < 0) {
      free(out);
      return NULL;
    }
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (unsigned char)(acc >> bits);
    }
  }
  *out_len = o;
  return out;
}

void srv_blobs_free(srv_blob *b, int n) {
  if (!b) return;
  for (int i = 0; i < n; i++) free(b[i].owned);
  free(b);
}

void srv_image_limits(jem_image_limits *l) {
  jem_image_limits_default(l);
  l->max_bytes = (size_t)srv_cfg.max_body_bytes;
  l->max_side = srv_cfg.max_image_side;
  l->max_pixels = (size_t)srv_cfg.max_image_pixels;
}

int srv_request_pixels_add(long long *total, const void *img, size_t len,
                           const jem_image_limits *lim, char *err, size_t errlen) {
  int w = 0, h = 0;
  char why[256];
  if (jem_image_dims(img, len, lim, &w, &h, why, sizeof why)) return 0;
  *total += (long long)w * h;
  if (srv_cfg.max_request_pixels <= 0 || *total <= srv_cfg.max_request_pixels) return 0;
  snprintf(err, errlen, "the images of this request hold more than %lld pixels in all; the "
           "limit is --max-request-pixels", srv_cfg.max_request_pixels);
  return -1;
}

int srv_classify_parse_json(const char *body, size_t len, int max_images, srv_blob **imgs,
                            int *n, const char **code, char *err, size_t errlen) {
  *imgs = NULL;
  *n = 0;
  int st = 0;
  json_t *j = srv_json_parse(body, len, &st, err, errlen);
  if (!j) {
    *code = st == 422 ? "out_of_range" : st == 413 ? "json_too_large" : "invalid_json";
    return st;
  }
  /* well-formed JSON with the wrong content is 422 invalid_request (openapi) */
  *code = "invalid_request";
  srv_blob *b = NULL;
  int cnt = 0;
  size_t na = 0;
  json_t *arr = NULL;
  if (!json_is_object(j)) {
    snprintf(err, errlen, "expected a JSON object {\"images\": [\"<base64>\", ...]}");
    st = 422;
    goto out;
  }
  const char *key;
  json_t *v;
  json_object_foreach(j, key, v) {
    (void)v;
    if (strcmp(key, "images") != 0) {
      snprintf(err, errlen, "unknown field '%.64s' (only \"images\" is accepted)", key);
      *code = "unknown_field"; /* as for the job API's body */
      st = 400;
      goto out;
    }
  }
  arr = json_object_get(j, "images");
  if (!json_is_array(arr)) {
    snprintf(err, errlen, "\"images\" must be an array of base64 strings");
    st = 422;
    goto out;
  }
  na = json_array_size(arr);
  if (na == 0) {
    snprintf(err, errlen, "\"images\" is empty");
    st = 422;
    goto out;
  }
  if (na > (size_t)max_images) {
    snprintf(err, errlen, "%zu images in one request; the limit is %d", na, max_images);
    *code = "too_many_images";
    st = 413;
    goto out;
  }
  b = calloc(na, sizeof *b);
  if (!b) {
    snprintf(err, errlen, "out of memory");
    *code = "out_of_memory";
    st = 503;
    goto out;
  }
  for (size_t i = 0; i < na; i++) {
    json_t *e = json_array_get(arr, i);
    if (!json_is_string(e)) {
      snprintf(err, errlen, "images[%zu] is not a string", i);
      st = 422;
      goto out;
    }
    size_t ol = 0;
    b[i].owned = srv_b64_decode(json_string_value(e), json_string_length(e), &ol);
    if (!b[i].owned) {
      snprintf(err, errlen, "images[%zu] is not valid base64", i);
      *code = "invalid_base64";
      st = 400;
      goto out;
    }
    b[i].p = b[i].owned;
    b[i].len = ol;
    cnt = (int)i + 1;
  }
out:
  json_decref(j);
  if (st) {
    srv_blobs_free(b, b ? (int)na : 0);
    return st;
  }
  *imgs = b;
  *n = cnt;
  *code = "ok";
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Open Inference Protocol v2: POST /v2/models/{name}/infer */

static const char *const v2_outputs[4] = {"logits", "probs", "energy", "grad_norm"};

/* The model's inputs lie in [-1, 1]; values far outside only overflow the
 * logits to +-inf and every output to null, so they are refused. */
#define V2_MAX_ABS 1e6

static int put_num(const json_t *e, float *dst, char *err, size_t errlen, size_t idx) {
  double v;
  if (json_is_integer(e))
    v = (double)json_integer_value(e);
  else if (json_is_real(e))
    v = json_real_value(e);
  else {
    snprintf(err, errlen, "data element %zu is not a number", idx);
    return 422;
  }
  if (!isfinite(v) || fabs(v) > V2_MAX_ABS) {
    snprintf(err, errlen, "data element %zu (%.9g) is outside [-1e6, 1e6]; the model's inputs "
             "lie in [-1, 1]", idx, v);
    return 422;
  }
  *dst = (float)v;
  return 0;
}

/* Nested arrays matching shape[dim..3] exactly. */
static int walk(const json_t *a, int dim, const int shape[4], float *out, size_t *pos,
                char *err, size_t errlen) {
  if (dim == 4) {
    int st = put_num(a, out + *pos, err, errlen, *pos);
    (*pos)++;
    return st;
  }
  if (!json_is_array(a) || json_array_size(a) != (size_t)shape[dim]) {
    snprintf(err, errlen, "nested \"data\" does not match the shape at dimension %d "
             "(expected an array of %d)", dim, shape[dim]);
    return 422;
  }
  for (size_t i = 0; i < json_array_size(a); i++) {
    int st = walk(json_array_get(a, i), dim + 1, shape, out, pos, err, errlen);
    if (st) return st;
  }
  return 0;
}

void srv_v2_req_free(srv_v2_req *q) {
  if (!q) return;
  free(q->x);
  q->x = NULL;
}

static int get_bool_param(const json_t *params, const char *name) {
  const json_t *v = json_is_object(params) ? json_object_get(params, name) : NULL;
  return json_is_true(v);
}

/* inputs[0]'s fields, name and datatype, and its shape into sh: [N, c, s, s]
 * with N <= max_n. */
static int v2_input_head(const json_t *in, int c, int s, int max_n, int sh[4], char *err,
                         size_t errlen) {
  if (!json_is_object(in)) {
    snprintf(err, errlen, "inputs[0] must be an object");
    return 400;
  }
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)in, key, v) {
    if (strcmp(key, "name") && strcmp(key, "shape") && strcmp(key, "datatype") &&
        strcmp(key, "data") && strcmp(key, "parameters")) {
      snprintf(err, errlen, "unknown field '%.64s' in inputs[0]", key);
      return 400;
    }
  }
  json_t *name = json_object_get(in, "name");
  if (!json_is_string(name) || strcmp(json_string_value(name), "input") != 0) {
    snprintf(err, errlen, "the model takes one input named \"input\"");
    return 400;
  }
  json_t *dt = json_object_get(in, "datatype");
  if (!json_is_string(dt) || strcmp(json_string_value(dt), "FP32") != 0) {
    snprintf(err, errlen, "\"datatype\" must be \"FP32\"");
    return 400;
  }
  json_t *shape = json_object_get(in, "shape");
  if (!json_is_array(shape) || json_array_size(shape) != 4) {
    snprintf(err, errlen, "\"shape\" must be [N, %d, %d, %d]", c, s, s);
    return 400;
  }
  for (int i = 0; i < 4; i++) {
    json_t *d = json_array_get(shape, (size_t)i);
    if (!json_is_integer(d) || json_integer_value(d) < 1 || json_integer_value(d) > 1 << 20) {
      snprintf(err, errlen, "\"shape\" must hold positive integers");
      return 400;
    }
    sh[i] = (int)json_integer_value(d);
  }
  if (sh[1] != c || sh[2] != s || sh[3] != s) {
    snprintf(err, errlen, "shape [%d, %d, %d, %d] does not match the model input [N, %d, %d, %d]",
             sh[0], sh[1], sh[2], sh[3], c, s, s);
    return 422;
  }
  if (sh[0] > max_n) {
    snprintf(err, errlen, "batch of %d exceeds the limit of %d", sh[0], max_n);
    return 413;
  }
  return 0;
}

/* out->x: room for the input's total floats. */
static int v2_alloc(srv_v2_req *out, size_t total, char *err, size_t errlen) {
  out->x = malloc(sizeof(float) * total);
  if (out->x) return 0;
  snprintf(err, errlen, "out of memory");
  return 503;
}

/* The binary tensor extension: the input as bin_len raw little-endian FP32
 * bytes after the JSON header, binary_data_size (bsz) of them. */
static int v2_binary_data(const json_t *bsz, const json_t *data, const unsigned char *bin,
                          size_t bin_len, const int sh[4], size_t total, srv_v2_req *out,
                          char *err, size_t errlen) {
  if (!bsz || !json_is_integer(bsz) || data) {
    snprintf(err, errlen, "binary input needs inputs[0].parameters.binary_data_size and no "
             "\"data\"; or send no bytes after the JSON header");
    return 400;
  }
  if ((json_int_t)(total * sizeof(float)) != json_integer_value(bsz) ||
      bin_len != total * sizeof(float)) {
    snprintf(err, errlen, "binary input holds %zu bytes (binary_data_size %lld); shape "
             "[%d, %d, %d, %d] in FP32 needs %zu", bin_len,
             (long long)json_integer_value(bsz), sh[0], sh[1], sh[2], sh[3],
             total * sizeof(float));
    return 422;
  }
  int st = v2_alloc(out, total, err, errlen);
  if (st) return st;
  for (size_t i = 0; i < total; i++) {
    const unsigned char *p = bin + 4 * i;
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                 (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, sizeof f);
    if (!isfinite(f) || fabsf(f) > V2_MAX_ABS) {
      snprintf(err, errlen, "binary input element %zu (%.9g) is not a finite FP32 value "
               "within [-1e6, 1e6]; the model's inputs lie in [-1, 1]", i, (double)f);
      return 422;
    }
    out->x[i] = f;
  }
  return 0;
}

/* "data": the input as JSON numbers, flat or nested to the shape. */
static int v2_json_data(const json_t *data, const int sh[4], size_t total, srv_v2_req *out,
                        char *err, size_t errlen) {
  if (!json_is_array(data)) {
    snprintf(err, errlen, "\"data\" must be an array of numbers (flat or nested)");
    return 400;
  }
  int st = v2_alloc(out, total, err, errlen);
  if (st) return st;
  size_t nd = json_array_size(data);
  /* flat when it has the shape's element count and no nested arrays; then
   * each element must be a number (put_num names the first that is not) */
  int flat = nd == total && nd > 0 && !json_is_array(json_array_get(data, 0));
  if (flat) {
    for (size_t i = 0; i < nd; i++)
      if ((st = put_num(json_array_get(data, i), out->x + i, err, errlen, i))) return st;
    return 0;
  }
  if (nd != (size_t)sh[0]) {
    snprintf(err, errlen, "\"data\" holds %zu values; shape [%d, %d, %d, %d] needs %zu "
             "(flat) or nested arrays", nd, sh[0], sh[1], sh[2], sh[3], total);
    return 422;
  }
  size_t pos = 0;
  return walk(data, 0, sh, out->x, &pos, err, errlen);
}

/* inputs[0]'s values into out->x, from the binary tail or from "data". */
static int v2_input_data(const json_t *in, const int sh[4], const unsigned char *bin,
                         size_t bin_len, srv_v2_req *out, char *err, size_t errlen) {
  const size_t total = (size_t)sh[0] * (size_t)sh[1] * (size_t)sh[2] * (size_t)sh[3];
  json_t *data = json_object_get(in, "data");
  json_t *ip = json_object_get(in, "parameters");
  json_t *bsz = json_is_object(ip) ? json_object_get(ip, "binary_data_size") : NULL;
  if (ip && !json_is_object(ip)) {
    snprintf(err, errlen, "inputs[0].parameters must be an object");
    return 400;
  }
  int st = bsz || bin_len ? v2_binary_data(bsz, data, bin, bin_len, sh, total, out, err, errlen)
                          : v2_json_data(data, sh, total, out, err, errlen);
  if (!st) out->n = sh[0];
  return st;
}

/* "outputs": which of logits, probs, energy, grad_norm to send, and which
 * as binary data (all of them, as binary with all_binary, when absent). */
static int v2_parse_outputs(const json_t *outs, int all_binary, srv_v2_req *out, char *err,
                            size_t errlen) {
  if (!outs) {
    for (int i = 0; i < 4; i++) out->want[i] = 1, out->binary[i] = all_binary;
    return 0;
  }
  if (!json_is_array(outs) || json_array_size(outs) == 0) {
    snprintf(err, errlen, "\"outputs\" must be a non-empty array of {\"name\": ...}");
    return 400;
  }
  for (size_t i = 0; i < json_array_size(outs); i++) {
    json_t *o = json_array_get(outs, i);
    json_t *on = json_is_object(o) ? json_object_get(o, "name") : NULL;
    int found = -1;
    for (int k = 0; on && json_is_string(on) && k < 4; k++)
      if (!strcmp(json_string_value(on), v2_outputs[k])) found = k;
    if (found < 0) {
      snprintf(err, errlen, "outputs[%zu] must name one of logits, probs, energy, grad_norm", i);
      return 400;
    }
    out->want[found] = 1;
    json_t *op = json_object_get(o, "parameters");
    out->binary[found] = all_binary || get_bool_param(op, "binary_data");
  }
  return 0;
}

int srv_v2_parse_infer(const char *body, size_t len, size_t json_len, int c, int s, int max_n,
                       srv_v2_req *out, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  if (json_len > len) {
    snprintf(err, errlen, "Inference-Header-Content-Length %zu exceeds the body (%zu bytes)",
             json_len, len);
    return 400;
  }
  /* binary tensor extension: JSON header, then raw little-endian tensors */
  const unsigned char *bin = (const unsigned char *)body + json_len;
  size_t bin_len = len - json_len;
  int st = 0;
  json_t *j = srv_json_parse(body, json_len, &st, err, errlen);
  if (!j) return st;
  if (!json_is_object(j)) {
    snprintf(err, errlen, "expected a JSON object with \"inputs\"");
    st = 400;
    goto out;
  }
  const char *key;
  json_t *v;
  json_object_foreach(j, key, v) {
    if (strcmp(key, "id") && strcmp(key, "parameters") && strcmp(key, "inputs") &&
        strcmp(key, "outputs")) {
      snprintf(err, errlen, "unknown field '%.64s'", key);
      st = 400;
      goto out;
    }
  }
  json_t *id = json_object_get(j, "id");
  if (id) {
    if (!json_is_string(id) || json_string_length(id) >= sizeof out->id ||
        strlen(json_string_value(id)) != json_string_length(id)) {
      snprintf(err, errlen, "\"id\" must be a string of at most %zu bytes",
               sizeof out->id - 1);
      st = 400;
      goto out;
    }
    snprintf(out->id, sizeof out->id, "%s", json_string_value(id));
    out->has_id = 1;
  }
  json_t *params = json_object_get(j, "parameters");
  int all_binary = get_bool_param(params, "binary_data_output");
  if (params && !json_is_object(params)) {
    snprintf(err, errlen, "\"parameters\" must be an object");
    st = 400;
    goto out;
  }
  json_t *inputs = json_object_get(j, "inputs");
  if (!json_is_array(inputs) || json_array_size(inputs) != 1) {
    snprintf(err, errlen, "\"inputs\" must be an array with exactly one tensor named \"input\"");
    st = 400;
    goto out;
  }
  const json_t *in = json_array_get(inputs, 0);
  int sh[4];
  if (!(st = v2_input_head(in, c, s, max_n, sh, err, errlen)) &&
      !(st = v2_input_data(in, sh, bin, bin_len, out, err, errlen)))
    st = v2_parse_outputs(json_object_get(j, "outputs"), all_binary, out, err, errlen);
out:
  json_decref(j);
  if (st) srv_v2_req_free(out);
  return st;
}

/* ------------------------------------------------------------------------ */
/* Routes */

/* Matches path against pattern segment by segment; {x} takes one non-empty
 * segment, {x}.ext a segment ending in ".ext" (x = the part before it, non-empty).
 * Fills r->params when r is given. */
static int match(const char *pattern, const char *path, srv_req *r) {
  const char *p = pattern, *u = path;
  int np = 0;
  while (*p && *u) {
    if (*p != '/' || *u != '/') return 0;
    p++;
    u++;
    const char *pe = strchr(p, '/'), *ue = strchr(u, '/');
    size_t pl = pe ? (size_t)(pe - p) : strlen(p), ul = ue ? (size_t)(ue - u) : strlen(u);
    const char *close = pl >= 2 && p[0] == '{' ? memchr(p, '}', pl) : NULL;
    if (close) {
      size_t sl = pl - (size_t)(close + 1 - p); /* literal suffix, e.g. ".png" */
      if (ul <= sl || memcmp(u + ul - sl, close + 1, sl) != 0) return 0;
      if (ul - sl >= SRV_PARAM_MAX || np >= SRV_MAX_PARAMS) return 0;
      if (r) {
        memcpy(r->params[np], u, ul - sl);
        r->params[np][ul - sl] = '\0';
      }
      np++;
    } else if (pl != ul || memcmp(p, u, pl) != 0) {
      return 0;
    }
    p += pl;
    u += ul;
  }
  if (*p || *u) return 0;
  if (r) r->n_params = np;
  return 1;
}

int srv_route_match(const srv_route *table, int n_table, const char *method, const char *path,
                    srv_req *r, char *allow, size_t allow_cap) {
  int any = 0;
  const char *m = !strcmp(method, "HEAD") ? "GET" : method;
  allow[0] = '\0';
  size_t used = 0;
  for (int i = 0; i < n_table; i++) {
    if (!match(table[i].pattern, path, NULL)) continue;
    if (!strcmp(table[i].method, m)) {
      match(table[i].pattern, path, r);
      return i;
    }
    any = 1;
    const char *meth = table[i].method;
    int n = snprintf(allow + used, allow_cap - used, "%s%s%s", used ? ", " : "", meth,
                     !strcmp(meth, "GET") ? ", HEAD" : "");
    if (n > 0 && (size_t)n < allow_cap - used) used += (size_t)n;
  }
  return any ? -2 : -1;
}
