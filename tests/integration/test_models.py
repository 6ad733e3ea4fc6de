#!/usr/bin/python3
"""test_models.py - several models in one daemon: --model-dir, repeated
--model, --default-model, the per-model routes, the OIP v2 repository
extension (load and unload behind the API key, as the job routes), SIGHUP
rescans (added, removed, changed and broken files, and a request in flight
finishing on the old model), the `model` metric label, a workspace per model
on each worker, --wide-transforms and 404 model_not_found.  Each model's answers are compared with `jem score` on
its own file.

usage: /usr/bin/python3 tests/integration/test_models.py --build build
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import jemtest  # noqa: E402

check = jemtest.Checks("test_models")
PNG = {"Content-Type": "image/png"}
J = {"Content-Type": "application/json"}


def close(a, b, tol=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def jem_logits(jem, model, image):
    p = subprocess.run([jem, "score", model, image, "--no-grad"], capture_output=True, text=True,
                       timeout=60)
    return json.loads(p.stdout.splitlines()[0])["logits"] if p.returncode == 0 else None


def index(d):
    st, _, js = d.json("POST", "/v2/repository/index")
    return {m["name"]: m for m in js} if st == 200 else {}


def wait_for(cond, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_routes(d, jem, files, img):
    """Two models side by side, each answering as jem score does on its file."""
    st, _, js = d.json("GET", "/v1/models")
    check(st == 200 and [m["name"] for m in js["models"]] == ["alpha", "beta"] and
          js["default"] == "alpha" and [m["default"] for m in js["models"]] == [True, False],
          f"/v1/models: both, named by file, alpha the default ({js})")
    check(len(js["models"][1]["classes"]) == 5, "beta has its own 5 classes")
    png = open(img, "rb").read()
    want = {n: jem_logits(jem, files[n], img) for n in ("alpha", "beta")}
    for n in ("alpha", "beta"):
        for path in (f"/v1/classify?model={n}&grad=false", f"/v1/models/{n}/classify?grad=false"):
            st, _, r = d.json("POST", path, png, PNG)
            check(st == 200 and close(r["logits"], want[n]), f"POST {path}: {n}'s logits")
        st, _, m = d.json("GET", f"/v1/models/{n}")
        check(st == 200 and m["name"] == n, f"GET /v1/models/{n}")
        st, _, r = d.json("POST", f"/v2/models/{n}/versions/1/infer", json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                         "data": [0.0] * 1024}], "outputs": [{"name": "logits"}]}), J)
        check(st == 200 and r["model_name"] == n and
              r["outputs"][0]["shape"] == [1, 10 if n == "alpha" else 5],
              f"v2 infer on {n} (with /versions/1)")
    st, _, r = d.json("POST", "/v1/classify?grad=false", png, PNG)
    check(st == 200 and close(r["logits"], want["alpha"]), "no model named: the default")
    # unknown models, every way of naming one
    for method, path, body, hdr in (
            ("POST", "/v1/classify?model=gamma", png, PNG),
            ("POST", "/v1/models/gamma/classify", png, PNG),
            ("GET", "/v1/models/gamma", None, None),
            ("POST", "/v1/samples", json.dumps({"model": "gamma"}), J)):
        st, _, js = d.json(method, path, body, hdr)
        check(st == 404 and js["error"]["code"] == "model_not_found" and
              "gamma" in js["error"]["message"], f"{method} {path}: 404 model_not_found")
    for path in ("/v2/models/gamma", "/v2/models/gamma/ready", "/v2/models/alpha/versions/2"):
        st, _, js = d.json("GET", path)
        check(st == 404 and isinstance(js.get("error"), str), f"GET {path}: 404, v2 shape")
    st, _, js = d.json("POST", "/v1/models/beta/classify?model=alpha", png, PNG)
    check(st == 400 and js["error"]["code"] == "invalid_parameter", "model in path and query: 400")
    st, _, js = d.json("POST", "/v1/samples", json.dumps({"model": 7}), J)
    check(st == 400 and js["error"]["code"] == "invalid_type", "job model not a string: 400")
    # a job on the second model, with one of its class names
    st, _, job = d.json("POST", "/v1/samples",
                        json.dumps({"model": "beta", "n": 2, "steps": 2, "class": "class4"}), J)
    check(st == 202 and job["model"] == "beta" and job["params"]["class"] == 4,
          f"a job on beta ({st}, {job})")
    wait_for(lambda: d.json("GET", f"/v1/jobs/{job['id']}")[2]["status"] == "succeeded")
    st, _, job = d.json("GET", f"/v1/jobs/{job['id']}")
    check(job["status"] == "succeeded" and job["model"] == "beta" and
          all(s["class"].startswith("class") and s["label"] < 5 for s in job["result"]["samples"]),
          "the job ran on beta (its labels are beta's)")
    st, _, job = d.json("POST", "/v1/samples", json.dumps({"n": 1, "steps": 1}), J)
    check(st == 202 and job["model"] == "alpha", "a job naming no model: the default")
    st, _, text = d.request("GET", "/metrics")
    t = text.decode()
    for n in ("alpha", "beta"):
        check(re.search(r'jem_model_info\{model="%s",' % n, t) and
              re.search(r'jem_model_loaded\{model="%s"\} 1' % n, t), f"metrics: {n}'s series")
    mv = jemtest.metric_value
    check(mv(t, "jem_scored_images_total", {"model": "beta"}) == 3 and
          mv(t, "jem_scored_images_total", {"model": "alpha"}) == 4,
          "images counted by model: beta 3, alpha 4")
    check(mv(t, "jem_energy_count", {"model": "beta"}) == 3 and
          mv(t, "jem_ood_score_count", {"model": "beta", "score": "energy"}) == 2,
          "energy (3 images) and OOD percentiles (2, not v2 infer) by model")
    for route, n in (("/v1/classify", "beta"), ("/v1/models/{name}/classify", "beta"),
                     ("/v2/models/{name}/versions/{version}/infer", "beta"),
                     ("/v1/models/{name}", "alpha"), ("/v1/samples", "beta")):
        check((mv(t, "jem_http_requests_total", {"route": route, "model": n}) or 0) >= 1 and
              (mv(t, "jem_request_duration_seconds_count", {"route": route, "model": n}) or 0)
              >= 1,
              f"requests and latency of {route} by model ({n})")
    check(mv(t, "jem_http_requests_total", {"route": "/v1/classify", "code": "200"}) == 3 and
          mv(t, "jem_http_requests_total", {"route": "/v1/classify", "model": "alpha"}) == 2,
          "/v1/classify: 3 answered, 2 of them by alpha")
    check('model="gamma"' not in t and
          mv(t, "jem_http_requests_total", {"route": "/v1/classify", "code": "404"}) == 1,
          "an unknown model's 404 is counted without a model label (no client-made series)")
    check(mv(t, "jem_jobs_created_total", {"model": "beta"}) == 1 and
          mv(t, "jem_jobs_finished_total", {"model": "beta", "status": "succeeded"}) == 1 and
          mv(t, "jem_sgld_chain_steps_total", {"model": "beta"}) == 4,
          "beta's job: created, succeeded, 2 chains x 2 steps")
    p = subprocess.run(["promtool", "check", "metrics"], input=t, capture_output=True, text=True)
    check(p.returncode == 0, f"promtool check metrics: {(p.stdout + p.stderr)[:300]}")
    st, _, js = d.json("GET", "/v2")
    check("model_repository" in js["extensions"], "/v2 lists the repository extension")


def test_page(d, img):
    """The page's model chooser: beta chosen, its label and a job on it."""
    node_dir = os.path.join(ROOT, "tests", "node")
    if not check(os.path.isdir(os.path.join(node_dir, "node_modules", "puppeteer-core")),
                 "tests/node/node_modules is missing: run `make node-deps` (make test does)"):
        return
    p = subprocess.run(["node", os.path.join(node_dir, "page.mjs"), f"http://127.0.0.1:{d.port}/",
                        img, "1", "2", "5"], capture_output=True, text=True, timeout=120,
                       cwd=node_dir, env=dict(os.environ, PAGE_MODEL="beta"))
    try:
        got = json.loads(p.stdout)
    except ValueError:
        check(False, f"page.mjs printed no JSON (rc {p.returncode}): {p.stderr[-800:]}")
        return
    _, _, want = d.json("POST", "/v1/classify?model=beta", open(img, "rb").read(), PNG)
    check(got["errors"] == [] and got["models"] == ["alpha", "beta"],
          f"the page lists both models ({got.get('models')}, {got['errors']})")
    check(got["classify"]["label"] == want["label"] and len(got["classify"]["bars"]) == 5,
          "with beta chosen, the page shows beta's label and its 5 classes")
    st, _, job = d.json("GET", f"/v1/jobs/{got['job'].get('id')}")
    check(st == 200 and job["model"] == "beta" and job["status"] == "succeeded",
          f"the page's job ran on beta ({job.get('model') if job else st})")


def test_repository(d):
    idx = index(d)
    check(set(idx) == {"alpha", "beta"} and all(m["state"] == "READY" for m in idx.values()),
          f"index: both READY ({idx})")
    gen0 = d.json("GET", "/v1/models/beta")[2]["generation"]
    st, _, js = d.json("POST", "/v2/repository/models/beta/unload")
    check(st == 200 and js == {}, "unload beta")
    idx = index(d)
    check(idx["beta"]["state"] == "UNAVAILABLE" and idx["beta"]["reason"] == "unloaded",
          f"index: beta UNAVAILABLE, unloaded ({idx.get('beta')})")
    st, _, js = d.json("POST", "/v2/repository/index", json.dumps({"ready": True}), J)
    check([m["name"] for m in js] == ["alpha"], "index {ready: true}: alpha only")
    st, _, js = d.json("POST", "/v1/models/beta/classify", b"x", PNG)
    check(st == 404 and "unloaded" in js["error"]["message"], "an unloaded model: 404")
    st, _, js = d.json("GET", "/v1/models")
    check([m["name"] for m in js["models"]] == ["alpha"], "/v1/models lists the loaded ones")
    st, _, js = d.json("POST", "/v2/repository/models/beta/load")
    check(st == 200, "load beta again")
    check(d.json("GET", "/v1/models/beta")[2]["generation"] > gen0, "a new generation")
    st, _, js = d.json("POST", "/v2/repository/models/nosuch/unload")
    check(st == 404 and isinstance(js["error"], str), "unload of an unknown model: 404")
    t = d.request("GET", "/metrics")[2].decode()
    check(all(jemtest.metric_value(t, "jem_http_requests_total",
                                   {"route": f"/v2/repository/models/{{name}}/{a}",
                                    "model": "beta", "code": "200"}) == 1
              for a in ("load", "unload")) and 'model="nosuch"' not in t,
          "load and unload counted with the model's label; an unknown name gets none")
    st, _, js = d.json("POST", "/v2/repository/index", b"[1]", J)
    check(st == 400, "index with a body other than {ready}: 400")


def test_rescan(d, jem, mdir, files, img):
    """SIGHUP: gamma added, beta removed, alpha changed (a request in flight
    finishes on the old alpha), then a broken file beside them."""
    png = open(img, "rb").read()
    old_alpha = jem_logits(jem, files["alpha"], img)
    body, ctype = many_images(png, 250)
    # Four 250-image requests (1,000 images, within the queue's 1,024) queue
    # on the one worker, so that some are still in flight when the reload
    # lands, however fast the machine is.
    res = [{} for _ in range(4)]

    def big(r):
        r["r"] = d.json("POST", "/v1/classify?model=alpha", body, {"Content-Type": ctype},
                        timeout=120)
        r["t"] = time.time()
    ths = [threading.Thread(target=big, args=(r,)) for r in res]
    for th in ths:
        th.start()
    wait_for(lambda: queued(d) >= 2, 10)  # admitted: bound to the old alpha
    new_alpha = os.path.join(mdir, "alpha.safetensors.new")
    jemtest.write_model(new_alpha, seed=21, name="whatever")
    os.replace(new_alpha, files["alpha"])
    os.remove(files["beta"])
    jemtest.write_model(os.path.join(mdir, "gamma.safetensors"), seed=22, name="g")
    n_loaded = len(re.findall(r'msg="model loaded" model="alpha"', d.log()))
    d.signal(signal.SIGHUP)
    check(wait_for(lambda: len(re.findall(r'msg="model loaded" model="alpha"', d.log())) > n_loaded),
          "SIGHUP loads the changed alpha")
    t_swap = time.time()
    for th in ths:
        th.join()
    check(all(r["r"][0] == 200 for r in res),
          f"the four requests answered 200 ({[(r['r'][0], r['r'][2]) for r in res if r['r'][0] != 200][:1]})")
    olds = [all(close(x["logits"], old_alpha) for x in r["r"][2]["results"]) for r in res]
    late_old = [r["t"] - t_swap for r, o in zip(res, olds) if o and r["t"] > t_swap]
    check(len(late_old) > 0, f"{len(late_old)} of 4 requests admitted before the swap answered "
          f"after it, all on the old alpha (the last {max(late_old or [0]):+.2f} s after)")
    new_logits = jem_logits(jem, files["alpha"], img)
    check(all(o or all(close(x["logits"], new_logits) for x in r["r"][2]["results"])
              for r, o in zip(res, olds)), "each request is all old alpha or all new alpha")
    wait_for(lambda: set(index(d)) == {"alpha", "gamma"} and
             index(d)["gamma"]["state"] == "READY")
    idx = index(d)
    check(set(idx) == {"alpha", "gamma"} and all(m["state"] == "READY" for m in idx.values()),
          f"after the rescan: alpha and gamma, beta gone ({idx})")
    st, _, r = d.json("POST", "/v1/classify?model=alpha&grad=false", png, PNG)
    check(st == 200 and close(r["logits"], jem_logits(jem, files["alpha"], img)),
          "alpha answers with its new file")
    st, _, r = d.json("POST", "/v1/models/gamma/classify?grad=false", png, PNG)
    check(st == 200 and close(r["logits"], jem_logits(jem, os.path.join(mdir, "gamma.safetensors"),
                                                      img)), "gamma, added, answers")
    st, _, js = d.json("POST", "/v1/models/beta/classify", png, PNG)
    check(st == 404 and js["error"]["code"] == "model_not_found", "beta, removed: 404")
    # a broken file and a broken change: the others keep serving
    with open(os.path.join(mdir, "delta.safetensors"), "wb") as f:
        f.write(b"not a model")
    gen_g = d.json("GET", "/v1/models/gamma")[2]["generation"]
    with open(os.path.join(mdir, "gamma.safetensors"), "ab") as f:
        f.write(b"trailing junk")
    d.signal(signal.SIGHUP)
    check(wait_for(lambda: "delta" in index(d) and index(d)["delta"]["reason"] not in
                   ("", "loading")), "the broken delta is in the index")
    wait_for(lambda: "model reload failed" in d.log())
    idx = index(d)
    check(idx["delta"]["state"] == "UNAVAILABLE" and idx["delta"]["reason"],
          f"delta UNAVAILABLE with its reason ({idx['delta']})")
    st, _, m = d.json("GET", "/v1/models/gamma")
    check(st == 200 and m["generation"] == gen_g, "gamma's broken change: the old gamma serves on")
    st, _, text = d.request("GET", "/metrics")
    check('jem_model_loaded{model="delta"} 0' in text.decode(), "metrics: delta loaded 0")


def many_images(png, n):
    parts = b"".join(b"--mb\r\nContent-Disposition: form-data; name=\"f%d\"\r\n"
                     b"Content-Type: image/png\r\n\r\n" % i + png + b"\r\n" for i in range(n))
    return parts + b"--mb--\r\n", "multipart/form-data; boundary=mb"


def queued(d):
    st, _, text = d.request("GET", "/metrics")
    m = re.search(r"^jem_queue_depth (\d+)", text.decode(), re.M)
    return int(m.group(1)) if m else 0


def test_repository_auth(jemd, files, tmp):
    """Load and unload change what the daemon serves: with --api-key-file they
    need the key as the job routes do (without --protect-scoring too), while
    the index, like scoring, stays open."""
    keyf = os.path.join(tmp, "keys")
    with open(keyf, "w") as f:
        f.write("key-one\n")
    d = jemtest.Daemon(jemd, files["alpha"], "--model", files["beta"], "--api-key-file", keyf)
    good = {"Authorization": "Bearer key-one"}
    try:
        st, _, _ = d.json("POST", "/v1/samples", json.dumps({"n": 1, "steps": 1}), J)
        check(st == 401, f"reference: POST /v1/samples without the key is 401 ({st})")
        st, _, js = d.json("POST", "/v2/repository/index")
        check(st == 200 and len(js) == 2, f"the index needs no key without --protect-scoring ({st})")
        for act in ("unload", "load"):
            path = f"/v2/repository/models/beta/{act}"
            for hdr, what in ((None, "no key"), ({"Authorization": "Bearer key-two"}, "a wrong key"),
                              ({"Authorization": "key-one"}, "no Bearer scheme")):
                st, h, js = d.json("POST", path, headers=hdr)
                check(st == 401 and isinstance(js.get("error"), str) and
                      h.get("www-authenticate", "").startswith("Bearer"),
                      f"{act} with {what}: 401, v2 error, WWW-Authenticate ({st}, {js})")
            want = "UNAVAILABLE" if act == "load" else "READY"
            check(index(d)["beta"]["state"] == want, f"a refused {act} changes nothing ({want})")
            st, _, js = d.json("POST", path, headers={"Authorization": "bEaReR key-one"})
            check(st == 200 and js == {}, f"{act} with the key: 200 ({st}, {js})")
            want = "READY" if act == "load" else "UNAVAILABLE"
            check(index(d)["beta"]["state"] == want, f"after {act}: beta {want}")
    finally:
        d.kill()


def test_workspaces(jemd, files, img):
    """One worker, batches alternating between two models: with room for both
    workspaces each is made once; with room for one, each switch makes one
    anew; the answers are the same bytes either way."""
    png = open(img, "rb").read()
    order = ["alpha", "beta"] * 4

    def run(*args):
        d = jemtest.Daemon(jemd, files["alpha"], "--model", files["beta"], "--workers", "1",
                           "--log-level", "debug", *args)
        try:
            got = [d.request("POST", f"/v1/models/{n}/classify", png, PNG)[2] for n in order]
            made = re.findall(r'msg="workspace created" worker=0 model="(\w+)" generation=\d+ '
                              r'images=(\d+) bytes=(\d+)', d.log())
        finally:
            d.kill()
        return got, made

    both, made = run()
    check([m[0] for m in made] == ["alpha", "beta"] and all(m[1] == "64" for m in made),
          f"room for both: one workspace per model, made once ({[m[0] for m in made]})")
    one = max(int(m[2]) for m in made) * 3 // 2
    single, made = run("--workspace-bytes", str(one))
    check([m[0] for m in made] == order,
          f"--workspace-bytes {one} (room for one): a workspace at every switch ({len(made)})")
    check(all(json.loads(a)["logits"] for a in both) and both == single and
          all(both[i] == both[i % 2] for i in range(len(order))),
          "the same bytes for each model's image, first or later, one workspace or two")


def test_flags(jemd, files, tmp):
    def start(*args):
        return subprocess.run([jemd, "--port", "0", *args], capture_output=True, text=True,
                              timeout=30)
    p = start("--model-dir", os.path.join(tmp, "nowhere"))
    check(p.returncode == 1 and "nowhere" in p.stderr, f"--model-dir missing: exit 1 ({p.stderr})")
    p = start("--model-dir", tmp, "--default-model", "zeta")
    check(p.returncode == 1 and "zeta" in p.stderr and "alpha" in p.stderr,
          f"--default-model unknown: exit 1 naming the models ({p.stderr.strip()})")
    twin = os.path.join(tmp, "other", "alpha.safetensors")
    os.makedirs(os.path.dirname(twin))
    shutil.copy(files["alpha"], twin)
    p = start("--model", files["alpha"], "--model", twin)
    check(p.returncode == 1 and "two models named 'alpha'" in p.stderr,
          f"two --model files of one name: exit 1 ({p.stderr.strip()})")
    d = jemtest.Daemon(jemd, files["alpha"], "--model", files["beta"], "--default-model", "beta")
    try:
        st, _, js = d.json("GET", "/v1/models")
        check([m["name"] for m in js["models"]] == ["alpha", "beta"] and js["default"] == "beta",
              f"repeated --model, named by file; --default-model beta ({js.get('default')})")
        st, _, js = d.json("GET", "/readyz")
        check(js.get("model") == "beta", "readyz names the default model")
    finally:
        d.kill()


def test_wide_transforms(jemd, jem, tmp, img):
    """A model with wide layers (WRN-10-3: 192 channels) answers as `jem score`
    does with the packed transforms (the default) and without them
    (--wide-transforms=false, im2col)."""
    path = os.path.join(tmp, "wide.safetensors")
    p = subprocess.run([jem, "init", path, "--depth", "10", "--widen", "3", "--in-channels", "3",
                        "--classes", "10"], capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"jem init WRN-10-3 ({p.stderr.strip()})")
    want = jem_logits(jem, path, img)
    png = open(img, "rb").read()
    for flag in ([], ["--wide-transforms=false"]):
        d = jemtest.Daemon(jemd, path, "--workers", "1", *flag)
        try:
            st, _, got = d.json("POST", "/v1/classify", png, PNG)
            check(st == 200 and want and close(got.get("logits", []), want) and
                  got.get("grad_norm", 0) > 0,
                  f"WRN-10-3 {' '.join(flag) or 'default'}: logits as jem score's ({st})")
        finally:
            d.kill()


def main():
    jemd = jemtest.jemd_binary(ROOT)
    jem = os.path.join(os.path.dirname(jemd), "jem")
    tmp = tempfile.mkdtemp(prefix="jemd-models-")
    try:
        mdir = os.path.join(tmp, "models")
        os.makedirs(mdir)
        files = {"alpha": os.path.join(mdir, "alpha.safetensors"),
                 "beta": os.path.join(mdir, "beta.safetensors")}
        jemtest.write_model(files["alpha"], seed=11, name="meta-alpha")
        jemtest.write_model(files["beta"], seed=12, name="meta-beta", k=5)
        with open(os.path.join(mdir, "notes.txt"), "w") as f:
            f.write("not a model file: skipped\n")
        img = os.path.join(tmp, "x.png")
        with open(img, "wb") as f:
            f.write(jemtest.test_images(1, seed=13)[0])
        test_flags(jemd, {k: v for k, v in files.items()}, mdir)
        test_repository_auth(jemd, files, tmp)
        test_workspaces(jemd, files, img)
        test_wide_transforms(jemd, jem, tmp, img)
        d = jemtest.Daemon(jemd, None, "--model-dir", mdir, "--workers", "1")
        try:
            test_routes(d, jem, files, img)
            test_page(d, img)
            test_repository(d)
            test_rescan(d, jem, mdir, files, img)
        finally:
            d.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
