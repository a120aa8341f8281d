"""A model scored on a validation split: predictions, accuracy, loss, a few misclassified images.

`evaluate` streams DATA/val from its shards through the model with the model's own
normalisation, test-time augmentation and temperature. The train driver evaluates the
best epoch's weights with it (accuracy, the confusion matrix and per-class figures of the
run), and the champion gate (`workflows/promote.py`) the candidate and the champion on
one DATA. `calibrate` then fits the train driver's model a temperature on the same
logits (`cnn/calibration.py`) and gives what the model's contract records with it: the
temperature, the threshold table and the drift reference predict compares batches with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cnn import calibration
from cnn.inference import fitted_temperature, softmax_views, test_time_augmentation, view_logits
from data_prep.schema import TRAIN, VAL, read_manifest
from data_prep.shard_reader import iter_batches, to_pixels
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
    # float32 (views, N, classes): the raw logits of each test-time view, for calibration.
    # views x N x classes x 4 bytes: 8 MB for 10,000 images of 100 classes with "flip".
    logits: np.ndarray | None = None

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
    model = model.to(device).eval()
    normalize = normalizer(preprocessing).to(device)
    labels, logits, misclassified = [], [], []
    for batch in iter_batches(data, VAL, columns=["image", "label"], batch_size=EVAL_BATCH):
        images = torch.from_numpy(to_pixels(batch["image"], manifest["image_size"]).copy()).to(device)
        target = torch.tensor(batch["label"].to_numpy(), dtype=torch.long, device=device)
        # cnn.inference.class_probabilities in two steps, keeping the logits in between
        z = view_logits(model, normalize, images, tta=test_time_augmentation(preprocessing))
        predicted = softmax_views(z, fitted_temperature(preprocessing)).argmax(1)
        for i in torch.nonzero(predicted != target).flatten().tolist():
            if len(misclassified) < MAX_MISCLASSIFIED:
                misclassified.append((images[i].cpu().numpy(), int(target[i]), int(predicted[i])))
        labels.append(target.cpu().numpy())
        logits.append(z.cpu().numpy())
    model.to("cpu")
    if not labels:
        raise CnnflowError(f"{data} has no validation images to evaluate on")
    return scored(np.concatenate(labels), np.concatenate(logits, axis=1), fitted_temperature(preprocessing), misclassified)


def scored(
    labels: np.ndarray, logits: np.ndarray, temperature: float, misclassified: list | None = None
) -> Evaluation:
    """An Evaluation from validation logits (views, N, classes) at a temperature."""
    probs = softmax_views(torch.from_numpy(logits), temperature)
    target = torch.from_numpy(labels).long()
    loss = float(-probs.gather(1, target.view(-1, 1)).clamp_min(1e-12).log().mean())
    return Evaluation(labels, probs.argmax(1).numpy(), loss, misclassified or [], logits)


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on validation and what it gives: the calibrated evaluation,
    the calibration error before and after, the threshold table and the drift reference."""

    temperature: float
    calibrated: Evaluation  # the validation split scored at `temperature`
    before: calibration.Reliability  # at T = 1
    after: calibration.Reliability  # at `temperature`
    thresholds: dict[str, list]  # cnn.calibration.threshold_table, calibrated scores
    reference: dict[str, Any]  # training's rows per class, validation's calibrated score histogram

    def contract(self) -> dict[str, Any]:
        """What the model's preprocessing.json records (workflows/tracking/pyfunc_model.py)."""
        return {"temperature": self.temperature, "thresholds": self.thresholds, "drift_reference": self.reference}


def calibrate(evaluation: Evaluation, manifest: dict[str, Any]) -> Calibration:
    """Fit a temperature on an evaluation's logits (scored at T = 1); the figures of both."""
    assert evaluation.logits is not None, "evaluate() keeps the logits"
    logits, labels = evaluation.logits, evaluation.labels
    temperature = calibration.fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels))
    calibrated = scored(labels, logits, temperature, evaluation.misclassified)
    plain = softmax_views(torch.from_numpy(logits), 1.0).numpy()
    scores, correct = calibration.top_scores(softmax_views(torch.from_numpy(logits), temperature).numpy(), labels)
    reference = {  # rows per class of the training split, in the classes' order; rows per score bin
        "class_counts": [int(manifest["counts"][TRAIN][c]) for c in manifest["classes"]],
        "score_histogram": calibration.score_histogram(scores),
    }
    return Calibration(
        temperature=temperature,
        calibrated=calibrated,
        before=calibration.reliability(*calibration.top_scores(plain, labels)),
        after=calibration.reliability(scores, correct),
        thresholds=calibration.threshold_table(scores, correct),
        reference=reference,
    )
