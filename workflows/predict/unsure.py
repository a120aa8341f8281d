"""`--min-score` and `--target-precision`: the score below which a row is "unsure".

A row whose top (calibrated) score is below the minimum keeps its score and probabilities
but gets no label; `unsure` says why (the Scorer, workflows/predict/scorer.py). The
minimum is `--min-score P` as given, or the one `--target-precision Q` picks from the
model's threshold table (preprocessing.json `thresholds`, from the validation split:
cnn/calibration.py): the smallest threshold whose validation precision is at least Q.
Both are decided once, when the model is loaded, before any row is scored or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnn.calibration import pick_threshold
from workflows.errors import CnnflowError


@dataclass(frozen=True)
class MinScore:
    value: float
    target_precision: float | None = None  # what picked it, if not given directly
    coverage: float | None = None  # validation's share of rows at or above it
    precision: float | None = None  # validation's accuracy among them

    def line(self) -> str:
        """predict's line about it, when --target-precision chose it."""
        return (
            f"  --target-precision {self.target_precision:g}: min-score {self.value:.2f} "
            f"(on validation: precision {self.precision:.3f}, coverage {self.coverage:.3f})"
        )


def min_score(given: float | None, target_precision: float | None, preprocessing: dict[str, Any], model: str) -> MinScore | None:
    """The minimum score this job applies, or None (every scored row is labelled)."""
    if given is not None:
        return MinScore(given)
    if target_precision is None:
        return None
    table = preprocessing.get("thresholds")
    if not table:
        raise CnnflowError(
            f"--target-precision: {model} has no threshold table (it was trained before cnnflow "
            "calibrated its models); give --min-score instead, or train it again"
        )
    picked = pick_threshold(table, target_precision)
    if picked is None:
        best = max((p for p in table["precision"] if p is not None), default=0.0)
        raise CnnflowError(
            f"--target-precision {target_precision:g}: no threshold reaches it on {model}'s validation "
            f"split (the best is {best:.3f}); ask for less, or give --min-score"
        )
    k = table["threshold"].index(picked)
    return MinScore(picked, target_precision, table["coverage"][k], table["precision"][k])
