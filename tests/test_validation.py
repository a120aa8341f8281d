"""Issue #12: user text never breaks an MLflow lookup, and errors never echo a file's content.

Real MLflow (SQLite), real files; no Ray needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.scan import PrepError, read_label_csv
from workflows import tracking
from workflows.errors import CnnflowError


def register(name: str) -> str:
    """A registered version made straight with MLflow's client, as another tool might:
    cnnflow itself refuses quotes in the names it creates."""
    c = tracking.client()
    experiment = tracking.ensure_experiment("names")
    run = c.create_run(experiment)
    c.create_registered_model(name)
    c.create_model_version(name, "file:///nowhere", run_id=run.info.run_id)
    c.set_registered_model_alias(name, "champion", "1")
    return run.info.run_id


@pytest.mark.parametrize("name", ["it's", 'say "hi"', "plain"])
def test_a_quote_in_a_registered_name_resolves_like_any_name(mlflow_uri: str, name: str) -> None:
    run_id = register(name)
    assert tracking.versions(name) == [1]
    for uri in (name, f"models:/{name}@champion", f"models:/{name}/1", f"models:/{name}/latest", f"runs:/{run_id}/model"):
        assert tracking.resolve_model_uri(uri) == f"models:/{name}/1"
    with pytest.raises(CnnflowError, match="has no version '7'"):
        tracking.resolve_model_uri(f"models:/{name}/7")


def test_a_quote_in_a_runs_uri_is_a_clear_error_not_a_filter(mlflow_uri: str) -> None:
    register("plain")
    for uri in ("runs:/x' or name = 'plain/model", 'runs:/a"b/model', "runs://model"):
        with pytest.raises(CnnflowError, match="does not name a run"):
            tracking.resolve_model_uri(uri)


def test_filter_literals_quote_what_mlflow_can_match_and_refuse_the_rest() -> None:
    assert tracking.literal("a b") == "'a b'"
    assert tracking.literal("it's") == '"it\'s"'
    assert tracking.literal('say "hi"') == "'say \"hi\"'"
    with pytest.raises(CnnflowError, match="both kinds of quote"):
        tracking.literal("it's \"x\"")


def test_a_tag_value_with_a_quote_is_found(mlflow_uri: str) -> None:
    tracking.ensure_experiment("names")
    c = tracking.client()
    experiment = c.get_experiment_by_name("names").experiment_id
    run = c.create_run(experiment, tags={"kind": "search", "data": "/data/o'brien's cats"})
    found = tracking.latest_run("names", {"kind": "search", "data": "/data/o'brien's cats"})
    assert found is not None and found["run_id"] == run.info.run_id


def test_label_csv_errors_name_lines_never_content(tmp_path: Path) -> None:
    secret = Path("/etc/passwd").read_text().splitlines()[0] if Path("/etc/passwd").exists() else None
    if secret:
        with pytest.raises(PrepError) as info:
            read_label_csv("/etc/passwd", str(tmp_path))
        assert secret not in str(info.value) and "root:" not in str(info.value)
    (tmp_path / "labels.csv").write_text("a.png,cat\nsecret-token-1,dog,extra\n")
    with pytest.raises(PrepError, match=r"line 2: expected two non-empty fields `path,label`, got 3 field\(s\)") as info:
        read_label_csv("labels.csv", str(tmp_path))
    assert "secret-token-1" not in str(info.value)
    (tmp_path / "twice.csv").write_text("path,label\nsecret-a.png,cat\nb.png,dog\nsecret-a.png,dog\n")
    with pytest.raises(PrepError, match="lines 2 and 4: one path with two different labels") as info:
        read_label_csv("twice.csv", str(tmp_path))
    assert "secret" not in str(info.value)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(PrepError, match="not UTF-8 text"):
        read_label_csv("binary.csv", str(tmp_path))
