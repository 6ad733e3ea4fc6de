#!/usr/bin/python3
"""test_contract.py - openapi.yaml and jemd agree: requests go through Stoplight
Prism's validating proxy (`prism proxy --errors`), which checks each request
against the spec before forwarding it and each answer of jemd after; any
violation comes back as a problem+json answer with an `sl-violations`
header.  Then `redocly lint` (recommended rules) must be clean.

Prism mangles binary bodies (it reads them as UTF-8 text, a known upstream
problem), so requests with an image or raw-tensor body (POST /v1/classify as
image/png, image/jpeg or multipart; /v2 infer with the binary tensor
extension) and the binary answers (grid.png, samples/{k}.png, samples.npy)
are sent to jemd directly and checked here against the spec's statuses and
media types; their JSON error answers still go through Prism.

usage: /usr/bin/python3 tests/integration/test_contract.py --build build
"""
import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import jemtest  # noqa: E402
import yaml  # noqa: E402  (python3-yaml)

check = jemtest.Checks("test_contract")
NODE_BIN = os.path.join(ROOT, "tests", "node", "node_modules", ".bin")
SPEC = os.path.join(ROOT, "openapi.yaml")
ORIGIN = "http://page.example"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


class Prism:
    """prism proxy openapi.yaml -> jemd on a free port, --errors."""

    def __init__(self, upstream):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [os.path.join(NODE_BIN, "prism"), "proxy", SPEC, f"http://127.0.0.1:{upstream}",
             "--errors", "--host", "127.0.0.1", "--port", str(self.port), "--cors=false"],
            stdout=self.log, stderr=subprocess.STDOUT)
        end = time.time() + 60
        while time.time() < end and self.proc.poll() is None:
            try:
                call(self.port, "GET", "/healthz")
                return
            except OSError:
                time.sleep(0.25)
        self.stop()
        self.log.seek(0)
        raise RuntimeError("prism did not start:\n" + self.log.read().decode()[-2000:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def via(prism, method, path, expect, body=None, headers=None, what=None, d=None):
    """One request through Prism: jemd's answer must come back (not Prism's
    own) with the expected status and no violation.  With d (the daemon), a
    request the spec calls invalid: Prism must refuse it (422, request
    violations only) and jemd, asked directly, with the expected status."""
    st, h, data = call(prism.port, method, path, body, headers)
    what = what or f"{method} {path}"
    if d is not None:
        v = json.loads(h.get("sl-violations") or "[]") or json.loads(data).get("validation", [])
        check(st == 422 and v and all(x["location"][0] in ("query", "body", "path", "header")
                                      for x in v),
              f"{what}: the spec calls it invalid ({st}: {v})")
        dst, _, ddata = call(d.port, method, path, body, headers)
        check(dst == expect, f"{what}: jemd answers {dst}, expected {expect}: {ddata[:200]!r}")
        return None
    ok = check("sl-violations" not in h and "problem+json" not in h.get("content-type", ""),
               f"{what}: spec and jemd disagree: {h.get('sl-violations') or data[:400]!r}")
    if ok:
        check(st == expect, f"{what}: status {st}, expected {expect}: {data[:200]!r}")
    try:
        return json.loads(data) if h.get("content-type", "").startswith("application/json") else data
    except ValueError:
        return data


def documented(spec, method, template, status, ctype):
    """The binary routes' answers, checked here: status and media type in the spec."""
    op = spec["paths"][template][method.lower()]
    resp = op["responses"].get(str(status))
    while resp and "$ref" in resp:
        resp = spec["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    return resp is not None and ctype.split(";")[0] in resp.get("content", {})


def test_through_prism(p, d, png, name):
    J = {"Content-Type": "application/json"}
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v2", "/v2/health/live",
                 "/v2/health/ready", f"/v2/models/{name}", f"/v2/models/{name}/ready", "/",
                 "/ui/app.js", "/ui/app.css", "/openapi.yaml"):
        via(p, "GET", path, 200)
    via(p, "GET", "/v2/models/nosuch", 404)
    via(p, "GET", "/ui/nosuch.js", 404)
    b64 = base64.b64encode(png).decode()
    # data: URLs and the grad spellings clients send
    for q in ("", "?grad=False", "?grad=0", "?grad=TRUE&top_k=3&tpr=0.9"):
        via(p, "POST", "/v1/classify" + q, 200, json.dumps({"images": [b64]}), J)
    r = via(p, "POST", "/v1/classify", 200,
            json.dumps({"images": ["data:image/png;base64," + b64, b64]}), J, "data: URL images")
    check(isinstance(r, dict) and len(r.get("results", [])) == 2, "two results")
    via(p, "POST", "/v1/classify", 400, json.dumps({"images": ["@@not base64@@"]}), J,
        "bad base64: 400")
    via(p, "POST", "/v1/classify", 415, json.dumps({"images": [base64.b64encode(b"text").decode()]}),
        J, "base64 of no image: 415")
    via(p, "POST", "/v1/classify?grad=maybe", 400, json.dumps({"images": [b64]}), J,
        "grad=maybe is refused by both", d)
    via(p, "POST", "/v1/classify", 422, json.dumps({"images": []}), J, "no images", d)
    # the model repository: named routes, versions, the index, load and unload
    via(p, "GET", f"/v1/models/{name}", 200)
    via(p, "GET", "/v1/models/nosuch", 404)
    via(p, "POST", f"/v1/models/{name}/classify?grad=false", 200, json.dumps({"images": [b64]}), J)
    via(p, "POST", f"/v1/classify?model={name}", 200, json.dumps({"images": [b64]}), J)
    via(p, "POST", "/v1/classify?model=nosuch", 404, json.dumps({"images": [b64]}), J)
    via(p, "GET", f"/v2/models/{name}/versions/1", 200)
    via(p, "GET", f"/v2/models/{name}/versions/1/ready", 200)
    via(p, "GET", f"/v2/models/{name}/versions/7", 404)
    via(p, "POST", "/v2/repository/index", 200)
    via(p, "POST", "/v2/repository/index", 200, json.dumps({"ready": True}), J)
    via(p, "POST", f"/v2/repository/models/{name}/unload", 200)
    via(p, "POST", f"/v2/models/{name}/infer", 404, json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                     "data": [0.0] * 1024}]}), J, "infer on an unloaded model")
    via(p, "POST", f"/v2/repository/models/{name}/load", 200)
    via(p, "POST", "/v2/repository/models/nosuch/load", 404)
    via(p, "POST", "/v1/samples", 404, json.dumps({"model": "nosuch"}), J, "job, unknown model")
    x = [0.0] * (32 * 32)
    infer = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": x}]}
    via(p, "POST", f"/v2/models/{name}/infer", 200, json.dumps(infer), J)
    infer["outputs"] = [{"name": "energy"}]
    via(p, "POST", f"/v2/models/{name}/infer", 200, json.dumps(infer), J, "infer, one output")
    via(p, "POST", f"/v2/models/{name}/versions/1/infer", 200, json.dumps(infer), J)
    infer["inputs"][0]["shape"] = [1, 1, 16, 16]
    via(p, "POST", f"/v2/models/{name}/infer", 422, json.dumps(infer), J, "infer, wrong shape")
    # jobs: class null (nullable inside oneOf), init images as a data: URL
    job = via(p, "POST", "/v1/samples", 202, json.dumps(
        {"n": 2, "steps": 2, "seed": 3, "class": None, "model": name}), J, "job, class null")
    via(p, "POST", "/v1/samples", 202, json.dumps(
        {"steps": 1, "class": "class1", "init": {"images": ["data:image/png;base64," + b64]}}), J,
        "job from a data: URL image")
    via(p, "POST", "/v1/samples", 422, json.dumps({"class": "nosuch"}), J, "unknown class: 422")
    via(p, "POST", "/v1/samples", 400, json.dumps({"colour": 1}), J, "unknown field", d)
    via(p, "POST", "/v1/samples", 400, json.dumps({"n": "2"}), J, "n as a string", d)
    if not isinstance(job, dict):
        return None
    jid = job["id"]
    end = time.time() + 30
    while job.get("status") in ("queued", "running") and time.time() < end:
        time.sleep(0.1)
        job = via(p, "GET", f"/v1/jobs/{jid}", 200, what="poll the job")
    check(job.get("status") == "succeeded", f"the job succeeded: {job.get('status')}")
    via(p, "GET", "/v1/jobs/not-a-job-id", 404, what="malformed job id: 404")
    via(p, "GET", "/v1/jobs/" + "0" * 32, 404, what="unknown job id: 404")
    via(p, "GET", "/v1/jobs/" + "0" * 32 + "/grid.png", 404, what="grid of an unknown job: 404")
    via(p, "GET", "/v1/jobs", 403, what="anonymous listing without --api-key-file: 403")
    via(p, "GET", f"/v1/jobs/{jid}?x=1", 400, what="unknown query parameter: 400")
    # preflights (jemd runs with --cors-origin) and OPTIONS that is not one
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    via(p, "OPTIONS", "/v1/classify", 204, headers=pre, what="preflight: 204")
    via(p, "OPTIONS", f"/v2/models/{name}/infer", 204, headers=pre, what="v2 preflight: 204")
    via(p, "OPTIONS", "/v1/samples", 403, headers=dict(pre, Origin="http://other.example"),
        what="preflight from another origin: 403")
    via(p, "OPTIONS", "/v1/models", 405, what="OPTIONS without a preflight's headers: 405")
    via(p, "OPTIONS", "/v2", 405, what="OPTIONS on /v2 without a preflight's headers: 405")
    return job


def test_direct(spec, d, png, jpeg, name, job):
    """Binary bodies, which Prism would mangle: straight to jemd, checked here."""
    def direct(method, path, template, expect, body=None, headers=None, what=None):
        st, h, data = call(d.port, method, path, body, headers)
        ctype = h.get("content-type", "")
        check(st == expect and documented(spec, method, template, st, ctype) and
              "x-request-id" in h, f"{what or method + ' ' + path} (direct): {st} {ctype} "
              f"documented, expected {expect}")
        return data
    direct("POST", "/v1/classify", "/v1/classify", 200, png, {"Content-Type": "image/png"})
    direct("POST", "/v1/classify", "/v1/classify", 200, jpeg, {"Content-Type": "image/jpeg"})
    direct("POST", "/v1/classify", "/v1/classify", 415, b"GIF89a", {"Content-Type": "image/gif"})
    body = (b"--b\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\n")
    direct("POST", "/v1/classify", "/v1/classify", 200, body,
           {"Content-Type": "multipart/form-data; boundary=b"}, "multipart")
    hdr = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                                  "parameters": {"binary_data_size": 4096}}],
                      "outputs": [{"name": "energy", "parameters": {"binary_data": True}}]}).encode()
    direct("POST", f"/v2/models/{name}/infer", "/v2/models/{name}/infer", 200,
           hdr + b"\0" * 4096, {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(hdr))},
           "binary tensor extension")
    if job and job.get("status") == "succeeded":
        jid = job["id"]
        direct("GET", f"/v1/jobs/{jid}/grid.png", "/v1/jobs/{id}/grid.png", 200)
        direct("GET", f"/v1/jobs/{jid}/samples/1.png", "/v1/jobs/{id}/samples/{k}.png", 200)
        direct("GET", f"/v1/jobs/{jid}/samples.npy", "/v1/jobs/{id}/samples.npy", 200)


def test_lint():
    p = subprocess.run([os.path.join(NODE_BIN, "redocly"), "lint", "--format=summary",
                        "--config", os.path.join(ROOT, "tests", "node", "redocly.yaml"), SPEC],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = p.stdout + p.stderr
    check(p.returncode == 0 and "valid" in out and "warning" not in out.lower(),
          f"redocly lint openapi.yaml: no error, no warning (rc {p.returncode}):\n{out[-1500:]}")


def main():
    jemd = jemtest.jemd_binary(ROOT)
    if not check(os.path.exists(os.path.join(NODE_BIN, "prism")),
                 "tests/node/node_modules is missing: run `make node-deps` (make test does)"):
        return check.report()
    spec = yaml.safe_load(open(SPEC))
    tmp = tempfile.mkdtemp(prefix="jemd-contract-")
    try:
        model = os.path.join(tmp, "contractnet.safetensors")
        jemtest.write_model(model, seed=6, name="contractnet")
        png = jemtest.test_images(1, seed=8)[0]
        jpeg = open(os.path.join(ROOT, "tests", "data", "images", "baseline.jpg"), "rb").read()
        d = jemtest.Daemon(jemd, model, "--cors-origin", ORIGIN)
        p = None
        try:
            p = Prism(d.port)
            job = test_through_prism(p, d, png, "contractnet")
            test_direct(spec, d, png, jpeg, "contractnet", job)
        finally:
            if p:
                p.stop()
            d.kill()
        test_lint()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
