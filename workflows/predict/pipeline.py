"""The Ray Data side of `cnnflow predict`: inputs -> decoded pixels -> model actors -> rows.

    paths --decode tasks (CPU)--> image bytes | error --Scorer actors (model)--> output rows

Both kinds of INPUT meet in the middle in the shard format: a binary `image` column of
raw uint8 pixels (size x size x 3, RGB), so a prep output (read by data_prep/shard_reader.py)
skips the decode stage and an image folder is read and decoded by prep's own `load_image`.
Rows that could not be read or decoded carry `error` and a null `image` and pass through
the model stage untouched, so every input yields exactly one output row, even one whose
decoding kills its worker (`decode_batch`). `build_dataset` joins the stages; the model stage is `scorer.py`.

How the work is spread over CPUs matters more than anything else here (measured on a
2-core machine, see bench/bench_predict.py): the model actors must leave at least one
CPU of Ray's accounting to the decode tasks, or the pipeline starves and hangs, and
torch's threads in the actors are set from the CPUs the pool may really use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_prep.decode import Limits, load_image
from data_prep.isolate import CRASHED, run_isolating
from data_prep.schema import SPLITS
from data_prep.shard_reader import read_dataset
from workflows.predict.scorer import Scorer

if TYPE_CHECKING:
    from workflows.config import PredictConfig
    from workflows.predict.inputs import Inputs

# Files per decode task (see decode_chunks): a task costs ~0.17 s besides its decoding on
# 2 cores, and 256 files take ~0.3 s, so 256-file tasks left the model waiting for 5 of
# its 13 s (8,000 files, `seed`); 1,024 (48 MiB at 128 px) still stream through the
# object store. The first tasks are small so that the first rows come soon.
DECODE_BATCH = 1024
FIRST_DECODE = 128
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
        loaded = load_image(f"{root}/{rel}", size=size, resize=resize, limits=limits, filesystem=filesystem)
        out.append((None, loaded.error) if loaded.error is not None else (loaded.decoded.pixels.tobytes(), None))
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


def decode_chunks(n: int, replicas: int) -> list[tuple[int, int]]:
    """(offset, length) of each decode task's files: FIRST_DECODE at first, doubling up to
    DECODE_BATCH. Small first tasks bring the first rows soon; large ones later spread a
    task's fixed cost (~0.17 s on 2 cores) over more files. A small job still gets a few
    tasks per replica, so that every replica has work."""
    top = max(16, min(DECODE_BATCH, -(-n // (4 * replicas))))
    chunks, size, offset = [], min(FIRST_DECODE, top), 0
    while offset < n:
        chunks.append((offset, min(size, n - offset)))
        offset += size
        size = min(2 * size, top)
    return chunks


def check_embedding_batch(width: int, batch_size: int) -> None:
    """A batch's embeddings are one Arrow list array, whose offsets are int32."""
    if width * batch_size >= 2**31:
        from workflows.errors import CnnflowError

        raise CnnflowError(
            f"--embeddings: {width:,} features a row x {batch_size:,} rows a batch pass Arrow's 2**31 values "
            f"in one list column; pass --batch-size {(2**31 - 1) // width} or less"
        )


# --- the dataset graph ------------------------------------------------------------------


def build_dataset(
    config: PredictConfig, inputs: Inputs, todo: pa.Array, classifier: Any, *, scored: pa.Array,
    min_score: float | None = None,
):  # fmt: skip
    """`todo` through the decode (or shard) stage and the Scorer pool, as one Ray Dataset of
    output rows; with the pool's plan. Rows scoring below `min_score` are unsure."""
    import ray.data

    from cnn.models import model_state, split_head

    resources = ray.cluster_resources()
    plan = plan_pool(
        config.workers, gpu=config.gpu, cluster_cpus=resources.get("CPU", 1), cluster_gpus=resources.get("GPU", 0)
    )
    size, resize = classifier.preprocessing["image_size"], classifier.preprocessing["resize"]
    batch_size = config.batch_size or (GPU_BATCH if config.gpu else CPU_BATCH)
    if config.embeddings:
        check_embedding_batch(split_head(classifier.model).feature_width, batch_size)
    if inputs.shards:
        ds = read_dataset(inputs.shards, SPLITS, columns=["path", "image"], num_cpus=plan.decode_cpus)
        if len(scored):
            ds = ds.map_batches(drop_scored, batch_format="pyarrow", batch_size=None,
                                num_cpus=plan.decode_cpus, fn_kwargs={"scored": scored})
        ds = ds.map_batches(shard_rows, batch_format="pyarrow", batch_size=None, num_cpus=plan.decode_cpus)
    else:
        chunks = [pa.table({"path": todo.slice(i, n)}) for i, n in decode_chunks(len(todo), plan.replicas)]
        ds = ray.data.from_arrow(chunks).map_batches(
            decode_batch,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=plan.decode_cpus,
            fn_kwargs={
                "filesystem": inputs.filesystem, "root": inputs.root, "size": size, "resize": resize,
                "limits": Limits.of(config.max_file_mb, config.max_megapixels),
            },
        )
    state = ray.put(model_state(classifier.model, classifier.spec))
    # the training images' hashes, for seen_in_training (None: the model was logged without them)
    hashes = None if classifier.train_hashes is None else ray.put(classifier.train_hashes)
    ds = ds.map_batches(
        Scorer,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={
            "state": state,
            "preprocessing": classifier.preprocessing,
            "model_uri": classifier.uri,
            "torch_threads": plan.torch_threads,
            "gpu": config.gpu,
            "precision": config.precision,
            "min_score": min_score,
            "embeddings": config.embeddings,
            "train_hashes": hashes,
        },
    )
    # Decoding outruns a CNN on CPU several times over: uncapped, the decoded blocks would
    # wait in the object store and memory would grow with the input. A few blocks per
    # replica keep the model busy; the cap applies to this dataset only. Ray Data enforces
    # it through its per-operator reservation, which configure_ray_data turns off for the
    # other stages: without it the cap was ignored (decoding ran 306 MiB ahead of the model
    # at N=8000, and peak memory grew 1.33x from 2000 to 16000 images; with it, 42 MiB).
    block_bytes = DECODE_BATCH * size * size * 3
    ds.context.op_resource_reservation_enabled = True
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=max(MIN_QUEUE_BYTES, 4 * plan.replicas * block_bytes)
    )
    return ds, plan
