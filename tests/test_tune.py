"""`cnnflow tune`: Ray Tune over Ray Train, a parent MLflow run with one child per trial.

End to end on a real local Ray and a real MLflow (SQLite), on the stripe patterns of
tests/test_train.py prepared at 16 px; plus the pieces that need no cluster (the search
space, ASHA's last-epoch rule, the options).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from click.testing import CliRunner

from workflows import prep, tracking
from workflows.cli import cli
from workflows.config import ConfigError, PrepConfig, TuneConfig
from workflows.train.plan import plan
from workflows.tune.callbacks import STOPPED_TAG
from workflows.tune.driver import run
from workflows.tune.space import EarlyStopping, search_space, starting_points

CLASSES = ("horizontal", "vertical", "checker")


def prepare(image_folder, out: Path) -> Path:
    images, _ = image_folder(classes=CLASSES, per_class=52, size=32)
    assert prep.run(PrepConfig(input=str(images), output=str(out), image_size=16)) == 0
    return out


@pytest.mark.slow
def test_two_trials_make_a_parent_two_children_and_register_the_better(ray_local, mlflow_uri, image_folder, tmp_path):
    data = prepare(image_folder, tmp_path / "stripes")
    config = TuneConfig(
        data=str(data), model="simple", width=8, depth=2, epochs=1, batch_size=16, lr=0.01,
        trials=2, search="lr,width", storage=str(tmp_path / "ray"), experiment="tests", run_name="search",
    )
    assert run(config) == 0

    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.status == "FINISHED" and parent.info.run_name == "search"
    assert all(c.info.status == "FINISHED" and STOPPED_TAG not in c.data.tags for c in children)
    assert sorted(c.info.run_name for c in children) == ["trial-1", "trial-2"]
    # The parent holds the base options and the search space; each child its own options.
    assert parent.data.params["epochs"] == "1" and parent.data.params["search.width"] == "choice 4, 8, 16"
    assert "search.lr" in parent.data.params and parent.data.params["trials"] == "2"
    assert {c.data.params["width"] for c in children} <= {"4", "8", "16"}
    # Each trial read the same shards: its dataset inputs, as `cnnflow train`'s run has them.
    for c in children:
        assert sorted(i.dataset.name for i in c.inputs.dataset_inputs) == ["stripes/train", "stripes/val"]
    # The first trial is the given options themselves: the search starts from `train`'s run.
    first = next(c for c in children if c.info.run_name == "trial-1")
    assert (first.data.params["width"], float(first.data.params["lr"])) == ("8", 0.01)

    # The registered version is the child with the highest val_acc, and everything says so.
    version = tracking.client().get_model_version("stripes", "1")
    best = max(c.data.metrics["val_acc"] for c in children)
    registered = next(c for c in children if c.info.run_id == version.run_id)
    assert registered.data.metrics["val_acc"] == best
    assert version.tags["run_id"] == registered.info.run_id
    assert version.tags["tune_parent_run_id"] == parent.info.run_id
    assert registered.data.tags[tracking.REGISTERED_TAG] == "stripes/1"
    assert parent.data.tags["best_run_id"] == registered.info.run_id
    assert parent.data.tags["best_trial"] == registered.info.run_name
    assert parent.data.metrics["val_acc"] == pytest.approx(best)

    # `cnnflow runs` shows the children under their parent.
    result = CliRunner().invoke(cli, ["runs", "--experiment", "tests"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "(" in line and ")" in line]
    assert f"search ({parent.info.run_id[:8]})" in lines[0]
    assert "└ trial-1" in lines[1] and "└ trial-2" in lines[2]
    assert "stripes/1" in next(line for line in lines if registered.info.run_id[:8] in line)


def trial(trial_id: str, epochs: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"epochs": epochs})


def test_asha_stops_a_trailing_trial_but_not_at_its_last_epoch() -> None:
    asha = EarlyStopping(grace=0.5, metric="val_acc", mode="max")
    leader, trailing, done = trial("a_00000", 8), trial("a_00001", 16), trial("a_00002", 2)
    for t in (leader, trailing, done):
        asha.on_trial_add(None, t)
    # Trials are compared at the same share of their own schedule, not the same epoch.
    assert asha.on_trial_result(None, leader, {"epoch": 3, "progress": 3 / 8, "val_acc": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, leader, {"epoch": 4, "progress": 4 / 8, "val_acc": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, trailing, {"epoch": 4, "progress": 4 / 16, "val_acc": 0.5}) == "CONTINUE"
    assert asha.on_trial_result(None, trailing, {"epoch": 8, "progress": 8 / 16, "val_acc": 0.5}) == "STOP"
    # A trial trailing at its last epoch is already done training: it goes on to its
    # evaluation and logged model instead.
    assert asha.on_trial_result(None, done, {"epoch": 2, "progress": 1.0, "val_acc": 0.4}) == "CONTINUE"


def test_the_search_space_is_around_the_given_options_and_builds(image_folder, tmp_path, ray_local) -> None:
    data = prepare(image_folder, tmp_path / "stripes")
    config = TuneConfig(data=str(data), model="simple", width=8, depth=3, epochs=4, lr=0.01, weight_decay=0.0)
    space, described = search_space(config, plan(config))
    # Depth only goes up (a stage less halves the receptive field) ...
    assert space["depth"].categories == [3, 4]
    # ... and only as far as builds: 16 px halves to 1 px in 4 stages, so 5 is left out.
    deep = TuneConfig(data=str(data), model="simple", depth=4, epochs=4)
    assert "depth" not in search_space(deep, plan(deep))[0]
    assert space["width"].categories == [4, 8, 16]
    assert space["epochs"].categories == [4, 6, 8]
    assert (space["lr"].lower, space["lr"].upper) == pytest.approx((0.005, 0.02))
    assert "weight_decay" not in space  # zero stays zero
    assert described["max_shift"] == "choice 0, 0.0625, 0.125, 0.1875"
    # The first trials: the given options, then the same on the longest schedule.
    given, longer = starting_points(config, plan(config), space)
    assert given == {"lr": 0.01, "width": 8, "depth": 3, "max_shift": config.max_shift,
                     "label_smoothing": config.label_smoothing, "epochs": 4}  # fmt: skip
    assert longer == {**given, "epochs": 8}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"search": "lr,momentum"}, "unknown option momentum; searchable: lr, weight_decay"),
        ({"trials": 0}, r"trials must be in \[1, 10000\]"),
        ({"time_budget": -1.0}, r"time_budget must be in \(0, 31536000\]"),
        ({"name": "a/b"}, "name must be a folder name"),
    ],
)
def test_bad_tune_options_say_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TuneConfig(data="d", **values)
