"""Running on a Ray cluster (issue 6): cluster.yaml, what a job uploads, and the jobs
themselves on a real two-node Ray cluster on this machine with a real `mlflow server`.

The two-node tests are marked `cluster` (`pytest -m cluster` runs them alone, `-m "not
cluster"` skips them). They submit prep, train and predict exactly as a cluster user
does, `ray job submit --working-dir <repo> -- python -m workflows.<stage> ...`, with
token authentication on and MLFLOW_TRACKING_URI passed in the job's runtime env.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster_helpers import BIN, MARKER, REPO, LocalCluster, free_port, marked_pids, node_ports
from tests.images import make_image_folder
from workflows.errors import CnnflowError

CLASSES = ("horizontal", "vertical", "checker")
MODEL_NAME = "cluster-shapes"
TRAIN_ARGS = ("--model", "simple", "--width", "8", "--depth", "2", "--batch-size", "16", "--lr", "0.01")


# --- cluster.yaml -----------------------------------------------------------------------


def load_cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema() -> None:
    import jsonschema
    import ray
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster_yaml()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` runs before it launches anything: merge with the AWS defaults, check.
    validate_config(prepare_config(copy.deepcopy(config)))

    # The Ray image is pinned to the Ray we run (not `latest`, not the retired ray-ml).
    images = [config["docker"]["image"], config["docker"]["head_image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert all(i.startswith(f"rayproject/ray:{ray.__version__}-{python}-") for i in images), images

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = next(t for t in types.values() if t.get("docker", {}).get("worker_image", "").endswith("-gpu"))
    cpu = [t for name, t in types.items() if t is not head and t is not gpu]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert cpu and all(t["docker"]["worker_image"].endswith("-cpu") for t in cpu)

    # Token authentication on every node, with the token synced from the launching machine.
    assert "~/.ray/auth_token" in config["file_mounts"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    # The head runs the MLflow server behind a login; every node knows where it is and
    # the login, from the password file synced like the Ray token (no password in the repo).
    assert any("workflows.cluster_mlflow" in c for c in config["head_start_ray_commands"])
    assert "~/.cnnflow/mlflow_password" in config["file_mounts"]
    for variable in ("MLFLOW_TRACKING_URI=", "MLFLOW_TRACKING_USERNAME=", "MLFLOW_TRACKING_PASSWORD="):
        assert all(variable in c for c in starts if "ray start" in c), variable
    # cnnflow is installed on every node from the synced repository.
    assert config["file_mounts"]["~/cnnflow"] == "."
    assert any("pip install" in c and "~/cnnflow" in c for c in config["setup_commands"])


# --- what `ray job submit --working-dir .` uploads ---------------------------------------


def build_job_package(directory: Path, target: Path, *, ray_defaults: bool) -> list[str]:
    """The zip Ray 2.60 builds for `--working-dir` (its own packaging code), as a name list."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    excludes = get_runtime_env_default_excludes() if ray_defaults else []
    create_package(str(directory), target, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(target) as archive:
        return archive.namelist()


def test_job_upload_leaves_out_data_outputs_and_environments(tmp_path: Path) -> None:
    # A copy of the repository (its files that git would see) with what users keep beside
    # it: a virtual environment, git objects, images, shards, predictions, MLflow stores.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    repo = tmp_path / "repo"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    junk = [
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
        ".git/objects/pack/pack-1.pack",
        "data/pets/cat/1.jpg",
        "images/dog/2.PNG",
        "shards/pets/train/part-0.parquet",
        "out/predictions/part-0.parquet",
        "predictions/summary.json",
        "checkpoints/checkpoint_000001/model.pt",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model/model.pth",
        "cnnflow-demo/digits/0/0.png",
        "notes/cat.0.jpg",
    ]
    for name in junk:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(b"\0" * 1024)

    # Even with Ray's default excludes switched off, .gitignore + .rayignore keep it out.
    for ray_defaults in (True, False):
        names = set(build_job_package(repo, tmp_path / f"pkg-{ray_defaults}.zip", ray_defaults=ray_defaults))
        leaked = sorted(n for n in names if any(n.startswith(j) for j in junk))
        assert not leaked, f"uploaded with the job (ray defaults {ray_defaults}): {leaked}"
        for needed in ("pyproject.toml", "workflows/train/driver.py", "cnn/models.py", "data_prep/schema.py"):
            assert needed in names

    # The real working tree, exactly as `ray job submit --working-dir .` would pack it.
    package = tmp_path / "real.zip"
    build_job_package(REPO, package, ray_defaults=True)
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    size = package.stat().st_size
    assert size < 5 * 1024**2, f"the job upload is {size / 1024**2:.1f} MiB"
    assert size < GCS_STORAGE_MAX_SIZE / 100  # Ray's limit is 512 MiB


# --- cluster.yaml's head start commands, run on this machine ------------------------------
#
# What `ray up` does on the head, minus the cloud: file_mounts copied under a private HOME
# (the repository, the Ray token, the MLflow password), initialization_commands, then
# head_start_ray_commands, twice, as a second `ray up` runs them again. Adapted only where
# this machine differs: free ports on 127.0.0.1, one MLflow worker, Ray's temp dir in HOME,
# no autoscaler. `ray stop` stops every Ray on the machine (other people's too), so here it
# stops the Ray processes these commands started, by process id.


@dataclass
class Head:
    home: Path
    mlflow_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def __post_init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env = {
            **env, "HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", MARKER: str(self.home),
        }  # fmt: skip
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"

    def file_mounts(self, config: dict) -> None:
        local = {"~/cnnflow": REPO, "~/.ray/auth_token": self.token, "~/.cnnflow/mlflow_password": self.password}
        assert set(config["file_mounts"]) == set(local), "a new file mount: tell this test what it holds"
        for remote, source in local.items():
            target = self.home / remote.removeprefix("~/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                target.symlink_to(source)
            else:
                # As `ray get-auth-token --generate` writes a token, and `print` the README's password.
                target.write_text(source if remote.endswith("auth_token") else source + "\n")

    def adapted(self, commands: list[str]) -> list[str]:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        ray_flags = " ".join([
            f"--dashboard-host=127.0.0.1 --dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.home / 'ray'} --node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=0",
            f"--object-store-memory={100 * 1024**2} --ray-client-server-port={free_port()}",
            "--min-worker-port=0 --max-worker-port=0 --disable-usage-stats", *node_ports(),
        ])  # fmt: skip
        swaps = {
            "--host 0.0.0.0": "--host 127.0.0.1",
            "--port 5000": f"--port {self.mlflow_port}",
            "127.0.0.1:5000": f"127.0.0.1:{self.mlflow_port}",
            "--workers 4": "--workers 1",
            "--port=6379": f"--port={self.gcs_port}",
            " --object-manager-port=8076": "",  # node_ports() has one
            " --autoscaling-config=~/ray_bootstrap_config.yaml": "",
            "--dashboard-host=0.0.0.0": ray_flags,
        }
        text = "\n".join(commands)
        for old, new in swaps.items():
            assert text.count(old) == 1, f"cluster.yaml changed: {old!r} appears {text.count(old)} times"
            text = text.replace(old, new)
        return text.split("\n")

    def run(self, commands: list[str]) -> None:
        for command in commands:
            if command.strip() == "ray stop":
                self.stop_ray()
                continue
            done = subprocess.run(
                ["bash", "-c", command], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=400
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"

    def mlflow_group(self) -> int | None:
        pid_file = self.home / "mlflow" / "server.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def mlflow_groups(self) -> set[int]:
        """Process groups of the running MLflow processes these commands started."""
        groups = set()
        for pid in marked_pids(str(self.home)):
            try:
                if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    groups.add(os.getpgid(pid))
            except (OSError, ProcessLookupError):
                pass
        return groups

    def stop_ray(self) -> None:
        """`ray stop` for this head alone: its Ray processes, not its MLflow server."""
        keep = self.mlflow_groups()
        ray = [p for p in marked_pids(str(self.home)) if _pgid(p) not in keep]
        _kill(ray)

    def stop(self) -> None:
        _kill(marked_pids(str(self.home)))
        shutil.rmtree(self.home, ignore_errors=True)

    def status(self, path: str, *, login: bool) -> int:
        request = urllib.request.Request(f"{self.mlflow_url}{path}")
        if login:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{self.password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def dashboard_status(self, *, token: bool) -> int:
        """The job server's answer to a job listing; it comes up a little after `ray start`."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.dashboard_port}/api/jobs/")
        if token:
            request.add_header("Authorization", f"Bearer {self.token}")
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def task_sees_mlflow(self) -> str:
        """A Ray task of a driver that knows nothing of MLflow lists the server's experiments:
        the login reaches Ray's workers from where Ray started, as the tracking URI does."""
        script = (
            "import ray\n"
            f"ray.init(address='127.0.0.1:{self.gcs_port}', log_to_driver=False)\n"
            "@ray.remote\n"
            "def experiments():\n"
            "    from mlflow import MlflowClient\n"
            "    return sorted(e.name for e in MlflowClient().search_experiments())\n"
            "print(ray.get(experiments.remote()))\n"
        )
        driver_env = {**self.env, "RAY_AUTH_MODE": "token"}  # the token from ~/.ray/auth_token
        done = subprocess.run(
            [str(BIN / "python"), "-c", script], env=driver_env, cwd=self.home, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip().splitlines()[-1]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _kill(pids: list[int], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL what is left after the grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.cluster
def test_head_start_commands_run_mlflow_behind_a_login_and_restart_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_cluster_yaml()
    head = Head(Path(tempfile.mkdtemp(prefix="cnnflow-head-")))  # short: Ray's socket paths
    try:
        head.file_mounts(config)
        head.run(config["initialization_commands"])
        # setup_commands install cnnflow; this venv already has it, and pip must not touch it.
        head.run(head.adapted(config["head_start_ray_commands"]))
        first = head.mlflow_group()
        assert head.mlflow_groups() == {first}
        assert head.status("/health", login=False) == 200
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert head.status(search, login=False) == 401
        assert head.status("/", login=False) == 401  # the UI too
        assert head.status(search, login=True) == 200

        # Ray keeps its token authentication; a task logs in to MLflow with no set-up.
        assert head.dashboard_status(token=False) == 401
        assert head.dashboard_status(token=True) == 200
        assert head.task_sees_mlflow() == "['Default']"

        # cnnflow's own check names the missing login in one line, and passes with it.
        from workflows import tracking

        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(CnnflowError, match="refused the login .*MLFLOW_TRACKING_USERNAME"):
            tracking.check_reachable(head.mlflow_url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", head.password)
        tracking.check_reachable(head.mlflow_url)
        from mlflow import MlflowClient

        MlflowClient(head.mlflow_url).create_experiment("kept")

        # A second `ray up`: the old server is stopped (all of its process group), a new
        # one serves the same store with the same login, and Ray is back with its token.
        head.run(head.adapted(config["head_start_ray_commands"]))
        second = head.mlflow_group()
        assert second != first and head.mlflow_groups() == {second}, "one MLflow server, the new one"
        assert head.status(search, login=False) == 401 and head.status(search, login=True) == 200
        assert "kept" in {e.name for e in MlflowClient(head.mlflow_url).search_experiments()}
        assert head.dashboard_status(token=False) == 401 and head.dashboard_status(token=True) == 200
        assert head.task_sees_mlflow() == "['Default', 'kept']"
    finally:
        head.stop()
    assert not marked_pids(str(head.home)), "processes of the head outlived the test"


# --- a real two-node cluster --------------------------------------------------------------
#
# The head has 1 CPU and the worker node 2. Training spreads one worker per node; the
# worker node keeps a CPU beside its training worker for Ray Data's read tasks (they ask
# for a whole CPU), and losing that node costs training a worker, which is what the
# fault-tolerance test needs.


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    with LocalCluster(head_cpus=1, worker_cpus=2) as running:
        yield running
    assert not marked_pids(str(running.root)), "processes of the test cluster outlived it"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster-images")
    make_image_folder(root, classes=CLASSES, per_class=16, size=40, seed=6)
    return root


def submit(cluster: LocalCluster, stage: str, *args: str, wait: bool = True, **kwargs) -> str:
    """Submit `python -m workflows.<stage> ARGS` as a job; with `wait`, return its logs once
    it has succeeded. Waiting on the job (not on the CLI) keeps its logs when it times out."""
    job = kwargs.pop("submission_id", None) or f"{stage}-{uuid.uuid4().hex[:8]}"
    # --debug: a failing stage prints its traceback into the job's logs.
    submitted = cluster.submit(
        "python", "-m", f"workflows.{stage}", "--debug", *args, wait=False, submission_id=job, **kwargs
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    if not wait:
        return job
    try:
        status = cluster.wait_job(job, timeout=400)
    except TimeoutError:
        cluster.jobs().stop_job(job)
        raise AssertionError(f"{stage} job timed out\n{cluster.job_logs(job)[-6000:]}\n{cluster.logs()}") from None
    logs = cluster.job_logs(job)
    if "not built yet" in logs:
        pytest.skip(f"`cnnflow {stage}` has not landed yet")
    assert status == "SUCCEEDED", f"{stage} job {status}\n{logs[-6000:]}"
    return logs


@pytest.fixture(scope="module")
def shards(cluster: LocalCluster, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cluster-shards") / "shapes"
    submit(cluster, "prep", str(images), str(out), "--image-size", "32", "--rows-per-shard", "16")
    return out


@pytest.mark.cluster
def test_token_authentication_is_on(cluster: LocalCluster) -> None:
    refused = cluster.ray("job", "list", token=False)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    assert cluster.ray("job", "list").returncode == 0
    assert len(cluster.alive_nodes()) == 2


@pytest.mark.cluster
def test_prep_train_predict_as_jobs_on_two_nodes(
    cluster: LocalCluster, images: Path, shards: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == sorted(CLASSES)
    assert sum(pq.read_metadata(p).num_rows for p in shards.glob("*/*.parquet")) == 3 * 16

    submit(
        cluster, "train", str(shards), *TRAIN_ARGS, "--epochs", "2", "--workers", "2",
        "--storage", str(tmp_path / "checkpoints"), "--experiment", "cluster",
        "--run-name", "two-nodes", "--register-as", MODEL_NAME, "--promote",
    )  # fmt: skip
    workers = cluster.actors("RayTrainWorker")
    assert len(workers) == 2
    assert len({w["node_id"] for w in workers}) == 2, "one training worker per node"

    # The run and the model version, read back over HTTP from the server.
    client = MlflowClient(tracking_uri=cluster.mlflow_uri, registry_uri=cluster.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "two-nodes"
    assert run.data.params["workers"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert len(steps) == len(set(steps)) == 2, steps  # one value per epoch
    assert "manifest.json" in {f.path for f in client.list_artifacts(run.info.run_id)}
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == run.info.run_id

    out = tmp_path / "predictions"
    submit(cluster, "predict", str(images), str(out), "--model", MODEL_NAME)
    files = sorted(out.rglob("*.parquet"))  # summary.json sits beside them
    rows = [r for f in files for r in pq.read_table(f, columns=["path", "label", "model_uri", "error"]).to_pylist()]
    assert sorted(r["path"] for r in rows) == sorted(
        str(p.relative_to(images)) for p in images.rglob("*") if p.is_file()
    )
    assert {r["model_uri"] for r in rows} == {f"models:/{MODEL_NAME}/{version.version}"}
    assert all(r["error"] is None and r["label"] in CLASSES for r in rows)


@pytest.mark.cluster
def test_training_survives_losing_the_worker_node(
    cluster: LocalCluster, shards: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    epochs = 10  # after the first checkpoint, the rest leave time to lose a node mid-run
    storage = tmp_path / "checkpoints"  # one folder both nodes see, as s3:// would be
    job = "train-node-lost"
    [lost] = [n["node_id"] for n in cluster.alive_nodes() if not n["is_head_node"]]
    before = {a["actor_id"] for a in cluster.actors("RayTrainWorker")}  # earlier tests' workers
    submit(
        cluster, "train", str(shards), *TRAIN_ARGS, "--epochs", str(epochs), "--workers", "2",
        "--storage", str(storage), "--experiment", "cluster-ft", "--register-as", f"{MODEL_NAME}-ft",
        "--max-failures", "2", wait=False, submission_id=job,
    )  # fmt: skip

    # As soon as an epoch's checkpoint is committed (rank 0 logs the epoch to MLflow only
    # then) while a training worker of this job runs on the worker node, that node dies
    # (its raylet and every process on it), and a new node joins, as the autoscaler would.
    client = MlflowClient(tracking_uri=cluster.mlflow_uri)
    deadline = time.monotonic() + 300
    while not (committed_epochs(client, "cluster-ft") and training_worker_on(cluster, lost, before)):
        assert time.monotonic() < deadline, f"no committed epoch\n{cluster.job_logs(job)[-3000:]}"
        assert cluster.job_status(job) in ("PENDING", "RUNNING"), cluster.job_logs(job)[-3000:]
        time.sleep(0.2)
    cluster.kill_node(cluster.workers()[-1])
    cluster.add_worker()

    status = cluster.wait_job(job, timeout=300)
    logs = cluster.job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]

    # Resumed from the checkpoint, in the same MLflow run, every epoch logged once.
    [run] = client.search_runs([client.get_experiment_by_name("cluster-ft").experiment_id])
    assert run.info.status == "FINISHED"
    assert "resumed_from_epoch" in run.data.tags, logs[-4000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert set(steps) == set(range(1, epochs + 1)), steps
    # No epoch logged twice: rank 0 logs an epoch only once its checkpoint is committed,
    # so a retry after the node loss never resumes from before a logged epoch.
    assert len(steps) == len(set(steps)), steps


def committed_epochs(client: Any, experiment: str) -> list[int]:
    """Epochs the run has logged, each only once its checkpoint was committed."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [m.step for run in runs for m in client.get_metric_history(run.info.run_id, "train_loss")]


def training_worker_on(cluster: LocalCluster, node_id: str, before: set[str]) -> bool:
    """Whether a training worker started after `before` is alive on the node."""
    return any(
        a["node_id"] == node_id and a["state"] == "ALIVE" and a["actor_id"] not in before
        for a in cluster.actors("RayTrainWorker")
    )
