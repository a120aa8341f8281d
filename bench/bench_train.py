"""Benchmark `cnnflow train` against a plain single-process PyTorch loop on the same data.

    python bench/bench_train.py [--epochs 4] [--batch-size 64] [--image-size 32] [--workdir DIR]

On scikit-learn's handwritten digits (1,797 real images, written once as PNGs and
prepared with `cnnflow prep`, cached in WORKDIR), with the same model, batch size,
optimizer, schedule, augmentation and epochs, it measures training images/s per epoch:

  (a) plain PyTorch: the training shards loaded into memory, one process, a shuffled
      index per epoch (the baseline: no Ray, no data pipeline, no tracking)
  (b) cnnflow train --workers 1   (Ray Train + Ray Data + MLflow)
  (c) cnnflow train --workers 2

and, for the input pipeline alone, (d) iterating the training split through the same
Ray Data iterator and collate function the workers use, without a model. It prints
images/s per epoch, the steady state (mean of the epochs after the first), final
validation accuracy, and the ratios b/a, c/a and d/a (ingest vs training step). Not run
in CI; timings on a shared machine are noisy, so compare ratios from the same run.

`--memory` measures footprint instead, each as a command of its own from start to exit
(bench/proctree.py: PSS summed over every process it starts, shared pages once):
(e) the plain loop (a) in one process, and (f) `python -m workflows.train DATA --workers 1`
with a local Ray, and prints peak memory, processes and wall time, and f/e (target <= 2x).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def torch_threads() -> None:
    """As many threads as a Ray Train worker gets on this machine (all of its CPUs)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def write_digits(folder: Path) -> None:
    """The digits as 64 px grayscale PNGs, one folder per class (dark ink on white)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if folder.exists():
        return
    digits = load_digits()
    staging = folder.with_suffix(".partial")
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        out = staging / str(target) / f"digit_{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels, "L").resize((64, 64), Image.BICUBIC).save(out)
    staging.rename(folder)


def plain_pytorch(data: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """(a): the same training step over in-memory tensors; images/s per epoch, val accuracy."""
    import torch
    import torch.nn.functional as F

    from cnn.models import ModelSpec, build_model
    from cnn.transforms import BatchAugment, Normalize
    from data_prep.schema import read_manifest
    from data_prep.shard_reader import read_table, to_pixels
    from workflows.train.driver import CPU_CHANNELS_LAST
    from workflows.train.loop import make_optimizer, one_cycle

    manifest = read_manifest(data)
    size = manifest["image_size"]

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        table = read_table(data, split, columns=["image", "label"])
        return torch.from_numpy(to_pixels(table["image"], size).copy()), torch.tensor(table["label"].to_numpy(), dtype=torch.long)

    x_train, y_train = load("train")
    x_val, y_val = load("val")
    torch.manual_seed(0)
    spec = ModelSpec(args.model, len(manifest["classes"]), size, {"width": args.width, "depth": args.depth})
    # The same step as the workers run, channels_last included, so a ratio measures the
    # pipeline around it (Ray Train, Ray Data, MLflow), not a memory-format choice.
    model = build_model(spec).to(memory_format=torch.channels_last if CPU_CHANNELS_LAST else torch.contiguous_format)
    normalize = Normalize(mean=manifest["mean"], std=manifest["std"], channels_last=CPU_CHANNELS_LAST)
    augment = BatchAugment(hflip=False, max_shift=0.125)
    optimizer = make_optimizer("adamw", model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = math.ceil(len(y_train) / args.batch_size)
    scheduler = one_cycle(optimizer, lr=args.lr, steps_per_epoch=steps, epochs=args.epochs, warmup=0.3)
    rates = []
    for _ in range(args.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(y_train))
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = augment(normalize(x_train[idx]))
            if CPU_CHANNELS_LAST:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        rates.append(len(y_train) / (time.perf_counter() - started))
    model.eval()
    with torch.inference_mode():
        accuracy = (model(normalize(x_val)).argmax(1) == y_val).float().mean().item()
    return rates, accuracy


def cnnflow_train(data: str, workers: int, args: argparse.Namespace, storage: str) -> tuple[list[float], float]:
    """(b)/(c): the real command; images/s per epoch and val accuracy as logged in MLflow."""
    import mlflow

    from workflows import tracking
    from workflows.train import driver as train
    from workflows.config import TrainConfig

    config = TrainConfig(
        data=data, model=args.model, width=args.width, depth=args.depth, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, hflip=False, workers=workers, storage=storage,
        experiment="bench", run_name=f"workers-{workers}", register_as="bench-digits",
    )
    train.run(config)
    run = mlflow.search_runs(experiment_names=["bench"], filter_string=f"attributes.run_name = 'workers-{workers}'",
                             order_by=["attributes.start_time DESC"], output_format="list")[0]
    rates = [v for _, v in tracking.metric_history(run.info.run_id, "images_per_s")]
    return rates, run.data.metrics["val_acc"]


def ingest_only(data: str, args: argparse.Namespace) -> list[float]:
    """(d): the workers' input pipeline alone (same dataset, iterator and collate), no model."""
    import ray.data  # noqa: F401

    from workflows.config import TrainConfig
    from workflows.train.driver import read_split
    from workflows.train.loop import SHUFFLE_BUFFER_ROWS, ShardBatch
    from workflows.train.plan import plan

    p = plan(TrainConfig(data=data, model=args.model, width=args.width, depth=args.depth))
    ds = read_split(p, "train")
    rates = []
    for _ in range(args.epochs):
        started, rows = time.perf_counter(), 0
        for images, _labels in ds.iterator().iter_torch_batches(
            batch_size=args.batch_size, collate_fn=ShardBatch(p.spec.image_size), prefetch_batches=2,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, args.batch_size),
        ):
            rows += len(images)
        rates.append(rows / (time.perf_counter() - started))
    return rates


def footprint(data: str, args: argparse.Namespace, work: Path) -> None:
    """(e) and (f), one after the other, and their ratio."""
    from proctree import measure

    common = ["--model", args.model, "--width", str(args.width), "--depth", str(args.depth),
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    runs = {
        "(e) plain PyTorch, one process": [sys.executable, __file__, "--plain-only", "--workdir", str(work), *common,
                                           "--image-size", str(args.image_size)],
        "(f) cnnflow train --workers 1": [sys.executable, "-m", "workflows.train", data, *common, "--no-hflip",
                                          "--workers", "1", "--storage", str(work / "checkpoints"),
                                          "--experiment", "bench-memory", "--register-as", "bench-digits"],
    }
    measured = {}
    for name, cmd in runs.items():
        measured[name] = m = measure(cmd)
        print(f"{name:34} peak {m.peak_pss / 2**20:6.0f} MiB  {m.processes:3d} processes  {m.seconds:6.1f} s", flush=True)
    e, f = measured.values()
    print(f"\nf/e peak memory = {f.peak_pss / e.peak_pss:.2f}x (target <= 2)")


def steady(rates: list[float]) -> float:
    return statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]


def main() -> None:
    from cnn.registry import model_info  # the model's own defaults, torch-free

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="simple")
    parser.add_argument("--width", type=int, default=model_info("simple").arg("width").default)
    parser.add_argument("--depth", type=int, default=model_info("simple").arg("depth").default)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cnnflow-bench-train"))
    parser.add_argument("--memory", action="store_true", help="measure (e) and (f)'s footprint instead of images/s")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)  # (e)'s own process
    args = parser.parse_args()
    data = str(Path(args.workdir) / f"shards-{args.image_size}")
    if args.plain_only:
        torch_threads()
        plain_pytorch(data, args)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    import ray

    from workflows import prep
    from workflows.config import PrepConfig

    write_digits(work / "digits")
    if not Path(data, "manifest.json").exists():
        prep.run(PrepConfig(input=str(work / "digits"), output=data, image_size=args.image_size))
    if args.memory:
        footprint(data, args, work)
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    results = {
        "(a) plain PyTorch, in memory": plain_pytorch(data, args),
        "(b) cnnflow train --workers 1": cnnflow_train(data, 1, args, str(work / "checkpoints")),
        "(c) cnnflow train --workers 2": cnnflow_train(data, 2, args, str(work / "checkpoints")),
    }
    ingest = ingest_only(data, args)
    ray.shutdown()

    print(f"\ndigits {args.image_size} px, {args.model} width {args.width} depth {args.depth}, "
          f"batch {args.batch_size}, {args.epochs} epochs, {os.cpu_count()} CPUs")
    print(f"{'':34} {'images/s per epoch':>36}  {'steady':>8}  {'val_acc':>7}")
    for name, (rates, accuracy) in results.items():
        print(f"{name:34} {' '.join(f'{r:8.0f}' for r in rates):>36}  {steady(rates):8.0f}  {accuracy:7.4f}")
    print(f"{'(d) ingest alone (no model)':34} {' '.join(f'{r:8.0f}' for r in ingest):>36}  {steady(ingest):8.0f}")
    base = steady(results["(a) plain PyTorch, in memory"][0])
    print(f"\nb/a = {steady(results['(b) cnnflow train --workers 1'][0]) / base:.2f}x (target >= 0.9)   "
          f"c/a = {steady(results['(c) cnnflow train --workers 2'][0]) / base:.2f}x   "
          f"d/a (ingest vs training step) = {steady(ingest) / base:.1f}x (target >= 3)")


if __name__ == "__main__":
    main()
