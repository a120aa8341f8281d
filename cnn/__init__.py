"""Pure PyTorch: model definitions, a name -> builder registry, summary, batch transforms.

No Ray, no MLflow, no file I/O here (docs/architecture.md, import rules).
"""
from cnn.models import MODELS, ModelSpec, build_model, model_from_state, model_state
from cnn.summary import LayerRow, summarize
from cnn.transforms import BatchAugment, Normalize

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "model_from_state",
    "model_state",
    "LayerRow",
    "summarize",
    "BatchAugment",
    "Normalize",
]
