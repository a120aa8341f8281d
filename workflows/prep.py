"""`cnnflow prep` (DESIGN.md). Placeholder until issue 3 lands."""
from __future__ import annotations

from workflows.config import PrepConfig
from workflows.errors import NotBuiltYet


def run(config: PrepConfig) -> int:
    raise NotBuiltYet("issue 3")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("prep")
