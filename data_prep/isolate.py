"""Tasks whose worker may die: find the items that kill it, and go on without them.

A codec bug (a segfault) or the kernel's out-of-memory killer ends a decode task's worker
process; no `except` in the task can catch that. Ray then reports the task as failed
(WorkerCrashedError, OutOfMemoryError). Retrying the same files (Ray Data retries a task
forever by default) or failing the job (a plain task) are both wrong for one bad file.
Here a task whose worker died is run again as two halves, and so on down to single
items; an item that kills a worker on its own twice is the poison, and the caller
quarantines it (prep) or gives it an error row (predict). Each death costs one worker
start, so k poison items among n cost about 2 k log2(n) task runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

CRASHED = "the decoder crashed its worker"  # the reason given for a poison item
# Ray's errors for a task whose process (or node) went away; an exception raised by the
# task itself is a RayTaskError and is not one of them.
WORKER_DIED = (WorkerCrashedError, OutOfMemoryError, NodeDiedError)
DEATHS_ALONE = 2  # a single item is blamed after killing this many workers (a node can die on its own)


def run_isolating(
    submit: Callable[[Sequence[Any]], ray.ObjectRef], items: Sequence[Any]
) -> tuple[list[Any], list[int]]:
    """Run `submit(part)` over `items`, isolating the items whose worker dies.

    `submit(part)` starts one Ray task over `part` that returns one result per item, and
    must not retry (`max_retries=0`): retrying is decided here, where it is bounded. The
    first task gets every item; a part whose worker died is split in two and both halves
    run (side by side). Returns the results in item order (None where the item was
    poison) and the indices of the poison items.
    """
    results: list[Any] = [None] * len(items)
    poison: list[int] = []
    deaths: dict[int, int] = {}  # single item -> workers it killed
    pending: dict[ray.ObjectRef, tuple[int, int]] = {}

    def start(lo: int, hi: int) -> None:
        pending[submit(items[lo:hi])] = (lo, hi)

    if items:
        start(0, len(items))
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        lo, hi = pending.pop(ref)
        try:
            results[lo:hi] = ray.get(ref)
        except WORKER_DIED:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                start(lo, mid)
                start(mid, hi)
            elif deaths.setdefault(lo, 0) + 1 < DEATHS_ALONE:
                deaths[lo] += 1
                start(lo, hi)
            else:
                poison.append(lo)
    return results, sorted(poison)
