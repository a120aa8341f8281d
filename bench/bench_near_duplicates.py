"""Near-duplicate search: how its time grows with N, and the perceptual hash's speed.

    python bench/bench_near_duplicates.py [--sizes 8000,50000] [--distance 6]

(1) Matching: data_prep/near_duplicates.match on a local Ray (one task per band), for
each N: N hashes of real photo-like pixels' statistics are not needed for the growth
curve, so the hashes are random 64-bit values with 5% planted near-copies (1-distance
bits away): the buckets then hold what uniform hashes give. Prints seconds, hashes/s and
time(N_large)/time(N_small) against N_large/N_small (near-linear: close to it).
(2) Hashing: data_prep/phash.phash on 128 px pixels against imagehash.phash (when
installed), images/s on one core. Not run in CI.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def planted(n: int, distance: int, rng: np.random.Generator) -> np.ndarray:
    hashes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    copies = rng.choice(n, size=n // 20, replace=False)
    for i, src in enumerate(copies[: len(copies) // 2]):  # half of them copy another hash, 1..distance bits off
        bits = rng.choice(64, size=1 + i % max(1, distance), replace=False).astype(np.uint64)
        hashes[copies[len(copies) // 2 + i]] = hashes[src] ^ np.bitwise_or.reduce(np.uint64(1) << bits)
    return hashes


def time_matching(sizes: list[int], distance: int) -> None:
    import ray

    from data_prep.near_duplicates import match

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    match(planted(1000, distance, np.random.default_rng(1)), distance)  # workers started, code shipped
    seconds = {}
    for n in sizes:
        hashes = planted(n, distance, np.random.default_rng(0))
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            groups = match(hashes, distance)
            best = min(best, time.perf_counter() - started)
        seconds[n] = best
        print(f"(1) match N={n:>9,}  distance {distance}: {best:6.2f} s  {n / best:10,.0f} hashes/s  "
              f"{len(groups):,} hashes grouped", flush=True)
    ray.shutdown()
    small, large = min(sizes), max(sizes)
    print(f"    time ratio {seconds[large] / seconds[small]:.2f}x for {large / small:.2f}x the hashes")


def time_hashing(count: int) -> None:
    from PIL import Image

    from data_prep.phash import phash

    rng = np.random.default_rng(0)
    pixels = [np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((128, 128)))
              for _ in range(count)]  # fmt: skip
    started = time.perf_counter()
    ours = [phash(p) for p in pixels]
    rate = count / (time.perf_counter() - started)
    line = f"(2) phash, 128 px: data_prep.phash {rate:8.0f} images/s"
    try:
        import imagehash
    except ImportError:
        print(line + "  (imagehash not installed: pip install imagehash to compare)")
        return
    started = time.perf_counter()
    theirs = [int(str(imagehash.phash(Image.fromarray(p))), 16) for p in pixels]
    ref = count / (time.perf_counter() - started)
    print(line + f"  imagehash.phash {ref:8.0f} images/s  ({rate / ref:.1f}x; same bits: {ours == theirs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8000,50000")
    parser.add_argument("--distance", type=int, default=6)
    parser.add_argument("--images", type=int, default=500, help="images hashed in (2)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    time_matching([int(s) for s in args.sizes.split(",")], args.distance)
    time_hashing(args.images)


if __name__ == "__main__":
    main()
