"""Wall time, peak memory and CPU time of a command and every process it starts.

Shared by the benches: Ray jobs spread over a raylet, a GCS and many workers, so memory
is PSS summed over the whole process tree (shared pages count once) and CPU time is
summed the same way. Sampled every 0.2 s from /proc (Linux).
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def sample_tree(pid: int, cpu_ticks: dict[int, int]) -> int:
    """PSS bytes over `pid` and all its descendants (Ray's raylet, GCS, workers...).

    Also records each process's CPU ticks so far (user + system) in `cpu_ticks`.
    """
    tree, stack, total = _children(), [pid], 0
    while stack:
        p = stack.pop()
        stack += tree.get(p, [])
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu_ticks[p] = max(cpu_ticks.get(p, 0), int(fields[11]) + int(fields[12]))
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall clock, process start to exit
    peak_pss: int  # bytes, summed over the process tree
    cpu_seconds: float  # user + system over the tree (sampled: a lower bound)
    processes: int = 0  # processes the tree had at once, at most (sampled)


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` from the repository root; RuntimeError with its last line if it fails."""
    env = env or {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    peak, ticks, processes = 0, {}, 0
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        alive: dict[int, int] = {}
        peak = max(peak, sample_tree(proc.pid, alive))
        processes = max(processes, len(alive))
        for pid, t in alive.items():
            ticks[pid] = max(ticks.get(pid, 0), t)
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    reader.join()
    if proc.returncode != 0:
        lines = b"".join(stderr).decode().strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {lines[-1]}")
    return Measured(seconds, peak, sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), processes)
