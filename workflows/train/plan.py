"""What `cnnflow train` decides before Ray starts, and what it asks of Ray once it has.

`plan` checks everything it can before any worker starts (DATA is a prep output with
train and val rows, the model builds at the data's image size) and chooses the epoch
budget from the data (`budget_epochs`); `scaling_for` checks the cluster has the
CPUs/GPUs asked for and sizes the workers. `cnnflow tune` plans each trial the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from cnn.models import ModelSpec, build_model
from data_prep.schema import TRAIN, VAL, read_manifest
from workflows import __version__
from workflows.config import TrainConfig, budget_epochs, check_model_name, model_options, to_dict
from workflows.errors import CnnflowError

BEST_METRIC = "val_acc"  # the epoch whose weights get registered


@dataclass
class Plan:
    """Everything decided before Ray starts: resolved options, data, model."""

    config: TrainConfig
    data: str  # absolute path or URI
    manifest: dict[str, Any]
    spec: ModelSpec
    register_as: str
    epochs: int  # --epochs, or the budget chosen from the data
    tta: str  # the test-time augmentation validation and prediction apply


def plan(config: TrainConfig) -> Plan:
    """Check DATA and the model; a clear error here costs no worker start-up."""
    data = config.data if "://" in config.data else os.path.abspath(config.data)
    try:
        manifest = read_manifest(data)
    except ValueError as exc:
        raise CnnflowError(str(exc)) from None
    rows = manifest.get("num_rows", {})
    for split in (TRAIN, VAL):
        if not rows.get(split):
            raise CnnflowError(f"{data} has no {split} images (num_rows: {rows}); run prep with labels and a val split")
    if config.weights and not os.path.exists(config.weights):
        raise CnnflowError(f"--weights {config.weights}: no such file")
    spec = ModelSpec(config.model, len(manifest["classes"]), manifest["image_size"], model_options(config))
    try:
        build_model(spec)
    except ValueError as exc:
        raise CnnflowError(f"model {config.model!r} on {spec.image_size} px images: {exc}") from None
    register_as = config.register_as or PurePosixPath(data.rstrip("/")).name
    if not config.register_as:  # the default comes from a folder name: MLflow's rules apply to it too
        check_model_name(register_as, "the registered model name (DATA's folder name; choose one with --register-as)")
    epochs = config.epochs or budget_epochs(int(rows[TRAIN]), config.batch_size * config.workers)
    tta = config.tta if config.hflip else "none"  # a mirror is only the same image to a model trained on mirrors
    return Plan(config, data, manifest, spec, register_as, epochs, tta)


def resolved_options(p: Plan) -> dict[str, Any]:
    return {**to_dict(p.config), "data": p.data, "register_as": p.register_as, "epochs": p.epochs, "tta": p.tta}


def scaling_for(config: TrainConfig) -> Any:
    """Worker resources that leave the data pipeline a CPU: pools that take every CPU hang."""
    import ray
    from ray.train import ScalingConfig

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if config.gpu:
        if gpus < config.workers:
            raise CnnflowError(f"--gpu --workers {config.workers} needs {config.workers} GPUs; this Ray has {gpus:g}")
        return ScalingConfig(
            num_workers=config.workers,
            use_gpu=True,
            resources_per_worker={"CPU": 1, "GPU": 1},
            placement_strategy="SPREAD",
        )
    if cpus < config.workers:
        raise CnnflowError(f"--workers {config.workers} needs {config.workers} CPUs; this Ray has {cpus:g}")
    # Reserve one logical CPU for reading shards; workers share the rest (at most 1 each).
    per_worker = min(1.0, max(cpus - 1, 0) / config.workers)
    return ScalingConfig(
        num_workers=config.workers,
        use_gpu=False,
        resources_per_worker={"CPU": per_worker},
        # One worker per node where there are enough nodes: each then takes its node's
        # cores as torch threads (cpus_per_node); on one machine SPREAD still packs.
        placement_strategy="SPREAD",
    )


def cpus_per_node() -> int:
    """CPUs of the smallest node: each worker takes its share as torch threads."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    return int(min(node_cpus)) if node_cpus else 1


def run_tags(p: Plan) -> dict[str, str]:
    import ray

    m = p.manifest
    return {
        "content_hash": str(m.get("content_hash", "")),
        "data": p.data,
        "classes": ",".join(m["classes"])[:4000],
        "num_classes": str(len(m["classes"])),
        "model": p.spec.name,
        "workers": str(p.config.workers),
        "device": "gpu" if p.config.gpu else "cpu",
        "cnnflow_version": __version__,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }
