"""The tune driver: a parent MLflow run, Ray Tune's `Tuner` over `run_trial`, the best registered.

MLflow: the driver creates one parent run before the search (params: the base options
and the search space); each trial opens a child run under it (`trial.py`). After the
search the best trial's model is registered (and sent through the champion gate with
--promote); the parent is tagged with that trial.

Resources: a trial's own process requests no CPU (it only waits on its trainer); its
trainer's workers take what `scaling_for` gives them and leave a CPU for Ray Data. So
that trials never wait on each other's CPUs, no more trials run at once than the
cluster holds trainers (`concurrent_trials`): one at a time on a 2-CPU machine.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import ray.tune

from data_prep.redact import redact_uri
from workflows import tracking
from workflows.config import TrainConfig, TuneConfig
from workflows.errors import CnnflowError
from workflows.promote import promote
from workflows.ray_runtime import ray_session
from workflows.train.plan import BEST_METRIC, Plan, plan, resolved_options, run_tags, scaling_for
from workflows.tune.callbacks import StoppedTrials, TrialTable, format_params
from workflows.tune.results import best_result, end_cut_children, first_line, register_best
from workflows.tune.resume import (
    CONFIG_ARTIFACT,
    KIND,
    KIND_TAG,
    NAME_TAG,
    PATH_TAG,
    experiment_path,
    resumable,
    resumed_config,
)
from workflows.tune.space import EarlyStopping, max_epochs, search_space, starting_points, trial_dirname, trial_name
from workflows.tune.trial import run_trial

MODE = "max"  # val_acc
# Bytes Ray books for a trial's own process (torch, MLflow, the evaluation): a rough
# size, booked for scheduling only (Ray does not enforce it).
TRIAL_MEMORY = 512 * 2**20


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before its trials did (Ctrl+C): the parent run ends KILLED."""


def run(config: TuneConfig) -> int:
    uri = tracking.use_tracking()
    base = plan(config)  # DATA and the model, checked before Ray starts
    resumed = resumable(config, base)
    if resumed:
        config = resumed_config(config, resumed["run_id"])
        base = plan(config)
    config = absolute_paths(config, base)
    space, described = search_space(config, base)
    if not space:
        raise CnnflowError(f"--search {config.search!r} leaves nothing to search for model {config.model!r}")
    epochs = max_epochs(space, base)
    with ray_session(config):
        scaling = scaling_for(config)  # fails here if the cluster is too small for one trial
        concurrency = concurrent_trials(config, scaling)
        with tracking.parent_run(
            experiment=config.experiment,
            run_name=config.run_name,
            params={
                **resolved_options(base),
                **{k: getattr(config, k) for k in ("trials", "time_budget", "search", "grace")},
                **{f"search.{k}": v for k, v in described.items()},
            },
            tags={**run_tags(base), KIND_TAG: KIND},
            run_id=resumed["run_id"] if resumed else None,
        ) as parent_id:
            name = config.name or (resumed["tags"][NAME_TAG] if resumed else f"cnnflow-tune-{parent_id}")
            path = resumed["path"] if resumed else experiment_path(config, name)
            if not resumed:
                tracking.set_tags(parent_id, {NAME_TAG: name, PATH_TAG: path})
                tracking.log_dict(parent_id, dataclasses.asdict(config), CONFIG_ARTIFACT)
            click.echo(
                f"MLflow parent run {tracking.run_url(parent_id, uri)} in experiment {config.experiment!r}"
                f"{' (resumed, with the options it started with)' if resumed else ''}; one child run per trial"
            )
            click.echo(f"  open it with: {tracking.ui_hint(uri)}")
            click.echo(
                f"  {config.trials} trials, {concurrency} at a time, up to {epochs} epochs each; "
                f"ASHA stops trailing trials from {config.grace:.0%} of their schedule"
                + (f"; time budget {config.time_budget:g} s" if config.time_budget else "")
            )
            for key, text in described.items():
                click.echo(f"  {key}: {text}")
            click.echo(redact_uri(f"  Ray Tune folder: {path} (if interrupted: cnnflow tune {config.data} --resume)"))

            trainable = ray.tune.with_resources(
                ray.tune.with_parameters(run_trial, base=trial_options(config, base), parent_run_id=parent_id, uri=uri),
                # No CPU: the trial's process waits on its trainer, whose workers hold the
                # CPUs (one more here would starve Ray Data on a small machine). Tune needs
                # the request to hold something: the process's own memory.
                {"cpu": 0, "memory": TRIAL_MEMORY},
            )
            if resumed:
                # The search space, scheduler and callbacks come back from the saved state.
                tuner = ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = new_tuner(config, base, trainable, space, epochs, concurrency, name, path, parent_id, uri)
            started = time.monotonic()
            with classic_tune_output():
                results = tuner.fit()
            budget_spent = config.time_budget is not None and time.monotonic() - started >= config.time_budget
            cut = end_cut_children(parent_id, results, config.trials, budget_spent=budget_spent)
            if cut is not None:
                click.echo(redact_uri(f"search interrupted ({cut}); go on with: cnnflow tune {config.data} --resume"), err=True)
                raise SearchInterrupted(cut)
            if budget_spent:
                click.echo(f"time budget of {config.time_budget:g} s spent after {len(results)} of {config.trials} trials")
            best = best_result(results)
            if best is None:
                errors = [r.error for r in results if r.error is not None]
                raise CnnflowError(
                    f"no trial finished (of {len(results)}; {len(errors)} failed"
                    + (f", first error: {first_line(errors[0])}" if errors else "")
                    + f"); see the child runs of {parent_id}"
                )
            tracking.set_tags(
                parent_id,
                {"best_trial": best["trial"], "best_run_id": best["run_id"], "best_val_acc": f"{best[BEST_METRIC]:.6f}"},
            )
            tracking.log_metrics(parent_id, {BEST_METRIC: best[BEST_METRIC]})
            version = register_best(base, best, parent_id)
            decision = promote(base.register_as, version, base.data) if config.promote else None
    click.echo(
        f"best {best['trial']}: val_acc {best[BEST_METRIC]:.4f} (best epoch {best['best_epoch']}; run {best['run_id']})"
    )
    click.echo(f"  options: {format_params(best['config'])}")
    click.echo(f"registered {base.register_as} v{version}")
    if decision is not None:
        click.echo(decision.describe())
    return 0


def new_tuner(
    config: TuneConfig,
    base: Plan,
    trainable: Any,
    space: dict[str, Any],
    epochs: int,
    concurrency: int,
    name: str,
    path: str,
    parent_id: str,
    uri: str,
) -> Any:
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=BEST_METRIC,
            mode=MODE,
            num_samples=config.trials,
            time_budget_s=config.time_budget,
            scheduler=EarlyStopping(grace=config.grace),
            # Random search, seeded; it also caps the trials at once (Tune ignores
            # max_concurrent_trials next to a search algorithm of this kind). The first
            # trial is the given options themselves, so the search can only improve on a
            # plain `cnnflow train` with them (given the time to finish that trial).
            search_alg=ray.tune.search.BasicVariantGenerator(
                points_to_evaluate=starting_points(config, base, space),
                max_concurrent=concurrency,
                random_state=config.seed,
            ),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=os.path.dirname(path),
            callbacks=[TrialTable(list(space), epochs=epochs), StoppedTrials(parent_id, epochs=epochs, uri=uri)],
            verbose=0,  # the table is the progress display
            # Train already retries failed workers (--max-failures); a trial that still
            # fails is one data point less, not a reason to run it again.
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


@contextmanager
def classic_tune_output() -> Iterator[None]:
    """Tune's classic output engine for the search: at verbose=0 it prints nothing.

    Ray 2.60's new engine (the default) prints an experiment box and a TensorBoard hint
    even at verbose=0; RAY_AIR_NEW_OUTPUT=0 is Ray's documented switch back.
    """
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def absolute_paths(config: TuneConfig, p: Plan) -> TuneConfig:
    """Paths made absolute: a trial's working directory is its own folder, and a resume
    may start elsewhere."""
    local = {k: os.path.abspath(v) for k in ("storage", "weights") if (v := getattr(config, k)) and "://" not in v}
    return dataclasses.replace(config, data=p.data, **local)


def trial_options(config: TuneConfig, p: Plan) -> dict[str, Any]:
    """The TrainConfig every trial starts from, epochs resolved once (so ASHA and every
    trial agree); registration is the driver's."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in dataclasses.asdict(config).items() if k in fields}
    return {**options, "epochs": p.epochs, "promote": False}


def concurrent_trials(config: TuneConfig, scaling: Any) -> int:
    """Trials whose trainers fit the cluster at once: each trainer's workers plus one CPU
    for Ray Data's reads (what `scaling_for` leaves free); on GPU, also `workers` GPUs."""
    import ray

    total = ray.cluster_resources()
    per_trial = scaling.num_workers * scaling.resources_per_worker.get("CPU", 1) + 1
    fits = int(total.get("CPU", 0) // per_trial)
    if config.gpu:
        fits = min(fits, int(total.get("GPU", 0) // config.workers))
    return max(1, min(fits, config.trials))
