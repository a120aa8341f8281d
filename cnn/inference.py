"""Inference, shared by the batch job, the pyfunc model and promotion: pixels in, probabilities out.

`class_probabilities` is the reference: float32, the model as trained, with the model's
test-time augmentation (`tta`) and fitted temperature (`temperature`), both from its
preprocessing contract, applied exactly as validation applied them: each view's logits
are divided by the temperature, then the views' softmaxes are averaged (`softmax_views`).
`for_inference` gives the same function faster (BatchNorm folded into convolutions), and
`mixed_probabilities` runs it in bf16, recomputing in float32 the rows where bf16 could
have changed the label. `scored` is the one function under both; given a split model
(`for_inference` returns one) it also returns the penultimate features from the same
forward pass (predict's `--embeddings`). `cnn/calibration.py` fits the temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnn.models import Headed, split_head
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


def for_inference(model: nn.Module) -> Headed:
    """An eval-mode copy with every BatchNorm folded into the convolution before it, split
    at its head (`cnn.models.Headed`), so that its features come from the fused model too.

    The same function in fewer passes over memory: `simple` ran 1.3x faster on CPU
    (torch.fx's own conv-BN fusion). A body torch.fx cannot trace stays unfused.
    """
    from torch.fx.experimental.optimization import fuse

    split = split_head(model.eval())
    try:
        body = fuse(split.body)
    except Exception:  # noqa: BLE001 - tracing fails on data-dependent control flow; fusion is only a speed-up
        body = split.body
    return Headed(body, split.head).eval()


def views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The normalised batch as the model sees it under `tta`: itself, and its mirror for "flip"."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; known: {', '.join(TTA_MODES)}")
    return [x, x.flip(3)] if tta == "flip" else [x]


def softmax_views(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float (views, N, classes) logits -> (N, classes): the mean over views of softmax(logits / T)."""
    return torch.softmax(logits.float() / temperature, dim=2).mean(0)


def _forward_views(model: nn.Module, x: torch.Tensor, tta: str, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised x -> float32 (views, N, classes) logits and, with `features`, float32
    (N, F) features of the plain view, from the same pass: its logits are head(features)."""
    vs = views(x, tta)
    if not features:
        return torch.stack([model(v).float() for v in vs]), None
    if not isinstance(model, Headed):
        raise TypeError("features need the model split at its head: cnn.inference.for_inference or cnn.models.split_head")
    f = model.features(vs[0])  # (N, F)
    logits = [model.head(f), *(model(v) for v in vs[1:])]  # the mirror's features are not kept
    return torch.stack([z.float() for z in logits]), f.float()


@torch.inference_mode()
def view_logits(model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none") -> torch.Tensor:
    """uint8 (N, H, W, 3) pixels -> float32 (views, N, classes) logits, one view per `tta` view."""
    return _forward_views(model, normalize(pixels), tta, False)[0]


@dataclass(frozen=True)
class Scored:
    probabilities: torch.Tensor  # float32 (N, classes)
    features: torch.Tensor | None  # float32 (N, F): the plain view's penultimate features, when asked


@torch.inference_mode()
def scored(
    model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none", temperature: float = 1.0,
    bf16: bool = False, features: bool = False,
) -> Scored:  # fmt: skip
    """uint8 (N, H, W, 3) pixels -> probabilities (and with `features`, the penultimate
    features, which need a `Headed` model) in one forward pass.

    `bf16`: the model under bf16 autocast on the pixels' device. Near ties (top two
    logits of any view within BF16_MARGIN) go again in float32, features included, so the
    labels are float32's; the other rows carry bf16's rounding (~1e-3), their features too
    (returned as float32 all the same).
    """
    x = normalize(pixels)
    if not bf16:
        logits, f = _forward_views(model, x, tta, features)
        return Scored(softmax_views(logits, temperature), f)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits, f = _forward_views(model, x, tta, features)
    probs = softmax_views(logits, temperature)
    if probs.shape[1] > 1:
        # The margin is on the raw logits: dividing by T scales bf16's error and the gap alike.
        top2 = logits.topk(2, dim=2).values
        close = ((top2[..., 0] - top2[..., 1]) < BF16_MARGIN).any(0)
        if close.any():
            again = scored(model, normalize, pixels[close], tta=tta, temperature=temperature, features=features)
            probs[close] = again.probabilities
            if f is not None:
                f[close] = again.features
    return Scored(probs, f)


def class_probabilities(
    model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none", temperature: float = 1.0
) -> torch.Tensor:
    """uint8 (N, H, W, 3) pixels -> float (N, classes) softmax probabilities, in float32."""
    return scored(model, normalize, pixels, tta=tta, temperature=temperature).probabilities


def mixed_probabilities(
    model: nn.Module, normalize: Normalize, pixels: torch.Tensor, *, tta: str = "none", temperature: float = 1.0
) -> torch.Tensor:
    """As `class_probabilities`, with the model under bf16 autocast on the pixels' device;
    near ties again in float32 (`scored`)."""
    return scored(model, normalize, pixels, tta=tta, temperature=temperature, bf16=True).probabilities
