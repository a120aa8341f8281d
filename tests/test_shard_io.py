"""Read-and-decode in one place: decode.load_image (every read-and-decode of an input file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from data_prep.decode import Limits, decode_image, load_image
from tests.images import encode, pattern_pixels

LIMITS = Limits(max_bytes=10_000_000, max_pixels=10_000_000)


def test_load_image_gives_pixels_or_the_reason(tmp_path: Path) -> None:
    data = encode(pattern_pixels(1, 20, np.random.default_rng(0)), "PNG", "RGB")
    (tmp_path / "ok.png").write_bytes(data)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    fs = pafs.LocalFileSystem()
    expected = decode_image(data, size=8, resize="squash").pixels

    loaded = load_image(str(tmp_path / "ok.png"), size=8, resize="squash", limits=LIMITS, filesystem=fs)
    assert loaded.error is None and loaded.data == data
    np.testing.assert_array_equal(loaded.decoded.pixels, expected)
    from_bytes = load_image(data, size=8, resize="squash", limits=LIMITS)  # no filesystem: the content itself
    np.testing.assert_array_equal(from_bytes.decoded.pixels, expected)

    def error(source, limits=LIMITS, filesystem=fs) -> str:
        loaded = load_image(source, size=8, resize="squash", limits=limits, filesystem=filesystem)
        assert loaded.decoded is None
        return loaded.error

    assert error(str(tmp_path / "junk.png")).startswith("not an image")
    assert error(str(tmp_path / "gone.png")).startswith("unreadable: ")
    assert error(str(tmp_path / "ok.png"), Limits(max_bytes=10, max_pixels=10_000_000)).startswith("file too large")
    assert error(str(tmp_path / "ok.png"), Limits(max_bytes=10_000_000, max_pixels=100)).startswith("too many pixels")
    assert error(b"", filesystem=None) == "empty file"
    assert error(None, filesystem=None) == "empty file"  # a pyfunc row without bytes
