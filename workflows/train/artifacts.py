"""What a finished training run logs besides its metrics and model, and the model's input example.

The manifest, the resolved options (config.yaml), the model's layer table, per-class
precision/recall/f1, and three figures: the confusion matrix, the curves per epoch (read
back from the run itself) and a grid of misclassified validation images.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from cnn.summary import summarize
from data_prep.schema import VAL
from data_prep.shard_reader import iter_batches, to_pixels
from workflows import tracking
from workflows.train.evaluation import Evaluation
from workflows.train.plan import Plan, resolved_options


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


def example_image(p: Plan) -> bytes:
    """One validation image as PNG bytes: the logged model's input example (MLflow checks it)."""
    from PIL import Image

    batch = next(iter_batches(p.data, VAL, columns=["image"], batch_size=1))
    buf = io.BytesIO()
    Image.fromarray(to_pixels(batch["image"], p.spec.image_size)[0]).save(buf, format="PNG")
    return buf.getvalue()
