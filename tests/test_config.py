"""Typed configs, YAML loading, and the CLI generated from them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from workflows import config as cfg
from workflows.cli import COMMANDS, cli


def test_defaults_live_in_the_config() -> None:
    prep = cfg.PrepConfig(input="in", output="out")
    assert (prep.image_size, prep.resize, prep.val_fraction, prep.labels) == (128, "squash", 0.2, "folder")
    train = cfg.TrainConfig(data="d")
    assert (train.workers, train.max_failures, train.experiment) == (1, 2, "cnnflow")


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data: shards\nepochs: 3\nbatch-size: 16\nlr: 0.01\noptimizer: sgd\n")
    config = cfg.load_config(cfg.TrainConfig, path, epochs=5)
    assert (config.data, config.epochs, config.batch_size, config.lr, config.optimizer) == ("shards", 5, 16, 0.01, "sgd")


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "prep.yaml"
    path.write_text("input: a\noutput: b\nimage_sise: 64\n")
    with pytest.raises(cfg.ConfigError, match=r"unknown key image_sise .*valid keys: .*image_size"):
        cfg.load_config(cfg.PrepConfig, path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data": "d", "epochs": "ten"}, "epochs must be an integer"),
        ({"data": "d", "optimizer": "lion"}, "optimizer must be one of adamw, sgd"),
        ({"data": "d", "model": "vgg"}, "known models: resnet18, seed, simple"),
        ({"data": "d", "workers": 0}, "workers must be >= 1"),
        ({"data": "d", "epochs": 0}, "epochs must be >= 1"),
        ({"data": "d", "lr": float("inf")}, r"lr must be in \(0, 10\)"),
        ({"data": "d", "max_shift": 0.9}, r"max_shift must be in \[0, 0.5\)"),
        ({"data": "d", "label_smoothing": 1.5}, "label_smoothing must be in"),
        ({"data": "d", "ema": 1.0}, "ema must be in"),
        ({"data": "d", "tta": "rotate"}, "tta must be one of none, flip"),
        ({"epochs": 3}, "missing data"),
    ],
)
def test_bad_values_say_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.make_config(cfg.TrainConfig, values)


def test_every_option_of_every_command_has_help() -> None:
    runner = CliRunner()
    for name, (config_cls, _) in COMMANDS.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        for field, _ in cfg.config_fields(config_cls):
            if field.metadata.get("positional"):
                assert field.name.upper() in result.output
            else:
                assert "--" + field.name.replace("_", "-") in result.output
                assert field.metadata["help"], f"{name} --{field.name} has no help"


def test_command_line_wins_over_yaml(tmp_path: Path) -> None:
    path = tmp_path / "summary.yaml"
    path.write_text("image_size: 300\nnum_classes: 1\n")
    result = CliRunner().invoke(cli, ["summary", "--config", str(path), "--num-classes", "2"])
    assert result.exit_code == 0, result.output
    assert "Total params: 438,842" in result.output
    result = CliRunner().invoke(cli, ["summary", "--config", str(path)])
    assert "Total params: 219,801" in result.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["summary", "--model", "vgg"])
    assert result.exit_code == 1
    assert "known models: resnet18, seed, simple" in result.output
    assert "Traceback" not in result.output


def test_summary_command_prints_the_tutorial_figure() -> None:
    # The installed console script, as a user runs it.
    out = subprocess.run(
        [str(Path(sys.executable).with_name("cnnflow")), "summary", "--model", "seed", "--image-size", "300", "--num-classes", "2"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Total params: 438,842" in out


def test_module_entry_point_runs_the_same_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workflows.summary", "--num-classes", "1"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Total params: 219,801" in out
