"""jemtest.py - helpers for the jemd integration tests (stdlib + numpy):
random model files, PNG encoding, starting the daemon, HTTP calls."""
import json
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
import zlib
import http.client

import numpy as np

ARCH_NAMES = None


def wrn_params(depth=10, widen=1, in_ch=1, k=10):
    """Canonical CCF parameter table (name, shape) of the JEM Wide-ResNet."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    out = [("f.conv1.weight", (16, in_ch, 3, 3)), ("f.conv1.bias", (16,))]
    cin = 16
    for L in range(1, 4):
        cout = widths[L]
        for i in range(n):
            stride = 1 if (L == 1 or i > 0) else 2
            out.append((f"f.layer{L}.{i}.conv1.weight", (cout, cin, 3, 3)))
            out.append((f"f.layer{L}.{i}.conv1.bias", (cout,)))
            out.append((f"f.layer{L}.{i}.conv2.weight", (cout, cout, 3, 3)))
            out.append((f"f.layer{L}.{i}.conv2.bias", (cout,)))
            if stride != 1 or cin != cout:
                out.append((f"f.layer{L}.{i}.shortcut.0.weight", (cout, cin, 1, 1)))
                out.append((f"f.layer{L}.{i}.shortcut.0.bias", (cout,)))
            cin = cout
    out.append(("class_output.weight", (k, 64 * widen)))
    out.append(("class_output.bias", (k,)))
    return out


# nats per bit of energy_complexity in the test model
COMPLEXITY_WEIGHT = 0.001


def write_model(path, seed=0, name="testnet", ood=True, k=10, in_ch=1, scale=1.0):
    """A random WRN-10-1 safetensors file with metadata (and fake OOD stats)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for pname, shape in wrn_params(10, 1, in_ch, k):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        bound = scale / np.sqrt(max(fan_in, 1))
        tensors[pname] = rng.uniform(-bound, bound, size=shape).astype("<f4")
    meta = {"arch": {"family": "wrn", "depth": 10, "widen": 1, "in_channels": in_ch,
                     "image_size": 32, "num_classes": k, "norm": "none", "leak": 0.2},
            "name": name,
            "classes": [f"class{i}" for i in range(k)],
            "temperature": 1.5,
            "preprocess": {"channels": in_ch, "resize": [28, 28], "pad": 2}}
    if ood:
        meta["ood"] = {
            "scores": {
                "energy": {"quantiles": list(np.linspace(-2.40, -2.20, 21)), "side": "high",
                           "side_nograd": "high"},
                "grad_norm": {"quantiles": list(np.linspace(0.0, 0.5, 21)), "side": "two-sided",
                              "side_nograd": "unused"},
                "max_softmax": {"quantiles": list(np.linspace(0.1, 0.2, 21)), "side": "unused",
                                "side_nograd": "two-sided"},
                "energy_complexity": {"quantiles": list(np.linspace(-6.0, -3.0, 21)),
                                      "side": "unused", "side_nograd": "unused"}},
            "complexity_weight": COMPLEXITY_WEIGHT,
            "tpr": 0.95, "rule": "test rule: energy high or grad_norm two-sided",
            "rule_nograd": "test no-grad rule: energy high or max_softmax two-sided"}
    header = {"__metadata__": {"jem": json.dumps(meta)}}
    off = 0
    blobs = []
    for pname, _ in wrn_params(10, 1, in_ch, k):
        b = tensors[pname].tobytes()
        header[pname] = {"dtype": "F32", "shape": list(tensors[pname].shape),
                         "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def png_bytes(arr, bit_depth=8, color_type=0, width=None, height=None, chunks_only=False):
    """Encodes a uint8 (H,W) grey or (H,W,3) RGB array as PNG."""
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    if arr.ndim == 3:
        color_type = 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2" if bit_depth == 16 else "u1").tobytes()
                   for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
            chunk(b"IEND", b""))


def png_header_only(w, h):
    """A PNG whose IHDR claims w x h, with a tiny IDAT."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) +
            chunk(b"IEND", b""))


def png_inflation_bomb(inflated=64 << 20):
    """A 1x1 PNG whose IDAT inflates to `inflated` bytes (the decoder's
    memory budget refuses it)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\0" * inflated, 9)) + chunk(b"IEND", b""))


def chunked_post(port, total, chunk=65536, path=b"/v1/classify", timeout=30):
    """POSTs at least `total` bytes as a chunked image/png body; returns all
    the server sent until it closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" % path)
    c = b"%x\r\n" % chunk + b"a" * chunk + b"\r\n"
    out, n = b"", 0
    try:
        while n < total:
            s.sendall(c)
            n += chunk
        s.sendall(b"0\r\n\r\n")
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except OSError as e:
        out += repr(e).encode()
    finally:
        s.close()
    return out


def test_images(n, seed=1, size=28):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        img = (127 + 120 * np.sin(xx * (0.2 + 0.05 * i) + yy * 0.1 * (i % 5))).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        out.append(png_bytes(img))
    return out


class Daemon:
    """Runs build/jemd on a free port (with --model unless model is None);
    collects stderr in a thread."""

    def __init__(self, binary, model, *args, env=None):
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        if env:
            e.update(env)
        self.proc = subprocess.Popen([binary, *(["--model", model] if model else []),
                                      "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        # an ASan build loading the shipped model (its replay buffer is
        # labelled at load) can take over 30 s on a loaded machine
        if not self._ready.wait(120 if "/asan/" in binary else 30):
            self.kill()
            raise RuntimeError("jemd did not start:\n" + "".join(self.lines[-30:]))
        if self.port is None:
            raise RuntimeError("jemd exited:\n" + "".join(self.lines[-30:]))

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            m = re.match(r"jemd: listening on http://\S+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    def log(self):
        return "".join(self.lines)

    def request(self, method, path, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data
        finally:
            c.close()

    def json(self, method, path, body=None, headers=None, timeout=30):
        st, h, data = self.request(method, path, body, headers, timeout)
        try:
            return st, h, json.loads(data) if data else None
        except ValueError:
            return st, h, data

    def raw(self, data, timeout=5.0, shut=True, read=True, port=None):
        """Sends raw bytes; returns whatever comes back before close/timeout.
        self.closed tells which of the two ended it."""
        s = socket.create_connection(("127.0.0.1", port or self.port), timeout=timeout)
        self.closed = False
        try:
            try:
                s.sendall(data)
                if shut:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may close first (limits); read what it sent
            if not read:
                return b""
            out = b""
            end = time.time() + timeout
            while time.time() < end:
                r, _, _ = select.select([s], [], [], max(0.0, end - time.time()))
                if not r:
                    break
                try:
                    d = s.recv(65536)
                except (ConnectionResetError, OSError):
                    self.closed = True
                    break
                if not d:
                    self.closed = True
                    break
                out += d
            return out
        finally:
            s.close()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Checks:
    """check(cond, what) for a test script: counts passes, prints each failure,
    and report() prints the summary line and gives the exit status."""

    def __init__(self, name):
        self.name, self.passed, self.failed, self.t0 = name, 0, [], time.time()

    def __call__(self, cond, what):
        if cond:
            self.passed += 1
        else:
            self.failed.append(what)
            print("FAIL:", what, flush=True)
        return cond

    def report(self):
        print(f"{self.name}: {self.passed} checks passed, {len(self.failed)} failed, "
              f"{time.time() - self.t0:.1f} s")
        return 1 if self.failed else 0


def metric_value(text, name, labels=None):
    """The sum of metric name's samples in /metrics text whose labels include
    labels (a dict); None when there is none."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        # greedy: route templates put braces inside label values
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        total += float(m.group(3))
        found = True
    return total if found else None


def jemd_binary(root, argv=None):
    """build/jemd (or --build DIR's) from a test script's command line."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    build = ap.parse_args(argv).build
    return os.path.join(build if os.path.isabs(build) else os.path.join(root, build), "jemd")
