#!/usr/bin/python3
"""ood_table.py - the per-family OOD table of the README and the model card.

Reads a `jem eval` report.json of the shipped model and, with --fold, the
reports of leave-one-group-out fold models (scripts/oe_folds.sh: a model
trained with outlier exposure on the other groups' sets, calibrated without
its own).  Prints one Markdown row per OOD set: the share the verdict flags
and the best served score's AUROC (either direction) where neither the
model nor the rule saw the set (the fold that held it out; the shipped model
for sets that are never used, such as MNIST), then the same for the shipped
model and rule, and the shipped model's AUROC and FPR95 of mahalanobis,
energy and grad_norm (their conventional side).  The worst held-out figure
comes first; last, the false alarms and accuracy on the Fashion-MNIST test
set of the shipped model and of each fold.

Without --fold, the held-out column is the rule-level leave-one-out of
`jem calibrate --leave-one-out`, read from MODEL's provenance (the model
itself then saw every set, or none).

Usage: /usr/bin/python3 scripts/ood_table.py MODEL REPORT_JSON [--fold SETS=REPORT_JSON]...
"""
import json
import struct
import sys

NEAR = {"vflip", "interp"}  # rearranged Fashion-MNIST images: reported apart


def meta(path):
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return json.loads(json.loads(f.read(n))["__metadata__"]["jem"])


def best_auroc(entry):
  """(AUROC, score) of the best served score on one set, either direction."""
  return max((max(s["ood_high"]["auroc"], s["ood_low"]["auroc"]), k)
             for k, s in entry["scores"].items() if s["ood_high"]["auroc"] is not None)


def test_line(name, report):
  acc = report["ood"]["rule"]["test_tpr_at_0.95"]
  return (f"{name}: false alarms {100 * (1 - acc):.2f}%, "
          f"accuracy {100 * report['classification']['accuracy']:.2f}%")


def main():
  args = sys.argv[1:]
  folds = []  # (sets, report)
  while "--fold" in args:
    i = args.index("--fold")
    sets, _, path = args[i + 1].partition("=")
    folds.append((sets.split(","), json.load(open(path)), path))
    del args[i:i + 2]
  if len(args) != 2:
    sys.exit(__doc__.strip().splitlines()[-1])
  report = json.load(open(args[1]))
  held = {}  # set -> (flagged, best AUROC, score), from a model and rule that never saw it
  for sets, rep, _ in folds:
    for name in sets:
      e = rep["ood"]["sets"][name]
      held[name] = (e["rule"]["detected_at_tpr95"],) + best_auroc(e)
  if not folds:
    cal = meta(args[0])["provenance"]["calibration"]
    for e in cal.get("leave_one_out", []):
      held[e["set"]] = (e["detected"], None, None)
  tuned = {e["set"] for e in meta(args[0])["provenance"]["calibration"].get("tuning_sets", [])}
  rows = []
  for name, e in report["ood"]["sets"].items():
    shipped = e["rule"]["detected_at_tpr95"]
    best = best_auroc(e)
    h = held.get(name)
    if h is None and name not in tuned:  # never used: the shipped figures are held out
      h = (shipped,) + best
    conv = {k: s[s["conventional"]] for k, s in e["scores"].items()}
    rows.append((name in NEAR, h[0] if h else shipped, name, h, shipped, best, conv))
  rows.sort(key=lambda r: (r[0], r[1]))
  print("| family | flagged, never seen | best AUROC, never seen (score) | flagged, shipped "
        "| best AUROC, shipped (score) | mahalanobis AUROC / FPR95 | energy AUROC "
        "| grad_norm AUROC |")
  print("|---|---|---|---|---|---|---|---|")
  for near, _, name, h, shipped, best, conv in rows:
    hf = f"{100 * h[0]:.2f}%" if h else "n/a"
    ha = f"{h[1]:.3f} ({h[2]})" if h and h[1] is not None else "n/a"
    label = f"{name} (near shift)" if near else name
    print(f"| {label} | {hf} | {ha} | {100 * shipped:.2f}% | {best[0]:.3f} ({best[1]}) | "
          f"{conv['mahalanobis']['auroc']:.3f} / {conv['mahalanobis']['fpr95']:.3f} | "
          f"{conv['energy']['auroc']:.3f} | {conv['grad_norm']['auroc']:.3f} |")
  print()
  lines = [test_line("shipped", report)]
  lines += [test_line("fold without " + ",".join(s), r) for s, r, _ in folds]
  print("Fashion-MNIST test set, " + "; ".join(lines) + ".")


if __name__ == "__main__":
  main()
