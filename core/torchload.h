/* torchload.h - reads the tensors out of a PyTorch torch.save file, never
 * executing anything in it (core/torchload.c, core/torch_pickle.c).
 *
 * Both formats torch.save writes are read from memory:
 * - zip (PyTorch >= 1.6): `<dir>/data.pkl` plus one `<dir>/data/<key>` entry
 *   per storage; stored or deflated entries, zip64 and data descriptors;
 * - legacy (_use_new_zipfile_serialization=False): the magic number,
 *   protocol and system-info pickles, the object pickle, the list of storage
 *   keys and the raw storages.
 * The object pickle goes through a restricted unpickler: the opcodes of
 * protocols 2 to 5 that plain data needs, and only these globals:
 * collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 * torch._utils._rebuild_parameter and the torch.<Type>Storage classes of
 * float32/64, float16, bfloat16, int64/32/16/8, uint8 and bool.  Anything
 * else is refused by name.  Every count, size, offset and stride is bounded
 * before use, so a hostile file gets an error, never a crash.
 *
 * The result lists every tensor reachable from the root object (through
 * dicts, lists and tuples), widened to float32 and made contiguous (views
 * and strided tensors are gathered from their storage).  Its name is the
 * path of keys from the root joined by '/', e.g.
 * "model_state_dict/f.conv1.weight" or "replay_buffer"; list and tuple
 * elements are named by their index. */
#ifndef JEM_TORCHLOAD_H
#define JEM_TORCHLOAD_H

#include <stddef.h>
#include <stdint.h>

#define JEM_TL_MAX_DIM 8

typedef struct jem_tl_tensor {
  char *name;                     /* path from the root, '/'-separated */
  const char *dtype;              /* as stored: "float32", "int64", ... */
  int ndim;
  int64_t shape[JEM_TL_MAX_DIM];
  size_t numel;
  float *data;                    /* numel floats, C order */
} jem_tl_tensor;

typedef struct jem_tl_file {
  const char *format;             /* "zip" or "legacy" */
  int n;
  jem_tl_tensor *t;
} jem_tl_file;

/* Parses buf (the whole file).  0, or JEM_EFORMAT / JEM_EUNSUPPORTED /
 * JEM_ETOOBIG / JEM_ENOMEM with a sentence in err; *out is NULL on error. */
int jem_torch_load_mem(jem_tl_file **out, const void *buf, size_t len, char *err,
                       size_t errlen);
void jem_torch_free(jem_tl_file *f); /* NULL ok */
/* The tensor called name, or NULL. */
const jem_tl_tensor *jem_torch_find(const jem_tl_file *f, const char *name);

#endif
