"""What `--embeddings` and the training-hash lookup add to `cnnflow predict`, as ratios
measured in the same run.

    python bench/bench_embeddings.py [N] [--models simple,seed] [--size 128] [--repeat 2]
        [--train-hashes 100000] [--threads 1] [--no-predict] [--workdir DIR]

For each network of --models, registered with random weights (bench_predict.py's
`register_model`; speed does not depend on them):

  model stage  the predict `Scorer` on batches of 64 stage rows (random pixels), alone, as
               images/s of its median call, the variants taking turns call by call:
               plain; with embeddings; with a model that carries --train-hashes random
               training hashes (each row hashed and looked up)
  predict      `cnnflow predict` on N photo-like JPEGs (bench_predict.py's `make_photos`),
               without and with --embeddings, each in a fresh process; images/s from
               process start to exit

Each round measures the variants side by side and prints each as a ratio over plain in
that round; the summary is the median ratio over rounds (a shared machine's load drifts,
so absolute rates from different moments do not compare). Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_predict import NETWORKS, make_photos, register_model  # bench/ is on sys.path as a script
from proctree import measure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 64  # predict's CPU batch (workflows/predict/pipeline.py CPU_BATCH)
MODEL_BUDGET_S = 20.0  # per round, the variants taking turns


def scorer_rates(uri: str, size: int, variants: dict[str, dict], *, seconds: float, threads: int) -> dict[str, tuple[float, float]]:
    """Per variant (embeddings, hashes): images/s of the Scorer's whole `__call__` (scoring,
    hashing, rows built) on random pixels, and images per CPU-second (this process's CPU
    time, all threads). The variants take turns call by call and each keeps its median
    call, so a shared machine's load falls on all of them alike; CPU time, with one torch
    thread, hardly sees the load at all."""
    import pyarrow as pa

    from cnn.models import model_state
    from data_prep.phash import to_signed
    from workflows.predict.scorer import Scorer
    from workflows.tracking import load_classifier

    clf = load_classifier(uri)
    rng = np.random.default_rng(0)
    preprocessing = {**clf.preprocessing, "near_duplicate_distance": 6}
    scorers = {}
    for name, kw in variants.items():
        train = None
        if kw.get("hashes"):
            values = rng.integers(0, 2**63, size=kw["hashes"], dtype=np.int64).astype(np.uint64) * np.uint64(2)
            paths = [f"class/img_{i:07d}.jpg" for i in range(kw["hashes"])]
            train = pa.table({"phash": to_signed(np.sort(values)), "path": paths})
        scorers[name] = Scorer(model_state(clf.model, clf.spec), preprocessing, clf.uri, threads,
                               gpu=False, precision="fp32", embeddings=kw.get("embeddings", False), train_hashes=train)  # fmt: skip
    pixels = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    batch = pa.table({
        "path": pa.array([f"p{i}" for i in range(BATCH)]),
        "image": pa.array([p.tobytes() for p in pixels], pa.binary()),
        "error": pa.nulls(BATCH, pa.string()),
    })  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in scorers}
    started = time.perf_counter()
    for scorer in scorers.values():
        scorer(batch)  # warm-up
    while min(len(t) for t in times.values()) < 5 or time.perf_counter() - started < seconds:
        for name, scorer in scorers.items():
            t, cpu = time.perf_counter(), time.process_time()
            scorer(batch)
            times[name].append((time.perf_counter() - t, time.process_time() - cpu))
    return {name: (BATCH / float(np.median([w for w, _ in t])), BATCH / float(np.median([c for _, c in t])))
            for name, t in times.items()}  # fmt: skip


def predict_rate(folder: str, uri: str, n: int, work: Path, env: dict[str, str], *, embeddings: bool) -> tuple[float, int]:
    """Images/s of `cnnflow predict` from process start to exit, and the output's bytes."""
    out = tempfile.mkdtemp(dir=work, prefix="out-")
    try:
        cmd = [sys.executable, "-m", "workflows.predict", folder, f"{out}/preds", "--model", uri]
        m = measure(cmd + (["--embeddings"] if embeddings else []), env)
        assert json.loads(Path(out, "preds", "summary.json").read_text())["rows"] == n
        size = sum(p.stat().st_size for p in Path(out, "preds").glob("part-*"))
        return n / m.seconds, size
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=2000)
    parser.add_argument("--models", default="simple")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--train-hashes", type=int, default=100_000)
    parser.add_argument("--no-predict", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model stage's Scorers")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-embeddings-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    os.environ.update(env)
    folder = None if args.no_predict else str(make_photos(work / f"photos-{args.n}", args.n))
    for network in args.models.split(","):
        assert network in NETWORKS, f"--models: {', '.join(NETWORKS)}"
        uri = register_model(network, args.size)
        print(f"\n{network} at {args.size} px: {uri}", flush=True)
        variants = {"plain": {}, "embeddings": {"embeddings": True}, f"{args.train_hashes:,} train hashes": {"hashes": args.train_hashes}}
        ratios: dict[str, list[float]] = {}  # per round: each variant over plain, measured side by side
        sizes: dict[str, int] = {}
        for round in range(args.repeat):
            rates = scorer_rates(uri, args.size, variants, seconds=MODEL_BUDGET_S, threads=args.threads)
            for name, (r, c) in rates.items():
                r0, c0 = rates["plain"]
                print(f"  round {round + 1} model stage {name:22s} {r:8.1f} img/s  x{r / r0:.3f}   "
                      f"{c:8.1f} img/CPU-s  x{c / c0:.3f}", flush=True)
                ratios.setdefault(f"model stage, {name} (wall)", []).append(r / r0)
                ratios.setdefault(f"model stage, {name} (CPU)", []).append(c / c0)
            if folder:
                plain, _ = predict_rate(folder, uri, args.n, work, env, embeddings=False)
                with_embeddings, sizes["embeddings"] = predict_rate(folder, uri, args.n, work, env, embeddings=True)
                print(f"  round {round + 1} cnnflow predict {plain:8.1f} img/s, with --embeddings {with_embeddings:8.1f} "
                      f"img/s  x{with_embeddings / plain:.3f}", flush=True)
                ratios.setdefault("predict, --embeddings", []).append(with_embeddings / plain)
        print(f"  median of {args.repeat} round(s), over plain in the same round:")
        for key, values in ratios.items():
            if not key.startswith("model stage, plain"):
                print(f"    {key:40s} x{float(np.median(values)):.3f}  (rounds: {', '.join(f'{v:.3f}' for v in values)})")
        if folder:
            print(f"    --embeddings' output: {sizes['embeddings'] / 2**20:.1f} MiB for {args.n} rows")

if __name__ == "__main__":
    main()
