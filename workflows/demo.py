"""`cnnflow demo` (DESIGN.md). Placeholder until issue 7 lands."""
from __future__ import annotations

from workflows.config import DemoConfig
from workflows.errors import NotBuiltYet


def run(config: DemoConfig) -> int:
    raise NotBuiltYet("issue 7")


if __name__ == "__main__":
    from workflows.cli import main_for

    main_for("demo")
