/* cmd_info.c - `jem info MODEL [--json]`: architecture, parameters, classes, metadata, BLAS core. */
#include "args.h"
#include "cli.h"
#include "jem.h"

#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void info_help(FILE *f) {
  fprintf(f,
          "usage: jem info MODEL [--json]\n\n"
          "Shows a model file's architecture, the number of parameters it uses (tensors\n"
          "that are accepted but ignored, such as f.linear.* and energy_output.*, are not\n"
          "counted), its classes, temperature, preprocessing, OOD statistics, replay buffer,\n"
          "metadata (name, provenance) and the BLAS core and threads this process uses.\n\n"
          "  --json     print one JSON object instead of text\n"
          "  -h, --help this text\n");
}

static size_t count_params(const jem_model *m) {
  size_t n = 0;
  for (int i = 0; i < m->n_params; i++) n += m->params[i].numel;
  return n;
}

static json_t *info_json(const jem_model *m, const char *path) {
  json_t *o = json_object();
  json_object_set_new(o, "file", json_string(path));
  json_object_set_new(o, "name", json_string(m->name));
  json_t *a = json_object();
  json_object_set_new(a, "family", json_string("wrn"));
  json_object_set_new(a, "depth", json_integer(m->arch.depth));
  json_object_set_new(a, "widen", json_integer(m->arch.widen));
  json_object_set_new(a, "in_channels", json_integer(m->arch.in_channels));
  json_object_set_new(a, "image_size", json_integer(m->arch.image_size));
  json_object_set_new(a, "num_classes", json_integer(m->arch.num_classes));
  json_object_set_new(a, "norm", json_string(jem_norm_names[m->arch.norm]));
  json_object_set_new(a, "leak", json_real(args_f2d(m->arch.leak)));
  json_object_set_new(o, "arch", a);
  json_object_set_new(o, "parameters", json_integer((json_int_t)count_params(m)));
  json_object_set_new(o, "tensors", json_integer(m->n_params));
  json_t *cl = json_array();
  for (int i = 0; i < m->arch.num_classes; i++) json_array_append_new(cl, json_string(m->classes[i]));
  json_object_set_new(o, "classes", cl);
  json_object_set_new(o, "temperature", json_real(args_f2d(m->temperature)));
  const jem_preprocess *p = &m->pre;
  json_t *pj = json_object();
  json_object_set_new(pj, "channels", json_integer(p->channels));
  json_object_set_new(pj, "resize", json_pack("[ii]", p->resize_w, p->resize_h));
  json_object_set_new(pj, "pad", json_integer(p->pad));
  json_object_set_new(pj, "pad_value", json_real(args_f2d(p->pad_value)));
  json_object_set_new(pj, "background", json_real(args_f2d(p->background)));
  json_object_set_new(pj, "range", json_pack("[ff]", args_f2d(p->range_lo), args_f2d(p->range_hi)));
  json_object_set_new(pj, "invert", json_boolean(p->invert));
  json_object_set_new(o, "preprocess", pj);
  json_t *oj = json_object();
  json_object_set_new(oj, "present", json_boolean(m->ood.present));
  if (m->ood.present) {
    json_object_set_new(oj, "tpr", json_real(args_f2d(m->ood.default_tpr)));
    json_object_set_new(oj, "rule", json_string(m->ood.rule));
    if (m->ood.has_nograd) json_object_set_new(oj, "rule_nograd", json_string(m->ood.rule_nograd));
    if (!isnan(m->ood.complexity_weight))
      json_object_set_new(oj, "complexity_weight", json_real(args_f2d(m->ood.complexity_weight)));
    json_object_set_new(oj, "feature_gaussian", json_boolean(m->feat_mean != NULL));
    json_t *sc = json_object();
    for (int i = 0; i < JEM_NUM_SCORES; i++) {
      json_t *e = json_pack("{s:i,s:s}", "quantiles", m->ood.nq[i], "side",
                            jem_ood_side_name(m->ood.side[i]));
      if (m->ood.has_nograd)
        json_object_set_new(e, "side_nograd",
                            json_string(jem_ood_side_name(m->ood.side_nograd[i])));
      json_object_set_new(sc, jem_score_names[i], e);
    }
    json_object_set_new(oj, "scores", sc);
  }
  json_object_set_new(o, "ood", oj);
  json_object_set_new(o, "sampler", jem_sampler_to_json(&m->sampler));
  json_object_set_new(o, "replay_buffer",
                      json_pack("{s:b,s:i}", "present", m->replay && m->replay_n > 0, "size",
                                m->replay ? m->replay_n : 0));
  json_t *prov = m->meta ? json_object_get(m->meta, "provenance") : NULL;
  json_object_set(o, "provenance", prov ? prov : json_null());
  json_object_set_new(o, "blas", json_pack("{s:s,s:i}", "core", jem_blas_core(), "threads",
                                           jem_blas_threads()));
  return o;
}

static void info_text(const jem_model *m, const char *path) {
  const jem_arch *a = &m->arch;
  printf("file:         %s\n", path);
  printf("name:         %s\n", m->name);
  printf("architecture: WRN-%d-%d (Wide-ResNet, depth %d, widen %d, norm %s, "
         "LeakyReLU %g)\n", a->depth, a->widen, a->depth, a->widen, jem_norm_names[a->norm],
         (double)a->leak);
  printf("input:        %d x %d x %d (channels x height x width)\n", a->in_channels,
         a->image_size, a->image_size);
  printf("parameters:   %zu in %d tensors\n", count_params(m), m->n_params);
  printf("classes:      %d:", a->num_classes);
  for (int i = 0; i < a->num_classes; i++) printf("%s %s", i ? "," : "", m->classes[i]);
  printf("\n");
  printf("temperature:  %g\n", (double)m->temperature);
  const jem_preprocess *p = &m->pre;
  printf("preprocess:   %d channel%s, resize %dx%d, pad %d (value %g), background %g, "
         "range [%g, %g]%s\n", p->channels, p->channels == 1 ? "" : "s", p->resize_w,
         p->resize_h, p->pad, (double)p->pad_value, (double)p->background,
         (double)p->range_lo, (double)p->range_hi, p->invert ? ", inverted" : "");
  if (m->ood.present) {
    printf("ood:          statistics present, default TPR %g\n", (double)m->ood.default_tpr);
    if (!isnan(m->ood.complexity_weight))
      printf("              energy_complexity = energy - %g nats/bit x deflate bits\n",
             (double)m->ood.complexity_weight);
    if (m->feat_mean)
      printf("              mahalanobis: feature Gaussian of %d classes x %d features\n",
             m->arch.num_classes, 64 * m->arch.widen);
    for (int i = 0; i < JEM_NUM_SCORES; i++) {
      printf("              %-17s %4d quantiles, side %s", jem_score_names[i], m->ood.nq[i],
             jem_ood_side_name(m->ood.side[i]));
      if (m->ood.has_nograd)
        printf(" (without the gradient: %s)", jem_ood_side_name(m->ood.side_nograd[i]));
      printf("\n");
    }
    if (m->ood.rule[0]) printf("              rule: %s\n", m->ood.rule);
    if (m->ood.has_nograd) printf("              rule_nograd: %s\n", m->ood.rule_nograd);
  } else {
    printf("ood:          no statistics (run `jem calibrate`)\n");
  }
  const jem_sampler *sp = &m->sampler;
  printf("sampler:      step size %g, noise %g, %d steps, clamp %s (%s)\n",
         (double)sp->sgld.step_size, (double)sp->sgld.noise, sp->steps,
         sp->sgld.clamp ? "on" : "off",
         sp->from_model ? "the model's, from jem calibrate" : "defaults; run `jem calibrate`");
  if (m->replay && m->replay_n > 0)
    printf("replay:       %d images\n", m->replay_n);
  else
    printf("replay:       none\n");
  json_t *prov = m->meta ? json_object_get(m->meta, "provenance") : NULL;
  if (prov) {
    char *s = json_dumps(prov, JSON_COMPACT | JSON_REAL_PRECISION(6));
    printf("provenance:   %s\n", s ? s : "?");
    free(s);
  }
  printf("blas:         %s, %d thread%s\n", jem_blas_core(), jem_blas_threads(),
         jem_blas_threads() == 1 ? "" : "s");
}

int cmd_info(int argc, char **argv) {
  static const struct option opts[] = {
    {"json", no_argument, NULL, 'j'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
  };
  int as_json = 0, c;
  opterr = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
    switch (c) {
      case 'j': as_json = 1; break;
      case 'h': info_help(stdout); return 0;
      default: return args_bad_option("info", argc, argv);
    }
  }
  if (argc - optind != 1)
    return args_usage("info", "expects exactly one MODEL file, got %d arguments", argc - optind);
  const char *path = argv[optind];
  jem_model *m = NULL;
  char err[512];
  if (jem_model_load(&m, path, err, sizeof err)) {
    fprintf(stderr, "jem info: %s\n", err);
    return 1;
  }
  if (as_json) {
    json_t *o = info_json(m, path);
    char *s = o ? json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(o);
    if (!s) {
      fprintf(stderr, "jem info: out of memory\n");
      jem_model_free(m);
      return 1;
    }
    printf("%s\n", s);
    free(s);
  } else {
    info_text(m, path);
  }
  jem_model_free(m);
  return 0;
}
