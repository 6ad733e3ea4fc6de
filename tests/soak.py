#!/usr/bin/python3
"""soak.py - `make soak`: a few minutes of mixed good and hostile traffic
against a loopback jemd, then a report: errors, p99 latencies, and the
daemon's resident size at start, peak and end.  Fails (exit 1) on any
unexpected answer, a dead daemon, or an end resident size more than 20%
above the start.

Phase 1 (hold): 300 connections each send all but the last byte of an
8 MiB body and hold it, while an SGLD job runs; the daemon runs inside a
2 GiB memory cgroup when this machine lets root make one (cgroup v1 or
v2), else its peak resident size is compared with the 2 GiB.  It must
survive with its job intact.  Phase 2 (mix): for --seconds, clients score
images, run jobs and probe health, while others send smuggling attempts,
JSON bombs, inflation-bomb and corrupt PNGs, chunked bodies past the cap,
held partial bodies, query floods and encoded slashes.  Loopback only.

usage: /usr/bin/python3 tests/soak.py --build build [--seconds 150]
"""
import argparse
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "integration"))
import jemtest  # noqa: E402

MiB = 1 << 20
LIMIT = 2 << 30  # deploy/'s MemoryMax / memory limit


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Cgroup:
    """A memory cgroup of LIMIT bytes for one process, v2 or v1; None when
    this machine does not allow it (not root, no controller)."""

    def __init__(self, pid):
        self.path = None
        name = f"jemd-soak-{os.getpid()}"
        for base, limit, peak in (("/sys/fs/cgroup", "memory.max", "memory.peak"),
                                  ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                   "memory.max_usage_in_bytes")):
            p = os.path.join(base, name)
            try:
                if not os.path.exists(os.path.join(base, limit if base.endswith("memory")
                                                   else "cgroup.controllers")):
                    continue
                os.mkdir(p)
                with open(os.path.join(p, limit), "w") as f:
                    f.write(str(LIMIT))
                with open(os.path.join(p, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
                self.path, self.peak_file = p, os.path.join(p, peak)
                return
            except OSError:
                try:
                    os.rmdir(p)
                except OSError:
                    pass

    def peak(self):
        try:
            with open(self.peak_file) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def remove(self):
        if self.path:
            for _ in range(50):
                try:
                    os.rmdir(self.path)
                    return
                except OSError:
                    time.sleep(0.1)


class Stats:
    def __init__(self):
        self.mu = threading.Lock()
        self.lat = {}
        self.count = {}
        self.errors = []

    def ok(self, kind, seconds=None):
        with self.mu:
            self.count[kind] = self.count.get(kind, 0) + 1
            if seconds is not None:
                self.lat.setdefault(kind, []).append(seconds)

    def err(self, kind, what):
        with self.mu:
            self.errors.append(f"{kind}: {what}")

    def p99(self, kind):
        v = sorted(self.lat.get(kind, []))
        return v[min(len(v) - 1, int(len(v) * 0.99))] * 1e3 if v else float("nan")


def statuses(out):
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", out)]


def hold_phase(d, stats, n=300, body=8 * MiB):
    """n connections each hold all but the last byte of a `body`-byte body."""
    J = {"Content-Type": "application/json"}
    st, _, job = d.json("POST", "/v1/samples", json.dumps({"n": 8, "steps": 300, "seed": 5}), J)
    if st != 202:
        stats.err("hold", f"job not created ({st})")
        return None
    part = b"\0" * (body - 1)
    socks, refused, lock = [], [0], threading.Lock()

    def opener(k):
        for _ in range(k):
            try:
                s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
                s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          b"Content-Length: %d\r\n\r\n" % body)
                try:
                    s.sendall(part)
                except OSError:
                    with lock:
                        refused[0] += 1  # answered 503 and closed before the body
                with lock:
                    socks.append(s)
            except OSError as e:
                stats.err("hold", f"connect: {e!r}")
    t0 = time.time()
    ts = [threading.Thread(target=opener, args=(n // 10,)) for _ in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(3)
    _, _, m = d.request("GET", "/metrics")
    held = re.search(rb"jem_request_body_bytes (\d+)", m)
    held = int(held.group(1)) if held else -1
    answers = {}
    for s in socks:
        s.setblocking(False)
        try:
            a = s.recv(64)
            k = statuses(a)[0] if statuses(a) else "closed"
        except BlockingIOError:
            k = "held"
        except OSError:
            k = "reset"
        answers[k] = answers.get(k, 0) + 1
    alive = d.proc.poll() is None
    st, _, js = d.json("GET", job["url"]) if alive else (None, None, None)
    for s in socks:
        s.close()
    ok = alive and st == 200 and js.get("status") in ("queued", "running", "succeeded")
    if not ok:
        stats.err("hold", f"daemon alive={alive}, job {st} {js}")
    d.request("DELETE", job["url"]) if alive else None
    return {"connections": len(socks), "answers": answers, "buffered_bytes": held,
            "seconds": round(time.time() - t0, 1), "job_intact": ok}


def mix_phase(d, pp, stats, seconds, hostile_clients=3):
    imgs = jemtest.test_images(16, seed=3)
    png = imgs[0]
    corrupt = png[:41] + b"\xff" * 20 + png[61:]
    bomb = jemtest.png_inflation_bomb()
    json_bomb = b"[" + b",".join([b"{}"] * 2_000_000) + b"]"
    v2 = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 32, 32],
                                 "data": [0.1] * 2048}]})
    H, J = {"Content-Type": "image/png"}, {"Content-Type": "application/json"}
    end = time.time() + seconds
    smuggle = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
               b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")

    def expect(kind, fn, want):
        t0 = time.time()
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001
            stats.err(kind, repr(e))
            return
        if got in want:
            stats.ok(kind, time.time() - t0)
        else:
            stats.err(kind, f"got {got}, want {want}")

    def good(i):
        rng = random.Random(i)
        while time.time() < end:
            r = rng.random()
            if r < 0.6:
                expect("classify", lambda: d.request("POST", "/v1/classify", rng.choice(imgs),
                                                     H)[0], (200,))
            elif r < 0.8:
                expect("v2_infer", lambda: d.request("POST", "/v2/models/testnet/infer", v2,
                                                     J)[0], (200,))
            elif r < 0.85:
                def job():
                    st, _, js = d.json("POST", "/v1/samples", json.dumps(
                        {"n": 4, "steps": 20}), J)
                    if st != 202:
                        return st
                    for _ in range(600):
                        st2, _, j2 = d.json("GET", js["url"])
                        if j2.get("status") not in ("queued", "running"):
                            break
                        time.sleep(0.05)
                    d.request("DELETE", js["url"])
                    return j2.get("status")
                expect("job", job, ("succeeded", 429))
            else:
                expect("healthz", lambda: d.request("GET", "/healthz")[0], (200,))

    def probes():
        while time.time() < end:
            expect("probe_healthz", lambda: statuses(d.raw(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5,
                shut=False, port=pp)), ([200],))
            time.sleep(0.2)

    def hostile(i):
        rng = random.Random(100 + i)
        while time.time() < end:
            r = rng.randrange(9)
            if r == 0:
                expect("smuggle", lambda: statuses(d.raw(smuggle, timeout=5, shut=False)), ([400],))
            elif r == 1:
                expect("json_bomb", lambda: d.request("POST", "/v1/samples", json_bomb, J)[0],
                       (413,))
            elif r == 2:
                expect("png_bomb", lambda: d.request("POST", "/v1/classify", bomb, H)[0], (413,))
            elif r == 3:
                expect("corrupt_png", lambda: d.request("POST", "/v1/classify", corrupt, H)[0],
                       (400,))
            elif r == 4:
                def chunked():
                    return statuses(jemtest.chunked_post(d.port, 10 * MiB, chunk=MiB))
                expect("chunked_over", chunked, ([413], [503]))
            elif r == 5:
                def held():
                    s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
                    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png"
                              b"\r\nContent-Length: %d\r\n\r\n" % (8 * MiB))
                    try:
                        s.sendall(b"\0" * (4 * MiB))
                    except OSError:
                        pass
                    time.sleep(rng.uniform(0.5, 3))
                    s.close()
                    return 0
                expect("held_body", held, (0,))
            elif r == 6:
                q = "&".join(f"a{k}=1" for k in range(1500))
                expect("query_flood", lambda: d.request("GET", "/healthz?" + q)[0], (400,))
            elif r == 7:
                expect("encoded_slash", lambda: d.request(
                    "GET", "/v2/models/testnet%2fready")[0], (400,))
            else:
                expect("no_host", lambda: statuses(d.raw(b"GET /healthz HTTP/1.1\r\n\r\n",
                                                         timeout=5, shut=False)), ([400],))

    ts = ([threading.Thread(target=good, args=(i,)) for i in range(4)] +
          [threading.Thread(target=hostile, args=(i,)) for i in range(hostile_clients)] +
          [threading.Thread(target=probes)])
    for t in ts:
        t.start()
    for t in ts:
        t.join()


class Sampler(threading.Thread):
    """The daemon's resident size every 0.1 s; peak() over a time window."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), rss_kb(self.pid)))
            time.sleep(0.1)

    def peak(self, t0, t1):
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--seconds", type=int, default=150)
    args = ap.parse_args()
    build = os.path.join(ROOT, args.build) if not os.path.isabs(args.build) else args.build
    tmp = tempfile.mkdtemp(prefix="jemd-soak-")
    model = os.path.join(tmp, "model.safetensors")
    jemtest.write_model(model, seed=7, name="testnet")
    # loopback is one address: no per-address cap, so that 300 connections get in
    d = jemtest.Daemon(os.path.join(build, "jemd"), model, "--probe-port", "0",
                       "--max-connections-per-ip", "0", "--timeout", "30")
    pp = next(int(m.group(1)) for m in (re.match(r"jemd: probes on http://\S+:(\d+)", ln)
                                        for ln in d.lines) if m)
    cg = Cgroup(d.proc.pid)
    stats = Stats()
    sampler = Sampler(d.proc.pid)
    sampler.start()
    t0 = time.time()
    try:
        rss_boot = rss_kb(d.proc.pid)
        th = time.time()
        hold = hold_phase(d, stats)
        hold_peak = sampler.peak(th, time.time())
        # warm-up, good traffic only: every worker's workspace, job buffers
        mix_phase(d, pp, Stats(), 10, hostile_clients=0)
        time.sleep(2)
        rss_start = rss_kb(d.proc.pid)
        tm = time.time()
        mix_phase(d, pp, stats, args.seconds)
        peak = sampler.peak(tm, time.time())
        time.sleep(2)  # the heap trim runs on the main thread's next tick
        rss_end = rss_kb(d.proc.pid)
        alive = d.proc.poll() is None
        cg_peak = cg.peak()
        d.signal(signal.SIGTERM)
        rc = d.wait(60)
    finally:
        sampler.stop.set()
        d.kill()
        cg.remove()
    growth = (rss_end - rss_start) / max(rss_start, 1)
    print(f"soak: {time.time() - t0:.0f} s, {'cgroup ' + cg.path if cg.path else 'no cgroup'}"
          f" (limit {LIMIT >> 20} MiB), daemon exit {rc}")
    print(f"  hold phase: {hold}, peak resident {hold_peak / 1024:.0f} MiB")
    if cg_peak:
        print(f"  cgroup peak memory (whole run) {cg_peak / MiB:.0f} MiB")
    print(f"  mix phase resident: start {rss_start / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
          f"end {rss_end / 1024:.0f} MiB ({growth:+.1%}); at boot {rss_boot / 1024:.0f} MiB")
    for k in sorted(stats.count):
        print(f"  {k:14s} {stats.count[k]:6d} ok   p99 {stats.p99(k):8.1f} ms")
    print(f"  errors: {len(stats.errors)}")
    for e in stats.errors[:20]:
        print("   ", e)
    ok = (alive and rc == 0 and not stats.errors and growth <= 0.20 and
          max(peak, hold_peak) * 1024 < LIMIT and (hold or {}).get("job_intact"))
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
