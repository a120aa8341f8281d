"""`cnnflow predict` (DESIGN.md). Placeholder until issue 5 lands."""
from __future__ import annotations

from workflows.config import PredictConfig
from workflows.errors import NotBuiltYet


def run(config: PredictConfig) -> int:
    raise NotBuiltYet("issue 5")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("predict")
