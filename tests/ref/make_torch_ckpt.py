#!/usr/bin/python3
"""make_torch_ckpt.py - torch.save checkpoints for `jem import` and the C reader.

Defines the official JEM Wide_ResNet + CCF head (wgrathwohl/JEM wideresnet.py,
norms.py and train_wrn_ebm.py, written here from their description in
../shared/notes/jem.md: get_norm None/batch/instance/layer/act, dropout 0,
LeakyReLU 0.2) and writes, under tests/ref/torch/ (every file gzip-compressed):

  <case>.pt          a checkpoint written by torch.save itself, one per case:
    none-zip         the official {"model_state_dict", "replay_buffer"} dict,
                     zip format (PyTorch >= 1.6)
    none-legacy      the same, legacy format (_use_new_zipfile_serialization=False)
    dp-legacy        {"state_dict": ...} with DataParallel's "module." prefixes,
                     class_output.bias a view at an offset into a larger
                     storage and f.conv1.weight a non-contiguous (transposed)
                     view, legacy format; no replay buffer
    bare-zip         a bare state_dict with a non-contiguous class_output.weight,
                     float64 and float16 storages mixed in, zip format
    batch-zip, act-zip, instance-zip, layer-zip
                     the official dict for each official norm (running
                     statistics, ActNorm loc/scale set by data-dependent
                     initialisation, random affine parameters)
  <case>.json        for each case: "arch" (depth, widen, in_channels,
                     num_classes, norm), the expected inputs' scores of the
                     module in eval mode: "logits" [N][K], "energy" [N]
                     (-logsumexp) and "grad_norm" [N] (||d logsumexp / dx||),
                     "pgrad": {name: flat list}, the gradients of
                     CrossEntropy(logits, i % K) (mean) for every norm tensor
                     and a few biases, in float64, with "pgrad_f32_err":
                     PyTorch's own float32 relative error on each, and "gx0":
                     d logsumexp f / dx of image 0 (float32, as PyTorch runs);
                     these three only for none-zip and the norm cases
  x.npy              the shared input batch [N,3,32,32] float32 in [-1,1]

Models are WRN-10-1 with 3 input channels and 4 classes, weights rounded to
multiples of 1/32 and most large conv weights zeroed (the rest scaled up), so
the files compress; both sides still compute in float32.

Run with Debian's Python (torch 1.13):  /usr/bin/python3 tests/ref/make_torch_ckpt.py
The tests use the committed files and do not need torch.
"""
import copy
import gzip
import io
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "torch")
DEPTH, WIDEN, CHANNELS, CLASSES, BATCH = 10, 1, 3, 4, 6


class ActNorm(nn.Module):
    """norms.ActNorm(C, logdet=False): y = scale * (x + loc), data-dependent init."""

    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x):
        if self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
                self.loc.data.copy_(-flat.mean(1).view(1, -1, 1, 1))
                self.scale.data.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def get_norm(c, norm):
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(c, momentum=0.9)
    if norm == "instance":
        return nn.InstanceNorm2d(c, affine=True)
    if norm == "layer":
        return nn.GroupNorm(1, c)
    return ActNorm(c)


class WideBasic(nn.Module):
    def __init__(self, cin, planes, stride, norm):
        super().__init__()
        self.lrelu = nn.LeakyReLU(0.2)
        self.bn1 = get_norm(cin, norm)
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, bias=True)
        self.bn2 = get_norm(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=True))

    def forward(self, x):
        out = self.conv1(self.lrelu(self.bn1(x)))
        out = self.conv2(self.lrelu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, depth, k, classes, cin, norm):
        super().__init__()
        n = (depth - 4) // 6
        st = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(cin, st[0], 3, padding=1, bias=True)
        self.in_planes = st[0]
        layers = []
        for planes, stride in ((st[1], 1), (st[2], 2), (st[3], 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(self.in_planes, planes, s, norm))
                self.in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn1 = get_norm(st[3], norm)
        self.lrelu = nn.LeakyReLU(0.2)
        self.linear = nn.Linear(st[3], classes)  # unused by CCF

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.avg_pool2d(self.lrelu(self.bn1(out)), 8)
        return out.view(out.size(0), -1)


class CCF(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.f = WideResNet(DEPTH, WIDEN, CLASSES, CHANNELS, norm)
        self.energy_output = nn.Linear(64 * WIDEN, 1)  # unused by CCF
        self.class_output = nn.Linear(64 * WIDEN, CLASSES)

    def forward(self, x):
        return self.class_output(self.f(x))


def grid(t):
    """Rounds to multiples of 1/32: exact in float16 too, and compresses."""
    return torch.round(t.detach() * 32) / 32


def build(norm, seed):
    torch.manual_seed(seed)
    m = CCF(norm)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 4 and p.numel() > 2000:
                keep = (torch.rand(p.shape, generator=g) < 0.1).float()
                p.mul_(keep * 3.0)
            if p.dim() == 4:
                p.mul_(2.0)
            if name.startswith("class_output.weight"):
                p.mul_(4.0)
            if norm in ("instance", "layer", "batch") and p.dim() == 1 and ".bn" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if norm == "batch":
            for name, b in m.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
                elif name.endswith("running_var"):
                    b.copy_(0.5 + torch.rand(b.shape, generator=g))
                elif name.endswith("num_batches_tracked"):
                    b.fill_(1234)
        if norm == "act":  # the official data-dependent initialisation, then perturbed
            m.train()
            m(torch.rand(8, CHANNELS, 32, 32, generator=g) * 2 - 1)
            for name, p in m.named_parameters():
                if name.endswith(".loc") or name.endswith(".scale"):
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                if name.endswith(".scale"):  # channels the sparse weights left
                    p.clamp_(-4, 4)          # constant get 1/(0+1e-6): tame them
        for p in list(m.parameters()) + [b for b in m.buffers() if b.dtype == torch.float32]:
            p.copy_(grid(p))
    m.eval()
    return m


def scores(m, x, grads):
    x = x.clone().requires_grad_(True)
    logits = m(x)
    lse = logits.logsumexp(1)
    (g,) = torch.autograd.grad(lse.sum(), x)
    out = {"logits": logits.detach().tolist(), "energy": (-lse).detach().tolist(),
           "grad_norm": g.flatten(1).norm(dim=1).tolist()}
    if not grads:
        return out
    # parameter gradients of CrossEntropy(logits, i % K) (mean over the batch)
    # for the norm layers and a few biases, in eval mode
    # computed in float64 (a copy of the module): the exact value both float32
    # implementations approximate
    # implementations approximate; "pgrad_f32_err" holds PyTorch's own float32
    # relative error for each, as some sums cancel (and some are exactly 0)
    m64 = copy.deepcopy(m).double()
    y = torch.arange(x.shape[0]) % CLASSES
    F.cross_entropy(m64(x.detach().double()), y).backward()
    m.zero_grad()
    F.cross_entropy(m(x.detach()), y).backward()
    g32 = dict(m.named_parameters())
    keep = [k for k, _ in m64.named_parameters()
            if ".bn" in k or k in ("class_output.bias", "f.conv1.bias",
                                   "f.layer1.0.conv1.bias", "f.layer3.0.conv2.bias")]
    p64 = dict(m64.named_parameters())
    out["pgrad"] = {k: p64[k].grad.flatten().tolist() for k in keep}
    out["pgrad_f32_err"] = {
        k: ((g32[k].grad.double() - p64[k].grad).norm() / p64[k].grad.norm().clamp_min(1e-30)).item()
        for k in keep}
    # d logsumexp f / dx of image 0, as PyTorch computes it (float32: the
    # float64 value differs by up to 8e-3 here, for PyTorch as for jem)
    x0 = x.detach()[:1].clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(m(x0).logsumexp(1).sum(), x0)
    out["gx0"] = g0.flatten().tolist()
    return out


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype="<f4"))
    return buf.getvalue()


def write_gz(name, data):
    with gzip.GzipFile(os.path.join(OUT, name + ".gz"), "wb", mtime=0) as f:
        f.write(data)


def save(name, obj, legacy):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    write_gz(name + ".pt", buf.getvalue())


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    x = torch.round((torch.rand(BATCH, CHANNELS, 32, 32, generator=g) * 2 - 1) * 127) / 127
    write_gz("x.npy", npy_bytes(x.numpy()))
    # replay buffer: 8 images on a coarse grid (compresses), shape [8,3,32,32]
    buf = torch.round((torch.rand(8, CHANNELS, 32, 32, generator=g) * 2 - 1) * 4) / 4

    cases = []
    m = build(None, 1)
    sd = m.state_dict()
    save("none-zip", {"model_state_dict": sd, "replay_buffer": buf}, False)
    save("none-legacy", {"model_state_dict": sd, "replay_buffer": buf}, True)
    cases += [("none-zip", "none", m), ("none-legacy", "none", m)]

    # DataParallel prefixes, views at an offset and non-contiguous tensors
    dp = {}
    for k, v in sd.items():
        dp["module." + k] = v
    big = torch.zeros(3 + CLASSES + 5)
    big[3:3 + CLASSES] = sd["class_output.bias"]
    dp["module.class_output.bias"] = big[3:3 + CLASSES]
    w = sd["f.conv1.weight"]
    dp["module.f.conv1.weight"] = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert not dp["module.f.conv1.weight"].is_contiguous()
    save("dp-legacy", {"state_dict": dp, "epoch": 12, "note": "DataParallel"}, True)
    cases.append(("dp-legacy", "none", m))

    bare = dict(sd)
    bare["class_output.weight"] = sd["class_output.weight"].t().contiguous().t()
    bare["class_output.bias"] = sd["class_output.bias"].double()
    bare["f.conv1.bias"] = sd["f.conv1.bias"].half()  # exact: on the 1/32 grid
    assert torch.equal(bare["f.conv1.bias"].float(), sd["f.conv1.bias"])
    save("bare-zip", bare, False)
    cases.append(("bare-zip", "none", m))

    for i, norm in enumerate(("batch", "act", "instance", "layer")):
        mn = build(norm, 10 + i)
        save(norm + "-zip", {"model_state_dict": mn.state_dict(), "replay_buffer": buf}, False)
        cases.append((norm + "-zip", norm, mn))

    for name, norm, model in cases:
        out = {"arch": {"depth": DEPTH, "widen": WIDEN, "in_channels": CHANNELS,
                        "num_classes": CLASSES, "norm": norm}}
        out.update(scores(model, x, name == "none-zip" or norm != "none"))
        write_gz(name + ".json", json.dumps(out).encode())
    print("wrote", OUT)


if __name__ == "__main__":
    main()
