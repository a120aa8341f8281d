"""Near-duplicates: groups of written files whose perceptual hashes are at most D bits apart.

Matching never compares all pairs. The 64 bits are cut into D+1 bands; two hashes at most
D bits apart agree exactly on at least one band (pigeonhole), so only hashes that share a
band's value are compared. One Ray task per band sorts the hashes by that band and compares
within each run of equal values: the work is N log N plus the pairs that share a bucket.
The driver joins the matched pairs into groups (union-find over the distinct hashes) and
reads the grouped files' path, label and split back from the shards, so it holds 8 bytes
per file and a record per grouped file, nothing more.

A trained model carries its training split's hashes (`training_hashes`, logged with the
model by train), and predict asks a `NearestIndex` of them, the same banded idea against
a fixed set, which training image each scored row is a near-copy of.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.phash import from_signed, to_signed
from data_prep.schema import SPLITS, TRAIN, read_manifest
from data_prep.shard_reader import iter_batches

BLOCK = 1024  # hashes compared at once in one bucket (a BLOCK x BLOCK distance matrix)
# (query, candidate) pairs compared at once by NearestIndex: 16 bytes each, 64 MiB
MAX_PAIRS = 1 << 22
HASHES_SCHEMA = pa.schema([pa.field("phash", pa.int64(), nullable=False), pa.field("path", pa.string(), nullable=False)])


def bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the distance+1 bands that cover the 64 bits, as even as they go."""
    n = distance + 1
    widths = [64 // n + (i < 64 % n) for i in range(n)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths))


def band_pairs(hashes: np.ndarray, shift: int, width: int, distance: int) -> np.ndarray:
    """(P, 2) indices i < j of the hashes that share this band's bits and are <= distance apart."""
    key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    found = [np.zeros((0, 2), np.int64)]
    for start, end in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
        members = order[start:end]
        h = hashes[members]
        for lo in range(0, len(members), BLOCK):  # rows lo.. against every later member
            block = h[lo : lo + BLOCK]
            near = np.bitwise_count(block[:, None] ^ h[None, :]) <= distance
            i, j = np.nonzero(near)
            i += lo
            keep = j > i
            found.append(np.stack([members[i[keep]], members[j[keep]]], axis=1))
    return np.concatenate(found)


def groups_of(hashes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """A group id per hash (union-find over `pairs`); -1 for hashes in no pair."""
    parent = np.arange(len(hashes))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    grouped = np.zeros(len(hashes), bool)
    grouped[pairs.ravel()] = True
    return np.array([root(i) if grouped[i] else -1 for i in range(len(hashes))], np.int64)


def match(phashes: np.ndarray, distance: int) -> dict[int, int]:
    """{hash: group} for every hash within `distance` of another written file's (the same
    hash twice counts: identical pixels), on Ray, one task per band."""
    import ray

    values, seen = np.unique(np.asarray(phashes, np.uint64), return_counts=True)
    ref = ray.put(values)
    task = ray.remote(num_cpus=1)(band_pairs)
    found = ray.get([task.remote(ref, shift, width, distance) for shift, width in bands(distance)])
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    group = groups_of(values, pairs)
    alone = (group < 0) & (seen > 1)  # one hash, several files: a group of its own
    group[alone] = len(values) + np.arange(int(alone.sum()))
    return {int(v): int(g) for v, g in zip(values[group >= 0].tolist(), group[group >= 0].tolist())}


def report(output: str, classes: list[str], phashes: np.ndarray, distance: int) -> dict[str, Any]:
    """report.json's `near_duplicates`: the groups, each file with its label and split,
    flagged when a group crosses train and val (`across_splits`: validation then scores
    pictures training saw) or classes (`across_classes`: label noise)."""
    group_of = match(phashes, distance)
    members: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if group_of:
        wanted = pa.array(to_signed(np.fromiter(group_of, np.uint64, len(group_of))), pa.int64())
        for split in SPLITS:
            for batch in iter_batches(output, split, columns=["phash", "path", "label", "sha256"], batch_size=65536):
                hits = batch.filter(pc.is_in(batch["phash"], value_set=wanted))
                hashes = from_signed(hits["phash"].to_numpy()).tolist()
                rows = zip(hashes, *(hits[c].to_pylist() for c in ("path", "label", "sha256")))
                for h, path, label, sha in rows:
                    name = classes[label] if classes and label >= 0 else None
                    members[group_of[h]].append({"path": path, "label": name, "split": split, "sha256": sha})
    groups = []
    for files in members.values():
        if len(files) < 2:
            continue
        files.sort(key=lambda f: f["path"])
        groups.append({
            "files": files,
            "across_splits": len({f["split"] for f in files}) > 1,
            "across_classes": len({f["label"] for f in files}) > 1,
        })  # fmt: skip
    # the groups that need a look first, then by their first path
    groups.sort(key=lambda g: (not g["across_splits"], not g["across_classes"], g["files"][0]["path"]))
    return {
        "max_distance": distance,
        "counts": {
            "groups": len(groups),
            "files": sum(len(g["files"]) for g in groups),
            "across_splits": sum(g["across_splits"] for g in groups),
            "across_classes": sum(g["across_classes"] for g in groups),
        },
        "groups": groups,
    }


# --- a model's training images, matched at predict time ------------------------------------


def training_hashes(data: str, split: str = TRAIN) -> pa.Table | None:
    """`split`'s (phash, path) of a prep output, sorted by phash then path (HASHES_SCHEMA):
    8 bytes and a path per image. None for shards written before hashes (format 1)."""
    if read_manifest(data).get("format_version", 1) < 2:
        return None
    batches = list(iter_batches(data, split, columns=["phash", "path"], batch_size=65536))
    columns = [pa.chunked_array([b.column(f.name) for b in batches], f.type) for f in HASHES_SCHEMA]
    table = pa.Table.from_arrays(columns, schema=HASHES_SCHEMA)  # whatever nullability each shard declared
    return table.sort_by([("phash", "ascending"), ("path", "ascending")])


class NearestIndex:
    """For batches of query hashes, the closest of a fixed set of hashes within `distance`.

    The banded idea of `band_pairs` against a fixed set: a query at most `distance` bits
    from a hash agrees with it exactly on one of the distance+1 bands, so each band keeps
    the set sorted by its bits, and a query is compared only with the hashes that share
    one of its bands' values. Built once (distance+1 argsorts); holds the hashes and an
    int64 order per band.
    """

    def __init__(self, hashes: np.ndarray, distance: int) -> None:
        self.hashes = np.asarray(hashes, np.uint64)
        self.distance = int(distance)
        self.bands = []
        for shift, width in bands(self.distance):
            mask = np.uint64((1 << width) - 1)
            key = (self.hashes >> np.uint64(shift)) & mask
            order = np.argsort(key, kind="stable")
            self.bands.append((np.uint64(shift), mask, key[order], order))

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint64 (N,) -> int64 (N,) index of the closest hash (-1: none within the distance)
        and int64 (N,) its distance in bits (-1 with none). Ties go to the lower index."""
        queries = np.asarray(queries, np.uint64)
        n, size = len(queries), len(self.hashes)
        none = np.iinfo(np.int64).max
        best = np.full(n, none, np.int64)  # distance * size + index: the smallest is the answer
        for shift, mask, keys, order in self.bands:
            key = (queries >> shift) & mask
            lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
            counts = hi - lo
            ends = np.cumsum(counts)
            start = 0
            while start < n:  # queries in runs of at most MAX_PAIRS candidates (one query's run may exceed it)
                stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + MAX_PAIRS, "right")))
                q = np.repeat(np.arange(start, stop), counts[start:stop])
                first = np.cumsum(counts[start:stop]) - counts[start:stop]  # each query's first pair
                candidate = order[np.repeat(lo[start:stop], counts[start:stop]) + np.arange(len(q)) - np.repeat(first, counts[start:stop])]
                bits = np.bitwise_count(queries[q] ^ self.hashes[candidate]).astype(np.int64)
                near = bits <= self.distance
                np.minimum.at(best, q[near], bits[near] * size + candidate[near])
                start = stop
        found = best != none
        return np.where(found, best % max(size, 1), -1), np.where(found, best // max(size, 1), -1)
