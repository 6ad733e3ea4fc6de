#!/usr/bin/python3
"""test_server.py - integration tests for jemd: starts the real daemon on a
free port and checks every route, bad input, batching, limits, auth,
metrics (promtool), the OpenAPI document, SIGHUP reload and SIGTERM drain.

usage: /usr/bin/python3 tests/integration/test_server.py --build build
"""
import argparse
import base64
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import jemtest  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402  (python3-yaml)

FAILS = []
PASSES = [0]
SPEC = None


def check(cond, what):
    if cond:
        PASSES[0] += 1
    else:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


# ---------------------------------------------------------------------------
# A validator for the JSON Schema subset openapi.yaml uses.

def resolve(schema):
    while isinstance(schema, dict) and "$ref" in schema:
        node = SPEC
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def validate(schema, v, path="$"):
    schema = resolve(schema)
    errs = []
    if schema is None or schema == {}:
        return errs
    if v is None:
        if schema.get("nullable"):
            return errs
        if "type" in schema:
            return [f"{path}: null where {schema['type']} expected"]
    if "oneOf" in schema:
        ok = [s for s in schema["oneOf"] if not validate(s, v, path)]
        if len(ok) != 1:
            errs.append(f"{path}: matches {len(ok)} of oneOf")
        return errs
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t in types and not isinstance(v, types[t]):
        return [f"{path}: {type(v).__name__} where {t} expected"]
    if t == "integer" and (isinstance(v, bool) or not isinstance(v, int)):
        return [f"{path}: {v!r} is not an integer"]
    if t == "number" and (isinstance(v, bool) or not isinstance(v, (int, float))):
        return [f"{path}: {v!r} is not a number"]
    if "enum" in schema and v not in schema["enum"]:
        errs.append(f"{path}: {v!r} not in {schema['enum']}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in schema and (v < schema["minimum"] or
                                    (schema.get("exclusiveMinimum") and v == schema["minimum"])):
            errs.append(f"{path}: {v} below minimum")
        if "maximum" in schema and (v > schema["maximum"] or
                                    (schema.get("exclusiveMaximum") and v == schema["maximum"])):
            errs.append(f"{path}: {v} above maximum")
    if isinstance(v, str) and "pattern" in schema and not re.search(schema["pattern"], v):
        errs.append(f"{path}: {v!r} does not match {schema['pattern']}")
    if isinstance(v, list):
        if "minItems" in schema and len(v) < schema["minItems"]:
            errs.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(v) > schema["maxItems"]:
            errs.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, e in enumerate(v):
                errs += validate(schema["items"], e, f"{path}[{i}]")
    if isinstance(v, dict):
        for r in schema.get("required", []):
            if r not in v:
                errs.append(f"{path}: missing {r}")
        props = schema.get("properties", {})
        addl = schema.get("additionalProperties", True)
        for k, e in v.items():
            if k in props:
                errs += validate(props[k], e, f"{path}.{k}")
            elif addl is False:
                errs.append(f"{path}: unexpected property {k}")
            elif isinstance(addl, dict):
                errs += validate(addl, e, f"{path}.{k}")
    return errs


def template_of(path):
    """The openapi path template matching a concrete path, or None."""
    path = path.split("?")[0]
    for tmpl in SPEC["paths"]:
        rx = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(tmpl)) + "$"
        if re.match(rx, path):
            return tmpl
    return None


CHECKED = set()


def check_response(method, path, status, headers, body):
    """Checks a response against openapi.yaml (status listed, schema)."""
    tmpl = template_of(path)
    where = f"{method} {path} -> {status}"
    if tmpl is None or method.lower() not in SPEC["paths"][tmpl]:
        # unknown route or method: the generic error shapes
        if status in (404, 405):
            schema = ({"$ref": "#/components/schemas/V2Error"} if path.startswith("/v2")
                      else {"$ref": "#/components/schemas/Error"})
            errs = validate(schema, body)
            check(not errs, f"{where}: error shape: {errs}")
            return
        check(False, f"{where}: route not in openapi.yaml")
        return
    op = SPEC["paths"][tmpl][method.lower()]
    resp = op["responses"].get(str(status)) or op["responses"].get("default")
    if not check(resp is not None, f"{where}: status {status} not documented in openapi.yaml"):
        return
    resp = resolve(resp)
    CHECKED.add((method, tmpl, status))
    content = resp.get("content", {})
    ctype = headers.get("content-type", "").split(";")[0].strip()
    if not content:
        return
    if not check(ctype in content, f"{where}: content type {ctype} not documented"):
        return
    schema = content[ctype].get("schema")
    if ctype == "application/json":
        errs = validate(schema, body)
        check(not errs, f"{where}: schema: {errs[:5]}")


# ---------------------------------------------------------------------------

class Client:
    def __init__(self, d):
        self.d = d

    def call(self, method, path, body=None, headers=None, expect=None, what=None, timeout=30):
        st, h, data = self.d.request(method, path, body, headers, timeout)
        js = None
        if method == "HEAD":
            check(data == b"", "HEAD answers without a body")
        elif h.get("content-type", "") == "application/octet-stream":
            pass
        elif h.get("content-type", "").startswith("application/json"):
            try:
                js = json.loads(data)
            except ValueError:
                check(False, f"{method} {path}: invalid JSON in the response")
        if method != "HEAD":
            check_response(method, path, st, h, js)
        if expect is not None:
            exp = expect if isinstance(expect, (tuple, list)) else (expect,)
            check(st in exp, f"{what or method + ' ' + path}: status {st}, expected {exp}: "
                  f"{data[:200]!r}")
        return st, h, js if js is not None else data

    def ready(self, what):
        try:
            st, _, _ = self.d.request("GET", "/readyz", timeout=10)
        except Exception as e:  # noqa: BLE001
            st = repr(e)
        check(st == 200, f"daemon unhealthy after: {what} (readyz {st})")


def rel_close(a, b, tol=1e-5):
    if a is None or b is None:
        return a is b
    if isinstance(a, list):
        return len(a) == len(b) and all(rel_close(x, y, tol) for x, y in zip(a, b))
    return abs(a - b) <= tol * max(1.0, abs(b)) if not (math.isnan(a) or math.isnan(b)) else False


def multipart(parts, boundary="jemdtestboundary"):
    out = b""
    for i, (ctype, data) in enumerate(parts):
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; "
                f"filename=\"f{i}.png\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


metric_value = jemtest.metric_value


# ---------------------------------------------------------------------------
# Tests on the main daemon

def test_routes(c, imgs, model_name):
    st, h, js = c.call("GET", "/healthz", expect=200)
    check(js == {"status": "ok"}, "healthz body")
    # the files built into jemd (test_web.py checks them in depth)
    for path in ("/", "/ui/app.js", "/openapi.yaml", "/docs"):
        c.call("GET", path, expect=200)
    c.call("GET", "/readyz", expect=200)
    st, h, text = c.call("GET", "/metrics", expect=200)
    check(h.get("content-type", "").startswith("text/plain; version=0.0.4"), "metrics content type")
    st, h, js = c.call("GET", "/v1/models", expect=200)
    m = js["models"][0]
    check(m["name"] == model_name and m["input_shape"] == [1, 32, 32], "models: name and shape")
    check(m["ood"]["present"] is True and len(m["classes"]) == 10, "models: ood and classes")
    check(m["ood"]["rule"].startswith("test rule") and
          m["ood"]["rule_nograd"].startswith("test no-grad rule"), "models: both rules")
    # one image, all fields
    st, h, r = c.call("POST", "/v1/classify?top_k=3", imgs[0], {"Content-Type": "image/png"}, 200)
    check("x-request-id" in h, "X-Request-Id header")
    check(len(r["probs"]) == 10 and abs(sum(r["probs"]) - 1) < 1e-4, "probs sum to 1")
    check(r["confidence"] == max(r["probs"]), "confidence is max prob")
    check(r["class"] == f"class{r['label']}", "class name")
    check([t["label"] for t in r["top_k"]][0] == r["label"] and len(r["top_k"]) == 3, "top_k")
    lse = math.log(sum(math.exp(z) for z in r["logits"]))
    check(abs(r["energy"] + lse) < 1e-4, "energy = -logsumexp(logits)")
    check(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0, "grad_norm present")
    check(r["ood"]["is_ood"] in (True, False) and r["ood"]["tpr"] == 0.95, "ood verdict at 0.95")
    check(r["ood"]["rule"].startswith("test rule"), "the main rule applies with the gradient")
    for s in ("energy", "grad_norm", "max_softmax", "energy_complexity"):
        p = r["ood"]["scores"][s]["percentile"]
        check(p is not None and 0 <= p <= 1, f"percentile of {s} in [0,1]")
    # energy_complexity = energy - w * bits, bits a whole number of bytes of deflate output
    nbits = (r["energy"] - r["energy_complexity"]) / jemtest.COMPLEXITY_WEIGHT
    check(0 < nbits < 8 * 1024 * 1.1 and abs(nbits / 8 - round(nbits / 8)) < 0.05,
          f"energy_complexity = energy - w * deflate bits ({nbits:.3f} bits)")
    check(r["ood"]["scores"]["energy_complexity"]["value"] == r["energy_complexity"],
          "energy_complexity in ood.scores")
    check(m["ood"]["complexity_weight"] == jemtest.COMPLEXITY_WEIGHT, "models: complexity_weight")
    # temperature 1.5: probs are softmax(logits / T), max_softmax untempered
    z = r["logits"]
    ez = [math.exp(v / 1.5) for v in z]
    check(abs(ez[r["label"]] / sum(ez) - r["confidence"]) < 1e-5, "tempered probs")
    ez1 = [math.exp(v) for v in z]
    check(abs(max(ez1) / sum(ez1) - r["max_softmax"]) < 1e-5, "untempered max_softmax")
    # grad=false and tpr
    st, h, r2 = c.call("POST", "/v1/classify?grad=false&tpr=0.5", imgs[0],
                       {"Content-Type": "image/png"}, 200)
    check(r2["grad_norm"] is None and r2["ood"]["scores"]["grad_norm"]["value"] is None,
          "grad=false gives null grad_norm")
    check(r2["ood"]["tpr"] == 0.5 and "top_k" not in r2, "tpr override, no top_k unless asked")
    # without the gradient the no-gradient rule decides: OOD when the energy
    # percentile is above 1-(1-0.5)/2 or max_softmax's outside [0.125, 0.875]
    o2 = r2["ood"]
    check(o2["rule"].startswith("test no-grad rule") and o2["is_ood"] in (True, False),
          "grad=false: the no-gradient rule gives a verdict")
    pe, pm = o2["scores"]["energy"]["percentile"], o2["scores"]["max_softmax"]["percentile"]
    check(o2["is_ood"] == (pe > 0.75 or pm < 0.125 or pm > 0.875),
          "grad=false: verdict follows the no-gradient rule")
    check(rel_close(r2["logits"], r["logits"]), "grad=false: same logits")
    # multipart and JSON give the same results in order
    body, ct = multipart([("image/png", imgs[1]), ("application/octet-stream", imgs[2])])
    st, h, mp = c.call("POST", "/v1/classify", body, {"Content-Type": ct}, 200)
    check(len(mp["results"]) == 2, "multipart: two results")
    st, h, jj = c.call("POST", "/v1/classify", json.dumps(
        {"images": [base64.b64encode(imgs[1]).decode(),
                    "data:image/png;base64," + base64.b64encode(imgs[2]).decode()]}),
        {"Content-Type": "application/json"}, 200)
    check(len(jj["results"]) == 2 and rel_close(jj["results"][1]["logits"],
                                                mp["results"][1]["logits"]),
          "JSON and multipart agree")
    # other image flavours still decode: 16-bit grey, RGB, large image (resized)
    import numpy as np
    g16 = (np.arange(40 * 30).reshape(30, 40) * 50 % 65535).astype(np.uint16)
    c.call("POST", "/v1/classify", jemtest.png_bytes(g16, bit_depth=16),
           {"Content-Type": "image/png"}, 200, "16-bit PNG")
    rgb = (np.random.default_rng(3).integers(0, 255, (50, 60, 3))).astype(np.uint8)
    c.call("POST", "/v1/classify", jemtest.png_bytes(rgb), {"Content-Type": "image/png"}, 200,
           "RGB PNG")
    big = (np.random.default_rng(4).integers(0, 255, (1000, 900))).astype(np.uint8)
    c.call("POST", "/v1/classify", jemtest.png_bytes(big), {"Content-Type": "image/png"}, 200,
           "1000x900 PNG")
    try:
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", progressive=True)
        c.call("POST", "/v1/classify", buf.getvalue(), {"Content-Type": "image/jpeg"}, 200,
               "progressive JPEG")
    except ImportError:
        pass
    # v2
    c.call("GET", "/v2/health/live", expect=200)
    c.call("GET", "/v2/health/ready", expect=200)
    st, h, js = c.call("GET", "/v2", expect=200)
    st, h, js = c.call("GET", f"/v2/models/{model_name}", expect=200)
    check(js["inputs"][0]["shape"] == [-1, 1, 32, 32], "v2 model metadata shape")
    c.call("GET", f"/v2/models/{model_name}/ready", expect=200)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    req = {"id": "abc", "inputs": [{"name": "input", "shape": [2, 1, 32, 32],
                                    "datatype": "FP32", "data": x.ravel().tolist()}]}
    st, h, out = c.call("POST", f"/v2/models/{model_name}/infer", json.dumps(req),
                        {"Content-Type": "application/json"}, 200)
    names = {o["name"]: o for o in out["outputs"]}
    check(out.get("id") == "abc" and set(names) == {"logits", "probs", "energy", "grad_norm"},
          "v2 infer outputs and id")
    check(names["logits"]["shape"] == [2, 10] and names["energy"]["shape"] == [2], "v2 shapes")
    req["inputs"][0]["data"] = x.tolist()  # nested
    req["outputs"] = [{"name": "energy"}]
    st, h, out2 = c.call("POST", f"/v2/models/{model_name}/infer", json.dumps(req),
                         {"Content-Type": "application/json"}, 200)
    check(len(out2["outputs"]) == 1 and rel_close(out2["outputs"][0]["data"],
                                                  names["energy"]["data"]),
          "v2 nested data and output selection")
    # binary tensor extension (what Triton's clients send by default)
    hdr = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 32, 32], "datatype": "FP32",
                                  "parameters": {"binary_data_size": x.nbytes}}],
                      "outputs": [{"name": "energy", "parameters": {"binary_data": True}},
                                  {"name": "logits"}]}).encode()
    st, h, data = c.call("POST", f"/v2/models/{model_name}/infer", hdr + x.astype("<f4").tobytes(),
                         {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(hdr))}, 200, "binary infer")
    jl = int(h.get("inference-header-content-length", "0"))
    head = json.loads(data[:jl])
    energy = np.frombuffer(data[jl:], dtype="<f4")
    hb = {o["name"]: o for o in head["outputs"]}
    check(hb["energy"]["parameters"]["binary_data_size"] == 8 and len(energy) == 2 and
          "data" not in hb["energy"], "binary output header and size")
    check(rel_close([float(v) for v in energy], names["energy"]["data"]) and
          rel_close(hb["logits"]["data"], names["logits"]["data"]), "binary == JSON results")
    c.call("POST", f"/v2/models/{model_name}/infer", hdr + b"\0" * 12,
           {"Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(hdr))}, 422, "binary size mismatch")
    c.call("HEAD", "/healthz", expect=200, what="HEAD on a GET route")
    # the routes that name the model (test_models.py covers several models)
    st, _, one = c.call("GET", f"/v1/models/{model_name}", expect=200)
    check(one["name"] == model_name and one["default"] is True, "GET /v1/models/{name}")
    st, _, r1 = c.call("POST", f"/v1/models/{model_name}/classify", imgs[0],
                       {"Content-Type": "image/png"}, 200)
    st, _, r2 = c.call("POST", f"/v1/classify?model={model_name}", imgs[0],
                       {"Content-Type": "image/png"}, 200)
    check(r1["logits"] == r2["logits"], "/v1/models/{name}/classify = /v1/classify?model=")
    c.call("GET", f"/v2/models/{model_name}/versions/1", expect=200)
    c.call("GET", f"/v2/models/{model_name}/versions/1/ready", expect=200)
    c.call("GET", f"/v2/models/{model_name}/versions/2", expect=404)
    c.call("POST", f"/v2/models/{model_name}/versions/1/infer", hdr + x.astype("<f4").tobytes(),
           {"Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(hdr))}, 200, "versioned infer")
    st, _, idx = c.call("POST", "/v2/repository/index", expect=200)
    check(idx == [{"name": model_name, "version": "1", "state": "READY", "reason": ""}],
          f"repository index: {idx}")
    c.call("POST", f"/v2/repository/models/{model_name}/unload", expect=200)
    c.call("POST", "/v1/classify", imgs[0], {"Content-Type": "image/png"}, 503,
           "the default model unloaded: 503")
    c.call("POST", f"/v2/repository/models/{model_name}/load", expect=200)
    c.call("POST", "/v2/repository/models/nosuch/load", expect=404)


def bad_inputs(c, d, imgs, model_name):
    """Each case, then /readyz must still answer 200.  Returns the count."""
    n = [0]
    png = imgs[0]
    H = {"Content-Type": "image/png"}
    J = {"Content-Type": "application/json"}

    def case(what, fn):
        n[0] += 1
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            check(False, f"{what}: exception {e!r}")
        c.ready(what)

    def post(path, body, headers, expect, what, code=None):
        st, h, js = c.call("POST", path, body, headers, expect, what)
        if code and isinstance(js, dict):
            got = js.get("error", {}).get("code") if isinstance(js.get("error"), dict) else None
            check(got == code, f"{what}: error code {got}, expected {code}")
        return st, h, js

    def raw_status(data, timeout=5.0, shut=True):
        out = d.raw(data, timeout=timeout, shut=shut)
        m = re.match(rb"HTTP/1\.[01] (\d+)", out)
        return int(m.group(1)) if m else None

    cap = 1 << 20  # --max-body-bytes of the main daemon
    case("honest Content-Length over the cap", lambda: check(raw_status(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n" % (cap + 1), shut=False) == 413, "413 before the body"))
    case("Content-Length absurd", lambda: check(raw_status(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 99999999999999999999999\r\n\r\n", shut=False) in (400, 413),
        "absurd Content-Length refused"))
    case("Content-Length shorter than the body", lambda: check(raw_status(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 10\r\nConnection: close\r\n\r\n" + png) in (400, 415), "short CL"))
    case("Content-Length longer than the body", lambda: d.raw(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 5000\r\n\r\n" + png[:100], timeout=0.5, shut=False))

    def chunked_over():
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 65536
        got = b""
        try:
            for _ in range(40):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            s.sendall(b"0\r\n\r\n")
            s.settimeout(5)
            got = s.recv(4096)
        except OSError:
            pass
        s.close()
        check(got == b"" or got.startswith(b"HTTP/1.1 413"), f"chunked over cap: {got[:40]!r}")
    case("chunked body over the cap", chunked_over)
    case("chunked body that never ends", lambda: d.raw(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n", timeout=0.5, shut=False))
    case("empty body", lambda: post("/v1/classify", b"", H, 400, "empty body", "empty_body"))
    case("one byte", lambda: post("/v1/classify", b"\x89", H, (400, 415), "one byte"))
    case("truncated PNG", lambda: post("/v1/classify", png[:60], H, 400, "truncated PNG",
                                       "invalid_image"))
    case("PNG signature only", lambda: post("/v1/classify", png[:8], H, (400, 415), "signature"))
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff,\x00\x00\x00\x00\x01\x00" \
          b"\x01\x00\x00\x02\x02D\x01\x00;"
    case("GIF body as image/png", lambda: post("/v1/classify", gif, H, 415, "GIF as PNG",
                                               "unsupported_image"))
    tga = bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0x5a, 0x81, 0x5a, 32, 0])
    case("18-byte TGA bomb", lambda: post("/v1/classify", tga, H, 415, "TGA"))
    case("PNG claiming 10000x10000", lambda: post(
        "/v1/classify", jemtest.png_header_only(10000, 10000), H, 413, "huge PNG",
        "image_too_large"))
    case("PNG claiming 1x16000000", lambda: post(
        "/v1/classify", jemtest.png_header_only(1, 16000000), H, 413, "1x16M PNG"))
    case("PNG claiming 3000x3000 (area over the cap)", lambda: post(
        "/v1/classify", jemtest.png_header_only(3000, 3000), H, 413, "area cap"))
    case("corrupt zlib in IDAT", lambda: post(
        "/v1/classify", png[:41] + b"\xff" * 20 + png[61:], H, 400, "corrupt IDAT"))
    case("wrong content type", lambda: post("/v1/classify", png, {"Content-Type": "text/plain"},
                                            415, "text/plain", "unsupported_media_type"))
    case("missing content type", lambda: post("/v1/classify", png, {}, 415, "no content type"))

    def curl_d(ct, want):  # what `curl -d @image.png` sends: form data, CR and LF removed
        body = png.replace(b"\r", b"").replace(b"\n", b"")
        st, _, js = post("/v1/classify", body, {"Content-Type": ct}, 415, "curl -d " + ct)
        msg = js.get("error", {}).get("message", "") if isinstance(js, dict) else ""
        check("--data-binary" in msg and want in msg,
              f"curl -d ({ct}): the 415 names the cause and the fix: {msg}")
    case("curl -d @image.png", lambda: curl_d("application/x-www-form-urlencoded", "curl -d"))
    case("curl -d @image.png -H image/png", lambda: curl_d("image/png", "CR and LF"))
    case("malformed JSON", lambda: post("/v1/classify", b'{"images": [', J, 400, "malformed",
                                        "invalid_json"))
    case("deep JSON (100k)", lambda: post("/v1/classify", b"[" * 100000 + b"]" * 100000, J, 400,
                                          "deep JSON"))
    case("JSON 65 deep", lambda: post("/v1/classify", b'{"images":' + b"[" * 64 + b"]" * 64 + b"}",
                                      J, 400, "65 deep"))
    case("duplicate keys", lambda: post("/v1/classify", b'{"images": [], "images": []}', J, 400,
                                        "duplicate keys"))
    case("NaN in JSON", lambda: post("/v1/classify", b'{"images": NaN}', J, 400, "NaN"))
    case("trailing garbage", lambda: post("/v1/classify", b'{"images": []} xx', J, 400, "garbage"))
    case("invalid UTF-8", lambda: post("/v1/classify", b'{"images": ["\xff\xfe"]}', J, 400,
                                       "invalid UTF-8"))
    case("images not an array", lambda: post("/v1/classify", b'{"images": "abc"}', J, 422,
                                             "images type"))
    case("images empty", lambda: post("/v1/classify", b'{"images": []}', J, 422, "no images"))
    case("unknown JSON field", lambda: post("/v1/classify", b'{"images": [], "x": 1}', J, 400,
                                            "unknown field", "unknown_field"))
    case("empty JSON object", lambda: post("/v1/classify", b'{}', J, 422, "{}", "invalid_request"))
    case("JSON array body", lambda: post("/v1/classify", b'[1, 2]', J, 422, "[1, 2]",
                                         "invalid_request"))
    case("number beyond int64", lambda: post("/v1/classify", b'{"images": [1e999]}', J, 422,
                                             "1e999", "out_of_range"))
    case("bad base64", lambda: post("/v1/classify", b'{"images": ["@@@@"]}', J, 400, "base64"))
    case("base64 GIF", lambda: post("/v1/classify", json.dumps(
        {"images": [base64.b64encode(gif).decode()]}), J, 415, "base64 GIF"))
    case("too many images", lambda: post("/v1/classify", json.dumps(
        {"images": ["AAAA"] * 300}), J, 413, "300 images"))
    body, ct = multipart([("image/png", png)], boundary="a\x00b")
    case("multipart NUL in boundary", lambda: check(raw_status(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=a\x00b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        in (400, 415, None), "NUL boundary refused"))
    case("multipart without boundary", lambda: post(
        "/v1/classify", body, {"Content-Type": "multipart/form-data"}, 400, "no boundary"))
    mp_open, ct2 = multipart([("image/png", png)])
    case("multipart without its closing boundary", lambda: post(
        "/v1/classify", mp_open[:-30], {"Content-Type": ct2}, 400, "unterminated multipart"))
    mp_txt, ct3 = multipart([("image/png", png), ("text/plain", b"hello")])
    case("multipart with a text part", lambda: post(
        "/v1/classify", mp_txt, {"Content-Type": ct3}, 415, "text part"))
    case("multipart boundary never present", lambda: post(
        "/v1/classify", b"no boundary here", {"Content-Type": ct2}, 400, "absent boundary"))
    case("top_k=-1", lambda: post("/v1/classify?top_k=-1", png, H, 400, "top_k=-1",
                                  "invalid_parameter"))
    case("top_k=abc", lambda: post("/v1/classify?top_k=abc", png, H, 400, "top_k=abc"))
    case("top_k=11", lambda: post("/v1/classify?top_k=11", png, H, 400, "top_k too big"))
    case("tpr=2", lambda: post("/v1/classify?tpr=2", png, H, 400, "tpr=2"))
    case("tpr=nan", lambda: post("/v1/classify?tpr=nan", png, H, 400, "tpr=nan"))
    # in (0, 1) as a double but 0 or 1 as the float the verdict uses
    case("tpr=1e-300", lambda: post("/v1/classify?tpr=1e-300", png, H, 400, "tpr=1e-300"))
    case("tpr=0.999999999", lambda: post("/v1/classify?tpr=0.999999999", png, H, 400,
                                         "tpr=0.999999999"))
    case("grad=maybe", lambda: post("/v1/classify?grad=maybe", png, H, 400, "grad=maybe"))
    case("unknown query parameter", lambda: post("/v1/classify?foo=1", png, H, 400, "foo=1"))
    case("query parameter without a value", lambda: post("/v1/classify?top_k", png, H, 400,
                                                        "?top_k", "invalid_parameter"))
    case("query parameter given twice", lambda: post("/v1/classify?top_k=1&top_k=2", png, H, 400,
                                                    "top_k twice", "invalid_parameter"))
    case("query value with NUL", lambda: post("/v1/classify?top_k=3%00", png, H, 400,
                                             "top_k=3%00", "invalid_parameter"))
    case("unknown route", lambda: c.call("GET", "/v1/nope", expect=404, what="unknown route"))
    case("unknown v2 route", lambda: c.call("GET", "/v2/nope", expect=404, what="unknown v2"))

    def echoed_bytes(path, v2_shape):
        # error messages echo the path: bytes that are not UTF-8, or a long
        # message cut inside a character, must still give a JSON answer
        st, h, js = c.call("GET", path, expect=404, what=path[:40])
        ok = isinstance(js, dict) and (isinstance(js.get("error"), str) if v2_shape else
                                       isinstance(js.get("error"), dict))
        check(ok, f"{path[:40]}: JSON error body ({js!r:.80})")
    case("path with %ff", lambda: echoed_bytes("/v1/%ff", False))
    case("%00 does not cut a path short", lambda: echoed_bytes("/metrics%00", False))
    case("percent-escapes still decode", lambda: post("/v1/classify?grad=fals%65", png, H, 200,
                                                     "grad=fals%65"))
    case("long UTF-8 path", lambda: echoed_bytes("/v1/x" + "%C3%A9" * 300, False))
    case("v2 model name with %ff%fe", lambda: echoed_bytes("/v2/models/%ff%fe", True))

    def wrong_method():
        st, h, js = c.call("DELETE", "/v1/classify", expect=405, what="DELETE classify")
        check(h.get("allow") == "POST", f"Allow header: {h.get('allow')}")
        st, h, js = c.call("POST", "/healthz", b"x", expect=405, what="POST healthz")
        check("GET" in h.get("allow", ""), "Allow on healthz")
    case("wrong method", wrong_method)
    V = f"/v2/models/{model_name}/infer"
    good = {"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
                        "data": [0.0] * 1024}]}

    def v2(mut, expect, what, path=V):
        q = json.loads(json.dumps(good))
        mut(q)
        st, h, js = c.call("POST", path, json.dumps(q), J, expect, what)
        check(isinstance(js, dict) and isinstance(js.get("error"), str), f"{what}: v2 error shape")
    case("v2 wrong shape", lambda: v2(lambda q: q["inputs"][0].update(shape=[1, 3, 32, 32]), 422,
                                      "v2 shape"))
    case("v2 rank 3", lambda: v2(lambda q: q["inputs"][0].update(shape=[1, 32, 32]), 400, "rank"))
    case("v2 data too short", lambda: v2(lambda q: q["inputs"][0].update(data=[0.0] * 1000), 422,
                                         "v2 short data"))
    case("v2 wrong datatype", lambda: v2(lambda q: q["inputs"][0].update(datatype="INT8"), 400,
                                         "datatype"))
    case("v2 string in data", lambda: v2(lambda q: q["inputs"][0]["data"].__setitem__(5, "x"),
                                         422, "string data"))
    case("v2 huge value", lambda: v2(lambda q: q["inputs"][0]["data"].__setitem__(5, 1e39), 422,
                                     "1e39"))
    case("v2 finite but huge value", lambda: v2(
        lambda q: q["inputs"][0]["data"].__setitem__(5, 3e38), 422, "3e38"))

    def v2_strings():
        q = json.loads(json.dumps(good))
        q["inputs"][0]["data"] = ["x"] * 1024
        st, h, js = c.call("POST", V, json.dumps(q), J, 422, "v2 data of strings")
        check("not a number" in str(js.get("error")), f"v2 strings: names the element: {js}")
    case("v2 data of 1024 strings", v2_strings)
    case("v2 unknown input name", lambda: v2(lambda q: q["inputs"][0].update(name="x"), 400,
                                             "input name"))
    case("v2 two inputs", lambda: v2(lambda q: q["inputs"].append(q["inputs"][0]), 400, "2 inputs"))
    case("v2 unknown output", lambda: v2(lambda q: q.update(outputs=[{"name": "zz"}]), 400, "output"))
    case("v2 unknown model", lambda: v2(lambda q: None, 404, "unknown model",
                                        "/v2/models/nosuch/infer"))
    case("v2 NaN", lambda: check(c.call("POST", V, b'{"inputs": [{"name": "input", "shape": '
                                        b'[1,1,32,32], "datatype": "FP32", "data": [NaN]}]}', J,
                                        400, "v2 NaN")[0] == 400, "v2 NaN"))
    case("v2 model metadata unknown", lambda: c.call("GET", "/v2/models/nosuch", expect=404,
                                                     what="v2 metadata unknown"))
    case("header flood (100 KB)", lambda: check(raw_status(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90)
                                                          for i in range(1100)) + b"\r\n")
        in (400, 413, 431, None), "header flood refused"))
    case("garbage request line", lambda: d.raw(b"\x00\x01\x02 GARBAGE\r\n\r\n", timeout=1))
    case("header with NUL", lambda: d.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
                                          timeout=1))
    case("disconnect mid-upload", lambda: d.raw(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n" % len(png) + png[:50], timeout=0.2, shut=True))
    case("both Content-Length and chunked", lambda: d.raw(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", timeout=1))
    return n[0]


def slowloris(d, deadline):
    """Trickles header bytes; the request deadline must close the socket."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=2)
    t0 = time.time()
    closed_at = None
    msg = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    try:
        for i in range(len(msg)):
            s.sendall(msg[i:i + 1])
            time.sleep(0.25)
            r = s.recv(1, socket.MSG_DONTWAIT) if False else None  # noqa: SIM108
            if time.time() - t0 > deadline + 6:
                break
    except (BrokenPipeError, ConnectionResetError, OSError):
        closed_at = time.time() - t0
    s.close()
    return closed_at


def concurrency(c, d, imgs):
    """Parallel clients with different images get their single-request answers."""
    H = {"Content-Type": "image/png"}
    ref = []
    for im in imgs:
        st, h, r = c.call("POST", "/v1/classify", im, H, 200)
        ref.append(r)
    bad = []
    errors = []

    def worker(i):
        try:
            for rep in range(3):
                st, h, data = d.request("POST", "/v1/classify", imgs[i], H)
                r = json.loads(data)
                if st != 200:
                    errors.append(f"client {i}: status {st}")
                    continue
                for key in ("logits", "probs", "energy", "grad_norm", "max_softmax",
                            "energy_complexity"):
                    if not rel_close(r[key], ref[i][key]):
                        bad.append((i, key))
                if r["label"] != ref[i]["label"]:
                    bad.append((i, "label"))
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {i}: {e!r}")
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(len(imgs))]
    st0, _, m0 = d.request("GET", "/metrics")
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    st1, _, m1 = d.request("GET", "/metrics")
    check(not errors, f"concurrency errors: {errors[:3]}")
    check(not bad, f"batched results differ from single ones: {bad[:5]}")
    m0, m1 = m0.decode(), m1.decode()
    nb = metric_value(m1, "jem_batch_size_count") - metric_value(m0, "jem_batch_size_count")
    ni = metric_value(m1, "jem_batch_size_sum") - metric_value(m0, "jem_batch_size_sum")
    check(ni == 3 * len(imgs), f"every image went through a batch ({ni})")
    check(nb < ni, f"dynamic batching formed batches larger than 1 ({ni} images in {nb} batches)")
    return ni / max(nb, 1)


def wait_queued(d, at_least=1, timeout=20):
    """Waits until the scoring queue holds at least this many images."""
    end = time.time() + timeout
    while time.time() < end:
        st, _, m = d.request("GET", "/metrics")
        v = metric_value(m.decode(), "jem_queue_depth")
        if v is not None and v >= at_least:
            return v
        time.sleep(0.005)
    check(False, f"the queue never reached {at_least} images")
    return 0


def test_metrics(d):
    st, h, text = d.request("GET", "/metrics")
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    check(p.returncode == 0, f"promtool check metrics: {p.stdout.decode()} {p.stderr.decode()}")
    t = text.decode()
    for name in ("jem_http_requests_total", "jem_request_duration_seconds_bucket",
                 "jem_queue_duration_seconds_bucket", "jem_compute_duration_seconds_bucket",
                 "jem_batch_size_bucket", "jem_queue_depth", "jem_inflight_requests",
                 "jem_rejected_requests_total", "jem_energy_bucket", "jem_ood_score_bucket",
                 "jem_build_info", "jem_model_info", "process_resident_memory_bytes"):
        check(metric_value(t, name) is not None, f"metric {name} present")
    check('route="/v2/models/{name}/infer"' in t, "route templates as labels")
    check(metric_value(t, "jem_http_requests_total", {"code": "413"}) >= 1, "413s counted")
    check(metric_value(t, "jem_rejected_requests_total", {"reason": "too_large"}) >= 1,
          "rejections by reason")
    check(metric_value(t, "jem_ood_score_count", {"score": "energy"}) >= 1, "OOD histogram fed")


def test_openapi_coverage():
    src = open(os.path.join(ROOT, "server", "routes.c")).read()
    routes = re.findall(r'\{"(GET|POST|DELETE|PUT|PATCH)",\s*"(/[^"]*)"', src)
    check(len(routes) >= 11, f"routes parsed from server/routes.c: {len(routes)}")
    for method, path in routes:
        check(path in SPEC["paths"] and method.lower() in SPEC["paths"][path],
              f"route {method} {path} is in openapi.yaml")
    for path, ops in SPEC["paths"].items():
        for method in ops:
            if method in ("get", "post", "delete", "put", "patch"):
                check((method.upper(), path) in routes, f"openapi {method} {path} exists in code")


# ---------------------------------------------------------------------------

def main():
    global SPEC
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    build = os.path.join(ROOT, args.build) if not os.path.isabs(args.build) else args.build
    jemd = os.path.join(build, "jemd")
    if not os.path.exists(jemd):
        print(f"test_server: {jemd} not built", file=sys.stderr)
        return 1
    SPEC = yaml.safe_load(open(os.path.join(ROOT, "openapi.yaml")))
    asan = "asan" in args.build
    tmp = tempfile.mkdtemp(prefix="jemd-it-")
    t_start = time.time()
    try:
        model = os.path.join(tmp, "model.safetensors")
        jemtest.write_model(model, seed=7, name="testnet")
        imgs = jemtest.test_images(24, seed=2)

        # usage and settings
        p = subprocess.run([jemd, "--help"], capture_output=True)
        check(p.returncode == 0 and b"JEMD_MAX_BODY_BYTES" in p.stdout, "--help lists env vars")
        p = subprocess.run([jemd, "--version"], capture_output=True)
        check(p.returncode == 0 and p.stdout.startswith(b"jemd "), "--version")
        p = subprocess.run([jemd, "--bogus"], capture_output=True)
        check(p.returncode == 2, "unknown flag exits 2")
        p = subprocess.run([jemd, "--port", "0"], capture_output=True,
                           env=dict(os.environ, JEMD_MAX_BATCH="abc"))
        check(p.returncode == 2 and b"JEMD_MAX_BATCH" in p.stderr, "bad env var exits 2")
        p = subprocess.run([jemd, "--port", "0", "--model", os.path.join(tmp, "none")],
                           capture_output=True)
        check(p.returncode == 1 and b"cannot load" in p.stderr, "missing model exits 1")
        help_text = subprocess.run([jemd, "--help"], capture_output=True, text=True).stdout
        datadir = re.search(r"then (\S+/models/)", help_text)
        if datadir and not os.path.exists(datadir.group(1) + "fmnist-jem.safetensors"):
            p = subprocess.run([jemd, "--port", "0"], capture_output=True, cwd=tmp, timeout=30)
            check(p.returncode == 1 and b"models/fmnist-jem.safetensors" in p.stderr and
                  datadir.group(1).encode() in p.stderr,
                  "no --model and no default model: exits 1 naming both places looked in")
        p = subprocess.run([jemd, "--port", "0", "--queue-size", "10", "--max-images", "20"],
                           capture_output=True)
        check(p.returncode == 2 and b"--queue-size" in p.stderr,
              "--queue-size below --max-images is refused at start (exit 2)")

        # request-wide limits: total pixels (by the headers, before decoding)
        # and JSON depth have flags of their own
        dl = jemtest.Daemon(jemd, model, "--max-request-pixels", "5000", "--max-json-depth", "8")
        try:
            cl = Client(dl)
            J = {"Content-Type": "application/json"}
            b64 = [base64.b64encode(x).decode() for x in imgs[:7]]
            st, _, js = cl.call("POST", "/v1/classify?grad=false", json.dumps({"images": b64[:6]}),
                                J, 200, "6 images of 784 pixels within 5000")
            st, _, js = cl.call("POST", "/v1/classify?grad=false", json.dumps({"images": b64}),
                                J, 413, "7 images of 784 pixels over 5000")
            check(isinstance(js, dict) and js.get("error", {}).get("code") == "request_too_large",
                  f"--max-request-pixels: 413 request_too_large ({js})")
            body, ct = multipart([("image/png", x) for x in imgs[:7]])
            cl.call("POST", "/v1/classify?grad=false", body, {"Content-Type": ct}, 413,
                    "multipart over --max-request-pixels")
            st, _, js = cl.call("POST", "/v1/samples", json.dumps({"steps": 1, "init": {"images": b64}}),
                                J, 413, "job init images over --max-request-pixels")
            cl.call("POST", "/v1/classify", b'{"images": [[[[[[[[["x"]]]]]]]]]}', J, 400,
                    "JSON 9 deep over --max-json-depth 8")
        finally:
            dl.kill()

        # ---- large requests are decoded on a worker, not on the HTTP threads
        # (over 2^20 declared pixels); the result must be the one jem score gets
        # from the same file, errors keep their shape, and /healthz stays quick
        yy, xx = np.mgrid[0:1000, 0:1100]
        big = jemtest.png_bytes(((xx * 7 + yy * 3) % 256).astype(np.uint8))
        big_path = os.path.join(tmp, "big.png")
        with open(big_path, "wb") as f:
            f.write(big)
        p = subprocess.run([os.path.join(build, "jem"), "score", model, big_path, "--no-grad"],
                           capture_output=True, text=True)
        ref = json.loads(p.stdout.splitlines()[0]) if p.returncode == 0 else {}
        db = jemtest.Daemon(jemd, model)
        try:
            cb = Client(db)
            H = {"Content-Type": "image/png"}
            st, _, js = cb.call("POST", "/v1/classify?grad=false", big, H, 200,
                                "1100x1000 PNG (decoded on a worker)")
            check(isinstance(js, dict) and ref and all(
                rel_close(a, b) for a, b in zip(js.get("logits", []), ref["logits"])) and
                js.get("label") == ref["label"], "worker-decoded logits equal jem score's")
            cut = big[:len(big) // 2]
            st, _, js = cb.call("POST", "/v1/classify", cut, H, 400, "truncated large PNG")
            check(isinstance(js, dict) and js.get("error", {}).get("code") == "invalid_image",
                  f"truncated large PNG: 400 invalid_image ({js})")
            body, ct = multipart([("image/png", imgs[0]), ("image/png", cut)])
            st, _, js = cb.call("POST", "/v1/classify", body, {"Content-Type": ct}, 400,
                                "multipart with a truncated large PNG second")
            check(isinstance(js, dict) and
                  js.get("error", {}).get("message", "").startswith("image 1: "),
                  f"the worker's error names the image ({js})")
            # job init images take the same path
            J = {"Content-Type": "application/json"}
            st, _, js = cb.call("POST", "/v1/samples", json.dumps(
                {"steps": 2, "seed": 1, "init": {"images": [base64.b64encode(big).decode()]}}),
                J, 202, "job with a 1100x1000 init image (decoded on a worker)")
            job_url = js.get("url") if isinstance(js, dict) else None
            for _ in range(200):
                st, _, js = cb.call("GET", job_url or "/v1/jobs/none")
                if not isinstance(js, dict) or js.get("status") not in ("queued", "running"):
                    break
                time.sleep(0.05)
            check(isinstance(js, dict) and js.get("status") == "succeeded" and
                  js["params"]["init"] == "images", f"the job succeeds ({js})")
            st, _, js = cb.call("POST", "/v1/samples", json.dumps(
                {"steps": 2, "init": {"images": [base64.b64encode(imgs[0]).decode(),
                                                 base64.b64encode(cut).decode()]}}),
                J, 400, "job with a truncated large init image")
            check(isinstance(js, dict) and js.get("error", {}).get("code") == "invalid_image" and
                  js["error"]["message"].startswith("init.images[1]: "),
                  f"job init decode error: 400 invalid_image naming the image ({js})")
            # two requests of 64 Mpx each (the default --max-request-pixels)
            # and a job with as many init pixels, against two HTTP threads:
            # decoded there, they held /healthz for a second or more
            side = 2048
            yy, xx = np.mgrid[0:side, 0:side]
            huge = jemtest.png_bytes(((xx + 3 * yy) % 256).astype(np.uint8))
            body, ct = multipart([("image/png", huge)] * 16)
            job_body = json.dumps({"steps": 1, "init": {"images": [
                base64.b64encode(huge).decode()] * 16}})
            done = []

            def post_huge():
                done.append(cb.call("POST", "/v1/classify?grad=false", body,
                                    {"Content-Type": ct}, timeout=180)[0])

            def post_job():
                done.append(cb.call("POST", "/v1/samples", job_body, J, timeout=180)[0])
            ths = [threading.Thread(target=f) for f in (post_huge, post_huge, post_job)]
            t0 = time.time()
            for t in ths:
                t.start()
            lat = []
            while any(t.is_alive() for t in ths):
                t1 = time.time()
                db.request("GET", "/healthz")
                lat.append(time.time() - t1)
                time.sleep(0.02)
            for t in ths:
                t.join()
            took = time.time() - t0
            check(sorted(done) == [200, 200, 202],
                  f"two 64-Mpx classify requests and a job with 64 Mpx of init images "
                  f"answered ({done})")
            check(len(lat) >= 3 and max(lat) < 0.5,
                  f"/healthz answered while they decoded: {len(lat)} times in {took:.1f} s, "
                  f"slowest {max(lat) if lat else float('nan'):.3f} s")
            cb.ready("after large decodes")
        finally:
            db.kill()
        # one worker: requests waiting to be decoded count in the queue depth
        # and readiness (as in queue_full), a client that hangs up before its
        # decode has it skipped, and a job that could not be queued is
        # refused before its init images are decoded
        d1 = jemtest.Daemon(jemd, model, "--workers", "1", "--queue-size", "17", "--max-images",
                            "16", "--max-queued-jobs", "1")
        try:
            c1 = Client(d1)
            res = {}
            ta = threading.Thread(target=lambda: res.update(a=c1.call(
                "POST", "/v1/classify?grad=false", body, {"Content-Type": ct}, timeout=180)[0]))
            t_a = time.time()
            ta.start()
            seen = set()
            while ta.is_alive():
                _, _, m = d1.request("GET", "/metrics")
                depth = metric_value(m.decode(), "jem_queue_depth")
                ready = d1.request("GET", "/readyz")[0]
                seen.add((depth, ready))
                time.sleep(0.01)
            ta.join()
            t_a = time.time() - t_a  # 16 decode slices and their scoring, on this machine now
            check(res.get("a") == 200 and (16, 503) in seen,
                  f"16 images being decoded: queue depth 16 and /readyz 503 ({sorted(seen)})")
            tb = threading.Thread(target=lambda: res.update(b=c1.call(
                "POST", "/v1/classify?grad=false", body, {"Content-Type": ct}, timeout=180)[0]))
            tb.start()
            # b (16 images) is decoding, one image per slice: a small request
            # is scored between two slices instead of after all sixteen (it
            # waited about 0.45 s when the whole request was one slice).  The
            # bound scales with this machine's speed now (a's 16 slices took
            # t_a): a few slices, far from sixteen, and 0.25 s on a quiet one.
            time.sleep(0.1)
            t0 = time.time()
            c1.call("POST", "/v1/classify?grad=false", imgs[0], {"Content-Type": "image/png"},
                    200, "a small request while 16 large images decode")
            small_s = time.time() - t0
            bound = max(0.25, 4 * t_a / 16)
            check(tb.is_alive() and small_s < bound,
                  f"one worker: a small request answered in {small_s:.3f} s (< {bound:.3f}: "
                  f"4 of the 16 slices that took {t_a:.2f} s) while a 16-image request "
                  f"decodes (still decoding: {tb.is_alive()})")
            tb.join()
            # b and c (8 images each) are decoded in turn; c's client hangs up
            body8, ct8 = multipart([("image/png", huge)] * 8)
            tb = threading.Thread(target=lambda: res.update(b=c1.call(
                "POST", "/v1/classify?grad=false", body8, {"Content-Type": ct8}, timeout=180)[0]))
            tb.start()
            time.sleep(0.05)
            sc = socket.create_connection(("127.0.0.1", d1.port))
            sc.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                       b"Content-Length: %d\r\n\r\n" % (ct8.encode(), len(body8)) + body8)
            time.sleep(0.15)
            sc.close()
            tb.join()
            time.sleep(0.3)
            _, _, m = d1.request("GET", "/metrics")
            check(res.get("b") == 200 and metric_value(
                m.decode(), "jem_rejected_requests_total", {"reason": "client_gone"}) == 1 and
                "dropping work before it was decoded" in d1.log(),
                f"a client gone during its decode: dropped ({res.get('b')}, "
                f"{[ln for ln in d1.log().splitlines() if 'gone' in ln]})")
            check(metric_value(m.decode(), "jem_queue_depth") == 0, "queue empty afterwards")
            st, _, js = c1.call("POST", "/v1/samples", json.dumps({"n": 2, "steps": 2000}), J, 202,
                                "a long job")
            t0 = time.time()
            st, _, js2 = c1.call("POST", "/v1/samples", job_body, J, 429,
                                 "a job with 64 Mpx of init images while the job queue is full")
            check(time.time() - t0 < 0.5 and isinstance(js2, dict) and
                  js2.get("error", {}).get("code") == "queue_full",
                  f"refused before decoding ({time.time() - t0:.2f} s, {js2})")
            if isinstance(js, dict) and js.get("url"):
                c1.call("DELETE", js["url"], expect=200)
            c1.ready("one-worker large decodes")
        finally:
            d1.kill()

        # ---- --workspace-bytes: a batch larger than the workspace runs in
        # chunks that fit, with the results of single images
        dw = jemtest.Daemon(jemd, model, "--workers", "1", "--max-batch", "1024",
                            "--max-delay-us", "200000", "--workspace-bytes", str(16 << 20))
        try:
            cw = Client(dw)
            J = {"Content-Type": "application/json"}
            pick = [imgs[i % len(imgs)] for i in range(40)]
            st, _, js = cw.call("POST", "/v1/classify", json.dumps(
                {"images": [base64.b64encode(p).decode() for p in pick]}), J, 200,
                "40 images on a capped workspace")
            batch = js.get("results", []) if isinstance(js, dict) else []
            check(len(batch) == 40, "40 results")
            check(re.search(r'msg="workspace capped" images=\d+ max_batch=1024', dw.log())
                  is not None, "the capped workspace is logged")
            for i in (0, 1, 39):
                st, _, one = cw.call("POST", "/v1/classify", pick[i],
                                     {"Content-Type": "image/png"}, 200)
                check(len(batch) == 40 and rel_close(one["energy"], batch[i]["energy"]) and
                      rel_close(one["grad_norm"], batch[i]["grad_norm"], 1e-4),
                      f"image {i}: chunked batch == alone")
        finally:
            dw.kill()

        # ---- main daemon
        d = jemtest.Daemon(jemd, model, "--workers", "2", "--max-batch", "16",
                           "--max-delay-us", "3000", "--timeout", "3", "--request-deadline", "4",
                           "--max-body-bytes", str(1 << 20), "--max-image-pixels", "1000000",
                           env={"JEMD_MAX_BATCH": "3"})
        c = Client(d)
        try:
            st, h, js = c.call("GET", "/v1/models", expect=200)
            check(js["models"][0]["max_batch"] == 16, "a flag wins over its JEMD_ variable")
            slow_result = {}
            slow_t = threading.Thread(target=lambda: slow_result.update(t=slowloris(d, 4)))
            slow_t.start()
            test_routes(c, imgs, "testnet")
            n_bad = bad_inputs(c, d, imgs, "testnet")
            check(n_bad >= 30, f"at least 30 bad-input cases ({n_bad})")
            avg = concurrency(c, d, imgs)
            slow_t.join()
            t = slow_result.get("t")
            check(t is not None and t < 4 + 4, f"slowloris closed by the request deadline ({t})")
            c.ready("slowloris")
            test_metrics(d)
            log = d.log()
            check(re.search(r"msg=access id=\S+ client=127\.0\.0\.1 method=POST "
                            r"route=/v1/classify path=/v1/classify status=200 latency_ms=", log)
                  is not None, "access log line")
            d.signal(signal.SIGTERM)
            check(d.wait(30) == 0, "main daemon exits 0 on SIGTERM")
        finally:
            d.kill()
        print(f"  main daemon: {n_bad} bad-input cases, mean batch {avg:.2f} under concurrency",
              flush=True)

        # ---- the deadline sweeper (main thread) against connections that HTTP
        # threads stamp while it runs: slow_clock.so stretches the moment after
        # main reads the clock to 100 ms; a sweeper that compared an earlier
        # reading with a newer stamp cut live keep-alive connections (CI flake)
        shim = os.path.join(tmp, "slow_clock.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", shim,
                        os.path.join(ROOT, "tests", "integration", "slow_clock.c"), "-ldl"],
                       check=True)
        d = jemtest.Daemon(jemd, model, "--request-deadline", "30",
                           env={"LD_PRELOAD": shim, "ASAN_OPTIONS": os.environ.get(
                               "ASAN_OPTIONS", "") + ":verify_asan_link_order=0"})
        try:
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            n_ok = n_err = 0
            end = time.time() + 2.5
            while time.time() < end:
                try:
                    conn.request("GET", "/healthz")
                    conn.getresponse().read()
                    n_ok += 1
                except (OSError, http.client.HTTPException):
                    n_err += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
                time.sleep(0.001)
            conn.close()
            st, _, m = d.request("GET", "/metrics")
            cut = metric_value(m.decode(), "jem_rejected_requests_total", {"reason": "deadline"})
            check(n_ok > 100 and n_err == 0 and cut == 0,
                  f"keep-alive requests under a slowed sweeper: {n_ok} ok, {n_err} cut, "
                  f"deadline rejections {cut}")
        finally:
            d.kill()

        # ---- limits and auth
        keyf = os.path.join(tmp, "keys")
        with open(keyf, "w") as f:
            f.write("# test keys\nsecret-one\n\nsecret-two\n")
        d2 = jemtest.Daemon(jemd, model, "--max-connections", "8", "--max-connections-per-ip", "4",
                            "--api-key-file", keyf, "--protect-scoring", "--timeout", "5")
        c2 = Client(d2)
        try:
            st, h, js = c2.call("POST", "/v1/classify", imgs[0], {"Content-Type": "image/png"}, 401,
                                "no key")
            check(h.get("www-authenticate", "").startswith("Bearer"), "WWW-Authenticate")
            c2.call("POST", "/v1/classify", imgs[0], {"Content-Type": "image/png",
                                                      "Authorization": "Bearer wrong"}, 401,
                    "wrong key")
            c2.call("POST", "/v1/classify", imgs[0], {"Content-Type": "image/png",
                                                      "Authorization": "Bearer secret-two"}, 200,
                    "right key")
            c2.call("GET", "/v2/models/testnet", None, {"Authorization": "Bearer secret-one"}, 200)
            c2.call("GET", "/healthz", expect=200, what="health stays open")
            c2.call("GET", "/metrics", expect=200, what="metrics stay open")
            # per-address limit: 4 open connections, the 5th and later are closed
            time.sleep(1.0)  # earlier connections finish closing
            socks = []
            for i in range(10):
                s = socket.create_connection(("127.0.0.1", d2.port), timeout=2)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            answered = 0
            for s in socks:
                try:
                    if s.recv(12).startswith(b"HTTP/1.1 200"):
                        answered += 1
                except OSError:
                    pass
            for s in socks:
                s.close()
            check(3 <= answered <= 4, f"per-address connection limit 4: {answered} of 10 answered")
            time.sleep(0.3)
            c2.ready("too many connections")
        finally:
            d2.kill()

        # ---- queue, client gone, reload and drain; sd_notify
        nsock_path = os.path.join(tmp, "notify.sock")
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(nsock_path)
        ns.settimeout(10)
        notes = []

        def read_notes():
            while True:
                try:
                    notes.append(ns.recv(256))
                except OSError:
                    return
        # one worker, batches of one image: a 240-image request keeps the
        # worker busy and the queue occupied long enough to observe
        d3 = jemtest.Daemon(jemd, model, "--workers", "1", "--max-batch", "1",
                            "--queue-size", "250", "--max-images", "250",
                            "--drain-seconds", "20", "--drain-delay", "1",
                            env={"NOTIFY_SOCKET": nsock_path, "WATCHDOG_USEC": "300000"})
        c3 = Client(d3)
        try:
            check(ns.recv(256).startswith(b"READY=1"), "sd_notify READY=1")
            ns.settimeout(1)
            threading.Thread(target=read_notes, daemon=True).start()
            H = {"Content-Type": "image/png"}
            J = {"Content-Type": "application/json"}
            blocker = json.dumps({"images": [base64.b64encode(imgs[0]).decode()] * 240})
            res = {}

            def bg(key, body=blocker, hdrs=J, path="/v1/classify"):
                try:
                    res[key] = c3.call("POST", path, body, hdrs)
                except Exception as e:  # noqa: BLE001
                    res[key] = (repr(e), None, None)
            t1 = threading.Thread(target=bg, args=("a",))
            t1.start()
            wait_queued(d3, 230)
            st, h, js = c3.call("GET", "/readyz", expect=503, what="not ready: queue 90% full")
            check(isinstance(js, dict) and js.get("error", {}).get("code") == "queue_full",
                  "readyz 503 queue_full")
            st, h, js = c3.call("POST", "/v1/classify", json.dumps(
                {"images": [base64.b64encode(imgs[1]).decode()] * 30}), J, 503, "queue full")
            check(h.get("retry-after") == "1" and isinstance(js, dict) and
                  js.get("error", {}).get("code") == "queue_full", "503 queue_full with Retry-After")
            t1.join()
            check(res["a"][0] == 200 and len(res["a"][2]["results"]) == 240,
                  "the queued request completes")
            c3.call("GET", "/readyz", expect=200, what="ready again once the queue drains")
            # a client that leaves while queued: its work is dropped
            t1 = threading.Thread(target=bg, args=("b",))
            t1.start()
            wait_queued(d3, 200)
            s = socket.create_connection(("127.0.0.1", d3.port))
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(imgs[3]) + imgs[3])
            time.sleep(0.05)
            s.close()
            t1.join()
            time.sleep(0.2)
            st, h, m = d3.request("GET", "/metrics")
            check(metric_value(m.decode(), "jem_rejected_requests_total",
                               {"reason": "client_gone"}) == 1, "client gone: work dropped")
            check(metric_value(m.decode(), "jem_queue_depth") == 0, "queue empty afterwards")
            check(metric_value(m.decode(), "jem_http_requests_total", {"code": "499"}) == 1,
                  "the dropped request is counted as 499")
            c3.ready("client gone")
            # SIGHUP with a good new file (another name), then a bad one
            jemtest.write_model(model, seed=8, name="testnet2")
            d3.signal(signal.SIGHUP)
            time.sleep(0.5)
            st, h, js = c3.call("GET", "/v1/models", expect=200)
            check(js["models"][0]["name"] == "testnet2" and js["models"][0]["generation"] == 2,
                  "SIGHUP reloads the model")
            with open(model, "wb") as f:
                f.write(b"this is not a model")
            d3.signal(signal.SIGHUP)
            time.sleep(0.5)
            st, h, js = c3.call("GET", "/v1/models", expect=200)
            check(js["models"][0]["name"] == "testnet2" and js["models"][0]["generation"] == 2,
                  "a failed reload keeps the old model")
            check("model reload failed" in d3.log(), "failed reload is logged")
            c3.call("POST", "/v1/classify?grad=false", imgs[0], H, 200, "serving after bad reload")
            # drain: a queued request finishes, readiness turns 503, exit 0
            small = json.dumps({"images": [base64.b64encode(imgs[0]).decode()] * 60})
            t3 = threading.Thread(target=bg, args=("c", small))
            t3.start()
            wait_queued(d3, 30)
            t0 = time.time()
            d3.signal(signal.SIGTERM)
            time.sleep(0.3)
            st, h, js = c3.call("GET", "/readyz", expect=503, what="readyz while draining")
            check(js["error"]["code"] == "draining", "draining code")
            c3.call("GET", "/v2/health/ready", expect=503, what="v2 ready while draining")
            rc = d3.wait(15)
            t3.join()
            check(rc == 0, f"drain exits 0 ({rc})")
            check(time.time() - t0 < 20 + 2, "drain within --drain-seconds")
            check(res["c"][0] == 200, f"in-flight request completed during drain: {res['c'][0]}")
            time.sleep(1.1)
            msgs = list(notes)
            check(any(m.startswith(b"STOPPING=1") for m in msgs), "sd_notify STOPPING=1")
            check(any(m.startswith(b"WATCHDOG=1") for m in msgs), "sd_notify WATCHDOG=1")
        finally:
            d3.kill()
            ns.close()
        missing = []
        for path, ops in SPEC["paths"].items():
            for method in ops:
                # job routes (tag jobs) are checked by test_jobs.py
                if method in ("get", "post") and "jobs" not in ops[method].get("tags", []) and not any(
                        (mm, pp) == (method.upper(), path) for mm, pp, _ in CHECKED):
                    missing.append(f"{method.upper()} {path}")
        check(not missing, f"responses checked against the schema for every route: {missing}")
        test_openapi_coverage()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.time() - t_start
    print(f"test_server: {PASSES[0]} checks passed, {len(FAILS)} failed, {dt:.1f} s"
          f"{' (ASan build)' if asan else ''}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
