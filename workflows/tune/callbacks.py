"""Tune callbacks in the driver: the trials table on the terminal, and the runs of stopped trials.

`TrialTable` shows the search as it goes; `StoppedTrials` ends the child run of a trial
that ASHA stopped: FINISHED, with a `stopped_early` tag, since the trial's own process
is gone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray.tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from workflows import tracking
from workflows.train.plan import BEST_METRIC
from workflows.tune.space import PROGRESS, trial_name
from workflows.tune.trial import FINAL, TIME_ATTR

STOPPED_TAG = "stopped_early"  # on a child that was stopped before it finished


class StoppedTrials(ray.tune.Callback):
    """Ends the child run of a trial ASHA stopped, with a tag that says so.

    Tune stops the trial's process, which therefore never ends its own run. Nor does
    it log the epoch ASHA judged: Tune acts on a result while the worker still waits
    for its checkpoint to be committed, the moment after which it logs that epoch
    (workflows/train/loop.py). That epoch's metrics are logged here instead.
    """

    def __init__(self, parent_run_id: str, *, epochs: int, uri: str):
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self.uri = uri

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if FINAL in result:
            return  # it finished and ended its run itself
        run_id = tracking.child_run_ids(self.parent_run_id).get(trial.trial_id)
        if not run_id:
            return
        epoch = int(result.get(TIME_ATTR, 0))
        if epoch and epoch not in tracking.logged_epochs(self.uri, run_id, BEST_METRIC):
            tracking.log_epoch(self.uri, run_id, epoch, epoch_metrics(result))
        epochs = trial.config.get("epochs", self.epochs)
        tracking.end_if_running(run_id, {STOPPED_TAG: f"ASHA, after epoch {epoch} of {epochs}: val_acc trailed"})


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What the worker reported for its epoch: a result less the keys Tune adds to it."""
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = {*AUTO_RESULT_KEYS, TIME_ATTR, PROGRESS}  # the epoch and its share of the schedule: steps, not metrics
    return {
        k: float(v)
        for k, v in result.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@dataclass
class Row:
    name: str
    params: dict[str, Any]
    status: str = "waiting"
    epoch: int = 0
    val_acc: float | None = None
    best: float | None = None  # the finished trial's evaluated val_acc


class TrialTable(ray.tune.Callback):
    """The search on the terminal: one row per trial (params, epoch, val_acc, status).

    A terminal gets a live table; a pipe or a file gets one line per event and the
    table at the end. Built in `setup`, so that what Tune pickles (the run config, for
    a resume) holds no console.
    """

    def __init__(self, searched: list[str], *, epochs: int):
        self.searched = searched
        self.epochs = epochs
        self.rows: dict[str, Row] = {}
        self.console: Console | None = None
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "console": None, "live": None, "rows": {}}

    def setup(self, **info: Any) -> None:
        self.console = Console()
        if not self.console.is_terminal:  # a pipe or a file: keep rows whole, as `cnnflow runs` does
            self.console.width = 200
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, redirect_stdout=True, redirect_stderr=True)
            self.live.start()

    def row(self, trial: Any) -> Row:
        if trial.trial_id not in self.rows:
            row = Row(trial_name(trial), {k: trial.config.get(k) for k in self.searched})
            last = trial.last_result or {}
            if trial.status == "TERMINATED" and last:  # ended before a resume: as it was left
                row.epoch = int(last.get(TIME_ATTR, 0))
                row.val_acc = last.get(BEST_METRIC)
                if FINAL in last:  # its last result is the evaluation, not an epoch
                    row.epoch = trial.config.get("epochs", self.epochs)
                    row.best, row.status = last[BEST_METRIC], "done"
                else:
                    row.status = "stopped early"
            self.rows[trial.trial_id] = row
        return self.rows[trial.trial_id]

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        known = len(self.rows)
        for trial in trials:
            self.row(trial)
        if len(self.rows) != known and self.live is not None:
            self.live.update(self.render())

    def say(self, text: str) -> None:
        if self.live is not None:
            self.live.update(self.render())
        elif self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.row(trial)
        row.status = "running"
        self.say(f"{row.name} started: {format_params(row.params)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.row(trial)
        if FINAL in result:
            row.best = result[BEST_METRIC]
            return
        row.epoch = int(result.get(TIME_ATTR, row.epoch))
        row.val_acc = result.get(BEST_METRIC, row.val_acc)
        epochs = trial.config.get("epochs", self.epochs)
        self.say(f"{row.name} epoch {row.epoch}/{epochs}  val_acc {row.val_acc:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.row(trial)
        if row.best is not None:
            row.status = "done"
            self.say(f"{row.name} done: val_acc {row.best:.4f}")
        else:
            row.status = "stopped early"
            self.say(f"{row.name} stopped early by ASHA after epoch {row.epoch}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.row(trial)
        row.status = "error"
        self.say(f"{row.name} failed (its child run has the reason)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            row = self.row(trial)
            if row.status in ("waiting", "running"):
                row.status = "not run" if row.status == "waiting" else "stopped"
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()
            self.live = None
        elif self.console is not None:
            self.console.print(self.render())

    def render(self) -> Table:
        t = Table(title="trials", title_justify="left")
        t.add_column("trial", no_wrap=True)
        shown = [name for name in self.searched if name != "epochs"]  # the epoch column shows k/E
        for name in shown:
            t.add_column(name, justify="right")
        t.add_column("epoch", justify="right")
        t.add_column("val_acc", justify="right")
        t.add_column("status")
        best = max((r.best for r in self.rows.values() if r.best is not None), default=None)
        for row in sorted(self.rows.values(), key=lambda r: int(r.name.split("-")[1])):
            t.add_row(
                row.name,
                *[_cell(row.params.get(name)) for name in shown],
                f"{row.epoch}/{row.params.get('epochs') or self.epochs}" if row.epoch else "",
                _cell(row.best if row.best is not None else row.val_acc, digits=4),
                row.status,
                style="bold" if best is not None and row.best == best else None,
            )
        return t


def _cell(value: Any, *, digits: int | None = None) -> str:
    if value is None:
        return ""
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_params(params: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(params.items()))
