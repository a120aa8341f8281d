"""Pure PyTorch: model definitions, a name -> builder registry, summary, batch transforms.

No Ray, no MLflow, no file I/O here (docs/architecture.md, import rules). The names
below are imported when first used, so that `cnn.registry` (the models and their
options, torch-free) can be read without loading PyTorch.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "MODELS": "cnn.registry",
    "ModelSpec": "cnn.models",
    "build_model": "cnn.models",
    "model_from_state": "cnn.models",
    "model_state": "cnn.models",
    "LayerRow": "cnn.summary",
    "summarize": "cnn.summary",
    "BatchAugment": "cnn.transforms",
    "Normalize": "cnn.transforms",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'cnn' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
