"""`cnnflow prep` on generated folders: real files, real local Ray, real Parquet.

Labels are visible in the pixels (tests/images.py), so "every good image exactly once,
with the right label" is checked by decoding the shards back, not by trusting counts.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.decode import IMAGE_EXTENSIONS, Limits, UndecodableImage, decode_image
from data_prep.scan import scan
from data_prep.schema import SHARD_FORMAT_VERSION, SHARD_SCHEMA, read_manifest
from tests.images import encode, label_from_pixels, pattern_pixels
from workflows.config import PrepConfig
from workflows.errors import CnnflowError
from workflows.prep import run

SIZE = 32  # small images keep the suite fast; the code path is the same at any size


# --- helpers: bad and unusual files -----------------------------------------------------


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    data = encode(pattern_pixels(0, 64, rng), "JPEG", "RGB")
    return data[: len(data) // 2]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims width x height pixels (no pixel data): a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """Stored turned a quarter left, with EXIF orientation 6 ("rotate 90 CW to view")."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def palette_with_transparency(pixels: np.ndarray) -> bytes:
    img = Image.fromarray(pixels).quantize(colors=16)
    return png_bytes(img, transparency=0)


def sixteen_bit(pixels: np.ndarray) -> bytes:
    """I;16 grey PNG using the full 16-bit range (Pillow's own conversion would clip it)."""
    grey = pixels.mean(axis=2).astype(np.uint16) * 257
    return png_bytes(Image.fromarray(grey))


# --- helpers: reading the output --------------------------------------------------------


def prep(input: Path, output: Path, **options: object) -> int:
    return run(PrepConfig(input=str(input), output=str(output), image_size=SIZE, **options))


def rows(output: Path, split: str) -> list[dict]:
    files = sorted((output / split).glob("*.parquet"))
    for f in files:
        assert pq.read_schema(f).equals(SHARD_SCHEMA, check_metadata=False)
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def pixels(row: dict) -> np.ndarray:
    return np.frombuffer(row["image"], np.uint8).reshape(SIZE, SIZE, 3)


def report(output: Path) -> dict:
    return json.loads((output / "report.json").read_text())


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# --- the whole contract on one messy folder ---------------------------------------------


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, ray_local: object) -> dict:
    """A labelled folder with every format and mode, awkward names and every kind of bad file."""
    from tests.images import make_image_folder

    root = tmp_path_factory.mktemp("messy")
    specs = make_image_folder(root, classes=("horizontal", "vertical", "checker"), per_class=12, size=(40, 56))
    expected = {spec.path.relative_to(root).as_posix(): spec.label for spec in specs}
    rng = np.random.default_rng(7)
    extra = {
        "horizontal/p with transparency.png": (0, palette_with_transparency(pattern_pixels(0, 48, rng))),
        "vertical/sixteen bit.png": (1, sixteen_bit(pattern_pixels(1, 48, rng))),
        "checker/ÜBER café.JPEG": (2, encode(pattern_pixels(2, 48, rng), "JPEG", "RGB")),
        "horizontal/deeper/nested/x.png": (0, encode(pattern_pixels(0, 48, rng), "PNG", "RGB")),
        "horizontal/rotated.jpg": (0, exif_rotated_jpeg(pattern_pixels(0, (40, 64), rng))),
    }
    for path, (label, data) in extra.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        expected[path] = label
    bad = {
        "horizontal/truncated.jpg": (truncated_jpeg(rng), "truncated"),
        "vertical/empty.png": (b"", "empty file"),
        "checker/text.jpg": (b"just some notes, not a picture\n", "not an image"),
        "checker/bomb.png": (png_claiming(10_000, 10_000), "too many pixels: 10000x10000"),
        "vertical/huge bomb.png": (png_claiming(50_000, 50_000), "decompression bomb"),
    }
    for path, (data, _) in bad.items():
        (root / path).write_bytes(data)
    skipped = {
        ".DS_Store": "hidden",
        "horizontal/.hidden.jpg": "hidden",
        "vertical/notes.txt": "not an image by extension",
        "loose.jpg": "not in a class folder",
    }
    for path in skipped:
        (root / path).write_bytes(b"x")
    (root / "empty class").mkdir()
    output = tmp_path_factory.mktemp("out") / "prepared"
    assert prep(root, output, rows_per_shard=20) == 0
    return {"root": root, "output": output, "expected": expected, "bad": bad, "skipped": skipped}


def test_every_good_image_exactly_once_with_the_label_its_pixels_show(messy: dict) -> None:
    output = messy["output"]
    manifest = read_manifest(str(output))
    assert manifest["classes"] == ["checker", "horizontal", "vertical"]  # sorted names
    folder_of = {name: i for i, name in enumerate(("horizontal", "vertical", "checker"))}
    written = rows(output, "train") + rows(output, "val")
    paths = [r["path"] for r in written]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(messy["expected"])
    for row in written:
        expected = messy["expected"][row["path"]]
        assert folder_of[manifest["classes"][row["label"]]] == expected, row["path"]
        assert label_from_pixels(pixels(row)) == expected, row["path"]
        assert len(row["sha256"]) == 64
    assert {r["path"] for r in rows(output, "train")}.isdisjoint(r["path"] for r in rows(output, "val"))


def test_accounting_holds_and_the_report_names_every_other_file(messy: dict) -> None:
    root, output = messy["root"], messy["output"]
    rep = report(output)
    n = rep["counts"]
    assert n["scanned"] == len(all_files(root))
    assert n["scanned"] == n["written"] + n["skipped"] + n["quarantined"]
    assert n["written"] == len(messy["expected"])

    quarantined = {q["path"]: q["reason"] for q in rep["quarantined"]}
    assert set(quarantined) == set(messy["bad"])
    for path, (_, reason) in messy["bad"].items():
        assert reason in quarantined[path], (path, quarantined[path])
    with open(output / "quarantine.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rep["quarantined"]

    skipped = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert set(skipped) == set(messy["skipped"])
    for path, reason in messy["skipped"].items():
        assert reason in skipped[path]
    assert rep["empty_class_folders"] == ["empty class"]
    named = set(quarantined) | set(skipped) | {r["path"] for r in rows(output, "train") + rows(output, "val")}
    assert named == {p.relative_to(root).as_posix() for p in all_files(root)}


def test_exif_orientation_is_applied_before_resizing(messy: dict) -> None:
    row = next(r for r in rows(messy["output"], "train") + rows(messy["output"], "val") if r["path"] == "horizontal/rotated.jpg")
    # Stored on disk as 64 high x 40 wide with vertical stripes; upright it is 40 x 64, horizontal.
    stored = np.asarray(Image.open(messy["root"] / "horizontal/rotated.jpg"))
    assert stored.shape[:2] == (64, 40) and label_from_pixels(stored) == 1
    assert (row["orig_height"], row["orig_width"]) == (40, 64)
    assert label_from_pixels(pixels(row)) == 0
    assert report(messy["output"])["exif_transposed"] == 1


def test_manifest_and_shards_follow_the_contract(messy: dict) -> None:
    output = messy["output"]
    manifest = read_manifest(str(output))
    assert manifest["format_version"] == SHARD_FORMAT_VERSION
    assert manifest["labeled"] is True and manifest["color_mode"] == "RGB"
    assert manifest["image_size"] == SIZE and manifest["resize"] == "squash"
    assert manifest["options"]["rows_per_shard"] == 20 and manifest["input"] == str(messy["root"])
    assert isinstance(manifest["cnnflow_version"], str) and len(manifest["content_hash"]) == 64
    train, val = rows(output, "train"), rows(output, "val")
    assert manifest["num_rows"] == {"train": len(train), "val": len(val)}
    for split, split_rows in (("train", train), ("val", val)):
        per_class = {name: 0 for name in manifest["classes"]}
        for r in split_rows:
            per_class[manifest["classes"][r["label"]]] += 1
        assert manifest["counts"][split] == per_class
        assert all(v > 0 for v in per_class.values())  # stratified: every class on both sides
    for f in (output / "train").glob("*.parquet"):
        assert pq.read_metadata(f).num_rows <= 20
    # mean and std: of the training pixels, per channel, on the 0-1 scale
    train_pixels = np.stack([pixels(r) for r in train]).reshape(-1, 3) / 255
    np.testing.assert_allclose(manifest["mean"], train_pixels.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(manifest["std"], train_pixels.std(axis=0), atol=1e-5)
    rep = report(output)
    assert rep["source_modes"]["P"] >= 1 and rep["source_modes"]["I;16"] == 1
    assert rep["source_modes"]["CMYK"] >= 1 and rep["source_formats"]["WEBP"] >= 1
    assert sum(rep["source_shorter_side"].values()) == rep["counts"]["written"]


# --- label sources, splits, unlabeled ---------------------------------------------------


def test_regex_labels_on_a_flat_folder(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("cat", "dog"), per_class=10, layout="flat")
    (root / "README.jpg").write_bytes(encode(pattern_pixels(0, 32, np.random.default_rng(0)), "JPEG", "RGB"))
    assert prep(root, tmp_path / "out", labels=r"regex:^([a-z]+)\.\d+") == 0
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["classes"] == ["cat", "dog"]
    written = rows(tmp_path / "out", "train") + rows(tmp_path / "out", "val")
    assert len(written) == len(specs)
    for row in written:
        assert manifest["classes"][row["label"]] == row["path"].split(".")[0]
        assert label_from_pixels(pixels(row)) == ("cat", "dog").index(row["path"].split(".")[0])
    assert [s["path"] for s in report(tmp_path / "out")["skipped"]] == ["README.jpg"]


def test_csv_labels(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("a", "b"), per_class=8, layout="unlabeled")
    listed = specs[:-2]  # two files left out of the csv: skipped, not lost
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for spec in listed:
            writer.writerow([spec.path.relative_to(root).as_posix(), ("stripes", "bars")[spec.label]])
        writer.writerow(["gone/missing.jpg", "stripes"])
    assert prep(root, tmp_path / "out", labels=f"csv:{table}") == 0
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["classes"] == ["bars", "stripes"]
    written = rows(tmp_path / "out", "train") + rows(tmp_path / "out", "val")
    by_path = {s.path.relative_to(root).as_posix(): s.label for s in listed}
    assert {r["path"] for r in written} == set(by_path)
    for row in written:
        assert manifest["classes"][row["label"]] == ("stripes", "bars")[by_path[row["path"]]]
    rep = report(tmp_path / "out")
    assert {s["reason"] for s in rep["skipped"]} == {"not listed in the labels csv"}
    assert len(rep["skipped"]) == 2 and rep["csv_missing"] == ["gone/missing.jpg"]


def test_unlabeled_input_goes_to_one_split_with_label_minus_one(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(per_class=5, layout="unlabeled")
    assert prep(root, tmp_path / "out", unlabeled=True) == 0
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["labeled"] is False and manifest["classes"] == []
    assert manifest["counts"] == {"data": len(specs)} and manifest["num_rows"] == {"data": len(specs)}
    written = rows(tmp_path / "out", "data")
    assert {r["label"] for r in written} == {-1}
    assert sorted(r["path"] for r in written) == sorted(s.path.relative_to(root).as_posix() for s in specs)
    assert not (tmp_path / "out" / "train").exists()


def test_split_follows_the_bytes_reproducibly_and_stays_when_files_are_added(ray_local, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def write(names: list[str], folder: Path = tmp_path / "in") -> None:
        for name in names:  # noise: every file's bytes differ, and no two are near-duplicates
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)

    def splits(out: Path) -> dict[str, str]:
        return {r["path"]: split for split in ("train", "val") for r in rows(out, split)}

    write([f"{c}/{i}.png" for c in ("a", "b") for i in range(150)] + ["c/0.png", "c/1.png"])
    for copy in ("a/copy.png", "b/copy.png"):
        shutil.copy(tmp_path / "in/a/0.png", tmp_path / "in" / copy)
    assert prep(tmp_path / "in", tmp_path / "out", val_fraction=0.2, seed=3, near_duplicates="ignore") == 0
    first = splits(tmp_path / "out")
    assert first["a/0.png"] == first["a/copy.png"] == first["b/copy.png"]  # identical bytes, one split
    for c in ("a", "b"):
        share = sum(s == "val" for p, s in first.items() if p.startswith(c + "/")) / 151
        assert 0.1 < share < 0.3
    assert sorted(s for p, s in first.items() if p.startswith("c/")) == ["train", "val"]  # tiny class: both sides
    assert read_manifest(str(tmp_path / "out"))["split_rule"]["by"] == "sha256"
    assert prep(tmp_path / "in", tmp_path / "again", val_fraction=0.2, seed=3, near_duplicates="ignore") == 0
    assert splits(tmp_path / "again") == first
    write([f"{c}/new_{i}.png" for c in ("a", "b") for i in range(100)])
    assert prep(tmp_path / "in", tmp_path / "grown", val_fraction=0.2, seed=3, near_duplicates="ignore") == 0
    grown = splits(tmp_path / "grown")
    assert all(grown[p] == s for p, s in first.items())
    assert prep(tmp_path / "in", tmp_path / "seed4", val_fraction=0.2, seed=4, near_duplicates="ignore") == 0
    assert splits(tmp_path / "seed4") != grown


# --- duplicates, reruns, content hash ---------------------------------------------------


def test_duplicates_are_reported_and_conflicts_named(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("x", "y"), per_class=6)
    shutil.copy(root / "x/img_0000.jpg", root / "x/copy.jpg")
    shutil.copy(root / "x/img_0001.png", root / "y/stolen.png")
    assert prep(root, tmp_path / "out") == 0
    rep = report(tmp_path / "out")
    groups = {tuple(f["path"] for f in d["files"]): d for d in rep["duplicates"]}
    assert groups[("x/copy.jpg", "x/img_0000.jpg")]["conflict"] is False
    conflict = groups[("x/img_0001.png", "y/stolen.png")]
    assert conflict["conflict"] is True and [f["label"] for f in conflict["files"]] == ["x", "y"]
    assert rep["duplicate_conflicts"] == 1
    assert rep["counts"]["written"] == len(specs) + 2  # duplicates are kept (and reported)


def test_rerun_replaces_output_and_content_hash_tracks_bytes_and_labels(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("x", "y"), per_class=8)
    out = tmp_path / "out"
    assert prep(root, out, rows_per_shard=3) == 0
    first = read_manifest(str(out))
    assert prep(root, out) == 0  # fewer, larger shards: no stale shard may survive
    second = read_manifest(str(out))
    assert len(list((out / "train").glob("*.parquet"))) < first["num_rows"]["train"] / 3
    assert len(rows(out, "train")) + len(rows(out, "val")) == len(specs)
    assert second["content_hash"] == first["content_hash"]

    (root / "x/img_0000.jpg").write_bytes(encode(pattern_pixels(0, 48, np.random.default_rng(9)), "JPEG", "RGB"))
    assert prep(root, out) == 0
    changed_bytes = read_manifest(str(out))["content_hash"]
    assert changed_bytes != second["content_hash"]
    (root / "z").mkdir()
    shutil.move(root / "y/img_0001.png", root / "z/img_0001.png")  # same bytes, new label
    assert prep(root, out) == 0
    assert read_manifest(str(out))["content_hash"] not in (changed_bytes, second["content_hash"])


def test_pyarrow_uris_for_input_and_output(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("x", "y"), per_class=5)
    out = tmp_path / "out"
    assert run(PrepConfig(input=root.as_uri(), output=out.as_uri(), image_size=SIZE)) == 0
    manifest = read_manifest(out.as_uri())
    assert manifest["input"] == root.as_uri()
    assert sorted(r["path"] for r in rows(out, "train") + rows(out, "val")) == sorted(
        s.path.relative_to(root).as_posix() for s in specs
    )


def test_cli_prints_a_summary_and_errors_as_one_line(image_folder, ray_local, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    root, _ = image_folder(classes=("x", "y"), per_class=4)
    ok = CliRunner().invoke(cli, ["prep", str(root), str(tmp_path / "out"), "--image-size", "16"])
    assert ok.exit_code == 0, ok.output
    assert "scanned 8 = written 8 + skipped 0 + quarantined 0" in ok.output
    assert read_manifest(str(tmp_path / "out"))["image_size"] == 16
    bad = CliRunner().invoke(cli, ["prep", str(tmp_path / "nowhere"), str(tmp_path / "out2")])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [f"error: input {tmp_path / 'nowhere'} does not exist"]


def test_a_file_that_vanished_after_the_scan_is_quarantined_as_unreadable(tmp_path: Path) -> None:
    from data_prep.shards import ChunkResult, write_chunk

    (tmp_path / "in/a").mkdir(parents=True)
    (tmp_path / "in/a/ok.png").write_bytes(encode(pattern_pixels(0, 20, np.random.default_rng(0)), "PNG", "RGB"))
    (tmp_path / "out/train").mkdir(parents=True)
    files = [("a/ok.png", 0, "train"), ("a/gone.png", 0, "train")]
    limits = Limits.of(max_file_mb=1, max_megapixels=1)
    *progress, result = write_chunk(
        str(tmp_path / "in"), str(tmp_path / "out"), "p.parquet", files, size=8, resize="crop", limits=limits
    )
    assert isinstance(result, ChunkResult) and sum(progress) == 2
    assert result.written == 1 and result.counts == {("train", 0): 1} and len(result.sha_keys) == 1
    assert result.quarantined[0]["path"] == "a/gone.png"
    assert result.quarantined[0]["reason"].startswith("unreadable")
    assert pq.read_table(tmp_path / "out/train/p.parquet").num_rows == 1


# --- errors -------------------------------------------------------------------------------


def test_input_without_images_is_an_error_that_says_what_was_found(tmp_path: Path, ray_local) -> None:
    (tmp_path / "in/a").mkdir(parents=True)
    (tmp_path / "in/a/notes.txt").write_text("x")
    with pytest.raises(CnnflowError, match=r"no images to prepare .*2 files|no images to prepare .*1 files"):
        prep(tmp_path / "in", tmp_path / "out")


def test_flat_folder_with_folder_labels_suggests_regex(image_folder, ray_local, tmp_path: Path) -> None:
    root, _ = image_folder(per_class=2, layout="flat")
    with pytest.raises(CnnflowError, match="regex"):
        prep(root, tmp_path / "out")


def test_one_class_is_an_error(image_folder, ray_local, tmp_path: Path) -> None:
    root, _ = image_folder(classes=("only",), per_class=4)
    with pytest.raises(CnnflowError, match=r"only one class .*only: 4 images"):
        prep(root, tmp_path / "out")


def test_all_bad_files_is_an_error_and_leaves_no_shards(tmp_path: Path, ray_local) -> None:
    for name in ("a/1.jpg", "a/2.png", "b/1.jpg"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"garbage")
    with pytest.raises(CnnflowError, match=r"none of the 3 images .* could be decoded"):
        prep(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out/manifest.json").exists()
    assert not (tmp_path / "out/train").exists()
    assert report(tmp_path / "out")["counts"]["quarantined"] == 3


def test_output_must_be_new_empty_or_a_prep_output(image_folder, ray_local, tmp_path: Path) -> None:
    root, _ = image_folder(per_class=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/thesis.docx").write_text("precious")
    with pytest.raises(CnnflowError, match=r"holds files that `cnnflow prep` did not write \(thesis.docx\)"):
        prep(root, tmp_path / "busy")
    assert (tmp_path / "busy/thesis.docx").read_text() == "precious"
    with pytest.raises(CnnflowError, match="inside the input"):
        prep(root, root / "out")


# --- what prep may touch: INPUT and OUTPUT apart, only its own files replaced ----------------


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_that_is_holds_or_sits_in_the_input_is_refused_before_anything_is_touched(image_folder, tmp_path: Path) -> None:
    # The usual layout, dataset/{train,val}/<class>/...: `cnnflow prep dataset/train dataset`
    # once deleted dataset/train. No Ray here: the refusal comes before it starts.
    from click.testing import CliRunner

    from workflows.cli import cli

    images, _ = image_folder(classes=("x", "y"), per_class=3)
    dataset = tmp_path / "dataset"
    shutil.copytree(images, dataset / "train")
    shutil.copytree(images, dataset / "val")
    before = snapshot(dataset)
    (tmp_path / "alias").symlink_to(dataset)  # the same folder under another name
    cases = [
        (dataset / "train", dataset, "holds the input"),
        (dataset, dataset, "is the input folder"),
        (dataset, dataset / "train" / "prepared", "is inside the input"),
        (dataset / "train", tmp_path / "alias", r"\(really .*dataset\) holds the input"),
        ((dataset / "train").as_uri(), dataset.as_uri(), "holds the input"),
    ]
    for input, output, how in cases:
        with pytest.raises(CnnflowError, match=how):
            prep(input, output)
    assert snapshot(dataset) == before
    assert not (dataset / "train" / "prepared").exists()
    assert not list(dataset.glob(".cnnflow*")) and not (dataset / "manifest.json").exists()

    result = CliRunner().invoke(cli, ["prep", str(dataset / "train"), str(dataset)])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "holds the input" in result.output
    assert snapshot(dataset) == before


def test_locations_compare_after_symlinks_and_as_normalised_uris(tmp_path: Path) -> None:
    from data_prep.safety import check_apart

    overlapping = [
        ("s3://bucket/data", "s3://bucket/data/"),
        ("s3://bucket/data", "S3://bucket//data/./out"),
        ("s3://bucket/data/train", "s3://KEY:SECRET@bucket/data"),
        ("s3://bucket/data?endpoint_override=localhost:9000", "s3://bucket/data/out"),
        (str(tmp_path / "in"), (tmp_path / "in" / "out").as_uri()),
    ]
    for input, output in overlapping:
        with pytest.raises(ValueError, match="input") as info:
            check_apart(input, output)
        assert "SECRET" not in str(info.value)
    apart = [
        ("s3://bucket/data", "s3://bucket/data2"),  # a common prefix is not a parent
        ("s3://bucket/data", "s3://other/data"),
        ("s3://bucket/data", str(tmp_path / "data")),
        (str(tmp_path / "in"), str(tmp_path / "in-prepared")),
    ]
    for input, output in apart:
        check_apart(input, output)


def test_output_holding_files_prep_did_not_write_is_refused_and_kept(image_folder, ray_local, tmp_path: Path) -> None:
    root, _ = image_folder(classes=("x", "y"), per_class=4)
    # Folders named like prep's own, holding someone's images, and no marker.
    users = tmp_path / "users"
    shutil.copytree(root / "x", users / "train")
    (users / "val").mkdir()
    (users / "val" / "part-00000.parquet").write_bytes(b"not cnnflow's")
    before = snapshot(users)
    with pytest.raises(CnnflowError, match=r"output .*users holds files .* did not write \(train/img_0000"):
        prep(root, users)
    assert snapshot(users) == before

    # A real prep output, then the user adds files of their own: the rerun touches nothing.
    out = tmp_path / "out"
    assert prep(root, out) == 0
    (out / "train" / "mine.jpg").write_bytes(b"precious")
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    with pytest.raises(CnnflowError, match=r"did not write \(notes.txt, train/mine.jpg\)"):
        prep(root, out)
    assert snapshot(out) == before

    # An old-style output (manifest, no marker) whose shard lacks cnnflow's stamp is not ours.
    fake = tmp_path / "fake"
    (fake / "train").mkdir(parents=True)
    shutil.copy(out / "manifest.json", fake / "manifest.json")
    pq.write_table(pq.read_table(next((out / "train").glob("*.parquet"))).replace_schema_metadata(None), fake / "train/part-00000.parquet")
    with pytest.raises(CnnflowError, match=r"did not write \(train/part-00000.parquet\)"):
        prep(root, fake)
    assert (fake / "train/part-00000.parquet").exists() and (fake / "manifest.json").exists()


def test_an_output_from_before_the_marker_is_recognised_by_its_stamped_shards(image_folder, ray_local, tmp_path: Path) -> None:
    from data_prep.safety import MARKER

    root, specs = image_folder(classes=("x", "y"), per_class=4)
    out = tmp_path / "out"
    assert prep(root, out, rows_per_shard=2) == 0
    (out / MARKER).unlink()  # as cnnflow wrote it before the marker existed
    assert prep(root, out) == 0
    assert len(rows(out, "train")) + len(rows(out, "val")) == len(specs)
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "cnnflow prep"
    assert set(marker["files"]) >= set(snapshot(out)) - {MARKER}


def test_json_and_csv_outputs_are_replaced_whole(tmp_path: Path) -> None:
    from data_prep.schema import write_atomic, write_json

    csv_file = tmp_path / "quarantine.csv"
    write_atomic(str(csv_file), b"path,reason\n")
    first = csv_file.stat().st_ino
    write_atomic(str(csv_file), b"path,reason\na.jpg,truncated\n")
    assert csv_file.read_bytes() == b"path,reason\na.jpg,truncated\n" and csv_file.stat().st_ino != first
    csv_file.unlink()
    target = tmp_path / "manifest.json"
    write_json(str(target), {"version": 1})
    inode = target.stat().st_ino
    with pytest.raises(TypeError):
        write_json(str(target), {"version": object()})  # fails half-way: the old file stays whole
    assert json.loads(target.read_text()) == {"version": 1}
    write_json(str(target), {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}
    assert target.stat().st_ino != inode  # renamed into place, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left


# --- inputs from a hostile file system ------------------------------------------------------


def test_symlinks_leaving_the_input_are_skipped_and_loops_listed_once(image_folder, ray_local, tmp_path: Path) -> None:
    root, specs = image_folder(classes=("x", "y"), per_class=4)
    outside, _ = image_folder(classes=("z",), per_class=30)
    (root / "z").symlink_to(outside / "z")  # a class from outside INPUT
    (root / "x" / "etc").symlink_to(outside)  # like a link to /etc
    (root / "y" / "stolen.png").symlink_to(next((outside / "z").iterdir()))
    (root / "y" / "up").symlink_to("..")  # loops
    (root / "y" / "self").symlink_to(".")
    (root / "x" / "alias.jpg").symlink_to("img_0000.jpg")  # inside INPUT: followed
    (root / "x" / "again").symlink_to("../y")  # a folder listed at its own path already
    out = tmp_path / "out"
    assert prep(root, out) == 0

    manifest, rep = read_manifest(str(out)), report(out)
    assert manifest["classes"] == ["x", "y"]
    written = sorted(r["path"] for r in rows(out, "train") + rows(out, "val"))
    assert written == sorted([s.path.relative_to(root).as_posix() for s in specs] + ["x/alias.jpg"])
    skipped = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert skipped == {
        "z": "symlink to outside the input",
        "x/etc": "symlink to outside the input",
        "y/stolen.png": "symlink to outside the input",
        "y/up": "symlink loop",
        "y/self": "symlink loop",
        "x/again": "symlink to a folder listed already",
    }
    n = rep["counts"]
    assert n["scanned"] == n["written"] + n["skipped"] + n["quarantined"] == len(specs) + 1 + 6
    assert [d["files"] for d in rep["duplicates"]] == [[{"path": "x/alias.jpg", "label": "x"}, {"path": "x/img_0000.jpg", "label": "x"}]]


@pytest.mark.timeout(60)
def test_two_link_loops_in_one_folder_are_listed_in_finite_time(tmp_path: Path) -> None:
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "a" / "loop1").symlink_to("..")
    (tmp_path / "a" / "loop2").symlink_to("../a")
    (tmp_path / "b" / "fifo.jpg").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "b" / "fifo.jpg")  # opening it would block forever
    found = scan(str(tmp_path))
    assert sorted(f.path for f in found.files) == ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
    assert {s["path"]: s["reason"] for s in found.skipped} == {
        "a/loop1": "symlink loop", "a/loop2": "symlink loop", "b/fifo.jpg": "not a regular file",
    }  # fmt: skip


def test_a_name_that_is_not_utf8_is_quarantined_with_a_reason_not_a_crash(image_folder, ray_local, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workflows.cli import cli

    root, specs = image_folder(classes=("x", "y"), per_class=4)
    good = (root / "x" / "img_0000.jpg").read_bytes()
    os.makedirs(os.fsencode(root / "y") + b"/caf\xe9 latin-1", exist_ok=True)
    for name in (b"/x/bad\xff.jpg", b"/y/caf\xe9 latin-1/ok.jpg"):
        with open(os.fsencode(root) + name, "wb") as f:
            f.write(good)
    result = CliRunner().invoke(cli, ["prep", str(root), str(tmp_path / "out"), "--image-size", "16"])
    assert result.exit_code == 0, result.output
    rep = report(tmp_path / "out")
    quarantined = {q["path"]: q["reason"] for q in rep["quarantined"]}
    assert set(quarantined) == {"x/bad\\xff.jpg", "y/caf\\xe9 latin-1/ok.jpg"}
    assert all("not valid UTF-8" in r for r in quarantined.values())
    with open(tmp_path / "out" / "quarantine.csv", newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == rep["quarantined"]
    n = rep["counts"]
    assert (n["written"], n["quarantined"]) == (len(specs), 2)
    assert n["scanned"] == n["written"] + n["skipped"] + n["quarantined"]
    assert "x/bad\\xff.jpg" in result.output


def test_names_reach_the_terminal_as_text_not_markup(ray_local, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tests.images import make_image_folder
    from workflows.cli import cli

    root = tmp_path / "in"
    make_image_folder(root, classes=("[cat]", "[bold]dog"), per_class=4)
    (root / "[bold]dog" / "sub[").mkdir()
    (root / "[bold]dog" / "sub[" / "]evil.jpg").write_bytes(b"not an image")  # path: [bold]dog/sub[/]evil.jpg
    (root / "[cat]" / "\x1b[31mred.jpg").write_bytes(b"not an image")  # an escape sequence in a name
    result = CliRunner().invoke(cli, ["prep", str(root), str(tmp_path / "out"), "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert "[cat]" in result.output and "[bold]dog" in result.output
    assert "[bold]dog/sub[/]evil.jpg" in result.output
    assert "\x1b" not in result.output and "\\x1b[31mred.jpg" in result.output


# --- decode_image, the function predict shares ------------------------------------------


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_decodes_to_rgb_with_its_pattern(mode: str) -> None:
    px = pattern_pixels(1, (36, 52), np.random.default_rng(1))
    if mode == "I;16":
        data = sixteen_bit(px)
    elif mode == "P":
        data = palette_with_transparency(px)
    else:
        data = encode(px, "TIFF" if mode == "CMYK" else "PNG", mode)
    d = decode_image(data, size=SIZE, resize="squash")
    assert d.source_mode == mode
    assert d.pixels.shape == (SIZE, SIZE, 3) and d.pixels.dtype == np.uint8 and d.pixels.flags.c_contiguous
    assert label_from_pixels(d.pixels) == 1
    assert (d.orig_height, d.orig_width) == (36, 52)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    d = decode_image(png_bytes(Image.fromarray(ramp)), size=16, resize="squash")
    assert d.pixels.max() > 240 and d.pixels.min() < 15 and 100 < d.pixels.mean() < 155


def test_transparency_is_shown_on_white() -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black
    d = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), size=8, resize="squash")
    assert (d.pixels == 255).all()


def test_resize_modes_keep_or_change_the_aspect_as_named() -> None:
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # white centre third of a black wide image
    data = png_bytes(Image.fromarray(wide))
    crop = decode_image(data, size=12, resize="crop").pixels
    assert crop.min() > 200  # the centre square is the white band
    pad = decode_image(data, size=12, resize="pad").pixels
    assert (pad[:4] == 0).all() and (pad[-4:] == 0).all()  # letterbox bars, top and bottom
    assert pad[6, 6].min() > 200
    squash = decode_image(data, size=12, resize="squash").pixels
    assert squash[:, 0].max() < 30 and squash[:, 6].min() > 200
    with pytest.raises(ValueError, match="resize must be one of"):
        decode_image(data, size=12, resize="stretch")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello", "not an image"),
        (png_claiming(10_000, 10_000), "too many pixels: 10000x10000 = 100.0 Mpx to decode"),
        (png_claiming(50_000, 50_000), "decompression bomb"),
    ],
    ids=["empty", "text", "bomb-over-our-budget", "bomb-over-pillows-limit"],
)
def test_undecodable_bytes_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UndecodableImage, match=reason) as info:
        decode_image(data, size=SIZE, resize="squash")
    assert isinstance(info.value, ValueError) and reason in info.value.reason


def test_truncated_jpeg_is_undecodable() -> None:
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_image(truncated_jpeg(np.random.default_rng(0)), size=SIZE, resize="crop")


def test_image_extensions_are_lower_case_with_dots() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
