"""An experiment's runs as plain rows for `cnnflow runs`: params, metrics, registration, champion mark."""
from __future__ import annotations

import time
from typing import Any

from workflows.errors import CnnflowError
from workflows.tracking.connection import client
from workflows.tracking.registry import REGISTERED_TAG, champion
from workflows.tracking.runs import MAX_CHILDREN, PARENT_TAG

MAX_RESULTS = 50_000  # the most one search_runs call may ask for (MLflow refuses more)


def list_runs(experiment: str, max_runs: int) -> list[dict[str, Any]]:
    """The experiment's latest runs as plain rows, with each registered version's champion mark.

    `max_runs` counts top-level runs; each parent's children (a tune's trials) follow it
    as rows whose `parent` is the parent's run id, oldest first.
    """
    c = client()
    found = c.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in c.search_experiments())
        raise CnnflowError(f"no experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    runs = c.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` IS NULL",
        max_results=max_runs,
        order_by=["attributes.start_time DESC"],
    )
    children: dict[str, list[Any]] = {}
    if runs:
        # A child starts after its parent: one query covers the children of every run shown.
        oldest = min(r.info.start_time for r in runs)
        for child in c.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` IS NOT NULL and attributes.start_time >= {oldest}",
            max_results=min(MAX_RESULTS, MAX_CHILDREN * max(1, len(runs))),
            order_by=["attributes.start_time ASC"],
        ):
            children.setdefault(child.data.tags[PARENT_TAG], []).append(child)
    champions: dict[str, int | None] = {}

    def row(r: Any, parent: str | None) -> dict[str, Any]:
        registered = r.data.tags.get(REGISTERED_TAG)
        is_champion = False
        if registered:
            name, version = registered.rsplit("/", 1)
            if name not in champions:
                try:
                    champions[name] = champion(name)
                except CnnflowError:  # the registered model was deleted since
                    champions[name] = None
            is_champion = champions[name] == int(version)
        end = r.info.end_time or int(time.time() * 1000)
        return {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "start_time": r.info.start_time / 1000,
            "duration_s": (end - r.info.start_time) / 1000,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
            "registered": registered,
            "champion": is_champion,
            "parent": parent,
        }

    rows = []
    for r in runs:
        rows.append(row(r, None))
        rows.extend(row(child, r.info.run_id) for child in children.get(r.info.run_id, []))
    return rows
