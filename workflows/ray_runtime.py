"""Connecting to Ray, in one place for every stage.

`ray_session(options)` joins the Ray a stage should use, in Ray's own order: a Ray that
is already initialised in this process (a test, a notebook), `--address`, `RAY_ADDRESS`
(set by `ray job submit`), the cluster of the last `ray start` on this machine, else a
new local Ray sized by `--num-cpus`. It shuts down only a Ray it started itself. The S3
settings of the driver's environment (`S3_ENV`) go to every worker of the job.
"""
from __future__ import annotations

import logging
import os
import socket
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workflows.config import RayOptions
from workflows.errors import CnnflowError


@contextmanager
def ray_session(options: RayOptions, *, dashboard: bool = True, ray_data: bool = True) -> Iterator[None]:
    """`dashboard=False`: a local Ray without the dashboard and its 11 processes (~250 MB;
    it starts ~2 s sooner). For a Ray it joins, the cluster decides. Prep, predict and
    train use it; tune keeps the dashboard (see workflows/train/driver.py: run).
    `ray_data=False` for a job that does not use Ray Data (prep): importing it costs the
    driver ~0.4 s."""
    import ray

    if ray.is_initialized():
        if ray_data:
            configure_ray_data(verbose=options.verbose)
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_listening(address)
    with contextlib.ExitStack() as stack:
        if not options.verbose:
            stack.enter_context(native_stderr_to(ray_log_file()))
        yield from _connected(ray, options, address, dashboard=dashboard, ray_data=ray_data)


def _connected(ray: Any, options: RayOptions, address: str | None, *, dashboard: bool, ray_data: bool) -> Iterator[None]:
    init = dict(
        address=address,
        num_cpus=None if address else options.num_cpus,
        include_dashboard=None if address or dashboard else False,
        # The terminal is the user's: the stages print their own progress (train's epoch
        # lines come from the driver, read back from MLflow), so workers' output and
        # Ray's driver warnings (e.g. the token-authentication notice) stay in Ray's
        # log folder (/tmp/ray/session_latest/logs) unless --verbose asks for them.
        logging_level=logging.WARNING if options.verbose else logging.ERROR,
        logging_config=ray.LoggingConfig(log_level="WARNING" if options.verbose else "ERROR"),
        log_to_driver=options.verbose,
    )
    forwarded = s3_env()
    try:
        try:
            ray.init(**init, runtime_env={"env_vars": forwarded} if forwarded else None)
        except ValueError as exc:
            # Inside `ray job submit`, Ray refuses a variable that the job's own runtime env
            # sets too; that one already reaches every worker, so the job's env stands.
            if not forwarded or "runtime env" not in str(exc):
                raise
            ray.init(**init)
    except ConnectionError as exc:
        where = address or "the address of the last `ray start` on this machine"
        raise CnnflowError(
            f"cannot connect to Ray at {where}: {exc}. Check `ray status`, or unset RAY_ADDRESS "
            "(and run `ray stop` if a stale local cluster is left) to use a new local Ray."
        ) from None
    try:
        if ray_data:
            configure_ray_data(verbose=options.verbose)
        yield
    finally:
        ray.shutdown()


def ray_log_file() -> Path:
    """Where the lines Ray's C++ core writes to the terminal go instead (see --verbose)."""
    folder = Path(tempfile.gettempdir()) / "cnnflow-logs"
    folder.mkdir(exist_ok=True)
    return folder / f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 to `path` while Python's `sys.stderr` keeps the terminal.

    Ray's C++ core logs straight to fd 2, past Python's logging and `log_to_driver`
    (e.g. core_worker.cc's notice about every actor whose constructor arguments sit in
    the object store, which Ray Data's actor pools always trigger); so do the processes
    a new local Ray starts, which inherit fd 2. Python's own writes (cnnflow's errors,
    tracebacks with --debug, warnings) still reach the terminal.
    """
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    python_stderr = sys.stderr
    sys.stderr = open(terminal_fd, "w", buffering=1, encoding=python_stderr.encoding,
                      errors=python_stderr.errors, closefd=False)  # fmt: skip
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
        if path.stat().st_size == 0:  # ours, and nothing in it
            path.unlink()


# What points pyarrow's and boto3's S3 clients at an endpoint, with credentials (README,
# "Object storage"). A local Ray's workers inherit them; a cluster's workers run in the
# environment of their own node, so the job carries them there.
S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def s3_env() -> dict[str, str]:
    """This process's S3 settings, for every worker of the Ray job (its runtime env)."""
    return {name: os.environ[name] for name in S3_ENV if os.environ.get(name)}


def check_listening(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP probe of a host:port address: Ray itself retries a dead one for minutes."""
    if "://" in address or ":" not in address:  # ray://, http://, "auto", "local": Ray's to resolve
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise CnnflowError(
            f"cannot connect to Ray at {address} ({exc}); is the cluster up (`ray status`)? "
            "Unset RAY_ADDRESS and leave out --address to use a new local Ray."
        ) from None


def configure_ray_data(*, verbose: bool = False) -> None:
    """Ray Data settings that measured better for cnnflow's pipelines.

    The default resource reservation holds CPUs back per operator; on a small machine it
    left one of two cores idle while decode tasks queued, so it is off by default. It is
    also what enforces a dataset's object-store cap, so predict turns it back on for its
    own dataset (workflows/predict/pipeline.py).

    Progress bars and per-execution log lines are Ray Data's; the stages print their own
    progress, so Ray Data's terminal output is cut to errors unless --verbose (its log
    file, ray-data.log in the session's logs, still has everything). "console" is the
    terminal handler of Ray Data's documented default logging config.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.op_resource_reservation_enabled = False
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING if verbose else logging.ERROR)
