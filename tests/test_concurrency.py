"""Several cnnflow commands at once: one writer per OUTPUT.

Real processes, real flock; Ray only where a real `cnnflow prep` runs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from data_prep.lock import LOCK_FILE, output_lock
from data_prep.pipeline import check_paths
from data_prep.schema import read_manifest
from workflows import prep
from workflows.cli import cli
from workflows.config import PrepConfig
from workflows.predict import Output

REPO = Path(__file__).resolve().parents[1]
HOLDER = """\
import sys, time
from data_prep.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def python(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    """A real Python process that imports this worktree's cnnflow."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, text=True, **kw
    )


@pytest.fixture
def holder(tmp_path: Path):
    """Start another process that holds OUTPUT's lock: `proc = holder(output)`."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    started: list[subprocess.Popen] = []

    def start(output: Path) -> subprocess.Popen:
        proc = python(str(script), str(output), stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


# --- one writer per OUTPUT -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["prep", "predict"])
def test_second_job_into_an_output_is_refused_naming_the_first(stage, holder, image_folder, tmp_path):
    images, _ = image_folder(classes=("a", "b"), per_class=2, size=8)
    out = tmp_path / "out"
    first = holder(out)
    before = sorted(p.name for p in out.iterdir())

    args = [stage, str(images), str(out)] + (["--model", "nothing-registered"] if stage == "predict" else [])
    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"is in use by another cnnflow job (pid {first.pid} on {socket.gethostname()}, `holder.py {out}`" in line
    assert "nothing was written" in line
    assert sorted(p.name for p in out.iterdir()) == before == [LOCK_FILE]
    assert first.poll() is None  # the first job goes on, its lock untouched
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid


def test_a_killed_jobs_lock_is_free_and_its_file_is_not_user_data(ray_local, holder, image_folder, tmp_path):
    images, _ = image_folder(classes=("a", "b"), per_class=4, size=8)
    out = tmp_path / "out"
    killed = holder(out)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (out / LOCK_FILE).exists()  # left behind, with the dead job's name in it, but unlocked

    # The next prep takes the lock at once and counts the file as nothing of the user's.
    assert check_paths(str(images), str(out)) == set()
    assert prep.run(PrepConfig(input=str(images), output=str(out), image_size=16)) == 0
    assert not (out / LOCK_FILE).exists()  # released, and removed, at the end of the job
    assert read_manifest(str(out))["num_rows"]["train"] + read_manifest(str(out))["num_rows"]["val"] == 8

    # A prep OUTPUT, or a predict OUTPUT, holding a stale lock file is still theirs to reuse.
    killed = holder(out)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert check_paths(str(images), str(out))  # the earlier prep's files, nothing foreign
    scored = tmp_path / "scored"
    killed = holder(scored)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert Output(str(scored), "parquet").runs == set()
    with output_lock(str(scored)):
        assert json.loads((scored / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_on_a_missing_output_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new"
    with output_lock(str(out)):
        assert (out / LOCK_FILE).exists()
    assert not out.exists()
