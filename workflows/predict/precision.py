"""`--precision`: what arithmetic the model replicas score in, and the check that bf16 on a
CPU is both fast here and labels as float32 does.

float32 is the default on CPU so that `cnnflow predict` and the pyfunc model give the
same scores. bf16 (`cnn.inference.mixed_probabilities`: bf16 autocast, near ties again in
float32) is opt-in there: on a CPU with bf16 units it ran the `simple` network 1.7x
faster, and its probabilities drift ~1e-3 from float32's. Before such a job the driver
scores a sample both ways and says how many labels differ (`check_sample`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workflows.errors import CnnflowError

if TYPE_CHECKING:
    import pyarrow as pa

    from data_prep.decode import Limits
    from workflows.predict.inputs import Inputs

SAMPLE = 256  # images scored both ways before a bf16 job on CPU
# CPU flags of bf16 arithmetic units: x86 (AVX-512 BF16, AMX) and Arm (FEAT_BF16).
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 units; without them torch emulates bf16, slower than float32."""
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no cheap way to know, so no
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(BF16_FLAGS & set(value.split()))
    return False


def use_bf16(precision: str, *, gpu: bool) -> bool:
    """What a replica runs in, decided where it runs (a GPU's bf16 support is known there)."""
    if precision == "bf16":
        return True
    if precision == "auto" and gpu:
        import torch

        return torch.cuda.is_bf16_supported()
    return False


def check_cpu(precision: str, *, gpu: bool) -> None:
    """Refuse `--precision bf16` on CPU where it could only be slower."""
    if precision == "bf16" and not gpu and not cpu_has_bf16():
        raise CnnflowError(
            "--precision bf16: this CPU has no bf16 units (avx512_bf16, amx_bf16 or Arm bf16), "
            "so bf16 would run slower than float32; leave --precision out"
        )


@dataclass(frozen=True)
class SampleCheck:
    sampled: int
    labels_differ: int
    max_probability_change: float

    def line(self) -> str:
        return (
            f"  bf16: {self.labels_differ} of {self.sampled} sampled labels differ from float32 "
            f"(largest probability change {self.max_probability_change:.4f})"
        )


def check_sample(classifier: Any, inputs: Inputs, todo: pa.Array, limits: Limits) -> SampleCheck | None:
    """Score up to SAMPLE of the images to do in float32 and in bf16, in this process,
    through the replicas' own `Scorer` (same model folding, normalisation and TTA)."""
    from cnn.models import model_state
    from workflows.predict.scorer import Scorer

    pixels = sample_pixels(inputs, todo, classifier.preprocessing, limits)
    if not len(pixels):
        return None
    state = model_state(classifier.model, classifier.spec)
    full, mixed = (
        Scorer(state, classifier.preprocessing, classifier.uri, os.cpu_count() or 1, gpu=False, precision=p)
        .probabilities(pixels)
        for p in ("fp32", "bf16")
    )
    return SampleCheck(
        sampled=len(pixels),
        labels_differ=int((full.argmax(1) != mixed.argmax(1)).sum()),
        max_probability_change=float(np.abs(full - mixed).max()),
    )


def sample_pixels(inputs: Inputs, todo: pa.Array, preprocessing: dict[str, Any], limits: Limits) -> np.ndarray:
    """uint8 (n, size, size, 3) of the first images to do that decode, at most SAMPLE."""
    import pyarrow.compute as pc

    from data_prep.decode import load_image
    from data_prep.schema import SPLITS
    from data_prep.shard_reader import iter_batches, to_pixels

    size = int(preprocessing["image_size"])
    if inputs.shards:
        for batch in iter_batches(inputs.shards, SPLITS, columns=["path", "image"], batch_size=SAMPLE):
            batch = batch.filter(pc.is_in(batch.column("path"), value_set=todo))
            if batch.num_rows:
                return to_pixels(batch.column("image"), size)
        return np.zeros((0, size, size, 3), np.uint8)
    decoded = []
    for rel in todo.slice(0, SAMPLE).to_pylist():
        loaded = load_image(f"{inputs.root}/{rel}", size=size, resize=preprocessing["resize"],
                            limits=limits, filesystem=inputs.filesystem)  # fmt: skip
        if loaded.error is None:
            decoded.append(loaded.decoded.pixels)
    return np.stack(decoded) if decoded else np.zeros((0, size, size, 3), np.uint8)
