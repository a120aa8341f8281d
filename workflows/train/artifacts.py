"""What a finished training run logs besides its metrics and model, and the model's input example.

The manifest, the resolved options (config.yaml), the model's layer table, per-class
precision/recall/f1, and three figures: the confusion matrix, the curves per epoch (read
back from the run itself) and a grid of misclassified validation images. Then the
calibration (`log_calibration`): the temperature and the expected calibration error
before and after it as metrics, the reliability diagram, and the threshold table.
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
from workflows.train.evaluation import Calibration, Evaluation
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


def log_calibration(run_id: str, calibration: Calibration) -> None:
    """Metrics `temperature`, `val_ece_before`, `val_ece_after`; reliability.png; thresholds.json."""
    tracking.log_metrics(
        run_id,
        {"temperature": calibration.temperature, "val_ece_before": calibration.before.ece, "val_ece_after": calibration.after.ece},
    )
    tracking.log_figure(run_id, reliability_figure(calibration), "reliability.png")
    tracking.log_dict(run_id, calibration.thresholds, "thresholds.json")


def reliability_figure(calibration: Calibration) -> Figure:
    """Accuracy against mean score per score bin, at T = 1 and at the fitted T, with the
    diagonal a calibrated model follows and each bin's share of the rows below."""
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    edges = calibration.after.edges
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, r, colour in (
        (f"T = 1, ECE {calibration.before.ece:.3f}", calibration.before, "tab:red"),
        (f"T = {calibration.temperature:.3g}, ECE {calibration.after.ece:.3f}", calibration.after, "tab:blue"),
    ):
        full = r.rows > 0
        top.plot(r.confidence[full], r.accuracy[full], marker="o", color=colour, label=name)
        bottom.bar(centres, r.rows / max(1, r.rows.sum()), width=width, alpha=0.4, color=colour)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_title("validation: reliability")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("top score (mean per bin)")
    bottom.set_ylabel("share of rows")
    fig.tight_layout()
    return fig


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
