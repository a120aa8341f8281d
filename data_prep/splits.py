"""Which split a labelled file goes to: decided by its bytes, near-duplicates kept together.

A file goes to val when `unit_hash(seed, sha256 of its bytes)` is below val_fraction, so
identical bytes land in one split wherever and however often they are filed, and a file
keeps its split when others are added. The task that reads a file decides
(shards.write_chunk). Once every task is done, `settle` moves rows so that:
- each near-duplicate group sits in one split (`--near-duplicates together`, the default):
  the split its member with the smallest sha256 gets by the rule above, whatever order the
  files were found in. A file can change split when a new near-copy of it arrives.
- each class of two or more files has a file on both sides: the file with the lowest hash
  goes to val, or the highest to train.
Moving rows rewrites the shard they left (streamed, replaced at once) and writes them to a
`moved-` shard of the other split; the counts, the content digest and the pixel
statistics follow them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.prep_output import MOVED_PREFIX
from data_prep.schema import SHARD_SCHEMA, TRAIN, VAL, content_split, join, resolve, temp_name, unit_hash
from data_prep.shard_reader import iter_batches, shard_files, to_pixels
from data_prep.shards import COMPRESSION, DIGEST_MODULUS, ChunkResult, file_digest


def moved_name(shard: str) -> str:
    return MOVED_PREFIX + shard  # named in prep's marker beforehand (prep_output.shard_files)


def settle(
    output: str,
    total: ChunkResult,
    near: dict[str, Any],
    *,
    num_classes: int,
    seed: int,
    val_fraction: float,
    together: bool,
) -> int:
    """Move rows between train and val as the module says; update `total` and the groups'
    splits in `near` (report.near_duplicates). Returns the number of files moved."""
    moves: dict[str, tuple[str, str]] = {}  # path -> (from split, to split)
    if together:
        for group in near["groups"]:
            if group["across_splits"]:
                first = min(f["sha256"] for f in group["files"])
                target = content_split(first, seed=seed, val_fraction=val_fraction)
                moves.update({f["path"]: (f["split"], target) for f in group["files"] if f["split"] != target})
        _move_rows(output, moves, total)
    sides = _both_sides(output, total, num_classes=num_classes, seed=seed)
    _move_rows(output, sides, total)
    moves.update(sides)
    for group in near["groups"]:
        for f in group["files"]:
            if f["path"] in moves:
                f["split"] = moves[f["path"]][1]
        group["across_splits"] = len({f["split"] for f in group["files"]}) > 1
    near["counts"]["across_splits"] = sum(g["across_splits"] for g in near["groups"])
    near["moved_to_keep_together"] = sum(1 for g in near["groups"] for f in g["files"] if f["path"] in moves)
    return len(moves)


def _both_sides(output: str, total: ChunkResult, *, num_classes: int, seed: int) -> dict[str, tuple[str, str]]:
    """For each class of two or more files all on one side, the file to move to the other."""
    moves = {}
    for label in range(num_classes):
        n = {split: total.counts[split, label] for split in (TRAIN, VAL)}
        if n[TRAIN] + n[VAL] < 2 or (n[TRAIN] and n[VAL]):
            continue
        src = TRAIN if n[TRAIN] else VAL
        ranked = []  # (hash, path) of this class's files: a small class, by construction
        for batch in iter_batches(output, src, columns=["path", "sha256", "label"], batch_size=65536):
            rows = batch.filter(pc.equal(batch["label"], label))
            ranked += [(unit_hash(seed, sha), path) for path, sha in zip(rows["path"].to_pylist(), rows["sha256"].to_pylist())]
        ranked.sort()
        path = ranked[0][1] if src == TRAIN else ranked[-1][1]  # the lowest hash to val, the highest to train
        moves[path] = (src, VAL if src == TRAIN else TRAIN)
    return moves


def _move_rows(output: str, moves: dict[str, tuple[str, str]], total: ChunkResult) -> None:
    """Move the rows of `moves`' paths to their new split: one Ray task per shard of the
    splits they leave (a shard with none of them is only read for its paths)."""
    import ray

    leaving: dict[str, set[str]] = defaultdict(set)
    for path, (src, _dst) in moves.items():
        leaving[src].add(path)
    task = ray.remote(num_cpus=1)(split_shard)
    pending = []
    for src, paths in leaving.items():
        wanted = ray.put(pa.array(sorted(paths), pa.string()))
        for shard in shard_files(output, src)[1]:  # listed before any moved- shard exists
            pending.append(task.remote(output, src, shard.rsplit("/", 1)[1], wanted))
    for moved in ray.get(pending):
        if moved is None:
            continue
        name, src, dst, kept_rows, moved_rows, delta = moved
        total.counts.update(delta.counts)  # update adds, negative counts included
        total.digest = (total.digest + delta.digest) % DIGEST_MODULUS
        total.histogram += delta.histogram
        uri = join(output, src, name)
        total.shards[join(output, dst, moved_name(name))] = moved_rows
        if kept_rows:
            total.shards[uri] = kept_rows
        else:
            del total.shards[uri]


def split_shard(
    output: str, src: str, name: str, wanted: pa.Array
) -> tuple[str, str, str, int, int, ChunkResult] | None:
    """Stream OUTPUT/SRC/NAME: rows whose path is in `wanted` go to DST/moved-NAME (DST the
    other split), the others into a copy that then replaces the shard (or the shard goes,
    if none stay). Returns (name, src, dst, rows kept, rows moved, what the move changes in
    the counts, digest and train's pixel histogram), or None when no row of it moves."""
    fs, root = resolve(output)
    shard = join(root, src, name)
    if not pc.any(pc.is_in(pq.read_table(shard, columns=["path"], filesystem=fs)["path"], value_set=wanted)).as_py():
        return None
    dst = VAL if src == TRAIN else TRAIN
    kept_path = join(root, src, temp_name(name))
    kept = pq.ParquetWriter(kept_path, SHARD_SCHEMA, filesystem=fs, compression=COMPRESSION)
    moved = pq.ParquetWriter(join(root, dst, moved_name(name)), SHARD_SCHEMA, filesystem=fs, compression=COMPRESSION)
    delta = ChunkResult()
    n_kept = n_moved = 0
    with fs.open_input_file(shard) as source:
        reader = pq.ParquetFile(source)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group)
            mask = pc.is_in(table["path"], value_set=wanted)
            stay, go = table.filter(pc.invert(mask)), table.filter(mask)
            if stay.num_rows:
                kept.write_table(stay, row_group_size=stay.num_rows)
            if go.num_rows:
                moved.write_table(go, row_group_size=go.num_rows)
                _account(go, src=src, dst=dst, delta=delta)
            n_kept, n_moved = n_kept + stay.num_rows, n_moved + go.num_rows
    kept.close()
    moved.close()
    if n_kept:
        fs.move(kept_path, shard)
    else:
        fs.delete_file(kept_path)
        fs.delete_file(shard)
    return name, src, dst, n_kept, n_moved, delta


def _account(rows: pa.Table, *, src: str, dst: str, delta: ChunkResult) -> None:
    """What moving `rows` from SRC to DST changes: counts, digest, train's pixel histogram."""
    labels, paths, shas = rows["label"].to_pylist(), rows["path"].to_pylist(), rows["sha256"].to_pylist()
    for path, label, sha in zip(paths, labels, shas):
        delta.counts[src, label] -= 1
        delta.counts[dst, label] += 1
        delta.digest = (delta.digest - file_digest(path, src, label, sha) + file_digest(path, dst, label, sha)) % DIGEST_MODULUS
    pixels = to_pixels(rows["image"]).reshape(-1, 3)
    sign = 1 if dst == TRAIN else -1  # the statistics are train's
    for c in range(3):
        delta.histogram[c] += sign * np.bincount(pixels[:, c], minlength=256)
