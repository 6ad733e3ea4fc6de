/* cli.h - subcommands of the `jem` tool; each lives in cli/cmd_<name>.c. */
#ifndef JEM_CLI_H
#define JEM_CLI_H

#include <stddef.h>

/* Each returns the process exit status: 0 ok, 1 failure/bad input, 2 usage. */
int cmd_info(int argc, char **argv);
int cmd_score(int argc, char **argv);
int cmd_sample(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);
int cmd_buffer(int argc, char **argv);
int cmd_average(int argc, char **argv);
int cmd_import(int argc, char **argv);

/* jem calibrate's choice of the model's sampler settings (cli/sampler_fit.c):
 * runs per_class class-conditional chains per class and candidate step size
 * for `steps` steps (stored as the model's default),
 * judged against the high-frequency energy of ref [n_ref,C,S,S], and writes
 * the winner as m->meta "sampler" (then jem_model_apply_meta).  0 or 1. */
typedef struct jem_model jem_model;
typedef struct jem_ws jem_ws;
int cli_fit_sampler(jem_model *m, jem_ws *ws, const float *ref, int n_ref, int per_class,
                    int steps, char *err, size_t errlen);

#endif
