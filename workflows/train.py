"""`cnnflow train DATA`: data-parallel training on Ray Train, tracked in MLflow, registered.

The driver checks everything it can before any worker starts (DATA is a prep output
with train and val rows, the model builds at the data's image size, the cluster has the
CPUs/GPUs asked for), creates the MLflow run, then runs a `TorchTrainer` over Ray
Datasets read from the shards (`workflows/train_loop.py` is the per-worker side). After
the fit it takes the best validation epoch's weights (Ray Train keeps that checkpoint
and the latest), evaluates them on the whole validation split, logs the artifacts and
the model, registers a new version and, with --promote, moves `champion` if earned.
`cnnflow tune` runs the same `train_and_log` once per trial and registers only the best.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from collections.abc import Sequence
from typing import Any

import click
import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from cnn.models import ModelSpec, build_model, model_from_state
from cnn.summary import summarize
from data_prep.schema import TRAIN, VAL, join, pixels, read_manifest, resolve
from workflows import __version__, tracking
from workflows.config import TrainConfig, budget_epochs, check_model_name, model_options, to_dict
from workflows.errors import CnnflowError
from workflows.promote import Evaluation, evaluate, promote
from workflows.tracking.pyfunc_model import preprocessing_from_manifest
from workflows.ray_runtime import ray_session
from workflows.train_progress import EpochLines
from workflows.train_loop import CHECKPOINT_FILE, PID_FILE_ENV, LoopConfig, train_loop

# channels_last on CPU: 1.5x faster for `simple` (32 and 128 px, one thread), equal for
# resnet18 (measured with torch 2.14 on this project's 2-core machine); on GPU it is
# what the tensor cores want.
CPU_CHANNELS_LAST = True
MATERIALIZE_FRACTION = 0.25  # of the object store: splits smaller than this are read once
BEST_METRIC = "val_acc"  # the epoch whose weights get registered


@dataclass
class Plan:
    """Everything decided before Ray starts: resolved options, data, model."""

    config: TrainConfig
    data: str  # absolute path or URI
    manifest: dict[str, Any]
    spec: ModelSpec
    register_as: str
    epochs: int  # --epochs, or the budget chosen from the data
    tta: str  # the test-time augmentation validation and prediction apply


def plan(config: TrainConfig) -> Plan:
    """Check DATA and the model; a clear error here costs no worker start-up."""
    data = config.data if "://" in config.data else os.path.abspath(config.data)
    try:
        manifest = read_manifest(data)
    except ValueError as exc:
        raise CnnflowError(str(exc)) from None
    rows = manifest.get("num_rows", {})
    for split in (TRAIN, VAL):
        if not rows.get(split):
            raise CnnflowError(f"{data} has no {split} images (num_rows: {rows}); run prep with labels and a val split")
    if config.weights and not os.path.exists(config.weights):
        raise CnnflowError(f"--weights {config.weights}: no such file")
    spec = ModelSpec(config.model, len(manifest["classes"]), manifest["image_size"], model_options(config))
    try:
        build_model(spec)
    except ValueError as exc:
        raise CnnflowError(f"model {config.model!r} on {spec.image_size} px images: {exc}") from None
    register_as = config.register_as or PurePosixPath(data.rstrip("/")).name
    if not config.register_as:  # the default comes from a folder name: MLflow's rules apply to it too
        check_model_name(register_as, "the registered model name (DATA's folder name; choose one with --register-as)")
    epochs = config.epochs or budget_epochs(int(rows[TRAIN]), config.batch_size * config.workers)
    tta = config.tta if config.hflip else "none"  # a mirror is only the same image to a model trained on mirrors
    return Plan(config, data, manifest, spec, register_as, epochs, tta)


def resolved_options(p: Plan) -> dict[str, Any]:
    return {**to_dict(p.config), "data": p.data, "register_as": p.register_as, "epochs": p.epochs, "tta": p.tta}


def run(config: TrainConfig) -> int:
    p = plan(config)
    with ray_session(config):
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


def scaling_for(config: TrainConfig) -> Any:
    """Worker resources that leave the data pipeline a CPU: pools that take every CPU hang."""
    import ray
    from ray.train import ScalingConfig

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if config.gpu:
        if gpus < config.workers:
            raise CnnflowError(f"--gpu --workers {config.workers} needs {config.workers} GPUs; this Ray has {gpus:g}")
        return ScalingConfig(
            num_workers=config.workers,
            use_gpu=True,
            resources_per_worker={"CPU": 1, "GPU": 1},
            placement_strategy="SPREAD",
        )
    if cpus < config.workers:
        raise CnnflowError(f"--workers {config.workers} needs {config.workers} CPUs; this Ray has {cpus:g}")
    # Reserve one logical CPU for reading shards; workers share the rest (at most 1 each).
    per_worker = min(1.0, max(cpus - 1, 0) / config.workers)
    return ScalingConfig(
        num_workers=config.workers,
        use_gpu=False,
        resources_per_worker={"CPU": per_worker},
        # One worker per node where there are enough nodes: each then takes its node's
        # cores as torch threads (cpus_per_node); on one machine SPREAD still packs.
        placement_strategy="SPREAD",
    )


def cpus_per_node() -> int:
    """CPUs of the smallest node: each worker takes its share as torch threads."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    return int(min(node_cpus)) if node_cpus else 1


def run_tags(p: Plan) -> dict[str, str]:
    import ray

    m = p.manifest
    return {
        "content_hash": str(m.get("content_hash", "")),
        "data": p.data,
        "classes": ",".join(m["classes"])[:4000],
        "num_classes": str(len(m["classes"])),
        "model": p.spec.name,
        "workers": str(p.config.workers),
        "device": "gpu" if p.config.gpu else "cpu",
        "cnnflow_version": __version__,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }


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
    """Fit, then evaluate, describe and log the best epoch's model into the run."""
    state = fit(p, run_id, uri, scaling, callbacks=callbacks, epoch_lines=epoch_lines)
    model, spec = model_from_state(state["model"])
    preprocessing = preprocessing_from_manifest(p.manifest, tta=p.tta)
    device = "cuda" if p.config.gpu and torch.cuda.is_available() else "cpu"
    evaluation = evaluate(model.eval(), preprocessing, p.data, device=device)
    tracking.set_tags(run_id, {"best_epoch": state["epoch"]})
    log_artifacts(p, run_id, model, evaluation)
    model_uri = tracking.log_model(
        run_id, state=state["model"], preprocessing=preprocessing, example_image=example_image(p)
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


def example_image(p: Plan) -> bytes:
    """One validation image as PNG bytes: the logged model's input example (MLflow checks it)."""
    import pyarrow.dataset as pads
    from PIL import Image

    fs, path = resolve(join(p.data, VAL))
    batch = next(pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=["image"], batch_size=1))
    buf = io.BytesIO()
    Image.fromarray(pixels(batch["image"], p.spec.image_size)[0]).save(buf, format="PNG")
    return buf.getvalue()


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
    import ray.data

    # Seeded file order and order-preserving execution: the same --seed reads the same
    # rows in the same order, so a run can be repeated (the per-epoch shuffle is seeded
    # in the loop).
    shuffle = ray.data.FileShuffleConfig(seed=p.config.seed) if split == TRAIN else None
    ds = ray.data.read_parquet(join(p.data, split), columns=["image", "label"], shuffle=shuffle)
    ds.context.execution_options.preserve_order = True
    nbytes = int(p.manifest["num_rows"][split]) * p.spec.image_size**2 * 3
    if nbytes < MATERIALIZE_FRACTION * ray.available_resources().get("object_store_memory", 0):
        ds = ds.materialize()
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


# --- artifacts ---------------------------------------------------------------------------


def log_artifacts(p: Plan, run_id: str, model: torch.nn.Module, evaluation: Evaluation) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, precision_recall_fscore_support

    classes = list(p.manifest["classes"])
    tracking.log_dict(run_id, p.manifest, "manifest.json")
    tracking.log_text(run_id, yaml.safe_dump(resolved_options(p), sort_keys=False), "config.yaml")
    tracking.log_text(run_id, summarize(model, p.spec.image_size).table() + "\n", "model_summary.txt")

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        evaluation.labels, evaluation.predictions, labels=labels, zero_division=0
    )
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    tracking.log_dict(run_id, {"accuracy": evaluation.accuracy, "loss": evaluation.loss, "classes": per_class}, "per_class.json")

    cm = confusion_matrix(evaluation.labels, evaluation.predictions, labels=labels)
    side = 3 + 0.5 * len(classes)
    fig = Figure(figsize=(side, side))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=fig.subplots(), colorbar=False, xticks_rotation="vertical")
    fig.suptitle(f"validation, accuracy {evaluation.accuracy:.3f}")
    fig.tight_layout()
    tracking.log_figure(run_id, fig, "confusion_matrix.png")
    tracking.log_figure(run_id, curves_figure(run_id), "curves.png")
    if evaluation.misclassified:
        tracking.log_figure(run_id, misclassified_figure(evaluation, classes), "misclassified.png")


def curves_figure(run_id: str) -> Figure:
    """Loss, accuracy and learning rate per epoch, read back from the run itself."""
    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, 3)
    for ax, (title, keys) in zip(axes, [("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",))]):
        for key in keys:
            history = tracking.metric_history(run_id, key)
            ax.plot([s for s, _ in history], [v for _, v in history], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def misclassified_figure(evaluation: Evaluation, classes: list[str]) -> Figure:
    shown = evaluation.misclassified
    cols = min(5, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (image, true, predicted) in zip(axes, shown):
        ax.imshow(image)
        ax.set_title(f"true {classes[true]}\npred {classes[predicted]}", fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("train")
