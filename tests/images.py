"""Tiny labelled image folders whose labels can be read back from the pixels.

Each class is a stripe pattern that survives resizing, JPEG, grayscale and horizontal
flips, so a test can tell a right prediction from a lucky one:

    0: horizontal stripes   1: vertical stripes   2: checkerboard   3: flat (no pattern)

Colours, phases, stripe widths and noise vary per image, so a model has to learn the
pattern, not a colour. `label_from_pixels` reads the class back without any model.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("horizontal", "vertical", "checker", "flat")
MAX_CLASSES = len(PATTERNS)


def pattern_pixels(label: int, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) pixels of class `label`."""
    h, w = (size, size) if isinstance(size, int) else size
    period = max(4, int(min(h, w) / rng.uniform(3.0, 5.0)))  # 3-5 stripes per side
    rows = (np.arange(h)[:, None] + rng.integers(period)) // (period // 2) % 2
    cols = (np.arange(w)[None, :] + rng.integers(period)) // (period // 2) % 2
    mask = {
        0: np.broadcast_to(rows, (h, w)),
        1: np.broadcast_to(cols, (h, w)),
        2: rows ^ cols,
        3: np.zeros((h, w), dtype=int),
    }[label]
    dark = rng.uniform(0, 90, size=3)
    light = rng.uniform(160, 255, size=3)
    if label == 3:  # flat: one colour between the two
        dark = light = rng.uniform(40, 220, size=3)
    img = np.where(mask[..., None].astype(bool), light, dark)
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def label_from_pixels(pixels: np.ndarray) -> int:
    """Read the class back from (H, W, 3) or (H, W) pixels, with no model."""
    gray = pixels.astype(np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    row_profile = gray.mean(axis=1).std()  # varies along rows: horizontal stripes
    col_profile = gray.mean(axis=0).std()  # varies along columns: vertical stripes
    overall = gray.std()
    if overall < 15:
        return 3
    if row_profile > 2 * col_profile and row_profile > 0.5 * overall:
        return 0
    if col_profile > 2 * row_profile and col_profile > 0.5 * overall:
        return 1
    return 2


@dataclass(frozen=True)
class ImageSpec:
    """One generated file: where it is and what class its pixels show."""

    path: Path
    label: int


# (extension, Pillow format, mode to save in): the formats and modes prep must read.
VARIANTS: tuple[tuple[str, str, str], ...] = (
    (".jpg", "JPEG", "RGB"),
    (".png", "PNG", "RGB"),
    (".png", "PNG", "L"),
    (".png", "PNG", "RGBA"),
    (".gif", "GIF", "P"),
    (".webp", "WEBP", "RGB"),
    (".bmp", "BMP", "RGB"),
    (".tiff", "TIFF", "CMYK"),
    (".JPG", "JPEG", "L"),
)


def encode(pixels: np.ndarray, fmt: str, mode: str) -> bytes:
    img = Image.fromarray(pixels, "RGB")
    if mode == "P":
        img = img.quantize(colors=64)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_image_folder(
    root: Path,
    *,
    classes: Sequence[str] = ("horizontal", "vertical", "checker"),
    per_class: int = 12,
    size: int | tuple[int, int] = 48,
    variants: Sequence[tuple[str, str, str]] = VARIANTS,
    seed: int = 0,
    layout: str = "folder",
) -> list[ImageSpec]:
    """Write `per_class` images of each class under `root` and return what was written.

    layout "folder": root/<class>/<i><ext>; "flat": root/<class>.<i><ext> (Kaggle's);
    "unlabeled": root/<i % 3>/<class>_<i><ext>, nested without class folders.
    Class i of `classes` draws pattern i, so at most four classes.
    """
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES} classes can be told apart by pattern")
    rng = np.random.default_rng(seed)
    written: list[ImageSpec] = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            ext, fmt, mode = variants[(i + label) % len(variants)]
            if layout == "folder":
                path = root / name / f"img_{i:04d}{ext}"
            elif layout == "flat":
                path = root / f"{name}.{i}{ext}"
            elif layout == "unlabeled":
                path = root / f"part{i % 3}" / f"{name}_{i:04d}{ext}"
            else:
                raise ValueError(f"unknown layout {layout!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(pattern_pixels(label, size, rng), fmt, mode))
            written.append(ImageSpec(path, label))
    return written
