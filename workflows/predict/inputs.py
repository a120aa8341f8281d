"""What `cnnflow predict` scores: every image under an image folder, or every row of a prep output.

An image folder is listed by prep's own `scan` (the same files count as images, the same
are skipped, labels ignored); a prep output's shards hold pixels already resized, so
they must be what the model was trained on.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from data_prep import schema
from data_prep.options import PrepOptions
from data_prep.scan import PrepError, normalize_uri, scan
from data_prep.shard_reader import iter_batches, shard_files
from workflows.errors import CnnflowError


@dataclass(frozen=True)
class Inputs:
    kind: str  # "image folder" or "prep output"
    filesystem: pafs.FileSystem
    root: str  # INPUT's path in `filesystem`
    paths: pa.Array  # every input, relative to INPUT (string)
    skipped: dict[str, int]  # files and links left out (not images, outside INPUT, loops), by reason
    shards: str | None  # a prep output: its URI (its schema.SPLITS read with data_prep.shard_reader)
    unreadable: dict[str, str] = field(default_factory=dict)  # path as shown -> why it cannot be opened


def find_inputs(uri: str, preprocessing: dict[str, Any]) -> Inputs:
    """An image folder (recursive, labels ignored) or a `cnnflow prep` output."""
    fs, root = schema.resolve(normalize_uri(uri))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"input {uri} is not a folder")
    if fs.get_file_info(schema.join(root, schema.MANIFEST)).type == pafs.FileType.File:
        return _prep_output(uri, fs, root, preprocessing)

    try:  # prep's own listing: the same files count as images, the same are skipped
        found = scan(uri, PrepOptions(unlabeled=True))
    except PrepError as exc:
        raise CnnflowError(str(exc)) from None
    # Names that are not UTF-8 are listed under a readable form: one error row each.
    unreadable = {q["path"]: q["reason"] for q in found.quarantined}
    paths = pa.array([f.path for f in found.files] + list(unreadable), pa.string())
    skipped = dict(Counter(s["reason"] for s in found.skipped))
    return Inputs("image folder", fs, root, paths, skipped, None, unreadable)


def _prep_output(uri: str, fs: pafs.FileSystem, root: str, preprocessing: dict[str, Any]) -> Inputs:
    """Shards hold pixels resized at prep time: they must be what the model was trained on."""
    manifest = schema.read_manifest(uri)
    got = (manifest["image_size"], manifest["resize"])
    want = (preprocessing["image_size"], preprocessing["resize"])
    if got != want:
        raise CnnflowError(
            f"{uri} was prepared at {got[0]} px ({got[1]}) but the model expects {want[0]} px ({want[1]}); "
            f"run `cnnflow prep` again with --image-size {want[0]} --resize {want[1]}, or predict on the image folder"
        )
    shards = normalize_uri(uri)
    if not shard_files(shards, schema.SPLITS)[1]:
        raise CnnflowError(f"{uri} has a manifest but no shards under {', '.join(schema.SPLITS)}/")
    batches = iter_batches(shards, schema.SPLITS, columns=["path"], batch_size=2**16)
    paths = pa.concat_arrays([pa.array([], pa.string())] + [b.column(0) for b in batches])
    return Inputs("prep output", fs, root, paths, {}, shards)
