"""The machinery every command's options share: fields, checks, YAML and the coercion of values.

An option is a dataclass field whose metadata holds its "help" (and "positional" for a
required argument); `workflows/cli.py` makes the command line from those fields and
`make_config` builds a config from YAML or the command line, refusing unknown keys and
values of the wrong type. The options themselves are defined by the stage that owns their
defaults: prep's in `data_prep/options.py`, the models' own arguments in `cnn/registry.py`,
the commands' in `workflows/config.py`.
"""
from __future__ import annotations

import dataclasses
import posixpath
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cnn.registry import MODELS, builder_options, model_info
from data_prep.options import OptionError, check, check_range, option

# One type for every refused option, wherever the option is defined; the CLI shows it as
# one line. ConfigError is its name in workflows/.
ConfigError = OptionError

__all__ = [
    "ConfigError",
    "check",
    "check_experiment_name",
    "check_model",
    "check_model_name",
    "check_range",
    "check_run_name",
    "config_fields",
    "load_config",
    "make_config",
    "model_option",
    "model_options",
    "models_help",
    "option",
    "positional",
    "read_yaml",
    "to_dict",
]

# MLflow's own limits on names (mlflow.utils.validation), checked here so that a name it
# would refuse is refused before any work is done.
MAX_EXPERIMENT_NAME = 500
MAX_NAME = 250


def positional(help: str) -> Any:
    """A required argument (a path or a name): no default, by design."""
    return field(metadata={"help": help, "positional": True})


# --- the models' options, from cnn/registry.py ---------------------------------------


def models_help() -> str:
    """The registered models, for --model's help: "seed, simple or resnet18"."""
    names = list(MODELS)
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def model_option(model: str, name: str) -> Any:
    """The option for one of a registered model's own arguments, its default and help the registry's."""
    arg = model_info(model).arg(name)
    return option(arg.default, f"{model}: {arg.help}")


def model_options(config: Any) -> dict[str, Any]:
    """The model-specific constructor arguments a config carries for its model."""
    return builder_options(config.model, vars(config))


def check_model(name: str) -> None:
    try:
        model_info(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --- names MLflow stores ----------------------------------------------------------------


def _check_name(what: str, name: str, limit: int = MAX_NAME, *, new: bool = True) -> None:
    """A name MLflow stores: not empty, printable, not too long; a `new` one (which cnnflow
    creates) without quotes either.

    MLflow's search syntax has no escape character, so a name with both kinds of quote
    could never be searched for: names cnnflow creates hold no quote or backtick, which
    keeps them usable in MLflow's UI search box too. A name being looked up (made by
    another tool) may hold them: tracking.literal quotes it.
    """
    check(name.strip() != "", f"{what} must not be empty")
    check(len(name) <= limit, f"{what} must be at most {limit} characters, got {len(name)}")
    check(name.isprintable(), f"{what} must not contain control characters, got {name!r}")
    check(not new or not set(name) & set("'\"`"), f"{what} must not contain quotes or backticks, got {name!r}")


def check_run_name(name: str) -> None:
    _check_name("run_name", name)


def check_experiment_name(name: str, *, new: bool = True) -> None:
    _check_name("experiment", name, MAX_EXPERIMENT_NAME, new=new)


def check_model_name(name: str, what: str = "registered model name", *, new: bool = True) -> None:
    """MLflow's rules for registered model names, plus _check_name's."""
    _check_name(what, name, new=new)
    check("/" not in name and ":" not in name, f"{what} must not contain '/' or ':' (MLflow's rule), got {name!r}")
    # MLflow stores a model under its name as a path: the name must be its own normal form.
    norm = posixpath.normpath(name)
    check(norm == name and not norm.startswith("."), f"{what} {name!r} is not a plain name (MLflow's rule)")


# --- building configs from mappings (YAML, the CLI) -------------------------------------


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check one value against its type hint; accept what YAML naturally gives."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(name, args[0], value)
    if origin is Literal:
        allowed = typing.get_args(hint)
        check(value in allowed, f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if hint is bool:
        check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        check(isinstance(value, (str, Path)), f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def make_config(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from a mapping; an unknown key is an error that lists the valid ones."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    fields = config_fields(cls)
    valid = [f.name for f, _ in fields]
    unknown = sorted(set(values) - set(valid))
    check(not unknown, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {source}; valid keys: {', '.join(valid)}")
    missing = [f.name for f, _ in fields if f.metadata.get("positional") and values.get(f.name) is None]
    check(not missing, f"missing {', '.join(missing)} in {source}")
    hints = dict((f.name, hint) for f, hint in fields)
    return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Plain YAML only: a python tag or broken syntax is a ConfigError naming where."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None
    except yaml.MarkedYAMLError as exc:  # ConstructorError (!!python/...), ParserError, ScannerError
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise ConfigError(f"{path}{where}: {exc.problem or exc.context}; give plain option: value lines") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML ({type(exc).__name__})") from None
    check(isinstance(data, dict), f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path, **overrides: Any) -> Any:
    """YAML file, then keyword overrides (the command line) on top."""
    return make_config(cls, {**read_yaml(path), **overrides}, source=str(path))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
