"""Credentials in URIs never reach MLflow, the files cnnflow writes, or the terminal.

The run is logged by train's own functions (`resolved_options`, `run_tags`,
`log_artifacts`, `tracking.log_model`, `register`, the failing end of `training_run`)
into a real SQLite MLflow store, and everything stored is read back: every param, run
tag, version tag and artifact file. The terminal side runs the real `cnnflow` CLI.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cnn.models import ModelSpec, build_model, model_state
from data_prep.redact import redact_uri, redacted, unredact
from tests.cluster_helpers import REPO
from workflows import tracking
from workflows.config import TrainConfig, to_dict
from workflows.errors import CnnflowError
from workflows.train.artifacts import log_artifacts
from workflows.train.driver import Trained, register
from workflows.train.evaluation import Evaluation
from workflows.train.plan import Plan, resolved_options, run_tags

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"  # AWS's documented example: holds a "/"
DATA = f"s3://AKIAEXAMPLE:{SECRET}@bucket/shards/pets"
STORAGE = f"s3://AKIAEXAMPLE:{SECRET}@bucket/checkpoints?region=us-west-2"
IMAGES = f"https://reader:{SECRET}@images.example/pets"
SIGNED = f"https://bucket.s3.amazonaws.com/x.jpg?X-Amz-Credential=AKIA%2F1&X-Amz-Signature={SECRET}&v=1"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (DATA, "s3://***@bucket/shards/pets"),
        (STORAGE, "s3://***@bucket/checkpoints?region=us-west-2"),
        ("https://user:pass@mlflow.example:5000/", "https://***@mlflow.example:5000/"),
        ("https://token@github.com/o/r", "https://***@github.com/o/r"),
        (SIGNED, "https://bucket.s3.amazonaws.com/x.jpg?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
        # Left alone: no credentials, an "@" in a path, a port.
        ("s3://bucket/people/me@home.jpg", "s3://bucket/people/me@home.jpg"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("/data/a:b@c.png", "/data/a:b@c.png"),
        (f"copy {DATA} to {IMAGES}", "copy s3://***@bucket/shards/pets to https://***@images.example/pets"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_redacted_walks_containers_and_unredact_takes_the_secret_only_from_the_user() -> None:
    options = {"data": DATA, "epochs": 3, "nested": {"storage": [STORAGE, None]}, "lr": 0.1}
    assert SECRET not in repr(redacted(options))
    assert redacted(options)["epochs"] == 3 and redacted(options)["lr"] == 0.1
    saved = redact_uri(DATA)
    assert unredact(saved, DATA) == DATA  # the same URI given again: its secret comes back
    assert unredact(saved, "s3://K:S@other/shards") == saved  # another URI: the saved one stands
    assert unredact("/local/path", "/elsewhere") == "/local/path"


def stored_text(client: MlflowClient, run_id: str, tmp: Path) -> str:
    """Every param, tag and artifact file of the run, and its registered versions' tags, as text."""
    run = client.get_run(run_id)
    parts = [repr(run.data.params), repr(run.data.tags), run.info.run_name or ""]
    parts += [f"{i.dataset.name} {i.dataset.source} {i.tags}" for i in run.inputs.dataset_inputs]
    folder = Path(client.download_artifacts(run_id, "", str(tmp)))
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert {"manifest.json", "config.yaml"} <= {f.name for f in files}
    parts += [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        parts.append(repr(version.tags))
    return "\n".join(parts)


def test_a_run_with_secret_uris_stores_and_prints_no_secret(mlflow_uri, tmp_path, capfd) -> None:
    config = TrainConfig(data=DATA, storage=STORAGE, model="simple", width=8, depth=2, epochs=1, experiment="secrets")
    spec = ModelSpec("simple", 2, 16, {"width": 8, "depth": 2})
    manifest = {  # what prep writes, as an older cnnflow would have: with the input's credentials
        "classes": ["cat", "dog"], "image_size": 16, "resize": "squash", "mean": [0.5] * 3, "std": [0.2] * 3,
        "num_rows": {"train": 4, "val": 2}, "input": IMAGES, "options": {"input": IMAGES, "output": DATA},
        "content_hash": "abc",
    }  # fmt: skip
    p = Plan(config, DATA, manifest, spec, register_as="pets", epochs=1, tta="none")
    model = build_model(spec)
    evaluation = Evaluation(labels=np.array([0, 1]), predictions=np.array([0, 0]), loss=0.7)

    with pytest.raises(CnnflowError):
        with tracking.training_run(
            experiment="secrets", run_name=None, params=resolved_options(p), tags=run_tags(p)
        ) as run_id:
            tracking.log_dataset_inputs(run_id, data=DATA, manifest=manifest, splits=("train", "val"))
            tracking.log_epoch(mlflow_uri, run_id, 1, {"train_loss": 0.7, "val_loss": 0.7, "val_acc": 0.5, "lr": 0.01})
            log_artifacts(p, run_id, model, evaluation)
            preprocessing = {k: manifest[k] for k in ("classes", "image_size", "resize", "mean", "std")}
            model_uri = tracking.log_model(run_id, state=model_state(model, spec), preprocessing={**preprocessing, "tta": "none"})
            register(p, Trained(run_id, model_uri, evaluation, best_epoch=1))
            raise CnnflowError(f"cannot write a checkpoint to {STORAGE}/checkpoint_000001")

    client = MlflowClient(mlflow_uri, mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["data"] == "s3://***@bucket/shards/pets"  # still says which data
    assert run.data.params["storage"] == "s3://***@bucket/checkpoints?region=us-west-2"
    assert "s3://***@bucket/checkpoints" in run.data.tags[tracking.FAILURE_TAG]
    assert set(to_dict(config)) <= set(run.data.params)  # every option logged, none dropped
    text = stored_text(client, run_id, tmp_path / "artifacts")
    assert "AKIAEXAMPLE" not in text and SECRET not in text and "reader:" not in text
    sources = {json.loads(i.dataset.source)["uri"] for i in run.inputs.dataset_inputs}
    assert sources == {"s3://***@bucket/shards/pets/train", "s3://***@bucket/shards/pets/val"}

    # A scoring run that reads and writes secret URIs: its params, its tags and the version's tag.
    with tracking.ScoringRun(experiment="secrets-scoring", params={"input": IMAGES, "output": DATA}) as scoring:
        scoring.start("models:/pets/1", input=IMAGES, output=DATA)
    scored = client.get_run(scoring.run_id)
    text = repr(scored.data.params) + repr(scored.data.tags) + repr(client.get_model_version("pets", "1").tags)
    assert "AKIAEXAMPLE" not in text and SECRET not in text and "reader:" not in text
    assert scored.data.tags["output"] == "s3://***@bucket/shards/pets" and scored.info.status == "FINISHED"
    out, err = capfd.readouterr()
    assert SECRET not in out + err


def cnnflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from workflows.cli import main; main()", *args], capture_output=True, text=True, cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}, timeout=120,
    )  # fmt: skip


def test_the_cli_error_line_shows_no_secret(tmp_path) -> None:
    # Refused before anything is read: OUTPUT inside INPUT, both on S3 with credentials.
    done = cnnflow("prep", DATA, f"{DATA}/out", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "s3://***@bucket/shards/pets" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    debug = cnnflow("--debug", "prep", DATA, f"{DATA}/out", cwd=tmp_path)
    assert "Traceback" in debug.stderr and SECRET not in debug.stdout + debug.stderr
