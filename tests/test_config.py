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


def test_model_options_come_from_the_registry() -> None:
    from cnn.registry import MODELS

    for config_cls in (cfg.TrainConfig, cfg.SummaryConfig):
        fields = {f.name: f for f, _ in cfg.config_fields(config_cls)}
        assert all(name in fields["model"].metadata["help"] for name in MODELS)
        for info in MODELS.values():
            for arg in info.args:
                if arg.name in fields:
                    assert fields[arg.name].default == arg.default
                    assert fields[arg.name].metadata["help"] == f"{info.name}: {arg.help}"
    train = {f.name for f, _ in cfg.config_fields(cfg.TrainConfig)}
    assert {a.name for info in MODELS.values() for a in info.args} <= train  # every model's arguments are train options
    assert cfg.model_options(cfg.TrainConfig(data="d", model="resnet18", weights="w.pt")) == {"weights_path": "w.pt"}
    assert cfg.model_options(cfg.TrainConfig(data="d", model="resnet18")) == {}


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
        ({"data": "d", "workers": 0}, r"workers must be in \[1, 1024\]"),
        ({"data": "d", "epochs": 0}, r"epochs must be in \[1, 10000\]"),
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


# --- every option bounded, every refusal one line (issue #12) --------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (cfg.PrepConfig, {"num_cpus": 0}, r"num_cpus must be >= 1"),
        (cfg.PrepConfig, {"image_size": 100_000}, r"image_size must be in \[8, 1024\]"),
        (cfg.PrepConfig, {"image_size": 4}, r"image_size must be in \[8, 1024\]"),
        (cfg.PrepConfig, {"val_fraction": NAN}, r"val_fraction must be in \(0, 1\)"),
        (cfg.PrepConfig, {"seed": -1}, r"seed must be in"),
        (cfg.PrepConfig, {"rows_per_shard": 0}, r"rows_per_shard must be in"),
        (cfg.PrepConfig, {"max_file_mb": 0}, r"max_file_mb must be in \(0, 2048\]"),
        (cfg.PrepConfig, {"max_megapixels": 500}, r"max_megapixels must be in \(0, 178\]"),
        (cfg.PrepConfig, {"max_megapixels": NAN}, r"max_megapixels must be in"),
        (cfg.PredictConfig, {"workers": 0}, r"workers must be in \[1, 256\]"),
        (cfg.PredictConfig, {"workers": 10_000}, r"workers must be in \[1, 256\]"),
        (cfg.PredictConfig, {"batch_size": 10**7}, r"batch_size must be in \[1, 4096\]"),
        (cfg.PredictConfig, {"num_cpus": 0}, r"num_cpus must be >= 1"),
        (cfg.PredictConfig, {"min_score": 0}, r"min_score must be in \(0, 1\]"),
        (cfg.PredictConfig, {"min_score": 1.5}, r"min_score must be in \(0, 1\]"),
        (cfg.PredictConfig, {"target_precision": NAN}, r"target_precision must be in \(0, 1\]"),
        (cfg.PredictConfig, {"min_score": 0.5, "target_precision": 0.9}, r"--min-score or --target-precision, not both"),
        (cfg.TrainConfig, {"lr": NAN}, r"lr must be in \(0, 10\)"),
        (cfg.TrainConfig, {"lr": INF}, r"lr must be in \(0, 10\)"),
        (cfg.TrainConfig, {"weight_decay": INF}, r"weight_decay must be in \[0, 1\)"),
        (cfg.TrainConfig, {"weight_decay": -0.1}, r"weight_decay must be in \[0, 1\)"),
        (cfg.TrainConfig, {"label_smoothing": NAN}, r"label_smoothing must be in \[0, 1\)"),
        (cfg.TrainConfig, {"max_shift": -0.1}, r"max_shift must be in \[0, 0.5\)"),
        (cfg.TrainConfig, {"warmup": 1.0}, r"warmup must be in \(0, 1\)"),
        (cfg.TrainConfig, {"ema": NAN}, r"ema must be in"),
        (cfg.TrainConfig, {"batch_size": 0}, r"batch_size must be in \[1, 4096\]"),
        (cfg.TrainConfig, {"batch_size": 10**9}, r"batch_size must be in \[1, 4096\]"),
        (cfg.TrainConfig, {"epochs": 10**9}, r"epochs must be in"),
        (cfg.TrainConfig, {"max_failures": -1}, r"max_failures must be in"),
        (cfg.TrainConfig, {"width": 512, "depth": 6}, r"channels of the last stage\) must be <= 2048"),
        (cfg.TrainConfig, {"depth": 11, "width": 1}, r"depth must be in \[1, 10\]"),
        (cfg.TrainConfig, {"num_cpus": 0}, r"num_cpus must be >= 1"),
        (cfg.TuneConfig, {"time_budget": INF}, r"time_budget must be in"),
        (cfg.TuneConfig, {"time_budget": NAN}, r"time_budget must be in"),
        (cfg.TuneConfig, {"trials": 0}, r"trials must be in"),
        (cfg.SummaryConfig, {"image_size": 100_000}, r"image_size must be in \[8, 1024\]"),
        (cfg.SummaryConfig, {"num_classes": 0}, r"num_classes must be in"),
        (cfg.RunsConfig, {"max_runs": 0}, r"max_runs must be in \[1, 1000\]"),
        (cfg.DemoConfig, {"num_cpus": 0}, r"num_cpus must be >= 1"),
    ],
)
def test_every_option_is_bounded_when_the_config_is_built(cls: type, values: dict, message: str) -> None:
    required = {f.name: "x" for f, _ in cfg.config_fields(cls) if f.metadata.get("positional")}
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.make_config(cls, {**required, **values})


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (cfg.TrainConfig, {"register_as": "a/b"}, r"must not contain '/' or ':'"),
        (cfg.TrainConfig, {"register_as": "a:b"}, r"must not contain '/' or ':'"),
        (cfg.TrainConfig, {"register_as": ".."}, r"is not a plain name"),
        (cfg.TrainConfig, {"register_as": "it's"}, r"must not contain quotes or backticks"),
        (cfg.TrainConfig, {"register_as": " "}, r"must not be empty"),
        (cfg.TrainConfig, {"experiment": ""}, r"experiment must not be empty"),
        (cfg.TrainConfig, {"experiment": 'say "hi"'}, r"experiment must not contain quotes"),
        (cfg.TrainConfig, {"experiment": "x" * 501}, r"at most 500 characters"),
        (cfg.TrainConfig, {"run_name": "two\nlines"}, r"run_name must not contain control characters"),
        (cfg.TuneConfig, {"register_as": "a/b"}, r"must not contain '/' or ':'"),
        (cfg.RunsConfig, {"experiment": "tab\there"}, r"must not contain control characters"),
        (cfg.PredictConfig, {"experiment": "it's"}, r"experiment must not contain quotes"),
        (cfg.PredictConfig, {"experiment": ""}, r"experiment must not be empty"),
        (cfg.PromoteConfig, {"name": "a/b"}, r"must not contain '/' or ':'"),
    ],
)
def test_names_mlflow_would_refuse_are_refused_first(cls: type, values: dict, message: str) -> None:
    required = {f.name: "x" for f, _ in cfg.config_fields(cls) if f.metadata.get("positional")}
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.make_config(cls, {**required, **values})


def test_names_made_elsewhere_may_be_looked_up_with_quotes() -> None:
    # cnnflow never creates such names, but another tool may have: lookups take them.
    assert cfg.PromoteConfig(name="it's").name == "it's"
    assert cfg.RunsConfig(experiment='say "hi"').experiment == 'say "hi"'


def one_error_line(result) -> str:
    """The CLI's whole output must be one line `error: ...`, exit code 1, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_python_tag_in_yaml_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text('model: seed\nnum_classes: !!python/object/apply:os.system ["echo owned"]\n')
    line = one_error_line(CliRunner().invoke(cli, ["summary", "--config", str(path)]))
    assert "(line 2): could not determine a constructor for the tag" in line and "python/object/apply" in line
    debug = CliRunner().invoke(cli, ["--debug", "summary", "--config", str(path)])
    assert debug.exit_code == 1 and "Traceback" in debug.output and "ConstructorError" in debug.output
    (tmp_path / "broken.yaml").write_text("model: [seed\n")
    assert "broken.yaml" in one_error_line(CliRunner().invoke(cli, ["summary", "--config", str(tmp_path / "broken.yaml")]))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert "not a text file" in one_error_line(CliRunner().invoke(cli, ["summary", "--config", str(tmp_path / "binary.yaml")]))


def test_values_the_cli_refuses_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    # --num-cpus 0 used to start a Ray that could run nothing, and wait forever.
    line = one_error_line(runner.invoke(cli, ["prep", str(tmp_path), str(tmp_path / "out"), "--num-cpus", "0"]))
    assert line == "error: num_cpus must be >= 1, got 0"
    line = one_error_line(runner.invoke(cli, ["predict", str(tmp_path), str(tmp_path / "o"), "--workers", "100000"]))
    assert "workers must be in [1, 256]" in line
    line = one_error_line(runner.invoke(cli, ["train", "d", "--register-as", "a/b"]))
    assert "register_as must not contain '/' or ':'" in line
    line = one_error_line(runner.invoke(cli, ["summary", "--model", "simple", "--depth", "7", "--image-size", "64"]))
    assert "image_size 64 is too small for depth 7" in line  # the model's own limit, as one line
    line = one_error_line(runner.invoke(cli, ["summary", "--image-size", "100000"]))
    assert "image_size must be in [8, 1024]" in line


def test_predict_into_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "taken.txt").write_text("not a folder")
    line = one_error_line(CliRunner().invoke(cli, ["predict", str(tmp_path / "in"), str(tmp_path / "taken.txt")]))
    assert "is a file; give a folder" in line


def test_an_mlflow_refusal_is_one_line_with_mlflows_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://somewhere")  # a store MLflow refuses
    line = one_error_line(CliRunner().invoke(cli, ["runs"]))
    assert line.startswith("error: MLflow: ") and "nosuchscheme://somewhere" in line
