"""Fixtures shared by the whole suite: a real local Ray, a real MLflow, real image files.

Nothing is mocked. Ray starts once per session with 2 CPUs (the size of the machines CI
runs on); MLflow uses a SQLite file in a temporary folder per test. One real flow (image
folder -> `cnnflow prep` -> `cnnflow train --promote`) runs once per session in its own
MLflow store (`trained_flow`): the tests of training, prediction and promotion read it
rather than each paying for a Ray Train run of its own.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.images import ImageSpec, make_image_folder

# Keep Ray quiet and small: no dashboard, no usage stats, no log spam to the driver.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def start_local_ray() -> None:
    """The suite's local Ray: 2 CPUs, quiet. Its workers inherit this process's environment."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """One local Ray with 2 CPUs for the session; stages reuse it (`ray.is_initialized()`)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking + registry store; MLFLOW_TRACKING_URI points at it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


ImageFolderFactory = Callable[..., tuple[Path, list[ImageSpec]]]


@pytest.fixture
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderFactory:
    """Make a tiny labelled folder: `root, specs = image_folder(per_class=10, ...)`.

    Keyword arguments go to `tests.images.make_image_folder` (classes, per_class, size,
    variants, seed, layout). Each spec's label is the class its pixels show.
    """

    def make(**kwargs: object) -> tuple[Path, list[ImageSpec]]:
        root = tmp_path_factory.mktemp("images")
        return root, make_image_folder(root, **kwargs)

    return make


# --- one trained model for the session ----------------------------------------------------

FLOW_CLASSES = ("horizontal", "vertical", "checker")
FLOW_NAME = "stripes"  # registered as, and its champion


@dataclass(frozen=True)
class TrainedFlow:
    tracking_uri: str  # the flow's own MLflow store (SQLite)
    prepared: Path  # the `cnnflow prep` output it was trained on
    uri: str  # models:/stripes/1, the champion
    run_id: str  # its training run
    config: Any  # the TrainConfig it ran with

    def weights(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The registered weights (cnn.models state) and preprocessing contract, read back."""
        import json

        import mlflow
        import torch

        from workflows.tracking.pyfunc_model import PREPROCESSING, WEIGHTS

        # Read through the flow's own store, whatever store the test points MLflow at.
        tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=self.uri))
        finally:
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(registry)
        [weights] = local.rglob(WEIGHTS)
        [preprocessing] = local.rglob(PREPROCESSING)
        return torch.load(weights, weights_only=True), json.loads(preprocessing.read_text())


@pytest.fixture(scope="session")
def trained_flow(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedFlow]:
    """The real flow, once per session: stripe images -> cnnflow prep -> cnnflow train --promote."""
    import mlflow

    from workflows import prep
    from workflows.train import driver as train
    from workflows.config import PrepConfig, TrainConfig

    work = tmp_path_factory.mktemp("flow")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    make_image_folder(work / "train_images", classes=FLOW_CLASSES, per_class=48, size=(40, 56), seed=0)
    config = TrainConfig(
        data=str(work / "prepared"), model="simple", width=8, depth=2, epochs=6, batch_size=16, lr=0.01,
        hflip=False, register_as=FLOW_NAME, promote=True, storage=str(work / "checkpoints"), experiment="flow",
        run_name="first",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            assert prep.run(PrepConfig(input=str(work / "train_images"), output=config.data, image_size=32)) == 0
            assert train.run(config) == 0
            [run] = mlflow.search_runs(experiment_names=["flow"], output_format="list")
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    yield TrainedFlow(uri, work / "prepared", f"models:/{FLOW_NAME}/1", run.info.run_id, config)


@pytest.fixture
def flow_store(trained_flow: TrainedFlow, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrainedFlow]:
    """MLflow pointed at the session's trained flow for one test (read it; add only new versions)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_flow.tracking_uri)
    mlflow.set_tracking_uri(trained_flow.tracking_uri)
    mlflow.set_registry_uri(trained_flow.tracking_uri)
    yield trained_flow
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
