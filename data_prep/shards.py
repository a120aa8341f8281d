"""The shard writer: one chunk of files in, Parquet shards and a small summary out.

`write_chunk` is what each Ray task runs (see data_prep/pipeline.py). It reads each file
once, hashes and decodes it, streams rows to its own shard per split in bounded row
groups, and returns only small things: per-file records, counters and a pixel histogram.
Nothing decoded ever leaves the task, so memory does not grow with the input.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.decode import Decoded, Limits, load_image
from data_prep.phash import phash
from data_prep.schema import BY_CONTENT, SHARD_SCHEMA, TRAIN, content_split, join, resolve

COMPRESSION = "zstd"  # raw pixels: ~10-30% smaller, decompresses at GB/s
ROW_GROUP_BYTES = 16 << 20  # rows buffered per row group before it is written
PROGRESS_EVERY = 64  # files between progress messages from a task
SIZE_BINS = (64, 128, 256, 512, 1024, 2048, 4096)  # of the source's shorter side, px


DIGEST_MODULUS = 1 << 256


def file_digest(path: str, split: str, label: int, sha256: str) -> int:
    """One written file's share of the data's content hash (report.content_hash)."""
    return int.from_bytes(hashlib.sha256(f"{path}\t{split}\t{label}\t{sha256}".encode()).digest(), "big")


def sha_key(sha256: str) -> int:
    """A file's first 8 bytes of sha256: equal for identical files, rarely for others."""
    return int(sha256[:16], 16)


@dataclass
class ChunkResult:
    """What a task sends back: fixed-size aggregates, 8 bytes per written file, and the
    quarantined files (each with its reason, for the report)."""

    written: int = 0
    counts: Counter = field(default_factory=Counter)  # (split, label) -> files written
    # The sum, modulo 2**256, of each written file's file_digest: it does not depend on
    # the order files were written in, and the tasks' digests add up.
    digest: int = 0
    sha_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sha_key of each written file
    phashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # each written file's phash
    quarantined: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]
    shards: dict[str, int] = field(default_factory=dict)  # shard uri -> rows
    modes: Counter = field(default_factory=Counter)  # source mode -> images
    formats: Counter = field(default_factory=Counter)  # source format -> images
    sizes: Counter = field(default_factory=Counter)  # shorter-side bin -> images
    exif_transposed: int = 0
    upscaled: int = 0  # sources whose shorter side was below the target size
    # Per-channel histograms (3 x 256 counts) of the stats split's pixels: exact
    # mean and std come from them, and they add up across tasks.
    histogram: np.ndarray = field(default_factory=lambda: np.zeros((3, 256), np.int64))

    def count(self, decoded: Decoded, *, size: int, pixel_stats: bool) -> None:
        shorter = min(decoded.orig_height, decoded.orig_width)
        self.modes[decoded.source_mode] += 1
        self.formats[decoded.source_format] += 1
        self.sizes[size_bin(shorter)] += 1
        self.exif_transposed += decoded.exif_transposed
        self.upscaled += shorter < size
        if pixel_stats:
            flat = decoded.pixels.reshape(-1, 3)
            for c in range(3):  # per channel: bincount on a strided view beats one offset bincount
                self.histogram[c] += np.bincount(flat[:, c], minlength=256)


class _ShardWriter:
    """Rows for one shard, written in row groups of about ROW_GROUP_BYTES."""

    def __init__(self, uri: str, image_bytes: int):
        self.uri = uri
        self.group_rows = max(1, ROW_GROUP_BYTES // image_bytes)
        self.rows: list[tuple[bytes, int, str, str, int, int, int]] = []
        self.count = 0
        self._writer: pq.ParquetWriter | None = None  # opened on the first row

    def add(self, row: tuple[bytes, int, str, str, int, int, int]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self._writer is None:
            fs, path = resolve(self.uri)
            self._writer = pq.ParquetWriter(path, SHARD_SCHEMA, filesystem=fs, compression=COMPRESSION)
        columns = list(zip(*self.rows))
        table = pa.Table.from_arrays(
            [pa.array(col, type=f.type) for col, f in zip(columns, SHARD_SCHEMA)], schema=SHARD_SCHEMA
        )
        self._writer.write_table(table, row_group_size=len(self.rows))
        self.count += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()


def write_chunk(
    input: str,
    output: str,
    name: str,
    files: list[tuple[str, int, str]],
    *,
    size: int,
    resize: str,
    limits: Limits,
    stats_split: str = TRAIN,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Iterator[int | ChunkResult]:
    """Decode `files` ((path, label, split) under INPUT) into OUTPUT/<split>/<name>.

    A split of BY_CONTENT is decided here from the file's sha256, `seed` and
    `val_fraction` (data_prep/splits.py: content_split).
    Pixel statistics are gathered over the rows of `stats_split` only (train's, or all
    rows of unlabeled data).
    Yields the number of files done every PROGRESS_EVERY files, then one ChunkResult.
    An unreadable or undecodable file, or one over `limits`, is quarantined with its
    reason; nothing is dropped.
    """
    fs, root = resolve(input)
    result = ChunkResult()
    writers: dict[str, _ShardWriter] = {}
    keys: list[int] = []
    hashes: list[int] = []
    done = 0
    for path, label, split in files:
        loaded = load_image(join(root, path), size=size, resize=resize, limits=limits, filesystem=fs)
        if loaded.error is not None:
            result.quarantined.append({"path": path, "reason": loaded.error})
        else:
            data, decoded = loaded.data, loaded.decoded
            sha = hashlib.sha256(data).hexdigest()
            if split == BY_CONTENT:
                split = content_split(sha, seed=seed, val_fraction=val_fraction)
            if split not in writers:
                writers[split] = _ShardWriter(join(output, split, name), decoded.pixels.nbytes)
            pixels_hash = phash(decoded.pixels)
            writers[split].add(
                (decoded.pixels.tobytes(), label, path, sha, decoded.orig_height, decoded.orig_width,
                 pixels_hash - (1 << 64) if pixels_hash >= 1 << 63 else pixels_hash)  # int64 column, same bits
            )  # fmt: skip
            hashes.append(pixels_hash)
            result.written += 1
            result.counts[split, label] += 1
            result.digest = (result.digest + file_digest(path, split, label, sha)) % DIGEST_MODULUS
            keys.append(sha_key(sha))
            result.count(decoded, size=size, pixel_stats=split == stats_split)
        done += 1
        if done % PROGRESS_EVERY == 0:
            yield PROGRESS_EVERY
    for writer in writers.values():
        writer.close()
        result.shards[writer.uri] = writer.count
    result.sha_keys = np.array(keys, dtype=np.uint64)
    result.phashes = np.array(hashes, dtype=np.uint64)
    yield done % PROGRESS_EVERY
    yield result


def probe_chunk(input: str, files: list[tuple[str, int, str]], *, size: int, resize: str, limits: Limits) -> list[None]:
    """Read and decode `files` as write_chunk does, keeping nothing: the pass that finds
    which file of a chunk whose worker died is the one that kills it (data_prep/isolate.py).
    A file that fails as it would in write_chunk is write_chunk's to quarantine, not this."""
    fs, root = resolve(input)
    for path, _, _ in files:
        load_image(join(root, path), size=size, resize=resize, limits=limits, filesystem=fs)
    return [None] * len(files)


def size_bin(side: int) -> str:
    """Histogram bin of a source image's shorter side: '<64', '64-127', ..., '>=4096'."""
    low = 0
    for high in SIZE_BINS:
        if side < high:
            return f"<{high}" if low == 0 else f"{low}-{high - 1}"
        low = high
    return f">={SIZE_BINS[-1]}"
