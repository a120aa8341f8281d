"""`cnnflow demo`: the whole flow on real data that ships with scikit-learn.

scikit-learn's `load_digits` (1,797 real 8x8 scans of handwritten digits) is written out
as an image folder of upscaled PNGs, one subfolder per digit; every tenth scan is held
back as an unlabelled folder. Then: prep, two training runs that differ in one option
(the tutorial's `seed` network and the `simple` CNN), promotion of the better one, and
prediction of the held-back folder, whose true labels the demo knows. Each step reuses
what a previous demo left in WORKDIR; `--fresh` starts clean.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from workflows.config import DEFAULT_SCORING_EXPERIMENT, DemoConfig, PredictConfig, PrepConfig, TrainConfig
from workflows.ray_runtime import ray_session

DEMO_IMAGE_SIZE = 32  # px: the 8x8 scans upscaled 4x, as prep writes them
HOLDOUT_EVERY = 10  # every 10th scan is held back, unlabelled, for predict
REGISTERED_NAME = "digits"
DEMO_MODELS = ("seed", "simple")  # the two runs differ in this one option
DEMO_EPOCHS = {"seed": 8, "simple": 8}
EXPERIMENT = "cnnflow-demo"


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "digits"

    @property
    def unlabeled(self) -> Path:
        return self.root / "digits-unlabeled"

    @property
    def holdout_labels(self) -> Path:
        return self.root / "digits-unlabeled-labels.csv"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def write_digits(paths: DemoPaths) -> tuple[int, int]:
    """Write the digits as PNGs; returns (labelled, held back). Skips if already written."""
    if paths.holdout_labels.exists():
        labelled = sum(1 for _ in paths.images.rglob("*.png"))
        held = sum(1 for _ in paths.unlabeled.rglob("*.png"))
        return labelled, held
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 ink levels -> 0..255, dark ink on white paper, upscaled smoothly.
    pixels = (255 - digits.images * (255 / 16)).round().astype(np.uint8)
    staging = paths.root / ".digits-staging"
    shutil.rmtree(staging, ignore_errors=True)
    held_rows = []
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        big = Image.fromarray(image, "L").resize((DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.BICUBIC)
        if index % HOLDOUT_EVERY == 0:
            name = f"scan_{index:04d}.png"
            out = staging / "unlabeled" / name
            held_rows.append((name, str(int(target))))
        else:
            out = staging / "labelled" / str(int(target)) / f"scan_{index:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        big.save(out)
    # Move into place only when complete, so an interrupted demo rewrites the folders.
    for final in (paths.images, paths.unlabeled):
        shutil.rmtree(final, ignore_errors=True)
    (staging / "labelled").rename(paths.images)
    (staging / "unlabeled").rename(paths.unlabeled)
    with paths.holdout_labels.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *held_rows])
    staging.rmdir()
    return len(pixels) - len(held_rows), len(held_rows)


def run(config: DemoConfig) -> int:
    from workflows import prep, runs, tracking
    from workflows.predict import driver as predict
    from workflows.train import driver as train
    from workflows.config import RunsConfig

    paths = DemoPaths(Path(config.workdir).resolve())
    if config.fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    # The demo keeps its MLflow store and artifacts in WORKDIR unless the user points elsewhere.
    os.environ.setdefault("MLFLOW_TRACKING_URI", paths.tracking_uri)
    started = time.monotonic()

    labelled, held = write_digits(paths)
    step(1, f"digits: {labelled} labelled scans in {paths.images}, {held} held back in {paths.unlabeled}")
    with ray_session(config):  # one Ray for every step: start-up is paid once
        if (paths.shards / "manifest.json").exists():
            step(2, f"prep: reusing {paths.shards}")
        else:
            step(2, "prep: image folder -> Parquet shards")
            prep.run(PrepConfig(input=str(paths.images), output=str(paths.shards), image_size=DEMO_IMAGE_SIZE))
        for experiment in (EXPERIMENT, DEFAULT_SCORING_EXPERIMENT):  # predict's scoring run too
            tracking.ensure_experiment(experiment, artifact_location=(paths.root / "mlartifacts").as_uri())
        for model in DEMO_MODELS:
            run_name = f"demo-{model}"
            if tracking.finished_run_id(EXPERIMENT, run_name):
                step(3, f"train {model}: reusing the finished run {run_name!r}")
                continue
            step(3, f"train {model}: {DEMO_EPOCHS[model]} epochs, then register and promote if better")
            train.run(
                TrainConfig(
                    data=str(paths.shards),
                    model=model,
                    epochs=DEMO_EPOCHS[model],
                    hflip=False,  # a mirrored 2 is not a 2
                    experiment=EXPERIMENT,
                    run_name=run_name,
                    register_as=REGISTERED_NAME,
                    promote=True,
                    storage=str(paths.root / "checkpoints"),
                )
            )
        step(4, f"predict: {paths.unlabeled} with {REGISTERED_NAME}@champion")
        predict.run(PredictConfig(input=str(paths.unlabeled), output=str(paths.predictions), model=REGISTERED_NAME))

    step(5, "runs side by side")
    runs.run(RunsConfig(experiment=EXPERIMENT))
    correct, total, version = holdout_accuracy(paths)
    uri = tracking.resolved_tracking_uri()
    click.echo(
        f"""
champion: {REGISTERED_NAME} v{version}
held-back digits: {correct}/{total} correct ({correct / max(total, 1):.1%}), predictions in {paths.predictions}
shards and data report: {paths.shards}
compare the runs (curves, confusion matrices, misclassified digits, the registered model):
  {tracking.ui_hint(uri)}
demo finished in {time.monotonic() - started:.0f} s"""
    )
    return 0


def step(number: int, text: str) -> None:
    click.secho(f"[{number}/5] {text}", bold=True)


def holdout_accuracy(paths: DemoPaths) -> tuple[int, int, str]:
    """Score the predictions of the held-back scans against the labels the demo kept."""
    import pyarrow.dataset as pads

    with paths.holdout_labels.open(newline="") as f:
        truth = {row["path"]: row["label"] for row in csv.DictReader(f)}
    parts = sorted(str(p) for p in paths.predictions.glob("part-*.parquet"))
    table = pads.dataset(parts, format="parquet").to_table(columns=["path", "label", "model_uri"])
    predicted = dict(zip(table["path"].to_pylist(), table["label"].to_pylist()))
    correct = sum(predicted.get(path) == label for path, label in truth.items())
    versions = sorted(set(table["model_uri"].to_pylist()))
    return correct, len(truth), versions[-1].rsplit("/", 1)[-1] if versions else "?"


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("demo")
