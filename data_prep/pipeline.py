"""The prep job on Ray: scan in the driver, decode and write shards in plain Ray tasks.

Why plain tasks rather than Ray Data: each task reads, decodes and writes a few thousand
files straight into its own large shard, so no decoded image crosses the object store,
every CPU decodes, and there is no per-operator reservation to tune. bench/bench_prep.py
measures this against a plain loop and Ray Data's `read_images` recipe.

Each task takes every T-th file in hash order (T tasks), so tasks are the same size and
each shard holds a random mix of classes; a task writes one shard per split it sees.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray

from data_prep import report as rep
from data_prep.scan import PrepError, Scan, normalize_uri, scan, unit_hash
from data_prep.schema import (
    MANIFEST,
    QUARANTINE,
    REPORT,
    SHARD_FORMAT_VERSION,
    TRAIN,
    UNLABELED,
    VAL,
    join,
    resolve,
    write_atomic,
    write_json,
)
from data_prep.shards import ChunkResult, write_chunk

OUTPUT_ENTRIES = frozenset({TRAIN, VAL, UNLABELED, MANIFEST, REPORT, QUARANTINE})
MIN_FILES_PER_TASK = 64  # below this, Ray's per-task overhead outweighs spreading out

_write_chunk = ray.remote(num_cpus=1)(write_chunk)  # a generator task: progress, then result

Progress = Callable[[int, int], None]  # (files done, files to decode)


@dataclass(frozen=True)
class PrepResult:
    output: str
    manifest: dict[str, Any]
    report: dict[str, Any]


def prepare(
    input: str,
    output: str,
    *,
    image_size: int = 128,
    resize: str = "squash",
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: str = "folder",
    unlabeled: bool = False,
    rows_per_shard: int = 2048,
    options: dict[str, Any] | None = None,
    on_progress: Progress | None = None,
) -> PrepResult:
    """Turn INPUT into OUTPUT's shards, manifest.json, report.json and quarantine.csv.

    Needs Ray to be initialised. Raises PrepError (input unusable, every image bad),
    FileNotFoundError or NotADirectoryError (INPUT missing).
    """
    start = time.perf_counter()
    found = scan(input, labels=labels, unlabeled=unlabeled, val_fraction=val_fraction, seed=seed)
    out = prepare_output(output, found.input)
    splits = [UNLABELED] if unlabeled else [TRAIN, VAL]
    fs, out_path = resolve(out)
    for split in splits:
        fs.create_dir(join(out_path, split))

    chunks = plan_chunks(found, rows_per_shard=rows_per_shard, seed=seed, cpus=_cluster_cpus())
    total = rep.combine(
        _run_tasks(
            found.input, out, chunks, size=image_size, resize=resize,
            stats_split=UNLABELED if unlabeled else TRAIN, on_progress=on_progress,
        )
    )  # fmt: skip

    counts = rep.written_counts(found, total)
    warnings = rep.warnings_for(found, total, counts)
    seconds = time.perf_counter() - start
    report = rep.build_report(found, total, output=out, counts=counts, seconds=seconds, warnings=warnings)
    write_atomic(join(out, QUARANTINE), rep.quarantine_csv(total.quarantined))
    write_json(join(out, REPORT), report)
    _check_written(found, total, counts, out, splits)

    mean, std = rep.mean_std(total.histogram)
    manifest = {
        "format_version": SHARD_FORMAT_VERSION,
        "labeled": not unlabeled,
        "classes": found.classes,
        "counts": counts,
        "num_rows": rep.num_rows(counts),
        "image_size": image_size,
        "resize": resize,
        "color_mode": "RGB",
        "mean": mean,
        "std": std,
        "input": found.input,
        "options": options or {},
        "content_hash": rep.content_hash(found, total, image_size=image_size, resize=resize),
        "cnnflow_version": rep.cnnflow_version(),
    }
    write_json(join(out, MANIFEST), manifest)  # last: a manifest means a complete output
    return PrepResult(out, manifest, report)


def prepare_output(output: str, input_root: str) -> str:
    """Make OUTPUT ready: new, empty, or a previous prep output (replaced)."""
    out = normalize_uri(output)
    if out == input_root or out.startswith(input_root.rstrip("/") + "/"):
        raise PrepError(f"output {output} is inside the input {input_root}; choose a folder outside it")
    fs, path = resolve(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"output {output} is a file; give a folder")
    if info.type == pafs.FileType.Directory:
        entries = [e for e in fs.get_file_info(pafs.FileSelector(path)) if not e.base_name.startswith(".")]
        foreign = sorted(e.base_name for e in entries if e.base_name not in OUTPUT_ENTRIES)
        if foreign:
            raise PrepError(
                f"output {output} is neither empty nor a cnnflow prep output (it holds "
                f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose a new or empty folder"
            )
        # Replacing an earlier prep: the manifest goes first, so a half-replaced output
        # is never taken for a complete one.
        for entry in sorted(entries, key=lambda e: e.base_name != MANIFEST):
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
    fs.create_dir(path, recursive=True)
    return out


def plan_chunks(
    found: Scan, *, rows_per_shard: int, seed: int, cpus: int
) -> list[list[tuple[str, int, str]]]:
    """Files for each task: [(path, label, split)], every chunk alike in size and mix.

    T is the fewest tasks whose shards stay within rows_per_shard, at least one per CPU
    (when there are enough files), rounded up to a multiple of the CPUs so that no CPU
    idles through a last round of tasks.
    """
    n = len(found.files)
    per_split: dict[str, int] = {}
    for f in found.files:
        per_split[f.split] = per_split.get(f.split, 0) + 1
    tasks = max(math.ceil(k / rows_per_shard) for k in per_split.values())
    tasks = max(tasks, min(cpus, math.ceil(n / MIN_FILES_PER_TASK)))
    if tasks > cpus:
        tasks = math.ceil(tasks / cpus) * cpus
    ordered = sorted(found.files, key=lambda f: unit_hash(seed, f.path))
    return [
        [(f.path, f.label, f.split) for f in ordered[i::tasks]] for i in range(tasks) if ordered[i::tasks]
    ]


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_tasks(
    input: str,
    output: str,
    chunks: list[list[tuple[str, int, str]]],
    *,
    size: int,
    resize: str,
    stats_split: str,
    on_progress: Progress | None,
) -> list[ChunkResult]:
    """Run the chunks as Ray generator tasks, a bounded number at a time."""
    total_files = sum(len(c) for c in chunks)
    max_in_flight = 2 * _cluster_cpus()  # enough to keep every CPU busy; bounds queued arguments
    todo = list(enumerate(chunks))
    running: list[Any] = []
    results: list[ChunkResult] = []
    done = 0
    if on_progress:
        on_progress(0, total_files)
    while todo or running:
        while todo and len(running) < max_in_flight:
            i, chunk = todo.pop(0)
            name = f"part-{i:05d}.parquet"
            running.append(
                _write_chunk.remote(input, output, name, chunk, size=size, resize=resize, stats_split=stats_split)
            )
        ready, _ = ray.wait(running, num_returns=1, timeout=1.0)
        for gen in ready:
            try:
                item = ray.get(next(gen))
            except StopIteration:
                running.remove(gen)
                continue
            if isinstance(item, ChunkResult):
                results.append(item)
            else:
                done += item
                if on_progress:
                    on_progress(done, total_files)
    return results


def _check_written(found: Scan, total: ChunkResult, counts: dict[str, Any], out: str, splits: list[str]) -> None:
    """Every image bad, or fewer than two classes left: an error, and no shards left behind.

    report.json and quarantine.csv stay, so that the user can see what went wrong.
    """
    written_classes = [c for c in found.classes if counts[TRAIN][c] + counts[VAL][c] > 0] if found.classes else []
    if total.written and (not found.classes or len(written_classes) >= 2):
        return
    fs, path = resolve(out)
    for split in splits:
        fs.delete_dir(join(path, split))
    reasons = Counter(q["reason"].split(":")[0] for q in total.quarantined)
    why = ", ".join(f"{n} {r}" for r, n in reasons.most_common(3))
    if not total.written:
        raise PrepError(
            f"none of the {len(found.files)} images in {found.input} could be decoded ({why}); "
            f"see {join(out, QUARANTINE)}"
        )
    seen = ", ".join(f"{c}: {counts[TRAIN][c] + counts[VAL][c]}" for c in found.classes)
    raise PrepError(
        f"only one class has decodable images ({seen}; quarantined: {why}); "
        f"a classifier needs at least two; see {join(out, QUARANTINE)}"
    )
