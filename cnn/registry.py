"""The models cnnflow can build, by name, with the arguments each takes: default and help.

This is the one place a model's own arguments (beyond num_classes and image_size) and their
defaults are written. `cnn/models.py` registers a builder under each name here, and
refuses one that gives such an argument a default of its own; the command line takes
--model's choices, the per-model options' defaults and help, and which of them reach
the builder from here. No PyTorch in this module: `cnnflow --help` reads it without
loading torch (seconds).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelArg:
    """One argument of a model's builder, given as an option of the same name (--width)."""

    name: str
    default: Any
    help: str
    keyword: str = ""  # the builder's keyword, where it is not `name` (weights -> weights_path)

    @property
    def builder_keyword(self) -> str:
        return self.keyword or self.name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    args: tuple[ModelArg, ...] = ()

    def arg(self, name: str) -> ModelArg:
        return next(a for a in self.args if a.name == name)

    def defaults(self) -> dict[str, Any]:
        """The builder's keywords with their defaults."""
        return {a.builder_keyword: a.default for a in self.args}


MODELS: dict[str, ModelInfo] = {}  # in the order registered: the order help lists them


def declare(name: str, *args: ModelArg) -> ModelInfo:
    MODELS[name] = info = ModelInfo(name, args)
    return info


declare("seed")
declare(
    "simple",
    ModelArg("width", 32, "channels of the first stage (doubling per stage)."),
    ModelArg("depth", 4, "number of conv-pool stages."),
)
declare(
    "resnet18",
    ModelArg("weights", None, "a local torchvision state_dict to start from.", keyword="weights_path"),
)


def model_info(name: str) -> ModelInfo:
    """The registered model `name`; ValueError listing the known ones if there is none."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def builder_options(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The builder arguments `values` (options by name, e.g. a config's fields) give model
    `name`: its own arguments only, by the builder's keywords. One that is missing, None
    or empty is left out, so that the builder gets its default."""
    given = ((a.builder_keyword, values.get(a.name)) for a in model_info(name).args)
    return {keyword: value for keyword, value in given if value is not None and value != ""}
