/* eval_draw.c - `jem eval`'s pictures: the reliability diagram (drawn into
 * a float image, text with stb_easy_font) and the sample grids. */
#include "eval_report.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <stb/stb_easy_font.h>

static int write_file(const char *dir, const char *name, const void *data, size_t len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) {
    fprintf(stderr, "jem eval: cannot write %s: %s\n", path, strerror(errno));
    return -1;
  }
  size_t w = fwrite(data, 1, len, f);
  int bad = fclose(f) != 0 || w != len;
  if (bad) fprintf(stderr, "jem eval: error writing %s\n", path);
  return bad ? -1 : 0;
}

static void fill_rect(float *img, int S, int x0, int y0, int x1, int y1, const float rgb[3],
                      float alpha) {
  if (x0 < 0) x0 = 0;
  if (y0 < 0) y0 = 0;
  if (x1 > S) x1 = S;
  if (y1 > S) y1 = S;
  for (int c = 0; c < 3; c++)
    for (int y = y0; y < y1; y++)
      for (int x = x0; x < x1; x++) {
        float *p = img + (size_t)c * S * S + (size_t)y * S + x;
        *p = (1.0f - alpha) * *p + alpha * rgb[c];
      }
}

/* Text with stb_easy_font (axis-aligned quads), scaled by `scale`. */
static void draw_text(float *img, int S, int x, int y, int scale, const char *text) {
  static float vbuf[4 * 4 * 600]; /* 600 quads, 16 bytes per vertex */
  char t[128];
  snprintf(t, sizeof t, "%s", text);
  int quads = stb_easy_font_print(0, 0, t, NULL, vbuf, (int)sizeof vbuf);
  const float black[3] = {0, 0, 0};
  for (int q = 0; q < quads; q++) {
    const float *v0 = vbuf + (size_t)q * 16, *v2 = v0 + 8;
    int qx0 = x + (int)lroundf(v0[0]) * scale, qy0 = y + (int)lroundf(v0[1]) * scale;
    int qx1 = x + (int)lroundf(v2[0]) * scale, qy1 = y + (int)lroundf(v2[1]) * scale;
    fill_rect(img, S, qx0, qy0, qx1, qy1, black, 1.0f);
  }
}

/* One panel: accuracy bars per confidence bin, the gap to the diagonal in
 * red, the diagonal, a frame, and a title line. */
static void draw_reliability(float *img, int S, const jem_calib *c, const char *title) {
  for (size_t i = 0; i < (size_t)3 * S * S; i++) img[i] = 1.0f;
  const int m = 24, top = 28, W = S - 2 * m, H = S - top - m;
  const float grid[3] = {0.85f, 0.85f, 0.85f}, blue[3] = {0.20f, 0.40f, 0.80f},
              red[3] = {0.90f, 0.25f, 0.25f}, dark[3] = {0.2f, 0.2f, 0.2f};
  for (int g = 1; g < 4; g++) {
    fill_rect(img, S, m + g * W / 4, top, m + g * W / 4 + 1, top + H, grid, 1.0f);
    fill_rect(img, S, m, top + g * H / 4, m + W, top + g * H / 4 + 1, grid, 1.0f);
  }
  for (int b = 0; b < c->nbins; b++) {
    if (!c->count[b]) continue;
    int x0 = m + b * W / c->nbins + 1, x1 = m + (b + 1) * W / c->nbins - 1;
    int ya = top + H - (int)lround(c->acc[b] * H);
    int yc = top + H - (int)lround(c->conf[b] * H);
    fill_rect(img, S, x0, ya, x1, top + H, blue, 1.0f);
    if (yc < ya) fill_rect(img, S, x0, yc, x1, ya, red, 0.6f);
    else fill_rect(img, S, x0, ya, x1, yc, red, 0.6f);
  }
  for (int i = 0; i < W; i++) /* diagonal: accuracy == confidence */
    fill_rect(img, S, m + i, top + H - i * H / W - 1, m + i + 1, top + H - i * H / W + 1, dark, 1.0f);
  fill_rect(img, S, m, top, m + W, top + 1, dark, 1.0f);
  fill_rect(img, S, m, top + H, m + W, top + H + 1, dark, 1.0f);
  fill_rect(img, S, m, top, m + 1, top + H, dark, 1.0f);
  fill_rect(img, S, m + W - 1, top, m + W, top + H, dark, 1.0f);
  draw_text(img, S, m, 6, 2, title);
  draw_text(img, S, m, top + H + 6, 1, "x: confidence  blue: accuracy  red: gap");
}

int eval_draw_reliability(const char *out_dir, const jem_calib *cb, const jem_calib *ca,
                          double tfit) {
  const int P = 256;
  float *img = malloc(sizeof(float) * 2 * 3 * P * P);
  if (!img) return 0; /* the diagram is optional; the numbers are in the report */
  char title[64];
  snprintf(title, sizeof title, "T=1  ECE %.2f%%", 100 * cb->ece);
  draw_reliability(img, P, cb, title);
  snprintf(title, sizeof title, "T=%.2f  ECE %.2f%%", tfit, 100 * ca->ece);
  draw_reliability(img + (size_t)3 * P * P, P, ca, title);
  size_t len = 0;
  unsigned char *png = jem_png_grid(img, 2, 3, P, 2, 0.0f, 1.0f, &len);
  free(img);
  int rc = !png || write_file(out_dir, "reliability.png", png, len) ? -1 : 0;
  free(png);
  return rc;
}

int eval_draw_grid(const char *out_dir, const char *name, const jem_model *m, const float *x,
                   int n, int per_row) {
  size_t len = 0;
  unsigned char *png = jem_png_grid(x, n, m->arch.in_channels, m->arch.image_size, per_row,
                                    -1.0f, 1.0f, &len);
  int rc = !png || write_file(out_dir, name, png, len) ? -1 : 0;
  free(png);
  return rc;
}
