/* routes.c - the route table (method, path template, flags, handler) and its
 * matcher; templates double as the `route` label in metrics and logs. */
#include "srv.h"
#include "jobs.h"

#include <stdio.h>
#include <string.h>

const srv_route srv_routes[] = {
  {"GET", "/", 0, srv_h_asset},
  {"GET", "/ui/{file}", 0, srv_h_asset},
  {"GET", "/openapi.yaml", 0, srv_h_asset},
  {"GET", "/healthz", SRV_R_PROBE, srv_h_healthz},
  {"GET", "/readyz", SRV_R_PROBE, srv_h_readyz},
  {"GET", "/metrics", SRV_R_PROBE, srv_h_metrics},
  {"GET", "/v1/models", SRV_R_SCORING, srv_h_models},
  {"GET", "/v1/models/{name}", SRV_R_SCORING, srv_h_model},
  {"POST", "/v1/classify", SRV_R_BODY | SRV_R_SCORING, srv_h_classify},
  {"POST", "/v1/models/{name}/classify", SRV_R_BODY | SRV_R_SCORING, srv_h_classify},
  {"GET", "/v2/health/live", SRV_R_V2 | SRV_R_PROBE, srv_h_v2_live},
  {"GET", "/v2/health/ready", SRV_R_V2 | SRV_R_PROBE, srv_h_v2_ready},
  {"GET", "/v2", SRV_R_V2, srv_h_v2_server},
  {"GET", "/v2/models/{name}", SRV_R_V2 | SRV_R_SCORING, srv_h_v2_model},
  {"GET", "/v2/models/{name}/ready", SRV_R_V2 | SRV_R_SCORING, srv_h_v2_model_ready},
  {"POST", "/v2/models/{name}/infer", SRV_R_V2 | SRV_R_BODY | SRV_R_SCORING, srv_h_v2_infer},
  {"GET", "/v2/models/{name}/versions/{version}", SRV_R_V2 | SRV_R_SCORING, srv_h_v2_model},
  {"GET", "/v2/models/{name}/versions/{version}/ready", SRV_R_V2 | SRV_R_SCORING,
   srv_h_v2_model_ready},
  {"POST", "/v2/models/{name}/versions/{version}/infer", SRV_R_V2 | SRV_R_BODY | SRV_R_SCORING,
   srv_h_v2_infer},
  {"POST", "/v2/repository/index", SRV_R_V2 | SRV_R_BODY | SRV_R_SCORING, srv_h_v2_repo_index},
  {"POST", "/v2/repository/models/{name}/load", SRV_R_V2 | SRV_R_AUTH, srv_h_v2_repo_load},
  {"POST", "/v2/repository/models/{name}/unload", SRV_R_V2 | SRV_R_AUTH, srv_h_v2_repo_unload},
  {"POST", "/v1/samples", SRV_R_BODY | SRV_R_AUTH, srv_h_samples_create},
  {"GET", "/v1/jobs", SRV_R_AUTH, srv_h_jobs_list},
  {"GET", "/v1/jobs/{id}", SRV_R_AUTH, srv_h_job_get},
  {"DELETE", "/v1/jobs/{id}", SRV_R_AUTH, srv_h_job_delete},
  {"GET", "/v1/jobs/{id}/grid.png", SRV_R_AUTH, srv_h_job_grid},
  {"GET", "/v1/jobs/{id}/samples.npy", SRV_R_AUTH, srv_h_job_npy},
  {"GET", "/v1/jobs/{id}/samples/{k}.png", SRV_R_AUTH, srv_h_job_sample},
};
const int srv_n_routes = (int)(sizeof srv_routes / sizeof srv_routes[0]);

/* Matches path against pattern segment by segment; {x} takes one non-empty
 * segment, {x}.ext a segment ending in ".ext" (x = the part before it, non-empty).
 * Fills r->params when r is given. */
static int match(const char *pattern, const char *path, srv_req *r) {
  const char *p = pattern, *u = path;
  int np = 0;
  while (*p && *u) {
    if (*p != '/' || *u != '/') return 0;
    p++;
    u++;
    const char *pe = strchr(p, '/'), *ue = strchr(u, '/');
    size_t pl = pe ? (size_t)(pe - p) : strlen(p), ul = ue ? (size_t)(ue - u) : strlen(u);
    const char *close = pl >= 2 && p[0] == '{' ? memchr(p, '}', pl) : NULL;
    if (close) {
      size_t sl = pl - (size_t)(close + 1 - p); /* literal suffix, e.g. ".png" */
      if (ul <= sl || memcmp(u + ul - sl, close + 1, sl) != 0) return 0;
      if (ul - sl >= SRV_PARAM_MAX || np >= SRV_MAX_PARAMS) return 0;
      if (r) {
        memcpy(r->params[np], u, ul - sl);
        r->params[np][ul - sl] = '\0';
      }
      np++;
    } else if (pl != ul || memcmp(p, u, pl) != 0) {
      return 0;
    }
    p += pl;
    u += ul;
  }
  if (*p || *u) return 0;
  if (r) r->n_params = np;
  return 1;
}

int srv_route_match(const char *method, const char *path, srv_req *r, char *allow,
                    size_t allow_cap) {
  int any = 0;
  const char *m = !strcmp(method, "HEAD") ? "GET" : method;
  allow[0] = '\0';
  size_t used = 0;
  for (int i = 0; i < srv_n_routes; i++) {
    if (!match(srv_routes[i].pattern, path, NULL)) continue;
    if (!strcmp(srv_routes[i].method, m)) {
      match(srv_routes[i].pattern, path, r);
      return i;
    }
    any = 1;
    const char *meth = srv_routes[i].method;
    int n = snprintf(allow + used, allow_cap - used, "%s%s%s", used ? ", " : "", meth,
                     !strcmp(meth, "GET") ? ", HEAD" : "");
    if (n > 0 && (size_t)n < allow_cap - used) used += (size_t)n;
  }
  return any ? -2 : -1;
}
