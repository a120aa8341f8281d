"""Is this batch like the training data? Predicted classes and scores against the model's reference.

At the end of training the model's contract records a reference (preprocessing.json
`drift_reference`, from `workflows/train/evaluation.py` `calibrate`): the training split's
rows per class (the manifest's counts) and a histogram of validation's calibrated top
scores (cnn.calibration.SCORE_BINS equal-width bins of [0, 1]). While predict runs, the
driver tallies the rows this run scores (`DriftTally.add`, constant memory: a count per
class and per score bin): the predicted class of every scored row (its top class, unsure
rows included) and its top score. `report` then compares the two with the population
stability index

    PSI = sum over bins of (batch share - reference share) x ln(batch share / reference share)

over the bins where either side has rows, each side's shares coming from its counts with
PRIOR_COUNT (half a row) added to each of those bins (Jeffreys' prior), so that a bin
empty on one side gives a large but finite term (bins both sides leave empty, such as
scores below 1 / classes, say nothing and are left out, else the prior alone, weighing
more on the smaller side, would differ). A
fixed floor (the common 1e-4) would make every batch row in a bin that a small validation
split happened to leave empty cost as much as a real shift: 2 rows of 100 there, against
a reference of 29 rows, would add 0.1 alone. The usual reading: below 0.1 no real change,
0.1-0.2 some, above PSI_THRESHOLD (0.2) a significant shift; predict then prints one
warning line.

PSI of small samples is mostly noise: n rows drawn from the reference itself, over k
bins, give n x PSI of about a chi-square with k - 1 degrees of freedom, so a mean PSI of
(k - 1) / n, which is 0.2 for 3 classes at n = 10. So a figure is only read as drift once
the batch has MIN_ROWS_PER_BIN rows per bin either side fills (60 rows for 3 classes):
then such a batch passes 0.2 less than 1% of the time (P(chi2 with k - 1 degrees > 4k):
0.25% for k = 3, under 0.01% for k = 10). Below that the figure is still reported, with
`enough_rows` false, and raises no warning.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PSI_THRESHOLD = 0.2
PRIOR_COUNT = 0.5
MIN_ROWS_PER_BIN = 20


def psi(reference: np.ndarray | list, batch: np.ndarray | list, prior: float = PRIOR_COUNT) -> float:
    """Population stability index of two histograms of counts over the same bins."""
    r, b = np.asarray(reference, np.float64), np.asarray(batch, np.float64)
    seen = (r + b) > 0
    r, b = r[seen] + prior, b[seen] + prior
    r, b = r / r.sum(), b / b.sum()
    return float(np.sum((b - r) * np.log(b / r)))


class DriftTally:
    """Predicted classes and top-score bins of the rows scored so far (error rows aside)."""

    def __init__(self, classes: int, score_bins: int):
        self.classes = np.zeros(classes, np.int64)
        self.scores = np.zeros(score_bins, np.int64)

    @property
    def rows(self) -> int:
        return int(self.classes.sum())

    def add(self, batch: pa.Table) -> None:
        scored = pc.is_valid(batch.column("score"))
        score = pc.filter(batch.column("score"), scored).to_numpy().astype(np.float64)
        if not len(score):
            return
        flat = pc.list_flatten(pc.filter(batch.column("probabilities"), scored)).to_numpy()
        probs = flat.reshape(len(score), len(self.classes))
        self.classes += np.bincount(probs.argmax(axis=1), minlength=len(self.classes))
        self.scores += np.histogram(np.clip(score, 0, 1), bins=len(self.scores), range=(0.0, 1.0))[0]

    def report(self, reference: dict[str, Any] | None, classes: list[str]) -> dict[str, Any] | None:
        """summary.json's `drift`: None for a model without a reference or a run that scored nothing."""
        if reference is None or not self.rows:
            return None
        n = self.rows
        edges = np.linspace(0, 1, len(self.scores) + 1).round(6).tolist()
        class_psi = psi(reference["class_counts"], self.classes)
        score_psi = psi(reference["score_histogram"], self.scores)

        def enough(reference_counts: Any, counts: np.ndarray) -> bool:
            filled = int(((np.asarray(reference_counts) + counts) > 0).sum())
            return n >= MIN_ROWS_PER_BIN * filled

        figures = {
            "classes": {
                "psi": round(class_psi, 6),
                "enough_rows": enough(reference["class_counts"], self.classes),
                "reference": "training split's class shares",
                "reference_rows": int(sum(reference["class_counts"])),
                "reference_shares": dict(zip(classes, _shares(reference["class_counts"]))),
                "batch_shares": dict(zip(classes, _shares(self.classes))),
            },
            "scores": {
                "psi": round(score_psi, 6),
                "enough_rows": enough(reference["score_histogram"], self.scores),
                "reference": "validation split's calibrated top scores",
                "reference_rows": int(sum(reference["score_histogram"])),
                "bin_edges": edges,
                "reference_shares": _shares(reference["score_histogram"]),
                "batch_shares": _shares(self.scores),
            },
        }
        drifted = [k for k, f in figures.items() if f["enough_rows"] and f["psi"] > PSI_THRESHOLD]
        return {"rows": n, "threshold": PSI_THRESHOLD, **figures, "drifted": drifted}


def _shares(counts: Any) -> list[float]:
    c = np.asarray(counts, np.float64)
    return (c / c.sum()).round(6).tolist() if c.sum() else [0.0] * len(c)


def warning_line(drift: dict[str, Any] | None) -> str | None:
    """One line for the terminal when a figure passed the threshold; None otherwise."""
    if not drift or not drift["drifted"]:
        return None
    what = {"classes": "predicted classes vs training's", "scores": "scores vs validation's"}
    parts = [f"{what[k]} PSI {drift[k]['psi']:.2f}" for k in drift["drifted"]]
    return (
        f"drift: this batch is unlike the training data ({'; '.join(parts)} > {drift['threshold']}); "
        "see `drift` in summary.json"
    )
