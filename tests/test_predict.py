"""`cnnflow predict` end to end: real files, real local Ray (2 CPUs), real MLflow registry.

The model is the session's (tests/conftest.py `trained_flow`): trained on generated stripe
patterns (tests/images.py), whose class can be read back from the pixels, and registered by
the real `cnnflow train --promote`, so a prediction can be checked against the truth, not
just for shape.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.images import make_image_folder
from workflows.config import PredictConfig
from workflows.errors import CnnflowError
from workflows.predict.precision import cpu_has_bf16

CLASSES = ("horizontal", "vertical", "checker")
NAME = "stripes"


@pytest.fixture
def registry(flow_store):
    """The session's trained flow (tests/conftest.py), MLflow pointed at its store."""
    return flow_store


def register_again(trained) -> str:
    """A second version of the same model (its own version number, same weights)."""
    from workflows import tracking

    source = tracking.get_version(NAME, 1).source
    return f"models:/{NAME}/{tracking.client().create_model_version(NAME, source).version}"


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Images in nested folders, with their true class, plus three broken files and a README."""
    root = tmp_path / "images"
    specs = make_image_folder(root, classes=CLASSES, per_class=8, size=(40, 56), layout="unlabeled", seed=1)
    truth = {str(s.path.relative_to(root)): s.label for s in specs}
    (root / "broken").mkdir()
    jpeg = next(s.path for s in specs if s.path.suffix == ".jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "text.jpg").write_text("not an image at all")
    (root / "README.txt").write_text("not an input")
    return root, truth


BROKEN = {"broken/truncated.jpg", "broken/empty.png", "broken/text.jpg"}


def predict(input: Path, output: Path, **options) -> int:
    from workflows.predict import driver as predict_stage

    return predict_stage.run(PredictConfig(input=str(input), output=str(output), **options))


def read_output(output: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(output.glob("part-*.parquet"))], ignore_index=True)


def test_predicts_right_label_one_row_per_file_and_error_rows(ray_local, registry, folder, tmp_path):
    root, truth = folder
    out = tmp_path / "preds"
    assert predict(root, out, batch_size=16) == 0

    rows = read_output(out)
    assert sorted(rows["path"]) == sorted([*truth, *BROKEN])  # one row per image file, README skipped
    good = rows[~rows["path"].isin(BROKEN)]
    assert good["error"].isna().all(), good[good["error"].notna()]
    # A small CNN trained for a few epochs: right on (almost) every image; chance is 1/3.
    accuracy = (good["label"] == good["path"].map(lambda p: CLASSES[truth[p]])).mean()
    assert accuracy >= 0.9, good.assign(truth=good["path"].map(truth))[["path", "label", "truth", "score"]]
    assert (rows["model_uri"] == registry.uri).all()
    assert all(len(p) == len(CLASSES) and abs(sum(p) - 1) < 1e-4 for p in good["probabilities"])
    assert np.allclose(good["score"], [max(p) for p in good["probabilities"]])
    bad = rows[rows["path"].isin(BROKEN)].set_index("path")
    assert bad["label"].isna().all() and bad["error"].notna().all()
    assert "empty" in bad.loc["broken/empty.png", "error"]

    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert [f.name for f in schema] == [
        "path", "label", "score", "probabilities", "model_uri", "error", "unsure", "seen_in_training", "seen_distance",
        "embedding", "scoring_run",
    ]  # fmt: skip
    assert rows["unsure"].isna().all()  # no --min-score: every scored row has its label
    assert rows["embedding"].isna().all()  # no --embeddings: the column is there, null
    assert schema.field("score").type == pa.float32()
    assert pa.types.is_list(schema.field("probabilities").type)
    assert schema.field("probabilities").type.value_type == pa.float32()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(truth) + 3 and summary["errors"] == 3
    assert summary["model_uri"] == registry.uri and summary["model_version"] == 1
    expected = pd.Series(truth).map(lambda k: CLASSES[k]).value_counts().to_dict()
    assert summary["counts"] == {c: expected.get(c, 0) for c in CLASSES}
    assert summary["images_per_s"] > 0 and summary["skipped_files"] == {"not an image by extension (.txt)": 1}
    assert (rows["scoring_run"] == summary["scoring_run_id"]).all()


def test_each_job_is_a_scoring_run_and_every_link_leads_back_to_the_data(ray_local, registry, tmp_path, capfd):
    import mlflow

    from data_prep.schema import read_manifest
    from workflows import tracking

    root = tmp_path / "images"
    first = make_image_folder(root / "a", classes=CLASSES, per_class=2, size=40, seed=6)
    out = tmp_path / "preds"
    assert predict(root, out, experiment="lineage") == 0
    first_run = json.loads((out / "summary.json").read_text())["scoring_run_id"]
    assert f"scoring run {first_run} in experiment 'lineage'" in capfd.readouterr().err
    make_image_folder(root / "b", classes=CLASSES, per_class=1, size=40, seed=7)
    assert predict(root, out, experiment="lineage") == 0  # resumes: scores b only
    second_run = json.loads((out / "summary.json").read_text())["scoring_run_id"]
    assert second_run != first_run

    # Row -> its scoring run: rows kept from the first job keep its id.
    rows = read_output(out)
    assert rows.loc[rows["path"].str.startswith("a/"), "scoring_run"].tolist() == [first_run] * len(first)
    assert set(rows.loc[rows["path"].str.startswith("b/"), "scoring_run"]) == {second_run}

    # Scoring run -> the version it used, what it read and wrote, its counts.
    client = tracking.client()
    run = client.get_run(second_run)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "lineage"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert (tags["model_name"], tags["model_version"], tags["model_uri"]) == (NAME, "1", registry.uri)
    assert (tags["input"], tags["output"]) == (str(root), str(out)) and params["model_uri"] == registry.uri
    assert (params["format"], params["workers"], params["precision"]) == ("parquet", "1", "auto")
    assert metrics["rows"] == len(rows) and metrics["errors"] == 0
    assert metrics["rows_scored_this_run"] == len(CLASSES) and metrics["images_per_s"] > 0
    assert {"summary.json"} <= {a.path for a in client.list_artifacts(second_run)}

    # Version -> every scoring run that used it: a tag per run on the version, and a search.
    version = client.get_model_version(NAME, "1")
    assert version.tags[f"scoring_run.{first_run}"] == version.tags[f"scoring_run.{second_run}"] == str(out)
    found = mlflow.search_runs(
        experiment_names=["lineage"], filter_string=f"tags.model_name = '{NAME}' and tags.model_version = '1'",
        output_format="list",
    )  # fmt: skip
    assert {r.info.run_id for r in found} == {first_run, second_run}

    # Version -> training run -> its dataset inputs, whose digest is the data's content hash.
    assert version.run_id == tags["training_run"] == registry.run_id
    content_hash = read_manifest(str(registry.prepared))["content_hash"]
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} == {content_hash[:36]}
    assert {t.value for i in inputs for t in i.tags if t.key == "content_hash"} == {content_hash}


def test_a_job_that_fails_ends_its_scoring_run_failed(ray_local, registry, tmp_path):
    from workflows import tracking

    root = tmp_path / "images"
    root.mkdir()
    (root / "text.jpg").write_text("not an image at all")
    out = tmp_path / "preds"
    assert predict(root, out, experiment="lineage-failed") == 1  # every row is an error
    run = tracking.client().get_run(json.loads((out / "summary.json").read_text())["scoring_run_id"])
    assert run.info.status == "FAILED" and "no file could be scored" in run.data.tags["failure_reason"]
    assert run.data.metrics["errors"] == 1 and read_output(out)["scoring_run"].tolist() == [run.info.run_id]


def test_pyfunc_model_gives_the_same_labels_as_the_batch_job(ray_local, registry, folder, tmp_path):
    import mlflow

    root, truth = folder
    out = tmp_path / "preds"
    predict(root, out, model=NAME)
    rows = read_output(out).set_index("path").sort_index()
    frame = pd.DataFrame({"image": [(root / p).read_bytes() for p in rows.index]})
    pyfunc = mlflow.pyfunc.load_model(registry.uri).predict(frame)
    assert list(pyfunc["label"].fillna("<error>")) == list(rows["label"].fillna("<error>"))
    assert np.allclose(pyfunc["score"].dropna(), rows["score"].dropna(), atol=1e-5)


def test_embeddings_have_the_models_feature_width_and_are_the_same_in_two_runs(ray_local, registry, folder, tmp_path):
    from cnn.models import model_from_state, split_head

    root, truth = folder
    state, _ = registry.weights()
    width = split_head(model_from_state(state)[0]).feature_width  # what the model's final Linear takes
    assert predict(root, tmp_path / "run0", embeddings=True, batch_size=16) == 0
    first = read_output(tmp_path / "run0").set_index("path").sort_index()
    good = ~first.index.isin(BROKEN)
    schema = pq.read_schema(next((tmp_path / "run0").glob("part-*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert {len(e) for e in first.loc[good, "embedding"]} == {width}
    assert first.loc[~good, "embedding"].isna().all()  # error rows have none
    a = np.stack(first.loc[good, "embedding"])
    assert np.isfinite(a).all() and a.std() > 0
    # the embeddings' pass gives the labels and scores of a pass without them
    plain = tmp_path / "plain"
    assert predict(root, plain, batch_size=16) == 0
    without = read_output(plain).set_index("path").sort_index()
    assert (without["label"].fillna("-") == first["label"].fillna("-")).all()
    assert np.allclose(without.loc[good, "score"], first.loc[good, "score"], atol=1e-6)

    # Resuming: an --embeddings OUTPUT goes on; one scored without them is refused (its rows
    # would be skipped, left without embeddings) unless --overwrite scores it all again.
    assert predict(root, tmp_path / "run0", embeddings=True) == 0
    assert json.loads((tmp_path / "run0" / "summary.json").read_text())["this_run"]["rows"] == 0
    with pytest.raises(CnnflowError, match=rf"holds {len(truth)} rows scored without --embeddings.*--overwrite"):
        predict(root, plain, embeddings=True)
    assert predict(root, plain, embeddings=True, overwrite=True) == 0
    again = read_output(plain).set_index("path").sort_index()
    assert len(again) == len(first) and {len(e) for e in again.loc[good, "embedding"]} == {width}
    b = np.stack(again.loc[good, "embedding"])  # a second run (other batch size): the same vectors
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_copy_of_a_training_image_names_it_and_other_images_name_none(ray_local, registry, tmp_path):
    import io
    import shutil

    from PIL import Image

    from data_prep.decode import Limits
    from data_prep.decode import load_image
    from data_prep.phash import from_signed, hamming, phash_batch
    from data_prep.shard_reader import read_table
    from tests.test_near_duplicates import smooth_picture

    _, preprocessing = registry.weights()
    distance = preprocessing["near_duplicate_distance"]
    assert distance == 6  # the prep's default, recorded with the model
    images = registry.prepared.parent / "train_images"  # the fixture's prep INPUT
    train = read_table(str(registry.prepared), "train", columns=["path", "phash"]).to_pandas()
    val = read_table(str(registry.prepared), "val", columns=["path"]).to_pandas()
    hashes = from_signed(train["phash"].to_numpy())
    apart = hamming(hashes[:, None], hashes[None, :]) + 64 * np.eye(len(hashes), dtype=np.int64)
    limits = Limits.of(100.0, 50.0)

    def near_copy(path: Path) -> bytes:
        """The picture twice as large, saved again as JPEG."""
        img = Image.open(path).convert("RGB")
        buf = io.BytesIO()
        img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    # A training image that no other training image is near, whose near copy hashes within
    # the distance of it (a stripe picture at 32 px moves 2-12 bits when re-encoded).
    for i in np.flatnonzero(apart.min(1) > 2 * distance):
        copy = near_copy(images / train["path"][i])
        pixels = load_image(copy, size=preprocessing["image_size"], resize=preprocessing["resize"], limits=limits)
        bits = int(hamming(phash_batch(pixels.decoded.pixels[None])[0], hashes[i])[0])
        if 0 < bits <= distance:
            break
    else:
        pytest.fail("no training image with a near copy within the distance")
    original = train["path"][i]
    root = tmp_path / "images"
    (root / "elsewhere").mkdir(parents=True)
    shutil.copy(images / original, root / "elsewhere" / f"renamed{Path(original).suffix}")  # the same bytes
    (root / "near.jpg").write_bytes(near_copy(images / original))
    shutil.copy(images / val["path"][0], root / f"validation{Path(val['path'][0]).suffix}")  # not a training image
    Image.fromarray(smooth_picture(0)).save(root / "unrelated.png")
    (root / "broken.png").write_bytes(b"")
    out = tmp_path / "preds"
    assert predict(root, out) == 0

    rows = read_output(out).set_index("path")
    copied = f"elsewhere/renamed{Path(original).suffix}"
    assert (rows.loc[copied, "seen_in_training"], rows.loc[copied, "seen_distance"]) == (original, 0)
    assert (rows.loc["near.jpg", "seen_in_training"], rows.loc["near.jpg", "seen_distance"]) == (original, bits)
    others = rows.drop(index=[copied, "near.jpg"])
    assert others["seen_in_training"].isna().all() and others["seen_distance"].isna().all(), others
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seen_in_training"] == 2
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert (schema.field("seen_in_training").type, schema.field("seen_distance").type) == (pa.string(), pa.int32())


def test_min_score_leaves_the_rows_below_it_unsure_with_their_scores_and_resumes(ray_local, registry, folder, tmp_path):
    root, truth = folder
    plain = tmp_path / "plain"
    assert predict(root, plain) == 0
    scored = read_output(plain).set_index("path").sort_index()
    scores = np.sort(scored["score"].dropna().unique())
    p = float((scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2)  # between two scores: half below

    out = tmp_path / "unsure"
    assert predict(root, out, min_score=p) == 0
    rows = read_output(out).set_index("path").sort_index()
    below = scored["score"] < p
    assert 0 < below.sum() < len(truth)
    unsure = rows[rows["unsure"].notna()]
    assert sorted(unsure.index) == sorted(scored.index[below])  # exactly the rows below P
    assert unsure["label"].isna().all() and unsure["error"].isna().all()
    assert np.allclose(unsure["score"], scored.loc[unsure.index, "score"])  # scores and probabilities kept
    assert all(len(pr) == len(CLASSES) for pr in unsure["probabilities"])
    assert all(r.startswith("score 0.") and r.endswith(f"< min-score {p:g}") for r in unsure["unsure"])
    sure = rows[rows["unsure"].isna() & rows["error"].isna()]
    assert (sure["label"] == scored.loc[sure.index, "label"]).all() and (sure["score"] >= p).all()
    assert rows.loc[sorted(BROKEN), "unsure"].isna().all()  # error rows: `error`, not `unsure`

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["unsure"], summary["errors"], summary["rows"]) == (below.sum(), 3, len(truth) + 3)
    assert sum(summary["counts"].values()) == len(truth) - below.sum()  # unsure rows have no label to count
    assert summary["this_run"]["min_score"] == p and summary["this_run"]["unsure"] == below.sum()

    assert predict(root, out, min_score=p) == 0  # resumes: the unsure rows count as scored
    again = json.loads((out / "summary.json").read_text())
    assert again["this_run"]["rows"] == 0 and again["unsure"] == below.sum()
    assert len(read_output(out)) == len(rows)


def test_drift_warns_on_a_one_class_batch_and_not_on_the_training_data(ray_local, registry, tmp_path, capfd):
    one = tmp_path / "one_class"
    make_image_folder(one, classes=CLASSES[:1], per_class=60, size=(40, 56), seed=6)  # horizontal stripes only
    assert predict(one, tmp_path / "one") == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("drift:")]
    assert len(warnings) == 1 and "predicted classes" in warnings[0], err
    drift = json.loads((tmp_path / "one" / "summary.json").read_text())["drift"]
    assert drift["rows"] == 60 and drift["threshold"] == 0.2 and "classes" in drift["drifted"]
    assert drift["classes"]["psi"] > 1 and drift["classes"]["batch_shares"]["horizontal"] == 1.0

    # The prep output itself: training's classes in training's shares, validation-like scores.
    assert predict(registry.prepared, tmp_path / "same") == 0
    assert "drift:" not in capfd.readouterr().err
    drift = json.loads((tmp_path / "same" / "summary.json").read_text())["drift"]
    assert drift["drifted"] == [] and drift["classes"]["enough_rows"] and drift["scores"]["enough_rows"]
    assert drift["classes"]["psi"] < 0.05 and drift["scores"]["psi"] < 0.1, drift


def test_resume_scores_only_the_rest_and_another_version_refuses(ray_local, registry, tmp_path):
    root = tmp_path / "images"
    first = make_image_folder(root / "a", classes=CLASSES, per_class=4, size=40, seed=2)
    out = tmp_path / "preds"
    predict(root, out)
    assert len(read_output(out)) == len(first)

    more = make_image_folder(root / "b", classes=CLASSES, per_class=3, size=40, seed=3)
    predict(root, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["rows"] == len(more) and summary["this_run"]["already_scored"] == len(first)
    # Start-up (Ray, model, listing) is told apart from the work.
    this_run = summary["this_run"]
    assert 0 < this_run["startup_s"] <= this_run["first_row_s"] <= this_run["seconds"]
    rows = read_output(out)
    assert len(rows) == len(first) + len(more) and rows["path"].is_unique

    summary_inode = (out / "summary.json").stat().st_ino
    predict(root, out)  # nothing left: nothing scored, nothing written twice
    assert json.loads((out / "summary.json").read_text())["this_run"]["rows"] == 0
    assert len(read_output(out)) == len(first) + len(more)
    assert (out / "summary.json").stat().st_ino != summary_inode  # replaced whole, by a rename
    assert not list(out.glob(".*.tmp"))

    second = register_again(registry)
    with pytest.raises(CnnflowError, match="--overwrite"):
        predict(root, out, model=second)
    predict(root, out, model=second, overwrite=True)
    rows = read_output(out)
    assert len(rows) == len(first) + len(more) and (rows["model_uri"] == second).all()


def test_output_that_overlaps_the_input_or_holds_other_files_is_refused_before_anything_starts(folder, tmp_path):
    # No model and no Ray are needed to refuse: nothing is loaded, started or written.
    root, _ = folder
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CnnflowError, match="is inside the input"):
        predict(root, root / "preds")
    with pytest.raises(CnnflowError, match="holds the input"):
        predict(root / "part0", root)
    with pytest.raises(CnnflowError, match="is the input folder"):
        predict(root, root)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "summary.json").write_text('{"mine": true}')
    (theirs / "part-1.csv").write_text("precious")
    with pytest.raises(CnnflowError, match=r"did not write \(part-1.csv, summary.json\)"):
        predict(root, theirs)
    assert (theirs / "part-1.csv").read_text() == "precious" and not (theirs / ".cnnflow-output.json").exists()

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        predict(root, tmp_path / "a-file")


def test_links_leaving_the_input_bad_names_and_markup_in_names(ray_local, registry, tmp_path, capfd):
    import os

    root = tmp_path / "in[" / "]put [bold]"  # the path itself reads as markup: in[/]put [bold]
    specs = make_image_folder(root, classes=CLASSES, per_class=3, size=40, layout="unlabeled", seed=4)
    truth = {str(s.path.relative_to(root)) for s in specs}
    outside = tmp_path / "outside"
    make_image_folder(outside, classes=CLASSES, per_class=5, size=40, seed=5)
    (root / "elsewhere").symlink_to(outside)  # its 15 images are not INPUT's
    (root / "part0" / "loop").symlink_to("..")
    with open(os.fsencode(root) + b"/bad\xff.jpg", "wb") as f:  # not UTF-8: an error row, not a crash
        f.write(specs[0].path.read_bytes())
    (root / "x[").mkdir()
    (root / "x[" / "]evil.jpg").write_bytes(b"broken")  # x[/]evil.jpg: once crashed the closing screen
    out = tmp_path / "preds"
    assert predict(root, out) == 0

    rows = read_output(out).set_index("path")
    assert sorted(rows.index) == sorted([*truth, "bad\\xff.jpg", "x[/]evil.jpg"])
    assert "UTF-8" in rows.loc["bad\\xff.jpg", "error"] and pd.isna(rows.loc["bad\\xff.jpg", "label"])
    assert rows.loc["x[/]evil.jpg", "error"] and rows.loc[sorted(truth), "error"].isna().all()
    assert (rows["model_uri"] == registry.uri).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == {"symlink to outside the input": 1, "symlink loop": 1}
    assert (summary["rows"], summary["errors"]) == (len(truth) + 2, 2)
    err = capfd.readouterr().err
    assert "in[/]put [bold]" in err and "x[/]evil.jpg" in err and "bad\\xff.jpg" in err

    marker = json.loads((out / ".cnnflow-output.json").read_text())
    assert marker["written_by"] == "cnnflow predict" and len(marker["runs"]) == 1
    (out / "notes.txt").write_text("mine")  # a file of the user's: the next run touches nothing
    kept = sorted(p.name for p in out.iterdir())
    with pytest.raises(CnnflowError, match=r"did not write \(notes.txt\)"):
        predict(root, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == kept


def test_prep_output_is_scored_from_its_shards(ray_local, registry, tmp_path):
    out = tmp_path / "preds"
    assert predict(registry.prepared, out) == 0
    classes = json.loads((registry.prepared / "manifest.json").read_text())["classes"]
    shards = pd.concat([pd.read_parquet(p, columns=["path", "label"]) for p in registry.prepared.rglob("*.parquet")])
    truth = dict(zip(shards["path"], shards["label"].map(lambda k: classes[k])))
    rows = read_output(out)
    assert sorted(rows["path"]) == sorted(truth) and rows["error"].isna().all()
    accuracy = (rows["label"] == rows["path"].map(truth)).mean()
    assert accuracy >= 0.9, rows[["path", "label", "score"]]
    # predict hashes the pixels as prep did: every training row finds itself, 0 bits away,
    # and no validation row is near a training one (near-duplicate groups share a split)
    train = set(pd.read_parquet(registry.prepared / "train", columns=["path"])["path"])
    trained = rows["path"].isin(train)
    assert (rows.loc[trained, "seen_in_training"] == rows.loc[trained, "path"]).all()
    assert (rows.loc[trained, "seen_distance"] == 0).all() and rows.loc[~trained, "seen_in_training"].isna().all()
    assert json.loads((out / "summary.json").read_text())["seen_in_training"] == len(train)
    predict(registry.prepared, out)  # resumes: nothing left to score
    assert json.loads((out / "summary.json").read_text())["this_run"]["rows"] == 0


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.timeout(240)
def test_every_worker_count_finishes_on_two_cpus(ray_local, registry, tmp_path, workers):
    assert ray_local.cluster_resources()["CPU"] == 2
    root = tmp_path / "images"
    specs = make_image_folder(root, classes=CLASSES, per_class=20, size=40, seed=workers)
    out = tmp_path / "preds"
    assert predict(root, out, workers=workers, batch_size=8) == 0
    rows = read_output(out)
    assert sorted(rows["path"]) == sorted(str(s.path.relative_to(root)) for s in specs)


def test_csv_output(ray_local, registry, folder, tmp_path):
    root, truth = folder
    out = tmp_path / "preds"
    predict(root, out, format="csv", embeddings=True)
    rows = pd.concat([pd.read_csv(p) for p in out.glob("part-*.csv")])
    assert len(rows) == len(truth) + 3
    good = rows[rows["error"].isna()]
    assert all(len(json.loads(p)) == len(CLASSES) for p in good["probabilities"])
    assert len({len(json.loads(e)) for e in good["embedding"]}) == 1  # lists as JSON-style arrays, one width
    assert predict(root, out, format="csv", embeddings=True) == 0  # resumes: the CSV rows have theirs
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["errors"], sum(summary["counts"].values())) == (len(truth) + 3, 3, len(truth))


def test_unknown_model_lists_what_exists(registry, folder, tmp_path):
    with pytest.raises(CnnflowError, match=rf"no registered model 'nope'; registered models: {NAME}"):
        predict(folder[0], tmp_path / "preds", model="nope")


def test_pool_always_leaves_a_cpu_to_decoding():
    from workflows.predict.pipeline import plan_pool

    for cpus in (1, 2, 4, 16):
        for workers in (1, 2, 3, 8):
            plan = plan_pool(workers, gpu=False, cluster_cpus=cpus, cluster_gpus=0)
            assert plan.replicas == workers
            assert plan.replicas * plan.actor_cpus + plan.decode_cpus <= cpus + 1e-9
            assert plan.actor_cpus != plan.decode_cpus  # else Ray Data fuses decoding into the actors
    on_gpus = plan_pool(4, gpu=True, cluster_cpus=8, cluster_gpus=2)
    assert (on_gpus.replicas, on_gpus.actor_gpus) == (2, 1.0)
    with pytest.raises(CnnflowError, match="no GPUs"):
        plan_pool(1, gpu=True, cluster_cpus=8, cluster_gpus=0)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units; --precision bf16 refuses it")
def test_bf16_on_cpu_checks_a_sample_against_float32_and_labels_alike(ray_local, registry, folder, tmp_path):
    root, truth = folder
    out = tmp_path / "preds"
    assert predict(root, out, precision="bf16") == 0
    rows = read_output(out)
    good = rows[~rows["path"].isin(BROKEN)]
    assert (good["label"] == good["path"].map(lambda p: CLASSES[truth[p]])).mean() >= 0.9
    this_run = json.loads((out / "summary.json").read_text())["this_run"]
    assert this_run["precision"] == "bf16"
    # Every image that decodes was in the sample (fewer than its 256); bf16 kept their labels.
    assert this_run["bf16_check"]["sampled"] == len(truth)
    assert this_run["bf16_check"]["labels_differ"] == 0
    assert 0 < this_run["bf16_check"]["max_probability_change"] < 0.05


@pytest.mark.parametrize(
    ("cpuinfo", "has"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ],
)
def test_bf16_units_are_read_from_the_cpu_flags(tmp_path, cpuinfo, has):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert cpu_has_bf16(tmp_path / "cpuinfo") is has
    assert cpu_has_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(("n", "replicas"), [(1, 1), (100, 1), (2000, 1), (8000, 1), (8000, 4), (50_000, 2)])
def test_decode_tasks_cover_every_file_once_small_first(n, replicas):
    from workflows.predict.pipeline import DECODE_BATCH, FIRST_DECODE, decode_chunks

    chunks = decode_chunks(n, replicas)
    assert [offset for offset, _ in chunks] == [sum(size for _, size in chunks[:k]) for k in range(len(chunks))]
    assert sum(size for _, size in chunks) == n
    sizes = [size for _, size in chunks]
    assert sizes[0] <= FIRST_DECODE and max(sizes) <= DECODE_BATCH  # first rows soon; blocks bounded
    assert sizes[:-1] == sorted(sizes[:-1])  # growing, then at most the cap
    if n >= 4 * replicas * 16:
        assert len(chunks) >= 4 * replicas  # every replica has work


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_with_the_scores_of_predict(ray_local, registry, folder, tmp_path):
    """`mlflow models serve -m models:/NAME@champion`, asked over HTTP in the logged serving
    example's format, gives the rows `cnnflow predict` wrote for the same files."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow

    from tests.cluster_helpers import free_port

    root, truth = folder
    champion = f"models:/{NAME}@champion"
    out = tmp_path / "preds"
    assert predict(root, out, model=champion) == 0
    rows = read_output(out).set_index("path").sort_index()

    # The request as the logged model's serving example makes it: a dataframe_split of base64 image bytes.
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion, dst_path=str(tmp_path / "model")))
    example = json.loads((model / "serving_input_example.json").read_text())["dataframe_split"]
    assert example["columns"] == ["image"] and base64.b64decode(example["data"][0][0])[:8] == b"\x89PNG\r\n\x1a\n"
    request = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode((root / p).read_bytes()).decode()] for p in rows.index]}}

    port = free_port()
    log = tmp_path / "serve.log"
    bin = Path(sys.executable).parent  # `mlflow models serve` runs `uvicorn` from PATH: the venv's, as when activated
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [str(bin / "mlflow"), "models", "serve", "-m", champion, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri, "PATH": f"{bin}{os.pathsep}{os.environ['PATH']}"},
            stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its workers end together
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(post, timeout=120) as response:
            served = pd.DataFrame(json.loads(response.read())["predictions"], index=rows.index)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    assert list(served["label"].fillna("<error>")) == list(rows["label"].fillna("<error>"))
    assert (served["error"].notna() == rows["error"].notna()).all() and rows["error"].notna().sum() == len(BROKEN)
    good = rows["error"].isna()
    assert np.allclose(served.loc[good, "score"].astype(float), rows.loc[good, "score"], atol=1e-5)
    assert np.allclose(np.stack(served.loc[good, "probabilities"]), np.stack(rows.loc[good, "probabilities"]), atol=1e-5)


def test_embeddings_too_wide_for_one_arrow_list_batch_say_which_batch_size_fits():
    from workflows.predict.pipeline import check_embedding_batch

    check_embedding_batch(512, 4096)  # resnet18 at the largest --batch-size
    with pytest.raises(CnnflowError, match=r"pass --batch-size 825 or less"):
        check_embedding_batch(10 * 510 * 510, 1024)  # `seed` at 1024 px: 2.6 M features a row
