#!/usr/bin/python3
"""make_images.py - writes the small valid PNG/JPEG files used by tests/test_image.c.

Run with Debian's /usr/bin/python3 (PIL + numpy):  /usr/bin/python3 tests/data/images/make_images.py
The outputs are committed, so the tests never need PIL.  Pixel contents follow
simple formulas that tests/test_image.c recomputes (keep both in sync):

  grey(x, y)   = 4x + 3y                       (32x32, 8-bit)
  rgb(x, y)    = (8x, 8y, 4(x+y))              (32x32, 8-bit)
  alpha(x, y)  = 8x                            (for *_alpha / rgba)
  grey16(x, y) = 2000x + 100y                  (32x32, 16-bit)
  rgb16(x, y)  = (2000x, 2000y, 1000(x+y))     (32x32, 16-bit)
  palette      : index(x, y) = x//8 + 4*(y//8) into PALETTE below
  orient(x, y) = (8x, 16y, 4x + 8y)            (as displayed: 32 wide, 16 high)

orient_N.jpg (N = 1..8) and orient_6.png hold orient() stored the way a camera
would for EXIF Orientation N (stored = the inverse of PIL's exif_transpose
step, so 5-8 are stored 16 wide, 32 high); the script checks that
ImageOps.exif_transpose of each file gives orient() back.

PIL cannot write 16-bit RGB or interlaced PNGs, so a tiny PNG writer here
does those (and it writes everything byte-for-byte deterministically).
"""
import gzip
import os
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
N = 32
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
FMNIST_INDEX = 0  # first test image (an ankle boot)

PALETTE = [(i * 16, 255 - i * 16, (i * 97) % 256) for i in range(16)]


def grid():
    y, x = np.mgrid[0:N, 0:N].astype(np.int64)
    return x, y


def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def png_bytes(arr, color_type, depth, interlace=False, extra=b""):
    """arr: [H, W, C] unsigned ints already in range for `depth` (8 or 16)."""
    h, w = arr.shape[:2]
    arr = arr.reshape(h, w, -1)
    dt = ">u2" if depth == 16 else "u1"

    def raw(sub):
        rows = [b"\x00" + sub[r].astype(dt).tobytes() for r in range(sub.shape[0])]
        return b"".join(rows)

    if not interlace:
        data = raw(arr)
    else:
        # Adam7 passes: (x0, y0, dx, dy)
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                  (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        data = b""
        for x0, y0, dx, dy in passes:
            sub = arr[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                data += raw(sub)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 1 if interlace else 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra +
            chunk(b"IDAT", zlib.compress(data, 9)) + chunk(b"IEND", b""))


# EXIF Orientation -> the stored image, given the upright one (the inverse of
# what ImageOps.exif_transpose does for that value).
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,   # exif_transpose turns it back with ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # ... and this one with ROTATE_90
}


def orient_files():
    y, x = np.mgrid[0:16, 0:32].astype(np.int64)
    upright = Image.fromarray(np.stack([8 * x, 16 * y, 4 * x + 8 * y], -1).astype(np.uint8), "RGB")
    want = np.asarray(upright, np.int64)
    for n, how in STORE.items():
        stored = upright if how is None else upright.transpose(how)
        exif = Image.Exif()
        exif[0x0112] = n
        names = ["orient_%d.jpg" % n] + (["orient_6.png"] if n == 6 else [])
        for name in names:
            path = os.path.join(HERE, name)
            if name.endswith(".jpg"):
                stored.save(path, quality=95, subsampling=0, exif=exif.tobytes())
            else:
                stored.save(path, exif=exif.tobytes())
            got = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), np.int64)
            assert got.shape == want.shape, (name, got.shape)
            err = np.abs(got - want).max()
            assert err <= (0 if name.endswith(".png") else 12), (name, err)


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


def main():
    x, y = grid()
    grey = (4 * x + 3 * y).astype(np.uint8)
    rgb = np.stack([8 * x, 8 * y, 4 * (x + y)], axis=-1).astype(np.uint8)
    alpha = (8 * x).astype(np.uint8)

    write("grey8.png", png_bytes(grey, 0, 8))
    write("grey_alpha.png", png_bytes(np.stack([grey, alpha], -1), 4, 8))
    write("rgb.png", png_bytes(rgb, 2, 8))
    write("rgba.png", png_bytes(np.concatenate([rgb, alpha[..., None]], -1), 6, 8))
    write("interlaced.png", png_bytes(rgb, 2, 8, interlace=True))
    write("interlaced_grey.png", png_bytes(grey, 0, 8, interlace=True))
    g16 = (2000 * x + 100 * y).astype(np.uint16)
    write("grey16.png", png_bytes(g16, 0, 16))
    rgb16 = np.stack([2000 * x, 2000 * y, 1000 * (x + y)], -1).astype(np.uint16)
    write("rgb16.png", png_bytes(rgb16, 2, 16))
    write("rgba16.png", png_bytes(np.concatenate([rgb16, (2000 * x)[..., None].astype(np.uint16)], -1), 6, 16))
    # grey with a tRNS colour key: value 0 (pixel 0,0) is transparent
    write("grey_trns.png", png_bytes(grey, 0, 8, extra=chunk(b"tRNS", struct.pack(">H", 0))))

    # palette and palette + tRNS (index 0 fully transparent, index 1 half)
    idx = (x // 8 + 4 * (y // 8)).astype(np.uint8)
    plte = chunk(b"PLTE", bytes(c for rgbv in PALETTE for c in rgbv))
    write("palette.png", png_bytes(idx, 3, 8, extra=plte))
    write("palette_trns.png", png_bytes(idx, 3, 8, extra=plte + chunk(b"tRNS", bytes([0, 128]))))
    # a 4-bit palette image through PIL as a cross-check of another writer
    im = Image.fromarray(idx, mode="P")
    im.putpalette([c for rgbv in PALETTE for c in rgbv])
    im.save(os.path.join(HERE, "palette_pil.png"), bits=4, optimize=False)

    # JPEGs (lossy: tests compare with a tolerance)
    Image.fromarray(rgb, "RGB").save(os.path.join(HERE, "baseline.jpg"), quality=95, subsampling=0)
    Image.fromarray(rgb, "RGB").save(os.path.join(HERE, "progressive.jpg"), quality=95,
                                     subsampling=0, progressive=True)
    Image.fromarray(grey, "L").save(os.path.join(HERE, "grey.jpg"), quality=95)
    Image.fromarray(rgb, "RGB").convert("CMYK").save(os.path.join(HERE, "cmyk.jpg"), quality=95)
    Image.fromarray(rgb, "RGB").save(os.path.join(HERE, "subsampled.jpg"), quality=95,
                                     subsampling=2)

    orient_files()

    # a larger image (left half white, right half black) and a 1x1 one
    big = np.zeros((200, 300), np.uint8)
    big[:, :150] = 255
    write("large.png", png_bytes(big, 0, 8))
    write("tiny.png", png_bytes(np.array([[200]], np.uint8), 0, 8))

    # a real Fashion-MNIST test image
    with gzip.open(FMNIST, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051 and rows == 28 and cols == 28
        f.seek(16 + FMNIST_INDEX * 28 * 28)
        img = np.frombuffer(f.read(28 * 28), np.uint8).reshape(28, 28)
    Image.fromarray(img, "L").save(os.path.join(HERE, "fmnist0.png"))


if __name__ == "__main__":
    main()
