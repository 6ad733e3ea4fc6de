/* routes.c - the route table (method, path template, flags, handler), which
 * main() hands to srv_http_start; templates double as the `route` label in
 * metrics and logs.  The matcher is srv_route_match (parse.c). */
#include "srv.h"
#include "jobs.h"

#include <stdio.h>
#include <string.h>

const srv_route srv_routes[] = {
  {"GET", "/", 0, srv_h_asset},
  {"GET", "/ui/{file}", 0, srv_h_asset},
  {"GET", "/openapi.yaml", 0, srv_h_asset},
  {"GET", "/docs", 0, srv_h_asset},
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
