/* eval_md.c - `jem eval`'s report.md, written from the eval_report. */
#include "eval_report.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *fmt_num(char buf[32], double v) {
  if (isnan(v)) snprintf(buf, 32, "n/a");
  else snprintf(buf, 32, "%.4g", v);
  return buf;
}

static void md_classification(FILE *md, const eval_report *r) {
  fprintf(md, "## Classification and calibration\n\n");
  fprintf(md, "| metric | value |\n|---|---|\n");
  fprintf(md, "| test accuracy | %.2f%% |\n| test NLL | %.4f |\n", 100 * r->acc, r->nll);
  fprintf(md, "| validation accuracy | %.2f%% |\n", 100 * r->acc_valid);
  fprintf(md, "| temperature fitted on validation | %.4f |\n| test NLL at fitted T | %.4f |\n",
          r->tfit, r->nll_t);
  fprintf(md, "| ECE (20 bins), T = 1 | %.2f%% |\n| ECE, fitted T | %.2f%% |\n",
          100 * r->cb.ece, 100 * r->ca.ece);
  fprintf(md, "| ECE, model's stored T = %.4g | %.2f%% |\n| MCE, T = 1 / fitted T | %.2f%% / "
          "%.2f%% |\n\n", (double)r->m->temperature, 100 * r->cm.ece, 100 * r->cb.mce,
          100 * r->ca.mce);
  fprintf(md, "Reliability diagram: `reliability.png` (left T = 1, right fitted T).\n\n");
}

static void md_ood(FILE *md, const eval_report *r) {
  const jem_model *m = r->m;
  fprintf(md, "## OOD detection\n\nAUROC / AUPR-in / FPR at 95%% TPR, in-distribution "
          "(Fashion-MNIST test) as the positive class.  `high`: high values are OOD, "
          "`low`: low values are OOD, `two`: two-sided on the validation percentile.  "
          "Conventional directions: energy high, grad_norm high, max_softmax low, "
          "energy_complexity high (the energy minus the model's complexity_weight, "
          "in nats per bit, times the input's deflate length; Serra et al., ICLR 2020), "
          "mahalanobis high (squared distance of the penultimate features to the nearest "
          "class mean under the training features' shared covariance; Lee et al., "
          "NeurIPS 2018).");
  if (isnan(m->ood.complexity_weight))
    fprintf(md, "  This model has no complexity_weight: energy_complexity is not scored.\n\n");
  else
    fprintf(md, "  complexity_weight: %.3g.\n\n", (double)m->ood.complexity_weight);
  fprintf(md, "Mean test scores:");
  for (int s = 0; s < JEM_NUM_SCORES; s++)
    fprintf(md, "%s %s %.4g", s ? "," : "", jem_score_names[s], r->test_mean[s]);
  fprintf(md, ".\n\n");
  fprintf(md, "| set | n | score | mean | AUROC high | AUROC low | AUROC two | AUPR-in "
          "(conv.) | FPR95 (conv.) | FPR95 two |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (int k = 0; k < r->n_ood; k++)
    for (int s = 0; s < JEM_NUM_SCORES; s++) {
      const eval_ood_set *R = &r->oods[k];
      const int cv = r->conventional[s];
      fprintf(md, "| %s | %d | %s | %.4g | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f |\n",
              R->name, R->n, jem_score_names[s], R->mean[s], R->mt[s][V_HIGH].auroc,
              R->mt[s][V_LOW].auroc, R->mt[s][V_TWO].auroc, R->mt[s][cv].aupr_in,
              R->mt[s][cv].fpr95, R->mt[s][V_TWO].fpr95);
    }
  if (r->missing[0]) fprintf(md, "\nMissing OOD sets (not evaluated): %s.\n", r->missing);
  if (m->ood.present) {
    fprintf(md, "\nCalibrated verdict rule of the model: \"%s\".  At TPR 0.95 it accepts "
            "%.2f%% of the test set.\n\n| set | detected | rule AUROC | rule FPR95 |\n"
            "|---|---|---|---|\n", r->rule_txt, 100 * r->rule_tpr);
    for (int k = 0; k < r->n_ood; k++)
      fprintf(md, "| %s | %.2f%% | %.3f | %.3f |\n", r->oods[k].name,
              100 * r->oods[k].rule_detect, r->oods[k].rule.auroc, r->oods[k].rule.fpr95);
  } else {
    fprintf(md, "\nThe model has no OOD statistics (run `jem calibrate`).\n");
  }
}

static void md_samples(FILE *md, const eval_report *r) {
  const eval_opts *o = r->o;
  fprintf(md, "\n## Samples\n\n");
  if (o->sample_steps > 0) {
    fprintf(md, "SGLD, %d steps (step %.3g, noise %.3g, clamped to [-1,1]), init: %s.  "
            "`samples_conditional.png`: one row per class (SGLD on f(x)[y]), %d per class; "
            "the classifier assigns %.1f%% of them to their class (%.1f%% of their starts).  "
            "`samples_unconditional.png`: SGLD on logsumexp f(x).\n\n", o->sample_steps,
            (double)r->sp.step_size, (double)r->sp.noise, eval_init_descriptions[r->init],
            o->samples_per_class, 100 * r->judged[0].agree_samp,
            100 * r->judged[0].agree_start);
  } else {
    fprintf(md, "Sampling skipped (--sample-steps 0).\n\n");
  }
  for (int j = 0; j < 2; j++) {
    const eval_judged *g = &r->judged[j];
    if (!g->present) continue;
    if (j)
      fprintf(md, "\nJudged by the reference network `%s`: it assigns %.1f%% of the "
              "class-conditional samples to their class (%.1f%% of their starts).  ",
              o->fid_model, 100 * g->agree_samp, 100 * g->agree_start);
    fprintf(md, "Frechet distance in %s %d penultimate features (lower is closer to the "
            "test set):\n\n| compared with test | distance |\n|---|---|\n",
            j ? "its" : "the model's", g->F);
    char f1[32], f2[32], f3[32], f4[32];
    fprintf(md, "| %d unconditional samples | %s |\n| their starts | %s |\n| validation "
            "images (real-vs-real floor) | %s |\n| replay buffer (%d images) | %s |\n", r->n_unc,
            fmt_num(f1, g->fd_samp), fmt_num(f2, g->fd_start), fmt_num(f3, g->fd_valid),
            r->m->replay_n, fmt_num(f4, g->fd_replay));
  }
}

static void md_robustness(FILE *md, const eval_report *r) {
  const eval_opts *o = r->o;
  fprintf(md, "\n## Robustness (PGD on the cross-entropy)\n\n");
  if (o->attack) {
    fprintf(md, "%d test images, %d steps of 2.5*eps/%d; radii in [0,1] pixel units (twice "
            "that in model space), padding never perturbed; L-inf with a random start.  "
            "Clean accuracy on this subset: %.2f%%.\n\n| attack | radius | accuracy |\n"
            "|---|---|---|\n", r->na, o->attack_steps, o->attack_steps, 100 * r->clean_sub);
    for (int k = 0; k < o->n_linf; k++)
      fprintf(md, "| L-inf | %g | %.2f%% |\n", (double)o->linf[k], 100 * r->rob_linf[k]);
    for (int k = 0; k < o->n_l2; k++)
      fprintf(md, "| L2 | %g | %.2f%% |\n", (double)o->l2[k], 100 * r->rob_l2[k]);
  } else {
    fprintf(md, "Skipped (--no-attack).\n");
  }
}

int eval_write_md(const eval_report *r) {
  const eval_opts *o = r->o;
  const jem_model *m = r->m;
  char path[4096];
  snprintf(path, sizeof path, "%s/report.md", o->out_dir);
  FILE *md = fopen(path, "w");
  if (!md) {
    fprintf(stderr, "jem eval: cannot write %s: %s\n", path, strerror(errno));
    return -1;
  }
  fprintf(md, "# jem eval: %s\n\n", m->name);
  fprintf(md, "Model `%s` (WRN-%d-%d, %zu parameters, stored temperature %.4g, OOD "
          "statistics: %s, replay buffer: %d images).  Test images: %d, validation "
          "images: %d%s, data noise sigma %.3g, seed %llu.\n\n", o->model, m->arch.depth,
          m->arch.widen, m->n_weights, (double)m->temperature, m->ood.present ? "yes" : "no",
          m->replay_n, r->nt, r->nv, o->limit ? " (--limit)" : "", (double)o->data_noise,
          (unsigned long long)o->seed);
  md_classification(md, r);
  md_ood(md, r);
  md_samples(md, r);
  md_robustness(md, r);
  fprintf(md, "\nWall time: %.1f s (classification %.1f, OOD %.1f, samples %.1f, attacks "
          "%.1f).\n", eval_now_s() - r->t_start, r->t_clf, r->t_ood, r->t_samp, r->t_att);
  if (fclose(md) != 0) {
    fprintf(stderr, "jem eval: error writing %s\n", path);
    return -1;
  }
  return 0;
}
