"""`cnnflow promote NAME` and `train --promote`: move `champion` only to a model at least as good.

The candidate version and the current champion are evaluated here, on the same
validation split of the same prepared data (streamed from its shards), and the alias
moves only if the candidate's accuracy is >= the champion's. The decision itself, made
one promotion at a time against the champion the alias still names, and the tags that
record it, are `workflows/tracking/promotion.py`'s. `evaluate` is also what the train
driver uses for the confusion matrix and per-class figures of a finished run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
import pyarrow.dataset as pads
import torch
import torch.nn.functional as F
from torch import nn

from cnn.inference import class_probabilities, test_time_augmentation
from data_prep.lock import describe
from data_prep.redact import HIDDEN
from data_prep.schema import VAL, join, pixels, read_manifest, resolve
from workflows import tracking
from workflows.config import PromoteConfig
from workflows.errors import CnnflowError
from workflows.tracking.pyfunc_model import normalizer

EVAL_BATCH = 256
MAX_MISCLASSIFIED = 25  # images kept for the run's misclassified.png grid


@dataclass
class Evaluation:
    """A model's predictions on a validation split."""

    labels: np.ndarray  # int (N,)
    predictions: np.ndarray  # int (N,)
    loss: float  # mean cross-entropy
    misclassified: list[tuple[np.ndarray, int, int]] = field(default_factory=list)  # (pixels, true, predicted)

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predictions).mean()) if len(self.labels) else 0.0


def check_compatible(preprocessing: dict[str, Any], manifest: dict[str, Any], data: str, what: str) -> None:
    """A model can only be scored on data with its classes and image size."""
    prep = preprocessing
    if list(prep["classes"]) != list(manifest["classes"]) or prep["image_size"] != manifest["image_size"]:
        raise CnnflowError(
            f"{what} was trained on {prep['image_size']} px images of classes "
            f"{prep['classes']}, but {data} has {manifest['image_size']} px images of classes "
            f"{manifest['classes']}; evaluate it with --data pointing at matching prepared data"
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module, preprocessing: dict[str, Any], data: str, *, what: str = "the model", device: str = "cpu"
) -> Evaluation:
    """Stream DATA/val in batches through the model; memory holds labels, not images."""
    manifest = read_manifest(data)
    check_compatible(preprocessing, manifest, data, what)
    fs, path = resolve(join(data, VAL))
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    model = model.to(device).eval()
    normalize = normalizer(preprocessing).to(device)
    labels, predictions, misclassified = [], [], []
    loss_sum = 0.0
    for batch in dataset.to_batches(columns=["image", "label"], batch_size=EVAL_BATCH):
        images = torch.from_numpy(pixels(batch["image"], manifest["image_size"]).copy()).to(device)
        target = torch.tensor(batch["label"].to_numpy(), dtype=torch.long, device=device)
        probs = class_probabilities(model, normalize, images, tta=test_time_augmentation(preprocessing))
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction="sum").item()
        predicted = probs.argmax(1)
        for i in torch.nonzero(predicted != target).flatten().tolist():
            if len(misclassified) < MAX_MISCLASSIFIED:
                misclassified.append((images[i].cpu().numpy(), int(target[i]), int(predicted[i])))
        labels.append(target.cpu().numpy())
        predictions.append(predicted.cpu().numpy())
    model.to("cpu")
    y = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    if not len(y):
        raise CnnflowError(f"{data} has no validation images to evaluate on")
    return Evaluation(y, np.concatenate(predictions), loss_sum / len(y), misclassified)


def promote(
    name: str, version: int | None = None, data: str | None = None, *, candidate: Evaluation | None = None
) -> tracking.Decision:
    """Compare `version` (default: the latest) with the champion on DATA's validation split.

    DATA defaults to the data the candidate was trained on (its version's `data` tag).
    `candidate` is the candidate's evaluation on that same DATA when the caller has it.
    """
    uri = tracking.resolve_model_uri(f"models:/{name}/{'latest' if version is None else version}")
    version = tracking.parse_model_uri(uri)[1]
    if data is None:
        data = tracking.get_version(name, version).tags.get("data")
        if not data:
            raise CnnflowError(f"{uri} has no `data` tag; pass --data DATA (a `cnnflow prep` output)")
        if HIDDEN in data:  # tags are stored without a URI's credentials
            raise CnnflowError(f"{uri} was trained on {data}; pass --data DATA with its credentials")
    if candidate is None:
        candidate = _evaluate_version(uri, data)

    def wait(holder: dict | None) -> None:
        click.echo(f"promote: waiting for another promotion to decide ({describe(holder)})", err=True)

    return tracking.champion_gate(
        name,
        version,
        candidate.accuracy,
        data,
        score=lambda champion: _evaluate_version(f"models:/{name}/{champion}", data).accuracy,
        on_busy=wait,
    )


def _evaluate_version(uri: str, data: str) -> Evaluation:
    classifier = tracking.load_classifier(uri)
    return evaluate(classifier.model, classifier.preprocessing, data, what=uri)


def run(config: PromoteConfig) -> int:
    tracking.use_tracking()
    decision = promote(config.name, config.version, config.data)
    click.echo(decision.describe())
    return 0


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("promote")
