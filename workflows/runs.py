"""`cnnflow runs` (DESIGN.md). Placeholder until issue 4 lands."""
from __future__ import annotations

from workflows.config import RunsConfig
from workflows.errors import NotBuiltYet


def run(config: RunsConfig) -> int:
    raise NotBuiltYet("issue 4")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("runs")
