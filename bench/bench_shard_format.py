"""Does a fixed-shape tensor `image` column read as fast as today's binary one?

    python bench/bench_shard_format.py [--rows 10000] [--sizes 64 128] [--repeats 2] [--workdir DIR]

Writes the same synthetic pixels (smooth blocks plus noise, so zstd has something to do)
as shards twice, with prep's own compression and row-group size (data_prep/shards.py):

  v1   `image` binary: size x size x 3 raw bytes per row (the shard format, versions 1 and 2)
  v2   `image` pyarrow.fixed_shape_tensor(uint8, [size, size, 3]) (Arrow's canonical
       extension, which Ray Data and pyarrow's to_numpy_ndarray read as arrays without
       our code)

and reads each the two ways cnnflow reads shards:

  ray   shard_reader.read_dataset (ray.data.read_parquet) with a seeded file shuffle and
        order-preserving execution, then iter_torch_batches with the local shuffle buffer
        and train's collate to (uint8 (N, S, S, 3), int64 labels): how train's workers read
  pq    shard_reader.iter_batches (pyarrow.parquet.ParquetFile.iter_batches) -> uint8
        (N, S, S, 3): how evaluation and promotion read

It prints images/s (best of --repeats, the formats interleaved so that load on a shared
machine hits both alike), the ratio v2/v1, the write rate and the bytes on disk. Not run in
CI; on a shared machine compare the ratios, not the rates.

Measured on the 2-core dev machine under load (other jobs running), images/s:

    rows   px   pq v1    pq v2    v2/v1   ray v1  ray v2  v2/v1   write v1  write v2
    20000  64   106,242  12,067   0.11    3,347   2,817   0.84    30,664    4,878
    4000   64    79,232  10,820   0.14    1,507   1,036   0.69    20,239    3,510
    10000  128   18,251   2,202   0.12    2,446     956   0.39     7,451      881
    4000   128   18,400   2,382   0.13      744     618   0.83     6,545    1,143

so shard format 1's binary column stays: Parquet has no 8-bit physical type, and the
tensor's fixed_size_list<uint8> is written as INT32 values with a repetition level each
(dictionary-encoded by default): the same size on disk after zstd, but 4 bytes and a
level to decode per pixel instead of one byte. (Ray Data 2.60 keeps Arrow's
fixed_shape_tensor as it is, so the column reached the collate function as a tensor:
speed alone decided.)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILES = 8  # shards per format: Ray reads files in parallel, as with prep's one shard per task
BATCH = 256


def synthetic(rng, n: int, size: int):
    """n images: 8x8 random blocks upsampled, plus noise (compresses like photos, roughly)."""
    import numpy as np

    base = rng.integers(0, 248, (n, 8, 8, 3), dtype=np.uint8)
    px = np.repeat(np.repeat(base, size // 8, axis=1), size // 8, axis=2)
    return px + rng.integers(0, 8, px.shape, dtype=np.uint8)


def schemas(size: int):
    import pyarrow as pa

    from data_prep.schema import SHARD_SCHEMA

    v1 = SHARD_SCHEMA.remove_metadata()
    tensor = pa.field("image", pa.fixed_shape_tensor(pa.uint8(), [size, size, 3]), nullable=False)
    return {"v1": v1, "v2": v1.set(v1.get_field_index("image"), tensor)}


def image_array(kind: str, px):
    import numpy as np
    import pyarrow as pa

    n, row = len(px), px[0].size
    if kind == "v2":
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(px))
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(px.tobytes())])


def write(folder: Path, kind: str, schema, rows: int, size: int) -> float:
    """FILES shards of `rows` rows in all, as prep writes them; seconds spent writing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.shards import COMPRESSION, ROW_GROUP_BYTES

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)  # the same pixels for both formats
    group = max(1, ROW_GROUP_BYTES // (size * size * 3))
    spent = 0.0
    for f in range(FILES):
        n = rows // FILES + (f < rows % FILES)
        with pq.ParquetWriter(folder / f"part-{f:03d}.parquet", schema, compression=COMPRESSION) as writer:
            for start in range(0, n, group):
                k = min(group, n - start)
                px = synthetic(rng, k, size)
                table = pa.Table.from_arrays(
                    [
                        image_array(kind, px),
                        pa.array(rng.integers(0, 10, k), pa.int32()),
                        pa.array([f"{f}/{start + i}.png" for i in range(k)], pa.string()),
                        pa.array(["0" * 64] * k, pa.string()),
                        pa.array(np.full(k, size), pa.int32()),
                        pa.array(np.full(k, size), pa.int32()),
                        pa.array(rng.integers(-(2**63), 2**63 - 1, k), pa.int64()),  # phash
                    ],
                    schema=schema,
                )
                started = time.perf_counter()
                writer.write_table(table, row_group_size=k)
                spent += time.perf_counter() - started
    return spent


def pixels(images):
    """uint8 (N, S, S, 3) from either format: v1 through cnnflow's reader, v2 through Arrow's
    own conversion (zero-copy from one chunk)."""
    import numpy as np
    import pyarrow as pa

    from data_prep.shard_reader import to_pixels

    if isinstance(images, pa.ChunkedArray) and isinstance(images.type, pa.FixedShapeTensorType):
        chunks = [c.to_numpy_ndarray() for c in images.chunks]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    if isinstance(images.type, pa.FixedShapeTensorType):
        return images.to_numpy_ndarray()
    return to_pixels(images)


def read_pq(folder: Path) -> int:
    from data_prep.shard_reader import iter_batches

    rows = 0
    for batch in iter_batches(str(folder.parent), folder.name, columns=["image", "label"], batch_size=BATCH):
        images = pixels(batch.column(0))
        rows += len(images) + 0 * int(images[-1, 0, 0, 0])  # touch the pixels
    return rows


def read_ray(folder: Path) -> int:
    import torch

    from data_prep.shard_reader import read_dataset
    from workflows.train.loop import SHUFFLE_BUFFER_ROWS, ShardBatch

    class TensorBatch(ShardBatch):  # train's collate with Arrow's tensor conversion for v2
        def __call__(self, batch):
            images = pixels(batch["image"])
            images = torch.from_numpy(images if images.flags.writeable else images.copy())
            return images, torch.tensor(batch["label"].to_numpy(), dtype=torch.long)

    ds = read_dataset(str(folder.parent), folder.name, columns=["image", "label"], shuffle_seed=0, preserve_order=True)
    rows = 0
    for images, labels in ds.iter_torch_batches(
        batch_size=BATCH, collate_fn=ShardBatch() if folder.name.endswith("v1") else TensorBatch(),
        prefetch_batches=2, local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS, local_shuffle_seed=0,
    ):  # fmt: skip
        rows += len(labels)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    from workflows.ray_runtime import configure_ray_data

    configure_ray_data(verbose=False)
    from data_prep.shard_reader import read_dataset

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            print(f"\n{args.rows} images at {size} px ({args.rows * size * size * 3 / 1e6:,.0f} MB of pixels), "
                  f"{FILES} shards per format, best of {args.repeats}")
            folders, rates = {}, {}
            for kind, schema in schemas(size).items():
                folders[kind] = Path(tmp) / f"{size}-{kind}"
                spent = write(folders[kind], kind, schema, args.rows, size)
                mb = sum(f.stat().st_size for f in folders[kind].glob("*.parquet")) / 1e6
                print(f"  write {kind}: {args.rows / spent:10,.0f} images/s   {mb:,.0f} MB on disk")
            for kind, folder in folders.items():  # Ray Data's workers started, not timed
                read_dataset(str(folder.parent), folder.name).take(1)
            for how, read in (("pq", read_pq), ("ray", read_ray)):
                for _ in range(args.repeats):
                    for kind, folder in folders.items():
                        started = time.perf_counter()
                        assert read(folder) == args.rows
                        rate = args.rows / (time.perf_counter() - started)
                        rates[how, kind] = max(rates.get((how, kind), 0.0), rate)
                print(f"  read {how:3s}: v1 {rates[how, 'v1']:10,.0f} images/s   v2 {rates[how, 'v2']:10,.0f} images/s"
                      f"   v2/v1 {rates[how, 'v2'] / rates[how, 'v1']:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main()
