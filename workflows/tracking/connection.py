"""Where the MLflow store is and how to reach it: the tracking URI, the client, one store shared.

The tracking URI is made absolute once (a relative `sqlite:///mlflow.db` means the
driver's working directory, not a Ray worker's) and passed to workers as a string;
`ui_hint` shows it without its credentials. The server's login comes from MLflow's
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (cluster.yaml sets them).

Several commands may share one store. A new SQLite store is created by one process at a
time (`_store_ready`), and every call through `client()` (and the fluent calls in this
package) is retried when SQLite answers "database is locked" (`retry_locked`).
"""
from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_prep.lock import hold
from data_prep.redact import redact_uri
from workflows.config import tracking_uri
from workflows.errors import CnnflowError


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
