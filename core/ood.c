/* ood.c - in-distribution percentiles of OOD scores and the verdict rule. */
#include "internal.h"

#include <math.h>
#include <string.h>
#include <zlib.h>

const char *const jem_score_names[JEM_NUM_SCORES] = {"energy", "grad_norm", "max_softmax",
                                                     "energy_complexity", "mahalanobis"};
const int jem_score_conventional_side[JEM_NUM_SCORES] = {1, 1, -1, 1, 1};

/* Empirical CDF from quantiles at probabilities 0, 1/m, ..., 1 (m = nq-1),
 * linearly interpolated.  A value equal to a run of tied quantiles q[a..b]
 * gets the middle of that run's probabilities (mid-rank), which keeps the
 * function non-decreasing and gives a constant score the percentile 0.5. */
float jem_ood_percentile(const float *q, int nq, float value) {
  if (!q || nq < 2 || isnan(value)) return NAN;
  const double m = (double)(nq - 1);
  if (value < q[0]) return 0.0f;
  if (value > q[nq - 1]) return 1.0f;

  /* first index with q[i] >= value */
  int lo = 0, hi = nq - 1;
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;
    if (q[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  int a = lo;
  double p;
  if (q[a] == value) {
    int b = a;
    while (b + 1 < nq && q[b + 1] == value) b++;
    p = 0.5 * (double)(a + b) / m;
  } else {
    /* q[a-1] < value < q[a]; a >= 1 since value >= q[0] */
    double x0 = q[a - 1], x1 = q[a];
    double f = ((double)value - x0) / (x1 - x0);
    if (!(f >= 0.0)) f = 0.0;
    if (f > 1.0) f = 1.0;
    p = ((double)(a - 1) + f) / m;
  }
  if (p < 0.0) p = 0.0;
  if (p > 1.0) p = 1.0;
  return (float)p;
}

/* A score the main rule needs was not computed (grad=false): the rule chosen
 * for that case, when the model has one. */
const int *jem_ood_rule_for(const jem_ood_stats *s, const float value[JEM_NUM_SCORES],
                            const char **rule) {
  int missing = 0;
  for (int i = 0; i < JEM_NUM_SCORES; i++)
    missing |= s->side[i] != 0 && s->nq[i] >= 2 && isnan(value[i]);
  const int nograd = missing && s->has_nograd;
  if (rule) *rule = nograd ? s->rule_nograd : s->rule;
  return nograd ? s->side_nograd : s->side;
}

void jem_ood_eval(const jem_ood_stats *s, const float value[JEM_NUM_SCORES],
                  float tpr, jem_ood_result *out) {
  if (!out) return;
  float def = 0.95f;
  if (s && s->present && s->default_tpr > 0.0f && s->default_tpr < 1.0f) def = s->default_tpr;
  if (!(tpr > 0.0f && tpr < 1.0f)) tpr = def;
  out->tpr = tpr;
  out->is_ood = -1;
  out->rule = NULL;
  for (int i = 0; i < JEM_NUM_SCORES; i++) {
    out->value[i] = value ? value[i] : NAN;
    out->percentile[i] = NAN;
  }
  if (!s || !s->present) return;

  const int *side = jem_ood_rule_for(s, out->value, &out->rule);

  int n_used = 0;
  for (int i = 0; i < JEM_NUM_SCORES; i++) {
    if (s->nq[i] >= 2) out->percentile[i] = jem_ood_percentile(s->q[i], s->nq[i], out->value[i]);
    if (side[i] != 0 && !isnan(out->percentile[i])) n_used++;
  }
  if (n_used == 0) return; /* nothing to decide on: verdict unknown */

  /* Bonferroni split of the false-rejection budget over the used scores. */
  const double t = 1.0 - (1.0 - (double)tpr) / n_used;
  int ood = 0;
  for (int i = 0; i < JEM_NUM_SCORES; i++) {
    double p = out->percentile[i];
    if (side[i] == 0 || isnan(p)) continue;
    switch (side[i]) {
      case 1: if (p > t) ood = 1; break;
      case -1: if (p < 1.0 - t) ood = 1; break;
      case 2: if (p < (1.0 - t) / 2.0 || p > 1.0 - (1.0 - t) / 2.0) ood = 1; break;
      default: break;
    }
  }
  out->is_ood = ood;
}

const char *jem_ood_side_name(int side) {
  switch (side) {
    case 1: return "high";
    case -1: return "low";
    case 2: return "two-sided";
    default: return "unused";
  }
}

/* The input, quantised to bytes, streams through deflate in 4 KiB chunks;
 * only the output length is kept. */
float jem_input_complexity_bits(const jem_model *m, const float *x) {
  if (!m || !x) return NAN;
  const size_t n = (size_t)m->arch.in_channels * m->arch.image_size * m->arch.image_size;
  const float lo = m->pre.range_lo, hi = m->pre.range_hi;
  const float scale = hi > lo ? 255.0f / (hi - lo) : 0.0f;
  z_stream z;
  memset(&z, 0, sizeof z);
  if (deflateInit(&z, 9) != Z_OK) return NAN;
  unsigned char in[4096], out[4096];
  size_t done = 0, total = 0;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    size_t c = n - done < sizeof in ? n - done : sizeof in;
    for (size_t i = 0; i < c; i++) {
      float v = (x[done + i] - lo) * scale + 0.5f;
      in[i] = !(v > 0.0f) ? 0 : v >= 255.0f ? 255 : (unsigned char)v;
    }
    done += c;
    z.next_in = in;
    z.avail_in = (uInt)c;
    const int flush = done == n ? Z_FINISH : Z_NO_FLUSH;
    do {
      z.next_out = out;
      z.avail_out = sizeof out;
      rc = deflate(&z, flush);
      if (rc == Z_STREAM_ERROR) {
        deflateEnd(&z);
        return NAN;
      }
      total += sizeof out - z.avail_out;
    } while (z.avail_out == 0);
    if (flush == Z_FINISH && rc != Z_STREAM_END) {
      deflateEnd(&z);
      return NAN;
    }
  }
  deflateEnd(&z);
  return (float)(8.0 * (double)total);
}

float jem_energy_complexity(const jem_model *m, float energy, float bits) {
  if (!m || isnan(m->ood.complexity_weight)) return NAN;
  return energy - m->ood.complexity_weight * bits;
}
