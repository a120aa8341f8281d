"""The Ray Data side of `cnnflow predict`: inputs -> decoded pixels -> model actors -> rows.

    paths --decode tasks (CPU)--> image bytes | error --Scorer actors (model)--> output rows

Both kinds of INPUT meet in the middle in the shard format: a binary `image` column of
raw uint8 pixels (size x size x 3, RGB), so a prep output skips the decode stage and an
image folder is decoded with prep's own `decode_image`. Rows that could not be read or
decoded carry `error` and a null `image` and pass through the model stage untouched, so
every input yields exactly one output row, even one whose decoding kills its worker
(`decode_batch`).

How the work is spread over CPUs matters more than anything else here (measured on a
2-core machine, see bench/bench_predict.py): the model actors must leave at least one
CPU of Ray's accounting to the decode tasks, or the pipeline starves and hangs, and
torch's threads in the actors are set from the CPUs the pool may really use.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_prep import schema
from data_prep.decode import Limits, UndecodableImage, decode_image, read_file
from data_prep.isolate import CRASHED, run_isolating

# The output table (docs/architecture.md, Formats); `probabilities` follow the model's classes order.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("probabilities", pa.list_(pa.float32())),
        pa.field("model_uri", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

# Files per decode task: enough to amortise a task's ~ms overhead, small enough that the
# blocks (256 x 48 KiB at 128 px = 12 MiB) stream through the object store.
DECODE_BATCH = 256
MIN_QUEUE_BYTES = 64 * 2**20  # object store for blocks between stages, at least
ACTOR_CPUS = 0.25  # Ray's logical CPUs per model replica, at most (see plan_pool)
# Images per model call when --batch-size is not given: on CPU the time per image is flat
# from 32 to 256 (measured) while activation memory grows with the batch; GPUs want more.
CPU_BATCH, GPU_BATCH = 64, 256


@dataclass(frozen=True)
class PoolPlan:
    """How many model replicas run, and what each one asks of Ray and of torch."""

    replicas: int
    actor_cpus: float  # Ray's logical CPUs per replica
    actor_gpus: float
    torch_threads: int  # intra-op threads per replica
    decode_cpus: float  # Ray's logical CPUs per decode task


def plan_pool(workers: int, *, gpu: bool, cluster_cpus: float, cluster_gpus: float) -> PoolPlan:
    """Size the model pool so that decoding always keeps CPUs.

    Ray schedules by logical CPUs: a pool that holds every CPU leaves none for the decode
    tasks that feed it, and the job waits forever. So a decode task asks for one CPU
    (half of one on a single-CPU Ray) and the replicas share what is left after one
    decode task, at most ACTOR_CPUS each. Asking for a different amount than the decode
    tasks also keeps Ray Data from fusing decoding into the actors, where it would take
    turns with the model instead of running beside it.

    Torch threads are the physical side: the replicas split the machine's cores between
    them, and the decode tasks run beside them (decoding at draft scale is a small share
    of the work next to a CNN, see bench/bench_predict.py).
    """
    decode_cpus = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    if gpu:
        if cluster_gpus < 1:
            from workflows.errors import CnnflowError

            raise CnnflowError("--gpu was given but the Ray cluster has no GPUs")
        replicas = min(workers, int(cluster_gpus))
    else:
        replicas = workers
    free = cluster_cpus - decode_cpus
    return PoolPlan(
        replicas=replicas,
        actor_cpus=min(ACTOR_CPUS, free / replicas),
        actor_gpus=1.0 if gpu else 0.0,
        torch_threads=1 if gpu else max(1, math.floor(cluster_cpus / replicas)),  # on GPU one thread feeds it
        decode_cpus=decode_cpus,
    )


# --- decode stage (Ray tasks) ------------------------------------------------------------


def decode_files(
    paths: list[str], *, filesystem: pafs.FileSystem, root: str, size: int, resize: str, limits: Limits
) -> list[tuple[bytes | None, str | None]]:
    """Paths relative to `root` -> (raw pixels, None), or (None, why not) for each."""
    out: list[tuple[bytes | None, str | None]] = []
    for rel in paths:
        try:
            data = read_file(filesystem, f"{root}/{rel}", max_bytes=limits.max_bytes)
            decoded = decode_image(data, size=size, resize=resize, max_pixels=limits.max_pixels)
        except UndecodableImage as exc:  # also a file over the size cap, never read
            out.append((None, str(exc)))
        except OSError as exc:
            out.append((None, f"unreadable: {exc}"))
        else:
            out.append((decoded.pixels.tobytes(), None))
    return out


_decode_files = ray.remote(decode_files)


def decode_batch(batch: pa.Table, **options: Any) -> pa.Table:
    """Paths relative to `root` -> `image` (raw pixels, null on error) and `error`.

    The files are decoded in a task of their own so that one that kills its worker (a
    codec crash, the OOM killer) is found and becomes an error row (data_prep/isolate.py)
    instead of failing this block, which Ray Data would retry forever (its tasks' default;
    Ray 2.60 sets their retries only through the deprecated `ray_remote_args`, and a task
    lost with its node should be retried). That task asks Ray for no CPU and runs on this
    node: this Ray Data task holds the CPU and waits for it.
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    decode = _decode_files.options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    results, poison = run_isolating(lambda part: decode.remote(list(part), **options), batch.column("path").to_pylist())
    for k in poison:
        results[k] = (None, CRASHED)
    return pa.table(
        {
            "path": batch.column("path"),
            "image": pa.array([image for image, _ in results], pa.binary()),
            "error": pa.array([error for _, error in results], pa.string()),
        }
    )


def drop_scored(batch: pa.Table, *, scored: pa.Array) -> pa.Table:
    """Rows of a prep shard whose path was already scored by an earlier run go."""
    return batch.filter(pc.invert(pc.is_in(batch.column("path"), value_set=scored)))


def shard_rows(batch: pa.Table) -> pa.Table:
    """A prep shard's rows in the stage format: pixels already decoded, no errors."""
    return pa.table(
        {
            "path": batch.column("path"),
            "image": batch.column("image"),
            "error": pa.nulls(batch.num_rows, pa.string()),
        }
    )


# --- model stage (Ray actors) ------------------------------------------------------------


class Scorer:
    """One model replica: built once per actor from plain weights, lives for the job."""

    def __init__(
        self,
        state: dict[str, Any],
        preprocessing: dict[str, Any],
        model_uri: str,
        torch_threads: int,
        gpu: bool,
    ) -> None:
        import torch

        from cnn.inference import class_probabilities, for_inference, mixed_probabilities, test_time_augmentation
        from cnn.models import model_from_state
        from cnn.transforms import Normalize

        torch.set_num_threads(torch_threads_here(torch_threads))
        self.torch = torch
        if isinstance(state, ray.ObjectRef):  # the weights travel once, through the object store
            state = ray.get(state)
        self.device = torch.device("cuda" if gpu else "cpu")
        model, _ = model_from_state(state)
        # channels_last: what GPU tensor cores want, and on CPU it measured faster for
        # these convnets too (as in training, workflows/train/driver.py).
        self.model = for_inference(model).to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalize(
            mean=preprocessing["mean"], std=preprocessing["std"], channels_last=True
        ).to(self.device)
        self.classes = pa.array(preprocessing["classes"], pa.string())
        self.size = int(preprocessing["image_size"])
        self.model_uri = model_uri
        self.tta = test_time_augmentation(preprocessing)  # as validation scored it
        # bf16 on a GPU that has it; on CPU the pyfunc model's float32, so scores match it.
        bf16 = gpu and torch.cuda.is_bf16_supported()
        self.forward = mixed_probabilities if bf16 else class_probabilities

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, classes)."""
        torch = self.torch
        # uint8 goes to the device (4x less to copy than float); normalise there.
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        return self.forward(self.model, self.normalize, x, tta=self.tta).cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Stage rows (path, image, error) -> output rows; error rows pass through unscored."""
        n, width = batch.num_rows, len(self.classes)
        ok = pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False)
        probs = np.zeros((0, width), np.float32)
        if ok.any():
            probs = self.probabilities(schema.pixels(pc.filter(batch.column("image"), pa.array(ok)), self.size))
        # Scatter the scored rows back among the error rows (null there), in input order.
        best = np.zeros(n, np.int64)
        best[ok] = probs.argmax(axis=1)
        score = np.zeros(n, np.float32)
        score[ok] = probs.max(axis=1)
        offsets = np.concatenate([[0], np.cumsum(np.where(ok, width, 0))]).astype(np.int32)
        missing = pa.array(~ok)
        return pa.Table.from_arrays(
            [
                batch.column("path").combine_chunks(),
                self.classes.take(pa.array(best, mask=~ok)),
                pa.array(score, pa.float32(), mask=~ok),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1), pa.float32()), mask=missing),
                pa.repeat(self.model_uri, n).cast(pa.string()),
                batch.column("error").combine_chunks(),
            ],
            schema=OUTPUT_SCHEMA,
        )


def torch_threads_here(requested: int) -> int:
    """Never more threads than the cores of the node an actor landed on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(requested, cores))
