#!/usr/bin/python3
"""make_golden.py - PyTorch reference values for tests/test_parity.c.

Defines the official JEM Wide-ResNet + CCF head (wgrathwohl/JEM wideresnet.py
and train_wrn_ebm.py, norm=None, dropout 0, LeakyReLU 0.2) in PyTorch, builds
small models with a fixed seed and PyTorch's default initialisation, and writes
for each case under tests/ref/<case>/ (every file gzip-compressed, .gz):

  model.safetensors  the weights under the official CCF state_dict names (the
                     unused f.linear.* and energy_output.* included), with
                     __metadata__["jem"] = {"arch": ..., "name", "temperature"}
  x.npy              input batch [N,C,32,32] float32; rows 0..N-3 8-bit
                     pixel values mapped to [-1,1] like real images, row
                     N-2 Gaussian with std 2.5, row N-1 a constant 1.5 image
  y.npy              labels [N] int32
  logits.npy         f(x) [N,K]
  energy.npy         -logsumexp f(x) [N]
  gx_lse.npy         d/dx sum_i logsumexp f(x_i)      [N,C,32,32]
  gx_y.npy           d/dx sum_i f(x_i)[y_i]           [N,C,32,32]
                     (cases with class-conditional gradients)
  pgrad.npy          (cases with parameter gradients) d/dtheta of
                     CrossEntropy(f(x), y) with reduction='mean' (PyTorch's
                     default), every used parameter flattened and concatenated
  pgrad.txt          one line per tensor in pgrad.npy: "name numel"

Weights are PyTorch's default initialisation (torch.manual_seed(seed)) with
every conv weight scaled by 2 and class_output.weight by 4, so that logits
span a few units as in a trained model and the absolute tolerance of the
parity test means something.  In the larger cases most entries of each big
conv weight are zeroed at random (the rest scaled up to keep activations at
the same scale), and all weights are rounded to bfloat16 precision (low 16
bits of each float32 cleared), so that the committed files compress.  Both sides
still compute in float32.  All files together stay under 1 MB.

Run with Debian's Python (torch 1.13):  /usr/bin/python3 tests/ref/make_golden.py
CI does not need torch: it uses the committed files.
"""
import argparse
import gzip
import io
import json
import os
import struct
import sys

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # the writer below is usable without torch
    torch = None


# --------------------------------------------------------------------------
# The official JEM architecture (written from its description in
# ../shared/notes/jem.md section 1).

if torch is not None:

    class WideBasic(nn.Module):
        """Pre-activation wide basic block; stride on conv2; shortcut on raw x."""

        def __init__(self, in_planes, planes, stride, leak):
            super().__init__()
            self.bn1 = nn.Identity()  # norm=None
            self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
            self.dropout = nn.Identity()  # dropout_rate=0
            self.bn2 = nn.Identity()
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
            self.lrelu = nn.LeakyReLU(leak)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

        def forward(self, x):
            out = self.dropout(self.conv1(self.lrelu(self.bn1(x))))
            out = self.conv2(self.lrelu(self.bn2(out)))
            return out + self.shortcut(x)

    class WideResNet(nn.Module):
        def __init__(self, depth, widen, num_classes, input_channels, leak=0.2):
            super().__init__()
            assert (depth - 4) % 6 == 0, "depth must be 6n+4"
            n = (depth - 4) // 6
            stages = [16, 16 * widen, 32 * widen, 64 * widen]
            self.leak = leak
            self.conv1 = nn.Conv2d(input_channels, stages[0], 3, padding=1, bias=True)
            self.in_planes = stages[0]
            self.layer1 = self._stage(stages[1], n, 1, leak)
            self.layer2 = self._stage(stages[2], n, 2, leak)
            self.layer3 = self._stage(stages[3], n, 2, leak)
            self.bn1 = nn.Identity()
            self.lrelu = nn.LeakyReLU(leak)
            self.last_dim = stages[3]
            self.linear = nn.Linear(stages[3], num_classes)  # unused by CCF

        def _stage(self, planes, n, stride, leak):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(self.in_planes, planes, s, leak))
                self.in_planes = planes
            return nn.Sequential(*blocks)

        def forward(self, x):
            out = self.conv1(x)
            out = self.layer3(self.layer2(self.layer1(out)))
            out = self.lrelu(self.bn1(out))
            out = F.avg_pool2d(out, 8)
            return out.view(out.size(0), -1)

    class CCF(nn.Module):
        def __init__(self, depth, widen, num_classes, input_channels, leak=0.2):
            super().__init__()
            self.f = WideResNet(depth, widen, num_classes, input_channels, leak)
            self.energy_output = nn.Linear(self.f.last_dim, 1)  # unused by CCF
            self.class_output = nn.Linear(self.f.last_dim, num_classes)

        def classify(self, x):
            return self.class_output(self.f(x))

        def forward(self, x, y=None):
            logits = self.classify(x)
            if y is None:
                return logits.logsumexp(1)
            return torch.gather(logits, 1, y[:, None])


# --------------------------------------------------------------------------
# safetensors and .npy writers (no third-party package needed)

def safetensors_bytes(tensors, metadata):
    """tensors: list of (name, float32 ndarray) in file order."""
    header = {}
    off = 0
    blobs = []
    for name, arr in tensors:
        a = np.ascontiguousarray(arr, dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def jem_metadata(arch, name, temperature):
    meta = {"arch": arch, "name": name, "temperature": temperature}
    return {"jem": json.dumps(meta)}


def arch_dict(depth, widen, in_channels, num_classes, leak=0.2):
    return {"family": "wrn", "depth": depth, "widen": widen,
            "in_channels": in_channels, "image_size": 32,
            "num_classes": num_classes, "norm": "none", "leak": leak}


def write_model(path, model, arch, name, temperature=1.0):
    tensors = [(k, v.detach().cpu().numpy()) for k, v in model.state_dict().items()]
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, jem_metadata(arch, name, temperature)))


def read_model(path, model):
    """Loads a safetensors file written by jem or by this script into model."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    base = 8 + hlen
    state = model.state_dict()
    for k in list(state.keys()):
        if k not in header:
            if k.startswith("f.linear.") or k.startswith("energy_output."):
                continue  # jem does not write the unused layers
            raise KeyError(f"{path}: tensor {k} missing")
        e = header[k]
        if e["dtype"] != "F32":
            raise ValueError(f"{path}: {k} has dtype {e['dtype']}")
        a, b = e["data_offsets"]
        arr = np.frombuffer(data[base + a:base + b], dtype="<f4").reshape(e["shape"])
        state[k] = torch.from_numpy(arr.copy())
    model.load_state_dict(state)
    meta = json.loads(header.get("__metadata__", {}).get("jem", "{}"))
    return meta


# --------------------------------------------------------------------------

CASES = [
    # name, depth, widen, in_channels, classes, seed, parameter gradients,
    # class-conditional input gradients, fraction of large conv weights kept,
    # batch.  Together: 1 and 3 channels, 1 and 2 blocks per stage, widen 1
    # (no shortcut in layer1) and 2 (a stride-1 1x1 shortcut in layer1).
    ("wrn10-1-c1-k10", 10, 1, 1, 10, 1, True, True, 1.0, 8),
    ("wrn16-1-c3-k7", 16, 1, 3, 7, 2, False, False, 0.15, 8),
    ("wrn10-2-c1-k5", 10, 2, 1, 5, 3, False, True, 0.1, 4),
]

CONV_GAIN = 2.0
HEAD_GAIN = 4.0


def scale_and_round(model, keep):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 4:
                p.mul_(CONV_GAIN)
                if keep < 1 and p.numel() > 4096:
                    # zero a random part; rescale the rest to keep the scale
                    mask = (torch.rand(p.shape) < keep).float()
                    p.mul_(mask / keep ** 0.5)
            elif name == "class_output.weight":
                p.mul_(HEAD_GAIN)
        for p in model.parameters():
            bits = p.data.view(torch.int32)
            # round to nearest even at bit 16, then clear the low half
            lsb = (bits >> 16) & 1
            bits.add_(0x7FFF + lsb).bitwise_and_(-65536)


def write_gz(path, data):
    # mtime=0 and no file name: the same inputs give the same bytes
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9,
                           fileobj=raw, mtime=0) as f:
            f.write(data)


def save_npy(path, arr):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    write_gz(path + ".gz", buf.getvalue())


def make_case(outdir, name, depth, widen, cin, k, seed, pgrad, gy, keep, n):
    torch.manual_seed(seed)
    model = CCF(depth, widen, k, cin)
    scale_and_round(model, keep)
    model.eval()
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    tensors = [(kk, v.detach().numpy()) for kk, v in model.state_dict().items()]
    write_gz(os.path.join(d, "model.safetensors.gz"),
             safetensors_bytes(tensors, jem_metadata(
                 arch_dict(depth, widen, cin, k), "golden-" + name, 1.5)))

    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randint(0, 256, (n, cin, 32, 32), generator=g).float() / 255 * 2 - 1
    x[n - 2] = torch.randn(cin, 32, 32, generator=g) * 2.5
    x[n - 1] = 1.5
    y = torch.randint(0, k, (n,), generator=g)

    xg = x.clone().requires_grad_(True)
    logits = model.classify(xg)
    lse = logits.logsumexp(1)
    (gx_lse,) = torch.autograd.grad(lse.sum(), xg)
    xg2 = x.clone().requires_grad_(True)
    fy = model(xg2, y)
    (gx_y,) = torch.autograd.grad(fy.sum(), xg2)

    save_npy(os.path.join(d, "x.npy"), x.numpy().astype("<f4"))
    save_npy(os.path.join(d, "y.npy"), y.numpy().astype("<i4"))
    save_npy(os.path.join(d, "logits.npy"), logits.detach().numpy().astype("<f4"))
    save_npy(os.path.join(d, "energy.npy"), (-lse).detach().numpy().astype("<f4"))
    save_npy(os.path.join(d, "gx_lse.npy"), gx_lse.numpy().astype("<f4"))
    if gy:
        save_npy(os.path.join(d, "gx_y.npy"), gx_y.numpy().astype("<f4"))

    if pgrad:
        model.zero_grad()
        loss = F.cross_entropy(model.classify(x), y, reduction="mean")
        loss.backward()
        names, flat = [], []
        for pname, p in model.named_parameters():
            if pname.startswith("f.linear.") or pname.startswith("energy_output."):
                continue  # not part of the computation
            names.append(f"{pname} {p.numel()}")
            flat.append(p.grad.detach().reshape(-1))
        save_npy(os.path.join(d, "pgrad.npy"), torch.cat(flat).numpy().astype("<f4"))
        write_gz(os.path.join(d, "pgrad.txt.gz"), ("\n".join(names) + "\n").encode())

    make_feature_gauss(d, model, x, k, seed)

    print(f"{name}: logits max |.| {logits.abs().max().item():.4g}, "
          f"|gx_lse| {gx_lse.norm().item():.4g}, |gx_y| {gx_y.norm().item():.4g}")


def make_feature_gauss(d, model, x, k, seed):
    """A feature Gaussian (class means [k,F], whitener W [F,F] lower
    triangular) and the mahalanobis score of each x: min over classes of
    (f - mean_k)^T P (f - mean_k) with P = W^T W, computed in float64 from
    the penultimate features f = model.f(x).  The means sit near the batch's
    own features so that the distances are of a realistic size."""
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        f = model.f(x).double()
    F_ = f.shape[1]
    mean = f.mean(0, keepdim=True) + 0.5 * f.std(0, keepdim=True) * torch.randn(k, F_, generator=g,
                                                                               dtype=torch.float64)
    W = torch.tril(torch.randn(F_, F_, generator=g, dtype=torch.float64)) * 0.2 / F_ ** 0.5
    W += torch.diag(torch.rand(F_, generator=g, dtype=torch.float64) + 0.5) / (f.std(0) + 1e-3)
    W = W.float().double()          # the values the C side reads
    mean = mean.float().double()
    P = W.T @ W
    dev = f[:, None, :] - mean[None, :, :]                      # [n, k, F]
    maha = torch.einsum("nkf,fg,nkg->nk", dev, P, dev).min(1).values
    save_npy(os.path.join(d, "feat_mean.npy"), mean.numpy().astype("<f4"))
    save_npy(os.path.join(d, "feat_whiten.npy"), W.numpy().astype("<f4"))
    save_npy(os.path.join(d, "maha.npy"), maha.numpy().astype("<f4"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    if torch is None:
        sys.exit("make_golden.py: needs torch (Debian: python3-torch); use /usr/bin/python3")
    torch.set_num_threads(1)
    for c in CASES:
        make_case(args.out, *c)


if __name__ == "__main__":
    main()
