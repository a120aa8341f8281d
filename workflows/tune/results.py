"""The end of a search: the best trial, registered; the child runs the end left RUNNING, ended.

After the search the best finished trial's logged model is registered as a new version,
tagged as `cnnflow train` tags its own (the driver then sends it through the champion
gate with --promote). A trial cut short by the time budget, its process dying or an
interruption never ended its own child run: `end_cut_children` does, and says whether
the search was interrupted.
"""
from __future__ import annotations

import os
from typing import Any

from workflows import tracking
from workflows.train.plan import BEST_METRIC, Plan
from workflows.tune.callbacks import STOPPED_TAG, epoch_metrics
from workflows.tune.space import trial_index, trial_name_from_id
from workflows.tune.trial import FINAL, TIME_ATTR


def best_result(results: Any) -> dict[str, Any] | None:
    """The finished trial with the highest val_acc (then the lowest val_loss, then the first)."""
    finished = [r for r in results if r.error is None and r.metrics and FINAL in r.metrics]
    if not finished:
        return None
    best = max(finished, key=lambda r: (r.metrics[BEST_METRIC], -r.metrics["val_loss"], -trial_index(r.metrics["trial_id"])))
    return {**best.metrics, "trial": trial_name_from_id(best.metrics["trial_id"]), "config": best.config}


def register_best(p: Plan, best: dict[str, Any], parent_id: str) -> int:
    """A new version from the best trial's logged model, tagged as `cnnflow train` tags its own."""
    version = tracking.register_model(
        best["run_id"],
        best[FINAL],
        register_as=p.register_as,
        version_tags={
            "run_id": best["run_id"],
            "content_hash": p.manifest.get("content_hash", ""),
            BEST_METRIC: f"{best[BEST_METRIC]:.6f}",
            "best_epoch": best["best_epoch"],
            "data": p.data,
            "tune_parent_run_id": parent_id,
        },
    )
    return int(version.version)


def end_cut_children(parent_id: str, results: Any, trials: int, *, budget_spent: bool) -> str | None:
    """End the child runs that the end of the search left RUNNING; say if it was interrupted.

    A trial that finished ended its own run; one ASHA stopped was ended by `StoppedTrials`.
    Any other trial was cut short: by the time budget (its run FINISHED, tagged, its
    last epoch logged), by its process dying (FAILED), or by an interruption (Ctrl+C),
    its run KILLED until a resume reopens it. The search was interrupted if trials were
    cut short, or fewer started than asked, without the time budget being spent.
    Returns what the interruption cut short, or None.
    """
    children = tracking.child_run_ids(parent_id)
    running = tracking.child_run_ids(parent_id, status="RUNNING")
    cut = []
    for r in results:
        key = trial_key(r)
        if r.error is None and FINAL not in (r.metrics or {}) and (key not in children or key in running):
            cut.append(key)
    interrupted = not budget_spent and (bool(cut) or len(results) < trials)
    uri = tracking.resolved_tracking_uri()
    by_key = {trial_key(r): r for r in results}
    for key, run_id in running.items():
        result = by_key.get(key)
        if result is not None and result.error is not None:
            tracking.end_if_running(run_id, {tracking.FAILURE_TAG: first_line(result.error)[:4000]}, status="FAILED")
        elif interrupted:
            tracking.end_if_running(run_id, {}, status="KILLED")
        else:
            metrics = result.metrics if result is not None and result.metrics else {}
            epoch = int(metrics.get(TIME_ATTR, 0))
            if epoch and epoch not in tracking.logged_epochs(uri, run_id, BEST_METRIC):
                tracking.log_epoch(uri, run_id, epoch, epoch_metrics(metrics))
            tracking.end_if_running(run_id, {STOPPED_TAG: f"time budget, after epoch {epoch}"})
    if not interrupted:
        return None
    names = ", ".join(trial_name_from_id(key) for key in sorted(cut, key=trial_index))
    return f"{names or 'no trial'} cut short, {len(results)} of {trials} trials started"


def trial_key(result: Any) -> str:
    """A result's trial id, from its folder (`trial_dirname`): there even if it never reported."""
    return os.path.basename(result.path.rstrip("/")).split("_", 1)[1]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
