/* args.h - small helpers shared by the `jem` subcommands: strict number
 * parsing for option values and uniform usage-error messages.
 *
 * Commands parse options with getopt_long (glibc permutes argv, so options
 * may follow positional arguments) and use these for the values:
 *
 *     int batch = 64;
 *     if (args_int("score", "--batch", optarg, 1, 4096, &batch)) return 2;
 *
 * Every args_* function returns 0 on success; on failure it prints
 * "jem CMD: ..." and a pointer to --help on stderr and returns 2, the usage
 * exit status, so the caller can return its result directly. */
#ifndef JEM_CLI_ARGS_H
#define JEM_CLI_ARGS_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* Whole-string integer in [lo, hi] (decimal, optional sign). */
int args_int(const char *cmd, const char *opt, const char *s, long lo, long hi, int *out);
/* Unsigned 64-bit integer (decimal or 0x hex). */
int args_u64(const char *cmd, const char *opt, const char *s, uint64_t *out);
/* Finite float in [lo, hi]. */
int args_float(const char *cmd, const char *opt, const char *s, double lo, double hi,
               float *out);
/* Prints "jem CMD: <message>" and the --help hint; returns 2. */
int args_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* For getopt_long's '?' result: names the bad option; returns 2. */
int args_bad_option(const char *cmd, int argc, char **argv);

/* A JSON string of s, which need not be UTF-8 (a file name is bytes): each
 * byte that is not part of a valid UTF-8 sequence becomes U+FFFD, so the
 * key is never dropped. */
json_t *args_json_text(const char *s);

/* The double with the shortest decimal form that reads back as v, so JSON
 * printed with JSON_REAL_PRECISION(9) shows 0.2f as 0.2, yet every float
 * round-trips exactly.  NaN and infinities are returned unchanged. */
double args_f2d(float v);

/* "jem ARGV..." for provenance, leaving out the option `skip` and its value
 * (NULL: none), or NULL when out of memory.  Free it. */
char *args_command_line(int argc, char **argv, const char *skip);

/* The short commit of the git checkout the process runs in (for provenance:
 * which code made a model), or NULL outside one.  Free it. */
char *args_git_commit(void);

/* The names of a comma-separated list as a JSON array (*count of them), or
 * NULL with the reason in why: names must be non-empty, distinct and UTF-8
 * (they become JSON strings). */
json_t *args_split_names(const char *s, int *count, const char **why);

/* The file name of path without directories and extension. */
void args_default_name(const char *path, char *out, size_t cap);

#endif
