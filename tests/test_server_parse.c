/* test_server_parse.c - jemd's request parsing without sockets: route
 * matching (404/405 + Allow), JSON depth cap, base64, the classify JSON
 * body, multipart/form-data and the Open Inference Protocol infer body;
 * the model labels of /metrics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../server/srv.h"

static void test_routes(void **state) {
  (void)state;
  srv_req r;
  char allow[128];
  memset(&r, 0, sizeof r);
  int i = srv_route_match(srv_routes, srv_n_routes, "POST", "/v2/models/fmnist/infer", &r, allow, sizeof allow);
  assert_true(i >= 0);
  assert_string_equal(srv_routes[i].pattern, "/v2/models/{name}/infer");
  assert_int_equal(r.n_params, 1);
  assert_string_equal(r.params[0], "fmnist");
  assert_true(srv_route_match(srv_routes, srv_n_routes, "HEAD", "/healthz", &r, allow, sizeof allow) >= 0);
  assert_int_equal(srv_route_match(srv_routes, srv_n_routes, "GET", "/v1/classify", &r, allow, sizeof allow), -2);
  assert_string_equal(allow, "POST");
  assert_int_equal(srv_route_match(srv_routes, srv_n_routes, "GET", "/v1/classify/x", &r, allow, sizeof allow), -1);
  assert_int_equal(srv_route_match(srv_routes, srv_n_routes, "GET", "/v2/models//ready", &r, allow, sizeof allow), -1);
  assert_int_equal(srv_route_match(srv_routes, srv_n_routes, "GET", "/healthz/", &r, allow, sizeof allow), -1);
}

static void test_json_depth(void **state) {
  (void)state;
  char buf[200];
  memset(buf, '[', 64);
  memset(buf + 64, ']', 64);
  assert_int_equal(srv_json_depth_ok(buf, 128, 64), 0);
  memset(buf, '[', 65);
  assert_int_equal(srv_json_depth_ok(buf, 65, 64), -1);
  const char *s = "{\"a\": \"[[[[[[\\\"[[[[\"}";
  assert_int_equal(srv_json_depth_ok(s, strlen(s), 2), 0);
  char err[256];
  int st = 0;
  assert_null(srv_json_parse("{\"a\":1,\"a\":2}", 13, &st, err, sizeof err));
  assert_int_equal(st, 400);
  assert_null(srv_json_parse("", 0, &st, err, sizeof err));
  assert_int_equal(st, 400);
  /* valid JSON whose integer does not fit: a range error, not a syntax one */
  const char *big = "{\"seed\": 18446744073709551615}";
  assert_null(srv_json_parse(big, strlen(big), &st, err, sizeof err));
  assert_int_equal(st, 422);
  json_t *j = srv_json_parse("{\"a\":1} trailing", 7, &st, err, sizeof err);
  assert_non_null(j); /* only the given length is read */
  json_decref(j);
}

/* The pre-parse weight: each ',' 1, each container SRV_JSON_CONTAINER_WEIGHT,
 * nothing inside strings; and srv_json_parse's 413 past the limit. */
static void test_json_elements(void **state) {
  (void)state;
  const char *s = "[{},{},\"a,b,[{\"]"; /* 1 + 3 containers x 8 + 2 commas */
  long long w = 1 + 3 * SRV_JSON_CONTAINER_WEIGHT + 2;
  assert_int_equal(srv_json_scan(s, strlen(s), 64, w), 0);
  assert_int_equal(srv_json_scan(s, strlen(s), 64, w - 1), -2);
  assert_int_equal(srv_json_scan(s, strlen(s), 1, w), -1);
  size_t n = 300000; /* 300,000 "{}" weigh about 2.7 million */
  char *bomb = malloc(3 * n + 2);
  assert_non_null(bomb);
  bomb[0] = '[';
  for (size_t i = 0; i < n; i++) memcpy(bomb + 1 + 3 * i, i + 1 < n ? "{}," : "{}]", 3);
  char err[256];
  int st = 0;
  assert_null(srv_json_parse(bomb, 3 * n + 1, &st, err, sizeof err));
  assert_int_equal(st, 413);
  assert_non_null(strstr(err, "--max-json-elements"));
  free(bomb);
}

static void test_b64(void **state) {
  (void)state;
  size_t n = 0;
  unsigned char *b = srv_b64_decode("aGVsbG8=", 8, &n);
  assert_non_null(b);
  assert_int_equal(n, 5);
  assert_memory_equal(b, "hello", 5);
  free(b);
  b = srv_b64_decode("data:image/png;base64,aGk", 25, &n);
  assert_non_null(b);
  assert_int_equal(n, 2);
  free(b);
  assert_null(srv_b64_decode("a$==", 4, &n));
  assert_null(srv_b64_decode("a", 1, &n));
  assert_null(srv_b64_decode("data:,aGk", 9, &n));
}

static void test_classify_json(void **state) {
  (void)state;
  char err[256];
  srv_blob *b = NULL;
  int n = 0;
  const char *ok = "{\"images\": [\"aGVsbG8=\", \"aGk=\"]}", *code = NULL;
  assert_int_equal(srv_classify_parse_json(ok, strlen(ok), 8, &b, &n, &code, err, sizeof err), 0);
  assert_int_equal(n, 2);
  assert_int_equal(b[1].len, 2);
  srv_blobs_free(b, n);
  assert_int_equal(srv_classify_parse_json(ok, strlen(ok), 1, &b, &n, &code, err, sizeof err), 413);
  const char *bad[][2] = {{"{\"images\": [1]}", "422"},     {"{\"images\": []}", "422"},
                          {"{\"images\": \"x\"}", "422"},   {"{\"x\": []}", "400"},
                          {"[1]", "422"},                   {"{\"images\": [\"@\"]}", "400"},
                          {"{\"images\": [", "400"},          {"{}", "422"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int st = srv_classify_parse_json(bad[i][0], strlen(bad[i][0]), 8, &b, &n, &code, err,
                                     sizeof err);
    assert_int_equal(st, atoi(bad[i][1]));
    assert_true(code && strcmp(code, "ok") != 0);
    assert_true(strlen(err) > 0);
  }
}

static void test_multipart(void **state) {
  (void)state;
  char bnd[80], err[256];
  assert_int_equal(srv_multipart_boundary("multipart/form-data; boundary=abc", bnd, sizeof bnd,
                                          err, sizeof err), 0);
  assert_string_equal(bnd, "abc");
  assert_int_equal(srv_multipart_boundary("multipart/form-data; charset=x; boundary=\"a b\"",
                                          bnd, sizeof bnd, err, sizeof err), 0);
  assert_string_equal(bnd, "a b");
  assert_int_equal(srv_multipart_boundary("multipart/form-data", bnd, sizeof bnd, err,
                                          sizeof err), 400);
  assert_int_equal(srv_multipart_boundary("multipart/form-data; boundary=a\x01", bnd, sizeof bnd,
                                          err, sizeof err), 400);
  assert_int_equal(srv_multipart_boundary("text/plain", bnd, sizeof bnd, err, sizeof err), 415);
  const char body[] = "--abc\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nONE\r\n"
                      "--abc\r\nContent-Type: image/png\r\n\r\nTWO2\r\n--abc--\r\n";
  srv_blob *p = NULL;
  int n = 0;
  assert_int_equal(srv_multipart_parse(body, sizeof body - 1, "abc", 8, &p, &n, err, sizeof err),
                   0);
  assert_int_equal(n, 2);
  assert_int_equal(p[0].len, 3);
  assert_memory_equal(p[0].p, "ONE", 3);
  assert_int_equal(p[1].len, 4);
  free(p);
  assert_int_equal(srv_multipart_parse(body, sizeof body - 1, "abc", 1, &p, &n, err, sizeof err),
                   413);
  assert_int_equal(srv_multipart_parse(body, 40, "abc", 8, &p, &n, err, sizeof err), 400);
  assert_int_equal(srv_multipart_parse("--abc--", 7, "abc", 8, &p, &n, err, sizeof err), 422);
}

static void test_v2(void **state) {
  (void)state;
  char err[256];
  srv_v2_req q;
  const char *ok = "{\"id\": \"r1\", \"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], "
                   "\"datatype\": \"FP32\", \"data\": [1, 2.5, -3, 4]}], "
                   "\"outputs\": [{\"name\": \"energy\"}]}";
  assert_int_equal(srv_v2_parse_infer(ok, strlen(ok), strlen(ok), 1, 2, 4, &q, err, sizeof err),
                   0);
  assert_int_equal(q.n, 1);
  assert_string_equal(q.id, "r1");
  assert_true(q.x[1] == 2.5f && q.x[2] == -3.0f);
  assert_true(q.want[2] && !q.want[0] && !q.want[3]);
  srv_v2_req_free(&q);
  const char *nested = "{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": "
                       "\"FP32\", \"data\": [[[[1,2],[3,4]]]]}]}";
  assert_int_equal(srv_v2_parse_infer(nested, strlen(nested), strlen(nested), 1, 2, 4, &q, err,
                                      sizeof err), 0);
  assert_true(q.x[3] == 4.0f && q.want[0] && q.want[3]);
  srv_v2_req_free(&q);
  /* binary tensor extension */
  char bin[512];
  const char *hdr = "{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": "
                    "\"FP32\", \"parameters\": {\"binary_data_size\": 16}}]}";
  size_t hl = strlen(hdr);
  memcpy(bin, hdr, hl);
  float v[4] = {0.5f, 1, 2, 3};
  memcpy(bin + hl, v, sizeof v);
  assert_int_equal(srv_v2_parse_infer(bin, hl + 16, hl, 1, 2, 4, &q, err, sizeof err), 0);
  assert_true(q.x[0] == 0.5f && q.x[3] == 3.0f);
  srv_v2_req_free(&q);
  assert_int_equal(srv_v2_parse_infer(bin, hl + 12, hl, 1, 2, 4, &q, err, sizeof err), 422);
  const char *bad[][2] = {
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1,3,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1]}]}", "422"},
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [9,1,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1]}]}", "413"},
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": \"FP64\", "
       "\"data\": [1,2,3,4]}]}", "400"},
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1,2,3,1e39]}]}", "422"},
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1,2,3]}]}", "422"},
      {"{\"inputs\": [{\"name\": \"x\", \"shape\": [1,1,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1,2,3,4]}]}", "400"},
      {"{\"inputs\": [], \"extra\": 1}", "400"},
      {"{\"inputs\": [{\"name\": \"input\", \"shape\": [1,1,2,2], \"datatype\": \"FP32\", "
       "\"data\": [1,2,3,4]}], \"outputs\": [{\"name\": \"zz\"}]}", "400"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t l = strlen(bad[i][0]);
    assert_int_equal(srv_v2_parse_infer(bad[i][0], l, l, 1, 2, 4, &q, err, sizeof err),
                     atoi(bad[i][1]));
    assert_null(q.x);
  }
}

/* Model labels of /metrics: stable indexes, none for no model, and past
 * the table's room one shared "(other)" instead of new series. */
static void test_model_labels(void **state) {
  (void)state;
  assert_int_equal(srv_metrics_model(NULL), 0);
  assert_int_equal(srv_metrics_model(""), 0);
  int a = srv_metrics_model("alpha"), b = srv_metrics_model("beta");
  assert_true(a > 0 && b > a);
  assert_int_equal(srv_metrics_model("alpha"), a);
  assert_string_equal(srv_metrics_model_name(b), "beta");
  char l[64];
  srv_mlabel_model(l, sizeof l, ",", a);
  assert_string_equal(l, ",model=\"alpha\"");
  srv_mlabel_model(l, sizeof l, ",", 0);
  assert_string_equal(l, "");
  char name[32];
  int last = 0;
  for (int i = 0; i < 2 * SRV_METRIC_MODELS; i++) {
    snprintf(name, sizeof name, "m%d", i);
    last = srv_metrics_model(name);
    assert_true(last > 0 && last < SRV_METRIC_MODELS);
  }
  assert_int_equal(last, SRV_METRIC_MODELS - 1);
  assert_string_equal(srv_metrics_model_name(last), "(other)");
  assert_int_equal(srv_metrics_models(), SRV_METRIC_MODELS);
  assert_int_equal(srv_metrics_model("alpha"), a);
}

int main(void) {
  json_object_seed(1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_routes),     cmocka_unit_test(test_json_depth),
      cmocka_unit_test(test_json_elements),
      cmocka_unit_test(test_b64),        cmocka_unit_test(test_classify_json),
      cmocka_unit_test(test_multipart),  cmocka_unit_test(test_v2),
      cmocka_unit_test(test_model_labels),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
