#!/usr/bin/python3
"""test_clients.py - the clients under clients/ against the real daemon: the
Python client (clients/python/jemd_client.py, as a module and as a command)
and the JavaScript fetch example (clients/js/jemd_example.mjs, under node).

usage: /usr/bin/python3 tests/integration/test_clients.py --build build
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import jemtest  # noqa: E402
import jemd_client  # noqa: E402

check = jemtest.Checks("test_clients")
PY_CLIENT = os.path.join(ROOT, "clients", "python", "jemd_client.py")
JS_CLIENT = os.path.join(ROOT, "clients", "js", "jemd_example.mjs")



def close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def png_size(data):
    return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) \
        if data[:8] == b"\x89PNG\r\n\x1a\n" else None


def test_stdlib_only():
    tree = ast.parse(open(PY_CLIENT).read())
    mods = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    check(mods and mods <= set(sys.stdlib_module_names),
          f"jemd_client.py imports only the standard library: {sorted(mods)}")


def test_module(d, tmp, files):
    c = jemd_client.Client(f"http://127.0.0.1:{d.port}")
    name = c.models()[0]["name"]
    check(name == "clientnet", f"models(): {name}")
    want = [d.json("POST", "/v1/classify", open(f, "rb").read(), {"Content-Type": "image/png"})[2]
            for f in files]
    [one] = c.classify(files[:1])
    check(one["label"] == want[0]["label"] and close(one["logits"], want[0]["logits"]),
          "classify(one file) = POST /v1/classify of its bytes")
    many = c.classify(files, grad=False, top_k=2)
    check(len(many) == 3 and [r["label"] for r in many] == [w["label"] for w in want] and
          all(close(r["logits"], w["logits"]) for r, w in zip(many, want)),
          "classify(three files) as multipart: results in order, the same logits")
    check(all(r["grad_norm"] is None and len(r["top_k"]) == 2 for r in many),
          "grad=False and top_k reach the daemon")
    jpeg = os.path.join(ROOT, "tests", "data", "images", "baseline.jpg")
    [rj] = c.classify([open(jpeg, "rb").read()])
    check(rj["class"].startswith("class"), "classify(bytes of a JPEG)")
    try:
        c.classify([b"not an image"])
        check(False, "classify(garbage) raises")
    except jemd_client.JemdError as e:
        check(e.status == 415 and e.code, f"classify(garbage): JemdError 415 ({e})")
    seen = []
    job = c.sample(n=4, steps=5, class_=2, seed=11, progress=seen.append)
    check(job["status"] == "succeeded" and job["params"]["class"] == 2 and
          job["params"]["seed"] == 11 and seen, "sample() runs a job to the end")
    grid = c.save(job["result"]["grid_url"], os.path.join(tmp, "grid.png"))
    check(png_size(open(grid, "rb").read()) == (2 + 2 * 34, 2 + 2 * 34),
          "save(grid_url) writes the 2x2 grid PNG")
    npy = c.save(job["result"]["npy_url"], os.path.join(tmp, "samples.npy"))
    shape, data = jemd_client.read_npy(npy)
    check(shape == [4, 1, 32, 32] and len(data) == 4 * 32 * 32, f"read_npy: {shape}")
    out = c.infer(name, data, shape)
    check(set(out) == {"logits", "probs", "energy", "grad_norm"} and out["logits"][0] == [4, 10],
          "infer(): the four outputs with their shapes")
    st, _, ref = d.json("POST", f"/v2/models/{name}/infer", json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}],
         "outputs": [{"name": "logits"}]}), {"Content-Type": "application/json"})
    check(st == 200 and close(out["logits"][1], ref["outputs"][0]["data"]),
          "infer() = POST /v2/models/{name}/infer")
    try:
        c.infer("nosuchmodel", data, shape)
        check(False, "infer(unknown model) raises")
    except jemd_client.JemdError as e:
        check(e.status == 404 and e.code is None and e.message,
              f"infer(unknown model): 404 with the v2 message ({e})")
    return name


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, PY_CLIENT, *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def test_cli(d, keyd, key, tmp, files):
    url = f"http://127.0.0.1:{d.port}"
    p = run_cli("--url", url, "classify", *files[:2], "--no-grad")
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    check(p.returncode == 0 and [x["file"] for x in lines] == files[:2] and
          all(x["grad_norm"] is None for x in lines), f"CLI classify: one line per file ({p.stderr})")
    bad = os.path.join(tmp, "bad.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    p = run_cli("--url", url, "classify", bad)
    check(p.returncode == 1 and "400 invalid_image" in p.stderr,
          f"CLI classify of a broken PNG: exit 1 with jemd's code ({p.returncode}, {p.stderr})")
    p = run_cli("--url", url, "classify")
    check(p.returncode == 2, "CLI usage error: exit 2")
    p = run_cli("--url", "http://127.0.0.1:1", "models")
    check(p.returncode == 1 and "jemd_client:" in p.stderr, "CLI: nothing listening, exit 1")
    # a job through the key-protected daemon; the key from the environment
    kurl = f"http://127.0.0.1:{keyd.port}"
    grid, npy = os.path.join(tmp, "cli_grid.png"), os.path.join(tmp, "cli.npy")
    p = run_cli("--url", kurl, "sample", "--n", "2", "--steps", "3", "--class", "class4",
                "--seed", "5", "--out", grid, "--npy", npy, env={"JEMD_API_KEY": key})
    job = json.loads(p.stdout) if p.returncode == 0 else {}
    check(job.get("status") == "succeeded" and job["params"]["class"] == 4 and
          png_size(open(grid, "rb").read()) == (2 + 2 * 34, 2 + 1 * 34) and
          "succeeded 3/3" in p.stderr,
          f"CLI sample with --class NAME and the key: grid written ({p.returncode} {p.stderr[-300:]})")
    p = run_cli("--url", kurl, "sample", "--steps", "1")
    check(p.returncode == 1 and "401 unauthorized" in p.stderr,
          f"CLI sample without the key: exit 1, 401 ({p.stderr.strip()})")
    p = run_cli("--url", kurl, "infer", npy, env={"JEMD_API_KEY": key})
    out = json.loads(p.stdout) if p.returncode == 0 else {}
    check(out.get("energy", {}).get("shape") == [2], f"CLI infer of the job's .npy ({p.stderr})")


def test_js(d, tmp, files):
    grid = os.path.join(tmp, "js_grid.png")
    p = subprocess.run(["node", JS_CLIENT, f"http://127.0.0.1:{d.port}", files[0], grid],
                       capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        check(False, f"jemd_example.mjs printed no JSON (rc {p.returncode}): {p.stderr[-500:]}")
        return
    want = d.json("POST", "/v1/classify", open(files[0], "rb").read(),
                  {"Content-Type": "image/png"})[2]
    check(out["classify"]["label"] == want["label"] and out["classify"]["class"] in p.stderr,
          "JS example: the label /v1/classify gives")
    check(out["job"]["status"] == "succeeded" and out["job"]["params"]["class"] == want["label"]
          and png_size(open(grid, "rb").read()) == (70, 70), "JS example: job run, grid saved")
    p = subprocess.run(["node", JS_CLIENT, f"http://127.0.0.1:{d.port}",
                        os.path.join(ROOT, "README.md")], capture_output=True, text=True,
                       timeout=60)
    check(p.returncode == 1 and "415" in p.stderr, f"JS example, not an image: exit 1 ({p.stderr})")


def main():
    jemd = jemtest.jemd_binary(ROOT)
    tmp = tempfile.mkdtemp(prefix="jemd-clients-")
    try:
        model = os.path.join(tmp, "clientnet.safetensors")
        jemtest.write_model(model, seed=4, name="clientnet")
        files = []
        for i, png in enumerate(jemtest.test_images(3, seed=9)):
            files.append(os.path.join(tmp, f"img{i}.png"))
            with open(files[-1], "wb") as f:
                f.write(png)
        key = "client-test-key-0123456789"
        keyfile = os.path.join(tmp, "keys")
        with open(keyfile, "w") as f:
            f.write(key + "\n")
        test_stdlib_only()
        d = jemtest.Daemon(jemd, model)
        keyd = jemtest.Daemon(jemd, model, "--api-key-file", keyfile)
        try:
            test_module(d, tmp, files)
            test_cli(d, keyd, key, tmp, files)
            test_js(d, tmp, files)
        finally:
            d.kill()
            keyd.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
