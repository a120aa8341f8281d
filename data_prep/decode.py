"""One read-and-decode function, shared by prep, predict and the logged MLflow model.

`load_image` is what they call: a file (or bytes already in memory) in, its pixels or
the reason why not out. Training and prediction thus decode with the same `decode_image`,
so pixels cannot drift between them, and read files with the same `read_file`, so one
size cap applies to both.
Steps: open (header only) -> JPEG draft mode (the decoder scales by 1/2, 1/4 or 1/8 while
decoding, never below the target) -> refuse more pixels than the budget, from the header,
before anything is decoded -> EXIF orientation ->
any mode to RGB (alpha composited on white, 16-bit scaled, not clipped) -> square of
`size` by squash, centre crop or letterbox pad (black bars) -> uint8 (size, size, 3).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.options import RESIZE_MODES

# Files listed (and scanned) as images, by lower-case extension: the formats Pillow
# decodes by itself, without external tools. Anything else is skipped and counted.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".avif",
        ".bmp", ".dib", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
    }
)  # fmt: skip

# Pillow's default decompression-bomb limit (89.5 Mpx), as our own constant: Pillow only
# warns between 1x and 2x of its global limit, and changing that global affects everyone.
# It is the budget when the caller gives none; prep and predict pass their options'.
MAX_IMAGE_PIXELS = 89_478_485
MB = 1_000_000  # the unit of --max-file-mb

RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking, as torchvision's default
REDUCING_GAP = 3.0  # integer pre-reduction for big shrinks; Pillow: indistinguishable at >= 3
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as image viewers do
PAD_FILL = (0, 0, 0)  # letterbox bars

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can decode; `reason` says why, in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one file may cost; each is checked before the cost is paid."""

    max_bytes: int  # file size: checked before the file is read
    max_pixels: int  # pixels decoded at once (JPEGs at their draft scale): from the header

    @classmethod
    def of(cls, max_file_mb: float, max_megapixels: float) -> Limits:
        return cls(int(max_file_mb * MB), int(max_megapixels * 1_000_000))


def read_file(fs: pafs.FileSystem, path: str, *, max_bytes: int) -> bytes:
    """The file's bytes; UndecodableImage if it is over max_bytes, known before it is read.

    The size comes from the open file (a stat locally, the HEAD request on object stores
    that reading needs anyway); a file that grows meanwhile is still cut off at the cap.
    OSError when it cannot be read at all.
    """
    with fs.open_input_file(path) as src:
        size = src.size()
        data = b"" if size > max_bytes else src.read(max_bytes + 1)
    if size > max_bytes or len(data) > max_bytes:
        shown = max(size, len(data))
        raise UndecodableImage(f"file too large: {shown / MB:,.1f} MB, over the limit of {max_bytes / MB:g} MB")
    return data


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (size, size, 3), RGB, C-contiguous
    orig_height: int  # after EXIF orientation
    orig_width: int
    source_mode: str  # Pillow mode of the file: RGB, L, P, RGBA, CMYK, I;16, ...
    source_format: str  # Pillow format: JPEG, PNG, GIF, WEBP, ...
    exif_transposed: bool  # an EXIF orientation other than "upright" was applied


@dataclass(frozen=True)
class Loaded:
    """A file read and decoded (`decoded`), or why not (`error`): one of the two is set."""

    data: bytes | None  # the file's bytes, when they could be read (prep hashes them)
    decoded: Decoded | None
    error: str | None


def load_image(
    source: str | bytes, *, size: int, resize: str, limits: Limits, filesystem: pafs.FileSystem | None = None
) -> Loaded:
    """Read and decode one image; never raises for a bad or unreadable file.

    With `filesystem`, `source` is a path in it, read with `read_file` (the byte cap is
    checked before reading); without, `source` is the file's content already in memory,
    decoded as given (the cap is there to bound what is read). The error is
    UndecodableImage's reason (also a file over the size cap or the pixel budget), or
    "unreadable: ..." when the file cannot be read.
    """
    data = None
    try:
        data = source if filesystem is None else read_file(filesystem, source, max_bytes=limits.max_bytes)
        decoded = decode_image(data, size=size, resize=resize, max_pixels=limits.max_pixels)
    except UndecodableImage as exc:
        return Loaded(data, None, exc.reason)
    except OSError as exc:  # vanished, permission denied, network error
        return Loaded(None, None, f"unreadable: {exc}")
    return Loaded(data, decoded, None)


def decode_image(data: bytes, *, size: int, resize: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Decoded:
    """Decode any Pillow image (first frame) into upright RGB pixels of size x size.

    Raises UndecodableImage for empty, truncated, corrupt or non-image bytes and for
    images whose header promises more than `max_pixels` pixels to decode.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if not data:
        raise UndecodableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _decode(img, size, resize, max_pixels)
    except UndecodableImage:
        raise
    except UnidentifiedImageError:
        raise UndecodableImage("not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as exc:
        raise UndecodableImage(f"decompression bomb: {exc}") from None
    except OSError as exc:  # Pillow's error for truncated or broken image data
        raise UndecodableImage(f"truncated or corrupt: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: plugins raise anything; the caller quarantines with this reason
        raise UndecodableImage(f"corrupt: {type(exc).__name__}: {exc}") from None


def _decode(img: Image.Image, size: int, resize: str, max_pixels: int) -> Decoded:
    width, height = img.size
    source_mode, source_format = img.mode, img.format or "unknown"
    if img.format == "JPEG":
        # Decode at the smallest 1/2^k scale that still covers the target (measured
        # several times faster on photos than a full decode, see bench/bench_prep.py).
        img.draft(None, _needed_size(img.size, size, resize))
    # The budget, from the header alone (img.size is the draft scale now): before
    # getexif, which on a PNG may decode the whole image to reach an eXIf chunk.
    w, h = img.size
    if w * h > max_pixels:
        raise UndecodableImage(
            f"too many pixels: {w}x{h} = {w * h / 1e6:,.1f} Mpx to decode, "
            f"over the limit of {max_pixels / 1e6:g} Mpx"
        )
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation; 1 = upright
    transposed = orientation in (2, 3, 4, 5, 6, 7, 8)
    if orientation in (5, 6, 7, 8):  # quarter turns swap height and width
        width, height = height, width
    img.load()
    if transposed:
        ImageOps.exif_transpose(img, in_place=True)

    img = _to_rgb_or_rgba(img)
    img = _resize(img, size, resize)
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    if img.size != (size, size):  # pad: letterbox onto a square canvas
        canvas = Image.new("RGB", (size, size), PAD_FILL)
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        img = canvas
    pixels = np.array(img, dtype=np.uint8)  # a writable copy, (size, size, 3)
    return Decoded(pixels, height, width, source_mode, source_format, transposed)


def _needed_size(stored: tuple[int, int], size: int, resize: str) -> tuple[int, int]:
    """The smallest (w, h) the image may be decoded at before the final resample."""
    w, h = stored
    if resize == "squash":
        return size, size
    scale = size / (min(w, h) if resize == "crop" else max(w, h))
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    if img.mode in _INT_MODES:
        # 16-bit (and 32-bit int) grey: Pillow's conversion clips at 255; scale instead,
        # in place: one copy of the frame at its own width, not several 4-byte ones.
        grey = np.array(img)  # uint16 (I;16*) or int32 (I), writable
        if grey.dtype != np.uint16:
            np.clip(grey, 0, 65535, out=grey)
        grey >>= 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return img if img.mode == "RGBA" else img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize(img: Image.Image, size: int, resize: str) -> Image.Image:
    w, h = img.size
    if resize == "squash":
        return img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    if resize == "crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return img.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    scale = size / max(w, h)
    target = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
    return img.resize(target, RESAMPLE, reducing_gap=REDUCING_GAP)
