"""manifest.json, report.json and quarantine.csv, built from the scan and the tasks' results.

The tasks send back aggregates (data_prep/shards.py: ChunkResult), not a record per file,
so nothing here holds a list that grows with the files written: the counts, the content
hash and the pixel statistics add up across tasks, and identical files are found from 8
bytes a file, their paths then read back from the shards.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.scan import Scan
from data_prep.schema import SHARD_FORMAT_VERSION, SPLITS, TRAIN, UNLABELED, VAL
from data_prep.shard_reader import iter_batches
from data_prep.shards import DIGEST_MODULUS, ChunkResult


def cnnflow_version() -> str:
    try:
        return version("cnnflow")
    except PackageNotFoundError:  # a source tree that was not installed
        return "0.0.0+unknown"


def combine(results: list[ChunkResult]) -> ChunkResult:
    total = ChunkResult()
    for r in results:
        total.written += r.written
        total.counts += r.counts
        total.digest = (total.digest + r.digest) % DIGEST_MODULUS
        total.quarantined += r.quarantined
        total.shards.update(r.shards)
        total.modes += r.modes
        total.formats += r.formats
        total.sizes += r.sizes
        total.exif_transposed += r.exif_transposed
        total.upscaled += r.upscaled
        total.histogram += r.histogram
    total.sha_keys = np.concatenate([total.sha_keys] + [r.sha_keys for r in results])
    total.phashes = np.concatenate([total.phashes] + [r.phashes for r in results])
    total.quarantined.sort(key=lambda q: q["path"])
    return total


def mean_std(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0-1 scale from (3, 256) pixel counts."""
    values = np.arange(256, dtype=np.float64) / 255
    n = histogram.sum(axis=1).astype(np.float64)
    if not n.all():
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean = histogram @ values / n
    var = histogram @ values**2 / n - mean**2
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in np.sqrt(np.maximum(var, 0))]


def written_counts(scan: Scan, total: ChunkResult) -> dict[str, Any]:
    """{"train": {class: n}, "val": {class: n}}, or {"data": n} when unlabeled."""
    if not scan.classes:
        return {UNLABELED: total.written}
    counts = {split: {name: 0 for name in scan.classes} for split in (TRAIN, VAL)}
    for (split, label), n in total.counts.items():
        counts[split][scan.classes[label]] += n
    return counts


def num_rows(counts: dict[str, Any]) -> dict[str, int]:
    return {split: c if isinstance(c, int) else sum(c.values()) for split, c in counts.items()}


def content_hash(scan: Scan, total: ChunkResult, *, image_size: int, resize: str) -> str:
    """Changes when any written file's path, bytes, label or split, or the pixel recipe, changes.

    The files' part is the sum of their digests (shards.file_digest), which does not
    depend on the order the tasks wrote them in.
    """
    header = json.dumps([SHARD_FORMAT_VERSION, image_size, resize, scan.classes])
    return hashlib.sha256(f"{header}\n{total.digest:064x}".encode()).hexdigest()


def duplicates(output: str, classes: list[str], total: ChunkResult) -> list[dict[str, Any]]:
    """Written files with identical bytes; `conflict` when they carry different labels.

    Candidates are the files whose 8-byte sha keys repeat; their rows (path, label,
    sha256) are then read back from the shards, and grouped by the whole sha256.
    """
    keys, seen = np.unique(total.sha_keys, return_counts=True)
    repeated = pa.array([f"{k:016x}" for k in keys[seen > 1].tolist()], pa.string())
    if not len(repeated):
        return []
    by_sha: dict[str, list[str]] = defaultdict(list)
    labels: dict[str, str | None] = {}
    for batch in iter_batches(output, SPLITS, columns=["sha256", "path", "label"], batch_size=65536):
        hits = batch.filter(pc.is_in(pc.utf8_slice_codeunits(batch["sha256"], 0, 16), value_set=repeated))
        for sha, path, label in zip(*(hits[c].to_pylist() for c in ("sha256", "path", "label"))):
            by_sha[sha].append(path)
            labels[path] = classes[label] if classes and label >= 0 else None
    groups = []
    for sha, paths in sorted(by_sha.items(), key=lambda kv: min(kv[1])):
        if len(paths) > 1:
            paths.sort()
            names = {labels[p] for p in paths}
            groups.append(
                {
                    "sha256": sha,
                    "files": [{"path": p, "label": labels[p]} for p in paths],
                    "conflict": len(names) > 1,
                }
            )
    return groups


def build_report(
    scan: Scan,
    total: ChunkResult,
    *,
    output: str,
    counts: dict[str, Any],
    seconds: float,
    warnings: list[str],
    near: dict[str, Any],
) -> dict[str, Any]:
    dups = duplicates(output, scan.classes, total)
    written = total.written
    report: dict[str, Any] = {
        "input": scan.input,
        "output": output,
        # scanned = written + skipped + quarantined, exactly (duplicates are kept and written)
        "counts": {
            "scanned": scan.scanned,
            "written": written,
            "skipped": len(scan.skipped),
            "quarantined": len(total.quarantined),
        },
        "written": counts,
        "skipped": scan.skipped,
        "quarantined": total.quarantined,
        "duplicates": dups,
        "duplicate_conflicts": sum(d["conflict"] for d in dups),
        "near_duplicates": near,
        "empty_class_folders": scan.empty_classes,
        "exif_transposed": total.exif_transposed,
        "upscaled": total.upscaled,
        "source_modes": dict(total.modes.most_common()),
        "source_formats": dict(total.formats.most_common()),
        "source_shorter_side": _sorted_bins(total.sizes),
        "shards": dict(Counter(uri.rsplit("/", 2)[-2] for uri in total.shards)),
        "warnings": warnings,
        "seconds": round(seconds, 2),
        "images_per_second": round(written / seconds, 1) if seconds > 0 else None,
    }
    if scan.csv_missing:
        report["csv_missing"] = scan.csv_missing
    return report


def _sorted_bins(sizes: Counter) -> dict[str, int]:
    def low(name: str) -> int:
        return int(name.lstrip("<>=").split("-")[0]) if not name.startswith("<") else 0

    return {k: sizes[k] for k in sorted(sizes, key=low)}


def warnings_for(scan: Scan, total: ChunkResult, counts: dict[str, Any], near: dict[str, Any]) -> list[str]:
    """Things a user should look at before training; the job still succeeds."""
    notes = []
    n = near["counts"]
    if n["across_splits"]:
        notes.append(
            f"{n['across_splits']} near-duplicate groups span train and val: validation accuracy "
            f"counts pictures training saw (report.json: near_duplicates)"
        )
    if n["across_classes"]:
        notes.append(f"{n['across_classes']} near-duplicate groups span classes: the same picture under two labels")
    if total.quarantined:
        notes.append(f"{len(total.quarantined)} files quarantined (see quarantine.csv)")
    if scan.classes:
        for name in scan.classes:
            n_train, n_val = counts[TRAIN][name], counts[VAL][name]
            if n_train + n_val == 0:
                notes.append(f"class {name!r} has no decodable image")
            elif n_val == 0:
                notes.append(f"class {name!r} has no validation image ({n_train} in train)")
    if scan.empty_classes:
        notes.append(f"empty class folders left out: {', '.join(scan.empty_classes)}")
    if scan.csv_missing:
        notes.append(f"{len(scan.csv_missing)} csv rows name no image file in the input")
    return notes


def quarantine_csv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()

