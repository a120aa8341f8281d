"""What this machine can do at all, for the benches to compare cnnflow with, in the same run.

    python bench/limits.py decode FOLDER SIZE     # prints {"images": N, "seconds": S}
    python bench/limits.py model MODEL_URI N      # (MLFLOW_TRACKING_URI set as for cnnflow)

Each part runs on every core in a fresh process, timed from when its workers are ready
(interpreter start and imports excluded):

  decode  cnnflow's own `load_image` (read, draft-mode decode, squash to SIZE) over every
          .jpg under FOLDER in a process pool of os.cpu_count(); nothing is written
  model   the registered model through cnnflow's own `Scorer` (BatchNorm folded,
          channels_last, float32, torch on os.cpu_count() threads) on random uint8
          batches of 64, after one warm-up batch, until N images (3 batches at
          least) or ~10 s, whichever comes first

A job that decodes and scores on the same cores goes at most `job_limit(decode, model)`
images/s: each image costs 1/decode + 1/model seconds of the whole machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_BATCH = 64  # cnnflow predict's batch on CPU (workflows/predict/pipeline.py CPU_BATCH)
MODEL_BUDGET_S = 10.0


def rate(kind: str, args: list[str], env: dict[str, str] | None = None) -> float:
    """Images/s of part `kind` ("decode" or "model"), measured in a fresh process."""
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, kind, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"limits.py {kind} failed ({done.returncode}): {lines[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["images"] / result["seconds"]


def job_limit(decode_rate: float, model_rate: float) -> float:
    """Images/s of a job that decodes and scores each image on the same cores."""
    return 1 / (1 / decode_rate + 1 / model_rate)


# --- the parts, run in the fresh process -----------------------------------------------------


_DECODE: dict = {}  # load_image with its options, set before the pool forks: the workers inherit it


def _decode_one(path: str) -> str | None:
    return _DECODE["load"](path).error


def _decode_all(folder: str, size: int) -> dict:
    import multiprocessing

    import pyarrow.fs as pafs

    from data_prep.decode import Limits, load_image
    from data_prep.options import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS

    paths = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
    limits = Limits.of(DEFAULT_MAX_FILE_MB, DEFAULT_MAX_MEGAPIXELS)  # cnnflow's defaults
    _DECODE["load"] = partial(load_image, size=size, resize="squash", limits=limits, filesystem=pafs.LocalFileSystem())
    # fork: when Pool() returns, the workers exist with every import done.
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        started = time.perf_counter()
        errors = [e for e in pool.imap_unordered(_decode_one, paths, chunksize=16) if e]
        seconds = time.perf_counter() - started
    if errors:  # a limit that skipped work would flatter the machine
        raise SystemExit(f"{len(errors)} of {len(paths)} files failed to decode, e.g. {errors[0]}")
    return {"images": len(paths), "seconds": seconds}


def _score_random(uri: str, n: int) -> dict:
    from cnn.models import model_state
    from workflows.predict.scorer import Scorer
    from workflows.tracking import load_classifier

    clf = load_classifier(uri)
    # torch_threads: every core, as cnnflow's single replica gets (Scorer sets torch's threads).
    scorer = Scorer(model_state(clf.model, clf.spec), clf.preprocessing, clf.uri, os.cpu_count() or 1, gpu=False, precision="fp32")
    size = int(clf.preprocessing["image_size"])
    pixels = np.random.default_rng(0).integers(0, 256, (MODEL_BATCH, size, size, 3), dtype=np.uint8)
    scorer.probabilities(pixels)  # warm-up: first-call allocations and kernel choice
    images, started = 0, time.perf_counter()
    while images < max(n, 3 * MODEL_BATCH) and time.perf_counter() - started < MODEL_BUDGET_S:
        scorer.probabilities(pixels)
        images += MODEL_BATCH
    return {"images": images, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "decode":
        print(json.dumps(_decode_all(rest[0], int(rest[1]))))
    elif kind == "model":
        print(json.dumps(_score_random(rest[0], int(rest[1]))))
    else:
        raise SystemExit(__doc__)
