"""Perceptual hashes and near-duplicate groups: the hash's robustness, the banded matching
against brute force, and prep's report on real image files."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.near_duplicates import band_pairs, bands, match
from data_prep.phash import hamming, phash, phash_batch


def smooth_picture(seed: int, size: int = 96) -> np.ndarray:
    """A photo-like picture: random colour at four scales, each half as strong as the one
    above (photos' spectra fall off so), and a little grain."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3))
    for cells, weight in ((3, 8), (6, 4), (12, 2), (24, 1)):
        coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        img += weight * np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC), np.float64)
    return np.clip(img / 15 + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def reencoded(pixels: np.ndarray, *, scale: float = 0.85, crop: float = 0.0, quality: int = 70) -> np.ndarray:
    """The same picture cropped a little, resized and saved again as JPEG."""
    img = Image.fromarray(pixels, "RGB")
    w, h = img.size
    img = img.crop((int(w * crop), int(h * crop), int(w * (1 - crop)), int(h * (1 - crop))))
    img = img.resize((int(w * scale), int(h * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB").resize((w, h), Image.Resampling.BILINEAR))


def test_a_reencoded_resized_copy_stays_within_the_default_distance_and_distinct_pictures_do_not() -> None:
    originals = np.stack([smooth_picture(i) for i in range(40)])
    hashes = phash_batch(originals)
    copies = hamming(hashes, phash_batch(np.stack([reencoded(p) for p in originals])))
    assert copies.max() <= 2, copies  # JPEG at quality 70, 85% of the size
    cropped = hamming(hashes, phash_batch(np.stack([reencoded(p, crop=0.01) for p in originals])))
    assert np.percentile(cropped, 90) <= 6, cropped  # 1% off each side as well: most, not all
    apart = [int(hamming(hashes[i], hashes[j])[0]) for i in range(40) for j in range(i + 1, 40)]
    assert min(apart) > 12, sorted(apart)[:5]
    assert phash(originals[3]) == int(hashes[3])  # one image or a batch: the same bits


def test_phash_is_imagehash_phash() -> None:
    imagehash = pytest.importorskip("imagehash")  # not a dependency: checked where it is installed
    for i in range(5):
        pixels = smooth_picture(i)
        assert phash(pixels) == int(str(imagehash.phash(Image.fromarray(pixels))), 16)


def test_bands_cover_the_64_bits_once() -> None:
    for distance in range(13):
        parts = bands(distance)
        assert len(parts) == distance + 1 and sum(w for _, w in parts) == 64
        assert [s for s, _ in parts] == np.cumsum([0] + [w for _, w in parts][:-1]).tolist()


def test_banded_matching_finds_exactly_the_pairs_brute_force_finds() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    flips = [np.uint64(0)]
    for k in range(1, 9):  # planted neighbours 1..8 bits away
        bits = rng.choice(64, size=k, replace=False)
        flips.append(np.bitwise_or.reduce((np.uint64(1) << bits.astype(np.uint64))))
    hashes = np.concatenate([base, base[:8] ^ np.array(flips[1:], np.uint64)])
    distance = 5
    found = set()
    for shift, width in bands(distance):
        found |= {tuple(p) for p in band_pairs(hashes, shift, width, distance).tolist()}
    brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
             if int(hamming(hashes[i], hashes[j])[0]) <= distance}  # fmt: skip
    assert found == brute and {(k, 300 + k) for k in range(5)} <= found


def test_match_groups_chains_and_repeated_hashes(ray_local) -> None:
    a, b, c, far = np.uint64(0), np.uint64(0b111), np.uint64(0b111111), np.uint64(2**64 - 1)
    groups = match(np.array([a, b, c, far, far, np.uint64(0x5555555555555555)], np.uint64), 3)
    assert groups[0] == groups[0b111] == groups[0b111111]  # a~b, b~c: one group
    assert groups[2**64 - 1] != groups[0]  # the same hash twice: a group of its own
    assert 0x5555555555555555 not in groups  # 32 bits from every other


def test_prep_reports_a_near_copy_under_another_class_and_leaves_distinct_pictures_alone(
    ray_local, tmp_path: Path
) -> None:
    from workflows.config import PrepConfig
    from workflows.prep import run

    src = tmp_path / "in"
    for label, seeds in (("a", range(0, 8)), ("b", range(100, 108))):
        (src / label).mkdir(parents=True)
        for seed in seeds:
            Image.fromarray(smooth_picture(seed, 128)).save(src / label / f"img_{seed}.png")
    Image.fromarray(reencoded(smooth_picture(3, 128))).save(src / "b" / "copy_of_a3.jpg", quality=70)
    assert run(PrepConfig(input=str(src), output=str(tmp_path / "out"), image_size=32)) == 0
    near = json.loads((tmp_path / "out/report.json").read_text())["near_duplicates"]
    assert near["max_distance"] == 6
    assert [[f["path"] for f in g["files"]] for g in near["groups"]] == [["a/img_3.png", "b/copy_of_a3.jpg"]]
    group = near["groups"][0]
    assert group["across_classes"] and [f["label"] for f in group["files"]] == ["a", "b"]
    assert near["counts"] == {"groups": 1, "files": 2, "across_splits": int(group["across_splits"]), "across_classes": 1}


def test_a_near_copy_in_the_other_split_is_kept_with_its_original_unless_told_to_ignore(
    ray_local, tmp_path: Path
) -> None:
    import hashlib

    from data_prep.schema import content_split
    from workflows.config import PrepConfig
    from workflows.prep import run

    src = tmp_path / "in"
    for label, seeds in (("a", range(0, 8)), ("b", range(100, 108))):
        (src / label).mkdir(parents=True)
        for seed in seeds:
            Image.fromarray(smooth_picture(seed, 128)).save(src / label / f"img_{seed}.png")

    def split_of(path: Path) -> str:
        return content_split(hashlib.sha256(path.read_bytes()).hexdigest(), seed=0, val_fraction=0.2)

    original = src / "a/img_3.png"
    for quality in range(60, 100):  # a near-copy whose own bytes put it in the other split
        Image.fromarray(reencoded(smooth_picture(3, 128))).save(src / "a/copy_of_3.jpg", quality=quality)
        if split_of(src / "a/copy_of_3.jpg") != split_of(original):
            break
    else:
        pytest.fail("no JPEG quality put the copy in the other split")

    def prep(out: str, **options: object) -> dict:
        assert run(PrepConfig(input=str(src), output=str(tmp_path / out), image_size=32, **options)) == 0
        return json.loads((tmp_path / out / "report.json").read_text())

    apart = prep("ignored", near_duplicates="ignore")
    [group] = apart["near_duplicates"]["groups"]
    assert [f["path"] for f in group["files"]] == ["a/copy_of_3.jpg", "a/img_3.png"] and group["across_splits"]
    assert any("span train and val" in w for w in apart["warnings"])

    together = prep("together")
    [group] = together["near_duplicates"]["groups"]
    assert not group["across_splits"] and together["near_duplicates"]["moved_to_keep_together"] == 1
    assert not any("span train and val" in w for w in together["warnings"])
    manifest = json.loads((tmp_path / "together/manifest.json").read_text())
    assert manifest["num_rows"]["train"] + manifest["num_rows"]["val"] == 17
    assert together["counts"]["written"] == 17  # moved, not lost or doubled
    shard_rows = [r for split in ("train", "val") for r in _rows(tmp_path / "together", split)]
    assert sorted(r["path"] for r in shard_rows) == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
    for split in ("train", "val"):  # the counts followed the moved rows
        assert manifest["num_rows"][split] == sum(r["split"] == split for r in shard_rows)
    where = {r["path"]: r["split"] for r in shard_rows}
    assert where["a/copy_of_3.jpg"] == where["a/img_3.png"] == group["files"][0]["split"]


def _rows(out: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return [dict(r, split=split) for f in sorted((out / split).glob("*.parquet"))
            for r in pq.read_table(f, columns=["path"]).to_pylist()]  # fmt: skip


@pytest.mark.parametrize("max_pairs", [1 << 22, 5])
def test_nearest_index_finds_what_brute_force_finds(monkeypatch, max_pairs) -> None:
    import data_prep.near_duplicates as near

    monkeypatch.setattr(near, "MAX_PAIRS", max_pairs)  # small: the queries go in many runs
    rng = np.random.default_rng(1)
    train = rng.integers(0, 2**63, size=3000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    train[:40] = train[0]  # one hash many times: a big bucket, ties go to the lowest index
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, size=k, replace=False).astype(np.uint64)) for k in range(1, 9)]
    queries = np.concatenate([train[40:240:25] ^ np.array(flips, np.uint64), train[20:50], rng.integers(0, 2**63, size=50, dtype=np.int64).astype(np.uint64)])
    index, bits = near.NearestIndex(train, 6).nearest(queries)
    apart = hamming(queries[:, None], train[None, :])  # brute force
    want = np.where(apart.min(1) <= 6, apart.argmin(1), -1)
    assert (index == want).all() and (bits == np.where(want >= 0, apart.min(1), -1)).all()
    assert (index[:6] == [40, 65, 90, 115, 140, 165]).all() and (index[6:8] == -1).all()  # 1..6 bits found, 7 and 8 not
    empty = near.NearestIndex(np.zeros(0, np.uint64), 6).nearest(queries[:3])
    assert (empty[0] == -1).all() and (empty[1] == -1).all()


def test_training_hashes_are_the_train_splits_sorted_and_none_before_format_2(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.near_duplicates import training_hashes

    for split, rows in (("train", [(5, "b.jpg"), (-3, "c.jpg"), (5, "a.jpg")]), ("val", [(1, "v.jpg")])):
        (tmp_path / split).mkdir()
        hashes, paths = zip(*rows)
        pq.write_table(pa.table({"phash": pa.array(hashes, pa.int64()), "path": paths, "label": [0] * len(rows)}),
                       tmp_path / split / "part-0.parquet")  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2}))
    table = training_hashes(str(tmp_path))
    assert table.schema.names == ["phash", "path"] and table.to_pylist() == [
        {"phash": -3, "path": "c.jpg"}, {"phash": 5, "path": "a.jpg"}, {"phash": 5, "path": "b.jpg"},
    ]  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    assert training_hashes(str(tmp_path)) is None  # shards without hashes: the model goes without
