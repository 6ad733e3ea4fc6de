#!/usr/bin/python3
"""test_import.py - `jem import` end to end on checkpoints written by PyTorch
(tests/ref/torch/, made by tests/ref/make_torch_ckpt.py): both torch.save
formats, the official dict, DataParallel prefixes, a bare state_dict with
views and mixed dtypes; the imported model's scores (`jem score` on the
committed input batch) against the PyTorch module in eval mode; norm
inference and --norm; --buffer-size, --classes, --name; usage errors (exit 2)
and bad or hostile files (exit 1, nothing executed).

Usage: /usr/bin/python3 tests/integration/test_import.py [--build DIR]
Needs only the standard library.
"""
import argparse
import gzip
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cli  # noqa: E402  (its check/run helpers and pass/fail counts)
from test_cli import check, run  # noqa: E402
import jemtest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF = os.path.join(ROOT, "tests", "ref", "torch")

def unzip(name, tmp):
    out = os.path.join(tmp, name)
    with gzip.open(os.path.join(REF, name + ".gz"), "rb") as f, open(out, "wb") as g:
        g.write(f.read())
    return out


def info(jem, model):
    rc, out, err = run(jem, "info", model, "--json")
    check(rc == 0, "jem info %s: %s" % (model, err))
    return json.loads(out) if rc == 0 else {}


def parity(jem, model, x, ref, case):
    """Scores of the imported model against the PyTorch module's."""
    rc, out, err = run(jem, "score", model, x)
    check(rc == 0, "%s: jem score failed: %s" % (case, err))
    if rc:
        return
    rows = [json.loads(line) for line in out.splitlines()]
    check(len(rows) == len(ref["energy"]), "%s: %d rows scored" % (case, len(rows)))
    big = max(1.0, max(abs(v) for r in ref["logits"] for v in r))
    dl = max(abs(a - b) for r, rr in zip(rows, ref["logits"]) for a, b in zip(r["logits"], rr))
    de = max(abs(r["energy"] - e) for r, e in zip(rows, ref["energy"]))
    dg = max(abs(r["grad_norm"] - g) / g for r, g in zip(rows, ref["grad_norm"]))
    check(dl / big <= 1e-4, "%s: logits differ by %g (relative)" % (case, dl / big))
    check(de / max(1.0, max(abs(e) for e in ref["energy"])) <= 1e-4,
          "%s: energies differ by %g" % (case, de))
    check(dg <= 1e-3, "%s: grad_norm differs by %g (relative)" % (case, dg))
    print("  %-13s logits %.1e  energy %.1e  grad_norm %.1e" % (case, dl / big, de, dg))


def colour_end_to_end(jem, jemd, model, tmp):
    """A colour PNG through `jem score` and jemd's /v1/classify scores as the
    model input (p / 255 - 0.5) / 0.5 does (the CIFAR transform); a sample
    job of the 3-channel model returns colour PNGs."""
    np = jemtest.np
    rng = np.random.RandomState(3)
    pix = rng.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
    png = os.path.join(tmp, "rgb.png")
    with open(png, "wb") as f:
        f.write(jemtest.png_bytes(pix))
    npy = os.path.join(tmp, "rgb.npy")
    np.save(npy, ((pix.transpose(2, 0, 1)[None] / 255.0 - 0.5) / 0.5).astype(np.float32))
    rc1, out1, err1 = run(jem, "score", model, png)
    rc2, out2, err2 = run(jem, "score", model, npy)
    check(rc1 == 0 and rc2 == 0, "colour scoring: %s %s" % (err1, err2))
    if rc1 or rc2:
        return
    a, b = json.loads(out1), json.loads(out2)
    check(test_cli.close(a["logits"], b["logits"]) and test_cli.close([a["grad_norm"]], [b["grad_norm"]]),
          "a colour PNG scores as its CIFAR-transformed tensor: %s vs %s" % (a["logits"], b["logits"]))
    d = jemtest.Daemon(jemd, model)
    try:
        st, _, r = d.json("POST", "/v1/classify", open(png, "rb").read(), {"Content-Type": "image/png"})
        check(st == 200 and test_cli.close(r["logits"], a["logits"]),
              "jemd classifies the colour PNG as jem score does: %s %s" % (st, r))
        st, _, job = d.json("POST", "/v1/samples", json.dumps({"n": 2, "steps": 2, "seed": 1}),
                            {"Content-Type": "application/json"})
        check(st in (200, 201, 202), "sample job accepted: %s %s" % (st, job))
        for _ in range(300):
            st, _, job = d.json("GET", "/v1/jobs/%s" % job["id"])
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.1)
        check(job["status"] == "succeeded", "sample job: %s" % job)
        for path in ("/v1/jobs/%s/grid.png" % job["id"], "/v1/jobs/%s/samples/0.png" % job["id"]):
            st, _, body = d.request("GET", path)
            check(st == 200 and body[:8] == b"\x89PNG\r\n\x1a\n" and body[25] in (2, 6),
                  "%s is a colour PNG (colour type %s)" % (path, body[25] if len(body) > 25 else None))
    finally:
        d.kill()


def cifar_end_to_end(jem, model, tmp):
    """The CIFAR-10 binary format (one label byte, 3,072 pixel bytes) read by
    jem calibrate, jem eval and jem train from small files written here;
    model: a 3-channel, 10-class model."""
    np = jemtest.np
    rng = np.random.RandomState(5)
    data, ood = os.path.join(tmp, "cifar"), os.path.join(tmp, "ood")
    os.makedirs(data)

    def write(name, n):
        y = (np.arange(n) % 10).astype(np.uint8)
        px = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        px[:, :1024] //= (1 + y[:, None] % 3)  # a little class signal in the red plane
        with open(os.path.join(data, name), "wb") as f:
            f.write(np.concatenate([y[:, None], px], axis=1).tobytes())
    write("data_batch_1.bin", 2600)
    write("data_batch_2.bin", 2600)  # 5,200 training images: 5,000 validation + 200
    write("test_batch.bin", 120)
    # the sets that need no extra packages (`make ood-sets` installs the photo ones)
    sets = "uniform,gaussian,constant,letters,procedural,text"
    run(sys.executable, os.path.join(ROOT, "scripts", "make_ood_sets.py"), "--out", ood,
        "--n", "64", "--family-n", "20", "--seed", "0", "--no-npm", "--sets", sets)
    cal = os.path.join(tmp, "cal.safetensors")
    rc, _, err = run(jem, "calibrate", model, "--out", cal, "--data-dir", data, "--ood-dir", ood,
                     "--limit", "64", "--batch", "32", "--tune-sets", sets,
                     "--sampler-chains", "1", "--sampler-steps", "5")
    m = info(jem, cal) if rc == 0 else {}
    check(rc == 0 and m.get("ood", {}).get("present") is True,
          "calibrate a colour model on CIFAR-10 files (grey OOD sets in colour): %s" % err[-300:])
    out = os.path.join(tmp, "eval")
    rc, _, err = run(jem, "eval", model, "--data-dir", data, "--out-dir", out, "--ood-dir", ood,
                     "--limit", "64", "--sample-steps", "2", "--samples-per-class", "1",
                     "--fid-samples", "20", "--no-attack", "--batch", "32")
    rep = json.load(open(os.path.join(out, "report.json"))) if rc == 0 else {}
    check(rc == 0 and "classification" in rep, "eval on CIFAR-10 files: %s" % err[-300:])
    run_dir = os.path.join(tmp, "train")
    rc, _, err = run(jem, "train", "--run-dir", run_dir, "--data", data, "--baseline",
                     "--iterations", "2", "--batch", "8", "--warmup", "1", "--eval-every", "2",
                     "--valid-limit", "16", "--ckpt-every", "2")
    m = info(jem, os.path.join(run_dir, "model.safetensors")) if rc == 0 else {}
    check(rc == 0 and m.get("arch", {}).get("in_channels") == 3 and
          (m.get("classes") or [None])[0] == "airplane" and m.get("name") == "cifar10-jem",
          "train on CIFAR-10 files: a 3-channel model with CIFAR-10's classes: %s" % err[-300:])
    with open(os.path.join(data, "test_batch.bin"), "ab") as f:
        f.write(b"\x00" * 10)  # a torn record
    rc, _, err = run(jem, "eval", model, "--data-dir", data, "--out-dir", out, "--limit", "8")
    check(rc == 1 and "multiple of 3073" in err, "a torn CIFAR-10 file is refused: %s" % err[-200:])


def legacy_file(obj_pickle):
    """A legacy torch.save file around one object pickle (no storages)."""
    return (pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + pickle.dumps(1001, protocol=2) +
            pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2) +
            obj_pickle + pickle.dumps([], protocol=2))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch %s" % os.path.join(tempfile.gettempdir(), "jem_import_pwned"),))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    jem = os.path.join(args.build, "jem")
    tmp = tempfile.mkdtemp(prefix="jem_import_")
    try:
        x = unzip("x.npy", tmp)
        print("parity with PyTorch (eval mode):")
        for case, norm_arg in (("none-zip", None), ("none-legacy", None), ("dp-legacy", None),
                               ("bare-zip", None), ("batch-zip", None), ("act-zip", None),
                               ("instance-zip", "instance"), ("layer-zip", "layer")):
            ckpt = unzip(case + ".pt", tmp)
            with gzip.open(os.path.join(REF, case + ".json.gz")) as f:
                ref = json.load(f)
            model = os.path.join(tmp, case + ".safetensors")
            rc, _, err = run(jem, "import", ckpt, "--out", model,
                             *(["--norm", norm_arg] if norm_arg else []))
            check(rc == 0, "%s: import failed: %s" % (case, err))
            check("dropped 4 tensors" in err, "%s: no note on the dropped tensors: %s" % (case, err))
            if rc:
                continue
            m = info(jem, model)
            arch = m.get("arch", {})
            for k, v in ref["arch"].items():
                check(arch.get(k) == v, "%s: arch.%s = %r, want %r" % (case, k, arch.get(k), v))
            parity(jem, model, x, ref, case)

        # the replay buffer: all, a seeded subsample, none
        ckpt = os.path.join(tmp, "none-zip.pt")
        def replay(path):
            return info(jem, path).get("replay_buffer", {}).get("size", 0)
        check(replay(os.path.join(tmp, "none-zip.safetensors")) == 8, "the 8 buffer images kept")
        a, b = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
        for p in (a, b):
            rc, _, err = run(jem, "import", ckpt, "--out", p, "--buffer-size", 3, "--seed", 5,
                             "--name", "same")
            check(rc == 0, "--buffer-size 3: %s" % err)
        check(replay(a) == 3, "--buffer-size 3 keeps 3 images")
        check(open(a, "rb").read() == open(b, "rb").read(), "the same seed, the same file")
        rc, _, err = run(jem, "import", ckpt, "--out", a, "--buffer-size", 0)
        check(rc == 0 and replay(a) == 0, "--buffer-size 0 drops the buffer")
        rc, _, err = run(jem, "import", ckpt, "--out", a, "--classes", "cat,dog,ship,frog",
                         "--name", "cifar-jem")
        m = info(jem, a)
        check(rc == 0 and m.get("classes") == ["cat", "dog", "ship", "frog"] and
              m.get("name") == "cifar-jem", "--classes and --name: %s %s" % (err, m.get("classes")))
        check(m.get("preprocess", {}).get("range") == [-1, 1] and
              m.get("preprocess", {}).get("channels") == 3,
              "the CIFAR transform (x - 0.5) / 0.5 on 3 channels: %s" % m.get("preprocess"))

        colour_end_to_end(jem, os.path.join(os.path.dirname(jem), "jemd"),
                          os.path.join(tmp, "none-zip.safetensors"), tmp)

        m10 = os.path.join(tmp, "c10.safetensors")
        rc, _, err = run(jem, "init", m10, "--in-channels", 3, "--classes", 10, "--seed", 2)
        check(rc == 0, "init a 10-class colour model: %s" % err)
        cifar_end_to_end(jem, m10, tmp)

        # norms: inferred where the tensors tell, asked for where they do not
        for case, want_rc, want in (("batch-zip", 0, "norm batch"), ("act-zip", 0, "norm act"),
                                    ("instance-zip", 2, "--norm instance or --norm layer"),
                                    ("layer-zip", 2, "--norm instance or --norm layer")):
            rc, _, err = run(jem, "import", os.path.join(tmp, case + ".pt"), "--out", a)
            check(rc == want_rc and want in err, "%s: rc %d, %s" % (case, rc, err.strip()))
        rc, _, err = run(jem, "import", os.path.join(tmp, "batch-zip.pt"), "--out", a,
                         "--norm", "layer")
        check(rc == 1 and "contradicts" in err, "--norm layer on a BatchNorm file: %s" % err)
        # an ActNorm never initialised on data: its 1-byte `initialized` flags set to 0
        src, dst = os.path.join(tmp, "act-zip.pt"), os.path.join(tmp, "act-uninit.pt")
        with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
            flags = 0
            for e in zi.infolist():
                data = zi.read(e)
                if "/data/" in e.filename and len(data) == 1:
                    data, flags = b"\x00", flags + 1
                zo.writestr(e.filename, data)
        check(flags == 7, "act-zip has 7 ActNorm flags (%d)" % flags)
        rc, _, err = run(jem, "import", dst, "--out", a)
        check(rc == 1 and "never initialised" in err, "uninitialised ActNorm refused: %s" % err)
        rc, _, err = run(jem, "import", ckpt, "--out", a, "--norm", "batch")
        check(rc == 1 and "contradicts" in err, "--norm batch on a norm-free file: %s" % err)
        rc, _, err = run(jem, "import", os.path.join(tmp, "layer-zip.pt"), "--out", a, "--norm", "none")
        check(rc == 1 and "contradicts" in err, "--norm none on a normed file: %s" % err)

        # usage errors: exit 2
        for argv, want in ((["import", ckpt], "--out"),
                           (["import", "--out", a], "CKPT"),
                           (["import", ckpt, "--out", a, "--norm", "group"], "--norm"),
                           (["import", ckpt, "--out", a, "--classes", "a,b"], "classes"),
                           (["import", ckpt, "--out", a, "--buffer-size", "-1"], "--buffer-size"),
                           (["import", ckpt, "--out", a, "--bogus"], "bogus")):
            rc, _, err = run(jem, *argv)
            check(rc == 2 and want in err, "%s: rc %d, %s" % (" ".join(argv[2:]), rc, err.strip()))
        rc, out, _ = run(jem, "import", "--help")
        check(rc == 0 and "--buffer-size" in out, "import --help")

        # bad and hostile files: exit 1 with a sentence, nothing executed
        def bad(name, data, want):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(data)
            rc, _, err = run(jem, "import", p, "--out", a)
            check(rc == 1 and want in err, "%s: rc %d, %s" % (name, rc, err.strip()))
        pwned = os.path.join(tempfile.gettempdir(), "jem_import_pwned")
        if os.path.exists(pwned):
            os.unlink(pwned)
        bad("evil.pt", legacy_file(pickle.dumps({"x": Evil()}, protocol=2)),
            "refuses the pickle global posix.system")
        check(not os.path.exists(pwned), "the hostile pickle ran nothing")
        bad("set.pt", legacy_file(pickle.dumps({"x": {1, 2}}, protocol=4)), "EMPTY_SET")
        whole = open(ckpt, "rb").read()
        bad("trunc.pt", whole[:len(whole) // 2], "torch.save")
        bad("text.pt", b"not a checkpoint\n", "not a torch.save file")
        bad("nodict.pt", legacy_file(pickle.dumps({"epoch": 3}, protocol=2)), "no state_dict")
        rc, _, err = run(jem, "import", os.path.join(tmp, "missing.pt"), "--out", a)
        check(rc == 1 and "missing.pt" in err, "a missing file: %s" % err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("test_import: %d passed, %d failed" % (test_cli.passed, test_cli.failed))
    return 1 if test_cli.failed else 0


if __name__ == "__main__":
    sys.exit(main())
