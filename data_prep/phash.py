"""Perceptual hashes: 64 bits that stay nearly the same when an image is re-encoded,
resized or cropped a little, so near-duplicates are hashes a few bits apart.

`phash` is the DCT hash of imagehash.phash (Buchner's ImageHash, the usual reference):
the picture in grayscale at 32x32 (Pillow's LANCZOS), its 2-D DCT-II, the 8x8 lowest
frequencies, one bit per coefficient: above their median or not. Same bits as
`imagehash.phash` (tests/test_near_duplicates.py checks this); computed here as two
matrix products on a batch, which bench/bench_near_duplicates.py measured faster than
imagehash's per-image scipy calls. Prep hashes the pixels it writes and predict the
pixels it scores, so both sides hash what the model sees.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIDE = 32  # the grayscale picture the DCT is taken of
LOW = 8  # its LOW x LOW lowest frequencies make the 64 bits
# Unnormalised DCT-II (scipy.fft.dct's default): X_k = 2 * sum_n x_n cos(pi k (2n+1) / 2N)
_n = np.arange(HASH_SIDE)
DCT = (2 * np.cos(np.pi * _n[:LOW, None] * (2 * _n[None, :] + 1) / (2 * HASH_SIDE)))  # (LOW, HASH_SIDE)
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)  # first coefficient -> highest bit


def gray_32(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float (32, 32): Pillow's "L" conversion, then LANCZOS, as imagehash."""
    img = Image.fromarray(pixels, "RGB").convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float64)


def phash_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> uint64 (N,) perceptual hashes."""
    if not len(pixels):
        return np.zeros(0, np.uint64)
    gray = np.stack([gray_32(p) for p in pixels])  # (N, 32, 32)
    low = DCT @ gray @ DCT.T  # (N, 8, 8): rows' frequencies, then columns'
    flat = low.reshape(len(pixels), LOW * LOW)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def phash(pixels: np.ndarray) -> int:
    """One image's hash, as an int (0 <= h < 2**64): phash_batch's bits, without a batch's
    stacking (prep hashes each image as it decodes it)."""
    low = (DCT @ gray_32(pixels) @ DCT.T).ravel()
    bits = low > np.median(low)
    return int((bits.astype(np.uint64) * _BITS).sum(dtype=np.uint64))


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between hashes, elementwise."""
    x = np.atleast_1d(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1, dtype=np.int64)


def to_signed(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as the int64 a Parquet column stores (same bits)."""
    return np.asarray(hashes, np.uint64).view(np.int64)


def from_signed(column: np.ndarray) -> np.ndarray:
    return np.asarray(column, np.int64).view(np.uint64)
