"""`cnnflow tune DATA`: a hyperparameter search with Ray Tune, each trial a Ray Train run.

Ray 2.60's way of tuning a Train V2 trainer: a Tune *function trainable* per trial
(`run_trial`) that builds and fits the same `TorchTrainer` as `cnnflow train`, with
`RunConfig(callbacks=[TuneReportCallback()])` so that every `ray.train.report` of the
workers reaches Tune as a trial result. The driver's `Tuner` samples the train options
named by --search around their given values (`search_space`), and an ASHA scheduler on
val_acc stops the trials that trail (`EarlyStopping`). ASHA compares trials at the same
share of their own schedule (`progress`, epoch / epochs), not at the same epoch: at
epoch 8 a 48-epoch trial is still warming up while a 12-epoch one is annealing, and
comparing them there would always keep the short one.

MLflow: the driver creates one parent run before the search (params: the base options
and the search space); each trial, in its own process, opens a child run under it and
logs exactly what a `cnnflow train` run logs (`train_and_log`). A trial stopped early
is ended FINISHED by the driver with a `stopped_early` tag, since its own process is
gone. After the search the best trial's model is registered (and sent through the
champion gate with --promote); the parent is tagged with that trial.

Resources: a trial's own process requests no CPU (it only waits on its trainer); its
trainer's workers take what `scaling_for` gives them and leave a CPU for Ray Data. So
that trials never wait on each other's CPUs, no more trials run at once than the
cluster holds trainers (`concurrent_trials`): one at a time on a 2-CPU machine.

Resuming: the Tune experiment lives under --storage, named after the parent run (or
--name); `--resume` finds the last unfinished parent run on DATA, restores the Tune
experiment it names (`Tuner.restore(..., resume_errored=True)`), and goes on under the
same parent. A trial that runs again reopens its child run, and its trainer (same name
and storage) resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import ray.tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cnn.models import ModelSpec, build_model
from data_prep.redact import HIDDEN, redact_uri, unredact
from workflows import tracking
from workflows.config import RayOptions, TrainConfig, TuneConfig, make_config
from workflows.errors import CnnflowError
from workflows.promote import promote
from workflows.ray_runtime import configure_ray_data, ray_session
from workflows.train.driver import train_and_log
from workflows.train.plan import BEST_METRIC, Plan, plan, resolved_options, run_tags, scaling_for

MODE = "max"  # val_acc
TIME_ATTR = "epoch"  # what the workers report per epoch
PROGRESS = "progress"  # epoch / epochs, also reported per epoch: ASHA's rungs are in shares of a schedule
REDUCTION_FACTOR = 3  # ASHA keeps the top third at each rung
# Bytes Ray books for a trial's own process (torch, MLflow, the evaluation): a rough
# size, booked for scheduling only (Ray does not enforce it).
TRIAL_MEMORY = 512 * 2**20
# Search ranges, as factors of the given value (see TuneConfig.search's help).
# lr log-uniform in [lr / 2, lr * 2]: on the bench, peaks beyond that lost on every set
# (photo 2e-3 / 4e-3 / 8e-3: 0.84 / 0.89 / 0.84), so wider ranges only waste trials.
LR_FACTOR = 2.0
WEIGHT_DECAY_FACTOR = 10.0
SCALES = (0.0, 0.5, 1.0, 1.5)  # max_shift and label_smoothing
# The default budget is sized for a quick first run (`cnnflow train`); a search is
# there to spend more: on the photo set 20 / 24 / 30 epochs gave 0.82 / 0.87 / 0.89.
EPOCH_SCALES = (1.0, 1.5, 2.0)
# Tags: on the parent run, and on a child that was stopped before it finished.
KIND_TAG, KIND = "cnnflow_kind", "tune"
NAME_TAG, PATH_TAG = "tune_name", "tune_path"
STOPPED_TAG = "stopped_early"
CONFIG_ARTIFACT = "tune_config.json"  # on the parent: the options, for --resume
# The last result a finished trial reports (after its evaluation and logged model).
FINAL = "model_uri"


# --- the search space ------------------------------------------------------------------


def search_space(config: TuneConfig, p: Plan) -> tuple[dict[str, Any], dict[str, str]]:
    """Tune domains for the searched options, and how each reads (for the parent run).

    Options whose range would be a single value (width/depth off `simple`, a zero
    weight decay, ...) are left out: they stay as given.
    """
    space: dict[str, Any] = {}
    for name in config.search_options():
        value = getattr(config, name) if name != "epochs" else p.epochs
        if name == "lr":
            space[name] = ray.tune.loguniform(value / LR_FACTOR, value * LR_FACTOR)
        elif name == "weight_decay" and value > 0:
            space[name] = ray.tune.loguniform(value / WEIGHT_DECAY_FACTOR, min(value * WEIGHT_DECAY_FACTOR, 0.5))
        elif name == "width" and config.model == "simple":
            space[name] = _choice([max(1, value // 2), value, value * 2])
        elif name == "depth" and config.model == "simple":
            space[name] = _choice([d for d in (value - 1, value, value + 1) if d >= 1 and _builds(p, depth=d)])
        elif name == "max_shift":
            space[name] = _choice([round(s * value, 4) for s in SCALES if s * value < 0.5])
        elif name == "label_smoothing":
            space[name] = _choice([round(s * value, 4) for s in SCALES if s * value < 1])
        elif name == "epochs":
            space[name] = _choice([max(1, round(s * value)) for s in EPOCH_SCALES])
    space = {k: v for k, v in space.items() if v is not None}
    return space, {k: _describe(v) for k, v in space.items()}


def _choice(values: list[Any]) -> Any:
    values = sorted(set(values))
    return ray.tune.choice(values) if len(values) > 1 else None


def _builds(p: Plan, **options: Any) -> bool:
    """Whether `simple` builds at the data's image size with these options (depth halves it per stage)."""
    spec = ModelSpec(p.spec.name, p.spec.num_classes, p.spec.image_size, {**p.spec.options, **options})
    try:
        build_model(spec)
    except ValueError:
        return False
    return True


def _describe(domain: Any) -> str:
    if hasattr(domain, "categories"):  # tune.choice
        return "choice " + ", ".join(f"{v:g}" for v in domain.categories)
    return f"log-uniform {domain.lower:.3g}..{domain.upper:.3g}"


def starting_point(config: TuneConfig, p: Plan, space: dict[str, Any]) -> dict[str, Any]:
    """The searched options at their given values: what `cnnflow train` alone would run."""
    return {name: p.epochs if name == "epochs" else getattr(config, name) for name in space}


def max_epochs(space: dict[str, Any], p: Plan) -> int:
    if "epochs" in space:
        return max(space["epochs"].categories)
    return p.epochs


class EarlyStopping(AsyncHyperBandScheduler):
    """ASHA on val_acc by share of schedule (`progress`) that lets a trial's last epoch through.

    ASHA may stop a trial at any rung, the last epoch included; stopped there, the
    trial would save no training (it is done) but lose its evaluation and logged model.
    """

    def __init__(self, *, grace: float, **kwargs: Any):
        super().__init__(time_attr=PROGRESS, max_t=1.0, grace_period=grace, reduction_factor=REDUCTION_FACTOR, **kwargs)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(PROGRESS, 0) >= 1:
            return TrialScheduler.CONTINUE
        return action


def trial_name(trial: Any) -> str:
    return trial_name_from_id(trial.trial_id)


def trial_name_from_id(trial_id: str) -> str:
    """trial-1, trial-2, ... from Tune's trial ids (<experiment>_00000, _00001, ...)."""
    return f"trial-{trial_index(trial_id) + 1}"


def trial_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


# --- one trial (runs in its own Ray actor) ----------------------------------------------


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


# --- the driver ---------------------------------------------------------------------------


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
                points_to_evaluate=[starting_point(config, base, space)],
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


def resumed_config(config: TuneConfig, parent_id: str) -> TuneConfig:
    """The options the search started with (saved on its parent run); this driver's Ray ones.
    A URI saved without its credentials gets them back from the same URI given now."""
    given = dataclasses.asdict(config)
    saved = {k: unredact(v, given.get(k)) for k, v in tracking.read_dict(parent_id, CONFIG_ARTIFACT).items()}
    ray_options = {f.name: getattr(config, f.name) for f in dataclasses.fields(RayOptions)}
    return make_config(TuneConfig, {**saved, **ray_options, "resume": True}, source=f"run {parent_id}'s {CONFIG_ARTIFACT}")


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


def experiment_path(config: TuneConfig, name: str) -> str:
    from ray.train.constants import DEFAULT_STORAGE_PATH

    storage = config.storage or DEFAULT_STORAGE_PATH
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    return f"{storage.rstrip('/')}/{name}"


def resumable(config: TuneConfig, p: Plan) -> dict[str, Any] | None:
    """The parent run of the search to go on with, or None for a new search.

    --name: the search of that name, if there is one (finished: an error). --resume
    without --name: the last unfinished search on DATA in the experiment.
    """
    if config.name:
        found = tracking.latest_run(config.experiment, {KIND_TAG: KIND, NAME_TAG: config.name})
        if found is None:
            if ray.tune.Tuner.can_restore(experiment_path(config, config.name)):
                raise CnnflowError(
                    f"{experiment_path(config, config.name)} holds a search that has no parent run in "
                    f"experiment {config.experiment!r}; choose another --name"
                )
            if config.resume:
                raise CnnflowError(f"no search named {config.name!r} in experiment {config.experiment!r} to resume")
            return None
        if found["status"] == "FINISHED":
            raise CnnflowError(
                f"the search named {config.name!r} is finished (parent run {found['run_id']}); choose another --name"
            )
    elif config.resume:
        found = tracking.latest_run(config.experiment, {KIND_TAG: KIND, "data": p.data}, unfinished=True)
        if found is None:
            raise CnnflowError(f"no unfinished search on {p.data} in experiment {config.experiment!r} to resume")
    else:
        return None
    path = found["tags"].get(PATH_TAG)
    if path and NAME_TAG in found["tags"]:  # a --storage URI's credentials, given again, come back
        path = unredact(path, experiment_path(config, found["tags"][NAME_TAG]))
    if not path or not ray.tune.Tuner.can_restore(path):
        raise CnnflowError(
            f"the search of parent run {found['run_id']} cannot be resumed: no Ray Tune state at {path}"
            + ("; pass --storage again with its credentials" if path and HIDDEN in path else "")
        )
    return {**found, "path": path}


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


def format_params(params: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(params.items()))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


# --- Tune callbacks in the driver ----------------------------------------------------------


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

    skip = {*AUTO_RESULT_KEYS, TIME_ATTR}
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


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("tune")
