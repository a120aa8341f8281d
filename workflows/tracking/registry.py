"""Models in MLflow: logged into their run, registered as versions, named by the user, loaded back.

`log_model` logs the pyfunc model of `workflows/tracking/pyfunc_model.py` "from code" (a
three-line file, no pickle) with its two files (and its training hashes); `register_model` makes it a version of a
registered model, tagged; `champion` and `set_champion` read and move the `champion`
alias. `resolve_model_uri` turns what a user types (a name, an alias, a version, a run)
into one models:/NAME/VERSION or an error that lists what exists, and `load_classifier`
rebuilds that version for plain PyTorch inference (predict, promotion).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torch import nn

from cnn.inference import class_probabilities, fitted_temperature, test_time_augmentation
from cnn.models import ModelSpec
from data_prep.redact import redact_uri
from workflows.config import CHAMPION_ALIAS
from workflows.errors import CnnflowError
from workflows.tracking.connection import client, resolved_tracking_uri, retry_locked
from workflows.tracking.pyfunc_model import PREPROCESSING, TRAIN_HASHES, WEIGHTS, normalizer, read_model_files
from workflows.tracking.runs import literal, set_tags

MODEL_NAME = "model"  # the logged model's name inside its run
RUN_ID = re.compile(r"[a-zA-Z0-9][\w-]{0,255}")  # MLflow's run id format
REGISTERED_TAG = "registered_version"  # on the run: "NAME/VERSION"
LOGGED_MODEL_TAG = "logged_model_uri"  # on the run: the model it logged (models:/m-...)
# MLflow's "models from code": the logged model stores this file, not a pickle, and
# loading it imports the installed cnnflow (see workflows/tracking/pyfunc_model.py for why).
MODEL_CODE = """\
import mlflow
from workflows.tracking.pyfunc_model import ImageClassifier

mlflow.models.set_model(ImageClassifier())
"""
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.float, "score"),
            ColSpec(Array(DataType.float), "probabilities"),
            ColSpec(DataType.string, "error"),
        ]
    ),
)


def log_model(
    run_id: str,
    *,
    state: dict[str, Any],
    preprocessing: dict[str, Any],
    example_image: bytes | None = None,
    train_hashes: pa.Table | None = None,
) -> str:
    """Log the pyfunc model into the (active) run; return its model URI for `register_model`.
    `train_hashes` (phash, path of the training split) goes with it as train_hashes.parquet."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError("log_model must run inside the run it logs to (training_run())")
    with tempfile.TemporaryDirectory() as tmp:
        weights, prep = Path(tmp, WEIGHTS), Path(tmp, PREPROCESSING)
        torch.save(state, weights)
        prep.write_text(json.dumps(preprocessing, indent=2))
        code = Path(tmp, "classifier.py")
        code.write_text(MODEL_CODE)
        artifacts = {"weights": str(weights), "preprocessing": str(prep)}
        if train_hashes is not None:
            artifacts["train_hashes"] = str(Path(tmp, TRAIN_HASHES))
            pq.write_table(train_hashes, artifacts["train_hashes"])
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(code),
            artifacts=artifacts,
            signature=SIGNATURE,
            input_example=None if example_image is None else pd.DataFrame({"image": [example_image]}),
            # Pinned here rather than inferred: inference loads the model in a subprocess.
            pip_requirements=_requirements(),
            metadata={"cnnflow_spec": state["spec"]},
        )
    set_tags(run_id, {LOGGED_MODEL_TAG: info.model_uri})
    return info.model_uri


def register_model(run_id: str, model_uri: str, *, register_as: str, version_tags: Mapping[str, Any]) -> ModelVersion:
    """A new version of `register_as` from a logged model; the run names the version."""
    # mlflow.register_model prints "Successfully registered model ..." to stderr itself;
    # cnnflow's own line says which version was registered.
    with contextlib.redirect_stderr(io.StringIO()):
        version = retry_locked(
            mlflow.register_model, model_uri, register_as, tags={k: redact_uri(str(v)) for k, v in version_tags.items()}
        )
    set_tags(run_id, {REGISTERED_TAG: f"{register_as}/{version.version}"})
    return version


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "pyarrow")]


def registered_names() -> list[str]:
    return sorted(m.name for m in client().search_registered_models())


def _registered(name: str) -> Any:
    try:
        return client().get_registered_model(name)
    except MlflowException:
        names = registered_names()
        known = ", ".join(names) if names else "none yet (train one with `cnnflow train DATA`)"
        raise CnnflowError(f"no registered model {name!r}; registered models: {known}") from None


def versions(name: str) -> list[int]:
    return sorted(int(v.version) for v in client().search_model_versions(f"name = {literal(name)}"))


def get_version(name: str, version: int) -> ModelVersion:
    return client().get_model_version(name, str(version))


def champion(name: str) -> int | None:
    """The version holding the `champion` alias, or None."""
    aliases = _registered(name).aliases or {}
    return int(aliases[CHAMPION_ALIAS]) if CHAMPION_ALIAS in aliases else None


def set_champion(name: str, version: int) -> None:
    client().set_registered_model_alias(name, CHAMPION_ALIAS, str(version))


def tag_version(name: str, version: int, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, redact_uri(str(value)))


def resolve_model_uri(model: str | None) -> str:
    """None, NAME, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/... -> models:/NAME/VERSION.

    None means the champion of the only registered model; a bare NAME its champion.
    Anything that does not exist is a CnnflowError that lists what does.
    """
    if model is None:
        names = registered_names()
        if not names:
            raise CnnflowError(
                f"no registered models in {resolved_tracking_uri()}; train one with `cnnflow train DATA`"
            )
        if len(names) > 1:
            raise CnnflowError(f"several registered models ({', '.join(names)}); choose one with --model NAME")
        return _resolve_alias(names[0], CHAMPION_ALIAS)
    if model.startswith("runs:/"):
        return _resolve_run(model)
    if model.startswith("models:/"):
        rest = model[len("models:/") :].strip("/")
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            return _resolve_alias(name, alias)
        if "/" in rest:
            name, version = rest.rsplit("/", 1)
            return _resolve_version(name, version)
        model = rest
    if ":" in model or "/" in model:
        raise CnnflowError(
            f"cannot resolve model {model!r}: use NAME, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    return _resolve_alias(model, CHAMPION_ALIAS)


def _resolve_alias(name: str, alias: str) -> str:
    registered = _registered(name)
    aliases = registered.aliases or {}
    if alias not in aliases:
        have = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise CnnflowError(
            f"model {name!r} has no alias {alias!r} (aliases: {have}; versions: "
            f"{', '.join(map(str, versions(name))) or 'none'}); pass models:/{name}/VERSION "
            f"or run `cnnflow promote {name}`"
        )
    return f"models:/{name}/{int(aliases[alias])}"


def _resolve_version(name: str, version: str) -> str:
    _registered(name)
    known = versions(name)
    if version == "latest" and known:
        return f"models:/{name}/{known[-1]}"
    if not version.isdigit() or int(version) not in known:
        raise CnnflowError(
            f"model {name!r} has no version {version!r}; versions: {', '.join(map(str, known)) or 'none'}"
        )
    return f"models:/{name}/{int(version)}"


def _resolve_run(uri: str) -> str:
    run_id = uri[len("runs:/") :].split("/")[0]
    if not RUN_ID.fullmatch(run_id):  # before it goes into a filter, and with a clearer error than MLflow's
        raise CnnflowError(f"{uri!r} does not name a run: expected runs:/RUN_ID/model, RUN_ID of letters, digits, '_' and '-'")
    found = client().search_model_versions(f"run_id = {literal(run_id)}")
    if not found:
        raise CnnflowError(f"no registered model version comes from run {run_id}; predict needs a registered model")
    mv = max(found, key=lambda v: int(v.version))
    return f"models:/{mv.name}/{int(mv.version)}"


def parse_model_uri(uri: str) -> tuple[str, int]:
    """models:/NAME/VERSION -> (NAME, VERSION)."""
    name, version = uri[len("models:/") :].rsplit("/", 1)
    return name, int(version)


@dataclass
class Classifier:
    """A registered model version, rebuilt from its weights for plain PyTorch inference."""

    model: nn.Module  # eval mode, CPU
    spec: ModelSpec
    preprocessing: dict[str, Any]  # classes, image_size, resize, mean, std, tta, temperature, ...
    uri: str  # models:/NAME/VERSION
    name: str
    version: int
    train_hashes: pa.Table | None = None  # the training split's (phash, path); None: logged without

    @property
    def classes(self) -> list[str]:
        return list(self.preprocessing["classes"])

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on the model's device -> (N, classes) probabilities."""
        return class_probabilities(
            self.model, normalizer(self.preprocessing).to(pixels.device), pixels,
            tta=test_time_augmentation(self.preprocessing), temperature=fitted_temperature(self.preprocessing),
        )  # fmt: skip


def load_classifier(model_uri: str) -> Classifier:
    """Any URI `resolve_model_uri` accepts -> the model, spec and preprocessing, on CPU."""
    uri = resolve_model_uri(model_uri)
    name, version = parse_model_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=resolved_tracking_uri())
        files = mlflow.models.Model.load(local).flavors["python_function"]["artifacts"]
        model, spec, preprocessing = read_model_files(
            Path(local, files["weights"]["path"]), Path(local, files["preprocessing"]["path"])
        )
        hashes = pq.read_table(Path(local, files["train_hashes"]["path"])) if "train_hashes" in files else None
    return Classifier(model, spec, preprocessing, uri, name, version, hashes)
