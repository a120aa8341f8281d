"""(Re)start the cluster head's MLflow server behind MLflow's basic authentication.

cluster.yaml's head_start_ray_commands run it on every `ray up`:

    python -m workflows.cluster_mlflow ~/mlflow -- --host 0.0.0.0 --port 5000 ...

STATE (the head's ~/mlflow, on the host's disk) keeps what outlives a restart:
server.pid (the running server's process group), server.log, basic_auth.ini and
basic_auth.db (MLflow's user store), flask_secret_key. The admin user's password is
MLFLOW_AUTH_ADMIN_PASSWORD (cluster.yaml reads ~/.cnnflow/mlflow_password, synced from the
machine that runs `ray up`); MLflow stores it when it creates the admin user, on the
first start. Arguments after `--` go to `mlflow server`.

Idempotent: the server an earlier run started is stopped (SIGTERM to its process group,
SIGKILL after 10 s), then a new one starts. It returns once the new server accepts the
admin's login, or exits 1 with the log's tail, so a server that cannot start fails
`ray up`. Standard library only (it starts `mlflow server` as a program, never imports
MLflow), run on the head as `python -m workflows.cluster_mlflow`.
"""
from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ADMIN = "admin"  # basic_auth.ini's admin_username; jobs log in as this user (README)
STOP_S = 10.0  # SIGTERM's grace: uvicorn stops within seconds, but part of the group outlived 30 s of it
START_S = 300.0  # a cold start on a busy head takes ~20 s; a first-time DB migration longer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", type=Path, help="folder for the pid file, log, user store and secret key")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then `mlflow server` flags")
    args = parser.parse_args(argv)
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        return fail("MLFLOW_AUTH_ADMIN_PASSWORD is empty: cluster.yaml reads it from ~/.cnnflow/mlflow_password")
    state = args.state.expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    stop(state / "server.pid")
    pgid = start(state, server_args)
    return wait_ready(state, pgid, local_url(server_args), password)


def stop(pid_file: Path) -> None:
    """Stop the server that `pid_file` names: its whole process group (the CLI, uvicorn's
    workers, MLflow's job runners), if that group still runs MLflow."""
    try:
        pgid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    # After a container restart the id may belong to another program: then it is not ours.
    if any(b"mlflow" in cmdline for cmdline in group(pgid).values()):
        for sig, grace in ((signal.SIGTERM, STOP_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while group(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not group(pgid):
                break
    pid_file.unlink(missing_ok=True)


def start(state: Path, server_args: list[str]) -> int:
    """`mlflow server --app-name basic-auth ARGS` in a process group of its own; its id."""
    ini = state / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"  # users the admin adds can read every run
        f"database_uri = sqlite:///{state / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    # Flask's CSRF secret must be the same in every uvicorn worker and across restarts.
    key = state / "flask_secret_key"
    if not key.exists():
        key.touch(mode=0o600)
        key.write_text(secrets.token_hex(32))
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text()}
    with open(state / "server.log", "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {__file__} starts mlflow server\n".encode())
        log.flush()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", *server_args],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=state, start_new_session=True,  # its own group: `stop` ends all of it, `ray stop` none
        )  # fmt: skip
    (state / "server.pid").write_text(str(server.pid))
    return server.pid


def wait_ready(state: Path, pgid: int, url: str, password: str) -> int:
    """0 once the server answers the admin's login; 1, with the log's tail, if it cannot."""
    login = "Basic " + base64.b64encode(f"{ADMIN}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Authorization": login})
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if not group(pgid):
            return fail(f"mlflow server exited\n{tail(state / 'server.log')}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                print(f"mlflow server (process group {pgid}) answers at {url}; log: {state / 'server.log'}")
                return 0
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                stop(state / "server.pid")
                return fail(
                    f"mlflow server refuses {ADMIN}'s password (HTTP {exc.code}): MLflow stored the password "
                    f"of its first start in {state / 'basic_auth.db'}; change it there (README) or put that "
                    "one back in ~/.cnnflow/mlflow_password"
                )
        except OSError:
            pass  # not listening yet
        time.sleep(1)
    stop(state / "server.pid")
    return fail(f"mlflow server did not answer at {url} within {START_S:.0f} s\n{tail(state / 'server.log')}")


def local_url(server_args: list[str]) -> str:
    """Where this machine reaches the server that `server_args` describe."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", "-h", default="127.0.0.1")
    parser.add_argument("--port", "-p", default="5000")
    known, _ = parser.parse_known_args(server_args)
    host = "127.0.0.1" if known.host in ("0.0.0.0", "::") else known.host
    return f"http://{host}:{known.port}"


def group(pgid: int) -> dict[int, bytes]:
    """pid -> command line of the live (not zombie) processes in process group `pgid`."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone meanwhile
    return members


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def fail(message: str) -> int:
    print(f"cluster_mlflow: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
