/* cmd_import.c - `jem import CKPT --out MODEL`: a checkpoint of the official
 * PyTorch JEM code (a torch.save file) becomes a jem model file. */
#include "args.h"
#include "cli.h"
#include "jem.h"
#include "torchload.h"

#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CKPT_BYTES ((size_t)8 << 30)

static void import_help(FILE *f) {
  fprintf(f,
    "usage: jem import CKPT --out MODEL [--norm none|batch|instance|layer|act]\n"
    "                  [--classes a,b,...] [--name NAME] [--buffer-size N] [--seed S]\n"
    "\n"
    "Reads CKPT, a torch.save file of the official JEM code (github wgrathwohl/JEM,\n"
    "train_wrn_ebm.py) or a fork, and writes MODEL, a model file every jem command\n"
    "and jemd load.  Both torch.save formats are read (zip, PyTorch >= 1.6, and the\n"
    "legacy one); nothing in the file is executed: any pickled object other than\n"
    "dicts, lists, numbers, strings and tensors is refused by name.\n"
    "\n"
    "CKPT holds {\"model_state_dict\": ..., \"replay_buffer\": ...} (the official\n"
    "checkpoint), a state_dict under \"state_dict\" or \"model\", or a bare state_dict;\n"
    "DataParallel's \"module.\" prefixes are stripped.  The tensors the CCF head never\n"
    "uses (f.linear.*, energy_output.*) are dropped with a note.  The architecture\n"
    "(depth, widen, input channels, classes) is read from the tensor shapes, and so\n"
    "is the normalisation where the tensors tell it: running statistics mean batch,\n"
    "loc/scale mean act, none means none.  InstanceNorm and GroupNorm(1) (\"layer\")\n"
    "leave identical tensors: give --norm then.  Norms run as in PyTorch's eval mode\n"
    "(BatchNorm on its running statistics).  The model's input is the official\n"
    "CIFAR transform, (x - 0.5) / 0.5 on pixel values in [0, 1].\n"
    "\n"
    "  --out MODEL        the model file to write (safetensors)\n"
    "  --norm N           none, batch, instance, layer or act (default: from the tensors)\n"
    "  --classes L        comma-separated class names (default \"0\", \"1\", ...)\n"
    "  --name NAME        model name (default: MODEL's file name without extension)\n"
    "  --buffer-size N    keep N replay-buffer images, drawn at random (default: all;\n"
    "                     0 drops the buffer)\n"
    "  --seed S           seed of that draw (default 0)\n"
    "  -h, --help         this text\n"
    "\n"
    "Exit status: 0 written, 1 a checkpoint it cannot or will not read, 2 usage error.\n");
}

/* ------------------------------------------------------------------------ */
/* The state_dict inside the file                                           */

typedef struct sd_entry {
  const char *name;               /* after the prefixes */
  const jem_tl_tensor *t;
  int used;
} sd_entry;

/* Collects the state_dict: the tensors under the first of model_state_dict/,
 * state_dict/, model/ that has any, else the top-level tensors (a bare
 * state_dict), minus a DataParallel "module." prefix on every name. */
static int find_state_dict(const jem_tl_file *f, sd_entry **out, int *n) {
  static const char *const prefixes[] = {"model_state_dict/", "state_dict/", "model/", ""};
  for (size_t p = 0; p < sizeof prefixes / sizeof prefixes[0]; p++) {
    size_t pl = strlen(prefixes[p]);
    sd_entry *e = calloc((size_t)f->n + 1, sizeof *e);
    if (!e) return -1;
    int k = 0, all_module = 1;
    for (int i = 0; i < f->n; i++) {
      const char *nm = f->t[i].name;
      if (strncmp(nm, prefixes[p], pl) || strchr(nm + pl, '/')) continue;
      if (!pl && !strcmp(nm, "replay_buffer")) continue;
      e[k].name = nm + pl;
      e[k].t = &f->t[i];
      all_module &= !strncmp(e[k].name, "module.", 7);
      k++;
    }
    if (k) {
      for (int i = 0; all_module && i < k; i++) e[i].name += 7;
      *out = e;
      *n = k;
      return 0;
    }
    free(e);
  }
  *out = NULL;
  *n = 0;
  return 0;
}

static sd_entry *sd_get(sd_entry *e, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (!strcmp(e[i].name, name)) return &e[i];
  return NULL;
}

static void shape_str(const jem_tl_tensor *t, char *buf, size_t cap) {
  size_t o = (size_t)snprintf(buf, cap, "[");
  for (int d = 0; d < t->ndim && o < cap; d++)
    o += (size_t)snprintf(buf + o, cap - o, "%s%lld", d ? "," : "", (long long)t->shape[d]);
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* Is name a tensor of a normalisation layer (f.bn1.*, f.layerL.i.bn1/2.*)? */
static int is_norm_key(const char *name) {
  if (!strncmp(name, "f.bn1.", 6)) return 1;
  int L, i, b, len = 0;
  return sscanf(name, "f.layer%d.%d.bn%d.%n", &L, &i, &b, &len) == 3 && len > 0;
}

static int has_suffix(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && !strcmp(s + a - b, suf);
}

/* The norm the tensors show: "batch", "act", "affine" (instance or layer),
 * or "none". */
static const char *norm_from_tensors(const sd_entry *e, int n) {
  int stats = 0, act = 0, affine = 0;
  for (int i = 0; i < n; i++) {
    if (!is_norm_key(e[i].name)) continue;
    stats |= has_suffix(e[i].name, ".running_mean") || has_suffix(e[i].name, ".running_var");
    act |= has_suffix(e[i].name, ".loc") || has_suffix(e[i].name, ".scale");
    affine |= has_suffix(e[i].name, ".weight") || has_suffix(e[i].name, ".bias");
  }
  return stats ? "batch" : act ? "act" : affine ? "affine" : "none";
}

/* depth, widen, in_channels, classes from the shapes; 0 or 1 with a message. */
static int infer_arch(sd_entry *e, int n, jem_arch *a, const char *ckpt) {
  memset(a, 0, sizeof *a);
  a->image_size = 32;
  a->leak = 0.2f;
  sd_entry *c1 = sd_get(e, n, "f.conv1.weight"), *co = sd_get(e, n, "class_output.weight");
  if (!c1 || !co) {
    fprintf(stderr, "jem import: %s: no %s tensor; this is not a state_dict of the JEM CCF "
            "model (Wide_ResNet + class_output)\n", ckpt, c1 ? "class_output.weight" : "f.conv1.weight");
    return 1;
  }
  char s1[96], s2[96];
  shape_str(c1->t, s1, sizeof s1);
  shape_str(co->t, s2, sizeof s2);
  if (c1->t->ndim != 4 || c1->t->shape[0] != 16 || c1->t->shape[2] != 3 || c1->t->shape[3] != 3 ||
      co->t->ndim != 2 || co->t->shape[1] % 64 || co->t->shape[1] < 64 ||
      co->t->shape[0] < 1 || co->t->shape[0] > 100000 || co->t->shape[1] > 64 * 64) {
    fprintf(stderr, "jem import: %s: f.conv1.weight %s and class_output.weight %s are not the "
            "shapes of a JEM Wide_ResNet ([16,C,3,3] and [K,64*widen])\n", ckpt, s1, s2);
    return 1;
  }
  a->in_channels = (int)c1->t->shape[1];
  a->num_classes = (int)co->t->shape[0];
  a->widen = (int)(co->t->shape[1] / 64);
  int blocks = 0;
  char name[96];
  for (;; blocks++) {
    snprintf(name, sizeof name, "f.layer1.%d.conv1.weight", blocks);
    if (!sd_get(e, n, name) || blocks > 1000) break;
  }
  a->depth = 6 * blocks + 4;
  char err[256];
  if (jem_arch_validate(a, err, sizeof err)) {
    fprintf(stderr, "jem import: %s: the tensors describe WRN-%d-%d with %d input channels and "
            "%d classes, which jem cannot run: %s\n", ckpt, a->depth, a->widen, a->in_channels,
            a->num_classes, err);
    return 1;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Building the model                                                       */

/* Copies every parameter of the architecture's table from the state_dict,
 * checking shapes and values; marks the entries used. */
static int copy_params(jem_model *m, sd_entry *e, int n, const char *ckpt) {
  for (int p = 0; p < m->n_params; p++) {
    const jem_param *pp = &m->params[p];
    sd_entry *s = sd_get(e, n, pp->name);
    if (!s) {
      fprintf(stderr, "jem import: %s: tensor %s is missing (WRN-%d-%d)\n", ckpt, pp->name,
              m->arch.depth, m->arch.widen);
      return 1;
    }
    int same = s->t->numel == pp->numel;
    for (int d = 0; same && d < pp->ndim; d++)
      same = s->t->ndim == pp->ndim && s->t->shape[d] == pp->shape[d];
    if (!same) {
      char sh[96];
      shape_str(s->t, sh, sizeof sh);
      fprintf(stderr, "jem import: %s: tensor %s has shape %s, which does not fit WRN-%d-%d "
              "(%zu elements expected)\n", ckpt, pp->name, sh, m->arch.depth, m->arch.widen,
              pp->numel);
      return 1;
    }
    for (size_t i = 0; i < pp->numel; i++)
      if (!isfinite(s->t->data[i])) {
        fprintf(stderr, "jem import: %s: tensor %s holds a NaN or infinite value\n", ckpt, pp->name);
        return 1;
      }
    memcpy(m->weights + pp->offset, s->t->data, pp->numel * sizeof(float));
    s->used = 1;
  }
  return 0;
}

/* The replay buffer, all of it or `keep` images drawn without replacement. */
static int take_buffer(jem_model *m, const jem_tl_tensor *b, long keep, uint64_t seed,
                       const char *ckpt) {
  const int c = m->arch.in_channels, s = m->arch.image_size;
  char sh[96];
  shape_str(b, sh, sizeof sh);
  if (b->ndim != 4 || b->shape[1] != c || b->shape[2] != s || b->shape[3] != s ||
      b->shape[0] < 1 || b->shape[0] > (1 << 24)) {
    fprintf(stderr, "jem import: %s: replay_buffer has shape %s, not [N,%d,%d,%d]\n", ckpt, sh, c,
            s, s);
    return 1;
  }
  int total = (int)b->shape[0];
  int n = keep < 0 || keep > total ? total : (int)keep;
  if (n == 0) return 0;
  size_t chw = (size_t)c * s * s;
  int *idx = malloc(sizeof *idx * (size_t)total);
  float *buf = malloc(sizeof *buf * chw * (size_t)n);
  if (!idx || !buf) {
    free(idx);
    free(buf);
    fprintf(stderr, "jem import: out of memory for the replay buffer\n");
    return 1;
  }
  jem_rng r;
  jem_rng_seed(&r, seed, 0);
  for (int i = 0; i < total; i++) idx[i] = i;
  for (int i = 0; n < total && i < n; i++) { /* partial Fisher-Yates */
    int j = i + (int)(jem_rng_u32(&r) % (uint32_t)(total - i)), t = idx[i];
    idx[i] = idx[j];
    idx[j] = t;
  }
  for (int i = 0; i < n; i++) {
    const float *src = b->data + (size_t)idx[i] * chw;
    for (size_t k = 0; k < chw; k++)
      if (!isfinite(src[k])) {
        fprintf(stderr, "jem import: %s: replay_buffer image %d holds a NaN or infinite value\n",
                ckpt, idx[i]);
        free(idx);
        free(buf);
        return 1;
      }
    memcpy(buf + (size_t)i * chw, src, chw * sizeof(float));
  }
  free(idx);
  m->replay = buf;
  m->replay_n = n;
  return 0;
}

static int set_meta(jem_model *m, const char *name, json_t *classes, const char *ckpt,
                    const jem_tl_file *f, const char *norm, json_t *dropped, int buffer_total) {
  const char *base = strrchr(ckpt, '/');
  json_t *prov = json_pack("{s:s, s:o, s:s, s:s, s:O, s:{s:i, s:i}}", "tool", "jem import " JEM_VERSION,
                           "source", args_json_text(base ? base + 1 : ckpt), "format", f->format,
                           "norm", norm, "dropped", dropped, "replay_buffer", "kept", m->replay_n,
                           "of", buffer_total);
  json_t *pre = json_pack("{s:i, s:[f,f]}", "channels", m->arch.in_channels, "range", -1.0, 1.0);
  if (!prov || !pre || json_object_set_new(m->meta, "name", json_string(name)) ||
      json_object_set_new(m->meta, "temperature", json_real(1.0)) ||
      json_object_set_new(m->meta, "preprocess", pre) ||
      json_object_set_new(m->meta, "provenance", prov) ||
      (classes && json_object_set(m->meta, "classes", classes)))
    return -1;
  return 0;
}

/* The norm: --norm (norm_arg) when given, else what the tensors show; an
 * instance or layer norm (their tensors look alike) must be named.  0, or
 * the exit status after saying why. */
static int pick_norm(const sd_entry *e, int n, const char *norm_arg, const char *ckpt,
                     const char **norm) {
  const char *seen = norm_from_tensors(e, n);
  *norm = norm_arg ? norm_arg : seen;
  int affine = seen[0] == 'a' && seen[1] == 'f'; /* instance or layer */
  if (!norm_arg && affine) {
    fprintf(stderr, "jem import: %s: its norm layers hold only weight and bias, which "
            "InstanceNorm and GroupNorm(1) both leave; say which with --norm instance or "
            "--norm layer\n", ckpt);
    return 2;
  }
  int fits = affine ? !strcmp(*norm, "instance") || !strcmp(*norm, "layer")
                   : !strcmp(seen, *norm);
  if (!fits) {
    fprintf(stderr, "jem import: %s: --norm %s contradicts the tensors, which show %s\n", ckpt,
            *norm, affine ? "instance or layer norm" : seen);
    return 1;
  }
  return 0;
}

/* The state_dict's tensors no parameter took: a norm's bookkeeping is
 * skipped, the CCF head's are listed in dropped, anything else is an
 * error.  0 or 1. */
static int leftover_tensors(const sd_entry *e, int n, const jem_arch *a, const char *norm,
                            const char *ckpt, json_t *dropped) {
  for (int i = 0; i < n; i++) {
    if (e[i].used) continue;
    /* BatchNorm's step counter and ActNorm's init flag are not parameters */
    if (is_norm_key(e[i].name) && a->norm == JEM_NORM_BATCH &&
        has_suffix(e[i].name, ".num_batches_tracked"))
      continue;
    if (is_norm_key(e[i].name) && a->norm == JEM_NORM_ACT &&
        has_suffix(e[i].name, ".initialized")) {
      if (e[i].t->numel != 1 || e[i].t->data[0] != 1.0f) {
        fprintf(stderr, "jem import: %s: ActNorm layer %s was never initialised (its loc and "
                "scale are the defaults, not fitted to data)\n", ckpt, e[i].name);
        return 1;
      }
      continue;
    }
    if (strncmp(e[i].name, "f.linear.", 9) && strncmp(e[i].name, "energy_output.", 14)) {
      fprintf(stderr, "jem import: %s: unexpected tensor %s in the state_dict (not part of "
              "WRN-%d-%d with norm %s)\n", ckpt, e[i].name, a->depth, a->widen, norm);
      return 1;
    }
    json_array_append_new(dropped, json_string(e[i].name));
  }
  return 0;
}

int cmd_import(int argc, char **argv) {
  static const struct option opts[] = {
    {"out", required_argument, 0, 'o'},      {"norm", required_argument, 0, 'N'},
    {"classes", required_argument, 0, 'k'},  {"name", required_argument, 0, 'n'},
    {"buffer-size", required_argument, 0, 'b'}, {"seed", required_argument, 0, 's'},
    {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
  static const char *const norms[] = {"none", "batch", "instance", "layer", "act"};
  const char *out = NULL, *norm_arg = NULL, *classes_arg = NULL, *name_arg = NULL;
  int keep = -1, c;
  uint64_t seed = 0;
  opterr = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'o': out = optarg; break;
      case 'N': norm_arg = optarg; break;
      case 'k': classes_arg = optarg; break;
      case 'n': name_arg = optarg; break;
      case 'b': if (args_int("import", "--buffer-size", optarg, 0, 1 << 24, &keep)) return 2; break;
      case 's': if (args_u64("import", "--seed", optarg, &seed)) return 2; break;
      case 'h': import_help(stdout); return 0;
      default: return args_bad_option("import", argc, argv);
    }
  }
  if (argc - optind != 1)
    return args_usage("import", "expects exactly one CKPT file, got %d arguments", argc - optind);
  if (!out) return args_usage("import", "needs --out MODEL");
  if (norm_arg) {
    size_t i = 0;
    while (i < sizeof norms / sizeof norms[0] && strcmp(norm_arg, norms[i])) i++;
    if (i == sizeof norms / sizeof norms[0])
      return args_usage("import", "--norm must be none, batch, instance, layer or act, not '%s'", norm_arg);
  }
  json_t *classes = NULL;
  int nclasses = 0;
  if (classes_arg) {
    const char *why = NULL;
    if (!(classes = args_split_names(classes_arg, &nclasses, &why)))
      return args_usage("import", "--classes has %s in '%s'", why, classes_arg);
  }
  const char *ckpt = argv[optind];
  char err[512], name[128];
  unsigned char *buf = NULL;
  size_t len = 0;
  jem_tl_file *f = NULL;
  sd_entry *e = NULL;
  jem_model *m = NULL;
  json_t *dropped = json_array();
  int n = 0, status = 1;
  if (jem_read_file(ckpt, MAX_CKPT_BYTES, &buf, &len, err, sizeof err)) {
    fprintf(stderr, "jem import: %s\n", err);
    goto done;
  }
  if (jem_torch_load_mem(&f, buf, len, err, sizeof err)) {
    fprintf(stderr, "jem import: %s: %s\n", ckpt, err);
    goto done;
  }
  free(buf);
  buf = NULL;
  if (find_state_dict(f, &e, &n) || !dropped) {
    fprintf(stderr, "jem import: out of memory\n");
    goto done;
  }
  if (!n) {
    fprintf(stderr, "jem import: %s: holds no state_dict (no tensors at the top level or under "
            "model_state_dict, state_dict or model)\n", ckpt);
    goto done;
  }
  jem_arch a;
  if (infer_arch(e, n, &a, ckpt)) goto done;
  if (classes && nclasses != a.num_classes) {
    fprintf(stderr, "jem import: --classes names %d classes; %s has %d\n", nclasses, ckpt,
            a.num_classes);
    status = 2;
    goto done;
  }

  const char *norm;
  if ((status = pick_norm(e, n, norm_arg, ckpt, &norm))) goto done;
  status = 1;
  a.norm = jem_norm_from_name(norm);
  if (jem_model_create(&m, &a, err, sizeof err)) {
    fprintf(stderr, "jem import: %s\n", err);
    goto done;
  }
  if (copy_params(m, e, n, ckpt)) goto done;
  if (leftover_tensors(e, n, &a, norm, ckpt, dropped)) goto done;
  if (json_array_size(dropped))
    fprintf(stderr, "jem import: note: dropped %zu tensors the CCF head never uses "
            "(f.linear.*, energy_output.*)\n", json_array_size(dropped));
  const jem_tl_tensor *rb = jem_torch_find(f, "replay_buffer");
  if (rb && take_buffer(m, rb, keep, seed, ckpt)) goto done;
  if (name_arg) snprintf(name, sizeof name, "%s", name_arg);
  else args_default_name(out, name, sizeof name);
  if (set_meta(m, name, classes, ckpt, f, norm, dropped, rb ? (int)rb->shape[0] : 0)) {
    fprintf(stderr, "jem import: out of memory for the metadata\n");
    goto done;
  }
  if (jem_model_apply_meta(m, err, sizeof err) || jem_model_save(m, out, err, sizeof err)) {
    fprintf(stderr, "jem import: %s\n", err);
    goto done;
  }
  fprintf(stderr, "jem import: wrote %s: WRN-%d-%d, %d input channels, %d classes, norm %s, "
          "%d replay-buffer images (%s format)\n", out, a.depth, a.widen, a.in_channels,
          a.num_classes, norm, m->replay_n, f->format);
  status = 0;
done:
  free(buf);
  free(e);
  json_decref(dropped);
  json_decref(classes);
  jem_torch_free(f);
  jem_model_free(m);
  return status;
}
