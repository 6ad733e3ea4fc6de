#!/usr/bin/python3
"""card_tables.py - the model card's result tables, rendered from two
`jem eval` reports (report.json) so that the card cannot drift from the JSON.

usage: /usr/bin/python3 scripts/card_tables.py JEM/report.json BASELINE/report.json
       /usr/bin/python3 scripts/card_tables.py --samples LABEL=report.json ...
Prints markdown on stdout; models/README.md pastes it under "Results".  With
--samples, one row per report: its SGLD settings and how its samples and their
starts fare with the model and with the --fid-model judge.
"""
import json
import sys

SCORES = ("energy", "grad_norm", "max_softmax", "energy_complexity")
VARIANTS = ("ood_high", "ood_low", "two_sided")


def pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}%"


def f3(v):
    return "n/a" if v is None else f"{v:.3f}"


def row(name, a, b):
    return f"| {name} | {a} | {b} |"


def classification(j, b):
    cj, cb = j["classification"], b["classification"]
    out = ["| metric | JEM | CE baseline |", "|---|---|---|"]
    out.append(row("test accuracy", pct(cj["accuracy"]), pct(cb["accuracy"])))
    out.append(row("test NLL", f"{cj['nll']:.4f}", f"{cb['nll']:.4f}"))
    out.append(row("ECE (20 bins), T = 1", pct(cj["ece"]), pct(cb["ece"])))
    out.append(row("temperature fitted on validation", f3(cj["temperature_fitted"]),
                   f3(cb["temperature_fitted"])))
    out.append(row("ECE after temperature scaling", pct(cj["ece_tempered"]),
                   pct(cb["ece_tempered"])))
    out.append(row("test NLL after temperature scaling", f"{cj['nll_tempered']:.4f}",
                   f"{cb['nll_tempered']:.4f}"))
    return out


def best(sc):
    """(auroc, score, variant) of the best score over all three variants."""
    return max((sc[s][v]["auroc"], s, v) for s in SCORES for v in VARIANTS
               if sc.get(s) and sc[s][v]["auroc"] is not None)


def ood(j, b):
    sets = sorted(set(j["ood"]["sets"]) | set(b["ood"]["sets"]))
    out = ["| OOD set | JEM: conventional | JEM: two-sided | JEM: best (score, variant) "
           "| CE baseline: conventional | CE baseline: two-sided | CE baseline: best (score, variant) |",
           "|---|---|---|---|---|---|---|"]
    for name in sets:
        cells = []
        for r in (j, b):
            sc = r["ood"]["sets"].get(name, {}).get("scores")
            if not sc:
                cells += ["n/a"] * 3
                continue
            conv = " / ".join(f3(sc[s][sc[s]["conventional"]]["auroc"]) if sc.get(s) else "n/a"
                              for s in SCORES)
            two = " / ".join(f3(sc[s]["two_sided"]["auroc"]) if sc.get(s) else "n/a"
                             for s in SCORES)
            a, s, v = best(sc)
            cells += [conv, two, f"{a:.3f} ({s}, {v})"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "FPR at 95% TPR, conventional direction (energy / grad_norm / max_softmax / "
            "energy_complexity):", "",
            "| OOD set | JEM | CE baseline |", "|---|---|---|"]
    for name in sets:
        cells = []
        for r in (j, b):
            sc = r["ood"]["sets"].get(name, {}).get("scores", {})
            cells.append(" / ".join(f3(sc[s][sc[s]["conventional"]]["fpr95"]) if sc.get(s)
                                    else "n/a" for s in SCORES))
        out.append(row(name, *cells))
    out += ["", "Calibrated verdict rule (from `jem calibrate`, tuned without MNIST), at TPR 0.95:",
            "", "| | JEM | CE baseline |", "|---|---|---|"]
    out.append(row("rule", j["ood"]["rule"]["description"], b["ood"]["rule"]["description"]))
    out.append(row("test images accepted", pct(j["ood"]["rule"]["test_tpr_at_0.95"]),
                   pct(b["ood"]["rule"]["test_tpr_at_0.95"])))
    for name in sets:
        cells = []
        for r in (j, b):
            ru = r["ood"]["sets"].get(name, {}).get("rule")
            cells.append(f"{pct(ru['detected_at_tpr95'])} / {f3(ru['auroc'])}" if ru else "n/a")
        out.append(row(f"{name}: detected / rule AUROC", *cells))
    return out


def samples_robustness(j, b):
    out = ["| samples and robustness | JEM | CE baseline |", "|---|---|---|"]
    sj, sb = j.get("samples", {}), b.get("samples", {})
    out.append(row("class-conditional samples classified as their class",
                   pct(sj.get("conditional_agreement")), pct(sb.get("conditional_agreement"))))
    fj, fb = sj.get("frechet", {}), sb.get("frechet", {})
    for key, label in (("test_vs_samples", "Frechet distance test vs SGLD samples"),
                       ("test_vs_valid", "Frechet distance test vs validation (floor)"),
                       ("test_vs_replay_buffer", "Frechet distance test vs replay buffer")):
        v1, v2 = fj.get(key), fb.get(key)
        out.append(row(label, "n/a" if v1 is None else f"{v1:.4g}",
                       "n/a" if v2 is None else f"{v2:.4g}"))
    rj, rb = j.get("robustness", {}), b.get("robustness", {})
    if rj.get("enabled") and rb.get("enabled"):
        out.append(row("clean accuracy (attack subset)", pct(rj["clean_accuracy"]),
                       pct(rb["clean_accuracy"])))
        for norm, label in (("linf", "PGD L-inf"), ("l2", "PGD L2")):
            for a, c in zip(rj[norm], rb[norm]):
                out.append(row(f"{label} r = {a['radius']:g}", pct(a["accuracy"]),
                               pct(c["accuracy"])))
    return out


def fmt_g(v):
    return "n/a" if v is None else f"{v:.4g}"


def sampler_table(labelled):
    """One row per report; columns per judging network (the report's model and
    its --fid-model), so rows of different models share one ruler."""
    rows, nets = [], []
    for label, path in labelled:
        rep = json.load(open(path))
        sm = rep["samples"]
        own, ref = dict(sm.get("frechet", {})), dict(sm.get("reference", {}))
        own["conditional_agreement"] = sm.get("conditional_agreement")
        own["conditional_agreement_starts"] = sm.get("conditional_agreement_starts")
        by_net = {rep["model"]["path"]: own}
        if ref:
            by_net[ref["model"]] = ref
        nets += [n for n in by_net if n not in nets]
        rows.append((label, sm, by_net))
    out = ["| samples | step / noise | " + " | ".join(
        f"judged by `{n}`: class agreement (starts); Frechet distance (starts)" for n in nets) +
        " |", "|---|---|" + "---|" * len(nets)]
    for label, sm, by_net in rows:
        cells = []
        for n in nets:
            e = by_net.get(n)
            cells.append("n/a" if e is None else
                         f"{pct(e.get('conditional_agreement'))} "
                         f"({pct(e.get('conditional_agreement_starts'))}); "
                         f"{fmt_g(e.get('test_vs_samples'))} ({fmt_g(e.get('test_vs_starts'))})")
        out.append(f"| {label} | {sm['step_size']:g} / {sm['noise']:g} | " + " | ".join(cells) +
                   " |")
    return out


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--samples":
        pairs = [a.split("=", 1) for a in sys.argv[2:]]
        if any(len(p) != 2 for p in pairs):
            sys.exit(__doc__.strip())
        print("\n".join(sampler_table(pairs)))
        return
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    j, b = (json.load(open(p)) for p in sys.argv[1:])
    parts = [classification(j, b), ["", "OOD AUROC (in-distribution positive); each cell: "
             "energy / grad_norm / max_softmax / energy_complexity, conventional one-sided "
             "direction (high energy, high grad_norm, low max_softmax, high energy_complexity = "
             "OOD); then the best of the four scores over both one-sided directions and "
             "two-sided.", ""], ood(j, b), [""],
             samples_robustness(j, b)]
    print("\n".join(line for p in parts for line in p))


if __name__ == "__main__":
    main()
