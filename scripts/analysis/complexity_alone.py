#!/usr/bin/python3
"""complexity_alone.py - a model-free reference for the energy_complexity score.

Prints the AUROC of the deflate length alone (short = OOD) for the Fashion-MNIST
test set (positive) against the first 2,000 images of each OOD set in data/ood/
(scripts/make_ood_sets.py).  Images are padded to 32x32 with background, as the
model sees them, and compressed like jem_input_complexity_bits (zlib level 9).

usage: /usr/bin/python3 scripts/analysis/complexity_alone.py
"""
import gzip
import os
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
SETS = ["mnist", "uniform", "gaussian", "vflip", "interp", "constant", "letters"]


def read_idx(path):
    raw = gzip.open(path).read()
    n = int.from_bytes(raw[4:8], "big")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)


def bits(images):
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.array([8 * len(zlib.compress(im.tobytes(), 9)) for im in padded], float)


def auroc(pos, neg):
    """P(pos > neg) + P(tie)/2, from mid-ranks."""
    values = np.concatenate([pos, neg])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[:len(pos)].sum()
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def main():
    test = bits(read_idx(TEST))
    print("test      mean bits %5.0f" % test.mean())
    for name in SETS:
        b = bits(read_idx(os.path.join(ROOT, "data", "ood", name + "-images-idx3-ubyte.gz"))[:2000])
        print("%-9s mean bits %5.0f  AUROC (short = OOD) %.3f" % (name, b.mean(), auroc(test, b)))


if __name__ == "__main__":
    main()
