"""The train driver: the MLflow run, a `TorchTrainer` over the shards, then evaluate, log, register.

After `plan`, the driver creates the MLflow run, then runs a `TorchTrainer` over Ray
Datasets read from the shards (`loop.py` is the per-worker side). After the fit it takes
the best validation epoch's weights (Ray Train keeps that checkpoint and the latest),
evaluates them on the whole validation split, fits them a temperature there (their
scores' calibration), logs the artifacts and the model (with the training split's
perceptual hashes, for predict's `seen_in_training`), registers a new version and,
with --promote, moves `champion` if earned. The shards are the run's MLflow dataset
inputs (workflows/tracking/lineage.py). `cnnflow tune`
runs the same `train_and_log` once per trial and registers only the best.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click
import torch

from cnn.models import model_from_state
from data_prep.near_duplicates import training_hashes
from data_prep.options import DEFAULT_NEAR_DUPLICATE_DISTANCE
from data_prep.schema import TRAIN, VAL
from data_prep.shard_reader import read_dataset
from workflows import tracking
from workflows.config import TrainConfig
from workflows.errors import CnnflowError
from workflows.promote import promote
from workflows.ray_runtime import ray_session
from workflows.tracking.pyfunc_model import preprocessing_from_manifest
from workflows.train.artifacts import example_image, log_artifacts, log_calibration
from workflows.train.evaluation import Evaluation, calibrate, evaluate
from workflows.train.loop import CHECKPOINT_FILE, PID_FILE_ENV, LoopConfig, train_loop
from workflows.train.plan import BEST_METRIC, Plan, cpus_per_node, plan, resolved_options, run_tags, scaling_for
from workflows.train.progress import EpochLines

# channels_last on CPU: 1.5x faster for `simple` (32 and 128 px, one thread), equal for
# resnet18 (measured with torch 2.14 on this project's 2-core machine); on GPU it is
# what the tensor cores want.
CPU_CHANNELS_LAST = True
MATERIALIZE_FRACTION = 0.25  # of the object store: splits smaller than this are read once


def run(config: TrainConfig) -> int:
    p = plan(config)
    # No dashboard on a local Ray: Ray Train's placement-group cleaner then cannot ask the
    # state API and stops (one traceback in Ray's log folder), but the cleaner only matters
    # to a cluster that outlives a crashed controller, and a local Ray ends with this
    # command. Tune keeps it: a leaked placement group there would starve later trials.
    with ray_session(config, dashboard=False):
        scaling = scaling_for(config)
        uri = tracking.use_tracking()
        with tracking.training_run(
            experiment=config.experiment, run_name=config.run_name, params=resolved_options(p), tags=run_tags(p)
        ) as run_id:
            click.echo(f"MLflow run {tracking.run_url(run_id, uri)} in experiment {config.experiment!r}")
            click.echo(f"  open it with: {tracking.ui_hint(uri)}")
            click.echo(f"  {p.epochs} epochs{'' if config.epochs else ' (chosen from the data: --epochs to set)'}")
            trained = train_and_log(p, run_id, uri, scaling)
            version, decision = register(p, trained)
    click.echo(
        f"registered {p.register_as} v{version}  val_acc {trained.evaluation.accuracy:.4f}  "
        f"(best epoch {trained.best_epoch} of {p.epochs}; run {run_id})"
    )
    if decision is not None:
        click.echo(decision.describe())
    return 0


class TrainingFailed(CnnflowError):
    """Ray Train gave up (more failures than --max-failures); the MLflow run is FAILED."""


@dataclass
class Trained:
    """A finished training run: its best epoch's model, evaluated and logged, not registered."""

    run_id: str
    model_uri: str  # the logged model, for tracking.register_model
    evaluation: Evaluation
    best_epoch: int


def train_and_log(
    p: Plan, run_id: str, uri: str, scaling: Any, *, callbacks: Sequence[Any] = (), epoch_lines: bool = True
) -> Trained:
    """Log the shards as the run's dataset inputs; fit, then evaluate, describe and log
    the best epoch's model into the run."""
    tracking.log_dataset_inputs(run_id, data=p.data, manifest=p.manifest, splits=(TRAIN, VAL))
    state = fit(p, run_id, uri, scaling, callbacks=callbacks, epoch_lines=epoch_lines)
    model, spec = model_from_state(state["model"])
    preprocessing = preprocessing_from_manifest(p.manifest, tta=p.tta)
    device = "cuda" if p.config.gpu and torch.cuda.is_available() else "cpu"
    # Scored at T = 1, then a temperature fitted on the same logits; the model's contract
    # records it, and what the run logs and registers is the calibrated evaluation.
    calibration = calibrate(evaluate(model.eval(), preprocessing, p.data, device=device), p.manifest)
    evaluation = calibration.calibrated
    preprocessing.update(calibration.contract())
    # The training split's hashes go with the model, so that predict can name the training
    # image a row is a near-copy of without reading DATA (None: shards without hashes).
    hashes = training_hashes(p.data, TRAIN)
    if hashes is not None:
        rule = p.manifest.get("split_rule") or {}
        preprocessing["near_duplicate_distance"] = int(rule.get("near_duplicate_distance", DEFAULT_NEAR_DUPLICATE_DISTANCE))
    tracking.set_tags(run_id, {"best_epoch": state["epoch"]})
    log_artifacts(p, run_id, model, evaluation)
    log_calibration(run_id, calibration)
    model_uri = tracking.log_model(
        run_id, state=state["model"], preprocessing=preprocessing, example_image=example_image(p), train_hashes=hashes
    )
    return Trained(run_id, model_uri, evaluation, int(state["epoch"]))


def register(p: Plan, trained: Trained) -> tuple[int, tracking.Decision | None]:
    """A new version of `register_as` from the trained model; with --promote, the gate."""
    version = tracking.register_model(
        trained.run_id,
        trained.model_uri,
        register_as=p.register_as,
        version_tags={
            "run_id": trained.run_id,
            "content_hash": p.manifest.get("content_hash", ""),
            "val_acc": f"{trained.evaluation.accuracy:.6f}",
            "best_epoch": trained.best_epoch,
            "data": p.data,
        },
    )
    decision = None
    if p.config.promote:
        decision = promote(p.register_as, int(version.version), p.data, candidate=trained.evaluation)
    return int(version.version), decision


def fit(
    p: Plan, run_id: str, uri: str, scaling: Any, *, callbacks: Sequence[Any] = (), epoch_lines: bool = True
) -> dict[str, Any]:
    """Run the TorchTrainer; return the best epoch's checkpoint contents.

    `callbacks` are Ray Train callbacks (a Tune trial passes Tune's report callback);
    `epoch_lines` prints a line per epoch (a Tune trial has its table instead).
    """
    from ray.data import DataContext, ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    c = p.config
    loop = LoopConfig(
        spec={"name": p.spec.name, "num_classes": p.spec.num_classes, "image_size": p.spec.image_size, "options": p.spec.options},
        mean=list(p.manifest["mean"]),
        std=list(p.manifest["std"]),
        train_rows=int(p.manifest["num_rows"][TRAIN]),
        epochs=p.epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        warmup=c.warmup,
        optimizer=c.optimizer,
        weight_decay=c.weight_decay,
        label_smoothing=c.label_smoothing,
        hflip=c.hflip,
        max_shift=c.max_shift,
        ema=c.ema,
        tta=p.tta,
        seed=c.seed,
        channels_last=c.gpu or CPU_CHANNELS_LAST,
        cpus_per_node=cpus_per_node(),
        tracking_uri=uri,
        run_id=run_id,
    )
    datasets = {split: read_split(p, split) for split in (TRAIN, VAL)}
    env = {PID_FILE_ENV: os.environ[PID_FILE_ENV]} if os.environ.get(PID_FILE_ENV) else {}
    storage = c.storage if c.storage is None or "://" in c.storage else os.path.abspath(c.storage)
    # Ray Train's ingest replaces each dataset's execution options with its own: keep
    # them, but with the row order preserved, so that one --seed means one data order.
    # (Built here rather than by DataConfig.default_ingest_options(), which copies the
    # deprecated exclude_resources and so warns on every run.)
    ingest = ExecutionOptions(
        resource_limits=DataContext.get_current().execution_options.resource_limits, preserve_order=True
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop.to_dict(),
        scaling_config=scaling,
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(
            name=f"cnnflow-{run_id}",  # one Ray Train run per MLflow run
            storage_path=storage,
            failure_config=FailureConfig(max_failures=c.max_failures),
            # The best epoch by val_acc; Ray also keeps the latest, which a restart resumes from.
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=BEST_METRIC, checkpoint_score_order="max"
            ),
            callbacks=list(callbacks) or None,
            worker_runtime_env={"env_vars": env} if env else None,
            logging_config=LoggingConfig(log_level="WARNING"),  # our epoch lines, not Train's INFO
        ),
    )
    from ray.train import TrainingFailedError

    try:
        with EpochLines(uri, run_id, p.epochs, click.echo) if epoch_lines else contextlib.nullcontext():
            result = trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingFailed(
            f"training failed after {c.max_failures} retries (MLflow run {run_id} is FAILED): {_first_line(exc)}"
        ) from exc
    best = result.get_best_checkpoint(BEST_METRIC, "max") if result.checkpoint else None
    if best is None:
        raise TrainingFailed("training ended without a checkpoint")
    with best.as_directory() as folder:
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def read_split(p: Plan, split: str) -> Any:
    """A split's shards as a Ray Dataset: streamed, or held in the object store if small.

    Streaming re-reads the Parquet files every epoch (new read tasks each time); a split
    that takes under a quarter of the object store is read once instead (Ray Data's own
    advice), which on small data saves seconds per epoch.
    """
    import ray

    # Seeded file order and order-preserving execution: the same --seed reads the same
    # rows in the same order, so a run can be repeated (the per-epoch shuffle is seeded
    # in the loop).
    seed = p.config.seed if split == TRAIN else None
    ds = read_dataset(p.data, split, columns=["image", "label"], shuffle_seed=seed, preserve_order=True)
    nbytes = int(p.manifest["num_rows"][split]) * p.spec.image_size**2 * 3
    if nbytes < MATERIALIZE_FRACTION * ray.available_resources().get("object_store_memory", 0):
        ds = ds.materialize()
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
