"""Several cnnflow commands at once: one writer per OUTPUT, promotions that cannot end on
the worse model, and a new SQLite store that several commands create together.

Real processes, real flock, real SQLite MLflow; Ray only where a real `cnnflow prep` runs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cnn.models import ModelSpec, build_model, model_state
from data_prep.lock import LOCK_FILE, output_lock
from data_prep.prep_output import check_paths
from data_prep.schema import TRAIN, read_manifest
from data_prep.shard_reader import read_table, to_pixels
from tests.test_train import prepare
from workflows import prep, tracking
from workflows.cli import cli
from workflows.config import PrepConfig
from workflows.predict.output import Output
from workflows.promote import promote
from workflows.tracking.pyfunc_model import normalizer, preprocessing_from_manifest
from workflows.train.evaluation import evaluate

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


# --- promotion -----------------------------------------------------------------------------


def register(data: Path, name: str, *, steps: int, seed: int) -> int:
    """A new version of the tutorial-sized model, trained `steps` full-batch Adam steps."""
    manifest = read_manifest(str(data))
    preprocessing = preprocessing_from_manifest(manifest)
    spec = ModelSpec("seed", len(manifest["classes"]), manifest["image_size"])
    torch.manual_seed(seed)
    model = build_model(spec)
    table = read_table(str(data), TRAIN, columns=["image", "label"])
    x = normalizer(preprocessing)(torch.from_numpy(to_pixels(table["image"], manifest["image_size"]).copy()))
    y = torch.tensor(table["label"].to_numpy(), dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with tracking.training_run(experiment="tests", run_name=f"steps-{steps}", params={}, tags={}) as run_id:
        uri = tracking.log_model(run_id, state=model_state(model, spec), preprocessing=preprocessing)
        version = tracking.register_model(run_id, uri, register_as=name, version_tags={"data": str(data)})
    return int(version.version)


def accuracy(data: Path, name: str, version: int) -> float:
    classifier = tracking.load_classifier(f"models:/{name}/{version}")
    return evaluate(classifier.model, classifier.preprocessing, str(data)).accuracy


def test_two_promotions_at_once_end_on_the_better_version(ray_local, mlflow_uri, image_folder, tmp_path):
    data = prepare(image_folder, tmp_path / "stripes", per_class=30)
    old = register(data, "stripes", steps=0, seed=1)
    good = register(data, "stripes", steps=40, seed=2)
    fair = register(data, "stripes", steps=1, seed=3)
    acc = {v: accuracy(data, "stripes", v) for v in (old, good, fair)}
    assert acc[old] < acc[fair] < acc[good], acc  # both beat the champion; one beats the other
    assert promote("stripes", old).promoted

    # Both read champion `old`, evaluate it, and would each move the alias: unserialised,
    # whichever finished last won. Now the second decides only after the first has.
    start = threading.Barrier(2)
    decisions, errors = {}, []

    def promote_at_once(version: int) -> None:
        try:
            start.wait()
            decisions[version] = promote("stripes", version)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=promote_at_once, args=(v,)) for v in (fair, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    assert tracking.champion("stripes") == good
    # Whichever went second compared with what the first left as champion.
    first, second = sorted(decisions.values(), key=lambda d: d.champion_version != old)
    assert first.champion_version == old and first.promoted
    assert second.champion_version == first.version
    assert second.promoted == (second.version == good)
    tags = tracking.get_version("stripes", second.version).tags
    assert tags["promotion_champion_version"] == str(first.version)


# --- a new SQLite store, several commands at once --------------------------------------------

STORE_USER = """\
import os, sys, time
from pathlib import Path
from workflows import tracking

ready, go = Path(sys.argv[1] + ".ready"), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
with tracking.training_run(experiment="tests", run_name=sys.argv[1], params={"who": sys.argv[1]}, tags={}) as run_id:
    tracking.log_metrics(run_id, {"x": 1.0})
print(tracking.registered_names())
"""


def test_three_commands_at_once_create_a_new_store_together(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "user.py"
    script.write_text(STORE_USER)
    go = tmp_path / "go"
    procs = [
        python(str(script), str(tmp_path / f"p{i}"), str(go), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri},
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(3)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # importing torch and MLflow three times on a busy machine
        while not all((tmp_path / f"p{i}.ready").exists() for i in range(3)):  # imports done: start together
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the processes took over 5 minutes to import cnnflow"
            time.sleep(0.05)
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "[]"

    # The store works: every run is there, finished, in the one experiment they created.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        rows = tracking.list_runs("tests", max_runs=10)
        assert sorted(r["name"] for r in rows) == [str(tmp_path / f"p{i}") for i in range(3)]
        assert {r["status"] for r in rows} == {"FINISHED"}
        assert sorted(e.name for e in tracking.client(uri).search_experiments()) == ["Default", "tests"]
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert not list(tmp_path.glob("*.lock"))


def test_writes_are_retried_while_sqlite_says_database_is_locked(tmp_path):
    db = tmp_path / "x.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("create table t (x)")
    other.execute("begin exclusive")  # another writer, for 0.3 s
    threading.Timer(0.3, other.execute, ["commit"]).start()
    attempts = []

    def write() -> None:
        attempts.append(time.monotonic())
        with sqlite3.connect(db, timeout=0) as conn:  # timeout=0: "database is locked" at once
            conn.execute("insert into t values (1)")

    tracking.retry_locked(write)
    assert len(attempts) > 1
    assert sqlite3.connect(db).execute("select count(*) from t").fetchone() == (1,)

    # Other errors are not retried.
    attempts.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        tracking.retry_locked(lambda: attempts.append(1) or sqlite3.connect(db).execute("select * from nope"))
    assert attempts == [1]
