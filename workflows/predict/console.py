"""`cnnflow predict`'s closing screen: rows per label, errors, this run's speed, where OUTPUT is.

Labels, paths and reasons come from outside (folder names, files): shown as text, never
markup (`workflows/terminal.py`). While it scores, predict shows prep's progress bar
(`terminal.progress_bar`).
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from workflows.predict.output import SUMMARY
from workflows.terminal import plain, text


def closing_screen(console: Console, summary: dict, output: str) -> None:
    table = Table(title=text(f"predictions by {summary['model_uri']}"), show_header=True)
    table.add_column("label")
    table.add_column("rows", justify="right")
    for label, n in summary["counts"].items():  # class names came from folder names: text, not markup
        table.add_row(text(label), f"{n:,}")
    if summary.get("unsure"):
        table.add_row("[yellow]unsure[/yellow] (below --min-score)", f"{summary['unsure']:,}")
    table.add_row("[red]errors[/red]", f"{summary['errors']:,}")
    table.add_row("[bold]total[/bold]", f"{summary['rows']:,}")
    console.print(table)
    run = summary["this_run"]
    console.print(
        f"this run: {run['rows']:,} scored ({run['errors']:,} errors) in {run['seconds']:.1f} s"
        + (f", {run['images_per_s']:,} images/s" if run["rows"] else "")
        + (f"; {run['already_scored']:,} already scored before" if run["already_scored"] else "")
    )
    if summary.get("seen_in_training"):
        console.print(
            f"{summary['seen_in_training']:,} rows are near-copies of training images (their `seen_in_training` names it)"
        )
    for example in summary["error_examples"][:3]:
        console.print(f"  [red]error[/red] {plain(example['path'])}: {plain(example['error'])}")
    skipped = sum(summary["skipped_files"].values())
    if skipped:
        console.print(f"skipped {skipped:,} files or links, by reason: {plain(summary['skipped_files'])}")
    console.print(f"output: {plain(output)} ({summary['files']} {summary['format']} files, {SUMMARY})")
