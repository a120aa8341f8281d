"""Locks that die with their holder: one writer per OUTPUT, one creator of a SQLite store,
one promotion decision at a time.

Each is `fcntl.flock` on a lock file. The kernel releases it when the holder's file is
closed, however the process ends (SIGKILL included), so a killed job never leaves a lock
stuck: its file may stay behind, but unlocked, and the next job simply takes it. The
holder writes who it is (pid, host, command, start time) into the file as JSON, for the
line a refused or waiting job shows. POSIX only, as Ray's own single-node setups are.

OUTPUT's lock file is hidden (`LOCK_FILE`, a dot-name), so the marker rules in
data_prep/safety.py and predict's resume never count it as a file of the output.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import datetime
from typing import Any

from data_prep import safety
from data_prep.redact import redact_uri
from data_prep.scan import PrepError

LOCK_FILE = ".cnnflow-lock"  # inside a local OUTPUT, while a job writes there


def me() -> dict[str, Any]:
    """Who holds a lock, as shown to the job it stops or delays."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "details unavailable"
    return f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, started {holder.get('started')}"


@contextmanager
def hold(path: str, *, on_busy: Callable[[dict[str, Any] | None], None]) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block.

    When another process holds it, `on_busy(holder)` is called: it raises to refuse, or
    returns to wait for the lock. The file is deleted on release, so a job that opened it
    just before then may have locked a file that is gone: it checks, and takes the new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_busy(_holder(path))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me()).encode())
        yield
    finally:
        with suppress(FileNotFoundError):  # (its folder may have been deleted under the job)
            os.unlink(path)  # while still locked: see above for the job that opened it meanwhile
        os.close(fd)


def _holder(path: str) -> dict[str, Any] | None:
    """The holder's description; it writes it just after locking, so allow it a moment."""
    for _ in range(20):
        try:
            with open(path) as f:
                holder = json.load(f)
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def output_lock(output: str) -> AbstractContextManager[None]:
    """One job writes into a local OUTPUT at a time; a second is refused with one line.

    Taken after the INPUT/OUTPUT check and before anything else is written (the folder is
    created for the lock file; an empty one is removed again on release). Object stores
    (s3://, gs://...) are not locked: they have no lock a killed job's kernel would
    release, so two jobs into one bucket prefix remain the user's to avoid.
    """
    kind, path = safety.location(output)
    if kind != "local":
        return nullcontext()
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output {redact_uri(output)} is a file; give a folder")
    return _output_lock(output, path)


@contextmanager
def _output_lock(output: str, path: str) -> Iterator[None]:
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)

    def refuse(holder: dict[str, Any] | None) -> None:
        raise PrepError(
            f"output {redact_uri(output)} is in use by another cnnflow job ({describe(holder)}); "
            "wait for it to end or choose another output (nothing was written)"
        )

    try:
        with hold(os.path.join(path, LOCK_FILE), on_busy=refuse):
            yield
    finally:
        if created:
            with suppress(OSError):
                os.rmdir(path)  # only when the job wrote nothing there after all
