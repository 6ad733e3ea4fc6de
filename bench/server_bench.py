#!/usr/bin/python3
"""server_bench.py - `make bench-server`: HTTP throughput and latency of jemd.

Starts the release daemon on the shipped model (models/fmnist-jem.safetensors,
else a random WRN-10-1), drives POST /v1/classify with a real Fashion-MNIST
PNG through wrk at 1, 16 and 64 connections (~10 s each) and reports
requests/s, p50 and p99; measures the core's in-process images/s for the same
work (decode + score with gradient, batch 64; build/bench/bench_decode_score)
and the ratio HTTP(64 connections) / in-process (target >= 0.8); and the
daemon's resident memory.  A running `jem train` is paused (SIGSTOP) for the
duration and always resumed.

usage: /usr/bin/python3 bench/server_bench.py --build build [--seconds 10]
"""
import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

from training import pause, resume, training_pids

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import jemtest  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"

LUA = """
local f = assert(io.open(os.getenv("JEMD_BENCH_IMAGE"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "image/png"
"""


def fmnist_png(path, index=0):
    import numpy as np
    if os.path.exists(FMNIST):
        with gzip.open(FMNIST, "rb") as f:
            data = f.read()
        img = np.frombuffer(data, dtype=np.uint8, offset=16 + 784 * index, count=784)
        arr = img.reshape(28, 28)
    else:
        yy, xx = np.mgrid[0:28, 0:28]
        arr = (127 + 120 * np.sin(xx * 0.3 + yy * 0.2)).astype(np.uint8)
    with open(path, "wb") as f:
        f.write(jemtest.png_bytes(arr))


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def run_wrk(port, conns, seconds, lua, image):
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", lua,
           f"http://127.0.0.1:{port}/v1/classify"]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, JEMD_BENCH_IMAGE=image)).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    return {"connections": conns, "rps": rps, "p50_ms": p50, "p99_ms": p99,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errs.group(0) if errs else ""}


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", default="1,16,64")
    ap.add_argument("--daemon-args", default="", help="extra jemd flags")
    args = ap.parse_args()
    build = args.build if os.path.isabs(args.build) else os.path.join(ROOT, args.build)
    tmp = tempfile.mkdtemp(prefix="jemd-bench-")
    model = os.path.join(ROOT, "models", "fmnist-jem.safetensors")
    if not os.path.exists(model):
        model = os.path.join(tmp, "random-wrn-10-1.safetensors")
        jemtest.write_model(model, seed=1, name="random-wrn-10-1")
        print("server_bench: models/fmnist-jem.safetensors is absent; using a random WRN-10-1",
              flush=True)
    image = os.path.join(tmp, "fmnist0.png")
    fmnist_png(image)
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write(LUA)

    paused = pause(training_pids())
    if paused:
        print(f"server_bench: paused training {paused}", flush=True)
    d = None
    try:
        results = {"model": os.path.basename(model), "cpus": os.cpu_count()}
        d = jemtest.Daemon(os.path.join(build, "jemd"), model, "--log-level", "warn",
                           *args.daemon_args.split())
        # warm-up (workspaces are planned on first use)
        for _ in range(20):
            d.request("POST", "/v1/classify", open(image, "rb").read(),
                      {"Content-Type": "image/png"})
        st, _, m = d.request("GET", "/metrics")
        core = re.search(r'blas_core="([^"]*)"', m.decode())
        results["blas_core"] = core.group(1) if core else "?"
        results["rss_idle_kib"] = rss_kib(d.proc.pid)["VmRSS"]
        http = []
        for c in [int(x) for x in args.conns.split(",")]:
            r = run_wrk(d.port, c, args.seconds, lua, image)
            print(f"  wrk {c:3d} connections: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms"
                  f"  p99 {r['p99_ms']:7.2f} ms  non-2xx {r['non2xx']}", flush=True)
            http.append(r)
        results["http"] = http
        mem = rss_kib(d.proc.pid)
        results["rss_kib"] = mem["VmRSS"]
        results["rss_peak_kib"] = mem["VmHWM"]
        st, _, m = d.request("GET", "/metrics")
        t = m.decode()
        bs = re.search(r"^jem_batch_size_sum (\S+)", t, re.M)
        bc = re.search(r"^jem_batch_size_count (\S+)", t, re.M)
        if bs and bc and float(bc.group(1)) > 0:
            results["mean_batch"] = float(bs.group(1)) / float(bc.group(1))
        d.signal(signal.SIGTERM)
        d.wait(30)
        d = None
        # in-process baseline, same work: best of the daemon's layout (one
        # worker per CPU, 1 BLAS thread) and one worker with all BLAS threads
        ncpu = os.cpu_count() or 1
        inproc = []
        for workers, threads in ((ncpu, 1), (1, ncpu)):
            out = subprocess.run([os.path.join(build, "bench", "bench_decode_score"), model, image,
                                  "--batch", "64", "--seconds", "5", "--workers", str(workers),
                                  "--blas-threads", str(threads)],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                inproc.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  in-process decode+score, batch 64, {workers} worker(s) x {threads} BLAS"
                      f" thread(s): {inproc[-1]['img_s']:.1f} img/s", flush=True)
            else:
                print("server_bench: bench_decode_score failed: " + out.stderr, file=sys.stderr)
        results["inprocess"] = inproc
        if inproc:
            best = max(r["img_s"] for r in inproc)
            h64 = [r for r in http if r["connections"] == 64]
            if h64:
                results["ratio_64"] = h64[0]["rps"] / best
                print(f"  ratio HTTP@64 / in-process@64: {results['ratio_64']:.2f} (target >= 0.8)")
        print(f"  daemon RSS: {results['rss_kib'] / 1024:.1f} MiB (peak "
              f"{results['rss_peak_kib'] / 1024:.1f} MiB, idle {results['rss_idle_kib'] / 1024:.1f} MiB)")
        print(json.dumps(results))
        return 0
    finally:
        if d is not None:
            d.kill()
        resume(paused)
        if paused:
            print(f"server_bench: resumed training {paused}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
