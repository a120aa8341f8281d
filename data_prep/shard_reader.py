"""Every read of prep's shards, in one place: train, evaluation, promotion and predict call it.

    shard_files(root, splits)   the shard files of a prep output's splits, in a stable order
    read_dataset(root, splits)  the same files as a Ray Dataset (train's workers, predict)
    iter_batches(root, splits)  the same files as pyarrow RecordBatches, streamed (evaluation)
    read_table(root, splits)    all of them in memory at once (small data: tests, benchmarks)
    to_pixels(column)           an `image` column -> uint8 (N, S, S, 3), with no per-row loop

Files are listed as Ray Data lists a folder (names starting with "." or "_" left out,
sorted), so a seeded file shuffle reads the same order whether Ray or we listed them.
The `image` column is shard format version 1's binary column (schema.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep.schema import join, resolve

if TYPE_CHECKING:
    import ray.data

HIDDEN_PREFIXES = (".", "_")  # temporaries and Spark-style markers, as Ray Data skips them


def shard_files(root: str, splits: str | Iterable[str]) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the shard files of `splits` (subfolders of a prep output `root`).

    A missing split has no files; each split's files come sorted by name, splits in the
    order given.
    """
    fs, base = resolve(root)
    files: list[str] = []
    for split in [splits] if isinstance(splits, str) else splits:
        selector = pafs.FileSelector(join(base, split), allow_not_found=True)
        files += sorted(
            e.path for e in fs.get_file_info(selector)
            if e.type == pafs.FileType.File and e.path.endswith(".parquet") and not e.base_name.startswith(HIDDEN_PREFIXES)
        )  # fmt: skip
    return fs, files


def read_dataset(
    root: str,
    splits: str | Iterable[str],
    *,
    columns: Sequence[str] = ("image", "label"),
    shuffle_seed: int | None = None,
    preserve_order: bool = False,
    **read_args: Any,
) -> ray.data.Dataset:
    """`splits` of a prep output as a Ray Dataset of `columns`.

    `shuffle_seed`: the files are read in an order drawn from that seed (Ray Data's
    `FileShuffleConfig`), the same for the same seed. `preserve_order`: this dataset's
    execution keeps that order (with a seeded shuffle: one seed, one row order).
    `read_args` go to `ray.data.read_parquet` (num_cpus, ...).
    """
    import ray.data

    fs, files = shard_files(root, splits)
    if not files:
        raise FileNotFoundError(f"{root} has no shards under {', '.join([splits] if isinstance(splits, str) else splits)}/")
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(files, filesystem=fs, shuffle=shuffle, partitioning=None, **read_args)
    ds = ds.select_columns(list(columns))  # pushed down into the read (Ray 2.60 deprecates columns=)
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds


def iter_batches(
    root: str, splits: str | Iterable[str], *, columns: Sequence[str] = ("image", "label"), batch_size: int = 256
) -> Iterator[pa.RecordBatch]:
    """`splits` of a prep output as RecordBatches of `columns`, in `shard_files` order.

    One row group at a time, as pyarrow.dataset cuts them (a batch never spans two row
    groups), so memory holds one row group (prep writes ~16 MiB ones).
    """
    fs, files = shard_files(root, splits)
    for path in files:
        with fs.open_input_file(path) as src:
            shard = pq.ParquetFile(src)
            for group in range(shard.num_row_groups):
                yield from shard.iter_batches(batch_size=batch_size, row_groups=[group], columns=list(columns))


def read_table(root: str, splits: str | Iterable[str], *, columns: Sequence[str] = ("image", "label")) -> pa.Table:
    """`splits` of a prep output as one table of `columns`, in `shard_files` order."""
    fs, files = shard_files(root, splits)
    tables = [pq.read_table(path, columns=list(columns), filesystem=fs) for path in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def to_pixels(images: pa.Array | pa.ChunkedArray, image_size: int | None = None) -> np.ndarray:
    """An `image` column as one uint8 (N, S, S, 3) array, with no per-row Python loop.

    Every row holds S*S*3 bytes, so the column's data buffer already is the batch: from
    one chunk this is a read-only view of it; from several, one copy (writable). S comes
    from the rows' length, checked against `image_size` when given.
    """
    if isinstance(images, pa.ChunkedArray):
        chunks = [to_pixels(c, image_size) for c in images.chunks if len(c)]
        if len(chunks) == 1:
            return chunks[0]
        if chunks:
            return np.concatenate(chunks)
        images = pa.array([], images.type)
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        raise TypeError(f"image column of type {images.type}, expected binary (shard format 1)")
    n = len(images)
    offset_type = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    offsets = np.frombuffer(images.buffers()[1], dtype=offset_type, count=n + 1, offset=images.offset * offset_type().itemsize)
    row = image_size * image_size * 3 if image_size is not None else int(offsets[1] - offsets[0]) if n else 0
    size = image_size if image_size is not None else int(round((row / 3) ** 0.5))
    if row != size * size * 3:
        raise ValueError(f"image row 0 has {row} bytes, not the S*S*3 of a square RGB image")
    if n and not (np.diff(offsets) == row).all():
        bad = int(np.flatnonzero(np.diff(offsets) != row)[0])
        raise ValueError(f"image row {bad} has {offsets[bad + 1] - offsets[bad]} bytes, expected {row} ({size}x{size}x3)")
    if n == 0:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    data = np.frombuffer(images.buffers()[2], dtype=np.uint8, count=n * row, offset=int(offsets[0]))
    return data.reshape(n, size, size, 3)
