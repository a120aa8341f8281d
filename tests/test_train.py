"""`cnnflow train` end to end: real local Ray Train, real MLflow (SQLite), real shards.

The data are stripe patterns whose class can be read from the pixels (tests/images.py),
written as image files in many formats and prepared by the real `cnnflow prep` at 16 px,
small enough that a few epochs on 2 CPUs learn them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from data_prep.schema import read_manifest
from tests.images import label_from_pixels, pattern_pixels
from workflows import prep, tracking
from workflows.config import ConfigError, PrepConfig, TrainConfig, budget_epochs
from workflows.errors import CnnflowError
from workflows.train.driver import run
from workflows.train.loop import PID_FILE_ENV

CLASSES = ("horizontal", "vertical", "checker")
SIZE = 16


def prepare(image_folder, out: Path, *, per_class: int = 52) -> Path:
    """Stripe-pattern images in every format prep reads, through the real `cnnflow prep`."""
    images, _ = image_folder(classes=CLASSES, per_class=per_class, size=32)
    assert prep.run(PrepConfig(input=str(images), output=str(out), image_size=SIZE)) == 0
    return out


@pytest.fixture
def stripes(ray_local, image_folder, tmp_path: Path) -> Path:
    return prepare(image_folder, tmp_path / "stripes")


def small(data: Path, tmp_path: Path, **overrides: object) -> TrainConfig:
    options = dict(
        data=str(data),
        model="simple",
        width=8,
        depth=2,
        epochs=4,
        batch_size=16,
        lr=0.01,
        storage=str(tmp_path / "checkpoints"),
        experiment="tests",
    )
    options.update(overrides)
    return TrainConfig(**options)


def only_run(experiment: str = "tests") -> mlflow.entities.Run:
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return runs[0]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_one_worker_learns_and_the_run_is_complete(flow_store):
    # The session's run (tests/conftest.py): stripes at 32 px, 6 epochs, `--promote`.
    flow = flow_store
    client = tracking.client()
    r = client.get_run(flow.run_id)

    # Learns: loss falls, accuracy well above chance (1/3).
    loss = [v for _, v in tracking.metric_history(r.info.run_id, "train_loss")]
    assert loss[-1] < loss[0]
    assert r.data.metrics["val_acc"] > 0.8

    # One value per epoch per metric, at steps 1..epochs.
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "epoch_time_s"):
        assert [s for s, _ in tracking.metric_history(r.info.run_id, key)] == [1, 2, 3, 4, 5, 6], key

    assert r.info.status == "FINISHED" and r.info.run_name == "first"
    for key, value in {"model": "simple", "epochs": "6", "batch_size": "16", "workers": "1", "register_as": "stripes"}.items():
        assert r.data.params[key] == value
    assert set(TrainConfig.__dataclass_fields__) <= set(r.data.params)
    tags = r.data.tags
    manifest = read_manifest(str(flow.prepared))
    content_hash = manifest["content_hash"]
    assert tags["content_hash"] == content_hash and tags["classes"] == ",".join(manifest["classes"])
    assert tags["device"] == "cpu" and tags["workers"] == "1" and tags["ray_version"]

    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {
        "manifest.json", "config.yaml", "model_summary.txt", "confusion_matrix.png", "curves.png", "per_class.json",
    } <= artifacts
    per_class = mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/per_class.json")
    assert set(per_class["classes"]) == set(CLASSES)

    # The shards are the run's MLflow dataset inputs: one per split, the manifest's hash as
    # the digest (MLflow keeps 36 characters; the whole hash is a tag), the split's folder
    # as the source.
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in r.inputs.dataset_inputs}
    assert sorted(inputs) == ["train", "val"]
    for split, given in inputs.items():
        tags = {t.key: t.value for t in given.tags}
        assert given.dataset.name == f"prepared/{split}"
        assert given.dataset.digest == content_hash[:36] and tags["content_hash"] == content_hash
        assert json.loads(given.dataset.source) == {"uri": str(flow.prepared / split)}
        assert given.dataset.source_type == "local" and tags["num_rows"] == str(manifest["num_rows"][split])
    # Calibrated on validation: a temperature, the error before and after, the figure and
    # the threshold table, all recorded in the model's contract too.
    metrics = r.data.metrics
    assert 0 < metrics["temperature"] and metrics["val_ece_after"] <= metrics["val_ece_before"] + 1e-9
    assert {"reliability.png", "thresholds.json"} <= artifacts
    thresholds = mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/thresholds.json")
    assert thresholds["threshold"][0] == 0.0 and thresholds["coverage"][0] == 1.0
    assert thresholds["precision"][0] == pytest.approx(per_class["accuracy"])  # every row kept: the accuracy
    _, contract = flow.weights()
    assert contract["temperature"] == pytest.approx(metrics["temperature"]) and contract["thresholds"] == thresholds
    reference = contract["drift_reference"]
    counts = manifest["counts"]
    assert reference["class_counts"] == [counts["train"][c] for c in manifest["classes"]]
    assert sum(reference["score_histogram"]) == sum(counts["val"].values())

    # Registered as --register-as, tagged; loadable as plain PyTorch and as pyfunc.
    version = client.get_model_version("stripes", "1")
    assert version.tags["run_id"] == r.info.run_id and version.tags["content_hash"] == content_hash
    # The version comes from the run and is its logged model (MLflow 3's models:/m-ID source),
    # which lists the version back.
    assert version.run_id == r.info.run_id and version.source == r.data.tags["logged_model_uri"]
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == r.info.run_id
    assert {"name": "stripes", "version": 1} in json.loads(logged.tags["mlflow.modelVersions"])
    assert float(version.tags["val_acc"]) > 0.8
    classifier = tracking.load_classifier("models:/stripes/1")
    assert classifier.uri == "models:/stripes/1" and classifier.preprocessing["classes"] == manifest["classes"]

    rng = np.random.default_rng(7)
    images = [pattern_pixels(label, 40, rng) for label in (0, 1, 2) * 4]
    pyfunc = mlflow.pyfunc.load_model("models:/stripes/1")
    out = pyfunc.predict(pd.DataFrame({"image": [png(p) for p in images] + [b"not an image"]}))
    truth = [CLASSES[label_from_pixels(p)] for p in images]
    assert (out["label"][:12] == truth).mean() >= 0.75
    assert out["error"][12] and out["error"][:12].isna().all()
    assert np.allclose([sum(p) for p in out["probabilities"][:12]], 1.0, atol=1e-4)


@pytest.mark.slow
def test_two_workers_learn_and_a_killed_worker_resumes_from_its_checkpoint(ray_local, mlflow_uri, image_folder, tmp_path, monkeypatch):
    data = prepare(image_folder, tmp_path / "bigger", per_class=200)
    pid_file = tmp_path / "worker.pid"
    monkeypatch.setenv(PID_FILE_ENV, str(pid_file))
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        # Epoch 1 is logged only once its checkpoint is stored: then kill rank 0 for real.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
            if runs and tracking.metric_history(runs[0].info.run_id, "val_acc"):
                pid = int(Path(f"{pid_file}.0").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    assert run(small(data, tmp_path, workers=2, epochs=4, max_failures=2)) == 0
    killer.join()

    assert killed, "the worker was never killed"
    assert int(Path(f"{pid_file}.0").read_text()) != killed[0]  # a new worker took over
    r = only_run()
    assert r.info.status == "FINISHED"
    assert r.data.tags["workers"] == "2" and r.data.metrics["val_acc"] > 0.8
    resumed = int(r.data.tags["resumed_from_epoch"])
    assert 1 <= resumed < 4  # from a checkpoint, not from scratch
    for key in ("train_loss", "val_acc", "lr"):
        assert [s for s, _ in tracking.metric_history(r.info.run_id, key)] == [1, 2, 3, 4], key


def test_errors_come_before_any_worker_or_run(ray_local, mlflow_uri, stripes, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a `cnnflow prep` output"):
        run(small(tmp_path / "nowhere", tmp_path))
    with pytest.raises(ConfigError, match="unknown model 'vgg'; known models: resnet18, seed, simple"):
        small(stripes, tmp_path, model="vgg")
    with pytest.raises(CnnflowError, match="too small"):
        run(small(stripes, tmp_path, depth=6))  # 16 px cannot take 6 poolings
    with pytest.raises(CnnflowError, match="needs 3 CPUs"):
        run(small(stripes, tmp_path, workers=3))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_a_failed_job_ends_its_run_failed_with_the_reason(ray_local, mlflow_uri, stripes, tmp_path):
    # Shards whose rows do not match the manifest's image size fail inside the workers.
    manifest_path = stripes / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["image_size"] = 8
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CnnflowError, match="training failed"):
        run(small(stripes, tmp_path, depth=1, max_failures=0))
    r = only_run()
    assert r.info.status == "FAILED"
    assert "expected 192 (8x8x3)" in r.data.tags["failure_reason"]


@pytest.mark.slow
def test_same_seed_same_metrics_and_the_best_epoch_is_registered(trained_flow, mlflow_uri, tmp_path):
    # The session's run again, same options and --seed, into a store of its own.
    flow = trained_flow
    assert run(dataclasses.replace(flow.config, run_name="again", storage=str(tmp_path / "checkpoints"))) == 0
    keys = ("train_loss", "val_loss", "val_acc")
    first_client = MlflowClient(tracking_uri=flow.tracking_uri, registry_uri=flow.tracking_uri)
    first = {k: [(m.step, m.value) for m in first_client.get_metric_history(flow.run_id, k)] for k in keys}
    again_run = mlflow.search_runs(experiment_names=["flow"], output_format="list")[0]
    again = {k: tracking.metric_history(again_run.info.run_id, k) for k in keys}
    assert again == first  # epoch by epoch, to the last bit

    for client, run_id in ((first_client, flow.run_id), (tracking.client(), again_run.info.run_id)):
        mv = client.get_model_version("stripes", "1")
        assert mv.tags["run_id"] == run_id
        val_acc = dict((m.step, m.value) for m in client.get_metric_history(run_id, "val_acc"))
        best = max(val_acc.values())
        # The registered weights are those of an epoch with the best validation accuracy,
        # and scoring them again on the whole split gives that epoch's accuracy.
        assert val_acc[int(mv.tags["best_epoch"])] == best
        assert float(mv.tags["val_acc"]) == pytest.approx(best, abs=1e-6)
        assert client.get_run(run_id).data.tags["best_epoch"] == mv.tags["best_epoch"]


@pytest.mark.parametrize(
    ("train_rows", "global_batch", "epochs"),
    [(100, 64, 24), (1600, 64, 24), (4800, 64, 20), (6400, 64, 15), (1_000_000, 64, 10), (12800, 128, 15)],
)
def test_epoch_budget_gives_small_sets_steps_and_large_sets_no_waste(train_rows, global_batch, epochs):
    assert budget_epochs(train_rows, global_batch) == epochs
