"""MLflow runs: created before any worker starts, ended with their status, logged into, read back.

Everything here names its run explicitly (`run_id`), so the driver, the rank-0 training
worker (another process, perhaps another node) and `cnnflow promote` log into the same
run without relying on MLflow's process-global "active run"; a run is also made active
only where MLflow needs it (`log_model` attaches the model to the active run). Every
param, tag and artifact passes through `data_prep.redact` on its way in. `cnnflow tune`
has one parent run and a child run per trial.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from data_prep.redact import redact_uri, redacted
from workflows.errors import CnnflowError
from workflows.tracking.connection import client, resolved_tracking_uri, retry_locked, use_tracking

FAILURE_TAG = "failure_reason"


@contextmanager
def training_run(*, experiment: str, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[str]:
    """Create the run before any worker starts; end it FINISHED, or FAILED with the reason.

    The run is this process's active run too, so `log_model` can attach the model to it.
    """
    use_tracking()
    # Not mlflow.set_experiment: when another command creates the experiment at the same
    # moment, it returns without making it active, and the run would land in "Default".
    experiment_id = ensure_experiment(experiment)
    run = retry_locked(mlflow.start_run, experiment_id=experiment_id, run_name=_name(run_name), tags=redacted(dict(tags)))
    run_id = run.info.run_id
    with _ends_with_status(run_id):
        _log_params(params)
        yield run_id


def ensure_experiment(name: str, *, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it (with its artifacts where asked) if it is new."""
    c = client()
    existing = c.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:  # another command created it since we looked
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return c.get_experiment_by_name(name).experiment_id


def literal(value: str) -> str:
    """`value` as a string in an MLflow search filter.

    MLflow's filter syntax has no escape character: it takes what lies between the outer
    quotes verbatim. So a value with a single quote goes in double quotes, and one with
    both kinds cannot be expressed at all (cnnflow's own names never hold a quote:
    workflows/config.py refuses them).
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise CnnflowError(f"{value!r} holds both kinds of quote; MLflow's search syntax cannot match it")


def finished_run_id(experiment: str, run_name: str) -> str | None:
    """The latest FINISHED run of that name in the experiment, if any."""
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client().search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = {literal(_name(run_name))} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_url(run_id: str, uri: str | None = None) -> str:
    """The run's page when the store is a server; otherwise the run id is what to look for."""
    uri = uri or resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        run = client(uri).get_run(run_id)
        return redact_uri(f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    return run_id


def log_epoch(uri: str, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """One value per metric at step=epoch (called by rank 0 only)."""
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def logged_epochs(uri: str, run_id: str, key: str) -> set[int]:
    """The steps already logged for `key`: what a resumed worker must not log again."""
    return {m.step for m in client(uri).get_metric_history(run_id, key)}


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def log_dict(run_id: str, payload: Mapping[str, Any], artifact_file: str) -> None:
    client().log_dict(run_id, redacted(dict(payload)), artifact_file)


def read_dict(run_id: str, artifact_file: str) -> dict[str, Any]:
    """A JSON artifact that `log_dict` wrote, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client().download_artifacts(run_id, artifact_file, tmp)
        return json.loads(Path(local).read_text())


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, redact_uri(text), artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def set_tags(run_id: str, tags: Mapping[str, Any], *, uri: str | None = None) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, redact_uri(str(value)))


# --- parent and child runs (`cnnflow tune`: one parent, one child per trial) ------------

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI nests a child under the parent
CHILD_KEY_TAG = "child_key"  # on a child: what names it within its parent (a Tune trial id)
MAX_CHILDREN = 1000  # children read back per parent (one page of search_runs)


@contextmanager
def _ends_with_status(run_id: str) -> Iterator[None]:
    """End the active run `run_id` FINISHED, or FAILED / KILLED with the reason as a tag."""
    try:
        yield
    except BaseException as exc:
        status = RunStatus.to_string(RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED)
        client().set_tag(run_id, FAILURE_TAG, redact_uri(f"{type(exc).__name__}: {exc}")[:4000])
        retry_locked(mlflow.end_run, status)
        raise
    else:
        retry_locked(mlflow.end_run, RunStatus.to_string(RunStatus.FINISHED))


def _clear_failure(run_id: str) -> None:
    """A reopened run is no longer failed: drop the reason its last end recorded."""
    c = client()
    if FAILURE_TAG in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, FAILURE_TAG)


def _log_params(params: Mapping[str, Any]) -> None:
    retry_locked(mlflow.log_params, {k: "" if v is None else v for k, v in redacted(dict(params)).items()})


def _name(run_name: str | None) -> str | None:
    return None if run_name is None else redact_uri(run_name)


@contextmanager
def parent_run(
    *, experiment: str, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None
) -> Iterator[str]:
    """A run that groups child runs, ended like `training_run` (FINISHED, FAILED or KILLED).

    With `run_id` the run is reopened (RUNNING again, its params kept, `tags` added)
    instead of created: a resumed search goes on under the parent it started with.
    """
    use_tracking()
    experiment_id = ensure_experiment(experiment)  # not mlflow.set_experiment: see training_run
    if run_id is None:
        run_id = retry_locked(mlflow.start_run, experiment_id=experiment_id, run_name=_name(run_name), tags=redacted(dict(tags))).info.run_id
        _log_params(params)
    else:
        retry_locked(mlflow.start_run, run_id=run_id, tags=redacted(dict(tags)))
        _clear_failure(run_id)
    with _ends_with_status(run_id):
        yield run_id


@contextmanager
def child_run(
    *, parent_run_id: str, key: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Iterator[str]:
    """The child of `parent_run_id` that `key` names, as this process's (this thread's) active run.

    Created in the parent's experiment, or reopened when one with that key exists (a
    resumed search runs an unfinished trial again). Active, so that `log_model` can log
    into it; ended FINISHED, or FAILED / KILLED with the reason.
    """
    use_tracking()
    existing = child_run_ids(parent_run_id).get(key)
    if existing:
        retry_locked(mlflow.start_run, run_id=existing)
        run_id = existing
        _clear_failure(run_id)
    else:
        experiment_id = client().get_run(parent_run_id).info.experiment_id
        run = retry_locked(
            mlflow.start_run,
            experiment_id=experiment_id,
            run_name=_name(run_name),
            parent_run_id=parent_run_id,
            tags=redacted({**tags, CHILD_KEY_TAG: key}),
        )
        run_id = run.info.run_id
        _log_params(params)
    with _ends_with_status(run_id):
        yield run_id


def _children(parent_run_id: str) -> list[Any]:
    c = client()
    experiment_id = c.get_run(parent_run_id).info.experiment_id
    return c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = {literal(parent_run_id)}",
        order_by=["attributes.start_time ASC"],
        max_results=MAX_CHILDREN,
    )


def child_run_ids(parent_run_id: str, *, status: str | None = None) -> dict[str, str]:
    """key -> run id of the parent's children (only those in `status`, e.g. RUNNING, if given)."""
    return {
        r.data.tags[CHILD_KEY_TAG]: r.info.run_id
        for r in _children(parent_run_id)
        if CHILD_KEY_TAG in r.data.tags and (status is None or r.info.status == status)
    }


def end_if_running(run_id: str, tags: Mapping[str, Any], *, status: str = "FINISHED") -> bool:
    """End a run that its own process can no longer end (it was stopped from outside):
    tag it and give it `status`, if it is still RUNNING. True when it was."""
    c = client()
    if c.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
        return False
    set_tags(run_id, tags)
    c.set_terminated(run_id, status)
    return True


def log_metrics(run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def latest_run(experiment: str, tags: Mapping[str, str], *, unfinished: bool = False) -> dict[str, Any] | None:
    """The newest run of the experiment with all of `tags` (not FINISHED, if `unfinished`):
    {run_id, status, tags}, or None."""
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    conditions = [f"tags.`{k}` = {literal(v)}" for k, v in redacted(dict(tags)).items()]  # stored redacted; keys are cnnflow's constants
    if unfinished:
        conditions.append("attributes.status != 'FINISHED'")
    found = client().search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        return None
    r = found[0]
    return {"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)}
