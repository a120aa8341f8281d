"""The model stage of `cnnflow predict`: one `Scorer` per Ray actor, a model replica for the job.

A replica is built once per actor from plain weights (sent once through the object
store), scores decoded pixels with the model's normalisation, test-time augmentation and
temperature (by default bf16 on a GPU that has it, float32 on CPU, as the pyfunc model), and passes rows that
carry an error through unscored, so every input yields exactly one output row. With a
minimum score (`--min-score`, or the one `--target-precision` picked), a row whose top
score is below it keeps its score and probabilities but no label, and says why in `unsure`.
With `embeddings`, the same forward pass also gives each row's penultimate features
(`cnn.inference.scored` on the fused model split at its head), float32 whatever the precision.
A model logged with its training split's perceptual hashes gets each row's hash taken
of the very pixels the model scores (prep hashed the pixels it wrote, the same function
at the same size) and looked up among them (`NearestIndex`, built once per replica):
`seen_in_training` names the closest training image within the model's distance.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from data_prep.near_duplicates import NearestIndex
from data_prep.options import DEFAULT_NEAR_DUPLICATE_DISTANCE
from data_prep.phash import from_signed, phash_batch
from data_prep.shard_reader import to_pixels
from workflows.predict.output import SCORED_SCHEMA
from workflows.predict.precision import use_bf16


class Scorer:
    """One model replica: built once per actor from plain weights, lives for the job."""

    def __init__(
        self,
        state: dict[str, Any],
        preprocessing: dict[str, Any],
        model_uri: str,
        torch_threads: int,
        gpu: bool,
        precision: str,
        min_score: float | None = None,
        embeddings: bool = False,
        train_hashes: Any = None,
    ) -> None:
        import torch

        from cnn.inference import fitted_temperature, for_inference, scored, test_time_augmentation
        from cnn.models import model_from_state
        from cnn.transforms import Normalize

        torch.set_num_threads(torch_threads_here(torch_threads))
        self.torch = torch
        if isinstance(state, ray.ObjectRef):  # the weights travel once, through the object store
            state = ray.get(state)
        self.device = torch.device("cuda" if gpu else "cpu")
        model, _ = model_from_state(state)
        # channels_last: what GPU tensor cores want, and on CPU it measured faster for
        # these convnets too (as in training, workflows/train/driver.py). Split at its head
        # (cnn.models.Headed), so that the embeddings come from this same fused model.
        self.model = for_inference(model).to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalize(
            mean=preprocessing["mean"], std=preprocessing["std"], channels_last=True
        ).to(self.device)
        self.classes = pa.array(preprocessing["classes"], pa.string())
        self.size = int(preprocessing["image_size"])
        self.model_uri = model_uri
        self.tta = test_time_augmentation(preprocessing)  # as validation scored it
        self.temperature = fitted_temperature(preprocessing)
        self.min_score = min_score
        # By default bf16 on a GPU that has it; on CPU the pyfunc model's float32, so
        # scores match it, unless --precision bf16 (workflows/predict/precision.py).
        self.bf16 = use_bf16(precision, gpu=gpu)
        self.embeddings = embeddings
        self.scored = scored
        self.seen: NearestIndex | None = None  # the training images' hashes, when the model has them
        if train_hashes is not None:
            if isinstance(train_hashes, ray.ObjectRef):  # sent once, as the weights are
                train_hashes = ray.get(train_hashes)
            distance = int(preprocessing.get("near_duplicate_distance", DEFAULT_NEAR_DUPLICATE_DISTANCE))
            self.seen = NearestIndex(from_signed(train_hashes.column("phash").to_numpy()), distance)
            self.seen_paths = train_hashes.column("path").combine_chunks()

    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, H, W, 3) -> float32 (N, classes) probabilities and, with embeddings,
        float32 (N, F) features, from one forward pass."""
        torch = self.torch
        # uint8 goes to the device (4x less to copy than float); normalise there.
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        out = self.scored(
            self.model, self.normalize, x, tta=self.tta, temperature=self.temperature, bf16=self.bf16,
            features=self.embeddings,
        )  # fmt: skip
        return out.probabilities.cpu().numpy(), None if out.features is None else out.features.cpu().numpy()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, classes)."""
        return self.score(pixels)[0]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Stage rows (path, image, error) -> output rows; error rows pass through unscored."""
        n, width = batch.num_rows, len(self.classes)
        ok = pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False)
        probs, features = np.zeros((0, width), np.float32), None
        seen = np.full(n, -1, np.int64)  # index into the training hashes, -1: none near (or not checked)
        seen_bits = np.full(n, -1, np.int64)
        if ok.any():
            pixels = to_pixels(pc.filter(batch.column("image"), pa.array(ok)), self.size)
            probs, features = self.score(pixels)
            if self.seen is not None:
                seen[ok], seen_bits[ok] = self.seen.nearest(phash_batch(pixels))
        # Scatter the scored rows back among the error rows (null there), in input order.
        best = np.zeros(n, np.int64)
        best[ok] = probs.argmax(axis=1)
        score = np.zeros(n, np.float32)
        score[ok] = probs.max(axis=1)
        unsure = ok & (score < self.min_score) if self.min_score is not None else np.zeros(n, bool)
        return pa.Table.from_arrays(
            [
                batch.column("path").combine_chunks(),
                self.classes.take(pa.array(best, mask=~ok | unsure)),
                pa.array(score, pa.float32(), mask=~ok),
                rows_of(probs, ok),
                pa.repeat(self.model_uri, n).cast(pa.string()),
                batch.column("error").combine_chunks(),
                pa.array([unsure_reason(s, self.min_score) if u else None for s, u in zip(score.tolist(), unsure)], pa.string()),
                self.seen_paths.take(pa.array(seen, mask=seen < 0)) if (seen >= 0).any() else pa.nulls(n, pa.string()),
                pa.array(seen_bits, pa.int32(), mask=seen < 0),
                rows_of(features, ok),
            ],
            schema=SCORED_SCHEMA,
        )


def rows_of(values: np.ndarray | None, ok: np.ndarray) -> pa.ListArray:
    """float32 (ok.sum(), F) -> list<float32> per row, null where not `ok` (or all null
    when there are no values)."""
    n = len(ok)
    if values is None:
        return pa.nulls(n, pa.list_(pa.float32()))
    width = values.shape[1]
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, width, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values.reshape(-1), pa.float32()), mask=pa.array(~ok), type=pa.list_(pa.float32())
    )


def unsure_reason(score: float, min_score: float) -> str:
    """Why a scored row has no label: "score 0.41 < min-score 0.60"."""
    return f"score {score:.4f} < min-score {min_score:g}"


def torch_threads_here(requested: int) -> int:
    """Never more threads than the cores of the node an actor landed on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(requested, cores))
