"""`ray_session`: a local Ray it starts is gone, every process of it, when the job ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# Runs in its own process: the suite's Ray is already initialised, and ray_session would
# join that one instead of starting (and stopping) its own.
SESSION = """
import json, ray
from workflows.config import RayOptions
from workflows.ray_runtime import ray_session

with ray_session(RayOptions(num_cpus=1), dashboard=False, ray_data=False):
    node = ray._private.worker._global_node
    pids = {kind: [p.process.pid for p in infos] for kind, infos in node.all_processes.items()}
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
print(json.dumps(pids))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; its parent just has not reaped it
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_local_ray_leaves_no_process_behind() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", SESSION], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet", "monitor"} <= pids.keys()  # the monitor is the one stopped early
    deadline = time.monotonic() + 10  # the raylet's workers exit on their own once it is gone
    while any(alive(pid) for group in pids.values() for pid in group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [kind for kind, group in pids.items() for pid in group if alive(pid)]
