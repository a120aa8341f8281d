"""Poison files (issue #12): a file too large to read, an image too large to decode, and a
decode that kills its worker, each cost one quarantine row (prep) or error row (predict),
never the job. Real files, real Pillow, real Ray tasks; nothing mocked.
"""
from __future__ import annotations

import csv
import io
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from data_prep.decode import Limits, UndecodableImage, decode_image, read_file
from tests.images import encode, pattern_pixels

LOCAL = pafs.LocalFileSystem()


def image_bytes(width: int, height: int, fmt: str, dtype: type = np.uint8) -> bytes:
    """A real image of that size: a ramp, so that it compresses and the test stays small."""
    ramp = np.linspace(0, np.iinfo(dtype).max, width, dtype=np.float64).astype(dtype)
    pixels = np.broadcast_to(ramp, (height, width))
    img = Image.fromarray(np.ascontiguousarray(pixels)) if dtype == np.uint16 else Image.fromarray(
        np.ascontiguousarray(np.stack([pixels] * 3, axis=-1))
    )
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: reading it whole would take the machine's memory
    started = time.monotonic()
    with pytest.raises(UndecodableImage, match=r"file too large: 68,719.5 MB, over the limit of 100 MB"):
        read_file(LOCAL, str(huge), max_bytes=100_000_000)
    assert time.monotonic() - started < 1.0
    small = tmp_path / "small.png"
    small.write_bytes(b"x" * 1000)
    assert read_file(LOCAL, str(small), max_bytes=1000) == b"x" * 1000
    with pytest.raises(UndecodableImage, match="file too large: 0.0 MB"):
        read_file(LOCAL, str(small), max_bytes=999)


def test_the_pixel_budget_is_checked_from_the_header() -> None:
    png = image_bytes(1500, 1000, "PNG")  # 1.5 Mpx
    with pytest.raises(UndecodableImage, match=r"too many pixels: 1500x1000 = 1.5 Mpx to decode, over the limit of 1 Mpx"):
        decode_image(png, size=32, resize="squash", max_pixels=1_000_000)
    assert decode_image(png, size=32, resize="squash", max_pixels=1_500_000).orig_width == 1500


def test_a_jpeg_counts_at_the_scale_it_is_decoded_at() -> None:
    # 4000 x 3000 = 12 Mpx stored; for a 32 px target the decoder reads it at 1/8 (0.19 Mpx).
    jpeg = image_bytes(4000, 3000, "JPEG")
    decoded = decode_image(jpeg, size=32, resize="squash", max_pixels=1_000_000)
    assert (decoded.orig_width, decoded.orig_height) == (4000, 3000)
    with pytest.raises(UndecodableImage, match=r"too many pixels: 500x375"):
        decode_image(jpeg, size=32, resize="squash", max_pixels=100_000)


def test_a_sixteen_bit_png_is_scaled_in_place() -> None:
    png = image_bytes(2000, 2000, "PNG", np.uint16)  # 4 Mpx of 16-bit grey: 8 MB decoded
    tracemalloc.start()  # numpy's arrays are traced (Pillow's own buffer is not: 2 bytes a pixel)
    try:
        decoded = decode_image(png, size=32, resize="squash")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.source_mode.startswith("I;16")
    # Pillow's bytes and one uint16 array (4 bytes a pixel); widening to uint32 took 8.
    assert peak < 4.5 * 4_000_000


def test_predict_decodes_with_the_same_limits(ray_local, tmp_path: Path) -> None:
    from workflows.predict.pipeline import decode_batch

    (tmp_path / "ok.png").write_bytes(encode(pattern_pixels(0, 20, np.random.default_rng(0)), "PNG", "RGB"))
    (tmp_path / "wide.png").write_bytes(image_bytes(1500, 1000, "PNG"))
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(8 << 30)
    out = decode_batch(
        pa.table({"path": ["ok.png", "wide.png", "huge.png"]}),
        filesystem=LOCAL, root=str(tmp_path), size=16, resize="squash", limits=Limits.of(max_file_mb=1, max_megapixels=1),
    )
    errors = out.column("error").to_pylist()
    assert errors[0] is None and len(out.column("image")[0].as_py()) == 16 * 16 * 3
    assert errors[1].startswith("too many pixels: 1500x1000") and errors[2].startswith("file too large: 8,589.9 MB")
    assert out.column("image")[1].as_py() is None and out.column("image")[2].as_py() is None


def test_prep_quarantines_oversized_files_with_the_options_reasons(image_folder, ray_local, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    root, _ = image_folder(per_class=4)
    (root / "horizontal" / "wide.png").write_bytes(image_bytes(1500, 1000, "PNG"))
    with open(root / "vertical" / "huge.jpg", "wb") as f:
        f.truncate(8 << 30)
    result = CliRunner().invoke(
        cli, ["prep", str(root), str(tmp_path / "out"), "--image-size", "16", "--max-file-mb", "2", "--max-megapixels", "1"]
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "quarantine.csv", newline="") as f:  # the file the user reads
        rows = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert rows["horizontal/wide.png"].startswith("too many pixels: 1500x1000 = 1.5 Mpx")
    assert rows["vertical/huge.jpg"].startswith("file too large: 8,589.9 MB, over the limit of 2 MB")


# --- a decode that kills its worker ----------------------------------------------------
# No file makes Pillow crash on demand, and a test-only switch in the decoder is not
# allowed; so the isolation is tested with real Ray tasks that really die (os._exit, as a
# segfault or the OOM killer would end them), through the helper prep and predict use.


def test_items_that_kill_their_worker_are_isolated_and_the_rest_goes_on(ray_local) -> None:
    import ray

    from data_prep.isolate import run_isolating

    def decode_or_die(part: list[str]) -> list[str]:  # defined here: shipped to the worker by value
        for item in part:
            if item.startswith("poison"):
                os._exit(1)  # the process ends mid-task, as in a codec crash
        return [item.upper() for item in part]

    task = ray.remote(num_cpus=1)(decode_or_die)
    submitted: list[int] = []

    def submit(part):
        submitted.append(len(part))
        return task.options(max_retries=0).remote(list(part))

    items = [f"file{i}" for i in range(20)]
    items[3], items[17] = "poison-a", "poison-b"
    results, poison = run_isolating(submit, items)
    assert poison == [3, 17]
    assert results == [None if i in (3, 17) else item.upper() for i, item in enumerate(items)]
    assert submitted.count(1) >= 4  # each poison item died alone twice before it was blamed
    assert len(submitted) < 30  # halving, not one task per item

    clean, none = run_isolating(submit, ["a", "b"])
    assert (clean, none) == (["A", "B"], [])
    assert run_isolating(submit, []) == ([], [])


def test_a_chunk_whose_worker_died_is_cleaned_and_probed_before_it_runs_again(ray_local, tmp_path: Path) -> None:
    from data_prep.pipeline import _recover
    from data_prep.prep_output import shard_name

    (tmp_path / "in/a").mkdir(parents=True)
    chunk = []
    for i in range(5):
        (tmp_path / f"in/a/{i}.png").write_bytes(encode(pattern_pixels(0, 20, np.random.default_rng(i)), "PNG", "RGB"))
        chunk.append((f"a/{i}.png", 0, "train" if i % 2 else "val"))
    (tmp_path / "in/a/broken.png").write_bytes(b"not an image")  # write_chunk's to quarantine, not the probe's
    chunk.append(("a/broken.png", 0, "train"))
    for split in ("train", "val"):  # what a task that died mid-write leaves: no Parquet footer
        (tmp_path / "out" / split).mkdir(parents=True)
        (tmp_path / "out" / split / shard_name(3)).write_bytes(b"PAR1 cut off")
    rest, crashed = _recover(
        str(tmp_path / "in"), str(tmp_path / "out"), 3, chunk, size=16, resize="squash", limits=Limits.of(1, 1)
    )
    assert rest == chunk and crashed.quarantined == []  # no file here kills a worker
    assert not any((tmp_path / "out" / split / shard_name(3)).exists() for split in ("train", "val"))
