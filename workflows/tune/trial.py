"""One trial of `cnnflow tune`: a Tune function trainable, run in its own Ray actor.

Ray 2.60's way of tuning a Train V2 trainer: a Tune *function trainable* per trial
(`run_trial`) that builds and fits the same `TorchTrainer` as `cnnflow train`, with
`RunConfig(callbacks=[TuneReportCallback()])` so that every `ray.train.report` of the
workers reaches Tune as a trial result. Each trial, in its own process, opens a child
run under the search's parent run and logs exactly what a `cnnflow train` run logs
(`train_and_log`).
"""
from __future__ import annotations

from typing import Any

import ray.tune

from workflows import tracking
from workflows.config import TrainConfig
from workflows.ray_runtime import configure_ray_data
from workflows.train.driver import train_and_log
from workflows.train.plan import BEST_METRIC, plan, resolved_options, run_tags, scaling_for
from workflows.tune.space import trial_name_from_id

TIME_ATTR = "epoch"  # what the workers report per epoch
# The last result a finished trial reports (after its evaluation and logged model).
FINAL = "model_uri"


def run_trial(params: dict[str, Any], *, base: dict[str, Any], parent_run_id: str, uri: str) -> None:
    """A Tune function trainable: the base train options with this trial's `params`.

    Opens this trial's child run, fits with Ray Train (each epoch's report goes on to
    Tune through `TuneReportCallback`), logs the best epoch's model like `cnnflow train`
    does, and reports a final result naming the run and its model.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    tracking.use_tracking_uri(uri)
    configure_ray_data()  # this process builds the trainer's datasets: the driver's settings
    config = TrainConfig(**{**base, **params})
    p = plan(config)
    context = ray.tune.get_context()
    name = trial_name_from_id(context.get_trial_id())
    with tracking.child_run(
        parent_run_id=parent_run_id,
        key=context.get_trial_id(),
        run_name=name,
        params=resolved_options(p),
        tags={**run_tags(p), "trial": name},
    ) as run_id:
        trained = train_and_log(
            p, run_id, uri, scaling_for(config), callbacks=[TuneReportCallback()], epoch_lines=False
        )
    ray.tune.report(
        {
            BEST_METRIC: trained.evaluation.accuracy,
            "val_loss": trained.evaluation.loss,
            "best_epoch": trained.best_epoch,
            "run_id": run_id,
            FINAL: trained.model_uri,
        }
    )
