#!/usr/bin/python3
"""test_web.py - what a browser and a spec-reading tool see of jemd: the spec
served at /openapi.yaml and its reference at /docs, CORS (--cors-origin), the
query spellings clients send, and the page at / (then /docs) driven in headless
Chromium (tests/node/page.mjs).

usage: /usr/bin/python3 tests/integration/test_web.py --build build
"""
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import jemtest  # noqa: E402

check = jemtest.Checks("test_web")



def test_spec(d):
    st, h, body = d.request("GET", "/openapi.yaml")
    check(st == 200 and h.get("content-type", "").startswith("application/yaml"),
          f"GET /openapi.yaml: 200 application/yaml ({st}, {h.get('content-type')})")
    check(body == open(os.path.join(ROOT, "openapi.yaml"), "rb").read(),
          "GET /openapi.yaml serves the repository's openapi.yaml, byte for byte")
    st, h, body = d.request("GET", "/")
    check(st == 200 and h.get("content-type", "").startswith("text/html") and
          body == open(os.path.join(ROOT, "web", "index.html"), "rb").read(),
          "GET / serves web/index.html")
    check("script-src 'self'" in h.get("content-security-policy", ""),
          "the page comes with a Content-Security-Policy")
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        st, h, body = d.request("GET", "/ui/" + name)
        check(st == 200 and h.get("content-type", "").startswith(ctype) and
              body == open(os.path.join(ROOT, "web", name), "rb").read(),
              f"GET /ui/{name} serves web/{name} as {ctype}")
    st, _, js = d.json("GET", "/ui/nope.js")
    check(st == 404 and js["error"]["code"] == "not_found", "GET /ui/nope.js: 404 not_found")
    st, h, js = d.json("POST", "/openapi.yaml", b"")
    check(st == 405 and h.get("allow") == "GET, HEAD", f"POST /openapi.yaml: 405 Allow ({st})")


def test_docs(d):
    """/docs: the reference generated from openapi.yaml at build time lists
    every operation, parameter, response and schema of the spec it is built
    from, and loads nothing from another origin."""
    spec = yaml.safe_load(open(os.path.join(ROOT, "openapi.yaml")))
    st, h, body = d.request("GET", "/docs")
    check(st == 200 and h.get("content-type", "").startswith("text/html") and
          "script-src 'self'" in h.get("content-security-policy", ""),
          f"GET /docs: 200 text/html with a Content-Security-Policy ({st})")
    text = body.decode()
    page = html.unescape(text)
    missing = []
    for path, item in spec["paths"].items():
        if f"<code>{path}</code>" not in page:
            missing.append(path)
        for method, op in item.items():
            if method not in ("get", "post", "delete", "options"):
                continue
            if f'id="op-{op["operationId"]}"' not in text:
                missing.append(f"{method} {path}")
            for code in op["responses"]:
                if f'<span class="code">{code}</span>' not in text.split(
                        f'id="op-{op["operationId"]}"', 1)[-1].split("</section>", 1)[0]:
                    missing.append(f"{method} {path} {code}")
            for p in op.get("parameters", []) + item.get("parameters", []):
                if "$ref" in p:
                    p = spec["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
                if f'<code class="prop">{p["name"]}</code>' not in page:
                    missing.append(f"{method} {path} parameter {p['name']}")
    for name in spec["components"]["schemas"]:
        if f'id="schema-{name}"' not in text:
            missing.append(f"schema {name}")
    check(not missing and text.count('<section class="op"') == sum(
        m in ("get", "post", "delete", "options") for i in spec["paths"].values() for m in i),
        f"/docs has every path, operation, response, parameter and schema of openapi.yaml "
        f"(missing: {missing[:8]})")
    check(spec["info"]["version"] in page and 'lang="en"' in text and "<main" in text and
          "<nav" in text, "/docs: titled with the version, landmarks for screen readers")
    external = re.findall(r'(?:src|href)="(?!#|/|data:)([^"]*)"', text)
    check("<script" not in text and all(u.startswith("https://opensource.org/") or
                                        u.startswith("http://127.0.0.1") for u in external),
          f"/docs: no script and nothing loaded from another origin ({external})")
    st, h, body = d.request("GET", "/ui/docs.css")
    check(st == 200 and h.get("content-type", "").startswith("text/css") and
          body == open(os.path.join(ROOT, "web", "docs.css"), "rb").read(),
          "GET /ui/docs.css serves web/docs.css")
    st, _, body = d.request("GET", "/")
    check(b'href="/docs"' in body, "the page at / links to /docs")


def test_grad_spellings(d, png):
    H = {"Content-Type": "image/png"}
    for v, grad in (("true", True), ("True", True), ("TRUE", True), ("1", True),
                    ("false", False), ("False", False), ("FALSE", False), ("0", False)):
        st, _, js = d.json("POST", "/v1/classify?grad=" + v, png, H)
        check(st == 200 and (js["grad_norm"] is not None) == grad,
              f"grad={v}: 200, gradient {'computed' if grad else 'skipped'} ({st})")
    for v in ("yes", "2", "truee", ""):
        st, _, js = d.json("POST", "/v1/classify?grad=" + v, png, H)
        check(st == 400 and js["error"]["code"] == "invalid_parameter",
              f"grad={v!r}: 400 invalid_parameter ({st})")


def test_cors(jemd, model):
    p = subprocess.run([jemd, "--model", model, "--port", "0", "--cors-origin", "ftp://x"],
                       capture_output=True, text=True, timeout=30)
    check(p.returncode == 2 and "--cors-origin" in p.stderr and "ftp://x" in p.stderr,
          f"--cors-origin ftp://x: exit 2 naming the flag ({p.returncode}, {p.stderr.strip()})")
    pre = {"Origin": "http://b.example:8000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type"}
    # without --cors-origin: no CORS headers, OPTIONS is 405 as for any method
    d = jemtest.Daemon(jemd, model)
    try:
        st, h, _ = d.request("GET", "/healthz", headers={"Origin": "http://a.example"})
        check(st == 200 and "access-control-allow-origin" not in h,
              "without --cors-origin: no Access-Control-Allow-Origin")
        st, h, js = d.json("OPTIONS", "/v1/classify", headers=pre)
        check(st == 405 and h.get("allow") == "POST" and
              js["error"]["code"] == "method_not_allowed",
              f"without --cors-origin: a preflight is 405 with Allow ({st} {h.get('allow')})")
    finally:
        d.kill()
    # a flag replaces the variable's list; repeated flags add up
    d = jemtest.Daemon(jemd, model, "--cors-origin", "http://a.example",
                       "--cors-origin", "http://b.example:8000",
                       env={"JEMD_CORS_ORIGIN": "http://c.example"})
    try:
        st, h, body = d.request("OPTIONS", "/v1/classify", headers=pre)
        check(st == 204 and body == b"", f"preflight from a listed origin: 204 ({st})")
        check(h.get("access-control-allow-origin") == "http://b.example:8000" and
              h.get("access-control-allow-methods") == "POST" and
              "content-type" in h.get("access-control-allow-headers", "").lower() and
              "authorization" in h.get("access-control-allow-headers", "").lower() and
              h.get("access-control-max-age") == "600" and "x-request-id" in h,
              f"preflight headers: {h}")
        st, h, _ = d.request("OPTIONS", "/v1/jobs/0123/grid.png",
                             headers=dict(pre, **{"Access-Control-Request-Method": "GET"}))
        check(st == 204 and h.get("access-control-allow-methods") == "GET, HEAD",
              f"preflight on a templated route: 204, GET, HEAD ({st})")
        st, h, js = d.json("OPTIONS", "/v1/classify", headers=dict(pre, Origin="http://c.example"))
        check(st == 403 and js["error"]["code"] == "origin_not_allowed" and
              "access-control-allow-origin" not in h,
              f"the variable's origin is replaced by the flags: 403 ({st})")
        st, h, js = d.json("OPTIONS", "/v2/models/x/infer",
                           headers=dict(pre, Origin="http://evil.example"))
        check(st == 403 and isinstance(js.get("error"), str),
              f"preflight on /v2 from another origin: 403 in the v2 error shape ({st}, {js})")
        st, h, js = d.json("OPTIONS", "/nowhere", headers=pre)
        check(st == 404, f"preflight on no route: 404 ({st})")
        st, h, js = d.json("OPTIONS", "/v1/classify", headers={"Origin": "http://a.example"})
        check(st == 405 and h.get("allow") == "POST",
              f"OPTIONS without Access-Control-Request-Method: 405 ({st})")
        st, h, _ = d.request("GET", "/healthz", headers={"Origin": "http://a.example"})
        check(h.get("access-control-allow-origin") == "http://a.example" and
              "x-request-id" in h.get("access-control-expose-headers", "").lower() and
              h.get("vary") == "Origin",
              f"answers to a listed origin carry Allow-Origin and Expose-Headers: {h}")
        st, h, _ = d.request("GET", "/v1/jobs/ffff", headers={"Origin": "http://a.example"})
        check(st == 404 and h.get("access-control-allow-origin") == "http://a.example",
              "error answers carry Access-Control-Allow-Origin too")
        st, h, _ = d.request("GET", "/healthz", headers={"Origin": "http://evil.example"})
        check("access-control-allow-origin" not in h and h.get("vary") == "Origin",
              "an origin not listed gets no Access-Control-Allow-Origin (Vary: Origin)")
    finally:
        d.kill()
    d = jemtest.Daemon(jemd, model, env={"JEMD_CORS_ORIGIN": "*"})
    try:
        st, h, _ = d.request("OPTIONS", "/v1/samples",
                             headers=dict(pre, Origin="http://any.example"))
        check(st == 204 and h.get("access-control-allow-origin") == "*",
              f"JEMD_CORS_ORIGIN='*': any origin, Allow-Origin * ({st})")
    finally:
        d.kill()


NODE_DIR = os.path.join(ROOT, "tests", "node")


def node_ready():
    """The npm tools `make node-deps` installs; a failed check names the fix."""
    ok = os.path.isdir(os.path.join(NODE_DIR, "node_modules", "puppeteer-core"))
    return check(ok, "tests/node/node_modules is missing: run `make node-deps` (make test does)")


def pct(p):
    return "—" if p is None else f"{100 * p:.1f}%"


def test_page(jemd):
    """The page in headless Chromium at phone size: pick a real PNG, read the
    label and the scores, run a small job to the end."""
    if not node_ready():
        return
    image = os.path.join(ROOT, "tests", "data", "images", "fmnist0.png")
    d = jemtest.Daemon(jemd, os.path.join(ROOT, "models", "fmnist-jem.safetensors"))
    try:
        st, _, want = d.json("POST", "/v1/classify", open(image, "rb").read(),
                             {"Content-Type": "image/png"})
        _, _, models = d.json("GET", "/v1/models")
        classes = models["models"][0]["classes"]
        p = subprocess.run(["node", os.path.join(NODE_DIR, "page.mjs"),
                            f"http://127.0.0.1:{d.port}/", image, "3", "5", "42"],
                           capture_output=True, text=True, timeout=120, cwd=NODE_DIR)
        try:
            got = json.loads(p.stdout)
        except ValueError:
            check(False, f"page.mjs printed no JSON (rc {p.returncode}): {p.stderr[-800:]}")
            return
        check(got["errors"] == [], f"no script, console or network error on the page: "
              f"{got['errors']}")
        check(got.get("models") == [models["models"][0]["name"]], "the model chooser lists the model")
        c = got.get("classify", {})
        check(c.get("label") == want["label"] and c.get("class") == want["class"],
              f"the page shows the label /v1/classify gives ({c.get('class')} vs {want['class']})")
        bars = c.get("bars", [])
        order = sorted(range(len(want["probs"])), key=lambda i: -want["probs"][i])[:10]
        check([b["label"] for b in bars] == order and all(
            b["text"] == classes[i] + pct(want["probs"][i]) for b, i in zip(bars, order)),
            "the bar chart lists the calibrated probabilities, most probable first")
        check(bars and bars[0]["width"] > 10 * max(b["width"] for b in bars[1:]),
              "the top bar is drawn longest")
        check(c.get("is_ood") == json.dumps(want["ood"]["is_ood"]),
              f"the verdict is the API's ({c.get('is_ood')})")
        rows = {r["score"]: r["cells"] for r in c.get("scores", [])}
        check(set(rows) == set(want["ood"]["scores"]) and all(
            rows[k][2] == pct(v["percentile"]) for k, v in want["ood"]["scores"].items()),
            "each OOD score with its percentile")
        j = got.get("job", {})
        check(j.get("status") == "succeeded" and j.get("progress") == [5, 5],
              f"the page ran the job to the end: {j.get('text')}")
        st, _, job = d.json("GET", f"/v1/jobs/{j.get('id')}")
        check(st == 200 and job["params"]["n"] == 4 and job["params"]["steps"] == 5 and
              job["params"]["class"] == 3 and job["params"]["seed"] == 42,
              f"the job has the form's class, steps and seed ({job and job.get('params')})")
        check(j.get("grid", [0])[0] > 32 and len(j.get("samples", [])) == 4 and
              all(w == 32 and alt.startswith(f"Sample {i + 1}: classified as ")
                  for i, (w, alt) in enumerate(j["samples"])),
              "the grid and each of the 4 samples are shown, with alt text")
        a = got.get("a11y", {})
        check(a.get("unlabeled") == [] and a.get("noAlt") == [] and a.get("lang") == "en" and
              a.get("live", 0) >= 2, f"every control labelled, every image described: {a}")
        check(a.get("overflow", 1) <= 0, "no horizontal scrolling at 390 CSS pixels")
        spec = yaml.safe_load(open(os.path.join(ROOT, "openapi.yaml")))
        n_ops = sum(m in ("get", "post", "delete", "options")
                    for i in spec["paths"].values() for m in i)
        dc = got.get("docs", {})
        check(dc.get("url") == "/docs" and dc.get("operations") == n_ops and
              dc.get("title", "").startswith("jemd " + spec["info"]["version"]) and
              dc.get("lang") == "en" and dc.get("landmarks") == ["nav", "main"] and
              dc.get("styled"),
              f"the page's link opens /docs, styled, with all {n_ops} operations: {dc}")
        check(dc.get("overflow", 1) <= 0, "/docs: no horizontal scrolling at 390 CSS pixels")
    finally:
        d.kill()


def main():
    jemd = jemtest.jemd_binary(ROOT)
    tmp = tempfile.mkdtemp(prefix="jemd-web-")
    try:
        model = os.path.join(tmp, "webnet.safetensors")
        jemtest.write_model(model, seed=3, name="webnet")
        png = jemtest.test_images(1, seed=5)[0]
        d = jemtest.Daemon(jemd, model)
        try:
            test_spec(d)
            test_docs(d)
            test_grad_spellings(d, png)
        finally:
            d.kill()
        test_cors(jemd, model)
        test_page(jemd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
