#!/usr/bin/python3
"""test_jobs.py - SGLD sampling jobs against the real daemon (issue 5).

Usage: /usr/bin/python3 tests/integration/test_jobs.py --build build [--only NAME]

Starts build/jemd on free ports with small caps and checks: a job's whole
life (202 + Location, polling, results, PNG decoding, energies falling from
the starting points), refining given images, determinism across jobs and
against `jem sample`, four concurrent jobs batched step by step with the bytes
each gives alone, class-conditional jobs (the rate is printed), every
bad parameter and id (4xx with the error shape, then /readyz 200), a full
queue (429 + Retry-After), cancel (running and queued), SIGHUP during a job,
TTL expiry, API-key protection and listing, metrics (promtool when installed),
SIGTERM with jobs running (canceled with reason "shutdown", exit 0), and every
job-route response against openapi.yaml.  Under an ASan build (--build
build/asan) the workloads shrink and the daemon's stderr must hold no
sanitizer or leak report after it exits.  --trained MODEL (default
models/fmnist-jem.safetensors, skipped if absent) reports the class-conditional
rate of a trained model.
"""
import argparse
import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jemtest  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILS = []
STATES = {"queued", "running", "succeeded", "failed", "canceled"}
JSON = {"Content-Type": "application/json"}


def check(cond, what):
    if cond:
        print("  ok   %s" % what)
    else:
        print("  FAIL %s" % what)
        FAILS.append(what)
    return cond


# ---------------------------------------------------------------------------
# A small PNG decoder (8-bit grey / RGB / grey+alpha / RGBA, not interlaced).

def png_decode(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        ln, typ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + ln]
        crc = struct.unpack(">I", data[pos + 8 + ln:pos + 12 + ln])[0]
        if zlib.crc32(typ + body) & 0xffffffff != crc:
            raise ValueError("bad CRC in %r" % typ)
        if typ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif typ == b"IDAT":
            idat += body
        elif typ == b"IEND":
            break
        pos += 12 + ln
    w, h, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or interlace:
        raise ValueError("unsupported PNG variant")
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = w * ch
    out = np.zeros((h, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1)
        cur = line.astype(np.int32).copy()
        if f == 1:
            for i in range(ch, stride):
                cur[i] = (cur[i] + cur[i - ch]) & 255
        elif f == 2:
            cur = (cur + prev) & 255
        elif f == 3:
            for i in range(stride):
                left = cur[i - ch] if i >= ch else 0
                cur[i] = (cur[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                b = prev[i]
                c = prev[i - ch] if i >= ch else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) & 255
        elif f != 0:
            raise ValueError("bad filter %d" % f)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, ch).astype(np.uint8)


def npy_decode(data):
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy")
    major = data[6]
    hl = struct.unpack("<H" if major == 1 else "<I", data[8:10] if major == 1 else data[8:12])[0]
    off = 10 if major == 1 else 12
    hdr = eval(data[off:off + hl].decode("latin1"), {"__builtins__": {}})  # dict literal
    arr = np.frombuffer(data, dtype=np.dtype(hdr["descr"]), offset=off + hl)
    return arr.reshape(hdr["shape"]), hdr


# ---------------------------------------------------------------------------
# Models and daemons

def add_replay(path, arr):
    """Appends a replay_buffer tensor to a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    hl = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + hl])
    data = blob[8 + hl:]
    arr = np.ascontiguousarray(arr, dtype="<f4")
    header["replay_buffer"] = {"dtype": "F32", "shape": list(arr.shape),
                               "data_offsets": [len(data), len(data) + arr.nbytes]}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data + arr.tobytes())


class Ctx:
    pass


# ---------------------------------------------------------------------------
# Every job-route response is checked against openapi.yaml, with the schema
# validator of test_server.py (imported, not copied).

SPEC = {"spec": None, "validate": None, "seen": set(), "errors": []}


def load_spec():
    try:
        import yaml
        import test_server
        SPEC["spec"] = yaml.safe_load(open(os.path.join(ROOT, "openapi.yaml")))
        test_server.SPEC = SPEC["spec"]
        SPEC["validate"] = test_server.validate
    except Exception as e:  # noqa: BLE001
        print("note: openapi checks skipped (%r)" % (e,))


def job_template(path):
    path = path.split("?")[0]
    for tmpl in SPEC["spec"]["paths"]:
        if not (tmpl.startswith("/v1/jobs") or tmpl == "/v1/samples"):
            continue
        rx = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(tmpl)) + "$"
        if re.match(rx, path):
            return tmpl
    return None


def spec_check(method, path, status, headers, data):
    if not SPEC["spec"] or not (path.startswith("/v1/jobs") or path.startswith("/v1/samples")):
        return
    tmpl = job_template(path)
    where = "%s %s -> %s" % (method, path[:60], status)
    if tmpl is None or method.lower() not in SPEC["spec"]["paths"][tmpl]:
        if status not in (404, 405):
            SPEC["errors"].append(where + ": route not in openapi.yaml")
        return
    resp = SPEC["spec"]["paths"][tmpl][method.lower()]["responses"].get(str(status))
    if resp is None:
        SPEC["errors"].append(where + ": status not documented")
        return
    SPEC["seen"].add((method, tmpl))
    while "$ref" in resp:
        node = SPEC["spec"]
        for part in resp["$ref"].lstrip("#/").split("/"):
            node = node[part]
        resp = node
    content = resp.get("content", {})
    ctype = headers.get("content-type", "").split(";")[0].strip()
    if content and ctype not in content:
        SPEC["errors"].append(where + ": content type %s not documented" % ctype)
    elif ctype == "application/json":
        errs = SPEC["validate"](content[ctype].get("schema"), json.loads(data))
        if errs:
            SPEC["errors"].append(where + ": %s" % errs[:3])


class JobsDaemon(jemtest.Daemon):
    def request(self, method, path, body=None, headers=None, timeout=30):
        st, h, data = super().request(method, path, body, headers, timeout)
        spec_check(method, path, st, h, data)
        return st, h, data


def test_openapi(ctx):
    print("== openapi.yaml describes every job response")
    if not SPEC["spec"]:
        return
    for e in SPEC["errors"][:10]:
        print("     " + e)
    check(not SPEC["errors"], "every job-route response matches openapi.yaml (%d problems)"
          % len(SPEC["errors"]))
    ops = {(m.upper(), p) for p, o in SPEC["spec"]["paths"].items()
           if p == "/v1/samples" or p.startswith("/v1/jobs")
           for m in o if m in ("get", "post", "delete")}
    check(ops and ops <= SPEC["seen"], "every job route was exercised: missing %s"
          % sorted(ops - SPEC["seen"]))


def start(ctx, model, *args, env=None):
    d = JobsDaemon(ctx.jemd, model, "--workers", "2", "--blas-threads", "1",
                   "--job-slice-ms", "20", *args, env=env)
    ctx.daemons.append(d)
    return d


def stop(ctx, d, sig=signal.SIGTERM, timeout=60, send=True):
    """Stops d and checks its exit status and (ASan) leak reports."""
    if send and d.proc.poll() is None:
        d.signal(sig)
    try:
        rc = d.wait(timeout)
    except subprocess.TimeoutExpired:
        d.kill()
        rc = "timeout"
    d._t.join(5)
    log = d.log()
    ok = check(rc == 0, "daemon exits 0 after SIGTERM (got %s)" % rc)
    bad = [w for w in ("LeakSanitizer", "AddressSanitizer", "runtime error:") if w in log]
    ok &= check(not bad, "no sanitizer or leak report in the daemon's stderr %s" % bad)
    if not ok:
        print("".join(d.lines[-40:]))
    if d in ctx.daemons:
        ctx.daemons.remove(d)
    return log


def post_job(d, body, headers=None):
    h = dict(JSON)
    h.update(headers or {})
    return d.json("POST", "/v1/samples", json.dumps(body) if not isinstance(body, (bytes, str))
                  else body, h)


def wait_job(d, jid, until=("succeeded", "failed", "canceled"), timeout=120, headers=None,
             seen=None):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        st, h, o = d.json("GET", "/v1/jobs/" + jid, headers=headers)
        if st != 200:
            return st, h, o
        if seen is not None:
            seen.append((o["status"], o["progress"]["step"], "retry-after" in h))
        last = (st, h, o)
        if o["status"] in until:
            return last
        time.sleep(0.05)
    return last


def is_error(o, code=None):
    return (isinstance(o, dict) and isinstance(o.get("error"), dict) and
            isinstance(o["error"].get("code"), str) and isinstance(o["error"].get("message"), str)
            and (code is None or o["error"]["code"] == code))


def run_cli(ctx, *args):
    p = subprocess.run([ctx.jem, *args], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError("jem %s failed: %s" % (" ".join(args), p.stderr))
    return p.stdout


# ---------------------------------------------------------------------------
# Tests

def test_life(ctx):
    print("== a job's life (random model, init noise)")
    d = ctx.main
    n, steps, seed = 9, ctx.steps, 11
    st, h, o = post_job(d, {"n": n, "steps": steps, "seed": seed, "step_size": 1.0,
                            "noise": 0.01})
    if not check(st == 202, "POST /v1/samples -> 202 (got %s %s)" % (st, o)):
        return
    jid = o["id"]
    check(len(jid) == 32 and all(c in "0123456789abcdef" for c in jid), "id is 32 hex digits")
    check(h.get("location") == "/v1/jobs/" + jid, "Location: /v1/jobs/{id}")
    check(h.get("retry-after") == "1", "Retry-After: 1")
    check(o["status"] in ("queued", "running"), "new job is queued/running")
    p = o["params"]
    check(p == {"n": n, "steps": steps, "class": None, "class_name": None, "step_size": 1.0,
                "noise": 0.01, "init": "noise", "clamp": True, "seed": seed},
          "params echo every effective value: %s" % p)
    check(o["created_at"].endswith("Z") and "T" in o["created_at"] and o["finished_at"] is None,
          "created_at is RFC 3339 UTC, finished_at null")
    st, h, g = d.request("GET", "/v1/jobs/%s/grid.png" % jid)
    check(st in (409, 200), "grid before success -> 409 (or the job was already done): %s" % st)
    seen = []
    st, h, o = wait_job(d, jid, seen=seen)
    if not check(st == 200 and o["status"] == "succeeded", "job succeeded: %s" % (o,)):
        return
    check(all(s in STATES for s, _, _ in seen), "statuses are from the contract")
    steps_seen = [k for _, k, _ in seen]
    check(steps_seen == sorted(steps_seen), "progress.step never goes back")
    check(all(ra for s, _, ra in seen if s in ("queued", "running")),
          "Retry-After while not terminal")
    check("retry-after" not in h, "no Retry-After once succeeded")
    check(o["progress"] == {"step": steps, "steps": steps}, "progress at steps/steps")
    check(o["started_at"] and o["finished_at"] and o["error"] is None, "times set, error null")
    res = o["result"]
    check(len(res["samples"]) == n and
          [s["index"] for s in res["samples"]] == list(range(n)), "n samples, index 0..n-1")
    check(all(set(s) >= {"index", "energy", "label", "class", "confidence", "url"}
              for s in res["samples"]), "sample fields")
    check(res["grid_url"] == "/v1/jobs/%s/grid.png" % jid and
          res["npy_url"] == "/v1/jobs/%s/samples.npy" % jid, "grid_url and npy_url")
    st, h, grid = d.request("GET", res["grid_url"])
    check(st == 200 and h.get("content-type") == "image/png", "grid.png 200 image/png")
    img = png_decode(grid)
    side = 3 * 32 + 4 * 2
    check(img.shape == (side, side, 1), "grid is %dx%d grey (3 columns, 2-px border): %s" %
          (side, side, img.shape))
    st, h, s0 = d.request("GET", res["samples"][4]["url"])
    check(st == 200 and h.get("content-type") == "image/png", "samples/4.png 200")
    p4 = png_decode(s0)
    check(p4.shape == (32, 32, 1), "sample PNG is 32x32 grey")
    st, h, npy = d.request("GET", res["npy_url"])
    check(st == 200, "samples.npy 200")
    x, hdr = npy_decode(npy)
    check(x.shape == (n, 1, 32, 32) and x.dtype == np.float32 and not hdr["fortran_order"],
          "npy is float32 [n,1,32,32] C order")
    check(float(np.abs(x).max()) <= 1.0, "clamped to [-1,1]")
    want = np.clip(np.rint((x[4, 0].astype(np.float64) + 1) / 2 * 255), 0, 255).astype(np.uint8)
    check(np.array_equal(p4[:, :, 0], want), "sample 4's PNG is its npy image quantized")
    check(np.array_equal(img[2 + 32 + 2:2 + 32 + 2 + 32, 2 + 32 + 2:2 + 32 + 2 + 32, 0], want),
          "grid cell (1,1) holds sample 4")
    # starting points: the same seed with 0 steps, scored by the CLI
    start_npy = os.path.join(ctx.tmp, "start.npy")
    run_cli(ctx, "sample", ctx.model_a, "--n", str(n), "--steps", "0", "--seed", str(seed),
            "--npy", start_npy, "--threads", "1")
    e0 = [json.loads(l)["energy"] for l in run_cli(ctx, "score", ctx.model_a,
                                                   start_npy).splitlines()]
    e1 = [s["energy"] for s in res["samples"]]
    print("     mean energy: start %.6f -> after %d steps %.6f" % (np.mean(e0), steps, np.mean(e1)))
    check(np.mean(e1) < np.mean(e0), "mean energy of the samples fell below the starting points'")
    st, _, o2 = d.json("GET", "/v1/jobs/%s/samples/%d.png" % (jid, n))
    check(st == 404 and is_error(o2), "samples/{n}.png -> 404")
    ctx.life_id = jid


def test_given_images(ctx):
    print("== refine given images (init.images)")
    d = ctx.main
    imgs = jemtest.test_images(3, seed=5)
    b64 = [base64.b64encode(i).decode() for i in imgs]
    st, _, o = post_job(d, {"steps": ctx.steps, "seed": 3, "init": {"images": b64}})
    if not check(st == 202 and o["params"]["n"] == 3 and o["params"]["init"] == "images",
                 "init.images: 202, n defaults to the count (%s %s)" % (st, o)):
        return
    st, _, o = wait_job(d, o["id"])
    check(o["status"] == "succeeded", "refinement job succeeded")
    # the starting points' energies, as /v1/classify scores them
    st, _, c = d.json("POST", "/v1/classify?grad=false", json.dumps({"images": b64}), JSON)
    if check(st == 200, "classify the starting images"):
        e0 = [r["energy"] for r in c["results"]]
        e1 = [s["energy"] for s in o["result"]["samples"]]
        print("     mean energy: given %.6f -> refined %.6f" % (np.mean(e0), np.mean(e1)))
        check(np.mean(e1) < np.mean(e0), "refined samples have lower mean energy than the input")
    st, _, o = post_job(d, {"n": 2, "init": {"images": b64}})
    check(st == 422 and is_error(o), "n different from the number of images -> 422")


def test_determinism(ctx):
    print("== determinism: two identical jobs, and `jem sample`")
    d = ctx.main
    body = {"n": 5, "steps": ctx.steps, "seed": 1234, "clamp": True}
    ids = []
    for _ in range(2):
        st, _, o = post_job(d, body)
        check(st == 202, "POST 202")
        ids.append(o["id"])
        wait_job(d, o["id"])  # one at a time: "when run alone"
    blobs = []
    for jid in ids:
        b = {}
        for name in ("grid.png", "samples.npy", "samples/0.png", "samples/4.png"):
            st, _, b[name] = d.request("GET", "/v1/jobs/%s/%s" % (jid, name))
            check(st == 200, "GET %s 200" % name)
        blobs.append(b)
    check(blobs[0] == blobs[1], "identical jobs give byte-identical grid, sample PNGs and npy")
    out_png = os.path.join(ctx.tmp, "cli.png")
    out_npy = os.path.join(ctx.tmp, "cli.npy")
    lines = run_cli(ctx, "sample", ctx.model_a, "--n", "5", "--steps", str(ctx.steps), "--seed",
                    "1234", "--out", out_png, "--npy", out_npy, "--threads", "1")
    with open(out_png, "rb") as f:
        check(f.read() == blobs[0]["grid.png"], "`jem sample --seed S` grid PNG == the job's")
    with open(out_npy, "rb") as f:
        check(f.read() == blobs[0]["samples.npy"], "`jem sample --seed S` .npy == the job's")
    st, _, o = d.json("GET", "/v1/jobs/" + ids[0])
    cli = [json.loads(l) for l in lines.splitlines()]
    check([c["label"] for c in cli] == [s["label"] for s in o["result"]["samples"]] and
          all(abs(c["energy"] - s["energy"]) <= 1e-6 * max(1, abs(c["energy"]))
              for c, s in zip(cli, o["result"]["samples"])),
          "labels and energies match `jem sample`")
    # other shapes: more chains than a core slice, class-conditional, no clamp
    for n, extra, flags in ((12, {"class": 2}, ["--class", "2"]),
                            (3, {"clamp": False, "noise": 0.05}, ["--no-clamp", "--noise", "0.05"])):
        body = dict({"n": n, "steps": ctx.steps // 2, "seed": 77, "init": "noise"}, **extra)
        st, _, o = post_job(d, body)
        o = wait_job(d, o["id"])[2]
        st, _, npy = d.request("GET", "/v1/jobs/%s/samples.npy" % o["id"])
        run_cli(ctx, "sample", ctx.model_a, "--n", str(n), "--steps", str(ctx.steps // 2),
                "--seed", "77", "--init", "noise", "--npy", out_npy, "--threads", "1", *flags)
        with open(out_npy, "rb") as f:
            check(f.read() == npy, "n=%d %s: job .npy == `jem sample` .npy" % (n, extra))


def hist_counts(d, name):
    """{le: cumulative count} of histogram `name` in /metrics."""
    st, _, text = d.request("GET", "/metrics")
    return {m.group(1).decode(): float(m.group(2)) for m in
            re.finditer(rb'^%s_bucket\{le="([^"]+)"\} (\S+)$' % name.encode(), text, re.M)}


def test_batched(ctx):
    print("== step-level batching: four concurrent jobs share batches, same bytes as alone")
    # one worker: the jobs would otherwise take turns; mixed settings, chain
    # counts, conditional and not, and different lengths (they leave the batch
    # at different steps)
    d = start(ctx, ctx.model_a, "--workers", "1", "--max-queued-jobs", "8", "--max-batch", "16")
    s = ctx.steps
    bodies = [{"n": 3, "steps": 4 * s, "seed": 11, "init": "noise"},
              {"n": 5, "steps": 3 * s, "seed": 12, "class": 2, "init": "noise"},
              {"n": 2, "steps": 4 * s, "seed": 13, "clamp": False, "noise": 0.05, "init": "noise"},
              {"n": 6, "steps": 2 * s, "seed": 14, "step_size": 0.5, "init": "noise"}]
    files = ("samples.npy", "grid.png", "samples/1.png")

    def results(jid):
        st, _, o = wait_job(d, jid, timeout=300)
        check(o["status"] == "succeeded", "job %s succeeded (%s)" % (jid[:8], o["status"]))
        return [d.request("GET", "/v1/jobs/%s/%s" % (jid, f))[2] for f in files]

    ids = [post_job(d, b)[2]["id"] for b in bodies]
    together = [results(jid) for jid in ids]
    h = hist_counts(d, "jem_job_group_size")
    grouped = h.get("+Inf", 0) - h.get("2", 0)
    check(grouped > 0, "slices advanced 3 or 4 jobs together (%d of %d slices)"
          % (grouped, h.get("+Inf", 0)))
    for b, got in zip(bodies, together):
        alone = results(post_job(d, b)[2]["id"])  # one job at a time
        check(got == alone, "n=%d steps=%d: batched job's files == the lone job's" %
              (b["n"], b["steps"]))
    # and == `jem sample`, which never batches with anything
    out_npy = os.path.join(ctx.tmp, "batched.npy")
    run_cli(ctx, "sample", ctx.model_a, "--n", "5", "--steps", str(3 * s), "--seed", "12",
            "--class", "2", "--init", "noise", "--npy", out_npy, "--batch", "2")
    with open(out_npy, "rb") as f:
        check(f.read() == together[1][0], "batched class-conditional job .npy == `jem sample`")
    # a canceled job leaves the batch; the others finish with their lone bytes
    ids = [post_job(d, b)[2]["id"] for b in bodies[:3]]
    wait_job(d, ids[0], until=("running",), timeout=60)
    st, _, o = d.json("DELETE", "/v1/jobs/" + ids[0])
    check(st == 200 and o["status"] in ("canceled", "succeeded"), "DELETE one of the group")
    for i in (1, 2):
        check(results(ids[i]) == together[i], "job %d unchanged by its neighbour's cancel" % i)
    stop(ctx, d)


def class_rate(d, cls, n, steps, seed=99, extra=None):
    body = {"n": n, "steps": steps, "seed": seed, "class": cls, "init": "noise"}
    body.update(extra or {})
    st, _, o = post_job(d, body)
    if st != 202:
        return None, o
    st, _, o = wait_job(d, o["id"], timeout=600)
    if o.get("status") != "succeeded":
        return None, o
    y = o["params"]["class"]
    labels = [s["label"] for s in o["result"]["samples"]]
    return sum(1 for l in labels if l == y) / len(labels), o


def test_class_conditional(ctx):
    print("== class-conditional jobs")
    d = ctx.main
    st, _, o = post_job(d, {"n": 8, "steps": 1, "seed": 99, "init": "noise"})
    st, _, o = wait_job(d, o["id"])
    start_labels = [s["label"] for s in o["result"]["samples"]]
    for y in (3, 6):
        rate, o = class_rate(d, y, 8, ctx.steps, extra={"step_size": 10.0})
        if check(rate is not None, "class %d (index) job succeeded" % y):
            check(o["params"]["class"] == y and o["params"]["class_name"] == "class%d" % y,
                  "params.class %d" % y)
            r0 = sum(1 for l in start_labels if l == y) / len(start_labels)
            print("     random WRN-10-1 (x2), class %d, %d steps of size 10: %.0f%% of samples "
                  "classified as %d (%.0f%% at the start)" % (y, ctx.steps, 100 * rate, y, 100 * r0))
            check(rate >= 0.5 and rate > r0, "most samples reach the requested class")
            ctx.report["class_rate_random_%d" % y] = rate
    rate_b, o = class_rate(ctx.dbuf, "class7", 8, ctx.steps, extra={"step_size": 10.0})
    if check(rate_b is not None, "class by name ('class7') job succeeded"):
        check(o["params"]["class"] == 7, "class name resolved to index 7")
        print("     random model B, class 'class7': %.0f%% classified as class7" % (100 * rate_b))
        ctx.report["class_rate_random_b_7"] = rate_b
    fm = ctx.trained
    if os.path.exists(fm) and not ctx.asan:
        dm = start(ctx, fm, "--max-steps", "2000")
        try:
            st, _, mo = dm.json("GET", "/v1/models")
            names = mo["models"][0]["classes"] if st == 200 else []
            params = mo["models"][0]["parameters"] if st == 200 else 0
            # about 200 steps for a WRN-10-1; fewer for bigger models (time budget)
            steps = max(20, min(200, int(200 * 100000 / max(params, 1))))
            rates = []
            for y in (1, 8):
                r, o = class_rate(dm, y, 16, steps, seed=7)
                if r is not None:
                    rates.append(r)
                    print("     %s, class %d (%s), 16 samples x %d steps: %.0f%% "
                          "classified as that class" % (os.path.basename(fm), y,
                                                        names[y] if names else y, steps, 100 * r))
            ctx.report["class_rate_fmnist"] = rates
            st, _, o = post_job(dm, {"class": "trouser"})
            msg = o["error"]["message"] if is_error(o) else ""
            check(st == 422 and '"trouser" is not' in msg and '"Trouser", "Pullover"' in msg and
                  msg.endswith('"Bag", "Ankle boot"'),
                  "a lower-case class name -> the model's names, each quoted once: %s" % msg)
        finally:
            stop(ctx, dm)
    else:
        print("     (%s absent or ASan build: skipped the trained model)" % fm)


def test_buffer_default(ctx):
    print("== init defaults to the replay buffer when the model has one")
    d = ctx.dbuf
    st, _, o = post_job(d, {"n": 2, "steps": 2, "seed": 1})
    check(st == 202 and o["params"]["init"] == "buffer", "default init is buffer: %s" %
          (o.get("params") if isinstance(o, dict) else o))
    st, _, o = wait_job(d, o["id"])
    check(o["status"] == "succeeded", "buffer job succeeded")
    st, _, o = post_job(ctx.main, {"init": "buffer"})
    check(st == 422 and is_error(o), "init buffer on a model without one -> 422")
    st, _, o = post_job(ctx.main, {"n": 1, "steps": 1})
    check(st == 202 and o["params"]["init"] == "noise", "without a buffer the default is noise")
    wait_job(ctx.main, o["id"])
    st, _, o = d.json("POST", "/v1/samples", b"", {})
    check(st == 202 and o["params"]["n"] == 16 and o["params"]["steps"] == 100 and
          o["params"]["step_size"] == 1.0 and o["params"]["noise"] == 0.01 and
          o["params"]["clamp"] is True and isinstance(o["params"]["seed"], int) and
          0 <= o["params"]["seed"] < 2 ** 53,
          "empty body: contract defaults, random seed < 2^53: %s" % (o.get("params"),))
    if st == 202:
        d.json("DELETE", "/v1/jobs/" + o["id"])


def test_sampler(ctx):
    print("== sampler settings: the model's (jem calibrate) or contracts.md's defaults")
    st, _, o = ctx.main.json("GET", "/v1/models")
    check(st == 200 and o["models"][0]["sampler"] == {"step_size": 1.0, "noise": 0.01,
                                                       "steps": 100, "clamp": True,
                                                       "source": "default"},
          "/v1/models: a model without settings shows the defaults: %s"
          % o["models"][0].get("sampler"))
    path = os.path.join(ctx.tmp, "sampler.safetensors")
    shutil.copy(ctx.model_a, path)
    with open(path, "rb") as f:
        blob = f.read()
    hl = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + hl])
    meta = json.loads(header["__metadata__"]["jem"])
    meta["sampler"] = {"step_size": 0.05, "noise": 0.002, "steps": 7, "clamp": False,
                       "calibration": {"criterion": "set by the test"}}
    header["__metadata__"]["jem"] = json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + blob[8 + hl:])
    d = start(ctx, path)
    st, _, o = d.json("GET", "/v1/models")
    check(st == 200 and o["models"][0]["sampler"] == {"step_size": 0.05, "noise": 0.002,
                                                       "steps": 7, "clamp": False,
                                                       "source": "model"},
          "/v1/models shows the model's sampler settings: %s" % o["models"][0].get("sampler"))
    st, _, o = post_job(d, {"n": 3, "seed": 21})
    p = o.get("params", {})
    check(st == 202 and (p.get("step_size"), p.get("noise"), p.get("steps"), p.get("clamp")) ==
          (0.05, 0.002, 7, False), "a job without settings takes the model's: %s" % p)
    st, _, o = wait_job(d, o["id"])
    st, _, npy = d.request("GET", "/v1/jobs/%s/samples.npy" % o["id"])
    out_npy = os.path.join(ctx.tmp, "sampler.npy")
    run_cli(ctx, "sample", path, "--n", "3", "--seed", "21", "--npy", out_npy, "--threads", "1")
    with open(out_npy, "rb") as f:
        check(st == 200 and f.read() == npy,
              "`jem sample MODEL` defaults to the same settings: .npy == the job's")
    st, _, o = post_job(d, {"n": 1, "steps": 2, "step_size": 0.5, "clamp": True})
    p = o.get("params", {})
    check(st == 202 and (p.get("step_size"), p.get("noise"), p.get("steps"), p.get("clamp")) ==
          (0.5, 0.002, 2, True), "given fields win over the model's: %s" % p)
    wait_job(d, o["id"])
    stop(ctx, d)
    info = json.loads(run_cli(ctx, "info", path, "--json"))
    check(info.get("sampler", {}).get("source") == "model" and info["sampler"]["steps"] == 7,
          "jem info --json shows the sampler settings: %s" % info.get("sampler"))
    meta["sampler"] = {"step_size": 0.05, "noise": 0.002, "steps": 7}
    header["__metadata__"]["jem"] = json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + blob[8 + hl:])
    p = subprocess.run([ctx.jem, "info", path], capture_output=True, text=True, timeout=60)
    check(p.returncode == 1 and "sampler.clamp" in p.stderr,
          "a sampler block without clamp is refused, naming it: %s" % p.stderr.strip()[:100])


def test_bad_params(ctx):
    print("== bad parameters and ids")
    d = ctx.main
    png = base64.b64encode(jemtest.test_images(1)[0]).decode()
    cases = [
        ({"n": -1}, 422), ({"n": 0}, 422), ({"n": 10 ** 6}, 422), ({"n": 2 ** 63 - 1}, 422),
        ({"n": "16"}, 400), ({"n": 16.5}, 400), ({"n": True}, 400), ({"n": None}, 400),
        ({"steps": -5}, 422), ({"steps": 0}, 422), ({"steps": 10 ** 7}, 422),
        ({"steps": 1e3}, 400), ({"steps": [1]}, 400),
        ({"step_size": "NaN"}, 400), ({"step_size": "nan"}, 400), ({"step_size": -1}, 422),
        ({"step_size": 1e300}, 422), ({"noise": -0.1}, 422), ({"noise": "Infinity"}, 400),
        ({"noise": {}}, 400),
        ({"class": 10}, 422), ({"class": -1}, 422), ({"class": "nope"}, 422),
        ({"class": "x" * 5000}, 422),
        ({"class": ""}, 422), ({"class": 1.5}, 400), ({"class": [1]}, 400),
        ({"class": True}, 400),
        ({"init": "zeros"}, 422), ({"init": 5}, 400), ({"init": None}, 400),
        ({"init": {"images": "x"}}, 400), ({"init": {"images": []}}, 422),
        ({"init": {"images": [png] * 200}}, 422),
        ({"init": {"images": ["!!!not base64!!!"]}}, 400),
        ({"init": {"images": [base64.b64encode(b"hello world, not an image").decode()]}}, 415),
        ({"init": {"images": [5]}}, 400), ({"init": {"imgs": [png]}}, 400),
        ({"init": {"images": [png]}, "n": 3}, 422),
        ({"clamp": "yes"}, 400), ({"clamp": 1}, 400),
        ({"seed": -1}, 422), ({"seed": "7"}, 400), ({"seed": 1.5}, 400),
        ({"seed": 2 ** 64 - 1}, 422), ({"seed": 2 ** 63}, 422),  # valid JSON, beyond int64
        ({"foo": 1}, 400), ({"n": 2, "N": 2}, 400),
    ]
    for body, want in cases:
        st, _, o = post_job(d, body)
        check(st == want and is_error(o), "%s -> %d (got %s %s)" %
              (json.dumps(body)[:70], want, st,
               o["error"]["code"] if is_error(o) else o))
    raw_cases = [
        (b"{", 400, "malformed JSON"), (b"[1, 2]", 400, "a JSON array"),
        (b'{"n": NaN}', 400, "NaN literal"), (b'{"step_size": Infinity}', 400, "Infinity"),
        (b'{"seed": 18446744073709551616}', 422, "seed past 2^64 (valid JSON, out of range)"),
        (b'{"n": 1e999}', 422, "number overflow (valid JSON, out of range)"),
        (b'{"n": 2, "n": 3}', 400, "duplicate key"),
        (b"[" * 100 + b"]" * 100, 400, "JSON nested 100 deep"),
        (b'{"n": 2}garbage', 400, "trailing garbage"), (b"\xff\xfe", 400, "not UTF-8"),
    ]
    for body, want, what in raw_cases:
        st, _, o = d.json("POST", "/v1/samples", body, JSON)
        check(st == want and is_error(o), "%s -> %d (got %s)" % (what, want, st))
    st, _, o = d.json("POST", "/v1/samples", b'{"n": 2}', {"Content-Type": "text/plain"})
    check(st == 415 and is_error(o), "Content-Type text/plain -> 415 (got %s)" % st)
    st, _, o = d.json("POST", "/v1/samples", b'{"n": 2}',
                      {"Content-Type": "application/x-www-form-urlencoded"})
    check(st == 415 and is_error(o) and "-H 'Content-Type: application/json'" in
          o["error"]["message"], "curl -d without -H -> 415 naming the fix: %s"
          % (o["error"]["message"] if is_error(o) else o))
    # a guessed class name: the message lists the model's classes
    st, _, o = post_job(d, {"class": "class01"})
    msg = o["error"]["message"] if is_error(o) else ""
    check(st == 422 and is_error(o, "unknown_class") and '"class0", "class1"' in msg and
          '"class9"' in msg, "unknown class name -> the valid names in the message: %s" % msg)
    st, _, o = d.json("POST", "/v1/samples?n=3", b'{"n": 2}', JSON)
    check(st == 400 and is_error(o), "unknown query parameter -> 400")
    fake = "0123456789abcdef" * 2
    for path in ("/v1/jobs/xyz", "/v1/jobs/" + fake.upper(), "/v1/jobs/" + fake[:31],
                 "/v1/jobs/" + fake + "0", "/v1/jobs/" + fake, "/v1/jobs/%s/grid.png" % fake,
                 "/v1/jobs/%s/samples.npy" % fake, "/v1/jobs/%s/samples/0.png" % fake,
                 "/v1/jobs/%20" + fake[3:], "/v1/jobs/" + fake[:30] + "%00",
                 "/v1/jobs/" + "g" * 32):
        st, _, o = d.json("GET", path)
        check(st == 404 and is_error(o), "GET %s -> 404 (got %s)" % (path[:60], st))
    st, _, o = d.json("DELETE", "/v1/jobs/" + fake)
    check(st == 404 and is_error(o), "DELETE unknown id -> 404")
    if getattr(ctx, "life_id", None):
        for k in ("abc", "01", "-1", "1e1", "+1", "9999999", "0x1"):
            st, _, o = d.json("GET", "/v1/jobs/%s/samples/%s.png" % (ctx.life_id, k))
            check(st == 404 and is_error(o), "samples/%s.png -> 404 (got %s)" % (k, st))
        st, h, o = d.json("PUT", "/v1/jobs/" + ctx.life_id)
        check(st == 405 and "DELETE" in h.get("allow", ""), "PUT on a job -> 405 with Allow")
    st, _, o = d.json("GET", "/readyz")
    check(st == 200, "/readyz 200 after all the bad requests")


def chain_steps(d):
    st, _, text = d.request("GET", "/metrics")
    return jemtest.metric_value(text.decode(), "jem_sgld_chain_steps_total")


def test_cancel_and_queue(ctx):
    print("== cancel, queue full (429), cancel a queued job")
    d = ctx.main
    long_body = {"n": 16, "steps": 2000, "seed": 1, "init": "noise"}
    st, _, o = post_job(d, long_body)
    if not check(st == 202, "long job accepted"):
        return
    jid = o["id"]
    st, _, o = wait_job(d, jid, until=("running",), timeout=60)
    end = time.time() + 60
    while o["progress"]["step"] == 0 and time.time() < end:
        time.sleep(0.05)
        st, _, o = d.json("GET", "/v1/jobs/" + jid)
    check(o["status"] == "running" and o["progress"]["step"] > 0, "job is running with progress")
    st, h, o = d.json("DELETE", "/v1/jobs/" + jid)
    check(st == 200 and o["status"] == "canceled" and o["error"]["reason"] == "canceled",
          "DELETE a running job -> 200 canceled, reason canceled (%s)" % (o.get("error"),))
    check(o["finished_at"] is not None and o["result"] is None, "finished_at set, no result")
    # the slice that saw the cancel ends (a step can take long under ASan), then no
    # more steps: the counter settles, which it would not for minutes if the job ran on
    end, prev, settled = time.time() + 20, chain_steps(d), False
    while time.time() < end and not settled:
        time.sleep(0.5)
        cur = chain_steps(d)
        settled, prev = cur == prev, cur
    check(settled, "no more SGLD steps after the cancel")
    # DELETE removes the job: it and its results are gone, a second DELETE is 404
    for path in ("", "/grid.png", "/samples.npy", "/samples/0.png"):
        st, _, o = d.json("GET", "/v1/jobs/" + jid + path)
        check(st == 404 and is_error(o, "job_not_found"),
              "GET%s of a deleted job -> 404 (got %s)" % (path or " job", st))
    st, _, o3 = d.json("DELETE", "/v1/jobs/" + jid)
    check(st == 404 and is_error(o3, "job_not_found"), "DELETE again -> 404 (got %s)" % st)
    # a finished job, with its results: removed too
    st, _, o = post_job(d, {"n": 2, "steps": 2, "seed": 5})
    fid = o["id"]
    st, _, o = wait_job(d, fid)
    st, _, o = d.json("DELETE", "/v1/jobs/" + fid)
    check(st == 200 and o["status"] == "succeeded" and o["result"] is not None,
          "DELETE a finished job -> 200 with its final state (%s)" % o.get("status"))
    for path in ("", "/grid.png", "/samples.npy", "/samples/1.png"):
        st, _, o = d.json("GET", "/v1/jobs/" + fid + path)
        check(st == 404 and is_error(o, "job_not_found"),
              "GET%s of a deleted finished job -> 404 (got %s)" % (path or " job", st))
    # fill the queue: --max-queued-jobs 3
    ids = []
    for _ in range(3):
        st, _, o = post_job(d, long_body)
        check(st == 202, "job %d accepted" % (len(ids) + 1))
        ids.append(o["id"])
    st, h, o = post_job(d, {"n": 1, "steps": 1})
    check(st == 429 and is_error(o, "queue_full") and h.get("retry-after"),
          "4th active job -> 429 queue_full with Retry-After (got %s)" % st)
    st, _, q = d.json("GET", "/v1/jobs/" + ids[2])
    st, _, o = d.json("DELETE", "/v1/jobs/" + ids[2])
    check(st == 200 and o["status"] == "canceled",
          "DELETE a %s job -> canceled at once" % q["status"])
    for jid in ids[:2]:
        d.json("DELETE", "/v1/jobs/" + jid)
    st, _, o = post_job(d, {"n": 1, "steps": 1})
    check(st == 202, "after the cancels a new job is accepted")
    wait_job(d, o["id"])


def test_reload(ctx):
    print("== SIGHUP while a job runs: it finishes on the model it started with")
    d = start(ctx, ctx.model_a, "--log-level", "debug")
    st, _, o = post_job(d, {"n": 4, "steps": 3 * ctx.steps, "seed": 8, "init": "noise"})
    jid = o["id"]
    wait_job(d, jid, until=("running",), timeout=60)
    d.signal(signal.SIGHUP)
    st, _, o = wait_job(d, jid)
    check(o["status"] == "succeeded", "job succeeded across a reload")
    end = time.time() + 10
    while time.time() < end and "model reloaded" not in d.log():
        time.sleep(0.05)
    check("model reloaded" in d.log(), "the daemon reloaded the model")
    # the finished job (still stored) no longer holds the old model
    end = time.time() + 5
    while time.time() < end and not re.search(r"model released.*generation=1\b", d.log()):
        time.sleep(0.05)
    check(re.search(r"model released.*generation=1\b", d.log()),
          "the old model is released once the job ended (stored jobs do not pin it)")
    st, _, o = d.json("GET", "/v1/jobs/" + jid)
    check(st == 200 and o["model"] == "a" and o["result"]["samples"][0]["class"].startswith("class"),
          "the finished job still shows its model and class names")
    st, _, o = post_job(d, {"n": 2, "steps": 2})
    st, _, o = wait_job(d, o["id"])
    check(o["status"] == "succeeded", "a job on the new model succeeds")
    stop(ctx, d)


def test_ttl(ctx):
    print("== expiry after --job-ttl")
    d = start(ctx, ctx.model_a, "--job-ttl", "1")
    st, _, o = post_job(d, {"n": 1, "steps": 1})
    jid = o["id"]
    st, _, o = wait_job(d, jid)
    check(o["status"] == "succeeded", "short job succeeded")
    time.sleep(1.3)
    for path in ("/v1/jobs/" + jid, "/v1/jobs/%s/grid.png" % jid):
        st, _, o = d.json("GET", path)
        check(st == 404 and is_error(o), "%s after the TTL -> 404 (got %s)" % (path[-12:], st))
    stop(ctx, d)


def test_auth(ctx):
    print("== API key (--api-key-file, --protect-scoring) and listing")
    st, _, o = ctx.main.json("GET", "/v1/jobs")
    check(st == 403 and is_error(o), "GET /v1/jobs without a configured key -> 403 (%s)" % st)
    keyf = os.path.join(ctx.tmp, "keys")
    with open(keyf, "w") as f:
        f.write("# test keys\nsecret-one\n")
    d = start(ctx, ctx.model_a, "--api-key-file", keyf, "--protect-scoring")
    good = {"Authorization": "Bearer secret-one"}
    bad = {"Authorization": "Bearer secret-two"}
    for hdr, what in ((None, "no token"), (bad, "wrong token"),
                      ({"Authorization": "secret-one"}, "no Bearer scheme")):
        st, h, o = post_job(d, {"n": 1, "steps": 1}, hdr)
        check(st == 401 and "bearer" in h.get("www-authenticate", "").lower() and is_error(o),
              "POST /v1/samples with %s -> 401 + WWW-Authenticate" % what)
    st, h, o = post_job(d, {"n": 1, "steps": 1}, {"Authorization": "bEaReR secret-one"})
    check(st == 202, "the auth scheme is case-insensitive (RFC 7235): 'bEaReR' -> 202 (%s)" % st)
    st, h, o = post_job(d, {"n": 1, "steps": 1}, good)
    check(st == 202, "POST with the right token -> 202")
    jid = o["id"]
    st, _, o = d.json("GET", "/v1/jobs/" + jid)
    check(st == 401, "GET job without token -> 401")
    st, _, o = wait_job(d, jid, headers=good)
    check(st == 200 and o["status"] == "succeeded", "GET job with token -> 200")
    for path in ("/grid.png", "/samples/0.png", "/samples.npy"):
        st, _, _ = d.request("GET", "/v1/jobs/" + jid + path)
        st2, _, _ = d.request("GET", "/v1/jobs/" + jid + path, headers=good)
        check(st == 401 and st2 == 200, "%s: 401 without, 200 with the token" % path)
    st, _, _ = d.request("DELETE", "/v1/jobs/" + jid)
    check(st == 401, "DELETE without token -> 401")
    st, _, o = d.json("GET", "/v1/jobs")
    check(st == 401, "listing without token -> 401")
    st, _, o = d.json("GET", "/v1/jobs", headers=good)
    check(st == 200 and jid in [j["id"] for j in o["jobs"]], "listing with token shows the job")
    png = jemtest.test_images(1)[0]
    st, _, _ = d.request("POST", "/v1/classify", png, {"Content-Type": "image/png"})
    st2, _, _ = d.request("POST", "/v1/classify", png, dict(good, **{"Content-Type": "image/png"}))
    check(st == 401 and st2 == 200, "--protect-scoring: classify 401 without, 200 with the token")
    st, _, _ = d.request("GET", "/healthz")
    st2, _, _ = d.request("GET", "/metrics")
    check(st == 200 and st2 == 200, "health and metrics stay open")
    stop(ctx, d)


def test_metrics(ctx):
    print("== job metrics")
    st, _, text = ctx.main.request("GET", "/metrics")
    text = text.decode()
    for name in ('jem_jobs{state="succeeded"}', 'jem_jobs{state="running"}',
                 'jem_jobs_created_total{model="', 'jem_jobs_finished_total{model="',
                 'jem_jobs_rejected_total{reason="queue_full"}',
                 'jem_sgld_chain_steps_total{model="', "jem_job_store_bytes"):
        check(name in text, "/metrics has %s" % name)
    mv = jemtest.metric_value
    check(mv(text, "jem_jobs_finished_total", {"status": "canceled"}) is not None and
          mv(text, "jem_job_duration_seconds_bucket", {"status": "succeeded", "le": "+Inf"}) >= 1,
          "finished jobs and their durations counted by status (and model)")
    val = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
           if l and not l.startswith("#")}
    check(mv(text, "jem_sgld_chain_steps_total") > 0, "chain steps counted")
    check(val.get('jem_jobs_rejected_total{reason="queue_full"}', 0) >= 1, "429 counted")
    check('route="/v1/jobs/{id}"' in text, "request metrics use the route template")
    # GET and DELETE share /v1/jobs/{id}: the method label keeps their series apart
    series = [l.rsplit(" ", 1)[0] for l in text.splitlines()
              if l.startswith("jem_http_requests_total") or
              l.startswith("jem_request_duration_seconds")]
    dup = sorted({x for x in series if series.count(x) > 1})
    check(not dup, "every request series is unique (duplicates: %s)" % dup[:3])
    check('method="DELETE",route="/v1/jobs/{id}"' in text, "DELETE has its own series")
    promtool = shutil.which("promtool")
    if promtool:
        p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
        check(p.returncode == 0, "promtool check metrics passes %s" % (p.stdout + p.stderr)[:300])


def test_shutdown(ctx):
    print("== SIGTERM with jobs running")
    d = start(ctx, ctx.model_a, "--drain-seconds", "2", "--drain-delay", "1")
    st, _, o = post_job(d, {"n": 16, "steps": 2000, "seed": 3})
    jid = o["id"]
    st, _, o = post_job(d, {"n": 16, "steps": 2000, "seed": 4})
    jid2 = o["id"]
    wait_job(d, jid, until=("running",), timeout=60)
    t0 = time.time()
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    st, h, o = post_job(d, {"n": 1, "steps": 1})
    check(st == 503 and is_error(o), "POST /v1/samples while draining -> 503 (got %s)" % st)
    st, _, o = d.json("GET", "/v1/jobs/" + jid)
    check(st == 200 and o["status"] == "running", "the running job keeps running while draining")
    log = stop(ctx, d, send=False)  # a second SIGTERM would skip the drain
    took = time.time() - t0
    check(2.5 <= took < 15, "exit after the drain delay plus the drain (1 + 2 s; %.1f s)" % took)
    for j in (jid, jid2):
        line = [l for l in log.splitlines() if "job finished" in l and j in l]
        check(line and "status=canceled" in line[-1] and "reason=shutdown" in line[-1],
              "job %s... canceled with reason shutdown: %s" % (j[:8], line[-1:] if line else
                                                                  "no log line"))
    # without a delay the port stays open through the drain: new work gets a
    # JSON 503 (not a refused connection) and running jobs can still be polled
    d = start(ctx, ctx.model_a, "--drain-seconds", "2")
    st, _, o = post_job(d, {"n": 16, "steps": 2000, "seed": 6})
    jid = o["id"]
    wait_job(d, jid, until=("running",), timeout=60)
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    st, h, o = post_job(d, {"n": 1, "steps": 1})
    check(st == 503 and is_error(o, "draining") and h.get("retry-after"),
          "delay 0: POST /v1/samples while draining -> 503 draining + Retry-After (got %s)" % st)
    png = jemtest.test_images(1)[0]
    st, _, o = d.json("POST", "/v1/classify", png, {"Content-Type": "image/png"})
    check(st == 503 and is_error(o, "draining"), "delay 0: POST /v1/classify -> 503 (got %s)" % st)
    st, _, o = d.json("GET", "/v1/jobs/" + jid)
    check(st == 200 and o["status"] == "running", "delay 0: the running job can still be polled")
    log = stop(ctx, d, send=False)
    line = [l for l in log.splitlines() if "job finished" in l and jid in l]
    check(line and "reason=shutdown" in line[-1], "delay 0: job canceled with reason shutdown")
    # a short job finishes within the drain and is not canceled
    d = start(ctx, ctx.model_a, "--drain-seconds", "20")
    st, _, o = post_job(d, {"n": 2, "steps": ctx.steps, "seed": 5})
    jid = o["id"]
    d.signal(signal.SIGTERM)
    log = stop(ctx, d, send=False)
    line = [l for l in log.splitlines() if "job finished" in l and jid in l]
    check(line and "status=succeeded" in line[-1],
          "a job that ends before the drain deadline succeeds: %s" % line[-1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--only", help="comma-separated test names (life, given, ...)")
    ap.add_argument("--trained", default=os.path.join(ROOT, "models", "fmnist-jem.safetensors"),
                    help="a trained model for the class-conditional rate (skipped if absent)")
    args = ap.parse_args()
    ctx = Ctx()
    b = args.build if os.path.isabs(args.build) else os.path.join(ROOT, args.build)
    ctx.jemd, ctx.jem = os.path.join(b, "jemd"), os.path.join(b, "jem")
    if not os.path.exists(ctx.jem):  # e.g. only the daemon was built with ASan
        ctx.jem = os.path.join(ROOT, "build", "jem")
        print("note: %s/jem missing, using %s for the CLI checks" % (args.build, ctx.jem))
    ctx.asan = "asan" in os.path.basename(os.path.normpath(b))
    ctx.steps = 12 if ctx.asan else 40
    ctx.trained = args.trained
    ctx.daemons = []
    ctx.report = {}
    ctx.tmp = tempfile.mkdtemp(prefix="jem_jobs_")
    t0 = time.time()
    load_spec()
    try:
        # random WRN-10-1s; weights x2 so that the logits depend on the input
        # enough for SGLD to visibly lower energies and reach a class
        ctx.model_a = os.path.join(ctx.tmp, "a.safetensors")
        jemtest.write_model(ctx.model_a, seed=3, name="a", ood=False, scale=2.0)
        ctx.model_b = os.path.join(ctx.tmp, "b.safetensors")
        jemtest.write_model(ctx.model_b, seed=4, name="bufnet", ood=False, scale=2.0)
        rng = np.random.default_rng(0)
        add_replay(ctx.model_b, rng.uniform(-1, 1, (20, 1, 32, 32)))
        caps = ["--max-queued-jobs", "3", "--max-samples", "64", "--max-steps", "2000",
                "--max-jobs", "64"]
        ctx.main = start(ctx, ctx.model_a, *caps)
        ctx.dbuf = start(ctx, ctx.model_b, *caps)
        tests = [("life", test_life), ("given", test_given_images),
                 ("determinism", test_determinism), ("batched", test_batched),
                 ("buffer", test_buffer_default),
                 ("class", test_class_conditional), ("sampler", test_sampler),
                 ("bad", test_bad_params),
                 ("cancel", test_cancel_and_queue), ("reload", test_reload),
                 ("ttl", test_ttl), ("auth", test_auth),
                 ("metrics", test_metrics), ("shutdown", test_shutdown),
                 ("openapi", test_openapi)]
        only = set(args.only.split(",")) if args.only else None
        for name, fn in tests:
            if only and name not in only:
                continue
            try:
                fn(ctx)
            except Exception as e:  # a crash in one test is a failure, not an abort
                import traceback
                traceback.print_exc()
                check(False, "%s raised %r" % (name, e))
        for d in list(ctx.daemons):
            stop(ctx, d)
    finally:
        for d in ctx.daemons:
            d.kill()
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    print("test_jobs: %d failure(s), %.1f s" % (len(FAILS), time.time() - t0))
    if ctx.report:
        print("test_jobs report: %s" % json.dumps(ctx.report))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
