"""Procedural stimulus images for the synthetic NSD dataset.

Six categories (``face, body, place, word, food, object``) are drawn with PIL
on varied backgrounds (flat, gradients, gratings, smooth noise textures), with
random position, scale and colours so that images within a category differ and
low-level statistics vary between images.

Public API::

    draw_image(category, rng, size) -> uint8 array (size, size, 3)
    render(category, rng, size) -> (uint8 array (size, size, 3), {"scale": float})

``scale`` in [0, 1] is the drawn object's size relative to its allowed range;
the generator uses it (with image contrast) as within-category modulation.
All coordinates are fractions of ``size``, so any size >= ~32 px works.
"""

from __future__ import annotations

import functools
import math
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageStat

_MAP_RES = 128  # resolution at which smooth maps (gradients, gratings, noise) are computed
CATEGORIES = ("face", "body", "place", "word", "food", "object")

SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36], [94, 58, 28]],
    dtype=float,
)
FOOD_COLOURS = np.array(
    [[220, 40, 30], [60, 170, 50], [250, 210, 40], [140, 80, 30], [255, 140, 0], [240, 235, 200], [120, 30, 90]],
    dtype=float,
)


# --------------------------------------------------------------------------- helpers
def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    """A random RGB tuple with channels in [lo, hi)."""
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _jitter(base: np.ndarray, rng: np.random.Generator, sd: float = 12.0) -> tuple[int, int, int]:
    """``base`` (3,) plus Gaussian jitter, clipped to a valid RGB tuple."""
    return tuple(int(v) for v in np.clip(base + rng.normal(0, sd, 3), 0, 255))


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre grids (yy, xx), each (size, size) in [0, 1]."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (size, size) in [0, 1]: a cells x cells grid upsampled bicubically."""
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(low, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, np.float32) / 255.0


def _mix(c0, c1, t: np.ndarray, size: int) -> Image.Image:
    """RGB image mixing colours c0 -> c1 by a low-res map t (m, m) in [0, 1], upsampled to size."""
    mask = Image.fromarray((np.clip(t, 0, 1) * 255).astype(np.uint8), "L")
    if mask.size[0] != size:
        mask = mask.resize((size, size), Image.BILINEAR)
    return Image.composite(Image.new("RGB", (size, size), tuple(c1)), Image.new("RGB", (size, size), tuple(c0)), mask)


def background(rng: np.random.Generator, size: int, kind: str | None = None,
               lo: int = 0, hi: int = 256) -> Image.Image:
    """A (size, size) RGB background: 'flat', 'gradient', 'stripes' or 'noise'."""
    kind = kind or rng.choice(["flat", "gradient", "stripes", "noise"])
    m = min(size, _MAP_RES)
    yy, xx = _coords(m)
    c0, c1 = _colour(rng, lo, hi), _colour(rng, lo, hi)
    if kind == "flat":
        return Image.new("RGB", (size, size), c0)
    if kind == "gradient":
        th = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(th) + yy * math.sin(th)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "stripes":
        th = rng.uniform(0, math.pi)
        freq = rng.uniform(2, 12)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(th) + yy * math.sin(th)) + rng.uniform(0, 6.3))
        t = t * rng.uniform(0.3, 1.0)
    else:
        t = _smooth_noise(rng, m, int(rng.integers(3, 10)))
    return _mix(c0, c1, t, size)


def _rot(points, centre, angle: float) -> list[tuple[float, float]]:
    """Rotate (x, y) points about ``centre`` by ``angle`` radians."""
    cx, cy = centre
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def _rect(cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Corners of a (w, h) rectangle centred at (cx, cy), rotated by ``angle``."""
    pts = [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    return _rot(pts, (cx, cy), angle)


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, **kw) -> None:
    """Axis-aligned ellipse by centre and radii."""
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], **kw)


def _limb(d: ImageDraw.ImageDraw, start, angle: float, length: float, width: int, fill) -> tuple[float, float]:
    """Draw one thick segment from ``start``; return its end point."""
    end = (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle))
    d.line([start, end], fill=fill, width=max(1, width))
    r = width / 2
    _ellipse(d, end[0], end[1], r, r, fill=fill)
    return end


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``px`` pixels (bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=max(4, px))
    except (TypeError, OSError, ImportError):  # old Pillow / no FreeType
        return ImageFont.load_default()


def _random_centre(rng: np.random.Generator, n: int, rx: float, ry: float, half_span: float) -> tuple[float, float]:
    """A centre (x, y) in pixels keeping an rx × ry shape within half_span of the image middle."""
    return (n * rng.uniform(0.5 - half_span + rx / n, 0.5 + half_span - rx / n),
            n * rng.uniform(0.5 - half_span + ry / n, 0.5 + half_span - ry / n))


# --------------------------------------------------------------------------- categories
def _draw_face(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """Skin-toned head ellipse with hair, eyes, brows, nose and mouth."""
    n = img.size[0]
    d = ImageDraw.Draw(img)
    ry = n * (0.18 + 0.22 * s)
    rx = ry * rng.uniform(0.68, 0.82)
    cx, cy = _random_centre(rng, n, rx, ry, half_span=0.45)
    skin = _jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng)
    hair = _colour(rng, 0, 120)
    if rng.random() < 0.8:
        _ellipse(d, cx, cy - ry * 0.12, rx * 1.08, ry * 1.0, fill=hair)
    if rng.random() < 0.5:  # neck and shoulders
        d.rectangle([cx - rx * 0.35, cy + ry * 0.7, cx + rx * 0.35, cy + ry * 1.3], fill=skin)
        _ellipse(d, cx, cy + ry * 1.6, rx * 1.6, ry * 0.45, fill=_colour(rng))
    _ellipse(d, cx, cy, rx, ry, fill=skin)
    ew, eh, ey = rx * 0.22, ry * 0.09, cy - ry * 0.12
    iris = _colour(rng, 20, 140)
    for sgn in (-1, 1):
        ex = cx + sgn * rx * 0.4
        _ellipse(d, ex, ey, ew, eh, fill=(245, 245, 240))
        _ellipse(d, ex + rng.normal(0, ew * 0.15), ey, eh * 0.9, eh * 0.9, fill=iris)
        _ellipse(d, ex, ey, eh * 0.4, eh * 0.4, fill=(10, 10, 10))
        by = ey - ry * rng.uniform(0.15, 0.22)
        d.line([(ex - ew, by + sgn * rng.uniform(-1, 1) * eh * 0.5), (ex + ew, by)], fill=hair, width=max(1, int(ry * 0.04)))
    d.polygon([(cx, cy - ry * 0.02), (cx - rx * 0.12, cy + ry * 0.25), (cx + rx * 0.12, cy + ry * 0.25)],
              fill=tuple(int(v * 0.85) for v in skin))
    my, mw = cy + ry * 0.5, rx * rng.uniform(0.3, 0.5)
    lips = (int(rng.integers(120, 200)), 40, 50)
    if rng.random() < 0.5:
        d.chord([cx - mw, my - ry * 0.12, cx + mw, my + ry * 0.12], 0, 180, fill=lips)
    else:
        d.arc([cx - mw, my - ry * 0.1, cx + mw, my + ry * 0.1], 10, 170, fill=lips, width=max(1, int(ry * 0.05)))


def _draw_body(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """Headless or small-headed figure: torso blob plus two-segment arms and legs."""
    n = img.size[0]
    d = ImageDraw.Draw(img)
    h = n * (0.35 + 0.5 * s)  # total figure height
    cx = n * rng.uniform(0.3, 0.7)
    top = n * rng.uniform(0.05, max(0.06, 0.95 - h / n))
    shirt, trousers, skin = _colour(rng), _colour(rng, 0, 160), _jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng)
    tw, th = h * rng.uniform(0.18, 0.26), h * 0.36
    ty = top + h * 0.12
    lw = int(max(2, h * rng.uniform(0.05, 0.08)))
    for sgn in (-1, 1):  # legs
        hip = (cx + sgn * tw * 0.25, ty + th)
        knee = _limb(d, hip, sgn * rng.uniform(0.0, 0.5), h * 0.26, lw, trousers)
        _limb(d, knee, sgn * rng.uniform(-0.2, 0.3), h * 0.24, lw, trousers)
    for sgn in (-1, 1):  # arms
        sh = (cx + sgn * tw * 0.5, ty + lw * 0.5)
        elbow = _limb(d, sh, sgn * rng.uniform(0.2, 2.6), h * 0.2, int(lw * 0.8), shirt)
        _limb(d, elbow, sgn * rng.uniform(0.0, 3.0), h * 0.18, int(lw * 0.7), skin)
    d.rounded_rectangle([cx - tw / 2, ty, cx + tw / 2, ty + th], radius=tw * 0.3, fill=shirt)
    if rng.random() < 0.4:
        _ellipse(d, cx, ty - h * 0.06, h * 0.05, h * 0.06, fill=skin)


def _draw_place(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """Outdoor street (sky, ground, buildings, perspective lines) or indoor room."""
    n = img.size[0]
    yy, _ = _coords(min(n, _MAP_RES))
    hz = rng.uniform(0.35, 0.65)
    sky0 = np.array([rng.integers(60, 140), rng.integers(110, 190), rng.integers(190, 256)])
    sky = _mix(tuple(int(v) for v in sky0), tuple(int(v) for v in np.clip(sky0 + 60, 0, 255)), yy / hz, n)
    ground = _mix(_colour(rng, 40, 180), _colour(rng, 40, 180), (yy - hz) / (1 - hz), n)
    img.paste(sky)
    img.paste(ground.crop((0, int(round(hz * n)), n, n)), (0, int(round(hz * n))))
    d = ImageDraw.Draw(img)
    vx, vy = n * rng.uniform(0.25, 0.75), n * hz
    line_col = _colour(rng, 150, 256)
    for k in range(int(rng.integers(4, 9))):  # perspective lines on the ground plane
        xb = n * (-0.5 + 2.0 * k / 7)
        d.line([(vx, vy), (xb, n)], fill=line_col, width=max(1, n // 150))
    if rng.random() < 0.5:  # indoor: back wall + corners
        w = n * (0.25 + 0.35 * (1 - s))
        box = [vx - w / 2, vy - w * 0.8, vx + w / 2, vy + w * 0.2]
        d.rectangle(box, fill=_colour(rng, 120, 240), outline=(40, 40, 40), width=max(1, n // 120))
        for cxn, cyn, tx, ty in [(box[0], box[1], 0, 0), (box[2], box[1], n, 0), (box[0], box[3], 0, n), (box[2], box[3], n, n)]:
            d.line([(cxn, cyn), (tx, ty)], fill=(40, 40, 40), width=max(1, n // 120))
        d.rectangle([vx - w * 0.12, vy - w * 0.45, vx + w * 0.12, vy + w * 0.2], fill=_colour(rng, 40, 140))
    else:  # buildings standing on the horizon
        x = n * rng.uniform(-0.1, 0.1)
        while x < n:
            bw = n * rng.uniform(0.08, 0.25) * (0.6 + s)
            bh = n * rng.uniform(0.1, 0.45) * (0.6 + s)
            col = _colour(rng, 60, 230)
            d.rectangle([x, vy - bh, x + bw, vy], fill=col, outline=(30, 30, 30))
            win = _colour(rng, 180, 256) if rng.random() < 0.5 else (40, 50, 70)
            step = max(3.0, n * 0.035)
            for wy in np.arange(vy - bh + step * 0.5, vy - step, step * 1.6):
                for wx in np.arange(x + step * 0.5, x + bw - step, step * 1.4):
                    d.rectangle([wx, wy, wx + step * 0.7, wy + step * 0.8], fill=win)
            x += bw + n * rng.uniform(0.0, 0.08)


def _draw_word(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """Rows of random letter strings in dark ink on light paper."""
    n = img.size[0]
    yy, xx = _coords(min(n, _MAP_RES))
    t = (xx * rng.uniform(0, 1) + yy * rng.uniform(0, 1)) / 2
    img.paste(_mix(_colour(rng, 215, 256), _colour(rng, 200, 256), t, n))
    d = ImageDraw.Draw(img)
    px = int(n * (0.05 + 0.09 * s))
    font = _font(px)
    ink = _colour(rng, 0, 90)
    y = n * rng.uniform(0.03, 0.2)
    bottom = n * rng.uniform(0.7, 0.97)
    letters = string.ascii_lowercase if rng.random() < 0.7 else string.ascii_uppercase
    while y + px < bottom:
        x = n * rng.uniform(0.03, 0.15)
        while True:
            word = "".join(rng.choice(list(letters), size=int(rng.integers(2, 9))))
            wlen = d.textlength(word, font=font)
            if x + wlen > n * 0.97:
                break
            d.text((x, y), word, fill=ink, font=font)
            x += wlen + px * rng.uniform(0.4, 0.9)
        y += px * rng.uniform(1.3, 1.8)


def _draw_food(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """A plate (ellipse with rim) holding coloured food blobs, sometimes a fork."""
    n = img.size[0]
    d = ImageDraw.Draw(img)
    rx = n * (0.2 + 0.25 * s)
    ry = rx * rng.uniform(0.55, 0.95)
    cx, cy = _random_centre(rng, n, rx, ry, half_span=0.48)
    plate = _colour(rng, 200, 256)
    _ellipse(d, cx + rx * 0.04, cy + ry * 0.06, rx, ry, fill=(70, 70, 70))  # shadow
    _ellipse(d, cx, cy, rx, ry, fill=plate, outline=(150, 150, 150), width=max(1, n // 150))
    _ellipse(d, cx, cy, rx * 0.78, ry * 0.78, outline=tuple(int(v * 0.9) for v in plate), width=max(1, n // 200))
    for _ in range(int(rng.integers(3, 9))):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.5)
        bx, by = cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)
        br = rx * rng.uniform(0.12, 0.28)
        col = _jitter(FOOD_COLOURS[rng.integers(len(FOOD_COLOURS))], rng, 20)
        if rng.random() < 0.6:
            _ellipse(d, bx, by, br, br * rng.uniform(0.6, 1.0), fill=col)
        else:
            k = int(rng.integers(5, 9))
            pts = [(bx + br * rng.uniform(0.6, 1.1) * math.cos(2 * math.pi * i / k),
                    by + br * rng.uniform(0.6, 1.1) * math.sin(2 * math.pi * i / k)) for i in range(k)]
            d.polygon(pts, fill=col)
        _ellipse(d, bx - br * 0.3, by - br * 0.3, br * 0.15, br * 0.12, fill=(255, 255, 240))  # highlight
    if rng.random() < 0.5:
        fx = cx + rx * 1.1
        d.rectangle([fx, cy - ry * 0.8, fx + n * 0.015, cy + ry * 0.8], fill=(190, 190, 200))


def _draw_car(d: ImageDraw.ImageDraw, rng, n: int, cx: float, cy: float, w: float) -> None:
    """Side view of a car: body, cabin, windows and two wheels."""
    h = w * 0.28
    body = _colour(rng)
    d.rounded_rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], radius=h * 0.3, fill=body)
    d.polygon([(cx - w * 0.3, cy - h / 2), (cx - w * 0.18, cy - h * 1.2), (cx + w * 0.15, cy - h * 1.2), (cx + w * 0.3, cy - h / 2)], fill=body)
    d.polygon([(cx - w * 0.24, cy - h * 0.55), (cx - w * 0.15, cy - h * 1.05), (cx + w * 0.12, cy - h * 1.05), (cx + w * 0.23, cy - h * 0.55)], fill=(170, 210, 235))
    for sx in (-0.3, 0.3):
        _ellipse(d, cx + sx * w, cy + h / 2, h * 0.55, h * 0.55, fill=(20, 20, 20))
        _ellipse(d, cx + sx * w, cy + h / 2, h * 0.25, h * 0.25, fill=(170, 170, 170))


def _draw_hammer(d: ImageDraw.ImageDraw, rng, n: int, cx: float, cy: float, w: float) -> None:
    """A rotated hammer: wooden handle plus metal head."""
    a = rng.uniform(-1.2, 1.2)
    d.polygon(_rect(cx, cy, w * 0.1, w * 0.85, a), fill=_colour(rng, 100, 200))
    hx, hy = cx + math.sin(-a) * w * 0.4, cy - math.cos(a) * w * 0.4
    d.polygon(_rect(hx, hy, w * 0.45, w * 0.14, a), fill=_colour(rng, 60, 120))


def _draw_mug(d: ImageDraw.ImageDraw, rng, n: int, cx: float, cy: float, w: float) -> None:
    """A mug: body rectangle, elliptical rim and ring handle."""
    col = _colour(rng)
    bw, bh = w * 0.5, w * 0.6
    d.ellipse([cx + bw * 0.3, cy - bh * 0.3, cx + bw * 0.85, cy + bh * 0.25], outline=col, width=max(2, int(w * 0.06)))
    d.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=col)
    _ellipse(d, cx, cy - bh / 2, bw / 2, bh * 0.08, fill=tuple(int(v * 0.6) for v in col))


def _draw_blocks(d: ImageDraw.ImageDraw, rng, n: int, cx: float, cy: float, w: float) -> None:
    """A shaded cube next to a ball: simple geometric object."""
    col = np.array(_colour(rng, 60, 256), float)
    e = w * 0.35
    front = [(cx - e, cy - e * 0.3), (cx, cy - e * 0.3), (cx, cy + e * 0.7), (cx - e, cy + e * 0.7)]
    top = [(cx - e, cy - e * 0.3), (cx - e * 0.6, cy - e * 0.7), (cx + e * 0.4, cy - e * 0.7), (cx, cy - e * 0.3)]
    side = [(cx, cy - e * 0.3), (cx + e * 0.4, cy - e * 0.7), (cx + e * 0.4, cy + e * 0.3), (cx, cy + e * 0.7)]
    for pts, f in ((front, 1.0), (top, 1.2), (side, 0.6)):
        d.polygon(pts, fill=tuple(int(v) for v in np.clip(col * f, 0, 255)))
    _ellipse(d, cx + e * 0.9, cy + e * 0.4, e * 0.3, e * 0.3, fill=_colour(rng))


def _draw_object(img: Image.Image, rng: np.random.Generator, s: float) -> None:
    """One man-made object (car, hammer, mug or blocks) at random place and size."""
    n = img.size[0]
    d = ImageDraw.Draw(img)
    w = n * (0.35 + 0.5 * s)
    cx, cy = n * rng.uniform(0.25, 0.75), n * rng.uniform(0.3, 0.7)
    kind = [_draw_car, _draw_hammer, _draw_mug, _draw_blocks][int(rng.integers(4))]
    kind(d, rng, n, cx, cy, w)


_DRAWERS = {
    "face": _draw_face,
    "body": _draw_body,
    "place": _draw_place,
    "word": _draw_word,
    "food": _draw_food,
    "object": _draw_object,
}


def _global_gain(img: Image.Image, gain: float, offset: float) -> Image.Image:
    """Scale contrast about the image mean by ``gain`` and shift brightness (per-channel LUT)."""
    mean = float(np.mean(ImageStat.Stat(img).mean))
    lut = np.clip((np.arange(256) - mean) * gain + mean + offset, 0, 255).round().astype(np.uint8)
    return img.point(lut.tolist() * 3)


# --------------------------------------------------------------------------- public
def render(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Draw one ``category`` image; return (uint8 (size, size, 3), {"scale": float in [0, 1]})."""
    if category not in _DRAWERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    scale = float(rng.uniform(0.0, 1.0))
    img = background(rng, size)
    _DRAWERS[category](img, rng, scale)
    img = _global_gain(img, rng.uniform(0.7, 1.15), rng.normal(0, 12))
    return np.asarray(img, np.uint8), {"scale": scale}


def draw_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one ``category`` image: uint8 array (size, size, 3)."""
    return render(category, rng, size)[0]


def write_category_folder(out_dir, categories, n_per_category: int, size: int, seed: int = 0):
    """Draw ``n_per_category`` fresh images of each category into ``out_dir/<category>/NNNN.png`` (the layout
    ``datamodules.image_folder.category_folder`` reads); an existing complete folder is reused. Written to a
    temporary folder and renamed into place. The stream (seed 10_000 + seed) differs from the dataset
    generator's, so these images are never the dataset's own. Returns ``out_dir`` as a Path."""
    import json
    import os
    import pathlib
    import shutil

    out = pathlib.Path(out_dir)
    marker = out / "complete.json"
    spec = {"categories": list(categories), "n_per_category": int(n_per_category), "size": int(size), "seed": int(seed)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rngs = np.random.default_rng(10_000 + int(seed)).spawn(len(categories))
    for name, rng in zip(categories, rngs):
        (tmp / name).mkdir(parents=True)
        for k, r in enumerate(rng.spawn(n_per_category)):
            Image.fromarray(draw_image(name, r, int(size))).save(tmp / name / f"{k:04d}.png")
    (tmp / "complete.json").write_text(json.dumps(spec))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
