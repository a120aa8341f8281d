"""The plain script a practitioner writes in thirty lines: the baseline of bench/bench_quality.py.

    python bench/plain_script.py TRAIN_FOLDER HELDOUT_FOLDER [--image-size 64] [--epochs 15]

Issue #11's recipe, nothing more: every training file loaded with Pillow (RGB; RGBA
composited on white, as cnnflow's decoder does) and squashed to the image size with
BILINEAR, all in memory as one tensor; per-channel mean/std from the training pixels;
4 stages of conv3x3-BN-ReLU (32, 64, 128, 256) with 2x2 max pooling between them, global
average pooling, a linear layer; AdamW with OneCycleLR (max_lr 4e-3), random horizontal
flips, label smoothing 0.1, batch 64, 15 epochs; torch.manual_seed, 2 threads. Then the
accuracy on the held-out files.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def load(path: str | Path, size: int) -> np.ndarray:
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = img.convert("RGBA")  # cnnflow: transparent pixels shown on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def model(num_classes: int) -> nn.Module:
    layers, cin = [], 3
    for i, cout in enumerate((32, 64, 128, 256)):
        layers += [nn.MaxPool2d(2)] if i else []
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def train_and_score(
    train_files: list[tuple[str | Path, int]],
    heldout_files: list[tuple[str | Path, int]],
    image_size: int,
    epochs: int = 15,
    seed: int = 0,
) -> dict:
    """Train on (path, label index) pairs, score on held-out pairs: {accuracy, seconds}."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x = torch.from_numpy(np.stack([load(p, image_size) for p, _ in train_files])).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([label for _, label in train_files])
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    net = model(int(y.max()) + 1)
    opt = torch.optim.AdamW(net.parameters())
    steps = math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, epochs=epochs, steps_per_epoch=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()
            sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(heldout_files), 256):
            chunk = heldout_files[i : i + 256]
            xb = torch.from_numpy(np.stack([load(p, image_size) for p, _ in chunk])).permute(0, 3, 1, 2).float() / 255
            pred = net((xb - mean) / std).argmax(1)
            correct += int((pred == torch.tensor([label for _, label in chunk])).sum())
    return {"accuracy": correct / len(heldout_files), "seconds": time.perf_counter() - start}


def folder_files(folder: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label index) for FOLDER/<class>/*, classes sorted by name unless given."""
    folder = Path(folder)
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((folder / c).rglob("*")) if p.is_file()]
    return files, classes


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train")
    parser.add_argument("heldout")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, classes = folder_files(args.train)
    heldout, _ = folder_files(args.heldout, classes)
    result = train_and_score(train, heldout, args.image_size, args.epochs, args.seed)
    print(f"held-out accuracy {result['accuracy']:.4f} on {len(heldout)} files, {result['seconds']:.1f} s")
    sys.exit(0)
