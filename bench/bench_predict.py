"""Benchmark `cnnflow predict` against the ways a user would otherwise score a folder, and
against what this machine can do at all, measured in the same run.

    python bench/bench_predict.py [N] [--models seed,simple] [--size 128] [--repeat 1]
        [--only abcL] [--memory A,B] [--workers 1] [--workdir DIR]

On a generated folder of N photo-sized JPEGs (300-500 px per side), for each network of
--models (`seed`: the tutorial's Conv2d-pool-Linear; `simple`: cnnflow's default, see
cnn/models.py), registered as a model with random weights (speed does not depend on
them), it runs, each in a fresh process:

  (a) plain loop: PIL open/convert/resize, batches of 256 through the model, one Parquet
  (b) Ray docs recipe: read_images(size=...) + map_batches(actor pool of 1) + write_parquet
  (c) cnnflow predict
  (L) the machine's limit (bench/limits.py): cnnflow's decode alone on every core, and the
      model alone on every core (cnnflow's Scorer on random pixels), each timed without
      its start-up; decoding and scoring share the cores, so no job on this machine
      goes faster than 1 / (1/decode + 1/model) images/s, nor takes less than N over that

For (a), (b) and (c) it prints wall clock from process start to exit (interpreter start,
imports, Ray start-up and shutdown included), images/s = N / wall, and peak memory (PSS
summed over the job's process tree, so Ray's processes count and shared pages count
once). For (c) also its start-up, from the summary.json it writes: `startup_s` (Ray up,
model loaded, inputs listed) and `first_row_s` (first scored rows at the driver), both
counted from after its imports, and its images/s over the rest (work only). Then the
ratios: (c)'s images/s as a fraction of (L)'s, and (c)'s wall over (a)'s and (b)'s.
`--repeat R` runs R rounds of the rows in turn and keeps the best of each; `--memory A,B`
runs (c) again at N = A and N = B and prints the peak-memory ratio. Not run in CI;
timings on a shared machine are noisy, so compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import limits  # bench/ is on sys.path when run as a script
from proctree import Measured, measure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN_LOOP = r'''
import sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from pathlib import Path
from PIL import Image
from workflows.tracking import load_classifier

folder, out, uri = sys.argv[1:4]
clf = load_classifier(uri)
size, classes = clf.preprocessing["image_size"], clf.classes
paths = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
rows = {"path": [], "label": [], "score": [], "probabilities": []}
for start in range(0, len(paths), 256):
    chunk = paths[start:start + 256]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in chunk])
    probs = clf.probabilities(torch.from_numpy(pixels)).numpy()
    rows["path"] += chunk
    rows["label"] += [classes[k] for k in probs.argmax(1)]
    rows["score"] += probs.max(1).tolist()
    rows["probabilities"] += probs.tolist()
pq.write_table(pa.table(rows), out)
'''

RAY_DOCS_RECIPE = r'''
import sys
import numpy as np, ray

folder, out, uri = sys.argv[1:4]

class Predictor:  # as Ray's batch inference guide: the model is loaded once per actor
    def __init__(self, uri):
        import torch
        from workflows.tracking import load_classifier

        self.torch, self.clf = torch, load_classifier(uri)

    def __call__(self, batch):
        probs = self.clf.probabilities(self.torch.from_numpy(batch["image"])).numpy()
        return {"path": batch["path"], "label": np.array(self.clf.classes)[probs.argmax(1)],
                "score": probs.max(1)}

size = int(sys.argv[4])
ray.init(include_dashboard=False)
ds = ray.data.read_images(folder, size=(size, size), mode="RGB", include_paths=True)
ds = ds.map_batches(Predictor, fn_constructor_args=(uri,), compute=ray.data.ActorPoolStrategy(size=1), batch_size=256)
ds.write_parquet(out)
ray.shutdown()
'''


# --- inputs --------------------------------------------------------------------------------


def make_photos(folder: Path, n: int) -> Path:
    """N JPEGs of 300-500 px per side with photo-like content (smooth shapes, noise)."""
    from PIL import Image

    from tests.images import pattern_pixels

    done = folder / f".complete-{n}"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        pixels = pattern_pixels(int(rng.integers(3)), (h, w), rng)
        blur = Image.fromarray(pixels).reduce(4).resize((w, h), Image.Resampling.BICUBIC)  # soft edges, as photos
        sub = folder / f"{i % 16:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        blur.save(sub / f"img_{i:06d}.jpg", quality=90)
    done.touch()
    return folder


# The networks timed, with their arguments (cnn/registry.py's defaults for `simple`).
NETWORKS = {"seed": {}, "simple": {"width": 32, "depth": 4}}


def register_model(network: str, size: int) -> str:
    """`network` with random weights, registered through cnnflow's own model logging."""
    from cnn.models import ModelSpec, build_model, model_state
    from workflows import tracking

    spec = ModelSpec(network, 2, size, NETWORKS[network])
    preprocessing = {"classes": ["a", "b"], "image_size": size, "resize": "squash",
                     "mean": [0.5] * 3, "std": [0.25] * 3}
    warnings.filterwarnings("ignore", message=".*An input example was not provided")  # MLflow's, about serving
    with tracking.training_run(experiment="bench", run_name=f"bench-{network}", params={}, tags={}) as run_id:
        model_uri = tracking.log_model(run_id, state=model_state(build_model(spec).eval(), spec), preprocessing=preprocessing)
        version = tracking.register_model(run_id, model_uri, register_as=f"bench-{network}", version_tags={})
    return f"models:/bench-{network}/{version.version}"


# --- measuring -------------------------------------------------------------------------------

NAMES = {"a": "plain loop", "b": "Ray docs recipe", "c": "cnnflow predict"}


def run(key: str, n: int, uri: str, args: argparse.Namespace, env: dict[str, str]) -> tuple[Measured, dict]:
    """Approach `key` on the N-image folder; with (c)'s summary.json "this_run" ({} otherwise)."""
    work = Path(args.workdir)
    folder = str(make_photos(work / f"photos-{n}", n))
    out = tempfile.mkdtemp(dir=work, prefix="out-")  # fresh: (c) would otherwise resume and score nothing
    py = sys.executable
    cmd = {
        "a": [py, "-c", PLAIN_LOOP, folder, f"{out}/plain.parquet", uri],
        "b": [py, "-c", RAY_DOCS_RECIPE, folder, f"{out}/recipe", uri, str(args.size)],
        "c": [py, "-m", "workflows.predict", folder, f"{out}/cnnflow", "--model", uri, "--workers", str(args.workers)],
    }[key]
    try:
        m = measure(cmd, env)
        return m, json.loads(Path(out, "cnnflow", "summary.json").read_text())["this_run"] if key == "c" else {}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_network(network: str, args: argparse.Namespace, env: dict[str, str]) -> None:
    n, cpus = args.n, os.cpu_count()
    uri = register_model(network, args.size)
    folder = str(make_photos(Path(args.workdir) / f"photos-{n}", n))
    print(f"\n{network}: {uri}", flush=True)
    best: dict[str, Measured] = {}
    this_run: dict = {}  # (c)'s, from its best round
    rates = {"decode": 0.0, "model": 0.0}  # (L)'s parts, best round
    # Rounds of every row in turn, best of each: on a shared machine the load drifts, and
    # interleaving exposes all of them to the same drift.
    for round in range(args.repeat):
        for key in args.only:
            if key == "L":
                for part, part_args in (("decode", [folder, str(args.size)]), ("model", [uri, str(n)])):
                    r = limits.rate(part, part_args, env)
                    print(f"  round {round + 1} (L) {part + ' only':16s} {'':7s}    {r:7.1f} img/s  on {cpus} cores", flush=True)
                    rates[part] = max(rates[part], r)
                continue
            try:
                m, summary = run(key, n, uri, args, env)
            except RuntimeError as exc:  # e.g. Ray timing out at start on an overloaded machine
                print(f"  round {round + 1} ({key}) {NAMES[key]:16s} {exc}", flush=True)
                continue
            print(f"  round {round + 1} ({key}) {NAMES[key]:16s} {m.seconds:7.1f} s  {n / m.seconds:7.1f} img/s  "
                  f"peak PSS {m.peak_pss / 2**20:6.0f} MiB", flush=True)
            if key not in best or m.seconds < best[key].seconds:
                best[key], this_run = m, (summary or this_run)

    print(f"  best of {args.repeat} round(s)         wall   images/s   peak PSS")
    for key, m in best.items():
        print(f"  ({key}) {NAMES[key]:16s} {m.seconds:7.1f} s  {n / m.seconds:9.1f}  {m.peak_pss / 2**20:5.0f} MiB")
    limit = limits.job_limit(rates["decode"], rates["model"]) if all(rates.values()) else 0.0
    if limit:
        print(f"  (L) {'machine limit':16s} {n / limit:7.1f} s  {limit:9.1f}          -   = 1 / (1/{rates['decode']:.0f} + "
              f"1/{rates['model']:.0f}): decode and model sharing {cpus} cores, no start-up")
    if "c" in best:
        c = best["c"]
        work_rate = this_run["rows"] / (this_run["seconds"] - this_run["startup_s"])
        print(f"  (c) start-up {this_run['startup_s']:.1f} s (Ray up, model loaded, inputs listed), first rows at "
              f"{this_run['first_row_s']:.1f} s, after its imports; then {work_rate:.1f} img/s (work only)")
        if limit:
            print(f"  (c) images/s / (L) images/s: {n / c.seconds / limit:.2f} (work only: {work_rate / limit:.2f})")
        for key in "ab":
            if key in best:
                print(f"  (c) wall / ({key}) wall: {c.seconds / best[key].seconds:.2f}x")
    if args.memory:
        small, large = (int(v) for v in args.memory.split(","))
        peaks = {}
        for count in (small, large):
            m, _ = run("c", count, uri, args, env)
            peaks[count] = m.peak_pss
            print(f"  (c) N = {count:6d}: {m.seconds:7.1f} s  {count / m.seconds:7.1f} img/s  "
                  f"peak PSS {m.peak_pss / 2**20:6.0f} MiB", flush=True)
        print(f"  (c) peak memory N={large} / N={small}: {peaks[large] / peaks[small]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=8000, help="JPEGs in the folder")
    parser.add_argument("--models", default="seed,simple", help=f"networks to time, of {', '.join(NETWORKS)}")
    parser.add_argument("--size", type=int, default=128, help="model input side, px")
    parser.add_argument("--workers", type=int, default=1, help="cnnflow predict --workers")
    parser.add_argument("--memory", default="", help="A,B: also run (c) at N=A and N=B, compare peak memory")
    parser.add_argument("--only", default="abcL", help="which of a, b, c, L (machine limit) to run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the rows in turn; the best of each counts")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cnnflow-bench-predict"))
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    print(f"N = {args.n} JPEGs (300-500 px) -> {args.size} px, {os.cpu_count()} CPUs; wall from process start "
          f"to exit, images/s = N / wall")
    networks = args.models.split(",")
    if unknown := set(networks) - set(NETWORKS):
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; known: {', '.join(NETWORKS)}")
    for network in networks:
        bench_network(network, args, env)


if __name__ == "__main__":
    main()
