"""`cnnflow train` (DESIGN.md). Placeholder until issue 4 lands."""
from __future__ import annotations

from workflows.config import TrainConfig
from workflows.errors import NotBuiltYet


def run(config: TrainConfig) -> int:
    raise NotBuiltYet("issue 4")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("train")
