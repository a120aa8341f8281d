"""The per-worker training loop that Ray Train runs on every worker (`train_loop`).

Each worker reads its own shard of the train and val datasets, converts Arrow batches of
raw pixels to uint8 tensors without a per-row loop, and normalises and augments them on
its device. The learning rate follows torch's `OneCycleLR`; with `ema`, an exponential
moving average of the weights (torch's `AveragedModel`) is what validation scores and
what the checkpoint offers for registration. Every epoch ends with validation (sharded,
sums all-reduced, with the flip test-time augmentation when `tta` says so), one
`ray.train.report` with a checkpoint (the weights to register, the state to resume from,
epoch, that epoch's metrics), and rank 0 logging that epoch's metrics into the driver's
MLflow run at step=epoch. The controller keeps the best epoch by `val_acc` (and the
latest, to resume from). A restarted worker group resumes from the latest checkpoint at
epoch + 1, so no epoch is logged twice.

Reproducibility: the same seed gives the same initial weights, the same data order
(seeded file and local shuffles, order-preserving reads, see `driver.read_split`) and
the same augmentation (torch's RNG is reseeded from (seed, epoch, rank) every epoch, so
a resumed run draws what an uninterrupted one would have).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cnn.inference import class_probabilities
from cnn.models import ModelSpec, build_model, model_state
from cnn.transforms import BatchAugment, Normalize
from data_prep.shard_reader import to_pixels
from workflows import tracking

CHECKPOINT_FILE = "checkpoint.pt"
# Rows a worker mixes before cutting batches; shards may hold runs of one class.
SHUFFLE_BUFFER_ROWS = 2048
# A file the loop writes with its pid, so that a test can kill a real worker process.
PID_FILE_ENV = "CNNFLOW_WORKER_PID_FILE"


@dataclass
class LoopConfig:
    """What each worker needs, as plain values (sent to the workers by Ray)."""

    spec: dict[str, Any]  # ModelSpec as a dict
    mean: list[float]
    std: list[float]
    train_rows: int
    epochs: int
    batch_size: int  # per worker
    lr: float
    warmup: float  # share of the steps spent rising to `lr`
    optimizer: str
    weight_decay: float
    label_smoothing: float
    hflip: bool
    max_shift: float
    ema: float  # decay per step of the weights' moving average; 0: no average
    tta: str  # "flip": validation averages each image with its mirror, as predict will
    seed: int
    channels_last: bool
    cpus_per_node: int  # workers on a node share its cores as torch intra-op threads
    tracking_uri: str
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardBatch(ArrowBatchCollateFn):
    """Arrow batch of shard rows -> (uint8 (N, S, S, 3), int64 (N,)) tensors.

    `image_size`, when given, is checked against every row."""

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_pixels(batch["image"], self.image_size)
        images = torch.from_numpy(images if images.flags.writeable else images.copy())  # one memcpy either way
        labels = torch.tensor(batch["label"].to_numpy(), dtype=torch.long)
        return images, labels


def make_optimizer(name: str, params: Any, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


def one_cycle(
    optimizer: torch.optim.Optimizer, *, lr: float, steps_per_epoch: int, epochs: int, warmup: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's one-cycle: cosine warm-up to `lr` over `warmup` of the steps, cosine down to ~0."""
    total = max(2, steps_per_epoch * epochs)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=warmup)


def moving_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics, or None."""
    if decay <= 0:
        return None
    return AveragedModel(getattr(model, "module", model), multi_avg_fn=warmed_ema(decay), use_buffers=True)


def warmed_ema(decay: float) -> Callable[..., None]:
    """EMA whose decay ramps up as (1 + n) / (10 + n) to `decay` (n: updates so far).

    TensorFlow's ExponentialMovingAverage rule. With a fixed 0.999 (torch's
    get_ema_multi_avg_fn) the first weights, near the random start, still weigh 0.999**750
    = 47% after a 750-step run, and the average scored at chance on the bench's photo set.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # BatchNorm's batch counter: a count, not a weight
                a.copy_(c)

    return update


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (run seed, epoch, worker): augmentation and shuffles differ by epoch."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def all_reduce_sums(*values: float, device: torch.device) -> list[float]:
    """Sum counters over all workers (a no-op with one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_loop(config_dict: dict[str, Any]) -> None:
    cfg = LoopConfig(**config_dict)
    # Ray Train gives this worker's root logger level INFO and a console handler, and its
    # per-report "Reporting training result" line comes from a logger named after a file
    # path, which the RunConfig's LoggingConfig (ray.train.* only) does not reach. The
    # epoch lines below are ours; Train's own stay in its log files.
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if os.environ.get(PID_FILE_ENV):
        with open(f"{os.environ[PID_FILE_ENV]}.{rank}", "w") as f:
            f.write(str(os.getpid()))
    torch.set_num_threads(max(1, cfg.cpus_per_node // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)  # same initial weights everywhere; DDP broadcasts rank 0's anyway

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    spec = ModelSpec(**cfg.spec)
    model = build_model(spec)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    ema = moving_average(model, cfg.ema)
    scored = ema.module if ema is not None else getattr(model, "module", model)  # what validation scores
    normalize = Normalize(mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last).to(device)
    augment = BatchAugment(hflip=cfg.hflip, max_shift=cfg.max_shift).to(device)
    # equal=True splits give every worker train_rows // world rows.
    steps_per_epoch = math.ceil((cfg.train_rows // world) / cfg.batch_size)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = one_cycle(optimizer, lr=cfg.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, warmup=cfg.warmup)

    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        resume = state["resume"]
        getattr(model, "module", model).load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            # The worker may have died between saving this checkpoint and logging its epoch.
            if state["epoch"] not in tracking.logged_epochs(cfg.tracking_uri, cfg.run_id, "val_acc"):
                tracking.log_epoch(cfg.tracking_uri, cfg.run_id, state["epoch"], state["metrics"])
            tracking.set_tags(cfg.run_id, {"resumed_from_epoch": state["epoch"]}, uri=cfg.tracking_uri)

    collate = ShardBatch(spec.image_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        seed = epoch_seed(cfg.seed, epoch, rank)
        torch.manual_seed(seed)  # this epoch's flips and shifts
        model.train()
        augment.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for images, labels in train_shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            collate_fn=collate,
            prefetch_batches=2,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, cfg.batch_size),
            local_shuffle_seed=seed,
            pin_memory=on_gpu,
        ):
            x = augment(normalize(images))  # uint8 (N, S, S, 3) -> float (N, 3, S, S)
            if cfg.channels_last:  # the augment's gather returns NCHW memory
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(getattr(model, "module", model))
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        train_time = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]

        val_loss, val_correct, val_seen = evaluate_shard(scored, val_shard, collate, normalize, autocast, cfg.tta)
        t_loss, t_correct, t_seen, v_loss, v_correct, v_seen = all_reduce_sums(
            loss_sum.item(), correct.item(), seen, val_loss, val_correct, val_seen, device=device
        )
        metrics = {
            "train_loss": t_loss / max(t_seen, 1),
            "train_acc": t_correct / max(t_seen, 1),
            "val_loss": v_loss / max(v_seen, 1),
            "val_acc": v_correct / max(v_seen, 1),
            "lr": lr,
            # every worker's images over this worker's train time (workers run in lockstep)
            "images_per_s": t_seen / max(train_time, 1e-9),
            "epoch_time_s": time.perf_counter() - started,
        }

        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                torch.save(
                    {
                        "model": model_state(scored, spec),  # what gets registered if this epoch is best
                        "resume": {
                            "model": getattr(model, "module", model).state_dict(),
                            "ema": ema.state_dict() if ema is not None else None,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                        },
                        "epoch": epoch,
                        "metrics": metrics,
                    },
                    os.path.join(tmp, CHECKPOINT_FILE),
                )
                saved = ray.train.Checkpoint.from_directory(tmp)
            # progress: the share of this run's schedule done, what a search's ASHA compares
            # at (workflows/tune/space.py: PROGRESS)
            ray.train.report({**metrics, "epoch": epoch, "progress": epoch / cfg.epochs}, checkpoint=saved)
        if rank == 0:
            # Log only once the controller has committed this checkpoint (report returns
            # before that): from then on a restart resumes at epoch + 1, never repeats it.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            tracking.log_epoch(cfg.tracking_uri, cfg.run_id, epoch, metrics)  # the driver prints it from there


@torch.inference_mode()
def evaluate_shard(
    model: nn.Module,
    shard: Any,
    collate: ShardBatch,
    normalize: Normalize,
    autocast: torch.autocast,
    tta: str,
) -> tuple[float, int, int]:
    """Summed loss, correct predictions and rows of this worker's validation shard.

    Scored with `class_probabilities`, the function predict and the pyfunc model use, so
    validation accuracy is what a registered model does on the same pixels.
    """
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in shard.iter_torch_batches(batch_size=256, collate_fn=collate, prefetch_batches=2):
        with autocast:
            probs = class_probabilities(model, normalize, images, tta=tta)
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").item()
        correct += int((probs.argmax(1) == labels).sum())
        seen += len(labels)
    return loss_sum, correct, seen
