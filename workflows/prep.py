"""`cnnflow prep INPUT OUTPUT` (docs/architecture.md): image folders to Parquet shards on Ray.

The job itself is `data_prep.pipeline.prepare`; this module joins Ray, shows progress
(files done, rate, ETA) and ends with a one-screen summary.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from data_prep.lock import output_lock
from data_prep.prep_output import check_paths
from data_prep.scan import PrepError, scan
from workflows.config import PrepConfig
from workflows.errors import CnnflowError
from workflows.ray_runtime import ray_session
from workflows.terminal import plain, progress_bar, text


def run(config: PrepConfig) -> int:

    # Refusals (INPUT missing or without images, INPUT and OUTPUT overlap, OUTPUT not
    # ours, another job writing there) come before Ray starts, which takes seconds;
    # prepare() checks OUTPUT again once this job holds its lock.
    try:
        check_paths(config.input, config.output)
        found = scan(config.input, config)
        with output_lock(config.output):
            result = _prepare(config, found)
    except PrepError as exc:
        raise CnnflowError(str(exc)) from None
    print_summary(Console(), result.manifest, result.report)
    return 0


def _prepare(config: PrepConfig, found: Any) -> Any:
    from data_prep.pipeline import prepare

    console = Console(stderr=True)
    with ray_session(config, dashboard=False, ray_data=False), progress_bar(console, "prep", "files/s") as progress:
        task = progress.add_task("scanning", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, description="decoding", completed=done, total=total)

        # config is a PrepOptions: prepare() takes it whole, and records all of it in the manifest
        return prepare(config.input, config.output, config, on_progress=on_progress, found=found)


def print_summary(console: Console, manifest: dict[str, Any], report: dict[str, Any]) -> None:
    """Counts per class and split, what was left out and why, and where the output is.

    Class names, paths and reasons come from the file system: shown as text, never markup.
    """
    counts, n = manifest["counts"], report["counts"]
    table = Table(title="cnnflow prep", title_justify="left")
    if manifest["labeled"]:
        table.add_column("class")
        table.add_column("train", justify="right")
        table.add_column("val", justify="right")
        for name in manifest["classes"]:
            table.add_row(text(name), str(counts["train"][name]), str(counts["val"][name]))
        rows = manifest["num_rows"]
        table.add_row("[bold]total", f"[bold]{rows['train']}", f"[bold]{rows['val']}")
    else:
        table.add_column("unlabeled images", justify="right")
        table.add_row(str(counts["data"]))
    console.print(table)
    console.print(
        f"scanned {n['scanned']} = written {n['written']} + skipped {n['skipped']} "
        f"+ quarantined {n['quarantined']}   "
        f"({report['seconds']:.1f} s, {report['images_per_second'] or 0:.0f} images/s)"
    )
    console.print(
        f"{manifest['image_size']} px, {manifest['resize']}; mean {manifest['mean']} std {manifest['std']}; "
        f"EXIF-rotated {report['exif_transposed']}, duplicates {len(report['duplicates'])} "
        f"({report['duplicate_conflicts']} under two classes)"
    )
    near = report["near_duplicates"]
    n = near["counts"]
    console.print(
        f"near-duplicates (within {near['max_distance']} bits): {n['groups']} groups of {n['files']} files, "
        f"{n['across_splits']} across train/val, {n['across_classes']} across classes"
    )
    for group in [g for g in near["groups"] if g["across_splits"] or g["across_classes"]][:3]:
        # one file per (split, class): the example shows what the group crosses
        shown: dict[tuple, dict] = {}
        for f in group["files"]:
            shown.setdefault((f["split"], f["label"]), f)
        console.print("  " + plain(", ".join(f"{f['path']} ({f['split']}, {f['label']})" for f in list(shown.values())[:4])))
    for row in report["quarantined"][:5]:
        console.print(f"  [red]quarantined[/] {plain(row['path'])}: {plain(row['reason'])}")
    if len(report["quarantined"]) > 5:
        console.print(f"  ... and {len(report['quarantined']) - 5} more in quarantine.csv")
    for note in report["warnings"]:
        console.print(f"[yellow]warning:[/] {plain(note)}")
    console.print(f"output: {plain(report['output'])}  (manifest.json, report.json, quarantine.csv)")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("prep")
