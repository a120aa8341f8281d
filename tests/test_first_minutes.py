"""Issue 7: the errors a new user meets, and the README's demo command run as written."""
from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CNNFLOW = str(Path(sys.executable).with_name("cnnflow"))


def cnnflow(*args: str, cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed console script, run as a user runs it, in its own process.

    `env` adds variables, or removes them where the value is None.
    """
    merged = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "RAY_ADDRESS": None, **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run([CNNFLOW, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_short_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def test_wrong_path(tmp_path: Path) -> None:
    assert_short_error(cnnflow("prep", "no/such/folder", "out", cwd=tmp_path), "no/such/folder")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_short_error(cnnflow("prep", "empty", "out", cwd=tmp_path), "no images")


def test_one_class(tmp_path: Path, image_folder) -> None:
    root, _ = image_folder(classes=("horizontal",), per_class=3)
    assert_short_error(cnnflow("prep", str(root), "out", cwd=tmp_path), "one class")


def test_train_on_a_folder_that_is_not_prepared(tmp_path: Path, image_folder) -> None:
    root, _ = image_folder(per_class=2)
    assert_short_error(cnnflow("train", str(root), cwd=tmp_path), "cnnflow prep")


def test_model_name_that_does_not_exist(tmp_path: Path, image_folder) -> None:
    root, _ = image_folder(per_class=2)
    result = cnnflow("predict", str(root), "preds", "--model", "nosuchmodel", cwd=tmp_path)
    assert_short_error(result, "nosuchmodel")


@pytest.fixture
def not_mlflow_port() -> Iterator[int]:
    """A port taken by another HTTP program (macOS's AirPlay on 5000 is the classic)."""

    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(403)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_busy_port_is_not_mlflow(tmp_path: Path, not_mlflow_port: int) -> None:
    uri = f"http://127.0.0.1:{not_mlflow_port}"
    result = cnnflow("runs", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert_short_error(result, "not as an MLflow server", uri)


def test_mlflow_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cnnflow("runs", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert_short_error(result, "unreachable", "mlflow server")


def test_ray_address_with_nothing_there(tmp_path: Path, image_folder) -> None:
    root, _ = image_folder(per_class=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cnnflow("prep", str(root), "out", "--address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=180)
    assert_short_error(result, "cannot connect to Ray")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [CNNFLOW, "--debug", "prep", "no/such/folder", "out"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def readme_demo_command() -> list[str]:
    """The last command of README's set-up block for the demo (after the install)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- setup-demo -->\s*```bash\n(.+?)\n```", text, re.S)
    assert block, "README.md has no demo block after <!-- setup-demo -->"
    last = block.group(1).split("&&")[-1].strip()
    assert last.startswith("cnnflow demo"), last
    return shlex.split(last)


def run_demo_and_check(tmp_path: Path) -> list[str]:
    """Run the README's demo command in `tmp_path`, check what it did; return the command."""
    command = readme_demo_command()
    result = cnnflow(*command[1:], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": None}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "champion: digits v" in out
    accuracy = re.search(r"held-back digits: (\d+)/(\d+) correct", out)
    assert accuracy, out
    correct, total = map(int, accuracy.groups())
    assert total == 180 and correct / total > 0.8  # 10 classes: chance is 0.1
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert re.search(r"^epoch 1/\d+  train_loss", out, re.M), out  # printed by the driver
    # The terminal is the user's: none of Ray's or MLflow's own lines (they need --verbose).
    terminal = out + result.stderr
    for noise in ("execution finished", "core_worker.cc", "RayDeprecationWarning", "INFO mlflow", "Downloading artifacts",
                  "Successfully registered", "Token authentication"):  # fmt: skip
        assert noise not in terminal, terminal[-3000:]

    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "cnnflow-demo"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("cnnflow-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["demo-seed", "demo-simple"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"confusion_matrix.png", "curves.png", "model_summary.txt", "manifest.json"} <= artifacts, artifacts
    assert "champion" in client.get_registered_model("digits").aliases
    assert not (tmp_path / "mlruns").exists(), "the demo keeps its artifacts in its workdir"
    return command


@pytest.mark.slow  # 95 s of two trainings: CI's second step, not the fast loop
def test_readme_demo_runs_the_whole_flow_and_a_second_reuses_what_is_done(tmp_path: Path) -> None:
    command = run_demo_and_check(tmp_path)
    again = cnnflow(*command[1:], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": None}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") >= 3
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'cnnflow-demo' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("cnnflow-demo")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # no new training runs
