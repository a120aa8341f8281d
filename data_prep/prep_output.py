"""Prep's OUTPUT: what an earlier `cnnflow prep` wrote there, and claiming it for this run.

prep deletes or replaces only files it can prove it wrote: those its marker
(`data_prep/safety.py`) lists, or, for an output from before the marker, a manifest
beside shards whose Parquet footer carries the shard format stamp. Anything else where
prep writes is a refusal naming it, before anything is touched.
"""
from __future__ import annotations

import re

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep import safety
from data_prep.redact import redact_uri
from data_prep.scan import normalize_uri
from data_prep.schema import (
    BY_CONTENT,
    MANIFEST,
    QUARANTINE,
    REPORT,
    SHARD_SCHEMA,
    SPLITS,
    TRAIN,
    VAL,
    join,
    read_json,
    resolve,
    temp_name,
)

STAGE = "prep"  # the marker's `written_by` is "cnnflow prep"
SHARD_NAME = re.compile(r"(?:moved-)?part-\d{5}\.parquet")
MOVED_PREFIX = "moved-"  # a shard of rows data_prep/splits.py moved from the other split


def check_paths(input: str, output: str) -> set[str]:
    """Refuse an OUTPUT that overlaps INPUT or holds files prep did not write; read-only.

    Returns what an earlier prep wrote there (paths relative to OUTPUT), to be replaced.
    """
    safety.check_apart(input, output)
    return owned_files(output)


def owned_files(output: str) -> set[str]:
    """The files under OUTPUT that an earlier `cnnflow prep` wrote, relative to OUTPUT.

    Proof of authorship is prep's marker, which lists every file before any is written;
    an output from before the marker existed is recognised by a manifest beside shards
    whose Parquet footer carries the shard format stamp. Anything else that is not hidden,
    anywhere prep writes, makes this a refusal naming it.
    """
    fs, root = resolve(normalize_uri(output))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return set()
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"output {redact_uri(output)} is a file; give a folder")
    present: dict[str, pafs.FileInfo] = {}
    for entry in safety.visible_entries(fs, root):
        if entry.type == pafs.FileType.Directory and entry.base_name in SPLITS:
            for inner in safety.visible_entries(fs, entry.path):
                kind = "/" if inner.type == pafs.FileType.Directory else ""
                present[f"{entry.base_name}/{inner.base_name}{kind}"] = inner
        elif entry.type == pafs.FileType.Directory:
            present[entry.base_name + "/"] = entry
        else:
            present[entry.base_name] = entry

    marker = safety.read_marker(fs, root)
    if marker is None:
        owned = _stamped_files(fs, root, present)
    elif marker["written_by"] == f"cnnflow {STAGE}" and isinstance(marker.get("files"), list):
        owned = {f for f in marker["files"] if isinstance(f, str)}
    else:
        owned = set()  # another stage's output
    safety.refuse_foreign(output, sorted(p for p in present if p not in owned), stage=STAGE)
    return owned


def _stamped_files(fs: pafs.FileSystem, root: str, present: dict[str, pafs.FileInfo]) -> set[str]:
    """A prep output written before the marker: its manifest, report, quarantine and shards."""
    try:
        manifest = read_json(join(root, MANIFEST)) if MANIFEST in present else {}
    except (OSError, ValueError):
        return set()
    if not {"format_version", "content_hash", "classes"} <= set(manifest):
        return set()
    owned = {MANIFEST, REPORT, QUARANTINE} & set(present)
    stamp = next(iter(SHARD_SCHEMA.metadata))
    for rel, entry in present.items():
        split, _, name = rel.partition("/")
        if split in SPLITS and SHARD_NAME.fullmatch(name):
            try:
                metadata = pq.read_schema(entry.path, filesystem=fs).metadata or {}
            except (OSError, ValueError):
                continue
            if stamp in metadata:
                owned.add(rel)
    return owned


def shard_files(chunks: list[list[tuple[str, int, str]]]) -> list[str]:
    """The shards the tasks may write, relative to OUTPUT (see _run_tasks for the names).

    A labelled file's task writes it to train or val, and data_prep/splits.py may move it
    to a `moved-` shard of the other: all of those are named.
    """
    names = set()
    for i, chunk in enumerate(chunks):
        for split in {split for _, _, split in chunk}:
            if split == BY_CONTENT:
                names |= {f"{s}/{n}" for s in (TRAIN, VAL) for n in (shard_name(i), MOVED_PREFIX + shard_name(i))}
            else:
                names.add(f"{split}/{shard_name(i)}")
    return sorted(names)


def shard_name(task: int) -> str:
    return f"part-{task:05d}.parquet"


def claim_output(output: str, owned: set[str], shards: list[str]) -> str:
    """Replace an earlier prep's files (`owned`, from check_paths) and claim OUTPUT for this one.

    The old manifest goes first, so that a half-replaced output is never taken for a
    complete one; then the marker names every file this run will write, before any is.
    """
    out = normalize_uri(output)
    fs, root = resolve(out)
    for rel in sorted(owned, key=lambda r: r != MANIFEST):
        folder, _, name = join(root, rel).rpartition("/")
        for path in (join(folder, name), join(folder, temp_name(name))):
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
    for split in SPLITS:
        remove_if_empty(fs, join(root, split))
    fs.create_dir(root, recursive=True)
    safety.write_marker(out, f"cnnflow {STAGE}", files=sorted([MANIFEST, REPORT, QUARANTINE, *shards]))
    return out


def remove_if_empty(fs: pafs.FileSystem, folder: str) -> None:
    """Delete a folder only when nothing at all is in it (hidden files are not ours to remove)."""
    info = fs.get_file_info(folder)
    if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(folder)):
        fs.delete_dir(folder)
