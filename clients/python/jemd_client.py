#!/usr/bin/env python3
"""jemd_client.py - a small client for jemd (Python 3.8+, standard library only).

As a module:

    from jemd_client import Client
    c = Client("http://127.0.0.1:8080", api_key=None)
    [r] = c.classify(["shoe.png"])               # one result per file, in order
    print(r["class"], r["confidence"], r["ood"]["is_ood"])
    job = c.sample(n=16, steps=100, class_="Sneaker", seed=1)   # waits for the end
    c.save(job["result"]["grid_url"], "grid.png")
    out = c.infer("fmnist-jem", data, shape=[1, 1, 32, 32])     # Open Inference Protocol v2

From a shell:

    jemd_client.py [--url URL] [--api-key KEY] models
    jemd_client.py classify IMAGE... [--no-grad] [--top-k K] [--model NAME]
    jemd_client.py sample [--n N] [--steps S] [--class C] [--step-size X] [--seed S]
                          [--model NAME] [--out grid.png] [--npy samples.npy]
    jemd_client.py infer NPY [--model NAME]      # a float32 .npy [N, C, H, W]

Every command prints JSON (classify: one line per image).  Exit status 0, 1 when
jemd refused something (the message gives its status and error code), 2 for a
usage error.  JEMD_URL and JEMD_API_KEY are the defaults of --url and --api-key.
"""
import argparse
import ast
import json
import mimetypes
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

__all__ = ["Client", "JemdError", "read_npy"]


class JemdError(Exception):
    """An answer other than 2xx: status, error code (None on /v2) and message."""

    def __init__(self, status, code, message):
        super().__init__(f"{status} {code + ': ' if code else ''}{message}")
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, url="http://127.0.0.1:8080", api_key=None, timeout=60.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    # -- plumbing ------------------------------------------------------------

    def request(self, method, path, body=None, ctype=None, query=None, raw=False):
        """One call; JSON answers are decoded unless raw.  Raises JemdError."""
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                path += "?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        if self.api_key:
            req.add_header("Authorization", "Bearer " + self.api_key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                data = res.read()
                if raw or not res.headers.get("Content-Type", "").startswith("application/json"):
                    return data
                return json.loads(data)
        except urllib.error.HTTPError as e:
            data = e.read()
            try:
                err = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                raise JemdError(e.code, None, data[:200].decode("utf-8", "replace")) from None
            if isinstance(err, dict):
                raise JemdError(e.code, err.get("code"), err.get("message")) from None
            raise JemdError(e.code, None, str(err)) from None

    def save(self, path, out):
        """Writes a binary route's answer (grid.png, samples/K.png, samples.npy) to out."""
        data = self.request("GET", path, raw=True)
        with open(out, "wb") as f:
            f.write(data)
        return out

    # -- scoring -------------------------------------------------------------

    def models(self):
        return self.request("GET", "/v1/models")["models"]

    def classify(self, images, grad=True, top_k=None, tpr=None, model=None):
        """Scores image files (paths) or PNG/JPEG bytes; one result per image, in order."""
        blobs = []
        for im in images:
            if isinstance(im, (bytes, bytearray)):
                blobs.append(("image", bytes(im)))
            else:
                with open(im, "rb") as f:
                    blobs.append((os.path.basename(im), f.read()))
        query = {"grad": "true" if grad else "false", "top_k": top_k, "tpr": tpr, "model": model}
        if len(blobs) == 1:
            name, data = blobs[0]
            return [self.request("POST", "/v1/classify", data, _image_type(name, data), query)]
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--%s\r\nContent-Disposition: form-data; name=\"image%d\"; filename=\"%s\"\r\n"
            b"Content-Type: %s\r\n\r\n%s\r\n" % (boundary.encode(), i, _quote(name),
                                                  _image_type(name, data).encode(), data)
            for i, (name, data) in enumerate(blobs)) + b"--%s--\r\n" % boundary.encode()
        res = self.request("POST", "/v1/classify", body,
                           "multipart/form-data; boundary=" + boundary, query)
        return res["results"]

    def infer(self, model, data, shape, outputs=None, version=None):
        """Open Inference Protocol v2: data is the FP32 input, flat row-major (or
        nested lists) of shape [N, C, H, W].  Returns {output name: (shape, values)}."""
        req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(shape),
                           "data": list(data)}]}
        if outputs:
            req["outputs"] = [{"name": o} for o in outputs]
        path = "/v2/models/" + urllib.parse.quote(model, safe="")
        if version:
            path += "/versions/" + urllib.parse.quote(str(version), safe="")
        res = self.request("POST", path + "/infer", json.dumps(req).encode(), "application/json")
        return {o["name"]: (o["shape"], o["data"]) for o in res["outputs"]}

    # -- sample jobs -----------------------------------------------------------

    def start_sample(self, **params):
        """POST /v1/samples with the given fields (n, steps, class, ...); the job."""
        body = {k: v for k, v in params.items() if v is not None}
        return self.request("POST", "/v1/samples", json.dumps(body).encode(), "application/json")

    def job(self, job_id):
        return self.request("GET", "/v1/jobs/" + job_id)

    def wait(self, job, poll=0.25, timeout=600.0, progress=None):
        """Polls until the job ends; returns its last state.  progress(job) is
        called after every poll."""
        end = time.monotonic() + timeout
        while job["status"] in ("queued", "running"):
            if time.monotonic() > end:
                raise TimeoutError(f"job {job['id']} still {job['status']} after {timeout} s")
            time.sleep(poll)
            job = self.job(job["id"])
            if progress:
                progress(job)
        return job

    def sample(self, n=None, steps=None, class_=None, step_size=None, noise=None, seed=None,
               model=None, poll=0.25, timeout=600.0, progress=None):
        """Runs a job to the end; returns it (raises JemdError if it failed)."""
        job = self.start_sample(n=n, steps=steps, step_size=step_size, noise=noise, seed=seed,
                                model=model, **{"class": class_})
        job = self.wait(job, poll, timeout, progress)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise JemdError(200, err.get("reason", job["status"]),
                            f"job {job['id']} {job['status']}: {err.get('message', '')}")
        return job


def _image_type(name, data):
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _quote(name):
    return name.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_").encode()


def read_npy(path):
    """A little-endian float32 .npy file: (shape, flat list of floats)."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path}: not a .npy file")
        major = f.read(2)[0]
        hlen = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
        header = ast.literal_eval(f.read(hlen).decode("latin1"))
        if header["descr"] != "<f4" or header["fortran_order"]:
            raise ValueError(f"{path}: want little-endian float32 in C order, not {header['descr']}")
        shape = list(header["shape"])
        count = 1
        for d in shape:
            count *= d
        data = f.read(4 * count)
        if len(data) != 4 * count:
            raise ValueError(f"{path}: truncated")
        return shape, list(struct.unpack("<%df" % count, data))


# ---------------------------------------------------------------------------
# Command line

def main(argv=None):
    ap = argparse.ArgumentParser(prog="jemd_client.py", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("JEMD_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--api-key", default=os.environ.get("JEMD_API_KEY"))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP call")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models", help="the served models")
    p = sub.add_parser("classify", help="label and OOD scores of image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--no-grad", action="store_true", help="skip the gradient score")
    p.add_argument("--top-k", type=int)
    p.add_argument("--model")
    p = sub.add_parser("sample", help="run an SGLD job to the end, save its grid")
    p.add_argument("--n", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--class", dest="class_", help="class index or name")
    p.add_argument("--step-size", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--model")
    p.add_argument("--out", help="write the grid PNG here")
    p.add_argument("--npy", help="write the samples (.npy) here")
    p = sub.add_parser("infer", help="Open Inference Protocol v2 on a float32 .npy [N,C,H,W]")
    p.add_argument("npy")
    p.add_argument("--model", help="default: the first served model")
    a = ap.parse_args(argv)
    c = Client(a.url, a.api_key, a.timeout)
    try:
        if a.cmd == "models":
            print(json.dumps(c.models()))
        elif a.cmd == "classify":
            for path, r in zip(a.images, c.classify(a.images, grad=not a.no_grad,
                                                    top_k=a.top_k, model=a.model)):
                print(json.dumps({"file": path, **r}))
        elif a.cmd == "sample":
            cls = int(a.class_) if a.class_ is not None and a.class_.isdigit() else a.class_
            job = c.sample(n=a.n, steps=a.steps, class_=cls, step_size=a.step_size,
                           seed=a.seed, model=a.model,
                           progress=lambda j: print(f"{j['status']} {j['progress']['step']}/"
                                                    f"{j['progress']['steps']}",
                                                    file=sys.stderr))
            if a.out:
                c.save(job["result"]["grid_url"], a.out)
            if a.npy:
                c.save(job["result"]["npy_url"], a.npy)
            print(json.dumps(job))
        elif a.cmd == "infer":
            shape, data = read_npy(a.npy)
            model = a.model or c.models()[0]["name"]
            out = c.infer(model, data, shape)
            print(json.dumps({k: {"shape": s, "data": d} for k, (s, d) in out.items()}))
    except JemdError as e:
        print(f"jemd_client: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TimeoutError) as e:
        print(f"jemd_client: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
