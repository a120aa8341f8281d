"""Which search `cnnflow tune` goes on with: `--resume`, `--name`, and the options it started with.

The Tune experiment lives under --storage, named after the parent run (or --name);
`--resume` finds the last unfinished parent run on DATA, restores the Tune experiment it
names (`Tuner.restore(..., resume_errored=True)`), and goes on under the same parent. A
trial that runs again reopens its child run, and its trainer (same name and storage)
resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ray.tune

from data_prep.redact import HIDDEN, unredact
from workflows import tracking
from workflows.config import RayOptions, TuneConfig, make_config
from workflows.errors import CnnflowError
from workflows.train.plan import Plan

# Tags on the parent run.
KIND_TAG, KIND = "cnnflow_kind", "tune"
NAME_TAG, PATH_TAG = "tune_name", "tune_path"
CONFIG_ARTIFACT = "tune_config.json"  # on the parent: the options, for --resume


def resumable(config: TuneConfig, p: Plan) -> dict[str, Any] | None:
    """The parent run of the search to go on with, or None for a new search.

    --name: the search of that name, if there is one (finished: an error). --resume
    without --name: the last unfinished search on DATA in the experiment.
    """
    if config.name:
        found = tracking.latest_run(config.experiment, {KIND_TAG: KIND, NAME_TAG: config.name})
        if found is None:
            if ray.tune.Tuner.can_restore(experiment_path(config, config.name)):
                raise CnnflowError(
                    f"{experiment_path(config, config.name)} holds a search that has no parent run in "
                    f"experiment {config.experiment!r}; choose another --name"
                )
            if config.resume:
                raise CnnflowError(f"no search named {config.name!r} in experiment {config.experiment!r} to resume")
            return None
        if found["status"] == "FINISHED":
            raise CnnflowError(
                f"the search named {config.name!r} is finished (parent run {found['run_id']}); choose another --name"
            )
    elif config.resume:
        found = tracking.latest_run(config.experiment, {KIND_TAG: KIND, "data": p.data}, unfinished=True)
        if found is None:
            raise CnnflowError(f"no unfinished search on {p.data} in experiment {config.experiment!r} to resume")
    else:
        return None
    path = found["tags"].get(PATH_TAG)
    if path and NAME_TAG in found["tags"]:  # a --storage URI's credentials, given again, come back
        path = unredact(path, experiment_path(config, found["tags"][NAME_TAG]))
    if not path or not ray.tune.Tuner.can_restore(path):
        raise CnnflowError(
            f"the search of parent run {found['run_id']} cannot be resumed: no Ray Tune state at {path}"
            + ("; pass --storage again with its credentials" if path and HIDDEN in path else "")
        )
    return {**found, "path": path}


def resumed_config(config: TuneConfig, parent_id: str) -> TuneConfig:
    """The options the search started with (saved on its parent run); this driver's Ray ones.
    A URI saved without its credentials gets them back from the same URI given now."""
    given = dataclasses.asdict(config)
    saved = {k: unredact(v, given.get(k)) for k, v in tracking.read_dict(parent_id, CONFIG_ARTIFACT).items()}
    ray_options = {f.name: getattr(config, f.name) for f in dataclasses.fields(RayOptions)}
    return make_config(TuneConfig, {**saved, **ray_options, "resume": True}, source=f"run {parent_id}'s {CONFIG_ARTIFACT}")


def experiment_path(config: TuneConfig, name: str) -> str:
    from ray.train.constants import DEFAULT_STORAGE_PATH

    storage = config.storage or DEFAULT_STORAGE_PATH
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    return f"{storage.rstrip('/')}/{name}"
