#!/usr/bin/python3
"""Writes the seed corpus of fuzz_safetensors into fuzz/corpus/safetensors/.

Each seed starts with the harness's mode byte (see fuzz_safetensors.c):
0 = whole file, 1 = header for the WRN-10-1 weights, 2 = same plus one
replay image.  Run: /usr/bin/python3 fuzz/gen_safetensors_seeds.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")

ARCH = {"family": "wrn", "depth": 10, "widen": 1, "in_channels": 1,
        "image_size": 32, "num_classes": 10, "norm": "none", "leak": 0.2}

# WRN-10-1, 1 input channel, 10 classes: the canonical CCF names and shapes.
PARAMS = [
    ("f.conv1.weight", [16, 1, 3, 3]), ("f.conv1.bias", [16]),
    ("f.layer1.0.conv1.weight", [16, 16, 3, 3]), ("f.layer1.0.conv1.bias", [16]),
    ("f.layer1.0.conv2.weight", [16, 16, 3, 3]), ("f.layer1.0.conv2.bias", [16]),
    ("f.layer2.0.conv1.weight", [32, 16, 3, 3]), ("f.layer2.0.conv1.bias", [32]),
    ("f.layer2.0.conv2.weight", [32, 32, 3, 3]), ("f.layer2.0.conv2.bias", [32]),
    ("f.layer2.0.shortcut.0.weight", [32, 16, 1, 1]), ("f.layer2.0.shortcut.0.bias", [32]),
    ("f.layer3.0.conv1.weight", [64, 32, 3, 3]), ("f.layer3.0.conv1.bias", [64]),
    ("f.layer3.0.conv2.weight", [64, 64, 3, 3]), ("f.layer3.0.conv2.bias", [64]),
    ("f.layer3.0.shortcut.0.weight", [64, 32, 1, 1]), ("f.layer3.0.shortcut.0.bias", [64]),
    ("class_output.weight", [10, 64]), ("class_output.bias", [10]),
]

FULL_META = {
    "arch": ARCH, "name": "fmnist-jem",
    "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "temperature": 1.2,
    "preprocess": {"channels": 1, "resize": [28, 28], "pad": 2, "pad_value": 0.0,
                   "background": 0.0, "range": [-1, 1], "invert": False},
    "ood": {"scores": {"energy": {"quantiles": [-9, -8, -7.5, -7, -5], "side": "high"},
                       "grad_norm": {"quantiles": [0.1, 0.2, 0.2, 0.9], "side": "two-sided"},
                       "max_softmax": {"quantiles": [0.4, 0.99, 1, 1], "side": "low"},
                       "energy_complexity": {"quantiles": [-30, -25, -20], "side": "high"}},
            "complexity_weight": 0.005,
            "tpr": 0.95, "rule": "any used score outside its band"},
    "provenance": {"seed": 1},
}


def header(meta, extra=(), replay=False, dtype_of=None):
    h = {"__metadata__": {"jem": json.dumps(meta, separators=(",", ":"))}}
    off = 0
    for name, shape in PARAMS:
        n = 4
        for d in shape:
            n *= d
        h[name] = {"dtype": (dtype_of or {}).get(name, "F32"), "shape": shape,
                   "data_offsets": [off, off + n]}
        off += n
    for name, shape in extra:
        h[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off]}
    if replay:
        h["replay_buffer"] = {"dtype": "F32", "shape": [1, 1, 32, 32],
                              "data_offsets": [off, off + 4096]}
    return json.dumps(h, separators=(",", ":")).encode()


def raw_file(hdr, data=b""):
    return struct.pack("<Q", len(hdr)) + hdr + data


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "h_full": b"\x01" + header(FULL_META),
        "h_arch_only": b"\x01" + header({"arch": ARCH}),
        "h_ignored": b"\x01" + header({"arch": ARCH},
                                      extra=[("f.linear.weight", [0, 64]),
                                             ("energy_output.bias", [0])]),
        "h_replay": b"\x02" + header(FULL_META, replay=True),
        "h_bad_shape": b"\x01" + header({"arch": dict(ARCH, num_classes=5)}),
        "r_meta_only": b"\x00" + raw_file(json.dumps(
            {"__metadata__": {"jem": json.dumps({"arch": ARCH})}}).encode()),
        "r_one_tensor": b"\x00" + raw_file(
            b'{"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},'
            b'"__metadata__":{"jem":"{}"}}', bytes(8)),
        "r_bf16": b"\x00" + raw_file(
            b'{"f.conv1.bias":{"dtype":"BF16","shape":[16],"data_offsets":[0,32]}}',
            bytes(32)),
        "r_empty": b"\x00",
        "r_short": b"\x00" + struct.pack("<Q", 2) + b"{}",
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print("wrote %d seeds to %s" % (len(seeds), OUT))


if __name__ == "__main__":
    main()
