#!/usr/bin/python3
"""test_hostile.py - jemd under hostile clients (issue 24), against the real
daemon over raw sockets: request framing (RFC 9112 6.1/6.3, Host), encoded
slashes, query floods, chunked bodies past the limit, the buffered-body
budget, JSON element bombs, the image decoder's failure reason, a reload
stuck on a FIFO, the probe port under connection exhaustion, and the job
queue check under concurrent large-init posts.

usage: /usr/bin/python3 tests/integration/test_hostile.py --build build
"""
import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import jemtest  # noqa: E402
import numpy as np  # noqa: E402

FAILS = []
PASSES = [0]
MiB = 1 << 20


def check(cond, what):
    if cond:
        PASSES[0] += 1
    else:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


def exchange(d, data, timeout=5.0, port=None):
    """Sends data, reads until the server closes.  Returns (bytes, closed)."""
    out = d.raw(data, timeout=timeout, shut=False, port=port)
    return out, d.closed


def statuses(out):
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", out)]


def json_body(out):
    head, _, body = out.partition(b"\r\n\r\n")
    m = re.search(rb"Content-Length: (\d+)", head, re.I)
    try:
        return json.loads(body[:int(m.group(1))]) if m else None
    except ValueError:
        return None


def one_refusal(d, what, req, expect=400, ours=True):
    """Exactly one answer, `expect`, then the connection closed: a second
    request hidden in the body is never served."""
    out, closed = exchange(d, req)
    st = statuses(out)
    if ours:
        js = json_body(out)
        check(st == [expect] and closed and isinstance(js, dict) and "error" in js,
              f"{what}: one {expect} with a JSON error, then closed ({st}, closed={closed}, "
              f"{out[-120:]!r})")
    else:  # libmicrohttpd's own 400 (see README, 'Hostile clients')
        check(st[:1] == [expect] and 200 not in st and closed,
              f"{what}: {expect} from libmicrohttpd and closed ({st}, closed={closed})")


SANITIZER = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error:")


def stop(d, what):
    """SIGTERM: the daemon drains and exits 0, with no sanitizer report."""
    if d.proc.poll() is None:
        d.signal(signal.SIGTERM)
        try:
            d.wait(30)
        except Exception:  # noqa: BLE001
            d.kill()
    check(d.proc.returncode == 0 and not SANITIZER.search(d.log()),
          f"{what}: exit {d.proc.returncode}, sanitizer report: "
          f"{(SANITIZER.search(d.log()) or [None])[0]}")
    d.kill()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(d, name, labels=None):
    _, _, m = d.request("GET", "/metrics")
    for line in m.decode().splitlines():
        if line.startswith(name + "{" if labels else name + " "):
            if labels and not all(f'{k}="{v}"' in line for k, v in labels.items()):
                continue
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------

def framing(d):
    H = b"Host: x\r\n"
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /v1/classify HTTP/1.1\r\nContent-Type: image/png\r\n"
    one_refusal(d, "Content-Length and Transfer-Encoding",
                post + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" +
                smuggled)
    one_refusal(d, "Transfer-Encoding then Content-Length",
                post + H + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n" +
                smuggled)
    one_refusal(d, "two different Content-Lengths",
                post + H + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(smuggled) +
                smuggled)
    one_refusal(d, "the same Content-Length twice",
                post + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc" + smuggled)
    one_refusal(d, "a folded Content-Length",
                post + H + b"Content-Length:\r\n %d\r\n\r\n" % len(smuggled) + smuggled)
    one_refusal(d, "a Content-Length continued on a folded line",
                post + H + b"Content-Length: 3\r\n 4\r\n\r\nabc" + smuggled)
    one_refusal(d, "a folded line hiding Content-Length",
                post + H + b"X-A: a\r\n Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    one_refusal(d, "Transfer-Encoding gzip, chunked",
                post + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + smuggled, 501)
    one_refusal(d, "Transfer-Encoding on HTTP/1.0",
                b"POST /v1/classify HTTP/1.0\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    one_refusal(d, "HTTP/1.1 without Host", b"GET /healthz HTTP/1.1\r\n\r\n" + smuggled)
    one_refusal(d, "two Host headers", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    for v in (b"+3", b"-1", b"3, 3", b"3 4", b"0x3"):
        one_refusal(d, f"Content-Length: {v.decode()}",
                    post + H + b"Content-Length: " + v + b"\r\n\r\nabc" + smuggled, ours=False)
    out, closed = exchange(d, b"GET /healthz HTTP/1.0\r\n\r\n")
    check(statuses(out) == [200], f"HTTP/1.0 without Host is served ({statuses(out)})")
    out, _ = exchange(d, smuggled + smuggled, timeout=1)
    check(statuses(out) == [200, 200], f"plain pipelining still works ({statuses(out)})")


def paths_and_queries(d):
    for p in ("/v2/models/testnet%2fready", "/v2/models/testnet%2Fready", "/v2%2Fhealth/live",
              "/v1%2fmodels"):
        st, _, js = d.json("GET", p)
        check(st == 400 and isinstance(js, dict) and "error" in js,
              f"{p}: 400, not routed ({st} {js})")
    st, _, _ = d.json("GET", "/v2/models/testnet/ready")
    check(st == 200, "the unencoded path still routes")
    q = "&".join(f"a{i}=1" for i in range(1500))
    out, closed = exchange(d, b"GET /healthz?%s HTTP/1.1\r\nHost: x\r\n\r\n" % q.encode())
    js = json_body(out)
    check(statuses(out) == [400] and isinstance(js, dict) and
          js["error"]["code"] == "invalid_parameter",
          f"1,500 query pairs: one 400 ({statuses(out)} {js})")
    st, _, js = d.json("GET", "/healthz?" + "&".join(f"a{i}=1" for i in range(90)))
    check(st == 200, f"90 pairs (under the cap) reach the handler ({st})")


def chunked_over(d, cap):
    """A chunked body past --max-body-bytes: one 413 after the body, not a
    silent close (it used to close past about twice the limit)."""
    n = 3 * cap + 2 * MiB
    out = jemtest.chunked_post(d.port, n)
    js = json_body(out)
    check(statuses(out) == [413] and isinstance(js, dict) and
          js["error"]["code"] == "body_too_large",
          f"chunked body of {n} bytes over a {cap}-byte cap: one 413 ({out[:60]!r})")


def image_reason(jemd, model):
    """The same corrupt PNG is a 400 whatever the HTTP thread decoded before."""
    d = jemtest.Daemon(jemd, model, "--http-threads", "1")
    try:
        bomb = jemtest.png_inflation_bomb()
        png = jemtest.test_images(1)[0]
        corrupt = png[:41] + b"\xff" * 20 + png[61:]
        H = {"Content-Type": "image/png"}
        got = []
        for _ in range(3):
            st1, _, js1 = d.json("POST", "/v1/classify", bomb, H)
            st2, _, js2 = d.json("POST", "/v1/classify", corrupt, H)
            got.append((st1, js1["error"]["code"], st2, js2["error"]["code"]))
        check(all(g == (413, "image_too_large", 400, "invalid_image") for g in got),
              f"inflation bomb 413, then the corrupt PNG 400 every time ({got})")
    finally:
        stop(d, "image daemon")


def json_bombs(d, asan):
    """Two million {} in 8 MB: refused by the pre-parse count, fast, and the
    resident size stays put; a parsed large body's memory is given back."""
    J = {"Content-Type": "application/json"}
    bomb = b"[" + b",".join([b"{}"] * 2_000_000) + b"]"
    rss0 = rss_kb(d.proc.pid)
    worst = 0.0
    for path in ("/v1/samples", "/v2/models/testnet/infer", "/v1/classify"):
        for _ in range(2):
            t0 = time.time()
            st, _, js = d.json("POST", path, bomb, J)
            worst = max(worst, time.time() - t0)
            err = js.get("error") if isinstance(js, dict) else None
            code = err.get("code") if isinstance(err, dict) else err
            check(st == 413 and code, f"{path}: two million {{}} refused with 413 ({st} {js})")
    check(worst < (3.0 if asan else 1.0), f"refused quickly (slowest {worst:.2f} s)")
    rss1 = rss_kb(d.proc.pid)
    if not asan:  # ASan's allocator keeps freed memory in quarantine
        check(rss1 - rss0 < 64 * 1024, f"resident size after the bombs: {rss0} -> {rss1} kB")
        # 900,000 numbers pass the count and are parsed (about 50 MB of tree)
        nums = b"[" + b",".join([b"0"] * 900_000) + b"]"
        for _ in range(3):
            st, _, js = d.json("POST", "/v1/samples", nums, J)
            check(st == 400, f"a parsed 900k-number array is refused after parsing ({st})")
        # parsed on a worker, not on an HTTP thread: /healthz keeps answering
        stop_flag, lat = [], []

        def hammer():
            while not stop_flag:
                d.request("POST", "/v1/samples", nums, J)
        ts = [threading.Thread(target=hammer) for _ in range(3)]
        for t in ts:
            t.start()
        for _ in range(30):
            t0 = time.time()
            d.request("GET", "/healthz")
            lat.append(time.time() - t0)
            time.sleep(0.03)
        stop_flag.append(1)
        for t in ts:
            t.join()
        lat.sort()
        check(lat[len(lat) // 2] < 0.15, f"/healthz while 7 MB JSON bodies parse: median "
              f"{lat[len(lat) // 2] * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms")
        time.sleep(0.6)  # the main thread's tick trims the heap
        rss2 = rss_kb(d.proc.pid)
        print(f"  JSON: resident {rss0} kB at start, {rss1} kB after 6 bombs (slowest refusal "
              f"{worst * 1e3:.0f} ms), {rss2} kB after 3 parsed 900k-number bodies", flush=True)
        check(rss2 - rss0 < 40 * 1024,
              f"resident size returns after large parsed bodies: {rss0} -> {rss2} kB")


def budget(jemd, model, asan):
    """--max-buffered-bytes: bodies past it get 503 + Retry-After before they
    are read; the held ones count in jem_request_body_bytes; jobs survive."""
    cap = 4 * MiB
    d = jemtest.Daemon(jemd, model, "--max-body-bytes", str(cap),
                       "--max-buffered-bytes", str(4 * cap + 1024), "--timeout", "30")
    held = []
    try:
        st, _, job = d.json("POST", "/v1/samples", json.dumps({"n": 2, "steps": 2000}),
                            {"Content-Type": "application/json"})
        check(st == 202, f"a job before the flood ({st})")
        time.sleep(0.5)  # the job's buffers are allocated
        rss0 = rss_kb(d.proc.pid)
        part = b"\0" * (cap - 1)
        answers = []
        for i in range(12):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: %d\r\n\r\n" % cap)
            try:
                s.sendall(part)  # all but the last byte: the body stays buffered
            except OSError:
                pass
            held.append(s)
        time.sleep(0.5)
        for s in held:
            s.setblocking(False)
            try:
                answers.append(s.recv(4096))
            except OSError:
                answers.append(None)
        refused = [a for a in answers if a and a.startswith(b"HTTP/1.1 503")]
        pending = [a for a in answers if a is None]
        check(len(pending) == 4 and len(refused) == 8,
              f"4 bodies of {cap} fit the budget, 8 get 503 ({len(pending)} held, "
              f"{len(refused)} refused)")
        check(all(b"Retry-After: 1" in a and b"server_busy" in a for a in refused),
              "503 server_busy with Retry-After")
        g = metric(d, "jem_request_body_bytes")
        check(g == 4 * (cap + 1), f"jem_request_body_bytes counts the held bodies ({g})")
        check(metric(d, "jem_rejected_requests_total", {"reason": "body_budget"}) == 8,
              "rejections counted as body_budget")
        if not asan:
            rss1 = rss_kb(d.proc.pid)
            print(f"  budget: resident {rss0} kB before, {rss1} kB with 4 bodies held and 8 "
                  f"refused", flush=True)
            check(rss1 - rss0 < 4 * cap // 1024 + 48 * 1024,
                  f"resident size bounded by the budget: {rss0} -> {rss1} kB")
        # a chunked body while the budget is full: 503 after it is read
        out, _ = exchange(d, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"image/png\r\nTransfer-Encoding: chunked\r\n\r\n4000\r\n" +
                          b"a" * 0x4000 + b"\r\n0\r\n\r\n")
        check(statuses(out) == [503], f"chunked body past the budget: 503 ({statuses(out)})")
        st, _, _ = d.json("GET", "/healthz")
        check(st == 200, "healthz while the budget is full")
        for s in held:
            s.close()
        held = []
        time.sleep(0.5)
        g = metric(d, "jem_request_body_bytes")
        check(g == 0, f"the budget is returned when the connections go ({g})")
        png = jemtest.test_images(1)[0]
        st, _, _ = d.json("POST", "/v1/classify?grad=false", png, {"Content-Type": "image/png"})
        check(st == 200, f"scoring after the flood ({st})")
        st, _, js = d.json("GET", job["url"])
        check(st == 200 and js["status"] in ("queued", "running"), f"the job is intact ({js})")
        d.request("DELETE", job["url"])
    finally:
        for s in held:
            s.close()
        stop(d, "budget daemon")


def reload_fifo(jemd, tmp):
    """SIGHUP with the model path on a FIFO (a hung mount): probes, deadlines
    and SIGTERM's drain carry on; the reload times out and is reported."""
    model = os.path.join(tmp, "fifo-model.safetensors")
    jemtest.write_model(model, seed=3, name="fifonet")
    d = jemtest.Daemon(jemd, model, "--reload-timeout", "1", "--drain-seconds", "5")
    try:
        os.remove(model)
        os.mkfifo(model)
        d.signal(signal.SIGHUP)
        time.sleep(0.2)
        t0 = time.time()
        st, _, _ = d.json("GET", "/readyz", timeout=2)
        check(st == 200 and time.time() - t0 < 1, f"readyz answers during the stuck reload ({st})")
        time.sleep(1.5)
        check("model reload timed out" in d.log(), "the stuck reload is reported as timed out")
        st, _, js = d.json("GET", "/v1/models")
        check(st == 200 and js["models"][0]["name"] == "fifonet", "the old model serves on")
        d.signal(signal.SIGHUP)
        time.sleep(0.4)
        t0 = time.time()
        d.signal(signal.SIGTERM)
        rc = d.wait(15)
        check(rc == 0 and time.time() - t0 < 8, f"SIGTERM drains and exits 0 ({rc}, "
              f"{time.time() - t0:.1f} s)")
    finally:
        stop(d, "reload daemon")


def probe_port(jemd, model):
    """Every main-port connection taken: the probe port still answers."""
    d = jemtest.Daemon(jemd, model, "--max-connections", "6", "--max-connections-per-ip", "6",
                       "--probe-port", "0", "--timeout", "30")
    socks = []
    try:
        pp = None
        for line in d.lines:
            m = re.match(r"jemd: probes on http://\S+:(\d+)", line)
            if m:
                pp = int(m.group(1))
        check(pp is not None and pp != d.port, f"probe port logged ({pp})")
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=2)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            socks.append(s)
        time.sleep(0.3)
        out, _ = exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1)
        check(not out.startswith(b"HTTP/1.1 200"), "the main port is exhausted")
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            t0 = time.time()
            out, _ = exchange(d, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              % path.encode(), timeout=3, port=pp)
            check(statuses(out) == [200] and time.time() - t0 < 1,
                  f"{path} on the probe port under exhaustion ({statuses(out)})")
        out, _ = exchange(d, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                          port=pp)
        check(statuses(out) == [404], f"other routes are not on the probe port ({statuses(out)})")
    finally:
        for s in socks:
            s.close()
        stop(d, "probe daemon")


def jobs_admission(jemd, model):
    """Concurrent job posts whose init images decode on a worker: the queue
    check takes its place atomically, so the surplus is refused at once."""
    d = jemtest.Daemon(jemd, model, "--workers", "1", "--max-queued-jobs", "2")
    try:
        side = 1100
        yy, xx = np.mgrid[0:side - 100, 0:side]
        big = base64.b64encode(jemtest.png_bytes(((xx + 3 * yy) % 256).astype(np.uint8))).decode()
        body = json.dumps({"n": 4, "steps": 500, "init": {"images": [big] * 4}})
        res = [None] * 6

        def post(i):
            t0 = time.time()
            st, _, js = d.json("POST", "/v1/samples", body, {"Content-Type": "application/json"},
                               timeout=120)
            res[i] = (st, time.time() - t0, js)
        ts = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ok = [r for r in res if r[0] == 202]
        full = [r for r in res if r[0] == 429]
        check(len(ok) == 2 and len(full) == 4,
              f"2 of 6 concurrent large-init jobs admitted, 4 refused ({[r[0] for r in res]})")
        slowest_429 = max((r[1] for r in full), default=0)
        fastest_202 = min((r[1] for r in ok), default=0)
        check(slowest_429 < fastest_202,
              f"refusals come before the admitted decodes end ({slowest_429:.2f} s < "
              f"{fastest_202:.2f} s)")
        for r in ok:
            d.request("DELETE", r[2]["url"])
    finally:
        stop(d, "jobs daemon")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    args = ap.parse_args()
    build = os.path.join(ROOT, args.build) if not os.path.isabs(args.build) else args.build
    jemd = os.path.join(build, "jemd")
    asan = "asan" in args.build
    tmp = tempfile.mkdtemp(prefix="jemd-hostile-")
    t_start = time.time()
    try:
        model = os.path.join(tmp, "model.safetensors")
        jemtest.write_model(model, seed=7, name="testnet")
        p = subprocess.run([jemd, "--help"], capture_output=True)
        check(re.search(rb"--max-connections-per-ip N.*\n.*default: 128", p.stdout) is not None,
              "per-address connection default 128")
        cap = MiB
        d = jemtest.Daemon(jemd, model, "--max-body-bytes", str(cap))
        try:
            framing(d)
            paths_and_queries(d)
            chunked_over(d, cap)
            st, _, _ = d.json("GET", "/readyz")
            check(st == 200, "ready after the framing cases")
        finally:
            stop(d, "framing daemon")
        d = jemtest.Daemon(jemd, model)
        try:
            json_bombs(d, asan)
        finally:
            stop(d, "JSON daemon")
        image_reason(jemd, model)
        budget(jemd, model, asan)
        reload_fifo(jemd, tmp)
        probe_port(jemd, model)
        jobs_admission(jemd, model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"test_hostile: {PASSES[0]} checks passed, {len(FAILS)} failed, "
          f"{time.time() - t_start:.1f} s{' (ASan build)' if asan else ''}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
