#!/usr/bin/python3
"""ood_table.py - the per-family OOD table of the README and the model card.

Reads a calibrated model (its provenance.calibration.leave_one_out table,
written by `jem calibrate --leave-one-out`) and a `jem eval` report.json of
the same model, and prints one Markdown row per OOD set: the share the
verdict flags when the set played no part in choosing the rule (leave one
out; "held out" for sets that are never tuning sets, such as MNIST), the
share the shipped rule flags, the best served score's AUROC (either
direction) and the AUROC and FPR95 of energy, grad_norm and mahalanobis
(their conventional side), and last the shipped rule's false alarms on the
Fashion-MNIST test set.  The worst family comes first.

Usage: /usr/bin/python3 scripts/ood_table.py MODEL REPORT_JSON
"""
import json
import struct
import sys

NEAR = {"vflip", "interp"}  # rearranged Fashion-MNIST images: reported apart


def meta(path):
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return json.loads(json.loads(f.read(n))["__metadata__"]["jem"])


def main():
  if len(sys.argv) != 3:
    sys.exit(__doc__.strip().splitlines()[-1])
  cal = meta(sys.argv[1])["provenance"]["calibration"]
  loo = {e["set"]: e["detected"] for e in cal.get("leave_one_out", [])}
  rep = json.load(open(sys.argv[2]))["ood"]
  rows = []
  for name, e in rep["sets"].items():
    sc = e["scores"]
    best = max((max(s["ood_high"]["auroc"], s["ood_low"]["auroc"]), k)
               for k, s in sc.items() if s["ood_high"]["auroc"] is not None)
    conv = {k: s[s["conventional"]] for k, s in sc.items()}
    held = loo.get(name)
    rows.append((name in NEAR, held if held is not None else e["rule"]["detected_at_tpr95"],
                 name, held, e["rule"]["detected_at_tpr95"], best, conv))
  rows.sort(key=lambda r: (r[0], r[1]))
  print("| family | flagged, rule chosen without it | flagged, shipped rule | best AUROC (score) "
        "| mahalanobis AUROC / FPR95 | energy AUROC | grad_norm AUROC |")
  print("|---|---|---|---|---|---|---|")
  for near, _, name, held, shipped, best, conv in rows:
    h = f"{100 * held:.2f}%" if held is not None else "held out"
    label = f"{name} (near shift)" if near else name
    print(f"| {label} | {h} | {100 * shipped:.2f}% | {best[0]:.3f} ({best[1]}) | "
          f"{conv['mahalanobis']['auroc']:.3f} / {conv['mahalanobis']['fpr95']:.3f} | "
          f"{conv['energy']['auroc']:.3f} | {conv['grad_norm']['auroc']:.3f} |")
  acc = rep["rule"]["test_tpr_at_0.95"]
  print(f"\nFalse alarms on the Fashion-MNIST test set: {100 * (1 - acc):.2f}% "
        f"(the rule accepts {100 * acc:.2f}%).")


if __name__ == "__main__":
  main()
