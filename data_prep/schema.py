"""The on-disk contract between prep, train and predict: shard schema and manifest.

Shard format version 2 (docs/architecture.md, Formats): one row per image, raw RGB uint8 pixels of
image_size x image_size x 3, row-major, in the `image` column, and the pixels' perceptual
hash in `phash` (data_prep/phash.py; version 1 had no `phash`, and is still read). Shards are read only
through data_prep/shard_reader.py. Binary rather than Arrow's fixed_shape_tensor: Parquet
stores a uint8 tensor as one INT32 value per pixel, which read 7-9x slower with pyarrow
and 1.2-2.6x slower through Ray Data (bench/bench_shard_format.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

SHARD_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: no phash column (near-duplicate checks then have nothing to match)
MANIFEST = "manifest.json"
REPORT = "report.json"
QUARANTINE = "quarantine.csv"
TRAIN, VAL, UNLABELED = "train", "val", "data"  # shard subfolders
SPLITS = (TRAIN, VAL, UNLABELED)  # every subfolder a prep output may have
UNLABELED_LABEL = -1
BY_CONTENT = ""  # a labelled file's split until its task has read its bytes (data_prep/splits.py)
# The split rule, recorded in the manifest: content_split of the file's sha256, each
# near-duplicate group in one split (unless --near-duplicates ignore), every class on both sides.
SPLIT_RULE = "sha256"


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def content_split(sha256: str, *, seed: int, val_fraction: float) -> str:
    """val when the hash of the file's bytes falls below val_fraction: identical bytes,
    one split, and adding files moves no other file."""
    return VAL if unit_hash(seed, sha256) < val_fraction else TRAIN

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("phash", pa.int64(), nullable=False),  # data_prep/phash.py's 64 bits, as a signed int
    ],
    metadata={b"cnnflow.shard_format_version": str(SHARD_FORMAT_VERSION).encode()},
)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or any URI pyarrow knows (s3://...)."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


# Object stores publish an object whole when its upload completes, and their `move` is a
# copy and a delete: a direct write is already all-or-nothing there.
WHOLE_OBJECT_STORES = frozenset({"s3", "gcs"})


def temp_name(name: str) -> str:
    """The hidden name a file is written under before it is renamed into place."""
    return f".{name}.tmp"


def write_atomic(uri: str, payload: bytes | pa.Buffer) -> None:
    """Replace the file at `uri` at once: a reader sees the old bytes or the new, never part.

    Written under `temp_name` in the same folder, then renamed over the target (a rename
    within one local file system is atomic), so a job killed mid-write leaves the old file
    whole and at most a hidden temporary that the next run removes.
    """
    fs, path = resolve(uri)
    if fs.type_name in WHOLE_OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(payload)
        return
    folder, _, name = path.rpartition("/")
    temp = join(folder, temp_name(name)) if folder else temp_name(name)
    with fs.open_output_stream(temp) as out:
        out.write(payload)
    try:
        fs.move(temp, path)
    except NotImplementedError:  # a file system without rename: the best it offers is a direct write
        fs.delete_file(temp)
        with fs.open_output_stream(path) as out:
            out.write(payload)


def write_json(uri: str, payload: dict[str, Any]) -> None:
    write_atomic(uri, json.dumps(payload, indent=2, sort_keys=False).encode() + b"\n")


def read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as src:
        return json.loads(src.read())


def read_manifest(data_dir: str) -> dict[str, Any]:
    """The manifest of a `cnnflow prep` output; a clear error if DATA is not one."""
    try:
        manifest = read_json(join(data_dir, MANIFEST))
    except FileNotFoundError as exc:  # other OSErrors (an unreachable S3 endpoint) speak for themselves
        raise FileNotFoundError(
            f"{data_dir} is not a `cnnflow prep` output (no {MANIFEST}: {exc}); "
            f"run `cnnflow prep IMAGES {data_dir}` first"
        ) from None
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise ValueError(f"{data_dir}: shard format {version}, this cnnflow reads {', '.join(map(str, READABLE_FORMATS))}")
    return manifest
