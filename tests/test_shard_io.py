"""Shard I/O in one place: data_prep/shard_reader.py (every shard read) and decode.load_image
(every read-and-decode of an input file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data_prep.decode import Limits, decode_image, load_image
from data_prep.schema import SHARD_SCHEMA, TRAIN, VAL
from data_prep.shard_reader import iter_batches, read_dataset, read_table, shard_files, to_pixels
from tests.images import encode, pattern_pixels

SIZE = 4
LIMITS = Limits(max_bytes=10_000_000, max_pixels=10_000_000)


def images(n: int, start: int = 0) -> np.ndarray:
    """n distinct SIZE x SIZE x 3 images: every pixel of image i holds (start + i) % 256."""
    return (np.arange(start, start + n, dtype=np.int64) % 256).astype(np.uint8)[:, None, None, None].repeat(SIZE, 1).repeat(SIZE, 2).repeat(3, 3)


def binary(px: np.ndarray, type: pa.DataType = pa.binary()) -> pa.Array:
    return pa.array([p.tobytes() for p in px], type)


def write_shard(path: Path, start: int, n: int, *, row_group: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": binary(images(n, start)),
            "label": pa.array(np.arange(start, start + n) % 3, pa.int32()),
            "path": pa.array([f"img_{i}.png" for i in range(start, start + n)]),
            "sha256": pa.array(["0" * 64] * n),
            "orig_height": pa.array([SIZE] * n, pa.int32()),
            "orig_width": pa.array([SIZE] * n, pa.int32()),
            "phash": pa.array(np.arange(start, start + n), pa.int64()),
        },
        schema=SHARD_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """Shards as prep lays them out, with files that are not shards beside them."""
    write_shard(tmp_path / "train/part-00001.parquet", 100, 70, row_group=30)
    write_shard(tmp_path / "train/part-00000.parquet", 0, 100, row_group=34)
    write_shard(tmp_path / "train/part-00002.parquet", 200, 5, row_group=5)
    write_shard(tmp_path / "val/part-00003.parquet", 300, 20, row_group=20)
    write_shard(tmp_path / "train/.part-00004.parquet", 400, 9, row_group=9)  # hidden: a temporary
    (tmp_path / "train/_SUCCESS.parquet").write_bytes(b"")
    (tmp_path / "train/notes.txt").write_text("not a shard")
    return tmp_path


def test_to_pixels_is_the_column_as_an_array_whatever_its_layout() -> None:
    px = images(7)
    for column in (
        binary(px),
        binary(px, pa.large_binary()),
        binary(images(10)).slice(0, 7),  # a slice: the data buffer starts before the first row
        pa.chunked_array([binary(px[:3]), binary(px[3:3]), binary(px[3:])]),
    ):
        out = to_pixels(column, SIZE)
        assert out.dtype == np.uint8 and out.shape == (7, SIZE, SIZE, 3)
        np.testing.assert_array_equal(out, px)
    np.testing.assert_array_equal(to_pixels(binary(px)), px)  # the size, from the rows' length
    np.testing.assert_array_equal(to_pixels(binary(images(10)).slice(3, 4)), images(10)[3:7])
    assert to_pixels(binary(px[:0]), SIZE).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"image row 1 has 3 bytes, expected 48 \(4x4x3\)"):
        to_pixels(pa.array([px[0].tobytes(), b"abc"]), SIZE)
    with pytest.raises(ValueError, match=r"row 0 has 48 bytes, expected 75 \(5x5x3\)"):
        to_pixels(binary(images(2)), 5)
    with pytest.raises(TypeError, match="expected binary"):
        to_pixels(pa.array([1, 2]))


def test_shard_files_list_a_folder_as_ray_data_does(prepared: Path) -> None:
    fs, files = shard_files(str(prepared), [TRAIN, VAL, "data"])
    assert isinstance(fs, pafs.LocalFileSystem)
    assert [f.split(str(prepared))[1] for f in files] == [
        "/train/part-00000.parquet", "/train/part-00001.parquet", "/train/part-00002.parquet", "/val/part-00003.parquet",
    ]  # fmt: skip
    assert shard_files(str(prepared), "data")[1] == []
    with pytest.raises(FileNotFoundError, match="no shards under data/"):
        read_dataset(str(prepared), "data")


def test_iter_batches_cut_as_pyarrow_dataset_cut_them(prepared: Path) -> None:
    """Evaluation's batches are what they were under pyarrow.dataset: same rows, same cuts."""
    ours = list(iter_batches(str(prepared), TRAIN, columns=["image", "label"], batch_size=16))
    folder = pads.dataset(prepared / TRAIN, format="parquet", exclude_invalid_files=True)  # notes.txt
    theirs = list(folder.to_batches(columns=["image", "label"], batch_size=16))
    assert [b.num_rows for b in ours] == [b.num_rows for b in theirs]
    assert all(a.equals(b) for a, b in zip(ours, theirs))
    table = read_table(str(prepared), [TRAIN, VAL], columns=["path"])
    assert table.column("path").to_pylist() == [f"img_{i}.png" for i in [*range(0, 170), *range(200, 205), *range(300, 320)]]


def test_read_dataset_reads_in_the_order_ray_read_the_folder_in(prepared: Path, ray_local) -> None:
    """The seeded file order train's --seed relies on is the one the folder read gave."""
    import ray.data

    for seed in (0, 1, 7):
        ds = read_dataset(str(prepared), TRAIN, columns=["image", "label"], shuffle_seed=seed, preserve_order=True)
        before = ray.data.read_parquet(str(prepared / TRAIN), shuffle=ray.data.FileShuffleConfig(seed=seed))
        before.context.execution_options.preserve_order = True
        ours, theirs = ds.to_arrow_refs(), before.select_columns(["image", "label"]).to_arrow_refs()
        ours, theirs = pa.concat_tables(ray.get(ours)), pa.concat_tables(ray.get(theirs))
        assert ours.column_names == ["image", "label"] and ours.equals(theirs)
    rows = read_dataset(str(prepared), [TRAIN, VAL], columns=["path", "image"]).take_all()
    assert sorted(r["path"] for r in rows) == sorted(f"img_{i}.png" for i in [*range(0, 170), *range(200, 205), *range(300, 320)])


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
