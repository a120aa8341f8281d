"""The per-worker training loop that Ray Train runs on every worker (`train_loop`).

Each worker reads its own shard of the train and val datasets, converts Arrow batches of
raw pixels to uint8 tensors without a per-row loop, and normalises and augments them on
its device. Every epoch ends with validation (sharded, sums all-reduced), one
`ray.train.report` with a checkpoint (model, optimizer, scheduler, epoch, that epoch's
metrics), and rank 0 logging that epoch's metrics into the driver's MLflow run at
step=epoch. A restarted worker group resumes from the last checkpoint at epoch + 1, so
no epoch is logged twice.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn

from cnn.models import ModelSpec, build_model, model_state
from cnn.transforms import BatchAugment, Normalize
from data_prep.schema import pixels
from workflows import tracking

CHECKPOINT_FILE = "checkpoint.pt"
WARMUP_EPOCHS = 1  # linear warm-up to the peak lr, then linear decay to 0 (one-cycle)
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
    optimizer: str
    weight_decay: float
    label_smoothing: float
    hflip: bool
    max_shift: float
    seed: int
    channels_last: bool
    cpus_per_node: int  # workers on a node share its cores as torch intra-op threads
    tracking_uri: str
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardBatch(ArrowBatchCollateFn):
    """Arrow batch of shard rows -> (uint8 (N, S, S, 3), int64 (N,)) tensors."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(pixels(batch["image"], self.image_size).copy())  # one memcpy
        labels = torch.tensor(batch["label"].to_numpy(), dtype=torch.long)
        return images, labels


def make_optimizer(name: str, params: Any, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


def one_cycle(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first epoch, then linear decay to zero at the last step."""
    total = max(1, steps_per_epoch * epochs)
    warmup = max(1, min(total // 2, steps_per_epoch * WARMUP_EPOCHS))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    normalize = Normalize(mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last).to(device)
    augment = BatchAugment(hflip=cfg.hflip, max_shift=cfg.max_shift).to(device)
    # equal=True splits give every worker train_rows // world rows.
    steps_per_epoch = math.ceil((cfg.train_rows // world) / cfg.batch_size)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = one_cycle(optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)

    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        getattr(model, "module", model).load_state_dict(state["model"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            # The worker may have died between saving this checkpoint and logging its epoch.
            if state["epoch"] not in tracking.logged_epochs(cfg.tracking_uri, cfg.run_id, "val_acc"):
                tracking.log_epoch(cfg.tracking_uri, cfg.run_id, state["epoch"], state["metrics"])
            tracking.set_tags(cfg.run_id, {"resumed_from_epoch": state["epoch"]}, uri=cfg.tracking_uri)
        sys.stdout.write(f"resuming from the checkpoint of epoch {state['epoch']}\n")

    collate = ShardBatch(spec.image_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
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
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        train_time = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]

        val_loss, val_correct, val_seen = evaluate_shard(model, val_shard, collate, normalize, autocast, device)
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
                        "model": model_state(model, spec),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "metrics": metrics,
                    },
                    os.path.join(tmp, CHECKPOINT_FILE),
                )
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "epoch": epoch}, checkpoint=saved)
        if rank == 0:
            # Log only once the controller has committed this checkpoint (report returns
            # before that): from then on a restart resumes at epoch + 1, never repeats it.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            tracking.log_epoch(cfg.tracking_uri, cfg.run_id, epoch, metrics)
            # sys.stdout, not print: Ray Train reroutes print to its logger, which doubles lines.
            sys.stdout.write(
                f"epoch {epoch}/{cfg.epochs}  train_loss {metrics['train_loss']:.4f}  "
                f"train_acc {metrics['train_acc']:.3f}  val_loss {metrics['val_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.3f}  {metrics['images_per_s']:.0f} images/s  "
                f"{metrics['epoch_time_s']:.1f}s\n"
            )
            sys.stdout.flush()


@torch.inference_mode()
def evaluate_shard(
    model: nn.Module,
    shard: Any,
    collate: ShardBatch,
    normalize: Normalize,
    autocast: torch.autocast,
    device: torch.device,
) -> tuple[float, int, int]:
    """Summed loss, correct predictions and rows of this worker's validation shard."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in shard.iter_torch_batches(batch_size=256, collate_fn=collate, prefetch_batches=2):
        with autocast:
            logits = model(normalize(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return loss_sum, correct, seen
