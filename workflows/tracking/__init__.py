"""The one package that talks to MLflow: runs, params, metrics, artifacts, models, registry.

Callers use it as `from workflows import tracking; tracking.set_tags(...)`: the names
below are its public face. `connection` finds and opens the store, `runs` creates and
logs into runs (a tune's parent and children too), `registry` logs, registers, resolves
and loads models, `promotion` moves the `champion` alias, `listing` reads an experiment
back for `cnnflow runs`, `lineage` links the data, training runs, versions and bulk jobs
(dataset inputs; one scoring run per `cnnflow predict`), and `pyfunc_model` is the model
MLflow loads. Every write passes through `data_prep.redact`: a URI's credentials
(`s3://KEY:SECRET@...` in an option, a manifest, an error) never reach a param, tag or
artifact, and `run_url`/`ui_hint` show the tracking URI without its own.
"""
from workflows.tracking.connection import (
    check_reachable,
    client,
    resolved_tracking_uri,
    retry_locked,
    store_lock,
    ui_hint,
    use_tracking,
    use_tracking_uri,
)
from workflows.tracking.lineage import SCORING_TAG_PREFIX, ScoringRun, log_dataset_inputs
from workflows.tracking.listing import list_runs
from workflows.tracking.promotion import Decision, champion_gate
from workflows.tracking.registry import (
    REGISTERED_TAG,
    Classifier,
    champion,
    get_version,
    load_classifier,
    log_model,
    parse_model_uri,
    register_model,
    registered_names,
    resolve_model_uri,
    set_champion,
    tag_version,
    versions,
)
from workflows.tracking.runs import (
    FAILURE_TAG,
    PARENT_TAG,
    child_run,
    child_run_ids,
    end_if_running,
    ensure_experiment,
    finished_run_id,
    latest_run,
    literal,
    log_dict,
    log_epoch,
    log_figure,
    log_metrics,
    log_text,
    logged_epochs,
    metric_history,
    parent_run,
    read_dict,
    run_url,
    set_tags,
    training_run,
)

__all__ = [
    # connection
    "check_reachable",
    "client",
    "resolved_tracking_uri",
    "retry_locked",
    "store_lock",
    "ui_hint",
    "use_tracking",
    "use_tracking_uri",
    # runs
    "FAILURE_TAG",
    "PARENT_TAG",
    "child_run",
    "child_run_ids",
    "end_if_running",
    "ensure_experiment",
    "finished_run_id",
    "latest_run",
    "literal",
    "log_dict",
    "log_epoch",
    "log_figure",
    "log_metrics",
    "log_text",
    "logged_epochs",
    "metric_history",
    "parent_run",
    "read_dict",
    "run_url",
    "set_tags",
    "training_run",
    # registry
    "REGISTERED_TAG",
    "Classifier",
    "champion",
    "get_version",
    "load_classifier",
    "log_model",
    "parse_model_uri",
    "register_model",
    "registered_names",
    "resolve_model_uri",
    "set_champion",
    "tag_version",
    "versions",
    # lineage
    "SCORING_TAG_PREFIX",
    "ScoringRun",
    "log_dataset_inputs",
    # promotion, listing
    "Decision",
    "champion_gate",
    "list_runs",
]
