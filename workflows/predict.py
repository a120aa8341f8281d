"""`cnnflow predict INPUT OUTPUT` (docs/architecture.md): one row per input file, by one model version.

    resolve the model once -> list INPUT -> drop what OUTPUT already holds (resume)
    -> Ray Data pipeline (workflows/predict_pipeline.py) -> part files + summary.json

The driver consumes the pipeline's output itself: rows are small (a path, a label, a few
floats), so it can count them for the summary and show progress as they come, and it
writes each part file whole (data_prep/schema.py's write_atomic: aside and renamed on a
local disk, one upload on S3), so a run that dies leaves only whole files behind and the
next run resumes from them.

OUTPUT is claimed with cnnflow's marker (data_prep/safety.py), which names the runs whose
part files are there: a rerun reads, resumes from or (with --overwrite) deletes those
files only, and an OUTPUT that holds anything else, or overlaps INPUT, is refused with
one line before the model loads or Ray starts.
"""
from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from data_prep import safety, schema
from data_prep.lock import output_lock
from data_prep.scan import PrepError, normalize_uri, scan
from data_prep.redact import redact_uri
from workflows.config import PredictConfig
from workflows.errors import CnnflowError
from workflows.terminal import plain, text

SUMMARY = "summary.json"
PART_PREFIX = "part-"
# A part file is closed at this many rows or after this long, whichever comes first:
# an interrupted run loses at most that much work.
ROWS_PER_FILE = 50_000
SECONDS_PER_FILE = 60.0
LOG_EVERY_S = 30.0  # progress lines when stderr is not a terminal (ray job logs)
SHARD_SPLITS = (schema.TRAIN, schema.VAL, schema.UNLABELED)
STAGE = "predict"  # the marker's `written_by` is "cnnflow predict"
# part-<run id>-<n>.<format>, the run id from Output.__init__. While being written on a
# local disk: .part-...<format>.tmp (schema.temp_name); .part-...<format> from older runs.
PART_NAME = re.compile(r"\.?part-(\d{8}T\d{6}-[0-9a-f]{6})-\d{5}\.(?:parquet|csv)(?:\.tmp)?")


def run(config: PredictConfig) -> int:
    try:  # refusals come before the model loads or Ray starts, and before anything is written
        safety.check_apart(config.input, config.output)
        with output_lock(config.output):  # one job at a time writes OUTPUT (data_prep/lock.py)
            return _run(config, Output(config.output, config.format))
    except PrepError as exc:
        raise CnnflowError(str(exc)) from None


def _run(config: PredictConfig, output: Output) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from workflows.ray_runtime import ray_session

    console = Console(stderr=True)
    started = time.perf_counter()
    counts: Counter[str | None] = Counter()  # rows per predicted label; errors under None
    # Ray's start-up is mostly waiting for its processes, and loading the job mostly this
    # process's CPU (MLflow's and torch's imports, the model download): side by side they
    # took ~2.5 s less than one after the other. A run with nothing left to score starts
    # Ray for nothing; that is the price.
    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load_job, config, output)
        with ray_session(config, dashboard=False):
            job = loading.result()
            console.print(
                f"predict: {len(job.inputs.paths):,} images in {plain(config.input)} ({job.inputs.kind}), "
                f"{len(job.done):,} already scored in {plain(config.output)}, {len(job.todo):,} to score "
                f"with {plain(job.model_uri)}"
            )
            if len(job.todo):
                score(config, job, console, counts)
    seconds = time.perf_counter() - started

    rows = sum(counts.values())
    this_run = {
        "rows": rows,
        "errors": counts[None],
        "seconds": round(seconds, 3),
        "images_per_s": round(rows / seconds, 1) if rows else None,
        "already_scored": len(job.done),
    }
    summary = job.output.summary(
        classifier=job.classifier, model_uri=job.model_uri, input=config.input, skipped=job.inputs.skipped,
        this_run=this_run,
    )
    schema.write_json(schema.join(config.output, SUMMARY), summary)
    _closing_screen(console, summary, config.output)
    if summary["rows"] and summary["rows"] == summary["errors"]:
        console.print("[red]no file could be scored[/red]: every row is an error (see error_examples in summary.json)")
        return 1
    return 0


@dataclass(frozen=True)
class Job:
    model_uri: str  # resolved once: every row names this version
    classifier: Any  # workflows.tracking.Classifier
    inputs: Inputs
    output: Output
    done: pa.Table  # rows earlier runs wrote into OUTPUT with this model
    todo: pa.Array  # paths left to score


def load_job(config: PredictConfig, output: Output | None = None) -> Job:
    """The model, the inputs and what OUTPUT already holds; no Ray needed."""
    from workflows.tracking import load_classifier, resolve_model_uri, use_tracking

    output = output or Output(config.output, config.format)
    use_tracking()
    model_uri = resolve_model_uri(config.model)
    classifier = load_classifier(model_uri)
    inputs = find_inputs(config.input, classifier.preprocessing)
    done = output.previous(model_uri, overwrite=config.overwrite)
    output.claim()
    todo = inputs.paths.filter(pc.invert(pc.is_in(inputs.paths, value_set=done.column("path"))))
    return Job(model_uri, classifier, inputs, output, done, todo)


def score(config: PredictConfig, job: Job, console: Console, counts: Counter[str | None]) -> None:
    """Run the pipeline over `job.todo`, writing part files and counting labels as rows come."""
    todo = job.todo
    try:
        if job.inputs.unreadable:  # files that cannot even be opened by name: error rows, no pipeline
            named = pa.array(list(job.inputs.unreadable), pa.string())
            bad = todo.filter(pc.is_in(todo, value_set=named))
            todo = todo.filter(pc.invert(pc.is_in(todo, value_set=named)))
            if len(bad):
                rows = error_rows(bad, [job.inputs.unreadable[p] for p in bad.to_pylist()], job.model_uri)
                job.output.add(rows)
                counts.update(_tally(rows))
        if not len(todo):
            return
        dataset, plan = build_dataset(config, job.inputs, todo, job.classifier, scored=job.done.column("path"))
        console.print(
            f"  {plan.replicas} model replica(s) x {plan.torch_threads} thread(s)"
            f"{' on GPU' if config.gpu else ''}, {plan.actor_cpus:g} CPU each in Ray's accounting"
        )
        with _Progress(console, len(todo)) as advance:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                job.output.add(batch)
                counts.update(_tally(batch))
                advance(batch.num_rows)
    finally:  # rows scored before an interruption are kept: a rerun resumes after them
        job.output.close()


def error_rows(paths: pa.Array, errors: list[str], model_uri: str) -> pa.Table:
    """Output rows for files that could not be scored: label, score and probabilities null."""
    from workflows.predict_pipeline import OUTPUT_SCHEMA

    n = len(paths)
    return pa.table(
        {
            "path": paths,
            "label": pa.nulls(n, pa.string()),
            "score": pa.nulls(n, pa.float32()),
            "probabilities": pa.nulls(n, pa.list_(pa.float32())),
            "model_uri": pa.array([model_uri] * n, pa.string()),
            "error": pa.array(errors, pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    kind: str  # "image folder" or "prep output"
    filesystem: pafs.FileSystem
    root: str  # INPUT's path in `filesystem`
    paths: pa.Array  # every input, relative to INPUT (string)
    skipped: dict[str, int]  # files and links left out (not images, outside INPUT, loops), by reason
    shard_files: list[str]  # prep output only
    unreadable: dict[str, str] = field(default_factory=dict)  # path as shown -> why it cannot be opened


def find_inputs(uri: str, preprocessing: dict[str, Any]) -> Inputs:
    """An image folder (recursive, labels ignored) or a `cnnflow prep` output."""
    fs, root = schema.resolve(normalize_uri(uri))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"input {uri} is not a folder")
    if fs.get_file_info(schema.join(root, schema.MANIFEST)).type == pafs.FileType.File:
        return _prep_output(uri, fs, root, preprocessing)

    try:  # prep's own listing: the same files count as images, the same are skipped
        found = scan(uri, unlabeled=True)
    except PrepError as exc:
        raise CnnflowError(str(exc)) from None
    # Names that are not UTF-8 are listed under a readable form: one error row each.
    unreadable = {q["path"]: q["reason"] for q in found.quarantined}
    paths = pa.array([f.path for f in found.files] + list(unreadable), pa.string())
    skipped = dict(Counter(s["reason"] for s in found.skipped))
    return Inputs("image folder", fs, root, paths, skipped, [], unreadable)


def _prep_output(uri: str, fs: pafs.FileSystem, root: str, preprocessing: dict[str, Any]) -> Inputs:
    """Shards hold pixels resized at prep time: they must be what the model was trained on."""
    manifest = schema.read_manifest(uri)
    got = (manifest["image_size"], manifest["resize"])
    want = (preprocessing["image_size"], preprocessing["resize"])
    if got != want:
        raise CnnflowError(
            f"{uri} was prepared at {got[0]} px ({got[1]}) but the model expects {want[0]} px ({want[1]}); "
            f"run `cnnflow prep` again with --image-size {want[0]} --resize {want[1]}, or predict on the image folder"
        )
    files = []
    for split in SHARD_SPLITS:
        selector = pafs.FileSelector(schema.join(root, split), allow_not_found=True)
        files += sorted(e.path for e in fs.get_file_info(selector) if e.path.endswith(".parquet"))
    if not files:
        raise CnnflowError(f"{uri} has a manifest but no shards under {', '.join(SHARD_SPLITS)}/")
    paths = pa.concat_arrays(
        [pq.read_table(f, columns=["path"], filesystem=fs).column("path").combine_chunks() for f in files]
    )
    return Inputs("prep output", fs, root, paths, {}, files)


# --- the pipeline --------------------------------------------------------------------------


def build_dataset(config: PredictConfig, inputs: Inputs, todo: pa.Array, classifier: Any, *, scored: pa.Array):
    import ray
    import ray.data

    from cnn.models import model_state
    from data_prep.decode import Limits
    from workflows import predict_pipeline as pipe

    resources = ray.cluster_resources()
    plan = pipe.plan_pool(
        config.workers, gpu=config.gpu, cluster_cpus=resources.get("CPU", 1), cluster_gpus=resources.get("GPU", 0)
    )
    size, resize = classifier.preprocessing["image_size"], classifier.preprocessing["resize"]
    if inputs.shard_files:
        ds = ray.data.read_parquet(
            inputs.shard_files, filesystem=inputs.filesystem, columns=["path", "image"], num_cpus=plan.decode_cpus
        )
        if len(scored):
            ds = ds.map_batches(pipe.drop_scored, batch_format="pyarrow", batch_size=None,
                                num_cpus=plan.decode_cpus, fn_kwargs={"scored": scored})
        ds = ds.map_batches(pipe.shard_rows, batch_format="pyarrow", batch_size=None, num_cpus=plan.decode_cpus)
    else:
        # Small jobs still get a few blocks per replica, so that every replica has work.
        step = max(16, min(pipe.DECODE_BATCH, -(-len(todo) // (4 * plan.replicas))))
        chunks = [pa.table({"path": todo.slice(i, step)}) for i in range(0, len(todo), step)]
        ds = ray.data.from_arrow(chunks).map_batches(
            pipe.decode_batch,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=plan.decode_cpus,
            fn_kwargs={
                "filesystem": inputs.filesystem, "root": inputs.root, "size": size, "resize": resize,
                "limits": Limits.of(config.max_file_mb, config.max_megapixels),
            },
        )
    state = ray.put(model_state(classifier.model, classifier.spec))
    ds = ds.map_batches(
        pipe.Scorer,
        batch_size=config.batch_size or (pipe.GPU_BATCH if config.gpu else pipe.CPU_BATCH),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={
            "state": state,
            "preprocessing": classifier.preprocessing,
            "model_uri": classifier.uri,
            "torch_threads": plan.torch_threads,
            "gpu": config.gpu,
        },
    )
    # Decoding outruns a CNN on CPU several times over: uncapped, the decoded blocks would
    # wait in the object store and memory would grow with the input. A few blocks per
    # replica keep the model busy; the cap applies to this dataset only. Ray Data enforces
    # it through its per-operator reservation, which configure_ray_data turns off for the
    # other stages: without it the cap was ignored (decoding ran 306 MiB ahead of the model
    # at N=8000, and peak memory grew 1.33x from 2000 to 16000 images; with it, 42 MiB).
    block_bytes = pipe.DECODE_BATCH * size * size * 3
    ds.context.op_resource_reservation_enabled = True
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=max(pipe.MIN_QUEUE_BYTES, 4 * plan.replicas * block_bytes)
    )
    return ds, plan


def _tally(batch: pa.Table) -> Counter[str | None]:
    """Rows per predicted label; error rows count under None."""
    return Counter({row["values"]: row["counts"] for row in pc.value_counts(batch.column("label")).to_pylist()})


# --- output ----------------------------------------------------------------------------


class Output:
    """OUTPUT: part files written whole (schema.write_atomic), and summary.json.

    Building one only reads: it finds the runs whose part files are in OUTPUT (`runs`) and
    refuses an OUTPUT that holds anything cnnflow predict did not write. `claim` then
    records this run in the marker before any part file is written.
    """

    def __init__(self, uri: str, fmt: str):
        self.uri, self.fmt = uri, fmt
        self.fs, self.root = schema.resolve(uri)
        self.root = self.root.rstrip("/") or "/"
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.runs = self._owned_runs()
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.opened = time.monotonic()
        self.written = 0

    def _owned_runs(self) -> set[str]:
        """Runs of `cnnflow predict` whose part files are in OUTPUT; refuses anything else there.

        The marker names them. An OUTPUT from before the marker existed is recognised by
        its contents alone: part files named as this module names them, and a summary.json
        that is one of ours.
        """
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return set()
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"output {redact_uri(self.uri)} is a file; give a folder")
        entries = safety.visible_entries(self.fs, self.root)
        marker = safety.read_marker(self.fs, self.root)
        if marker is not None and marker["written_by"] != f"cnnflow {STAGE}":
            runs, summary_ours = set(), False  # another stage's output: nothing here is predict's
        elif marker is not None:
            runs, summary_ours = {r for r in marker.get("runs", []) if isinstance(r, str)}, True
        else:
            runs = {m.group(1) for e in entries if e.type == pafs.FileType.File and (m := PART_NAME.fullmatch(e.base_name))}
            summary_ours = self._summary_is_ours()
        foreign = [
            e.base_name + ("/" if e.type == pafs.FileType.Directory else "")
            for e in entries
            if not (e.type == pafs.FileType.File and (self._ours(e.base_name, runs) or (e.base_name == SUMMARY and summary_ours)))
        ]
        if foreign and marker is not None and marker["written_by"] != f"cnnflow {STAGE}":
            foreign.insert(0, f"a `{marker['written_by']}` output")
        safety.refuse_foreign(self.uri, foreign, stage=STAGE)
        return runs

    def _summary_is_ours(self) -> bool:
        try:
            summary = schema.read_json(schema.join(self.uri, SUMMARY))
        except (OSError, ValueError):
            return False
        return isinstance(summary, dict) and {"rows", "model_uri", "this_run"} <= set(summary)

    @staticmethod
    def _ours(name: str, runs: set[str]) -> bool:
        match = PART_NAME.fullmatch(name)
        return match is not None and match.group(1) in runs

    def claim(self) -> None:
        """Record this run in OUTPUT's marker: its part files are then provably ours."""
        self.fs.create_dir(self.root, recursive=True)
        self.runs.add(self.run_id)
        safety.write_marker(self.uri, f"cnnflow {STAGE}", runs=sorted(self.runs))

    def _parts(self) -> list[pafs.FileInfo]:
        """Part files of the runs in the marker, hidden (unfinished) ones included."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return [
            e for e in self.fs.get_file_info(selector)
            if e.type == pafs.FileType.File and self._ours(e.base_name, self.runs)
        ]  # fmt: skip

    def _read(self, path: str, columns: list[str]) -> pa.Table:
        if path.endswith(".parquet"):
            return pq.read_table(path, columns=columns, filesystem=self.fs)
        with self.fs.open_input_stream(path) as src:
            convert = pacsv.ConvertOptions(  # an empty field is a null (label and error)
                include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=True
            )
            return pacsv.read_csv(src, convert_options=convert)

    def previous(self, model_uri: str, *, overwrite: bool) -> pa.Table:
        """What earlier runs wrote (path, label, error); refuses another model's rows."""
        parts = self._parts()
        for leftover in [e for e in parts if e.base_name.startswith(".")]:
            self.fs.delete_file(leftover.path)  # a part file an interrupted run never finished
        parts = [e.path for e in parts if not e.base_name.startswith(".")]
        columns = ["path", "label", "error", "model_uri"]
        tables = [self._read(p, columns) for p in parts]
        empty = pa.table({c: pa.array([], pa.string()) for c in columns})
        done = pa.concat_tables(tables, promote_options="permissive") if tables else empty
        others = sorted(set(pc.unique(done.column("model_uri")).to_pylist()) - {model_uri})
        if others and not overwrite:
            raise CnnflowError(
                f"{self.uri} holds predictions by {', '.join(others)}, not {model_uri}; "
                "pass --overwrite to replace them, or choose another OUTPUT"
            )
        if others:  # --overwrite: start again
            for p in parts:
                self.fs.delete_file(p)
            return empty.drop_columns(["model_uri"])
        return done.drop_columns(["model_uri"])

    def add(self, batch: pa.Table) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= ROWS_PER_FILE or time.monotonic() - self.opened >= SECONDS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        name = f"{PART_PREFIX}{self.run_id}-{self.written:05d}.{self.fmt}"
        # Encoded in memory first (no bigger than the rows already held), then written
        # whole by write_atomic: aside and renamed on a local disk; on S3, which has no
        # rename, as one upload that is published only when complete. An error while
        # encoding then never leaves a half-written object under a final name.
        out = pa.BufferOutputStream()
        if self.fmt == "parquet":
            pq.write_table(table, out)
        else:  # CSV has no lists: probabilities as a JSON-style array per row
            pacsv.write_csv(_csv_ready(table), out)
        schema.write_atomic(schema.join(self.uri, name), out.getvalue())
        self.written += 1
        self.pending, self.pending_rows, self.opened = [], 0, time.monotonic()

    def close(self) -> None:
        self.flush()

    def summary(self, *, classifier: Any, model_uri: str, input: str, skipped: dict[str, int], this_run: dict) -> dict:
        """Totals over every part file in OUTPUT (earlier runs included) and this run's speed."""
        parts = [e.path for e in self._parts() if not e.base_name.startswith(".")]
        tables = [self._read(p, ["path", "label", "error"]) for p in parts]
        labels = pa.chunked_array([t.column("label") for t in tables], pa.string()) if tables else pa.array([], pa.string())
        errors = pa.chunked_array([t.column("error") for t in tables], pa.string()) if tables else labels
        counts = {r["values"]: r["counts"] for r in pc.value_counts(pc.drop_null(labels)).to_pylist()}
        error_rows = len(errors) - errors.null_count
        examples: list[dict] = []  # the first few, so that summary.json shows what went wrong
        for t in tables:
            if len(examples) < 10:
                examples += t.filter(pc.is_valid(t.column("error"))).slice(0, 10 - len(examples)).to_pylist()
        return {
            "rows": len(labels),
            "errors": error_rows,
            "counts": {c: counts.get(c, 0) for c in classifier.preprocessing["classes"]},
            "images_per_s": this_run["images_per_s"],
            "model_uri": model_uri,
            "model_name": classifier.name,
            "model_version": classifier.version,
            "input": redact_uri(input),  # summary.json is shared and shown: no credentials
            "skipped_files": skipped,
            "this_run": this_run,
            "error_examples": examples,
            "format": self.fmt,
            "files": len(parts),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _csv_ready(table: pa.Table) -> pa.Table:
    probs = table.column("probabilities").to_pylist()
    text = ["[" + ",".join(f"{p:.6g}" for p in row) + "]" if row is not None else None for row in probs]
    index = table.schema.get_field_index("probabilities")
    return table.set_column(index, "probabilities", pa.array(text, pa.string()))


# --- the terminal --------------------------------------------------------------------------


class _Progress:
    """A live bar on a terminal; a line every LOG_EVERY_S otherwise (ray job logs, CI)."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done = console, total, 0
        self.started = self.logged = time.monotonic()
        self.bar = Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console,
        ) if console.is_terminal else None

    def __enter__(self):
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task("scoring", total=self.total, rate="-")
        return self.advance

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        rate = f"{self.done / max(now - self.started, 1e-9):,.0f}"
        if self.bar:
            self.bar.update(self.task, advance=n, rate=rate)
        elif now - self.logged >= LOG_EVERY_S:
            self.logged = now
            self.console.print(f"  {self.done:,}/{self.total:,} scored, {rate} img/s")

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()


def _closing_screen(console: Console, summary: dict, output: str) -> None:
    table = Table(title=text(f"predictions by {summary['model_uri']}"), show_header=True)
    table.add_column("label")
    table.add_column("rows", justify="right")
    for label, n in summary["counts"].items():  # class names came from folder names: text, not markup
        table.add_row(text(label), f"{n:,}")
    table.add_row("[red]errors[/red]", f"{summary['errors']:,}")
    table.add_row("[bold]total[/bold]", f"{summary['rows']:,}")
    console.print(table)
    run = summary["this_run"]
    console.print(
        f"this run: {run['rows']:,} scored ({run['errors']:,} errors) in {run['seconds']:.1f} s"
        + (f", {run['images_per_s']:,} images/s" if run["rows"] else "")
        + (f"; {run['already_scored']:,} already scored before" if run["already_scored"] else "")
    )
    for example in summary["error_examples"][:3]:
        console.print(f"  [red]error[/red] {plain(example['path'])}: {plain(example['error'])}")
    skipped = sum(summary["skipped_files"].values())
    if skipped:
        console.print(f"skipped {skipped:,} files or links, by reason: {plain(summary['skipped_files'])}")
    console.print(f"output: {plain(output)} ({summary['files']} {summary['format']} files, {SUMMARY})")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("predict")
