"""cnnflow on object storage: prep, train, MLflow artifacts and predict against a real S3 API.

A moto server (`python -m moto.server`, its own process) on 127.0.0.1 is the endpoint.
Nothing is told about it but the standard AWS variables, as a user would point cnnflow
at MinIO or AWS: pyarrow in the driver and in Ray's workers (prep's tasks, Ray Data's
readers, Ray Train's checkpoint upload) and the boto3 inside a real `mlflow server`
(`--artifacts-destination s3://...`) are the clients. The bucket's contents are then
read back with boto3, and the predictions checked against the class the pixels show.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster_helpers import BIN, REPO, _http_ok, _port_open, free_port
from tests.conftest import start_local_ray
from tests.images import make_image_folder
from tests.test_first_minutes import assert_short_error
from workflows.config import PredictConfig, PrepConfig, TrainConfig

BUCKET = "cnnflow-test"
CLASSES = ("horizontal", "vertical")
NAME = "s3stripes"


@dataclass(frozen=True)
class Bucket:
    client: object  # boto3's S3 client, on the moto endpoint
    mlflow: subprocess.Popen  # `mlflow server`, its artifacts in the bucket
    mlflow_uri: str
    mlflow_log: Path

    def wait_for_mlflow(self) -> None:
        """The server boots (tens of seconds on 2 busy cores) while the test uploads and preps."""
        _wait(lambda: _http_ok(f"{self.mlflow_uri}/health"), self.mlflow, self.mlflow_log, "mlflow server")

    def keys(self, prefix: str) -> list[str]:
        """Every object under `prefix`, relative to it (the folder markers pyarrow writes too)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def upload(self, folder: Path, prefix: str) -> None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:  # a session of its own: stopped by its process group id
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group: a test server has nothing to save, and a graceful stop cost seconds."""
    if proc.poll() is None:  # not reaped yet, so the group id is still ours
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    """A moto S3 server, an `mlflow server` whose artifacts go to it, and a Ray that sees it."""
    import boto3
    import mlflow
    import ray

    work = tmp_path_factory.mktemp("s3")
    s3_port, mlflow_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    had_ray = ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        try:
            for key, value in {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }.items():
                mp.setenv(key, value)
            procs.append(_spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], work / "moto.log"))
            _wait(lambda: _port_open(s3_port), procs[-1], work / "moto.log", "moto server")
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            procs.append(_spawn([
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{BUCKET}/mlflow",
            ], work / "mlflow.log"))  # fmt: skip
            mp.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}")
            # Ray's workers inherit the environment of the process that starts Ray: a Ray
            # started before the variables were set (by an earlier test) is started again.
            if had_ray:
                ray.shutdown()
            start_local_ray()
            yield Bucket(client, procs[-1], f"http://127.0.0.1:{mlflow_port}", work / "mlflow.log")
        finally:
            for proc in reversed(procs):
                _stop(proc)
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    ray.shutdown()  # its workers hold the variables of a server that is gone
    if had_ray:
        start_local_ray()


def read_predictions(bucket: Bucket, prefix: str) -> list[dict]:
    rows = []
    for key in bucket.keys(prefix):
        if key.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(bucket.get(f"{prefix}/{key}"))).to_pylist()
    return rows


@pytest.mark.slow
def test_prep_train_predict_round_trip_on_s3(bucket: Bucket, tmp_path: Path):
    from workflows import prep
    from workflows.predict import driver as predict
    from workflows.train import driver as train

    s3 = f"s3://{BUCKET}"
    make_image_folder(tmp_path / "images", classes=CLASSES, per_class=24, size=32, seed=0)
    bucket.upload(tmp_path / "images", "images")
    unlabelled = make_image_folder(tmp_path / "unlabelled", classes=CLASSES, per_class=6, size=32, seed=1, layout="unlabeled")
    bucket.upload(tmp_path / "unlabelled", "unlabelled")
    truth = {s.path.relative_to(tmp_path / "unlabelled").as_posix(): CLASSES[s.label] for s in unlabelled}

    # prep: listed, decoded and written by Ray tasks straight from and to the bucket
    assert prep.run(PrepConfig(input=f"{s3}/images", output=f"{s3}/shards", image_size=16)) == 0
    shards = bucket.keys("shards")
    assert {".cnnflow-output.json", "manifest.json", "report.json", "quarantine.csv"} <= set(shards)
    assert any(k.startswith("train/part-") for k in shards) and any(k.startswith("val/part-") for k in shards)
    assert not [k for k in shards if ".tmp" in k]  # nothing written aside and left behind
    manifest = json.loads(bucket.get("shards/manifest.json"))
    assert manifest["classes"] == sorted(CLASSES) and sum(manifest["num_rows"].values()) == 48

    # train: checkpoints to s3://.../ray through Ray Train, artifacts to s3://.../mlflow through the server
    bucket.wait_for_mlflow()
    config = TrainConfig(
        data=f"{s3}/shards", model="simple", width=8, depth=2, epochs=2, batch_size=8, lr=0.01, hflip=False,
        storage=f"{s3}/ray", register_as=NAME, experiment="s3",
    )  # fmt: skip
    assert train.run(config) == 0
    checkpoints = bucket.keys("ray")
    assert any(k.endswith("/checkpoint.pt") for k in checkpoints), checkpoints
    artifacts = bucket.keys("mlflow")
    assert any(k.endswith("/weights.pt") for k in artifacts) and any(k.endswith("/preprocessing.json") for k in artifacts), artifacts

    # predict, twice: the second run finds every file scored and scores nothing again
    options = dict(input=f"{s3}/unlabelled", output=f"{s3}/preds", model=f"models:/{NAME}/1")
    assert predict.run(PredictConfig(**options)) == 0
    first = bucket.keys("preds")
    assert "summary.json" in first and not [k for k in first if k.endswith(".tmp")]
    rows = read_predictions(bucket, "preds")
    assert sorted(r["path"] for r in rows) == sorted(truth)  # every file, once
    assert all(r["error"] is None for r in rows)
    right = sum(r["label"] == truth[r["path"]] for r in rows)
    assert right >= 0.9 * len(rows), f"{right} of {len(rows)} right"

    assert predict.run(PredictConfig(**options)) == 0
    summary = json.loads(bucket.get("preds/summary.json"))
    assert summary["this_run"]["rows"] == 0 and summary["this_run"]["already_scored"] == len(truth)
    assert summary["rows"] == len(truth)
    assert [k for k in bucket.keys("preds") if k != ".cnnflow-output.json"] == [k for k in first if k != ".cnnflow-output.json"]
    assert sorted(r["path"] for r in read_predictions(bucket, "preds")) == sorted(truth)


def test_an_unreachable_endpoint_is_one_line_before_anything_starts(tmp_path: Path):
    """A wrong AWS_ENDPOINT_URL is found by the first look at OUTPUT, before Ray starts."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "workflows.prep", f"s3://{BUCKET}/images", f"s3://{BUCKET}/shards"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_short_error(result, "AWS Error", endpoint)
