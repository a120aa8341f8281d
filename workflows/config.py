"""The commands' options, each with its default, help and bounds.

Each command is one dataclass; `workflows/cli.py` makes its command line from the fields,
YAML files given with `--config` are checked against them (`workflows/options.py`), and
the resolved config is what gets logged to MLflow. Precedence: defaults < YAML < command
line. Paths have no defaults. Options are written where their defaults belong: prep's
and the image limits in `data_prep/options.py`, each model's own arguments in
`cnn/registry.py`; the commands here take them from there.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Literal

from data_prep.options import MAX_IMAGE_SIZE, MAX_SEED, MIN_IMAGE_SIZE, ImageLimits, PrepOptions
from workflows.options import (
    check,
    check_experiment_name,
    check_model,
    check_model_name,
    check_range,
    check_run_name,
    model_option,
    models_help,
    option,
    positional,
)
from workflows.options import (  # noqa: F401  (re-exported: imported from here before they moved)
    ConfigError,
    config_fields,
    load_config,
    make_config,
    model_options,
    read_yaml,
    to_dict,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` there shows it
DEFAULT_EXPERIMENT = "cnnflow"
DEFAULT_SCORING_EXPERIMENT = "cnnflow-scoring"  # predict's runs, apart from the training runs
CHAMPION_ALIAS = "champion"

OptimizerName = Literal["adamw", "sgd"]
TestTimeAugmentation = Literal["none", "flip"]  # cnn.inference.TTA_MODES
OutputFormat = Literal["parquet", "csv"]
Precision = Literal["auto", "fp32", "bf16"]  # what each means: workflows/predict/precision.py


# The training budget when --epochs is not given: enough optimizer steps for a small set
# to converge, no more passes than a large one needs (settled on bench/bench_quality.py).
# The cap keeps a first run on 2,000 images at 64 px under 3 minutes on 2 cores (30
# epochs took 3.5); on the photo set 20, 24 and 30 epochs scored 0.820, 0.868 and 0.893.
TARGET_STEPS = 1500
MIN_EPOCHS, MAX_EPOCHS = 10, 24


def budget_epochs(train_rows: int, global_batch: int) -> int:
    """Epochs for about TARGET_STEPS optimizer steps, within [MIN_EPOCHS, MAX_EPOCHS]."""
    steps_per_epoch = max(1, math.ceil(train_rows / global_batch))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# Bounds shared by several options. Values outside them are refused when the config is
# built, before Ray starts (STYLE.md: validate early, say what is allowed). The image
# size's and the seed's are prep's (data_prep/options.py).
MAX_BATCH = 4096  # images per step or model call; more only risks running out of memory
MAX_CHANNELS = 2048  # simple: channels of the last stage, width x 2^(depth-1)


@dataclass(kw_only=True)
class RayOptions:
    address: str | None = option(
        None, "Ray cluster to connect to (default: RAY_ADDRESS, else a new local Ray)."
    )
    num_cpus: int | None = option(
        None, "CPUs a new local Ray may use (default: all); ignored on a cluster."
    )
    verbose: bool = option(
        False,
        "Also show Ray's and MLflow's own log lines (workers' output, warnings, INFO). "
        "By default the terminal gets cnnflow's lines only; Ray's stay in its log folder "
        "and what its core writes to the terminal goes to $TMPDIR/cnnflow-logs/.",
    )

    def __post_init__(self) -> None:
        # 0 CPUs would start a Ray that can never run a task: the job would wait forever.
        check(self.num_cpus is None or self.num_cpus >= 1, f"num_cpus must be >= 1, got {self.num_cpus}")


@dataclass(kw_only=True)
class PrepConfig(PrepOptions, RayOptions):
    """Turn an image folder into resized Parquet shards, a manifest and a quality report."""

    input: str = positional("Image folder or URI (s3://...), one subfolder per class.")
    output: str = positional("Output folder or URI for shards, manifest.json and report.json.")

    def __post_init__(self) -> None:
        RayOptions.__post_init__(self)
        PrepOptions.__post_init__(self)


@dataclass(kw_only=True)
class TrainConfig(RayOptions):
    """Train a CNN on prepared shards with Ray Train; track it in MLflow and register it."""

    data: str = positional("Folder or URI written by `cnnflow prep`.")
    model: str = option("simple", f"Architecture: {models_help()}.")
    width: int = model_option("simple", "width")
    depth: int = model_option("simple", "depth")
    weights: str | None = model_option("resnet18", "weights")
    epochs: int | None = option(
        None,
        f"Passes over the training data (default: from the data's size, about {TARGET_STEPS:,} "
        f"optimizer steps within {MIN_EPOCHS}-{MAX_EPOCHS} epochs).",
    )
    batch_size: int = option(64, "Images per step on each worker.")
    lr: float = option(4e-3, "Peak learning rate of torch's OneCycleLR, for the global batch.")
    warmup: float = option(0.3, "Share of the steps spent warming up to the peak learning rate.")
    optimizer: OptimizerName = option("adamw", "adamw or sgd (Nesterov momentum 0.9).")
    weight_decay: float = option(5e-4, "Decoupled weight decay.")
    label_smoothing: float = option(0.1, "Cross-entropy label smoothing.")
    hflip: bool = option(True, "Random horizontal flips (turn off for digits or text).")
    max_shift: float = option(0.125, "Random shifts, as a fraction of the image side.")
    ema: float = option(
        0.0, "Decay per step of a moving average of the weights that validation scores and "
        "registration keeps (0: off)."
    )
    tta: TestTimeAugmentation = option(
        "flip", "Test-time augmentation: flip averages each image with its mirror in validation "
        "and prediction (only with --hflip; recorded with the model)."
    )
    workers: int = option(1, "Data-parallel training workers.")
    gpu: bool = option(False, "Give each worker one GPU (bf16 autocast, channels_last).")
    experiment: str = option(DEFAULT_EXPERIMENT, "MLflow experiment.")
    run_name: str | None = option(None, "MLflow run name (default: MLflow's).")
    register_as: str | None = option(
        None, "Registered model name (default: the data folder's name)."
    )
    promote: bool = option(
        False, "Move the champion alias here if at least as accurate as the champion."
    )
    max_failures: int = option(2, "Worker failures to recover from (from the last checkpoint).")
    storage: str | None = option(
        None, "Checkpoint folder or URI, shared by all nodes (default: Ray's ~/ray_results)."
    )
    seed: int = option(0, "Seed for model initialisation and data order.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_model(self.model)
        _check_shape(self.width, self.depth)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        check_range("workers", self.workers, 1, 1024)
        if self.epochs is not None:
            check_range("epochs", self.epochs, 1, 10_000)
        check_range("lr", self.lr, 0, 10, low_open=True, high_open=True)
        check_range("warmup", self.warmup, 0, 1, low_open=True, high_open=True)
        check_range("weight_decay", self.weight_decay, 0, 1, high_open=True)
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("max_shift", self.max_shift, 0, 0.5, high_open=True)
        check_range("ema", self.ema, 0, 1, high_open=True)
        check_range("max_failures", self.max_failures, 0, 100)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_experiment_name(self.experiment)
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.register_as is not None:
            check_model_name(self.register_as, "register_as")


@dataclass(kw_only=True)
class PredictConfig(ImageLimits, RayOptions):
    """Classify a folder of images with a registered model; write one row per file."""

    input: str = positional("Image folder or URI (any layout), or a `cnnflow prep` output.")
    output: str = positional("Output folder or URI for predictions and summary.json.")
    model: str | None = option(
        None,
        "MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/...) or a "
        "registered NAME, meaning models:/NAME@champion (default: the only registered model).",
    )
    batch_size: int | None = option(
        None, f"Images per model call (default: 64 on CPU, 256 on GPU; at most {MAX_BATCH})."
    )
    workers: int = option(
        1, "Model replicas (1-256); they share the CPUs decoding leaves them, so any number finishes."
    )
    gpu: bool = option(False, "Give each replica one GPU (at most as many replicas as GPUs).")
    precision: Precision = option(
        "auto",
        "Arithmetic of the model: auto is bf16 on a GPU that has it and float32 on CPU (the "
        "pyfunc model's scores); bf16 on a CPU with bf16 units is faster, scores a sample both "
        "ways first and says how many labels differ.",
    )
    format: OutputFormat = option("parquet", "Output file format.")
    overwrite: bool = option(
        False, "Replace predictions made by another model version (or, with --embeddings, scored without them)."
    )
    experiment: str = option(
        DEFAULT_SCORING_EXPERIMENT,
        "MLflow experiment of the scoring runs: each predict job is a run there, linked to the "
        "model version (a tag on the version) and named in every row it writes.",
    )
    min_score: float | None = option(
        None,
        "Leave `label` null, with the reason in `unsure`, for rows whose (calibrated) score is "
        "below this, in (0, 1]; their score and probabilities are still written.",
    )
    target_precision: float | None = option(
        None,
        "Choose --min-score from the model's validation threshold table: the smallest "
        "threshold whose validation precision is at least this, in (0, 1].",
    )
    embeddings: bool = option(
        False,
        "Also write each row's penultimate features (what the model's final Linear takes) as "
        "`embedding`, list<float32>, from the same forward pass (with tta flip: the plain view's).",
    )

    def __post_init__(self) -> None:
        RayOptions.__post_init__(self)
        ImageLimits.__post_init__(self)
        check_experiment_name(self.experiment)
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        # Each replica is a process holding the model: more than this only exhausts memory.
        check_range("workers", self.workers, 1, 256)
        check(
            self.min_score is None or self.target_precision is None,
            "give --min-score or --target-precision, not both (the second picks the first)",
        )
        for name in ("min_score", "target_precision"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0, 1, low_open=True)


@dataclass(kw_only=True)
class PromoteConfig:
    """Move the champion alias to a version if it is at least as accurate as the champion."""

    name: str = positional("Registered model name.")
    version: int | None = option(None, "Candidate version (default: the latest).")
    data: str | None = option(
        None, "Prepared data whose validation split decides (default: the candidate's)."
    )

    def __post_init__(self) -> None:
        check_model_name(self.name, "name", new=False)
        check(self.version is None or self.version >= 1, f"version must be >= 1, got {self.version}")


@dataclass(kw_only=True)
class SummaryConfig:
    """Print a model's layers: output shapes, weights, biases and totals."""

    model: str = option("seed", f"Architecture: {models_help()}.")
    image_size: int = option(300, "Input side in pixels.")
    num_classes: int = option(2, "Output classes (1: a single logit, as the tutorial).")
    width: int = model_option("simple", "width")
    depth: int = model_option("simple", "depth")

    def __post_init__(self) -> None:
        check_model(self.model)
        check_range("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        check_range("num_classes", self.num_classes, 1, 100_000)
        _check_shape(self.width, self.depth)


@dataclass(kw_only=True)
class RunsConfig:
    """Show an experiment's runs side by side."""

    experiment: str = option(DEFAULT_EXPERIMENT, "MLflow experiment.")
    max_runs: int = option(20, "Most recent runs to show (at most 1000).")

    def __post_init__(self) -> None:
        check_experiment_name(self.experiment, new=False)
        check_range("max_runs", self.max_runs, 1, 1000)


@dataclass(kw_only=True)
class DemoConfig(RayOptions):
    """The whole flow on scikit-learn's handwritten digits: prep, two runs, promote, predict."""

    workdir: str = option("cnnflow-demo", "Folder for the demo's images, shards and predictions.")
    fresh: bool = option(False, "Start clean instead of reusing what is already done.")


# The train options `cnnflow tune --search` may vary (the ranges are in workflows/tune/space.py).
SEARCHABLE = ("lr", "weight_decay", "width", "depth", "max_shift", "label_smoothing", "epochs")


@dataclass(kw_only=True)
class TuneConfig(TrainConfig):
    """Search hyperparameters with Ray Tune: each trial a Ray Train run, the best one registered.

    The train options are the base of the search: the options named by --search are
    sampled around their value, the others stay as given. Every trial is a child MLflow
    run under one parent run; ASHA stops trials that trail the others. Only the best
    trial's model is registered (as `train` would register it), and with --promote it
    goes through the same champion gate. Trials run one at a time unless the cluster
    has CPUs (or GPUs) for more.

    A search that was interrupted (Ctrl+C, a lost driver) is resumed with --resume
    (the last unfinished search on DATA in --experiment) or with the same --name: the
    finished trials are kept, the others go on, the parent run is reused.
    """

    trials: int = option(8, "Trials, each one set of options sampled from the search space.")
    time_budget: float | None = option(
        None, "Seconds for the whole search; trials still running then are stopped (default: no limit)."
    )
    search: str = option(
        ",".join(SEARCHABLE),
        "Options to search, comma-separated; each is sampled around its given value: lr x1/2..x2 "
        "and weight_decay x1/10..x10 (log-uniform), width x1/2, x1, x2 and depth +0, +1 (simple), "
        "max_shift and label_smoothing x0, x1/2, x1, x3/2, epochs x1, x3/2, x2. The first trial "
        "is the given options, the second the same with the most epochs.",
    )
    grace: float = option(
        0.5,
        "ASHA: the share of its own schedule every trial runs before it may be stopped for "
        "trailing (trials are compared at equal shares). Under one-cycle, val_acc before "
        "the annealing is under way says little: on the bench's photo set it was noise "
        "(0.50-0.55) until about half-way.",
    )
    name: str | None = option(
        None, "The search's folder under --storage (default: cnnflow-tune-<parent run id>); "
        "an unfinished search of that name is resumed."
    )
    resume: bool = option(
        False, "Resume the last unfinished search on DATA in --experiment (or the one --name names), "
        "with the options it started with."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("trials", self.trials, 1, 10_000)
        if self.time_budget is not None:  # seconds; inf is "no limit", which is leaving it out
            check_range("time_budget", self.time_budget, 0, 365 * 86400, low_open=True)
        check_range("grace", self.grace, 0, 1, low_open=True)
        unknown = sorted(set(self.search_options()) - set(SEARCHABLE))
        check(not unknown, f"search: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
               f"searchable: {', '.join(SEARCHABLE)}")
        check(
            self.name is None or re.fullmatch(r"[\w.-]+", self.name) is not None,
            f"name must be a folder name of letters, digits, '.', '_' and '-', got {self.name!r}",
        )

    def search_options(self) -> list[str]:
        return [s.strip().replace("-", "_") for s in self.search.split(",") if s.strip()]


def _check_shape(width: int, depth: int) -> None:
    check_range("width", width, 1, MAX_CHANNELS)
    check_range("depth", depth, 1, 10)  # 2^10 = MAX_IMAGE_SIZE: each stage halves the side
    check(
        width * 2 ** (depth - 1) <= MAX_CHANNELS,
        f"width x 2^(depth-1) (channels of the last stage) must be <= {MAX_CHANNELS}, "
        f"got {width} x 2^{depth - 1} = {width * 2 ** (depth - 1)}",
    )
