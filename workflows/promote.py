"""`cnnflow promote NAME` and `train --promote`: move `champion` only to a model at least as good.

The candidate version and the current champion are evaluated here, on the same
validation split of the same prepared data (streamed from its shards), and the alias
moves only if the candidate's accuracy is >= the champion's. The decision itself, made
one promotion at a time against the champion the alias still names, and the tags that
record it, are `workflows/tracking/promotion.py`'s; the evaluation is train's
(`workflows/train/evaluation.py`).
"""
from __future__ import annotations

import click

from data_prep.lock import describe
from data_prep.redact import HIDDEN
from workflows import tracking
from workflows.config import PromoteConfig
from workflows.errors import CnnflowError
from workflows.train.evaluation import Evaluation, evaluate


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
