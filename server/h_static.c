/* h_static.c - the files built into jemd: the page at /, its script and
 * style under /ui/, the OpenAPI document at /openapi.yaml and its reference
 * at /docs (HTML generated from it at build time). */
#include "srv.h"

#include <string.h>

/* The page loads only its own script, style and the API's answers. */
static const char csp[] =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/* Query parameters are the page's own business and ignored here. */
enum MHD_Result srv_h_asset(srv_req *r) {
  const char *url = r->url;
  for (int i = 0; i < srv_n_assets; i++) {
    const srv_asset *a = &srv_assets[i];
    if (strcmp(a->url, url) != 0) continue;
    const char *h[] = {"Content-Security-Policy", csp, NULL};
    return srv_respond(r, 200, a->ctype, a->data, (size_t)a->len, h);
  }
  return srv_respond_error(r, 404, "not_found", "no such file: %.200s", url);
}
