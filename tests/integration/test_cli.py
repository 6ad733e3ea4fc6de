#!/usr/bin/python3
"""test_cli.py - runs build/jem end to end: init, info, score (PNG/JPEG/.npy/mixed
with bad files), usage errors, and sample determinism.

Usage: /usr/bin/python3 tests/integration/test_cli.py [--build DIR]   (binary: DIR/jem)
Exits non-zero when a check fails.  Needs only the standard library (numpy is
used when present to cross-check .npy files).
"""
import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = os.path.join(ROOT, "tests", "data", "images")

passed = 0
failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, file=sys.stderr)


def run(jem, *args, timeout=300):
    p = subprocess.run([jem] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def npy_bytes(shape, values):
    """A float32 .npy (v1) without numpy."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % dims
    total = (10 + len(hdr) + 1 + 63) // 64 * 64
    hdr = hdr + " " * (total - 10 - len(hdr) - 1) + "\n"
    return (b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() +
            struct.pack("<%df" % len(values), *values))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path, header, body):
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)


def add_meta(src, dst, extra, replay=None):
    """Copies a model file, merging `extra` into its jem metadata and optionally
    appending a replay_buffer tensor (list of floats, shape [N,1,32,32])."""
    header, body = read_safetensors(src)
    meta = json.loads(header["__metadata__"]["jem"])
    meta.update(extra)
    header["__metadata__"]["jem"] = json.dumps(meta)
    if replay is not None:
        n = len(replay) // (32 * 32)
        off = len(body)
        body += struct.pack("<%df" % len(replay), *replay)
        header["replay_buffer"] = {"dtype": "F32", "shape": [n, 1, 32, 32],
                                   "data_offsets": [off, len(body)]}
    write_safetensors(dst, header, body)


FIELDS = ["file", "index", "label", "class", "confidence", "probs", "logits", "energy",
          "grad_norm", "max_softmax", "energy_complexity", "mahalanobis"]


def lsexp(z):
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z))


def check_record(r, k, what, has_ood=False, grad=True):
    keys = FIELDS + (["ood"] if has_ood else [])
    check(list(r.keys()) == keys, "%s: fields %s" % (what, list(r.keys())))
    if list(r.keys())[:len(FIELDS)] != FIELDS:
        return
    check(len(r["probs"]) == k and len(r["logits"]) == k, what + ": K entries")
    check(abs(sum(r["probs"]) - 1) < 1e-5, what + ": probs sum to 1")
    check(r["label"] == max(range(k), key=lambda i: r["logits"][i]), what + ": label is argmax")
    check(abs(r["confidence"] - max(r["probs"])) < 1e-6, what + ": confidence")
    check(abs(r["energy"] + lsexp(r["logits"])) < 1e-4, what + ": energy = -logsumexp")
    ex = [math.exp(v - max(r["logits"])) for v in r["logits"]]
    check(abs(r["max_softmax"] - max(ex) / sum(ex)) < 1e-6, what + ": max_softmax")
    if grad:
        check(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0, what + ": grad_norm")
    else:
        check(r["grad_norm"] is None, what + ": grad_norm null with --no-grad")


def close(a, b, tol=1e-5):
    """Equal up to floating-point rounding (batch shapes change GEMM order)."""
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1, abs(y)) for x, y in zip(a, b))


def lines(out):
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    args = ap.parse_args()
    jem = os.path.abspath(os.path.join(args.build, "jem"))
    if not os.access(jem, os.X_OK):
        print("no binary at %s" % jem, file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="jem_cli_")
    try:
        test_all(jem, tmp)
        test_buffer(jem, tmp, os.path.join(tmp, "m.safetensors"))
        test_average(jem, tmp)
        test_shipped_ood(jem, tmp)
        test_readme_usage(jem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


def help_text(binary, *cmd):
    p = subprocess.run([binary, *cmd, "--help"], capture_output=True, text=True, timeout=60)
    return p.stdout


def test_readme_usage(jem):
    """The README's usage lines are --help's, and every option its commands use exists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    tool = text[text.index("## The `jem` tool"):]
    block = tool[tool.index("```\n") + 4:tool.index("```", tool.index("```\n") + 4)]
    usages = [l for l in block.splitlines() if l.startswith("jem ")]
    check(len(usages) >= 9, "README lists the jem commands (%d)" % len(usages))
    for line in usages:
        helped = help_text(jem, line.split()[1]).split("\n\n")[0]
        check(" ".join(helped.replace("usage:", "", 1).split()) == " ".join(line.split()),
              "README usage line == `%s --help`: %s" % (" ".join(line.split()[:2]), line[:60]))
    # commands in the README's code blocks: their options exist
    jemd = os.path.join(os.path.dirname(jem), "jemd")
    helps = {}
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S)).replace("\\\n", " ")
    for m in re.finditer(r"(?:build/|\./build/|^|\s)(jemd|jem (\w+))((?: [^#|>\n]*)?)", code, re.M):
        prog, sub = (jemd, ()) if m.group(1) == "jemd" else (jem, (m.group(2),))
        if sub and sub[0] not in ("info", "score", "sample", "init", "train", "eval",
                                   "calibrate", "buffer", "average"):
            continue
        key = (prog, sub)
        if key not in helps:
            helps[key] = help_text(prog, *sub)
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(3)):
            check(opt in helps[key], "README: `%s %s` has no option %s"
                  % (os.path.basename(prog), " ".join(sub), opt))
    # the Configuration table: jemd --help's flags, variables, defaults and meanings
    # (the data directory in --model's text follows the PREFIX jemd was built with)
    jh = re.sub(r"/\S*/share/jemd/models/", "PREFIX/share/jemd/models/", help_text(jemd))
    helped = {m.group(1): (m.group(2).strip(), m.group(4), m.group(5), m.group(3).strip())
              for m in re.finditer(r"^  (--[a-z-]+)((?: [A-Z]+)?)\s+(.*)\n\s+"
                                   r"\[(JEMD_[A-Z0-9_]+); default: (.*)\]$", jh, re.M)}
    rows = {m.group(1): (m.group(2).strip(), m.group(3), m.group(4).strip(), m.group(5).strip())
            for m in re.finditer(r"^\| `(--[a-z-]+)((?: [A-Z]+)?)` \| `(JEMD_[A-Z0-9_]+)` \| "
                                 r"([^|]*) \| (.*) \|$",
                                 re.sub(r"/\S*/share/jemd/models/", "PREFIX/share/jemd/models/",
                                        text), re.M)}
    check(len(helped) >= 30 and set(rows) == set(helped),
          "README's configuration table has jemd's flags (only in help: %s; only in README: %s)"
          % (sorted(set(helped) - set(rows)), sorted(set(rows) - set(helped))))
    for flag in sorted(set(rows) & set(helped)):
        check(rows[flag] == helped[flag], "README table row %s == jemd --help: %s vs %s"
              % (flag, rows[flag], helped[flag]))
    args = re.search(r"make run ARGS='([^']*)'", text)
    for opt in re.findall(r"--[a-z-]+", args.group(1) if args else ""):
        check(opt in help_text(jemd), "README: make run ARGS: jemd has %s" % opt)


def digit_pngs(tmp):
    """Printed digits 0-9 framed like MNIST (white on black, fit to 20x20 in 28x28):
    thin strokes on black, the shift the shipped model's rule must catch."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 80)
    paths = []
    for d in "0123456789":
        big = Image.new("L", (120, 120), 0)
        ImageDraw.Draw(big).text((20, 5), d, fill=255, font=font)
        crop = big.crop(big.getbbox())
        w, h = crop.size
        s = 20 / max(w, h)
        crop = crop.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
        out = Image.new("L", (28, 28), 0)
        out.paste(crop, ((28 - crop.size[0]) // 2, (28 - crop.size[1]) // 2))
        paths.append(os.path.join(tmp, "digit%s.png" % d))
        out.save(paths[-1])
    return paths


def test_shipped_ood(jem, tmp):
    """The shipped model accepts a Fashion-MNIST test image and flags every printed
    digit, with and without the gradient (its rules use energy_complexity)."""
    model = os.path.join(ROOT, "models", "fmnist-jem.safetensors")
    digits = digit_pngs(tmp)
    fm = os.path.join(ROOT, "tests", "data", "images", "fmnist0.png")
    for extra in ([], ["--no-grad"]):
        rc, out, err = run(jem, "score", model, fm, *digits, *extra)
        r = lines(out)
        check(rc == 0 and len(r) == 11, "shipped model scores 11 images %s: %s" % (extra, err))
        if len(r) != 11:
            continue
        check(r[0]["ood"]["is_ood"] is False, "shipped model accepts fmnist0.png %s" % extra)
        flagged = [x["ood"]["is_ood"] for x in r[1:]]
        check(all(f is True for f in flagged),
              "shipped model flags every printed digit %s: %s" % (extra, flagged))
        check(all(x["energy_complexity"] is not None and
                  x["energy_complexity"] > r[0]["energy_complexity"] for x in r[1:]),
              "digits have a higher energy_complexity than the Fashion-MNIST image")
        check("energy_complexity" in r[1]["ood"]["rule"], "the rule applied uses energy_complexity")


def test_all(jem, tmp):
    model = os.path.join(tmp, "m.safetensors")
    img = lambda n: os.path.join(IMAGES, n)

    # --- usage errors and help -------------------------------------------
    for cmd in ["info", "score", "sample", "init"]:
        rc, out, _ = run(jem, cmd, "--help")
        check(rc == 0 and "usage: jem " + cmd in out, cmd + " --help")
    check(run(jem)[0] == 2, "no command -> 2")
    check(run(jem, "frobnicate")[0] == 2, "unknown command -> 2")
    check(run(jem, "info")[0] == 2, "info without model -> 2")
    check(run(jem, "info", "--bogus", "x")[0] == 2, "unknown option -> 2")
    check(run(jem, "score", model)[0] == 2, "score without input -> 2")
    check(run(jem, "init", model)[0] == 2, "init without classes -> 2")
    check(run(jem, "init", model, "--classes", "3", "--depth", "11")[0] == 2, "bad depth -> 2")
    check(run(jem, "init", model, "--classes", "x")[0] == 2, "non-numeric -> 2")
    check(run(jem, "init", model, "--classes", "3", "--class-names", "a,b")[0] == 2,
          "classes vs names -> 2")
    check(run(jem, "sample", model, "--n", "0")[0] == 2, "sample --n 0 -> 2")
    check(run(jem, "sample", model, "--init", "magic")[0] == 2, "sample --init magic -> 2")
    check(run(jem, "score", model, img("rgb.png"), "--batch", "0")[0] == 2, "score --batch 0 -> 2")
    check(run(jem, "score", model, img("rgb.png"), "--tpr", "1.5")[0] == 2, "score --tpr 1.5 -> 2")

    # --- init + info -------------------------------------------------------
    names = "tshirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot"
    rc, out, err = run(jem, "init", model, "--class-names", names, "--seed", "5",
                       "--name", "tiny-test")
    check(rc == 0, "init: " + err)
    check(run(jem, "info", os.path.join(tmp, "missing.safetensors"))[0] == 1, "info missing -> 1")
    rc, out, err = run(jem, "info", model, "--json")
    check(rc == 0, "info --json: " + err)
    info = json.loads(out)
    check(info["name"] == "tiny-test", "info name")
    check(info["arch"]["depth"] == 10 and info["arch"]["widen"] == 1, "info arch")
    check(info["parameters"] == 77418, "WRN-10-1 parameter count %s" % info["parameters"])
    check(info["classes"] == names.split(","), "info classes")
    check(info["temperature"] == 1.0, "info temperature")
    check(info["ood"]["present"] is False and info["replay_buffer"]["present"] is False,
          "info ood/replay absent")
    check(info["provenance"]["seed"] == 5, "info provenance")
    check(isinstance(info["blas"]["core"], str) and info["blas"]["core"], "info blas core")
    rc, out, _ = run(jem, "info", model)
    check(rc == 0 and "WRN-10-1" in out and "77418" in out and "blas:" in out, "info text")
    # same seed -> identical file; another seed -> different weights
    m2, m3 = os.path.join(tmp, "m2.safetensors"), os.path.join(tmp, "m3.safetensors")
    run(jem, "init", m2, "--class-names", names, "--seed", "5", "--name", "tiny-test")
    run(jem, "init", m3, "--class-names", names, "--seed", "6", "--name", "tiny-test")
    with open(model, "rb") as a, open(m2, "rb") as b, open(m3, "rb") as c:
        ba, bb, bc = a.read(), b.read(), c.read()
    check(ba == bb, "init is deterministic")
    check(ba != bc, "init seed matters")

    # --- output that cannot be written, odd names, odd sizes, late usage errors
    with open("/dev/full", "w") as full:
        p = subprocess.run([jem, "score", model, img("rgb.png")], stdout=full,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    check(p.returncode == 1 and "writing the output failed" in p.stderr,
          "score > /dev/full -> 1 with a message (%d: %s)" % (p.returncode, p.stderr.strip()))
    odd = os.path.join(os.fsencode(tmp), b"bad\xffname.png")
    shutil.copy(img("rgb.png"), odd)
    rc, out, err = run(jem, "score", model, os.fsdecode(odd), "--no-grad")
    rec = lines(out)
    check(rc == 0 and len(rec) == 1 and rec[0].get("file", "").endswith("bad\ufffdname.png"),
          "a file name that is not UTF-8 keeps its 'file' key (U+FFFD): %s" % out[:60])
    wide = os.path.join(tmp, "wide.png")
    raw = b"\x00" + bytes([200]) * 9000
    chunk = lambda t, d: (struct.pack(">I", len(d)) + t + d +
                          struct.pack(">I", zlib.crc32(t + d) & 0xffffffff))
    with open(wide, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 1, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    rc, out, err = run(jem, "score", model, wide, "--no-grad")
    check(rc == 0 and len(lines(out)) == 1, "a 9000x1 image is scored, not refused: " + err)
    for args, what, says in (
            (["train", "--run-dir", tmp, "--bogus"], "unknown option given last", "unknown option"),
            (["eval", model, "--bogus"], "eval: unknown option given last", "unknown option"),
            (["train", "--run-dir", tmp, "--depth", "11"], "train --depth 11", "6n+4"),
            (["init", model + ".x", "--class-names", "a,a"], "repeated class name", "repeated")):
        rc, _, err = run(jem, *args)
        check(rc == 2 and "Try 'jem" in err and says in err,
              "%s -> usage error 2 naming it (%d: %s)" % (what, rc, err.strip()[:80]))
    # a newcomer's slips: arguments swapped, a text file as the model
    for args in (["score", img("fmnist0.png"), model], ["info", os.path.join(ROOT, "README.md")]):
        rc, out, err = run(jem, *args)
        check(rc == 1 and "not a safetensors model file" in err and "exceeds" not in err,
              "jem %s %s -> 'not a safetensors model file' (%d: %s)"
              % (args[0], os.path.basename(args[1]), rc, err.strip()[:120]))

    # --- score ---------------------------------------------------------------
    files = ["fmnist0.png", "rgb.png", "baseline.jpg", "progressive.jpg", "grey16.png",
             "palette_trns.png", "interlaced.png", "large.png", "tiny.png"]
    rc, out, err = run(jem, "score", model, *[img(f) for f in files])
    check(rc == 0, "score images: " + err)
    recs = lines(out)
    check([r.get("file") for r in recs] == [img(f) for f in files], "score: input order")
    for r in recs:
        check_record(r, 10, "score " + os.path.basename(r["file"]))
    # by content, not extension: a PNG named .jpg and a JPEG named .dat
    shutil.copy(img("rgb.png"), os.path.join(tmp, "png_named.jpg"))
    shutil.copy(img("baseline.jpg"), os.path.join(tmp, "jpeg.dat"))
    rc, out2, err = run(jem, "score", model, os.path.join(tmp, "png_named.jpg"),
                        os.path.join(tmp, "jpeg.dat"))
    r2 = lines(out2)
    check(rc == 0 and len(r2) == 2, "score sniffs content: " + err)
    if len(r2) == 2:
        check(close(r2[0]["logits"], recs[1]["logits"]), "same PNG -> same logits")
        check(close(r2[1]["logits"], recs[2]["logits"]), "same JPEG -> same logits")

    # batching does not change results (batch 1 vs 4 vs default)
    rc, out_b1, _ = run(jem, "score", model, "--batch", "1", *[img(f) for f in files])
    rc4, out_b4, _ = run(jem, "score", model, "--batch", "4", *[img(f) for f in files])
    for a, b in zip(lines(out_b1), recs):
        check(close(a["logits"], b["logits"]), "batch 1 vs 64: " + os.path.basename(a["file"]))
    check(len(lines(out_b4)) == len(files) and rc == 0 and rc4 == 0, "batch 4")

    # --no-grad
    rc, out, _ = run(jem, "score", model, "--no-grad", img("rgb.png"))
    r = lines(out)
    check(rc == 0 and len(r) == 1, "score --no-grad")
    if r:
        check_record(r[0], 10, "no-grad", grad=False)
        check(close(r[0]["logits"], recs[1]["logits"]), "no-grad logits equal")

    # .npy: [N,C,H,W] and [C,H,W]; values made from a simple formula
    vals = [((i * 37) % 200) / 100.0 - 1 for i in range(3 * 1024)]
    npy4 = os.path.join(tmp, "x4.npy")
    with open(npy4, "wb") as f:
        f.write(npy_bytes((3, 1, 32, 32), vals))
    npy3 = os.path.join(tmp, "x3.npy")
    with open(npy3, "wb") as f:
        f.write(npy_bytes((1, 32, 32), vals[1024:2048]))
    rc, out, err = run(jem, "score", model, npy4, npy3)
    r = lines(out)
    check(rc == 0 and len(r) == 4, "score npy: " + err)
    if len(r) == 4:
        check([x["index"] for x in r] == [0, 1, 2, 0], "npy indices")
        check(close(r[3]["logits"], r[1]["logits"]), "[C,H,W] == row 1 of [N,C,H,W]")
        for x in r:
            check_record(x, 10, "npy")
    # mixed good and bad inputs: bad ones reported, the rest scored, exit 1
    bad_shape = os.path.join(tmp, "bad_shape.npy")
    with open(bad_shape, "wb") as f:
        f.write(npy_bytes((3, 32, 32), [0.0] * 3072))
    nan_npy = os.path.join(tmp, "nan.npy")
    with open(nan_npy, "wb") as f:
        f.write(npy_bytes((1, 32, 32), [float("nan")] + [0.0] * 1023))
    gif = os.path.join(tmp, "fake.png")
    with open(gif, "wb") as f:
        f.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    trunc = os.path.join(tmp, "trunc.png")
    with open(img("rgb.png"), "rb") as f:
        data = f.read()
    with open(trunc, "wb") as f:
        f.write(data[:len(data) // 2])
    empty = os.path.join(tmp, "empty.jpg")
    open(empty, "wb").close()
    missing = os.path.join(tmp, "nope.png")
    inputs = [img("rgb.png"), gif, bad_shape, img("fmnist0.png"), trunc, nan_npy, empty,
              missing, npy3, tmp]
    rc, out, err = run(jem, "score", model, *inputs)
    r = lines(out)
    check(rc == 1, "mixed inputs -> exit 1 (got %d)" % rc)
    check([x["file"] for x in r] == [img("rgb.png"), img("fmnist0.png"), npy3],
          "good inputs still scored in order: %s" % [x["file"] for x in r])
    for bad in [gif, bad_shape, trunc, nan_npy, empty, missing, tmp]:
        check(bad in err, "error names %s" % os.path.basename(bad))
    check("GIF" in err, "GIF named as such")
    check("(3, 32, 32)" in err and "(1, 32, 32)" in err, "shape error explains")
    check(len(err.strip().splitlines()) == 7, "one error line per bad input:\n" + err)

    # --- a model with preprocessing, OOD statistics and a replay buffer -----
    q = [i / 10.0 for i in range(11)]
    ood = {"scores": {"energy": {"quantiles": [-3 + 0.1 * i for i in range(11)], "side": "high"},
                      "grad_norm": {"quantiles": [0.001 * i for i in range(11)],
                                    "side": "two-sided"},
                      "max_softmax": {"quantiles": q, "side": "unused"}},
           "tpr": 0.9, "rule": "test rule"}
    pre = {"channels": 1, "resize": [28, 28], "pad": 2, "pad_value": 0.0, "range": [-1, 1]}
    replay = [((i * 13) % 100) / 50.0 - 1 for i in range(4 * 1024)]
    model2 = os.path.join(tmp, "ood.safetensors")
    add_meta(model, model2, {"ood": ood, "preprocess": pre, "temperature": 2.0}, replay)
    rc, out, err = run(jem, "info", model2, "--json")
    check(rc == 0, "info ood model: " + err)
    if rc == 0:
        info = json.loads(out)
        check(info["ood"]["present"] is True and info["ood"]["tpr"] == 0.9, "info ood")
        check(info["replay_buffer"] == {"present": True, "size": 4}, "info replay")
        check(info["preprocess"]["resize"] == [28, 28] and info["preprocess"]["pad"] == 2,
              "info preprocess")
        check(info["parameters"] == 77418, "replay buffer not counted as parameters")
    rc, out, err = run(jem, "score", model2, img("fmnist0.png"), img("rgb.png"))
    r = lines(out)
    check(rc == 0 and len(r) == 2, "score with ood: " + err)
    for x in r:
        check_record(x, 10, "ood model", has_ood=True)
        o = x.get("ood", {})
        check(isinstance(o.get("is_ood"), bool) and o.get("tpr") == 0.9 and
              o.get("rule") == "test rule", "ood verdict fields %s" % o)
        sc = o.get("scores", {})
        check(sorted(sc) == ["energy", "energy_complexity", "grad_norm", "mahalanobis",
                             "max_softmax"], "ood score names")
        check(x["mahalanobis"] is None and sc["mahalanobis"]["value"] is None,
              "mahalanobis is null without the model's feature Gaussian")
        check(x["energy_complexity"] is None and sc["energy_complexity"]["value"] is None,
              "energy_complexity is null without the model's complexity_weight")
        check(abs(sc["energy"]["value"] - x["energy"]) < 1e-6, "ood energy value")
        check(0 <= sc["energy"]["percentile"] <= 1, "ood percentile in [0,1]")
        # temperature 2: probs = softmax(logits / 2)
        z = [v / 2 for v in x["logits"]]
        ez = [math.exp(v - max(z)) for v in z]
        check(abs(x["confidence"] - max(ez) / sum(ez)) < 1e-6, "tempered confidence")
    rc, out, _ = run(jem, "score", model2, "--tpr", "0.5", img("rgb.png"))
    r = lines(out)
    check(rc == 0 and r and r[0]["ood"]["tpr"] == 0.5, "--tpr overrides")

    # --- sample ----------------------------------------------------------------
    a_png, b_png, c_png = (os.path.join(tmp, n) for n in ("a.png", "b.png", "c.png"))
    a_npy = os.path.join(tmp, "a.npy")
    rc, out_a, err = run(jem, "sample", model, "--n", "5", "--steps", "10", "--seed", "42",
                         "--out", a_png, "--npy", a_npy)
    check(rc == 0, "sample: " + err)
    rc, out_b, _ = run(jem, "sample", model, "--n", "5", "--steps", "10", "--seed", "42",
                       "--out", b_png)
    rc2, out_c, _ = run(jem, "sample", model, "--n", "5", "--steps", "10", "--seed", "43",
                        "--out", c_png)
    with open(a_png, "rb") as f:
        pa = f.read()
    with open(b_png, "rb") as f:
        pb = f.read()
    with open(c_png, "rb") as f:
        pc = f.read()
    check(pa == pb, "sample: same seed -> identical PNG bytes")
    # an output that cannot be written fails before the sampling (which would take
    # minutes on a real model), and leaves nothing behind
    for flag in ("--out", "--npy"):
        t0 = time.time()
        rc, out, err = run(jem, "sample", model, "--n", "64", "--steps", "100000", flag,
                           "/nonexistent/x.png")
        check(rc == 1 and "cannot write '/nonexistent/x.png'" in err and not out and
              time.time() - t0 < 10, "sample %s /nonexistent/x.png fails at once (%d, %.1f s: %s)"
              % (flag, rc, time.time() - t0, err.strip()))
    fresh = os.path.join(tmp, "fresh.png")
    rc, _, _ = run(jem, "sample", model, "--n", "1", "--steps", "1", "--out", fresh,
                   "--npy", "/nonexistent/x.npy")
    check(rc == 1 and not os.path.exists(fresh),
          "the writability check of a good --out leaves no file when --npy is bad")
    rc, _, _ = run(jem, "sample", model, "--n", "1", "--steps", "1", "--npy", c_png + ".npy",
                   "--out", os.path.join(tmp, "nodir", "probe.png"))
    check(rc == 1 and not os.path.exists(c_png + ".npy"),
          "a bad --out with a good --npy writes neither")
    check(pa != pc, "sample: different seed -> different PNG")
    check(out_a == out_b and out_a != out_c, "sample JSON deterministic")
    check(pa[:8] == b"\x89PNG\r\n\x1a\n", "sample writes a PNG")
    w, h = struct.unpack(">II", pa[16:24])
    check((w, h) == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2), "grid 3 cols x 2 rows: %dx%d" % (w, h))
    sa = lines(out_a)
    check(len(sa) == 5 and [s["index"] for s in sa] == list(range(5)), "sample lines")
    for s in sa:
        check(list(s.keys()) == ["index", "energy", "label", "class", "confidence"],
              "sample fields %s" % list(s.keys()))
        check(s["class"] == names.split(",")[s["label"]], "sample class name")
    # the .npy holds the samples: scoring it gives the printed energies
    rc, out, err = run(jem, "score", model, "--no-grad", a_npy)
    r = lines(out)
    check(rc == 0 and len(r) == 5, "score sample npy: " + err)
    for x, s in zip(r, sa):
        check(abs(x["energy"] - s["energy"]) < 1e-5, "sample energy matches score")
    # chain independence: the first 2 of 5 chains equal a 2-chain run
    rc, out2, _ = run(jem, "sample", model, "--n", "2", "--steps", "10", "--seed", "42")
    s2 = lines(out2)
    check(len(s2) == 2 and all(x["label"] == y["label"] and close([x["energy"]], [y["energy"]], 1e-4)
                                for x, y in zip(s2, sa[:2])), "chain i depends only on (seed, i)")
    # class-conditional by name and index give the same chains
    rc1, o1, _ = run(jem, "sample", model, "--n", "2", "--steps", "3", "--seed", "1",
                     "--class", "dress")
    rc2, o2, _ = run(jem, "sample", model, "--n", "2", "--steps", "3", "--seed", "1",
                     "--class", "3")
    check(rc1 == 0 and o1 == o2, "class by name == by index")
    check(run(jem, "sample", model, "--class", "unicorn", "--seed", "1")[0] == 2,
          "unknown class -> 2")
    check(run(jem, "sample", model, "--init", "buffer", "--n", "1", "--steps", "1",
              "--seed", "1")[0] == 1, "--init buffer without a buffer -> 1")
    # the replay-buffer model samples from its buffer by default (steps 0:
    # the samples are buffer images or, with probability 0.05, noise)
    d_npy = os.path.join(tmp, "d.npy")
    rc, out, err = run(jem, "sample", model2, "--n", "8", "--steps", "0", "--seed", "9",
                       "--npy", d_npy, "--no-clamp")
    check(rc == 0, "sample from buffer: " + err)
    with open(d_npy, "rb") as f:
        raw = f.read()
    floats = struct.unpack("<%df" % (8 * 1024), raw[-8 * 1024 * 4:])
    rows = [tuple(floats[i * 1024:(i + 1) * 1024]) for i in range(8)]
    buf_rows = [tuple(struct.unpack("<1024f", struct.pack("<1024f", *replay[i * 1024:(i + 1) * 1024])))
                for i in range(4)]
    from_buf = sum(1 for r_ in rows if r_ in buf_rows)
    check(from_buf >= 6, "buffer init: %d of 8 chains start from buffer images" % from_buf)
    rc, out_n, _ = run(jem, "sample", model2, "--n", "8", "--steps", "0", "--seed", "9",
                       "--init", "noise", "--npy", d_npy)
    with open(d_npy, "rb") as f:
        raw = f.read()
    floats = struct.unpack("<%df" % (8 * 1024), raw[-8 * 1024 * 4:])
    check(all(-1 <= v <= 1 for v in floats) and
          not any(tuple(floats[i * 1024:(i + 1) * 1024]) in buf_rows for i in range(8)),
          "noise init ignores the buffer")
    # --no-clamp vs --clamp with a big step: clamped samples stay in [-1,1]
    rc, _, _ = run(jem, "sample", model, "--n", "2", "--steps", "3", "--seed", "1",
                   "--step-size", "1000", "--clamp", "--npy", d_npy)
    with open(d_npy, "rb") as f:
        raw = f.read()
    floats = struct.unpack("<%df" % (2 * 1024), raw[-2 * 1024 * 4:])
    check(rc == 0 and all(-1 <= v <= 1 for v in floats), "--clamp keeps [-1,1]")
    # unwritable output -> 1
    check(run(jem, "sample", model, "--n", "1", "--steps", "1", "--seed", "1", "--out",
              os.path.join(tmp, "no", "dir.png"))[0] == 1, "unwritable --out -> 1")


def idx_files(tmp, n, classes):
    """Raw (not gzipped) IDX images [n,28,28] and labels i % classes."""
    ip, lp = os.path.join(tmp, "imgs.idx"), os.path.join(tmp, "labels.idx")
    with open(ip, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28))
        f.write(bytes((i * 7 + j * 3) % 256 for i in range(n) for j in range(784)))
    with open(lp, "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + bytes(i % classes for i in range(n)))
    return ip, lp


def test_buffer(jem, tmp, model):
    """`jem buffer`: per-class Gaussian draws as the replay buffer; class-
    conditional chains then start from buffer images of their class."""
    rc, out, _ = run(jem, "buffer", "--help")
    check(rc == 0 and "usage: jem buffer" in out, "buffer --help")
    out_m = os.path.join(tmp, "buf.safetensors")
    check(run(jem, "buffer")[0] == 2, "buffer without model -> 2")
    check(run(jem, "buffer", model, "--size", "-1")[0] == 2, "buffer --size -1 -> 2")
    check(run(jem, "buffer", model, "--size", "70000")[0] == 2, "buffer --size 70000 -> 2")
    check(run(jem, "buffer", model, "--seed", "x")[0] == 2, "buffer --seed x -> 2")
    check(run(jem, "buffer", model, "--train-images", "a")[0] == 2, "images without labels -> 2")
    rc, _, err = run(jem, "buffer", os.path.join(tmp, "missing.safetensors"), "--out", out_m)
    check(rc == 1 and "missing" in err, "buffer: missing model -> 1")
    ip, lp = idx_files(tmp, 60, 3)
    rc, _, err = run(jem, "buffer", model, "--train-images", ip, "--train-labels", lp,
                     "--out", out_m)
    check(rc == 1 and "3 classes" in err and not os.path.exists(out_m),
          "buffer: 3-class data for a 10-class model -> 1, nothing written: " + err)
    # from other IDX files: 10 classes of 20 images each
    ip, lp = idx_files(tmp, 200, 10)
    rc, _, err = run(jem, "buffer", model, "--train-images", ip, "--train-labels", lp,
                     "--size", "30", "--seed", "4", "--out", out_m)
    check(rc == 0, "buffer from IDX files: " + err)
    # from Fashion-MNIST (the default data), deterministic per seed
    rc, _, err = run(jem, "buffer", model, "--size", "40", "--seed", "4", "--out", out_m)
    check(rc == 0, "buffer from Fashion-MNIST: " + err)
    out_m2 = os.path.join(tmp, "buf2.safetensors")
    run(jem, "buffer", model, "--size", "40", "--seed", "4", "--out", out_m2)
    with open(out_m, "rb") as a, open(out_m2, "rb") as b:
        check(a.read() == b.read(), "buffer: same seed -> identical file")
    rc, out, err = run(jem, "info", out_m, "--json")
    info = json.loads(out) if rc == 0 else {}
    check(info.get("replay_buffer") == {"present": True, "size": 40}, "buffer: 40 images")
    check(info.get("provenance", {}).get("replay_buffer", {}).get("init") == "gaussian",
          "buffer: provenance.replay_buffer")
    header, body = read_safetensors(out_m)
    a, b = header["replay_buffer"]["data_offsets"]
    vals = struct.unpack("<%df" % ((b - a) // 4), body[a:b])
    check(all(-1 <= v <= 1 for v in vals), "buffer images in [-1,1]")
    rows = [tuple(vals[i * 1024:(i + 1) * 1024]) for i in range(40)]
    # the model's own labels of the buffer images
    npy = os.path.join(tmp, "buf.npy")
    with open(npy, "wb") as f:
        f.write(npy_bytes((40, 1, 32, 32), vals))
    rc, out, err = run(jem, "score", out_m, npy, "--no-grad")
    labels = [r["label"] for r in lines(out)] if rc == 0 else []
    check(len(labels) == 40, "score the buffer: " + err)
    classes = sorted(set(labels))
    check(len(classes) >= 2, "buffer images fall in several classes: %s" % classes)
    for c in classes[:3]:
        rc, _, err = run(jem, "sample", out_m, "--n", "12", "--steps", "0", "--seed", "2",
                         "--class", str(c), "--npy", npy)
        with open(npy, "rb") as f:
            raw = f.read()
        got = struct.unpack("<%df" % (12 * 1024), raw[-12 * 1024 * 4:])
        starts = [rows.index(r) if r in rows else -1
                  for r in (tuple(got[i * 1024:(i + 1) * 1024]) for i in range(12))]
        from_buf = [k for k in starts if k >= 0]
        check(rc == 0 and len(from_buf) >= 9 and all(labels[k] == c for k in from_buf),
              "class %d chains start from buffer images of class %d: %s" % (c, c, starts))
    # --size 0 removes the buffer
    rc, _, err = run(jem, "buffer", out_m, "--size", "0")
    rc2, out, _ = run(jem, "info", out_m, "--json")
    check(rc == 0 and json.loads(out)["replay_buffer"]["present"] is False,
          "buffer --size 0 removes it: " + err)


def tensors(path):
    """name -> float32 values of every weight tensor (no replay buffer)"""
    header, body = read_safetensors(path)
    return {k: struct.unpack("<%df" % ((v["data_offsets"][1] - v["data_offsets"][0]) // 4),
                             body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k not in ("__metadata__", "replay_buffer")}


def test_average(jem, tmp):
    """`jem average`: the element-wise mean of same-architecture models."""
    rc, out, _ = run(jem, "average", "--help")
    check(rc == 0 and "usage: jem average" in out, "average --help")
    paths = [os.path.join(tmp, "avg%d.safetensors" % i) for i in range(3)]
    for i, p in enumerate(paths):
        run(jem, "init", p, "--classes", "3", "--seed", str(i + 1))
    other = os.path.join(tmp, "avg_wide.safetensors")
    run(jem, "init", other, "--classes", "3", "--widen", "2")
    named = os.path.join(tmp, "avg_named.safetensors")
    run(jem, "init", named, "--class-names", "a,b,c")
    out_m = os.path.join(tmp, "avg_out.safetensors")
    check(run(jem, "average", paths[0], "--out", out_m)[0] == 2, "average of one model -> 2")
    check(run(jem, "average", paths[0], paths[1])[0] == 2, "average without --out -> 2")
    rc, _, err = run(jem, "average", paths[0], other, "--out", out_m)
    check(rc == 1 and "differ" in err and not os.path.exists(out_m),
          "average: other architecture -> 1, nothing written: " + err)
    rc, _, err = run(jem, "average", paths[0], named, "--out", out_m)
    check(rc == 1 and "differ" in err, "average: other class names -> 1")
    rc, _, err = run(jem, "average", paths[0], os.path.join(tmp, "missing.safetensors"),
                     "--out", out_m)
    check(rc == 1 and "missing" in err, "average: missing model -> 1")
    # a calibrated-looking first model: its temperature and OOD statistics go
    first = os.path.join(tmp, "avg_first.safetensors")
    shipped, _ = read_safetensors(os.path.join(ROOT, "models", "fmnist-jem.safetensors"))
    ood = json.loads(shipped["__metadata__"]["jem"])["ood"]
    ood["scores"].pop("mahalanobis", None)  # its tensors stay with the shipped model
    add_meta(paths[0], first, {"temperature": 0.5, "ood": ood})
    rc, out, _ = run(jem, "info", first, "--json")
    check(rc == 0 and json.loads(out)["ood"]["present"], "fixture: first model has OOD statistics")
    rc, _, err = run(jem, "average", first, paths[1], paths[2], "--out", out_m)
    check(rc == 0, "average of 3 models: " + err)
    # nor does the shipped model's feature Gaussian
    avg_s = os.path.join(tmp, "avg_shipped.safetensors")
    rc, _, err = run(jem, "average", os.path.join(ROOT, "models", "fmnist-jem.safetensors"),
                     os.path.join(ROOT, "models", "fmnist-baseline.safetensors"), "--out", avg_s)
    hdr, _ = read_safetensors(avg_s) if rc == 0 else ({}, b"")
    check(rc == 0 and "ood.feature_mean" not in hdr and "ood.feature_whitener" not in hdr,
          "average drops the first model's feature Gaussian: " + err)
    ins = [tensors(p) for p in paths]
    got = tensors(out_m)
    worst = max(abs(g - (a + b + c) / 3)
                for k in got for g, a, b, c in zip(got[k], ins[0][k], ins[1][k], ins[2][k]))
    check(set(got) == set(ins[0]) and worst < 1e-6, "average = mean of the inputs (%.2g)" % worst)
    rc, out, _ = run(jem, "info", out_m, "--json")
    info = json.loads(out) if rc == 0 else {}
    check(info.get("temperature") == 1 and not info.get("ood", {}).get("present"),
          "average: temperature 1, no OOD statistics")
    check([e["path"] for e in info.get("provenance", {}).get("averaged_from", [])]
          == [first] + paths[1:], "average: provenance.averaged_from lists the inputs")
    # --weights: a weighted mean (an interpolation of two models)
    for bad in ("1", "1,2,3", "1,-1", "0,0", "1,x", "1,", ",1", "1,nan", "1,inf", "1;1"):
        rc, _, err = run(jem, "average", paths[0], paths[1], "--weights", bad, "--out", out_m)
        check(rc == 2 and "--weights" in err, "average --weights %r -> 2: %s" % (bad, err.strip()))
    rc, _, err = run(jem, "average", paths[0], paths[1], "--weights", "3,1", "--out", out_m)
    check(rc == 0 and "weighted mean" in err, "average --weights 3,1: " + err)
    got = tensors(out_m)
    worst = max(abs(g - (0.75 * a + 0.25 * b))
                for k in got for g, a, b in zip(got[k], ins[0][k], ins[1][k]))
    check(worst < 1e-6, "average --weights 3,1 = 0.75 A + 0.25 B (%.2g)" % worst)
    rc, out, _ = run(jem, "info", out_m, "--json")
    info = json.loads(out) if rc == 0 else {}
    prov = info.get("provenance", {})
    check([e.get("weight") for e in prov.get("averaged_from", [])] == [0.75, 0.25],
          "average: provenance records the normalised weights")
    check(prov.get("command", "").startswith("jem average " + paths[0] + " " + paths[1])
          and "seed" not in prov
          and [e.get("provenance", {}).get("seed") for e in prov.get("averaged_from", [])] == [1, 2],
          "average: a provenance of its own (command as typed), the inputs' nested: %s" % prov)


if __name__ == "__main__":
    sys.exit(main())
