"""A model scored on a validation split: predictions, accuracy, loss, a few misclassified images.

`evaluate` streams DATA/val from its shards through the model with the model's own
normalisation and test-time augmentation. The train driver evaluates the best epoch's
weights with it (accuracy, the confusion matrix and per-class figures of the run), and
the champion gate (`workflows/promote.py`) the candidate and the champion on one DATA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnn.inference import class_probabilities, test_time_augmentation
from data_prep.schema import VAL, read_manifest
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
    labels, predictions, misclassified = [], [], []
    loss_sum = 0.0
    for batch in iter_batches(data, VAL, columns=["image", "label"], batch_size=EVAL_BATCH):
        images = torch.from_numpy(to_pixels(batch["image"], manifest["image_size"]).copy()).to(device)
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
