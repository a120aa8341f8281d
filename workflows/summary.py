"""`cnnflow summary`: the Keras-style layer table of a model."""
from __future__ import annotations

import click

from cnn.models import ModelSpec, build_model
from cnn.summary import summarize
from workflows.config import SummaryConfig, model_options
from workflows.errors import CnnflowError


def run(config: SummaryConfig) -> int:
    spec = ModelSpec(config.model, config.num_classes, config.image_size, model_options(config))
    try:
        model = build_model(spec)
    except ValueError as exc:  # the model's own limits, e.g. an image too small for its depth
        raise CnnflowError(f"model {config.model!r} on {config.image_size} px images: {exc}") from None
    click.echo(summarize(model, config.image_size).table())
    return 0


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("summary")
