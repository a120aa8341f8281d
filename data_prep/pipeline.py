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
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import ray

from data_prep import report as rep
from data_prep.decode import Limits
from data_prep.isolate import CRASHED, WORKER_DIED, run_isolating
from data_prep.near_duplicates import report as near_duplicates
from data_prep.options import PrepOptions
from data_prep.prep_output import check_paths, claim_output, remove_if_empty, shard_files, shard_name
from data_prep.redact import redact_uri, redacted
from data_prep.scan import PrepError, Scan, scan
from data_prep.schema import (
    MANIFEST,
    QUARANTINE,
    REPORT,
    SHARD_FORMAT_VERSION,
    SPLITS,
    SPLIT_RULE,
    TRAIN,
    UNLABELED,
    VAL,
    join,
    resolve,
    unit_hash,
    write_atomic,
    write_json,
)
from data_prep.shards import ChunkResult, probe_chunk, write_chunk
from data_prep.splits import settle

MIN_FILES_PER_TASK = 64  # below this, Ray's per-task overhead outweighs spreading out

# A generator task: progress, then result. No retries by Ray: a chunk whose worker dies is
# handled by _recover (its poison files found and quarantined, the rest run again).
_write_chunk = ray.remote(num_cpus=1, max_retries=0)(write_chunk)
_probe_chunk = ray.remote(num_cpus=1)(probe_chunk)
MAX_RESTARTS = 3  # per chunk: a chunk that keeps dying with no poison file found is an error

Progress = Callable[[int, int], None]  # (files done, files to decode)


@dataclass(frozen=True)
class PrepResult:
    output: str
    manifest: dict[str, Any]
    report: dict[str, Any]


def prepare(
    input: str,
    output: str,
    options: PrepOptions,
    *,
    on_progress: Progress | None = None,
    found: Scan | None = None,
) -> PrepResult:
    """Turn INPUT into OUTPUT's shards, manifest.json, report.json and quarantine.csv.

    Needs Ray to be initialised. The manifest records `options` whole (a command's
    config, a PrepOptions with more fields, is recorded with them all). `found`: INPUT's
    `scan` with these options, if the caller already made it (the CLI does, before Ray
    starts, so a wrong INPUT is refused at once). Raises PrepError (input unusable,
    every image bad, OUTPUT overlapping INPUT or holding files prep did not write: see
    data_prep/safety.py), FileNotFoundError or NotADirectoryError (INPUT missing, OUTPUT
    a file).
    """
    start = time.perf_counter()
    image_size, resize, unlabeled = options.image_size, options.resize, options.unlabeled
    owned = check_paths(input, output)  # before anything is read or written
    if found is None:
        found = scan(input, options)
    chunks = plan_chunks(found, rows_per_shard=options.rows_per_shard, seed=options.seed, cpus=_cluster_cpus())
    out = claim_output(output, owned, shard_files(chunks))
    splits = [UNLABELED] if unlabeled else [TRAIN, VAL]
    fs, out_path = resolve(out)
    for split in splits:
        fs.create_dir(join(out_path, split))

    limits = Limits.of(options.max_file_mb, options.max_megapixels)
    total = rep.combine(
        _run_tasks(
            found.input, out, chunks, size=image_size, resize=resize, limits=limits, on_progress=on_progress,
            split_args=dict(stats_split=UNLABELED if unlabeled else TRAIN, seed=options.seed, val_fraction=options.val_fraction),
        )
    )  # fmt: skip
    # Names that cannot even be opened were quarantined by the scan; they count the same.
    total.quarantined = sorted(found.quarantined + total.quarantined, key=lambda q: q["path"])

    near = near_duplicates(out, found.classes, total.phashes, options.near_duplicate_distance)
    if not unlabeled:
        settle(
            out, total, near, num_classes=len(found.classes), seed=options.seed,
            val_fraction=options.val_fraction, together=options.near_duplicates == "together",
        )  # fmt: skip
    counts = rep.written_counts(found, total)
    warnings = rep.warnings_for(found, total, counts, near)
    seconds = time.perf_counter() - start
    # What a URI's credentials would leak through: files that are shared, copied and logged.
    report = redacted(
        rep.build_report(found, total, output=out, counts=counts, seconds=seconds, warnings=warnings, near=near)
    )
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
        "input": redact_uri(found.input),
        "options": redacted(asdict(options)),
        "content_hash": rep.content_hash(found, total, image_size=image_size, resize=resize),
        "split_rule": None if unlabeled else {
            "by": SPLIT_RULE, "seed": options.seed, "val_fraction": options.val_fraction,
            "near_duplicates": options.near_duplicates, "near_duplicate_distance": options.near_duplicate_distance,
        },
        "cnnflow_version": rep.cnnflow_version(),
    }
    write_json(join(out, MANIFEST), manifest)  # last: a manifest means a complete output
    return PrepResult(out, manifest, report)


def plan_chunks(
    found: Scan, *, rows_per_shard: int, seed: int, cpus: int
) -> list[list[tuple[str, int, str]]]:
    """Files for each task: [(path, label, split)], every chunk alike in size and mix.

    T is the fewest tasks whose shards stay within rows_per_shard, at least one per CPU
    (when there are enough files), rounded up to a multiple of the CPUs so that no CPU
    idles through a last round of tasks.
    """
    n = len(found.files)
    tasks = math.ceil(n / rows_per_shard)  # a task's shard per split holds at most its files
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
    limits: Limits,
    split_args: dict[str, Any],
    on_progress: Progress | None,
) -> list[ChunkResult]:
    """Run the chunks as Ray generator tasks, a bounded number at a time."""
    total_files = sum(len(c) for c in chunks)
    max_in_flight = 2 * _cluster_cpus()  # enough to keep every CPU busy; bounds queued arguments
    todo = list(enumerate(chunks))
    running: dict[Any, tuple[int, list[tuple[str, int, str]]]] = {}  # generator -> (task, files)
    progress: Counter = Counter()  # task -> files it reported done
    restarts: Counter = Counter()
    poisoned = 0  # files quarantined for killing their worker: done too
    results: list[ChunkResult] = []
    if on_progress:
        on_progress(0, total_files)
    while todo or running:
        while todo and len(running) < max_in_flight:
            i, chunk = todo.pop(0)
            name = shard_name(i)  # as listed in the marker by shard_files
            gen = _write_chunk.remote(
                input, output, name, chunk, size=size, resize=resize, limits=limits, **split_args
            )
            running[gen] = (i, chunk)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for gen in ready:
            i, chunk = running[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                del running[gen]
                continue
            except WORKER_DIED:
                del running[gen]
                restarts[i] += 1
                if restarts[i] > MAX_RESTARTS:
                    raise PrepError(f"the task writing {shard_name(i)} died {MAX_RESTARTS + 1} times, "
                                    "with no single file to blame; is a node running out of memory?") from None
                progress[i] = 0  # its files are counted again when they are done again
                rest, crashed = _recover(input, output, i, chunk, size=size, resize=resize, limits=limits)
                results.append(crashed)
                poisoned += len(crashed.quarantined)
                if rest:
                    todo.insert(0, (i, rest))
            else:
                if isinstance(item, ChunkResult):
                    results.append(item)
                else:
                    progress[i] += item
            if on_progress:
                on_progress(sum(progress.values()) + poisoned, total_files)
    return results


def _recover(
    input: str, output: str, task: int, chunk: list[tuple[str, int, str]], *, size: int, resize: str, limits: Limits
) -> tuple[list[tuple[str, int, str]], ChunkResult]:
    """A chunk whose worker died: remove what it half wrote, find the files that kill a
    worker (decoding them again in ever smaller groups, data_prep/isolate.py), and return
    the chunk without them, and a ChunkResult that quarantines them."""
    fs, root = resolve(output)
    for split in SPLITS:  # a shard cut off mid-write is not a Parquet file; ours to delete (the marker names it)
        path = join(root, split, shard_name(task))
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    _, poison = run_isolating(
        lambda part: _probe_chunk.options(max_retries=0).remote(input, list(part), size=size, resize=resize, limits=limits),
        chunk,
    )
    bad = set(poison)
    crashed = ChunkResult(quarantined=[{"path": chunk[k][0], "reason": CRASHED} for k in poison])
    return [f for k, f in enumerate(chunk) if k not in bad], crashed


def _check_written(found: Scan, total: ChunkResult, counts: dict[str, Any], out: str, splits: list[str]) -> None:
    """Every image bad, or fewer than two classes left: an error, and no shards left behind.

    report.json and quarantine.csv stay, so that the user can see what went wrong.
    """
    written_classes = [c for c in found.classes if counts[TRAIN][c] + counts[VAL][c] > 0] if found.classes else []
    if total.written and (not found.classes or len(written_classes) >= 2):
        return
    fs, path = resolve(out)
    for uri in total.shards:  # this run's shards only: nothing else is ours to remove
        fs.delete_file(join(path, uri[len(out):].lstrip("/")))
    for split in splits:
        remove_if_empty(fs, join(path, split))
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
