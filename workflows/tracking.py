"""The one module that talks to MLflow: runs, params, metrics, artifacts, models, registry.

Everything here names its run explicitly (`run_id`), so the driver, the rank-0 training
worker (another process, perhaps another node) and `cnnflow promote` log into the same
run without relying on MLflow's process-global "active run". The tracking URI is made
absolute once (a relative `sqlite:///mlflow.db` means the driver's working directory,
not a Ray worker's) and passed to workers as a string.

Every write passes through `data_prep.redact`: a URI's credentials (`s3://KEY:SECRET@...`
in an option, a manifest, an error) never reach a param, tag or artifact, and
`run_url`/`ui_hint` show the tracking URI without its own. The server's login comes from
MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (cluster.yaml sets them).

Several commands may share one store. A new SQLite store is created by one process at a
time (`_store_ready`), and every call through `client()` (and the fluent calls here) is
retried when SQLite answers "database is locked" (`retry_locked`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torch import nn

from cnn.inference import class_probabilities, test_time_augmentation
from data_prep.redact import redact_uri, redacted
from cnn.models import ModelSpec
from data_prep.lock import hold
from workflows.config import CHAMPION_ALIAS, tracking_uri
from workflows.errors import CnnflowError
from workflows.pyfunc_model import PREPROCESSING, WEIGHTS, normalizer, read_model_files

MODEL_NAME = "model"  # the logged model's name inside its run
RUN_ID = re.compile(r"[a-zA-Z0-9][\w-]{0,255}")  # MLflow's run id format
FAILURE_TAG = "failure_reason"
REGISTERED_TAG = "registered_version"  # on the run: "NAME/VERSION"
LOGGED_MODEL_TAG = "logged_model_uri"  # on the run: the model it logged (models:/m-...)
# MLflow's "models from code": the logged model stores this file, not a pickle, and
# loading it imports the installed cnnflow (see workflows/pyfunc_model.py for why).
MODEL_CODE = """\
import mlflow
from workflows.pyfunc_model import ImageClassifier

mlflow.models.set_model(ImageClassifier())
"""
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.float, "score"),
            ColSpec(Array(DataType.float), "probabilities"),
            ColSpec(DataType.string, "error"),
        ]
    ),
)


def resolved_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI or ./mlflow.db, with relative SQLite/file paths made absolute."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:  # a plain folder, MLflow's file store
        return os.path.abspath(uri)
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a tracking server that is down, is not MLflow, or refuses our login.

    MLflow's client retries an unreachable server for minutes before it gives up, a busy
    port (macOS's AirPlay on 5000 is the classic) answers with something that is not
    MLflow, and a server behind `--app-name basic-auth` answers a job without a login
    with 401 at its first logging call, as a traceback: each deserves one clear line.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    shown = redact_uri(uri)
    hint = "start it with `mlflow server --host 127.0.0.1 --port 5000`, or unset MLFLOW_TRACKING_URI to use ./mlflow.db"
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        raise CnnflowError(f"MLflow at {shown} is unreachable ({type(exc).__name__}); {hint}") from None
    if answer.status_code != 200 or answer.text.strip() != "OK":
        raise CnnflowError(
            f"{shown} answers, but not as an MLflow server (GET /health gave {answer.status_code}); "
            f"the port may be taken by another program: {hint}"
        )
    try:  # /health needs no login; this does, with the credentials MLflow's client sends
        client(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.get_http_status_code() not in (401, 403):
            raise
        refused = "refused the login" if exc.get_http_status_code() == 401 else "denies this user"
        raise CnnflowError(
            f"MLflow at {shown} {refused} (HTTP {exc.get_http_status_code()}): set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (README: Running on a cluster, The MLflow UI)"
        ) from None


def use_tracking() -> str:
    """Point MLflow's fluent API (this process) at the resolved URI and return it."""
    uri = resolved_tracking_uri()
    check_reachable(uri)
    _quiet_run_links()
    _store_ready(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _quiet_run_links() -> None:
    """MLflow prints "View run ... at: URL" as a run ends, the URL holding the tracking
    URI's credentials if it has any; cnnflow prints the run's link itself, redacted."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient for `uri` (default: the resolved one) whose calls are `retry_locked`."""
    uri = uri or resolved_tracking_uri()
    _store_ready(uri)
    return _Retrying(MlflowClient(tracking_uri=uri, registry_uri=uri))  # type: ignore[return-value]


# --- one store, several commands ---------------------------------------------------------

LOCKED_ATTEMPTS = 6  # ~0.1 + 0.2 + ... + 1.6 s of pauses (x1-2, jittered) before giving up


def store_lock(uri: str, purpose: str, *, on_busy: Callable[[dict | None], None]) -> AbstractContextManager[None]:
    """A lock beside a local SQLite store (`mlflow.db.cnnflow-PURPOSE.lock`), held for a block.

    Other stores get none (a context that does nothing): a tracking server's clients
    share no file system, and a server serialises its own database writes.
    `on_busy(holder)` runs when another process holds it; the block then waits its turn.
    """
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = uri[len("sqlite:///") :].split("?")[0]
    if not os.path.isdir(os.path.dirname(db) or "."):
        return nullcontext()  # MLflow will say that the folder is missing
    return hold(f"{db}.cnnflow-{purpose}.lock", on_busy=on_busy)


@functools.lru_cache(maxsize=None)
def _store_ready(uri: str) -> None:
    """Open the store once per process; a new SQLite store is created by one process at a time.

    MLflow creates a SQLite store's tables and runs its alembic migrations when a process
    first opens it. Three commands doing that at once on a new file failed half-way
    ("Online migration expected to match one row") and left it unusable. Under the lock
    the first creates the tables; the others then find them complete and skip that.
    """
    if not uri.startswith("sqlite:///"):
        return
    with store_lock(uri, "init", on_busy=lambda holder: None):
        raw = MlflowClient(tracking_uri=uri, registry_uri=uri)
        retry_locked(raw.search_experiments, max_results=1)  # opens the tracking store
        retry_locked(raw.search_registered_models, max_results=1)  # and the registry's


def retry_locked(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, again after a short pause while SQLite says "database is locked".

    MLflow lets SQLite wait 20 s for a lock, but SQLite answers "locked" at once when two
    transactions would deadlock (a reader turning writer while another writes). MLflow
    rolls a failed transaction back whole, so calling again is safe.
    """
    for attempt in range(LOCKED_ATTEMPTS):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if attempt == LOCKED_ATTEMPTS - 1 or not _database_locked(exc):
                raise
            time.sleep(0.1 * 2**attempt * (1 + random.random()))


def _database_locked(exc: BaseException | None) -> bool:
    """sqlite3's OperationalError, as such or wrapped by SQLAlchemy and then MLflow."""
    while exc is not None:
        if "database is locked" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _Retrying:
    """An MlflowClient whose every method goes through `retry_locked`."""

    def __init__(self, inner: MlflowClient):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        return functools.partial(retry_locked, attr) if callable(attr) else attr


def ui_hint(uri: str) -> str:
    """How to look at the runs: the server's URL, or the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return redact_uri(uri)
    return f"mlflow ui --backend-store-uri {uri}"


# --- runs ------------------------------------------------------------------------------


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


# --- models and the registry -----------------------------------------------------------


def log_model(
    run_id: str,
    *,
    state: dict[str, Any],
    preprocessing: dict[str, Any],
    example_image: bytes | None = None,
) -> str:
    """Log the pyfunc model into the (active) run; return its model URI for `register_model`."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError("log_model must run inside the run it logs to (training_run())")
    with tempfile.TemporaryDirectory() as tmp:
        weights, prep = Path(tmp, WEIGHTS), Path(tmp, PREPROCESSING)
        torch.save(state, weights)
        prep.write_text(json.dumps(preprocessing, indent=2))
        code = Path(tmp, "classifier.py")
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(code),
            artifacts={"weights": str(weights), "preprocessing": str(prep)},
            signature=SIGNATURE,
            input_example=None if example_image is None else pd.DataFrame({"image": [example_image]}),
            # Pinned here rather than inferred: inference loads the model in a subprocess.
            pip_requirements=_requirements(),
            metadata={"cnnflow_spec": state["spec"]},
        )
    set_tags(run_id, {LOGGED_MODEL_TAG: info.model_uri})
    return info.model_uri


def register_model(run_id: str, model_uri: str, *, register_as: str, version_tags: Mapping[str, Any]) -> ModelVersion:
    """A new version of `register_as` from a logged model; the run names the version."""
    # mlflow.register_model prints "Successfully registered model ..." to stderr itself;
    # cnnflow's own line says which version was registered.
    with contextlib.redirect_stderr(io.StringIO()):
        version = retry_locked(
            mlflow.register_model, model_uri, register_as, tags={k: redact_uri(str(v)) for k, v in version_tags.items()}
        )
    set_tags(run_id, {REGISTERED_TAG: f"{register_as}/{version.version}"})
    return version


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pyarrow")]


def registered_names() -> list[str]:
    return sorted(m.name for m in client().search_registered_models())


def _registered(name: str) -> Any:
    try:
        return client().get_registered_model(name)
    except MlflowException:
        names = registered_names()
        known = ", ".join(names) if names else "none yet (train one with `cnnflow train DATA`)"
        raise CnnflowError(f"no registered model {name!r}; registered models: {known}") from None


def versions(name: str) -> list[int]:
    return sorted(int(v.version) for v in client().search_model_versions(f"name = {literal(name)}"))


def get_version(name: str, version: int) -> ModelVersion:
    return client().get_model_version(name, str(version))


def champion(name: str) -> int | None:
    """The version holding the `champion` alias, or None."""
    aliases = _registered(name).aliases or {}
    return int(aliases[CHAMPION_ALIAS]) if CHAMPION_ALIAS in aliases else None


def set_champion(name: str, version: int) -> None:
    client().set_registered_model_alias(name, CHAMPION_ALIAS, str(version))


def tag_version(name: str, version: int, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, redact_uri(str(value)))


def resolve_model_uri(model: str | None) -> str:
    """None, NAME, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/... -> models:/NAME/VERSION.

    None means the champion of the only registered model; a bare NAME its champion.
    Anything that does not exist is a CnnflowError that lists what does.
    """
    if model is None:
        names = registered_names()
        if not names:
            raise CnnflowError(
                f"no registered models in {resolved_tracking_uri()}; train one with `cnnflow train DATA`"
            )
        if len(names) > 1:
            raise CnnflowError(f"several registered models ({', '.join(names)}); choose one with --model NAME")
        return _resolve_alias(names[0], CHAMPION_ALIAS)
    if model.startswith("runs:/"):
        return _resolve_run(model)
    if model.startswith("models:/"):
        rest = model[len("models:/") :].strip("/")
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            return _resolve_alias(name, alias)
        if "/" in rest:
            name, version = rest.rsplit("/", 1)
            return _resolve_version(name, version)
        model = rest
    if ":" in model or "/" in model:
        raise CnnflowError(
            f"cannot resolve model {model!r}: use NAME, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    return _resolve_alias(model, CHAMPION_ALIAS)


def _resolve_alias(name: str, alias: str) -> str:
    registered = _registered(name)
    aliases = registered.aliases or {}
    if alias not in aliases:
        have = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise CnnflowError(
            f"model {name!r} has no alias {alias!r} (aliases: {have}; versions: "
            f"{', '.join(map(str, versions(name))) or 'none'}); pass models:/{name}/VERSION "
            f"or run `cnnflow promote {name}`"
        )
    return f"models:/{name}/{int(aliases[alias])}"


def _resolve_version(name: str, version: str) -> str:
    _registered(name)
    known = versions(name)
    if version == "latest" and known:
        return f"models:/{name}/{known[-1]}"
    if not version.isdigit() or int(version) not in known:
        raise CnnflowError(
            f"model {name!r} has no version {version!r}; versions: {', '.join(map(str, known)) or 'none'}"
        )
    return f"models:/{name}/{int(version)}"


def _resolve_run(uri: str) -> str:
    run_id = uri[len("runs:/") :].split("/")[0]
    if not RUN_ID.fullmatch(run_id):  # before it goes into a filter, and with a clearer error than MLflow's
        raise CnnflowError(f"{uri!r} does not name a run: expected runs:/RUN_ID/model, RUN_ID of letters, digits, '_' and '-'")
    found = client().search_model_versions(f"run_id = {literal(run_id)}")
    if not found:
        raise CnnflowError(f"no registered model version comes from run {run_id}; predict needs a registered model")
    mv = max(found, key=lambda v: int(v.version))
    return f"models:/{mv.name}/{int(mv.version)}"


def parse_model_uri(uri: str) -> tuple[str, int]:
    """models:/NAME/VERSION -> (NAME, VERSION)."""
    name, version = uri[len("models:/") :].rsplit("/", 1)
    return name, int(version)


@dataclass
class Classifier:
    """A registered model version, rebuilt from its weights for plain PyTorch inference."""

    model: nn.Module  # eval mode, CPU
    spec: ModelSpec
    preprocessing: dict[str, Any]  # classes, image_size, resize, mean, std
    uri: str  # models:/NAME/VERSION
    name: str
    version: int

    @property
    def classes(self) -> list[str]:
        return list(self.preprocessing["classes"])

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on the model's device -> (N, classes) probabilities."""
        return class_probabilities(
            self.model, normalizer(self.preprocessing).to(pixels.device), pixels, tta=test_time_augmentation(self.preprocessing)
        )


def load_classifier(model_uri: str) -> Classifier:
    """Any URI `resolve_model_uri` accepts -> the model, spec and preprocessing, on CPU."""
    uri = resolve_model_uri(model_uri)
    name, version = parse_model_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=resolved_tracking_uri())
        files = mlflow.models.Model.load(local).flavors["python_function"]["artifacts"]
        model, spec, preprocessing = read_model_files(
            Path(local, files["weights"]["path"]), Path(local, files["preprocessing"]["path"])
        )
    return Classifier(model, spec, preprocessing, uri, name, version)


# --- parent and child runs (`cnnflow tune`: one parent, one child per trial) ------------

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI nests a child under the parent
CHILD_KEY_TAG = "child_key"  # on a child: what names it within its parent (a Tune trial id)
MAX_CHILDREN = 1000  # children read back per parent (one page of search_runs)
MAX_RESULTS = 50_000  # the most one search_runs call may ask for (MLflow refuses more)


def use_tracking_uri(uri: str) -> None:
    """Point this process at the tracking URI the driver resolved.

    For a process Ray starts (a Tune trial): its environment is the Ray node's and its
    working directory a trial folder, so neither MLFLOW_TRACKING_URI nor a relative
    ./mlflow.db would reach the driver's store. `client()` and the fluent API then agree.
    """
    os.environ["MLFLOW_TRACKING_URI"] = uri
    _quiet_run_links()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


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


# --- listing -----------------------------------------------------------------------------


def list_runs(experiment: str, max_runs: int) -> list[dict[str, Any]]:
    """The experiment's latest runs as plain rows, with each registered version's champion mark.

    `max_runs` counts top-level runs; each parent's children (a tune's trials) follow it
    as rows whose `parent` is the parent's run id, oldest first.
    """
    c = client()
    found = c.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in c.search_experiments())
        raise CnnflowError(f"no experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    runs = c.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` IS NULL",
        max_results=max_runs,
        order_by=["attributes.start_time DESC"],
    )
    children: dict[str, list[Any]] = {}
    if runs:
        # A child starts after its parent: one query covers the children of every run shown.
        oldest = min(r.info.start_time for r in runs)
        for child in c.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` IS NOT NULL and attributes.start_time >= {oldest}",
            max_results=min(MAX_RESULTS, MAX_CHILDREN * max(1, len(runs))),
            order_by=["attributes.start_time ASC"],
        ):
            children.setdefault(child.data.tags[PARENT_TAG], []).append(child)
    champions: dict[str, int | None] = {}

    def row(r: Any, parent: str | None) -> dict[str, Any]:
        registered = r.data.tags.get(REGISTERED_TAG)
        is_champion = False
        if registered:
            name, version = registered.rsplit("/", 1)
            if name not in champions:
                try:
                    champions[name] = champion(name)
                except CnnflowError:  # the registered model was deleted since
                    champions[name] = None
            is_champion = champions[name] == int(version)
        end = r.info.end_time or int(time.time() * 1000)
        return {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "start_time": r.info.start_time / 1000,
            "duration_s": (end - r.info.start_time) / 1000,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
            "registered": registered,
            "champion": is_champion,
            "parent": parent,
        }

    rows = []
    for r in runs:
        rows.append(row(r, None))
        rows.extend(row(child, r.info.run_id) for child in children.get(r.info.run_id, []))
    return rows
