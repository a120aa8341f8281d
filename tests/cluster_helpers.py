"""A real two-node Ray cluster and a real `mlflow server`, on 127.0.0.1, owned by one test.

Each node is its own `ray start --block` (head: GCS, dashboard and job server; worker:
its own raylet), each in its own process group, with free ports, a private temp dir and
token authentication on (a random token passed as RAY_AUTH_TOKEN, so that nothing is
written to ~/.ray). Other engineers' Ray clusters run on the same machine, so teardown
never calls `ray stop` (which stops every Ray on the machine): it kills the process
groups it started, then any process that still carries this cluster's marker in its
environment (job drivers run in sessions of their own), all by process id.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow and python for the jobs
MARKER = "CNNFLOW_TEST_CLUSTER"  # in the environment of every process started here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """The ports every raylet opens; two nodes on one machine must not share them."""
    flags = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return [arg for flag in flags for arg in (flag, str(free_port()))]


@dataclass
class Proc:
    """A process this helper started as the leader of a new process group."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session=True: the leader's pid is the group id

    def exited(self) -> bool:
        # WNOWAIT: look without reaping, so the group id cannot be reused while we may
        # still signal it.
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def kill_group(self, sig: int) -> None:
        if self.popen.returncode is None:  # not reaped yet, so the group id is still ours
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """`with LocalCluster() as c:` a head node, one worker node and an MLflow server."""

    head_cpus: int = 1
    worker_cpus: int = 1
    object_store_bytes: int = 200 * 1024**2  # small: the machine is shared
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cnnflow-cluster-")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Short path under /tmp: Ray's Unix sockets live under the temp dir (108-byte limit).
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env = {
            **env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in a job = this venv
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: str(self.root),
        }
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.mlflow_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self._workers = 0

    # --- starting -------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        mlflow = self._spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "mlartifacts"),
            "--workers", "1",
        ])  # fmt: skip
        self._spawn("head", [
            *self._ray_start(self.head_cpus), "--head", "--port", str(self.gcs_port),
            "--temp-dir", str(self.root / "ray"),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
        ])  # fmt: skip
        head = self.procs[-1]
        # A worker only needs the GCS; the dashboard (the job server) comes up meanwhile.
        self._wait(lambda: _port_open(self.gcs_port), head, "the head's GCS")
        self.add_worker(wait=False)
        self.wait_for_nodes(2)
        self._wait(lambda: _http_ok(f"{self.mlflow_uri}/health"), mlflow, "mlflow server health")

    def _ray_start(self, cpus: int) -> list[str]:
        return [
            str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(cpus), "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_bytes),
            "--min-worker-port", "0", "--max-worker-port", "0",  # OS-chosen worker ports
            "--disable-usage-stats", *node_ports(),
        ]  # fmt: skip

    def add_worker(self, wait: bool = True) -> Proc:
        """Join one more worker node (as the autoscaler would replace a lost one)."""
        self._workers += 1
        name = f"worker{self._workers}"
        before = {n["node_id"] for n in self.alive_nodes()} if wait else set()
        # A temp dir of its own, as on a machine of its own: nodes that share one also share
        # runtime_resources/, and one node's runtime-env agent then replaces the unpacked
        # working dir that a job driver on the other node is running in.
        args = [*self._ray_start(self.worker_cpus), "--address", self.gcs_address, "--temp-dir", str(self.root / name)]
        proc = self._spawn(name, args)
        if wait:  # for a node id not seen before: a killed node still counts as alive for a while
            new = lambda: {n["node_id"] for n in self.alive_nodes()} - before  # noqa: E731
            self._wait(new, proc, f"{proc.name} to join")
        return proc

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root,
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait(self, ready: Any, proc: Proc, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.exited():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}\n{proc.tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"no {what} after {timeout:.0f} s\n{self.logs()}")

    # --- talking to it --------------------------------------------------------------

    def ray(self, *args: str, timeout: float = 120, token: bool = True) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster, as its user would (with the token)."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard_url}
        if not token:
            env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        return subprocess.run(
            [str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
            timeout=timeout, cwd=REPO,
        )  # fmt: skip

    def state(self, resource: str, **filters: str) -> list[dict[str, Any]]:
        """Ray's state API over HTTP (what `ray list` reads); empty until the dashboard is up."""
        query = [("limit", "1000"), ("detail", "true")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []

    def alive_nodes(self) -> list[dict[str, Any]]:
        return self.state("nodes", state="ALIVE")

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Actors of a class, dead ones included (Ray keeps them in the GCS)."""
        return self.state("actors", class_name=class_name)

    def workers(self) -> list[Proc]:
        """The worker nodes started here that are still running, oldest first."""
        return [p for p in self.procs if p.name.startswith("worker") and not p.exited()]

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        head = next(p for p in self.procs if p.name == "head")
        self._wait(lambda: len(self.alive_nodes()) >= count, head, f"{count} alive nodes", timeout)

    def submit(
        self, *entrypoint: str, env_vars: dict[str, str] | None = None, wait: bool = True,
        submission_id: str | None = None, timeout: float = 120, working_dir: Path = REPO,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        """`ray job submit --working-dir <repo> -- ENTRYPOINT`, as cluster users run it."""
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": self.mlflow_uri, **(env_vars or {})}}
        args = ["job", "submit", "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env)]
        if submission_id:
            args += ["--submission-id", submission_id]
        if not wait:
            args.append("--no-wait")
        return self.ray(*args, "--", *entrypoint, timeout=timeout)

    def jobs(self) -> Any:
        """Ray's job client for this cluster; the token goes in the header, as the CLI sends it."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def job_status(self, submission_id: str) -> str:
        return self.jobs().get_job_status(submission_id).value

    def wait_job(self, submission_id: str, timeout: float = 300) -> str:
        jobs = self.jobs()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = jobs.get_job_status(submission_id)
            if status.is_terminal():
                return status.value
            time.sleep(1)
        raise TimeoutError(f"job {submission_id} still {status.value} after {timeout:.0f} s")

    def job_logs(self, submission_id: str) -> str:
        return self.jobs().get_job_logs(submission_id)

    def node_proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def kill_node(self, proc: Proc) -> None:
        """A node lost: SIGKILL every process of its session at once, as a dead machine.

        Its raylet is in the node's process group, but the raylet starts each worker
        process in a process group of its own (same session), so a group kill alone
        leaves the training workers running for seconds, until they notice.
        """
        proc.kill_group(signal.SIGKILL)
        for pid in session_pids(proc.popen.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.popen.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Kill what this cluster started, by process id: workers, head, then MLflow."""
        for proc in reversed(self.procs):
            proc.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + 5  # a short grace: nothing here needs a clean exit
        while time.monotonic() < deadline and not all(p.exited() for p in self.procs):
            time.sleep(0.2)
        for proc in self.procs:
            proc.kill_group(signal.SIGKILL)  # the leader is still unreaped: the group is ours
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(50):  # job drivers and anything else that left our process groups
            strays = marked_pids(str(self.root))
            if not strays:
                break
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def marked_pids(value: str) -> list[int]:
    """Live processes of this user whose environment holds MARKER=value."""
    needle = f"{MARKER}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def session_pids(sid: int) -> list[int]:
    """Live processes in session `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
