/* internal.h - declarations shared between core/ files, not public API.
 * Headers in core/internal/ are for the core (and its white-box tests);
 * the Makefile puts this directory on the include path. */
#ifndef JEM_INTERNAL_H
#define JEM_INTERNAL_H

#include "jem.h"

#include <stdarg.h>

/* Layer plan (core/model.c): built from m->arch and m->params once the
 * parameter table exists.  Holds offsets into m->weights, never pointers to
 * the weights themselves, so a loader may fill the weights afterwards. */
int jem__net_build(jem_model *m, char *err, size_t errlen);
void jem__net_free(jem_net *net);

/* Parses m->meta exactly as jem_model_apply_meta would, without changing
 * the model (core/meta.c); used before saving. */
int jem__meta_check(const jem_model *m, char *err, size_t errlen);

/* snprintf into an error buffer (err may be NULL); returns code. */
int jem__errf(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* IEEE half-precision bits to float, exactly (core/safetensors.c). */
float jem__half_to_float(uint16_t h);

/* 64-byte-aligned allocation of n floats, zeroed; free with free(). */
float *jem__falloc(size_t n);

/* Scratch of max_batch*C*S*S floats owned by ws (the input-gradient buffer
 * of jem_score_batch), free for the caller between core calls on that ws.
 * SGLD computes its gradients there so that sampling allocates nothing. */
float *jem__ws_input_scratch(jem_ws *ws);

#endif
