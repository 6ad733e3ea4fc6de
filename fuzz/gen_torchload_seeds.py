#!/usr/bin/python3
"""Writes the seed corpus of fuzz_torchload into fuzz/corpus/torchload/: small
torch.save files in both formats (a state_dict-like dict with a view at an
offset, a transposed tensor, float16/float64/int64/uint8/bool storages, a
nested official-style dict).  Needs torch:
    /usr/bin/python3 fuzz/gen_torchload_seeds.py
"""
import collections
import io
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "torchload")


def objects():
    base = torch.arange(12, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["f.conv1.weight"] = base.view(3, 4)
    sd["f.conv1.bias"] = base[5:8]
    sd["t"] = base.view(3, 4).t()
    sd["h"] = torch.tensor([0.5, -2.0], dtype=torch.float16)
    sd["d"] = torch.tensor([1.25], dtype=torch.float64)
    sd["n"] = torch.tensor(7)
    sd["u"] = torch.tensor(1, dtype=torch.uint8)
    sd["b"] = torch.tensor([True, False])
    yield "state_dict", sd
    yield "official", {"model_state_dict": sd, "replay_buffer": torch.zeros(1, 1, 2, 2),
                       "epoch": 3, "list": [torch.ones(2), "x", None, 1.5]}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, obj in objects():
        for fmt, zipped in (("zip", True), ("legacy", False)):
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
            with open(os.path.join(OUT, "%s-%s.pt" % (name, fmt)), "wb") as f:
                f.write(buf.getvalue())
    print("wrote", OUT)


if __name__ == "__main__":
    main()
