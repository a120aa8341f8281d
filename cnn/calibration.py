"""Scores that mean what they say: a fitted temperature, calibration error, thresholds, histograms.

Pure torch and numpy, no I/O: the train driver calls these on the best epoch's validation
logits (`workflows/train/evaluation.py`), and what they return goes into the model's
preprocessing contract, which `cnn.inference` and predict read.

- Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one
  scalar T > 0 divides every logit before the softmax. T > 1 softens an over-confident
  model, T < 1 sharpens an under-confident one (label smoothing makes them so). T is the
  value that minimises the validation labels' negative log-likelihood, found by a grid
  over log T and a golden-section search around its best point (`fit_temperature`).
  One limit on it: a split the model gets all right has its likelihood rise as T falls
  towards 0 (every score 1.0: certainty that 29 right answers out of 29 do not show). So
  the mean top score may not pass (right + 1) / (rows + 2), Laplace's rule of succession,
  the accuracy that `right` out of `rows` supports; T is raised until it does. Elsewhere
  the likelihood's T already keeps the mean score near the accuracy, and this moves it
  by less than 1/rows.
  Dividing by T keeps the order of a row's logits, so without test-time augmentation the
  labels, hence accuracy, are unchanged; with "flip" (the mean of two views' softmaxes) a
  near tie may go the other way.
- Expected calibration error (ECE): the top scores are put in ECE_BINS equal-width bins
  of [0, 1]; ECE is the mean over rows of |accuracy - mean score| of each row's bin, i.e.
  sum_b (n_b / N) |acc_b - conf_b| (Naeini et al. 2015; 15 bins as Guo et al.).
- The threshold table: for each threshold t in 0.00, 0.01, ..., 0.99, the coverage (share
  of rows whose top score is >= t) and the precision (accuracy among those rows); a user
  picks `--min-score` from it for a target precision (`pick_threshold`).
- A histogram of the top scores over SCORE_BINS equal-width bins of [0, 1], the reference
  predict compares a batch against (workflows/predict/drift.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cnn.inference import softmax_views

ECE_BINS = 15
THRESHOLDS = tuple(round(k / 100, 2) for k in range(100))  # 0.00 .. 0.99
SCORE_BINS = 10
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0  # the search's range
GRID_POINTS = 41  # log-spaced over the range, ~0.15 apart in log T
GOLDEN_STEPS = 30  # each shrinks the bracket by 0.618: 0.3 in log T -> below 1e-6


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax_views(logits (views, N, C), T)."""
    probs = softmax_views(logits, temperature)
    return float(-probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12).log().mean())


def mean_top_score(logits: torch.Tensor, temperature: float) -> float:
    return float(softmax_views(logits, temperature).max(dim=1).values.mean())


@torch.inference_mode()
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the validation NLL,
    raised if needed until the mean top score is at most (right + 1) / (rows + 2).

    A grid over log T first, so that a likelihood with more than one dip (possible with
    several views) still finds the deepest, then a golden-section search between the best
    grid point's neighbours, then (only if the score passes the rule of succession) a
    bisection up to where it meets it. Deterministic, no learning rate to tune, under 120
    evaluations of the softmax over the logits.
    """
    logits, labels = logits.float(), labels.long()
    if logits.dim() == 2:  # one view
        logits = logits.unsqueeze(0)
    if labels.numel() == 0:
        return 1.0
    grid = np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), GRID_POINTS)
    losses = [nll(logits, labels, math.exp(u)) for u in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(GOLDEN_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    u = (lo + hi) / 2
    # The grid point itself when the search did not beat it (a bound, or a flat minimum).
    u = u if nll(logits, labels, math.exp(u)) <= losses[best] else float(grid[best])
    right = int((softmax_views(logits, math.exp(u)).argmax(1) == labels).sum())
    ceiling = (right + 1) / (len(labels) + 2)
    if mean_top_score(logits, math.exp(u)) > ceiling:  # the top score falls as T rises
        lo, hi = u, math.log(MAX_TEMPERATURE)
        for _ in range(GOLDEN_STEPS + 10):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_top_score(logits, math.exp(mid)) > ceiling else (lo, mid)
        u = hi
    return float(math.exp(u))


def top_scores(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probabilities and (N,) labels -> each row's top score and whether its label is right."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)


@dataclass(frozen=True)
class Reliability:
    """Top scores in equal-width bins of [0, 1]: rows, mean score and accuracy per bin."""

    edges: np.ndarray  # (bins + 1,)
    rows: np.ndarray  # (bins,) int
    confidence: np.ndarray  # (bins,) mean top score; nan where empty
    accuracy: np.ndarray  # (bins,) nan where empty

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (rows share) x |accuracy - confidence|."""
        n = self.rows.sum()
        full = self.rows > 0
        gap = np.abs(self.accuracy[full] - self.confidence[full])
        return float((self.rows[full] * gap).sum() / n) if n else 0.0


def reliability(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top scores (a score of exactly 1 goes in the last bin)."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    index = np.clip((scores * bins).astype(int), 0, bins - 1)
    rows = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=scores, minlength=bins) / rows
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / rows
    return Reliability(np.linspace(0, 1, bins + 1), rows, confidence, accuracy)


def expected_calibration_error(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(scores, correct, bins).ece


def threshold_table(scores: np.ndarray, correct: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, list]:
    """{"threshold", "coverage", "precision"} as parallel lists; precision is None where no
    row reaches the threshold."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    n = len(scores)
    coverage, precision = [], []
    for t in thresholds:
        kept = scores >= t
        k = int(kept.sum())
        coverage.append(round(k / n, 6) if n else 0.0)
        precision.append(round(float(correct[kept].mean()), 6) if k else None)
    return {"threshold": list(thresholds), "coverage": coverage, "precision": precision}


def pick_threshold(table: dict[str, list], target_precision: float) -> float | None:
    """The smallest threshold whose precision is >= target with some coverage; None if none."""
    for t, c, p in zip(table["threshold"], table["coverage"], table["precision"]):
        if c > 0 and p is not None and p >= target_precision:
            return float(t)
    return None


def score_histogram(scores: np.ndarray, bins: int = SCORE_BINS) -> list[int]:
    """Rows per equal-width bin of [0, 1] (a score of exactly 1 in the last bin)."""
    scores = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    return np.histogram(scores, bins=bins, range=(0.0, 1.0))[0].astype(int).tolist()
