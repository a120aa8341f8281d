"""Fixtures shared by the whole suite: a real local Ray, a real MLflow, real image files.

Nothing is mocked. Ray starts once per session with 2 CPUs (the size of the machines CI
runs on); MLflow uses a SQLite file in a temporary folder per test.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

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
