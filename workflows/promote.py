"""`cnnflow promote NAME` and `train --promote`: move `champion` only to a model at least as good.

The candidate version and the current champion are evaluated here, on the same
validation split of the same prepared data (streamed from its shards), and the alias
moves only if the candidate's accuracy is >= the champion's. Both scores, and which
version it was compared with, are recorded as tags on the candidate version, whatever
the outcome.

MLflow has no compare-and-set on an alias, so two promotions at once could each beat the
old champion and the slower one win, whatever its score. The decision is serialised: a
lock beside a SQLite store makes a second promotion wait for the first, and the champion
is read again just before the alias moves; if it changed during the evaluation (a store
on a server, where no file lock reaches the other clients), the candidate is compared with
the new one, and so on. On a server a window of milliseconds between that last read and
the alias write remains: MLflow offers nothing to close it. `evaluate` is also what the train
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
from workflows.config import CHAMPION_ALIAS, PromoteConfig
from workflows.errors import CnnflowError
from workflows.pyfunc_model import normalizer

EVAL_BATCH = 256
MAX_MISCLASSIFIED = 25  # images kept for the run's misclassified.png grid
MAX_RECHECKS = 5  # champions compared with before giving up (each is one evaluation)


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


@dataclass
class Decision:
    name: str
    version: int
    accuracy: float
    champion_version: int | None
    champion_accuracy: float | None
    promoted: bool

    def describe(self) -> str:
        if self.champion_version is None:
            before = "there was no champion"
        elif self.champion_version == self.version:
            before = "it already was the champion"
        else:
            before = f"champion v{self.champion_version}: val_acc {self.champion_accuracy:.4f}"
        verdict = f"@{CHAMPION_ALIAS} -> v{self.version}" if self.promoted else f"@{CHAMPION_ALIAS} stays on v{self.champion_version}"
        return f"{self.name} v{self.version}: val_acc {self.accuracy:.4f} ({before}); {verdict}"


def promote(
    name: str, version: int | None = None, data: str | None = None, *, candidate: Evaluation | None = None
) -> Decision:
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

    with tracking.store_lock(tracking.resolved_tracking_uri(), "promote", on_busy=wait):
        current, champion_accuracy = _champion_score(name, version, candidate, data)
        promoted = current != version and (champion_accuracy is None or candidate.accuracy >= champion_accuracy)
        if promoted:
            tracking.set_champion(name, version)
    tracking.tag_version(
        name,
        version,
        {
            "promotion_val_acc": f"{candidate.accuracy:.6f}",
            "promotion_champion_val_acc": "none" if champion_accuracy is None else f"{champion_accuracy:.6f}",
            "promotion_champion_version": "none" if current is None else current,
            "promotion_data": data,
            "promoted": str(promoted or current == version).lower(),
        },
    )
    return Decision(name, version, candidate.accuracy, current, champion_accuracy, promoted or current == version)


def _champion_score(name: str, version: int, candidate: Evaluation, data: str) -> tuple[int | None, float | None]:
    """(champion version, its accuracy on DATA), read again after each evaluation until it
    stays put: the champion this decision compares with is the one the alias still names."""
    scores = {version: candidate.accuracy}
    current = tracking.champion(name)
    for _ in range(MAX_RECHECKS):
        if current is not None and current not in scores:
            scores[current] = _evaluate_version(f"models:/{name}/{current}", data).accuracy
        latest = tracking.champion(name)
        if latest == current:
            return current, None if current is None else scores[current]
        current = latest  # another promotion moved the alias meanwhile
    raise CnnflowError(
        f"the champion of {name!r} moved {MAX_RECHECKS} times while v{version} was compared with it; "
        "run `cnnflow promote` again when the other promotions are done"
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
