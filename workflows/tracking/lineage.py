"""Lineage in MLflow's own terms: the data a training run read, the bulk jobs that used a version.

    shards --dataset input--> training run --logged model--> registered version --tag--> scoring runs --> rows

Training (`log_dataset_inputs`): each split's shards are an MLflow dataset input of the
run, an `mlflow.data` MetaDataset (metadata only: the shards stay where they are) named
`<data folder>/<split>`, its source the split's folder (credentials redacted), its
context the split, its digest the manifest's `content_hash` (cut to MLflow's 36
characters; the whole hash is the input's `content_hash` tag). MLflow keys a dataset by
(name, digest) within an experiment and keeps one input per dataset and run, so train
and val, which share the hash, are told apart by their names.

Scoring (`ScoringRun`): each `cnnflow predict` is a run of its own in its experiment
(default `cnnflow-scoring`), tagged with the version it used (`model_name`,
`model_version`, `model_uri`, `training_run`) and where it read and wrote; its metrics
say how many rows, errors and images/s. The version carries one tag per scoring run,
`scoring_run.<run id>` = OUTPUT, so a version lists every bulk job that used it, and `mlflow.search_runs(experiment_names=["cnnflow-scoring"],
filter_string="tags.model_name = 'NAME' and tags.model_version = 'N'")` finds the same
runs with their metrics. Each output row names its scoring run (its `scoring_run` column).

Explicit run ids throughout (the client API), except `log_dataset_inputs`, which logs into
the training run that `training_run`/`child_run` made active, as `log_model` does.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException

from data_prep.redact import redact_uri, redacted
from data_prep.schema import join
from workflows.tracking.connection import client, retry_locked, use_tracking
from workflows.tracking.registry import parse_model_uri
from workflows.tracking.runs import FAILURE_TAG, ensure_experiment, log_metrics, set_tags

DIGEST_CHARS = 36  # the most MLflow stores as a dataset's digest (a 36-character SQL column)
CONTENT_HASH_TAG = "content_hash"  # on each dataset input: the manifest's whole hash
ROWS_TAG = "num_rows"  # on each dataset input: the split's rows, from the manifest
SCORING_TAG_PREFIX = "scoring_run."  # on a model version: scoring_run.<run id> = OUTPUT
MODEL_NAME_TAG, MODEL_VERSION_TAG = "model_name", "model_version"  # on a scoring run
TRAINING_RUN_TAG = "training_run"  # on a scoring run: the run that logged the version


# --- training: the shards as dataset inputs ----------------------------------------------


def log_dataset_inputs(run_id: str, *, data: str, manifest: Mapping[str, Any], splits: Iterable[str]) -> None:
    """Log each split's shards as a dataset input of the (active) training run `run_id`.

    Logging them again into the same run (a resumed trial) adds nothing: MLflow finds
    the dataset and the input it already has.
    """
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError("log_dataset_inputs must run inside the run it logs to (training_run())")
    folder = PurePosixPath(data.rstrip("/")).name
    content_hash = str(manifest.get("content_hash") or "")
    rows = manifest.get("num_rows", {})
    datasets, contexts, tags = [], [], []
    for split in splits:
        datasets.append(
            MetaDataset(
                source=_source(redact_uri(join(data, split))),
                name=f"{folder}/{split}",
                digest=content_hash[:DIGEST_CHARS] or None,  # None: MLflow's digest of name and source
            )
        )
        contexts.append(split)
        tags.append({CONTENT_HASH_TAG: content_hash, ROWS_TAG: str(rows.get(split, ""))})
    retry_locked(mlflow.log_inputs, datasets=datasets, contexts=contexts, tags_list=tags)


def _source(uri: str) -> DatasetSource:
    """MLflow's own source for a path or URI (local, s3, gs, hdfs), else a plain URI source."""
    with warnings.catch_warnings():
        # MLflow registers its local source twice (schemes "" and "file") and warns, for
        # every local path, that both match; it then takes the first, which is right.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return resolve_dataset_source(uri)
        except MlflowException:  # a scheme pyarrow reads and MLflow has no source for (abfs://)
            return UriSource(uri)


class UriSource(DatasetSource):
    """Where a dataset lies, as a URI MLflow has no source type for; shown, never loaded."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "uri"

    def load(self) -> Any:
        raise NotImplementedError(f"cnnflow reads {self.uri} with pyarrow, not through MLflow")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> UriSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> UriSource:
        return cls(source_dict["uri"])


# --- scoring: each bulk job a run, linked to its version ---------------------------------


class ScoringRun:
    """One `cnnflow predict` job as an MLflow run: `with ScoringRun(...) as s: ... s.start(...)`.

    The run is created by `start`, once the model version is resolved (a job that fails
    before then used no version and leaves no run). On leaving the block a started run
    ends FINISHED; FAILED (or KILLED on Ctrl+C) with the reason as its `failure_reason`
    tag when an exception leaves it or `fail` was called.
    """

    def __init__(self, *, experiment: str, params: Mapping[str, Any]):
        self.experiment = experiment
        self.params = params
        self.run_id: str | None = None
        self.failure: str | None = None

    def __enter__(self) -> ScoringRun:
        return self

    def start(self, model_uri: str, *, input: str, output: str) -> str:
        """Create the run, tagged with `model_uri`'s version, and tag the version with it."""
        use_tracking()
        c = client()
        name, version = parse_model_uri(model_uri)
        training_run = c.get_model_version(name, str(version)).run_id or ""
        run = c.create_run(
            ensure_experiment(self.experiment),
            tags=redacted(
                {
                    MODEL_NAME_TAG: name,
                    MODEL_VERSION_TAG: str(version),
                    "model_uri": model_uri,
                    TRAINING_RUN_TAG: training_run,
                    "input": input,
                    "output": output,
                }
            ),
        )
        self.run_id = run.info.run_id
        params = redacted({**self.params, "model_uri": model_uri})
        c.log_batch(self.run_id, params=[Param(k, "" if v is None else str(v)) for k, v in params.items()])
        # On the version too, from the start: a job that fails half-way is listed with its status.
        c.set_model_version_tag(name, str(version), f"{SCORING_TAG_PREFIX}{self.run_id}", redact_uri(output))
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float | None]) -> None:
        log_metrics(self._id(), {k: v for k, v in metrics.items() if v is not None})

    def log_dict(self, payload: Mapping[str, Any], artifact_file: str) -> None:
        client().log_dict(self._id(), redacted(dict(payload)), artifact_file)

    def fail(self, reason: str) -> None:
        """End the run FAILED with `reason` though no exception is raised (a job that returns 1)."""
        self.failure = reason

    def _id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("the scoring run is not started")
        return self.run_id

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.run_id is None:
            return
        if exc is not None:
            self.failure = f"{type(exc).__name__}: {exc}"
        if self.failure is None:
            status = RunStatus.FINISHED
        else:
            set_tags(self.run_id, {FAILURE_TAG: self.failure[:4000]})
            status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        client().set_terminated(self.run_id, RunStatus.to_string(status))

