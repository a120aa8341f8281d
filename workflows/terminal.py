"""Text that came from outside (file names, class names, paths, reasons) shown as text.

Rich reads `[...]` in a printed string as markup: a class folder named `[cat]` vanished
from the summary and a path with `[/]` in it stopped the job after its outputs were
written. Control characters in a name (an escape sequence could rewrite the terminal)
and the surrogates Python uses for bytes that are not UTF-8 are shown as escapes, and a
URI's credentials (`s3://KEY:SECRET@bucket`) as *** (`data_prep/redact.py`).
Use `plain` inside a markup string and `text` where rich takes a renderable (table cells).
A stage at work shows rich's progress bar, the same for prep and predict (`progress_bar`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.text import Text

from data_prep.redact import redact_uri

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def printable(value: object) -> str:
    """`value` as a string with every character a terminal would act on written as an
    escape, and any credentials in it hidden."""
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in redact_uri(str(value)))


def _escaped(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode("ascii")


def plain(value: object) -> str:
    """For an f-string that rich will parse as markup: shown exactly as written."""
    return escape(printable(value))


def text(value: object, style: str = "") -> Text:
    """For a table cell or title: a Text, which rich never parses as markup."""
    return Text(printable(value), style=style)


def progress_bar(console: Console, stage: str, unit: str) -> Progress:
    """STAGE's bar while it works: the task's description, done/total, UNIT per second,
    elapsed time and ETA; gone once the stage stops (its closing screen follows).

    rich.progress is imported here: the CLI imports this module for every command.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:.0f} {unit}" if task.speed else "", style="cyan")

    return Progress(
        TextColumn(f"[bold]{stage}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def quiet_libraries(verbose: bool) -> None:
    """Leave the terminal to cnnflow's lines: MLflow's INFO (database set-up, new
    experiments, model checks) and alembic's migrations only with --verbose. Warnings and
    errors still show. Ray's side is `ray_runtime.ray_session` (log_to_driver).

    MLFLOW_LOGGING_LEVEL is MLflow's own setting (read when mlflow is first imported, also
    by Ray workers that inherit this environment); the logger levels cover an mlflow that
    is already imported. A value the user set wins.
    """
    import logging
    import os

    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    if not verbose:  # its tqdm bars for every artifact download (tracking.load_classifier)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
