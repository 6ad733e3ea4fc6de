/* fuzz_request_json.c - libFuzzer harness for jemd's request JSON parsing:
 * the depth pre-check, POST /v1/classify's {"images": [...]} body (with
 * base64) and the Open Inference Protocol infer body. */
#include "../server/srv.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  json_object_seed(1);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* no NUL terminator on purpose: the parsers must honour the length */
  char *buf = malloc(size ? size : 1);
  if (!buf) return 0;
  memcpy(buf, data, size);
  char err[512];

  srv_json_depth_ok(buf, size, SRV_JSON_MAX_DEPTH);

  srv_blob *imgs = NULL;
  int n = 0;
  const char *code = NULL;
  if (srv_classify_parse_json(buf, size, 16, &imgs, &n, &code, err, sizeof err) == 0) {
    for (int i = 0; i < n; i++)
      if (imgs[i].len && !imgs[i].p) abort();
    srv_blobs_free(imgs, n);
  } else if (!err[0] || !memchr(err, '\0', sizeof err) || !code) {
    abort(); /* every refusal says why */
  }

  srv_v2_req q;
  /* the last byte, when present, moves the JSON/binary split (binary
   * tensor extension); size itself is the plain-JSON case */
  size_t json_len = size;
  if (size > 1 && (data[size - 1] & 1)) json_len = size - 1 - (size_t)(data[size - 1] >> 1) % size;
  int st = srv_v2_parse_infer(buf, size, json_len, 1, 4, 8, &q, err, sizeof err);
  if (st == 0) {
    if (q.n < 1 || q.n > 8 || !q.x) abort();
    float acc = 0;
    for (int i = 0; i < q.n * 16; i++) acc += q.x[i]; /* every value was written */
    if (acc != acc) abort(); /* only finite values are accepted */
    srv_v2_req_free(&q);
  } else if (st != 400 && st != 413 && st != 422 && st != 503) {
    abort();
  }

  size_t ol = 0;
  unsigned char *b = srv_b64_decode(buf, size, &ol);
  if (b && ol > size) abort();
  free(b);
  free(buf);
  return 0;
}
