"""manifest.json, report.json and quarantine.csv, built from the scan and the tasks' results."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from data_prep.scan import Scan
from data_prep.schema import SHARD_FORMAT_VERSION, TRAIN, UNLABELED, VAL
from data_prep.shards import ChunkResult


def cnnflow_version() -> str:
    try:
        return version("cnnflow")
    except PackageNotFoundError:  # a source tree that was not installed
        return "0.0.0+unknown"


def combine(results: list[ChunkResult]) -> ChunkResult:
    total = ChunkResult()
    for r in results:
        total.written += r.written
        total.quarantined += r.quarantined
        total.shards.update(r.shards)
        total.modes += r.modes
        total.formats += r.formats
        total.sizes += r.sizes
        total.exif_transposed += r.exif_transposed
        total.upscaled += r.upscaled
        total.histogram += r.histogram
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
    written = {path for path, _ in total.written}
    if not scan.classes:
        return {UNLABELED: len(written)}
    counts = {split: {name: 0 for name in scan.classes} for split in (TRAIN, VAL)}
    for f in scan.files:
        if f.path in written:
            counts[f.split][scan.classes[f.label]] += 1
    return counts


def num_rows(counts: dict[str, Any]) -> dict[str, int]:
    return {split: c if isinstance(c, int) else sum(c.values()) for split, c in counts.items()}


def content_hash(scan: Scan, total: ChunkResult, *, image_size: int, resize: str) -> str:
    """Changes when any written file's bytes, label or split, or the pixel recipe, changes."""
    files = {f.path: f for f in scan.files}
    h = hashlib.sha256(json.dumps([SHARD_FORMAT_VERSION, image_size, resize]).encode())
    for path, sha in sorted(total.written):
        f = files[path]
        label = scan.classes[f.label] if scan.classes else ""
        h.update(f"{path}\t{f.split}\t{label}\t{sha}\n".encode())
    return h.hexdigest()


def duplicates(scan: Scan, total: ChunkResult) -> list[dict[str, Any]]:
    """Written files with identical bytes; `conflict` when they carry different labels."""
    labels = {f.path: (scan.classes[f.label] if scan.classes else None) for f in scan.files}
    by_sha: dict[str, list[str]] = defaultdict(list)
    for path, sha in total.written:
        by_sha[sha].append(path)
    groups = []
    for sha, paths in sorted(by_sha.items(), key=lambda kv: sorted(kv[1])[0]):
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
    scan: Scan, total: ChunkResult, *, output: str, counts: dict[str, Any], seconds: float, warnings: list[str]
) -> dict[str, Any]:
    dups = duplicates(scan, total)
    written = len(total.written)
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


def warnings_for(scan: Scan, total: ChunkResult, counts: dict[str, Any]) -> list[str]:
    """Things a user should look at before training; the job still succeeds."""
    notes = []
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

