"""Benchmark `cnnflow predict` against the two ways a user would otherwise score a folder.

    python bench/bench_predict.py [N] [--size 128] [--memory 2000,16000] [--workdir DIR]

On a generated folder of N photo-sized JPEGs (300-500 px per side) and a model registered
for the purpose (cnnflow's default `simple` architecture, random weights: speed does not
depend on them), it times, each in a fresh process, wall clock from process start to exit
(imports, Ray start-up and shutdown included):

  (a) plain loop: PIL open/convert/resize, batches of 256 through the model, one Parquet
  (b) Ray docs recipe: read_images(size=...) + map_batches(actor pool of 1) + write_parquet
  (c) cnnflow predict

and prints wall time, images/s, peak memory (PSS summed over the job's process tree, so
Ray's processes count and shared pages count once) and the ratios. `--memory A,B` runs
(c) again at N = A and N = B and prints the peak-memory ratio. Not run in CI; timings on
a shared machine are noisy, so compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from proctree import measure  # bench/ is on sys.path when run as a script

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


def register_model(workdir: Path, size: int) -> str:
    """cnnflow's default architecture, registered through cnnflow's own model logging."""
    from cnn.models import ModelSpec, build_model, model_state
    from workflows import tracking

    spec = ModelSpec("simple", 2, size, {"width": 32, "depth": 4})
    preprocessing = {"classes": ["a", "b"], "image_size": size, "resize": "squash",
                     "mean": [0.5] * 3, "std": [0.25] * 3}
    with tracking.training_run(experiment="bench", run_name="bench-model", params={}, tags={}) as run_id:
        model_uri = tracking.log_model(run_id, state=model_state(build_model(spec).eval(), spec), preprocessing=preprocessing)
        version = tracking.register_model(run_id, model_uri, register_as="bench", version_tags={})
    return f"models:/bench/{version.version}"


# --- measuring -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=8000, help="JPEGs in the folder")
    parser.add_argument("--size", type=int, default=128, help="model input side, px")
    parser.add_argument("--workers", type=int, default=1, help="cnnflow predict --workers")
    parser.add_argument("--memory", default="", help="A,B: also run (c) at N=A and N=B, compare peak memory")
    parser.add_argument("--only", default="abc", help="which of a, b, c to run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of a, b, c in turn; the best of each counts")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cnnflow-bench-predict"))
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    uri = register_model(work, args.size)
    py = sys.executable

    def variants(n: int) -> dict[str, list[str]]:
        folder = str(make_photos(work / f"photos-{n}", n))
        # A fresh output per call: (c) would otherwise resume and score nothing.
        out = tempfile.mkdtemp(dir=work, prefix="out-")
        return {
            "a": [py, "-c", PLAIN_LOOP, folder, f"{out}/plain.parquet", uri],
            "b": [py, "-c", RAY_DOCS_RECIPE, folder, f"{out}/recipe", uri, str(args.size)],
            "c": [py, "-m", "workflows.predict", folder, f"{out}/cnnflow", "--model", uri,
                  "--workers", str(args.workers)],
        }

    names = {"a": "plain loop", "b": "Ray docs recipe", "c": "cnnflow predict"}
    results: dict[str, tuple[float, int]] = {}
    print(f"N = {args.n} JPEGs (300-500 px) -> {args.size} px, model {uri} (simple), {os.cpu_count()} CPUs")
    # Rounds of a, b, c in turn, best of each: on a shared machine the load drifts, and
    # interleaving exposes all three to the same drift.
    for round in range(args.repeat):
        for key in args.only:
            m = measure(variants(args.n)[key], env)
            s, mem = m.seconds, m.peak_pss
            print(f"  round {round + 1} ({key}) {names[key]:16s} {s:7.1f} s  {args.n / s:7.1f} img/s  "
                  f"peak PSS {mem / 2**20:7.0f} MiB", flush=True)
            best = results.get(key, (float("inf"), 0))
            results[key] = (s, mem) if s < best[0] else best
    print("best of each:")
    for key, (s, mem) in results.items():
        print(f"  ({key}) {names[key]:16s} {s:7.1f} s  {args.n / s:7.1f} img/s  peak PSS {mem / 2**20:7.0f} MiB")
    if "c" in results:
        for key in "ab":
            if key in results:
                print(f"  (c) vs ({key}): {results[key][0] / results['c'][0]:.2f}x images/s")
    if args.memory:
        small, large = (int(v) for v in args.memory.split(","))
        peaks = {}
        for n in (small, large):
            m = measure(variants(n)["c"], env)
            s, peaks[n] = m.seconds, m.peak_pss
            print(f"  (c) N = {n:6d}: {s:7.1f} s  {n / s:7.1f} img/s  peak PSS {peaks[n] / 2**20:7.0f} MiB", flush=True)
        print(f"  (c) peak memory N={large} / N={small}: {peaks[large] / peaks[small]:.2f}x")


if __name__ == "__main__":
    main()
