"""OUTPUT of `cnnflow predict`: the rows' schema, part files written whole, summary.json, resuming.

Each part file is written whole (data_prep/schema.py's write_atomic: aside and renamed on
a local disk, one upload on S3), so a run that dies leaves only whole files behind and
the next run resumes from them. OUTPUT is claimed with cnnflow's marker
(data_prep/safety.py), which names the runs whose part files are there: a rerun reads,
resumes from or (with --overwrite) deletes those files only, and an OUTPUT that holds
anything else is refused with one line before the model loads or Ray starts.
"""
from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep import safety, schema
from data_prep.redact import redact_uri
from workflows.errors import CnnflowError

# The rows the pipeline scores; `probabilities` follow the model's classes order.
SCORED_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("probabilities", pa.list_(pa.float32())),
        pa.field("model_uri", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        # null, or why a scored row has no label (its score is below --min-score); its score
        # and probabilities are still written
        pa.field("unsure", pa.string()),
        # the closest training image (its path relative to the training data's INPUT) whose
        # perceptual hash is within the model's near_duplicate_distance of this row's, and
        # how many of the 64 bits differ (0: the same pixels, to the hash); null when none is
        # that close, on error rows, and for a model logged without its training hashes
        pa.field("seen_in_training", pa.string()),
        pa.field("seen_distance", pa.int32()),
        # --embeddings: the penultimate features (what the model's final Linear takes), float32;
        # null without --embeddings and on error rows (one schema whatever the options)
        pa.field("embedding", pa.list_(pa.float32())),
    ]
)
# The output table (docs/architecture.md, Formats): the scored rows and the MLflow run id of
# the job that wrote each (`Output.add` stamps it; rows an earlier job wrote keep theirs).
SCORING_RUN = "scoring_run"
OUTPUT_SCHEMA = SCORED_SCHEMA.append(pa.field(SCORING_RUN, pa.string()))

# In the schema metadata of a Parquet part file written with --embeddings (CSV part files
# are read instead): a resumed --embeddings job refuses rows scored without them.
EMBEDDINGS_KEY = b"cnnflow.embeddings"
SUMMARY = "summary.json"
PART_PREFIX = "part-"
# A part file is closed at this many rows or after this long, whichever comes first:
# an interrupted run loses at most that much work.
ROWS_PER_FILE = 50_000
SECONDS_PER_FILE = 60.0
STAGE = "predict"  # the marker's `written_by` is "cnnflow predict"
# part-<run id>-<n>.<format>, the run id from Output.__init__. While being written on a
# local disk: .part-...<format>.tmp (schema.temp_name); .part-...<format> from older runs.
PART_NAME = re.compile(r"\.?part-(\d{8}T\d{6}-[0-9a-f]{6})-\d{5}\.(?:parquet|csv)(?:\.tmp)?")


class Output:
    """OUTPUT: part files written whole (schema.write_atomic), and summary.json.

    Building one only reads: it finds the runs whose part files are in OUTPUT (`runs`) and
    refuses an OUTPUT that holds anything cnnflow predict did not write. `claim` then
    records this run in the marker before any part file is written.
    """

    def __init__(self, uri: str, fmt: str, *, embeddings: bool = False):
        self.uri, self.fmt, self.embeddings = uri, fmt, embeddings
        self.fs, self.root = schema.resolve(uri)
        self.root = self.root.rstrip("/") or "/"
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.scoring_run: str | None = None  # this job's MLflow run, in every row it writes
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
        """The string columns of a part file; one that part files from older versions lack
        (`unsure`, `seen_in_training`) reads as nulls."""
        if path.endswith(".parquet"):
            present = set(pq.read_schema(path, filesystem=self.fs).names)
            table = pq.read_table(path, columns=[c for c in columns if c in present], filesystem=self.fs)
            for c in columns:
                if c not in present:
                    table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
            return table.select(columns)
        with self.fs.open_input_stream(path) as src:
            convert = pacsv.ConvertOptions(  # an empty field is a null (label and error)
                include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=True,
                include_missing_columns=True,
            )
            return pacsv.read_csv(src, convert_options=convert)

    def previous(self, model_uri: str, *, overwrite: bool) -> pa.Table:
        """What earlier runs wrote (path, label, error); refuses another model's rows, and
        with --embeddings rows scored without them (they would be skipped, left without)."""
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
        lacking = sum(self._without_embeddings(p, t) for p, t in zip(parts, tables)) if self.embeddings else 0
        if lacking and not overwrite:
            raise CnnflowError(
                f"{self.uri} holds {lacking:,} rows scored without --embeddings, which a resumed run would skip; "
                "pass --overwrite to score every file again, or choose another OUTPUT"
            )
        if others or lacking:  # --overwrite: start again
            for p in parts:
                self.fs.delete_file(p)
            return empty.drop_columns(["model_uri"])
        return done.drop_columns(["model_uri"])

    def _without_embeddings(self, path: str, rows: pa.Table) -> int:
        """Scored rows (no error) of a part file written without --embeddings."""
        if path.endswith(".parquet"):
            if (pq.read_schema(path, filesystem=self.fs).metadata or {}).get(EMBEDDINGS_KEY) == b"true":
                return 0
            return rows.column("error").null_count
        embedding = self._read(path, ["embedding"]).column("embedding")
        return int(pc.sum(pc.and_(pc.is_null(rows.column("error")), pc.is_null(embedding))).as_py() or 0)

    def add(self, batch: pa.Table) -> None:
        """Scored rows (SCORED_SCHEMA), to be written with this job's scoring run."""
        run = pa.repeat(self.scoring_run, batch.num_rows).cast(pa.string())
        batch = batch.append_column(OUTPUT_SCHEMA.field(SCORING_RUN), run)
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
            if self.embeddings:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), EMBEDDINGS_KEY: b"true"})
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
        tables = [self._read(p, ["path", "label", "error", "unsure", "seen_in_training"]) for p in parts]
        labels = pa.chunked_array([t.column("label") for t in tables], pa.string()) if tables else pa.array([], pa.string())
        errors = pa.chunked_array([t.column("error") for t in tables], pa.string()) if tables else labels
        unsure = pa.chunked_array([t.column("unsure") for t in tables], pa.string()) if tables else labels
        seen = pa.chunked_array([t.column("seen_in_training") for t in tables], pa.string()) if tables else labels
        counts = {r["values"]: r["counts"] for r in pc.value_counts(pc.drop_null(labels)).to_pylist()}
        error_rows = len(errors) - errors.null_count
        examples: list[dict] = []  # the first few, so that summary.json shows what went wrong
        for t in tables:
            if len(examples) < 10:
                examples += t.filter(pc.is_valid(t.column("error"))).slice(0, 10 - len(examples)).to_pylist()
        return {
            "rows": len(labels),
            "errors": error_rows,
            "unsure": len(unsure) - unsure.null_count,  # scored, but below --min-score: no label
            # rows that are near-copies of a training image; null: the model has no training hashes
            "seen_in_training": len(seen) - seen.null_count if getattr(classifier, "train_hashes", None) is not None else None,
            "counts": {c: counts.get(c, 0) for c in classifier.preprocessing["classes"]},
            "images_per_s": this_run["images_per_s"],
            "model_uri": model_uri,
            "model_name": classifier.name,
            "model_version": classifier.version,
            "scoring_run_id": self.scoring_run,
            "input": redact_uri(input),  # summary.json is shared and shown: no credentials
            "skipped_files": skipped,
            "this_run": this_run,
            "error_examples": examples,
            "format": self.fmt,
            "files": len(parts),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _csv_ready(table: pa.Table) -> pa.Table:
    """CSV has no lists: each list column (probabilities, embedding) as a JSON-style array per row."""
    for index, field in enumerate(table.schema):
        if pa.types.is_list(field.type):
            rows = table.column(index).to_pylist()
            text = ["[" + ",".join(f"{p:.6g}" for p in row) + "]" if row is not None else None for row in rows]
            table = table.set_column(index, field.name, pa.array(text, pa.string()))
    return table


def error_rows(paths: pa.Array, errors: list[str], model_uri: str) -> pa.Table:
    """Output rows for files that could not be scored: every column but path, model_uri and error null."""
    n = len(paths)
    given = {"path": paths, "model_uri": pa.array([model_uri] * n, pa.string()), "error": pa.array(errors, pa.string())}
    return pa.Table.from_arrays(
        [given.get(f.name, pa.nulls(n, f.type)) for f in SCORED_SCHEMA], schema=SCORED_SCHEMA
    )
