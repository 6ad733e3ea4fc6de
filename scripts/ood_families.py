"""ood_families.py - the image-file OOD families of scripts/make_ood_sets.py.

Each family is a folder of PNG and JPEG files of many sizes (1x1 to 320
pixels a side), colour modes (grey, 16-bit grey, RGB, RGBA, palette) and
crops, so that `jem eval` and `jem calibrate` send every one through the
same decode -> alpha -> grey -> resize -> pad path as a request.  The sources
are Debian packages any user can install, or drawn procedurally:

  photos-skimage     photographs shipped with scikit-image (python3-skimage)
  photos-wallpapers  photographic KDE wallpapers (plasma-workspace-wallpapers)
  illustrations      digital illustrations: KDE's drawn wallpapers, Debian's
                     desktop themes (desktop-base), GNOME's (gnome-backgrounds)
  icons              application and file icons (oxygen-icon-theme,
                     adwaita-icon-theme), with their transparency
  procedural         flat colours, linear and radial gradients, shapes,
                     stripes, checkerboards, fractal (1/f) and blurred noise
  text               words, numbers and symbols in the DejaVu fonts, any
                     colours, one to three lines

Everything is drawn from one numpy Generator per family, so a family is the
same bytes on every machine with the same package versions.
"""
import glob
import io
import os

import numpy as np

SKIMAGE_DIR = "/usr/lib/python3/dist-packages/skimage/data"
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "cell.png",
                  "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "microaneurysms.png", "moon.png", "motorcycle_left.png",
                  "retina.jpg", "rocket.jpg"]
WALLPAPER_DIR = "/usr/share/wallpapers"
# Sorted by eye from the package's 36 wallpapers: photographs ...
WALLPAPER_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour",
                    "EveningGlow", "FallenLeaf", "Grey", "Kite", "MilkyWay",
                    "OneStandsOut", "Path", "summer_1am"]
# ... and drawn or rendered ones.
WALLPAPER_DRAWN = ["Altai", "Autumn", "Canopee", "Cascade", "Cluster", "Elarun",
                   "Flow", "FlyingKonqui", "Honeywave", "IceCold", "Kay",
                   "Kokkini", "Opal", "PastelHills", "Patak", "SafeLanding",
                   "Shell", "Volna"]
DEBIAN_THEMES = "/usr/share/desktop-base"
GNOME_BACKGROUNDS = "/usr/share/backgrounds/gnome"
ICON_DIRS = ["/usr/share/icons/oxygen/base", "/usr/share/icons/Adwaita"]
FONT_DIR = "/usr/share/fonts/truetype/dejavu"

FAMILIES = ["photos-skimage", "photos-wallpapers", "illustrations", "icons",
            "procedural", "text"]
PACKAGES = {"photos-skimage": "python3-skimage",
            "photos-wallpapers": "plasma-workspace-wallpapers",
            "illustrations": "plasma-workspace-wallpapers desktop-base gnome-backgrounds",
            "icons": "oxygen-icon-theme adwaita-icon-theme",
            "procedural": "",
            "text": "fonts-dejavu-core fonts-dejavu-extra"}

SIDES = [1, 2, 5, 12, 20, 28, 32, 48, 64, 96, 128, 200, 320]
SIDE_P = np.array([1, 1, 1, 2, 2, 4, 3, 3, 3, 2, 2, 1, 1], dtype=float)
SIDE_P /= SIDE_P.sum()


def _need(paths, family):
  missing = [p for p in paths if not os.path.exists(p)]
  if missing or not paths:
    raise SystemExit(f"{family}: source images missing (e.g. {missing[:1] or 'all'}); "
                     f"install the Debian package(s): {PACKAGES[family]}")
  return paths


def _wallpaper_files(names):
  out = []
  for n in names:
    files = sorted(f for f in glob.glob(f"{WALLPAPER_DIR}/{n}/contents/images/*")
                   if f.endswith((".png", ".jpg", ".jpeg")))
    if files:
      out.append(files[-1])  # the largest size is listed last
  return out


def sources(family):
  """The source image files of a photo, illustration or icon family."""
  if family == "photos-skimage":
    return _need([f"{SKIMAGE_DIR}/{f}" for f in SKIMAGE_PHOTOS], family)
  if family == "photos-wallpapers":
    return _need(_wallpaper_files(WALLPAPER_PHOTOS), family)
  if family == "illustrations":
    files = _wallpaper_files(WALLPAPER_DRAWN)
    files += sorted(glob.glob(f"{DEBIAN_THEMES}/*-theme/grub/*.png"))
    files += sorted(glob.glob(f"{GNOME_BACKGROUNDS}/*.webp"))
    return _need(files, family)
  if family == "icons":
    files = []
    for d in ICON_DIRS:
      files += sorted(glob.glob(f"{d}/**/*.png", recursive=True))
    return _need(files, family)
  raise ValueError(family)


def _side(rng):
  return int(rng.choice(SIDES, p=SIDE_P))


def _size(rng):
  """A width and height: mostly near-square, sometimes long and thin."""
  w = _side(rng)
  h = w if rng.random() < 0.5 else _side(rng)
  return w, h


def _encode(im, rng):
  """One file's bytes and extension: a random colour mode and format."""
  from PIL import Image
  has_alpha = im.mode == "RGBA"
  r = rng.random()
  if has_alpha and r < 0.6:
    out, fmt = im, "png"                                 # keep transparency
  elif r < 0.35:
    out, fmt = im.convert("RGB"), "png"
  elif r < 0.55:
    out, fmt = im.convert("L"), "png"
  elif r < 0.65:
    # 16-bit grey, which the decoder reduces to 8 bits
    g = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    out, fmt = Image.fromarray(g.astype(np.uint16)), "png"
  elif r < 0.75:
    out, fmt = im.convert("RGB").quantize(colors=int(rng.integers(2, 257))), "png"
  elif r < 0.9:
    out, fmt = im.convert("RGB"), "jpg"
  else:
    out, fmt = im.convert("L"), "jpg"
  buf = io.BytesIO()
  if fmt == "png":
    out.save(buf, format="PNG", optimize=False, compress_level=6)
  else:
    out.save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
  return buf.getvalue(), fmt


def _crop_resize(src, rng):
  """A random crop (10-100% of each side) of src, resized to a random size."""
  from PIL import Image
  W, H = src.size
  cw = max(1, int(round(W * rng.uniform(0.1, 1.0))))
  ch = max(1, min(H, int(round(cw * H / W * rng.uniform(0.6, 1.6)))))
  x0 = int(rng.integers(0, W - cw + 1))
  y0 = int(rng.integers(0, H - ch + 1))
  return src.crop((x0, y0, x0 + cw, y0 + ch)).resize(_size(rng), Image.LANCZOS)


def _from_files(family, n, rng):
  from PIL import Image
  files = sources(family)
  cache = {}
  for _ in range(n):
    f = files[int(rng.integers(len(files)))]
    if f not in cache:
      im = Image.open(f)
      im.load()
      # keep alpha for icons; photos and illustrations are opaque
      im = im.convert("RGBA") if family == "icons" else im.convert("RGB")
      if max(im.size) > 1600:  # keep crops fast; still far above 320
        im.thumbnail((1600, 1600), Image.LANCZOS)
      if len(cache) > 64:
        cache.clear()
      cache[f] = im
    src = cache[f]
    if family == "icons":  # whole icons mostly, at their size or another
      im = src if rng.random() < 0.5 else src.resize(_size(rng), Image.LANCZOS)
      if rng.random() < 0.3:  # on a flat background, as in a screenshot
        bg = Image.new("RGBA", im.size, tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,))
        im = Image.alpha_composite(bg, im)
    else:
      im = _crop_resize(src, rng)
    yield im


def _colour(rng):
  return rng.integers(0, 256, 3).astype(np.float64)


def _procedural(n, rng):
  from PIL import Image, ImageDraw, ImageFilter
  kinds = ["flat", "linear", "radial", "shapes", "stripes", "checker",
           "fractal", "blurred"]
  for i in range(n):
    kind = kinds[i % len(kinds)]
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w
    c1, c2 = _colour(rng), _colour(rng)
    if kind == "flat":
      a = np.broadcast_to(c1, (h, w, 3))
    elif kind == "linear":
      th = rng.uniform(0, 2 * np.pi)
      t = xx * np.cos(th) + yy * np.sin(th)
      t = (t - t.min()) / (np.ptp(t) + 1e-9)
      a = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "radial":
      t = np.hypot(xx - rng.uniform(0, 1), yy - rng.uniform(0, 1))
      t = np.clip(t / rng.uniform(0.3, 1.2), 0, 1)
      a = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "stripes":
      period = rng.uniform(2, max(3, max(w, h) / 2))
      th = rng.uniform(0, np.pi)
      t = (xx * w * np.cos(th) + yy * h * np.sin(th)) / period
      m = (np.floor(t) % 2)[..., None]
      a = c1 * m + c2 * (1 - m)
    elif kind == "checker":
      s = int(rng.integers(1, max(2, min(w, h) // 2 + 1)))
      m = (((np.arange(h)[:, None] // s) + (np.arange(w)[None] // s)) % 2)[..., None]
      a = c1 * m + c2 * (1 - m)
    elif kind == "fractal":
      # 1/f^beta noise: the spectrum of many natural textures
      beta = rng.uniform(1.0, 3.0)
      fy = np.fft.fftfreq(h)[:, None]
      fx = np.fft.rfftfreq(w)[None, :]
      f = np.hypot(fx, fy)
      f[0, 0] = 1.0
      spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (beta / 2)
      spec[0, 0] = 0
      t = np.fft.irfft2(spec, s=(h, w))
      t = (t - t.min()) / (np.ptp(t) + 1e-9)
      a = c1 * (1 - t[..., None]) + c2 * t[..., None]
    else:
      a = None
    if kind == "shapes":
      im = Image.new("RGB", (w, h), tuple(int(v) for v in c1))
      d = ImageDraw.Draw(im)
      for _ in range(int(rng.integers(1, 6))):
        box = sorted(rng.uniform(-0.2, 1.2, 2) * w), sorted(rng.uniform(-0.2, 1.2, 2) * h)
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        fill = tuple(int(v) for v in _colour(rng))
        k = int(rng.integers(3))
        if k == 0:
          d.ellipse(xy, fill=fill)
        elif k == 1:
          d.rectangle(xy, fill=fill)
        else:
          pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)]
          d.polygon(pts, fill=fill)
    elif kind == "blurred":
      noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      im = Image.fromarray(noise, "RGB").filter(
          ImageFilter.GaussianBlur(rng.uniform(0.5, max(1.0, max(w, h) / 8))))
    else:
      im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    yield im


TEXT_WORDS = ["jemd", "energy", "Debian", "sample", "hello world", "12:45",
              "3.14159", "invoice", "page 7", "ERROR", "ok", "#42", "x = y + 1",
              "@home", "naïve", "Ωμέγα", "Привет", "€ 9,99", "→ ← ↑ ↓", "★ ☆ ♥",
              "∑ ∫ √ ∞", "TOTAL", "Zürich", "A-B-C", "(c) 2026", "%%%", "?!"]


def _text(n, rng):
  from PIL import Image, ImageDraw, ImageFont
  fonts = sorted(glob.glob(f"{FONT_DIR}/DejaVu*.ttf"))
  if not fonts:
    raise SystemExit(f"text: no DejaVu fonts under {FONT_DIR}; install "
                     f"{PACKAGES['text']}")
  cache = {}
  for _ in range(n):
    w, h = _size(rng)
    w, h = max(w, 8), max(h, 8)
    fg, bg = _colour(rng), _colour(rng)
    if np.abs(fg - bg).sum() < 120:  # readable: foreground far from background
      fg = 255 - bg
    im = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)
    lines = int(rng.integers(1, 4))
    size = max(6, int(h / lines * rng.uniform(0.5, 0.9)))
    fname = fonts[int(rng.integers(len(fonts)))]
    if (fname, size) not in cache:
      cache[(fname, size)] = ImageFont.truetype(fname, size)
    font = cache[(fname, size)]
    for li in range(lines):
      s = " ".join(TEXT_WORDS[int(rng.integers(len(TEXT_WORDS)))]
                   for _ in range(int(rng.integers(1, 4))))
      y = h * (li + 0.5) / lines
      d.text((float(rng.uniform(-0.1, 0.3)) * w, y), s, fill=tuple(int(v) for v in fg),
             font=font, anchor="lm")
    yield im


def generate(family, n, rng):
  """Yields n (bytes, extension) files of the family."""
  if family == "procedural":
    images = _procedural(n, rng)
  elif family == "text":
    images = _text(n, rng)
  else:
    images = _from_files(family, n, rng)
  for im in images:
    yield _encode(im, rng)
