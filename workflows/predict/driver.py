"""The predict driver: resolve the model once, list INPUT, skip what OUTPUT holds, score the rest.

The driver consumes the pipeline's output itself: rows are small (a path, a label, a few
floats), so it can count them for the summary and show progress as they come, and it
hands them to `Output`, which writes each part file whole. Refusals (OUTPUT overlaps
INPUT, holds what predict did not write, or is being written by another job) come with
one line before the model loads or Ray starts. Each job is an MLflow scoring run
(workflows/tracking/lineage.py), started once the model version is resolved, named in
every row and in summary.json, and ended FAILED if the job fails.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from data_prep import safety, schema
from data_prep.decode import Limits
from data_prep.lock import output_lock
from data_prep.scan import PrepError
from workflows.config import PredictConfig
from workflows.errors import CnnflowError
from workflows.predict.console import closing_screen
from workflows.predict.drift import DriftTally, warning_line
from workflows.predict.inputs import Inputs, find_inputs
from workflows.predict.output import SUMMARY, Output, error_rows
from workflows.predict.precision import check_cpu, check_sample
from workflows.predict.unsure import MinScore, min_score
from workflows.terminal import plain, progress_bar

if TYPE_CHECKING:
    from workflows.tracking import ScoringRun


# counts' key for unsure rows: never a class name (no file or folder name holds a NUL, and
# Python's csv reader refuses one in a labels file)
UNSURE = "\0unsure"


def run(config: PredictConfig) -> int:
    try:  # refusals come before the model loads or Ray starts, and before anything is written
        safety.check_apart(config.input, config.output)
        check_cpu(config.precision, gpu=config.gpu)
        # One job at a time writes OUTPUT (data_prep/lock.py); the scoring run starts in _run.
        with output_lock(config.output), _scoring_run(config) as scoring:
            return _run(config, Output(config.output, config.format, embeddings=config.embeddings), scoring)
    except PrepError as exc:
        raise CnnflowError(str(exc)) from None


def _scoring_run(config: PredictConfig) -> ScoringRun:
    from workflows.config import to_dict
    from workflows.tracking import ScoringRun

    return ScoringRun(experiment=config.experiment, params=to_dict(config))


def _run(config: PredictConfig, output: Output, scoring: ScoringRun) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from workflows.ray_runtime import ray_session
    from workflows.tracking import run_url

    console = Console(stderr=True)
    started = time.perf_counter()
    counts: Counter[str | None] = Counter()  # rows per predicted label; errors under None, unsure rows under UNSURE
    timing: dict[str, float] = {}  # start-up apart from the work, for summary.json
    extra: dict[str, Any] = {"precision": config.precision}
    # Ray's start-up is mostly waiting for its processes, and loading the job mostly this
    # process's CPU (MLflow's and torch's imports, the model download): side by side they
    # took ~2.5 s less than one after the other. A run with nothing left to score starts
    # Ray for nothing; that is the price.
    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load_job, config, output)
        with ray_session(config, dashboard=False):
            job = loading.result()
            output.scoring_run = scoring.start(job.model_uri, input=config.input, output=config.output)
            timing["startup_s"] = time.perf_counter() - started  # Ray up, model loaded, inputs listed
            console.print(
                f"predict: {len(job.inputs.paths):,} images in {plain(config.input)} ({job.inputs.kind}), "
                f"{len(job.done):,} already scored in {plain(config.output)}, {len(job.todo):,} to score "
                f"with {plain(job.model_uri)}"
            )
            console.print(f"  scoring run {plain(run_url(scoring.run_id))} in experiment {plain(repr(config.experiment))}")
            if job.min_score is not None and job.min_score.target_precision is not None:
                console.print(job.min_score.line())
            if len(job.todo) and config.precision == "bf16" and not config.gpu:
                limits = Limits.of(config.max_file_mb, config.max_megapixels)
                checked = check_sample(job.classifier, job.inputs, job.todo, limits)
                if checked:
                    console.print(checked.line())
                    extra["bf16_check"] = asdict(checked)
            drift = DriftTally(len(job.classifier.classes), _score_bins(job.classifier.preprocessing))
            if len(job.todo):
                score(config, job, console, counts, timing, started, drift=drift)
    seconds = time.perf_counter() - started

    rows = sum(counts.values())
    this_run = {
        "rows": rows,
        "errors": counts[None],
        "unsure": counts[UNSURE],
        "seconds": round(seconds, 3),
        "images_per_s": round(rows / seconds, 1) if rows else None,
        "already_scored": len(job.done),
        "min_score": None if job.min_score is None else job.min_score.value,
        **{k: round(v, 3) for k, v in timing.items()},
        **extra,
    }
    summary = job.output.summary(
        classifier=job.classifier, model_uri=job.model_uri, input=config.input, skipped=job.inputs.skipped,
        this_run=this_run,
    )
    # this run's rows against the model's training data (workflows/predict/drift.py)
    summary["drift"] = drift.report(job.classifier.preprocessing.get("drift_reference"), job.classifier.classes)
    schema.write_json(schema.join(config.output, SUMMARY), summary)
    scoring.log_metrics(
        {
            "rows": summary["rows"],
            "errors": summary["errors"],
            "rows_scored_this_run": rows,
            "errors_this_run": counts[None],
            "images_per_s": this_run["images_per_s"],
            "seconds": this_run["seconds"],
            "unsure": summary["unsure"],
            **({"seen_in_training": summary["seen_in_training"]} if summary["seen_in_training"] is not None else {}),
            # this batch against the training data (workflows/predict/drift.py)
            **({"drift_class_psi": summary["drift"]["classes"]["psi"], "drift_score_psi": summary["drift"]["scores"]["psi"]}
               if summary["drift"] else {}),
        }
    )
    scoring.log_dict(summary, SUMMARY)
    closing_screen(console, summary, config.output)
    if warning := warning_line(summary["drift"]):
        console.print(f"[yellow]{warning}[/yellow]")
    if summary["rows"] and summary["rows"] == summary["errors"]:
        console.print("[red]no file could be scored[/red]: every row is an error (see error_examples in summary.json)")
        scoring.fail("no file could be scored: every row is an error")
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
    min_score: MinScore | None = None  # rows scoring below it are unsure (--min-score, --target-precision)


def load_job(config: PredictConfig, output: Output | None = None) -> Job:
    """The model, the inputs and what OUTPUT already holds; no Ray needed."""
    from workflows.tracking import load_classifier, resolve_model_uri, use_tracking

    output = output or Output(config.output, config.format, embeddings=config.embeddings)
    use_tracking()
    model_uri = resolve_model_uri(config.model)
    classifier = load_classifier(model_uri)
    inputs = find_inputs(config.input, classifier.preprocessing)
    done = output.previous(model_uri, overwrite=config.overwrite)
    unsure_below = min_score(config.min_score, config.target_precision, classifier.preprocessing, model_uri)
    output.claim()
    todo = inputs.paths.filter(pc.invert(pc.is_in(inputs.paths, value_set=done.column("path"))))
    return Job(model_uri, classifier, inputs, output, done, todo, unsure_below)


def score(
    config: PredictConfig, job: Job, console: Console, counts: Counter[str | None], timing: dict[str, float],
    started: float, *, drift: DriftTally | None = None,
) -> None:  # fmt: skip
    """Run the pipeline over `job.todo`, writing part files and counting labels as rows come;
    `timing["first_row_s"]` is when the first scored rows reached the driver."""
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
        from workflows.predict.pipeline import build_dataset  # imports Ray

        dataset, plan = build_dataset(
            config, job.inputs, todo, job.classifier, scored=job.done.column("path"),
            min_score=None if job.min_score is None else job.min_score.value,
        )  # fmt: skip
        console.print(
            f"  {plan.replicas} model replica(s) x {plan.torch_threads} thread(s)"
            f"{' on GPU' if config.gpu else ''}, {plan.actor_cpus:g} CPU each in Ray's accounting"
        )
        with progress_bar(console, "predict", "img/s") as progress:
            task = progress.add_task("scoring", total=len(todo))
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                timing.setdefault("first_row_s", time.perf_counter() - started)
                job.output.add(batch)
                counts.update(_tally(batch))
                if drift is not None:
                    drift.add(batch)
                progress.advance(task, batch.num_rows)
    finally:  # rows scored before an interruption are kept: a rerun resumes after them
        job.output.close()


def _score_bins(preprocessing: dict[str, Any]) -> int:
    """The drift reference's score bins (10 when the model has none: nothing is compared)."""
    reference = preprocessing.get("drift_reference") or {}
    return len(reference.get("score_histogram", [])) or 10


def _tally(batch: pa.Table) -> Counter[str | None]:
    """Rows per predicted label; error rows count under None, unsure rows (no label either) under UNSURE."""
    counts = Counter({row["values"]: row["counts"] for row in pc.value_counts(batch.column("label")).to_pylist()})
    unsure = batch.num_rows - batch.column("unsure").null_count
    if unsure:
        counts[None] -= unsure
        counts[UNSURE] = unsure
    return +counts  # without the keys left at 0
