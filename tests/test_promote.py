"""Promotion moves `champion` only to a version at least as accurate, and says why.

Real registry (SQLite MLflow), real evaluation on shards: an untrained model (about
chance) against one trained by `cnnflow train --promote`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cnn.models import ModelSpec, build_model, model_state
from data_prep.schema import read_manifest
from tests.test_train import prepare
from workflows import tracking
from workflows.cli import cli
from workflows.errors import CnnflowError
from workflows.promote import promote
from workflows.tracking.pyfunc_model import preprocessing_from_manifest


def register_untrained(data: Path, name: str, seed: int) -> int:
    """A new version whose weights are random: it scores about chance."""
    manifest = read_manifest(str(data))
    spec = ModelSpec("seed", len(manifest["classes"]), manifest["image_size"])
    torch.manual_seed(seed)
    model = build_model(spec)
    return register(data, name, f"untrained-{seed}", model_state(model, spec), preprocessing_from_manifest(manifest))


def register(data: Path, name: str, run_name: str, state: dict, preprocessing: dict) -> int:
    with tracking.training_run(experiment="tests", run_name=run_name, params={}, tags={}) as run_id:
        model_uri = tracking.log_model(run_id, state=state, preprocessing=preprocessing)
        version = tracking.register_model(run_id, model_uri, register_as=name, version_tags={"data": str(data)})
    return int(version.version)


def test_champion_moves_only_to_a_model_at_least_as_good(ray_local, trained_flow, mlflow_uri):
    data = trained_flow.prepared  # and the session's model trained on it (tests/conftest.py)
    cli_runner = CliRunner()

    # No champion yet: the first candidate takes the alias whatever its score.
    assert register_untrained(data, "stripes", seed=1) == 1
    first = promote("stripes", 1)
    assert first.promoted and first.champion_version is None
    assert tracking.champion("stripes") == 1

    # A trained model beats it: the gate moves the alias and records both scores. (The
    # gate as `train --promote` runs it: the session's flow and the demo.)
    assert register(data, "stripes", "trained", *trained_flow.weights()) == 2
    assert promote("stripes", 2).promoted
    assert tracking.champion("stripes") == 2
    tags = tracking.get_version("stripes", 2).tags
    assert float(tags["promotion_val_acc"]) > 0.8
    assert float(tags["promotion_champion_val_acc"]) == pytest.approx(first.accuracy)
    assert tags["promotion_champion_version"] == "1" and tags["promoted"] == "true"

    # A worse candidate leaves the alias where it is, but its scores are still recorded.
    assert register_untrained(data, "stripes", seed=2) == 3
    result = cli_runner.invoke(cli, ["promote", "stripes"])  # latest version by default
    assert result.exit_code == 0, result.output
    assert "stays on v2" in result.output
    assert tracking.champion("stripes") == 2
    tags = tracking.get_version("stripes", 3).tags
    assert tags["promoted"] == "false"
    assert float(tags["promotion_champion_val_acc"]) > float(tags["promotion_val_acc"])

    assert tracking.resolve_model_uri(None) == "models:/stripes/2"
    assert tracking.load_classifier("stripes").version == 2

    listing = cli_runner.invoke(cli, ["runs", "--experiment", "tests"])
    assert listing.exit_code == 0, listing.output
    assert "stripes/2 @champion" in listing.output and "stripes/3" in listing.output


def test_unknown_names_are_clear_errors(ray_local, mlflow_uri, image_folder, tmp_path):
    with pytest.raises(CnnflowError, match="no registered models"):
        tracking.resolve_model_uri(None)
    data = prepare(image_folder, tmp_path / "stripes")
    register_untrained(data, "stripes", seed=1)
    with pytest.raises(CnnflowError, match="no registered model 'cats'; registered models: stripes"):
        tracking.resolve_model_uri("models:/cats@champion")
    with pytest.raises(CnnflowError, match=r"no alias 'champion' \(aliases: none; versions: 1\)"):
        tracking.resolve_model_uri("stripes")
    with pytest.raises(CnnflowError, match="no version '9'; versions: 1"):
        tracking.resolve_model_uri("models:/stripes/9")
    result = CliRunner().invoke(cli, ["promote", "cats"])
    assert result.exit_code == 1 and "no registered model 'cats'" in result.output
    result = CliRunner().invoke(cli, ["promote", "stripes", "--version", "4"])
    assert result.exit_code == 1 and "no version '4'; versions: 1" in result.output
