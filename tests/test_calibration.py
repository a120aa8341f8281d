"""Calibrated scores and drift, the math alone: fast, no Ray, no MLflow.

cnn/calibration.py (temperature, expected calibration error, the threshold table) and
workflows/predict/drift.py (the population stability index). The end-to-end checks are in
test_train.py (what a training run logs and records) and test_predict.py (--min-score,
--target-precision, the drift warning).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cnn import calibration
from cnn.inference import class_probabilities, mixed_probabilities, softmax_views, view_logits
from cnn.transforms import Normalize
from workflows.predict.drift import PSI_THRESHOLD, DriftTally, psi, warning_line

CLASSES = 4


def linear_model_and_labels(n: int = 3000, seed: int = 0) -> tuple[torch.nn.Module, Normalize, torch.Tensor, torch.Tensor]:
    """A linear classifier on 4x4 pixels and labels drawn from its own softmax: calibrated
    by construction at T = 1 (its scores are the labels' true probabilities)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, CLASSES))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(CLASSES, 48, generator=g) * 0.3)
        model[1].bias.zero_()
    normalize = Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    pixels = torch.randint(0, 256, (n, 4, 4, 3), dtype=torch.uint8, generator=g)
    labels = torch.multinomial(class_probabilities(model, normalize, pixels), 1, generator=g).squeeze(1)
    return model.eval(), normalize, pixels, labels


def ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return calibration.expected_calibration_error(*calibration.top_scores(probs.numpy(), labels.numpy()))


def test_temperature_softens_a_deliberately_over_confident_model() -> None:
    model, normalize, pixels, labels = linear_model_and_labels()
    calibrated_ece = ece(class_probabilities(model, normalize, pixels), labels)
    with torch.no_grad():  # the same model, every logit x5: over-confident, same labels
        model[1].weight.mul_(5)
    logits = view_logits(model, normalize, pixels)
    before = ece(softmax_views(logits), labels)
    t = calibration.fit_temperature(logits, labels)
    after = ece(softmax_views(logits, t), labels)
    assert 4 < t < 6.5, t  # undoes the x5
    assert before > 0.15 and after < before / 4 and after < calibrated_ece + 0.03, (before, after, calibrated_ece)
    assert calibration.nll(logits, labels, t) < calibration.nll(logits, labels, 1.0)
    # The reference function applies it: labels unchanged, scores softer, bf16 alike.
    probs = class_probabilities(model, normalize, pixels, temperature=t)
    assert torch.equal(probs.argmax(1), class_probabilities(model, normalize, pixels).argmax(1))
    torch.testing.assert_close(probs, softmax_views(logits, t))
    mixed = mixed_probabilities(model, normalize, pixels, temperature=t)
    assert torch.equal(mixed.argmax(1), probs.argmax(1))
    torch.testing.assert_close(mixed, probs, rtol=0, atol=0.02)


def test_temperature_sharpens_an_under_confident_model_with_flip_views() -> None:
    model, normalize, pixels, labels = linear_model_and_labels(seed=1)
    with torch.no_grad():
        model[1].weight.div_(3)
    logits = view_logits(model, normalize, pixels, tta="flip")
    assert logits.shape == (2, len(pixels), CLASSES)
    t = calibration.fit_temperature(logits, labels)
    assert t < 0.6, t
    assert ece(softmax_views(logits, t), labels) < ece(softmax_views(logits), labels)
    # each view's logits are divided by T before the views' softmaxes are averaged
    torch.testing.assert_close(
        class_probabilities(model, normalize, pixels, tta="flip", temperature=t),
        (torch.softmax(logits[0] / t, 1) + torch.softmax(logits[1] / t, 1)) / 2,
    )


def test_a_split_the_model_gets_all_right_claims_no_more_than_the_rule_of_succession() -> None:
    # All 3 right: the likelihood alone would take T to 0 and every score to 1.0.
    logits = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [2.0, 0.0]]])
    labels = torch.tensor([0, 1, 0])
    t = calibration.fit_temperature(logits, labels)
    assert calibration.MIN_TEMPERATURE < t and calibration.mean_top_score(logits, t) == pytest.approx(4 / 5, abs=1e-6)
    # More rows all right support more certainty: 30 of 30, (30 + 1) / (30 + 2)
    more = calibration.fit_temperature(logits.repeat(1, 10, 1), labels.repeat(10))
    assert more < 1 < t and calibration.mean_top_score(logits, more) == pytest.approx(31 / 32, abs=1e-6)


def test_ece_of_known_bins() -> None:
    # Two bins: scores 0.95 (all right) and 0.55 (half right): |1 - 0.95| / 2 + |0.5 - 0.55| / 2
    scores = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, True, True, False])
    assert calibration.expected_calibration_error(scores, correct) == pytest.approx(0.05)
    r = calibration.reliability(np.array([1.0, 0.0]), np.array([True, False]))
    assert r.rows[0] == 1 and r.rows[-1] == 1 and len(r.edges) == calibration.ECE_BINS + 1


def test_threshold_table_and_the_threshold_a_target_precision_picks() -> None:
    scores = np.array([0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    correct = np.array([False, False, True, False, True, True, True, True])
    table = calibration.threshold_table(scores, correct)
    assert table["threshold"][:3] == [0.0, 0.01, 0.02] and table["threshold"][-1] == 0.99 and len(table["threshold"]) == 100
    at = dict(zip(table["threshold"], zip(table["coverage"], table["precision"])))
    assert at[0.0] == (1.0, 0.625)
    assert at[0.6] == (0.75, pytest.approx(5 / 6))
    assert at[0.71] == (0.5, 1.0)
    assert at[0.99] == (0.125, 1.0)
    assert calibration.pick_threshold(table, 0.8) == 0.51  # the smallest threshold with precision >= 0.8
    assert calibration.pick_threshold(table, 1.0) == 0.71
    nobody = calibration.threshold_table(np.array([0.5]), np.array([False]))
    assert nobody["precision"][-1] is None and calibration.pick_threshold(nobody, 0.1) is None


def test_psi_is_zero_for_the_same_shares_and_large_for_one_class() -> None:
    reference = [250, 250, 500]
    assert psi(reference, reference) == 0.0
    assert psi(reference, [25, 25, 50]) < 1e-3  # the same shares; the prior weighs more on 100 rows
    assert psi(reference, [27, 24, 49]) < 0.01  # a little sampling noise
    one_class = psi(reference, [100, 0, 0])
    assert one_class > 5 * PSI_THRESHOLD and np.isfinite(one_class)  # empty bins: half a row, not infinity
    # Bins a small reference left empty: a few batch rows there are not a shift
    assert psi([0, 0, 1, 28], [0, 2, 4, 94]) < 0.05
    # Bins empty on both sides say nothing, whatever the two sides' sizes
    assert psi([0] * 9 + [29], [0] * 9 + [1000]) == pytest.approx(0.0, abs=1e-12)


def scored_rows(probabilities: list[list[float] | None]) -> pa.Table:
    scores = [None if p is None else max(p) for p in probabilities]
    return pa.table({
        "score": pa.array(scores, pa.float32()),
        "probabilities": pa.array(probabilities, pa.list_(pa.float32())),
    })  # fmt: skip


def test_drift_tally_counts_scored_rows_and_warns_only_past_the_threshold_with_enough_rows() -> None:
    classes = ["a", "b"]
    reference = {"class_counts": [50, 50], "score_histogram": [0] * 9 + [50]}
    like = DriftTally(2, 10)
    for _ in range(20):  # half each class, confident; an error row in each batch
        like.add(scored_rows([[0.99, 0.01], [0.02, 0.98], None]))
    report = like.report(reference, classes)
    assert report["rows"] == 40 and report["classes"]["batch_shares"] == {"a": 0.5, "b": 0.5}
    assert report["classes"]["psi"] == pytest.approx(0) and report["scores"]["psi"] == pytest.approx(0)
    assert report["drifted"] == [] and warning_line(report) is None

    unlike = DriftTally(2, 10)
    for _ in range(40):
        unlike.add(scored_rows([[0.7, 0.3]]))  # one class only, less sure
    report = unlike.report(reference, classes)
    assert report["classes"]["psi"] > PSI_THRESHOLD and report["scores"]["psi"] > PSI_THRESHOLD
    assert report["drifted"] == ["classes", "scores"]  # 40 rows: 20 per bin either side fills
    line = warning_line(report)
    assert line.startswith("drift: ") and "predicted classes" in line and "scores" in line and "\n" not in line

    few = DriftTally(2, 10)
    few.add(scored_rows([[0.7, 0.3]] * 39))  # the same, one row short: noise could do it
    assert few.report(reference, classes)["drifted"] == [] and not few.report(reference, classes)["classes"]["enough_rows"]
    assert DriftTally(2, 10).report(reference, classes) is None  # nothing scored
    assert like.report(None, classes) is None  # a model without a reference


def test_target_precision_picks_from_the_models_table_or_says_why_not() -> None:
    from workflows.errors import CnnflowError
    from workflows.predict.unsure import min_score

    table = calibration.threshold_table(np.array([0.4, 0.6, 0.8, 0.9]), np.array([False, True, False, True]))
    contract = {"thresholds": table}
    assert min_score(0.3, None, contract, "m").value == 0.3  # --min-score as given
    assert min_score(None, None, contract, "m") is None
    picked = min_score(None, 0.6, contract, "m")
    assert (picked.value, picked.coverage, picked.precision) == (0.41, 0.75, pytest.approx(2 / 3))
    assert "min-score 0.41" in picked.line()
    assert min_score(None, 1.0, contract, "m").value == 0.81
    with pytest.raises(CnnflowError, match=r"no threshold reaches it on m's validation split \(the best is 0.000\)"):
        min_score(None, 1.0, {"thresholds": calibration.threshold_table(np.array([0.5]), np.array([False]))}, "m")
    with pytest.raises(CnnflowError, match="m has no threshold table"):
        min_score(None, 0.9, {}, "m")
