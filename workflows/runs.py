"""`cnnflow runs`: an experiment's runs side by side, newest first."""
from __future__ import annotations

import datetime as dt

from rich.console import Console
from rich.table import Table

from workflows import tracking
from workflows.config import CHAMPION_ALIAS, RunsConfig

# (header, param) columns: the options people change between runs.
OPTION_COLUMNS = (("model", "model"), ("epochs", "epochs"), ("batch", "batch_size"), ("lr", "lr"), ("workers", "workers"))


def short(value: str) -> str:
    """A param as logged, with a sampled float cut to 4 significant digits (0.0146..., a tune trial's lr)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value and len(value) > 8 else value


def run_label(row: dict) -> str:
    """`name (run id)`; a child run (a tune's trial) indented under its parent."""
    label = f"{row['name']} ({row['run_id'][:8]})"
    return f"  └ {label}" if row.get("parent") else label


def table(rows: list[dict], experiment: str) -> Table:
    top = sum(1 for row in rows if not row.get("parent"))
    t = Table(title=f"experiment {experiment!r}: {top} most recent runs", title_justify="left")
    t.add_column("run", no_wrap=True)
    t.add_column("started")
    t.add_column("status")
    for header, _ in OPTION_COLUMNS:
        t.add_column(header, justify="right")
    t.add_column("val_acc", justify="right")
    t.add_column("duration", justify="right")
    t.add_column("registered", no_wrap=True)
    for row in rows:
        params, metrics = row["params"], row["metrics"]
        val_acc = metrics.get("val_acc")
        registered = row["registered"] or ""
        if row["champion"]:
            registered += f" @{CHAMPION_ALIAS}"
        t.add_row(
            run_label(row),
            dt.datetime.fromtimestamp(row["start_time"]).strftime("%m-%d %H:%M"),
            row["status"],
            *[short(params.get(param, "")) for _, param in OPTION_COLUMNS],
            "" if val_acc is None else f"{val_acc:.4f}",
            f"{row['duration_s']:.0f}s",
            registered,
            style="bold" if row["champion"] else None,
        )
    return t


def run(config: RunsConfig) -> int:
    tracking.use_tracking()  # fails fast, in one line, on an unreachable server
    rows = tracking.list_runs(config.experiment, config.max_runs)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: no terminal width to fit, keep rows whole
        console.width = 200
    console.print(table(rows, config.experiment))
    return 0


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("runs")
