"""The `cnnflow` command line, generated from the typed configs in `workflows/config.py`:
each option's flag, type, default and help come from its dataclass field.

Each subcommand is one config class plus one `run(config)` function in its stage module,
imported only when that subcommand runs, so that `cnnflow --help` stays fast (importing
Ray and PyTorch costs seconds). `python -m workflows.<stage>` calls `main_for(stage)`.
"""
from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, Literal

import click
from click.core import ParameterSource

from data_prep.redact import redact_uri
from workflows import config as cfg
from workflows import options
from workflows.errors import CnnflowError
from workflows.terminal import quiet_libraries

# subcommand -> (config class, "module:function" that runs it)
COMMANDS: dict[str, tuple[type, str]] = {
    "prep": (cfg.PrepConfig, "workflows.prep:run"),
    "train": (cfg.TrainConfig, "workflows.train.driver:run"),
    "tune": (cfg.TuneConfig, "workflows.tune.driver:run"),
    "predict": (cfg.PredictConfig, "workflows.predict.driver:run"),
    "promote": (cfg.PromoteConfig, "workflows.promote:run"),
    "summary": (cfg.SummaryConfig, "workflows.summary:run"),
    "runs": (cfg.RunsConfig, "workflows.runs:run"),
    "demo": (cfg.DemoConfig, "workflows.demo:run"),
}

# What a user can fix themselves: shown as one line, without a traceback unless --debug.
# OSError covers what a file system or object store says: a missing file or bucket, an
# unreachable S3 endpoint, refused credentials, a full disk.
USER_ERRORS = (CnnflowError, options.ConfigError, OSError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS, and MLflow's refusals once MLflow is loaded (a name or value it will not
    take): looked up here rather than imported, so that `cnnflow --help` does not load MLflow."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    return USER_ERRORS + ((mlflow_exceptions.MlflowException,) if mlflow_exceptions else ())


def one_line(exc: BaseException) -> str:
    """The error's message on one line. MLflow's are prefixed, so the user knows who refused;
    an OSError raised in a Ray task comes with the task's traceback, whose last line is the
    cause; pyarrow's S3 errors also name the endpoint they went to."""
    if isinstance(exc, OSError):
        lines = [line for line in str(exc).splitlines() if line.strip()]
        message = lines[-1].strip() if lines else type(exc).__name__
        if "AWS Error" in message:
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS's own (AWS_ENDPOINT_URL is not set)"
            message += f" [S3 endpoint: {endpoint}]"
        return message
    message = getattr(exc, "message", None) if type(exc).__module__.startswith("mlflow") else None
    text = " ".join(str(message if message is not None else exc).split())
    return f"MLflow: {text}" if message is not None else text


def _click_type(hint: Any) -> Any:
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return click.Choice([str(a) for a in typing.get_args(hint)])
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(hint, click.STRING)


def _params(config_cls: type) -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for f, hint in options.config_fields(config_cls):
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("positional"):
            params.append(click.Argument([f.name], type=_click_type(hint)))
        elif hint is bool:
            decls = [f"{flag}/--no-{flag[2:]}"] if f.default else [flag]
            params.append(click.Option([*decls, f.name], is_flag=True, default=f.default, show_default=f.default is True, help=help_text))
        else:
            params.append(
                click.Option(
                    [flag, f.name],
                    type=_click_type(hint),
                    default=f.default,
                    show_default=f.default is not None,
                    help=help_text,
                )
            )
    params.append(
        click.Option(
            ["--config", "config_file"],
            type=click.Path(exists=True, dir_okay=False),
            help="YAML file of option: value; the command line wins over it.",
        )
    )
    return params


def resolve_config(config_cls: type, ctx: click.Context, values: dict[str, Any]) -> Any:
    """defaults < YAML < the options actually typed on the command line."""
    config_file = values.pop("config_file", None)
    typed = {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    if config_file:
        return options.load_config(config_cls, config_file, **typed)
    return options.make_config(config_cls, values, source="the command line")


def _runner(target: str) -> Callable[[Any], Any]:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def _make_command(name: str, config_cls: type, target: str) -> click.Command:
    def callback(**values: Any) -> None:
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            config = resolve_config(config_cls, ctx, values)
            quiet_libraries(getattr(config, "verbose", False))
            result = _runner(target)(config)
        except _user_errors() as exc:
            if debug:
                click.echo(redact_uri(traceback.format_exc()), err=True, nl=False)
            click.echo(redact_uri(f"error: {one_line(exc)}"), err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit):
            raise  # click's own usage errors and exits
        except Exception:  # a bug: its traceback, with any URI's credentials hidden (they are in messages)
            click.echo(redact_uri(traceback.format_exc()), err=True, nl=False)
            ctx.exit(1)
        ctx.exit(result if isinstance(result, int) else 0)

    doc = (config_cls.__doc__ or "").strip()
    return click.Command(name, callback=callback, params=_params(config_cls), help=doc, short_help=doc.split("\n")[0])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="cnnflow")
def cli(debug: bool) -> None:
    """cnnflow: image folders -> Parquet shards -> a trained, registered CNN -> predictions.

    On a laptop it needs no setup: a local Ray, MLflow in ./mlflow.db (MLFLOW_TRACKING_URI
    overrides it), local folders. On a cluster, set RAY_ADDRESS or submit with `ray job submit`.
    """


for _name, (_cls, _target) in COMMANDS.items():
    cli.add_command(_make_command(_name, _cls, _target))


def main() -> None:
    try:
        cli(prog_name="cnnflow")
    finally:
        _exit_quickly()


def main_for(stage: str) -> None:
    """`python -m workflows.<stage> ARGS` == `cnnflow <stage> ARGS` (for `ray job submit`)."""
    args = sys.argv[1:]
    debug = ["--debug"] if "--debug" in args else []
    args = [a for a in args if a != "--debug"]
    try:
        cli(args=[*debug, stage, *args], prog_name="python -m workflows")
    finally:
        _exit_quickly()


def _exit_quickly() -> None:
    """The command is over and the process is about to exit: skip the garbage collector.

    Interpreter shutdown ran collection passes over every object torch, Ray and MLflow
    had made: 1-2 s after predict's last line. Frozen objects are left out of those
    passes; the memory goes back to the system with the process all the same. Only in
    the process entry points: a caller of `cli` in-process (tests) keeps a normal GC.
    """
    gc.freeze()
