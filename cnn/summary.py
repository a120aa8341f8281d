"""A Keras-style layer table: output shape, weights and biases per layer, and totals.

Output shapes of convolutions and pools are computed from (W - F + 2P)/S + 1 and checked
against a real forward pass, so the table teaches the arithmetic and cannot lie about it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str  # e.g. "conv2d_1 (Conv2d)"
    output_shape: tuple[int, ...]  # (C, H, W) or (features,), batch dimension left out
    weights: int
    biases: int

    @property
    def params(self) -> int:
        return self.weights + self.biases


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    input_shape: tuple[int, int, int]
    trainable: int
    non_trainable: int

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable

    def table(self) -> str:
        header = ("Layer (type)", "Output Shape", "Weights", "Biases", "Param #")
        body = [
            (r.name, str((None, *r.output_shape)), f"{r.weights:,}", f"{r.biases:,}", f"{r.params:,}")
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) + 2 for i in range(5)]

        def fmt(cells: tuple[str, ...]) -> str:
            first = cells[0].ljust(widths[0])
            return first + "".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))

        rule = "=" * sum(widths)
        lines = [f"Input shape: {(None, *self.input_shape)}", rule, fmt(header), rule]
        lines += [fmt(cells) for cells in body]
        lines += [
            rule,
            f"Total params: {self.total:,}",
            f"Trainable params: {self.trainable:,}",
            f"Non-trainable params: {self.non_trainable:,}",
        ]
        return "\n".join(lines)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def expected_shape(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """(W - F + 2P)/S + 1 for the layers whose arithmetic is worth showing; None otherwise."""
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        channels, h, w = in_shape
        f, s, p = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.padding)
        d = _pair(getattr(layer, "dilation", 1))
        ceil = getattr(layer, "ceil_mode", False)

        def out(size: int, i: int) -> int:
            span = size - d[i] * (f[i] - 1) - 1 + 2 * p[i]
            return (-(-span // s[i]) if ceil else span // s[i]) + 1

        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        return (channels, out(h, 0), out(w, 1))
    if isinstance(layer, nn.Linear):
        return (layer.out_features,)
    if isinstance(layer, nn.Flatten):
        n = 1
        for dim in in_shape:
            n *= dim
        return (n,)
    return None


def summarize(model: nn.Module, image_size: int) -> Summary:
    """Run one forward pass on a (1, 3, S, S) input and describe every leaf layer."""
    rows: list[LayerRow] = []
    counters: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        in_shape = tuple(inputs[0].shape[1:])
        out_shape = tuple(output.shape[1:])
        want = expected_shape(layer, in_shape)
        if want is not None and want != out_shape:
            raise AssertionError(f"{names[layer]}: formula gives {want}, forward pass {out_shape}")
        kind = type(layer).__name__
        counters[kind] = counters.get(kind, 0) + 1
        own = dict(layer.named_parameters(recurse=False))
        weights = sum(p.numel() for n, p in own.items() if n != "bias")
        biases = own["bias"].numel() if own.get("bias") is not None else 0
        rows.append(LayerRow(f"{kind.lower()}_{counters[kind]} ({kind})", out_shape, weights, biases))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return Summary(rows, (3, image_size, image_size), trainable, frozen)
