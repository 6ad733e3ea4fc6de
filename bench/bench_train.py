#!/usr/bin/python3
"""bench_train.py - one JEM training iteration: the core's trainer vs PyTorch.

Runs build/bench/bench_train (batch 64, K=20 SGLD steps, replay buffer 10000,
reinit 0.05, Adam; best of 1 and 2 BLAS threads), then the same iteration in
PyTorch written as the official train_wrn_ebm.py does it (SGLD with
autograd.grad on f(x).sum() in eval mode, then L = -(mean f(x_data) - mean
f(x_q)) + CE(classify(x_lab), y_lab), backward, Adam step), at its best of 1
and 2 threads, same architecture and weights.  Prints both, split into the
SGLD part and the loss/backward/Adam part, with the ratios (target: the whole
iteration at least 1.4x faster than PyTorch).  The machines here are noisy, so
core and PyTorch alternate for --rounds rounds and the ratio is taken between
the medians of each side's per-round best.

A running `jem train` makes the figures meaningless: it is paused (SIGSTOP)
for the run and always resumed (SIGCONT); --no-pause refuses instead.

usage: /usr/bin/python3 bench/bench_train.py --build build [--iters 3] [--k 20] [--rounds 3]
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from training import pause, resume, training_pids

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = 1.4

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None


def golden():
    path = os.path.join(ROOT, "tests", "ref", "make_golden.py")
    spec = importlib.util.spec_from_file_location("make_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_core(build, k, iters, model):
    exe = os.path.join(build, "bench", "bench_train")
    cmd = [exe, "--k", str(k), "--iters", str(iters), "--threads", "1,2"]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def torch_iteration(g, model_path, arch, k, iters, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = g.CCF(arch["depth"], arch["widen"], arch["num_classes"], arch["in_channels"],
                  arch.get("leak", 0.2))
    g.read_model(model_path, model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    B, buf_n = 64, 10000
    c, s, nk = arch["in_channels"], arch["image_size"], arch["num_classes"]
    data_x = torch.rand(1024, c, s, s) * 2 - 1
    data_y = torch.randint(0, nk, (1024,))
    buffer = torch.rand(buf_n, c, s, s) * 2 - 1

    def sgld():
        idx = torch.randint(0, buf_n, (B,))
        x0 = buffer[idx]
        fresh = torch.rand(B, c, s, s) * 2 - 1
        keep = (torch.rand(B) >= 0.05).float()[:, None, None, None]
        x_k = (keep * x0 + (1 - keep) * fresh).clone().requires_grad_(True)
        model.eval()
        for _ in range(k):
            fp = torch.autograd.grad(model(x_k).sum(), [x_k], retain_graph=True)[0]
            x_k.data += 1.0 * fp + 0.01 * torch.randn_like(x_k)
        model.train()
        xq = x_k.detach()
        buffer[idx] = xq
        return xq

    def loss_pass(xq):
        i1 = torch.randint(0, 1024, (B,))
        i2 = torch.randint(0, 1024, (B,))
        x_lab = data_x[i1] + 0.03 * torch.randn(B, c, s, s)
        x_p_d = data_x[i2] + 0.03 * torch.randn(B, c, s, s)
        l_px = -(model(x_p_d).mean() - model(xq).mean())
        l_pyx = F.cross_entropy(model.classify(x_lab), data_y[i1])
        loss = l_px + l_pyx
        opt.zero_grad()
        loss.backward()
        opt.step()

    xq = sgld()  # warm-up
    loss_pass(xq)
    ts = tl = 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        xq = sgld()
        t1 = time.perf_counter()
        loss_pass(xq)
        t2 = time.perf_counter()
        ts += t1 - t0
        tl += t2 - t1
    return {"threads": threads, "sgld_s": ts / iters, "loss_pass_s": tl / iters,
            "iter_s": (ts + tl) / iters}


def main():
    ap = argparse.ArgumentParser(description="JEM training iteration: core vs PyTorch")
    ap.add_argument("--build", default="build")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-pause", action="store_true")
    args = ap.parse_args()
    if not args.build.startswith("/"):
        args.build = os.path.join(ROOT, args.build)

    pids = training_pids()
    if pids and args.no_pause:
        print(f"bench_train.py: `jem train` is running ({pids}); not benchmarking")
        return 1
    paused = []
    tmp = tempfile.mkdtemp(prefix="jem-bench-train-")

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        paused = pause(pids)
        if paused:
            print(f"bench_train.py: paused training run(s) {paused} for the benchmark")
            time.sleep(0.5)
        load1 = os.getloadavg()[0]
        if load1 > 1.0:
            print(f"bench_train.py: note: load average {load1:.2f}; other work lowers the figures")

        arch = {"depth": 10, "widen": 1, "in_channels": 1, "image_size": 32,
                "num_classes": 10, "leak": 0.2}
        model = None
        g = None
        if torch is not None:
            g = golden()
            torch.manual_seed(0)
            net = g.CCF(10, 1, 10, 1)
            model = os.path.join(tmp, "wrn10-1.safetensors")
            g.write_model(model, net, g.arch_dict(10, 1, 1, 10), "wrn10-1-random")
        rounds = []
        for i in range(max(1, args.rounds)):
            core = run_core(args.build, args.k, args.iters, model)
            tres = ([torch_iteration(g, model, arch, args.k, args.iters, t) for t in (1, 2)]
                    if torch is not None else [])
            rounds.append((core, tres))
            cb = min(core, key=lambda r: r["iter_s"])
            line = f"  round {i + 1}: core {cb['iter_s']:.3f} s ({cb['threads']} thr)"
            if tres:
                tb = min(tres, key=lambda r: r["iter_s"])
                line += (f", PyTorch {tb['iter_s']:.3f} s ({tb['threads']} thr): "
                         f"{tb['iter_s'] / cb['iter_s']:.2f}x")
            print(line, flush=True)

        def median_row(rows):
            """The row whose iteration time is the median (rounds are odd or the lower)."""
            rows = sorted(rows, key=lambda r: r["iter_s"])
            return rows[(len(rows) - 1) // 2]
        cbest = median_row([min(c, key=lambda r: r["iter_s"]) for c, _ in rounds])
        print(f"JEM training iteration, WRN-10-1 (1x32x32), batch 64, K={args.k} "
              f"(BLAS core {cbest.get('blas_core')}); median of {len(rounds)} rounds")
        print(f"  {'':22s} {'SGLD s':>8s} {'loss+bwd s':>11s} {'iteration s':>12s}")
        for t in (1, 2):
            r = median_row([x for c, _ in rounds for x in c if x["threads"] == t])
            print(f"  core, {t} thread(s)       {r['sgld_s']:8.3f} "
                  f"{r['loss_pass_s']:11.3f} {r['iter_s']:12.3f}")
        if torch is None:
            print("  PyTorch not available: core figures only")
            return 0
        for t in (1, 2):
            r = median_row([x for _, tr in rounds for x in tr if x["threads"] == t])
            print(f"  PyTorch {torch.__version__}, {t} thread(s) "
                  f"{r['sgld_s']:8.3f} {r['loss_pass_s']:11.3f} {r['iter_s']:12.3f}")
        tbest = median_row([min(tr, key=lambda r: r["iter_s"]) for _, tr in rounds])
        ratio = tbest["iter_s"] / cbest["iter_s"]
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"  median best: core {cbest['iter_s']:.3f} s ({cbest['threads']} thr) vs PyTorch "
              f"{tbest['iter_s']:.3f} s ({tbest['threads']} thr): {ratio:.2f}x "
              f"(target {TARGET}x: {verdict})")
        print(json.dumps({"bench": "train_iter", "rounds": [{"core": c, "torch": tr}
                                                             for c, tr in rounds],
                          "core_median_best": cbest, "torch_median_best": tbest,
                          "ratio": ratio}))
        return 0
    finally:
        resume(paused)
        if paused:
            print(f"bench_train.py: resumed {paused}")
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    sys.exit(main())
