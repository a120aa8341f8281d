"""Inference, shared by the batch job, the pyfunc model and promotion: pixels in, probabilities out.

`class_probabilities` is the reference: float32, the model as trained, with the model's
test-time augmentation (`tta`) and fitted temperature (`temperature`), both from its
preprocessing contract, applied exactly as validation applied them: each view's logits
are divided by the temperature, then the views' softmaxes are averaged (`softmax_views`).
`for_inference` gives the same function faster (BatchNorm folded into convolutions), and
`mixed_probabilities` runs it in bf16, recomputing in float32 the rows where bf16 could
have changed the label. `cnn/calibration.py` fits the temperature.
"""
from __future__ import annotations

import torch
from torch import nn

from cnn.transforms import Normalize

# bf16 keeps a row's label only when its top two logits are this far apart; rows closer
# than this are recomputed in float32 (bf16 keeps ~3 significant digits per value).
BF16_MARGIN = 0.25
# Test-time augmentations: "flip" averages the probabilities of each image and its mirror
# (only meaningful for a model trained with flips).
TTA_MODES = ("none", "flip")


def test_time_augmentation(preprocessing: dict) -> str:
    """The model's TTA as its preprocessing.json records it; models logged before it was
    recorded scored plain views."""
    return preprocessing.get("tta", "none")


def fitted_temperature(preprocessing: dict) -> float:
    """The model's temperature as its preprocessing.json records it; models logged before
    calibration existed scored at 1.0 (plain softmax)."""
    return float(preprocessing.get("temperature", 1.0))


def for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the convolution before it.

    The same function in fewer passes over memory: `simple` ran 1.3x faster on CPU
    (torch.fx's own conv-BN fusion). A model torch.fx cannot trace stays unfused.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - tracing fails on data-dependent control flow; fusion is only a speed-up
        return model


def views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The normalised batch as the model sees it under `tta`: itself, and its mirror for "flip"."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; known: {', '.join(TTA_MODES)}")
    return [x, x.flip(3)] if tta == "flip" else [x]


def softmax_views(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float (views, N, classes) logits -> (N, classes): the mean over views of softmax(logits / T)."""
    return torch.softmax(logits.float() / temperature, dim=2).mean(0)


@torch.inference_mode()
def view_logits(model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none") -> torch.Tensor:
    """uint8 (N, H, W, 3) pixels -> float32 (views, N, classes) logits, one view per `tta` view."""
    return torch.stack([model(v).float() for v in views(normalize(pixels), tta)])


@torch.inference_mode()
def class_probabilities(
    model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none", temperature: float = 1.0
) -> torch.Tensor:
    """uint8 (N, H, W, 3) pixels -> float (N, classes) softmax probabilities, in float32."""
    return softmax_views(view_logits(model, normalize, pixels, tta=tta), temperature)


@torch.inference_mode()
def mixed_probabilities(
    model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none", temperature: float = 1.0
) -> torch.Tensor:
    """As `class_probabilities`, with the model under bf16 autocast on the pixels' device.

    Near ties (top two logits of any view within BF16_MARGIN) go again in float32, so the
    labels are float32's; the probabilities of the other rows carry bf16's rounding (~1e-3).
    """
    x = normalize(pixels)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = torch.stack([model(v).float() for v in views(x, tta)])
    probs = softmax_views(logits, temperature)
    if probs.shape[1] > 1:
        # The margin is on the raw logits: dividing by T scales bf16's error and the gap alike.
        top2 = logits.topk(2, dim=2).values
        close = ((top2[..., 0] - top2[..., 1]) < BF16_MARGIN).any(0)
        if close.any():
            probs[close] = class_probabilities(model, normalize, pixels[close], tta=tta, temperature=temperature)
    return probs
