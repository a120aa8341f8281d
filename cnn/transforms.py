"""Batch transforms that run on the device, shared by training and prediction.

Shards store raw uint8 pixels (N, H, W, 3). `Normalize` turns such a batch into the float
(N, 3, H, W) input every model takes; `BatchAugment` applies random flips and shifts to a
normalised training batch. Both are keyword-only modules (torchvision's presets habit),
so the same object serves the training loop, validation and the prediction actors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W): scale to [0, 1], subtract mean, divide by std.

    `mean` and `std` are per channel on the [0, 1] scale (the manifest's figures).
    With `channels_last`, the result keeps the NHWC memory layout, which convolutions
    on GPU (and often on CPU) run faster on; the logical shape is NCHW either way.
    """

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got {mean}, {std}")
        # Fold /255 into the affine map: x * scale + shift, one fused op per element.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)  # (N, 3, H, W) view, memory still NHWC
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(self.scale.dtype).contiguous(memory_format=memory_format)
        return x * self.scale + self.shift


class BatchAugment(nn.Module):
    """Random horizontal flips and random shifts (pad-and-crop) on a whole batch at once.

    `max_shift` is a fraction of the image side: 0.125 moves an image by up to 1/8 of
    its size in each direction, filling with zeros (the mean, after normalisation).
    Flips are off for data where left and right differ (digits, text).
    """

    def __init__(self, *, hflip: bool = True, max_shift: float = 0.125):
        super().__init__()
        if not 0 <= max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {max_shift}")
        self.hflip = hflip
        self.max_shift = max_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n, _, h, w = x.shape
        if self.hflip:
            flip = torch.rand(n, device=x.device) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        pad = int(round(self.max_shift * max(h, w)))
        if pad > 0:
            # One padded copy, then a per-sample crop gathered with index arithmetic:
            # no Python loop over the batch, no interpolation.
            padded = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
            dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
            rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
            cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
            flat = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(-1, x.shape[1], -1)
            x = padded.flatten(2).gather(2, flat).view_as(x)
        return x
