/* fuzz_samples_json.c - libFuzzer harness for the POST /v1/samples body parser
 * (srv_samples_parse, then srv_samples_decode, in server/job_parse.c) against a
 * tiny random model, with and without a replay buffer; checks the documented
 * results and invariants. */
#include "../server/jobs.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static jem_model *plain, *buffered;

static jem_model *make_model(int replay_n) {
  jem_arch a = {.depth = 10, .widen = 1, .in_channels = 1, .image_size = 32,
                .num_classes = 10, .leak = 0.2f};
  char err[256];
  jem_model *m = NULL;
  if (jem_model_create(&m, &a, err, sizeof err)) abort();
  jem_model_init_random(m, 1);
  if (replay_n) {
    m->replay = calloc((size_t)replay_n * 32 * 32, sizeof(float));
    if (!m->replay) abort();
    m->replay_n = replay_n;
  }
  return m;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  json_object_seed(1);
  plain = make_model(0);
  buffered = make_model(4);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* no NUL terminator on purpose: the parser must honour the length */
  char *buf = malloc(size ? size : 1);
  if (!buf) return 0;
  memcpy(buf, data, size);
  const jem_model *m = (size & 1) ? buffered : plain;
  jem_image_limits lim;
  jem_image_limits_default(&lim);
  lim.max_pixels = 1 << 16; /* keep decodes cheap */
  lim.max_side = 1024;
  srv_samples_req q;
  const char *code = NULL;
  char err[512];
  int st = srv_samples_parse(buf, size, m, 64, 2000, &lim, &q, &code, err, sizeof err);
  if (st == 0 && (q.init == JEM_SAMPLE_INIT_GIVEN) != (q.dec.imgs != NULL)) __builtin_trap();
  if (st == 0) st = srv_samples_decode(&q, m, &lim, INT_MAX, &code, err, sizeof err);
  if (st == 0) {
    if (q.n < 1 || q.n > 64 || q.steps < 1 || q.steps > 2000) __builtin_trap();
    if (q.y < -1 || q.y >= m->arch.num_classes) __builtin_trap();
    if (!(q.step_size >= 0 && q.step_size <= 1e6 && q.noise >= 0 && q.noise <= 1e3))
      __builtin_trap();
    if ((q.init == JEM_SAMPLE_INIT_GIVEN) != (q.x != NULL)) __builtin_trap();
    if (q.init == JEM_SAMPLE_INIT_BUFFER && !m->replay) __builtin_trap();
    if (q.x)
      for (int i = 0; i < q.n * 32 * 32; i++)
        if (!(q.x[i] >= -1.0f && q.x[i] <= 1.0f)) __builtin_trap();
    srv_samples_req_free(&q);
  } else {
    if (st != 400 && st != 413 && st != 415 && st != 422 && st != 503) __builtin_trap();
    if (!code || !err[0] || q.x || q.dec.imgs) __builtin_trap();
  }
  free(buf);
  return 0;
}
