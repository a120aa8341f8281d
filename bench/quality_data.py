"""Deterministic image sets for bench/bench_quality.py: numpy + Pillow only, nothing downloaded.

    python bench/quality_data.py ROOT [--sets photo,shapes10,icons,digits] [--scale 0.1]

Each set is written as ROOT/<set>/train/<class>/* (the files given to `cnnflow prep`) and
ROOT/<set>/heldout/<class>/* (never given to prep; only for the final score), plus
ROOT/<set>/dataset.json (what was written, at which scale). The sets differ the way real
data differs:

  photo     2 classes (cat, dog): an animal silhouette spanning 30-60% of the image
            (PHOTO["object"], along its larger extent) at a random position, colour,
            mirror and tilt, on a cluttered, textured, noisy background, sometimes
            blurred or crossed by thin lines; JPEG at quality 70-95, 300-520 px per
            side, never square. The classes differ only in shape (ears, muzzle, tail,
            legs, proportions), never in colour or texture. Hard, and for the plain
            script seed-dependent: in one calibration on all 2,000 files it scored 0.80
            with seed 0 and 0.49 with seed 1 (learning starts late, or not at all in 15
            epochs); with the issue's 15-40% animals it stayed at chance in every
            variant tried.
  shapes10  10 classes of 32x32 PNGs: a shape at random rotation, scale, position and
            colour on a noisy gradient background. Meant to be learnable (~0.95-0.99).
  icons     8 classes of RGBA PNG icons, 48-96 px: the glyph is defined only by alpha
            (an opaque glyph, or a glyph cut out of a badge), sometimes a soft shadow;
            the RGB under transparent pixels is garbage (noise, blobs and a glyph of
            another class), so a decoder that drops alpha sees the wrong thing.
  digits    scikit-learn's 1,797 handwritten 8x8 digits (shipped with sklearn),
            upscaled to 64 px greyscale PNGs; every 5th image held out.

Every image comes from its own seeded generator (set, split, index), so the files are
the same whatever the number of processes. `scale` multiplies the counts (smoke tests).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = 1  # bump when the pictures change, so cached sets are rewritten
SETS = ("photo", "shapes10", "icons", "digits")
SPLITS = ("train", "heldout")

PHOTO_CLASSES = ("cat", "dog")
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "plus", "ring", "arrow", "crescent", "heart", "hourglass")
ICON_CLASSES = ("house", "envelope", "magnifier", "check", "lock", "bell", "cloud", "gear")

# (train, heldout) files at scale 1
COUNTS = {"photo": (2000, 400), "shapes10": (6000, 1000), "icons": (2400, 600)}
SET_IDS = {name: i for i, name in enumerate(SETS)}


def _rng(set_name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([20240611, SET_IDS[set_name], SPLITS.index(split), index])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _far_colour(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> tuple[int, int, int]:
    """A random colour at least `min_dist` (RGB distance) from `ref`, if 30 tries find one."""
    best, best_d = None, -1.0
    for _ in range(30):
        c = rng.integers(0, 256, 3)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return tuple(int(v) for v in c)
        if d > best_d:
            best, best_d = c, d
    return tuple(int(v) for v in best)


# --- backgrounds and clutter ----------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1], (h, w, channels) float32: a coarse grid upsampled."""
    gw, gh = max(2, w // cell + 2), max(2, h // cell + 2)
    grid = (rng.random((gh, gw, channels)) * 255).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(grid if channels == 3 else grid[..., 0], mode).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if channels == 3 else arr[..., None]


def _gradient_background(rng: np.random.Generator, w: int, h: int, texture: float) -> np.ndarray:
    """A two-colour linear gradient in a random direction plus coloured low-frequency texture."""
    c0, c1 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    angle = _u(rng, 0, 2 * math.pi)
    tx = np.linspace(0, math.cos(angle), w, dtype=np.float32)[None, :]
    ty = np.linspace(0, math.sin(angle), h, dtype=np.float32)[:, None]
    t = tx + ty  # a linear ramp in that direction, rescaled to [0, 1]
    t -= t.min()
    t /= max(1e-6, float(t.max()))
    bg = c0 + (c1 - c0) * t[..., None]
    if texture > 0:
        cell = int(rng.integers(max(4, min(w, h) // 24), max(6, min(w, h) // 4) + 1))
        bg += (_smooth_noise(rng, w, h, cell) - np.float32(0.5)) * np.float32(2 * texture)
    return bg


def _random_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = r * rng.uniform(0.4, 1.0, n)
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, n: int, scale: float) -> None:
    """n random shapes: blobs, polygons, lines, arcs and animal-part look-alikes."""
    side = min(w, h)
    for _ in range(n):
        kind = rng.choice(["ellipse", "polygon", "line", "arc", "ear", "curve", "rect"],
                          p=[0.22, 0.2, 0.18, 0.1, 0.1, 0.1, 0.1])  # fmt: skip
        colour = _colour(rng)
        cx, cy = _u(rng, -0.05, 1.05) * w, _u(rng, -0.05, 1.05) * h
        r = side * scale * float(rng.uniform(0.03, 0.3))
        if kind == "ellipse":
            rx, ry = r, r * _u(rng, 0.3, 1.0)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == "polygon":
            draw.polygon(_random_polygon(rng, cx, cy, r), fill=colour)
        elif kind == "rect":
            draw.rectangle([cx - r, cy - r * _u(rng, 0.2, 1), cx + r, cy + r * _u(rng, 0.2, 1)], fill=colour)
        elif kind == "line":
            a = _u(rng, 0, math.pi)
            dx, dy = math.cos(a) * r * 3, math.sin(a) * r * 3
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=max(1, int(side * _u(rng, 0.003, 0.02))))
        elif kind == "arc":
            start = _u(rng, 0, 360)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + _u(rng, 60, 300), fill=colour,
                     width=max(1, int(side * _u(rng, 0.004, 0.02))))  # fmt: skip
        elif kind == "ear":  # a small pointed triangle, like a cat's ear
            s = side * _u(rng, 0.02, 0.07)
            a = _u(rng, 0, 2 * math.pi)
            pts = [(cx + s * math.cos(a + k * 2.3), cy + s * math.sin(a + k * 2.3) * _u(rng, 0.6, 1.4)) for k in range(3)]
            draw.polygon(pts, fill=colour)
        else:  # a thin curve, like a tail
            pts = []
            a, x, y = _u(rng, 0, 2 * math.pi), cx, cy
            for _ in range(6):
                pts.append((x, y))
                a += _u(rng, -0.6, 0.6)
                x, y = x + math.cos(a) * r * 0.4, y + math.sin(a) * r * 0.4
            draw.line(pts, fill=colour, width=max(2, int(side * _u(rng, 0.006, 0.018))), joint="curve")


_NOISE_BANK: list[np.ndarray] = []


def _gaussian(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Standard normal noise (h, w, 3), float32: a random window of a fixed 640 x 640 bank,
    randomly flipped. Drawing fresh normals per pixel cost more than the rest of an image."""
    if not _NOISE_BANK:
        _NOISE_BANK.append(np.random.default_rng(7).standard_normal((640, 640, 3), dtype=np.float32))
    bank = _NOISE_BANK[0]
    y, x = int(rng.integers(0, 641 - h)), int(rng.integers(0, 641 - w))
    window = bank[y : y + h, x : x + w]
    return window[::-1] if rng.random() < 0.5 else window


def _add_noise(rng: np.random.Generator, arr: np.ndarray, sigma: float) -> np.ndarray:
    noisy = _gaussian(rng, *arr.shape[:2]) * np.float32(sigma)
    noisy += arr
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


# --- photo: cat and dog silhouettes ----------------------------------------------------


def _thick(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], width: float) -> None:
    draw.line(pts, fill=255, width=max(1, int(width)), joint="curve")
    r = width / 2
    for x, y in (pts[0], pts[-1]):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)


def _leg(draw: ImageDraw.ImageDraw, x: float, top: float, length: float, width: float, bend: float) -> None:
    knee = (x + bend, top + length * 0.55)
    _thick(draw, [(x, top), knee, (x + bend * 0.3, top + length)], width)


def _animal_mask(rng: np.random.Generator, cls: str) -> Image.Image:
    """A side-view silhouette facing right, as an 'L' mask (255 inside), tightly cropped.

    Both animals share the plan (body, head, four legs, tail; standing or sitting) and
    overlapping size ranges; they differ in the parts a person reads them by. Cat:
    pointed upright ears, round head with almost no muzzle, short legs, a long tail
    curving up, usually sitting. Dog: a muzzle sticking out of the head, ears that hang
    down (15% of dogs have rounded upright ears), longer thicker legs, a short thick
    tail, usually standing. PHOTO["sit"] says how often each sits.
    """
    img = Image.new("L", (400, 320), 0)
    d = ImageDraw.Draw(img)
    cat = cls == "cat"
    hr = _u(rng, 20, 27) if cat else _u(rng, 18, 25)  # head radius
    leg_w = _u(rng, 8, 11) if cat else _u(rng, 11, 15)
    if rng.random() < PHOTO["sit"][cls]:
        # sitting: a haunch on the ground, the chest raised, straight front legs
        ground, bx = 290.0, 170.0
        hw, hh = _u(rng, 38, 50), _u(rng, 30, 40)  # haunch half-width and half-height
        d.ellipse([bx - hw, ground - 2 * hh, bx + hw, ground], fill=255)
        chest = (bx + hw * _u(rng, 0.5, 0.8), ground - 2 * hh - _u(rng, 25, 45) * (1 if cat else 1.3))
        _thick(d, [(bx, ground - hh), chest], _u(rng, 38, 50))
        for dx in (0.0, _u(rng, 6, 12)):
            _thick(d, [(chest[0] + dx, chest[1]), (chest[0] + dx + _u(rng, 0, 8), ground - leg_w / 2)], leg_w)
        hx, hy = chest[0] + hr * _u(rng, 0.3, 0.8), chest[1] - hr * _u(rng, 0.6, 1.1)
        _thick(d, [chest, (hx, hy)], hr * _u(rng, 0.9, 1.2))
        tail_base = (bx - hw + 6, ground - hh * _u(rng, 0.2, 0.6))
    else:
        bl = _u(rng, 95, 125) if cat else _u(rng, 100, 140)  # body length
        bh = _u(rng, 40, 52) if cat else _u(rng, 42, 60)  # body height
        bx, by = 170.0, 150.0  # body centre
        d.ellipse([bx - bl / 2, by - bh / 2, bx + bl / 2, by + bh / 2], fill=255)
        leg_len = _u(rng, 28, 40) if cat else _u(rng, 46, 64)
        top = by + bh * 0.2
        stride = _u(rng, -10, 10)  # walking: legs swing
        for x0, swing in ((bx - bl * 0.36, -stride), (bx - bl * 0.24, stride), (bx + bl * 0.26, stride), (bx + bl * 0.38, -stride)):
            _leg(d, x0, top, leg_len, leg_w, swing * 0.6)
        hx = bx + bl / 2 + hr * _u(rng, 0.2, 0.6)
        hy = by - bh / 2 - hr * _u(rng, 0.2, 0.9)
        _thick(d, [(bx + bl * 0.35, by - bh * 0.1), (hx, hy)], hr * _u(rng, 0.9, 1.3))
        tail_base = (bx - bl / 2 + 6, by - bh * 0.15)
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
    if cat:
        # ears: two upright pointed triangles; a tiny muzzle bump at most
        for off in (-0.45, 0.35):
            ex = hx + off * hr
            eh, ew = hr * _u(rng, 0.9, 1.4), hr * _u(rng, 0.6, 0.85)
            lean = _u(rng, -0.25, 0.25) * eh
            d.polygon([(ex - ew / 2, hy - hr * 0.55), (ex + ew / 2, hy - hr * 0.55), (ex + lean, hy - hr * 0.55 - eh)], fill=255)
        m = hr * _u(rng, 0.0, 0.25)
        d.ellipse([hx + hr * 0.5, hy - hr * 0.15, hx + hr * 0.9 + m, hy + hr * 0.45], fill=255)
        # tail: long, thin, rising from the rump in a curve
        tl, tw = _u(rng, 100, 140), _u(rng, 14, 20)
        a = math.radians(_u(rng, 150, 200))  # leaving backwards
        curl = _u(rng, 0.25, 0.5) * (1 if rng.random() < 0.85 else -1)
        (x, y), pts = tail_base, []
        for _ in range(8):
            pts.append((x, y))
            a += curl  # turning upwards
            x, y = x + math.cos(a) * tl / 7, y - abs(math.sin(a)) * tl / 7 * (1 if curl > 0 else 0.4)
        _thick(d, pts, tw)
    else:
        # muzzle: a rounded box sticking out forwards (a little down)
        ml, mh = hr * _u(rng, 1.2, 2.0), hr * _u(rng, 0.6, 0.85)
        droop = _u(rng, 0.0, 0.35) * hr
        d.rounded_rectangle([hx, hy - mh / 2 + droop, hx + hr * 0.4 + ml, hy + mh / 2 + droop], radius=mh * 0.45, fill=255)
        if rng.random() < 0.85:  # floppy ears hanging down the side of the head
            ex = hx - hr * _u(rng, 0.1, 0.5)
            el, ew = hr * _u(rng, 1.1, 1.6), hr * _u(rng, 0.5, 0.8)
            d.ellipse([ex - ew / 2, hy - hr * 0.6, ex + ew / 2, hy - hr * 0.6 + el * 1.3], fill=255)
            _thick(d, [(ex, hy - hr * 0.8), (ex - ew * 0.2, hy - hr * 0.2)], ew * 0.9)
        else:  # upright ears with rounded tips
            for off in (-0.5, 0.2):
                ex = hx + off * hr
                eh = hr * _u(rng, 0.6, 0.95)
                _thick(d, [(ex, hy - hr * 0.5), (ex + hr * 0.1, hy - hr * 0.5 - eh)], hr * _u(rng, 0.45, 0.6))
        # tail: short and thick, up and back, straight or a little bent
        tl, tw = _u(rng, 18, 38), _u(rng, 10, 14)
        a = math.radians(_u(rng, 120, 175))
        x0, y0 = tail_base
        x1, y1 = x0 + math.cos(a) * tl * 0.5, y0 - math.sin(a) * tl * 0.5
        a += _u(rng, -0.3, 0.3)
        _thick(d, [(x0, y0), (x1, y1), (x1 + math.cos(a) * tl * 0.5, y1 - math.sin(a) * tl * 0.5)], tw)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(_u(rng, -20, 20), resample=Image.Resampling.BILINEAR, expand=True)
    return img.crop(img.getbbox())


# How hard `photo` is: the plain script scored 0.735-0.80 at 64 px with these (smaller animals
# or more clutter left it at chance, 0.50-0.62, after 15 epochs).
PHOTO = {
    "object": (0.3, 0.6),  # share of the image the animal spans (width or height, the larger)
    "clutter": (3, 10),  # clutter shapes behind it (low inclusive, high exclusive)
    "occluded": 0.35,  # chance of 1-3 thin lines in front of it
    "noise": (3, 20),  # gaussian noise sigma, in 0-255 levels
    "blur": 0.5,  # chance of a slight gaussian blur
    "sit": {"cat": 0.0, "dog": 0.0},  # chance that the animal sits (off: the bench's figures were measured standing)
    "depth_of_field": (0.0, 0.0),  # blur radius of the background, as a share of the shorter side
    "contrast": 90,  # least RGB distance of the animal's colour from the mean colour behind it
}


def photo_image(rng: np.random.Generator, cls: str) -> tuple[Image.Image, int]:
    """(RGB image, JPEG quality)."""
    w, h = int(rng.integers(300, 521)), int(rng.integers(300, 521))
    while abs(w - h) < 12:  # never square
        w = int(rng.integers(300, 521))
    side = min(w, h)
    bg = _gradient_background(rng, w, h, texture=_u(rng, 15, 60))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, w, h, int(rng.integers(*PHOTO["clutter"])), scale=1.0)

    lo, hi = PHOTO["depth_of_field"]
    if hi > 0:  # the background out of focus, as behind a subject a camera focused on
        img = img.filter(ImageFilter.GaussianBlur(side * _u(rng, lo, hi)))
        draw = ImageDraw.Draw(img)
    mask = _animal_mask(rng, cls)
    # The animal spans `frac` of the image along its dominant side (squashing keeps that share).
    frac = _u(rng, *PHOTO["object"])
    k = frac / max(mask.width / w, mask.height / h)
    mw, mh = max(4, round(mask.width * k)), max(4, round(mask.height * k))
    mask = mask.resize((mw, mh), Image.Resampling.LANCZOS)
    x, y = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
    under = np.asarray(img.crop((x, y, x + mw, y + mh)), dtype=np.float32).reshape(-1, 3).mean(0)
    base = np.array(_far_colour(rng, under, PHOTO["contrast"]), dtype=np.float32)
    shade = 1 + (_smooth_noise(rng, mw, mh, max(3, mw // 5)) - 0.5) * _u(rng, 0.1, 0.5)  # fur, light
    ys = np.linspace(-1, 1, mh, dtype=np.float32)[:, None, None]
    shade = shade + ys * _u(rng, -0.25, 0.25)
    animal = Image.fromarray(np.clip(base * shade, 0, 255).astype(np.uint8), "RGB")
    img.paste(animal, (x, y), mask)

    if rng.random() < PHOTO["occluded"]:  # something in front: a branch, a wire, a blade of grass
        for _ in range(int(rng.integers(1, 4))):
            a = _u(rng, 0, math.pi)
            cx, cy = x + _u(rng, 0, mw), y + _u(rng, 0, mh)
            L = side * _u(rng, 0.1, 0.5)
            draw.line([cx - math.cos(a) * L, cy - math.sin(a) * L, cx + math.cos(a) * L, cy + math.sin(a) * L],
                      fill=_colour(rng), width=max(1, int(side * _u(rng, 0.003, 0.012))))  # fmt: skip
    arr = np.asarray(img, dtype=np.float32)
    out = Image.fromarray(_add_noise(rng, arr, _u(rng, *PHOTO["noise"])), "RGB")
    if rng.random() < PHOTO["blur"]:
        out = out.filter(ImageFilter.GaussianBlur(_u(rng, 0.4, 1.6)))
    return out, int(rng.integers(70, 96))


# --- shapes10 -----------------------------------------------------------------------------


def _star(cx: float, cy: float, r: float, points: int, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(points * 2):
        rr = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + k * math.pi / points
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _shape_mask(rng: np.random.Generator, cls: str, n: int = 128) -> Image.Image:
    """A shape filling about the middle of an n x n 'L' canvas, before rotation."""
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    c, r = n / 2, n * 0.36
    if cls == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif cls == "square":
        s = r * 0.85
        d.rectangle([c - s, c - s, c + s, c + s], fill=255)
    elif cls == "triangle":
        d.polygon(_star(c, c + r * 0.15, r * 1.1, 3, 0.5)[::2], fill=255)
    elif cls == "star":
        d.polygon(_star(c, c, r * 1.1, 5, _u(rng, 0.38, 0.5)), fill=255)
    elif cls == "plus":
        t = r * _u(rng, 0.28, 0.4)
        d.rectangle([c - r, c - t, c + r, c + t], fill=255)
        d.rectangle([c - t, c - r, c + t, c + r], fill=255)
    elif cls == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        ri = r * _u(rng, 0.45, 0.62)
        d.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
    elif cls == "arrow":
        t = r * 0.25
        d.rectangle([c - r, c - t, c + r * 0.2, c + t], fill=255)
        d.polygon([(c + r * 0.1, c - r * 0.65), (c + r, c), (c + r * 0.1, c + r * 0.65)], fill=255)
    elif cls == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        o = r * _u(rng, 0.4, 0.6)
        d.ellipse([c - r + o, c - r - o * 0.2, c + r + o, c + r - o * 0.2], fill=0)
    elif cls == "heart":
        q = r * 0.5
        d.ellipse([c - r, c - r * 0.75, c, c + r * 0.25], fill=255)
        d.ellipse([c, c - r * 0.75, c + r, c + r * 0.25], fill=255)
        d.polygon([(c - r * 0.95, c - q * 0.1), (c + r * 0.95, c - q * 0.1), (c, c + r)], fill=255)
    elif cls == "hourglass":
        s = r * 0.8
        d.polygon([(c - s, c - r), (c + s, c - r), (c, c)], fill=255)
        d.polygon([(c - s, c + r), (c + s, c + r), (c, c)], fill=255)
    else:
        raise ValueError(cls)
    return m


def shapes10_image(rng: np.random.Generator, cls: str) -> Image.Image:
    n, size = 128, 32
    bg = _gradient_background(rng, n, n, texture=_u(rng, 10, 50))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # a few thin lines in the background
        draw.line([tuple(rng.uniform(0, n, 2)), tuple(rng.uniform(0, n, 2))], fill=_colour(rng), width=int(rng.integers(2, 5)))
    mask = _shape_mask(rng, cls, n).rotate(_u(rng, 0, 360), resample=Image.Resampling.BILINEAR)
    k = _u(rng, 0.55, 1.0)
    mw = max(8, round(n * k))
    mask = mask.resize((mw, mw), Image.Resampling.BILINEAR)
    shift = n - mw
    x, y = int(rng.integers(-shift // 6, shift + shift // 6 + 1)), int(rng.integers(-shift // 6, shift + shift // 6 + 1))
    under = np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(0)
    layer = Image.new("RGB", (mw, mw), _far_colour(rng, under, 110))
    img.paste(layer, (x, y), mask)
    small = img.resize((size, size), Image.Resampling.BOX)
    return Image.fromarray(_add_noise(rng, np.asarray(small, dtype=np.float32), _u(rng, 2, 14)), "RGB")


# --- icons --------------------------------------------------------------------------------


def _glyph_mask(rng: np.random.Generator, cls: str, n: int = 256) -> Image.Image:
    """An icon glyph on an n x n 'L' canvas, filling about 70% of it."""
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    c, r = n / 2, n * 0.36
    lw = int(n * _u(rng, 0.07, 0.1))  # stroke width
    if cls == "house":
        d.polygon([(c - r * 1.05, c - r * 0.05), (c, c - r), (c + r * 1.05, c - r * 0.05)], fill=255)
        d.rectangle([c - r * 0.72, c - r * 0.1, c + r * 0.72, c + r * 0.9], fill=255)
        d.rectangle([c - r * 0.2, c + r * 0.3, c + r * 0.2, c + r * 0.9], fill=0)  # door
    elif cls == "envelope":
        box = [c - r, c - r * 0.65, c + r, c + r * 0.65]
        d.rectangle(box, outline=255, width=lw)
        d.line([(c - r, c - r * 0.62), (c, c + r * 0.1), (c + r, c - r * 0.62)], fill=255, width=lw, joint="curve")
    elif cls == "magnifier":
        rr = r * 0.6
        gx, gy = c - r * 0.25, c - r * 0.25
        d.ellipse([gx - rr, gy - rr, gx + rr, gy + rr], outline=255, width=lw)
        d.line([(gx + rr * 0.7, gy + rr * 0.7), (c + r, c + r)], fill=255, width=int(lw * 1.4))
    elif cls == "check":
        d.line([(c - r, c), (c - r * 0.3, c + r * 0.65), (c + r, c - r * 0.75)], fill=255, width=int(lw * 1.5), joint="curve")
    elif cls == "lock":
        d.rounded_rectangle([c - r * 0.8, c - r * 0.1, c + r * 0.8, c + r], radius=r * 0.15, fill=255)
        d.arc([c - r * 0.5, c - r * 0.95, c + r * 0.5, c + r * 0.1], 180, 360, fill=255, width=lw)
        d.line([(c - r * 0.5 + lw / 2, c - r * 0.45), (c - r * 0.5 + lw / 2, c - r * 0.05)], fill=255, width=lw)
        d.line([(c + r * 0.5 - lw / 2, c - r * 0.45), (c + r * 0.5 - lw / 2, c - r * 0.05)], fill=255, width=lw)
        d.ellipse([c - r * 0.14, c + r * 0.3, c + r * 0.14, c + r * 0.58], fill=0)  # keyhole
    elif cls == "bell":
        d.chord([c - r * 0.6, c - r * 0.85, c + r * 0.6, c + r * 0.35], 180, 360, fill=255)
        d.polygon([(c - r * 0.6, c - r * 0.25), (c + r * 0.6, c - r * 0.25), (c + r * 0.9, c + r * 0.55), (c - r * 0.9, c + r * 0.55)], fill=255)
        d.ellipse([c - r * 0.2, c + r * 0.5, c + r * 0.2, c + r * 0.9], fill=255)
        d.ellipse([c - r * 0.1, c - r * 1.0, c + r * 0.1, c - r * 0.8], fill=255)
    elif cls == "cloud":
        for cx, cy, rr in ((c - r * 0.5, c + r * 0.1, r * 0.42), (c, c - r * 0.2, r * 0.55), (c + r * 0.5, c + r * 0.05, r * 0.45)):
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
        d.rounded_rectangle([c - r * 0.92, c + r * 0.05, c + r * 0.95, c + r * 0.5], radius=r * 0.22, fill=255)
    elif cls == "gear":
        teeth = int(rng.integers(6, 10))
        ro, ri = r, r * 0.72
        pts = []
        for k in range(teeth * 4):
            a = 2 * math.pi * k / (teeth * 4)
            rr = ro if (k % 4) in (1, 2) else ri
            pts.append((c + rr * math.cos(a), c + rr * math.sin(a)))
        d.polygon(pts, fill=255)
        h = r * 0.3
        d.ellipse([c - h, c - h, c + h, c + h], fill=0)
    else:
        raise ValueError(cls)
    return m


def icons_image(rng: np.random.Generator, cls: str) -> Image.Image:
    n = 192  # drawn at 2-4x the final 48-96 px
    size = int(rng.integers(48, 97))
    badge = rng.random() < 0.4

    def placed(mask: Image.Image, k: float) -> Image.Image:
        mask = mask.rotate(_u(rng, -12, 12), resample=Image.Resampling.BILINEAR)
        mw = round(n * k)
        mask = mask.resize((mw, mw), Image.Resampling.BILINEAR)
        out = Image.new("L", (n, n), 0)
        j = int(n * 0.06)
        out.paste(mask, ((n - mw) // 2 + int(rng.integers(-j, j + 1)), (n - mw) // 2 + int(rng.integers(-j, j + 1))))
        return out

    glyph = np.asarray(placed(_glyph_mask(rng, cls, n), _u(rng, 0.5, 0.7) if badge else _u(rng, 0.75, 1.05)), np.float32) / 255
    colour = np.array(_far_colour(rng, np.array([255, 255, 255]), 160), np.float32)
    if rng.random() < 0.5:  # a vertical two-colour gradient
        other = np.array(_far_colour(rng, np.array([255, 255, 255]), 160), np.float32)
        t = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
        fill = colour * (1 - t) + other * t
    else:
        fill = np.broadcast_to(colour, (n, n, 3))
    if badge:  # the glyph is cut out of a rounded square
        b = Image.new("L", (n, n), 0)
        inset = n * _u(rng, 0.02, 0.08)
        ImageDraw.Draw(b).rounded_rectangle([inset, inset, n - inset, n - inset], radius=n * _u(rng, 0.1, 0.3), fill=255)
        shape = np.asarray(b, np.float32) / 255 * (1 - glyph)
    else:
        shape = glyph

    # garbage under the transparent pixels: noise, blobs and a glyph of another class
    garbage = Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8), "RGB")
    gd = ImageDraw.Draw(garbage)
    _clutter(gd, rng, n, n, int(rng.integers(2, 8)), scale=1.0)
    decoy_cls = ICON_CLASSES[(ICON_CLASSES.index(cls) + int(rng.integers(1, len(ICON_CLASSES)))) % len(ICON_CLASSES)]
    decoy = placed(_glyph_mask(rng, decoy_cls, n), _u(rng, 0.7, 1.0))
    garbage.paste(Image.new("RGB", (n, n), _colour(rng)), (0, 0), decoy)
    rgb = np.asarray(garbage, np.float32)

    alpha = shape
    if rng.random() < 0.4:  # a soft drop shadow, black at 25-45% opacity
        off = int(n * _u(rng, 0.02, 0.05))
        sh = Image.fromarray((shape * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(n * 0.02))
        sh_a = np.roll(np.asarray(sh, np.float32) / 255, (off, off), axis=(0, 1)) * _u(rng, 0.25, 0.45)
        rgb = np.where(sh_a[..., None] > 0.01, 0.0, rgb)
        alpha = shape + sh_a * (1 - shape)
    rgb = np.where(shape[..., None] > 0.004, fill, rgb)
    rgba = np.dstack([np.clip(rgb, 0, 255), np.clip(alpha * 255, 0, 255)]).round().astype(np.uint8)
    # Premultiplied resize (Pillow does that for RGBA), then put the garbage back under
    # the pixels the resize left fully transparent.
    small = np.array(Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.LANCZOS))
    noise = np.asarray(garbage.resize((size, size), Image.Resampling.NEAREST))
    clear = small[..., 3] == 0
    small[..., :3][clear] = noise[clear]
    return Image.fromarray(small, "RGBA")


# --- writing ------------------------------------------------------------------------------


def _jobs(name: str, scale: float) -> list[tuple[str, str, int, str, str]]:
    """(set, split, index, class, relative path) for every file of a generated set."""
    classes = {"photo": PHOTO_CLASSES, "shapes10": SHAPE_CLASSES, "icons": ICON_CLASSES}[name]
    ext = ".jpg" if name == "photo" else ".png"
    jobs = []
    for split, count in zip(SPLITS, COUNTS[name]):
        n = max(len(classes), round(count * scale))
        for i in range(n):
            cls = classes[i % len(classes)]
            jobs.append((name, split, i, cls, f"{split}/{cls}/{cls}_{i:05d}{ext}"))
    return jobs


def _write_one(job: tuple[str, str, int, str, str], folder: str) -> None:
    name, split, index, cls, rel = job
    rng = _rng(name, split, index)
    out = os.path.join(folder, rel)
    if name == "photo":
        img, quality = photo_image(rng, cls)
        img.save(out, "JPEG", quality=quality)
    elif name == "shapes10":
        shapes10_image(rng, cls).save(out, "PNG")
    else:
        icons_image(rng, cls).save(out, "PNG")


def _write_chunk(jobs: list, folder: str) -> int:
    for job in jobs:
        _write_one(job, folder)
    return len(jobs)


def _write_digits(folder: Path, scale: float) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = max(50, round(len(digits.target) * scale))
    counts = {"train": 0, "heldout": 0}
    for i, (image, target) in enumerate(zip(digits.images[:n], digits.target[:n])):
        split = "heldout" if i % 5 == 4 else "train"
        out = folder / split / str(target) / f"digit_{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)  # dark ink on white
        Image.fromarray(pixels, "L").resize((64, 64), Image.Resampling.BICUBIC).save(out)
        counts[split] += 1
    return counts


def _stamp(name: str, scale: float) -> dict:
    return {"set": name, "scale": scale, "generator_version": GENERATOR_VERSION}


def make_set(name: str, root: str | os.PathLike, *, scale: float = 1.0, processes: int | None = None, force: bool = False) -> Path:
    """Write ROOT/<name>/{train,heldout}/<class>/* (reused when already written at this scale).

    processes: worker processes for writing (default: up to 2, fewer for small sets).
    """
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; sets: {', '.join(SETS)}")
    folder = Path(root) / name
    meta_path = folder / "dataset.json"
    if not force and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in ("set", "scale", "generator_version")} == _stamp(name, scale):
            return folder
    if folder.exists():
        shutil.rmtree(folder)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    if name == "digits":
        counts = _write_digits(staging, scale)
        classes = [str(d) for d in range(10)]
    else:
        jobs = _jobs(name, scale)
        for d in {os.path.dirname(j[4]) for j in jobs}:
            (staging / d).mkdir(parents=True, exist_ok=True)
        counts = {s: sum(j[1] == s for j in jobs) for s in SPLITS}
        classes = list(dict.fromkeys(j[3] for j in jobs))
        procs = processes or min(2, os.cpu_count() or 1)
        if procs <= 1 or len(jobs) < 200:
            _write_chunk(jobs, str(staging))
        else:
            chunks = [jobs[i::procs * 8] for i in range(procs * 8)]
            with ProcessPoolExecutor(procs) as pool:
                list(pool.map(_write_chunk, chunks, [str(staging)] * len(chunks)))
    meta = {**_stamp(name, scale), "classes": classes, "counts": counts, "seconds": round(time.perf_counter() - start, 1)}
    (staging / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to write the sets into (ROOT/<set>/...)")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ",".join(SETS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the file counts (0.1 for a smoke test)")
    parser.add_argument("--processes", type=int, default=None, help="writer processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="rewrite sets already written")
    args = parser.parse_args(argv)
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        start = time.perf_counter()
        folder = make_set(name, args.root, scale=args.scale, processes=args.processes, force=args.force)
        meta = json.loads((folder / "dataset.json").read_text())
        print(f"{name:9s} {meta['counts']['train']:6,d} train + {meta['counts']['heldout']:5,d} held out, "
              f"{len(meta['classes'])} classes -> {folder}  ({time.perf_counter() - start:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
