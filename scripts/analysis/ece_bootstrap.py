#!/usr/bin/python3
"""ece_bootstrap.py - is one model's ECE really lower than another's?

Scores the 10,000 Fashion-MNIST test images with `build/jem score --no-grad`
for each model, then prints each model's accuracy and ECE (20 equal-width bins
(lo, hi], as `jem eval`), before temperature scaling (max_softmax) and after
it (confidence, as served), with 95% bootstrap intervals, and the interval
of the paired difference A - B (the same resampled images for both models).
Resampled ECEs sit above the point value (bin noise only adds), so read the
difference's interval, not the two overlapping ones.

usage: /usr/bin/python3 scripts/analysis/ece_bootstrap.py MODEL_A MODEL_B [--reps 2000]
The temperature is the one stored in each file by `jem calibrate`.
"""
import argparse
import gzip
import json
import os
import subprocess
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("JEM_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def read_idx(name):
    raw = gzip.open(os.path.join(DATA, name)).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_tensor():
    """The test set in model space: padded 28 -> 32 with background, [-1, 1]."""
    images = np.pad(read_idx("t10k-images-idx3-ubyte.gz"), ((0, 0), (2, 2), (2, 2)))
    return (images.astype(np.float32) * (2.0 / 255.0) - 1.0)[:, None]


def score(model, npy):
    out = subprocess.run([os.path.join(ROOT, "build/jem"), "score", model, npy,
                          "--no-grad", "--batch", "200"],
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    rows.sort(key=lambda r: r["index"])
    return {"T = 1": np.array([r["max_softmax"] for r in rows]),
            "after scaling": np.array([r["confidence"] for r in rows]),
            "label": np.array([r["label"] for r in rows])}


def ece_resampled(conf, correct, idx, bins=20):
    """ECE over the resampled indices idx (rows: replicates)."""
    b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = np.empty(len(idx))
    for r, sel in enumerate(idx):
        gap = (np.bincount(b[sel], conf[sel], bins)
               - np.bincount(b[sel], correct[sel], bins))
        out[r] = np.abs(gap).sum() / len(sel)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_a")
    ap.add_argument("model_b")
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()

    labels = read_idx("t10k-labels-idx1-ubyte.gz").astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "test.npy")
        np.save(npy, test_tensor())
        results = [score(m, npy) for m in (args.model_a, args.model_b)]

    rng = np.random.default_rng(0)
    n = len(labels)
    idx = np.vstack([np.arange(n)[None], rng.integers(0, n, (args.reps, n))])
    for kind in ("T = 1", "after scaling"):
        eces = []
        for name, res in zip((args.model_a, args.model_b), results):
            correct = (res["label"] == labels).astype(float)
            e = ece_resampled(res[kind], correct, idx)
            eces.append(e)
            lo, hi = np.percentile(e[1:], [2.5, 97.5])
            print(f"{name}: accuracy {100 * correct.mean():.2f}%, ECE {kind} "
                  f"{100 * e[0]:.2f}% (95% bootstrap {100 * lo:.2f}-{100 * hi:.2f}%)")
        d = eces[0] - eces[1]
        lo, hi = np.percentile(d[1:], [2.5, 97.5])
        print(f"ECE {kind}, A - B: {100 * d[0]:+.2f} points (95% bootstrap "
              f"{100 * lo:+.2f} to {100 * hi:+.2f}); A lower in "
              f"{100 * (d[1:] < 0).mean():.1f}% of resamples")

if __name__ == "__main__":
    main()
