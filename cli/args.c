/* args.c - strict option-value parsing and usage errors for the jem subcommands. */
#include "args.h"
#include "jem.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int args_usage(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "jem %s: ", cmd);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nTry 'jem %s --help'.\n", cmd);
  return 2;
}

int args_int(const char *cmd, const char *opt, const char *s, long lo, long hi, int *out) {
  char *end;
  errno = 0;
  long v = s && *s ? strtol(s, &end, 10) : 0;
  if (!s || !*s || *end || errno || v < lo || v > hi)
    return args_usage(cmd, "%s expects an integer from %ld to %ld, not '%s'", opt, lo, hi,
                      s ? s : "");
  *out = (int)v;
  return 0;
}

int args_u64(const char *cmd, const char *opt, const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  unsigned long long v = 0;
  int ok = s && *s && *s != '-' && *s != '+';
  if (ok) {
    v = strtoull(s, &end, 0);
    ok = !*end && !errno;
  }
  if (!ok)
    return args_usage(cmd, "%s expects a non-negative integer (up to 2^64-1), not '%s'", opt,
                      s ? s : "");
  *out = (uint64_t)v;
  return 0;
}

int args_float(const char *cmd, const char *opt, const char *s, double lo, double hi,
               float *out) {
  char *end;
  errno = 0;
  double v = s && *s ? strtod(s, &end) : 0;
  if (!s || !*s || *end || errno || !isfinite(v) || v < lo || v > hi)
    return args_usage(cmd, "%s expects a number from %g to %g, not '%s'", opt, lo, hi,
                      s ? s : "");
  *out = (float)v;
  return 0;
}

int args_bad_option(const char *cmd, int argc, char **argv) {
  /* getopt_long has just stepped past the offending argument */
  const char *what = optind >= 1 && optind - 1 < argc ? argv[optind - 1] : "?";
  return args_usage(cmd, "unknown option, or option without its value: '%s'", what);
}

double args_f2d(float v) {
  if (!isfinite(v)) return v;
  char buf[32];
  for (int prec = 6; prec < 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)v);
    double d = strtod(buf, NULL);
    if ((float)d == v) return d;
  }
  return v;
}

json_t *args_json_text(const char *s) {
  json_t *j = json_string(s);
  if (j) return j;
  size_t cap = 3 * strlen(s) + 1; /* each bad byte grows to U+FFFD's 3 */
  char *clean = malloc(cap);
  if (!clean) return json_null();
  jem_utf8_clean(clean, cap, s);
  j = json_string(clean);
  free(clean);
  return j ? j : json_null();
}

char *args_command_line(int argc, char **argv, const char *skip) {
  size_t len = 4;
  for (int i = 0; i < argc; i++) len += strlen(argv[i]) + 1;
  char *cmd = malloc(len);
  if (!cmd) return NULL;
  strcpy(cmd, "jem");
  for (int i = 0; i < argc; i++) {
    if (skip && !strcmp(argv[i], skip) && i + 1 < argc) {
      i++;
      continue;
    }
    strcat(strcat(cmd, " "), argv[i]);
  }
  return cmd;
}

char *args_git_commit(void) {
  FILE *p = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (!p) return NULL;
  char buf[64] = "";
  char *r = fgets(buf, sizeof buf, p) ? strdup(buf) : NULL;
  pclose(p);
  if (r) r[strcspn(r, "\n")] = 0;
  if (r && !*r) { free(r); r = NULL; }
  return r;
}

/* The names of a comma-separated list, or NULL with the reason in why:
 * names must be non-empty, distinct and UTF-8 (they become JSON strings). */
json_t *args_split_names(const char *s, int *count, const char **why) {
  json_t *a = json_array();
  const char *p = s;
  for (;;) {
    const char *q = strchr(p, ',');
    size_t len = q ? (size_t)(q - p) : strlen(p);
    json_t *name = len ? json_stringn(p, len) : NULL;
    *why = !len ? "an empty name" : !name ? "a name that is not UTF-8" : NULL;
    for (size_t i = 0; name && i < json_array_size(a); i++)
      if (json_equal(json_array_get(a, i), name)) *why = "a repeated name";
    if (*why) {
      json_decref(name);
      json_decref(a);
      return NULL;
    }
    json_array_append_new(a, name);
    if (!q) break;
    p = q + 1;
  }
  *count = (int)json_array_size(a);
  return a;
}

/* The file name without directories and extension. */
void args_default_name(const char *path, char *out, size_t cap) {
  const char *b = strrchr(path, '/');
  b = b ? b + 1 : path;
  snprintf(out, cap, "%s", b);
  char *dot = strrchr(out, '.');
  if (dot && dot != out) *dot = 0;
}
