"""The MLflow model cnnflow logs: a pyfunc that classifies encoded image bytes.

A logged model holds two plain files (three with its training hashes) and no pickled weights:

    weights.pt          cnn.models.model_state(model, spec): tensors + constructor arguments,
                        loadable with torch.load(weights_only=True)
    preprocessing.json  {"classes", "image_size", "resize", "mean", "std"} from the manifest,
                        and "tta", the test-time augmentation validation used ("none" when
                        absent: models logged before it existed); from calibration on the
                        validation split (workflows/train/evaluation.py `calibrate`):
                        "temperature" (every logit is divided by it; 1.0 when absent),
                        "thresholds" (threshold -> coverage, precision: `--target-precision`)
                        and "drift_reference" (training's class shares, validation's score
                        histogram: workflows/predict/drift.py); models without them have no
                        threshold table and no drift figures
                        and "near_duplicate_distance" (the prep's, bits of 64) with:
    train_hashes.parquet  the training split's perceptual hashes: `phash` (int64) and
                        `path`, sorted by phash (data_prep/near_duplicates.py
                        `training_hashes`), for predict's `seen_in_training`; absent when
                        the shards had no hashes (format 1) and from models logged before it

`ImageClassifier.predict` takes a DataFrame with an `image` column of encoded bytes (any
format Pillow reads) and returns `label`, `score`, `probabilities` and `error` (null, or
why that row could not be decoded). Decoding is prep's own `load_image`, normalisation
is `cnn.transforms.Normalize`, so a pyfunc prediction matches `cnnflow predict`.

The model is logged "from code": a three-line file that imports this class (no pickle),
so loading needs cnnflow importable. It does not copy cnnflow's source (`code_paths`):
a copied snapshot would shadow the installed package on load, and prediction could then
decode images differently from the prep that made the training data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn

from cnn.inference import class_probabilities, fitted_temperature, test_time_augmentation
from cnn.models import ModelSpec, model_from_state
from cnn.transforms import Normalize
from data_prep.decode import Limits, load_image
from data_prep.options import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS

# predict's default budget, for the same rows (the byte cap bounds reading: bytes given in
# a DataFrame are decoded as given)
LIMITS = Limits.of(DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS)

WEIGHTS = "weights.pt"
PREPROCESSING = "preprocessing.json"
TRAIN_HASHES = "train_hashes.parquet"
PREPROCESSING_KEYS = ("classes", "image_size", "resize", "mean", "std")


def preprocessing_from_manifest(manifest: dict[str, Any], *, tta: str = "none") -> dict[str, Any]:
    """What prediction must repeat exactly: classes, size, resize mode, mean, std and tta."""
    return {**{key: manifest[key] for key in PREPROCESSING_KEYS}, "tta": tta}


def read_model_files(weights: str | Path, preprocessing: str | Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild the model (CPU, eval mode) from a logged model's two files."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model, spec = model_from_state(state)
    return model.eval(), spec, json.loads(Path(preprocessing).read_text())


def normalizer(preprocessing: dict[str, Any]) -> Normalize:
    return Normalize(mean=preprocessing["mean"], std=preprocessing["std"])


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame[image: bytes] -> DataFrame[label, score, probabilities, error]."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.spec, self.preprocessing = read_model_files(
            context.artifacts["weights"], context.artifacts["preprocessing"]
        )
        self.normalize = normalizer(self.preprocessing)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        size, resize = self.preprocessing["image_size"], self.preprocessing["resize"]
        classes = self.preprocessing["classes"]
        images, errors = [], []
        for data in model_input["image"]:
            loaded = load_image(data, size=size, resize=resize, limits=LIMITS)  # a row with its reason, never a silent drop
            images.append(loaded.decoded.pixels if loaded.error is None else None)
            errors.append(loaded.error)
        good = [i for i, img in enumerate(images) if img is not None]
        labels: list[str | None] = [None] * len(images)
        scores = np.full(len(images), np.nan, dtype=np.float32)
        probabilities: list[list[float] | None] = [None] * len(images)
        if good:
            pixels = torch.from_numpy(np.stack([images[i] for i in good]))
            probs = class_probabilities(
                self.model, self.normalize, pixels,
                tta=test_time_augmentation(self.preprocessing), temperature=fitted_temperature(self.preprocessing),
            )  # fmt: skip
            best_score, best = probs.max(dim=1)
            for row, k, s, p in zip(good, best.tolist(), best_score.tolist(), probs.tolist()):
                labels[row], scores[row], probabilities[row] = classes[k], s, p
        return pd.DataFrame({"label": labels, "score": scores, "probabilities": probabilities, "error": errors})
